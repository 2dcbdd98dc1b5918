//! Per-vector operations: RMS norm, clamped SwiGLU, activation quantization; kernels in
//! `vector_ops.cu`.

use cudarc::driver::{LaunchConfig, PushKernelArg};

use crate::device::{DeviceBuffer, DeviceValue};
use crate::error::{CudaError, DriverContext, Result};
use crate::gemv::{ActQuant, QuantizedActivations};
use crate::kernels::Gpu;

fn need<T: DeviceValue>(what: &str, b: &DeviceBuffer<T>, n: usize) -> Result<()> {
    if b.len() < n {
        return Err(CudaError::InvalidArgument(format!(
            "{what} has {} elements, needs {n}",
            b.len()
        )));
    }
    Ok(())
}

fn grid_for(n: usize, per_block: usize) -> u32 {
    n.div_ceil(per_block).clamp(1, 1 << 20) as u32
}

impl Gpu {
    /// y[r] = x[r] / sqrt(mean(x[r]²) + eps) ⊙ weight for `rows` rows of `n` (weight optional,
    /// n values). Sums of squares in f64 like the CPU reference.
    pub fn rmsnorm(
        &self,
        x: &DeviceBuffer<f32>,
        weight: Option<&DeviceBuffer<f32>>,
        n: usize,
        rows: usize,
        eps: f32,
        y: &mut DeviceBuffer<f32>,
    ) -> Result<()> {
        need("rmsnorm input", x, n * rows)?;
        need("rmsnorm output", y, n * rows)?;
        if let Some(w) = weight {
            need("rmsnorm weight", w, n)?;
        }
        if rows == 0 || n == 0 {
            return Ok(());
        }
        let f = self.kernels.function("vector_ops", "rmsnorm_f32")?;
        let (xp, wp, yp, n64) = (x.ptr(), weight.map_or(0, |w| w.ptr()), y.ptr(), n as i64);
        let mut b = self.device.stream().launch_builder(&f);
        b.arg(&xp).arg(&wp).arg(&yp).arg(&n64).arg(&eps);
        let cfg = LaunchConfig {
            grid_dim: (rows as u32, 1, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: arguments match rmsnorm_f32(const float*, const float*, float*, i64, float);
        // x and y hold rows × n values and w (when non-null) n values, checked above.
        self.device
            .launch_timed("rmsnorm_f32", 0, || unsafe { b.launch(cfg) })
            .ctx("rmsnorm_f32")?;
        Ok(())
    }

    /// out[i] = silu(min(gate[i], limit)) · clamp(up[i], ±limit) · weight[i / per_slot] over n
    /// values (`limit` None: no clamp; `weight` None: 1). The weight lives on the device (the
    /// router's output), one per slot of `per_slot` values.
    #[allow(clippy::too_many_arguments)]
    pub fn swiglu_clamp(
        &self,
        gate: &DeviceBuffer<f32>,
        up: &DeviceBuffer<f32>,
        n: usize,
        per_slot: usize,
        limit: Option<f32>,
        weight: Option<&DeviceBuffer<f32>>,
        out: &mut DeviceBuffer<f32>,
    ) -> Result<()> {
        need("swiglu gate", gate, n)?;
        need("swiglu up", up, n)?;
        need("swiglu output", out, n)?;
        if per_slot == 0 {
            return Err(CudaError::InvalidArgument(
                "swiglu per_slot must be > 0".into(),
            ));
        }
        if let Some(w) = weight {
            need("swiglu weights", w, n.div_ceil(per_slot))?;
        }
        if n == 0 {
            return Ok(());
        }
        let f = self.kernels.function("vector_ops", "swiglu_clamp_f32")?;
        let (gp, upp, op, wp) = (
            gate.ptr(),
            up.ptr(),
            out.ptr(),
            weight.map_or(0, |w| w.ptr()),
        );
        let (n64, ps64, lim) = (n as i64, per_slot as i64, limit.unwrap_or(f32::INFINITY));
        let mut b = self.device.stream().launch_builder(&f);
        b.arg(&gp)
            .arg(&upp)
            .arg(&op)
            .arg(&wp)
            .arg(&n64)
            .arg(&ps64)
            .arg(&lim);
        let cfg = LaunchConfig {
            grid_dim: (grid_for(n, 256), 1, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: arguments match swiglu_clamp_f32(const float*, const float*, float*,
        // const float*, i64, i64, float); all buffers were length-checked above.
        self.device
            .launch_timed("swiglu_clamp_f32", 0, || unsafe { b.launch(cfg) })
            .ctx("swiglu_clamp_f32")?;
        Ok(())
    }

    /// Allocates room for `n_vecs` quantized vectors of `len` values.
    pub fn alloc_quantized(
        &self,
        kind: ActQuant,
        len: usize,
        n_vecs: usize,
    ) -> Result<QuantizedActivations> {
        if !len.is_multiple_of(kind.block_elems()) {
            return Err(CudaError::InvalidArgument(format!(
                "{kind:?} activations of {len} values are not whole blocks of {}",
                kind.block_elems()
            )));
        }
        Ok(QuantizedActivations {
            kind,
            len,
            n_vecs,
            q: self.device.alloc(len * n_vecs)?,
            d: self.device.alloc(len * n_vecs / kind.block_elems())?,
        })
    }

    /// Quantizes the first `out.n_vecs` vectors of x (each `out.len` values) into `out`.
    pub fn quantize_activations(
        &self,
        x: &DeviceBuffer<f32>,
        out: &mut QuantizedActivations,
    ) -> Result<()> {
        let total = out.len * out.n_vecs;
        need("activations", x, total)?;
        let blocks = total / out.kind.block_elems();
        if blocks == 0 {
            return Ok(());
        }
        let name = match out.kind {
            ActQuant::Q8_0 => "quantize_q8_0_f32",
            ActQuant::Q8K => "quantize_q8_k_f32",
        };
        let f = self.kernels.function("vector_ops", name)?;
        let (xp, qp, dp, nb) = (x.ptr(), out.q.ptr(), out.d.ptr(), blocks as i64);
        let mut b = self.device.stream().launch_builder(&f);
        b.arg(&xp).arg(&qp).arg(&dp).arg(&nb);
        // One warp per block, 8 warps per CTA.
        let cfg = LaunchConfig {
            grid_dim: (grid_for(blocks, 8), 1, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: arguments match quantize_*_f32(const float*, i8*, float*, i64); q and d were
        // allocated for exactly `blocks` blocks by alloc_quantized and x holds them (checked).
        self.device
            .launch_timed(name, 0, || unsafe { b.launch(cfg) })
            .ctx(name)?;
        Ok(())
    }
}
