//! Launchers of attention.cu's attention kernels, all over the same [`AttendArgs`]:
//! - `attend` (one CTA per token and head) and `attend_heads` (one CTA per token and
//!   [`HEADS_PER_CTA`] heads, which stages the token's K=V rows in shared memory once for all
//!   of them instead of every head re-reading them from L2): bit-identical outputs,
//!   attend_heads keeps attend's order of every float operation;
//! - `attend_split` (a decode step: scores, then softmax and values, over many CTAs), also
//!   bit-identical to attend;
//! - `attend_mma` (prefill spans in ds4 numerics: flash attention on the tensor cores),
//!   within ~1e-6 of attend.

use cudarc::driver::sys::CUfunction_attribute_enum;

use crate::device::CudaDevice;
use crate::error::{CudaError, DriverContext, Result};
use crate::fwd_kernels::{kargs, per_item, ForwardKernels};

const MODULE: &str = "fwd_attention";
/// Heads per CTA of attend_heads (attention.cu ATTN_HG).
pub(crate) const HEADS_PER_CTA: usize = 16;
/// The only head width attend_heads is built for (ATTN_HD): 16 channels per lane.
pub(crate) const HEAD_DIM: usize = 512;
/// K=V rows per shared-memory tile of attend_heads (ATTN_TR); two tiles are in flight.
const TILE_ROWS: usize = 16;
/// Threads per CTA of both kernels (attend_heads' ATTN_THREADS). The softmax sums of
/// attend_heads split the rows over threads and warps as attend does at this block size, which
/// is what makes the two bit-identical.
const THREADS: u32 = 256;
/// attend_heads' static shared memory (the softmax's per-warp partials and per-head max and
/// sum: ATTN_HG × (8 + 2) floats), which counts against the device's per-CTA limit too.
const HEADS_STATIC_SHARED: usize = HEADS_PER_CTA * (THREADS as usize / 32 + 2) * 4;
/// Dynamic shared memory attend may use without opting in (the launch default).
const ATTEND_MAX_SHARED: usize = 48 * 1024;

/// Lets attention.cu's `kernel` launch with `bytes` of dynamic shared memory (more than 48 KiB
/// must be opted into, per kernel); returns the kernel.
fn allow_shared(
    fk: &ForwardKernels,
    kernel: &str,
    bytes: usize,
) -> Result<cudarc::driver::CudaFunction> {
    let f = fk.function(MODULE, kernel)?;
    f.set_attribute(
        CUfunction_attribute_enum::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
        bytes as i32,
    )
    .ctx(&format!("allowing {kernel} its shared memory"))?;
    Ok(f)
}

/// Ok when `kernel`'s `need` bytes of shared memory per CTA fit the device's `optin` limit.
fn shared_fits(kernel: &str, need: usize, optin: usize) -> Result<()> {
    if need > optin {
        return Err(CudaError::InvalidArgument(format!(
            "{kernel}: needs {need} bytes of shared memory per CTA (the device allows {optin})"
        )));
    }
    Ok(())
}

/// The arguments of one attention launch over a span of tokens (attention.cu `attend`).
/// Buffers are device addresses; every count is in elements.
#[derive(Clone, Copy, Debug)]
pub(crate) struct AttendArgs {
    /// Queries: n_tok × heads × head_dim f32, already RoPE'd.
    pub q: u64,
    /// The span's own K=V rows: n_tok × head_dim f32 (position pos0 + t in row t).
    pub kv: u64,
    /// The window ring: ring_cap × head_dim f32 (position p in slot p % ring_cap).
    pub ring: u64,
    /// Compressed rows × head_dim f32 (0 when kind is 0).
    pub comp: u64,
    /// CSA: per token `sel_stride` i32 row indices into comp, of which the first selc[t] count.
    pub sel: u64,
    /// CSA: n_tok i32 selection counts.
    pub selc: u64,
    /// heads f32 sink logits.
    pub sinks: u64,
    /// Outputs: n_tok × heads × head_dim f32, out[(t·heads + h)·head_dim + c].
    pub out: u64,
    pub heads: usize,
    pub head_dim: usize,
    /// Device address of the span's first position (one i64).
    pub pos: u64,
    /// Window rows per token (at most ring_cap).
    pub window: usize,
    pub ring_cap: usize,
    /// Compressed rows: 0 none, 1 HCA (rows 0 .. (pos+1)/ratio), 2 CSA (the selection).
    pub kind: i64,
    /// HCA compression ratio (at least 1).
    pub ratio: usize,
    /// CSA: i32 entries per token of `sel`.
    pub sel_stride: usize,
    /// Logit scale, 1/sqrt(head_dim).
    pub scale: f32,
    /// r/2 f64 inverse frequencies (as u64 bit patterns) for the output's inverse RoPE.
    pub inv_freq: u64,
    /// RoPE'd tail width r (even, at most head_dim).
    pub rope_dim: usize,
    /// The most rows any token of the span attends over: window + the compressed rows it can
    /// see (HCA: the row capacity; CSA: the top-k). Sizes the shared memory.
    pub max_rows: usize,
}

impl AttendArgs {
    /// The kernels' parameter list (the same for both).
    fn kernel_args(&self) -> [crate::fwd_kernels::KArg; 20] {
        kargs![
            self.q,
            self.kv,
            self.ring,
            self.comp,
            self.sel,
            self.selc,
            self.sinks,
            self.out,
            self.heads,
            self.head_dim,
            self.pos,
            self.window,
            self.ring_cap,
            self.kind,
            self.ratio,
            self.sel_stride,
            self.scale,
            self.inv_freq,
            self.rope_dim,
            self.max_rows
        ]
    }

