//! The DeepSeek V4 forward pass on the GPU, mirroring the CPU backend's structure
//! (ds4-model cpu/forward.rs): a span is processed layer-major, every matmul of a layer runs
//! once for all tokens of the chunk, the compressors take the chunk's tokens in order, and
//! attention runs per (token, head). All intermediate values stay on the device; the host only
//! uploads the chunk's token ids and first position and downloads the requested logits (the
//! embedding rows are gathered on the GPU from the uploaded table).

use std::collections::HashMap;
use std::sync::Arc;

use cudarc::driver::result;

use ds4_model::config::{AttnKind, ModelConfig, MoeKind};
use ds4_model::numerics::Numerics;

use crate::device::{DeviceBuffer, HostStaging, SIDE_STREAMS};
use crate::error::{CudaError, DriverContext, Result};
use crate::fwd_kernels::{grid_1d, kargs, per_item};
use crate::gemv::{ActQuant, Activations, DeviceMatrix, QuantizedActivations, WeightFormat};
use crate::model::{CudaModel, DevHc, Mat};
use crate::session::GpuLayerState;

mod attention;
mod ffn;
mod hc;
mod tokens;

use tokens::GreedyBuffers;

/// Threads per CTA of the per-item kernels.
const CTA: u32 = 256;

/// Rows of logits the head computes at a time: a span's scratch holds this many rows of the
/// vocabulary (132 MB), not the span's (1 GiB at 2 048 tokens, which on a GPU short of memory
/// meant ~1 GiB more of the weights in host memory); spans that want every position's logits
/// get them piece by piece.
pub(crate) const HEAD_ROWS: usize = 256;
/// Threads per CTA of the split-K hyper-connection projection (hc.cu HC_MIX_THREADS; the
/// scratch holds its per-CTA partials).
const HC_MIX_THREADS: usize = 128;

// Side streams (crate::device::CudaDevice::fork) of a layer's independent branches: the
// hyper-connection's Sinkhorn projection; the K=V row (during a decode step's attention: the
// L2 prefetch of o_a; in the FFN: the shared expert); the
// indexer's keys and head weights; its queries, scores and top-k (which wait for the keys'
// stream); the attention compressor. (The indexer on one stream: GPU step 7 779 µs against
// 7 705-7 719 on two, session 8.)
const LANE_SINKHORN: usize = 0;
const LANE_KV: usize = 1;
const LANE_INDEXER: usize = 2;
const LANE_INDEX_QUERY: usize = 3;
const LANE_COMPRESSOR: usize = 4;
/// Copies of host-memory expert stacks into the staging buffer, which span layers (ffn.rs).
const LANE_STAGE: usize = 5;
/// The side streams whose kernels run at the highest priority: the indexer's, the longer
/// path to a CSA layer's attention (GPU step at 2K, H100: 7 890 µs without, 7 719 with; the
/// K=V lane as well, with the FFN's shared expert moved to a stream of its own, changed
/// nothing: 7 704 against 7 708; the main stream during the FFN, ahead of the shared
/// expert's branch: 7 843 against 7 779).
pub(crate) const PRIORITY_LANES: [usize; 2] = [LANE_INDEXER, LANE_INDEX_QUERY];

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

/// `DS4_CUDA_PROFILE=host`: where the host's time goes in graph-replayed decode steps, to
/// account for the time between the GPU's steps (the bench's step minus the trace's GPU
/// step). Phases are wall times on the calling thread; "caller" is the time from the end of
/// one step's forward_chunk to the start of the next (sampling, the session's copies).
pub(crate) struct HostTimes {
    on: bool,
    steps: u64,
    /// When this call began (begin), and the last mark.
    started: std::time::Instant,
    last: std::time::Instant,
    step_end: Option<std::time::Instant>,
    /// This call's phases, added to `acc` only if it is a graph step (a prefill span, a
    /// capture or an uncaptured step would swamp the means).
    cur: [f64; HostTimes::PHASES.len()],
    acc: [f64; HostTimes::PHASES.len()],
}

