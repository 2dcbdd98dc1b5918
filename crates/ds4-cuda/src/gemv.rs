//! Matrix-vector products on device-resident ggml weights (decode's bandwidth-bound core);
//! kernels in `gemv.cu`.
//!
//! Conventions: a [`DeviceMatrix`] has `rows` output rows of `cols` input elements, stored as
//! ggml rows (`row_bytes` each). Activations are `n_vecs` vectors of `cols` values laid end to
//! end; outputs are `n_vecs` vectors of `rows` values. Two activation forms:
//! - [`Activations::F32`]: plain f32 (any format);
//! - [`Activations::Quantized`]: int8 + per-block f32 scale, from
//!   [`Gpu::quantize_activations`] — Q8_0 blocks for Q8_0 weights, Q8_K blocks for Q2_K, Q4_K
//!   and IQ2_XXS weights. This is ds4's decode numerics: the integer sums equal the CPU's
//!   `vec_dot_*` exactly.
//!
//! Experts: [`Gpu::expert_gemv`] takes the selected expert ids from a device buffer, so the
//! router's choice never goes through the host. For prefill, [`Gpu::expert_gemv_grouped`] takes
//! the vectors sorted by expert with each expert's range on the device, and reads each expert's
//! weights once for all of its vectors (same bits per vector as `expert_gemv`).
//!
//! Launch shape (`LaunchShape::choose`): rows are taken in groups of R (1 or 4 for F16/F32,
//! 2 for the quantized formats), and `split` warps share each group, each taking a part of
//! every row, so that matrices with few rows still spread over the GPU (256 × 4096 F16 for
//! one vector: 64 CTAs of 8 warps, 4 rows each, every warp taking an eighth of each row).
//! `split` comes from the matrix shape alone, so a row's bits never depend on R, the batch,
//! the expert count, the warps knob or the GPU. Up to 8 vectors run per launch; for prefill,
//! when every warp's stage holds all of its part of a row group, one launch runs all whole
//! batches of 8 vectors against the staged weights.

use std::marker::PhantomData;

use cudarc::driver::{DeviceRepr, LaunchConfig};
use ds4_gguf::GgmlType;

use crate::device::{DeviceBuffer, DeviceValue};
use crate::error::{CudaError, Result};
use crate::kernels::Gpu;

/// Weight formats with a GEMV kernel.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum WeightFormat {
    F32,
    F16,
    Q8_0,
    Q2K,
    Q4K,
    IQ2XXS,
}

impl WeightFormat {
    pub const ALL: [WeightFormat; 6] = [
        WeightFormat::F32,
        WeightFormat::F16,
        WeightFormat::Q8_0,
        WeightFormat::Q2K,
        WeightFormat::Q4K,
        WeightFormat::IQ2XXS,
    ];

    pub fn from_ggml(t: GgmlType) -> Option<WeightFormat> {
        Some(match t {
            GgmlType::F32 => WeightFormat::F32,
            GgmlType::F16 => WeightFormat::F16,
            GgmlType::Q8_0 => WeightFormat::Q8_0,
            GgmlType::Q2K => WeightFormat::Q2K,
            GgmlType::Q4K => WeightFormat::Q4K,
            GgmlType::IQ2XXS => WeightFormat::IQ2XXS,
            _ => return None,
        })
    }

    pub fn ggml(self) -> GgmlType {
        match self {
            WeightFormat::F32 => GgmlType::F32,
            WeightFormat::F16 => GgmlType::F16,
            WeightFormat::Q8_0 => GgmlType::Q8_0,
            WeightFormat::Q2K => GgmlType::Q2K,
            WeightFormat::Q4K => GgmlType::Q4K,
            WeightFormat::IQ2XXS => GgmlType::IQ2XXS,
        }
    }

    /// The kernel name stem in gemv.cu / dequant.cu.
    pub(crate) fn tag(self) -> &'static str {
        match self {
            WeightFormat::F32 => "f32",
            WeightFormat::F16 => "f16",
            WeightFormat::Q8_0 => "q8_0",
            WeightFormat::Q2K => "q2_k",
            WeightFormat::Q4K => "q4_k",
            WeightFormat::IQ2XXS => "iq2_xxs",
        }
    }

    /// The activation quantization the dp4a kernel of this format expects (None: f32 only).
    pub fn activation_quant(self) -> Option<ActQuant> {
        match self {
            WeightFormat::F32 | WeightFormat::F16 => None,
            WeightFormat::Q8_0 => Some(ActQuant::Q8_0),
            WeightFormat::Q2K | WeightFormat::Q4K | WeightFormat::IQ2XXS => Some(ActQuant::Q8K),
        }
    }
}

/// How activations are quantized for the dp4a kernels.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ActQuant {
    /// 32 values per f32 scale, round-half-even (ds4's Q8_0 matmul input).
    Q8_0,
    /// 256 values per f32 scale, ggml's Q8_K quantizer (ds4's expert input).
    Q8K,
}

impl ActQuant {
    pub fn block_elems(self) -> usize {
        match self {
            ActQuant::Q8_0 => 32,
            ActQuant::Q8K => 256,
        }
    }
}

/// Quantized activations on the device: `q` holds n_vecs × len int8 values, `d` one f32 scale
/// per block (element i of vector v has scale d[(v·len + i) / block]).
pub struct QuantizedActivations {
    pub kind: ActQuant,
    pub len: usize,
    pub n_vecs: usize,
    pub q: DeviceBuffer<i8>,
    pub d: DeviceBuffer<f32>,
}

