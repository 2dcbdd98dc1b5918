//! quantize → dequantize on N(0,1) data: the relative RMS error of every format, asserted
//! against a stated bound, plus the exact behaviour of the activation quantizers.
//!
//! `cargo test -p ds4-gguf --test quant_roundtrip -- --nocapture` prints the measured errors;
//! BOUNDS below records them and the bounds asserted.

use ds4_gguf::quant::{
    dequantize, quantize, quantize_q8_0_activation, quantize_q8_k_activation, QuantError,
};
use ds4_gguf::GgmlType;

mod common;
use common::Rng;

/// sqrt(Σ(x − x̂)²) / sqrt(Σx²) after a quantize → dequantize round trip.
fn relative_rms(ty: GgmlType, x: &[f32]) -> f64 {
    let mut q = vec![0u8; x.len() / ty.block_elems() * ty.block_bytes()];
    quantize(ty, x, &mut q).unwrap();
    let mut y = vec![0f32; x.len()];
    dequantize(ty, &q, &mut y).unwrap();
    let (e, s) = x.iter().zip(&y).fold((0.0f64, 0.0f64), |(e, s), (&a, &b)| {
        (e + (a as f64 - b as f64).powi(2), s + (a as f64).powi(2))
    });
    (e / s).sqrt()
}

const N: usize = 64 * 256;

/// (type, bound on the relative RMS error). Measured with seed 11 on 16,384 N(0,1) values:
/// F16 2.07e-4, BF16 1.67e-3, Q8_0 5.37e-3, Q8_K 6.91e-3, Q4_K 7.16e-2, Q2_K 0.271,
/// IQ2_XXS 0.329 (our simple search, no importance matrix). The bounds leave ~10-40% margin.
const BOUNDS: [(GgmlType, f64); 7] = [
    (GgmlType::F16, 3.0e-4),
    (GgmlType::BF16, 2.5e-3),
    (GgmlType::Q8_0, 6.0e-3),
    (GgmlType::Q8K, 8.0e-3),
    (GgmlType::Q4K, 0.085),
    (GgmlType::Q2K, 0.30),
    (GgmlType::IQ2XXS, 0.36),
];

#[test]
fn round_trip_error_on_normal_data_is_within_bounds() {
    let mut rng = Rng(11);
    let x = rng.normals(N);
    let errs: Vec<f64> = BOUNDS.iter().map(|&(ty, _)| relative_rms(ty, &x)).collect();
    for (&(ty, bound), err) in BOUNDS.iter().zip(&errs) {
        eprintln!("{ty}: relative RMS error {err:.4e} (bound {bound:.1e})");
    }
    for (&(ty, bound), &err) in BOUNDS.iter().zip(&errs) {
        assert!(err < bound, "{ty}: relative RMS error {err} >= {bound}");
    }
}

#[test]
fn round_trip_error_does_not_depend_on_magnitude() {
    let mut rng = Rng(12);
    let x = rng.normals(N);
    for ty in [
        GgmlType::Q8_0,
        GgmlType::Q4K,
        GgmlType::Q2K,
        GgmlType::IQ2XXS,
    ] {
        let base = relative_rms(ty, &x);
        for scale in [1e-3f32, 30.0] {
            let xs: Vec<f32> = x.iter().map(|v| v * scale).collect();
            let err = relative_rms(ty, &xs);
            assert!(
                (err - base).abs() <= 0.1 * base,
                "{ty}: error {err} at scale {scale} vs {base} at scale 1"
            );
        }
    }
}

#[test]
fn k_quants_handle_constant_and_one_sided_blocks() {
    // All-zero, constant positive, constant negative, all-positive and all-negative blocks.
    let mut x = vec![0f32; 256];
    x.extend(std::iter::repeat_n(0.75f32, 256));
    x.extend(std::iter::repeat_n(-0.75f32, 256));
    x.extend((0..256).map(|i| 1.0 + i as f32 / 256.0));
    x.extend((0..256).map(|i| -1.0 - i as f32 / 256.0));
    for ty in [
        GgmlType::Q4K,
        GgmlType::Q2K,
        GgmlType::IQ2XXS,
        GgmlType::Q8K,
    ] {
        let mut q = vec![0u8; x.len() / 256 * ty.block_bytes()];
        quantize(ty, &x, &mut q).unwrap();
        let mut y = vec![0f32; x.len()];
        dequantize(ty, &q, &mut y).unwrap();
        assert!(y[..256].iter().all(|&v| v == 0.0), "{ty}: zero block");
        for (b, (xb, yb)) in x.chunks(256).zip(y.chunks(256)).enumerate().skip(1) {
            let err: f32 = xb.iter().zip(yb).map(|(a, b)| (a - b).powi(2)).sum();
            let rel = (err / xb.iter().map(|a| a * a).sum::<f32>()).sqrt();
            // IQ2_XXS's codebook has few points with many equal coordinates, so a smooth
            // one-sided ramp is its hard case (measured 0.33); the others fit ramps closely.
            let limit = if ty == GgmlType::IQ2XXS { 0.4 } else { 0.05 };
            assert!(rel < limit, "{ty} block {b}: relative rms error {rel}");
        }
    }
}

