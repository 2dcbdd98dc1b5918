//! RMS normalization: x / sqrt(mean(x²) + ε), optionally times a weight.
//!
//! The sum of squares is accumulated in f64 (as ds4 does), which is at least as accurate as
//! transformers' f32 mean.

fn inv_rms(x: &[f32], eps: f32) -> f32 {
    let ss: f64 = x.iter().map(|&v| v as f64 * v as f64).sum();
    (1.0 / (ss / x.len() as f64 + eps as f64).sqrt()) as f32
}

/// In place: x ← x / rms(x).
pub fn rms_norm_unweighted(x: &mut [f32], eps: f32) {
    let s = inv_rms(x, eps);
    for v in x.iter_mut() {
        *v *= s;
    }
}

/// In place: x ← w ⊙ x / rms(x).
pub fn rms_norm(x: &mut [f32], w: &[f32], eps: f32) {
    debug_assert_eq!(x.len(), w.len());
    let s = inv_rms(x, eps);
    for (v, wi) in x.iter_mut().zip(w) {
        *v = *v * s * wi;
    }
}

/// Applies `rms_norm` to every row of a row-major [rows × w.len()] buffer.
pub fn rms_norm_rows(x: &mut [f32], w: &[f32], eps: f32) {
    for row in x.chunks_exact_mut(w.len()) {
        rms_norm(row, w, eps);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normalizes_to_unit_rms() {
        let mut x = vec![3.0f32, 4.0];
        // mean(x²) = 12.5 → rms = 3.5355
        rms_norm_unweighted(&mut x, 0.0);
        assert!((x[0] - 3.0 / 12.5f32.sqrt()).abs() < 1e-6);
        assert!((x[1] - 4.0 / 12.5f32.sqrt()).abs() < 1e-6);
        let mut y = vec![3.0f32, 4.0];
        rms_norm(&mut y, &[2.0, -1.0], 0.0);
        assert!((y[0] - 2.0 * x[0]).abs() < 1e-6 && (y[1] + x[1]).abs() < 1e-6);
        // ε keeps a zero vector finite.
        let mut z = vec![0.0f32; 4];
        rms_norm_unweighted(&mut z, 1e-6);
        assert!(z.iter().all(|v| *v == 0.0));
    }
}
