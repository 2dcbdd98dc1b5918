//! The CPU backend: the readable reference implementation of the DeepSeek V4 forward pass.
//! One module per concept; `forward` runs the layer loop over a span of tokens.

pub mod attention;
pub mod compressor;
pub mod forward;
pub mod hc;
pub mod indexer;
pub mod matmul;
pub mod moe;
pub mod norm;
pub mod rope;
pub mod session;
pub mod vecops;

pub use forward::CpuModel;
pub use session::{CpuBackend, CpuSession};