/// The input of a GEMV.
#[derive(Clone, Copy)]
pub enum Activations<'a> {
    F32(&'a DeviceBuffer<f32>),
    Quantized(&'a QuantizedActivations),
}

/// A weight matrix (or a stack of equally shaped experts) in device memory, borrowed from the
/// buffer that holds it (usually [`crate::DeviceWeights`]).
#[derive(Clone, Copy, Debug)]
pub struct DeviceMatrix<'a> {
    /// Device address of the first row (of expert 0).
    pub ptr: u64,
    pub format: WeightFormat,
    /// Input elements per row (ggml dim 0).
    pub cols: usize,
    /// Output rows (ggml dim 1).
    pub rows: usize,
    pub row_bytes: usize,
    /// 1 for a plain matrix; the expert count (ggml dim 2) for a stack.
    pub experts: usize,
    _buf: PhantomData<&'a DeviceBuffer<u8>>,
}

impl<'a> DeviceMatrix<'a> {
    /// `experts` stacked `rows × cols` matrices of `format` at byte `offset` of `buf`
    /// (errors when they do not fit inside it).
    pub fn in_buffer(
        buf: &'a DeviceBuffer<u8>,
        offset: usize,
        format: WeightFormat,
        cols: usize,
        rows: usize,
        experts: usize,
    ) -> Result<DeviceMatrix<'a>> {
        // SAFETY: the range check below keeps the matrix inside `buf`, which the lifetime
        // keeps alive.
        let m = unsafe {
            DeviceMatrix::from_raw(buf.ptr() + offset as u64, format, cols, rows, experts)?
        };
        if offset
            .checked_add(m.total_bytes())
            .is_none_or(|end| end > buf.len())
        {
            return Err(CudaError::InvalidArgument(format!(
                "{format:?} matrix {cols}x{rows}x{experts} ({} bytes) at offset {offset} exceeds the {}-byte buffer",
                m.total_bytes(),
                buf.len()
            )));
        }
        Ok(m)
    }

    /// Describes `experts` stacked `rows × cols` matrices of `format` at device address `ptr`.
    ///
    /// # Safety
    /// `[ptr, ptr + total_bytes)` must be device memory of this context that stays allocated
    /// for `'a`.
    pub unsafe fn from_raw(
        ptr: u64,
        format: WeightFormat,
        cols: usize,
        rows: usize,
        experts: usize,
    ) -> Result<DeviceMatrix<'a>> {
        let row_bytes = format.ggml().row_bytes(cols as u64).ok_or_else(|| {
            CudaError::InvalidArgument(format!(
                "{:?} rows of {cols} elements are not whole blocks of {}",
                format,
                format.ggml().block_elems()
            ))
        })? as usize;
        // Every format is read in units of at least 2 bytes (F32: 4).
        let align = if format == WeightFormat::F32 { 4 } else { 2 };
        if !ptr.is_multiple_of(align) {
            return Err(CudaError::InvalidArgument(format!(
                "{format:?} matrix at device address {ptr:#x} is not {align}-byte aligned"
            )));
        }
        if rows == 0 || cols == 0 || experts == 0 {
            return Err(CudaError::InvalidArgument(format!(
                "empty matrix {cols}x{rows}x{experts}"
            )));
        }
        Ok(DeviceMatrix {
            ptr,
            format,
            cols,
            rows,
            row_bytes,
            experts,
            _buf: PhantomData,
        })
    }

    pub fn expert_bytes(&self) -> usize {
        self.rows * self.row_bytes
    }

    pub fn total_bytes(&self) -> usize {
        self.expert_bytes() * self.experts
    }
}

/// Which expert each slot (grid row `blockIdx.y`) of a launch multiplies by.
#[derive(Clone, Copy)]
enum Slots<'a> {
    /// One slot: a plain matrix.
    One,
    /// Slot s takes expert `ids[s]` of the n slots, read on the device.
    Ids(&'a DeviceBuffer<i32>, usize),
    /// Slot s takes expert s of a stack of n.
    Stack(usize),
}

/// The part of `bytes` bytes at device address `ptr` that a bulk L2 prefetch may name: from
/// the first 16-byte boundary, whole 16-byte units (a model file's alignment may place a matrix
/// anywhere).
fn prefetch_range(ptr: u64, bytes: u64) -> (u64, u64) {
    let start = ptr.next_multiple_of(16);
    let end = ptr.saturating_add(bytes);
    (start, end.saturating_sub(start) & !15)
}

/// Kernel parameters; layout identical to `struct GemvParams` in gemv.cu.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
struct GemvParams {
    w: u64,
    x: u64,
    xd: u64,
    y: u64,
    ids: u64,
    grid: u64,
    row_bytes: i64,
    expert_stride: i64,
    n_experts: i64,
    n_rows: i64,
    k: i64,
    x_slot_vecs: i64,
    y_slot_vecs: i64,
    aligned16: i64,
    split: i64,
    n_batches: i64,
    w_pair: u64,
    y_pair: u64,
    groups: u64,
    n_vecs_total: i64,
}
// SAFETY: a #[repr(C)] struct of 8-byte integers, bit-for-bit the CUDA struct it is passed as.
unsafe impl DeviceRepr for GemvParams {}

