//! Errors of the disk KV cache. A bad file is described by the field and byte offset where it
//! went wrong, so a warning in the server log tells exactly what was rejected and why.

use std::path::PathBuf;

/// A cache file (or a payload) whose bytes do not follow the layout of ds4-spec.md §3.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{field} at offset {offset}: {msg}")]
pub struct FormatError {
    /// The field being read, e.g. `header.magic`, `payload.n_comp[3]`, `ktm.entry[2].dsml`.
    pub field: String,
    /// Byte offset of that field in the file (or in the payload for payload checks).
    pub offset: u64,
    pub msg: String,
}

impl FormatError {
    pub fn new(field: impl Into<String>, offset: u64, msg: impl Into<String>) -> FormatError {
        FormatError {
            field: field.into(),
            offset,
            msg: msg.into(),
        }
    }

    /// The same error for a field nested at `base` bytes into an enclosing structure.
    pub fn shifted(mut self, prefix: &str, base: u64) -> FormatError {
        self.field = format!("{prefix}{}", self.field);
        self.offset += base;
        self
    }
}

/// Everything the store can report.
#[derive(Debug, thiserror::Error)]
pub enum KvError {
    #[error("{}: {op}: {source}", path.display())]
    Io {
        path: PathBuf,
        /// What was being done ("create", "write", "fsync", "rename", ...).
        op: &'static str,
        source: std::io::Error,
    },
    #[error("{}: {source}", path.display())]
    Format { path: PathBuf, source: FormatError },
    #[error("cache file of {file_bytes} bytes ({required_bytes} with 1% slack) exceeds the disk budget of {budget_bytes} bytes")]
    OverBudget {
        file_bytes: u64,
        required_bytes: u64,
        budget_bytes: u64,
    },
    #[error("{0}")]
    Invalid(String),
}

impl KvError {
    pub(crate) fn io(
        path: impl Into<PathBuf>,
        op: &'static str,
        source: std::io::Error,
    ) -> KvError {
        KvError::Io {
            path: path.into(),
            op,
            source,
        }
    }

    /// Whether the error comes from the storage (disk full, permissions, ...) rather than the
    /// content of a file.
    pub fn is_io(&self) -> bool {
        matches!(self, KvError::Io { .. })
    }
}
