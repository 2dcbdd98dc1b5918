//! Per-vector operations: RMS norm, clamped SwiGLU, activation quantization; kernels in
//! `vector_ops.cu`.

use cudarc::driver::LaunchConfig;

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

/// Values per "segment", a thread's unit of work in `vector_ops.cu` (SEG).
const SEG: usize = 8;
/// Most threads per row of the RMS norm kernels (RMS_THREADS in `row_norm.cuh`).
const RMS_THREADS: usize = 512;
/// Threads per CTA of the standalone quantizers and the SwiGLU.
const FLAT_THREADS: usize = 128;

/// The rmsnorm kernels by [quantizers: bit 0 Q8_0, bit 1 Q8_K][bit 0 _v4, bit 1 _long].
const RMSNORM_KERNELS: [[&str; 4]; 4] = [
    [
        "rmsnorm_f32",
        "rmsnorm_f32_v4",
        "rmsnorm_f32_long",
        "rmsnorm_f32_v4_long",
    ],
    [
        "rmsnorm_q8_0_f32",
        "rmsnorm_q8_0_f32_v4",
        "rmsnorm_q8_0_f32_long",
        "rmsnorm_q8_0_f32_v4_long",
    ],
    [
        "rmsnorm_q8_k_f32",
        "rmsnorm_q8_k_f32_v4",
        "rmsnorm_q8_k_f32_long",
        "rmsnorm_q8_k_f32_v4_long",
    ],
    [
        "rmsnorm_q8_0_q8_k_f32",
        "rmsnorm_q8_0_q8_k_f32_v4",
        "rmsnorm_q8_0_q8_k_f32_long",
        "rmsnorm_q8_0_q8_k_f32_v4_long",
    ],
];

/// The SwiGLU kernels by [quantizer: none, Q8_0, Q8_K][bit 0 _v4].
const SWIGLU_KERNELS: [[&str; 2]; 3] = [
    ["swiglu_clamp_f32", "swiglu_clamp_f32_v4"],
    ["swiglu_clamp_q8_0_f32", "swiglu_clamp_q8_0_f32_v4"],
    ["swiglu_clamp_q8_k_f32", "swiglu_clamp_q8_k_f32_v4"],
];

/// The standalone quantizers by [Q8_0, Q8_K][bit 0 _v4].
const QUANTIZE_KERNELS: [[&str; 2]; 2] = [
    ["quantize_q8_0_f32", "quantize_q8_0_f32_v4"],
    ["quantize_q8_k_f32", "quantize_q8_k_f32_v4"],
];

/// Row of a kernel table for a quantizer kind.
fn kind_index(kind: ActQuant) -> usize {
    match kind {
        ActQuant::Q8_0 => 0,
        ActQuant::Q8K => 1,
    }
}

/// Threads for one row of `n` values: one segment each while the row has at most 512, a
/// multiple of 32 (whole warps; the quantizers shuffle within them).
fn rms_threads(n: usize) -> u32 {
    n.div_ceil(SEG).next_multiple_of(32).clamp(32, RMS_THREADS) as u32
}

/// Whether the `_v4` kernels apply: every float pointer 16-byte aligned, every int8 output
/// 8-byte aligned (0: none), and rows a multiple of 8 values (a segment is two whole float4).
fn vectorizable(f32_ptrs: &[u64], q_ptrs: &[u64], n: usize) -> bool {
    n.is_multiple_of(SEG)
        && f32_ptrs.iter().all(|p| p.is_multiple_of(16))
        && q_ptrs.iter().all(|p| p.is_multiple_of(8))
}

/// Checks that `qa` can receive `total` values as whole vectors of `qa.len` values (whole
/// blocks of its kind); returns the number of vectors.
fn quantized_room(what: &str, qa: &QuantizedActivations, total: usize) -> Result<usize> {
    let block = qa.kind.block_elems();
    if qa.len == 0 || !qa.len.is_multiple_of(block) || !total.is_multiple_of(qa.len) {
        return Err(CudaError::InvalidArgument(format!(
            "{what}: {total} values are not whole {:?} vectors of {} values (blocks of {block})",
            qa.kind, qa.len
        )));
    }
    need(&format!("{what} int8 output"), &qa.q, total)?;
    need(&format!("{what} scales"), &qa.d, total / block)?;
    Ok(total / qa.len)
}

/// A grid dimension, or an error when the work does not fit one launch.
fn grid_dim(what: &str, n: usize) -> Result<u32> {
    u32::try_from(n)
        .ok()
        .filter(|&g| g <= i32::MAX as u32)
        .ok_or_else(|| CudaError::InvalidArgument(format!("{what}: {n} CTAs do not fit a grid")))
}

