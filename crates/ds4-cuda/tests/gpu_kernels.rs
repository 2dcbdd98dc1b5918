//! Every kernel against the CPU reference (ds4-gguf's dequantizers and dot products) on random
//! data. On a machine without CUDA each test prints "skipped: no CUDA" and passes; on the GPU
//! machine they all run.

mod common;

use common::{gpu, random_rows, Rng};
use ds4_cuda::{ActQuant, Activations, CudaDevice, DeviceMatrix, DeviceWeights, Gpu, WeightFormat};
use ds4_gguf::quant::{self, BlockQ8K, BlockQ8_0};

/// CPU reference: dequantize the rows, dot in f64. Returns (y, Σ|w·x| per row).
fn reference_gemv(
    format: WeightFormat,
    w: &[u8],
    cols: usize,
    rows: usize,
    x: &[f32],
) -> (Vec<f64>, Vec<f64>) {
    let mut deq = vec![0f32; cols * rows];
    quant::dequantize(format.ggml(), w, &mut deq).unwrap();
    let mut y = vec![0f64; rows];
    let mut mag = vec![0f64; rows];
    for r in 0..rows {
        for c in 0..cols {
            let t = deq[r * cols + c] as f64 * x[c] as f64;
            y[r] += t;
            mag[r] += t.abs();
        }
    }
    (y, mag)
}

/// Largest |gpu - ref| / (Σ|w·x| + tiny) over all rows; panics on NaN or a bound violation.
fn check_rows(what: &str, gpu: &[f32], reference: &[f64], mag: &[f64], tol: f64) -> f64 {
    let mut worst = 0f64;
    for (i, ((&g, &r), &m)) in gpu.iter().zip(reference).zip(mag).enumerate() {
        assert!(g.is_finite(), "{what}: row {i} is {g} (unwritten or NaN)");
        let e = (g as f64 - r).abs() / (m + 1e-30);
        assert!(
            e <= tol,
            "{what}: row {i}: gpu {g} vs ref {r} (Σ|wx| {m}): rel err {e:.3e} > {tol:.1e}"
        );
        worst = worst.max(e);
    }
    worst
}

fn upload_matrix(g: &Gpu, bytes: &[u8]) -> DeviceWeights {
    DeviceWeights::upload(&g.device, bytes, 0, &mut |_, _| {}).unwrap()
}

#[test]
fn open_without_driver_is_a_clear_error() {
    if ds4_cuda::device::driver_present() {
        eprintln!("skipped: a CUDA driver is present (this checks the no-driver path)");
        return;
    }
    let e = CudaDevice::open(0)
        .err()
        .expect("no driver: open must fail")
        .to_string();
    assert!(
        e.contains("libcuda.so") && e.contains("--backend cuda"),
        "{e}"
    );
    assert!(Gpu::open(0).is_err());
    assert!(!ds4_cuda::cuda_available());
}

#[test]
fn gemv_f32_activations_match_cpu() {
    let Some(g) = gpu() else { return };
    let mut rng = Rng::new(1);
    // (cols, rows): aligned rows, a ragged last chunk, rows not a multiple of the CTA's 8,
    // and (Q8_0 96, F32/F16 100) rows that are not 16-byte aligned (2-byte copy path).
    let shapes: &[(WeightFormat, usize, usize)] = &[
        (WeightFormat::F32, 256, 37),
        (WeightFormat::F32, 100, 9),
        (WeightFormat::F16, 512, 45),
        (WeightFormat::F16, 100, 7),
        // Rows split across warps (F16 4096: 8 warps per row; 4104: a last piece that only
        // some threads have; 1030: rows not 16-byte aligned, scalar loads), few and many rows.
        (WeightFormat::F16, 4096, 64),
        (WeightFormat::F16, 4096, 257),
        (WeightFormat::F16, 4104, 19),
        (WeightFormat::F16, 1030, 5),
        (WeightFormat::F16, 1024, 600),
        (WeightFormat::F32, 4096, 33),
        (WeightFormat::Q8_0, 4096, 67),
        (WeightFormat::Q8_0, 96, 13),
        (WeightFormat::Q8_0, 1088, 33),
        (WeightFormat::Q2K, 2048, 41),
        (WeightFormat::Q2K, 768, 5),
        (WeightFormat::Q4K, 4096, 29),
        (WeightFormat::Q4K, 1280, 18),
        (WeightFormat::IQ2XXS, 4096, 35),
        (WeightFormat::IQ2XXS, 768, 3),
        // Several warps per row group (staged chunks dealt out in turn), a ragged last chunk.
        (WeightFormat::IQ2XXS, 8192, 35),
        (WeightFormat::Q8_0, 8224, 9),
    ];
    for &(format, cols, rows) in shapes {
        for n_vecs in [1usize, 3, 8, 13, 25] {
            let w = random_rows(&mut rng, format, cols, rows);
            let x = rng.f32s(cols * n_vecs);
            let dw = upload_matrix(g, &w);
            let m = dw.matrix(0, format, cols, rows, 1).unwrap();
            let dx = g.device.upload(&x).unwrap();
            let mut dy = g.device.alloc_filled::<f32>(rows * n_vecs, 0xFF).unwrap();
            g.gemv(&m, Activations::F32(&dx), n_vecs, &mut dy).unwrap();
            let y = g.device.download(&dy).unwrap();
            let mut worst = 0f64;
            for v in 0..n_vecs {
                let (r, mag) = reference_gemv(format, &w, cols, rows, &x[v * cols..(v + 1) * cols]);
                let what = format!("{format:?} {cols}x{rows} nb{n_vecs} vec{v}");
                worst = worst.max(check_rows(
                    &what,
                    &y[v * rows..(v + 1) * rows],
                    &r,
                    &mag,
                    2e-5,
                ));
            }
            eprintln!("{format:?} f32x {cols}x{rows} nb{n_vecs}: max rel err {worst:.2e}");
        }
    }
}

/// CPU dot products of ds4's quantized paths for one activation vector.
fn reference_quantized(
    format: WeightFormat,
    w: &[u8],
    cols: usize,
    rows: usize,
    x: &[f32],
) -> Vec<f64> {
    let rb = w.len() / rows;
    (0..rows)
        .map(|r| {
            let row = &w[r * rb..(r + 1) * rb];
            let _ = cols;
            (match format {
                WeightFormat::Q8_0 => quant::vec_dot_q8_0(row, &quant::quantize_q8_0_activation(x)),
                WeightFormat::Q2K => quant::vec_dot_q2_k(row, &quant::quantize_q8_k_activation(x)),
                WeightFormat::Q4K => quant::vec_dot_q4_k(row, &quant::quantize_q8_k_activation(x)),
                WeightFormat::IQ2XXS => {
                    quant::vec_dot_iq2_xxs(row, &quant::quantize_q8_k_activation(x))
                }
                _ => unreachable!(),
            }) as f64
        })
        .collect()
}

