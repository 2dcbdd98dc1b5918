//! A token stream's state on the GPU (per layer: the raw K=V window ring, and for compressed
//! layers the compressor frontier and emitted rows, plus the indexer's for CSA layers) and its
//! snapshot in exactly the CPU backend's serialized form: the state is downloaded into
//! ds4-model's [`SessionState`] and serialized by the same code, and a restore parses with
//! that code and uploads. So a session can move between the CPU and CUDA backends.

use std::cell::OnceCell;
use std::sync::Arc;

use ds4_model::backend::{check_span, Logits, ModelError, Session};
use ds4_model::config::AttnKind;
use ds4_model::cpu::compressor::EMPTY_SCORE;
use ds4_model::greedy::argmax_excluding;
use ds4_model::numerics::Numerics;
use ds4_model::session::{compressed_capacity, raw_window_rows, SessionState};

use crate::device::{DeviceBuffer, DeviceValue};
use crate::error::{CudaError, Result};
use crate::forward::{download_prefix, ChunkLogits, Head, Scratch};
use crate::model::CudaModel;

/// One compressor's device state.
pub(crate) struct GpuCompressor {
    /// Row width D (attention) or d_I (indexer).
    pub width: usize,
    pub overlap: bool,
    pub capacity: usize,
    /// capacity × width emitted rows.
    pub rows: DeviceBuffer<f32>,
    /// The rows again as bf16, for the indexer's tensor-core scores (index_scores_mma): kept
    /// by the indexer's compressor in ds4 numerics, where its rows are exact in bf16.
    pub rows_bf16: Option<DeviceBuffer<u16>>,
    /// Frontier values and scores: coff·m × coff·width each.
    pub kv: DeviceBuffer<f32>,
    pub score: DeviceBuffer<f32>,
}

impl GpuCompressor {
    fn new(
        m: &CudaModel,
        ratio: usize,
        width: usize,
        overlap: bool,
        ctx: usize,
        bf16_copy: bool,
    ) -> Result<Self> {
        let capacity = compressed_capacity(ctx, ratio);
        let coff = if overlap { 2 } else { 1 };
        let fsize = coff * ratio * coff * width;
        let dev = &m.gpu.device;
        let c = GpuCompressor {
            width,
            overlap,
            capacity,
            rows: dev.alloc_filled(capacity * width, 0)?,
            rows_bf16: if bf16_copy {
                Some(dev.alloc_filled(capacity * width, 0)?)
            } else {
                None
            },
            kv: dev.alloc(fsize)?,
            score: dev.alloc(fsize)?,
        };
        c.reset(m)?;
        Ok(c)
    }

    fn frontier_len(&self) -> usize {
        self.kv.len()
    }

    /// Empty frontier: values 0, scores −1e30 (zero weight).
    fn reset(&self, m: &CudaModel) -> Result<()> {
        m.gpu.device.fill_bytes(&self.kv, 0)?;
        let empty = vec![EMPTY_SCORE; self.frontier_len()];
        upload_into(m, &empty, &self.score)
    }
}

/// Copies host values into the start of a device buffer.
fn upload_into<T: DeviceValue>(m: &CudaModel, data: &[T], buf: &DeviceBuffer<T>) -> Result<()> {
    if data.len() > buf.len() {
        return Err(CudaError::InvalidArgument(format!(
            "upload of {} values into a buffer of {}",
            data.len(),
            buf.len()
        )));
    }
    if data.is_empty() {
        return Ok(());
    }
    // SAFETY: the destination range lies in `buf` (checked above); `data` stays borrowed until
    // the stream is synchronized.
    unsafe {
        cudarc::driver::result::memcpy_htod_async(
            buf.ptr(),
            data,
            m.gpu.device.stream().cu_stream(),
        )
    }
    .map_err(|e| CudaError::driver("cuMemcpyHtoDAsync", e))?;
    m.gpu.device.synchronize()
}

/// One layer's device state.
pub(crate) struct GpuLayerState {
    /// ring_cap × D: the K=V row of position p lives in slot p % ring_cap.
    pub ring: DeviceBuffer<f32>,
    pub ring_cap: usize,
    pub attn: Option<GpuCompressor>,
    pub index: Option<GpuCompressor>,
}

