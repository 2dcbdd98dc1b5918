//! IQ2_XXS: 256 elements in 66 bytes (2.06 bits per weight): `f16 d`, then 8 sub-blocks of 32
//! elements, each two little-endian u32 words:
//! - `a0`: four 8-bit indices into the 256-point codebook [`GRID`] (one per group of 8);
//! - `a1`: four 7-bit sign indices (bits 7·l..7·l+7) and a 4-bit scale `s` (bits 28..32).
//!
//! Element j of group l is `d·(0.5 + s)/4 · GRID[idx_l][j] · (−1 if bit j of KSIGNS[sign_l])`.
//! Only 7 sign bits are stored: the eighth is implied, because a valid pattern always has an
//! even number of minus signs.

use super::float::{f16_to_f32, f32_to_f16, read_u16, read_u32};
use super::q8_k::BlockQ8K;

pub const BLOCK_ELEMS: usize = 256;
pub const BLOCK_BYTES: usize = 66;

/// The three magnitudes a codebook coordinate can take.
const COORD_VALUES: [u8; 3] = [0x08, 0x19, 0x2b];

/// The IQ2_XXS codebook (ggml's `iq2xxs_grid`): 256 points of 8 coordinates, coordinate j as
/// 2 bits at bits 2j..2j+2, each an index into [`COORD_VALUES`]. Checked against gguf-py's
/// table by the dequantize fixtures (scripts/gguf/make_quant_fixtures.py).
const GRID_PACKED: [u16; 256] = [
    0x0000, 0x0002, 0x0005, 0x0008, 0x000a, 0x0011, 0x0014, 0x0020, 0x0022, 0x0028, 0x002a, 0x0041,
    0x0044, 0x0050, 0x0058, 0x0061, 0x0064, 0x0080, 0x0082, 0x008a, 0x00a2, 0x0101, 0x0104, 0x0110,
    0x0115, 0x0140, 0x0184, 0x0198, 0x0200, 0x0202, 0x0222, 0x0282, 0x0401, 0x0404, 0x0410, 0x0421,
    0x0424, 0x0440, 0x0442, 0x0448, 0x0460, 0x0481, 0x0484, 0x0490, 0x04a4, 0x0500, 0x0502, 0x0508,
    0x0520, 0x0546, 0x0569, 0x0580, 0x0591, 0x0609, 0x0610, 0x0640, 0x0684, 0x06a4, 0x0800, 0x0805,
    0x0808, 0x0814, 0x0828, 0x0841, 0x0844, 0x0850, 0x0852, 0x0888, 0x0904, 0x0940, 0x0a02, 0x0a14,
    0x1001, 0x1004, 0x1010, 0x1021, 0x1040, 0x1060, 0x1084, 0x1090, 0x1095, 0x1100, 0x1108, 0x1120,
    0x1150, 0x115a, 0x1180, 0x1224, 0x1245, 0x1400, 0x1408, 0x1420, 0x1425, 0x1449, 0x1480, 0x1518,
    0x1562, 0x1600, 0x1616, 0x1801, 0x1804, 0x1810, 0x1840, 0x1881, 0x1900, 0x1905, 0x19a0, 0x1a51,
    0x2000, 0x2002, 0x200a, 0x2044, 0x2061, 0x2080, 0x2082, 0x2129, 0x2148, 0x2200, 0x2202, 0x2401,
    0x2404, 0x2410, 0x2440, 0x2456, 0x2500, 0x2541, 0x2564, 0x2690, 0x2808, 0x2820, 0x2894, 0x2a44,
    0x4001, 0x4004, 0x4010, 0x4018, 0x4021, 0x4024, 0x4040, 0x4048, 0x4056, 0x4060, 0x4081, 0x4084,
    0x4090, 0x4100, 0x4120, 0x4161, 0x4180, 0x4185, 0x4201, 0x4210, 0x4248, 0x4256, 0x4268, 0x4400,
    0x4408, 0x4420, 0x4480, 0x4499, 0x4512, 0x4524, 0x4600, 0x4801, 0x4804, 0x4810, 0x4840, 0x4845,
    0x4900, 0x4958, 0x4961, 0x4982, 0x4a45, 0x4a90, 0x5000, 0x5008, 0x5011, 0x5019, 0x5020, 0x5080,
    0x5088, 0x5104, 0x5142, 0x51a4, 0x5291, 0x5490, 0x5492, 0x550a, 0x5601, 0x5654, 0x5800, 0x5811,
    0x5819, 0x5864, 0x5940, 0x5a08, 0x6004, 0x6010, 0x6040, 0x6068, 0x6100, 0x6155, 0x6218, 0x6260,
    0x6400, 0x6405, 0x6510, 0x6512, 0x6584, 0x6842, 0x8000, 0x8002, 0x800a, 0x8041, 0x8082, 0x8104,
    0x8118, 0x8140, 0x8211, 0x8401, 0x8404, 0x8410, 0x8415, 0x8440, 0x8460, 0x8500, 0x8546, 0x8594,
    0x8609, 0x8640, 0x8660, 0x8802, 0x8904, 0x8a11, 0x9004, 0x9010, 0x9024, 0x9040, 0x90a1, 0x9116,
    0x9180, 0x9245, 0x9400, 0x9422, 0x9444, 0x9551, 0x9881, 0x9920, 0xa002, 0xa050, 0xa085, 0xa109,
    0xa200, 0xa418, 0xa850, 0xa904,
];