#[test]
fn gemv_quantized_activations_match_cpu_dot_products() {
    let Some(g) = gpu() else { return };
    let mut rng = Rng::new(2);
    let shapes: &[(WeightFormat, usize, usize)] = &[
        (WeightFormat::Q8_0, 4096, 67),
        (WeightFormat::Q8_0, 96, 11),
        (WeightFormat::Q2K, 2048, 41),
        (WeightFormat::Q4K, 4096, 29),
        (WeightFormat::IQ2XXS, 4096, 35),
        (WeightFormat::IQ2XXS, 512, 6),
        // Several warps per row group; ragged chunks.
        (WeightFormat::IQ2XXS, 8192, 35),
        (WeightFormat::IQ2XXS, 4352, 4),
        (WeightFormat::Q8_0, 8224, 9),
        (WeightFormat::Q2K, 4096, 300),
        (WeightFormat::Q4K, 6144, 7),
        // 3 and 5 chunks per row: as many warps per row group (not a power of two).
        (WeightFormat::Q8_0, 3072, 50),
        (WeightFormat::Q2K, 10240, 12),
    ];
    for &(format, cols, rows) in shapes {
        // 27 = 3 batches of 8 in one launch (weights staged once), then 2 and 1.
        for n_vecs in [1usize, 2, 8, 11, 27] {
            let w = random_rows(&mut rng, format, cols, rows);
            let x = rng.f32s(cols * n_vecs);
            let dw = upload_matrix(g, &w);
            let m = dw.matrix(0, format, cols, rows, 1).unwrap();
            let dx = g.device.upload(&x).unwrap();
            let kind = format.activation_quant().unwrap();
            let mut qa = g.alloc_quantized(kind, cols, n_vecs).unwrap();
            g.quantize_activations(&dx, &mut qa).unwrap();
            let mut dy = g.device.alloc_filled::<f32>(rows * n_vecs, 0xFF).unwrap();
            g.gemv(&m, Activations::Quantized(&qa), n_vecs, &mut dy)
                .unwrap();
            let y = g.device.download(&dy).unwrap();
            let mut worst = 0f64;
            for v in 0..n_vecs {
                let xv = &x[v * cols..(v + 1) * cols];
                let r = reference_quantized(format, &w, cols, rows, xv);
                let (_, mag) = reference_gemv(format, &w, cols, rows, xv);
                let what = format!("{format:?} q8x {cols}x{rows} nb{n_vecs} vec{v}");
                worst = worst.max(check_rows(
                    &what,
                    &y[v * rows..(v + 1) * rows],
                    &r,
                    &mag,
                    1e-5,
                ));
            }
            eprintln!(
                "{format:?} q8x {cols}x{rows} nb{n_vecs}: max rel err vs CPU dot {worst:.2e}"
            );
        }
    }
}

/// The IQ2_XXS dp4a kernel's row sum, emulated on the CPU in the kernel's exact order for a
/// row of one staged chunk (4096 columns: 16 blocks, `split` 1): lane l takes item l % 8 of
/// blocks l / 8, l / 8 + 4, ... and adds `0.125 * (dx * d) * (ls * isum)` per item with one
/// fused multiply-add; the lanes are combined by the butterfly of warp_sum (lane l adds lane
/// l ^ 16, then ^ 8, ^ 4, ^ 2, ^ 1) and lane 0's value is the row.
fn iq2_xxs_kernel_order(row: &[u8], x: &[BlockQ8K], grid: &[u64]) -> f32 {
    assert_eq!(row.len(), 16 * 66);
    let mut lanes = [0f32; 32];
    for (l, acc) in lanes.iter_mut().enumerate() {
        let it = l % 8;
        for b in (l / 8..16).step_by(4) {
            let blk = &row[b * 66..(b + 1) * 66];
            let word = |at: usize| u32::from_le_bytes(blk[at..at + 4].try_into().unwrap());
            let (a0, a1) = (word(2 + 8 * it), word(6 + 8 * it));
            let mut isum = 0i32;
            for g in 0..4 {
                let codes = grid[((a0 >> (8 * g)) & 255) as usize].to_le_bytes();
                let s7 = (a1 >> (7 * g)) & 127;
                let signs = s7 | ((s7.count_ones() & 1) << 7);
                for (j, &c) in codes.iter().enumerate() {
                    let w = if signs >> j & 1 == 1 {
                        -(c as i32)
                    } else {
                        c as i32
                    };
                    isum += w * x[b].qs[32 * it + 8 * g + j] as i32;
                }
            }
            let ls = 2 * (a1 >> 28) as i32 + 1;
            let d = half::f16::from_bits(u16::from_le_bytes([blk[0], blk[1]])).to_f32();
            *acc = (0.125f32 * (x[b].d * d)).mul_add((ls * isum) as f32, *acc);
        }
    }
    for o in [16, 8, 4, 2, 1] {
        let prev = lanes;
        for (l, v) in lanes.iter_mut().enumerate() {
            *v = prev[l] + prev[l ^ o];
        }
    }
    lanes[0]
}

/// The IQ2_XXS dp4a kernel (the routed experts' gate and up projections in decode) gives,
/// bit for bit, the sums of its documented order (`iq2_xxs_kernel_order`), for plain and
/// expert launches of 1, 2 and 8 vectors: any change to its decode must keep these bits.
#[test]
fn iq2_xxs_dp4a_rows_follow_the_kernel_order_bit_for_bit() {
    let Some(g) = gpu() else { return };
    let mut rng = Rng::new(11);
    let grid = ds4_cuda::kernels::iq2xxs_grid().unwrap();
    let (cols, rows, experts) = (4096usize, 37usize, 3usize);
    let format = WeightFormat::IQ2XXS;
    let w = random_rows(&mut rng, format, cols, rows * experts);
    let dw = upload_matrix(g, &w);
    let stack = dw.matrix(0, format, cols, rows, experts).unwrap();
    let rb = w.len() / (rows * experts);
    for n_vecs in [1usize, 2, 8] {
        let x = rng.f32s(cols * n_vecs);
        let dx = g.device.upload(&x).unwrap();
        let mut qa = g.alloc_quantized(ActQuant::Q8K, cols, n_vecs).unwrap();
        g.quantize_activations(&dx, &mut qa).unwrap();
        // Slots 0..3 take experts 2, 0, 1 (so slot s reads expert ids[s]).
        let ids = [2i32, 0, 1];
        let d_ids = g.device.upload(&ids).unwrap();
        let mut dy = g
            .device
            .alloc_filled::<f32>(3 * n_vecs * rows, 0xFF)
            .unwrap();
        g.expert_gemv(
            &stack,
            &d_ids,
            3,
            Activations::Quantized(&qa),
            false,
            n_vecs,
            &mut dy,
        )
        .unwrap();
        let y = g.device.download(&dy).unwrap();
        let plain = dw.matrix(0, format, cols, rows, 1).unwrap();
        let mut dp = g.device.alloc_filled::<f32>(n_vecs * rows, 0xFF).unwrap();
        g.gemv(&plain, Activations::Quantized(&qa), n_vecs, &mut dp)
            .unwrap();
        let yp = g.device.download(&dp).unwrap();
        for v in 0..n_vecs {
            let xq = quant::quantize_q8_k_activation(&x[v * cols..(v + 1) * cols]);
            for r in 0..rows {
                let row_of = |e: usize| &w[(e * rows + r) * rb..(e * rows + r + 1) * rb];
                let want = iq2_xxs_kernel_order(row_of(0), &xq, &grid);
                assert_eq!(
                    yp[v * rows + r].to_bits(),
                    want.to_bits(),
                    "plain nb{n_vecs} vec {v} row {r}: {} vs {want}",
                    yp[v * rows + r]
                );
                for (s, &e) in ids.iter().enumerate() {
                    let want = iq2_xxs_kernel_order(row_of(e as usize), &xq, &grid);
                    let got = y[(s * n_vecs + v) * rows + r];
                    assert_eq!(
                        got.to_bits(),
                        want.to_bits(),
                        "expert slot {s} nb{n_vecs} vec {v} row {r}: {got} vs {want}"
                    );
                }
            }
        }
    }
}