    /// Checks shared by both kernels.
    fn check_common(&self) -> Result<()> {
        let bad = |what: String| Err(CudaError::InvalidArgument(format!("attention: {what}")));
        if !(0..=2).contains(&self.kind) {
            return bad(format!("compressed-row kind {} (0, 1 or 2)", self.kind));
        }
        if self.ratio == 0 || self.ring_cap == 0 || self.window > self.ring_cap {
            return bad(format!(
                "ratio {}, window {} and ring capacity {} (ratio and capacity at least 1, window at most the capacity)",
                self.ratio, self.window, self.ring_cap
            ));
        }
        if !self.rope_dim.is_multiple_of(2) || self.rope_dim > self.head_dim {
            return bad(format!(
                "RoPE tail {} of a {}-wide head (even, at most the head)",
                self.rope_dim, self.head_dim
            ));
        }
        if self.max_rows < self.window {
            return bad(format!(
                "max_rows {} below the window {}",
                self.max_rows, self.window
            ));
        }
        Ok(())
    }

    /// Checks shared by the kernels built for the model's head shape (attend_heads,
    /// attend_split, attend_mma): head width [`HEAD_DIM`], heads a multiple of
    /// `heads_multiple`, and the `aligned` buffers at 16-byte addresses (they move in 16-byte
    /// pieces). Errors name `kernel`.
    fn check_model_shape(
        &self,
        kernel: &str,
        heads_multiple: usize,
        aligned: &[(&str, u64)],
    ) -> Result<()> {
        self.check_common()?;
        let bad = |what: String| Err(CudaError::InvalidArgument(format!("{kernel}: {what}")));
        if self.head_dim != HEAD_DIM {
            return bad(format!(
                "head width {} (built for {HEAD_DIM})",
                self.head_dim
            ));
        }
        if self.heads == 0 || !self.heads.is_multiple_of(heads_multiple) {
            return bad(format!(
                "{} heads (a multiple of {heads_multiple})",
                self.heads
            ));
        }
        for (name, ptr) in aligned {
            if !ptr.is_multiple_of(16) {
                return bad(format!("{name} buffer at {ptr:#x} is not 16-byte aligned"));
            }
        }
        Ok(())
    }

    /// attend_heads' dynamic shared memory: two row tiles and max_rows × HEADS_PER_CTA scores.
    pub(crate) fn heads_shared_bytes(&self) -> usize {
        (2 * TILE_ROWS * HEAD_DIM + self.max_rows * HEADS_PER_CTA) * 4
    }

    /// Whether attend_heads can run these arguments on a device allowing `optin_shared` bytes
    /// of dynamic shared memory per CTA; Ok(bytes it needs), or an error saying why not (then
    /// [`launch_attend`] may still fit).
    pub(crate) fn heads_plan(&self, optin_shared: usize) -> Result<usize> {
        // The rows are copied in 16-byte pieces and the outputs stored as float4.
        self.check_model_shape(
            "attend_heads",
            HEADS_PER_CTA,
            &[
                ("kv", self.kv),
                ("ring", self.ring),
                ("comp", self.comp),
                ("out", self.out),
            ],
        )?;
        let bad = |what: String| Err(CudaError::InvalidArgument(format!("attend_heads: {what}")));
        let shared = self.heads_shared_bytes();
        let allowed = optin_shared.saturating_sub(HEADS_STATIC_SHARED);
        if shared > allowed {
            return bad(format!(
                "attention over up to {} rows needs {shared} bytes of dynamic shared memory per CTA (the device allows {allowed}); use a smaller context",
                self.max_rows
            ));
        }
        Ok(shared)
    }

    /// attend's dynamic shared memory: q and output (2·head_dim floats) and the scores,
    /// rounded up to an even float count, then one row pointer per row.
    fn attend_shared_bytes(&self) -> usize {
        (2 * self.head_dim + self.max_rows).div_ceil(2) * 2 * 4 + self.max_rows * 8
    }
}

/// Attention of `n_tok` tokens (positions *pos ..) with attend_heads: one CTA per token and
/// [`HEADS_PER_CTA`] heads. Errors (launching nothing) when [`AttendArgs::heads_plan`] does.
///
/// # Safety
/// Every address in `args` must be live device memory of the layout [`AttendArgs`] states for
/// `n_tok` tokens: *pos + t + 1 rows visible to token t, ring slots for the window positions
/// before *pos, the compressed rows each token sees (HCA: rows 0 .. (pos+1)/ratio; CSA:
/// selc[t] ≤ sel_stride indices, each a written row), and window + those rows ≤ max_rows.
pub(crate) unsafe fn launch_attend_heads(
    fk: &ForwardKernels,
    dev: &CudaDevice,
    args: &AttendArgs,
    n_tok: usize,
) -> Result<()> {
    let shared = args.heads_plan(dev.info().max_shared_per_block_optin)?;
    if n_tok == 0 {
        return Ok(());
    }
    let ctas = n_tok * (args.heads / HEADS_PER_CTA);
    if ctas > i32::MAX as usize {
        return Err(CudaError::InvalidArgument(format!(
            "attend_heads: {n_tok} tokens exceed the launch grid"
        )));
    }
    // More than 48 KiB of dynamic shared memory must be opted into; the largest carveout
    // lets two CTAs (two rows of heads at up to ~640 rows each) share an SM.
    let f = allow_shared(fk, "attend_heads", shared)?;
    f.set_attribute(
        CUfunction_attribute_enum::CU_FUNC_ATTRIBUTE_PREFERRED_SHARED_MEMORY_CARVEOUT,
        100,
    )
    .ctx("setting attend_heads' shared memory carveout")?;
    let a = args.kernel_args();
    // SAFETY: the caller guarantees the buffers (see above); heads_plan checked the shapes the
    // kernel is built for (head_dim 512, heads a multiple of 16, 16-byte aligned rows and
    // outputs), and the shared memory, which the attribute above allows. The CTA has the
    // kernel's 256 threads; the grid has one CTA per token and group of 16 heads.
    unsafe {
        fk.launch(
            dev,
            MODULE,
            "attend_heads",
            per_item(ctas, THREADS, shared),
            &a,
        )
    }
}

