//! Q2_K: 256 elements in 84 bytes: `u8 scales[16]` (low nibble: sub-block scale, high nibble:
//! sub-block min), `u8 qs[64]` (2-bit levels), `f16 d`, `f16 dmin`.
//!
//! Element `i = 128·h + 32·j + l` (half h, shift j, lane l) has level `(qs[32·h + l] >> 2·j) & 3`
//! and belongs to sub-block `i / 16`; value = d·sc·q − dmin·m.

use super::fit::{fit_scale_offset, quantize_factors, requantize};
use super::float::{f16_to_f32, read_u16};
use super::q8_k::BlockQ8K;

pub const BLOCK_ELEMS: usize = 256;
pub const BLOCK_BYTES: usize = 84;
const QS: usize = 16;
const D: usize = 80;
const DMIN: usize = 82;

/// Level of element `i` (0..256) of a block's `qs`.
#[inline]
fn level(qs: &[u8], i: usize) -> u8 {
    let (h, j, l) = (i / 128, (i % 128) / 32, i % 32);
    (qs[32 * h + l] >> (2 * j)) & 3
}

pub(crate) fn dequantize(src: &[u8], dst: &mut [f32]) {
    for (blk, out) in src
        .chunks_exact(BLOCK_BYTES)
        .zip(dst.chunks_exact_mut(BLOCK_ELEMS))
    {
        let d = f16_to_f32(read_u16(blk, D));
        let dmin = f16_to_f32(read_u16(blk, DMIN));
        // Loops in layout order (half h, shift j, 16-lane run) keep d·sc and dmin·m constant
        // over each inner loop, which the compiler vectorizes.
        for h in 0..2 {
            let qs = &blk[QS + 32 * h..QS + 32 * h + 32];
            for j in 0..4 {
                for run in 0..2 {
                    let first = 128 * h + 32 * j + 16 * run;
                    let sc = blk[first / 16];
                    let dl = d * (sc & 0xF) as f32;
                    let ml = dmin * (sc >> 4) as f32;
                    let lanes = &qs[16 * run..16 * run + 16];
                    for (v, &q) in out[first..first + 16].iter_mut().zip(lanes) {
                        *v = dl * ((q >> (2 * j)) & 3) as f32 - ml;
                    }
                }
            }
        }
    }
}

pub(crate) fn quantize(src: &[f32], dst: &mut [u8]) {
    for (x, blk) in src
        .chunks_exact(BLOCK_ELEMS)
        .zip(dst.chunks_exact_mut(BLOCK_BYTES))
    {
        let mut q = [0u8; BLOCK_ELEMS];
        let mut scales = [0f32; 16];
        let mut offsets = [0f32; 16];
        for s in 0..16 {
            let r = s * 16..s * 16 + 16;
            (scales[s], offsets[s]) = fit_scale_offset(&x[r.clone()], 3, &mut q[r]);
        }
        let (mut sc, mut m) = ([0u8; 16], [0u8; 16]);
        let d_bits = quantize_factors(&scales, 4, &mut sc);
        let dmin_bits = quantize_factors(&offsets, 4, &mut m);
        let (d, dmin) = (f16_to_f32(d_bits), f16_to_f32(dmin_bits));
        for s in 0..16 {
            let r = s * 16..s * 16 + 16;
            requantize(
                &x[r.clone()],
                d * sc[s] as f32,
                dmin * m[s] as f32,
                3,
                &mut q[r],
            );
            blk[s] = sc[s] | (m[s] << 4);
        }
        let qs = &mut blk[QS..QS + 64];
        qs.fill(0);
        for (i, &t) in q.iter().enumerate() {
            let (h, j, l) = (i / 128, (i % 128) / 32, i % 32);
            qs[32 * h + l] |= t << (2 * j);
        }
        blk[D..D + 2].copy_from_slice(&d_bits.to_le_bytes());
        blk[DMIN..DMIN + 2].copy_from_slice(&dmin_bits.to_le_bytes());
    }
}

/// Scalar reference dot product of one Q2_K row with Q8_K activations. Per block the two
/// integer sums (levels·q weighted by scales, and bsums weighted by mins) are exact; then
/// `d_x·d·isum − d_x·dmin·msum` is summed in order in f32.
///
/// # Panics
/// If `row.len() != act.len() * 84`.
pub fn vec_dot_scalar(row: &[u8], act: &[BlockQ8K]) -> f32 {
    assert_eq!(
        row.len(),
        act.len() * BLOCK_BYTES,
        "Q2_K row/activation size mismatch"
    );
    let mut sum = 0.0f32;
    for (blk, a) in row.chunks_exact(BLOCK_BYTES).zip(act) {
        let qs = &blk[QS..QS + 64];
        let msum: i32 = (0..16)
            .map(|s| (blk[s] >> 4) as i32 * a.bsums[s] as i32)
            .sum();
        let mut isum = 0i32;
        for (s, &sc) in blk[..16].iter().enumerate() {
            let part: i32 = (s * 16..s * 16 + 16)
                .map(|i| level(qs, i) as i32 * a.qs[i] as i32)
                .sum();
            isum += (sc & 0xF) as i32 * part;
        }
        let d = a.d * f16_to_f32(read_u16(blk, D));
        let dmin = a.d * f16_to_f32(read_u16(blk, DMIN));
        sum += d * isum as f32 - dmin * msum as f32;
    }
    sum
}
