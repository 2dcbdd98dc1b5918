//! Tensor-core GEMM for prefill: Y = W·X with Q8_0 weights and Q8_0-quantized activations
//! (many vectors at once); kernel in `gemm_q8.cu`.
//!
//! Same conventions as [`Gpu::gemv`]: x is `n_vecs` vectors of `cols` values (as
//! [`QuantizedActivations`] of kind [`ActQuant::Q8_0`]), y is `n_vecs` vectors of `rows` f32
//! values (`y[v·rows + r]`). Each output is the Q8_0 dot product block by block: per
//! 32-element block the exact integer sum, fused-multiplied by (d_w · d_x) into an f32 sum
//! (`sum = fma(d_w · d_x, isum, sum)`, one rounding for the update, as ds4-gguf's AVX2
//! `vec_dot_q8_0` does) in ascending block order.
//!
//! What bounds it: one `mma.m16n8k32` (s8) gives the integer sums of one block for a 16 × 8
//! tile, but each of those 128 sums then needs three f32 instructions (to float, d_w·d_x, the
//! fused update) to keep the per-block rounding. With the fragment loads that is ~4.4
//! issue cycles per MMA on an SM (4 warp instructions per cycle), ~930 int8 MACs per cycle per
//! SM: about 430 TOPS-equivalent on an H100 SXM at 1.75 GHz, a fifth of the int8 tensor peak.
//! The CUDA cores, not the tensor cores, set the pace. Weights are read from memory once per
//! launch (34/32 bytes per element; the 64-vector tiles of one row tile run side by side and
//! share them through L2), so small batches are bandwidth-bound instead: 4096 × 8192 weights
//! are 35.7 MB, ~11 µs at 3.3 TB/s, while 256 vectors are 17.2 G integer ops, ~40 µs at the
//! compute ceiling (crossover near 64 vectors).

use cudarc::driver::sys::CUfunction_attribute_enum;
use cudarc::driver::{DeviceRepr, LaunchConfig};

use crate::device::{DeviceBuffer, DeviceValue};
use crate::error::{CudaError, DriverContext, Result};
use crate::gemv::{ActQuant, DeviceMatrix, QuantizedActivations, WeightFormat};
use crate::kernels::Gpu;
use crate::tensor_map::{tensor_map_3d, weight_stack_map, Element, TensorMapBytes};

/// Activation vectors per CTA (`GQ_BN` in gemm_q8.cu).
pub const GEMM_TILE_VECS: usize = 64;
/// Q8_0 blocks per K tile (`GQ_KB`).
const GEMM_TILE_BLOCKS: usize = 8;
/// Stages per CTA (double buffering).
const GEMM_STAGES: usize = 2;

/// One kernel variant: the CTA's row tile (32 rows per row warp; two vector warps).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Variant {
    name: &'static str,
    /// Weight rows per CTA (32 · WM in gemm_q8.cu).
    tile_rows: usize,
    /// CTAs that fit on one multiprocessor (shared memory and the launch bounds).
    ctas_per_sm: usize,
}

impl Variant {
    fn threads(self) -> u32 {
        2 * self.tile_rows as u32
    }

    /// Bytes of one shared-memory stage (`GQ_STAGE(WM)`): the tile's weight rows (8 raw
    /// blocks: 272 bytes each), 64 vectors of one K tile (256 bytes each, swizzled) and the
    /// vectors' block scales.
    const fn stage_bytes(self) -> usize {
        let weight_row = GEMM_TILE_BLOCKS * 34;
        let vector_row = GEMM_TILE_BLOCKS * 32;
        self.tile_rows * weight_row
            + GEMM_TILE_VECS * vector_row
            + GEMM_TILE_BLOCKS * GEMM_TILE_VECS * 4
    }

    /// The stages, one 8-byte mbarrier per stage (`GQ_BARRIERS`) and `GQ_ALIGN` bytes that let
    /// the kernel start its stages on a 1024-byte boundary (the copy engine's swizzle needs it).
    const fn shared_bytes(self) -> usize {
        GEMM_STAGES * self.stage_bytes() + 8 * GEMM_STAGES + 1024
    }
}