impl HostTimes {
    const PHASES: [&'static str; 5] =
        ["caller", "inputs", "uploads", "graph launch", "logits wait"];

    fn new() -> HostTimes {
        HostTimes {
            on: crate::profile::mode() == crate::profile::ProfileMode::Host,
            steps: 0,
            started: std::time::Instant::now(),
            last: std::time::Instant::now(),
            step_end: None,
            cur: [0.0; HostTimes::PHASES.len()],
            acc: [0.0; HostTimes::PHASES.len()],
        }
    }

    fn begin(&mut self) {
        if self.on {
            self.cur = [0.0; HostTimes::PHASES.len()];
            self.started = std::time::Instant::now();
            self.last = self.started;
        }
    }

    /// Charges the time since the last mark to phase `i` (of PHASES).
    fn mark(&mut self, i: usize) {
        if self.on {
            let now = std::time::Instant::now();
            self.cur[i] += (now - self.last).as_secs_f64();
            self.last = now;
        }
    }

    /// Ends a graph step (begun at begin). The first one after a prefill or an uncaptured
    /// step has no caller time to charge and is not counted.
    fn end_step(&mut self) {
        if !self.on {
            return;
        }
        if let Some(prev) = self.step_end.replace(std::time::Instant::now()) {
            self.cur[0] = (self.started - prev).as_secs_f64();
            for (a, c) in self.acc.iter_mut().zip(self.cur) {
                *a += c;
            }
            self.steps += 1;
        }
    }

    /// A step that is not a graph replay: the next one has no caller time to charge.
    fn skip(&mut self) {
        self.step_end = None;
    }

    /// end_step for a replayed graph step, else skip.
    fn end_step_if(&mut self, replayed: bool) {
        if replayed {
            self.end_step();
        } else {
            self.skip();
        }
    }
}

impl Drop for HostTimes {
    fn drop(&mut self) {
        if !self.on || self.steps == 0 {
            return;
        }
        let n = self.steps as f64;
        eprintln!(
            "ds4 CUDA host time per graph decode step (DS4_CUDA_PROFILE=host, {} steps):",
            self.steps
        );
        for (name, secs) in HostTimes::PHASES.iter().zip(self.acc) {
            eprintln!("  {name:<14} {:>9.1} us", secs / n * 1e6);
        }
        let total: f64 = self.acc.iter().sum();
        eprintln!("  {:<14} {:>9.1} us", "total", total / n * 1e6);
    }
}

/// Quantized-activation buffers by (kind, vector length, the f32 buffer they are the
/// quantized form of), made on demand: one input's quantized form is never overwritten by
/// another input's, whatever the shapes (side streams read forms made before they forked).
/// A new buffer has room for a whole span of `span_cap` tokens (its vectors per token of the
/// forward that makes it, see [`QuantSlots::set_span`]), so that neither a prefill after the
/// first decode step nor a decode step after a prefill has to reallocate one. `generation`
/// counts the reallocations (a buffer replaced by a larger one): a captured graph holds the
/// buffers' addresses, so it is only replayed while the generation it was captured at is
/// current. A buffer made for a new key replaces nothing and leaves the generation alone.
#[derive(Default)]
pub(crate) struct QuantSlots {
    slots: HashMap<(ActQuant, usize, u64), QuantizedActivations>,
    generation: u64,
    /// Tokens of the forward in progress, and the most one forward can take.
    span_tokens: usize,
    span_cap: usize,
}

impl QuantSlots {
    /// The forward in progress runs `tokens` tokens; at most `cap` can run at once.
    fn set_span(&mut self, tokens: usize, cap: usize) {
        self.span_tokens = tokens;
        self.span_cap = cap;
    }

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
    /// Page-locked copies of a chunk's inputs (its token ids and first position) and of one
    /// row of logits: no pageable-copy synchronization per step.
    host_tokens: HostStaging<i32>,
    host_pos: HostStaging<i64>,
    host_logits: HostStaging<f32>,
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
    /// The layer whose down stack is being copied into the model's staging buffer on
    /// LANE_STAGE ([`crate::model::ExpertStaging`], ffn.rs).
    staged: Option<usize>,
    /// The captured single-token forwards (kernels only; uploads and downloads are outside),
    /// replayed for every decode step: [Head::Logits(0..1), Head::Greedy].
    decode_graphs: [Option<DecodeGraph>; 2],
    /// The greedy pick's buffers.
    greedy: GreedyBuffers,
    /// The token id and position a greedy step left in s.tokens and s.pos for the next step
    /// (None once anything else was uploaded there).
    device_next: Option<(u32, usize)>,
    /// Graphs are used unless profiling (whose timing events cannot be captured) or a
    /// capture failed.
    graphs_enabled: bool,
    /// A single-token forward ran uncaptured (so every buffer it needs exists).
    decode_warm: bool,
    /// Indexer score rows per token (the most compressed rows a CSA layer can have).
    max_index_rows: usize,
    prof: StageTimes,
    host_times: HostTimes,
}

/// What a model's formats decide about its span scratch (see [`ScratchSizes`]).
#[derive(Clone, Copy, Debug)]
pub(crate) struct ScratchLayout {
    /// Every layer's grouped output projection takes the token-major layout: spans permute
    /// the attention output into groups only below GEMM_MIN_VECS tokens.
    pub o_a_token_major: bool,
    /// Some layer's routed slots gather f32 rows (into xe) rather than quantized ones.
    pub f32_gather: bool,
    /// Every hyper-connection mix runs split-K (no streams-norm buffer).
    pub hc_split_k: bool,
    /// Activations are quantized for the matvecs and GEMMs (ds4 numerics): the quant slots.
    pub quantized: bool,
}

impl ScratchLayout {
    pub(crate) fn of(m: &CudaModel) -> ScratchLayout {
        let layers = m.layers.iter().map(|w| {
            [
                &w.o_a_groups,
                &w.gate_exps,
                &w.up_exps,
                &w.hc_attn.fn_,
                &w.hc_ffn.fn_,
            ]
        });
        ScratchLayout::from_mats(&m.cfg, m.numerics, layers)
    }

    /// A ds4 file's (Q8_0 grouped output projection, quantized expert stacks, F16
    /// hyper-connection projections) in `numerics`, for tests without a file.
    #[cfg(test)]
    pub(crate) fn ds4_file(numerics: Numerics) -> ScratchLayout {
        let ds4 = numerics == Numerics::Ds4;
        ScratchLayout {
            o_a_token_major: ds4,
            f32_gather: !ds4,
            hc_split_k: true,
            quantized: ds4,
        }
    }

