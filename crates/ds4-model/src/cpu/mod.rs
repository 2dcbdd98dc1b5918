//! The CPU backend: the readable reference implementation of the DeepSeek V4 forward pass,
//! which every other backend is checked against.
//!
//! One module per concept:
//! - [`vecops`], [`norm`], [`rope`]: dot products and activations, RMS norms, partial RoPE
//!   with YaRN;
//! - [`matmul`]: W·x for a span of tokens (rayon over output rows, each weight row read once
//!   per span), in either numerics mode;
//! - [`hc`]: hyper-connection pre (Sinkhorn), post and head;
//! - [`compressor`], [`indexer`], [`attention`]: the compressed KV rows, the lightning
//!   indexer's top-k, and sink attention;
//! - [`moe`]: routing (sqrt-softplus, bias for selection only, hash layers) and clamped SwiGLU;
//! - [`forward`]: the layer loop over a span ([`CpuModel`]);
//! - [`session`]: the [`crate::backend::Backend`] / [`crate::backend::Session`] implementations
//!   ([`CpuBackend`], [`CpuSession`]).

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