#[test]
fn activation_quantizers_match_cpu_bit_for_bit() {
    let Some(g) = gpu() else { return };
    let mut rng = Rng::new(3);
    for kind in [ActQuant::Q8_0, ActQuant::Q8K] {
        let len = 2048;
        let n_vecs = 3;
        let mut x = rng.f32s(len * n_vecs);
        // An all-zero block, a block whose extreme is negative, and ties of |max|.
        x[..256].fill(0.0);
        x[300] = -5.0;
        x[600] = 3.0;
        x[610] = -3.0;
        let dx = g.device.upload(&x).unwrap();
        let mut qa = g.alloc_quantized(kind, len, n_vecs).unwrap();
        g.quantize_activations(&dx, &mut qa).unwrap();
        let q = g.device.download(&qa.q).unwrap();
        let d = g.device.download(&qa.d).unwrap();
        match kind {
            ActQuant::Q8_0 => {
                let cpu: Vec<BlockQ8_0> = quant::quantize_q8_0_activation(&x);
                for (b, blk) in cpu.iter().enumerate() {
                    assert_eq!(d[b].to_bits(), blk.d.to_bits(), "Q8_0 block {b} scale");
                    assert_eq!(
                        &q[b * 32..(b + 1) * 32],
                        &blk.qs[..],
                        "Q8_0 block {b} values"
                    );
                }
            }
            ActQuant::Q8K => {
                let cpu: Vec<BlockQ8K> = quant::quantize_q8_k_activation(&x);
                for (b, blk) in cpu.iter().enumerate() {
                    assert_eq!(d[b].to_bits(), blk.d.to_bits(), "Q8_K block {b} scale");
                    assert_eq!(
                        &q[b * 256..(b + 1) * 256],
                        &blk.qs[..],
                        "Q8_K block {b} values"
                    );
                }
            }
        }
    }
}

#[test]
fn expert_gemv_reads_ids_from_the_device() {
    let Some(g) = gpu() else { return };
    let mut rng = Rng::new(4);
    let (n_experts, cols, rows) = (9usize, 1024usize, 24usize);
    // 18 vectors: two batches of 8 in one launch (per slot), then 2.
    for (format, n_vecs) in [
        (WeightFormat::IQ2XXS, 2usize),
        (WeightFormat::Q2K, 2),
        (WeightFormat::Q4K, 2),
        (WeightFormat::Q8_0, 2),
        (WeightFormat::IQ2XXS, 18),
        (WeightFormat::Q8_0, 18),
    ] {
        let w = random_rows(&mut rng, format, cols, rows * n_experts);
        let ebytes = w.len() / n_experts;
        let dw = upload_matrix(g, &w);
        let m: DeviceMatrix = dw.matrix(0, format, cols, rows, n_experts).unwrap();
        let ids: Vec<i32> = vec![7, 0, 7, 3, 8, -1];
        let dids = g.device.upload(&ids).unwrap();
        let slots = ids.len();
        for x_per_slot in [false, true] {
            let xv = if x_per_slot { slots * n_vecs } else { n_vecs };
            let x = rng.f32s(cols * xv);
            let dx = g.device.upload(&x).unwrap();
            let mut qa = g
                .alloc_quantized(format.activation_quant().unwrap(), cols, xv)
                .unwrap();
            g.quantize_activations(&dx, &mut qa).unwrap();
            for quantized in [false, true] {
                let act = if quantized {
                    Activations::Quantized(&qa)
                } else {
                    Activations::F32(&dx)
                };
                // Zero-filled: rows of a bad id must be written (NaN), not left alone.
                let mut dy = g
                    .device
                    .alloc_filled::<f32>(slots * n_vecs * rows, 0x00)
                    .unwrap();
                g.expert_gemv(&m, &dids, slots, act, x_per_slot, n_vecs, &mut dy)
                    .unwrap();
                let y = g.device.download(&dy).unwrap();
                for (s, &e) in ids.iter().enumerate() {
                    for v in 0..n_vecs {
                        let out = &y[(s * n_vecs + v) * rows..(s * n_vecs + v + 1) * rows];
                        if e < 0 {
                            assert!(
                                out.iter().all(|o| o.is_nan()),
                                "bad id {e} must give NaN rows"
                            );
                            continue;
                        }
                        let we = &w[e as usize * ebytes..(e as usize + 1) * ebytes];
                        let xi = if x_per_slot { s * n_vecs + v } else { v };
                        let xs = &x[xi * cols..(xi + 1) * cols];
                        let (r, mag) = reference_gemv(format, we, cols, rows, xs);
                        let r = if quantized {
                            reference_quantized(format, we, cols, rows, xs)
                        } else {
                            r
                        };
                        let what = format!("{format:?} expert {e} slot {s} vec {v} per_slot {x_per_slot} q {quantized}");
                        check_rows(&what, out, &r, &mag, 2e-5);
                    }
                }
            }
        }
    }
}

/// The decode step's grouped output projection runs as a stack (slot s takes matrix s, no ids
/// to read) after an L2 prefetch of its weights: the same bits as expert_gemv with the ids
/// 0, 1, ..., for the formats and input kinds it may take, one vector and several.
#[test]
fn stacked_gemv_equals_expert_gemv_with_identity_ids() {
    let Some(g) = gpu() else { return };
    let mut rng = Rng::new(41);
    let (n_experts, cols, rows) = (8usize, 1024usize, 40usize);
    for (format, n_vecs) in [
        (WeightFormat::Q8_0, 1usize),
        (WeightFormat::Q8_0, 3),
        (WeightFormat::IQ2XXS, 1),
        (WeightFormat::Q2K, 2),
        (WeightFormat::F16, 1),
    ] {
        let w = random_rows(&mut rng, format, cols, rows * n_experts);
        let dw = upload_matrix(g, &w);
        let m: DeviceMatrix = dw.matrix(0, format, cols, rows, n_experts).unwrap();
        let ids: Vec<i32> = (0..n_experts as i32).collect();
        let dids = g.device.upload(&ids).unwrap();
        let x = rng.f32s(cols * n_experts * n_vecs);
        let dx = g.device.upload(&x).unwrap();
        let qa = format.activation_quant().map(|kind| {
            let mut qa = g.alloc_quantized(kind, cols, n_experts * n_vecs).unwrap();
            g.quantize_activations(&dx, &mut qa).unwrap();
            qa
        });
        let mut inputs = vec![(Activations::F32(&dx), "f32")];
        if let Some(qa) = &qa {
            inputs.push((Activations::Quantized(qa), "quantized"));
        }
        for (act, kind) in inputs {
            let mut by_ids = g.device.alloc::<f32>(n_experts * n_vecs * rows).unwrap();
            g.expert_gemv(&m, &dids, n_experts, act, true, n_vecs, &mut by_ids)
                .unwrap();
            g.prefetch_l2(&m, 8).unwrap();
            let mut stacked = g.device.alloc::<f32>(n_experts * n_vecs * rows).unwrap();
            g.stacked_gemv(&m, act, n_vecs, &mut stacked).unwrap();
            let (a, b) = (
                g.device.download(&by_ids).unwrap(),
                g.device.download(&stacked).unwrap(),
            );
            assert!(a.iter().all(|v| v.is_finite()), "{format:?} {kind}: finite");
            assert!(
                a.iter().zip(&b).all(|(p, q)| p.to_bits() == q.to_bits()),
                "{format:?} {kind} x{n_vecs}: stacked_gemv differs from expert_gemv"
            );
        }
    }
}

