//! Dot products: the dispatched (AVX2 where available) kernels against the scalar reference,
//! and both against the dequantized math.

use ds4_gguf::quant::{
    self, dequantize, quantize_q8_0_activation, quantize_q8_k_activation, scalar, simd_level,
    Activations, BlockQ8K, BlockQ8_0, QuantError, SimdLevel,
};
use ds4_gguf::GgmlType;

mod common;
use common::Rng;

/// A row of `n` elements of `ty` made of random bytes with sane f16 scale fields.
fn random_row(rng: &mut Rng, ty: GgmlType, n: usize) -> Vec<u8> {
    let bb = ty.block_bytes();
    let mut row = rng.bytes(n / ty.block_elems() * bb);
    let scale_offsets: &[usize] = match ty {
        GgmlType::Q8_0 | GgmlType::IQ2XXS => &[0],
        GgmlType::Q4K => &[0, 2],
        GgmlType::Q2K => &[80, 82],
        _ => unreachable!(),
    };
    for blk in row.chunks_exact_mut(bb) {
        for &o in scale_offsets {
            blk[o..o + 2].copy_from_slice(&rng.f16_scale());
        }
    }
    row
}

fn dequant(ty: GgmlType, row: &[u8], n: usize) -> Vec<f32> {
    let mut w = vec![0f32; n];
    dequantize(ty, row, &mut w).unwrap();
    w
}

fn q8_0_values(act: &[BlockQ8_0]) -> Vec<f32> {
    act.iter()
        .flat_map(|b| b.qs.iter().map(move |&q| b.d * q as f32))
        .collect()
}

fn q8_k_values(act: &[BlockQ8K]) -> Vec<f32> {
    act.iter()
        .flat_map(|b| b.qs.iter().map(move |&q| b.d * q as f32))
        .collect()
}

/// (Σ w·a in f64, Σ |w·a|).
fn exact_dot(w: &[f32], a: &[f32]) -> (f64, f64) {
    w.iter().zip(a).fold((0.0, 0.0), |(s, m), (&w, &a)| {
        let t = w as f64 * a as f64;
        (s + t, m + t.abs())
    })
}

const N: usize = 4096;
const ROWS: usize = 64;

#[test]
fn avx2_is_used_when_the_cpu_has_it() {
    #[cfg(target_arch = "x86_64")]
    if std::env::var_os("DS4_QUANT_SCALAR").is_none()
        && is_x86_feature_detected!("avx2")
        && is_x86_feature_detected!("fma")
        && is_x86_feature_detected!("f16c")
    {
        assert_eq!(simd_level(), SimdLevel::Avx2);
        return;
    }
    eprintln!("scalar kernels only here: {:?}", simd_level());
}

/// For each quantized format: dispatched kernel == scalar kernel within 1e-6·Σ|terms|, and
/// both == dequant(row)·dequant(act) (computed in f64) within 1e-5·Σ|terms|.
fn check_quantized(ty: GgmlType, seed: u64) {
    let mut rng = Rng(seed);
    let mut worst = (0.0f64, 0.0f64);
    for r in 0..ROWS {
        let x = rng.normals(N);
        let row = random_row(&mut rng, ty, N);
        let w = dequant(ty, &row, N);
        let (fast, slow, a) = match ty {
            GgmlType::Q8_0 => {
                let act = quantize_q8_0_activation(&x);
                let f = quant::vec_dot_q8_0(&row, &act);
                (f, scalar::vec_dot_q8_0(&row, &act), q8_0_values(&act))
            }
            _ => {
                let act = quantize_q8_k_activation(&x);
                let (f, s) = match ty {
                    GgmlType::Q2K => (
                        quant::vec_dot_q2_k(&row, &act),
                        scalar::vec_dot_q2_k(&row, &act),
                    ),
                    GgmlType::Q4K => (
                        quant::vec_dot_q4_k(&row, &act),
                        scalar::vec_dot_q4_k(&row, &act),
                    ),
                    GgmlType::IQ2XXS => (
                        quant::vec_dot_iq2_xxs(&row, &act),
                        scalar::vec_dot_iq2_xxs(&row, &act),
                    ),
                    _ => unreachable!(),
                };
                (f, s, q8_k_values(&act))
            }
        };
        let (exact, mag) = exact_dot(&w, &a);
        let simd_err = (fast as f64 - slow as f64).abs() / mag;
        let math_err = (slow as f64 - exact).abs() / mag;
        assert!(
            simd_err <= 1e-6,
            "{ty} row {r}: simd {fast} scalar {slow} (Σ|terms| {mag})"
        );
        assert!(
            math_err <= 1e-5,
            "{ty} row {r}: scalar {slow} exact {exact} (Σ|terms| {mag})"
        );
        worst = (worst.0.max(simd_err), worst.1.max(math_err));
    }
    eprintln!(
        "{ty}: max |simd-scalar|/Σ|terms| = {:.2e}, max |scalar-exact|/Σ|terms| = {:.2e} over {ROWS} rows",
        worst.0, worst.1
    );
}

