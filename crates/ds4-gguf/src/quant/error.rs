//! The error type of the quant API.

use crate::types::GgmlType;

/// What went wrong in a quant operation. Every variant names the type and the sizes involved,
/// so a caller can report it without more context.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum QuantError {
    /// The element count is not a whole number of blocks of the type.
    #[error("{ty}: {elems} elements are not a whole number of {block}-element blocks")]
    NotWholeBlocks {
        ty: GgmlType,
        elems: usize,
        block: usize,
    },
    /// A buffer has the wrong length for the element count.
    #[error("{ty}: {what} holds {actual} bytes/elements, expected {expected}")]
    SizeMismatch {
        ty: GgmlType,
        what: &'static str,
        expected: usize,
        actual: usize,
    },
    /// The operation is not defined for this type (e.g. quantizing to I32, a dot product with
    /// Q8_K weights).
    #[error("{op} is not supported for {ty}")]
    Unsupported { ty: GgmlType, op: &'static str },
}

/// Check that `elems` is a whole number of blocks of `ty` and that a buffer of `actual` bytes
/// holds exactly those blocks; `what` names the buffer in the error.
pub(crate) fn check_bytes(
    ty: GgmlType,
    elems: usize,
    actual: usize,
    what: &'static str,
) -> Result<(), QuantError> {
    let block = ty.block_elems();
    if !elems.is_multiple_of(block) {
        return Err(QuantError::NotWholeBlocks { ty, elems, block });
    }
    let expected =
        (elems / block)
            .checked_mul(ty.block_bytes())
            .ok_or(QuantError::SizeMismatch {
                ty,
                what,
                expected: usize::MAX,
                actual,
            })?;
    if actual != expected {
        return Err(QuantError::SizeMismatch {
            ty,
            what,
            expected,
            actual,
        });
    }
    Ok(())
}
