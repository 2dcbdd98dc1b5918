//! GGUF v3 container and the ggml block quant formats ds4 uses. No model knowledge here.

pub mod error;
pub mod metadata;
pub mod quant;
pub mod reader;
pub mod types;
pub mod writer;

pub use error::GgufError;
pub use metadata::{MetaArray, MetaType, MetaValue};
pub use reader::{GgufFile, TensorInfo};
pub use types::GgmlType;
pub use writer::{GgufLayout, GgufWriter, PlannedFile, TensorProducer};