/// Rows per row group (R) of the block-quantized kernels (`GEMV_Q` in gemv.cu).
const QUANT_ROWS_PER_GROUP: usize = 2;
/// Most warps per CTA the kernels are compiled for (`__launch_bounds__`).
pub const GEMV_MAX_WARPS: usize = 8;
/// Warps that keep an H100 busy (132 SMs × 16): quantized rows longer than 8 chunks are split
/// across up to 8 warps until a matrix has about this many warps' worth of work.
const TARGET_WARPS: usize = 2048;

/// Bytes of one row's chunk staged in shared memory (`Fmt<>::CB * Fmt<>::BB` in gemv.cu);
/// 0 for the formats read straight from global memory.
fn stage_chunk_bytes(format: WeightFormat) -> usize {
    match format {
        WeightFormat::F32 | WeightFormat::F16 => 0,
        WeightFormat::Q8_0 => 32 * 34,
        WeightFormat::Q2K => 8 * 84,
        WeightFormat::Q4K => 8 * 144,
        WeightFormat::IQ2XXS => 16 * 66,
    }
}

/// Shared-memory bytes of the decode tables a kernel keeps before its stages (IQ2_XXS: 384
/// words, `IQ2_TAB_BYTES` in gemv.cu); 0 for the other formats.
fn table_bytes(format: WeightFormat) -> usize {
    if format == WeightFormat::IQ2XXS {
        384 * 4
    } else {
        0
    }
}

/// Bytes of the stage barriers the quantized kernels keep after their tables: two 8-byte
/// mbarriers per warp, for the most warps a CTA has (`GEMV_BAR_BYTES` in gemv.cu).
const STAGE_BARRIER_BYTES: usize = GEMV_MAX_WARPS * 16;

/// Dynamic shared memory of a matvec launch: for the block-quantized formats the decode tables
/// (IQ2_XXS), each warp's two stage barriers and two stage buffers of R chunks (the layout
/// gemv.cu's StageBase and stages give it); 0 for F16/F32, which read global memory directly.
fn gemv_shared_bytes(format: WeightFormat, warps: usize, rows_per_group: usize) -> usize {
    match stage_chunk_bytes(format) {
        0 => 0,
        chunk => table_bytes(format) + STAGE_BARRIER_BYTES + warps * 2 * rows_per_group * chunk,
    }
}

/// Whether the kernels may use 16-byte loads on `w` (and the paired `w2`, same shape): base,
/// rows and the expert stride all multiples of 16 bytes.
pub(crate) fn aligned16(w: &DeviceMatrix, w2: Option<&DeviceMatrix>) -> bool {
    w.row_bytes.is_multiple_of(16)
        && w.expert_bytes().is_multiple_of(16)
        && w.ptr.is_multiple_of(16)
        && w2.is_none_or(|w2| w2.ptr.is_multiple_of(16))
}

/// Staged chunks per row of a quantized matrix.
fn quant_chunks(w: &DeviceMatrix) -> usize {
    w.row_bytes.div_ceil(stage_chunk_bytes(w.format))
}

/// How one matrix is cut into CTAs. The summation order of a row depends only on `split`,
/// which depends only on the matrix shape (never on the batch, the expert count, the warps
/// knob or the GPU), so every launch of a matrix gives the same bits.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct LaunchShape {
    /// Warps that share one row group (each takes a part of every row).
    split: usize,
    /// Warps per CTA (a multiple of `split`).
    warps: usize,
    /// Rows per row group (R: which kernel variant).
    rows_per_group: usize,
    /// CTAs along the rows (one pass over the row blocks, unless capped).
    grid_x: usize,
}

impl LaunchShape {
    /// `warps_knob`: the requested warps per CTA; `sms`: multiprocessors; `slots`: how many
    /// copies of the grid run side by side (expert slots).
    fn choose(
        w: &DeviceMatrix,
        nb: usize,
        warps_knob: usize,
        sms: usize,
        slots: usize,
    ) -> LaunchShape {
        let split = match w.format {
            // F16/F32: 16-byte pieces per row; give each thread at least 2 of them per row, with
            // up to 8 warps on one row (4096 F16 columns = 512 pieces: 8 warps × 32 × 2). Short
            // rows keep one warp.
            WeightFormat::F32 | WeightFormat::F16 => {
                let elem = if w.format == WeightFormat::F32 { 4 } else { 2 };
                let pieces = (w.cols * elem).div_ceil(16);
                [8, 4, 2, 1]
                    .into_iter()
                    .find(|&s| 64 * s <= pieces)
                    .unwrap_or(1)
            }
            // Quantized: warps of a group take whole staged chunks in turn. Rows of up to 8
            // chunks get one warp per chunk (a 4096-column Q8_0 row is 4 chunks: 512 rows make
            // 1024 warps instead of 256, and a warp's stage then holds its whole share of the
            // rows, so batches of vectors can reuse it). Longer rows split only as far as needed
            // to reach TARGET_WARPS; each warp then streams several chunks per row.
            _ => {
                let chunks = quant_chunks(w);
                if chunks <= GEMV_MAX_WARPS {
                    chunks
                } else {
                    let groups = w.rows.div_ceil(QUANT_ROWS_PER_GROUP);
                    [1, 2, 4, 8]
                        .into_iter()
                        .find(|&s| groups * s >= TARGET_WARPS)
                        .unwrap_or(8)
                }
            }
        };
        // As many whole groups as fit in the requested warps (at least one group).
        let warps = split * (warps_knob / split).max(1);
        let groups = warps / split;
        let rows_per_group = match w.format {
            // R = 4 reuses each activation load on 4 rows (fewer L1/L2 bytes per weight byte)
            // and gives each thread 4 rows' pieces in flight. 1-2 vectors (decode): always
            // (the router, 256 × 4096 F16, as 64 CTAs; the compressors' 512-1 024 rows as
            // 128-256): a quarter of the CTAs, each with 4× the loads in flight, beats one
            // CTA per row even where it leaves SMs idle (decode +1.1 %, docs/speed-log.md session
            // 22; before, R = 4 only from 2 CTAs per SM). 4-8 vectors: when that leaves a
            // quarter of the SMs busy (every CTA reads all activation vectors, 128 KiB for
            // 8 × 4096, so fewer, fuller CTAs).
            WeightFormat::F32 | WeightFormat::F16 => {
                let ctas4 = w.rows.div_ceil(4 * groups) * slots;
                if w.rows >= 4 && (nb <= 2 || ctas4 >= sms / 4) {
                    4
                } else {
                    1
                }
            }
            _ => QUANT_ROWS_PER_GROUP,
        };
        LaunchShape {
            split,
            warps,
            rows_per_group,
            grid_x: w.rows.div_ceil(groups * rows_per_group),
        }
    }
}