    /// From each layer's [o_a groups, gate stack, up stack, attention and FFN
    /// hyper-connection projections], as bound or as the loader will bind them.
    pub(crate) fn from_mats<'a>(
        c: &ModelConfig,
        numerics: Numerics,
        layers: impl Iterator<Item = [&'a Mat; 5]>,
    ) -> ScratchLayout {
        let mut layout = ScratchLayout {
            o_a_token_major: true,
            f32_gather: false,
            hc_split_k: true,
            quantized: numerics == Numerics::Ds4,
        };
        for [o_a, gate, up, hc_attn, hc_ffn] in layers {
            layout.o_a_token_major &= attention::o_a_token_major(c, numerics, o_a);
            layout.f32_gather |= !ffn::gathers_quantized(c, numerics, gate, up);
            layout.hc_split_k &= hc::hc_split_k(c, hc_attn) && hc::hc_split_k(c, hc_ffn);
        }
        layout
    }
}

/// Byte offsets and lengths (in f32) of the buffers that share one allocation (Scratch::new).
pub(crate) struct SharedParts {
    pub bytes: usize,
    pub q: (usize, usize),
    pub o: (usize, usize),
    pub eg: (usize, usize),
    pub eu: (usize, usize),
    pub eh: (usize, usize),
    pub edown: (usize, usize),
}

/// Element counts (4-byte f32 or i32) of a span scratch's buffers for `cap` tokens: what
/// Scratch::new allocates, and what the fit checks count ([`ScratchSizes::bytes`]).
pub(crate) struct ScratchSizes {
    pub streams: usize,
    pub flat: usize,
    pub mix: usize,
    pub maps: usize,
    pub hidden: usize,
    pub q_lora: usize,
    pub kv: usize,
    pub compressor: usize,
    pub index_compressor: usize,
    pub index_queries: usize,
    pub index_weights: usize,
    pub index_selected: usize,
    pub tokens: usize,
    pub index_scores: usize,
    pub attn_scores: usize,
    pub grouped_heads: usize,
    pub grouped_out: usize,
    pub out_groups: usize,
    pub router: usize,
    pub slots: usize,
    pub group_starts: usize,
    pub slot_inputs: usize,
    pub shared_ff: usize,
    pub head_streams: usize,
    pub head_mix: usize,
    pub head_hidden: usize,
    pub head_logits: usize,
    pub hc_part: usize,
    pub shared: SharedParts,
    /// The quantized forms of the activations (QuantSlots, main stream and side lanes), made
    /// during the first forward passes; not allocated by Scratch::new.
    pub quant_bytes: usize,
}

impl ScratchSizes {
    pub(crate) fn new(
        c: &ModelConfig,
        cap: usize,
        layout: ScratchLayout,
        max_index_rows: usize,
        max_attn_rows: usize,
    ) -> ScratchSizes {
        let (d, nc, k) = (c.hidden, c.hc_mult, c.n_experts_used);
        let hhd = c.n_heads * c.head_dim;
        let god = c.o_groups * c.o_lora_rank;
        let head = cap.min(HEAD_ROWS);
        let grouped = if layout.o_a_token_major {
            cap.min(GEMM_MIN_VECS - 1)
        } else {
            cap
        };
        let slots = cap * k;
        let (q_len, o_len) = (cap * hhd, cap * hhd);
        let (g_len, d_len) = (slots * c.expert_ff, slots * d);
        let at = |floats: usize| (floats * 4).next_multiple_of(256);
        let (o_at, eu_at) = (at(q_len), at(g_len));
        let (eh_at, edown_at) = (eu_at + at(g_len), eu_at + 2 * at(g_len));
        // Quantized forms per token (values; Q8_0 adds a 4-byte scale per 32, Q8_K per 256):
        // Q8_0 of the normalized input (attention and shared expert), the low-rank query, the
        // attention output, the output groups, and the shared expert's SwiGLU (its lane's own);
        // Q8_K of the normalized input (routed experts), the routed SwiGLU and the gathered
        // slot inputs; the head's rows in Q8_0.
        let q8_0 = |v: usize| v + v / 32 * 4;
        let q8_k = |v: usize| v + v / 256 * 4;
        let quant_bytes = if layout.quantized {
            cap * (q8_0(d + c.q_lora_rank + hhd + god + c.expert_ff)
                + q8_k(d + k * c.expert_ff + k * d))
                + q8_0(head * d)
        } else {
            0
        };
        ScratchSizes {
            streams: cap * nc * d,
            flat: if layout.hc_split_k { 0 } else { cap * nc * d },
            mix: cap * (2 + nc) * nc,
            maps: cap * (2 * nc + nc * nc),
            hidden: cap * d,
            q_lora: cap * c.q_lora_rank,
            kv: cap * c.head_dim,
            compressor: cap * 2 * c.head_dim,
            index_compressor: cap * 2 * c.index_head_dim,
            index_queries: cap * c.index_heads * c.index_head_dim,
            index_weights: cap * c.index_heads,
            index_selected: cap * c.index_topk,
            tokens: cap,
            // (Saturating: the context sets these rows and may be absurd; the fit check then
            // refuses the session.)
            index_scores: cap.saturating_mul(max_index_rows),
            attn_scores: c.n_heads.saturating_mul(max_attn_rows),
            grouped_heads: grouped * hhd,
            grouped_out: grouped * god,
            out_groups: cap * god,
            router: cap * c.n_experts,
            slots,
            group_starts: c.n_experts + 1,
            slot_inputs: if layout.f32_gather { slots * d } else { 0 },
            shared_ff: cap * c.expert_ff,
            head_streams: head * nc * d,
            head_mix: head * nc,
            head_hidden: head * d,
            head_logits: head * c.vocab_size,
            hc_part: cap * d.div_ceil(HC_MIX_THREADS) * ((2 + nc) * nc + 1),
            shared: SharedParts {
                bytes: (o_at + at(o_len)).max(edown_at + at(d_len)),
                q: (0, q_len),
                o: (o_at, o_len),
                eg: (0, g_len),
                eu: (eu_at, g_len),
                eh: (eh_at, g_len),
                edown: (edown_at, d_len),
            },
            quant_bytes,
        }
    }

