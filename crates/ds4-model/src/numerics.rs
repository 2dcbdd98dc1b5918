//! The numerics switch and the quantization round trips that DeepSeek V4 was trained with.
//!
//! `Numerics::Reference` is the math of transformers in f32: what the tiny fixture models check.
//! `Numerics::Ds4` adds what ds4 (and the official inference graph) do on top of it
//! (dsv4-arch.md §6 B1–B7):
//! - an FP8-E4M3 round trip of the non-RoPE channels of every KV row (window and compressed),
//! - a Hadamard-128 rotation and an FP4-E2M1 round trip of indexer queries and keys,
//! - f16 storage of every cached row,
//! - quantized activations for quantized weights (Q8_0 for Q8_0 weights, Q8_K for experts).
//!
//! Every place in the forward pass that differs between the two modes asks this one enum; the
//! round trips themselves are plain functions here, unit-tested against hand-computed values.

use std::fmt;
use std::str::FromStr;

/// Which arithmetic the forward pass follows.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Numerics {
    /// transformers' f32 math: no activation quantization, no KV round trips. Quantized weights
    /// are dequantized and dotted in f32.
    Reference,
    /// ds4's math: FP8 KV, Hadamard + FP4 indexer, f16 cache rows, quantized activations.
    Ds4,
}

impl Numerics {
    /// True when cached rows and activations go through ds4's quantization round trips.
    pub fn simulates_qat(self) -> bool {
        self == Numerics::Ds4
    }

    pub fn name(self) -> &'static str {
        match self {
            Numerics::Reference => "reference",
            Numerics::Ds4 => "ds4",
        }
    }
}

impl fmt::Display for Numerics {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Numerics {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "reference" => Ok(Numerics::Reference),
            "ds4" => Ok(Numerics::Ds4),
            other => Err(format!(
                "unknown numerics mode `{other}` (expected `reference` or `ds4`)"
            )),
        }
    }
}

/// Largest finite E4M3FN magnitude.
pub const FP8_E4M3_MAX: f32 = 448.0;
/// Width of the FP8 scaling blocks of a KV row.
pub const FP8_BLOCK: usize = 64;
/// Smallest amax used to derive an FP8 block scale (an all-zero block keeps a finite scale).
pub const FP8_AMAX_FLOOR: f32 = 1e-4;
/// Largest E2M1 magnitude.
pub const FP4_E2M1_MAX: f32 = 6.0;
/// Width of the FP4 scaling blocks of an indexer vector.
pub const FP4_BLOCK: usize = 32;
/// Smallest amax used to derive an FP4 block scale.
pub const FP4_AMAX_FLOOR: f32 = 7.05e-38;

/// The power-of-two block scale 2^ceil(log2(max(amax, floor) / max_code)), as ds4 computes it
/// (ue8m0 scales: the block maximum lands at or just below the largest code).
fn pow2_scale(amax: f32, floor: f32, max_code: f32) -> f32 {
    (amax.max(floor) / max_code).log2().ceil().exp2()
}

/// Round `x / step` to the nearest integer, ties to even, and multiply back. `step` is a power
/// of two, so the division and multiplication are exact.
fn round_to_step_ties_even(x: f32, step: f32) -> f32 {
    (x / step).round_ties_even() * step
}

/// The E4M3FN value nearest to `x` (|x| ≤ 448), ties to the even code.
///
/// E4M3FN: exponent bias 7, 3 mantissa bits, smallest normal 2^-6, subnormal step 2^-9. Within
/// a binade [2^e, 2^(e+1)) the codes are spaced 2^(e-3) apart and the code parity equals the
/// parity of value/step, so rounding value/step half-to-even is rounding to the even code.
pub fn fp8_e4m3_nearest(x: f32) -> f32 {
    let a = x.abs();
    if a == 0.0 || a.is_nan() {
        return x;
    }
    let step = if a < 2f32.powi(-6) {
        2f32.powi(-9)
    } else {
        // floor(log2 a) read from the exponent bits: exact for every normal f32.
        let e = ((a.to_bits() >> 23) & 0xff) as i32 - 127;
        2f32.powi(e - 3)
    };
    round_to_step_ties_even(x, step).clamp(-FP8_E4M3_MAX, FP8_E4M3_MAX)
}

/// ds4's FP8 KV simulation of one row, in place: the first `nope` channels in blocks of 64
/// (the last block may be shorter), each scaled by its power-of-two scale, rounded to E4M3
/// and scaled back. The RoPE tail (channels `nope..`) is left untouched.
pub fn fp8_e4m3_round_trip_row(row: &mut [f32], nope: usize) {
    for block in row[..nope].chunks_mut(FP8_BLOCK) {
        let amax = block.iter().fold(0f32, |m, v| m.max(v.abs()));
        let scale = pow2_scale(amax, FP8_AMAX_FLOOR, FP8_E4M3_MAX);
        for v in block.iter_mut() {
            let q = fp8_e4m3_nearest((*v / scale).clamp(-FP8_E4M3_MAX, FP8_E4M3_MAX));
            *v = q * scale;
        }
    }
}