/// Vectors per launch the kernels are instantiated for.
const BATCH_VARIANTS: [usize; 4] = [8, 4, 2, 1];

pub(crate) fn check_len<T: DeviceValue>(
    what: &str,
    buf: &DeviceBuffer<T>,
    need: usize,
) -> Result<()> {
    if buf.len() < need {
        return Err(CudaError::InvalidArgument(format!(
            "{what} has {} elements, needs {need}",
            buf.len()
        )));
    }
    Ok(())
}

/// Most experts a grouped expert product takes: its grid has one row per expert plus the row
/// that writes the NaN rows of ungrouped vectors (at most 65 535).
pub(crate) const MAX_GROUPED_EXPERTS: usize = 65534;

/// The checked arguments of a grouped expert product.
pub(crate) struct GroupedArgs<'a> {
    pub qa: &'a QuantizedActivations,
    /// The second output's address (pairs), or 0.
    pub y2_ptr: u64,
}

/// The argument checks shared by the grouped expert products (the matvec here and the
/// tensor-core kernel of gemm_experts.rs): a pair of the same shape, at most
/// [`MAX_GROUPED_EXPERTS`] experts, `experts + 1` group offsets, i32 vector offsets, quantized
/// activations of the weights' kind and length for `n_vecs_total` vectors, and outputs of
/// `n_vecs_total × rows` values.
pub(crate) fn check_grouped<'a>(
    w: &DeviceMatrix,
    w2: Option<&DeviceMatrix>,
    group_start: &DeviceBuffer<i32>,
    x: Activations<'a>,
    n_vecs_total: usize,
    y: &DeviceBuffer<f32>,
    y2: Option<&DeviceBuffer<f32>>,
) -> Result<GroupedArgs<'a>> {
    let invalid = |msg: String| CudaError::InvalidArgument(msg);
    if let Some(w2) = w2 {
        if (w2.format, w2.cols, w2.rows, w2.experts) != (w.format, w.cols, w.rows, w.experts) {
            return Err(invalid(format!(
                "expert stack pair of different shapes: {:?} {}x{}x{} and {:?} {}x{}x{}",
                w.format, w.cols, w.rows, w.experts, w2.format, w2.cols, w2.rows, w2.experts
            )));
        }
    }
    if w.experts > MAX_GROUPED_EXPERTS {
        return Err(invalid(format!(
            "grouped expert product of {} experts (at most {MAX_GROUPED_EXPERTS})",
            w.experts
        )));
    }
    check_len("group offset buffer", group_start, w.experts + 1)?;
    // Offsets are i32 on the device.
    if n_vecs_total > i32::MAX as usize {
        return Err(invalid(format!(
            "{n_vecs_total} vectors in a grouped expert product (offsets are i32)"
        )));
    }
    let Activations::Quantized(qa) = x else {
        return Err(invalid(
            "grouped expert products take quantized activations (Gpu::quantize_activations)".into(),
        ));
    };
    let want = w
        .format
        .activation_quant()
        .ok_or_else(|| invalid(format!("{:?} weights take f32 activations only", w.format)))?;
    if qa.kind != want || qa.len != w.cols || qa.n_vecs < n_vecs_total {
        return Err(invalid(format!(
            "{:?} experts of {} columns need {:?} activations of that length for {n_vecs_total} vectors, got {:?} × {} × {}",
            w.format, w.cols, want, qa.kind, qa.len, qa.n_vecs
        )));
    }
    let out_len = n_vecs_total
        .checked_mul(w.rows)
        .ok_or_else(|| invalid(format!("{n_vecs_total} vectors × {} rows overflow", w.rows)))?;
    check_len("output", y, out_len)?;
    let y2_ptr = match y2 {
        Some(b) => {
            check_len("second output", b, out_len)?;
            b.ptr()
        }
        None => 0,
    };
    Ok(GroupedArgs { qa, y2_ptr })
}