/// Where the logits after a session's last token are.
enum LastLogits {
    /// In `last_logits` (after an eval or a restore; empty before the first token).
    Host,
    /// In the scratch's page-locked staging (after a decode step).
    Staged,
    /// Only in the scratch's device logits (after a greedy step, which picks on the GPU),
    /// downloaded into the cell the first time they are asked for.
    Device(OnceCell<Vec<f32>>),
}

/// One token stream on the GPU.
pub struct CudaSession {
    model: Arc<CudaModel>,
    ctx: usize,
    tokens: Vec<u32>,
    /// The logits after the last token, when `last` says they are here.
    last_logits: Vec<f32>,
    last: LastLogits,
    layers: Vec<GpuLayerState>,
    scratch: Scratch,
}

fn cuda_err(e: CudaError) -> ModelError {
    ModelError::Unsupported(format!("CUDA: {e}"))
}

impl CudaSession {
    pub(crate) fn new(model: Arc<CudaModel>, ctx: usize) -> std::result::Result<Self, ModelError> {
        if ctx == 0 {
            return Err(ModelError::ContextOverflow { ctx, needed: 1 });
        }
        let need = session_bytes(&model, ctx);
        let (free, _) = model.gpu.device.memory_info().map_err(cuda_err)?;
        if need > free {
            return Err(ModelError::Unsupported(format!(
                "CUDA: a session of {ctx} tokens needs {} of GPU memory, {} are free ({} missing){}",
                crate::model::gib_str(need),
                crate::model::gib_str(free),
                crate::model::gib_str(need - free),
                if model.host_weight_bytes() > 0 {
                    format!(
                        "; DS4_CUDA_HOST_WEIGHTS={:.1} puts enough of the weights in host memory for it (now {} there)",
                        (model.host_weight_bytes() + need - free) as f64 / (1u64 << 30) as f64 + 0.1,
                        crate::model::gib_str(model.host_weight_bytes())
                    )
                } else {
                    String::new()
                }
            )));
        }
        let cfg = &model.cfg;
        let ring_cap = raw_window_rows(cfg, ctx);
        let mut layers = Vec::with_capacity(cfg.n_layers);
        let mut max_index_rows = 1;
        let mut max_attn_rows = 1;
        for l in 0..cfg.n_layers {
            let ratio = cfg.compress_ratio[l] as usize;
            max_attn_rows = max_attn_rows.max(attention_rows(cfg, l, ctx));
            let (attn, index) = match cfg.attn_kind[l] {
                AttnKind::Sliding => (None, None),
                AttnKind::Hca => (
                    Some(GpuCompressor::new(
                        &model,
                        ratio,
                        cfg.head_dim,
                        false,
                        ctx,
                        false,
                    )),
                    None,
                ),
                AttnKind::Csa => {
                    max_index_rows = max_index_rows.max(compressed_capacity(ctx, ratio));
                    (
                        Some(GpuCompressor::new(
                            &model,
                            ratio,
                            cfg.head_dim,
                            true,
                            ctx,
                            false,
                        )),
                        Some(GpuCompressor::new(
                            &model,
                            ratio,
                            cfg.index_head_dim,
                            true,
                            ctx,
                            model.numerics == Numerics::Ds4,
                        )),
                    )
                }
            };
            layers.push(GpuLayerState {
                ring: model
                    .gpu
                    .device
                    .alloc_filled(ring_cap * cfg.head_dim, 0)
                    .map_err(cuda_err)?,
                ring_cap,
                attn: attn.transpose().map_err(cuda_err)?,
                index: index.transpose().map_err(cuda_err)?,
            });
        }
        let scratch = Scratch::new(&model, model.chunk.min(ctx), max_index_rows, max_attn_rows)
            .map_err(cuda_err)?;
        let mut session = CudaSession {
            model,
            ctx,
            tokens: Vec::new(),
            last_logits: Vec::new(),
            last: LastLogits::Host,
            layers,
            scratch,
        };
        // The decode graph is captured here, with the session, not at the first reply's
        // second token (tens of milliseconds there). Its warm-up step leaves state behind.
        let model = session.model.clone();
        model
            .prepare_decode_graph(&mut session.scratch, &mut session.layers)
            .map_err(cuda_err)?;
        session.clear().map_err(cuda_err)?;
        Ok(session)
    }

    /// Forgets every token ([`Session::reset`], with its error).
    fn clear(&mut self) -> Result<()> {
        self.tokens.clear();
        self.last_logits.clear();
        self.last = LastLogits::Host;
        // Rows beyond the token count are never read; only the frontiers must be emptied.
        for l in &self.layers {
            for c in [&l.attn, &l.index].into_iter().flatten() {
                c.reset(&self.model)?;
            }
        }
        Ok(())
    }