const fn expand_grid() -> [u64; 256] {
    let mut out = [0u64; 256];
    let mut k = 0;
    while k < 256 {
        let mut j = 0;
        while j < 8 {
            let c = (GRID_PACKED[k] >> (2 * j)) & 3;
            out[k] |= (COORD_VALUES[c as usize] as u64) << (8 * j);
            j += 1;
        }
        k += 1;
    }
    out
}

/// The codebook with coordinate j in byte j (values 8, 25 or 43), the form the kernels load.
pub const GRID: [u64; 256] = expand_grid();

const fn make_ksigns() -> [u8; 128] {
    let mut out = [0u8; 128];
    let mut i = 0;
    while i < 128 {
        out[i] = i as u8 | (((i as u32).count_ones() as u8 & 1) << 7);
        i += 1;
    }
    out
}

/// ggml's `ksigns_iq2xs`: a 7-bit index plus the parity bit that makes the number of set
/// (minus) bits even.
pub const KSIGNS: [u8; 128] = make_ksigns();

const fn make_sign_bytes() -> [u64; 128] {
    let mut out = [0u64; 128];
    let mut i = 0;
    while i < 128 {
        let mut j = 0;
        while j < 8 {
            let byte: u64 = if (KSIGNS[i] >> j) & 1 == 1 {
                0xff
            } else {
                0x01
            };
            out[i] |= byte << (8 * j);
            j += 1;
        }
        i += 1;
    }
    out
}

/// Each sign pattern as 8 bytes of +1 (0x01) or −1 (0xff), for a byte-wise sign multiply.
pub(crate) const SIGN_BYTES: [u64; 128] = make_sign_bytes();

#[inline]
fn coord(k: usize, j: usize) -> u8 {
    (GRID[k] >> (8 * j)) as u8
}

pub(crate) fn dequantize(src: &[u8], dst: &mut [f32]) {
    for (blk, out) in src
        .chunks_exact(BLOCK_BYTES)
        .zip(dst.chunks_exact_mut(BLOCK_ELEMS))
    {
        let d = f16_to_f32(read_u16(blk, 0));
        for (ib, out) in out.chunks_exact_mut(32).enumerate() {
            let a0 = read_u32(blk, 2 + 8 * ib);
            let a1 = read_u32(blk, 6 + 8 * ib);
            let db = d * (0.5 + (a1 >> 28) as f32) * 0.25;
            for (l, out) in out.chunks_exact_mut(8).enumerate() {
                let k = ((a0 >> (8 * l)) & 0xff) as usize;
                let signs = KSIGNS[((a1 >> (7 * l)) & 127) as usize];
                for (j, v) in out.iter_mut().enumerate() {
                    let mag = db * coord(k, j) as f32;
                    *v = if (signs >> j) & 1 == 1 { -mag } else { mag };
                }
            }
        }
    }
}

const fn coordinate_major() -> [[f32; 256]; 8] {
    let mut out = [[0f32; 256]; 8];
    let mut k = 0;
    while k < 256 {
        let mut j = 0;
        while j < 8 {
            out[j][k] = ((GRID[k] >> (8 * j)) & 0xff) as u8 as f32;
            j += 1;
        }
        k += 1;
    }
    out
}

/// The codebook by coordinate: `COORD_BY_J[j][k]` = coordinate j of point k, so loops over
/// the 256 points vectorize.
static COORD_BY_J: [[f32; 256]; 8] = coordinate_major();

