//! The ggml block quant formats ds4 uses: layout, dequantize, quantize, and dot products of
//! one weight row with an activation vector.
//!
//! | type | elems/block | bytes | module |
//! |---|---|---|---|
//! | F32, F16, BF16, I32 | 1 | 4, 2, 2, 4 | [`float`] |
//! | Q8_0 | 32 | 34 | [`q8_0`] |
//! | Q2_K | 256 | 84 | [`q2_k`] |
//! | Q4_K | 256 | 144 | [`q4_k`] |
//! | IQ2_XXS | 256 | 66 | [`iq2_xxs`] |
//! | Q8_K (activations) | 256 | 292 | [`q8_k`] |
//!
//! Byte layouts are exactly ggml's, little-endian; blocks are parsed byte-wise, so input of
//! any alignment is fine. Dequantization matches gguf-py 0.19 bit for bit (see
//! `tests/quant_fixtures.rs`).
//!
//! Dot products take a weight row as raw bytes and the activation in the form the format's
//! ds4 kernel uses: Q8_0 rows against [`BlockQ8_0`] (f32 scale), K/IQ rows against
//! [`BlockQ8K`], float rows against f32. Quantize an activation once with [`Activations`] and
//! dot it against many rows with [`vec_dot`] (one row) or [`matvec`] (consecutive rows).
//! The typed kernels (`vec_dot_q8_0`, ...) panic on
//! mismatched lengths (a caller bug, like a bad slice index); the `GgmlType`-dispatched entry
//! points ([`dequantize`], [`quantize`], [`vec_dot`], [`dot_f32_row`]) return [`QuantError`].
//! Each kernel has a scalar reference (module [`scalar`]) and an AVX2 version chosen at run
//! time ([`simd_level`]; `DS4_QUANT_SCALAR=1` forces the scalar ones). Integer sums are exact
//! in both, so they differ only in the order of the f32 additions (~1e-8 of Σ|terms|).

#[cfg(target_endian = "big")]
compile_error!("the GGUF quant formats are little-endian; big-endian targets are not supported");

mod activations;
#[cfg(target_arch = "x86_64")]
mod avx2;
mod cpu;
mod error;
mod fit;
pub mod float;
pub mod iq2_xxs;
pub mod q2_k;
pub mod q4_k;
pub mod q8_0;
pub mod q8_k;

pub use activations::Activations;
pub use cpu::{simd_level, SimdLevel};
pub use error::QuantError;
pub use q8_0::{quantize_q8_0_activation, BlockQ8_0};
pub use q8_k::{quantize_q8_k_activation, BlockQ8K};

use crate::types::GgmlType;
use error::check_bytes;

/// The scalar reference kernels, for tests and for comparing against the SIMD ones.
pub mod scalar {
    pub use super::float::dot_f32_scalar as dot_f32;
    pub use super::float::{dot_bf16_scalar as dot_bf16, dot_f16_scalar as dot_f16};
    pub use super::iq2_xxs::vec_dot_scalar as vec_dot_iq2_xxs;
    pub use super::q2_k::vec_dot_scalar as vec_dot_q2_k;
    pub use super::q4_k::vec_dot_scalar as vec_dot_q4_k;
    pub use super::q8_0::vec_dot_scalar as vec_dot_q8_0;
}

/// Decode `src` (whole blocks of `ty`) into `dst.len()` f32 values.
///
/// I32 values are converted to the nearest f32 (exact up to 2^24). Errors when `dst.len()` is
/// not a whole number of blocks or `src` is not exactly that many blocks.
pub fn dequantize(ty: GgmlType, src: &[u8], dst: &mut [f32]) -> Result<(), QuantError> {
    check_bytes(ty, dst.len(), src.len(), "source")?;
    match ty {
        GgmlType::F32 => float::dequantize_f32(src, dst),
        GgmlType::F16 => {
            #[cfg(target_arch = "x86_64")]
            if simd_level() == SimdLevel::Avx2 {
                // SAFETY: simd_level() verified avx2, fma and f16c; sizes were checked above.
                unsafe { avx2::dequantize_f16(src, dst) };
                return Ok(());
            }
            float::dequantize_f16(src, dst)
        }
        GgmlType::BF16 => float::dequantize_bf16(src, dst),
        GgmlType::I32 => float::dequantize_i32(src, dst),
        GgmlType::Q8_0 => q8_0::dequantize(src, dst),
        GgmlType::Q2K => q2_k::dequantize(src, dst),
        GgmlType::Q4K => q4_k::dequantize(src, dst),
        GgmlType::Q8K => q8_k::dequantize(src, dst),
        GgmlType::IQ2XXS => iq2_xxs::dequantize(src, dst),
    }
    Ok(())
}