#[test]
fn rmsnorm_and_swiglu_match_cpu() {
    let Some(g) = gpu() else { return };
    let mut rng = Rng::new(5);
    let (n, rows) = (4096usize, 3usize);
    let x: Vec<f32> = rng.f32s(n * rows).iter().map(|v| v * 3.0).collect();
    let w = rng.f32s(n);
    let (dx, dw) = (g.device.upload(&x).unwrap(), g.device.upload(&w).unwrap());
    for weighted in [true, false] {
        let mut dy = g.device.alloc_filled::<f32>(n * rows, 0xFF).unwrap();
        g.rmsnorm(&dx, weighted.then_some(&dw), n, rows, 1e-6, &mut dy)
            .unwrap();
        let y = g.device.download(&dy).unwrap();
        for r in 0..rows {
            let xr = &x[r * n..(r + 1) * n];
            let ss: f64 = xr.iter().map(|&v| v as f64 * v as f64).sum();
            let scale = (1.0 / (ss / n as f64 + 1e-6).sqrt()) as f32;
            for i in 0..n {
                let want = xr[i] * scale * if weighted { w[i] } else { 1.0 };
                let got = y[r * n + i];
                assert!(
                    (got - want).abs() <= 1e-6 * want.abs().max(1.0),
                    "rmsnorm [{r}][{i}] {got} vs {want}"
                );
            }
        }
    }
    // SwiGLU with the clamp active on both sides and per-slot routing weights.
    let (per_slot, slots) = (2048usize, 3usize);
    let nn = per_slot * slots;
    let gate: Vec<f32> = rng.f32s(nn).iter().map(|v| v * 15.0).collect();
    let up: Vec<f32> = rng.f32s(nn).iter().map(|v| v * 15.0).collect();
    let wts = vec![0.25f32, 1.5, -0.75];
    let (dg, du, dwt) = (
        g.device.upload(&gate).unwrap(),
        g.device.upload(&up).unwrap(),
        g.device.upload(&wts).unwrap(),
    );
    let mut dout = g.device.alloc_filled::<f32>(nn, 0xFF).unwrap();
    g.swiglu_clamp(&dg, &du, nn, per_slot, Some(10.0), Some(&dwt), &mut dout)
        .unwrap();
    let out = g.device.download(&dout).unwrap();
    for i in 0..nn {
        let gc = gate[i].min(10.0);
        let uc = up[i].clamp(-10.0, 10.0);
        let want = gc / (1.0 + (-gc).exp()) * uc * wts[i / per_slot];
        assert!(
            (out[i] - want).abs() <= 2e-6 * want.abs().max(1.0),
            "swiglu [{i}] {} vs {want}",
            out[i]
        );
    }
}

#[test]
fn dequantize_f16_is_bit_exact() {
    let Some(g) = gpu() else { return };
    let mut rng = Rng::new(6);
    for format in WeightFormat::ALL {
        let (cols, rows, experts) = (512usize, 6usize, 2usize);
        let w = random_rows(&mut rng, format, cols, rows * experts);
        let dw = upload_matrix(g, &w);
        let m = dw.matrix(0, format, cols, rows, experts).unwrap();
        let mut out = g
            .device
            .alloc_filled::<half::f16>(cols * rows * experts, 0xFF)
            .unwrap();
        g.dequantize_f16(&m, &mut out).unwrap();
        let got = g.device.download(&out).unwrap();
        let mut cpu = vec![0f32; cols * rows * experts];
        quant::dequantize(format.ggml(), &w, &mut cpu).unwrap();
        for (i, (a, b)) in got.iter().zip(&cpu).enumerate() {
            assert_eq!(
                a.to_bits(),
                half::f16::from_f32(*b).to_bits(),
                "{format:?} element {i}: {a} vs {b}"
            );
        }
    }
}

#[test]
fn weight_upload_checks_memory_and_ranges() {
    let Some(g) = gpu() else { return };
    let region = vec![7u8; 1 << 20];
    let e = DeviceWeights::upload(&g.device, &region, usize::MAX / 4, &mut |_, _| {})
        .err()
        .unwrap()
        .to_string();
    assert!(
        e.contains("model needs") && e.contains("GiB free") && e.contains("missing"),
        "{e}"
    );
    let mut seen = Vec::new();
    let w = DeviceWeights::upload(&g.device, &region, 0, &mut |d, t| seen.push((d, t))).unwrap();
    assert_eq!(seen.first(), Some(&(0, 1 << 20)));
    assert_eq!(seen.last(), Some(&(1 << 20, 1 << 20)));
    assert_eq!(g.device.download(w.buffer()).unwrap(), region);
    // 4096 Q8_0 columns = 4352 bytes per row: 240 rows fit in 1 MiB, 241 do not.
    assert!(w.matrix(0, WeightFormat::Q8_0, 4096, 240, 1).is_ok());
    assert!(w.matrix(0, WeightFormat::Q8_0, 4096, 241, 1).is_err());
    assert!(
        w.matrix(0, WeightFormat::Q2K, 100, 1, 1).is_err(),
        "partial blocks"
    );
    assert!(
        w.matrix(1, WeightFormat::Q8_0, 32, 1, 1).is_err(),
        "odd offset"
    );
    let info = g.device.info();
    eprintln!(
        "device: {} cc {:?}, {} SMs, {:.1} GiB, L2 {} MiB; kernels: {:?}",
        info.name,
        info.compute_capability,
        info.multiprocessors,
        info.total_memory as f64 / (1u64 << 30) as f64,
        info.l2_cache_bytes >> 20,
        g.kernels.stats
    );
}

#[test]
fn every_gemv_block_size_gives_the_same_rows() {
    let Some(g) = gpu() else { return };
    let mut rng = Rng::new(7);
    let before = g.gemv_warps();
    // 3072 columns: Q8_0 rows of 3 chunks (3 warps per row group: CTAs of 3 or 6 warps),
    // Q2_K/Q4_K of 2, F16 split over 4 warps.
    let cases = WeightFormat::ALL
        .into_iter()
        .flat_map(|f| [(f, 1024usize), (f, 3072)]);
    for (format, cols) in cases {
        let (rows, n_vecs) = (77usize, 3usize);
        let w = random_rows(&mut rng, format, cols, rows);
        let x = rng.f32s(cols * n_vecs);
        let dw = upload_matrix(g, &w);
        let m = dw.matrix(0, format, cols, rows, 1).unwrap();
        let dx = g.device.upload(&x).unwrap();
        let mut qa = format
            .activation_quant()
            .map(|k| g.alloc_quantized(k, cols, n_vecs).unwrap());
        if let Some(q) = qa.as_mut() {
            g.quantize_activations(&dx, q).unwrap();
        }
        let mut results: Vec<Vec<f32>> = Vec::new();
        for warps in 1..=8 {
            g.set_gemv_warps(warps).unwrap();
            let act = match &qa {
                Some(q) => Activations::Quantized(q),
                None => Activations::F32(&dx),
            };
            let mut dy = g.device.alloc_filled::<f32>(rows * n_vecs, 0xFF).unwrap();
            g.gemv(&m, act, n_vecs, &mut dy).unwrap();
            let y = g.device.download(&dy).unwrap();
            assert!(
                y.iter().all(|v| v.is_finite()),
                "{format:?} {cols} cols warps {warps}: unwritten rows"
            );
            results.push(y);
        }
        // Same work split inside a warp for every block size: identical bits.
        for (i, r) in results.iter().enumerate() {
            assert_eq!(
                r,
                &results[0],
                "{format:?} {cols} cols: warps {} differs from warps 1",
                i + 1
            );
        }
    }
    assert!(g.set_gemv_warps(0).is_err() && g.set_gemv_warps(9).is_err());
    g.set_gemv_warps(before).unwrap();
}