const fn squared_norms() -> [f32; 256] {
    let grid = coordinate_major();
    let mut out = [0f32; 256];
    let mut k = 0;
    while k < 256 {
        let mut j = 0;
        while j < 8 {
            out[k] += grid[j][k] * grid[j][k];
            j += 1;
        }
        k += 1;
    }
    out
}

/// Σ_j coord_j² of every codebook point.
static SQUARED_NORMS: [f32; 256] = squared_norms();

/// What the search needs of one group of 8 values, independent of the step `u`: with
/// a = |x|, the error of point k at step u is Σa² − 2u·(a·g_k) + u²·|g_k|², plus, when x has an
/// odd number of negatives, 4u·min_j(g_kj·a_j) for the one sign that must be flipped
/// ((a + u·g)² − (a − u·g)² = 4·u·g·a).
struct GroupFit {
    abs: [f32; 8],
    sum_sq: f32,
    negatives: u8,
    odd: bool,
    dot: [f32; 256],
    min_flip: [f32; 256],
}

impl GroupFit {
    fn new(x: &[f32]) -> Self {
        let mut fit = GroupFit {
            abs: [0.0; 8],
            sum_sq: 0.0,
            negatives: 0,
            odd: false,
            dot: [0.0; 256],
            min_flip: [f32::INFINITY; 256],
        };
        for (j, &v) in x.iter().enumerate() {
            fit.abs[j] = v.abs();
            fit.sum_sq += v * v;
            if v < 0.0 {
                fit.negatives |= 1 << j;
            }
        }
        fit.odd = fit.negatives.count_ones() % 2 == 1;
        for (j, coords) in COORD_BY_J.iter().enumerate() {
            let a = fit.abs[j];
            for ((d, m), &g) in fit.dot.iter_mut().zip(fit.min_flip.iter_mut()).zip(coords) {
                *d += a * g;
                *m = m.min(a * g);
            }
        }
        fit
    }

    /// (squared error, point index) of the best point at step `u`.
    fn best(&self, u: f32) -> (f32, u8) {
        let flip = if self.odd { 4.0 * u } else { 0.0 };
        let mut best = (f32::INFINITY, 0u8);
        for (k, ((&n, &d), &m)) in SQUARED_NORMS
            .iter()
            .zip(&self.dot)
            .zip(&self.min_flip)
            .enumerate()
        {
            let err = u * u * n - 2.0 * u * d + flip * m;
            if err < best.0 {
                best = (err, k as u8);
            }
        }
        (self.sum_sq + best.0, best.1)
    }

    /// The sign bits for point `k`: x's own signs, with the cheapest one flipped when their
    /// count is odd, so that the count is even as the format requires.
    fn signs(&self, k: u8) -> u8 {
        if !self.odd {
            return self.negatives;
        }
        let cost = |j: usize| self.abs[j] * COORD_BY_J[j][k as usize];
        let j = (0..8)
            .min_by(|&i, &j| cost(i).total_cmp(&cost(j)))
            .unwrap_or(0);
        self.negatives ^ (1 << j)
    }
}

/// Squared error and encoding of one sub-block (4 groups) at step `u`: the point indices and
/// the 7-bit sign indices of its groups.
fn encode_sub_block(fits: &[GroupFit], u: f32) -> (f32, [u8; 4], [u8; 4]) {
    let (mut err, mut idx, mut signs) = (0.0f32, [0u8; 4], [0u8; 4]);
    for (l, fit) in fits.iter().enumerate() {
        let (e, k) = fit.best(u);
        err += e;
        idx[l] = k;
        signs[l] = fit.signs(k) & 127;
    }
    (err, idx, signs)
}

/// Squared error only (the search's inner loop).
fn sub_block_error(fits: &[GroupFit], u: f32) -> f32 {
    fits.iter().map(|f| f.best(u).0).sum()
}

