//! Single-thread matrix-vector products: a 1024-row × 4096-column weight in each format
//! against one activation vector (already quantized, as the forward pass reuses it), reported
//! as bytes of weights read per second. `cargo bench -p ds4-gguf --bench dot`.

use divan::counter::BytesCount;
use divan::{black_box, Bencher};
use ds4_gguf::quant::{
    self, quantize_q8_0_activation, quantize_q8_k_activation, scalar, Activations,
};
use ds4_gguf::GgmlType;

fn main() {
    eprintln!("kernels: {:?}", quant::simd_level());
    divan::main();
}

const COLS: usize = 4096;
const ROWS: usize = 1024;

const TYPES: [GgmlType; 7] = [
    GgmlType::Q8_0,
    GgmlType::Q4K,
    GgmlType::Q2K,
    GgmlType::IQ2XXS,
    GgmlType::F32,
    GgmlType::F16,
    GgmlType::BF16,
];

/// Deterministic pseudo-random bytes.
fn bytes(n: usize, seed: u64) -> Vec<u8> {
    let mut s = seed;
    (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            s as u8
        })
        .collect()
}

/// A ROWS × COLS weight of `ty`: random level bytes with sane f16 scale fields; float types
/// from random values in [-1, 1).
fn weights(ty: GgmlType) -> Vec<u8> {
    let n = ROWS * COLS;
    if !ty.is_quantized() {
        let x: Vec<f32> = bytes(n, 7)
            .iter()
            .map(|&b| b as f32 / 128.0 - 1.0)
            .collect();
        let mut w = vec![0u8; n * ty.block_bytes()];
        quant::quantize(ty, &x, &mut w).expect("float quantize");
        return w;
    }
    let bb = ty.block_bytes();
    let mut w = bytes(n / ty.block_elems() * bb, 3);
    let scale_offsets: &[usize] = match ty {
        GgmlType::Q8_0 | GgmlType::IQ2XXS => &[0],
        GgmlType::Q4K => &[0, 2],
        GgmlType::Q2K => &[80, 82],
        _ => unreachable!(),
    };
    let scale = half::f16::from_f32(0.01).to_bits().to_le_bytes();
    for blk in w.chunks_exact_mut(bb) {
        for &o in scale_offsets {
            blk[o..o + 2].copy_from_slice(&scale);
        }
    }
    w
}

fn activation() -> Vec<f32> {
    bytes(COLS, 11)
        .iter()
        .map(|&b| b as f32 / 64.0 - 2.0)
        .collect()
}

/// The dispatched kernels (AVX2 on x86-64 CPUs that have it), through `quant::matvec`.
#[divan::bench(args = TYPES)]
fn matvec(bencher: Bencher, ty: GgmlType) {
    let w = weights(ty);
    let x = activation();
    let acts = Activations::new(&x);
    let mut out = vec![0f32; ROWS];
    // Quantize the activation outside the timed loop, as the forward pass does once per token.
    quant::matvec(ty, &w, &acts, &mut out).expect("matvec");
    bencher.counter(BytesCount::new(w.len())).bench_local(|| {
        quant::matvec(ty, &w, &acts, &mut out).expect("matvec");
        black_box(&out);
    });
}

/// The scalar reference kernels, for comparison.
#[divan::bench(args = TYPES)]
fn matvec_scalar(bencher: Bencher, ty: GgmlType) {
    let w = weights(ty);
    let x = activation();
    let q8_0 = quantize_q8_0_activation(&x);
    let q8_k = quantize_q8_k_activation(&x);
    let row_bytes = w.len() / ROWS;
    let mut out = vec![0f32; ROWS];
    bencher.counter(BytesCount::new(w.len())).bench_local(|| {
        for (o, row) in out.iter_mut().zip(w.chunks_exact(row_bytes)) {
            *o = match ty {
                GgmlType::Q8_0 => scalar::vec_dot_q8_0(row, &q8_0),
                GgmlType::Q4K => scalar::vec_dot_q4_k(row, &q8_k),
                GgmlType::Q2K => scalar::vec_dot_q2_k(row, &q8_k),
                GgmlType::IQ2XXS => scalar::vec_dot_iq2_xxs(row, &q8_k),
                GgmlType::F32 => scalar::dot_f32(row, &x),
                GgmlType::F16 => scalar::dot_f16(row, &x),
                GgmlType::BF16 => scalar::dot_bf16(row, &x),
                _ => unreachable!(),
            };
        }
        black_box(&out);
    });
}

/// Quantizing one 4096-wide activation (once per token and matmul input).
#[divan::bench]
fn quantize_activation_q8_0(bencher: Bencher) {
    let x = activation();
    bencher
        .counter(BytesCount::new(COLS * 4))
        .bench_local(|| black_box(quantize_q8_0_activation(black_box(&x))));
}

#[divan::bench]
fn quantize_activation_q8_k(bencher: Bencher) {
    let x = activation();
    bencher
        .counter(BytesCount::new(COLS * 4))
        .bench_local(|| black_box(quantize_q8_k_activation(black_box(&x))));
}

/// Weight quantization and dequantization speed (what `ds4 convert` and prefill
/// dequantization pay), on 64 blocks of 256 N(0,1)-like values.
#[divan::bench(args = TYPES)]
fn quantize_weights(bencher: Bencher, ty: GgmlType) {
    let x: Vec<f32> = bytes(64 * 256, 5)
        .iter()
        .map(|&b| b as f32 / 64.0 - 2.0)
        .collect();
    let mut q = vec![0u8; x.len() / ty.block_elems() * ty.block_bytes()];
    bencher
        .counter(divan::counter::ItemsCount::new(x.len()))
        .bench_local(|| quant::quantize(ty, black_box(&x), &mut q).expect("quantize"));
}

#[divan::bench(args = TYPES)]
fn dequantize_weights(bencher: Bencher, ty: GgmlType) {
    let w = weights(ty);
    let mut y = vec![0f32; ROWS * COLS];
    bencher
        .counter(BytesCount::new(w.len()))
        .bench_local(|| quant::dequantize(ty, black_box(&w), &mut y).expect("dequantize"));
}
