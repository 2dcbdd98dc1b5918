//! The DeepSeek V4 forward pass on the GPU, mirroring the CPU backend's structure
//! (ds4-model cpu/forward.rs): a span is processed layer-major, every matmul of a layer runs
//! once for all tokens of the chunk, the compressors take the chunk's tokens in order, and
//! attention runs per (token, head). All intermediate values stay on the device; the host only
//! uploads the chunk's embedding rows and token ids and downloads the requested logits.

use std::collections::HashMap;

use cudarc::driver::result;

use ds4_model::config::{AttnKind, MoeKind};
use ds4_model::numerics::Numerics;

use crate::device::{DeviceBuffer, SIDE_STREAMS};
use crate::error::{CudaError, DriverContext, Result};
use crate::fwd_kernels::{grid_1d, kargs, per_item};
use crate::gemv::{ActQuant, Activations, QuantizedActivations, WeightFormat};
use crate::model::{CudaModel, DevHc, Mat};
use crate::session::GpuLayerState;

/// Threads per CTA of the per-item kernels.
const CTA: u32 = 256;
/// Threads per CTA of the split-K hyper-connection projection (hc.cu HC_MIX_THREADS), and
/// the most mix rows it handles (HC_MIX_MAX).
const HC_MIX_THREADS: usize = 128;
const HC_MIX_MAX: usize = 40;
/// Mix rows per CTA of the split-K projection (hc.cu HC_GROUP_ROWS).
const HC_GROUP_ROWS: usize = 6;
/// Tokens per CTA of the split-K projection (hc.cu HC_TOKENS).
const HC_TOKENS: usize = 8;
/// Sublayer-input elements per CTA of hc_pre for short spans (its grid is d / this × tokens,
/// CTA threads); spans of at least HC_SPAN_MIN tokens take HC_PRE_SPAN_SLICE elements per CTA
/// of HC_PRE_SPAN_THREADS (16 elements a thread: hc_pre loads them before reducing the mix).
const HC_PRE_SLICE: usize = 1024;
const HC_PRE_SPAN_SLICE: usize = 4096;
const HC_PRE_SPAN_THREADS: u32 = 256;
/// Spans of at least this many tokens take the span kernels of the hyper-connection
/// (hc.cu hc_mix_partial_span / hc_post_mix_span: all mix rows in one CTA, a range of tokens
/// per CTA) when it has HC_SPAN_N streams; shorter ones (decode) the split-K kernels.
const HC_SPAN_MIN: usize = 64;
const HC_SPAN_N: usize = 4;
/// Most tokens per CTA of the span kernels (hc.cu HC_SPAN_MAX_TOKENS), and the CTAs per
/// multiprocessor their launch bounds allow.
const HC_SPAN_MAX_TOKENS: usize = 256;
const HC_SPAN_CTAS_PER_SM: usize = 3;
/// Threads per CTA of the indexer's selection (compressor.cu SELECT_THREADS), a bound on its
/// static shared memory (histogram, warp counts), and the most keys it holds in shared memory:
/// what fits the launch default of 48 KiB with the static part (11 264 keys; a 64K context's
/// 16K rows read the rest again per pass). Opting into more failed the launch on an H200
/// (CUDA_ERROR_INVALID_VALUE at 64K context; cause not found).
const SELECT_THREADS: u32 = 1024;
const SELECT_STATIC_SHARED: usize = 4096;
const SELECT_CACHE_ROWS: usize = (MAX_SHARED - SELECT_STATIC_SHARED) / 4;
/// Tokens (one warp each) per CTA of hc_comb (hc.cu HC_COMB_WARPS).
const HC_COMB_WARPS: usize = 4;
/// Values per thread and most threads per row of the RMS norm kernels (vector_ops.rs SEG,
/// RMS_THREADS): hc_pre_norm takes rows of at most their product, with their CTA shape.
const NORM_SEG: usize = 8;
const NORM_THREADS: usize = 512;

// Side streams (crate::device::CudaDevice::fork) of a layer's independent branches: the
// hyper-connection's Sinkhorn projection; the K=V row and the attention compressor (in the
// FFN: the shared expert); the indexer. (A fourth branch, the indexer's keys apart from its
// queries joined into them, measured slower in the decode graph, presumably because a join is
// an edge the dependent launch cannot cross.)
const LANE_SINKHORN: usize = 0;
const LANE_KV: usize = 1;
const LANE_INDEXER: usize = 2;
/// Key rows per tile and tiles per CTA of the indexer's scoring (compressor.cu
/// INDEX_TILE_ROWS, INDEX_TILES).
const INDEX_TILE_ROWS: usize = 16;
const INDEX_TILES: usize = 8;
/// Largest dynamic shared memory used without opting in.
const MAX_SHARED: usize = 48 * 1024;

/// Per-stage wall time of the forward pass, on when the environment sets `DS4_CUDA_PROFILE`:
/// every stage ends with a device synchronize (so stages are timed exactly, at some cost to
/// the total). The table goes to stderr when the session ends.
pub(crate) struct StageTimes {
    on: bool,
    last: std::time::Instant,
    acc: Vec<(&'static str, f64, usize)>,
}

impl StageTimes {
    fn new() -> StageTimes {
        StageTimes {
            // DS4_CUDA_PROFILE=kernels / trace are the kernel profilers, without syncs.
            on: crate::profile::mode() == crate::profile::ProfileMode::Stages,
            last: std::time::Instant::now(),
            acc: Vec::new(),
        }
    }

    /// Starts timing from now (after waiting for earlier work).
    fn start(&mut self, m: &CudaModel) -> Result<()> {
        if self.on {
            m.gpu.device.synchronize()?;
            self.last = std::time::Instant::now();
        }
        Ok(())
    }

    /// Charges the time since the last mark to `stage`.
    fn mark(&mut self, m: &CudaModel, stage: &'static str) -> Result<()> {
        if !self.on {
            return Ok(());
        }
        m.gpu.device.synchronize()?;
        let now = std::time::Instant::now();
        let dt = (now - self.last).as_secs_f64();
        self.last = now;
        match self.acc.iter_mut().find(|e| e.0 == stage) {
            Some(e) => {
                e.1 += dt;
                e.2 += 1;
            }
            None => self.acc.push((stage, dt, 1)),
        }
        Ok(())
    }
}

impl Drop for StageTimes {
    fn drop(&mut self) {
        if !self.on || self.acc.is_empty() {
            return;
        }
        let total: f64 = self.acc.iter().map(|e| e.1).sum();
        eprintln!("ds4 CUDA stage times (DS4_CUDA_PROFILE, synchronized per stage):");
        for (stage, secs, count) in &self.acc {
            eprintln!(
                "  {stage:<16} {:>10.3} ms {:>6.1}%  ({count} calls)",
                secs * 1e3,
                secs / total * 100.0
            );
        }
    }
}

/// Quantized-activation buffers by (kind, vector length, the f32 buffer they are the
/// quantized form of), grown on demand: one input's quantized form is never overwritten by
/// another input's, whatever the shapes (side streams read forms made before they forked).
/// `generation`
/// counts the reallocations: a captured graph holds the buffers' addresses, so it is only
/// replayed while the generation it was captured at is current.
#[derive(Default)]
pub(crate) struct QuantSlots {
    slots: HashMap<(ActQuant, usize, u64), QuantizedActivations>,
    generation: u64,
}

impl QuantSlots {
    /// The quantized form (`kind`, `n` vectors of `cols` values) of the f32 buffer at device
    /// address `src`, made earlier.
    fn get(
        &self,
        kind: ActQuant,
        cols: usize,
        n: usize,
        src: u64,
    ) -> Result<&QuantizedActivations> {
        self.slots
            .get(&(kind, cols, src))
            .filter(|qa| qa.n_vecs == n)
            .ok_or_else(|| {
                CudaError::InvalidArgument(format!(
                    "no quantized activations of {cols} values for {n} vectors"
                ))
            })
    }
}

/// How to combine a layer's MoE output (moe_combine's arguments besides the buffers).
#[derive(Clone, Copy)]
struct MoePending {
    /// Row of each slot in edown (slot_pos when the slots were sorted), or 0.
    slot_pos: u64,
    /// Whether the slot weights are applied here (reference numerics) rather than before
    /// the down projection (ds4).
    weighted: bool,
}

/// A captured decode step and the quant-slot generation whose buffers it uses.
struct DecodeGraph {
    graph: cudarc::driver::CudaGraph,
    generation: u64,
}

// SAFETY: CUDA graph objects are not internally synchronized but may be used from any thread
// when calls are serialized. A DecodeGraph lives in one session's Scratch and is only touched
// through `&mut Scratch` (launch, drop), so no two threads use it at once; cudarc's launch
// binds the context to the calling thread first.
unsafe impl Send for DecodeGraph {}

/// Device scratch for one chunk of up to `cap` tokens (allocated once per session).
pub(crate) struct Scratch {
    pub cap: usize,
    streams: DeviceBuffer<f32>,
    /// The streams' second buffer: hc_post_mix writes the new streams here, then the two swap.
    streams_next: DeviceBuffer<f32>,
    flat: DeviceBuffer<f32>,
    mix: DeviceBuffer<f32>,
    maps: DeviceBuffer<f32>,
    x: DeviceBuffer<f32>,
    xn: DeviceBuffer<f32>,
    qr: DeviceBuffer<f32>,
    qrn: DeviceBuffer<f32>,
    q: DeviceBuffer<f32>,
    qn: DeviceBuffer<f32>,
    kv: DeviceBuffer<f32>,
    kvn: DeviceBuffer<f32>,
    ckv: DeviceBuffer<f32>,
    cg: DeviceBuffer<f32>,
    ikv: DeviceBuffer<f32>,
    ig: DeviceBuffer<f32>,
    iq: DeviceBuffer<f32>,
    iw: DeviceBuffer<f32>,
    sel: DeviceBuffer<i32>,
    selc: DeviceBuffer<i32>,
    iscores: DeviceBuffer<f32>,
    /// A single token's attention scores (heads × the most rows a layer attends over), for
    /// attend_split.
    attn_scores: DeviceBuffer<f32>,
    o: DeviceBuffer<f32>,
    og: DeviceBuffer<f32>,
    zg: DeviceBuffer<f32>,
    z: DeviceBuffer<f32>,
    y: DeviceBuffer<f32>,
    rlog: DeviceBuffer<f32>,
    ids: DeviceBuffer<i32>,
    wts: DeviceBuffer<f32>,
    /// Routed slots sorted by expert (spans of several tokens): order[p] = slot, slot_pos[slot] = p,
    /// and the sorted slots' ids and weights.
    slot_order: DeviceBuffer<i32>,
    slot_pos: DeviceBuffer<i32>,
    /// Each expert's first position among the sorted slots (E + 1 entries).
    group_start: DeviceBuffer<i32>,
    sorted_ids: DeviceBuffer<i32>,
    sorted_wts: DeviceBuffer<f32>,
    xe: DeviceBuffer<f32>,
    eg: DeviceBuffer<f32>,
    eu: DeviceBuffer<f32>,
    eh: DeviceBuffer<f32>,
    edown: DeviceBuffer<f32>,
    sg: DeviceBuffer<f32>,
    su: DeviceBuffer<f32>,
    sh: DeviceBuffer<f32>,
    sdown: DeviceBuffer<f32>,
    tokens: DeviceBuffer<i32>,
    hraw: DeviceBuffer<f32>,
    hflat: DeviceBuffer<f32>,
    hmix: DeviceBuffer<f32>,
    hu: DeviceBuffer<f32>,
    hun: DeviceBuffer<f32>,
    /// Split-K partial sums of the next hyper-connection's projection (n × slices × (R+1)).
    hc_part: DeviceBuffer<f32>,
    /// Whether hc_part holds the partials of the hyper-connection about to run.
    hc_part_ready: bool,
    /// The MoE output is not combined yet (the expert outputs in edown, the shared expert's
    /// in sdown): hc_post combines it, inside hc_post_mix when it can.
    moe_pending: Option<MoePending>,
    /// hc_pre already normalized the sublayer input into xn (hc_pre_norm), with the quantized
    /// forms of its norm's consumers where these flags say so (what norm_for / norm_for_both
    /// return): the sublayer skips its own norm. Taken by the sublayer that follows.
    pre_normed: Option<(bool, bool)>,
    logits: DeviceBuffer<f32>,
    /// Quantized activations (ds4 numerics) by (kind, vector length), main stream.
    quant: QuantSlots,
    /// The side streams' own quantized activations (by lane).
    lane_quant: [QuantSlots; SIDE_STREAMS],
    /// The span's first position on the device (kernels read it there, so that a captured
    /// decode graph replays at any position).
    pos: DeviceBuffer<i64>,
    /// Whether `streams` and `streams_next` are exchanged (an odd number of hc_post_mix swaps).
    streams_swapped: bool,
    /// While a decode graph is being captured: grids cover the whole session.
    capturing: bool,
    /// The captured single-token forward (kernels only; uploads and the logits download are
    /// outside), replayed for every decode step.
    decode_graph: Option<DecodeGraph>,
    /// Graphs are used unless profiling (whose timing events cannot be captured) or a
    /// capture failed.
    graphs_enabled: bool,
    /// A single-token forward ran uncaptured (so every buffer it needs exists).
    decode_warm: bool,
    /// Indexer score rows per token (the most compressed rows a CSA layer can have).
    max_index_rows: usize,
    prof: StageTimes,
}

impl Scratch {
    /// Reallocations of any stream's quant slots so far (a graph is bound to their buffers).
    fn quant_generation(&self) -> u64 {
        self.quant.generation + self.lane_quant.iter().map(|q| q.generation).sum::<u64>()
    }

