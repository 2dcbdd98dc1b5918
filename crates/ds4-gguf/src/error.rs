//! The one error type of the GGUF container: every variant says what went wrong and where
//! (byte offset, metadata key or tensor name), so a damaged model file gives a message a user
//! can act on.

use std::path::PathBuf;

use crate::types::GgmlType;

/// Everything that can go wrong while reading, querying or writing a GGUF file.
///
/// Offsets are absolute byte offsets from the start of the file unless a variant says otherwise.
#[derive(Debug, thiserror::Error)]
pub enum GgufError {
    /// The file ended while `what` was being read.
    #[error(
        "file truncated: {what} at offset {offset} needs {needed} bytes, only {available} remain"
    )]
    Truncated {
        what: String,
        offset: u64,
        needed: u64,
        available: u64,
    },

    /// The first four bytes are not `GGUF`.
    #[error("not a GGUF file: magic at offset 0 is {found:02x?}, expected \"GGUF\"")]
    BadMagic { found: [u8; 4] },

    /// Only GGUF version 3 is supported (as in ds4).
    #[error("unsupported GGUF version {version} at offset 4 (only version 3 is supported)")]
    UnsupportedVersion { version: u32 },

    /// A count (of tensors, metadata pairs or array elements) cannot fit in the bytes that remain.
    #[error("{what} at offset {offset} claims {count} entries, but the {available} remaining bytes can hold at most {max}")]
    CountTooLarge {
        what: String,
        offset: u64,
        count: u64,
        available: u64,
        max: u64,
    },

    /// A string's declared length is larger than the rest of the file.
    #[error(
        "{what} at offset {offset} declares a {len}-byte string, but only {available} bytes remain"
    )]
    StringTooLong {
        what: String,
        offset: u64,
        len: u64,
        available: u64,
    },

    /// A string is not valid UTF-8.
    #[error("{what} at offset {offset} is not valid UTF-8 ({source})")]
    InvalidUtf8 {
        what: String,
        offset: u64,
        source: std::str::Utf8Error,
    },

    /// A metadata value type id outside the 13 GGUF value types.
    #[error("metadata key `{key}`: unknown value type id {type_id} at offset {offset}")]
    UnknownValueType {
        key: String,
        type_id: u32,
        offset: u64,
    },

    /// A bool stored as a byte other than 0 or 1.
    #[error(
        "metadata key `{key}`: bool at offset {offset} has byte value {value} (expected 0 or 1)"
    )]
    InvalidBool { key: String, offset: u64, value: u8 },

    /// Arrays of arrays nested deeper than the reader allows.
    #[error(
        "metadata key `{key}`: arrays nested deeper than {max_depth} levels at offset {offset}"
    )]
    NestingTooDeep {
        key: String,
        offset: u64,
        max_depth: usize,
    },

    /// The same metadata key appears twice.
    #[error("metadata key `{key}` appears twice (second at offset {offset})")]
    DuplicateKey { key: String, offset: u64 },

    /// A tensor's type id is not one of the ggml types this crate knows.
    #[error("tensor `{tensor}`: unknown ggml type id {type_id} at offset {offset}")]
    UnknownTensorType {
        tensor: String,
        type_id: u32,
        offset: u64,
    },

    /// A tensor's dimension count is outside 1..=8.
    #[error("tensor `{tensor}`: {ndim} dimensions at offset {offset} (must be 1..=8)")]
    BadNdim {
        tensor: String,
        ndim: u32,
        offset: u64,
    },

    /// A tensor's element count or byte size overflows (or a dimension exceeds i64::MAX).
    #[error("tensor `{tensor}`: dimensions {dims:?} overflow the element count or byte size")]
    DimsOverflow { tensor: String, dims: Vec<u64> },

    /// dim0 (the contiguous row length) is not a whole number of blocks of the tensor's type.
    #[error("tensor `{tensor}`: row length {row_len} is not a multiple of the {ty} block size {block_elems}")]
    PartialBlock {
        tensor: String,
        ty: GgmlType,
        row_len: u64,
        block_elems: u64,
    },

    /// A tensor's bytes extend past the end of the file.
    #[error("tensor `{tensor}`: data at file offset {start}..{end} lies outside the {file_len}-byte file")]
    TensorOutsideFile {
        tensor: String,
        start: u64,
        end: u64,
        file_len: u64,
    },

    /// A tensor's data offset is not a multiple of the file's alignment.
    #[error("tensor `{tensor}`: data offset {offset} (relative to the data section) is not a multiple of the alignment {alignment}")]
    MisalignedOffset {
        tensor: String,
        offset: u64,
        alignment: u32,
    },

    /// Two tensors have the same name.
    #[error("tensor name `{tensor}` appears twice")]
    DuplicateTensor { tensor: String },

    /// Two tensors' data ranges partly overlap (identical ranges are allowed: aliases).
    #[error("tensors `{first}` and `{second}` have partly overlapping data ranges")]
    OverlappingTensors { first: String, second: String },

    /// `general.alignment` is not a u32 power of two.
    #[error("bad `general.alignment`: {reason}")]
    BadAlignment { reason: String },

    /// A typed getter asked for a key that is not present.
    #[error("metadata key `{key}` is missing")]
    MissingKey { key: String },

    /// A typed getter found a value of an incompatible type.
    #[error("metadata key `{key}` has type {found}, expected {expected}")]
    WrongType {
        key: String,
        expected: &'static str,
        found: String,
    },

    /// A typed getter found a value of the right kind that does not fit the requested type.
    #[error("metadata key `{key}`: value {value} does not fit in {target}")]
    ValueOutOfRange {
        key: String,
        value: String,
        target: &'static str,
    },

    /// The writer was given inconsistent input (tensor sizes, alias targets, array contents).
    #[error("invalid writer input for `{name}`: {reason}")]
    InvalidInput { name: String, reason: String },

    /// A tensor data producer given to the writer failed.
    #[error("producing data of tensor `{tensor}` failed: {message}")]
    Producer { tensor: String, message: String },

    /// An I/O error on a named file.
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
}

impl GgufError {
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> GgufError {
        GgufError::Io {
            path: path.into(),
            source,
        }
    }
}
