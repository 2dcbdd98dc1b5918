//! Q4_K: 256 elements in 144 bytes: `f16 d`, `f16 dmin`, `u8 scales[12]` (eight 6-bit scales
//! and eight 6-bit mins, packed as below), `u8 qs[128]` (4-bit levels).
//!
//! Sub-block j (32 elements) has value d·sc_j·q − dmin·m_j. Bytes 32c..32c+32 of `qs` hold
//! sub-block 2c in their low nibbles and sub-block 2c+1 in their high nibbles.
//!
//! Scale packing, for k in 0..4: `scales[k]` = sc_k | (sc_{k+4} >> 4) << 6,
//! `scales[k+4]` = m_k | (m_{k+4} >> 4) << 6, `scales[k+8]` = (sc_{k+4} & 15) | (m_{k+4} & 15) << 4.

use super::fit::{fit_scale_offset, quantize_factors, requantize};
use super::float::{f16_to_f32, read_u16};
use super::q8_k::BlockQ8K;

pub const BLOCK_ELEMS: usize = 256;
pub const BLOCK_BYTES: usize = 144;
const SCALES: usize = 4;
const QS: usize = 16;

/// The eight 6-bit scales and mins of a block's 12 packed scale bytes (block bytes 4..16).
///
/// # Panics
/// If `s.len() < 12`.
#[inline]
pub fn unpack_scales(s: &[u8]) -> ([u8; 8], [u8; 8]) {
    let (mut sc, mut m) = ([0u8; 8], [0u8; 8]);
    for k in 0..4 {
        sc[k] = s[k] & 63;
        m[k] = s[k + 4] & 63;
        sc[k + 4] = (s[k + 8] & 0xF) | ((s[k] >> 6) << 4);
        m[k + 4] = (s[k + 8] >> 4) | ((s[k + 4] >> 6) << 4);
    }
    (sc, m)
}

fn pack_scales(sc: &[u8; 8], m: &[u8; 8], s: &mut [u8]) {
    for k in 0..4 {
        s[k] = sc[k] | ((sc[k + 4] >> 4) << 6);
        s[k + 4] = m[k] | ((m[k + 4] >> 4) << 6);
        s[k + 8] = (sc[k + 4] & 0xF) | ((m[k + 4] & 0xF) << 4);
    }
}

/// Level of element `i` (0..256) of a block's `qs`.
#[inline]
fn level(qs: &[u8], i: usize) -> u8 {
    let (c, hi, l) = (i / 64, (i / 32) % 2, i % 32);
    (qs[32 * c + l] >> (4 * hi)) & 0xF
}

pub(crate) fn dequantize(src: &[u8], dst: &mut [f32]) {
    for (blk, out) in src
        .chunks_exact(BLOCK_BYTES)
        .zip(dst.chunks_exact_mut(BLOCK_ELEMS))
    {
        let d = f16_to_f32(read_u16(blk, 0));
        let dmin = f16_to_f32(read_u16(blk, 2));
        let (sc, m) = unpack_scales(&blk[SCALES..SCALES + 12]);
        // One 32-byte chunk of `qs` per pair of sub-blocks: low nibbles, then high nibbles.
        for c in 0..4 {
            let qs = &blk[QS + 32 * c..QS + 32 * c + 32];
            for hi in 0..2 {
                let j = 2 * c + hi;
                let dl = d * sc[j] as f32;
                let ml = dmin * m[j] as f32;
                for (v, &q) in out[32 * j..32 * j + 32].iter_mut().zip(qs) {
                    *v = dl * ((q >> (4 * hi)) & 0xF) as f32 - ml;
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
        let mut scales = [0f32; 8];
        let mut offsets = [0f32; 8];
        for j in 0..8 {
            let r = j * 32..j * 32 + 32;
            (scales[j], offsets[j]) = fit_scale_offset(&x[r.clone()], 15, &mut q[r]);
        }
        let (mut sc, mut m) = ([0u8; 8], [0u8; 8]);
        let d_bits = quantize_factors(&scales, 6, &mut sc);
        let dmin_bits = quantize_factors(&offsets, 6, &mut m);
        let (d, dmin) = (f16_to_f32(d_bits), f16_to_f32(dmin_bits));
        for j in 0..8 {
            let r = j * 32..j * 32 + 32;
            requantize(
                &x[r.clone()],
                d * sc[j] as f32,
                dmin * m[j] as f32,
                15,
                &mut q[r],
            );
        }
        blk[0..2].copy_from_slice(&d_bits.to_le_bytes());
        blk[2..4].copy_from_slice(&dmin_bits.to_le_bytes());
        pack_scales(&sc, &m, &mut blk[SCALES..SCALES + 12]);
        let qs = &mut blk[QS..QS + 128];
        qs.fill(0);
        for (i, &t) in q.iter().enumerate() {
            let (c, hi, l) = (i / 64, (i / 32) % 2, i % 32);
            qs[32 * c + l] |= t << (4 * hi);
        }
    }
}

/// Scalar reference dot product of one Q4_K row with Q8_K activations: exact integer sums per
/// block, then `d_x·d·isum − d_x·dmin·msum` summed in order in f32.
///
/// # Panics
/// If `row.len() != act.len() * 144`.
pub fn vec_dot_scalar(row: &[u8], act: &[BlockQ8K]) -> f32 {
    assert_eq!(
        row.len(),
        act.len() * BLOCK_BYTES,
        "Q4_K row/activation size mismatch"
    );
    let mut sum = 0.0f32;
    for (blk, a) in row.chunks_exact(BLOCK_BYTES).zip(act) {
        let (sc, m) = unpack_scales(&blk[SCALES..SCALES + 12]);
        let qs = &blk[QS..QS + 128];
        let mut isum = 0i32;
        let mut msum = 0i32;
        for j in 0..8 {
            let part: i32 = (j * 32..j * 32 + 32)
                .map(|i| level(qs, i) as i32 * a.qs[i] as i32)
                .sum();
            isum += sc[j] as i32 * part;
            msum += m[j] as i32 * (a.bsums[2 * j] as i32 + a.bsums[2 * j + 1] as i32);
        }
        let d = a.d * f16_to_f32(read_u16(blk, 0));
        let dmin = a.d * f16_to_f32(read_u16(blk, 2));
        sum += d * isum as f32 - dmin * msum as f32;
    }
    sum
}