#[test]
fn q8_0_dot_matches_scalar_and_dequantized_math() {
    check_quantized(GgmlType::Q8_0, 1);
}

#[test]
fn q2_k_dot_matches_scalar_and_dequantized_math() {
    check_quantized(GgmlType::Q2K, 2);
}

#[test]
fn q4_k_dot_matches_scalar_and_dequantized_math() {
    check_quantized(GgmlType::Q4K, 3);
}

#[test]
fn iq2_xxs_dot_matches_scalar_and_dequantized_math() {
    check_quantized(GgmlType::IQ2XXS, 4);
}

#[test]
fn float_dots_match_scalar_and_f64() {
    let mut rng = Rng(5);
    for ty in [GgmlType::F32, GgmlType::F16, GgmlType::BF16] {
        // Lengths that exercise the 32-wide, 8-wide and scalar tails.
        for n in [4096usize, 4096 + 8 + 3, 7, 0] {
            let x = rng.normals(n);
            let wv = rng.normals(n);
            let mut row = vec![0u8; n * ty.block_bytes()];
            quant::quantize(ty, &wv, &mut row).unwrap();
            let w = dequant(ty, &row, n);
            let fast = quant::dot_f32_row(ty, &row, &x).unwrap();
            let slow = match ty {
                GgmlType::F32 => scalar::dot_f32(&row, &x),
                GgmlType::F16 => scalar::dot_f16(&row, &x),
                _ => scalar::dot_bf16(&row, &x),
            };
            let (exact, mag) = exact_dot(&w, &x);
            let tol = mag.max(f64::MIN_POSITIVE);
            assert!(
                (fast as f64 - slow as f64).abs() <= 1e-6 * tol,
                "{ty} n={n}"
            );
            assert!((fast as f64 - exact).abs() <= 1e-6 * tol, "{ty} n={n}");
        }
    }
}

/// Dotting a quantized row with the quantized activation approximates dequant(row)·x within
/// the activation's rounding: each activation value is off by at most half its block step.
#[test]
fn quantized_activation_dot_is_within_activation_rounding() {
    let mut rng = Rng(6);
    for ty in [
        GgmlType::Q8_0,
        GgmlType::Q2K,
        GgmlType::Q4K,
        GgmlType::IQ2XXS,
    ] {
        let mut worst = 0.0f64;
        for _ in 0..16 {
            let x = rng.normals(N);
            let row = random_row(&mut rng, ty, N);
            let w = dequant(ty, &row, N);
            let acts = Activations::new(&x);
            let got = quant::vec_dot(ty, &row, &acts).unwrap() as f64;
            let (exact, mag) = exact_dot(&w, &x);
            let block = if ty == GgmlType::Q8_0 { 32 } else { 256 };
            let bound: f64 = w
                .chunks(block)
                .zip(x.chunks(block))
                .map(|(wb, xb)| {
                    let step = xb.iter().fold(0.0f32, |m, v| m.max(v.abs())) as f64 / 127.0;
                    wb.iter().map(|&v| v.abs() as f64).sum::<f64>() * step / 2.0
                })
                .sum();
            assert!(
                (got - exact).abs() <= bound * (1.0 + 1e-4) + 1e-5 * mag,
                "{ty}: got {got}, exact {exact}, bound {bound}"
            );
            worst = worst.max((got - exact).abs() / mag);
        }
        eprintln!("{ty}: max |dot(row, q(x)) - dequant(row)·x| / Σ|terms| = {worst:.2e}");
    }
}

