//! The per-vector kernels (RMS norm, RMS norm fused with the activation quantizers, the
//! standalone quantizers) against the CPU reference, bit for bit. On a machine without CUDA
//! each test prints "skipped: no CUDA" and passes.

mod common;

use common::{gpu, Rng};
use ds4_cuda::{ActQuant, Gpu, QuantizedActivations};
use ds4_gguf::quant::{self, BlockQ8K, BlockQ8_0};
use ds4_model::cpu::norm::{rms_norm, rms_norm_unweighted};

const EPS: f32 = 1e-6;

/// The CPU's normalization of one row (ds4-model's reference).
fn cpu_rmsnorm(x: &[f32], w: Option<&[f32]>) -> Vec<f32> {
    let mut y = x.to_vec();
    match w {
        Some(w) => rms_norm(&mut y, w, EPS),
        None => rms_norm_unweighted(&mut y, EPS),
    }
    y
}

/// The CPU formula with a given scale: x · s · w (the reference's operation order).
fn with_scale(x: &[f32], w: Option<&[f32]>, s: f32) -> Vec<f32> {
    match w {
        Some(w) => x.iter().zip(w).map(|(&v, &wi)| v * s * wi).collect(),
        None => x.iter().map(|&v| v * s).collect(),
    }
}

/// The reference's scale, as ds4-model computes it (f64 sum of squares in index order).
fn cpu_scale(x: &[f32]) -> f32 {
    let ss: f64 = x.iter().map(|&v| v as f64 * v as f64).sum();
    (1.0 / (ss / x.len() as f64 + EPS as f64).sqrt()) as f32
}

fn same_bits(a: &[f32], b: &[f32]) -> bool {
    a.len() == b.len() && a.iter().zip(b).all(|(x, y)| x.to_bits() == y.to_bits())
}

/// Checks a GPU-normalized row: bit-identical to the CPU's, or (the f64 sum of squares is
/// added in another order, which can move the f32 scale across a rounding boundary) bit-
/// identical to the CPU formula with the scale one ulp away. Returns whether it was exact.
fn check_row(what: &str, x: &[f32], w: Option<&[f32]>, got: &[f32]) -> bool {
    let want = cpu_rmsnorm(x, w);
    if same_bits(got, &want) {
        return true;
    }
    let s = cpu_scale(x);
    assert!(
        same_bits(&want, &with_scale(x, w, s)),
        "{what}: test formula differs from ds4-model's rms_norm"
    );
    let ok = [s.next_up(), s.next_down()]
        .iter()
        .any(|&s1| same_bits(got, &with_scale(x, w, s1)));
    let first = got
        .iter()
        .zip(&want)
        .position(|(a, b)| a.to_bits() != b.to_bits())
        .expect("rows differ");
    assert!(
        ok,
        "{what}: more than one ulp of scale off the CPU; first difference at {first}: gpu {} vs cpu {}",
        got[first], want[first]
    );
    false
}

/// Rows with a spread of magnitudes (so squares span many exponents), some exact zeros.
fn test_rows(rng: &mut Rng, n: usize, rows: usize) -> Vec<f32> {
    (0..n * rows)
        .map(|i| {
            let v = rng.f32();
            match i % 7 {
                0 => v * 40.0,
                3 => v * 1e-3,
                5 if i % 5 == 0 => 0.0,
                _ => v,
            }
        })
        .collect()
}

/// Row lengths that reach every code path: one segment per thread (≤ 4096 values), a row
/// shorter than a warp's segments (128), several register-cached segments per thread (16384),
/// rows longer than the register cache (32768, 20000), and rows that are not a multiple of 8
/// values (scalar loads with a partial last segment).
const NORM_SHAPES: &[(usize, usize)] = &[
    (4096, 1),
    (4096, 3),
    (1024, 2),
    (512, 64),
    (128, 5),
    (16384, 2),
    (32768, 1),
    (20000, 2),
    (4100, 2),
    (100, 3),
    (7, 4),
];

