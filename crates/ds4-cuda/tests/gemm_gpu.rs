//! The tensor-core Q8_0 GEMM ([`Gpu::gemm_q8_0`], [`Gpu::expert_gemm_q8_0`]) against the CPU,
//! on random weights and activations: bit for bit against the GEMM's documented order (per block
//! the exact integer sum, `sum = fma(d_w · d_x, isum, sum)` in ascending block order), and
//! that order within a few roundings of ds4-gguf's scalar `vec_dot_q8_0`. On a machine without
//! CUDA each GPU test prints "skipped: no CUDA" and passes.
//!
//! Timing (on the GPU machine): `cargo test -p ds4-cuda --release --test gemm_gpu --
//! --ignored --nocapture gemm_q8_0_throughput`.

mod common;

use common::{gpu, random_rows, Rng};
use ds4_cuda::{ActQuant, CudaError, DeviceWeights, Gpu, QuantizedActivations, WeightFormat};
use ds4_gguf::quant::{self, BlockQ8_0};

const Q8: WeightFormat = WeightFormat::Q8_0;

/// CPU Q8_0 activations of `n_vecs` random vectors of `cols` values.
fn cpu_activations(rng: &mut Rng, cols: usize, n_vecs: usize) -> Vec<Vec<BlockQ8_0>> {
    (0..n_vecs)
        .map(|_| quant::quantize_q8_0_activation(&rng.f32s(cols)))
        .collect()
}

/// The CPU activations in the device layout: all quants, then one scale per block.
fn upload_activations(g: &Gpu, acts: &[Vec<BlockQ8_0>], cols: usize) -> QuantizedActivations {
    let q: Vec<i8> = acts.iter().flatten().flat_map(|b| b.qs).collect();
    let d: Vec<f32> = acts.iter().flatten().map(|b| b.d).collect();
    QuantizedActivations {
        kind: ActQuant::Q8_0,
        len: cols,
        n_vecs: acts.len(),
        q: g.device.upload(&q).unwrap(),
        d: g.device.upload(&d).unwrap(),
    }
}

/// Rows to check: all of them for small products, otherwise every 7th row (7 is prime to the
/// 128-row tile, so every position inside a tile is covered) and the last 130 rows.
fn rows_to_check(rows: usize, cols: usize, n_vecs: usize) -> Vec<usize> {
    if rows * cols * n_vecs <= 1 << 27 {
        return (0..rows).collect();
    }
    (0..rows)
        .filter(|&r| r % 7 == 3 || r + 130 >= rows)
        .collect()
}

/// The GEMM's Q8_0 dot product of one row: per block the exact integer sum, then one fused
/// multiply-add of it with the rounded scale product (gemm_q8.cu's "Numerics"). Also returns
/// the sum of the terms' magnitudes, which bounds how far another summation order may land.
fn fused_dot_q8_0(row: &[u8], act: &[BlockQ8_0]) -> (f32, f64) {
    let (mut sum, mut mag) = (0.0f32, 0.0f64);
    for (blk, a) in row.chunks_exact(34).zip(act) {
        let isum: i32 = blk[2..]
            .iter()
            .zip(&a.qs)
            .map(|(&w, &x)| (w as i8) as i32 * x as i32)
            .sum();
        let scale = half::f16::from_le_bytes([blk[0], blk[1]]).to_f32() * a.d;
        sum = scale.mul_add(isum as f32, sum);
        mag += (scale as f64 * isum as f64).abs();
    }
    (sum, mag)
}

/// Asserts y (vector-major, `rows` per vector) equals [`fused_dot_q8_0`] of each checked row of
/// `w` with each activation vector bit for bit, and that the fused order stays within two
/// roundings per block of the scalar CPU dot product (which rounds the product and the add
/// apart). Vectors are checked on all cores.
fn assert_bit_exact(what: &str, y: &[f32], w: &[u8], rows: usize, acts: &[&[BlockQ8_0]]) {
    let row_bytes = w.len() / rows;
    let cols = row_bytes / 34 * 32;
    let check = rows_to_check(rows, cols, acts.len());
    let threads = std::thread::available_parallelism().map_or(4, |n| n.get());
    let per = acts.len().div_ceil(threads);
    std::thread::scope(|s| {
        for (t, chunk) in acts.chunks(per).enumerate() {
            let check = &check;
            s.spawn(move || {
                for (i, act) in chunk.iter().enumerate() {
                    let v = t * per + i;
                    for &r in check {
                        let row = &w[r * row_bytes..(r + 1) * row_bytes];
                        let (want, mag) = fused_dot_q8_0(row, act);
                        let scalar = quant::scalar::vec_dot_q8_0(row, act);
                        let bound = 2.0 * act.len() as f64 * f32::EPSILON as f64 * mag;
                        assert!(
                            ((want - scalar) as f64).abs() <= bound,
                            "{what}: vector {v} row {r}: fused order {want:e} vs scalar {scalar:e}"
                        );
                        let got = y[v * rows + r];
                        assert!(
                            got.to_bits() == want.to_bits(),
                            "{what}: vector {v} row {r}: gpu {got:e} ({:#x}) vs cpu {want:e} ({:#x})",
                            got.to_bits(),
                            want.to_bits()
                        );
                    }
                }
            });
        }
    });
}