/// Encode `src` into whole blocks of `ty` in `dst`.
///
/// F32/F16/BF16/Q8_0 match gguf-py bit for bit; Q8_K matches ggml's reference quantizer;
/// Q2_K/Q4_K use a least-squares scale/min fit and IQ2_XXS a simple codebook search (valid
/// blocks, not ggml's exact bits; errors measured in `tests/quant_roundtrip.rs`). I32 is not a
/// quantization target and gives [`QuantError::Unsupported`].
pub fn quantize(ty: GgmlType, src: &[f32], dst: &mut [u8]) -> Result<(), QuantError> {
    check_bytes(ty, src.len(), dst.len(), "destination")?;
    match ty {
        GgmlType::F32 => float::quantize_f32(src, dst),
        GgmlType::F16 => float::quantize_f16(src, dst),
        GgmlType::BF16 => float::quantize_bf16(src, dst),
        GgmlType::Q8_0 => q8_0::quantize(src, dst),
        GgmlType::Q2K => q2_k::quantize(src, dst),
        GgmlType::Q4K => q4_k::quantize(src, dst),
        GgmlType::Q8K => q8_k::quantize(src, dst),
        GgmlType::IQ2XXS => iq2_xxs::quantize(src, dst),
        GgmlType::I32 => return Err(QuantError::Unsupported { ty, op: "quantize" }),
    }
    Ok(())
}

/// One Q8_0 weight row · Q8_0 activations.
///
/// # Panics
/// If `row.len() != act.len() * 34`.
pub fn vec_dot_q8_0(row: &[u8], act: &[BlockQ8_0]) -> f32 {
    assert_eq!(
        row.len(),
        act.len() * 34,
        "vec_dot_q8_0: row/activation size mismatch"
    );
    #[cfg(target_arch = "x86_64")]
    if simd_level() == SimdLevel::Avx2 {
        // SAFETY: simd_level() verified avx2, fma and f16c; the lengths were checked above.
        return unsafe { avx2::vec_dot_q8_0(row, act) };
    }
    q8_0::vec_dot_scalar(row, act)
}

/// One Q2_K weight row · Q8_K activations.
///
/// # Panics
/// If `row.len() != act.len() * 84`.
pub fn vec_dot_q2_k(row: &[u8], act: &[BlockQ8K]) -> f32 {
    assert_eq!(
        row.len(),
        act.len() * 84,
        "vec_dot_q2_k: row/activation size mismatch"
    );
    #[cfg(target_arch = "x86_64")]
    if simd_level() == SimdLevel::Avx2 {
        // SAFETY: simd_level() verified avx2, fma and f16c; the lengths were checked above.
        return unsafe { avx2::vec_dot_q2_k(row, act) };
    }
    q2_k::vec_dot_scalar(row, act)
}

/// One Q4_K weight row · Q8_K activations.
///
/// # Panics
/// If `row.len() != act.len() * 144`.
pub fn vec_dot_q4_k(row: &[u8], act: &[BlockQ8K]) -> f32 {
    assert_eq!(
        row.len(),
        act.len() * 144,
        "vec_dot_q4_k: row/activation size mismatch"
    );
    #[cfg(target_arch = "x86_64")]
    if simd_level() == SimdLevel::Avx2 {
        // SAFETY: simd_level() verified avx2, fma and f16c; the lengths were checked above.
        return unsafe { avx2::vec_dot_q4_k(row, act) };
    }
    q4_k::vec_dot_scalar(row, act)
}

/// One IQ2_XXS weight row · Q8_K activations.
///
/// # Panics
/// If `row.len() != act.len() * 66`.
pub fn vec_dot_iq2_xxs(row: &[u8], act: &[BlockQ8K]) -> f32 {
    assert_eq!(
        row.len(),
        act.len() * 66,
        "vec_dot_iq2_xxs: row/activation size mismatch"
    );
    #[cfg(target_arch = "x86_64")]
    if simd_level() == SimdLevel::Avx2 {
        // SAFETY: simd_level() verified avx2, fma and f16c; the lengths were checked above.
        return unsafe { avx2::vec_dot_iq2_xxs(row, act) };
    }
    iq2_xxs::vec_dot_scalar(row, act)
}

/// One F32 row (raw little-endian bytes) · x.
///
/// # Panics
/// If `row.len() != x.len() * 4`.
pub fn dot_f32(row: &[u8], x: &[f32]) -> f32 {
    assert_eq!(row.len(), x.len() * 4, "dot_f32: row/x size mismatch");
    #[cfg(target_arch = "x86_64")]
    if simd_level() == SimdLevel::Avx2 {
        // SAFETY: simd_level() verified avx2, fma and f16c; the lengths were checked above.
        return unsafe { avx2::dot_f32(row, x) };
    }
    float::dot_f32_scalar(row, x)
}

/// One F16 row · x.
///
/// # Panics
/// If `row.len() != x.len() * 2`.
pub fn dot_f16(row: &[u8], x: &[f32]) -> f32 {
    assert_eq!(row.len(), x.len() * 2, "dot_f16: row/x size mismatch");
    #[cfg(target_arch = "x86_64")]
    if simd_level() == SimdLevel::Avx2 {
        // SAFETY: simd_level() verified avx2, fma and f16c; the lengths were checked above.
        return unsafe { avx2::dot_f16(row, x) };
    }
    float::dot_f16_scalar(row, x)
}