    /// Whether single-token steps are captured once into a CUDA graph and replayed (on by
    /// default, unless DS4_CUDA_NO_GRAPH is set or a profile needs every launch). Turning it
    /// off drops a captured graph.
    pub fn set_decode_graphs(&mut self, on: bool) {
        self.scratch.set_decode_graphs(on);
    }

    /// Whether the next single-token step replays a captured graph.
    pub fn decode_graph_captured(&self) -> bool {
        self.scratch.decode_graph_captured()
    }

    /// A single-token step must fit the context and name a vocabulary id.
    fn check_step(&self, token: u32) -> std::result::Result<(), ModelError> {
        check_span(
            &[token],
            self.tokens.len(),
            self.ctx,
            self.model.cfg.vocab_size,
        )
    }

    /// The logits after the last token (empty before the first eval).
    fn logits(&self) -> Result<&[f32]> {
        let vocab = self.model.cfg.vocab_size;
        match &self.last {
            LastLogits::Host => Ok(&self.last_logits),
            LastLogits::Staged => self.scratch.staged_logits(vocab),
            LastLogits::Device(cell) => {
                if cell.get().is_none() {
                    let row = download_prefix(&self.model, self.scratch.device_logits(), vocab)?;
                    // Only this thread can have filled the cell since the check above.
                    let _ = cell.set(row);
                }
                Ok(cell.get().map_or(&[], Vec::as_slice))
            }
        }
    }

    /// The state in the CPU backend's form (downloads every buffer).
    pub fn to_state(&self) -> Result<SessionState> {
        let m = &self.model;
        let cfg = &m.cfg;
        let mut st = SessionState::new(cfg, self.ctx);
        st.tokens = self.tokens.clone();
        st.last_logits = self.logits()?.to_vec();
        let n_tok = self.tokens.len();
        for (l, (dst, src)) in st.layers.iter_mut().zip(&self.layers).enumerate() {
            let hd = cfg.head_dim;
            let ring = download_prefix(m, &src.ring, src.ring_cap * hd)?;
            let live = n_tok.min(src.ring_cap);
            for pos in n_tok - live..n_tok {
                let slot = pos % src.ring_cap;
                dst.raw.put(pos, &ring[slot * hd..(slot + 1) * hd]);
            }
            let ratio = cfg.compress_ratio[l] as usize;
            for (d, s) in [(&mut dst.attn, &src.attn), (&mut dst.index, &src.index)] {
                let (Some(d), Some(s)) = (d.as_mut(), s.as_ref()) else {
                    continue;
                };
                let n_rows = n_tok / ratio;
                let rows = download_prefix(m, &s.rows, n_rows * s.width)?;
                for row in rows.chunks_exact(s.width) {
                    d.rows.push(row);
                }
                let kv = download_prefix(m, &s.kv, s.frontier_len())?;
                let score = download_prefix(m, &s.score, s.frontier_len())?;
                if !d.frontier.set_state(&kv, &score) {
                    return Err(CudaError::InvalidArgument(format!(
                        "layer {l}: frontier sizes differ from the CPU's"
                    )));
                }
            }
        }
        Ok(st)
    }

    /// Replaces the device state with `st` (a state of this model and context).
    fn upload_state(&mut self, st: &SessionState) -> Result<()> {
        let m = self.model.clone();
        let cfg = &m.cfg;
        let n_tok = st.tokens.len();
        for (l, (dst, src)) in self.layers.iter().zip(&st.layers).enumerate() {
            let hd = cfg.head_dim;
            let mut ring = vec![0f32; dst.ring_cap * hd];
            let live = n_tok.min(dst.ring_cap);
            for pos in n_tok - live..n_tok {
                let slot = pos % dst.ring_cap;
                ring[slot * hd..(slot + 1) * hd].copy_from_slice(src.raw.get(pos));
            }
            upload_into(&m, &ring, &dst.ring)?;
            for (d, s) in [(&dst.attn, &src.attn), (&dst.index, &src.index)] {
                let (Some(d), Some(s)) = (d.as_ref(), s.as_ref()) else {
                    continue;
                };
                if s.rows.len() > d.capacity {
                    return Err(CudaError::InvalidArgument(format!(
                        "layer {l}: {} compressed rows exceed the capacity {}",
                        s.rows.len(),
                        d.capacity
                    )));
                }
                upload_into(&m, s.rows.as_slice(), &d.rows)?;
                if let Some(copy) = &d.rows_bf16 {
                    // Round to nearest even, as the compressor's cvt.rn.bf16.f32.
                    let bf16: Vec<u16> = s
                        .rows
                        .as_slice()
                        .iter()
                        .map(|&v| half::bf16::from_f32(v).to_bits())
                        .collect();
                    upload_into(&m, &bf16, copy)?;
                }
                let (kv, score) = s.frontier.state();
                upload_into(&m, kv, &d.kv)?;
                upload_into(&m, score, &d.score)?;
            }
        }
        self.tokens = st.tokens.clone();
        self.last_logits = st.last_logits.clone();
        self.last = LastLogits::Host;
        Ok(())
    }
}

