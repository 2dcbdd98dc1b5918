//! The KV compressors: every `m` tokens, a gated per-channel softmax pools the window's
//! projected rows into one compressed row (dsv4-arch.md §3.6–3.7).
//!
//! HCA (no overlap): row w pools tokens [w·m, (w+1)·m). CSA (overlap): the projections are 2D
//! wide, and row w pools the previous window's first half (A) and the current window's second
//! half (B) — 2m slots per channel; for w = 0 the A slots are empty.
//!
//! The frontier state follows ds4's layout, so it can be saved as ds4 saves it (ds4-spec §3):
//! `kv` and `score` are `coff·m` rows of `coff·D` (coff = 2 with overlap, else 1). With overlap,
//! rows [0, m) hold the previous window and rows [m, 2m) the current one; without, rows [0, m)
//! hold the current window. Scores already include the slot bias (`ape`); empty slots hold
//! value 0 and score −1e30, so they get zero weight.

/// Score of an empty slot: exp(−1e30 − max) is exactly 0.
pub const EMPTY_SCORE: f32 = -1e30;

/// The open window(s) of one compressor.
#[derive(Clone, Debug, PartialEq)]
pub struct CompressorFrontier {
    ratio: usize,
    width: usize,
    overlap: bool,
    kv: Vec<f32>,
    score: Vec<f32>,
}

impl CompressorFrontier {
    /// A frontier for rate `ratio` producing rows of `width` channels.
    pub fn new(ratio: usize, width: usize, overlap: bool) -> CompressorFrontier {
        let coff = if overlap { 2 } else { 1 };
        let n = coff * ratio * coff * width;
        CompressorFrontier {
            ratio,
            width,
            overlap,
            kv: vec![0.0; n],
            score: vec![EMPTY_SCORE; n],
        }
    }

    fn coff(&self) -> usize {
        if self.overlap {
            2
        } else {
            1
        }
    }

    /// Width of the per-token projections this compressor consumes (c·D).
    pub fn input_width(&self) -> usize {
        self.coff() * self.width
    }

    /// The state values and scores (ds4's `state_kv`, `state_score`), row-major.
    pub fn state(&self) -> (&[f32], &[f32]) {
        (&self.kv, &self.score)
    }

    /// Replaces the state (same sizes as [`CompressorFrontier::state`]); false if they differ.
    pub fn set_state(&mut self, kv: &[f32], score: &[f32]) -> bool {
        if kv.len() != self.kv.len() || score.len() != self.score.len() {
            return false;
        }
        self.kv.copy_from_slice(kv);
        self.score.copy_from_slice(score);
        true
    }

    pub fn reset(&mut self) {
        self.kv.fill(0.0);
        self.score.fill(EMPTY_SCORE);
    }

    /// Adds the token at `pos` (its projections `kv` and `gate`, each c·D wide; `ape` is the
    /// m × c·D slot bias). When the token closes a window, returns the pooled (not yet
    /// normalized) row of width D.
    pub fn push(&mut self, pos: usize, kv: &[f32], gate: &[f32], ape: &[f32]) -> Option<Vec<f32>> {
        let w = self.input_width();
        let m = self.ratio;
        let slot = pos % m;
        let row = (self.coff() - 1) * m + slot;
        self.kv[row * w..(row + 1) * w].copy_from_slice(kv);
        let bias = &ape[slot * w..(slot + 1) * w];
        for ((s, g), b) in self.score[row * w..(row + 1) * w]
            .iter_mut()
            .zip(gate)
            .zip(bias)
        {
            *s = g + b;
        }
        if !(pos + 1).is_multiple_of(m) {
            return None;
        }
        let pooled = self.pool();
        self.advance();
        Some(pooled)
    }

    /// Per-channel softmax over the window's slots, weighted sum of the values.
    fn pool(&self) -> Vec<f32> {
        let (m, d, w) = (self.ratio, self.width, self.input_width());
        // (row, column offset) of each slot of channel c.
        let slots: Vec<(usize, usize)> = if self.overlap {
            (0..m)
                .map(|r| (r, 0))
                .chain((m..2 * m).map(|r| (r, d)))
                .collect()
        } else {
            (0..m).map(|r| (r, 0)).collect()
        };
        let mut out = vec![0f32; d];
        for (c, o) in out.iter_mut().enumerate() {
            let mx = slots
                .iter()
                .map(|&(r, off)| self.score[r * w + off + c])
                .fold(f32::NEG_INFINITY, f32::max);
            let mut sum = 0f32;
            let mut acc = 0f32;
            for &(r, off) in &slots {
                let e = (self.score[r * w + off + c] - mx).exp();
                sum += e;
                acc += e * self.kv[r * w + off + c];
            }
            *o = acc / sum;
        }
        out
    }

    /// After a pool: the current window becomes the previous one (overlap), and the current
    /// slots are emptied.
    fn advance(&mut self) {
        let (m, w) = (self.ratio, self.input_width());
        if self.overlap {
            self.kv.copy_within(m * w..2 * m * w, 0);
            self.score.copy_within(m * w..2 * m * w, 0);
            self.kv[m * w..].fill(0.0);
            self.score[m * w..].fill(EMPTY_SCORE);
        } else {
            self.reset();
        }
    }
}