#[test]
fn q8_0_activation_follows_ds4() {
    let mut x = vec![0f32; 64];
    // Block 0: amax 127 → d = 1, and the .5 values round half to even (lrintf), unlike the
    // weight quantizer's half-away-from-zero.
    x[..6].copy_from_slice(&[127.0, 0.5, 1.5, 2.5, -2.5, -127.0]);
    let b = quantize_q8_0_activation(&x);
    assert_eq!(b.len(), 2);
    assert_eq!(b[0].d, 1.0);
    assert_eq!(&b[0].qs[..6], &[127, 0, 2, 2, -2, -127]);
    assert_eq!((b[1].d, b[1].qs), (0.0, [0i8; 32]));
    let mut w = vec![0u8; 68];
    quantize(GgmlType::Q8_0, &x, &mut w).unwrap();
    assert_eq!(&w[2..8], &[127, 1, 2, 3, (-3i8) as u8, (-127i8) as u8]);
}

#[test]
fn q8_k_activation_follows_ggml() {
    let mut rng = Rng(13);
    let mut x = rng.normals(512);
    x[7] = 9.0; // the largest magnitude, positive
    x[256 + 3] = -9.0; // the largest magnitude, negative
    let b = quantize_q8_k_activation(&x);
    // The signed maximum maps to −127, so d carries the opposite sign of that maximum.
    assert_eq!(b[0].qs[7], -127);
    assert_eq!(b[0].d, 1.0 / (-127.0 / 9.0));
    assert_eq!(b[1].qs[3], -127);
    assert!(b[1].d > 0.0);
    for blk in &b {
        for (g, s) in blk.bsums.iter().enumerate() {
            let sum: i16 = blk.qs[16 * g..16 * g + 16].iter().map(|&q| q as i16).sum();
            assert_eq!(*s, sum);
        }
        assert!(blk.qs.iter().all(|&q| q >= -127));
    }
    // Values within half a step of the original.
    for (i, &v) in x.iter().enumerate() {
        let blk = &b[i / 256];
        assert!((blk.d * blk.qs[i % 256] as f32 - v).abs() <= blk.d.abs() * 0.5001);
    }
}

#[test]
fn size_and_type_errors_are_reported() {
    let x = vec![0f32; 256];
    assert!(matches!(
        quantize(GgmlType::I32, &x, &mut [0u8; 1024]),
        Err(QuantError::Unsupported { .. })
    ));
    assert!(matches!(
        quantize(GgmlType::Q4K, &x[..100], &mut [0u8; 144]),
        Err(QuantError::NotWholeBlocks { .. })
    ));
    assert!(matches!(
        quantize(GgmlType::Q4K, &x, &mut [0u8; 143]),
        Err(QuantError::SizeMismatch { .. })
    ));
    let mut y = vec![0f32; 256];
    assert!(matches!(
        dequantize(GgmlType::IQ2XXS, &[0u8; 65], &mut y),
        Err(QuantError::SizeMismatch { .. })
    ));
    let err = dequantize(GgmlType::Q2K, &[0u8; 83], &mut y).unwrap_err();
    assert_eq!(
        err.to_string(),
        "Q2_K: source holds 83 bytes/elements, expected 84"
    );
    // I32 dequantizes to the value as f32.
    let ids: Vec<u8> = [5i32, -1, 255]
        .iter()
        .flat_map(|v| v.to_le_bytes())
        .collect();
    let mut out = [0f32; 3];
    dequantize(GgmlType::I32, &ids, &mut out).unwrap();
    assert_eq!(out, [5.0, -1.0, 255.0]);
}
