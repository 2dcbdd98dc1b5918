//! Greedy picks from a row of logits: the first maximum, NaN never winning. The sampler at
//! temperature 0, `ds4 bench` and [`crate::backend::Session::decode_greedy`] (which a backend
//! may compute on its device: it must pick exactly these ids) all use these.

/// Index of the first maximum (NaN never wins; all NaN or empty: 0). The same id as
/// [`argmax_excluding`] with nothing excluded.
pub fn argmax(logits: &[f32]) -> u32 {
    // Greedy decoding runs this over the whole vocabulary every token, between two GPU steps:
    // one vectorized pass takes each block's maximum, and only the first block holding the
    // largest is scanned again for its index (a scalar search of the whole vocabulary for
    // the index took ~50 us a token on the H100 host).
    const BLOCK: usize = 4096;
    let mut max = f32::NEG_INFINITY;
    let mut first_block = 0;
    for (b, block) in logits.chunks(BLOCK).enumerate() {
        // `>`: a later block with an equal maximum does not hold the first one.
        let m = non_nan_max(block);
        if m > max {
            max = m;
            first_block = b;
        }
    }
    if max == f32::NEG_INFINITY {
        // Nothing above -inf: the first value that is not NaN (-inf itself), else 0.
        return logits.iter().position(|v| !v.is_nan()).unwrap_or(0) as u32;
    }
    let start = first_block * BLOCK;
    let within = logits[start..].iter().position(|&v| v == max).unwrap_or(0);
    (start + within) as u32
}

/// The largest value of `values` (`-inf` when empty or all NaN), in 16 independent lanes so
/// that it vectorizes (`>` lets no NaN in). The sampler's block maxima use it too.
pub fn non_nan_max(values: &[f32]) -> f32 {
    const LANES: usize = 16;
    let mut lanes = [f32::NEG_INFINITY; LANES];
    let mut chunks = values.chunks_exact(LANES);
    for chunk in &mut chunks {
        for (lane, &v) in lanes.iter_mut().zip(chunk) {
            *lane = if v > *lane { v } else { *lane };
        }
    }
    let mut max = f32::NEG_INFINITY;
    for &v in lanes.iter().chain(chunks.remainder()) {
        if v > max {
            max = v;
        }
    }
    max
}

/// The first maximum among the ids not in `exclude` (NaN never wins; none left: 0): greedy
/// decoding that never picks, e.g., EOS (`ds4 bench`). [`argmax`]'s fast scan, and the slow
/// one with the exclusions only when its pick is excluded or no logit is above -inf.
pub fn argmax_excluding(logits: &[f32], exclude: &[u32]) -> u32 {
    let best = argmax(logits);
    let above_neg_inf = logits
        .get(best as usize)
        .is_some_and(|&v| v > f32::NEG_INFINITY);
    if above_neg_inf && !exclude.contains(&best) {
        return best;
    }
    let mut pick: Option<(usize, f32)> = None;
    for (i, &x) in logits.iter().enumerate() {
        if exclude.contains(&(i as u32)) || x.is_nan() {
            continue;
        }
        if pick.is_none_or(|(_, b)| x > b) {
            pick = Some((i, x));
        }
    }
    pick.map_or(0, |(i, _)| i as u32)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn argmax_excluding_skips_excluded_and_nan() {
        assert_eq!(argmax_excluding(&[0.0, 3.0, 2.0], &[]), 1);
        assert_eq!(argmax_excluding(&[0.0, 3.0, 2.0], &[1]), 2);
        assert_eq!(argmax_excluding(&[f32::NAN, 1.0, 1.0], &[]), 1);
        // Past the 16-lane chunks, ties, -inf only, the maximum excluded.
        let mut long: Vec<f32> = (0..100).map(|i| (i % 7) as f32).collect();
        long[93] = 9.0;
        long[95] = 9.0;
        assert_eq!(argmax_excluding(&long, &[]), 93);
        assert_eq!(argmax_excluding(&long, &[93]), 95);
        assert_eq!(argmax_excluding(&long, &[93, 95]), 6);
        assert_eq!(
            argmax_excluding(&[f32::NEG_INFINITY, f32::NAN, f32::NEG_INFINITY], &[0]),
            2
        );
        assert_eq!(argmax_excluding(&[f32::NAN; 20], &[]), 0);
    }

    #[test]
    fn argmax_excluding_nothing_is_argmax() {
        // The server's greedy steps (decode_greedy with nothing excluded) must pick what the
        // sampler's argmax picks from the same row.
        let (nan, inf) = (f32::NAN, f32::INFINITY);
        let mut rows: Vec<Vec<f32>> = vec![
            vec![],
            vec![nan],
            vec![-inf],
            vec![nan, -inf, -inf],
            vec![-inf, nan, -inf],
            vec![nan; 33],
            vec![-inf; 33],
            vec![nan, 1.0, 3.0, 3.0],
            vec![-inf, inf, inf, nan],
            vec![-0.0, 0.0],
            vec![f32::MIN, -inf, nan],
        ];
        let mut long: Vec<f32> = (0..9000).map(|i| ((i * 7919) % 1000) as f32).collect();
        long[4100] = 2000.0;
        long[8999] = 2000.0;
        long[17] = nan;
        rows.push(long.clone());
        long[4100] = nan;
        rows.push(long);
        for (i, row) in rows.iter().enumerate() {
            assert_eq!(argmax_excluding(row, &[]), argmax(row), "row {i}");
        }
    }

    #[test]
    fn argmax_is_the_first_maximum_and_never_nan() {
        assert_eq!(argmax(&[]), 0);
        assert_eq!(argmax(&[f32::NAN, 1.0, 3.0, 3.0]), 2);
        assert_eq!(argmax(&[f32::NAN; 40]), 0);
        assert_eq!(argmax(&[f32::NEG_INFINITY; 3]), 0);
        assert_eq!(argmax(&[f32::NAN, f32::NEG_INFINITY, f32::NAN]), 1);
        assert_eq!(
            argmax(&[f32::NAN, f32::NEG_INFINITY]),
            argmax_excluding(&[f32::NAN, f32::NEG_INFINITY], &[])
        );
        // Maxima in the 16-lane chunks and in the remainder, NaN around them.
        let mut long: Vec<f32> = (0..70).map(|i| (i % 5) as f32).collect();
        long[3] = f32::NAN;
        long[68] = 7.5;
        assert_eq!(argmax(&long), 68);
        long[17] = 7.5;
        assert_eq!(argmax(&long), 17);
        long[1] = f32::INFINITY;
        assert_eq!(argmax(&long), 1);
    }
}