    pub fn new(
        m: &CudaModel,
        cap: usize,
        max_index_rows: usize,
        max_attn_rows: usize,
    ) -> Result<Scratch> {
        let c = &m.cfg;
        let dev = &m.gpu.device;
        let f = |n: usize| dev.alloc::<f32>(n.max(1));
        let i = |n: usize| dev.alloc::<i32>(n.max(1));
        let (d, nc, k) = (c.hidden, c.hc_mult, c.n_experts_used);
        let hhd = c.n_heads * c.head_dim;
        let (ni, di) = (c.index_heads, c.index_head_dim);
        let god = c.o_groups * c.o_lora_rank;
        Ok(Scratch {
            cap,
            streams: f(cap * nc * d)?,
            streams_next: f(cap * nc * d)?,
            flat: f(cap * nc * d)?,
            mix: f(cap * (2 + nc) * nc)?,
            maps: f(cap * (2 * nc + nc * nc))?,
            x: f(cap * d)?,
            xn: f(cap * d)?,
            qr: f(cap * c.q_lora_rank)?,
            qrn: f(cap * c.q_lora_rank)?,
            q: f(cap * hhd)?,
            qn: f(cap * hhd)?,
            kv: f(cap * c.head_dim)?,
            kvn: f(cap * c.head_dim)?,
            ckv: f(cap * 2 * c.head_dim)?,
            cg: f(cap * 2 * c.head_dim)?,
            ikv: f(cap * 2 * di)?,
            ig: f(cap * 2 * di)?,
            iq: f(cap * ni * di)?,
            iw: f(cap * ni)?,
            sel: i(cap * c.index_topk)?,
            selc: i(cap)?,
            iscores: f(cap * max_index_rows)?,
            attn_scores: f(c.n_heads * max_attn_rows)?,
            o: f(cap * hhd)?,
            og: f(cap * hhd)?,
            zg: f(cap * god)?,
            z: f(cap * god)?,
            y: f(cap * d)?,
            rlog: f(cap * c.n_experts)?,
            ids: i(cap * k)?,
            wts: f(cap * k)?,
            slot_order: i(cap * k)?,
            slot_pos: i(cap * k)?,
            group_start: i(c.n_experts + 1)?,
            sorted_ids: i(cap * k)?,
            sorted_wts: f(cap * k)?,
            xe: f(cap * k * d)?,
            eg: f(cap * k * c.expert_ff)?,
            eu: f(cap * k * c.expert_ff)?,
            eh: f(cap * k * c.expert_ff)?,
            edown: f(cap * k * d)?,
            sg: f(cap * c.expert_ff)?,
            su: f(cap * c.expert_ff)?,
            sh: f(cap * c.expert_ff)?,
            sdown: f(cap * d)?,
            tokens: i(cap)?,
            hraw: f(cap * nc * d)?,
            hflat: f(cap * nc * d)?,
            hmix: f(cap * nc)?,
            hu: f(cap * d)?,
            hun: f(cap * d)?,
            hc_part: f(cap * d.div_ceil(HC_MIX_THREADS) * ((2 + nc) * nc + 1))?,
            hc_part_ready: false,
            moe_pending: None,
            pre_normed: None,
            logits: f(cap * c.vocab_size)?,
            quant: QuantSlots::default(),
            lane_quant: Default::default(),
            pos: dev.alloc::<i64>(1)?,
            streams_swapped: false,
            capturing: false,
            decode_graph: None,
            graphs_enabled: matches!(
                crate::profile::mode(),
                crate::profile::ProfileMode::Off | crate::profile::ProfileMode::Trace
            ) && std::env::var_os("DS4_CUDA_NO_GRAPH").is_none(),
            decode_warm: false,
            max_index_rows,
            prof: StageTimes::new(),
        })
    }
}

/// Copies `n` f32 from `src` (element `so`) to `dst` (element `do_`) on the stream.
fn copy_f32(
    m: &CudaModel,
    src: &DeviceBuffer<f32>,
    so: usize,
    dst: &DeviceBuffer<f32>,
    do_: usize,
    n: usize,
) -> Result<()> {
    if so + n > src.len() || do_ + n > dst.len() {
        return Err(CudaError::InvalidArgument(format!(
            "device copy of {n} values out of range"
        )));
    }
    if n == 0 {
        return Ok(());
    }
    // SAFETY: both ranges were checked to lie inside their live allocations.
    unsafe {
        result::memcpy_dtod_async(
            dst.ptr_at(do_),
            src.ptr_at(so),
            n * 4,
            m.gpu.device.stream().cu_stream(),
        )
    }
    .ctx("cuMemcpyDtoDAsync")
}

/// Downloads the first `n` values of `buf`.
pub(crate) fn download_prefix(
    m: &CudaModel,
    buf: &DeviceBuffer<f32>,
    n: usize,
) -> Result<Vec<f32>> {
    if n > buf.len() {
        return Err(CudaError::InvalidArgument(format!(
            "download of {n} values from a buffer of {}",
            buf.len()
        )));
    }
    let mut out = vec![0f32; n];
    if n > 0 {
        // SAFETY: `out` holds n values, the source range lies in `buf`; `out` is not touched
        // until the stream is synchronized below.
        unsafe {
            result::memcpy_dtoh_async(&mut out, buf.ptr(), m.gpu.device.main_stream().cu_stream())
        }
        .ctx("cuMemcpyDtoHAsync")?;
    }
    m.gpu.device.synchronize()?;
    Ok(out)
}

/// y = W·x for `n` vectors, with ds4's activation quantization when the numerics ask for it
/// (Q8_0 input for Q8_0 rows, Q8_K for the K/IQ formats; plain f32 otherwise).
fn mm(
    m: &CudaModel,
    quant: &mut QuantSlots,
    w: &Mat,
    x: &DeviceBuffer<f32>,
    n: usize,
    y: &mut DeviceBuffer<f32>,
) -> Result<()> {
    let dm = m.matrix(w)?;
    match quantized(m, quant, w, x, n)? {
        Some(qa) => product(m, &dm, qa, n, y),
        None if n >= GEMM_MIN_VECS && crate::Gpu::gemm_f16_fits(&dm) => {
            m.gpu.gemm_f16(&dm, x, n, y)
        }
        None => m.gpu.gemv(&dm, Activations::F32(x), n, y),
    }
}

/// Tokens from which a span's routed experts run grouped (about 6 × 256 / 256 slots per
/// expert at 256 tokens; below ~16 most experts have none and per-slot launches do as well).
const GROUPED_MIN_TOKENS: usize = 16;

/// Vectors from which a product runs as a GEMM instead of the matvec kernels: Q8_0 on the
/// tensor cores ([`crate::Gpu::gemm_q8_0`], same bits as the CPU's per-block dot product),
/// F16 with f32 activations on the tensor cores as two f16 terms per activation
/// ([`crate::Gpu::gemm_f16`]; the CUDA cores for column counts that are not multiples of 64).
const GEMM_MIN_VECS: usize = 16;

/// y = W·x for `n` quantized vectors: the tensor-core GEMM for Q8_0 spans, else the matvec.
fn product(
    m: &CudaModel,
    w: &crate::gemv::DeviceMatrix,
    qa: &QuantizedActivations,
    n: usize,
    y: &mut DeviceBuffer<f32>,
) -> Result<()> {
    if n >= GEMM_MIN_VECS && w.format == WeightFormat::Q8_0 {
        m.gpu.gemm_q8_0(w, qa, n, y)
    } else {
        m.gpu.gemv(w, Activations::Quantized(qa), n, y)
    }
}

/// The activations `w` takes in these numerics: Some(kind) when ds4 numerics quantize its
/// input (Q8_0 / Q8_K), None for plain f32.
fn act_quant_of(m: &CudaModel, w: &Mat) -> Option<ActQuant> {
    match m.numerics {
        Numerics::Ds4 => w.format.activation_quant(),
        Numerics::Reference => None,
    }
}

/// y = rmsnorm(x) (`width` values per row, `n` rows), and, when `consumer` takes quantized
/// activations, their quantization in the same launch (left in the quant slot that
/// [`mm_prequantized`] reads). Returns whether it quantized.
#[allow(clippy::too_many_arguments)]
fn norm_for(
    m: &CudaModel,
    quant: &mut QuantSlots,
    x: &DeviceBuffer<f32>,
    weight: Option<&DeviceBuffer<f32>>,
    width: usize,
    n: usize,
    y: &mut DeviceBuffer<f32>,
    consumer: &Mat,
) -> Result<bool> {
    let eps = m.cfg.rms_eps;
    match act_quant_of(m, consumer).filter(|_| consumer.cols == width) {
        Some(kind) => {
            let qa = quant_slot(m, quant, kind, width, n, y.ptr())?;
            m.gpu.rmsnorm_quantized(x, weight, width, n, eps, y, qa)?;
            Ok(true)
        }
        None => {
            m.gpu.rmsnorm(x, weight, width, n, eps, y)?;
            Ok(false)
        }
    }
}

/// [`norm_for`] for two consumers that take different quantized forms (the FFN input: a
/// Q8_0 shared expert and K-quant/IQ routed experts): both made in one launch. Returns
/// whether each consumer's form was made.
#[allow(clippy::too_many_arguments)]
fn norm_for_both(
    m: &CudaModel,
    quant: &mut QuantSlots,
    x: &DeviceBuffer<f32>,
    weight: Option<&DeviceBuffer<f32>>,
    width: usize,
    n: usize,
    y: &mut DeviceBuffer<f32>,
    first: &Mat,
    second: &Mat,
) -> Result<(bool, bool)> {
    let kinds = (act_quant_of(m, first), act_quant_of(m, second));
    let same_width = first.cols == width && second.cols == width;
    if let (Some(ActQuant::Q8_0), Some(ActQuant::Q8K), true) = (kinds.0, kinds.1, same_width) {
        quant_slot(m, quant, ActQuant::Q8_0, width, n, y.ptr())?;
        quant_slot(m, quant, ActQuant::Q8K, width, n, y.ptr())?;
        let [Some(q8_0), Some(q8_k)] = quant.slots.get_disjoint_mut([
            &(ActQuant::Q8_0, width, y.ptr()),
            &(ActQuant::Q8K, width, y.ptr()),
        ]) else {
            unreachable!("both slots were made above");
        };
        m.gpu
            .rmsnorm_quantized_both(x, weight, width, n, m.cfg.rms_eps, y, q8_0, q8_k)?;
        return Ok((true, true));
    }
    let made = norm_for(m, quant, x, weight, width, n, y, first)?;
    Ok((made, made && kinds.1 == kinds.0 && second.cols == width))
}

/// The RMS norm a sublayer begins with: its weight and the products that read its output
/// (`second`: the routed experts beside the shared expert, as [`norm_for_both`] takes them).
#[derive(Clone, Copy)]
struct PreNorm<'a> {
    weight: &'a DeviceBuffer<f32>,
    first: &'a Mat,
    second: Option<&'a Mat>,
}

