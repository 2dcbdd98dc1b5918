//! Single-query attention with a per-head sink: K = V = the cached rows (dsv4-arch.md §3.5).
//!
//! p_j = e^{s_j} / (e^{z} + Σ e^{s_j'}) with s_j = q·k_j / sqrt(D) and z the head's sink logit,
//! which carries no value; the output is Σ p_j k_j.

use super::vecops::{axpy, dot};

/// One head: `rows` are the visible K=V rows (window, then compressed), `out` gets Σ p_j k_j.
pub fn attend_head(
    q: &[f32],
    rows: &[&[f32]],
    sink: f32,
    scale: f32,
    scores: &mut Vec<f32>,
    out: &mut [f32],
) {
    scores.clear();
    scores.extend(rows.iter().map(|k| dot(q, k) * scale));
    let mx = scores.iter().copied().fold(sink, f32::max);
    let mut denom = (sink - mx).exp();
    for s in scores.iter_mut() {
        *s = (*s - mx).exp();
        denom += *s;
    }
    out.fill(0.0);
    for (p, k) in scores.iter().zip(rows) {
        axpy(out, p / denom, k);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sink_takes_probability_mass_without_value() {
        let k0 = [1.0f32, 0.0];
        let k1 = [0.0f32, 1.0];
        let q = [0.0f32, 0.0]; // equal logits 0 for both rows
        let mut out = [0f32; 2];
        let mut buf = Vec::new();
        // sink 0: three equal logits → each row gets 1/3.
        attend_head(&q, &[&k0, &k1], 0.0, 1.0, &mut buf, &mut out);
        assert!((out[0] - 1.0 / 3.0).abs() < 1e-6 && (out[1] - 1.0 / 3.0).abs() < 1e-6);
        // Huge negative sink: plain softmax.
        attend_head(&[2.0, 0.0], &[&k0, &k1], -1e30, 0.5, &mut buf, &mut out);
        let p0 = 1f32.exp() / (1f32.exp() + 1.0);
        assert!((out[0] - p0).abs() < 1e-6 && (out[1] - (1.0 - p0)).abs() < 1e-6);
        // No rows: output zero.
        attend_head(&q, &[], 0.0, 1.0, &mut buf, &mut out);
        assert_eq!(out, [0.0, 0.0]);
    }
}