/// A capped grid makes each warp walk many row groups (the cross-group prefetch path).
#[test]
fn capped_grid_walks_many_row_groups_correctly() {
    let Some(g) = gpu() else { return };
    let mut rng = Rng::new(8);
    // 512 columns: one chunk per row, one warp per row group. The long rows: several chunks
    // per row shared by 2 warps, so each warp's stream alternates chunks and row groups.
    for (format, cols, rows) in [
        (WeightFormat::Q8_0, 512usize, 20011usize),
        (WeightFormat::IQ2XXS, 512, 20011),
        (WeightFormat::Q2K, 512, 20011),
        (WeightFormat::Q4K, 512, 20011),
        (WeightFormat::F16, 512, 20011),
        (WeightFormat::Q8_0, 4096, 3001),
        (WeightFormat::IQ2XXS, 8192, 1500),
        (WeightFormat::F16, 4096, 3001),
    ] {
        let w = random_rows(&mut rng, format, cols, rows);
        let x = rng.f32s(cols);
        let dw = upload_matrix(g, &w);
        let m = dw.matrix(0, format, cols, rows, 1).unwrap();
        let dx = g.device.upload(&x).unwrap();
        let mut qa = format
            .activation_quant()
            .map(|k| g.alloc_quantized(k, cols, 1).unwrap());
        if let Some(q) = qa.as_mut() {
            g.quantize_activations(&dx, q).unwrap();
        }
        let act = match &qa {
            Some(q) => Activations::Quantized(q),
            None => Activations::F32(&dx),
        };
        let mut outs = Vec::new();
        for cap in [None, Some(1), Some(3)] {
            g.set_gemv_grid_cap(cap);
            let mut dy = g.device.alloc_filled::<f32>(rows, 0xFF).unwrap();
            g.gemv(&m, act, 1, &mut dy).unwrap();
            outs.push(g.device.download(&dy).unwrap());
        }
        g.set_gemv_grid_cap(None);
        let reference = if qa.is_some() {
            reference_quantized(format, &w, cols, rows, &x)
        } else {
            reference_gemv(format, &w, cols, rows, &x).0
        };
        let (_, mag) = reference_gemv(format, &w, cols, rows, &x);
        for (i, y) in outs.iter().enumerate() {
            check_rows(
                &format!("{format:?} cap variant {i}"),
                y,
                &reference,
                &mag,
                2e-5,
            );
            assert_eq!(y, &outs[0], "{format:?}: grid cap changes bits");
        }
    }
}

/// A row's bits do not depend on the batch size (kernel variant, rows per group and batches per
/// launch change with it), nor on whether the weights are 16-byte aligned (vector or scalar
/// loads, cp.async or 2-byte copies).
#[test]
fn gemv_rows_do_not_depend_on_batch_or_alignment() {
    let Some(g) = gpu() else { return };
    let mut rng = Rng::new(9);
    let shapes: &[(WeightFormat, usize, usize)] = &[
        (WeightFormat::F16, 4096, 300),
        (WeightFormat::F16, 1024, 700),
        (WeightFormat::F32, 2048, 77),
        (WeightFormat::Q8_0, 4096, 50),
        (WeightFormat::IQ2XXS, 8192, 21),
        (WeightFormat::Q2K, 4096, 40),
        (WeightFormat::Q4K, 2048, 9),
        (WeightFormat::Q8_0, 3072, 50),
        (WeightFormat::IQ2XXS, 12288, 6),
    ];
    // 19 vectors: two batches of 8 in one launch, then 2 and 1.
    let n_vecs = 19;
    for &(format, cols, rows) in shapes {
        let w = random_rows(&mut rng, format, cols, rows);
        let x = rng.f32s(cols * n_vecs);
        let dx = g.device.upload(&x).unwrap();
        // The same bytes 16-byte aligned and at the smallest offset the format allows (F32
        // rows must stay 4-byte aligned, every other format 2-byte).
        let offset = if format == WeightFormat::F32 { 4 } else { 2 };
        let aligned = upload_matrix(g, &w);
        let mut shifted = vec![0u8; offset];
        shifted.extend_from_slice(&w);
        let shifted = upload_matrix(g, &shifted);
        let mats = [
            aligned.matrix(0, format, cols, rows, 1).unwrap(),
            shifted.matrix(offset, format, cols, rows, 1).unwrap(),
        ];
        let mut qa = format
            .activation_quant()
            .map(|k| g.alloc_quantized(k, cols, n_vecs).unwrap());
        if let Some(q) = qa.as_mut() {
            g.quantize_activations(&dx, q).unwrap();
        }
        let mut acts = vec![(Activations::F32(&dx), "f32x")];
        if let Some(q) = &qa {
            acts.push((Activations::Quantized(q), "q8x"));
        }
        for (act, tag) in acts {
            let mut batched = g.device.alloc_filled::<f32>(rows * n_vecs, 0xFF).unwrap();
            g.gemv(&mats[0], act, n_vecs, &mut batched).unwrap();
            let batched = g.device.download(&batched).unwrap();
            assert!(batched.iter().all(|v| v.is_finite()), "{format:?} {tag}");
            // One vector at a time: the vector's slice of x (and of its quantized form).
            for v in [0usize, 5, 9, 16, 18] {
                let xv = g.device.upload(&x[v * cols..(v + 1) * cols]).unwrap();
                let mut qv = format
                    .activation_quant()
                    .map(|k| g.alloc_quantized(k, cols, 1).unwrap());
                if let Some(q) = qv.as_mut() {
                    g.quantize_activations(&xv, q).unwrap();
                }
                let one = match (tag, &qv) {
                    ("q8x", Some(q)) => Activations::Quantized(q),
                    _ => Activations::F32(&xv),
                };
                for (i, m) in mats.iter().enumerate() {
                    let mut dy = g.device.alloc_filled::<f32>(rows, 0xFF).unwrap();
                    g.gemv(m, one, 1, &mut dy).unwrap();
                    let y = g.device.download(&dy).unwrap();
                    let want = &batched[v * rows..(v + 1) * rows];
                    for (r, (a, b)) in y.iter().zip(want).enumerate() {
                        assert_eq!(
                            a.to_bits(),
                            b.to_bits(),
                            "{format:?} {tag} {cols}x{rows} vec {v} row {r}: alone ({}) {a} vs batch of {n_vecs} {b}",
                            if i == 0 { "aligned" } else { "2-byte offset" }
                        );
                    }
                }
            }
        }
    }
}

/// F16 expert stacks go through the split-row kernel too (ids from the device, NaN for a bad id).
#[test]
fn f16_expert_gemv_matches_cpu() {
    let Some(g) = gpu() else { return };
    let mut rng = Rng::new(10);
    let (n_experts, cols, rows) = (3usize, 4096usize, 64usize);
    let w = random_rows(&mut rng, WeightFormat::F16, cols, rows * n_experts);
    let ebytes = w.len() / n_experts;
    let dw = upload_matrix(g, &w);
    let m = dw
        .matrix(0, WeightFormat::F16, cols, rows, n_experts)
        .unwrap();
    let ids: Vec<i32> = vec![2, 0, 3, 2];
    let dids = g.device.upload(&ids).unwrap();
    let slots = ids.len();
    for n_vecs in [1usize, 3, 8] {
        for x_per_slot in [false, true] {
            let xv = if x_per_slot { slots * n_vecs } else { n_vecs };
            let x = rng.f32s(cols * xv);
            let dx = g.device.upload(&x).unwrap();
            let mut dy = g
                .device
                .alloc_filled::<f32>(slots * n_vecs * rows, 0x00)
                .unwrap();
            g.expert_gemv(
                &m,
                &dids,
                slots,
                Activations::F32(&dx),
                x_per_slot,
                n_vecs,
                &mut dy,
            )
            .unwrap();
            let y = g.device.download(&dy).unwrap();
            for (s, &e) in ids.iter().enumerate() {
                for v in 0..n_vecs {
                    let out = &y[(s * n_vecs + v) * rows..(s * n_vecs + v + 1) * rows];
                    if e as usize >= n_experts {
                        assert!(out.iter().all(|o| o.is_nan()), "bad id {e}: NaN rows");
                        continue;
                    }
                    let we = &w[e as usize * ebytes..(e as usize + 1) * ebytes];
                    let xi = if x_per_slot { s * n_vecs + v } else { v };
                    let (r, mag) = reference_gemv(
                        WeightFormat::F16,
                        we,
                        cols,
                        rows,
                        &x[xi * cols..(xi + 1) * cols],
                    );
                    let what =
                        format!("F16 expert {e} slot {s} vec {v}/{n_vecs} per_slot {x_per_slot}");
                    check_rows(&what, out, &r, &mag, 2e-5);
                }
            }
        }
    }
}

