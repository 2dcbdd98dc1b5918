//! Weights dequantized to f16 (for tensor-core GEMMs in prefill); kernels in `dequant.cu`.
//! The values equal the CPU reference's dequantization rounded to f16, bit for bit.

use cudarc::driver::{result, LaunchConfig};

use crate::device::DeviceBuffer;
use crate::error::{CudaError, DriverContext, Result};
use crate::gemv::{DeviceMatrix, WeightFormat};
use crate::kernels::Gpu;

impl Gpu {
    /// Writes every row of `w` (all experts, expert-major) as f16 into `out`
    /// (experts × rows × cols values, row-major).
    pub fn dequantize_f16(
        &self,
        w: &DeviceMatrix<'_>,
        out: &mut DeviceBuffer<half::f16>,
    ) -> Result<()> {
        let rows = w.rows * w.experts;
        let n = rows * w.cols;
        if out.len() < n {
            return Err(CudaError::InvalidArgument(format!(
                "f16 output has {} elements, needs {n}",
                out.len()
            )));
        }
        if w.format == WeightFormat::F16 {
            // Already f16 and densely packed (row_bytes = 2·cols): a plain copy.
            // SAFETY: both ranges are n·2 bytes inside live allocations (DeviceMatrix contract,
            // length check above).
            return unsafe {
                result::memcpy_dtod_async(out.ptr(), w.ptr, n * 2, self.device.stream().cu_stream())
            }
            .ctx("cuMemcpyDtoDAsync");
        }
        let name = format!("dequant_{}_f16", w.format.tag());
        let f = self.kernels.function("dequant", &name)?;
        let (wp, rb, r64, k64, gp, op) = (
            w.ptr,
            w.row_bytes as i64,
            rows as i64,
            w.cols as i64,
            self.kernels.iq2xxs_grid.ptr(),
            out.ptr(),
        );
        let mut b = self.device.launch_args(&f);
        b.arg(&wp).arg(&rb).arg(&r64).arg(&k64).arg(&gp).arg(&op);
        let threads = match w.format {
            WeightFormat::F32 => n,
            WeightFormat::Q8_0 => n / 8, // 8 values a thread (dequant.cu)
            _ => n / 32,
        };
        let cfg = LaunchConfig {
            grid_dim: (threads.div_ceil(256).clamp(1, 1 << 20) as u32, 1, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: arguments match dequant_*_f16(const u8*, i64, i64, i64, const u64*, u16*);
        // the kernel reads rows × row_bytes bytes of w and writes rows × cols halves of out.
        self.device
            .launch_timed(&name, 0, || unsafe { b.launch(cfg) })
            .ctx(&name)?;
        Ok(())
    }

    /// `out[i] = x[i]` as f16 for i < n (n a multiple of 8), rounded to nearest even, values
    /// beyond ±65504 clamped to it (dequant.cu `activations_f16`).
    pub fn activations_f16(
        &self,
        x: &DeviceBuffer<f32>,
        n: usize,
        out: &mut DeviceBuffer<half::f16>,
    ) -> Result<()> {
        if !n.is_multiple_of(8)
            || x.len() < n
            || out.len() < n
            || !x.ptr().is_multiple_of(16)
            || !out.ptr().is_multiple_of(16)
        {
            return Err(CudaError::InvalidArgument(format!(
                "activations_f16: {n} values (a multiple of 8) from {} at {:#x} into {} at {:#x} \
                 (16-byte aligned)",
                x.len(),
                x.ptr(),
                out.len(),
                out.ptr()
            )));
        }
        let f = self.kernels.function("dequant", "activations_f16")?;
        let (xp, op, n64) = (x.ptr(), out.ptr(), n as i64);
        let mut b = self.device.launch_args(&f);
        b.arg(&xp).arg(&op).arg(&n64);
        let cfg = LaunchConfig {
            grid_dim: ((n / 8).div_ceil(256).clamp(1, 1 << 20) as u32, 1, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: arguments match activations_f16(const float*, u16*, i64); both pointers are
        // 16-byte aligned and it reads n floats of x and writes n halves of out (checked above).
        self.device
            .launch_timed("activations_f16", 0, || unsafe { b.launch(cfg) })
            .ctx("activations_f16")?;
        Ok(())
    }
}
