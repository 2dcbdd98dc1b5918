//! Least-squares fitting of one sub-block to `x ≈ scale·q − offset` with integer
//! `q ∈ [0, nmax]`, `scale ≥ 0`, `offset ≥ 0`: the shared step of the Q2_K and Q4_K quantizers.
//!
//! The grid of q is chosen by a short search over slightly different initial step sizes; for
//! each candidate the scale and offset are refitted by least squares and the candidate with the
//! lowest squared error wins.

/// Fit `x` (a sub-block) and return `(scale, offset)`; `q` receives the chosen levels.
pub(crate) fn fit_scale_offset(x: &[f32], nmax: u8, q: &mut [u8]) -> (f32, f32) {
    debug_assert!(x.len() == q.len() && x.len() <= 32);
    // The offset is the negated minimum, and ggml's K formats only store offsets ≥ 0.
    let lo = x.iter().fold(0.0f32, |m, &v| m.min(v));
    let hi = x.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v));
    if hi.partial_cmp(&lo) != Some(std::cmp::Ordering::Greater) {
        q.fill(0);
        return (0.0, -lo);
    }
    let nmax_f = nmax as f32;
    let mut best = (f32::INFINITY, 0.0f32, -lo);
    let mut trial_buf = [0u8; 32];
    let trial = &mut trial_buf[..x.len()];
    // Candidate step sizes around (hi - lo)/nmax; the widest search pays off for 2-bit levels.
    for k in -6..=12 {
        let iscale = (nmax_f + 0.1 * k as f32) / (hi - lo);
        for (t, &v) in trial.iter_mut().zip(x) {
            *t = ((v - lo) * iscale).round().clamp(0.0, nmax_f) as u8;
        }
        let (scale, offset) = least_squares(x, trial);
        let err: f32 = x
            .iter()
            .zip(trial.iter())
            .map(|(&v, &t)| {
                let e = scale * t as f32 - offset - v;
                e * e
            })
            .sum();
        if err < best.0 {
            best = (err, scale, offset);
            q.copy_from_slice(trial);
        }
    }
    (best.1, best.2)
}

/// Least-squares `x ≈ a·q + b` with `a ≥ 0, b ≤ 0`; returns `(a, -b)`.
fn least_squares(x: &[f32], q: &[u8]) -> (f32, f32) {
    let n = x.len() as f32;
    let (mut sq, mut sqq, mut sx, mut sqx) = (0.0f32, 0.0f32, 0.0f32, 0.0f32);
    for (&v, &t) in x.iter().zip(q) {
        let t = t as f32;
        sq += t;
        sqq += t * t;
        sx += v;
        sqx += t * v;
    }
    let det = n * sqq - sq * sq;
    let (mut a, mut b) = if det > 0.0 {
        let a = (n * sqx - sq * sx) / det;
        (a, (sx - a * sq) / n)
    } else {
        (0.0, sx / n)
    };
    if b > 0.0 {
        // The offset must be ≥ 0: refit the scale alone with b = 0.
        b = 0.0;
        a = if sqq > 0.0 { sqx / sqq } else { 0.0 };
    }
    (a.max(0.0), -b)
}

/// Quantize per-sub-block scales (or offsets) `v ≥ 0` to `bits`-bit integers against one
/// super-block factor stored as f16. Returns the f16 bits of the factor; `out` gets the levels.
pub(crate) fn quantize_factors(v: &[f32], bits: u32, out: &mut [u8]) -> u16 {
    let levels = ((1u32 << bits) - 1) as f32;
    let max = v.iter().fold(0.0f32, |m, &s| m.max(s));
    let factor_bits = super::float::f32_to_f16(max / levels);
    let factor = super::float::f16_to_f32(factor_bits);
    for (o, &s) in out.iter_mut().zip(v) {
        *o = if factor > 0.0 {
            (s / factor).round().clamp(0.0, levels) as u8
        } else {
            0
        };
    }
    factor_bits
}

/// Final levels for a sub-block once its scale `dl` and offset `ml` are fixed (as stored).
pub(crate) fn requantize(x: &[f32], dl: f32, ml: f32, nmax: u8, q: &mut [u8]) {
    for (t, &v) in q.iter_mut().zip(x) {
        *t = if dl > 0.0 {
            ((v + ml) / dl).round().clamp(0.0, nmax as f32) as u8
        } else {
            0
        };
    }
}