/// One BF16 row · x.
///
/// # Panics
/// If `row.len() != x.len() * 2`.
pub fn dot_bf16(row: &[u8], x: &[f32]) -> f32 {
    assert_eq!(row.len(), x.len() * 2, "dot_bf16: row/x size mismatch");
    #[cfg(target_arch = "x86_64")]
    if simd_level() == SimdLevel::Avx2 {
        // SAFETY: simd_level() verified avx2, fma and f16c; the lengths were checked above.
        return unsafe { avx2::dot_bf16(row, x) };
    }
    float::dot_bf16_scalar(row, x)
}

/// One float row (F32, F16 or BF16) · x.
pub fn dot_f32_row(ty: GgmlType, row: &[u8], x: &[f32]) -> Result<f32, QuantError> {
    check_bytes(ty, x.len(), row.len(), "row")?;
    match ty {
        GgmlType::F32 => Ok(dot_f32(row, x)),
        GgmlType::F16 => Ok(dot_f16(row, x)),
        GgmlType::BF16 => Ok(dot_bf16(row, x)),
        _ => Err(QuantError::Unsupported {
            ty,
            op: "float dot product",
        }),
    }
}

/// One weight row of type `ty` · the activation, using the activation form that type's ds4
/// kernel uses (f32, Q8_0 or Q8_K; quantized on first use and cached in `acts`).
pub fn vec_dot(ty: GgmlType, row: &[u8], acts: &Activations<'_>) -> Result<f32, QuantError> {
    check_bytes(ty, acts.x().len(), row.len(), "row")?;
    match ty {
        GgmlType::F32 | GgmlType::F16 | GgmlType::BF16 => dot_f32_row(ty, row, acts.x()),
        GgmlType::Q8_0 => Ok(vec_dot_q8_0(row, acts.q8_0()?)),
        GgmlType::Q2K => Ok(vec_dot_q2_k(row, acts.q8_k()?)),
        GgmlType::Q4K => Ok(vec_dot_q4_k(row, acts.q8_k()?)),
        GgmlType::IQ2XXS => Ok(vec_dot_iq2_xxs(row, acts.q8_k()?)),
        GgmlType::Q8K | GgmlType::I32 => Err(QuantError::Unsupported { ty, op: "vec_dot" }),
    }
}

/// `out[r]` = row `r` of `weights` · the activation, for `out.len()` consecutive rows of type
/// `ty` (each `acts.x().len()` elements wide). Checks the shapes once, then runs the typed
/// kernel over every row; callers parallelize by splitting `weights` and `out` into row ranges.
pub fn matvec(
    ty: GgmlType,
    weights: &[u8],
    acts: &Activations<'_>,
    out: &mut [f32],
) -> Result<(), QuantError> {
    let cols = acts.x().len();
    let block = ty.block_elems();
    if !cols.is_multiple_of(block) {
        return Err(QuantError::NotWholeBlocks {
            ty,
            elems: cols,
            block,
        });
    }
    let row_bytes = cols / block * ty.block_bytes();
    let expected = row_bytes.checked_mul(out.len());
    if expected != Some(weights.len()) {
        return Err(QuantError::SizeMismatch {
            ty,
            what: "weights",
            expected: expected.unwrap_or(usize::MAX),
            actual: weights.len(),
        });
    }
    if row_bytes == 0 {
        out.fill(0.0);
        return Ok(());
    }
    let rows = weights.chunks_exact(row_bytes).zip(out.iter_mut());
    match ty {
        GgmlType::Q8_0 => {
            let a = acts.q8_0()?;
            rows.for_each(|(w, o)| *o = vec_dot_q8_0(w, a));
        }
        GgmlType::Q2K => {
            let a = acts.q8_k()?;
            rows.for_each(|(w, o)| *o = vec_dot_q2_k(w, a));
        }
        GgmlType::Q4K => {
            let a = acts.q8_k()?;
            rows.for_each(|(w, o)| *o = vec_dot_q4_k(w, a));
        }
        GgmlType::IQ2XXS => {
            let a = acts.q8_k()?;
            rows.for_each(|(w, o)| *o = vec_dot_iq2_xxs(w, a));
        }
        GgmlType::F32 => rows.for_each(|(w, o)| *o = dot_f32(w, acts.x())),
        GgmlType::F16 => rows.for_each(|(w, o)| *o = dot_f16(w, acts.x())),
        GgmlType::BF16 => rows.for_each(|(w, o)| *o = dot_bf16(w, acts.x())),
        GgmlType::Q8K | GgmlType::I32 => return Err(QuantError::Unsupported { ty, op: "matvec" }),
    }
    Ok(())
}