fn upload_weights(g: &Gpu, bytes: &[u8]) -> DeviceWeights {
    DeviceWeights::upload(&g.device, bytes, 0, &mut |_, _| {}).unwrap()
}

/// Runs gemm_q8_0 on `rows × cols` random weights (placed `offset` bytes into the buffer) for
/// each vector count and checks every result against the CPU. Returns the row tiles used.
fn check_shape(
    g: &Gpu,
    rng: &mut Rng,
    rows: usize,
    cols: usize,
    offset: usize,
    counts: &[usize],
) -> Vec<usize> {
    let w = random_rows(rng, Q8, cols, rows);
    let mut region = vec![0u8; offset];
    region.extend_from_slice(&w);
    let dw = upload_weights(g, &region);
    let m = dw.matrix(offset, Q8, cols, rows, 1).unwrap();
    let max_vecs = *counts.iter().max().unwrap();
    let acts = cpu_activations(rng, cols, max_vecs);
    let qa = upload_activations(g, &acts, cols);
    let mut tiles = Vec::new();
    for &n_vecs in counts {
        // NaN-filled, so an unwritten output fails the comparison.
        let mut dy = g.device.alloc_filled::<f32>(n_vecs * rows, 0xFF).unwrap();
        g.gemm_q8_0(&m, &qa, n_vecs, &mut dy).unwrap();
        let y = g.device.download(&dy).unwrap();
        let refs: Vec<&[BlockQ8_0]> = acts[..n_vecs].iter().map(|a| a.as_slice()).collect();
        let tile = g.gemm_q8_0_tile_rows(rows, n_vecs, 1);
        let what = format!("{rows}x{cols} (offset {offset}) x{n_vecs}, {tile}-row tiles");
        assert_bit_exact(&what, &y, &w, rows, &refs);
        eprintln!("{what}: bit-exact");
        tiles.push(tile);
    }
    tiles
}

#[test]
fn gemm_q8_0_real_shapes_match_cpu_bit_for_bit() {
    let Some(g) = gpu() else { return };
    let mut rng = Rng::new(71);
    // (rows, cols) of the model's Q8_0 projections, both orientations of the 4096 × 8192 one.
    let mut tiles = Vec::new();
    for (rows, cols) in [(1024, 4096), (4096, 8192), (8192, 4096), (32768, 1024)] {
        tiles.extend(check_shape(
            g,
            &mut rng,
            rows,
            cols,
            0,
            &[1, 7, 8, 64, 200, 256],
        ));
    }
    assert!(tiles.contains(&64) && tiles.contains(&128), "{tiles:?}");
}

#[test]
fn gemm_q8_0_ragged_shapes_match_cpu_bit_for_bit() {
    let Some(g) = gpu() else { return };
    let mut rng = Rng::new(72);
    let mut tiles = Vec::new();
    // Rows not a multiple of the row tile (1, 77, 129, 300: 64-row tiles; 4100: 128-row tiles
    // on a GPU of up to 132 SMs), vectors not a multiple of 64.
    for rows in [1, 77, 129, 300] {
        tiles.extend(check_shape(
            g,
            &mut rng,
            rows,
            4096,
            0,
            &[1, 7, 8, 64, 65, 200, 256],
        ));
    }
    tiles.extend(check_shape(g, &mut rng, 4100, 1024, 0, &[200, 256]));
    // Weights that are not 16-byte aligned (2-byte copy path): a buffer offset of 2, rows of a
    // block count that is not a multiple of 8 (96 = 3 blocks: one short K tile; 4128 = 129
    // blocks: 16 full tiles and one block; 1088 = 34 blocks at a buffer offset of 34).
    check_shape(g, &mut rng, 77, 4096, 2, &[1, 8, 70]);
    check_shape(g, &mut rng, 130, 96, 0, &[1, 9, 64]);
    check_shape(g, &mut rng, 45, 4128, 0, &[3, 66]);
    check_shape(g, &mut rng, 200, 1088, 34, &[5, 128]);
    tiles.extend(check_shape(g, &mut rng, 4100, 1088, 2, &[200]));
    assert!(tiles.contains(&64) && tiles.contains(&128), "{tiles:?}");
}