/// A pair launch (two matrices, one input) gives exactly the rows of two single launches, for
/// dense matrices and expert stacks; a pair of different shapes is an error.
#[test]
fn gemv_pairs_equal_two_calls() {
    let Some(g) = gpu() else { return };
    let mut rng = Rng::new(11);
    // (format, cols, rows, experts, vectors)
    let cases: &[(WeightFormat, usize, usize, usize, usize)] = &[
        (WeightFormat::F16, 4096, 256, 1, 1),
        (WeightFormat::F16, 4096, 256, 1, 9),
        (WeightFormat::Q8_0, 4096, 100, 1, 11),
        (WeightFormat::IQ2XXS, 4096, 64, 5, 1),
        (WeightFormat::IQ2XXS, 4096, 64, 5, 18),
        (WeightFormat::Q4K, 2048, 40, 5, 3),
    ];
    for &(format, cols, rows, experts, n_vecs) in cases {
        let wa = random_rows(&mut rng, format, cols, rows * experts);
        let wb = random_rows(&mut rng, format, cols, rows * experts);
        let (da, db) = (upload_matrix(g, &wa), upload_matrix(g, &wb));
        let ma = da.matrix(0, format, cols, rows, experts).unwrap();
        let mb = db.matrix(0, format, cols, rows, experts).unwrap();
        let x = rng.f32s(cols * n_vecs);
        let dx = g.device.upload(&x).unwrap();
        let mut qa = format
            .activation_quant()
            .map(|k| g.alloc_quantized(k, cols, n_vecs).unwrap());
        if let Some(q) = qa.as_mut() {
            g.quantize_activations(&dx, q).unwrap();
        }
        let act = match &qa {
            Some(q) => Activations::Quantized(q),
            None => Activations::F32(&dx),
        };
        let ids: Vec<i32> = vec![4, 1, -1, 4];
        let dids = g.device.upload(&ids).unwrap();
        let slots = if experts > 1 { ids.len() } else { 1 };
        let len = slots * n_vecs * rows;
        let alloc = || g.device.alloc_filled::<f32>(len, 0x00).unwrap();
        let (mut ya, mut yb, mut pa, mut pb) = (alloc(), alloc(), alloc(), alloc());
        if experts > 1 {
            g.expert_gemv(&ma, &dids, slots, act, false, n_vecs, &mut ya)
                .unwrap();
            g.expert_gemv(&mb, &dids, slots, act, false, n_vecs, &mut yb)
                .unwrap();
            g.expert_gemv_pair(
                [&ma, &mb],
                &dids,
                slots,
                act,
                false,
                n_vecs,
                [&mut pa, &mut pb],
            )
            .unwrap();
        } else {
            g.gemv(&ma, act, n_vecs, &mut ya).unwrap();
            g.gemv(&mb, act, n_vecs, &mut yb).unwrap();
            g.gemv_pair([&ma, &mb], act, n_vecs, [&mut pa, &mut pb], None)
                .unwrap();
            // The capped pair (one CTA per multiprocessor: every warp walks several row
            // groups) gives the same bits.
            let (mut ca, mut cb) = (alloc(), alloc());
            g.gemv_pair([&ma, &mb], act, n_vecs, [&mut ca, &mut cb], Some(1))
                .unwrap();
            for (pair, capped) in [(&pa, &ca), (&pb, &cb)] {
                let (p, c) = (
                    g.device.download(pair).unwrap(),
                    g.device.download(capped).unwrap(),
                );
                assert!(
                    p.iter().zip(&c).all(|(a, b)| a.to_bits() == b.to_bits()),
                    "{format:?} {cols}x{rows} nb{n_vecs}: the capped pair differs"
                );
            }
        }
        for (single, pair, which) in [(&ya, &pa, "first"), (&yb, &pb, "second")] {
            let s = g.device.download(single).unwrap();
            let p = g.device.download(pair).unwrap();
            assert!(
                s.iter().any(|v| *v != 0.0),
                "{format:?}: single launch wrote nothing"
            );
            for (i, (a, b)) in s.iter().zip(&p).enumerate() {
                assert_eq!(
                    a.to_bits(),
                    b.to_bits(),
                    "{format:?} {cols}x{rows}x{experts} nb{n_vecs} {which} matrix, output {i}: single {a} vs pair {b}"
                );
            }
        }
    }
    // Different shapes cannot share a launch.
    let w = random_rows(&mut rng, WeightFormat::F16, 512, 8);
    let dw = upload_matrix(g, &w);
    let m8 = dw.matrix(0, WeightFormat::F16, 512, 8, 1).unwrap();
    let m4 = dw.matrix(0, WeightFormat::F16, 512, 4, 1).unwrap();
    let dx = g.device.upload(&rng.f32s(512)).unwrap();
    let (mut y0, mut y1) = (
        g.device.alloc_filled::<f32>(8, 0).unwrap(),
        g.device.alloc_filled::<f32>(8, 0).unwrap(),
    );
    let e = g
        .gemv_pair(
            [&m8, &m4],
            Activations::F32(&dx),
            1,
            [&mut y0, &mut y1],
            None,
        )
        .unwrap_err()
        .to_string();
    assert!(e.contains("different shapes"), "{e}");
}

/// Expert ids per vector for `group_start` (vectors outside every group: -1), the slots
/// expert_gemv would be given for the same sorted vectors.
fn ids_of_groups(group_start: &[i32], n_vecs: usize) -> Vec<i32> {
    let mut ids = vec![-1i32; n_vecs];
    for (e, w) in group_start.windows(2).enumerate() {
        for id in &mut ids[w[0] as usize..w[1] as usize] {
            *id = e as i32;
        }
    }
    ids
}

