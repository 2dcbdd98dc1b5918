//! GGUF v3 container and the ggml block quant formats ds4 uses. No model knowledge here.

pub mod types;

pub use types::GgmlType;