impl Gpu {
    /// `y[r] = x[r] / sqrt(mean(x[r]²) + eps) ⊙ weight` for `rows` rows of `n` (weight optional,
    /// n values). Sums of squares in f64 like the CPU reference (only their order differs).
    pub fn rmsnorm(
        &self,
        x: &DeviceBuffer<f32>,
        weight: Option<&DeviceBuffer<f32>>,
        n: usize,
        rows: usize,
        eps: f32,
        y: &mut DeviceBuffer<f32>,
    ) -> Result<()> {
        self.launch_rmsnorm(x, weight, n, rows, eps, y, None, None)
    }

    /// [`Gpu::rmsnorm`] and [`Gpu::quantize_activations`] of its output in one launch: y is
    /// written as by `rmsnorm`, and `qa` receives exactly what `quantize_activations(y, qa)`
    /// would produce for the `rows` vectors. `qa.len` must be `n` (whole blocks of its kind)
    /// and `qa` must have room for `rows` vectors; on success `qa.n_vecs` is set to `rows`.
    #[allow(clippy::too_many_arguments)]
    pub fn rmsnorm_quantized(
        &self,
        x: &DeviceBuffer<f32>,
        weight: Option<&DeviceBuffer<f32>>,
        n: usize,
        rows: usize,
        eps: f32,
        y: &mut DeviceBuffer<f32>,
        qa: &mut QuantizedActivations,
    ) -> Result<()> {
        let (mut q8_0, mut q8_k) = (None, None);
        match qa.kind {
            ActQuant::Q8_0 => q8_0 = Some(&mut *qa),
            ActQuant::Q8K => q8_k = Some(&mut *qa),
        }
        self.launch_rmsnorm(x, weight, n, rows, eps, y, q8_0, q8_k)
    }

    /// [`Gpu::rmsnorm_quantized`] into both activation formats at once (a normalized vector
    /// that feeds Q8_0 matrices and K-quant/IQ ones): `q8_0` (kind Q8_0) and `q8_k` (kind Q8K)
    /// each receive what `quantize_activations(y, ..)` would produce; n must be a multiple of
    /// 256. On success both `n_vecs` are set to `rows`.
    #[allow(clippy::too_many_arguments)]
    pub fn rmsnorm_quantized_both(
        &self,
        x: &DeviceBuffer<f32>,
        weight: Option<&DeviceBuffer<f32>>,
        n: usize,
        rows: usize,
        eps: f32,
        y: &mut DeviceBuffer<f32>,
        q8_0: &mut QuantizedActivations,
        q8_k: &mut QuantizedActivations,
    ) -> Result<()> {
        if q8_0.kind != ActQuant::Q8_0 || q8_k.kind != ActQuant::Q8K {
            return Err(CudaError::InvalidArgument(format!(
                "rmsnorm_quantized_both: outputs of kinds {:?} and {:?}, expected Q8_0 and Q8K",
                q8_0.kind, q8_k.kind
            )));
        }
        self.launch_rmsnorm(x, weight, n, rows, eps, y, Some(q8_0), Some(q8_k))
    }

