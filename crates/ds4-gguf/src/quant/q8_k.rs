//! Q8_K: ggml's activation format for the K-quant and IQ dot products. 256 elements in 292
//! bytes: `f32 d`, `i8 q[256]`, `i16 bsums[16]` (sums of each 16 consecutive q); value = d·q.

use super::float::read_u32;

pub const BLOCK_ELEMS: usize = 256;
pub const BLOCK_BYTES: usize = 292;

/// A Q8_K block, laid out exactly as ggml's `block_q8_K` (292 bytes, no padding).
#[derive(Clone, Copy, Debug, PartialEq, bytemuck::Pod, bytemuck::Zeroable)]
#[repr(C)]
pub struct BlockQ8K {
    pub d: f32,
    pub qs: [i8; BLOCK_ELEMS],
    pub bsums: [i16; BLOCK_ELEMS / 16],
}

const _: () = assert!(std::mem::size_of::<BlockQ8K>() == BLOCK_BYTES);

/// Round half to even, as ggml's `nearest_int` (its magic-number trick rounds in the current,
/// round-to-nearest-even mode).
#[inline]
fn nearest_int(x: f32) -> i32 {
    x.round_ties_even() as i32
}

/// Quantize one block as ggml's reference does: the element of largest magnitude (first one
/// on ties) maps to -127, so d = -max/127 keeps max's sign; q = min(127, nearest(x·(-127/max))).
/// An all-zero block gives d = 0 and zero q/bsums.
pub fn quantize_block(x: &[f32; BLOCK_ELEMS]) -> BlockQ8K {
    let mut max = 0.0f32;
    let mut amax = 0.0f32;
    for &v in x {
        if v.abs() > amax {
            amax = v.abs();
            max = v;
        }
    }
    let mut b = BlockQ8K {
        d: 0.0,
        qs: [0; BLOCK_ELEMS],
        bsums: [0; BLOCK_ELEMS / 16],
    };
    if amax == 0.0 {
        return b;
    }
    let iscale = -127.0 / max;
    for (q, &v) in b.qs.iter_mut().zip(x) {
        *q = nearest_int(iscale * v).min(127) as i8;
    }
    for (s, g) in b.bsums.iter_mut().zip(b.qs.chunks_exact(16)) {
        *s = g.iter().map(|&q| q as i16).sum();
    }
    b.d = 1.0 / iscale;
    b
}

/// Quantize an activation vector to Q8_K (ds4's expert-input and down-projection input path).
///
/// # Panics
/// If `x.len()` is not a multiple of 256 (expert widths come from validated tensor shapes).
pub fn quantize_q8_k_activation(x: &[f32]) -> Vec<BlockQ8K> {
    assert!(
        x.len().is_multiple_of(BLOCK_ELEMS),
        "Q8_K activation length {} is not a multiple of 256",
        x.len()
    );
    x.chunks_exact(BLOCK_ELEMS)
        .map(|c| quantize_block(c.try_into().expect("chunk of 256")))
        .collect()
}

pub(crate) fn quantize(src: &[f32], dst: &mut [u8]) {
    for (x, out) in src
        .chunks_exact(BLOCK_ELEMS)
        .zip(dst.chunks_exact_mut(BLOCK_BYTES))
    {
        let b = quantize_block(x.try_into().expect("chunk of 256"));
        out.copy_from_slice(bytemuck::bytes_of(&b));
    }
}

pub(crate) fn dequantize(src: &[u8], dst: &mut [f32]) {
    for (blk, out) in src
        .chunks_exact(BLOCK_BYTES)
        .zip(dst.chunks_exact_mut(BLOCK_ELEMS))
    {
        let d = f32::from_bits(read_u32(blk, 0));
        for (v, &q) in out.iter_mut().zip(&blk[4..4 + BLOCK_ELEMS]) {
            *v = d * (q as i8) as f32;
        }
    }
}
