//! The F16 × f32 GEMM of spans ([`Gpu::gemm_f16`]) against the CPU's f16 dot products and
//! the matvec kernel, on the model's F16 shapes and ragged ones; and a token's result does not
//! depend on the batch it is computed in. Without CUDA each test prints "skipped: no CUDA".

mod common;

use common::{gpu, random_rows, Rng};
use ds4_cuda::{Activations, DeviceWeights, Gpu, WeightFormat};
use ds4_gguf::quant;

/// Largest |gpu − cpu| relative to the sum of |terms| of that output, over all outputs.
fn worst_rel(y: &[f32], w: &[u8], rows: usize, cols: usize, x: &[f32]) -> f64 {
    let row_bytes = w.len() / rows;
    let mut worst = 0f64;
    for (v, xv) in x.chunks_exact(cols).enumerate() {
        for r in 0..rows {
            let row = &w[r * row_bytes..(r + 1) * row_bytes];
            let want = quant::dot_f16(row, xv) as f64;
            let mut abs = 0f64;
            for (i, xi) in xv.iter().enumerate() {
                let wi = half::f16::from_le_bytes([row[2 * i], row[2 * i + 1]]).to_f32();
                abs += (wi as f64 * *xi as f64).abs();
            }
            let err = (y[v * rows + r] as f64 - want).abs() / abs.max(1e-30);
            worst = worst.max(err);
        }
    }
    worst
}

#[test]
fn gemm_f16_matches_cpu_dot_products_and_does_not_depend_on_the_batch() {
    let Some(g) = gpu() else { return };
    let mut rng = Rng::new(31);
    // (rows, cols, vectors): the router, compressor, indexer shapes, and ragged tails.
    for &(rows, cols, n) in &[
        (256usize, 4096usize, 256usize),
        (1024, 4096, 64),
        (8192, 1024, 16),
        (64, 4096, 100),
        (77, 96, 65),
        (33, 32, 17),
    ] {
        let w = random_rows(&mut rng, WeightFormat::F16, cols, rows);
        let x = rng.f32s(cols * n);
        let dw = DeviceWeights::upload(&g.device, &w, 0, &mut |_, _| {}).unwrap();
        let m = dw.matrix(0, WeightFormat::F16, cols, rows, 1).unwrap();
        assert!(Gpu::gemm_f16_fits(&m));
        let dx = g.device.upload(&x).unwrap();
        let mut y = g.device.alloc_filled::<f32>(n * rows, 0xFF).unwrap();
        g.gemm_f16(&m, &dx, n, &mut y).unwrap();
        let y = g.device.download(&y).unwrap();
        let err = worst_rel(&y, &w, rows, cols, &x);
        println!("gemm_f16 {rows}x{cols} x{n}: worst |gpu-cpu| / sum|terms| = {err:.3e}");
        assert!(err < 1e-5, "{rows}x{cols} x{n}: {err:.3e}");
        // The same vector alone gives the same bits (the sum order is the tile's, not the batch's).
        let v = n - 1;
        let xv = g.device.upload(&x[v * cols..(v + 1) * cols]).unwrap();
        let mut one = g.device.alloc::<f32>(rows).unwrap();
        g.gemm_f16(&m, &xv, 1, &mut one).unwrap();
        let one = g.device.download(&one).unwrap();
        assert_eq!(
            one,
            y[v * rows..(v + 1) * rows],
            "{rows}x{cols}: batch-dependent bits"
        );
        // And agrees with the matvec kernel to rounding.
        let mut gv = g.device.alloc::<f32>(rows).unwrap();
        g.gemv(&m, Activations::F32(&xv), 1, &mut gv).unwrap();
        let gv = g.device.download(&gv).unwrap();
        for (a, b) in one.iter().zip(&gv) {
            assert!(
                (a - b).abs() <= 1e-4 * (1.0 + b.abs()),
                "{rows}x{cols}: {a} vs {b}"
            );
        }
    }
}

#[test]
fn gemm_f16_rejects_what_it_cannot_take() {
    let Some(g) = gpu() else { return };
    let mut rng = Rng::new(5);
    let w = random_rows(&mut rng, WeightFormat::F16, 48, 8);
    let dw = DeviceWeights::upload(&g.device, &w, 0, &mut |_, _| {}).unwrap();
    let m = dw.matrix(0, WeightFormat::F16, 48, 8, 1).unwrap();
    assert!(!Gpu::gemm_f16_fits(&m), "48 columns are not whole K tiles");
    let x = g.device.upload(&rng.f32s(48 * 2)).unwrap();
    let mut y = g.device.alloc::<f32>(16).unwrap();
    let e = g.gemm_f16(&m, &x, 2, &mut y).unwrap_err();
    assert!(e.to_string().contains("multiple of 32"), "{e}");
    let w = random_rows(&mut rng, WeightFormat::F16, 64, 8);
    let dw = DeviceWeights::upload(&g.device, &w, 0, &mut |_, _| {}).unwrap();
    let m = dw.matrix(0, WeightFormat::F16, 64, 8, 1).unwrap();
    let short = g.device.upload(&rng.f32s(64)).unwrap();
    let e = g.gemm_f16(&m, &short, 2, &mut y).unwrap_err();
    assert!(e.to_string().contains("2 vectors"), "{e}");
}