/// 128 × 64 tiles, 8 warps: the default.
const WIDE: Variant = Variant {
    name: "gemm_q8_0_q8x_m128",
    tile_rows: 128,
    ctas_per_sm: 2,
};
/// 64 × 64 tiles, 4 warps: twice the CTAs, for grids that would leave SMs idle.
const NARROW: Variant = Variant {
    name: "gemm_q8_0_q8x_m64",
    tile_rows: 64,
    ctas_per_sm: 3,
};
// The resident CTAs' stages fit in Hopper's 228 KiB of shared memory per SM (1 KiB reserved
// per CTA), so one CTA's copies overlap the others' math.
const _: () = assert!(WIDE.ctas_per_sm * (WIDE.shared_bytes() + 1024) <= 228 * 1024);
const _: () = assert!(NARROW.ctas_per_sm * (NARROW.shared_bytes() + 1024) <= 228 * 1024);
/// The most dynamic shared memory one of these kernels asks for (the device check in
/// compile.rs).
pub(crate) fn largest_shared_bytes() -> usize {
    WIDE.shared_bytes().max(NARROW.shared_bytes())
}
/// Most slots per launch (the grid's z dimension).
const MAX_SLOTS: usize = 65535;

const MODULE: &str = "gemm_q8";

/// Kernel parameters; layout identical to `struct GemmQ8Params` in gemm_q8.cu (the tensor map
/// 64-byte aligned at byte 128).
#[repr(C, align(64))]
#[derive(Clone, Copy, Debug, Default)]
struct GemmQ8Params {
    w: u64,
    x: u64,
    xd: u64,
    y: u64,
    ids: u64,
    row_bytes: i64,
    expert_stride: i64,
    n_experts: i64,
    n_rows: i64,
    n_blocks: i64,
    n_vecs: i64,
    x_slot_vecs: i64,
    aligned16: i64,
    x_vec_stride: i64,
    y_slot_vecs: i64,
    y_vec_stride: i64,
    /// The weights' tensor map for the copy engine (16-byte aligned weights; zeros otherwise,
    /// and unread).
    wmap: TensorMapBytes,
    /// The activations' tensor map.
    xmap: TensorMapBytes,
}
const _: () = assert!(std::mem::offset_of!(GemmQ8Params, wmap) == 128);
const _: () = assert!(std::mem::offset_of!(GemmQ8Params, xmap) == 256);
const _: () = assert!(std::mem::size_of::<GemmQ8Params>() == 384);

/// Where the expert form's slot s, vector v sits in x and y.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum SlotLayout {
    /// y vector s·n_vecs + v; x vector s·n_vecs + v when `x_per_slot`, else v.
    SlotMajor { x_per_slot: bool },
    /// x and y vector v·n_slots + s: each vector's slots side by side (a token's output
    /// groups of the attention, which needs no permutation then).
    Interleaved,
}
// SAFETY: a #[repr(C)] struct of 8-byte integers (64-byte aligned, no padding: asserted above),
// bit-for-bit the CUDA struct it is passed as.
unsafe impl DeviceRepr for GemmQ8Params {}

fn invalid(msg: String) -> CudaError {
    CudaError::InvalidArgument(msg)
}

fn check_len<T: DeviceValue>(what: &str, buf: &DeviceBuffer<T>, need: usize) -> Result<()> {
    if buf.len() < need {
        return Err(invalid(format!(
            "gemm_q8_0: {what} has {} elements, needs {need}",
            buf.len()
        )));
    }
    Ok(())
}

/// The expert forms' slot count (1..=MAX_SLOTS) and id buffer length.
fn check_slots(ids: &DeviceBuffer<i32>, n_slots: usize) -> Result<()> {
    if n_slots == 0 || n_slots > MAX_SLOTS {
        return Err(invalid(format!(
            "expert_gemm_q8_0: {n_slots} expert slots (1..={MAX_SLOTS})"
        )));
    }
    check_len("expert id buffer", ids, n_slots)
}

impl Gpu {
    /// y = W·x for `n_vecs` vectors on the tensor cores: W a Q8_0 matrix (`experts == 1`),
    /// x Q8_0 activations of `W.cols` values (at least `n_vecs` vectors), y at least
    /// `n_vecs × W.rows` values. Results equal [`Gpu::gemv`] with quantized activations up to
    /// the f32 summation order (the module's docs give this kernel's order exactly).
    pub fn gemm_q8_0(
        &self,
        w: &DeviceMatrix,
        x: &QuantizedActivations,
        n_vecs: usize,
        y: &mut DeviceBuffer<f32>,
    ) -> Result<()> {
        if w.experts != 1 {
            return Err(invalid(format!(
                "gemm_q8_0 on a stack of {} experts: use expert_gemm_q8_0",
                w.experts
            )));
        }
        let layout = SlotLayout::SlotMajor { x_per_slot: false };
        self.gemm_q8_0_launch(w, x, n_vecs, None, layout, y)
    }