#[test]
fn rmsnorm_matches_cpu_within_one_ulp_of_scale() {
    let Some(g) = gpu() else { return };
    let mut rng = Rng::new(11);
    let (mut exact, mut total) = (0usize, 0usize);
    for &(n, rows) in NORM_SHAPES {
        let x = test_rows(&mut rng, n, rows);
        let w: Vec<f32> = rng.f32s(n).iter().map(|v| 1.0 + v).collect();
        let (dx, dw) = (g.device.upload(&x).unwrap(), g.device.upload(&w).unwrap());
        for weighted in [false, true] {
            let mut dy = g.device.alloc_filled::<f32>(n * rows, 0xFF).unwrap();
            g.rmsnorm(&dx, weighted.then_some(&dw), n, rows, EPS, &mut dy)
                .unwrap();
            let y = g.device.download(&dy).unwrap();
            for r in 0..rows {
                let what = format!("rmsnorm n {n} row {r}/{rows} weighted {weighted}");
                let wr = weighted.then_some(&w[..]);
                exact +=
                    check_row(&what, &x[r * n..(r + 1) * n], wr, &y[r * n..(r + 1) * n]) as usize;
                total += 1;
            }
        }
    }
    eprintln!(
        "rmsnorm: {exact}/{total} rows bit-identical to the CPU, the rest within 1 ulp of scale"
    );
    // A scale off by an ulp needs the f64 sum within ~1e-13 (relative) of an f32 rounding
    // boundary: with these few rows it must essentially never happen.
    assert!(
        total - exact <= 1,
        "{} rows off by an ulp of scale",
        total - exact
    );
}

#[test]
fn rmsnorm_of_a_zero_row_is_zero() {
    let Some(g) = gpu() else { return };
    let n = 4096;
    let dx = g.device.upload(&vec![0f32; n]).unwrap();
    let mut dy = g.device.alloc_filled::<f32>(n, 0xFF).unwrap();
    g.rmsnorm(&dx, None, n, 1, EPS, &mut dy).unwrap();
    assert!(g.device.download(&dy).unwrap().iter().all(|&v| v == 0.0));
}

/// Quantized vectors as the CPU quantizers produce them: (int8 values, scales).
fn cpu_quantize(kind: ActQuant, x: &[f32]) -> (Vec<i8>, Vec<f32>) {
    match kind {
        ActQuant::Q8_0 => {
            let b: Vec<BlockQ8_0> = quant::quantize_q8_0_activation(x);
            (
                b.iter().flat_map(|b| b.qs).collect(),
                b.iter().map(|b| b.d).collect(),
            )
        }
        ActQuant::Q8K => {
            let b: Vec<BlockQ8K> = quant::quantize_q8_k_activation(x);
            (
                b.iter().flat_map(|b| b.qs).collect(),
                b.iter().map(|b| b.d).collect(),
            )
        }
    }
}

/// The device's quantized vectors equal the CPU quantizer's on `x`, bit for bit.
fn check_quantized(g: &Gpu, what: &str, qa: &QuantizedActivations, x: &[f32]) {
    let total = qa.len * qa.n_vecs;
    let q = g.device.download(&qa.q).unwrap();
    let d = g.device.download(&qa.d).unwrap();
    let (want_q, want_d) = cpu_quantize(qa.kind, &x[..total]);
    let block = qa.kind.block_elems();
    for (b, &wd) in want_d.iter().enumerate() {
        assert_eq!(
            d[b].to_bits(),
            wd.to_bits(),
            "{what}: block {b} scale {} vs {wd}",
            d[b]
        );
        assert_eq!(
            &q[b * block..(b + 1) * block],
            &want_q[b * block..(b + 1) * block],
            "{what}: block {b} values"
        );
    }
}

/// Puts the quantizers' edge cases into x (values are otherwise within ±7): an all-zero Q8_K
/// block (so zero Q8_0 blocks too), a block whose extreme is negative, equal magnitudes of
/// opposite sign (Q8_K keeps the first), and values at exactly half a quantization step
/// (max 127 gives Q8_0 d = 1 and Q8_K iscale = -1: round half to even decides 0.5, 1.5, 2.5).
fn add_edge_cases(x: &mut [f32]) {
    if x.len() >= 1024 {
        x[..256].fill(0.0);
        x[300] = -50.0;
        x[600] = 30.0;
        x[610] = -30.0;
        x[800..805].copy_from_slice(&[127.0, 0.5, 1.5, 2.5, -2.5]);
    }
}

