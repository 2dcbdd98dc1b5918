//! F16-weight × f32-activation products of many vectors (prefill's router, compressor and
//! indexer projections) as a tiled f32 GEMM on the CUDA cores; kernel in `gemm_f16.cu`.
//!
//! Same conventions as [`Gpu::gemv`]: x is `n_vecs` vectors of `cols` f32 values, y is
//! `n_vecs` vectors of `rows` values. Each output is an f32 fused-multiply-add sum in ascending
//! column order, the same whatever the batch, so a token's result does not depend on its span.
//! Bound: 2·rows·cols·n FLOPs at the FP32 rate (the weights are re-read per 64-vector tile,
//! from L2), several times the matvec kernels' rate once a span has 16+ vectors.

use cudarc::driver::LaunchConfig;

use crate::device::DeviceBuffer;
use crate::error::{CudaError, DriverContext, Result};
use crate::gemv::{DeviceMatrix, WeightFormat};
use crate::kernels::Gpu;

/// Rows and vectors per CTA, columns per K step (GF_BM, GF_BN, GF_BK in gemm_f16.cu).
const TILE_ROWS: usize = 32;
const TILE_VECS: usize = 64;
const TILE_K: usize = 32;
const THREADS: u32 = 128;

impl Gpu {
    /// Whether [`Gpu::gemm_f16`] takes this matrix: F16, one matrix (not an expert stack),
    /// columns a multiple of 32, rows and base 16-byte aligned.
    pub fn gemm_f16_fits(w: &DeviceMatrix) -> bool {
        w.format == WeightFormat::F16
            && w.experts == 1
            && w.cols.is_multiple_of(TILE_K)
            && w.row_bytes.is_multiple_of(16)
            && w.ptr.is_multiple_of(16)
    }

    /// y = W·x for `n_vecs` f32 vectors and F16 weights (see the module comment).
    pub fn gemm_f16(
        &self,
        w: &DeviceMatrix,
        x: &DeviceBuffer<f32>,
        n_vecs: usize,
        y: &mut DeviceBuffer<f32>,
    ) -> Result<()> {
        if !Gpu::gemm_f16_fits(w) {
            return Err(CudaError::InvalidArgument(format!(
                "gemm_f16 needs one F16 matrix with 16-byte aligned rows of a multiple of {TILE_K} columns, got {:?} {} x {} ({} experts, {} bytes per row)",
                w.format, w.rows, w.cols, w.experts, w.row_bytes
            )));
        }
        if x.len() < n_vecs * w.cols || y.len() < n_vecs * w.rows || !x.ptr().is_multiple_of(16) {
            return Err(CudaError::InvalidArgument(format!(
                "gemm_f16: {n_vecs} vectors need {} aligned input values and {} outputs (have {} and {})",
                n_vecs * w.cols,
                n_vecs * w.rows,
                x.len(),
                y.len()
            )));
        }
        if n_vecs == 0 || w.rows == 0 {
            return Ok(());
        }
        let f = self.kernels.function("gemm_f16", "gemm_f16_f32")?;
        let (wp, xp, yp) = (w.ptr, x.ptr(), y.ptr());
        let (row_bytes, rows, n, k) = (
            w.row_bytes as i64,
            w.rows as i64,
            n_vecs as i64,
            w.cols as i64,
        );
        let cfg = LaunchConfig {
            grid_dim: (
                w.rows.div_ceil(TILE_ROWS) as u32,
                n_vecs.div_ceil(TILE_VECS) as u32,
                1,
            ),
            block_dim: (THREADS, 1, 1),
            shared_mem_bytes: 0,
        };
        let label = format!("gemm_f16_f32 {}x{} x{n_vecs}", w.rows, w.cols);
        let mut b = self.device.launch_args(&f);
        b.arg(&wp)
            .arg(&row_bytes)
            .arg(&xp)
            .arg(&yp)
            .arg(&rows)
            .arg(&n)
            .arg(&k);
        // SAFETY: gemm_f16_f32(w, row_bytes, x, y, rows, n, k) reads rows × row_bytes weight
        // bytes (16-byte loads: base and row_bytes are multiples of 16, k of 32, checked by
        // gemm_f16_fits), n × k inputs (16-byte aligned, length checked) — tail rows and
        // vectors are clamped to the last valid one on load — and writes only the n × rows
        // outputs inside y (checked above).
        self.device
            .launch_timed(&label, w.rows * w.row_bytes, || unsafe { b.launch(cfg) })
            .ctx("gemm_f16_f32")?;
        Ok(())
    }
}