    /// The expert form, with the expert ids on the device: for each slot s < n_slots, matrix
    /// e = `ids[s]` of the stack computes y vector s·n_vecs + v from x vector s·n_vecs + v
    /// (`x_per_slot`, e.g. the grouped output projection) or x vector v (all slots share the
    /// input). x holds (n_slots ×) n_vecs vectors, y n_slots × n_vecs × rows values. An id
    /// outside [0, experts) yields NaN outputs for its slot.
    #[allow(clippy::too_many_arguments)]
    pub fn expert_gemm_q8_0(
        &self,
        w: &DeviceMatrix,
        ids: &DeviceBuffer<i32>,
        n_slots: usize,
        x: &QuantizedActivations,
        x_per_slot: bool,
        n_vecs: usize,
        y: &mut DeviceBuffer<f32>,
    ) -> Result<()> {
        check_slots(ids, n_slots)?;
        let layout = SlotLayout::SlotMajor { x_per_slot };
        self.gemm_q8_0_launch(w, x, n_vecs, Some((ids, n_slots)), layout, y)
    }

    /// [`Gpu::expert_gemm_q8_0`] with every slot's own input, x and y interleaved: slot s of
    /// vector v is vector v·n_slots + s of both (the attention's grouped output projection
    /// reads each token's head groups where the attention left them and writes the groups'
    /// outputs token-major, with no permutation kernels). Same bits per output.
    pub fn expert_gemm_q8_0_interleaved(
        &self,
        w: &DeviceMatrix,
        ids: &DeviceBuffer<i32>,
        n_slots: usize,
        x: &QuantizedActivations,
        n_vecs: usize,
        y: &mut DeviceBuffer<f32>,
    ) -> Result<()> {
        check_slots(ids, n_slots)?;
        let layout = SlotLayout::Interleaved;
        self.gemm_q8_0_launch(w, x, n_vecs, Some((ids, n_slots)), layout, y)
    }

    /// Weight rows per CTA that [`Gpu::gemm_q8_0`] / [`Gpu::expert_gemm_q8_0`] use for this
    /// shape: 128, or 64 when 128-row tiles would not give every multiprocessor a CTA. Both
    /// give the same bits; tests use this to cover each.
    pub fn gemm_q8_0_tile_rows(&self, rows: usize, n_vecs: usize, n_slots: usize) -> usize {
        self.gemm_variant(rows, n_vecs, n_slots).tile_rows
    }

    fn gemm_variant(&self, rows: usize, n_vecs: usize, n_slots: usize) -> Variant {
        let sms = self.device.info().multiprocessors as usize;
        let wide_ctas = rows.div_ceil(WIDE.tile_rows) * n_vecs.div_ceil(GEMM_TILE_VECS) * n_slots;
        if wide_ctas >= sms {
            WIDE
        } else {
            NARROW
        }
    }