#[test]
fn quantize_activations_match_cpu_bit_for_bit() {
    let Some(g) = gpu() else { return };
    let mut rng = Rng::new(12);
    // (len, n_vecs): a decode vector, several vectors, a single block, and totals that leave
    // the last warp partly empty (5 Q8_0 blocks; 3 Q8_K blocks in a 4-warp CTA).
    let shapes: &[(ActQuant, usize, usize)] = &[
        (ActQuant::Q8_0, 4096, 1),
        (ActQuant::Q8_0, 2048, 3),
        (ActQuant::Q8_0, 32, 1),
        (ActQuant::Q8_0, 160, 1),
        (ActQuant::Q8_0, 7168, 5),
        (ActQuant::Q8K, 4096, 1),
        (ActQuant::Q8K, 2048, 3),
        (ActQuant::Q8K, 256, 1),
        (ActQuant::Q8K, 768, 1),
        (ActQuant::Q8K, 2048, 13),
    ];
    for &(kind, len, n_vecs) in shapes {
        let mut x: Vec<f32> = rng.f32s(len * n_vecs).iter().map(|v| v * 7.0).collect();
        add_edge_cases(&mut x);
        let dx = g.device.upload(&x).unwrap();
        let mut qa = g.alloc_quantized(kind, len, n_vecs).unwrap();
        g.quantize_activations(&dx, &mut qa).unwrap();
        check_quantized(g, &format!("quantize {kind:?} {len}x{n_vecs}"), &qa, &x);
    }
}

#[test]
fn rmsnorm_quantized_equals_rmsnorm_then_quantize() {
    let Some(g) = gpu() else { return };
    let mut rng = Rng::new(13);
    let shapes: &[(usize, usize)] = &[
        (4096, 1),
        (4096, 3),
        (1024, 2),
        (512, 7),
        (16384, 1),
        (32768, 2),
    ];
    for kind in [ActQuant::Q8_0, ActQuant::Q8K] {
        for &(n, rows) in shapes {
            let mut x = test_rows(&mut rng, n, rows);
            add_edge_cases(&mut x);
            let w: Vec<f32> = rng.f32s(n).iter().map(|v| 1.0 + v).collect();
            let (dx, dw) = (g.device.upload(&x).unwrap(), g.device.upload(&w).unwrap());
            for weighted in [false, true] {
                let what =
                    format!("rmsnorm_quantized {kind:?} n {n} rows {rows} weighted {weighted}");
                let weight = weighted.then_some(&dw);
                // Separate kernels: norm, then quantize its output.
                let mut dy_ref = g.device.alloc_filled::<f32>(n * rows, 0xFF).unwrap();
                g.rmsnorm(&dx, weight, n, rows, EPS, &mut dy_ref).unwrap();
                let mut qa_ref = g.alloc_quantized(kind, n, rows).unwrap();
                g.quantize_activations(&dy_ref, &mut qa_ref).unwrap();
                // Fused, into buffers with room for more rows than used.
                let mut dy = g.device.alloc_filled::<f32>(n * rows, 0xFF).unwrap();
                let mut qa = g.alloc_quantized(kind, n, rows + 2).unwrap();
                g.rmsnorm_quantized(&dx, weight, n, rows, EPS, &mut dy, &mut qa)
                    .unwrap();
                assert_eq!(qa.n_vecs, rows, "{what}: n_vecs");
                let y = g.device.download(&dy).unwrap();
                let y_ref = g.device.download(&dy_ref).unwrap();
                assert!(
                    same_bits(&y, &y_ref),
                    "{what}: f32 output differs from rmsnorm's"
                );
                for r in 0..rows {
                    let wr = weighted.then_some(&w[..]);
                    check_row(&what, &x[r * n..(r + 1) * n], wr, &y[r * n..(r + 1) * n]);
                }
                // Bit-exact with the CPU quantizers on the normalized rows, and with the
                // standalone GPU quantizer.
                check_quantized(g, &what, &qa, &y);
                let blocks = n * rows / kind.block_elems();
                assert_eq!(
                    g.device.download(&qa.q).unwrap()[..n * rows],
                    g.device.download(&qa_ref.q).unwrap()[..],
                    "{what}: int8 values differ from quantize_activations"
                );
                let (d, d_ref) = (
                    g.device.download(&qa.d).unwrap(),
                    g.device.download(&qa_ref.d).unwrap(),
                );
                assert!(
                    same_bits(&d[..blocks], &d_ref),
                    "{what}: scales differ from quantize_activations"
                );
            }
        }
    }
}

