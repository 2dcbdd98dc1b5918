//! DeepSeek V4 Flash: the model description read from GGUF metadata, weight binding, the CPU
//! forward pass (the reference every other backend is checked against), session state and its
//! ds4 payload form, and the tools that make model files (`convert`, `synth`) and measure them
//! (`bench`).

pub mod backend;
pub mod bench;
pub mod config;
pub mod convert;
pub mod cpu;
pub mod greedy;
pub mod layout;
pub mod npy;
pub mod numerics;
pub mod session;
pub mod synth;
pub mod weights;