/// The most rows layer `l` attends over in a session of `ctx` tokens: its window plus the
/// compressed rows a token can see (HCA: all of them; CSA: the indexer's top-k).
fn attention_rows(cfg: &ds4_model::config::ModelConfig, l: usize, ctx: usize) -> usize {
    let window = cfg.sliding_window.min(raw_window_rows(cfg, ctx));
    window
        + match cfg.attn_kind[l] {
            AttnKind::Sliding => 0,
            AttnKind::Hca => compressed_capacity(ctx, cfg.compress_ratio[l] as usize),
            AttnKind::Csa => cfg.index_topk,
        }
}

/// GPU memory a session of `ctx` tokens allocates (state + scratch), for the fit check.
pub(crate) fn session_bytes(m: &CudaModel, ctx: usize) -> usize {
    let layout = crate::forward::ScratchLayout::of(m);
    session_bytes_for(&m.cfg, m.numerics, layout, m.chunk, ctx)
}

/// A session's GPU memory (prefill spans of `chunk` tokens, a model of that scratch `layout`,
/// loaded or not): its KV state, the indexer keys' bf16 copies (ds4 numerics), the span
/// scratch with its quant slots, and the fixed and per-context-token parts
/// ([`crate::model::SESSION_FIXED_BYTES`]).
pub(crate) fn session_bytes_for(
    cfg: &ds4_model::config::ModelConfig,
    numerics: Numerics,
    layout: crate::forward::ScratchLayout,
    chunk: usize,
    ctx: usize,
) -> usize {
    let state = ds4_model::session::kv_bytes(cfg, ctx) as usize;
    let max_index_rows = cfg
        .compress_ratio
        .iter()
        .zip(&cfg.attn_kind)
        .filter(|(_, k)| **k == AttnKind::Csa)
        .map(|(&r, _)| compressed_capacity(ctx, r as usize))
        .max()
        .unwrap_or(1);
    let max_attn_rows = (0..cfg.n_layers)
        .map(|l| attention_rows(cfg, l, ctx))
        .max()
        .unwrap_or(1);
    // The indexer keys' bf16 copies (ds4 numerics).
    let index_bf16 = if numerics == Numerics::Ds4 {
        (0..cfg.n_layers)
            .filter(|&l| cfg.attn_kind[l] == AttnKind::Csa)
            .map(|l| {
                compressed_capacity(ctx, cfg.compress_ratio[l] as usize)
                    .saturating_mul(cfg.index_head_dim * 2)
            })
            .fold(0, usize::saturating_add)
    } else {
        0
    };
    let scratch = crate::forward::ScratchSizes::new(
        cfg,
        chunk.min(ctx),
        layout,
        max_index_rows,
        max_attn_rows,
    );
    // Saturating: an absurd context plans more memory than any GPU has, never a wrapped sum.
    [
        state,
        index_bf16,
        scratch.bytes(),
        crate::model::SESSION_FIXED_BYTES,
        ctx.saturating_mul(crate::model::SESSION_BYTES_PER_CONTEXT_TOKEN),
    ]
    .into_iter()
    .fold(0, usize::saturating_add)
}

impl Session for CudaSession {
    fn ctx(&self) -> usize {
        self.ctx
    }

    fn tokens(&self) -> &[u32] {
        &self.tokens
    }

