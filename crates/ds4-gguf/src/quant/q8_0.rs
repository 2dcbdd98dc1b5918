//! Q8_0: 32 elements in 34 bytes, `f16 d` then `i8 q[32]`; value = d·q.
//!
//! Two quantizers live here, on purpose different:
//! - [`quantize`](super::quantize) with `Q8_0` writes weight blocks as ggml and gguf-py do
//!   (d = amax/127 stored as f16, q = round-half-away-from-zero(x/d)); it matches gguf-py bit
//!   for bit.
//! - [`quantize_q8_0_activation`] is ds4's activation quantizer for Q8_0 matmuls: the scale
//!   stays f32 and q = round-half-to-even(x/d) (`lrintf`), giving [`BlockQ8_0`].

use super::float::{f16_to_f32, f32_to_f16, read_u16};

pub const BLOCK_ELEMS: usize = 32;
pub const BLOCK_BYTES: usize = 34;

/// A Q8_0-quantized activation block as ds4 keeps it: the scale stays f32 (it is never
/// rounded to f16), `q ∈ [-127, 127]`, value = d·q.
#[derive(Clone, Copy, Debug, PartialEq, bytemuck::Pod, bytemuck::Zeroable)]
#[repr(C)]
pub struct BlockQ8_0 {
    pub d: f32,
    pub qs: [i8; BLOCK_ELEMS],
}

pub(crate) fn dequantize(src: &[u8], dst: &mut [f32]) {
    for (blk, out) in src
        .chunks_exact(BLOCK_BYTES)
        .zip(dst.chunks_exact_mut(BLOCK_ELEMS))
    {
        let d = f16_to_f32(read_u16(blk, 0));
        for (v, &q) in out.iter_mut().zip(&blk[2..]) {
            *v = (q as i8) as f32 * d;
        }
    }
}

/// Round half away from zero, as C's `roundf`.
#[inline]
fn round_away(x: f32) -> i32 {
    x.round() as i32
}

pub(crate) fn quantize(src: &[f32], dst: &mut [u8]) {
    for (x, blk) in src
        .chunks_exact(BLOCK_ELEMS)
        .zip(dst.chunks_exact_mut(BLOCK_BYTES))
    {
        let amax = x.iter().fold(0.0f32, |m, v| m.max(v.abs()));
        let d = amax / 127.0;
        let id = if d == 0.0 { 0.0 } else { 1.0 / d };
        blk[..2].copy_from_slice(&f32_to_f16(d).to_le_bytes());
        for (q, &v) in blk[2..].iter_mut().zip(x) {
            *q = round_away(v * id) as i8 as u8;
        }
    }
}

/// Quantize an activation vector to Q8_0 blocks as ds4 does before every Q8_0 matmul:
/// per 32 elements d = amax/127 (f32), q = round-half-to-even(x/d).
///
/// # Panics
/// If `x.len()` is not a multiple of 32 (activation widths come from validated tensor shapes).
pub fn quantize_q8_0_activation(x: &[f32]) -> Vec<BlockQ8_0> {
    assert!(
        x.len().is_multiple_of(BLOCK_ELEMS),
        "Q8_0 activation length {} is not a multiple of 32",
        x.len()
    );
    x.chunks_exact(BLOCK_ELEMS)
        .map(|x| {
            let amax = x.iter().fold(0.0f32, |m, v| m.max(v.abs()));
            let d = amax / 127.0;
            let id = if d == 0.0 { 0.0 } else { 1.0 / d };
            let mut qs = [0i8; BLOCK_ELEMS];
            for (q, &v) in qs.iter_mut().zip(x) {
                // |v·id| <= 127 up to one rounding, so the clamp only guards against that ulp.
                *q = (v * id).round_ties_even().clamp(-127.0, 127.0) as i8;
            }
            BlockQ8_0 { d, qs }
        })
        .collect()
}

/// Scalar reference dot product of one Q8_0 weight row with quantized activations: per block
/// the exact integer sum, scaled by d_w·d_x and summed in order in f32 (ds4's scalar order).
///
/// # Panics
/// If `row.len() != act.len() * 34`.
pub fn vec_dot_scalar(row: &[u8], act: &[BlockQ8_0]) -> f32 {
    assert_eq!(
        row.len(),
        act.len() * BLOCK_BYTES,
        "Q8_0 row/activation size mismatch"
    );
    let mut sum = 0.0f32;
    for (blk, a) in row.chunks_exact(BLOCK_BYTES).zip(act) {
        let isum: i32 = blk[2..]
            .iter()
            .zip(&a.qs)
            .map(|(&w, &x)| (w as i8) as i32 * x as i32)
            .sum();
        sum += f16_to_f32(read_u16(blk, 0)) * a.d * isum as f32;
    }
    sum
}
