//! Prefill products of Q8_0 matrices on cuBLAS: the weights dequantized to f16 (each value
//! `d · q` rounded once, `dequant.cu`), the activations rounded to f16, one `cublasGemmEx`
//! with f32 accumulation and f32 output. ds4 runs its CUDA prefill the same way (F16-dequantized
//! weights on cuBLAS; ds4-spec.md section 7).
//!
//! Why: the exact Q8_0 × Q8_0 GEMM (`gemm_q8.cu`) is bound by its per-block f32 epilogue, and
//! cuBLAS's f16 tensor-core GEMM runs the same products 2.4-2.8× faster on an H200 (4096 × 8192
//! × 2 048 vectors: 191 µs against 525; `scripts/gpu/f16_gemm_probe.cu`, docs/speed-log.md
//! session 32). It is also closer to the exact product of the Q8_0 weights and the f32
//! activations: f16 activations keep 11 bits where Q8_0 activations keep ~8 relative to their
//! block's largest value (sampled outputs: 5.5e-6 against 1.5e-4 rms, relative to the sum of
//! the terms' magnitudes).
//!
//! Opt-in (`DS4_CUDA_FAST_PREFILL=1`, [`fast_prefill_requested`]): it leaves the CPU backend's
//! numerics, whose Q8_0 products quantize the activations, and on the chaotic random
//! `flash_mini` fixture the CUDA-vs-CPU median gap then exceeds the ds4-numerics bound of
//! `forward_fixtures` (4.2e-2 against 2e-2; H200, session 32), though its outputs are closer
//! to the exact product. Measured with it on (H200, prefill 4K-8K and 30K-32K): +9.6 % and
//! +7 % once running; the first span pays cuBLAS's start (~0.15 s).
//!
//! When: spans of at least [`F16_MIN_VECS`] vectors on the main stream (its scratch buffers
//! are not shared with the side lanes), matrices of at most [`F16_MAX_WEIGHTS`], with cuBLAS
//! loadable and the scratch allocatable with 1 GiB of GPU memory left. Otherwise
//! [`Gpu::gemm_q8_0_f16`] returns false and the caller runs the exact Q8_0 GEMM.

use std::sync::{Arc, Mutex};

use cudarc::cublas::{result as blas, sys as blas_sys, CudaBlas};
use half::f16;

use crate::device::DeviceBuffer;
use crate::error::{CudaError, Result};
use crate::gemv::{DeviceMatrix, WeightFormat};
use crate::kernels::Gpu;

/// Fewest vectors a product takes the f16 path from: below, the dequantization of the whole
/// matrix (read 1.06 and write 2 bytes a weight) costs more than the exact GEMM saves.
pub const F16_MIN_VECS: usize = 64;

/// Most weights a matrix may have for this path (the scratch holds them as f16: 128 MiB): the
/// model's projections have at most 33.5 M (q_b, o_b); the LM head (529 M), which spans reach
/// only when every position's logits are asked for, keeps the exact GEMM.
pub const F16_MAX_WEIGHTS: usize = 1 << 26;

/// GPU memory that must stay free after the scratch buffers are grown.
const FREE_MARGIN: usize = 1 << 30;

/// The cuBLAS handle and the f16 scratch of the main stream, made on first use.
#[derive(Default)]
pub(crate) struct F16Gemm {
    /// None until first use; Some(None) when cuBLAS is missing or fails to start.
    blas: Option<Option<CudaBlas>>,
    weights: Option<DeviceBuffer<f16>>,
    acts: Option<DeviceBuffer<f16>>,
}

/// Whether the forward pass should try [`Gpu::gemm_q8_0_f16`] for its Q8_0 spans:
/// `DS4_CUDA_FAST_PREFILL` set to anything but "0" (read once per process).
pub fn fast_prefill_requested() -> bool {
    static FAST: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *FAST.get_or_init(|| std::env::var_os("DS4_CUDA_FAST_PREFILL").is_some_and(|v| v != "0"))
}