#[test]
fn rows_at_odd_addresses_give_the_same_result() {
    let mut rng = Rng(7);
    let x = rng.normals(N);
    let acts = Activations::new(&x);
    for ty in [
        GgmlType::Q8_0,
        GgmlType::Q2K,
        GgmlType::Q4K,
        GgmlType::IQ2XXS,
    ] {
        let row = random_row(&mut rng, ty, N);
        let mut shifted = vec![0u8; row.len() + 1];
        shifted[1..].copy_from_slice(&row);
        let a = quant::vec_dot(ty, &row, &acts).unwrap();
        let b = quant::vec_dot(ty, &shifted[1..], &acts).unwrap();
        assert_eq!(a.to_bits(), b.to_bits(), "{ty}");
    }
}

#[test]
fn vec_dot_reports_bad_shapes_and_types() {
    let x = vec![0.5f32; 512];
    let acts = Activations::new(&x);
    let row = [0u8; 2 * 84];
    assert!(matches!(
        quant::vec_dot(GgmlType::Q2K, &row[1..], &acts),
        Err(QuantError::SizeMismatch { .. })
    ));
    assert!(matches!(
        quant::vec_dot(GgmlType::Q8K, &[0u8; 2 * 292], &acts),
        Err(QuantError::Unsupported { .. })
    ));
    let short = vec![0.5f32; 96];
    assert!(matches!(
        quant::vec_dot(GgmlType::Q4K, &[], &Activations::new(&short)),
        Err(QuantError::NotWholeBlocks { .. })
    ));
    assert!(matches!(
        quant::dot_f32_row(GgmlType::Q8_0, &[0u8; 34], &x[..32]),
        Err(QuantError::Unsupported { .. })
    ));
    // A zero activation gives zero scales and a zero dot.
    let zeros = vec![0f32; 512];
    let z = Activations::new(&zeros);
    let mut rng = Rng(8);
    let row = random_row(&mut rng, GgmlType::Q2K, 512);
    assert_eq!(quant::vec_dot(GgmlType::Q2K, &row, &z).unwrap(), 0.0);
}

#[test]
fn activations_quantize_once_and_accept_precomputed_blocks() {
    let mut rng = Rng(9);
    let x = rng.normals(512);
    let acts = Activations::new(&x);
    let p1 = acts.q8_k().unwrap().as_ptr();
    let p2 = acts.q8_k().unwrap().as_ptr();
    assert_eq!(p1, p2);
    let pre = Activations::with_q8_0(&x, quantize_q8_0_activation(&x)).unwrap();
    assert_eq!(pre.q8_0().unwrap(), acts.q8_0().unwrap());
    assert!(Activations::with_q8_k(&x, Vec::new()).is_err());
}

#[test]
fn matvec_equals_row_by_row_vec_dot() {
    let mut rng = Rng(10);
    let x = rng.normals(1024);
    let acts = Activations::new(&x);
    for ty in [
        GgmlType::Q8_0,
        GgmlType::Q2K,
        GgmlType::Q4K,
        GgmlType::IQ2XXS,
        GgmlType::F32,
        GgmlType::F16,
        GgmlType::BF16,
    ] {
        let rows = 5;
        let w: Vec<u8> = if ty.is_quantized() {
            (0..rows)
                .flat_map(|_| random_row(&mut rng, ty, 1024))
                .collect()
        } else {
            let v = rng.normals(rows * 1024);
            let mut w = vec![0u8; v.len() * ty.block_bytes()];
            quant::quantize(ty, &v, &mut w).unwrap();
            w
        };
        let mut out = vec![0f32; rows];
        quant::matvec(ty, &w, &acts, &mut out).unwrap();
        let rb = w.len() / rows;
        for (r, &o) in out.iter().enumerate() {
            let want = quant::vec_dot(ty, &w[r * rb..(r + 1) * rb], &acts).unwrap();
            assert_eq!(o.to_bits(), want.to_bits(), "{ty} row {r}");
        }
        let mut short = vec![0f32; rows + 1];
        assert!(quant::matvec(ty, &w, &acts, &mut short).is_err());
    }
}