/// Attention of a span of `n_tok` tokens with attend_heads where it can run these arguments
/// ([`AttendArgs::heads_plan`]), else with attend. The two give bit-identical outputs, so the
/// choice changes only the speed.
///
/// # Safety
/// As [`launch_attend_heads`].
pub(crate) unsafe fn launch_attend_span(
    fk: &ForwardKernels,
    dev: &CudaDevice,
    args: &AttendArgs,
    n_tok: usize,
) -> Result<()> {
    // SAFETY: forwarded to the caller.
    unsafe {
        if args
            .heads_plan(dev.info().max_shared_per_block_optin)
            .is_ok()
        {
            launch_attend_heads(fk, dev, args, n_tok)
        } else {
            launch_attend(fk, dev, args, n_tok)
        }
    }
}

/// Attention of `n_tok` tokens with attend: one CTA per token and head (the decode kernel;
/// here for spans that attend_heads cannot take, and to compare the two).
///
/// # Safety
/// As [`launch_attend_heads`].
pub(crate) unsafe fn launch_attend(
    fk: &ForwardKernels,
    dev: &CudaDevice,
    args: &AttendArgs,
    n_tok: usize,
) -> Result<()> {
    args.check_common()?;
    let shared = args.attend_shared_bytes();
    if shared > ATTEND_MAX_SHARED {
        return Err(CudaError::InvalidArgument(format!(
            "attend: attention over up to {} rows needs {shared} bytes of shared memory (at most {ATTEND_MAX_SHARED}); use a smaller context",
            args.max_rows
        )));
    }
    if n_tok == 0 {
        return Ok(());
    }
    let a = args.kernel_args();
    // SAFETY: the caller guarantees the buffers; the shared memory covers 2·head_dim floats
    // and the scores and row pointers of max_rows rows, within the launch default.
    unsafe {
        fk.launch(
            dev,
            MODULE,
            "attend",
            per_item(n_tok * args.heads, THREADS, shared),
            &a,
        )
    }
}

/// Rows per CTA of attend_split_scores (attention.cu ASPLIT_ROWS).
const SPLIT_ROWS: usize = 32;
/// Heads and channels per CTA of attend_split_values (ASPLIT_HG, ASPLIT_CW).
const SPLIT_HEADS: usize = 8;
const SPLIT_CHANNELS: usize = 32;
/// Most rows per staged tile of attend_split_values (ASPLIT_VT).
const SPLIT_TILE: usize = 1024;

/// attend_split_values' dynamic shared memory for tiles of `tile` rows: the values (32
/// channels a row), the weights of 8 heads (stride: `tile` rounded up to 32, plus 4:
/// attention.cu asplit_score_stride) and the rows' addresses.
fn split_values_shared(tile: usize) -> usize {
    let stride = tile.next_multiple_of(32) + 4;
    (tile * SPLIT_CHANNELS + SPLIT_HEADS * stride) * 4 + tile * 8
}
/// attend_split_values' static shared memory (softmax partials, statistics, outputs), which
/// counts against the per-CTA limit with the dynamic part.
const SPLIT_STATIC_SHARED: usize = (SPLIT_HEADS * (THREADS as usize / 32 + 2 + SPLIT_CHANNELS)) * 4;

impl AttendArgs {
    /// Floats of the scores scratch attend_split needs for `n_tok` tokens.
    pub(crate) fn split_scores_len(&self, n_tok: usize) -> usize {
        n_tok * self.heads * self.max_rows
    }

    /// Whether attend_split can run these arguments: Ok, or an error saying why not (then
    /// [`launch_attend`] may).
    pub(crate) fn split_plan(&self, optin_shared: usize) -> Result<()> {
        // The rows are copied in 16-byte pieces.
        self.check_model_shape(
            "attend_split",
            HEADS_PER_CTA,
            &[("kv", self.kv), ("ring", self.ring), ("comp", self.comp)],
        )?;
        // The scores kernel's two row tiles, the values kernel's tile of rows.
        let need = (2 * TILE_ROWS * HEAD_DIM * 4)
            .max(split_values_shared(SPLIT_TILE) + SPLIT_STATIC_SHARED);
        shared_fits("attend_split", need, optin_shared)
    }
}

