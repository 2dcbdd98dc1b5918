//! The plain (one element per "block") types: F32, F16, BF16 and I32, and scalar dot products
//! of F32/F16/BF16 rows with an f32 vector.
//!
//! All values are little-endian in GGUF; rows are read byte-wise, so any alignment is fine.

use half::f16;

/// f16 bits to f32 (exact). Plain bit arithmetic rather than `half`'s per-call CPU feature
/// check, so loops over it stay fast and vectorizable. NaN payloads are kept (quiet or not),
/// as numpy does.
#[inline]
pub fn f16_to_f32(bits: u16) -> f32 {
    let sign = ((bits & 0x8000) as u32) << 16;
    let exp = ((bits >> 10) & 0x1f) as u32;
    let man = (bits & 0x3ff) as u32;
    match exp {
        // Zero and subnormals: man · 2^-24, exact in f32.
        0 => {
            let v = man as f32 * (1.0 / 16_777_216.0);
            f32::from_bits(v.to_bits() | sign)
        }
        31 => f32::from_bits(sign | 0x7f80_0000 | (man << 13)),
        _ => f32::from_bits(sign | ((exp + 112) << 23) | (man << 13)),
    }
}

/// f32 to f16 bits, round to nearest even (as numpy's `astype(float16)` and ggml's
/// `GGML_FP32_TO_FP16`).
#[inline]
pub fn f32_to_f16(x: f32) -> u16 {
    f16::from_f32(x).to_bits()
}

/// bf16 bits to f32 (exact: bf16 is the top half of an f32).
#[inline]
pub fn bf16_to_f32(bits: u16) -> f32 {
    f32::from_bits((bits as u32) << 16)
}

/// f32 to bf16 bits as ggml does it: NaN becomes a quiet NaN with the same sign and top
/// payload bits, everything else rounds to nearest even (overflow goes to infinity).
#[inline]
pub fn f32_to_bf16(x: f32) -> u16 {
    let n = x.to_bits();
    if n & 0x7fff_ffff > 0x7f80_0000 {
        return ((n >> 16) | 0x40) as u16;
    }
    ((n as u64 + 0x7fff + ((n >> 16) & 1) as u64) >> 16) as u16
}

#[inline]
pub(crate) fn read_u16(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([b[at], b[at + 1]])
}

#[inline]
pub(crate) fn read_u32(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

pub(crate) fn dequantize_f32(src: &[u8], dst: &mut [f32]) {
    for (v, b) in dst.iter_mut().zip(src.chunks_exact(4)) {
        *v = f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
    }
}

pub(crate) fn dequantize_f16(src: &[u8], dst: &mut [f32]) {
    for (v, b) in dst.iter_mut().zip(src.chunks_exact(2)) {
        *v = f16_to_f32(u16::from_le_bytes([b[0], b[1]]));
    }
}

pub(crate) fn dequantize_bf16(src: &[u8], dst: &mut [f32]) {
    for (v, b) in dst.iter_mut().zip(src.chunks_exact(2)) {
        *v = bf16_to_f32(u16::from_le_bytes([b[0], b[1]]));
    }
}

/// I32 tensors (ds4's `ffn_gate_tid2eid` expert ids) dequantize to the nearest f32, which is
/// exact for |v| <= 2^24 (expert ids are < 256).
pub(crate) fn dequantize_i32(src: &[u8], dst: &mut [f32]) {
    for (v, b) in dst.iter_mut().zip(src.chunks_exact(4)) {
        *v = i32::from_le_bytes([b[0], b[1], b[2], b[3]]) as f32;
    }
}

pub(crate) fn quantize_f32(src: &[f32], dst: &mut [u8]) {
    for (v, b) in src.iter().zip(dst.chunks_exact_mut(4)) {
        b.copy_from_slice(&v.to_le_bytes());
    }
}

pub(crate) fn quantize_f16(src: &[f32], dst: &mut [u8]) {
    for (v, b) in src.iter().zip(dst.chunks_exact_mut(2)) {
        b.copy_from_slice(&f32_to_f16(*v).to_le_bytes());
    }
}

pub(crate) fn quantize_bf16(src: &[f32], dst: &mut [u8]) {
    for (v, b) in src.iter().zip(dst.chunks_exact_mut(2)) {
        b.copy_from_slice(&f32_to_bf16(*v).to_le_bytes());
    }
}

/// Scalar reference: F32 row (little-endian bytes) · x, summed in order in f32.
pub fn dot_f32_scalar(row: &[u8], x: &[f32]) -> f32 {
    assert_eq!(row.len(), x.len() * 4, "F32 row bytes do not match x");
    row.chunks_exact(4)
        .zip(x)
        .map(|(b, &xv)| f32::from_le_bytes([b[0], b[1], b[2], b[3]]) * xv)
        .sum()
}

/// Scalar reference: F16 row · x, summed in order in f32.
pub fn dot_f16_scalar(row: &[u8], x: &[f32]) -> f32 {
    assert_eq!(row.len(), x.len() * 2, "F16 row bytes do not match x");
    row.chunks_exact(2)
        .zip(x)
        .map(|(b, &xv)| f16_to_f32(u16::from_le_bytes([b[0], b[1]])) * xv)
        .sum()
}

/// Scalar reference: BF16 row · x, summed in order in f32.
pub fn dot_bf16_scalar(row: &[u8], x: &[f32]) -> f32 {
    assert_eq!(row.len(), x.len() * 2, "BF16 row bytes do not match x");
    row.chunks_exact(2)
        .zip(x)
        .map(|(b, &xv)| bf16_to_f32(u16::from_le_bytes([b[0], b[1]])) * xv)
        .sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn f16_to_f32_is_exact_for_every_value() {
        for bits in 0..=u16::MAX {
            let want = f16::from_bits(bits).to_f32();
            let got = f16_to_f32(bits);
            if want.is_nan() {
                assert!(got.is_nan(), "{bits:#06x}");
            } else {
                assert_eq!(got.to_bits(), want.to_bits(), "{bits:#06x}");
            }
        }
    }

    #[test]
    fn bf16_rounds_to_nearest_even_and_quiets_nan() {
        assert_eq!(f32_to_bf16(1.0), 0x3f80);
        // 1 + 2^-8 is exactly half-way between two bf16 values: ties to the even one (1.0).
        assert_eq!(f32_to_bf16(f32::from_bits(0x3f80_8000)), 0x3f80);
        assert_eq!(f32_to_bf16(f32::from_bits(0x3f81_8000)), 0x3f82);
        assert_eq!(f32_to_bf16(f32::from_bits(0x7f80_0001)), 0x7fc0);
        assert_eq!(bf16_to_f32(0xbf80), -1.0);
    }
}