#[test]
fn gemm_q8_0_takes_activations_from_the_gpu_quantizer() {
    let Some(g) = gpu() else { return };
    let mut rng = Rng::new(73);
    let (rows, cols, n_vecs) = (300usize, 2048usize, 100usize);
    let w = random_rows(&mut rng, Q8, cols, rows);
    let dw = upload_weights(g, &w);
    let m = dw.matrix(0, Q8, cols, rows, 1).unwrap();
    let x = g.device.upload(&rng.f32s(cols * n_vecs)).unwrap();
    let mut qa = g.alloc_quantized(ActQuant::Q8_0, cols, n_vecs).unwrap();
    g.quantize_activations(&x, &mut qa).unwrap();
    let mut dy = g.device.alloc_filled::<f32>(n_vecs * rows, 0xFF).unwrap();
    g.gemm_q8_0(&m, &qa, n_vecs, &mut dy).unwrap();
    let y = g.device.download(&dy).unwrap();
    // The reference reads back exactly what the GPU quantizer wrote.
    let (q, d) = (
        g.device.download(&qa.q).unwrap(),
        g.device.download(&qa.d).unwrap(),
    );
    let acts: Vec<Vec<BlockQ8_0>> = (0..n_vecs)
        .map(|v| {
            (0..cols / 32)
                .map(|b| {
                    let at = v * cols + 32 * b;
                    let mut qs = [0i8; 32];
                    qs.copy_from_slice(&q[at..at + 32]);
                    BlockQ8_0 { d: d[at / 32], qs }
                })
                .collect()
        })
        .collect();
    let refs: Vec<&[BlockQ8_0]> = acts.iter().map(|a| a.as_slice()).collect();
    assert_bit_exact("gpu-quantized", &y, &w, rows, &refs);
    // And the dp4a GEMV's sums, up to its f32 summation order: within 1e-5 of Σ|terms|.
    let mut dg = g.device.alloc_filled::<f32>(n_vecs * rows, 0xFF).unwrap();
    g.gemv(&m, ds4_cuda::Activations::Quantized(&qa), n_vecs, &mut dg)
        .unwrap();
    let yg = g.device.download(&dg).unwrap();
    let row_bytes = w.len() / rows;
    for v in 0..n_vecs {
        for r in 0..rows {
            let row = &w[r * row_bytes..(r + 1) * row_bytes];
            let mag: f64 = row
                .chunks_exact(34)
                .zip(&acts[v])
                .map(|(blk, a)| {
                    let dw = half::f16::from_le_bytes([blk[0], blk[1]]).to_f64();
                    let isum: i64 = blk[2..]
                        .iter()
                        .zip(&a.qs)
                        .map(|(&q, &x)| (q as i8 as i64 * x as i64).abs())
                        .sum();
                    (dw * a.d as f64).abs() * isum as f64
                })
                .sum();
            let (a, b) = (y[v * rows + r], yg[v * rows + r]);
            assert!(
                ((a - b) as f64).abs() <= 1e-5 * mag,
                "vector {v} row {r}: gemm {a} vs gemv {b} (Σ|terms| {mag})"
            );
        }
    }
}