/// The quantized forms [`norm_for`] (`second` None) or [`norm_for_both`] make for consumers of
/// `width`-value vectors: whether Q8_0 and Q8_K are made, and what those functions return.
fn norm_forms(
    m: &CudaModel,
    width: usize,
    first: &Mat,
    second: Option<&Mat>,
) -> (bool, bool, (bool, bool)) {
    let k1 = act_quant_of(m, first);
    if let Some(sec) = second {
        let same_width = first.cols == width && sec.cols == width;
        if let (Some(ActQuant::Q8_0), Some(ActQuant::Q8K), true) =
            (k1, act_quant_of(m, sec), same_width)
        {
            return (true, true, (true, true));
        }
    }
    match k1.filter(|_| first.cols == width) {
        Some(kind) => {
            let made2 =
                second.is_some_and(|sec| act_quant_of(m, sec) == Some(kind) && sec.cols == width);
            (kind == ActQuant::Q8_0, kind == ActQuant::Q8K, (true, made2))
        }
        None => (false, false, (false, false)),
    }
}

/// SwiGLU of gate/up into `out` (see [`crate::Gpu::swiglu_clamp`]), with the quantized form
/// `consumer` takes (vectors of `per_slot` values) made in the same launch; returns whether
/// it was made.
#[allow(clippy::too_many_arguments)]
fn swiglu_for(
    m: &CudaModel,
    quant: &mut QuantSlots,
    gate: &DeviceBuffer<f32>,
    up: &DeviceBuffer<f32>,
    total: usize,
    per_slot: usize,
    limit: Option<f32>,
    weight: Option<&DeviceBuffer<f32>>,
    out: &mut DeviceBuffer<f32>,
    consumer: &Mat,
) -> Result<bool> {
    match act_quant_of(m, consumer).filter(|_| consumer.cols == per_slot) {
        Some(kind) => {
            let qa = quant_slot(m, quant, kind, per_slot, total / per_slot, out.ptr())?;
            m.gpu
                .swiglu_clamp_quantized(gate, up, total, per_slot, limit, weight, out, qa)?;
            Ok(true)
        }
        None => {
            m.gpu
                .swiglu_clamp(gate, up, total, per_slot, limit, weight, out)?;
            Ok(false)
        }
    }
}

/// y = W·x for `n` vectors whose quantized form [`norm_for`] already made (when it returned
/// true; else plain [`mm`]). Nothing may have used that quant slot in between.
fn mm_prequantized(
    m: &CudaModel,
    quant: &mut QuantSlots,
    prequantized: bool,
    w: &Mat,
    x: &DeviceBuffer<f32>,
    n: usize,
    y: &mut DeviceBuffer<f32>,
) -> Result<()> {
    let kind = act_quant_of(m, w);
    match (prequantized, kind) {
        (true, Some(kind)) => product(m, &m.matrix(w)?, quant.get(kind, w.cols, n, x.ptr())?, n, y),
        _ => mm(m, quant, w, x, n, y),
    }
}

/// [`mm_prequantized`] on a side stream: the prequantized form is read from `made` (the
/// main stream's slots, filled before the fork), anything quantized here goes into the
/// branch's own slots `own`, so that no two streams write one buffer.
#[allow(clippy::too_many_arguments)]
fn mm_branch(
    m: &CudaModel,
    made: &QuantSlots,
    own: &mut QuantSlots,
    prequantized: bool,
    w: &Mat,
    x: &DeviceBuffer<f32>,
    n: usize,
    y: &mut DeviceBuffer<f32>,
) -> Result<()> {
    match (prequantized, act_quant_of(m, w)) {
        (true, Some(kind)) => product(m, &m.matrix(w)?, made.get(kind, w.cols, n, x.ptr())?, n, y),
        _ => mm(m, own, w, x, n, y),
    }
}

/// The quant slot for the quantized form of `n` vectors of `cols` values of `kind` of the
/// f32 buffer at `src`, grown when too small.
fn quant_slot<'a>(
    m: &CudaModel,
    quant: &'a mut QuantSlots,
    kind: ActQuant,
    cols: usize,
    n: usize,
    src: u64,
) -> Result<&'a mut QuantizedActivations> {
    let key = (kind, cols, src);
    let grow = quant.slots.get(&key).is_none_or(|q| q.q.len() < n * cols);
    if grow {
        quant
            .slots
            .insert(key, m.gpu.alloc_quantized(kind, cols, n)?);
        quant.generation += 1;
    }
    let qa = quant.slots.get_mut(&key).expect("inserted above");
    qa.n_vecs = n;
    Ok(qa)
}

/// Which input vector each routed-expert slot reads, and whether its quantized form exists.
#[derive(Clone, Copy)]
struct SlotInput<'a> {
    /// Slot s reads vector s of x (else every slot reads vector 0: one token's k experts).
    per_slot: bool,
    /// The quantized form is already in the quant slot (the previous expert product made it
    /// from the same x).
    prequantized: bool,
    /// The slots are sorted by expert with these E+1 group starts: quantized products then run
    /// grouped (each expert's rows decoded once for all of its slots, same bits per slot).
    groups: Option<&'a DeviceBuffer<i32>>,
}

/// Expert products: slot s uses matrix ids[s] of the stack on its `n_vecs` input vectors
/// (see [`SlotInput`]); y is n_slots × n_vecs × rows.
#[allow(clippy::too_many_arguments)]
fn mm_experts(
    m: &CudaModel,
    quant: &mut QuantSlots,
    w: &Mat,
    ids: &DeviceBuffer<i32>,
    n_slots: usize,
    x: &DeviceBuffer<f32>,
    n_vecs: usize,
    input: SlotInput,
    y: &mut DeviceBuffer<f32>,
) -> Result<()> {
    let dm = m.matrix(w)?;
    let x_vecs = if input.per_slot {
        n_slots * n_vecs
    } else {
        n_vecs
    };
    let qa = expert_input(m, quant, w, x, x_vecs, input)?;
    match qa {
        Some(qa) if input.groups.is_some() && input.per_slot && n_vecs == 1 => {
            let groups = input.groups.expect("checked by the guard");
            let x = Activations::Quantized(qa);
            if crate::Gpu::expert_gemm_grouped_supports(dm.format) {
                m.gpu.expert_gemm_grouped(&dm, groups, x, n_slots, y)
            } else {
                m.gpu.expert_gemv_grouped(&dm, groups, x, n_slots, y)
            }
        }
        Some(qa) if n_vecs >= GEMM_MIN_VECS && dm.format == WeightFormat::Q8_0 => m
            .gpu
            .expert_gemm_q8_0(&dm, ids, n_slots, qa, input.per_slot, n_vecs, y),
        Some(qa) => m.gpu.expert_gemv(
            &dm,
            ids,
            n_slots,
            Activations::Quantized(qa),
            input.per_slot,
            n_vecs,
            y,
        ),
        None => m.gpu.expert_gemv(
            &dm,
            ids,
            n_slots,
            Activations::F32(x),
            input.per_slot,
            n_vecs,
            y,
        ),
    }
}

/// The quantized form of an expert product's `x_vecs` input vectors (None: f32 input): the
/// one already in the quant slot when `input.prequantized`, else made now.
fn expert_input<'a>(
    m: &CudaModel,
    quant: &'a mut QuantSlots,
    w: &Mat,
    x: &DeviceBuffer<f32>,
    x_vecs: usize,
    input: SlotInput,
) -> Result<Option<&'a QuantizedActivations>> {
    match act_quant_of(m, w) {
        None => Ok(None),
        Some(kind) if input.prequantized => quant.get(kind, w.cols, x_vecs, x.ptr()).map(Some),
        Some(_) => quantized(m, quant, w, x, x_vecs),
    }
}

/// Whether two weights have the same format and shape (so one paired launch takes both).
fn same_shape(a: &Mat, b: &Mat) -> bool {
    a.format == b.format && a.rows == b.rows && a.cols == b.cols && a.experts == b.experts
}

/// [`mm_experts`] of two same-shaped stacks on the same one-vector-per-slot input, in one
/// launch (the MoE gate and up projections).
#[allow(clippy::too_many_arguments)]
fn mm_experts_pair(
    m: &CudaModel,
    quant: &mut QuantSlots,
    w: [&Mat; 2],
    ids: &DeviceBuffer<i32>,
    n_slots: usize,
    x: &DeviceBuffer<f32>,
    input: SlotInput,
    y: [&mut DeviceBuffer<f32>; 2],
) -> Result<()> {
    let dm = [m.matrix(w[0])?, m.matrix(w[1])?];
    let x_vecs = if input.per_slot { n_slots } else { 1 };
    let qa = expert_input(m, quant, w[0], x, x_vecs, input)?;
    match (qa, input.groups) {
        (Some(qa), Some(groups)) if input.per_slot => {
            let (w, x) = ([&dm[0], &dm[1]], Activations::Quantized(qa));
            if crate::Gpu::expert_gemm_grouped_supports(dm[0].format) {
                m.gpu.expert_gemm_grouped_pair(w, groups, x, n_slots, y)
            } else {
                m.gpu.expert_gemv_grouped_pair(w, groups, x, n_slots, y)
            }
        }
        (Some(qa), _) => m.gpu.expert_gemv_pair(
            [&dm[0], &dm[1]],
            ids,
            n_slots,
            Activations::Quantized(qa),
            input.per_slot,
            1,
            y,
        ),
        (None, _) => m.gpu.expert_gemv_pair(
            [&dm[0], &dm[1]],
            ids,
            n_slots,
            Activations::F32(x),
            input.per_slot,
            1,
            y,
        ),
    }
}

/// In ds4 numerics, quantizes the `n` input vectors as the weight format's kernel expects.
fn quantized<'a>(
    m: &CudaModel,
    quant: &'a mut QuantSlots,
    w: &Mat,
    x: &DeviceBuffer<f32>,
    n: usize,
) -> Result<Option<&'a QuantizedActivations>> {
    let Some(kind) = act_quant_of(m, w) else {
        return Ok(None);
    };
    let qa = quant_slot(m, quant, kind, w.cols, n, x.ptr())?;
    m.gpu.quantize_activations(x, qa)?;
    Ok(Some(qa))
}