#[test]
fn rmsnorm_quantized_rejects_mismatched_shapes() {
    let Some(g) = gpu() else { return };
    let n = 1024;
    let dx = g.device.upload(&vec![1f32; n * 2]).unwrap();
    let mut dy = g.device.alloc::<f32>(n * 2).unwrap();
    // Quantized vectors of another length.
    let mut qa = g.alloc_quantized(ActQuant::Q8_0, 512, 4).unwrap();
    let e = g
        .rmsnorm_quantized(&dx, None, n, 2, EPS, &mut dy, &mut qa)
        .unwrap_err()
        .to_string();
    assert!(e.contains("1024") && e.contains("512"), "{e}");
    // Too few vectors of room.
    let mut qa = g.alloc_quantized(ActQuant::Q8K, n, 1).unwrap();
    assert!(g
        .rmsnorm_quantized(&dx, None, n, 2, EPS, &mut dy, &mut qa)
        .is_err());
    assert_eq!(qa.n_vecs, 1, "a failed call leaves qa as it was");
    // Rows that are not whole blocks of the kind.
    let mut qa = QuantizedActivations {
        kind: ActQuant::Q8K,
        len: 100,
        n_vecs: 1,
        q: g.device.alloc(256).unwrap(),
        d: g.device.alloc(1).unwrap(),
    };
    let e = g
        .rmsnorm_quantized(&dx, None, 100, 1, EPS, &mut dy, &mut qa)
        .unwrap_err()
        .to_string();
    assert!(e.contains("blocks of 256"), "{e}");
}

#[test]
fn rmsnorm_quantized_both_equals_the_two_single_kinds() {
    let Some(g) = gpu() else { return };
    let mut rng = Rng::new(14);
    for &(n, rows) in &[(4096usize, 1usize), (4096, 3), (1024, 2), (32768, 1)] {
        let mut x = test_rows(&mut rng, n, rows);
        add_edge_cases(&mut x);
        let w: Vec<f32> = rng.f32s(n).iter().map(|v| 1.0 + v).collect();
        let (dx, dw) = (g.device.upload(&x).unwrap(), g.device.upload(&w).unwrap());
        let what = format!("rmsnorm_quantized_both n {n} rows {rows}");
        let mut dy = g.device.alloc_filled::<f32>(n * rows, 0xFF).unwrap();
        let mut q0 = g.alloc_quantized(ActQuant::Q8_0, n, rows).unwrap();
        let mut qk = g.alloc_quantized(ActQuant::Q8K, n, rows).unwrap();
        g.rmsnorm_quantized_both(&dx, Some(&dw), n, rows, EPS, &mut dy, &mut q0, &mut qk)
            .unwrap();
        let y = g.device.download(&dy).unwrap();
        let mut dy1 = g.device.alloc_filled::<f32>(n * rows, 0xFF).unwrap();
        g.rmsnorm(&dx, Some(&dw), n, rows, EPS, &mut dy1).unwrap();
        assert!(
            same_bits(&y, &g.device.download(&dy1).unwrap()),
            "{what}: f32 output differs from rmsnorm's"
        );
        check_quantized(g, &format!("{what} Q8_0"), &q0, &y);
        check_quantized(g, &format!("{what} Q8_K"), &qk, &y);
    }
    // The two outputs must be of the kinds their names say.
    let n = 256;
    let dx = g.device.upload(&vec![1f32; n]).unwrap();
    let mut dy = g.device.alloc::<f32>(n).unwrap();
    let mut a = g.alloc_quantized(ActQuant::Q8K, n, 1).unwrap();
    let mut b = g.alloc_quantized(ActQuant::Q8K, n, 1).unwrap();
    assert!(g
        .rmsnorm_quantized_both(&dx, None, n, 1, EPS, &mut dy, &mut a, &mut b)
        .is_err());
}