    /// Device bytes of the scratch and its quant slots: every buffer Scratch::new allocates
    /// (as many times as it allocates one of that size), the shared allocation once.
    pub(crate) fn bytes(&self) -> usize {
        let rows = (self.index_scores as u128 + self.attn_scores as u128) * 4;
        let bytes = rows + (self.elems() as u128) * 4 + self.shared.bytes as u128;
        usize::try_from(bytes + self.quant_bytes as u128).unwrap_or(usize::MAX)
    }

    /// Elements of the buffers Scratch::new allocates on their own (not the shared
    /// allocation), but the two sized by the context (index and attention scores).
    pub(crate) fn elems(&self) -> usize {
        2 * self.streams
            + self.flat
            + self.mix
            + self.maps
            + 4 * self.hidden
            + 2 * self.q_lora
            + 2 * self.kv
            + 2 * self.compressor
            + 2 * self.index_compressor
            + self.index_queries
            + self.index_weights
            + self.index_selected
            + 2 * self.tokens
            + self.grouped_heads
            + self.grouped_out
            + self.out_groups
            + self.router
            + 6 * self.slots
            + self.group_starts
            + self.slot_inputs
            + 3 * self.shared_ff
            + 2 * self.head_streams
            + self.head_mix
            + 2 * self.head_hidden
            + self.head_logits
            + self.hc_part
    }
}

impl Scratch {
    /// Every chunk starts from the same stream buffer (a captured graph reads that one).
    fn unswap_streams(&mut self) {
        if self.streams_swapped {
            std::mem::swap(&mut self.streams, &mut self.streams_next);
            self.streams_swapped = false;
        }
    }

    /// See [`crate::CudaSession::set_decode_graphs`].
    pub(crate) fn set_decode_graphs(&mut self, on: bool) {
        self.graphs_enabled = on;
        if !on {
            self.decode_graphs = [None, None];
        }
    }

    pub(crate) fn decode_graph_captured(&self) -> bool {
        self.graphs_enabled && self.decode_graphs.iter().all(Option::is_some)
    }

    /// Makes `ids` the ids greedy steps never pick; false (changing nothing) when there are
    /// more than [`tokens::GREEDY_MAX_EXCLUDE`].
    pub(crate) fn set_greedy_exclude(
        &mut self,
        dev: &crate::device::CudaDevice,
        ids: &[u32],
    ) -> Result<bool> {
        self.greedy.set_exclude(dev, ids)
    }

    /// The device's logits (a greedy step leaves its row there).
    pub(crate) fn device_logits(&self) -> &DeviceBuffer<f32> {
        &self.logits
    }