/// Grouped expert products (prefill MoE: vectors sorted by expert, one launch, weights staged
/// once per expert) give every vector exactly the bits of expert_gemv on that vector as its own
/// slot, agree with the CPU dot products, write NaN rows for vectors outside every group, and a
/// pair launch equals two single ones.
#[test]
fn grouped_expert_gemv_equals_per_vector_expert_gemv() {
    let Some(g) = gpu() else { return };
    let mut rng = Rng::new(12);
    // (format, cols, rows, experts, byte offset of the stack, vectors before the first group)
    let cases: &[(WeightFormat, usize, usize, usize, usize, usize)] = &[
        // The model's gate/up (IQ2_XXS 4096 -> 2048) and down (Q2_K / Q4_K 2048 -> 4096).
        (WeightFormat::IQ2XXS, 4096, 2048, 8, 0, 0),
        (WeightFormat::Q2K, 2048, 4096, 6, 0, 0),
        (WeightFormat::Q4K, 2048, 4096, 6, 0, 0),
        // 4 and 5 warps per row group (partials combined through shared memory).
        (WeightFormat::Q8_0, 4096, 100, 7, 0, 0),
        (WeightFormat::Q2K, 10240, 12, 4, 0, 1),
        // Rows not 16-byte aligned (2-byte copies into the stage).
        (WeightFormat::IQ2XXS, 4096, 96, 5, 2, 0),
        // 9 chunks per row on 8 warps: each batch streams the row group's chunks again.
        (WeightFormat::Q8_0, 9216, 20, 4, 0, 2),
        (WeightFormat::IQ2XXS, 36864, 6, 3, 0, 0),
    ];
    for (ci, &(format, cols, rows, experts, offset, head)) in cases.iter().enumerate() {
        // Expert 0 and the last expert have no vectors; expert 1 has 37 (4 batches of 8 and a
        // batch of 5); the others 1..=11 (every tail batch size across the cases). Two vectors
        // after the last group belong to no expert.
        let sizes: Vec<usize> = (0..experts)
            .map(|e| match e {
                0 => 0,
                1 => 37,
                _ if e == experts - 1 => 0,
                _ => 1 + (7 * e + 3 * ci) % 11,
            })
            .collect();
        let mut group_start = vec![head as i32];
        for s in &sizes {
            group_start.push(group_start.last().unwrap() + *s as i32);
        }
        let n_vecs = *group_start.last().unwrap() as usize + 2;
        let ids = ids_of_groups(&group_start, n_vecs);

        let stacks: Vec<Vec<u8>> = (0..2)
            .map(|_| random_rows(&mut rng, format, cols, rows * experts))
            .collect();
        let ebytes = stacks[0].len() / experts;
        let uploads: Vec<DeviceWeights> = stacks
            .iter()
            .map(|w| {
                let mut bytes = vec![0u8; offset];
                bytes.extend_from_slice(w);
                upload_matrix(g, &bytes)
            })
            .collect();
        let mats: Vec<DeviceMatrix> = uploads
            .iter()
            .map(|u| u.matrix(offset, format, cols, rows, experts).unwrap())
            .collect();
        let x = rng.f32s(cols * n_vecs);
        let dx = g.device.upload(&x).unwrap();
        let mut qa = g
            .alloc_quantized(format.activation_quant().unwrap(), cols, n_vecs)
            .unwrap();
        g.quantize_activations(&dx, &mut qa).unwrap();
        let act = Activations::Quantized(&qa);
        let dgroups = g.device.upload(&group_start).unwrap();
        let dids = g.device.upload(&ids).unwrap();
        let what =
            format!("{format:?} {cols}x{rows}x{experts} offset {offset} groups {group_start:?}");

        // Reference: one slot per vector (its expert's id), as prefill did before grouping.
        // NaN-filled, the grouped outputs zero-filled: equal bits mean both wrote every row.
        let mut per_slot = g.device.alloc_filled::<f32>(n_vecs * rows, 0xFF).unwrap();
        g.expert_gemv(&mats[0], &dids, n_vecs, act, true, 1, &mut per_slot)
            .unwrap();
        let per_slot = g.device.download(&per_slot).unwrap();
        let mut grouped = g.device.alloc_filled::<f32>(n_vecs * rows, 0x00).unwrap();
        g.expert_gemv_grouped(&mats[0], &dgroups, act, n_vecs, &mut grouped)
            .unwrap();
        let grouped = g.device.download(&grouped).unwrap();
        for (i, (a, b)) in per_slot.iter().zip(&grouped).enumerate() {
            let (v, r) = (i / rows, i % rows);
            assert_eq!(
                a.to_bits(),
                b.to_bits(),
                "{what}: vector {v} (expert {}) row {r}: expert_gemv {a} vs grouped {b}",
                ids[v]
            );
        }

        // Against the CPU: the ds4 dot products of each vector with its expert's rows.
        let mut worst = 0f64;
        for (v, &e) in ids.iter().enumerate() {
            let out = &grouped[v * rows..(v + 1) * rows];
            if e < 0 {
                assert!(
                    out.iter().all(|o| o.is_nan()),
                    "{what}: vector {v} is in no group: NaN rows"
                );
                continue;
            }
            let we = &stacks[0][e as usize * ebytes..(e as usize + 1) * ebytes];
            let xs = &x[v * cols..(v + 1) * cols];
            let r = reference_quantized(format, we, cols, rows, xs);
            let (_, mag) = reference_gemv(format, we, cols, rows, xs);
            worst = worst.max(check_rows(
                &format!("{what} vector {v} expert {e}"),
                out,
                &r,
                &mag,
                1e-5,
            ));
        }
        eprintln!(
            "{what}: {n_vecs} vectors bit-equal to expert_gemv; max rel err vs CPU {worst:.2e}"
        );

        // The pair launch (gate and up at once) equals two single launches.
        let mut second = g.device.alloc_filled::<f32>(n_vecs * rows, 0x00).unwrap();
        g.expert_gemv_grouped(&mats[1], &dgroups, act, n_vecs, &mut second)
            .unwrap();
        let second = g.device.download(&second).unwrap();
        let (mut p0, mut p1) = (
            g.device.alloc_filled::<f32>(n_vecs * rows, 0x00).unwrap(),
            g.device.alloc_filled::<f32>(n_vecs * rows, 0x00).unwrap(),
        );
        g.expert_gemv_grouped_pair(
            [&mats[0], &mats[1]],
            &dgroups,
            act,
            n_vecs,
            [&mut p0, &mut p1],
        )
        .unwrap();
        for (single, pair, which) in [(&grouped, &p0, "first"), (&second, &p1, "second")] {
            let pair = g.device.download(pair).unwrap();
            for (i, (a, b)) in single.iter().zip(&pair).enumerate() {
                assert_eq!(
                    a.to_bits(),
                    b.to_bits(),
                    "{what}: {which} stack output {i}: single {a} vs pair {b}"
                );
            }
        }
    }
}