#[test]
fn expert_gemm_q8_0_reads_ids_from_the_device() {
    let Some(g) = gpu() else { return };
    let mut rng = Rng::new(74);
    let (n_experts, rows, cols) = (5usize, 200usize, 1024usize);
    let w = random_rows(&mut rng, Q8, cols, rows * n_experts);
    let ebytes = w.len() / n_experts;
    let dw = upload_weights(g, &w);
    let m = dw.matrix(0, Q8, cols, rows, n_experts).unwrap();
    // A repeated id, the last expert, and ids out of range (NaN slots).
    let ids: Vec<i32> = vec![3, 0, 3, 4, -1, 5, 1];
    let dids = g.device.upload(&ids).unwrap();
    let slots = ids.len();
    for n_vecs in [1usize, 9, 70] {
        for x_per_slot in [false, true] {
            let xv = if x_per_slot { slots * n_vecs } else { n_vecs };
            let acts = cpu_activations(&mut rng, cols, xv);
            let qa = upload_activations(g, &acts, cols);
            // Zero-filled: a bad id's outputs must be written (NaN), not left alone.
            let mut dy = g
                .device
                .alloc_filled::<f32>(slots * n_vecs * rows, 0x00)
                .unwrap();
            g.expert_gemm_q8_0(&m, &dids, slots, &qa, x_per_slot, n_vecs, &mut dy)
                .unwrap();
            let y = g.device.download(&dy).unwrap();
            for (s, &e) in ids.iter().enumerate() {
                let out = &y[s * n_vecs * rows..(s + 1) * n_vecs * rows];
                if e < 0 || e as usize >= n_experts {
                    assert!(out.iter().all(|o| o.is_nan()), "bad id {e}: NaN outputs");
                    continue;
                }
                let we = &w[e as usize * ebytes..(e as usize + 1) * ebytes];
                let refs: Vec<&[BlockQ8_0]> = (0..n_vecs)
                    .map(|v| acts[if x_per_slot { s * n_vecs + v } else { v }].as_slice())
                    .collect();
                let what = format!("slot {s} expert {e} x{n_vecs} per_slot {x_per_slot}");
                assert_bit_exact(&what, out, we, rows, &refs);
            }
        }
    }
}

/// The interleaved layout (slot s of vector v is vector v·slots + s of x and y, as the
/// attention's token-major head groups) gives each output the scalar dot product, bit for bit.
#[test]
fn expert_gemm_q8_0_interleaved_matches_cpu_bit_for_bit() {
    let Some(g) = gpu() else { return };
    let mut rng = Rng::new(75);
    let (n_experts, rows, cols) = (8usize, 136usize, 512usize);
    let w = random_rows(&mut rng, Q8, cols, rows * n_experts);
    let ebytes = w.len() / n_experts;
    let dw = upload_weights(g, &w);
    let m = dw.matrix(0, Q8, cols, rows, n_experts).unwrap();
    let ids: Vec<i32> = (0..n_experts as i32).collect();
    let dids = g.device.upload(&ids).unwrap();
    let slots = ids.len();
    for n_vecs in [16usize, 67] {
        let acts = cpu_activations(&mut rng, cols, slots * n_vecs);
        let qa = upload_activations(g, &acts, cols);
        let mut dy = g
            .device
            .alloc_filled::<f32>(slots * n_vecs * rows, 0x00)
            .unwrap();
        g.expert_gemm_q8_0_interleaved(&m, &dids, slots, &qa, n_vecs, &mut dy)
            .unwrap();
        let y = g.device.download(&dy).unwrap();
        for (s, &e) in ids.iter().enumerate() {
            let we = &w[e as usize * ebytes..(e as usize + 1) * ebytes];
            // Slot s's outputs, gathered vector-major for the checker.
            let out: Vec<f32> = (0..n_vecs)
                .flat_map(|v| {
                    y[(v * slots + s) * rows..(v * slots + s + 1) * rows]
                        .iter()
                        .copied()
                })
                .collect();
            let refs: Vec<&[BlockQ8_0]> = (0..n_vecs)
                .map(|v| acts[v * slots + s].as_slice())
                .collect();
            assert_bit_exact(
                &format!("interleaved slot {s} x{n_vecs}"),
                &out,
                we,
                rows,
                &refs,
            );
        }
    }
}

