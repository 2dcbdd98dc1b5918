//! Small dense vector kernels shared by the CPU ops: dot products, scaled adds, activations.
//!
//! The dot product keeps eight independent partial sums so the compiler can vectorize it
//! without reassociating floating-point math on its own; every caller gets the same summation
//! order for the same length, which keeps results independent of how a span is chunked.

/// Dot product of two equal-length f32 slices.
#[inline]
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    debug_assert_eq!(a.len(), b.len());
    const LANES: usize = 8;
    let mut acc = [0f32; LANES];
    let chunks = a.len() / LANES;
    for (ca, cb) in a.chunks_exact(LANES).zip(b.chunks_exact(LANES)) {
        for l in 0..LANES {
            acc[l] += ca[l] * cb[l];
        }
    }
    let mut tail = 0f32;
    for i in chunks * LANES..a.len() {
        tail += a[i] * b[i];
    }
    let s = ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7]));
    s + tail
}

/// y += a · x
#[inline]
pub fn axpy(y: &mut [f32], a: f32, x: &[f32]) {
    debug_assert_eq!(y.len(), x.len());
    for (yi, xi) in y.iter_mut().zip(x) {
        *yi += a * xi;
    }
}

pub fn sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + (-x).exp())
}

pub fn silu(x: f32) -> f32 {
    x * sigmoid(x)
}

/// softplus as ds4 computes it: the identity above 20, e^x below −20, else ln(1 + e^x).
/// (torch switches to the identity above 20 as well; below −20 the two agree to f32 precision.)
pub fn softplus(x: f32) -> f32 {
    if x > 20.0 {
        x
    } else if x < -20.0 {
        x.exp()
    } else {
        x.exp().ln_1p()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dot_matches_naive_sum() {
        for n in [0usize, 1, 7, 8, 9, 33, 100] {
            let a: Vec<f32> = (0..n).map(|i| (i as f32 * 0.37).sin()).collect();
            let b: Vec<f32> = (0..n).map(|i| (i as f32 * 0.11).cos()).collect();
            let naive: f64 = a.iter().zip(&b).map(|(x, y)| *x as f64 * *y as f64).sum();
            assert!((dot(&a, &b) as f64 - naive).abs() < 1e-5, "n = {n}");
        }
    }

    #[test]
    fn activations() {
        assert!((sigmoid(0.0) - 0.5).abs() < 1e-7);
        assert!((silu(1.0) - 0.731_058_6).abs() < 1e-6);
        assert!((softplus(0.0) - 2f32.ln()).abs() < 1e-7);
        assert_eq!(softplus(25.0), 25.0);
        assert!((softplus(-25.0) - (-25f32).exp()).abs() < 1e-20);
    }
}

/// Indices of the `k` largest values, highest first; among equal values the lowest index wins
/// (ds4's rule for experts and indexer rows, dsv4-arch C8). NaN sorts below everything.
pub fn top_k_lowest_index(values: &[f32], k: usize) -> Vec<usize> {
    let key = |v: f32| if v.is_nan() { f32::NEG_INFINITY } else { v };
    let order = |a: &usize, b: &usize| key(values[*b]).total_cmp(&key(values[*a])).then(a.cmp(b));
    let mut idx: Vec<usize> = (0..values.len()).collect();
    let k = k.min(values.len());
    if k < idx.len() && k > 0 {
        idx.select_nth_unstable_by(k - 1, order);
    }
    idx.truncate(k);
    idx.sort_by(order);
    idx
}

#[cfg(test)]
mod top_k_tests {
    use super::*;

    #[test]
    fn top_k_breaks_ties_by_lowest_index() {
        let v = [1.0, 3.0, 2.0, 3.0, 0.5, 2.0];
        assert_eq!(top_k_lowest_index(&v, 3), vec![1, 3, 2]);
        assert_eq!(top_k_lowest_index(&v, 1), vec![1]);
        assert_eq!(top_k_lowest_index(&v, 10), vec![1, 3, 2, 5, 0, 4]);
        assert_eq!(top_k_lowest_index(&[f32::NAN, 0.0], 1), vec![1]);
    }
}
