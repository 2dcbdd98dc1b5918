//! Manifold-constrained hyper-connections (mHC): the n residual streams of a token are mixed
//! into one sublayer input (pre), and the sublayer output is spread back into the streams
//! through a doubly-stochastic (Sinkhorn-projected) mixing matrix (post). dsv4-arch.md §3.3.
//!
//! The projection μ = fn · RMS0(streams) is a matmul done by the caller (batched over tokens);
//! this module turns μ into the three mappings and applies them.

use super::vecops::{axpy, sigmoid};

/// The three mappings of one token at one hyper-connection.
#[derive(Clone, Debug, PartialEq)]
pub struct HcMappings {
    /// Weight of each stream in the sublayer input (n).
    pub pre: Vec<f32>,
    /// Weight of the sublayer output in each stream (n).
    pub post: Vec<f32>,
    /// comb[j·n + k]: weight of source stream j in destination stream k (n×n, doubly stochastic).
    pub comb: Vec<f32>,
}

/// Turns μ ∈ R^{(2+n)n} into the mappings: pre = σ(α0·μ_pre + b) + ε, post = 2σ(α1·μ_post + b),
/// comb = Sinkhorn(softmax_rows(α2·μ_comb + b) + ε) with `iters` column passes and `iters − 1`
/// row passes (column first).
pub fn split_sinkhorn(
    mix: &[f32],
    base: &[f32],
    scale: &[f32],
    n: usize,
    iters: usize,
    eps: f32,
) -> HcMappings {
    debug_assert_eq!(mix.len(), (2 + n) * n);
    let pre = (0..n)
        .map(|i| sigmoid(mix[i] * scale[0] + base[i]) + eps)
        .collect();
    let post = (0..n)
        .map(|i| 2.0 * sigmoid(mix[n + i] * scale[1] + base[n + i]))
        .collect();
    let mut comb: Vec<f32> = (0..n * n)
        .map(|i| mix[2 * n + i] * scale[2] + base[2 * n + i])
        .collect();
    for row in comb.chunks_exact_mut(n) {
        let m = row.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b));
        let mut s = 0f32;
        for v in row.iter_mut() {
            *v = (*v - m).exp();
            s += *v;
        }
        for v in row.iter_mut() {
            *v = *v / s + eps;
        }
    }
    normalize_columns(&mut comb, n, eps);
    for _ in 1..iters {
        for row in comb.chunks_exact_mut(n) {
            let s: f32 = row.iter().sum::<f32>() + eps;
            for v in row.iter_mut() {
                *v /= s;
            }
        }
        normalize_columns(&mut comb, n, eps);
    }
    HcMappings { pre, post, comb }
}

fn normalize_columns(c: &mut [f32], n: usize, eps: f32) {
    for k in 0..n {
        let s: f32 = (0..n).map(|j| c[j * n + k]).sum::<f32>() + eps;
        for j in 0..n {
            c[j * n + k] /= s;
        }
    }
}

/// Sublayer input: u = Σ_j pre_j · X_j, with `streams` the n×d streams of one token.
pub fn combine(pre: &[f32], streams: &[f32], out: &mut [f32]) {
    let d = out.len();
    out.fill(0.0);
    for (j, &w) in pre.iter().enumerate() {
        axpy(out, w, &streams[j * d..(j + 1) * d]);
    }
}

/// Post: X'_k = post_k · y + Σ_j comb(j, k) · X_j, in place on the n×d `streams`.
pub fn post(m: &HcMappings, y: &[f32], streams: &mut [f32]) {
    let d = y.len();
    let n = m.post.len();
    let old = streams.to_vec();
    for k in 0..n {
        let dst = &mut streams[k * d..(k + 1) * d];
        for (v, yi) in dst.iter_mut().zip(y) {
            *v = m.post[k] * yi;
        }
        for j in 0..n {
            axpy(dst, m.comb[j * n + k], &old[j * d..(j + 1) * d]);
        }
    }
}