    /// The one row of logits the last chunk left in the page-locked staging
    /// ([`ChunkLogits::Staged`]).
    pub(crate) fn staged_logits(&self, vocab: usize) -> Result<&[f32]> {
        Ok(&self.host_logits.as_slice()?[..vocab])
    }

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
        let z = ScratchSizes::new(c, cap, ScratchLayout::of(m), max_index_rows, max_attn_rows);
        // Elements asked for, checked against the sizes' count below (the fit checks sum it).
        let asked = std::cell::Cell::new(0usize);
        let f = |n: usize| {
            asked.set(asked.get().saturating_add(n));
            dev.alloc::<f32>(n.max(1))
        };
        let i = |n: usize| {
            asked.set(asked.get().saturating_add(n));
            dev.alloc::<i32>(n.max(1))
        };
        // The attention's query heads and output (q, o) and the routed experts' gate, up,
        // SwiGLU and outputs (eg, eu, eh, edown) share one allocation: a sublayer's buffers
        // are dead once the sublayer's last reader (o_a's input quantization; moe_combine or
        // the hc_post_mix after the FFN) has run on the main stream, before the other
        // sublayer writes, and no side lane touches them.
        let sh = &z.shared;
        let shared = Arc::new(dev.alloc::<u8>(sh.bytes)?);
        let scratch = Scratch {
            cap,
            streams: f(z.streams)?,
            streams_next: f(z.streams)?,
            flat: f(z.flat)?,
            mix: f(z.mix)?,
            maps: f(z.maps)?,
            x: f(z.hidden)?,
            xn: f(z.hidden)?,
            qr: f(z.q_lora)?,
            qrn: f(z.q_lora)?,
            q: shared.part(sh.q.0, sh.q.1)?,
            kv: f(z.kv)?,
            kvn: f(z.kv)?,
            ckv: f(z.compressor)?,
            cg: f(z.compressor)?,
            ikv: f(z.index_compressor)?,
            ig: f(z.index_compressor)?,
            iq: f(z.index_queries)?,
            iw: f(z.index_weights)?,
            sel: i(z.index_selected)?,
            selc: i(z.tokens)?,
            iscores: f(z.index_scores)?,
            attn_scores: f(z.attn_scores)?,
            o: shared.part(sh.o.0, sh.o.1)?,
            og: f(z.grouped_heads)?,
            zg: f(z.grouped_out)?,
            z: f(z.out_groups)?,
            y: f(z.hidden)?,
            rlog: f(z.router)?,
            ids: i(z.slots)?,
            wts: f(z.slots)?,
            slot_order: i(z.slots)?,
            slot_pos: i(z.slots)?,
            group_start: i(z.group_starts)?,
            sorted_ids: i(z.slots)?,
            sorted_wts: f(z.slots)?,
            xe: f(z.slot_inputs)?,
            eg: shared.part(sh.eg.0, sh.eg.1)?,
            eu: shared.part(sh.eu.0, sh.eu.1)?,
            eh: shared.part(sh.eh.0, sh.eh.1)?,
            edown: shared.part(sh.edown.0, sh.edown.1)?,
            sg: f(z.shared_ff)?,
            su: f(z.shared_ff)?,
            sh: f(z.shared_ff)?,
            sdown: f(z.hidden)?,
            tokens: i(z.tokens)?,
            // The head's buffers: HEAD_ROWS rows at a time, as the logits.
            hraw: f(z.head_streams)?,
            hflat: f(z.head_streams)?,
            hmix: f(z.head_mix)?,
            hu: f(z.head_hidden)?,
            hun: f(z.head_hidden)?,
            hc_part: f(z.hc_part)?,
            hc_part_ready: false,
            moe_pending: None,
            pre_normed: None,
            logits: f(z.head_logits)?,
            host_tokens: dev.host_staging(cap)?,
            host_pos: dev.host_staging(1)?,
            host_logits: dev.host_staging(c.vocab_size)?,
            quant: QuantSlots::default(),
            lane_quant: Default::default(),
            pos: dev.alloc::<i64>(1)?,
            streams_swapped: false,
            capturing: false,
            staged: None,
            decode_graphs: [None, None],
            greedy: GreedyBuffers::new(dev)?,
            device_next: None,
            graphs_enabled: matches!(
                crate::profile::mode(),
                crate::profile::ProfileMode::Off
                    | crate::profile::ProfileMode::Trace
                    | crate::profile::ProfileMode::Host
            ) && std::env::var_os("DS4_CUDA_NO_GRAPH").is_none(),
            decode_warm: false,
            max_index_rows,
            prof: StageTimes::new(),
            host_times: HostTimes::new(),
        };
        // The fit checks count ScratchSizes::bytes(): every buffer allocated here must be in it.
        let counted = [z.elems(), z.index_scores, z.attn_scores]
            .into_iter()
            .fold(0, usize::saturating_add);
        if asked.get() != counted {
            return Err(CudaError::InvalidArgument(format!(
                "internal: the span scratch allocated {} elements, its size list counts {counted}",
                asked.get()
            )));
        }
        Ok(scratch)
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
        Some(qa) => product(m, &dm, qa, x, n, y),
        None if n >= GEMM_MIN_VECS && crate::Gpu::gemm_f16_fits(&dm) => {
            m.gpu.gemm_f16(&dm, x, n, y)
        }
        None => m.gpu.gemv(&dm, Activations::F32(x), n, y),
    }
}

/// Vectors from which a product runs as a GEMM instead of the matvec kernels: Q8_0 on the
/// tensor cores ([`crate::Gpu::gemm_q8_0`], the CPU's per-block dot product), F16 with f32
/// activations on the tensor cores as two f16 terms per activation ([`crate::Gpu::gemm_f16`];
/// the CUDA cores for column counts that are not multiples of 64).
const GEMM_MIN_VECS: usize = 16;

/// y = W·x for `n` vectors, `qa` the quantized form of their f32 values `x`: for Q8_0 spans
/// the exact tensor-core GEMM, or with `DS4_CUDA_FAST_PREFILL` f16 weights and activations on
/// cuBLAS where that path applies ([`crate::Gpu::gemm_q8_0_f16`]: spans of 64+ vectors on the
/// main stream); the matvec for fewer vectors and other formats.
fn product(
    m: &CudaModel,
    w: &crate::gemv::DeviceMatrix,
    qa: &QuantizedActivations,
    x: &DeviceBuffer<f32>,
    n: usize,
    y: &mut DeviceBuffer<f32>,
) -> Result<()> {
    if n >= GEMM_MIN_VECS && w.format == WeightFormat::Q8_0 {
        if crate::gemm_cublas::fast_prefill_requested() && m.gpu.gemm_q8_0_f16(w, x, n, y)? {
            return Ok(());
        }
        m.gpu.gemm_q8_0(w, qa, n, y)
    } else {
        m.gpu.gemv(w, Activations::Quantized(qa), n, y)
    }
}

/// The activations `w` takes in these numerics: Some(kind) when ds4 numerics quantize its
/// input (Q8_0 / Q8_K), None for plain f32.
fn act_quant_of(m: &CudaModel, w: &Mat) -> Option<ActQuant> {
    act_quant(m.numerics, w)
}