    fn eval(&mut self, tokens: &[u32], want: Logits) -> std::result::Result<Vec<f32>, ModelError> {
        let cfg = &self.model.cfg;
        if tokens.is_empty() {
            return Ok(Vec::new());
        }
        check_span(tokens, self.tokens.len(), self.ctx, cfg.vocab_size)?;
        let v = cfg.vocab_size;
        let n_chunks = tokens.len().div_ceil(self.scratch.cap);
        let mut out = Vec::new();
        // The logits after the last token: left in the staging by a single-row chunk (no
        // second copy of half a megabyte per served token), else a copy of the last row.
        let mut last = LastLogits::Host;
        let mut last_row = Vec::new();
        let model = self.model.clone();
        for (i, chunk) in tokens.chunks(self.scratch.cap).enumerate() {
            let pos0 = self.tokens.len();
            let rows = match want {
                Logits::All => 0..chunk.len(),
                Logits::Last if i + 1 == n_chunks => chunk.len() - 1..chunk.len(),
                Logits::Last => 0..0,
            };
            let staged = model
                .forward_chunk(
                    &mut self.scratch,
                    &mut self.layers,
                    chunk,
                    pos0,
                    Head::Logits(rows),
                )
                .map_err(cuda_err)?;
            let logits = match staged {
                ChunkLogits::None | ChunkLogits::Picked(_) => Vec::new(),
                ChunkLogits::Staged => {
                    last = LastLogits::Staged;
                    self.scratch.staged_logits(v).map_err(cuda_err)?.to_vec()
                }
                ChunkLogits::Rows(rows) => {
                    last = LastLogits::Host;
                    last_row = rows[rows.len() - v..].to_vec();
                    rows
                }
            };
            if want == Logits::All {
                out.extend_from_slice(&logits);
            } else {
                out = logits;
            }
            self.tokens.extend_from_slice(chunk);
        }
        self.last_logits = last_row;
        self.last = last;
        Ok(out)
    }

    fn last_logits(&self) -> &[f32] {
        // The staging is only unreadable if the GPU failed; the next eval reports that.
        self.logits().unwrap_or(&[])
    }

    fn decode_step(&mut self, token: u32) -> std::result::Result<&[f32], ModelError> {
        self.check_step(token)?;
        let pos0 = self.tokens.len();
        let model = self.model.clone();
        // The logits stay in the page-locked staging they were downloaded into: no copy.
        model
            .forward_chunk(
                &mut self.scratch,
                &mut self.layers,
                &[token],
                pos0,
                Head::Logits(0..1),
            )
            .map_err(cuda_err)?;
        self.tokens.push(token);
        self.last = LastLogits::Staged;
        self.logits().map_err(cuda_err)
    }

    fn decode_greedy(
        &mut self,
        token: u32,
        exclude: &[u32],
    ) -> std::result::Result<u32, ModelError> {
        self.check_step(token)?;
        let model = self.model.clone();
        let on_gpu = self
            .scratch
            .set_greedy_exclude(&model.gpu.device, exclude)
            .map_err(cuda_err)?;
        if !on_gpu {
            let logits = self.decode_step(token)?;
            return Ok(argmax_excluding(logits, exclude));
        }
        let pos0 = self.tokens.len();
        let picked = model
            .forward_chunk(
                &mut self.scratch,
                &mut self.layers,
                &[token],
                pos0,
                Head::Greedy,
            )
            .map_err(cuda_err)?;
        let ChunkLogits::Picked(id) = picked else {
            return Err(ModelError::Unsupported(
                "CUDA: a greedy step returned no pick".into(),
            ));
        };
        self.tokens.push(token);
        self.last = LastLogits::Device(OnceCell::new());
        Ok(id)
    }

    fn preferred_span(&self) -> usize {
        self.scratch.cap
    }

    fn snapshot(&self) -> Vec<u8> {
        // The trait's snapshot cannot fail; a device error here means the GPU is unusable,
        // which the next eval reports. An empty payload is rejected by every restore.
        match self.to_state() {
            Ok(st) => st.to_payload(&self.model.cfg),
            Err(e) => {
                eprintln!("ds4: CUDA snapshot failed: {e}");
                Vec::new()
            }
        }
    }

    fn restore(&mut self, bytes: &[u8]) -> std::result::Result<(), ModelError> {
        let cfg = &self.model.cfg;
        let mut st = SessionState::new(cfg, self.ctx);
        st.restore_payload(cfg, bytes)?;
        self.upload_state(&st).map_err(cuda_err)
    }

    fn reset(&mut self) {
        if let Err(e) = self.clear() {
            eprintln!("ds4: CUDA session reset failed: {e}");
        }
    }
}