impl Gpu {
    /// y = W·x for `n_vecs` vectors: x is n_vecs × cols, y is n_vecs × rows.
    pub fn gemv(
        &self,
        w: &DeviceMatrix,
        x: Activations<'_>,
        n_vecs: usize,
        y: &mut DeviceBuffer<f32>,
    ) -> Result<()> {
        if w.experts != 1 {
            return Err(CudaError::InvalidArgument(
                "gemv on an expert stack: use expert_gemv".into(),
            ));
        }
        self.gemv_launch(w, None, x, n_vecs, Slots::One, false, y, None, None)
    }

    /// Two matrices of the same format and shape applied to the same activations in one
    /// launch (e.g. a gate and an up projection): `y[i] = w[i]·x`. Bit-identical to two
    /// [`Gpu::gemv`] calls; one launch instead of two, and one fuller grid.
    ///
    /// `ctas_per_sm`: at most that many CTAs per multiprocessor (each warp then walks several
    /// row groups), for a matvec on a side branch with time to spare, which with one CTA per
    /// row group would take every multiprocessor's room while a kernel of the critical path
    /// waits to start. Same bits (a row's sums depend on the matrix shape only).
    pub fn gemv_pair(
        &self,
        w: [&DeviceMatrix; 2],
        x: Activations<'_>,
        n_vecs: usize,
        y: [&mut DeviceBuffer<f32>; 2],
        ctas_per_sm: Option<usize>,
    ) -> Result<()> {
        if w[0].experts != 1 {
            return Err(CudaError::InvalidArgument(
                "gemv_pair on expert stacks: use expert_gemv_pair".into(),
            ));
        }
        let [y0, y1] = y;
        self.gemv_launch(
            w[0],
            Some(w[1]),
            x,
            n_vecs,
            Slots::One,
            false,
            y0,
            Some(y1),
            ctas_per_sm.map(|c| c.max(1)),
        )
    }

    /// Expert matvecs with the expert ids on the device: for each slot s < n_slots, expert
    /// `e = ids[s]` computes `y[s][v] = W_e · x[v]` (x shared by all slots: gate/up) or
    /// `W_e · x[s][v]` (`x_per_slot`: the down projection). x is (n_slots ×) n_vecs × cols,
    /// y is n_slots × n_vecs × rows. An id outside `[0, experts)` yields NaN outputs.
    #[allow(clippy::too_many_arguments)]
    pub fn expert_gemv(
        &self,
        w: &DeviceMatrix,
        ids: &DeviceBuffer<i32>,
        n_slots: usize,
        x: Activations<'_>,
        x_per_slot: bool,
        n_vecs: usize,
        y: &mut DeviceBuffer<f32>,
    ) -> Result<()> {
        check_len("expert id buffer", ids, n_slots)?;
        self.gemv_launch(
            w,
            None,
            x,
            n_vecs,
            Slots::Ids(ids, n_slots),
            x_per_slot,
            y,
            None,
            None,
        )
    }

    /// Every expert of a stack against its own input vectors, slot s taking expert s: x is
    /// experts × n_vecs × cols, y experts × n_vecs × rows (the grouped output projection's
    /// groups). [`Gpu::expert_gemv`] with the ids 0, 1, ..., bit for bit; with no ids to read,
    /// its weight copies start before the previous kernel ends, as a plain matrix's do.
    pub fn stacked_gemv(
        &self,
        w: &DeviceMatrix,
        x: Activations<'_>,
        n_vecs: usize,
        y: &mut DeviceBuffer<f32>,
    ) -> Result<()> {
        self.gemv_launch(
            w,
            None,
            x,
            n_vecs,
            Slots::Stack(w.experts),
            true,
            y,
            None,
            None,
        )
    }

    /// Asks L2 to fetch all of `w` (or a stack) from a grid of `ctas` one-warp CTAs, for a
    /// matvec that runs later, so that it reads L2 instead of HBM. Nothing waits for it and it
    /// writes nothing: launch it on a side stream while latency-bound kernels leave HBM idle.
    /// Each warp has one bulk prefetch (Hopper; per 128-byte line before) of 16 KB in flight
    /// at a time, so `ctas` sets how fast the lines come and how much HBM it takes from the
    /// kernels beside it.
    pub fn prefetch_l2(&self, w: &DeviceMatrix, ctas: usize) -> Result<()> {
        self.prefetch_l2_prefix(w, usize::MAX, ctas)
    }