/// Attention of `n_tok` tokens with attend_split (the decode path): scores of every (head, row)
/// by CTAs of 32 rows x 16 heads into `scores`, then each head's softmax and weighted sum by
/// CTAs of 8 heads x 32 channels. Outputs bit-identical to attend's; many more CTAs for a
/// single token than attend's one per head, and no CTA walks all the rows' loads in sequence.
///
/// `quantized`: also write the outputs' Q8_0 form (blocks of 32 along the flat output) to
/// these int8 values and f32 scales, bit for bit what the Q8_0 activation quantizer makes.
///
/// # Safety
/// As [`launch_attend_heads`], `scores` must hold [`AttendArgs::split_scores_len`]`(n_tok)`
/// f32, and `quantized` (when given) n_tok × heads × head_dim i8 and 1/32 as many f32.
pub(crate) unsafe fn launch_attend_split(
    fk: &ForwardKernels,
    dev: &CudaDevice,
    args: &AttendArgs,
    n_tok: usize,
    scores: u64,
    quantized: Option<(u64, u64)>,
) -> Result<()> {
    args.split_plan(dev.info().max_shared_per_block_optin)?;
    if n_tok == 0 {
        return Ok(());
    }
    let row_blocks = args.max_rows.div_ceil(SPLIT_ROWS);
    if row_blocks > i32::MAX as usize || n_tok > 65_535 {
        return Err(CudaError::InvalidArgument(format!(
            "attend_split: {n_tok} tokens over {} rows exceed the launch grid",
            args.max_rows
        )));
    }
    let shared = 2 * TILE_ROWS * HEAD_DIM * 4;
    allow_shared(fk, "attend_split_scores", shared)?;
    let a = kargs![
        args.q,
        args.kv,
        args.ring,
        args.comp,
        args.sel,
        args.selc,
        scores,
        args.heads,
        args.pos,
        args.window,
        args.ring_cap,
        args.kind,
        args.ratio,
        args.sel_stride,
        args.scale,
        args.max_rows
    ];
    let cfg = cudarc::driver::LaunchConfig {
        grid_dim: (
            row_blocks as u32,
            (args.heads / HEADS_PER_CTA) as u32,
            n_tok as u32,
        ),
        block_dim: (THREADS, 1, 1),
        shared_mem_bytes: shared as u32,
    };
    // SAFETY: the caller guarantees the buffers and the scores scratch (n_tok × heads ×
    // max_rows floats; rows at or past a token's count, or beyond max_rows, are not written).
    // The kernel's shape constraints (head width 512, heads a multiple of 16, 16-byte aligned
    // rows) are checked above; its two row tiles are the dynamic shared memory allowed above.
    unsafe { fk.launch(dev, MODULE, "attend_split_scores", cfg, &a)? };
    // A tile of rows: this chunk's channels, the heads' weights and the rows' addresses.
    let tile = args.max_rows.clamp(1, SPLIT_TILE);
    let shared = split_values_shared(tile);
    let a = kargs![
        scores,
        args.kv,
        args.ring,
        args.comp,
        args.sel,
        args.selc,
        args.sinks,
        args.out,
        args.heads,
        args.pos,
        args.window,
        args.ring_cap,
        args.kind,
        args.ratio,
        args.sel_stride,
        args.inv_freq,
        args.rope_dim,
        args.max_rows,
        tile,
        quantized.map_or(0, |q| q.0),
        quantized.map_or(0, |q| q.1)
    ];
    allow_shared(fk, "attend_split_values", shared)?;
    let cfg = cudarc::driver::LaunchConfig {
        grid_dim: (
            (HEAD_DIM / SPLIT_CHANNELS) as u32,
            (args.heads / SPLIT_HEADS) as u32,
            n_tok as u32,
        ),
        block_dim: (THREADS, 1, 1),
        shared_mem_bytes: shared as u32,
    };
    // SAFETY: as above; the values kernel reads the scores the first launch wrote (same
    // stream, in order) and writes n_tok × heads × 512 outputs. It must be the launch right
    // after the scores kernel on this stream: it copies its rows before its PDL wait, which is
    // sound only because its one predecessor, the scores kernel, waits for everything before
    // it and writes nothing but the scores (attention.cu, asplit_values_prologue). Its
    // dynamic shared memory is split_values_shared(tile) for the `tile` it is told (allowed
    // above; split_plan checked that the largest fits with the static part).
    unsafe { fk.launch(dev, MODULE, "attend_split_values", cfg, &a) }
}

/// Heads per CTA of attend_mma (attention.cu AM_HEADS) and its threads (AM_THREADS).
const MMA_HEADS: usize = 64;
const MMA_THREADS: u32 = 512;
/// attend_mma's dynamic shared memory (attention.cu AmSmem::BYTES): the queries as two f16
/// planes, two tiles of 32 rows in f16 (one computed on while the next is stored), the tile's
/// scores (f32) and weights (two f16 planes), and three statistics per head.
const MMA_SHARED: usize = 2 * MMA_HEADS * (HEAD_DIM + 8) * 2
    + 2 * 32 * (HEAD_DIM + 8) * 2
    + MMA_HEADS * 36 * 4
    + 2 * MMA_HEADS * 40 * 2
    + 3 * MMA_HEADS * 4;

impl AttendArgs {
    /// Whether attend_mma can run these arguments on a device allowing `optin_shared` bytes
    /// of dynamic shared memory per CTA: Ok, or an error saying why not. Its results equal
    /// attend's to ~1e-6 only when every K=V row value is an f16 value (ds4 numerics); the
    /// caller decides that.
    pub(crate) fn mma_plan(&self, optin_shared: usize) -> Result<()> {
        // Rows, queries and outputs move in 16-byte pieces.
        self.check_model_shape(
            "attend_mma",
            MMA_HEADS,
            &[
                ("q", self.q),
                ("kv", self.kv),
                ("ring", self.ring),
                ("comp", self.comp),
                ("out", self.out),
            ],
        )?;
        shared_fits("attend_mma", MMA_SHARED, optin_shared)
    }
}