impl CudaModel {
    /// Runs one chunk (at most `scratch.cap` tokens at positions pos0..) through every layer,
    /// updating the layer states; returns the logits of chunk rows `head_rows` (a contiguous
    /// range), row-major.
    pub(crate) fn forward_chunk(
        &self,
        s: &mut Scratch,
        layers: &mut [GpuLayerState],
        tokens: &[u32],
        pos0: usize,
        head_rows: std::ops::Range<usize>,
    ) -> Result<Vec<f32>> {
        let c = &self.cfg;
        let n = tokens.len();
        let (d, nc) = (c.hidden, c.hc_mult);
        if n == 0 || n > s.cap {
            return Err(CudaError::InvalidArgument(format!(
                "chunk of {n} tokens (scratch holds {})",
                s.cap
            )));
        }
        s.prof.start(self)?;
        // Dependent launches for single-token steps only (see set_dependent_launch).
        self.gpu.device.set_dependent_launch(n == 1);
        // Embedding rows decoded on the host (the file is mapped there), every stream a copy.
        let mut streams = vec![0f32; n * nc * d];
        for (t, &tok) in tokens.iter().enumerate() {
            let st = &mut streams[t * nc * d..(t + 1) * nc * d];
            self.host
                .decode_row(&self.host.embed, tok as usize, &mut st[..d]);
            for j in 1..nc {
                st.copy_within(0..d, j * d);
            }
        }
        // Every chunk starts from the same stream buffer (a captured graph reads that one).
        if s.streams_swapped {
            std::mem::swap(&mut s.streams, &mut s.streams_next);
            s.streams_swapped = false;
        }
        self.gpu.device.copy_to(&streams, &mut s.streams, 0)?;
        let ids: Vec<i32> = tokens.iter().map(|&t| t as i32).collect();
        self.gpu.device.copy_to(&ids, &mut s.tokens, 0)?;
        self.gpu.device.copy_to(&[pos0 as i64], &mut s.pos, 0)?;
        s.prof.mark(self, "embed")?;

        let rows = head_rows.len();
        let graph_step = n == 1 && head_rows == (0..1) && s.graphs_enabled;
        if s.decode_graph
            .as_ref()
            .is_some_and(|g| g.generation != s.quant_generation())
        {
            s.decode_graph = None;
        }
        if graph_step && s.decode_graph.is_none() && s.decode_warm {
            self.capture_decode(s, layers, pos0)?;
        }
        match (&s.decode_graph, graph_step) {
            (Some(g), true) => g.graph.launch().ctx("cuGraphLaunch (decode step)")?,
            _ => {
                self.layers_and_head(s, layers, n, pos0, head_rows)?;
                s.decode_warm |= graph_step;
            }
        }
        s.prof.mark(self, "head")?;
        download_prefix(self, &s.logits, rows * c.vocab_size)
    }

    /// Every layer, then the head kernels for chunk rows `head_rows` (logits left in
    /// s.logits).
    fn layers_and_head(
        &self,
        s: &mut Scratch,
        layers: &mut [GpuLayerState],
        n: usize,
        pos0: usize,
        head_rows: std::ops::Range<usize>,
    ) -> Result<()> {
        s.hc_part_ready = false;
        s.pre_normed = None;
        for (l, state) in layers.iter_mut().enumerate() {
            self.layer(l, s, state, n, pos0)?;
        }
        self.head(s, head_rows)
    }

    /// Captures the single-token forward into s.decode_graph. A capture that fails turns
    /// graphs off for the session (the caller then runs the step uncaptured).
    fn capture_decode(
        &self,
        s: &mut Scratch,
        layers: &mut [GpuLayerState],
        pos0: usize,
    ) -> Result<()> {
        let stream = self.gpu.device.main_stream();
        stream
            .begin_capture(
                cudarc::driver::sys::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL,
            )
            .ctx("cuStreamBeginCapture")?;
        s.capturing = true;
        let ran = self.layers_and_head(s, layers, 1, pos0, 0..1);
        s.capturing = false;
        let captured = stream.end_capture(cudarc::driver::sys::CUgraphInstantiate_flags(0));
        // The kernels issued during a capture did not run: undo the host-side stream swaps.
        if s.streams_swapped {
            std::mem::swap(&mut s.streams, &mut s.streams_next);
            s.streams_swapped = false;
        }
        match (ran, captured) {
            (Ok(()), Ok(Some(graph))) => {
                s.decode_graph = Some(DecodeGraph {
                    graph,
                    generation: s.quant_generation(),
                });
            }
            // Anything else (an operation that cannot be captured, an error the uncaptured
            // step will report again): no graphs for this session.
            _ => s.graphs_enabled = false,
        }
        Ok(())
    }

    /// Whether the split-K projection kernels take this hyper-connection (F32/F16 rows, at
    /// most HC_MIX_MAX of them); else it goes through rmsnorm + the generic matvec.
    fn hc_split_k(&self, hc: &DevHc) -> bool {
        let nc = self.cfg.hc_mult;
        matches!(hc.fn_.format, WeightFormat::F32 | WeightFormat::F16)
            && (2 + nc) * nc <= HC_MIX_MAX
            && hc.fn_.rows == (2 + nc) * nc
            && hc.fn_.cols == nc * self.cfg.hidden
    }

    /// Grid of the split-K projection kernels: (d/128 slices, row groups, groups of
    /// HC_TOKENS tokens).
    fn hc_split_k_grid(&self, n: usize) -> cudarc::driver::LaunchConfig {
        let nc = self.cfg.hc_mult;
        cudarc::driver::LaunchConfig {
            grid_dim: (
                self.cfg.hidden.div_ceil(HC_MIX_THREADS) as u32,
                ((2 + nc) * nc).div_ceil(HC_GROUP_ROWS) as u32,
                n.div_ceil(HC_TOKENS) as u32,
            ),
            block_dim: (HC_MIX_THREADS as u32, 1, 1),
            shared_mem_bytes: 0,
        }
    }

    /// Whether a span of n tokens takes the span kernels (hc_span_grid).
    fn hc_span(&self, n: usize) -> bool {
        n >= HC_SPAN_MIN && self.cfg.hc_mult == HC_SPAN_N
    }

    /// Grid of the span kernels and their tokens per CTA: (d/128 slices, token ranges), as
    /// many CTAs as are resident at once (one wave, every CTA the same number of tokens), at
    /// most HC_SPAN_MAX_TOKENS tokens each. Each CTA loads the slice's projection weights
    /// once, so fewer and longer ranges read them less often.
    fn hc_span_grid(&self, n: usize) -> (cudarc::driver::LaunchConfig, usize) {
        let slices = self.cfg.hidden.div_ceil(HC_MIX_THREADS);
        let resident = self.gpu.device.info().multiprocessors as usize * HC_SPAN_CTAS_PER_SM;
        let ranges = (resident / slices)
            .max(n.div_ceil(HC_SPAN_MAX_TOKENS))
            .clamp(1, n);
        let tpc = n.div_ceil(ranges);
        let cfg = cudarc::driver::LaunchConfig {
            grid_dim: (slices as u32, n.div_ceil(tpc) as u32, 1),
            block_dim: (HC_MIX_THREADS as u32, 1, 1),
            shared_mem_bytes: 0,
        };
        (cfg, tpc)
    }

    /// HC pre of the chunk: s.x = each token's sublayer input, s.maps its mappings. The
    /// projection comes from the partials hc_post_mix left (s.hc_part_ready), or is computed
    /// here. A single token also gets the sublayer's `norm` here when hc_pre_norm takes it
    /// (s.pre_normed then says so).
    fn hc_pre(&self, s: &mut Scratch, hc: &DevHc, n: usize, norm: Option<PreNorm>) -> Result<()> {
        let c = &self.cfg;
        let (d, nc) = (c.hidden, c.hc_mult);
        let slices = d.div_ceil(HC_MIX_THREADS);
        let split_k = self.hc_split_k(hc);
        if split_k && !s.hc_part_ready && self.hc_span(n) {
            let fw = self.matrix(&hc.fn_)?;
            let (cfg, tpc) = self.hc_span_grid(n);
            let a = kargs![
                s.streams.ptr(),
                fw.ptr,
                fw.format == WeightFormat::F16,
                s.hc_part.ptr(),
                d,
                n,
                tpc
            ];
            // SAFETY: hc_mix_partial_span(streams, fn, f16, part, d, n_tok, tpc) reads n_tok ×
            // 4 × d streams and the 24 × 4d projection rows (hc_split_k, hc_span: 4 streams),
            // and writes n_tok × slices × 25 partials (the grid covers the slices and, tpc
            // tokens per CTA, at most HC_SPAN_MAX_TOKENS, the tokens): the size of s.hc_part.
            unsafe {
                self.fk
                    .launch(&self.gpu.device, "fwd_hc", "hc_mix_partial_span", cfg, &a)?
            };
        } else if split_k && !s.hc_part_ready {
            let fw = self.matrix(&hc.fn_)?;
            let a = kargs![
                s.streams.ptr(),
                fw.ptr,
                fw.format == WeightFormat::F16,
                s.hc_part.ptr(),
                nc,
                d,
                (2 + nc) * nc,
                n
            ];
            let cfg = self.hc_split_k_grid(n);
            // SAFETY: hc_mix_partial(streams, fn, f16, part, n, d, R, n_tok) reads n_tok × n × d
            // streams and the R × n·d projection rows (checked by hc_split_k), and writes
            // n_tok × slices × (R+1) partials: the size of s.hc_part.
            unsafe {
                self.fk
                    .launch(&self.gpu.device, "fwd_hc", "hc_mix_partial", cfg, &a)?
            };
        } else if !split_k {
            self.gpu
                .rmsnorm(&s.streams, None, nc * d, n, c.rms_eps, &mut s.flat)?;
            mm(self, &mut s.quant, &hc.fn_, &s.flat, n, &mut s.mix)?;
        }
        s.hc_part_ready = false;
        let part = if split_k { s.hc_part.ptr() } else { 0 };
        // Spans: longer slices (the mix is reduced once per CTA).
        let (slice, threads) = if n >= HC_SPAN_MIN {
            (
                d.next_multiple_of(4).min(HC_PRE_SPAN_SLICE),
                HC_PRE_SPAN_THREADS,
            )
        } else {
            (HC_PRE_SLICE, CTA)
        };
        let a = kargs![
            s.mix.ptr(),
            part,
            slices,
            hc.base.ptr(),
            hc.scale.ptr(),
            s.streams.ptr(),
            s.maps.ptr(),
            s.x.ptr(),
            nc,
            d,
            c.hc_eps,
            c.rms_eps as f64,
            slice
        ];
        let cfg = cudarc::driver::LaunchConfig {
            grid_dim: (d.div_ceil(slice) as u32, n as u32, 1),
            block_dim: (threads, 1, 1),
            shared_mem_bytes: 0,
        };
        let dev = &self.gpu.device;
        if !self.hc_pre_norm(s, hc, n, part, slices, norm)? {
            // SAFETY: hc_pre(mix, part, n_part, base, scale, streams, maps, x, n, d, eps,
            // rms_eps, slice) (the grid's d / slice CTAs per token cover the elements) reads
            // n_tok × (2+n)n mixes or n_tok × slices × (R+1) partials, (2+n)n bases, 3 scales
            // and n_tok × n × d streams, writes the first 2n values of n_tok maps and
            // n_tok × d inputs: all inside the chunk-sized scratch and the layer's vectors.
            unsafe { self.fk.launch(dev, "fwd_hc", "hc_pre", cfg, &a)? };
        }
        // The Sinkhorn projection (comb) runs beside the sublayer; hc_post joins it. It reads
        // the mix inputs hc_pre read (nothing rewrites them before hc_post) and writes only
        // the comb part of the maps, which nothing reads before hc_post.
        let a = kargs![
            s.mix.ptr(),
            part,
            slices,
            hc.base.ptr(),
            hc.scale.ptr(),
            s.maps.ptr(),
            nc,
            d,
            c.hc_sinkhorn_iters,
            c.hc_eps,
            c.rms_eps as f64,
            n
        ];
        dev.fork(LANE_SINKHORN)?;
        // SAFETY: hc_comb(mix, part, n_part, base, scale, maps, n, d, iters, eps, rms_eps,
        // n_tok) (a warp per token, HC_COMB_WARPS per CTA) reads what hc_pre reads (but the
        // streams) and writes the last n² values of n_tok maps.
        let cfg = per_item(n.div_ceil(HC_COMB_WARPS), 32 * HC_COMB_WARPS as u32, 0);
        let launched = unsafe { self.fk.launch(dev, "fwd_hc", "hc_comb", cfg, &a) };
        dev.to_main();
        launched
    }