/// The f16 prefill path ([`Gpu::gemm_q8_0_f16`], `DS4_CUDA_FAST_PREFILL`) on the model's
/// shapes: each sampled output
/// within 1e-4 of the sum of its terms' magnitudes of the exact product of the Q8_0 weights
/// and the f32 activations (f64 here; the probe measured at most 3.9e-5), and closer to it on
/// the whole than the exact Q8_0 GEMM, whose activations are quantized. Spans too short for
/// the path leave y untouched and say so.
#[test]
fn gemm_q8_0_f16_is_close_to_the_exact_product() {
    let Some(g) = gpu() else { return };
    let mut rng = Rng::new(75);
    for (rows, cols, n) in [
        (1024usize, 4096usize, 64usize),
        (4096, 8192, 200),
        (32768, 1024, 130),
    ] {
        let w = random_rows(&mut rng, Q8, cols, rows);
        let dw = upload_weights(g, &w);
        let m = dw.matrix(0, Q8, cols, rows, 1).unwrap();
        let x = rng.f32s(cols * n);
        let dx = g.device.upload(&x).unwrap();
        let mut dy = g.device.alloc_filled::<f32>(n * rows, 0xFF).unwrap();
        assert!(
            g.gemm_q8_0_f16(&m, &dx, n, &mut dy).unwrap(),
            "{rows}x{cols} x{n}: the f16 path did not run (cuBLAS missing?)"
        );
        let y = g.device.download(&dy).unwrap();
        let acts: Vec<Vec<BlockQ8_0>> = x
            .chunks_exact(cols)
            .map(quant::quantize_q8_0_activation)
            .collect();
        let qa = upload_activations(g, &acts, cols);
        let mut dq = g.device.alloc_filled::<f32>(n * rows, 0xFF).unwrap();
        g.gemm_q8_0(&m, &qa, n, &mut dq).unwrap();
        let yq = g.device.download(&dq).unwrap();
        let row_bytes = w.len() / rows;
        let (mut err_f16, mut err_q8) = (0.0f64, 0.0f64);
        for k in 0..300 {
            let (r, v) = ((k * 7919) % rows, (k * 104729) % n);
            let row = &w[r * row_bytes..(r + 1) * row_bytes];
            let (mut exact, mut mag) = (0.0f64, 0.0f64);
            for (b, blk) in row.chunks_exact(34).enumerate() {
                let d = half::f16::from_le_bytes([blk[0], blk[1]]).to_f64();
                for (i, &q) in blk[2..].iter().enumerate() {
                    let t = d * (q as i8) as f64 * x[v * cols + 32 * b + i] as f64;
                    exact += t;
                    mag += t.abs();
                }
            }
            let e = (y[v * rows + r] as f64 - exact).abs() / mag;
            assert!(
                e <= 1e-4,
                "{rows}x{cols} x{n}: vector {v} row {r}: f16 path {} vs exact {exact} ({e:.2e})",
                y[v * rows + r]
            );
            err_f16 += e;
            err_q8 += (yq[v * rows + r] as f64 - exact).abs() / mag;
        }
        println!(
            "{rows}x{cols} x{n}: mean relative error f16 path {:.2e}, Q8_0 GEMM {:.2e}",
            err_f16 / 300.0,
            err_q8 / 300.0
        );
        assert!(
            err_f16 < err_q8,
            "{rows}x{cols}: the f16 path is not the closer one"
        );
    }
    // Too few vectors: nothing runs, y keeps its NaN fill.
    let w = random_rows(&mut rng, Q8, 4096, 64);
    let dw = upload_weights(g, &w);
    let m = dw.matrix(0, Q8, 4096, 64, 1).unwrap();
    let dx = g.device.upload(&rng.f32s(4096 * 63)).unwrap();
    let mut dy = g.device.alloc_filled::<f32>(63 * 64, 0xFF).unwrap();
    assert!(!g.gemm_q8_0_f16(&m, &dx, 63, &mut dy).unwrap());
    assert!(g.device.download(&dy).unwrap().iter().all(|v| v.is_nan()));
}

fn invalid_message(r: Result<(), CudaError>) -> String {
    match r {
        Err(CudaError::InvalidArgument(m)) => m,
        other => panic!("expected InvalidArgument, got {other:?}"),
    }
}