    /// Launches one of the rmsnorm kernels: one CTA per row, quantizing into the given outputs
    /// (`q8_0` of kind Q8_0, `q8_k` of kind Q8K, as the callers pass them), whose `n_vecs`
    /// become `rows`.
    #[allow(clippy::too_many_arguments)]
    fn launch_rmsnorm(
        &self,
        x: &DeviceBuffer<f32>,
        weight: Option<&DeviceBuffer<f32>>,
        n: usize,
        rows: usize,
        eps: f32,
        y: &mut DeviceBuffer<f32>,
        q8_0: Option<&mut QuantizedActivations>,
        q8_k: Option<&mut QuantizedActivations>,
    ) -> Result<()> {
        need("rmsnorm input", x, n * rows)?;
        need("rmsnorm output", y, n * rows)?;
        if let Some(w) = weight {
            need("rmsnorm weight", w, n)?;
        }
        for qa in q8_0.iter().chain(q8_k.iter()) {
            if qa.len != n {
                return Err(CudaError::InvalidArgument(format!(
                    "rmsnorm_quantized: rows of {n} values into {:?} vectors of {}",
                    qa.kind, qa.len
                )));
            }
            quantized_room("rmsnorm_quantized", qa, n * rows)?;
        }
        let ptrs = |qa: &Option<&mut QuantizedActivations>| {
            qa.as_ref().map_or((0, 0), |qa| (qa.q.ptr(), qa.d.ptr()))
        };
        let ((q0p, d0p), (qkp, dkp)) = (ptrs(&q8_0), ptrs(&q8_k));
        if rows > 0 && n > 0 {
            let (xp, wp, yp) = (x.ptr(), weight.map_or(0, |w| w.ptr()), y.ptr());
            let mut f32_ptrs = vec![xp, yp];
            f32_ptrs.extend(weight.map(|w| w.ptr()));
            let v4 = vectorizable(&f32_ptrs, &[q0p, qkp], n);
            let quant = q8_0.is_some() as usize | (q8_k.is_some() as usize) << 1;
            let long = n.div_ceil(SEG) > RMS_THREADS;
            let name = RMSNORM_KERNELS[quant][v4 as usize | (long as usize) << 1];
            let f = self.kernels.function("vector_ops", name)?;
            let n64 = n as i64;
            let mut b = self.device.launch_args(&f);
            b.arg(&xp)
                .arg(&wp)
                .arg(&yp)
                .arg(&q0p)
                .arg(&d0p)
                .arg(&qkp)
                .arg(&dkp)
                .arg(&n64)
                .arg(&eps);
            let cfg = LaunchConfig {
                grid_dim: (grid_dim(name, rows)?, 1, 1),
                block_dim: (rms_threads(n), 1, 1),
                shared_mem_bytes: 0,
            };
            // SAFETY: arguments match rmsnorm*_f32(const float* x, const float* w, float* y,
            // i8* q0, float* d0, i8* qk, float* dk, i64 n, float eps); x and y hold rows × n
            // values and w (when non-null) n values; each selected quantized output holds
            // rows × n int8 values and one f32 per block, n being whole blocks (all checked
            // above); unselected outputs are null and unused; the _v4 kernels are chosen only
            // when their alignment conditions hold; blockDim is a multiple of 32, at most 512,
            // and the short-row kernels (one register-cached segment per thread) get rows of at
            // most 512 segments, which they also handle correctly beyond that (second read).
            self.device
                .launch_timed(name, 0, || unsafe { b.launch(cfg) })
                .ctx(name)?;
        }
        for qa in q8_0.into_iter().chain(q8_k) {
            qa.n_vecs = rows;
        }
        Ok(())
    }