/// How `numerics` quantizes the activations of a matrix product with `w` (None: f32).
fn act_quant(numerics: Numerics, w: &Mat) -> Option<ActQuant> {
    match numerics {
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
        (true, Some(kind)) => {
            let qa = quant.get(kind, w.cols, n, x.ptr())?;
            product(m, &m.matrix(w)?, qa, x, n, y)
        }
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
        (true, Some(kind)) => {
            let qa = made.get(kind, w.cols, n, x.ptr())?;
            product(m, &m.matrix(w)?, qa, x, n, y)
        }
        _ => mm(m, own, w, x, n, y),
    }
}

/// [`mm_branch`] of two same-input products (a compressor's kv and gate projections): a single
/// token's f32-activation pair of equally shaped matrices in one launch
/// ([`crate::Gpu::gemv_pair`], bit-identical to two; decode +0.65 %, docs/speed-log.md session
/// 22), anything else as two products.
#[allow(clippy::too_many_arguments)]
fn mm_pair_branch(
    m: &CudaModel,
    made: &QuantSlots,
    own: &mut QuantSlots,
    prequantized: bool,
    w: [&Mat; 2],
    x: &DeviceBuffer<f32>,
    n: usize,
    y: [&mut DeviceBuffer<f32>; 2],
) -> Result<()> {
    let [y0, y1] = y;
    let f32_pair = n == 1
        && same_shape(w[0], w[1])
        && act_quant_of(m, w[0]).is_none()
        && act_quant_of(m, w[1]).is_none();
    if f32_pair {
        let pair = [&m.matrix(w[0])?, &m.matrix(w[1])?];
        return m
            .gpu
            .gemv_pair(pair, Activations::F32(x), n, [y0, y1], None);
    }
    mm_branch(m, made, own, prequantized, w[0], x, n, y0)?;
    mm_branch(m, made, own, prequantized, w[1], x, n, y1)
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
    let existing = quant.slots.get(&key).map(|q| q.q.len());
    if existing.is_none_or(|len| len < n * cols) {
        // n vectors for span_tokens tokens: room for span_cap tokens' worth (at least n).
        let room = (n * quant.span_cap)
            .div_ceil(quant.span_tokens.max(1))
            .max(n);
        quant
            .slots
            .insert(key, m.gpu.alloc_quantized(kind, cols, room)?);
        if existing.is_some() {
            quant.generation += 1;
        }
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
/// (see [`SlotInput`]); y is n_slots × n_vecs × rows. `copy`: a buffer holding the stack's
/// bytes (the staging buffer of a stack in host memory, ffn.rs), read instead of the weights.
#[allow(clippy::too_many_arguments)]
fn mm_experts(
    m: &CudaModel,
    quant: &mut QuantSlots,
    w: &Mat,
    copy: Option<&DeviceBuffer<u8>>,
    ids: &DeviceBuffer<i32>,
    n_slots: usize,
    x: &DeviceBuffer<f32>,
    n_vecs: usize,
    input: SlotInput,
    y: &mut DeviceBuffer<f32>,
) -> Result<()> {
    let dm = match copy {
        Some(buf) => DeviceMatrix::in_buffer(buf, 0, w.format, w.cols, w.rows, w.experts)?,
        None => m.matrix(w)?,
    };
    let dm = &dm;
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
                m.gpu.expert_gemm_grouped(dm, groups, x, n_slots, y)
            } else {
                m.gpu.expert_gemv_grouped(dm, groups, x, n_slots, y)
            }
        }
        Some(qa) if n_vecs >= GEMM_MIN_VECS && dm.format == WeightFormat::Q8_0 => m
            .gpu
            .expert_gemm_q8_0(dm, ids, n_slots, qa, input.per_slot, n_vecs, y),
        Some(qa) => m.gpu.expert_gemv(
            dm,
            ids,
            n_slots,
            Activations::Quantized(qa),
            input.per_slot,
            n_vecs,
            y,
        ),
        None => m.gpu.expert_gemv(
            dm,
            ids,
            n_slots,
            Activations::F32(x),
            input.per_slot,
            n_vecs,
            y,
        ),
    }
}