impl Gpu {
    /// y = W·x for `n` f32 vectors `x` through f16 weights and activations on cuBLAS (see the
    /// module docs), for a Q8_0 matrix of one expert. Returns Ok(false), having done nothing,
    /// where this path does not apply (too few vectors, a side stream, a matrix over
    /// [`F16_MAX_WEIGHTS`], no cuBLAS, too little memory; or cuBLAS failed, which is printed
    /// once and turns the path off for the process): the caller then runs [`Gpu::gemm_q8_0`].
    pub fn gemm_q8_0_f16(
        &self,
        w: &DeviceMatrix,
        x: &DeviceBuffer<f32>,
        n: usize,
        y: &mut DeviceBuffer<f32>,
    ) -> Result<bool> {
        if n < F16_MIN_VECS
            || w.format != WeightFormat::Q8_0
            || w.experts != 1
            || !Arc::ptr_eq(self.device.stream(), self.device.main_stream())
        {
            return Ok(false);
        }
        let (rows, cols) = (w.rows, w.cols);
        if rows * cols > F16_MAX_WEIGHTS {
            return Ok(false);
        }
        if x.len() < n * cols || y.len() < n * rows {
            return Err(CudaError::InvalidArgument(format!(
                "gemm_q8_0_f16: {n} vectors of {cols} in {} values, {rows} outputs each in {}",
                x.len(),
                y.len()
            )));
        }
        let dims = [rows, n, cols].map(i32::try_from);
        let [Ok(m32), Ok(n32), Ok(k32)] = dims else {
            return Ok(false);
        };
        let mut state = self.f16_gemm.lock().unwrap_or_else(|e| e.into_inner());
        let state = &mut *state;
        if state.blas.is_none() {
            // SAFETY: only asks whether the dynamic loader finds libcublas.
            let present = unsafe { blas_sys::is_culib_present() };
            state.blas = Some(if present {
                CudaBlas::new(self.device.main_stream().clone()).ok()
            } else {
                None
            });
        }
        let Some(Some(handle)) = &state.blas else {
            return Ok(false);
        };
        let handle = *handle.handle();
        if !self.grow(&mut state.weights, rows * cols)? || !self.grow(&mut state.acts, n * cols)? {
            return Ok(false);
        }
        let (Some(w16), Some(x16)) = (state.weights.as_mut(), state.acts.as_mut()) else {
            return Ok(false);
        };
        self.dequantize_f16(w, w16)?;
        self.activations_f16(x, n * cols, x16)?;
        let (one, zero) = (1.0f32, 0.0f32);
        // y[v·rows + r] = Σ_k W[r][k]·x[v][k]. Column-major: Y (rows × n, ldc rows) = Aᵀ · B,
        // A = W as a cols × rows matrix (lda cols), B = x as cols × n (ldb cols).
        // SAFETY: the handle streams on the main stream, where the kernels above ran and
        // where launches go now (checked); w16 holds rows·cols and x16 n·cols halves (grow),
        // y at least n·rows floats (checked above); alpha and beta are host f32 values, as
        // CUBLAS_COMPUTE_32F takes them in the default host pointer mode.
        let ran = unsafe {
            blas::gemm_ex(
                handle,
                blas_sys::cublasOperation_t::CUBLAS_OP_T,
                blas_sys::cublasOperation_t::CUBLAS_OP_N,
                m32,
                n32,
                k32,
                (&one as *const f32).cast(),
                w16.ptr() as *const std::ffi::c_void,
                blas_sys::cudaDataType::CUDA_R_16F,
                k32,
                x16.ptr() as *const std::ffi::c_void,
                blas_sys::cudaDataType::CUDA_R_16F,
                k32,
                (&zero as *const f32).cast(),
                y.ptr() as *mut std::ffi::c_void,
                blas_sys::cudaDataType::CUDA_R_32F,
                m32,
                blas_sys::cublasComputeType_t::CUBLAS_COMPUTE_32F,
                blas_sys::cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
            )
        }
        .map_or_else(
            |e| {
                // Nothing was written to y that the exact GEMM will not overwrite: say so once
                // and leave cuBLAS alone for the rest of the process.
                eprintln!(
                    "ds4: cublasGemmEx ({rows} x {cols} x {n}) failed ({e:?}); prefill goes on \
                     with the exact Q8_0 GEMM"
                );
                state.blas = Some(None);
                false
            },
            |()| true,
        );
        Ok(ran)
    }

    /// Makes `buf` hold at least `len` halves, keeping FREE_MARGIN of GPU memory free; false
    /// when it cannot.
    fn grow(&self, buf: &mut Option<DeviceBuffer<f16>>, len: usize) -> Result<bool> {
        if buf.as_ref().is_some_and(|b| b.len() >= len) {
            return Ok(true);
        }
        *buf = None;
        // No other thread's graph capture may see this allocation (see device.rs CONTEXT_WIDE).
        let _no_capture = crate::device::capture_lock();
        let (free, _) = self.device.memory_info()?;
        if free < len * 2 + FREE_MARGIN {
            return Ok(false);
        }
        match self.device.alloc::<f16>(len) {
            Ok(b) => {
                *buf = Some(b);
                Ok(true)
            }
            Err(_) => Ok(false),
        }
    }
}

/// The state [`Gpu`] keeps for [`Gpu::gemm_q8_0_f16`].
pub(crate) type F16GemmState = Mutex<F16Gemm>;