/// The E2M1 grid, by code (the sign is a separate bit).
const E2M1_GRID: [f32; 8] = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0];

/// The E2M1 value nearest to `x` (|x| ≤ 6), ties to the even code.
pub fn fp4_e2m1_nearest(x: f32) -> f32 {
    let a = x.abs();
    let mut best = 0usize;
    for (code, &v) in E2M1_GRID.iter().enumerate().skip(1) {
        let d_new = (a - v).abs();
        let d_best = (a - E2M1_GRID[best]).abs();
        // Strictly closer wins; on an exact tie the even code wins.
        if d_new < d_best || (d_new == d_best && code.is_multiple_of(2)) {
            best = code;
        }
    }
    E2M1_GRID[best].copysign(x)
}

/// ds4's FP4 simulation of one indexer vector, in place: blocks of 32 (the last may be
/// shorter), power-of-two scale, E2M1 rounding, scaled back.
pub fn fp4_e2m1_round_trip(row: &mut [f32]) {
    for block in row.chunks_mut(FP4_BLOCK) {
        let amax = block.iter().fold(0f32, |m, v| m.max(v.abs()));
        let scale = pow2_scale(amax, FP4_AMAX_FLOOR, FP4_E2M1_MAX);
        for v in block.iter_mut() {
            let q = fp4_e2m1_nearest((*v / scale).clamp(-FP4_E2M1_MAX, FP4_E2M1_MAX));
            *v = q * scale;
        }
    }
}

/// Walsh–Hadamard transform in Sylvester order (unnormalized butterflies), then × 1/sqrt(n).
/// The length must be a power of two; ds4 uses n = 128 (the indexer head width).
pub fn hadamard_rotate(x: &mut [f32]) {
    let n = x.len();
    assert!(
        n.is_power_of_two(),
        "Hadamard length {n} is not a power of two"
    );
    let mut h = 1;
    while h < n {
        for block in x.chunks_mut(2 * h) {
            let (lo, hi) = block.split_at_mut(h);
            for (a, b) in lo.iter_mut().zip(hi.iter_mut()) {
                let (u, v) = (*a, *b);
                *a = u + v;
                *b = u - v;
            }
        }
        h *= 2;
    }
    let s = 1.0 / (n as f32).sqrt();
    for v in x.iter_mut() {
        *v *= s;
    }
}

/// Round a value through f16 storage (round to nearest even), as ds4's caches store rows.
pub fn f16_round(x: f32) -> f32 {
    half::f16::from_f32(x).to_f32()
}

