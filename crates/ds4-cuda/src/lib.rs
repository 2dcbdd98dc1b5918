//! ds4-cuda: the CUDA backend — device, run-time compiled kernels, resident weights, the
//! matrix kernels (GEMV per ggml format for decode, tensor-core Q8_0 and CUDA-core F16 GEMMs and
//! grouped expert products for prefill), norms, SwiGLU, activation quantization, and the
//! DeepSeek V4 forward pass ([`forward`], with its own kernel modules) behind [`CudaBackend`].
//!
//! Everything loads libcuda/libnvrtc at run time (cudarc `dynamic-loading`): the crate builds
//! and its CPU-side tests run on machines without CUDA, and [`Gpu::open`] returns
//! [`CudaError::LibraryMissing`] there instead of panicking.
//!
//! ```no_run
//! use ds4_cuda::{Activations, DeviceWeights, Gpu, WeightFormat};
//! # fn main() -> Result<(), ds4_cuda::CudaError> {
//! let gpu = Gpu::open(0)?;                                      // compiles or loads cached kernels
//! let region = vec![0u8; 4096 * 34 * 128];                       // e.g. a GGUF data section
//! let w = DeviceWeights::upload(&gpu.device, &region, 0, &mut |_, _| {})?;
//! let m = w.matrix(0, WeightFormat::Q8_0, 4096, 4096, 1)?;       // offset, format, cols, rows
//! let x = gpu.device.upload(&vec![0.5f32; 4096])?;
//! let mut y = gpu.device.alloc::<f32>(4096)?;
//! gpu.gemv(&m, Activations::F32(&x), 1, &mut y)?;
//! let _host = gpu.device.download(&y)?;
//! # Ok(()) }
//! ```
//!
//! Modules: [`device`] (open, buffers, events, per-kernel timing), [`compile`] (NVRTC + disk
//! cache), [`kernels`] (module registry, [`Gpu`]), [`weights`], [`gemv`], [`gemm`] (Q8_0 on
//! tensor cores), [`gemm_experts`] (grouped IQ2_XXS / Q2_K / Q4_K experts on tensor cores),
//! [`gemm_f16`], [`vector_ops`], [`dequant`]; the model on the GPU: [`model`] (weights as
//! matrices), [`session`] (KV state, snapshots), [`forward`] (the layer loop and decode graph;
//! `forward/hc.rs`, `forward/attention.rs`, `forward/ffn.rs` launch the sublayers) +
//! [`fwd_kernels`] (hc.cu, attention.cu, compressor.cu, moe.cu) + `attend` (attention
//! launchers), [`backend`]; `profile` and `trace` (the kernel profilers).
//!
//! Environment knobs (for measurement; the defaults are the fast path):
//! `DS4_CUDA_PROFILE=kernels` prints per-kernel GPU time (turns graphs off);
//! `DS4_CUDA_PROFILE=trace` traces every kernel through CUPTI with graphs and branches on and
//! splits each decode step into time alone on the GPU per kernel, overlap and idle
//! (`DS4_CUDA_TRACE_FILE=F` also writes every record to F as CSV); `DS4_CUDA_PROFILE=host`
//! prints the host's time per phase of the graph-replayed decode steps (graphs on);
//! `DS4_CUDA_NO_GRAPH` decodes without the captured graph; `DS4_CUDA_NO_PDL` launches without
//! programmatic dependent launch; `DS4_CUDA_NO_BRANCHES` runs the side-stream branches in
//! line; `DS4_CUDA_CHUNK` sets the prefill span (2048); `DS4_CUDA_EXPERTS_PASS` (32 / 64)
//! the grouped expert kernels' pass width; `DS4_CUDA_GEMV_WARPS` / `DS4_CUDA_GEMV_CAP` the
//! GEMV warps per CTA and CTAs per SM; `DS4_CUDA_FAST_PREFILL=1` runs the prefill's Q8_0
//! projections as f16 GEMMs on cuBLAS (faster, closer to the exact product, but no longer the
//! CPU backend's Q8_0-activation numerics: [`gemm_cublas`]); `DS4_KERNEL_CACHE` the cubin
//! cache.

// The attention launchers (one CTA per token and head; one per token and 16 heads for spans).
mod attend;
pub mod backend;
pub mod compile;
pub mod dequant;
pub mod device;
pub mod error;
pub mod forward;
pub mod fwd_kernels;
pub mod gemm;
pub mod gemm_cublas;
pub mod gemm_experts;
pub mod gemm_f16;
pub mod gemv;
pub mod kernels;
pub mod model;
mod profile;
pub mod session;
mod tensor_map;
mod trace;
pub mod vector_ops;
pub mod weights;

pub use backend::CudaBackend;
pub use compile::{CompileStats, KernelCache};
pub use device::{cuda_available, CudaDevice, DeviceBuffer, DeviceInfo};
pub use error::CudaError;
pub use gemv::{ActQuant, Activations, DeviceMatrix, QuantizedActivations, WeightFormat};
pub use kernels::Gpu;
pub use session::CudaSession;
pub use weights::{DeviceWeights, HostWeights};