/// Head weights: a_j = σ(scale · μ_j + base_j) + ε (no Sinkhorn, no post).
pub fn head_weights(mix: &[f32], base: &[f32], scale: f32, eps: f32) -> Vec<f32> {
    mix.iter()
        .zip(base)
        .map(|(&m, &b)| sigmoid(m * scale + b) + eps)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sinkhorn_is_nearly_doubly_stochastic_and_matches_a_direct_loop() {
        let n = 4;
        let mix: Vec<f32> = (0..(2 + n) * n)
            .map(|i| ((i * 7 % 11) as f32 - 5.0) * 0.3)
            .collect();
        let base: Vec<f32> = (0..(2 + n) * n).map(|i| (i as f32 * 0.1).sin()).collect();
        let scale = [0.5f32, 0.7, 1.3];
        let m = split_sinkhorn(&mix, &base, &scale, n, 20, 1e-6);
        for j in 0..n {
            let row: f32 = (0..n).map(|k| m.comb[j * n + k]).sum();
            let col: f32 = (0..n).map(|k| m.comb[k * n + j]).sum();
            assert!((row - 1.0).abs() < 1e-3, "row {j} sums to {row}");
            assert!((col - 1.0).abs() < 1e-5, "column {j} sums to {col}");
        }
        // Direct f64 transcription of dsv4-arch §3.3.
        let mut c = vec![vec![0f64; n]; n];
        for j in 0..n {
            let z: Vec<f64> = (0..n)
                .map(|k| {
                    mix[2 * n + j * n + k] as f64 * scale[2] as f64 + base[2 * n + j * n + k] as f64
                })
                .collect();
            let mx = z.iter().cloned().fold(f64::MIN, f64::max);
            let s: f64 = z.iter().map(|v| (v - mx).exp()).sum();
            for k in 0..n {
                c[j][k] = (z[k] - mx).exp() / s + 1e-6;
            }
        }
        let col = |c: &mut Vec<Vec<f64>>| {
            for k in 0..n {
                let s: f64 = (0..n).map(|j| c[j][k]).sum::<f64>() + 1e-6;
                for row in c.iter_mut() {
                    row[k] /= s;
                }
            }
        };
        col(&mut c);
        for _ in 1..20 {
            for row in c.iter_mut() {
                let s: f64 = row.iter().sum::<f64>() + 1e-6;
                for v in row.iter_mut() {
                    *v /= s;
                }
            }
            col(&mut c);
        }
        for j in 0..n {
            for (k, want) in c[j].iter().enumerate() {
                assert!((m.comb[j * n + k] as f64 - want).abs() < 1e-6);
            }
            let pre = 1.0 / (1.0 + (-(mix[j] as f64 * 0.5 + base[j] as f64)).exp()) + 1e-6;
            assert!((m.pre[j] as f64 - pre).abs() < 1e-6);
            let post = 2.0 / (1.0 + (-(mix[n + j] as f64 * 0.7 + base[n + j] as f64)).exp());
            assert!((m.post[j] as f64 - post).abs() < 1e-6);
        }
    }

    #[test]
    fn post_uses_comb_source_to_destination() {
        // comb[j,k] moves stream j into stream k: with comb = [[0,1],[1,0]] the streams swap.
        let m = HcMappings {
            pre: vec![1.0, 1.0],
            post: vec![1.0, 0.5],
            comb: vec![0.0, 1.0, 1.0, 0.0],
        };
        let mut streams = vec![1.0f32, 2.0, 10.0, 20.0];
        post(&m, &[100.0, 200.0], &mut streams);
        assert_eq!(streams, vec![110.0, 220.0, 51.0, 102.0]);
        let mut u = vec![0f32; 2];
        combine(&[0.5, 2.0], &[1.0, 2.0, 10.0, 20.0], &mut u);
        assert_eq!(u, vec![20.5, 41.0]);
    }
}