    /// `out[i] = silu(min(gate[i], limit)) · clamp(up[i], ±limit) · weight[i / per_slot]` over n
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
        self.launch_swiglu(gate, up, n, per_slot, limit, weight, out, None)
    }

    /// [`Gpu::swiglu_clamp`] and [`Gpu::quantize_activations`] of its output in one launch:
    /// out is written as by `swiglu_clamp`, and `qa` receives exactly what
    /// `quantize_activations(out, qa)` would produce. The n values are cut into vectors of
    /// `qa.len` (n must be a multiple of it, e.g. slots × per_slot with `qa.len == per_slot`);
    /// on success `qa.n_vecs` is set to `n / qa.len`.
    #[allow(clippy::too_many_arguments)]
    pub fn swiglu_clamp_quantized(
        &self,
        gate: &DeviceBuffer<f32>,
        up: &DeviceBuffer<f32>,
        n: usize,
        per_slot: usize,
        limit: Option<f32>,
        weight: Option<&DeviceBuffer<f32>>,
        out: &mut DeviceBuffer<f32>,
        qa: &mut QuantizedActivations,
    ) -> Result<()> {
        let n_vecs = quantized_room("swiglu_clamp_quantized", qa, n)?;
        self.launch_swiglu(gate, up, n, per_slot, limit, weight, out, Some(&mut *qa))?;
        qa.n_vecs = n_vecs;
        Ok(())
    }

    /// Launches one of the SwiGLU kernels, one 8-value segment per thread, quantizing into
    /// `qa` when given (its room already checked by the caller).
    #[allow(clippy::too_many_arguments)]
    fn launch_swiglu(
        &self,
        gate: &DeviceBuffer<f32>,
        up: &DeviceBuffer<f32>,
        n: usize,
        per_slot: usize,
        limit: Option<f32>,
        weight: Option<&DeviceBuffer<f32>>,
        out: &mut DeviceBuffer<f32>,
        qa: Option<&mut QuantizedActivations>,
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
        let (gp, upp, op, wp) = (
            gate.ptr(),
            up.ptr(),
            out.ptr(),
            weight.map_or(0, |w| w.ptr()),
        );
        let (qp, dp) = qa.as_ref().map_or((0, 0), |qa| (qa.q.ptr(), qa.d.ptr()));
        let v4 = per_slot.is_multiple_of(SEG) && vectorizable(&[gp, upp, op], &[qp], n);
        let name = SWIGLU_KERNELS[qa.map_or(0, |qa| 1 + kind_index(qa.kind))][v4 as usize];
        let f = self.kernels.function("vector_ops", name)?;
        let (n64, ps64, lim) = (n as i64, per_slot as i64, limit.unwrap_or(f32::INFINITY));
        let mut b = self.device.launch_args(&f);
        b.arg(&gp)
            .arg(&upp)
            .arg(&op)
            .arg(&wp)
            .arg(&qp)
            .arg(&dp)
            .arg(&n64)
            .arg(&ps64)
            .arg(&lim);
        let cfg = LaunchConfig {
            grid_dim: (grid_dim(name, n.div_ceil(SEG * FLAT_THREADS))?, 1, 1),
            block_dim: (FLAT_THREADS as u32, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: arguments match swiglu_clamp*_f32(const float* gate, const float* up,
        // float* out, const float* weight, i8* q, float* d, i64 n, i64 per_slot, float limit);
        // gate, up and out hold n values, weight (when non-null) one per slot (checked above);
        // with a quantizer q holds n int8 values and d one f32 per block, n being whole blocks
        // (checked by swiglu_clamp_quantized), else q and d are null and unused; _v4 only when
        // its alignment conditions hold (and per_slot % 8 == 0).
        self.device
            .launch_timed(name, 0, || unsafe { b.launch(cfg) })
            .ctx(name)?;
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
        if total == 0 {
            return Ok(());
        }
        quantized_room("quantize_activations", out, total)?;
        let v4 = vectorizable(&[x.ptr()], &[out.q.ptr()], total);
        let name = QUANTIZE_KERNELS[kind_index(out.kind)][v4 as usize];
        let f = self.kernels.function("vector_ops", name)?;
        let segments = total / SEG;
        let (xp, qp, dp, nseg) = (x.ptr(), out.q.ptr(), out.d.ptr(), segments as i64);
        let mut b = self.device.launch_args(&f);
        b.arg(&xp).arg(&qp).arg(&dp).arg(&nseg);
        // One 8-value segment per thread: a Q8_0 block is 4 lanes, a Q8_K block one warp.
        let cfg = LaunchConfig {
            grid_dim: (grid_dim(name, segments.div_ceil(FLAT_THREADS))?, 1, 1),
            block_dim: (FLAT_THREADS as u32, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: arguments match quantize_*_f32(const float*, i8*, float*, i64); x holds the
        // `total` values, q `total` int8 and d one f32 per block (checked above); total is whole
        // blocks, so every warp covers whole blocks; _v4 only when its alignment holds.
        self.device
            .launch_timed(name, 0, || unsafe { b.launch(cfg) })
            .ctx(name)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn short_rows_get_one_segment_per_thread_in_whole_warps() {
        assert_eq!(rms_threads(4096), 512);
        assert_eq!(rms_threads(1024), 128);
        assert_eq!(rms_threads(128), 32);
        assert_eq!(rms_threads(7), 32);
        assert_eq!(rms_threads(4100), 512);
        assert_eq!(rms_threads(16384), 512);
        for n in [1, 100, 333, 4095, 9999] {
            assert!(rms_threads(n).is_multiple_of(32) && rms_threads(n) as usize <= RMS_THREADS);
        }
    }

    #[test]
    fn vector_kernels_need_alignment_and_whole_segments() {
        assert!(vectorizable(&[256, 4096], &[0, 1024], 4096));
        assert!(!vectorizable(&[256, 4100], &[], 4096));
        assert!(!vectorizable(&[256], &[1028], 4096));
        assert!(!vectorizable(&[256], &[], 4100));
    }

    /// Every kernel name the launchers use is a symbol of the compiled module (libnvrtc
    /// needed, no GPU).
    #[test]
    fn every_launched_kernel_exists_in_the_module() {
        if !crate::device::nvrtc_present() {
            eprintln!("skipped: no CUDA (libnvrtc.so not found)");
            return;
        }
        let m = crate::kernels::MODULES
            .iter()
            .find(|m| m.name == "vector_ops")
            .expect("vector_ops module");
        let cubin = crate::compile::compile_cubin(m.name, &m.full_source(), "sm_90a")
            .unwrap_or_else(|e| panic!("{e}"));
        let names = RMSNORM_KERNELS
            .iter()
            .flatten()
            .chain(SWIGLU_KERNELS.iter().flatten())
            .chain(QUANTIZE_KERNELS.iter().flatten());
        for name in names {
            let sym = format!("\0{name}\0");
            assert!(
                cubin.windows(sym.len()).any(|w| w == sym.as_bytes()),
                "kernel {name} is not in vector_ops.cu"
            );
        }
    }
}
