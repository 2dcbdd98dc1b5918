//! The KV cache as a disk citizen (ds4-spec.md §3): ds4's `.kv` checkpoint files, a directory
//! store with longest-prefix lookup, atomic multi-process-safe saves and budgeted eviction,
//! and the save-trigger policy of `ds4 serve`.
//!
//! - [`header`]: the 48-byte KVC header.
//! - [`file`]: a whole file (header, text, payload, KTM tool map).
//! - [`payload`]: structural validation of the DSV4 session payload against a model.
//! - [`store`]: the directory.
//! - [`policy`]: when to save (cold, continued, evict, shutdown).

pub mod error;
pub mod file;
pub mod header;
pub mod payload;
pub mod policy;
pub mod store;

pub use error::{FormatError, KvError};
pub use file::{KvFile, ToolMapEntry};
pub use header::{ExtFlags, KvFileHeader, SaveReason};
pub use policy::SavePolicy;
pub use store::{Hit, KvStore, SaveRequest, Saved, StoreOptions};
