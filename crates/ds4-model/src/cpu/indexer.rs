//! The lightning indexer of CSA layers: scores every compressed row for the current query
//! and keeps the top k (dsv4-arch.md §3.8). It only selects rows; attention then reads the
//! main compressor's rows at the selected indices.

use super::vecops::{dot, top_k_lowest_index};

/// Rows of `keys` (n_rows × d_I) the query may attend to, in ascending order.
///
/// `q` is the n_I × d_I index query (RoPE'd, and in ds4 numerics rotated and FP4-rounded);
/// `head_weights` are the n_I head weights already multiplied by 1/sqrt(n_I·d_I). When there
/// are at most `top_k` rows, all are kept without scoring (same result, C9).
pub fn select_rows(
    q: &[f32],
    head_weights: &[f32],
    keys: &[f32],
    d_i: usize,
    top_k: usize,
) -> Vec<usize> {
    let n_rows = keys.len() / d_i;
    if n_rows <= top_k {
        return (0..n_rows).collect();
    }
    let scores: Vec<f32> = keys
        .chunks_exact(d_i)
        .map(|k| score(q, head_weights, k))
        .collect();
    let mut picked = top_k_lowest_index(&scores, top_k);
    picked.sort_unstable();
    picked
}

/// score = Σ_h w_h · max(0, q_h · k).
pub fn score(q: &[f32], head_weights: &[f32], key: &[f32]) -> f32 {
    let d_i = key.len();
    q.chunks_exact(d_i)
        .zip(head_weights)
        .map(|(qh, &w)| w * dot(qh, key).max(0.0))
        .sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_all_rows_up_to_top_k_and_the_best_beyond() {
        let d = 2;
        // Two heads; head 0 likes channel 0, head 1 channel 1 (negative weight).
        let q = [1.0, 0.0, 0.0, 1.0];
        let w = [1.0, -0.5];
        let keys = [
            1.0, 0.0, // score 1
            2.0, 2.0, // 2 - 1 = 1 (tie with row 0: row 0 wins)
            3.0, 0.0, // 3
            -5.0, 0.0, // relu → 0
        ];
        assert_eq!(select_rows(&q, &w, &keys, d, 4), vec![0, 1, 2, 3]);
        assert_eq!(select_rows(&q, &w, &keys, d, 2), vec![0, 2]);
        assert_eq!(score(&q, &w, &[2.0, 2.0]), 1.0);
    }
}