/// The compressed rows a layer has emitted so far, `width` floats each.
#[derive(Clone, Debug, PartialEq)]
pub struct CompressedRows {
    width: usize,
    capacity: usize,
    data: Vec<f32>,
}

impl CompressedRows {
    /// An empty list that may grow to `capacity` rows (memory is taken as rows arrive, or up
    /// front with [`CompressedRows::reserve`]).
    pub fn with_capacity(width: usize, capacity: usize) -> CompressedRows {
        CompressedRows {
            width,
            capacity,
            data: Vec::new(),
        }
    }

    /// Reserves memory for the whole capacity; an error (not an abort) when it cannot.
    pub fn reserve(&mut self) -> Result<(), std::collections::TryReserveError> {
        let want = self.capacity.saturating_mul(self.width);
        self.data
            .try_reserve_exact(want.saturating_sub(self.data.len()))
    }

    pub fn len(&self) -> usize {
        self.data.len() / self.width
    }

    pub fn is_empty(&self) -> bool {
        self.data.is_empty()
    }

    pub fn capacity(&self) -> usize {
        self.capacity
    }

    pub fn width(&self) -> usize {
        self.width
    }

    pub fn row(&self, i: usize) -> &[f32] {
        &self.data[i * self.width..(i + 1) * self.width]
    }

    /// All rows, row-major.
    pub fn as_slice(&self) -> &[f32] {
        &self.data
    }

    /// Appends a row; false (and nothing appended) when the capacity is reached.
    pub fn push(&mut self, row: &[f32]) -> bool {
        if self.len() >= self.capacity {
            return false;
        }
        self.data.extend_from_slice(row);
        true
    }

    pub fn truncate(&mut self, n: usize) {
        self.data.truncate(n * self.width);
    }

    pub fn clear(&mut self) {
        self.data.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn val(t: usize, c: usize) -> f32 {
        ((t * 31 + c * 7) as f32 * 0.13).sin()
    }
    fn gate(t: usize, c: usize) -> f32 {
        ((t * 17 + c * 3) as f32 * 0.29).cos() * 2.0
    }

    /// Direct transcription of dsv4-arch §3.6/3.7 over the whole sequence.
    fn naive_rows(n_tok: usize, m: usize, d: usize, overlap: bool, ape: &[f32]) -> Vec<Vec<f32>> {
        let cw = if overlap { 2 * d } else { d };
        let mut rows = Vec::new();
        for w in 0..n_tok / m {
            let mut row = vec![0f32; d];
            for (c, out) in row.iter_mut().enumerate() {
                // (value, logit) of each slot
                let mut slots: Vec<(f64, f64)> = Vec::new();
                if overlap {
                    for rho in 0..m {
                        if w == 0 {
                            continue; // empty A slots: zero weight
                        }
                        let t = (w - 1) * m + rho;
                        slots.push((val(t, c) as f64, (gate(t, c) + ape[rho * cw + c]) as f64));
                    }
                    for rho in 0..m {
                        let t = w * m + rho;
                        slots.push((
                            val(t, d + c) as f64,
                            (gate(t, d + c) + ape[rho * cw + d + c]) as f64,
                        ));
                    }
                } else {
                    for rho in 0..m {
                        let t = w * m + rho;
                        slots.push((val(t, c) as f64, (gate(t, c) + ape[rho * cw + c]) as f64));
                    }
                }
                let mx = slots.iter().map(|s| s.1).fold(f64::MIN, f64::max);
                let z: f64 = slots.iter().map(|s| (s.1 - mx).exp()).sum();
                *out = (slots.iter().map(|s| (s.1 - mx).exp() * s.0).sum::<f64>() / z) as f32;
            }
            rows.push(row);
        }
        rows
    }

    fn check(m: usize, d: usize, overlap: bool) {
        let cw = if overlap { 2 * d } else { d };
        let ape: Vec<f32> = (0..m * cw).map(|i| (i as f32 * 0.41).sin()).collect();
        let n_tok = 5 * m + m / 2 + 1;
        let mut f = CompressorFrontier::new(m, d, overlap);
        let mut got = Vec::new();
        for t in 0..n_tok {
            let kv: Vec<f32> = (0..cw).map(|c| val(t, c)).collect();
            let g: Vec<f32> = (0..cw).map(|c| gate(t, c)).collect();
            let out = f.push(t, &kv, &g, &ape);
            assert_eq!(
                out.is_some(),
                (t + 1) % m == 0,
                "row emitted when a window closes"
            );
            got.extend(out);
        }
        let want = naive_rows(n_tok, m, d, overlap, &ape);
        assert_eq!(got.len(), want.len());
        for (a, b) in got.iter().zip(&want) {
            for (x, y) in a.iter().zip(b) {
                assert!((x - y).abs() < 1e-5, "{x} vs {y}");
            }
        }
    }

    #[test]
    fn hca_pooling_matches_naive() {
        check(16, 6, false);
        check(1, 3, false);
    }

    #[test]
    fn csa_overlapped_pooling_matches_naive() {
        check(4, 6, true);
        check(3, 5, true);
    }

    #[test]
    fn rows_respect_capacity() {
        let mut r = CompressedRows::with_capacity(2, 1);
        assert!(r.push(&[1.0, 2.0]));
        assert!(!r.push(&[3.0, 4.0]));
        assert_eq!(r.len(), 1);
        assert_eq!(r.row(0), &[1.0, 2.0]);
    }
}