/// A simple-search IQ2_XXS quantizer (no importance matrix): per sub-block, the best step
/// among a few candidates; then one f16 super-scale `d` and per sub-block the best of the
/// 4-bit scales next to the ideal step; per group of 8 the exhaustively best codebook point
/// and sign pattern (with the even-parity constraint). Always writes valid blocks.
pub(crate) fn quantize(src: &[f32], dst: &mut [u8]) {
    for (x, blk) in src
        .chunks_exact(BLOCK_ELEMS)
        .zip(dst.chunks_exact_mut(BLOCK_BYTES))
    {
        let fits: Vec<GroupFit> = x.chunks_exact(8).map(GroupFit::new).collect();
        let mut steps = [0f32; 8];
        for (ib, sub) in x.chunks_exact(32).enumerate() {
            let amax = sub.iter().fold(0.0f32, |m, v| m.max(v.abs()));
            if amax == 0.0 {
                continue;
            }
            let mut best = f32::INFINITY;
            // Map the largest magnitude near each codebook level, and a bit beyond (clipping).
            for t in [
                20.0f32, 25.0, 28.0, 31.0, 34.0, 37.0, 40.0, 43.0, 47.0, 52.0,
            ] {
                let u = amax / t;
                let err = sub_block_error(&fits[4 * ib..4 * ib + 4], u);
                if err < best {
                    best = err;
                    steps[ib] = u;
                }
            }
        }
        // The largest step uses the largest 4-bit scale: u = d·(0.5 + 15)/4.
        let max_step = steps.iter().fold(0.0f32, |m, &u| m.max(u));
        let d_bits = f32_to_f16(max_step / 3.875);
        let d = f16_to_f32(d_bits);
        blk.fill(0);
        blk[0..2].copy_from_slice(&d_bits.to_le_bytes());
        if d == 0.0 {
            continue;
        }
        for ib in 0..8 {
            let ideal = (steps[ib] / (0.25 * d) - 0.5).round().clamp(0.0, 15.0) as u32;
            let mut best = (f32::INFINITY, 0u32, [0u8; 4], [0u8; 4]);
            for s in ideal.saturating_sub(1)..=(ideal + 1).min(15) {
                let u = d * (0.5 + s as f32) * 0.25;
                let (err, idx, signs) = encode_sub_block(&fits[4 * ib..4 * ib + 4], u);
                if err < best.0 {
                    best = (err, s, idx, signs);
                }
            }
            let (_, s, idx, signs) = best;
            let a0 = u32::from_le_bytes(idx);
            let a1 = signs[0] as u32
                | (signs[1] as u32) << 7
                | (signs[2] as u32) << 14
                | (signs[3] as u32) << 21
                | s << 28;
            blk[2 + 8 * ib..6 + 8 * ib].copy_from_slice(&a0.to_le_bytes());
            blk[6 + 8 * ib..10 + 8 * ib].copy_from_slice(&a1.to_le_bytes());
        }
    }
}

/// Scalar reference dot product of one IQ2_XXS row with Q8_K activations: per block the exact
/// integer sum Σ (2s+1)·Σ coord·sign·q, scaled by d·d_x and summed in order in f32, times 1/8
/// (since (0.5 + s)/4 = (2s + 1)/8).
///
/// # Panics
/// If `row.len() != act.len() * 66`.
pub fn vec_dot_scalar(row: &[u8], act: &[BlockQ8K]) -> f32 {
    assert_eq!(
        row.len(),
        act.len() * BLOCK_BYTES,
        "IQ2_XXS row/activation size mismatch"
    );
    let mut sum = 0.0f32;
    for (blk, a) in row.chunks_exact(BLOCK_BYTES).zip(act) {
        let mut bsum = 0i32;
        for ib in 0..8 {
            let a0 = read_u32(blk, 2 + 8 * ib);
            let a1 = read_u32(blk, 6 + 8 * ib);
            let mut sumi = 0i32;
            for l in 0..4 {
                let k = ((a0 >> (8 * l)) & 0xff) as usize;
                let signs = KSIGNS[((a1 >> (7 * l)) & 127) as usize];
                for j in 0..8 {
                    let p = coord(k, j) as i32 * a.qs[32 * ib + 8 * l + j] as i32;
                    sumi += if (signs >> j) & 1 == 1 { -p } else { p };
                }
            }
            bsum += sumi * (2 * (a1 >> 28) as i32 + 1);
        }
        sum += f16_to_f32(read_u16(blk, 0)) * a.d * bsum as f32;
    }
    0.125 * sum
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tables_are_consistent() {
        // Every sign pattern has an even number of minus signs and its low 7 bits are the index.
        for (i, &s) in KSIGNS.iter().enumerate() {
            assert_eq!(s.count_ones() % 2, 0);
            assert_eq!((s & 127) as usize, i);
        }
        // The codebook points are distinct and use only the three magnitudes.
        let mut seen = std::collections::HashSet::new();
        for g in GRID {
            assert!(seen.insert(g));
            for j in 0..8 {
                assert!(COORD_VALUES.contains(&((g >> (8 * j)) as u8)));
            }
        }
    }
}