    /// [`Gpu::prefetch_l2`] of the first `bytes` of the matrix's weights (all when fewer).
    pub fn prefetch_l2_prefix(&self, w: &DeviceMatrix, bytes: usize, ctas: usize) -> Result<()> {
        let (ptr, len) = prefetch_range(w.ptr, w.total_bytes().min(bytes) as u64);
        if ctas == 0 || len == 0 {
            return Ok(());
        }
        let cfg = LaunchConfig {
            grid_dim: (ctas.min(65535) as u32, 1, 1),
            block_dim: (32, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: prefetch_l2(w, bytes) (two 8-byte parameters) only hints the lines of
        // [ptr, ptr + len), inside the matrix's weights, which are in live device memory by
        // DeviceMatrix's construction contract; ptr and len are multiples of 16, as the bulk
        // prefetch requires (prefetch_range); it reads nothing into registers, writes nothing.
        unsafe {
            self.launch(
                "gemv",
                "prefetch_l2",
                ("prefetch_l2", 0),
                cfg,
                &[&ptr, &len],
            )
        }
    }

    /// [`Gpu::expert_gemv`] for two expert stacks of the same format and shape with the same
    /// ids and activations (the MoE gate and up projections) in one launch: `y[i]` gets stack
    /// `w[i]`. Bit-identical to two `expert_gemv` calls.
    #[allow(clippy::too_many_arguments)]
    pub fn expert_gemv_pair(
        &self,
        w: [&DeviceMatrix; 2],
        ids: &DeviceBuffer<i32>,
        n_slots: usize,
        x: Activations<'_>,
        x_per_slot: bool,
        n_vecs: usize,
        y: [&mut DeviceBuffer<f32>; 2],
    ) -> Result<()> {
        check_len("expert id buffer", ids, n_slots)?;
        let [y0, y1] = y;
        self.gemv_launch(
            w[0],
            Some(w[1]),
            x,
            n_vecs,
            Slots::Ids(ids, n_slots),
            x_per_slot,
            y0,
            Some(y1),
            None,
        )
    }

    /// Grouped expert products (prefill MoE): the `n_vecs_total` vectors of `x` are sorted by
    /// expert, those of expert `e` being `[group_start[e], group_start[e + 1])`, and vector `v`
    /// gets `y[v] = W_e · x[v]` (y is n_vecs_total × rows, vector v at `y[v * rows..]`). One
    /// launch, one CTA row per expert: each expert's weights are read once for all of its
    /// vectors (8 at a time against the staged rows) instead of once per vector. Every output
    /// is bit-identical to [`Gpu::expert_gemv`] of that vector alone.
    ///
    /// `group_start` holds `w.experts + 1` non-decreasing offsets in `[0, n_vecs_total]` (only
    /// those entries are read). Vectors before `group_start[0]` or from
    /// `group_start[w.experts]` on belong to no expert and get NaN rows, as a slot with an
    /// out-of-range id does in `expert_gemv` (sorting puts such slots last). The offsets are
    /// read on the device and not trusted: out-of-range ones are clamped and a group that ends
    /// before it starts is empty, so bad offsets give wrong rows, never an access outside x or
    /// y. Block-quantized stacks (Q8_0, Q2_K, Q4_K, IQ2_XXS) with [`Activations::Quantized`]
    /// only: ds4's expert numerics.
    pub fn expert_gemv_grouped(
        &self,
        w: &DeviceMatrix,
        group_start: &DeviceBuffer<i32>,
        x: Activations<'_>,
        n_vecs_total: usize,
        y: &mut DeviceBuffer<f32>,
    ) -> Result<()> {
        self.grouped_launch(w, None, group_start, x, n_vecs_total, y, None)
    }

    /// [`Gpu::expert_gemv_grouped`] for two expert stacks of the same format and shape with the
    /// same groups and activations (the MoE gate and up projections) in one launch: `y[i]` gets
    /// stack `w[i]`. Bit-identical to two `expert_gemv_grouped` calls.
    pub fn expert_gemv_grouped_pair(
        &self,
        w: [&DeviceMatrix; 2],
        group_start: &DeviceBuffer<i32>,
        x: Activations<'_>,
        n_vecs_total: usize,
        y: [&mut DeviceBuffer<f32>; 2],
    ) -> Result<()> {
        let [y0, y1] = y;
        self.grouped_launch(w[0], Some(w[1]), group_start, x, n_vecs_total, y0, Some(y1))
    }

    /// The grouped launch of one expert stack `w` (or a pair `w`, `w2`, outputs `y`, `y2`).
    #[allow(clippy::too_many_arguments)]
    fn grouped_launch(
        &self,
        w: &DeviceMatrix,
        w2: Option<&DeviceMatrix>,
        group_start: &DeviceBuffer<i32>,
        x: Activations<'_>,
        n_vecs_total: usize,
        y: &mut DeviceBuffer<f32>,
        y2: Option<&mut DeviceBuffer<f32>>,
    ) -> Result<()> {
        if stage_chunk_bytes(w.format) == 0 {
            return Err(CudaError::InvalidArgument(format!(
                "grouped expert product of a {:?} stack: only block-quantized formats (Q8_0, Q2_K, Q4_K, IQ2_XXS) have a grouped kernel",
                w.format
            )));
        }
        let GroupedArgs { qa, y2_ptr } =
            check_grouped(w, w2, group_start, x, n_vecs_total, y, y2.as_deref())?;
        if n_vecs_total == 0 {
            return Ok(());
        }
        let aligned16 = aligned16(w, w2);
        let sms = self.device.info().multiprocessors as usize;
        // The shape of an 8-vector expert_gemv launch: same split, hence the same bits.
        let shape = LaunchShape::choose(w, 8, self.gemv_warps(), sms, w.experts);
        let mut grid_x = shape.grid_x;
        if let Some(cap) = self.gemv_grid_cap() {
            grid_x = grid_x.min((cap * sms / w.experts).max(1));
        }
        let n_mats = if w2.is_some() { 2 } else { 1 };
        let cfg = LaunchConfig {
            grid_dim: (grid_x as u32, (w.experts + 1) as u32, n_mats),
            block_dim: ((shape.warps * 32) as u32, 1, 1),
            shared_mem_bytes: gemv_shared_bytes(w.format, shape.warps, shape.rows_per_group) as u32,
        };
        let params = GemvParams {
            w: w.ptr,
            x: qa.q.ptr(),
            xd: qa.d.ptr(),
            y: y.ptr(),
            ids: 0,
            grid: self.kernels.iq2xxs_grid.ptr(),
            row_bytes: w.row_bytes as i64,
            expert_stride: w.expert_bytes() as i64,
            n_experts: w.experts as i64,
            n_rows: w.rows as i64,
            k: w.cols as i64,
            // Vector indices are absolute (the groups' offsets), not per grid row.
            x_slot_vecs: 0,
            y_slot_vecs: 0,
            aligned16: aligned16 as i64,
            split: shape.split as i64,
            n_batches: 1,
            w_pair: w2.map_or(0, |w2| w2.ptr),
            y_pair: y2_ptr,
            groups: group_start.ptr(),
            n_vecs_total: n_vecs_total as i64,
        };
        let name = format!("gemv_{}_q8x_grouped", w.format.tag());
        let label = format!(
            "{name} {}x{} x{} experts {n_vecs_total} vecs{}",
            w.rows,
            w.cols,
            w.experts,
            if n_mats == 2 { " pair" } else { "" }
        );
        // Profile bytes: an upper bound (every expert's rows once; experts without vectors
        // read nothing).
        let bytes = w.total_bytes() * n_mats as usize;
        // SAFETY: the kernel takes one GemvParams by value. Dynamic shared memory covers the
        // decode tables, the stage barriers and warps × 2 × R × chunk bytes (each warp's two
        // stage buffers); `split` divides the CTA's warps and is at most 8 (the reduction
        // buffer). The kernel reads group_start[0..=experts]
        // (the buffer has at least experts + 1 entries, checked above) and clamps every offset
        // to [0, n_vecs_total], so it reads activation vectors and writes output vectors only in
        // [0, n_vecs_total): the activations hold at least n_vecs_total vectors of `cols` (with
        // their scales), y and y2 at least n_vecs_total × rows floats (checked above). Grid row
        // e < experts reads expert e of w (and w2, same shape) inside [ptr, ptr + total_bytes),
        // live device memory by DeviceMatrix's construction contract; grid row `experts` reads
        // no weights.
        unsafe { self.launch("gemv", &name, (&label, bytes), cfg, &[&params])? };
        Ok(())
    }

    /// One matrix (or expert stack) `w`, or a pair `w`, `w2` of the same format and shape
    /// (outputs `y`, `y2`), against the same activations.
    #[allow(clippy::too_many_arguments)]
    fn gemv_launch(
        &self,
        w: &DeviceMatrix,
        w2: Option<&DeviceMatrix>,
        x: Activations<'_>,
        n_vecs: usize,
        slots: Slots<'_>,
        x_per_slot: bool,
        y: &mut DeviceBuffer<f32>,
        y2: Option<&mut DeviceBuffer<f32>>,
        ctas_per_sm: Option<usize>,
    ) -> Result<()> {
        let (n_slots, ids_ptr) = match slots {
            Slots::One => (1, 0),
            Slots::Ids(ids, n) => (n, ids.ptr()),
            Slots::Stack(n) => (n, 0),
        };
        // One grid row (blockIdx.y) per slot.
        if n_slots == 0 || n_slots > 65535 {
            return Err(CudaError::InvalidArgument(format!(
                "{n_slots} expert slots (1..=65535)"
            )));
        }
        let x_vecs = if x_per_slot { n_slots * n_vecs } else { n_vecs };
        check_len("output", y, n_slots * n_vecs * w.rows)?;
        if let Some(w2) = w2 {
            if (w2.format, w2.cols, w2.rows, w2.experts) != (w.format, w.cols, w.rows, w.experts) {
                return Err(CudaError::InvalidArgument(format!(
                    "matrix pair of different shapes: {:?} {}x{}x{} and {:?} {}x{}x{}",
                    w.format, w.cols, w.rows, w.experts, w2.format, w2.cols, w2.rows, w2.experts
                )));
            }
        }
        let y2_ptr = match y2 {
            Some(b) => {
                check_len("second output", b, n_slots * n_vecs * w.rows)?;
                b.ptr()
            }
            None => 0,
        };
        let n_mats = if w2.is_some() { 2 } else { 1 };
        let (act_tag, x_ptr, xd_ptr, x_elem_bytes, xd_block) = match x {
            Activations::F32(b) => {
                check_len("activations", b, x_vecs * w.cols)?;
                ("f32x", b.ptr(), 0, 4, 1)
            }
            Activations::Quantized(qa) => {
                let want = w.format.activation_quant().ok_or_else(|| {
                    CudaError::InvalidArgument(format!(
                        "{:?} weights take f32 activations only",
                        w.format
                    ))
                })?;
                if qa.kind != want || qa.len != w.cols || qa.n_vecs < x_vecs {
                    return Err(CudaError::InvalidArgument(format!(
                        "{:?} weights of {} columns need {:?} activations of that length for {x_vecs} vectors, got {:?} × {} × {}",
                        w.format, w.cols, want, qa.kind, qa.len, qa.n_vecs
                    )));
                }
                ("q8x", qa.q.ptr(), qa.d.ptr(), 1, want.block_elems())
            }
        };
        if n_vecs == 0 {
            return Ok(());
        }
        let aligned16 = aligned16(w, w2);
        let sms = self.device.info().multiprocessors as usize;
        let plain = stage_chunk_bytes(w.format) == 0;
        let mut b0 = 0;
        while b0 < n_vecs {
            let left = n_vecs - b0;
            let nb = *BATCH_VARIANTS
                .iter()
                .find(|&&b| b <= left)
                .expect("1 always fits");
            let shape = LaunchShape::choose(w, nb, self.gemv_warps(), sms, n_slots);
            // Prefill: when each warp's stage holds all of its chunks of a row group, one launch
            // runs every whole batch of 8 vectors against the staged weights (read once instead
            // of once per batch). Same sums per vector as separate launches.
            let n_batches = if !plain && nb == 8 && shape.split >= quant_chunks(w) {
                left / 8
            } else {
                1
            };
            let mut grid_x = shape.grid_x;
            // The launch's own cap and the measurement knob's: the smaller.
            let cap = match (self.gemv_grid_cap(), ctas_per_sm) {
                (Some(a), Some(b)) => Some(a.min(b)),
                (a, b) => a.or(b),
            };
            if let Some(cap) = cap {
                grid_x = grid_x.min((cap * sms / (n_slots * n_mats as usize)).max(1));
            }
            let cfg = LaunchConfig {
                grid_dim: (grid_x as u32, n_slots as u32, n_mats),
                block_dim: ((shape.warps * 32) as u32, 1, 1),
                shared_mem_bytes: gemv_shared_bytes(w.format, shape.warps, shape.rows_per_group)
                    as u32,
            };
            let params = GemvParams {
                w: w.ptr,
                x: x_ptr + (b0 * w.cols * x_elem_bytes) as u64,
                xd: if xd_ptr == 0 {
                    0
                } else {
                    xd_ptr + (b0 * w.cols / xd_block * 4) as u64
                },
                y: y.ptr() + (b0 * w.rows * 4) as u64,
                ids: ids_ptr,
                grid: self.kernels.iq2xxs_grid.ptr(),
                row_bytes: w.row_bytes as i64,
                expert_stride: w.expert_bytes() as i64,
                n_experts: w.experts as i64,
                n_rows: w.rows as i64,
                k: w.cols as i64,
                x_slot_vecs: if x_per_slot { n_vecs as i64 } else { 0 },
                y_slot_vecs: n_vecs as i64,
                aligned16: aligned16 as i64,
                split: shape.split as i64,
                n_batches: n_batches as i64,
                w_pair: w2.map_or(0, |w2| w2.ptr),
                y_pair: if y2_ptr == 0 {
                    0
                } else {
                    y2_ptr + (b0 * w.rows * 4) as u64
                },
                groups: 0,
                n_vecs_total: 0,
            };
            let name = if plain {
                let r = shape.rows_per_group;
                format!("gemv_{}_{act_tag}_r{r}_nb{nb}", w.format.tag())
            } else {
                format!("gemv_{}_{act_tag}_nb{nb}", w.format.tag())
            };
            // Profile label: kernel and shape; bytes: the weight rows read (each slot's expert).
            let label = match n_batches {
                1 => format!("{name} {}x{}", w.rows, w.cols),
                n => format!("{name} {}x{} x{n} batches", w.rows, w.cols),
            };
            let label = if n_mats == 2 {
                format!("{label} pair")
            } else {
                label
            };
            let bytes = w.rows * w.row_bytes * n_slots * n_mats as usize;
            // SAFETY: the kernel takes one GemvParams by value; the dynamic shared memory covers
            // the decode tables, the stage barriers and warps × 2 × R × chunk bytes, what each
            // warp's two stage buffers need; `split` divides the CTA's warps and is at most 8
            // (the kernels' reduction buffer). With n_batches > 1 the kernel reads n_batches × 8 vectors from
            // x and writes as many to y: within the n_vecs checked above (b0 + 8 × n_batches ≤
            // n_vecs). The buffer lengths were checked above for n_slots × n_vecs vectors (y2
            // too); the weight range [ptr, ptr + total_bytes) of w (and of w2, whose shape
            // equals w's) is inside live device memory by DeviceMatrix's construction contract;
            // expert ids are range-checked on the device.
            unsafe { self.launch("gemv", &name, (&label, bytes), cfg, &[&params])? };
            b0 += nb * n_batches;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::prefetch_range;

    /// A matrix at any byte offset: the prefetched range starts on a 16-byte boundary, is whole
    /// 16-byte units, stays inside the matrix and misses at most 15 bytes at each end.
    #[test]
    fn prefetch_range_is_16_byte_units_inside_the_matrix() {
        assert_eq!(prefetch_range(0x1000, 4096), (0x1000, 4096));
        assert_eq!(prefetch_range(0x1003, 100), (0x1010, 80));
        assert_eq!(prefetch_range(0x1003, 10), (0x1010, 0));
        assert_eq!(prefetch_range(0x100f, 1), (0x1010, 0));
        for ptr in 0x2000u64..0x2040 {
            for bytes in [0u64, 1, 15, 16, 17, 31, 32, 33, 1000, 1 << 20] {
                let (start, len) = prefetch_range(ptr, bytes);
                assert_eq!((start % 16, len % 16), (0, 0), "{ptr:#x} + {bytes}");
                assert!(start >= ptr && start - ptr < 16, "{ptr:#x} + {bytes}");
                assert!(len == 0 || start + len <= ptr + bytes, "{ptr:#x} + {bytes}");
                assert!(len + 30 >= bytes, "{ptr:#x} + {bytes}: {len}");
            }
        }
    }
}