/// Attention of a span of `n_tok` tokens with attend_mma: one CTA per token and 64 heads,
/// flash attention on the tensor cores with two-term f16 queries and weights. For ds4 numerics
/// only (K=V rows that are f16 values); outputs within ~1e-6 (relative) of attend's.
///
/// # Safety
/// As [`launch_attend_heads`].
pub(crate) unsafe fn launch_attend_mma(
    fk: &ForwardKernels,
    dev: &CudaDevice,
    args: &AttendArgs,
    n_tok: usize,
) -> Result<()> {
    args.mma_plan(dev.info().max_shared_per_block_optin)?;
    if n_tok == 0 {
        return Ok(());
    }
    if n_tok > i32::MAX as usize {
        return Err(CudaError::InvalidArgument(format!(
            "attend_mma: {n_tok} tokens exceed the launch grid"
        )));
    }
    allow_shared(fk, "attend_mma", MMA_SHARED)?;
    let a = args.kernel_args();
    let cfg = cudarc::driver::LaunchConfig {
        grid_dim: (n_tok as u32, (args.heads / MMA_HEADS) as u32, 1),
        block_dim: (MMA_THREADS, 1, 1),
        shared_mem_bytes: MMA_SHARED as u32,
    };
    // SAFETY: the caller guarantees the buffers; mma_plan checked the kernel's shape
    // constraints (head width 512, heads a multiple of 64, 16-byte aligned rows, queries and
    // outputs) and that its shared memory, allowed above, fits the device.
    unsafe { fk.launch(dev, MODULE, "attend_mma", cfg, &a) }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::device::DeviceBuffer;
    use crate::fwd_kernels::test_support::gpu;

    use crate::compile::source_define as define;

    /// The launcher sizes grid, CTA and shared memory from these constants: they must be the
    /// kernel's.
    #[test]
    fn constants_match_the_kernel_source() {
        let src = include_str!("attention.cu");
        assert_eq!(define(src, "ATTN_HD"), HEAD_DIM);
        assert_eq!(define(src, "ATTN_HG"), HEADS_PER_CTA);
        assert_eq!(define(src, "ATTN_TR"), TILE_ROWS);
        assert_eq!(define(src, "ATTN_THREADS"), THREADS as usize);
        assert!(src.contains("__launch_bounds__(ATTN_THREADS, 2)\n    attend_heads("));
        assert_eq!(define(src, "ASPLIT_ROWS"), SPLIT_ROWS);
        assert_eq!(define(src, "ASPLIT_HG"), SPLIT_HEADS);
        assert_eq!(define(src, "ASPLIT_CW"), SPLIT_CHANNELS);
        assert_eq!(define(src, "ASPLIT_VT"), SPLIT_TILE);
        assert_eq!(define(src, "AM_HEADS"), MMA_HEADS);
        assert_eq!(define(src, "AM_THREADS"), MMA_THREADS as usize);
        assert_eq!(define(src, "AM_TR"), 32);
    }

    fn model_args(max_rows: usize) -> AttendArgs {
        AttendArgs {
            q: 0,
            kv: 0,
            ring: 0,
            comp: 0,
            sel: 0,
            selc: 0,
            sinks: 0,
            out: 0,
            heads: 64,
            head_dim: 512,
            pos: 0,
            window: 128,
            ring_cap: 128,
            kind: 2,
            ratio: 4,
            sel_stride: 512,
            scale: 1.0 / (512f32).sqrt(),
            inv_freq: 0,
            rope_dim: 64,
            max_rows,
        }
    }

    /// attend_split and attend_mma accept the model's decode / prefill shapes and name what
    /// they cannot run (the caller then falls back to attend / attend_heads).
    #[test]
    fn split_and_mma_plans() {
        let optin = 232_448;
        assert!(model_args(640).split_plan(optin).is_ok());
        assert!(model_args(8320).split_plan(optin).is_ok()); // scores live in device memory
        assert!(model_args(640).mma_plan(optin).is_ok());
        let mut a = model_args(640);
        a.heads = 48; // a multiple of 16, not of 64
        assert!(a.split_plan(optin).is_ok());
        let e = a.mma_plan(optin).unwrap_err().to_string();
        assert!(e.contains("attend_mma") && e.contains("48 heads"), "{e}");
        let mut a = model_args(640);
        a.head_dim = 128;
        assert!(a.split_plan(optin).is_err() && a.mma_plan(optin).is_err());
        let mut a = model_args(640);
        a.q = 4; // attend_mma reads the queries as float4, attend_split does not
        assert!(a.split_plan(optin).is_ok());
        assert!(a
            .mma_plan(optin)
            .unwrap_err()
            .to_string()
            .contains("q buffer"));
        // A device with 48 KiB per CTA runs neither (both opt into more).
        let e = model_args(640)
            .split_plan(48 * 1024)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("attend_split") && e.contains("shared memory"),
            "{e}"
        );
        assert!(model_args(640).mma_plan(48 * 1024).is_err());
    }

    #[test]
    fn shared_memory_plan() {
        // H100 / H200 allow 227 KiB per CTA: the model's 640 rows fit (two CTAs per SM),
        // a 1M-token HCA layer's 8320 rows do not, and say so.
        let optin = 232_448;
        assert_eq!(model_args(640).heads_plan(optin).unwrap(), 106_496);
        let e = model_args(8320).heads_plan(optin).unwrap_err().to_string();
        assert!(e.contains("8320 rows") && e.contains("231808"), "{e}");
        // The largest that fits: (232448 - 640 static - 65536 tiles) / 64 bytes per row.
        assert!(model_args(2598).heads_plan(optin).is_ok());
        assert!(model_args(2599).heads_plan(optin).is_err());
        let mut a = model_args(640);
        a.head_dim = 128;
        assert!(a.heads_plan(optin).is_err());
        let mut a = model_args(640);
        a.heads = 8;
        assert!(a.heads_plan(optin).is_err());
        let mut a = model_args(640);
        a.out = 8;
        assert!(a.heads_plan(optin).is_err());
        let mut a = model_args(640);
        a.kind = 3;
        assert!(a.heads_plan(optin).is_err());
        let mut a = model_args(640);
        a.window = 256;
        assert!(a.heads_plan(optin).is_err());
    }

    /// xorshift64*: deterministic test data.
    struct Rng(u64);
    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            self.0.wrapping_mul(0x2545F4914F6CDD1D)
        }
        /// Uniform in [-1, 1).
        fn f32(&mut self) -> f32 {
            (self.next() >> 40) as f32 / (1u64 << 23) as f32 - 1.0
        }
        fn f32s(&mut self, n: usize, scale: f32) -> Vec<f32> {
            (0..n).map(|_| scale * self.f32()).collect()
        }
        fn below(&mut self, n: usize) -> usize {
            (self.next() % n as u64) as usize
        }
    }

    /// One attention problem on the device: random inputs and both kernels' outputs.
    struct Case {
        name: &'static str,
        n_tok: usize,
        pos0: i64,
        kind: i64,
        ratio: usize,
        comp_rows: usize,
    }

    struct Buffers {
        _keep: Vec<DeviceBuffer<f32>>,
        _keep_i: Vec<DeviceBuffer<i32>>,
        _keep_u: Vec<DeviceBuffer<u64>>,
        _pos: DeviceBuffer<i64>,
        args: AttendArgs,
    }

    const H: usize = 64;
    const HD: usize = 512;
    const WINDOW: usize = 128;
    const TOPK: usize = 512;
    const ROPE: usize = 64;

    /// Uploads random inputs for `c`: q, kv, ring and comp rows of ~unit size, logits that
    /// spread the softmax, sinks of either sign, and for CSA uneven selection counts (0, 1,
    /// the whole top-k and random ones) of distinct random rows.
    fn upload_case(dev: &CudaDevice, c: &Case, seed: u64) -> Buffers {
        let mut rng = Rng(seed.wrapping_mul(0x9E3779B97F4A7C15) | 1);
        let q = dev.upload(&rng.f32s(c.n_tok * H * HD, 0.5)).unwrap();
        // K=V rows of f16 values, as ds4 numerics stores them (attend_mma's precondition; the
        // other kernels are bit-identical on any values).
        let mut rows = |n: usize| {
            let v: Vec<f32> = rng
                .f32s(n, 1.0)
                .into_iter()
                .map(|x| half::f16::from_f32(x).to_f32())
                .collect();
            dev.upload(&v).unwrap()
        };
        let kv = rows(c.n_tok * HD);
        let ring = rows(WINDOW * HD);
        let comp = rows(c.comp_rows.max(1) * HD);
        let sinks = dev.upload(&rng.f32s(H, 3.0)).unwrap();
        let mut sel = vec![0i32; c.n_tok * TOPK];
        let mut selc = vec![0i32; c.n_tok];
        if c.kind == 2 {
            for t in 0..c.n_tok {
                let visible = ((c.pos0 as usize + t + 1) / c.ratio).min(c.comp_rows);
                let want = match t % 5 {
                    0 => 0,
                    1 => 1,
                    2 => TOPK,
                    _ => rng.below(TOPK + 1),
                }
                .min(visible);
                // A random subset of the visible rows, in random order.
                let mut rows: Vec<i32> = (0..visible as i32).collect();
                for i in 0..want {
                    let k = i + rng.below(visible - i);
                    rows.swap(i, k);
                }
                sel[t * TOPK..t * TOPK + want].copy_from_slice(&rows[..want]);
                selc[t] = want as i32;
            }
        }
        let sel_b = dev.upload(&sel).unwrap();
        let selc_b = dev.upload(&selc).unwrap();
        let inv: Vec<u64> = (0..ROPE / 2)
            .map(|l| (10000f64.powf(-(2.0 * l as f64) / ROPE as f64)).to_bits())
            .collect();
        let inv_b = dev.upload(&inv).unwrap();
        let pos = dev.upload(&[c.pos0]).unwrap();
        let out = dev.alloc_filled::<f32>(c.n_tok * H * HD, 0xFF).unwrap();
        let max_rows = WINDOW
            + match c.kind {
                1 => c.comp_rows,
                2 => TOPK,
                _ => 0,
            };
        let args = AttendArgs {
            q: q.ptr(),
            kv: kv.ptr(),
            ring: ring.ptr(),
            comp: if c.kind == 0 { 0 } else { comp.ptr() },
            sel: sel_b.ptr(),
            selc: selc_b.ptr(),
            sinks: sinks.ptr(),
            out: out.ptr(),
            heads: H,
            head_dim: HD,
            pos: pos.ptr(),
            window: WINDOW,
            ring_cap: WINDOW,
            kind: c.kind,
            ratio: c.ratio,
            sel_stride: TOPK,
            scale: 1.0 / (HD as f32).sqrt(),
            inv_freq: inv_b.ptr(),
            rope_dim: ROPE,
            max_rows,
        };
        Buffers {
            _keep: vec![q, kv, ring, comp, sinks, out],
            _keep_i: vec![sel_b, selc_b],
            _keep_u: vec![inv_b],
            _pos: pos,
            args,
        }
    }

    /// Which attention kernel a test runs.
    #[derive(Clone, Copy, Debug)]
    enum Kernel {
        Attend,
        Heads,
        Span,
        Split,
        Mma,
    }

    /// Runs `kernel` into a fresh NaN-filled output and returns it.
    fn run(
        dev: &CudaDevice,
        b: &Buffers,
        n_tok: usize,
        kernel: Kernel,
        fk: &ForwardKernels,
    ) -> Vec<f32> {
        let out = dev.alloc_filled::<f32>(n_tok * H * HD, 0xFF).unwrap();
        let args = AttendArgs {
            out: out.ptr(),
            ..b.args
        };
        let scores = dev
            .alloc_filled::<f32>(args.split_scores_len(n_tok), 0xFF)
            .unwrap();
        // SAFETY: upload_case sized every buffer for n_tok tokens at these positions: the ring
        // holds WINDOW slots, comp the rows any token sees, sel only visible rows, and
        // max_rows covers the window plus the compressed rows; the scores scratch has
        // split_scores_len floats.
        unsafe {
            match kernel {
                Kernel::Attend => launch_attend(fk, dev, &args, n_tok),
                Kernel::Heads => launch_attend_heads(fk, dev, &args, n_tok),
                Kernel::Span => launch_attend_span(fk, dev, &args, n_tok),
                Kernel::Split => launch_attend_split(fk, dev, &args, n_tok, scores.ptr(), None),
                Kernel::Mma => launch_attend_mma(fk, dev, &args, n_tok),
            }
            .unwrap()
        };
        dev.synchronize().unwrap();
        dev.download(&out).unwrap()
    }

    #[test]
    fn attention_kernels_agree_with_attend() {
        let Some((dev, fk)) = gpu() else { return };
        let cases = [
            // Window only, from position 0: fewer rows than the window, all from the span.
            Case {
                name: "window, pos 0",
                n_tok: 40,
                pos0: 0,
                kind: 0,
                ratio: 1,
                comp_rows: 0,
            },
            // Window only, far: the window straddles the ring and the span.
            Case {
                name: "window, pos 1000",
                n_tok: 70,
                pos0: 1000,
                kind: 0,
                ratio: 1,
                comp_rows: 0,
            },
            // HCA: 62..66 compressed rows per token plus a full window.
            Case {
                name: "HCA, pos 1000",
                n_tok: 64,
                pos0: 1000,
                kind: 1,
                ratio: 16,
                comp_rows: 67,
            },
            // HCA near 0: tokens with no compressed row yet, then a few.
            Case {
                name: "HCA, pos 3",
                n_tok: 37,
                pos0: 3,
                kind: 1,
                ratio: 8,
                comp_rows: 5,
            },
            // CSA near 0: the window partly in the ring; selections of 0 .. 16 rows.
            Case {
                name: "CSA, pos 60",
                n_tok: 50,
                pos0: 60,
                kind: 2,
                ratio: 4,
                comp_rows: 28,
            },
            // CSA far: up to the whole top-k of 512, 640 rows per token.
            Case {
                name: "CSA, pos 5000",
                n_tok: 33,
                pos0: 5000,
                kind: 2,
                ratio: 4,
                comp_rows: 1258,
            },
            // HCA with more rows than attend_split_values stages at once (1 024): 1 628 to
            // 1 629 rows per token, two tiles.
            Case {
                name: "HCA, pos 3000",
                n_tok: 3,
                pos0: 3000,
                kind: 1,
                ratio: 2,
                comp_rows: 1502,
            },
        ];
        for (i, c) in cases.iter().enumerate() {
            let b = upload_case(&dev, c, 17 + i as u64);
            let want = run(&dev, &b, c.n_tok, Kernel::Attend, &fk);
            let amax = want.iter().fold(0f32, |m, v| m.max(v.abs()));
            for kernel in [Kernel::Heads, Kernel::Split] {
                let got = run(&dev, &b, c.n_tok, kernel, &fk);
                let mut mismatches = 0usize;
                let mut first = None;
                let mut worst = 0f32;
                for (k, (&w, &g)) in want.iter().zip(&got).enumerate() {
                    assert!(w.is_finite(), "{}: attend output {k} is {w}", c.name);
                    if w.to_bits() != g.to_bits() {
                        mismatches += 1;
                        worst = worst.max((w - g).abs());
                        first.get_or_insert((k / (H * HD), k / HD % H, k % HD, w, g));
                    }
                }
                if let Some((t, h, ch, w, g)) = first {
                    panic!(
                        "{}: {kernel:?}: {mismatches} of {} outputs differ (max |diff| {worst:e}, max |out| {amax}); first: token {t}, head {h}, channel {ch}: attend {w:e}, {kernel:?} {g:e}",
                        c.name,
                        want.len()
                    );
                }
                eprintln!(
                    "{}: {kernel:?}: {} outputs bit-identical (max |out| {amax})",
                    c.name,
                    want.len()
                );
            }
            // attend_mma: another summation order and online softmax, f32-class accuracy.
            let got = run(&dev, &b, c.n_tok, Kernel::Mma, &fk);
            let worst = want
                .iter()
                .zip(&got)
                .map(|(w, g)| (w - g).abs())
                .fold(
                    0f32,
                    |m, d| if d.is_nan() { f32::INFINITY } else { m.max(d) },
                );
            eprintln!("{}: Mma: max |diff| {worst:e} (max |out| {amax})", c.name);
            assert!(
                worst <= 1e-5 * amax,
                "{}: attend_mma differs from attend by {worst:e} (max |out| {amax})",
                c.name
            );
        }
    }

    /// attend_split's Q8_0 form of its outputs equals the activation quantizer's (amax / 127
    /// per 32 values, round to nearest even, clamp to ±127), computed here on the host from
    /// attend's outputs.
    #[test]
    fn attend_split_quantizes_its_output() {
        let Some((dev, fk)) = gpu() else { return };
        for (i, c) in [
            Case {
                name: "window, pos 0",
                n_tok: 3,
                pos0: 0,
                kind: 0,
                ratio: 1,
                comp_rows: 0,
            },
            Case {
                name: "CSA, pos 5000",
                n_tok: 2,
                pos0: 5000,
                kind: 2,
                ratio: 4,
                comp_rows: 1258,
            },
        ]
        .iter()
        .enumerate()
        {
            let b = upload_case(&dev, c, 40 + i as u64);
            let want = run(&dev, &b, c.n_tok, Kernel::Attend, &fk);
            let total = c.n_tok * H * HD;
            let out = dev.alloc_filled::<f32>(total, 0xFF).unwrap();
            let q = dev.alloc_filled::<i8>(total, 0x55).unwrap();
            let d = dev.alloc_filled::<f32>(total / 32, 0xFF).unwrap();
            let args = AttendArgs {
                out: out.ptr(),
                ..b.args
            };
            let scores = dev
                .alloc_filled::<f32>(args.split_scores_len(c.n_tok), 0xFF)
                .unwrap();
            // SAFETY: as in `run`; q and d hold the outputs' total values and total / 32 scales.
            unsafe {
                launch_attend_split(
                    &fk,
                    &dev,
                    &args,
                    c.n_tok,
                    scores.ptr(),
                    Some((q.ptr(), d.ptr())),
                )
                .unwrap()
            };
            dev.synchronize().unwrap();
            let (got_q, got_d) = (dev.download(&q).unwrap(), dev.download(&d).unwrap());
            for (b, block) in want.chunks(32).enumerate() {
                let amax = block.iter().fold(0f32, |m, v| m.max(v.abs()));
                let dd = amax / 127.0;
                let id = if dd != 0.0 { 1.0 / dd } else { 0.0 };
                assert_eq!(
                    got_d[b].to_bits(),
                    dd.to_bits(),
                    "{}: scale of block {b}",
                    c.name
                );
                for (j, v) in block.iter().enumerate() {
                    let qv = ((v * id).round_ties_even() as i32).clamp(-127, 127) as i8;
                    assert_eq!(got_q[32 * b + j], qv, "{}: value {}", c.name, 32 * b + j);
                }
            }
        }
    }

    /// The arguments check runs before anything launches: an unsupported shape is an error,
    /// and the span launcher then runs attend instead (same outputs).
    #[test]
    fn attend_heads_rejects_what_it_cannot_run() {
        let Some((dev, fk)) = gpu() else { return };
        let c = Case {
            name: "CSA",
            n_tok: 4,
            pos0: 0,
            kind: 2,
            ratio: 4,
            comp_rows: 1,
        };
        let b = upload_case(&dev, &c, 5);
        let args = AttendArgs {
            max_rows: 1 << 20,
            ..b.args
        };
        // SAFETY: the shared-memory check fails before any launch.
        let e = unsafe { launch_attend_heads(&fk, &dev, &args, c.n_tok) }.unwrap_err();
        assert!(e.to_string().contains("shared memory"), "{e}");
        // 3000 rows: too many for attend_heads on an H100 / H200, within attend's 48 KiB.
        let b = Buffers {
            args: AttendArgs {
                max_rows: 3000,
                ..b.args
            },
            ..b
        };
        // attend_split has no such limit: its scores live in device memory.
        let want = run(&dev, &b, c.n_tok, Kernel::Attend, &fk);
        assert!(want.iter().all(|v| v.is_finite()));
        for kernel in [Kernel::Span, Kernel::Split] {
            let got = run(&dev, &b, c.n_tok, kernel, &fk);
            assert!(
                want.iter()
                    .zip(&got)
                    .all(|(w, g)| w.to_bits() == g.to_bits()),
                "{kernel:?}"
            );
        }
    }

    /// Microseconds of one decode attention (a single token) with attend_split and with
    /// attend, back to back on one stream, at the model's shapes: a CSA layer (128 window rows
    /// and the whole top-k of 512), an HCA layer at 64K context (128 + 512 rows) and a sliding
    /// layer (128 rows).
    #[test]
    #[ignore]
    fn attend_split_timing() {
        let Some((dev, fk)) = gpu() else { return };
        for (i, c) in [
            Case {
                name: "CSA, 640 rows",
                n_tok: 1,
                pos0: 8192,
                kind: 2,
                ratio: 4,
                comp_rows: 2049,
            },
            Case {
                name: "HCA, 640 rows",
                n_tok: 1,
                pos0: 65535,
                kind: 1,
                ratio: 128,
                comp_rows: 512,
            },
            Case {
                name: "window, 128 rows",
                n_tok: 1,
                pos0: 2047,
                kind: 0,
                ratio: 1,
                comp_rows: 0,
            },
        ]
        .iter()
        .enumerate()
        {
            let b = upload_case(&dev, c, 70 + i as u64);
            let sel: Vec<i32> = (0..TOPK as i32).map(|k| 4 * k).collect();
            let sel = dev.upload(&sel).unwrap();
            let out = dev.alloc_filled::<f32>(H * HD, 0xFF).unwrap();
            // CSA: the token selects 0, 128, 256 or the whole top-k of rows (how the time
            // grows with the rows); upload_case's first token selects none.
            let counts: &[i32] = if c.kind == 2 {
                &[0, 128, 256, TOPK as i32]
            } else {
                &[0]
            };
            for &n_sel in counts {
                let selc = dev.upload(&[n_sel]).unwrap();
                let args = AttendArgs {
                    sel: sel.ptr(),
                    selc: selc.ptr(),
                    out: out.ptr(),
                    ..b.args
                };
                let scores = dev
                    .alloc_filled::<f32>(args.split_scores_len(1), 0xFF)
                    .unwrap();
                let iters = 200;
                for split in [true, false] {
                    // SAFETY: as in `run`; the selection indices are below comp_rows.
                    let launch = || unsafe {
                        if split {
                            launch_attend_split(&fk, &dev, &args, 1, scores.ptr(), None)
                        } else {
                            launch_attend(&fk, &dev, &args, 1)
                        }
                        .unwrap()
                    };
                    launch();
                    let start = dev.record_event().unwrap();
                    for _ in 0..iters {
                        launch();
                    }
                    let end = dev.record_event().unwrap();
                    let us = 1e3 * dev.elapsed_ms(&start, &end).unwrap() / iters as f32;
                    let name = if split { "attend_split" } else { "attend" };
                    eprintln!(
                        "{} ({n_sel} selected): {name}: {us:.2} us per token",
                        c.name
                    );
                }
            }
        }
    }

    /// Milliseconds of each kernel on the model's prefill shape: 256 tokens, 64 heads of 512,
    /// a CSA layer with 128 window rows and 512 selected rows per token (640 rows).
    #[test]
    #[ignore]
    fn attend_heads_timing() {
        let Some((dev, fk)) = gpu() else { return };
        let c = Case {
            name: "CSA, 256 tokens",
            n_tok: 256,
            pos0: 8192,
            kind: 2,
            ratio: 4,
            comp_rows: 2100,
        };
        let b = upload_case(&dev, &c, 99);
        // Every token selects the whole top-k.
        let selc = dev.upload(&vec![TOPK as i32; c.n_tok]).unwrap();
        let mut sel = vec![0i32; c.n_tok * TOPK];
        let mut rng = Rng(7);
        for s in sel.iter_mut() {
            *s = rng.below(2048) as i32;
        }
        let sel = dev.upload(&sel).unwrap();
        let args = AttendArgs {
            sel: sel.ptr(),
            selc: selc.ptr(),
            ..b.args
        };
        type Launch = unsafe fn(&ForwardKernels, &CudaDevice, &AttendArgs, usize) -> Result<()>;
        let kernels: [(&str, Launch); 3] = [
            ("attend", launch_attend),
            ("attend_heads", launch_attend_heads),
            ("attend_mma", launch_attend_mma),
        ];
        for (name, launch) in kernels {
            let iters = 20;
            // SAFETY: as in `run`; the selection indices are below the 2100 comp rows.
            unsafe { launch(&fk, &dev, &args, c.n_tok).unwrap() };
            let start = dev.record_event().unwrap();
            for _ in 0..iters {
                // SAFETY: as above.
                unsafe { launch(&fk, &dev, &args, c.n_tok).unwrap() };
            }
            let end = dev.record_event().unwrap();
            let ms = dev.elapsed_ms(&start, &end).unwrap() / iters as f32;
            eprintln!("{name}: {ms:.3} ms per launch (256 tokens x 64 heads x 640 rows)");
        }
    }
}