    /// hc_pre for a single token fused with the sublayer's `norm` (and its quantization, as
    /// norm_for / norm_for_both make it): s.x, s.maps' pre and post, s.xn and the quant slots
    /// of xn as the two launches would leave them, bit for bit. Returns whether it ran (else
    /// the caller launches hc_pre and the sublayer its norm); sets s.pre_normed.
    fn hc_pre_norm(
        &self,
        s: &mut Scratch,
        hc: &DevHc,
        n: usize,
        part: u64,
        slices: usize,
        norm: Option<PreNorm>,
    ) -> Result<bool> {
        let c = &self.cfg;
        let (d, nc) = (c.hidden, c.hc_mult);
        let Some(norm) = norm.filter(|_| n == 1) else {
            return Ok(false);
        };
        // The _v4 norm kernels' conditions (whole segments, 16-byte aligned rows), one cached
        // segment per thread (the short-row kernels); hc_pre_norm takes HC_SPAN_N streams.
        let aligned = |p: u64| p.is_multiple_of(16);
        if !d.is_multiple_of(NORM_SEG)
            || d > NORM_SEG * NORM_THREADS
            || nc != HC_SPAN_N
            || norm.weight.len() < d
            || ![s.streams.ptr(), s.x.ptr(), s.xn.ptr(), norm.weight.ptr()]
                .into_iter()
                .all(aligned)
        {
            return Ok(false);
        }
        let (q8_0, q8_k, made) = norm_forms(self, d, norm.first, norm.second);
        let mut slot = |kind, on: bool| -> Result<(u64, u64)> {
            if !on {
                return Ok((0, 0));
            }
            let qa = quant_slot(self, &mut s.quant, kind, d, n, s.xn.ptr())?;
            Ok((qa.q.ptr(), qa.d.ptr()))
        };
        let (q0, d0) = slot(ActQuant::Q8_0, q8_0)?;
        let (qk, dk) = slot(ActQuant::Q8K, q8_k)?;
        if !(q0.is_multiple_of(8) && qk.is_multiple_of(8)) {
            return Ok(false);
        }
        let name = match (q8_0, q8_k) {
            (false, false) => "hc_pre_norm",
            (true, false) => "hc_pre_norm_q8_0",
            (false, true) => "hc_pre_norm_q8_k",
            (true, true) => "hc_pre_norm_q8_0_q8_k",
        };
        let a = kargs![
            s.mix.ptr(),
            part,
            slices,
            hc.base.ptr(),
            hc.scale.ptr(),
            s.streams.ptr(),
            s.maps.ptr(),
            s.x.ptr(),
            nc,
            d,
            c.hc_eps,
            c.rms_eps as f64,
            norm.weight.ptr(),
            s.xn.ptr(),
            q0,
            d0,
            qk,
            dk,
            c.rms_eps
        ];
        // The norm kernels' CTA (vector_ops.rs rms_threads): one segment per thread, whole warps.
        let threads = d
            .div_ceil(NORM_SEG)
            .next_multiple_of(32)
            .clamp(32, NORM_THREADS);
        let cfg = per_item(n, threads as u32, 0);
        // SAFETY: hc_pre_norm*(mix, part, n_part, base, scale, streams, maps, x, n, d, eps,
        // rms_eps, w, y, q0, d0, qk, dk, norm_eps), one CTA per token, reads and writes what
        // hc_pre does (the same buffers) and d weights, writes d values of y (s.xn) and, where
        // selected (non-null), d int8 values and d/32 (Q8_0) or d/256 (Q8_K) scales of the
        // quant slots made above for n vectors of d; d is whole segments of at most 8 per
        // thread, every float row 16-byte and every int8 output 8-byte aligned (checked).
        unsafe { self.fk.launch(&self.gpu.device, "fwd_hc", name, cfg, &a)? };
        s.pre_normed = Some(made);
        Ok(true)
    }

    /// HC post of the chunk (s.y into the streams; after the MoE, its pending combination);
    /// when `next` (the hyper-connection that runs next) takes the split-K projection, its
    /// partials are computed in the same pass, and a pending MoE output is combined there too.
    fn hc_post(&self, s: &mut Scratch, n: usize, next: Option<&DevHc>) -> Result<()> {
        let c = &self.cfg;
        let (d, nc) = (c.hidden, c.hc_mult);
        // The comb mappings hc_pre's side branch computed.
        self.gpu.device.join(LANE_SINKHORN)?;
        let moe = s.moe_pending.take();
        if let Some(hc) = next.filter(|hc| self.hc_split_k(hc) && moe.is_none() && self.hc_span(n))
        {
            let fw = self.matrix(&hc.fn_)?;
            let (cfg, tpc) = self.hc_span_grid(n);
            let a = kargs![
                s.maps.ptr(),
                s.y.ptr(),
                s.streams.ptr(),
                s.streams_next.ptr(),
                fw.ptr,
                fw.format == WeightFormat::F16,
                s.hc_part.ptr(),
                d,
                n,
                tpc
            ];
            // SAFETY: hc_post_mix_span(maps, y, streams_in, streams_out, fn, f16, part, d,
            // n_tok, tpc) reads n_tok maps, n_tok × d outputs and n_tok × 4 × d streams, writes
            // as many into the second stream buffer (same size), reads the 24 × 4d projection
            // rows (hc_split_k, hc_span: 4 streams) and writes n_tok × slices × 25 partials
            // (the grid covers the slices and, tpc tokens per CTA, the tokens): all within the
            // scratch.
            unsafe {
                self.fk
                    .launch(&self.gpu.device, "fwd_hc", "hc_post_mix_span", cfg, &a)?
            };
            std::mem::swap(&mut s.streams, &mut s.streams_next);
            s.streams_swapped = !s.streams_swapped;
            s.hc_part_ready = true;
            return Ok(());
        }
        if let Some(hc) = next.filter(|hc| self.hc_split_k(hc)) {
            let fw = self.matrix(&hc.fn_)?;
            let (y, moe_args) = match moe {
                Some(p) => (
                    s.sdown.ptr(),
                    [s.edown.ptr(), p.slot_pos, s.ids.ptr(), s.wts.ptr()],
                ),
                None => (s.y.ptr(), [0; 4]),
            };
            let a = kargs![
                s.maps.ptr(),
                y,
                s.streams.ptr(),
                s.streams_next.ptr(),
                fw.ptr,
                fw.format == WeightFormat::F16,
                s.hc_part.ptr(),
                nc,
                d,
                (2 + nc) * nc,
                n,
                moe_args[0],
                moe_args[1],
                moe_args[2],
                moe_args[3],
                c.n_experts_used,
                moe.is_some_and(|p| p.weighted)
            ];
            let cfg = self.hc_split_k_grid(n);
            // SAFETY: hc_post_mix(maps, y, streams_in, streams_out, fn, f16, part, n, d, R,
            // n_tok, moe_down, moe_inv, moe_ids, moe_wts, k, weighted) reads n_tok maps, n_tok
            // × d outputs (or shared-expert outputs plus n_tok × k expert rows — rows given by
            // slot_pos, a permutation of the slots, when sorted — with their ids and weights)
            // and n_tok × n × d streams, writes as many into the second stream buffer (same
            // size), reads the R × n·d projection rows (checked by hc_split_k) and writes n_tok
            // × slices × (R+1) partials: all within the scratch.
            unsafe {
                self.fk
                    .launch(&self.gpu.device, "fwd_hc", "hc_post_mix", cfg, &a)?
            };
            std::mem::swap(&mut s.streams, &mut s.streams_next);
            s.streams_swapped = !s.streams_swapped;
            s.hc_part_ready = true;
            return Ok(());
        }
        if let Some(p) = moe {
            self.moe_combine(s, n, p)?;
        }
        let a = kargs![s.maps.ptr(), s.y.ptr(), s.streams.ptr(), n, nc, d];
        // SAFETY: hc_post(maps, y, streams, n_tok, n, d) touches n_tok maps, n_tok × d outputs
        // and n_tok × n × d streams, all within the scratch.
        unsafe {
            self.fk
                .launch(&self.gpu.device, "fwd_hc", "hc_post", grid_1d(n * d), &a)
        }
    }