/// Round every value of a row through f16 storage.
pub fn f16_round_row(row: &mut [f32]) {
    for v in row.iter_mut() {
        *v = f16_round(*v);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn e4m3_rounds_to_hand_computed_codes() {
        // Normal range: 1.0625 lies halfway between 1.0 (mantissa 0) and 1.125 (mantissa 1).
        assert_eq!(fp8_e4m3_nearest(1.0625), 1.0);
        // 1.1875 lies halfway between 1.125 (odd) and 1.25 (even).
        assert_eq!(fp8_e4m3_nearest(1.1875), 1.25);
        assert_eq!(fp8_e4m3_nearest(1.2), 1.25);
        assert_eq!(fp8_e4m3_nearest(-3.3), -3.25);
        // Binade [256, 512): step 32; 432 is halfway between 416 (m=5) and 448 (m=6, even).
        assert_eq!(fp8_e4m3_nearest(432.0), 448.0);
        assert_eq!(fp8_e4m3_nearest(448.0), 448.0);
        // Rounding up across a binade: 15.5 is halfway between 15 (m=7) and 16 (m=0).
        assert_eq!(fp8_e4m3_nearest(15.5), 16.0);
        // Subnormals: step 2^-9. 3.5·2^-9 ties to 4·2^-9 (even); 2.5·2^-9 ties to 2·2^-9.
        let s = 2f32.powi(-9);
        assert_eq!(fp8_e4m3_nearest(3.5 * s), 4.0 * s);
        assert_eq!(fp8_e4m3_nearest(2.5 * s), 2.0 * s);
        assert_eq!(fp8_e4m3_nearest(0.4 * s), 0.0);
        // Smallest normal.
        assert_eq!(fp8_e4m3_nearest(2f32.powi(-6)), 2f32.powi(-6));
    }

    #[test]
    fn fp8_row_round_trip_matches_hand_computation() {
        // One block: amax 3.0 → 3/448 = 0.0067 → log2 = -7.22 → ceil -7 → scale 2^-7.
        // 1.0/2^-7 = 128 (exact code); 3.0/2^-7 = 384 (exact: 1.5·2^8);
        // 0.3/2^-7 = 38.4 → binade [32,64) step 4 → 40 → 0.3125;
        // -2.9/2^-7 = -371.2 → binade [256,512) step 32 → -384 → -3.0.
        let mut row = vec![1.0, 3.0, 0.3, -2.9, 7.0, 9.0];
        fp8_e4m3_round_trip_row(&mut row, 4);
        assert_eq!(row, vec![1.0, 3.0, 0.3125, -3.0, 7.0, 9.0]);
        // The tail (rope channels) is untouched even when it would round.
        let mut row = vec![0.0f32; 70];
        row[69] = 0.123_456;
        fp8_e4m3_round_trip_row(&mut row, 64);
        assert_eq!(row[69], 0.123_456);
        assert!(row[..64].iter().all(|&v| v == 0.0));
    }

    #[test]
    fn fp8_blocks_are_scaled_independently() {
        // Block 0 has amax 448 (scale 1), block 1 amax 0.01 (scale 2^-15: 0.01/448 = 2.2e-5,
        // log2 = -15.45, ceil -15).
        let mut row = vec![0.0f32; 128];
        row[0] = 448.0;
        row[1] = 0.01; // in block 0 with scale 1: subnormal grid 2^-9 → 5.12 steps → 5·2^-9
        row[64] = 0.01;
        fp8_e4m3_round_trip_row(&mut row, 128);
        assert_eq!(row[0], 448.0);
        assert_eq!(row[1], 5.0 * 2f32.powi(-9));
        // 0.01 / 2^-15 = 327.68 → binade [256,512) step 32 → 320 → 320·2^-15.
        assert_eq!(row[64], 320.0 * 2f32.powi(-15));
    }

    #[test]
    fn e2m1_rounds_to_hand_computed_codes() {
        let cases = [
            (0.25, 0.0),
            (0.26, 0.5),
            (0.75, 1.0),
            (1.25, 1.0),
            (1.75, 2.0),
            (2.5, 2.0),
            (3.5, 4.0),
            (5.0, 4.0),
            (5.1, 6.0),
            (6.0, 6.0),
            (-2.6, -3.0),
        ];
        for (x, want) in cases {
            assert_eq!(fp4_e2m1_nearest(x), want, "x = {x}");
        }
    }

    #[test]
    fn fp4_round_trip_matches_hand_computation() {
        // amax 1.0 → 1/6 → log2 -2.58 → ceil -2 → scale 0.25. Values /0.25: 4, 1.2, -2.6, 0.5
        // → 4, 1.0, -3, 0.5 → ×0.25.
        let mut row = vec![1.0, 0.3, -0.65, 0.125];
        fp4_e2m1_round_trip(&mut row);
        assert_eq!(row, vec![1.0, 0.25, -0.75, 0.125]);
        // Second block scaled on its own: 33 values, the last alone in its block → exact code 6·s.
        let mut row = vec![0.0f32; 33];
        row[0] = 100.0;
        row[32] = 0.001;
        fp4_e2m1_round_trip(&mut row);
        // 100/6 = 16.7 → scale 32 → 100/32 = 3.125 → 3 → 96.
        assert_eq!(row[0], 96.0);
        // 0.001/6 → log2 = -12.55 → scale 2^-12; 0.001·4096 = 4.096 → 4 → 4·2^-12.
        assert_eq!(row[32], 4.0 * 2f32.powi(-12));
    }

    #[test]
    fn hadamard_matches_the_matrix_and_is_orthonormal() {
        let n = 8;
        let x: Vec<f32> = (0..n).map(|i| (i as f32 * 0.7).sin()).collect();
        let mut y = x.clone();
        hadamard_rotate(&mut y);
        // Sylvester H[i][j] = (-1)^popcount(i & j).
        for (i, yi) in y.iter().enumerate() {
            let mut s = 0f32;
            for (j, xj) in x.iter().enumerate() {
                let sign = if (i & j).count_ones() % 2 == 0 {
                    1.0
                } else {
                    -1.0
                };
                s += sign * xj;
            }
            assert!((yi - s / (n as f32).sqrt()).abs() < 1e-6);
        }
        // Orthonormal: applying twice is the identity; dot products are preserved.
        let mut z = y.clone();
        hadamard_rotate(&mut z);
        for (a, b) in z.iter().zip(&x) {
            assert!((a - b).abs() < 1e-6);
        }
        let mut e = vec![0f32; 128];
        e[0] = 1.0;
        hadamard_rotate(&mut e);
        assert!(e.iter().all(|&v| (v - 1.0 / 128f32.sqrt()).abs() < 1e-7));
    }

    #[test]
    fn f16_rounding_and_mode_parsing() {
        assert_eq!(f16_round(1.0 + 1.0 / 4096.0), 1.0);
        assert_eq!(f16_round(65504.0), 65504.0);
        assert_eq!("ds4".parse::<Numerics>(), Ok(Numerics::Ds4));
        assert_eq!("reference".parse::<Numerics>(), Ok(Numerics::Reference));
        assert!("fast".parse::<Numerics>().is_err());
    }
}