#[test]
fn gemm_q8_0_rejects_bad_arguments() {
    let Some(g) = gpu() else { return };
    let mut rng = Rng::new(75);
    let (rows, cols) = (64usize, 512usize);
    let w = random_rows(&mut rng, Q8, cols, rows * 2);
    let dw = upload_weights(g, &w);
    let m = dw.matrix(0, Q8, cols, rows, 1).unwrap();
    let stack = dw.matrix(0, Q8, cols, rows, 2).unwrap();
    let f16 = dw.matrix(0, WeightFormat::F16, cols, rows, 1).unwrap();
    let qa = g.alloc_quantized(ActQuant::Q8_0, cols, 4).unwrap();
    let qk = g.alloc_quantized(ActQuant::Q8K, cols, 4).unwrap();
    let short = g.alloc_quantized(ActQuant::Q8_0, cols - 32, 4).unwrap();
    let mut y = g.device.alloc::<f32>(rows * 4).unwrap();
    let mut y_short = g.device.alloc::<f32>(rows * 4 - 1).unwrap();

    let e = invalid_message(g.gemm_q8_0(&f16, &qa, 4, &mut y));
    assert!(e.contains("Q8_0 weights") && e.contains("F16"), "{e}");
    let e = invalid_message(g.gemm_q8_0(&m, &qk, 4, &mut y));
    assert!(e.contains("Q8K"), "{e}");
    let e = invalid_message(g.gemm_q8_0(&m, &short, 4, &mut y));
    assert!(e.contains("512 columns") && e.contains("480"), "{e}");
    let e = invalid_message(g.gemm_q8_0(&m, &qa, 5, &mut y));
    assert!(e.contains("5 activation vectors"), "{e}");
    let e = invalid_message(g.gemm_q8_0(&m, &qa, 4, &mut y_short));
    assert!(e.contains("output"), "{e}");
    let e = invalid_message(g.gemm_q8_0(&stack, &qa, 4, &mut y));
    assert!(e.contains("expert_gemm_q8_0"), "{e}");

    let ids = g.device.upload(&[0i32, 1]).unwrap();
    let e = invalid_message(g.expert_gemm_q8_0(&stack, &ids, 0, &qa, false, 1, &mut y));
    assert!(e.contains("0 expert slots"), "{e}");
    let e = invalid_message(g.expert_gemm_q8_0(&stack, &ids, 3, &qa, false, 1, &mut y));
    assert!(e.contains("expert id buffer"), "{e}");
    // Per-slot inputs: 2 slots × 4 vectors need 8 activation vectors.
    let e = invalid_message(g.expert_gemm_q8_0(&stack, &ids, 2, &qa, true, 4, &mut y));
    assert!(e.contains("8 activation vectors"), "{e}");
    // Zero vectors is a valid no-op.
    g.gemm_q8_0(&m, &qa, 0, &mut y).unwrap();
}

/// Not a correctness test: prints the GEMM's time, weight bandwidth and integer throughput on
/// the model's Q8_0 shapes, beside the dp4a GEMV on the same inputs.
#[test]
#[ignore]
fn gemm_q8_0_throughput() {
    let Some(g) = gpu() else { return };
    let mut rng = Rng::new(76);
    let iters = 20;
    for (rows, cols) in [
        (4096usize, 8192usize),
        (8192, 4096),
        (1024, 4096),
        (32768, 1024),
    ] {
        let w = random_rows(&mut rng, Q8, cols, rows);
        let dw = upload_weights(g, &w);
        let m = dw.matrix(0, Q8, cols, rows, 1).unwrap();
        for n_vecs in [256usize, 2048] {
            let x = g.device.upload(&rng.f32s(cols * n_vecs)).unwrap();
            let mut qa = g.alloc_quantized(ActQuant::Q8_0, cols, n_vecs).unwrap();
            g.quantize_activations(&x, &mut qa).unwrap();
            let mut y = g.device.alloc::<f32>(rows * n_vecs).unwrap();
            let mut time = |f: &mut dyn FnMut(&mut ds4_cuda::DeviceBuffer<f32>)| -> f64 {
                f(&mut y); // warm-up (and the kernel lookup)
                let start = g.device.record_event().unwrap();
                for _ in 0..iters {
                    f(&mut y);
                }
                let end = g.device.record_event().unwrap();
                g.device.elapsed_ms(&start, &end).unwrap() as f64 / iters as f64 * 1e-3
            };
            let t_gemm = time(&mut |y| g.gemm_q8_0(&m, &qa, n_vecs, y).unwrap());
            let t_gemv = time(&mut |y| {
                g.gemv(&m, ds4_cuda::Activations::Quantized(&qa), n_vecs, y)
                    .unwrap()
            });
            // Weights, activations (1 byte + a 4-byte scale per 32) and outputs, each once.
            let bytes = (w.len() + n_vecs * cols * 36 / 32 + n_vecs * rows * 4) as f64;
            let ops = 2.0 * (rows * cols * n_vecs) as f64;
            eprintln!(
                "gemm_q8_0 {rows}x{cols} x{n_vecs}: {:.1} us, {:.0} GB/s (each operand once), {:.1} TOPS; gemv {:.1} us ({:.1}x)",
                t_gemm * 1e6,
                bytes / t_gemm * 1e-9,
                ops / t_gemm * 1e-12,
                t_gemv * 1e6,
                t_gemv / t_gemm
            );
        }
    }
}