    /// s.y = the MoE output of the chunk (moe_combine).
    fn moe_combine(&self, s: &Scratch, n: usize, p: MoePending) -> Result<()> {
        let c = &self.cfg;
        let (d, k) = (c.hidden, c.n_experts_used);
        let a = kargs![
            s.edown.ptr(),
            p.slot_pos,
            s.ids.ptr(),
            s.wts.ptr(),
            s.sdown.ptr(),
            s.y.ptr(),
            n,
            k,
            d,
            p.weighted
        ];
        // Grid: (slices of 1024 values of d, tokens), 256 threads.
        let cfg = cudarc::driver::LaunchConfig {
            grid_dim: (d.div_ceil(1024) as u32, n as u32, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: moe_combine reads n × k × d expert outputs (row slot_pos[slot] when sorted,
        // a permutation of the slots), n × k ids and weights (k <= 16, checked at load), n × d
        // shared outputs, and writes n × d values of s.y.
        unsafe {
            self.fk
                .launch(&self.gpu.device, "fwd_moe", "moe_combine", cfg, &a)
        }
    }

    /// RoPE of the last r channels of `rows` vectors of `width` (rows_per_tok per token); `pos`
    /// is the device address of the span's first position.
    #[allow(clippy::too_many_arguments)]
    fn rope(
        &self,
        l: usize,
        x: &DeviceBuffer<f32>,
        rows: usize,
        width: usize,
        rows_per_tok: usize,
        pos: u64,
        inverse: bool,
    ) -> Result<()> {
        let r = self.cfg.rope_dim;
        let a = kargs![
            x.ptr(),
            rows,
            width,
            rows_per_tok,
            pos,
            self.rope_for(l).ptr(),
            r,
            inverse
        ];
        // SAFETY: rope_tail touches the last r channels of `rows` vectors of `width` in x
        // (the caller's buffer holds them) and reads r/2 frequencies.
        unsafe {
            self.fk.launch(
                &self.gpu.device,
                "fwd_attention",
                "rope_tail",
                grid_1d(rows * r / 2),
                &a,
            )
        }
    }

    /// Per-row RMS norm (weight `w` or none) + RoPE of the last rope_dim channels (+ ds4's
    /// stored-KV rounding of the first `nope` channels when given) of `rows` vectors of
    /// head_dim values (rows_per_tok per token; `pos`: the device address of the span's first
    /// position), x → y, in one launch.
    #[allow(clippy::too_many_arguments)]
    fn head_norm_rope(
        &self,
        l: usize,
        x: &DeviceBuffer<f32>,
        w: Option<&DeviceBuffer<f32>>,
        y: &DeviceBuffer<f32>,
        rows: usize,
        rows_per_tok: usize,
        pos: u64,
        nope: Option<usize>,
    ) -> Result<()> {
        let c = &self.cfg;
        let hd = c.head_dim;
        let a = kargs![
            x.ptr(),
            w.map_or(0, |w| w.ptr()),
            y.ptr(),
            hd,
            c.rms_eps as f64,
            rows_per_tok,
            pos,
            self.rope_for(l).ptr(),
            c.rope_dim,
            nope.map_or(-1, |n| n as i64)
        ];
        // SAFETY: head_norm_rope reads `rows` vectors of hd values of x (and hd weights),
        // r/2 frequencies and the span position, and writes `rows` vectors of y; x and y hold
        // the chunk's rows (the caller's scratch). Dynamic shared: hd floats.
        unsafe {
            self.fk.launch(
                &self.gpu.device,
                "fwd_attention",
                "head_norm_rope",
                per_item(rows, 128, hd * 4),
                &a,
            )
        }
    }

    /// Stores the chunk's last min(n, cap) K=V rows (`kvn`; `pos`: the device address of the
    /// span's first position) into the layer's ring.
    fn ring_store(
        &self,
        kvn: &DeviceBuffer<f32>,
        pos: u64,
        state: &GpuLayerState,
        n: usize,
    ) -> Result<()> {
        let hd = self.cfg.head_dim;
        let a = kargs![kvn.ptr(), state.ring.ptr(), n, pos, hd, state.ring_cap];
        // SAFETY: ring_store copies at most cap rows of s.kvn into the ring's cap × hd slots.
        unsafe {
            self.fk.launch(
                &self.gpu.device,
                "fwd_attention",
                "ring_store",
                grid_1d(n.min(state.ring_cap) * hd),
                &a,
            )
        }
    }

    fn layer(
        &self,
        l: usize,
        s: &mut Scratch,
        state: &mut GpuLayerState,
        n: usize,
        pos0: usize,
    ) -> Result<()> {
        let w = &self.layers[l];
        let attn_norm = PreNorm {
            weight: &w.attn_norm,
            first: &w.q_a,
            second: None,
        };
        self.hc_pre(s, &w.hc_attn, n, Some(attn_norm))?;
        s.prof.mark(self, "hc")?;
        self.attention(l, s, state, n, pos0)?;
        self.hc_post(s, n, Some(&w.hc_ffn))?;
        // (ffn's single-token norm: norm_for_both of the shared and the routed experts.)
        let ffn_norm = PreNorm {
            weight: &w.ffn_norm,
            first: &w.gate_shexp,
            second: Some(&w.gate_exps),
        };
        self.hc_pre(s, &w.hc_ffn, n, Some(ffn_norm))?;
        s.prof.mark(self, "hc")?;
        self.ffn(l, s, n)?;
        self.hc_post(s, n, self.layers.get(l + 1).map(|next| &next.hc_attn))?;
        s.prof.mark(self, "hc")
    }

    /// The attention sublayer: s.x (n × d) → s.y (n × d).
    fn attention(
        &self,
        l: usize,
        s: &mut Scratch,
        state: &mut GpuLayerState,
        n: usize,
        pos0: usize,
    ) -> Result<()> {
        let c = &self.cfg;
        let w = &self.layers[l];
        let ds4 = self.numerics == Numerics::Ds4;
        let (d, hd, h) = (c.hidden, c.head_dim, c.n_heads);
        let dev = &self.gpu.device;
        // The normalized input, quantized once for both projections that read it (unless
        // hc_pre made them).
        let xq = match s.pre_normed.take() {
            Some((xq, _)) => xq,
            None => norm_for(
                self,
                &mut s.quant,
                &s.x,
                Some(&w.attn_norm),
                d,
                n,
                &mut s.xn,
                &w.q_a,
            )?,
        };
        let ratio = c.compress_ratio[l] as usize;

        // Branch: the shared K=V row (rounded as stored) and the attention compressor. They
        // read xn (and its quantized form) and write kv, kvn, ckv, cg and the compressor state.
        self.branch(LANE_KV, || {
            let own = &mut s.lane_quant[LANE_KV];
            let kv_q = xq && act_quant_of(self, &w.kv) == act_quant_of(self, &w.q_a);
            mm_branch(self, &s.quant, own, kv_q, &w.kv, &s.xn, n, &mut s.kv)?;
            let nope = ds4.then(|| hd - c.rope_dim);
            self.head_norm_rope(l, &s.kv, Some(&w.kv_norm), &s.kvn, n, 1, s.pos.ptr(), nope)?;
            if n == 1 {
                // A single token's row goes into the ring before attend: its slot (pos % cap)
                // holds position pos − cap, outside the window (≤ cap), and attend reads the
                // token's own row from kvn. Off the critical path here.
                self.ring_store(&s.kvn, s.pos.ptr(), state, n)?;
            }
            if let (Some(cw), Some(cs)) = (&w.compressor, state.attn.as_mut()) {
                let pre = xq && act_quant_of(self, &cw.kv) == act_quant_of(self, &w.q_a);
                mm_branch(self, &s.quant, own, pre, &cw.kv, &s.xn, n, &mut s.ckv)?;
                mm_branch(self, &s.quant, own, pre, &cw.gate, &s.xn, n, &mut s.cg)?;
                let qat = if ds4 { 1 } else { 0 };
                self.compress(l, cw, cs, &s.ckv, &s.cg, n, pos0, s.pos.ptr(), qat)?;
            }
            Ok(())
        })?;

        // Branch: the indexer selects the compressed rows of CSA layers. Its keys (its
        // compressor) and head weights read xn: issued now, beside the query projection; its
        // queries read qrn: the same side stream takes them once qrn is made (a second fork,
        // so the main stream still joins the lane only once). It writes ikv, ig, iw, iq,
        // iscores, sel and the indexer state.
        let indexer = match (&w.indexer, state.index.as_mut()) {
            (Some(iw), Some(is)) => Some((iw, is)),
            _ => None,
        };
        if let Some((iw, is)) = indexer {
            if pos0 + n > 0 && (pos0 + n) / ratio > s.max_index_rows {
                return Err(CudaError::InvalidArgument(
                    "indexer rows exceed the session's scratch".into(),
                ));
            }
            self.branch(LANE_INDEXER, || {
                let icw = &iw.compressor;
                let own = &mut s.lane_quant[LANE_INDEXER];
                let pre = xq && act_quant_of(self, &icw.kv) == act_quant_of(self, &w.q_a);
                mm_branch(self, &s.quant, own, pre, &icw.kv, &s.xn, n, &mut s.ikv)?;
                mm_branch(self, &s.quant, own, pre, &icw.gate, &s.xn, n, &mut s.ig)?;
                let qat = if ds4 { 2 } else { 0 };
                self.compress(l, icw, is, &s.ikv, &s.ig, n, pos0, s.pos.ptr(), qat)?;
                let pre = xq && act_quant_of(self, &iw.proj) == act_quant_of(self, &w.q_a);
                // (index_scores applies the weights' 1/sqrt(ni·di) scale.)
                mm_branch(self, &s.quant, own, pre, &iw.proj, &s.xn, n, &mut s.iw)
            })?;
        }

        // Queries: low rank, weighted norm, per-head unweighted norm, RoPE.
        mm_prequantized(self, &mut s.quant, xq, &w.q_a, &s.xn, n, &mut s.qr)?;
        let qrq = norm_for(
            self,
            &mut s.quant,
            &s.qr,
            Some(&w.q_a_norm),
            c.q_lora_rank,
            n,
            &mut s.qrn,
            &w.q_b,
        )?;

        if let (Some(iw), Some(is)) = (&w.indexer, state.index.as_ref()) {
            self.branch(LANE_INDEXER, || {
                let (ni, di) = (c.index_heads, c.index_head_dim);
                let own = &mut s.lane_quant[LANE_INDEXER];
                let pre = qrq && act_quant_of(self, &iw.q_b) == act_quant_of(self, &w.q_b);
                mm_branch(self, &s.quant, own, pre, &iw.q_b, &s.qrn, n, &mut s.iq)?;
                if ds4 {
                    let a = kargs![
                        s.iq.ptr(),
                        di,
                        false,
                        ni,
                        s.pos.ptr(),
                        self.rope_for(l).ptr(),
                        c.rope_dim
                    ];
                    // SAFETY: index_round(x, width, store, rows_per_tok, pos, inv_freq, r)
                    // ropes and rounds n·ni vectors of di values of s.iq in place (r/2
                    // frequencies, the span position), with di floats of dynamic shared memory.
                    unsafe {
                        self.fk.launch(
                            dev,
                            "fwd_attention",
                            "index_round",
                            per_item(n * ni, CTA, di * 4),
                            &a,
                        )?
                    };
                } else {
                    self.rope(l, &s.iq, n * ni, di, ni, s.pos.ptr(), false)?;
                }
                self.index_select(s, is, ratio, n, pos0)
            })?;
        }

        mm_prequantized(self, &mut s.quant, qrq, &w.q_b, &s.qrn, n, &mut s.q)?;
        self.head_norm_rope(l, &s.q, None, &s.qn, n * h, h, s.pos.ptr(), None)?;
        dev.join(LANE_KV)?;
        dev.join(LANE_INDEXER)?;
        s.prof.mark(self, "attn.qkv")?;

        // Attention over window + compressed rows, with sinks; inverse RoPE on the outputs.
        let window = c.sliding_window.min(state.ring_cap);
        let (kind, comp_ptr, max_comp) = match (c.attn_kind[l], state.attn.as_ref()) {
            (AttnKind::Hca, Some(cs)) => (1i64, cs.rows.ptr(), cs.capacity),
            (AttnKind::Csa, Some(cs)) => (2i64, cs.rows.ptr(), c.index_topk),
            _ => (0i64, 0u64, 0usize),
        };
        let args = crate::attend::AttendArgs {
            q: s.qn.ptr(),
            kv: s.kvn.ptr(),
            ring: state.ring.ptr(),
            comp: comp_ptr,
            sel: s.sel.ptr(),
            selc: s.selc.ptr(),
            sinks: w.sinks.ptr(),
            out: s.o.ptr(),
            heads: h,
            head_dim: hd,
            pos: s.pos.ptr(),
            window,
            ring_cap: state.ring_cap,
            kind,
            ratio: ratio.max(1),
            sel_stride: c.index_topk,
            scale: 1.0 / (hd as f64).sqrt() as f32,
            inv_freq: self.rope_for(l).ptr(),
            rope_dim: c.rope_dim,
            max_rows: window + max_comp,
        };
        // A single token's attention with attend_split, which can also leave the output's
        // Q8_0 form in the o_a product's quant slot (one launch less per layer).
        let (g, d_o) = (c.o_groups, c.o_lora_rank);
        let gw = h * hd / g;
        let split = n == 1
            && args
                .split_plan(dev.info().max_shared_per_block_optin)
                .is_ok()
            && args.split_scores_len(n) <= s.attn_scores.len();
        let o_quantized = if split
            && act_quant_of(self, &w.o_a_groups) == Some(ActQuant::Q8_0)
            && w.o_a_groups.cols == gw
        {
            let qa = quant_slot(self, &mut s.quant, ActQuant::Q8_0, gw, g, s.o.ptr())?;
            Some((qa.q.ptr(), qa.d.ptr()))
        } else {
            None
        };
        // SAFETY: the attention kernels read n × H query heads, the chunk's n K=V rows, the
        // ring's cap rows, the compressed rows visible at each position (rows written so far;
        // CSA: the indices index_select produced, all below the row count) and H sinks, and
        // write n × H × hd outputs: all inside the scratch and the layer state. Spans share
        // each token's rows across heads (attend_heads, bit-identical to attend). The quant
        // slot holds g vectors of gw = H × hd / g values (and their scales).
        unsafe {
            if n > 1 && ds4 && args.mma_plan(dev.info().max_shared_per_block_optin).is_ok() {
                // ds4 numerics stores K=V rows as f16 values: exact tensor-core operands.
                crate::attend::launch_attend_mma(&self.fk, dev, &args, n)
            } else if n > 1 {
                crate::attend::launch_attend_span(&self.fk, dev, &args, n)
            } else if split {
                crate::attend::launch_attend_split(
                    &self.fk,
                    dev,
                    &args,
                    n,
                    s.attn_scores.ptr(),
                    o_quantized,
                )
            } else {
                crate::attend::launch_attend(&self.fk, dev, &args, n)
            }
        }
        .map_err(|e| match e {
            CudaError::InvalidArgument(msg) => {
                CudaError::InvalidArgument(format!("layer {l}: {msg}"))
            }
            other => other,
        })?;
        if n > 1 {
            // A span's rows replace ring slots that its earlier tokens still see: after attend.
            self.ring_store(&s.kvn, s.pos.ptr(), state, n)?;
        }

        s.prof.mark(self, "attn.attend")?;
        // Grouped output projection: each group's heads through its rows of o_a, then o_b.
        // The matvec wants group-major inputs (G × n × gw) and gives group-major outputs; a
        // single token's token-major layout is already that, so only spans permute.
        let slot_input = SlotInput {
            per_slot: true,
            prequantized: o_quantized.is_some(),
            groups: None,
        };
        if n == 1 {
            mm_experts(
                self,
                &mut s.quant,
                &w.o_a_groups,
                &self.group_ids,
                g,
                &s.o,
                1,
                slot_input,
                &mut s.z,
            )?;
        } else if n >= GEMM_MIN_VECS
            && act_quant_of(self, &w.o_a_groups) == Some(ActQuant::Q8_0)
            && w.o_a_groups.cols == gw
        {
            // Tensor cores straight on the token-major layout: vector t·G + g of s.o (and of
            // s.z) is token t's group g, so no permutation is needed around the product.
            let dm = self.matrix(&w.o_a_groups)?;
            let qa = quantized(self, &mut s.quant, &w.o_a_groups, &s.o, n * g)?
                .ok_or_else(|| CudaError::InvalidArgument("o_a activations".into()))?;
            self.gpu
                .expert_gemm_q8_0_interleaved(&dm, &self.group_ids, g, qa, n, &mut s.z)?;
        } else {
            let a = kargs![s.o.ptr(), s.og.ptr(), n, g, gw];
            // SAFETY: group_split permutes n × G × gw values of s.o into s.og (same size).
            unsafe {
                self.fk
                    .launch(dev, "fwd_attention", "group_split", grid_1d(n * g * gw), &a)?
            };
            mm_experts(
                self,
                &mut s.quant,
                &w.o_a_groups,
                &self.group_ids,
                g,
                &s.og,
                n,
                slot_input,
                &mut s.zg,
            )?;
            let a = kargs![s.zg.ptr(), s.z.ptr(), n, g, d_o];
            // SAFETY: group_merge permutes n × G × d_o values of s.zg into s.z (same size).
            unsafe {
                self.fk.launch(
                    dev,
                    "fwd_attention",
                    "group_merge",
                    grid_1d(n * g * d_o),
                    &a,
                )?
            };
        }
        mm(self, &mut s.quant, &w.o_b, &s.z, n, &mut s.y)?;
        s.prof.mark(self, "attn.output")
    }

    /// Runs `issue` with launches going to side stream `lane` (forked from the main stream's
    /// current point); launches go to the main stream again afterwards, error or not. The
    /// caller joins the lane before anything on the main stream reads what the branch wrote.
    fn branch(&self, lane: usize, issue: impl FnOnce() -> Result<()>) -> Result<()> {
        self.gpu.device.fork(lane)?;
        let issued = issue();
        self.gpu.device.to_main();
        issued
    }

    /// The indexer's selection for a CSA layer: scores of every visible compressed row
    /// (queries s.iq, weights s.iw), the top-k threshold, and the chosen rows into s.sel /
    /// s.selc.
    fn index_select(
        &self,
        s: &mut Scratch,
        is: &crate::session::GpuCompressor,
        ratio: usize,
        n: usize,
        pos0: usize,
    ) -> Result<()> {
        let c = &self.cfg;
        let dev = &self.gpu.device;
        let (ni, di) = (c.index_heads, c.index_head_dim);
        let max_rows = s.max_index_rows;
        let w_scale = 1.0 / ((ni * di) as f64).sqrt() as f32;
        // Grids cover the rows visible at the span's end; a captured decode graph replays at
        // later positions, so it covers every row the session can hold (the kernels skip
        // rows not yet visible).
        let rows_now = if s.capturing {
            max_rows
        } else {
            (pos0 + n) / ratio
        };
        // Key rows per tile, largest heads and channels of index_scores_mma (compressor.cu
        // IDXM_ROWS, IDXM_HEADS, IDXM_DIM).
        const IDXM_ROWS: usize = 64;
        const IDXM_HEADS: usize = 64;
        const IDXM_DIM: usize = 128;
        if self.numerics == Numerics::Ds4 && ni <= IDXM_HEADS && di <= IDXM_DIM && di % 8 == 0 {
            // ds4 numerics: queries and keys are FP4-shaped, exact in bf16, so the tensor-core
            // kernel gives the f32 kernel's scores (compressor.cu).
            // Prefill: 8 warps, 8 tokens per CTA (at 32K, H200: 424 us per 1 024-token call
            // against 528 with 4 warps and 4 tokens). Fewer tokens: 4 warps sharing the rows
            // (decode: one token; each warp converts the whole query, so fewer warps per
            // tile read less of it again).
            let warps = if n >= 8 { 8 } else { 4 };
            // Tokens per CTA: the largest power of two up to the warp count.
            let mut tpc = 1;
            while tpc * 2 <= n.min(warps) {
                tpc *= 2;
            }
            let groups = n.div_ceil(tpc);
            let tiles = rows_now.div_ceil(IDXM_ROWS).max(1);
            // About a thousand CTAs when there is work for them; beyond that longer chunks,
            // up to 16 tiles (each CTA converts its tokens' 32 KiB queries once per chunk;
            // one tile per CTA measured 1.5x slower at 32K). A captured graph keeps one tile
            // per CTA: it must serve every later position.
            let tiles_per_cta = if s.capturing {
                1
            } else {
                (tiles * groups / 1024).clamp(1, 16)
            };
            let cfg = cudarc::driver::LaunchConfig {
                grid_dim: (tiles.div_ceil(tiles_per_cta) as u32, groups as u32, 1),
                block_dim: ((warps * 32) as u32, 1, 1),
                shared_mem_bytes: 0,
            };
            let a = kargs![
                s.iq.ptr(),
                s.iw.ptr(),
                w_scale,
                is.rows.ptr(),
                s.iscores.ptr(),
                s.pos.ptr(),
                ratio,
                ni,
                di,
                c.index_topk,
                max_rows,
                n,
                tpc,
                tiles_per_cta
            ];
            // SAFETY: index_scores_mma reads each of the n tokens' ni × di query (di even)
            // and ni weights, and of the keys only the (pos+1)/ratio ≤ max_index_rows rows
            // written so far (di % 8 == 0: 16-byte loads), and writes one score per visible
            // row into the token's max_index_rows-long scratch row; its shared memory is
            // static. The block (4 or 8 warps) is within its launch bound (IDXM_WARPS = 8)
            // and tpc, a power of two up to the warp count, divides it.
            unsafe {
                self.fk
                    .launch(dev, "fwd_compressor", "index_scores_mma", cfg, &a)?
            };
        } else {
            let a = kargs![
                s.iq.ptr(),
                s.iw.ptr(),
                w_scale,
                is.rows.ptr(),
                s.iscores.ptr(),
                s.pos.ptr(),
                ratio,
                ni,
                di,
                c.index_topk,
                max_rows
            ];
            let scores_shared = (ni + INDEX_TILE_ROWS) * (di + 1) * 4;
            if scores_shared > MAX_SHARED {
                return Err(CudaError::InvalidArgument(format!(
                    "indexer of {ni} heads x {di} needs {scores_shared} bytes of shared memory (at most {MAX_SHARED})"
                )));
            }
            let scores_cfg = cudarc::driver::LaunchConfig {
                grid_dim: (
                    rows_now.div_ceil(INDEX_TILE_ROWS * INDEX_TILES).max(1) as u32,
                    n as u32,
                    1,
                ),
                block_dim: (256, 1, 1),
                shared_mem_bytes: scores_shared as u32,
            };
            // SAFETY: index_scores reads each token's ni × di query and ni weights (scaled by
            // the third argument) and the (pos+1)/ratio ≤ max_index_rows keys written so far,
            // and writes one score per visible row into the token's max_index_rows-long
            // scratch row; its dynamic shared memory holds the query and one tile of keys,
            // (ni + 16) × (di + 1) floats.
            unsafe {
                self.fk
                    .launch(dev, "fwd_compressor", "index_scores", scores_cfg, &a)?
            };
        }
        // One CTA per token keeps the keys of its first rows in shared memory while it
        // selects: as many as are visible now (a captured graph: the session's most), at most
        // SELECT_CACHE_ROWS; later rows are read again per pass.
        if max_rows > i32::MAX as usize || n > i32::MAX as usize {
            return Err(CudaError::InvalidArgument(format!(
                "indexer selection over {max_rows} rows for {n} tokens exceeds 32-bit indices"
            )));
        }
        let cached = rows_now.clamp(1, SELECT_CACHE_ROWS);
        let shared = cached * 4;
        let a = kargs![
            s.iscores.ptr(),
            s.sel.ptr(),
            s.selc.ptr(),
            s.pos.ptr(),
            ratio,
            c.index_topk,
            max_rows,
            cached
        ];
        // SAFETY: index_topk reads each token's (pos+1)/ratio ≤ max_index_rows visible scores
        // (within its max_index_rows-long scratch row) and writes at most topk indices per
        // token (exactly topk when more rows are visible) and the count; its dynamic shared
        // memory holds `cached` keys, within the 48 KiB launch default with its static part. The CTA
        // has the kernel's SELECT_THREADS (1 024) threads.
        unsafe {
            self.fk.launch(
                dev,
                "fwd_compressor",
                "index_topk",
                per_item(n, SELECT_THREADS, shared),
                &a,
            )
        }
    }

    /// Feeds the chunk's projections to one compressor (rows appended after the
    /// pos0/ratio rows written before the chunk; `pos` holds pos0 on the device).
    #[allow(clippy::too_many_arguments)]
    fn compress(
        &self,
        l: usize,
        cw: &crate::model::DevCompressor,
        cs: &mut crate::session::GpuCompressor,
        kv_in: &DeviceBuffer<f32>,
        gate_in: &DeviceBuffer<f32>,
        n: usize,
        pos0: usize,
        pos: u64,
        qat: i64,
    ) -> Result<()> {
        let c = &self.cfg;
        let ratio = c.compress_ratio[l] as usize;
        if (pos0 + n) / ratio > cs.capacity {
            return Err(CudaError::InvalidArgument(format!(
                "layer {l}: the compressed-row capacity {} is exhausted",
                cs.capacity
            )));
        }
        let a = kargs![
            kv_in.ptr(),
            gate_in.ptr(),
            cw.ape.ptr(),
            cw.norm.ptr(),
            cs.kv.ptr(),
            cs.score.ptr(),
            cs.rows.ptr(),
            n,
            pos,
            ratio,
            cs.width,
            cs.overlap,
            c.rms_eps as f64,
            self.rope_for(l).ptr(),
            c.rope_dim,
            qat
        ];
        let dev = &self.gpu.device;
        if n == 1 {
            // SAFETY: compress_span reads n × coff·D projections, the m × coff·D slot bias and
            // D norm weights, updates the coff·m × coff·D frontier, and appends at most
            // (pos0+n)/ratio − pos0/ratio rows after row pos0/ratio, within the capacity
            // checked above. Dynamic shared memory: D floats.
            return unsafe {
                self.fk.launch(
                    dev,
                    "fwd_compressor",
                    "compress_span",
                    per_item(1, CTA, cs.width * 4),
                    &a,
                )
            };
        }
        // A span: every closing window pooled in parallel, then the frontier rebuilt.
        // SAFETY: compress_rows takes compress_span's arguments and reads the same inputs
        // (the frontier only), writing the same rows; its grid of n/ratio + 1 CTAs covers every
        // window that can close in n tokens (CTAs beyond them return). Dynamic shared: D floats.
        unsafe {
            self.fk.launch(
                dev,
                "fwd_compressor",
                "compress_rows",
                per_item(n / ratio + 1, CTA, cs.width * 4),
                &a,
            )?
        };
        let coff = if cs.overlap { 2 } else { 1 };
        let a = kargs![
            kv_in.ptr(),
            gate_in.ptr(),
            cw.ape.ptr(),
            cs.kv.ptr(),
            cs.score.ptr(),
            n,
            pos,
            ratio,
            cs.width,
            cs.overlap
        ];
        // SAFETY: compress_frontier reads n × coff·D projections and the m × coff·D slot bias,
        // and rewrites the coff·m × coff·D frontier element by element (each thread reads and
        // writes only its own slot and channel).
        unsafe {
            self.fk.launch(
                dev,
                "fwd_compressor",
                "compress_frontier",
                grid_1d(ratio * coff * cs.width),
                &a,
            )
        }
    }

    /// The MoE sublayer: s.x → s.y.
    fn ffn(&self, l: usize, s: &mut Scratch, n: usize) -> Result<()> {
        let c = &self.cfg;
        let w = &self.layers[l];
        let ds4 = self.numerics == Numerics::Ds4;
        let (d, k, ff) = (c.hidden, c.n_experts_used, c.expert_ff);
        let limit = Some(c.swiglu_clamp[l]);
        let dev = &self.gpu.device;
        // The normalized input, quantized once for the shared expert's gate and up, and for
        // a single token also for the routed experts (which then read it directly); hc_pre
        // may have made them.
        let (xq, experts_q) = if let Some(made) = s.pre_normed.take() {
            made
        } else if n == 1 {
            norm_for_both(
                self,
                &mut s.quant,
                &s.x,
                Some(&w.ffn_norm),
                d,
                n,
                &mut s.xn,
                &w.gate_shexp,
                &w.gate_exps,
            )?
        } else {
            let xq = norm_for(
                self,
                &mut s.quant,
                &s.x,
                Some(&w.ffn_norm),
                d,
                n,
                &mut s.xn,
                &w.gate_shexp,
            )?;
            (xq, false)
        };
        // Branch: the shared expert (reads xn and its quantized form; writes sg, su, sh and
        // sdown, which moe_combine reads after the join).
        self.branch(LANE_KV, || {
            let own = &mut s.lane_quant[LANE_KV];
            let up_q = xq && act_quant_of(self, &w.up_shexp) == act_quant_of(self, &w.gate_shexp);
            match act_quant_of(self, &w.gate_shexp) {
                // A single token's gate and up in one launch (bit-identical to two).
                Some(kind) if n == 1 && up_q && same_shape(&w.gate_shexp, &w.up_shexp) => {
                    let qa = s.quant.get(kind, w.gate_shexp.cols, n, s.xn.ptr())?;
                    let pair = [&self.matrix(&w.gate_shexp)?, &self.matrix(&w.up_shexp)?];
                    self.gpu.gemv_pair(
                        pair,
                        Activations::Quantized(qa),
                        n,
                        [&mut s.sg, &mut s.su],
                    )?;
                }
                _ => {
                    mm_branch(self, &s.quant, own, xq, &w.gate_shexp, &s.xn, n, &mut s.sg)?;
                    mm_branch(self, &s.quant, own, up_q, &w.up_shexp, &s.xn, n, &mut s.su)?;
                }
            }
            let shq = swiglu_for(
                self,
                own,
                &s.sg,
                &s.su,
                n * ff,
                ff,
                limit,
                None,
                &mut s.sh,
                &w.down_shexp,
            )?;
            mm_prequantized(self, own, shq, &w.down_shexp, &s.sh, n, &mut s.sdown)
        })?;
        // The router reads xn's quantized form when it takes the shared expert's (never
        // re-quantizing it while the branch reads it).
        let router_q = xq && act_quant_of(self, &w.router) == act_quant_of(self, &w.gate_shexp);
        mm_prequantized(
            self,
            &mut s.quant,
            router_q,
            &w.router,
            &s.xn,
            n,
            &mut s.rlog,
        )?;
        let hash = c.moe_kind[l] == MoeKind::Hash;
        let tid2eid = match (&w.tid2eid, hash) {
            (Some(t), true) => t.ptr(),
            _ => 0,
        };
        let bias = w.router_bias.as_ref().map_or(0, |b| b.ptr());
        let a = kargs![
            s.rlog.ptr(),
            bias,
            tid2eid,
            s.tokens.ptr(),
            s.ids.ptr(),
            s.wts.ptr(),
            n,
            c.n_experts,
            k,
            c.routed_scale,
            ds4
        ];
        // SAFETY: route reads n × E logits (rewritten in place as scores), E biases, the
        // chunk's token ids and their k-wide tid2eid rows (ids < vocab, checked at eval), and
        // writes n × k ids and weights.
        // One CTA of 256 threads per token (moe.cu ROUTE_THREADS).
        unsafe {
            self.fk
                .launch(dev, "fwd_moe", "route", per_item(n, 256, 0), &a)?
        };

        s.prof.mark(self, "ffn.route")?;
        // Routed experts: one slot per (token, choice), ids on the device. A span of several
        // tokens sorts its slots by expert first, so that slots of one expert are neighbours in
        // the matvec grid and share its rows through L2 (same arithmetic per slot either way).
        let slots = n * k;
        let sorted = n > 1;
        if sorted {
            // The most threads (whole warps) whose tile offsets, (E + 1) × (1 + warps) ints,
            // fit the default 48 KB of shared memory.
            let buckets = c.n_experts + 1;
            let threads = [1024usize, 512, 256, 128, 64, 32]
                .into_iter()
                .find(|t| buckets * (1 + t / 32) * 4 <= 48 << 10)
                .ok_or_else(|| {
                    CudaError::InvalidArgument(format!(
                        "{} experts: too many to sort the routed slots in one CTA",
                        c.n_experts
                    ))
                })?;
            let shared = buckets * (1 + threads / 32) * 4;
            let a = kargs![
                s.ids.ptr(),
                s.slot_order.ptr(),
                s.slot_pos.ptr(),
                s.group_start.ptr(),
                slots,
                c.n_experts
            ];
            // SAFETY: sort_slots reads n·k ids and writes n·k order and position entries (a
            // permutation of 0..n·k) and E+1 group starts, with (E+1)·(1 + warps) ints of
            // dynamic shared memory for its whole-warp CTA.
            unsafe {
                self.fk.launch(
                    dev,
                    "fwd_moe",
                    "sort_slots",
                    per_item(1, threads as u32, shared),
                    &a,
                )?
            };
            let a = kargs![
                s.xn.ptr(),
                s.slot_order.ptr(),
                s.ids.ptr(),
                s.wts.ptr(),
                s.xe.ptr(),
                s.sorted_ids.ptr(),
                s.sorted_wts.ptr(),
                slots,
                k,
                d
            ];
            // SAFETY: gather_slots reads the permutation, n × d inputs and n·k ids/weights,
            // and writes n·k × d values of s.xe and n·k sorted ids/weights.
            unsafe {
                self.fk
                    .launch(dev, "fwd_moe", "gather_slots", grid_1d(slots * d), &a)?
            };
        }
        let (slot_ids, slot_wts) = if sorted {
            (&s.sorted_ids, &s.sorted_wts)
        } else {
            (&s.ids, &s.wts)
        };
        // Gate and up read the same vectors: quantized once when their formats agree.
        let (x_in, per_slot) = if sorted {
            (&s.xe, true)
        } else {
            (&s.xn, false)
        };
        let gate_kind = act_quant_of(self, &w.gate_exps);
        let up_q = gate_kind.is_some() && gate_kind == act_quant_of(self, &w.up_exps);
        // Spans long enough to give experts several slots each run grouped.
        let groups = (sorted && n >= GROUPED_MIN_TOKENS).then_some(&s.group_start);
        let input = SlotInput {
            per_slot,
            prequantized: experts_q,
            groups,
        };
        if same_shape(&w.gate_exps, &w.up_exps) {
            // One launch for both stacks (bit-identical to two).
            mm_experts_pair(
                self,
                &mut s.quant,
                [&w.gate_exps, &w.up_exps],
                slot_ids,
                slots,
                x_in,
                input,
                [&mut s.eg, &mut s.eu],
            )?;
        } else {
            mm_experts(
                self,
                &mut s.quant,
                &w.gate_exps,
                slot_ids,
                slots,
                x_in,
                1,
                input,
                &mut s.eg,
            )?;
            mm_experts(
                self,
                &mut s.quant,
                &w.up_exps,
                slot_ids,
                slots,
                x_in,
                1,
                SlotInput {
                    per_slot,
                    prequantized: up_q,
                    groups,
                },
                &mut s.eu,
            )?;
        }
        // ds4 weighs the intermediate before the down projection (C2); the reference after.
        let weight = if ds4 { Some(slot_wts) } else { None };
        let ehq = swiglu_for(
            self,
            &mut s.quant,
            &s.eg,
            &s.eu,
            slots * ff,
            ff,
            limit,
            weight,
            &mut s.eh,
            &w.down_exps,
        )?;
        mm_experts(
            self,
            &mut s.quant,
            &w.down_exps,
            slot_ids,
            slots,
            &s.eh,
            1,
            SlotInput {
                per_slot: true,
                prequantized: ehq,
                groups,
            },
            &mut s.edown,
        )?;
        // The shared expert's output.
        dev.join(LANE_KV)?;
        let moe = MoePending {
            slot_pos: if sorted { s.slot_pos.ptr() } else { 0 },
            weighted: !ds4,
        };
        if n == 1 {
            // Combined by the hc_post that follows (inside hc_post_mix when it can): one
            // launch less on the decode's critical path.
            s.moe_pending = Some(moe);
        } else {
            // Spans combine once here: hc_post_mix's row groups would each redo it.
            self.moe_combine(s, n, moe)?;
        }
        s.prof.mark(self, "ffn.experts")
    }

    /// HC head, final norm and LM head for chunk rows `rows`; rows.len() × vocab.
    fn head(&self, s: &mut Scratch, rows: std::ops::Range<usize>) -> Result<()> {
        let c = &self.cfg;
        let (d, nc) = (c.hidden, c.hc_mult);
        let nr = rows.len();
        if nr == 0 {
            return Ok(());
        }
        copy_f32(
            self,
            &s.streams,
            rows.start * nc * d,
            &s.hraw,
            0,
            nr * nc * d,
        )?;
        self.gpu
            .rmsnorm(&s.hraw, None, nc * d, nr, c.rms_eps, &mut s.hflat)?;
        mm(
            self,
            &mut s.quant,
            &self.output_hc.fn_,
            &s.hflat,
            nr,
            &mut s.hmix,
        )?;
        let a = kargs![
            s.hmix.ptr(),
            self.output_hc.base.ptr(),
            self.output_hc.scale.ptr(),
            s.hraw.ptr(),
            s.hu.ptr(),
            nc,
            d,
            c.hc_eps
        ];
        // SAFETY: hc_head reads nr × n mixes, n bases, 1 scale and nr × n × d streams, writes
        // nr × d values of s.hu.
        unsafe {
            self.fk.launch(
                &self.gpu.device,
                "fwd_hc",
                "hc_head",
                per_item(nr, CTA, 0),
                &a,
            )?
        };
        self.gpu
            .rmsnorm(&s.hu, Some(&self.output_norm), d, nr, c.rms_eps, &mut s.hun)?;
        mm(self, &mut s.quant, &self.output, &s.hun, nr, &mut s.logits)
    }
}