    fn gemm_q8_0_launch(
        &self,
        w: &DeviceMatrix,
        x: &QuantizedActivations,
        n_vecs: usize,
        ids: Option<(&DeviceBuffer<i32>, usize)>,
        layout: SlotLayout,
        y: &mut DeviceBuffer<f32>,
    ) -> Result<()> {
        if w.format != WeightFormat::Q8_0 {
            return Err(invalid(format!(
                "gemm_q8_0 needs Q8_0 weights, got {:?}",
                w.format
            )));
        }
        if x.kind != ActQuant::Q8_0 || x.len != w.cols {
            return Err(invalid(format!(
                "gemm_q8_0: weights of {} columns need Q8_0 activations of that length, got {:?} of length {}",
                w.cols, x.kind, x.len
            )));
        }
        let n_slots = ids.map_or(1, |(_, n)| n);
        // Saturating products: an absurd count then fails the length checks below.
        let x_vecs = match layout {
            SlotLayout::SlotMajor { x_per_slot: false } => n_vecs,
            _ => n_slots.saturating_mul(n_vecs),
        };
        // (x slot stride, x vector stride, y slot stride, y vector stride), in vectors.
        let (xs, xv, ys, yv) = match layout {
            SlotLayout::SlotMajor { x_per_slot } => {
                (if x_per_slot { n_vecs } else { 0 }, 1, n_vecs, 1)
            }
            SlotLayout::Interleaved => (1, n_slots, 1, n_slots),
        };
        if x.n_vecs < x_vecs {
            return Err(invalid(format!(
                "gemm_q8_0: {x_vecs} activation vectors needed, the buffer describes {}",
                x.n_vecs
            )));
        }
        let n_blocks = w.cols / 32;
        check_len("activation quants", &x.q, x_vecs.saturating_mul(w.cols))?;
        check_len("activation scales", &x.d, x_vecs.saturating_mul(n_blocks))?;
        let y_len = n_slots.saturating_mul(n_vecs).saturating_mul(w.rows);
        check_len("output", y, y_len)?;
        // The activations' tensor map needs a 16-byte aligned address (the rows are multiples
        // of 32 bytes long); the scales are 4-byte cp.async copies.
        if !x.q.ptr().is_multiple_of(16) || !x.d.ptr().is_multiple_of(4) {
            return Err(invalid(format!(
                "gemm_q8_0: activation buffers at {:#x} / {:#x} are not 16 / 4-byte aligned",
                x.q.ptr(),
                x.d.ptr()
            )));
        }
        if n_vecs == 0 {
            return Ok(());
        }
        let vec_tiles = n_vecs.div_ceil(GEMM_TILE_VECS);
        let variant = self.gemm_variant(w.rows, n_vecs, n_slots);
        let row_tiles = w.rows.div_ceil(variant.tile_rows);
        // (The copy engine's coordinates are 32-bit: vectors and rows below 2^31.)
        if n_vecs > i32::MAX as usize || row_tiles > 65535 {
            return Err(invalid(format!(
                "gemm_q8_0: {} rows x {n_vecs} vectors exceed the launch grid",
                w.rows
            )));
        }
        // The aligned path's scale copies step 32-bit offsets over a CTA's vectors: their
        // activations must span less than 4 GiB (else the general path).
        let scales_span_fits =
            (GEMM_TILE_VECS as u64).saturating_mul(xv.saturating_mul(w.cols) as u64) < 1 << 32;
        let aligned16 = w.ptr.is_multiple_of(16)
            && w.row_bytes.is_multiple_of(16)
            && w.expert_bytes().is_multiple_of(16)
            && scales_span_fits;
        let shared = variant.shared_bytes();
        // More than the default 48 KiB of dynamic shared memory must be opted into per kernel;
        // the largest shared-memory carveout lets ctas_per_sm CTAs reside on each SM (the
        // kernel reads nothing through L1 but a few activation scales).
        let f = self.kernels.function(MODULE, variant.name)?;
        f.set_attribute(
            CUfunction_attribute_enum::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
            shared as i32,
        )
        .ctx("allowing gemm_q8_0 its shared memory")?;
        f.set_attribute(
            CUfunction_attribute_enum::CU_FUNC_ATTRIBUTE_PREFERRED_SHARED_MEMORY_CARVEOUT,
            100,
        )
        .ctx("setting gemm_q8_0's shared memory carveout")?;
        let cfg = LaunchConfig {
            grid_dim: (vec_tiles as u32, row_tiles as u32, n_slots as u32),
            block_dim: (variant.threads(), 1, 1),
            shared_mem_bytes: shared as u32,
        };
        let mut params = GemmQ8Params {
            w: w.ptr,
            x: x.q.ptr(),
            xd: x.d.ptr(),
            y: y.ptr(),
            ids: ids.map_or(0, |(b, _)| b.ptr()),
            row_bytes: w.row_bytes as i64,
            expert_stride: w.expert_bytes() as i64,
            n_experts: w.experts as i64,
            n_rows: w.rows as i64,
            n_blocks: n_blocks as i64,
            n_vecs: n_vecs as i64,
            x_slot_vecs: xs as i64,
            aligned16: aligned16 as i64,
            x_vec_stride: xv as i64,
            y_slot_vecs: ys as i64,
            y_vec_stride: yv as i64,
            wmap: [0; 16],
            xmap: [0; 16],
        };
        // The weights as u16 rows, boxes of one K tile (8 blocks, 272 bytes) x tile_rows rows.
        if aligned16 {
            params.wmap = weight_stack_map(
                "gemm_q8_0's weights",
                w,
                Element::U16,
                GEMM_TILE_BLOCKS * 34,
                variant.tile_rows,
            )?;
        }
        // The activations as u8 values x vectors x slots in the order of their strides
        // (slots inside vectors when interleaved; one slot when all slots read the same
        // vectors), boxes of half a K tile (128 values) x 64 vectors, in the 128-byte
        // swizzle that the kernel's B fragment reads undo.
        let (row, vecs) = (w.cols as u64, n_vecs as u64);
        let tile = GEMM_TILE_VECS as u32;
        // The kernel puts the slot coordinate first exactly when x_vec_stride != 1.
        let (vec_stride, slot_stride) = (xv as u64 * row, xs as u64 * row);
        let (dims, strides, boxes) = if xv != 1 {
            (
                [row, n_slots as u64, vecs],
                [slot_stride, vec_stride],
                [128, 1, tile],
            )
        } else if xs != 0 {
            (
                [row, vecs, n_slots as u64],
                [vec_stride, slot_stride],
                [128, tile, 1],
            )
        } else {
            // Every slot reads the same vectors: one slot (its stride is never stepped).
            (
                [row, vecs, 1],
                [vec_stride, vecs * vec_stride],
                [128, tile, 1],
            )
        };
        params.xmap = tensor_map_3d(
            "gemm_q8_0's activations",
            x.q.ptr(),
            Element::U8,
            dims,
            strides,
            boxes,
            true,
        )?;
        let label = format!("{} {}x{} x{n_vecs}", variant.name, w.rows, w.cols);
        // Profile bytes: each slot's weights, the activations and the outputs, once each.
        let bytes = w.rows * w.row_bytes * n_slots
            + x_vecs * (w.cols + 4 * n_blocks)
            + n_slots * n_vecs * w.rows * 4;
        // SAFETY: the kernel takes one GemmQ8Params by value. It reads weight rows < rows of
        // the only matrix, or of matrix ids[s] when 0 <= ids[s] < experts (checked on the
        // device; a slot with another id reads no weights and writes NaN), all inside
        // [ptr, ptr + total_bytes), live device memory by DeviceMatrix's construction contract:
        // with aligned16 through the tensor map of exactly this matrix or stack (rows ×
        // row_bytes / 2 × experts; ptr, row_bytes and the expert stride multiples of 16, so
        // each 272-byte K tile starts 16-byte aligned), else by 2-byte loads. It reads
        // activation vectors < x_vecs through the tensor map of exactly those (the strides
        // above: slot s, vector v at s·xs + v·xv) and their scales by 4-byte copies, and writes
        // y vectors < n_slots × n_vecs (either layout maps (slot, vector) one to one into these
        // ranges), all within the buffer lengths checked above; the q / d buffers have the
        // alignment the copies need (checked above). The CTA has the variant's 2·WM warps and
        // its dynamic shared memory is the kernel's 2 stages of GQ_STAGE(WM) bytes and their
        // mbarriers, which the attribute set above allows (with 1024 bytes to align them).
        unsafe { self.launch(MODULE, variant.name, (&label, bytes), cfg, &[&params]) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The tile constants here must be the kernel's: the launch sizes its grid, CTA and shared
    /// memory from them.
    #[test]
    fn tile_constants_match_the_kernel_source() {
        let src = include_str!("gemm_q8.cu");
        let define = |name: &str| crate::compile::source_define(src, name);
        assert_eq!(define("GQ_BN"), GEMM_TILE_VECS);
        assert_eq!(define("GQ_KB"), GEMM_TILE_BLOCKS);
        assert_eq!(define("GQ_STAGES"), GEMM_STAGES);
        for v in [WIDE, NARROW] {
            // The wrapper instantiates the tile with WM = tile_rows / 32 row warps under
            // launch bounds of (64·WM threads, ctas_per_sm).
            let wm = v.tile_rows / 32;
            let wrapper = format!(
                "__launch_bounds__({}, {}) {}(const __grid_constant__ GemmQ8Params p) {{\n    PDL_ENTRY();\n    gemm_q8_0_tile<{wm}>(p);",
                v.threads(),
                v.ctas_per_sm,
                v.name
            );
            assert!(src.contains(&wrapper), "gemm_q8.cu lacks `{wrapper}`");
        }
        assert_eq!(WIDE.stage_bytes(), 53248);
        assert_eq!(NARROW.stage_bytes(), 35840);
        // Stages and their weight parts end on 1024-byte boundaries (the activations' swizzle).
        for v in [WIDE, NARROW] {
            assert_eq!(v.stage_bytes() % 1024, 0);
            assert_eq!((v.tile_rows * GEMM_TILE_BLOCKS * 34) % 1024, 0);
        }
    }
}