/// The CPU formula of the clamped SwiGLU (f32, as ds4-model's swiglu_clamped, times the slot
/// weight).
fn cpu_swiglu(gate: f32, up: f32, limit: f32, weight: f32) -> f32 {
    let g = gate.min(limit);
    let u = up.clamp(-limit, limit);
    g / (1.0 + (-g).exp()) * u * weight
}

#[test]
fn swiglu_matches_cpu_and_its_quantized_form_is_bit_exact() {
    let Some(g) = gpu() else { return };
    let mut rng = Rng::new(15);
    // (per_slot, slots): the routed experts of a decode token, the shared expert, a prefill
    // span, and slots that are not a multiple of 8 values (scalar path).
    let shapes: &[(usize, usize, Option<ActQuant>)] = &[
        (2048, 6, Some(ActQuant::Q8K)),
        (2048, 1, Some(ActQuant::Q8_0)),
        (2048, 1, Some(ActQuant::Q8K)),
        (512, 40, Some(ActQuant::Q8_0)),
        (256, 3, Some(ActQuant::Q8K)),
        (100, 3, None),
        (7, 5, None),
    ];
    for &(per_slot, slots, kind) in shapes {
        let n = per_slot * slots;
        let gate: Vec<f32> = rng.f32s(n).iter().map(|v| v * 15.0).collect();
        let up: Vec<f32> = rng.f32s(n).iter().map(|v| v * 15.0).collect();
        let wts: Vec<f32> = rng.f32s(slots).iter().map(|v| v * 2.0).collect();
        let (dg, du, dwt) = (
            g.device.upload(&gate).unwrap(),
            g.device.upload(&up).unwrap(),
            g.device.upload(&wts).unwrap(),
        );
        for (limit, weighted) in [(Some(10.0f32), true), (None, false)] {
            let what = format!("swiglu {per_slot}x{slots} limit {limit:?} weighted {weighted}");
            let weight = weighted.then_some(&dwt);
            let mut dout = g.device.alloc_filled::<f32>(n, 0xFF).unwrap();
            g.swiglu_clamp(&dg, &du, n, per_slot, limit, weight, &mut dout)
                .unwrap();
            let out = g.device.download(&dout).unwrap();
            for i in 0..n {
                let wt = if weighted { wts[i / per_slot] } else { 1.0 };
                let want = cpu_swiglu(gate[i], up[i], limit.unwrap_or(f32::INFINITY), wt);
                assert!(
                    (out[i] - want).abs() <= 2e-6 * want.abs().max(1.0),
                    "{what}: [{i}] {} vs {want}",
                    out[i]
                );
            }
            let Some(kind) = kind else { continue };
            let mut dq_out = g.device.alloc_filled::<f32>(n, 0xFF).unwrap();
            let mut qa = g.alloc_quantized(kind, per_slot, slots + 1).unwrap();
            g.swiglu_clamp_quantized(&dg, &du, n, per_slot, limit, weight, &mut dq_out, &mut qa)
                .unwrap();
            assert_eq!(qa.n_vecs, slots, "{what}: n_vecs");
            assert!(
                same_bits(&g.device.download(&dq_out).unwrap(), &out),
                "{what}: f32 output differs from swiglu_clamp's"
            );
            check_quantized(g, &format!("{what} {kind:?}"), &qa, &out);
        }
    }
    // Values that are not whole quantized vectors are an error.
    let d = g.device.upload(&vec![1f32; 300]).unwrap();
    let mut o = g.device.alloc::<f32>(300).unwrap();
    let mut qa = g.alloc_quantized(ActQuant::Q8_0, 64, 8).unwrap();
    assert!(g
        .swiglu_clamp_quantized(&d, &d, 300, 100, None, None, &mut o, &mut qa)
        .is_err());
}