/// Every matrix of stack `w` against its own `n_vecs` input vectors of x (slot s: matrix s),
/// as [`mm_experts`] with the ids 0, 1, ... does, bit for bit (see [`crate::Gpu::stacked_gemv`]).
fn mm_stacked(
    m: &CudaModel,
    quant: &mut QuantSlots,
    w: &Mat,
    x: &DeviceBuffer<f32>,
    n_vecs: usize,
    prequantized: bool,
    y: &mut DeviceBuffer<f32>,
) -> Result<()> {
    let dm = m.matrix(w)?;
    let input = SlotInput {
        per_slot: true,
        prequantized,
        groups: None,
    };
    match expert_input(m, quant, w, x, w.experts * n_vecs, input)? {
        Some(qa) => m
            .gpu
            .stacked_gemv(&dm, Activations::Quantized(qa), n_vecs, y),
        None => m.gpu.stacked_gemv(&dm, Activations::F32(x), n_vecs, y),
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

/// Where [`CudaModel::forward_chunk`] left the logits it was asked for.
pub(crate) enum ChunkLogits {
    /// No row was asked for.
    None,
    /// One row, in the scratch's page-locked staging ([`Scratch::staged_logits`]) until the
    /// next chunk: a decode step hands it out without copying half a megabyte.
    Staged,
    /// Several rows, row-major.
    Rows(Vec<f32>),
    /// The greedy pick of the single row ([`Head::Greedy`]); the logits stay in s.logits.
    Picked(u32),
}

/// What a chunk ends with.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Head {
    /// The logits of these chunk rows (a contiguous range; empty: none).
    Logits(std::ops::Range<usize>),
    /// A single token's greedy pick among the ids not in the list of
    /// [`Scratch::set_greedy_exclude`] (greedy_pick). The id and the next position are left
    /// on the device, where the next greedy step of that id at that position finds them.
    Greedy,
}

impl Head {
    /// Which of Scratch::decode_graphs replays a single-token chunk with this head, if any.
    fn graph(&self) -> Option<usize> {
        match self {
            Head::Logits(rows) if *rows == (0..1) => Some(0),
            Head::Logits(_) => None,
            Head::Greedy => Some(1),
        }
    }
}

impl CudaModel {
    /// Runs one chunk (at most `scratch.cap` tokens at positions pos0..) through every layer,
    /// updating the layer states, and returns what `head` asked for.
    pub(crate) fn forward_chunk(
        &self,
        s: &mut Scratch,
        layers: &mut [GpuLayerState],
        tokens: &[u32],
        pos0: usize,
        head: Head,
    ) -> Result<ChunkLogits> {
        let c = &self.cfg;
        let n = tokens.len();
        if n == 0 || n > s.cap {
            return Err(CudaError::InvalidArgument(format!(
                "chunk of {n} tokens (scratch holds {})",
                s.cap
            )));
        }
        if head == Head::Greedy && n != 1 {
            return Err(CudaError::InvalidArgument(format!(
                "a greedy pick ends a single-token step, not a chunk of {n}"
            )));
        }
        s.prof.start(self)?;
        // Reads no clock unless DS4_CUDA_PROFILE=host.
        s.host_times.begin();
        s.quant.set_span(n, s.cap);
        for lane in &mut s.lane_quant {
            lane.set_span(n, s.cap);
        }
        // Dependent launches for single-token steps only (see set_dependent_launch).
        self.gpu.device.set_dependent_launch(n == 1);
        s.unswap_streams();
        // The chunk's ids and first position (the embedding rows are gathered on the GPU:
        // embed_streams, the first kernel of layers_and_head and of the decode graphs), unless
        // the greedy step before left exactly these on the device.
        let dev = &self.gpu.device;
        if !(head == Head::Greedy && s.device_next == Some((tokens[0], pos0))) {
            s.device_next = None;
            for (slot, &tok) in s.host_tokens.as_mut_slice()?.iter_mut().zip(tokens) {
                *slot = tok as i32;
            }
            s.host_pos.as_mut_slice()?[0] = pos0 as i64;
            s.host_times.mark(1);
            dev.upload_staged(&mut s.host_tokens, n, &mut s.tokens)?;
            dev.upload_staged(&mut s.host_pos, 1, &mut s.pos)?;
        }
        s.host_times.mark(2);
        s.prof.mark(self, "embed")?;

        let graph = head.graph().filter(|_| n == 1 && s.graphs_enabled);
        let generation = s.quant_generation();
        for g in &mut s.decode_graphs {
            if g.as_ref().is_some_and(|g| g.generation != generation) {
                *g = None;
            }
        }
        if let Some(k) = graph {
            if s.decode_graphs[k].is_none() && s.decode_warm {
                self.capture_decode(s, layers, pos0, &head)?;
            }
        }
        let replayed = match graph.and_then(|k| s.decode_graphs[k].as_ref()) {
            Some(g) => {
                g.graph.launch().ctx("cuGraphLaunch (decode step)")?;
                true
            }
            None => {
                self.layers_and_head(s, layers, n, pos0, &head)?;
                s.decode_warm |= graph.is_some();
                false
            }
        };
        s.host_times.mark(3);
        s.prof.mark(self, "head")?;
        let head_rows = match head {
            Head::Logits(rows) => rows,
            Head::Greedy => {
                let id = dev.download_staged(&s.greedy.pick, 1, &mut s.greedy.host_pick)?[0];
                s.host_times.mark(4);
                s.host_times.end_step_if(replayed);
                let id = u32::try_from(id)
                    .ok()
                    .filter(|&id| (id as usize) < c.vocab_size)
                    .ok_or_else(|| {
                        CudaError::InvalidArgument(format!("greedy pick returned id {id}"))
                    })?;
                s.device_next = Some((id, pos0 + 1));
                return Ok(ChunkLogits::Picked(id));
            }
        };
        let rows = head_rows.len();
        if rows == 1 {
            dev.download_staged(&s.logits, c.vocab_size, &mut s.host_logits)?;
            s.host_times.mark(4);
            s.host_times.end_step_if(replayed);
            return Ok(ChunkLogits::Staged);
        }
        s.host_times.skip();
        if rows == 0 {
            return Ok(ChunkLogits::None);
        }
        // The first HEAD_ROWS rows are in s.logits (layers_and_head); the rest, a piece at a time.
        let mut out = Vec::with_capacity(rows * c.vocab_size);
        let mut start = head_rows.start;
        loop {
            let piece = (head_rows.end - start).min(HEAD_ROWS);
            out.extend(download_prefix(self, &s.logits, piece * c.vocab_size)?);
            start += piece;
            if start >= head_rows.end {
                break;
            }
            self.head(s, start..(start + HEAD_ROWS).min(head_rows.end))?;
        }
        Ok(ChunkLogits::Rows(out))
    }

    /// Captures the decode graphs before the first decode step (when graphs are on), so that
    /// no step pays for a capture: a single-token step of token 0 at position 0 runs
    /// uncaptured first (it makes every buffer a step uses, sized for whole spans: the
    /// prefills that follow reallocate none of them). That step writes the layer states at
    /// position 0 (and so does one replay of each graph, which uploads it): the caller resets
    /// them.
    pub(crate) fn prepare_decode_graph(
        &self,
        s: &mut Scratch,
        layers: &mut [GpuLayerState],
    ) -> Result<()> {
        if !s.graphs_enabled {
            return Ok(());
        }
        if !s.decode_warm {
            self.forward_chunk(s, layers, &[0], 0, Head::Logits(0..1))?;
        }
        for (k, head) in [Head::Logits(0..1), Head::Greedy].iter().enumerate() {
            if s.decode_warm && s.graphs_enabled && s.decode_graphs[k].is_none() {
                s.unswap_streams();
                self.gpu.device.set_dependent_launch(true);
                self.capture_decode(s, layers, 0, head)?;
            }
            // One replay (the same step again): a graph's first launch uploads it.
            if let Some(g) = &s.decode_graphs[k] {
                g.graph.launch().ctx("cuGraphLaunch (decode warm-up)")?;
            }
        }
        // The greedy replay moved the device's token and position.
        s.device_next = None;
        Ok(())
    }

    /// Every layer, then the head kernels (logits left in s.logits) and, for a greedy step,
    /// the pick.
    fn layers_and_head(
        &self,
        s: &mut Scratch,
        layers: &mut [GpuLayerState],
        n: usize,
        pos0: usize,
        head: &Head,
    ) -> Result<()> {
        s.hc_part_ready = false;
        s.pre_normed = None;
        self.embed_streams(s, n)?;
        s.staged = None;
        self.stage_down_after(s, n, None)?;
        for (l, state) in layers.iter_mut().enumerate() {
            self.layer(l, s, state, n, pos0)?;
        }
        match head {
            // At most HEAD_ROWS rows here (forward_chunk makes the rest).
            Head::Logits(rows) => self.head(s, rows.start..rows.end.min(rows.start + HEAD_ROWS)),
            Head::Greedy => {
                self.head(s, 0..1)?;
                self.greedy_pick(s)
            }
        }
    }

    /// Captures the single-token forward ending with `head` into its s.decode_graphs slot. A
    /// capture that fails turns graphs off for the session (the caller then runs the step
    /// uncaptured).
    fn capture_decode(
        &self,
        s: &mut Scratch,
        layers: &mut [GpuLayerState],
        pos0: usize,
        head: &Head,
    ) -> Result<()> {
        let Some(slot) = head.graph() else {
            return Err(CudaError::InvalidArgument(format!(
                "no decode graph ends with {head:?}"
            )));
        };
        // Nothing may be pending on a side stream when the capture starts: a join inside it
        // could only wait on uncaptured work.
        self.gpu.device.synchronize()?;
        // Other threads' buffer drops wait until the capture ends (device.rs, CONTEXT_WIDE).
        let _capturing = crate::device::capture_lock();
        let stream = self.gpu.device.main_stream();
        stream
            .begin_capture(
                cudarc::driver::sys::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL,
            )
            .ctx("cuStreamBeginCapture")?;
        s.capturing = true;
        let ran = self.layers_and_head(s, layers, 1, pos0, head);
        s.capturing = false;
        let flags = if self.gpu.device.uses_priorities() {
            cudarc::driver::sys::CUgraphInstantiate_flags::CUDA_GRAPH_INSTANTIATE_FLAG_USE_NODE_PRIORITY
        } else {
            cudarc::driver::sys::CUgraphInstantiate_flags(0)
        };
        let captured = stream.end_capture(flags);
        // The kernels issued during a capture did not run: undo the host-side stream swaps.
        if s.streams_swapped {
            std::mem::swap(&mut s.streams, &mut s.streams_next);
            s.streams_swapped = false;
        }
        match (ran, captured) {
            (Ok(()), Ok(Some(graph))) => {
                s.decode_graphs[slot] = Some(DecodeGraph {
                    graph,
                    generation: s.quant_generation(),
                });
            }
            // Anything else (an operation that cannot be captured, an error the uncaptured
            // step will report again): no graphs for this session, said once, since decode
            // then runs measurably slower.
            (ran, captured) => {
                let why = match (ran, captured) {
                    (Err(e), _) => format!("{e}"),
                    (_, Err(e)) => format!("{e:?}"),
                    _ => "the capture produced no graph".to_string(),
                };
                eprintln!("ds4: CUDA graph capture of the decode step failed ({why}); decoding without a graph");
                s.graphs_enabled = false;
            }
        }
        Ok(())
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

    /// Runs `issue` with launches going to side stream `lane` (forked from the main stream's
    /// current point); launches go to the main stream again afterwards, error or not. The
    /// caller joins the lane before anything on the main stream reads what the branch wrote.
    fn branch(&self, lane: usize, issue: impl FnOnce() -> Result<()>) -> Result<()> {
        self.gpu.device.fork(lane)?;
        let issued = issue();
        self.gpu.device.to_main();
        issued
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