/// Argument errors name the problem; offsets on the device that are out of range or
/// decreasing are clamped (never an access outside x or y).
#[test]
fn grouped_expert_gemv_checks_arguments_and_clamps_offsets() {
    let Some(g) = gpu() else { return };
    let mut rng = Rng::new(13);
    let (format, cols, rows, experts, n_vecs) =
        (WeightFormat::Q8_0, 1024usize, 16usize, 3usize, 6usize);
    let w = random_rows(&mut rng, format, cols, rows * experts);
    let dw = upload_matrix(g, &w);
    let m = dw.matrix(0, format, cols, rows, experts).unwrap();
    let x = rng.f32s(cols * n_vecs);
    let dx = g.device.upload(&x).unwrap();
    let mut qa = g.alloc_quantized(ActQuant::Q8_0, cols, n_vecs).unwrap();
    g.quantize_activations(&dx, &mut qa).unwrap();
    let mut qk = g.alloc_quantized(ActQuant::Q8K, cols, n_vecs).unwrap();
    g.quantize_activations(&dx, &mut qk).unwrap();
    let act = Activations::Quantized(&qa);
    let groups = g.device.upload(&[0i32, 2, 4, 6]).unwrap();
    let mut y = g.device.alloc_filled::<f32>(n_vecs * rows, 0).unwrap();
    let err = |r: ds4_cuda::error::Result<()>| r.unwrap_err().to_string();

    let short = g.device.upload(&[0i32, 2, 4]).unwrap();
    let e = err(g.expert_gemv_grouped(&m, &short, act, n_vecs, &mut y));
    assert!(
        e.contains("group offset buffer") && e.contains("needs 4"),
        "{e}"
    );
    let e = err(g.expert_gemv_grouped(&m, &groups, Activations::F32(&dx), n_vecs, &mut y));
    assert!(e.contains("quantized activations"), "{e}");
    let e = err(g.expert_gemv_grouped(&m, &groups, Activations::Quantized(&qk), n_vecs, &mut y));
    assert!(e.contains("Q8_0 experts"), "{e}");
    let e = err(g.expert_gemv_grouped(&m, &groups, act, n_vecs + 1, &mut y));
    assert!(e.contains("7 vectors"), "{e}");
    let mut small = g.device.alloc_filled::<f32>(n_vecs * rows - 1, 0).unwrap();
    let e = err(g.expert_gemv_grouped(&m, &groups, act, n_vecs, &mut small));
    assert!(e.contains("output"), "{e}");
    let f16 = random_rows(&mut rng, WeightFormat::F16, cols, rows * experts);
    let df16 = upload_matrix(g, &f16);
    let mf16 = df16
        .matrix(0, WeightFormat::F16, cols, rows, experts)
        .unwrap();
    let e = err(g.expert_gemv_grouped(&mf16, &groups, Activations::F32(&dx), n_vecs, &mut y));
    assert!(e.contains("block-quantized"), "{e}");
    let m2 = dw.matrix(0, format, cols, rows / 2, experts).unwrap();
    let mut y2 = g.device.alloc_filled::<f32>(n_vecs * rows, 0).unwrap();
    let e = err(g.expert_gemv_grouped_pair([&m, &m2], &groups, act, n_vecs, [&mut y, &mut y2]));
    assert!(e.contains("different shapes"), "{e}");

    // Every vector alone through each expert: the candidates for each output row.
    let mut alone = Vec::new();
    for e in 0..experts as i32 {
        let ids = g.device.upload(&vec![e; n_vecs]).unwrap();
        let mut out = g.device.alloc_filled::<f32>(n_vecs * rows, 0xFF).unwrap();
        g.expert_gemv(&m, &ids, n_vecs, act, true, 1, &mut out)
            .unwrap();
        alone.push(g.device.download(&out).unwrap());
    }
    // Clamped to [0, 3, 1, 6]: expert 0 takes vectors 0..3, expert 1 none (its end is below
    // its start), expert 2 vectors 1..6, so vectors 1 and 2 are written by two experts (either
    // expert's row may land; both are checked as candidates).
    let bad = g.device.upload(&[-5i32, 3, 1, 99]).unwrap();
    let mut yb = g.device.alloc_filled::<f32>(n_vecs * rows, 0).unwrap();
    g.expert_gemv_grouped(&m, &bad, act, n_vecs, &mut yb)
        .unwrap();
    let yb = g.device.download(&yb).unwrap();
    for (i, b) in yb.iter().enumerate() {
        let v = i / rows;
        let experts_of_v: &[usize] = match v {
            0 => &[0],
            1 | 2 => &[0, 2],
            _ => &[2],
        };
        assert!(
            experts_of_v
                .iter()
                .any(|&e| alone[e][i].to_bits() == b.to_bits()),
            "vector {v} output {i}: {b} is no expert's row ({experts_of_v:?})"
        );
    }
}

/// Decode's expert matvecs (one vector per slot, ids on the device, the quantized activations
/// shared by all slots or one per slot) at the model's expert shapes and with ragged row counts:
/// each slot's rows equal a plain gemv of its expert bit for bit, a gate+up pair equals two
/// launches, and an id outside the stack (negative or too large) gives NaN rows.
#[test]
fn decode_expert_launches_equal_plain_gemv_bit_for_bit() {
    let Some(g) = gpu() else { return };
    let mut rng = Rng::new(11);
    let n_experts = 8usize;
    for (format, cols, rows) in [
        (WeightFormat::IQ2XXS, 4096usize, 2048usize),
        (WeightFormat::IQ2XXS, 4096, 2042),
        (WeightFormat::IQ2XXS, 1024, 136),
        (WeightFormat::Q2K, 2048, 4096),
        (WeightFormat::Q2K, 2048, 4090),
        (WeightFormat::Q4K, 2048, 1030),
        (WeightFormat::Q8_0, 2048, 1030),
    ] {
        let one = random_rows(&mut rng, format, cols, rows * n_experts);
        let ebytes = one.len() / n_experts;
        // Two stacks (gate and up): the second one's rows in reverse expert order.
        let mut both = one.clone();
        for e in (0..n_experts).rev() {
            both.extend_from_slice(&one[e * ebytes..(e + 1) * ebytes]);
        }
        let dw = upload_matrix(g, &both);
        let stack = |i: usize| {
            dw.matrix(i * n_experts * ebytes, format, cols, rows, n_experts)
                .unwrap()
        };
        let single = |i: usize, e: usize| {
            dw.matrix((i * n_experts + e) * ebytes, format, cols, rows, 1)
                .unwrap()
        };
        let ids: Vec<i32> = vec![5, 0, 7, -1, 3, 99];
        let slots = ids.len();
        let dids = g.device.upload(&ids).unwrap();
        for x_per_slot in [false, true] {
            let xv = if x_per_slot { slots } else { 1 };
            let x = rng.f32s(cols * xv);
            let dx = g.device.upload(&x).unwrap();
            let mut qa = g
                .alloc_quantized(format.activation_quant().unwrap(), cols, xv)
                .unwrap();
            g.quantize_activations(&dx, &mut qa).unwrap();
            let act = Activations::Quantized(&qa);
            let mut y0 = g.device.alloc_filled::<f32>(slots * rows, 0x00).unwrap();
            let mut y1 = g.device.alloc_filled::<f32>(slots * rows, 0x00).unwrap();
            g.expert_gemv_pair(
                [&stack(0), &stack(1)],
                &dids,
                slots,
                act,
                x_per_slot,
                1,
                [&mut y0, &mut y1],
            )
            .unwrap();
            let mut ys = g.device.alloc_filled::<f32>(slots * rows, 0x00).unwrap();
            g.expert_gemv(&stack(0), &dids, slots, act, x_per_slot, 1, &mut ys)
                .unwrap();
            let (y0, y1, ys) = (
                g.device.download(&y0).unwrap(),
                g.device.download(&y1).unwrap(),
                g.device.download(&ys).unwrap(),
            );
            for (s, &e) in ids.iter().enumerate() {
                let what =
                    format!("{format:?} {cols}x{rows} slot {s} id {e} per_slot {x_per_slot}");
                let out = |y: &[f32]| y[s * rows..(s + 1) * rows].to_vec();
                if !(0..n_experts as i32).contains(&e) {
                    for y in [&y0, &y1, &ys] {
                        assert!(out(y).iter().all(|v| v.is_nan()), "{what}: NaN rows");
                    }
                    continue;
                }
                // The slot's vector alone, through the plain (untuned) launch.
                let xs = &x[(if x_per_slot { s } else { 0 }) * cols..][..cols];
                let dxs = g.device.upload(xs).unwrap();
                let mut q1 = g
                    .alloc_quantized(format.activation_quant().unwrap(), cols, 1)
                    .unwrap();
                g.quantize_activations(&dxs, &mut q1).unwrap();
                for (i, y) in [(0usize, &y0), (1, &y1), (0, &ys)] {
                    let mut dy = g.device.alloc::<f32>(rows).unwrap();
                    g.gemv(
                        &single(i, e as usize),
                        Activations::Quantized(&q1),
                        1,
                        &mut dy,
                    )
                    .unwrap();
                    let want: Vec<u32> = g
                        .device
                        .download(&dy)
                        .unwrap()
                        .iter()
                        .map(|v| v.to_bits())
                        .collect();
                    let got: Vec<u32> = out(y).iter().map(|v| v.to_bits()).collect();
                    assert_eq!(got, want, "{what}: stack {i}");
                }
            }
        }
    }
}
