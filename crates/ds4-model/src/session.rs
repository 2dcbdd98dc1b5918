//! The incremental state of a token stream, per layer exactly what dsv4-arch.md §4 calls the
//! minimal state: the raw KV window, the compressed rows, the compressors' open windows, and
//! (CSA) the indexer's keys and open windows. Sized from the model description for the
//! requested context, and serialized in ds4's session payload layout (ds4-spec.md §3).

use crate::backend::ModelError;
use crate::config::{AttnKind, ModelConfig};
use crate::cpu::compressor::{CompressedRows, CompressorFrontier};

/// "DSV4" little-endian.
pub const PAYLOAD_MAGIC: u32 = 0x3456_5344;
pub const PAYLOAD_VERSION: u32 = 1;
/// ds4's prefill chunk for contexts above it (the payload records it).
const DS4_PREFILL_CAP: usize = 2048;

/// The last `cap` K=V rows, in a ring indexed by position.
#[derive(Clone, Debug, PartialEq)]
pub struct RawWindow {
    width: usize,
    cap: usize,
    data: Vec<f32>,
}

impl RawWindow {
    pub fn new(width: usize, cap: usize) -> RawWindow {
        RawWindow {
            width,
            cap,
            data: vec![0.0; width * cap],
        }
    }

    pub fn capacity(&self) -> usize {
        self.cap
    }

    /// Stores the row of position `pos`, replacing the row of `pos − cap`.
    pub fn put(&mut self, pos: usize, row: &[f32]) {
        let i = pos % self.cap;
        self.data[i * self.width..(i + 1) * self.width].copy_from_slice(row);
    }

    /// The row of position `pos` (valid while `pos` is among the last `cap` positions).
    pub fn get(&self, pos: usize) -> &[f32] {
        let i = pos % self.cap;
        &self.data[i * self.width..(i + 1) * self.width]
    }
}

/// A compressor's open windows plus the rows it has emitted.
#[derive(Clone, Debug, PartialEq)]
pub struct CompressorState {
    pub frontier: CompressorFrontier,
    pub rows: CompressedRows,
}

/// One layer's state.
#[derive(Clone, Debug, PartialEq)]
pub struct LayerState {
    pub raw: RawWindow,
    /// CSA and HCA layers: the attention compressor.
    pub attn: Option<CompressorState>,
    /// CSA layers: the indexer's compressor (keys of width d_I).
    pub index: Option<CompressorState>,
}

/// The whole state of one session.
#[derive(Clone, Debug, PartialEq)]
pub struct SessionState {
    pub ctx: usize,
    pub tokens: Vec<u32>,
    pub last_logits: Vec<f32>,
    pub layers: Vec<LayerState>,
}

/// Rows of the raw window kept per layer: the window (which includes the current token), but
/// never more than the context.
pub fn raw_window_rows(cfg: &ModelConfig, ctx: usize) -> usize {
    cfg.sliding_window.min(ctx).max(1)
}

/// Compressed-row capacity of a layer of rate `ratio` (ds4 keeps ctx/ratio + 2).
pub fn compressed_capacity(ctx: usize, ratio: usize) -> usize {
    ctx / ratio + 2
}

/// Bytes of KV state per token of context beyond the fixed-size parts: the compressed rows
/// (f32) of every compressed layer and the indexer keys of CSA layers.
pub fn kv_bytes_per_token(cfg: &ModelConfig) -> f64 {
    (0..cfg.n_layers)
        .map(|l| {
            let r = cfg.compress_ratio[l] as f64;
            match cfg.attn_kind[l] {
                AttnKind::Sliding => 0.0,
                AttnKind::Hca => cfg.head_dim as f64 * 4.0 / r,
                AttnKind::Csa => (cfg.head_dim + cfg.index_head_dim) as f64 * 4.0 / r,
            }
        })
        .sum()
}

/// Total bytes of a session's KV state for `ctx` tokens: raw windows, compressed rows and
/// indexer keys at capacity, and the compressors' open windows. Computed in u64 so any
/// context (1M tokens and beyond) is representable.
pub fn kv_bytes(cfg: &ModelConfig, ctx: usize) -> u64 {
    // Saturating, so an absurd context reports u64::MAX instead of wrapping.
    let f = 4u64;
    let raw = raw_window_rows(cfg, ctx) as u64;
    (0..cfg.n_layers)
        .map(|l| {
            let r = cfg.compress_ratio[l] as u64;
            let d = cfg.head_dim as u64;
            let di = cfg.index_head_dim as u64;
            let window = raw * d * f;
            let rows = |w: u64| {
                (compressed_capacity(ctx, r.max(1) as usize) as u64)
                    .saturating_mul(w)
                    .saturating_mul(f)
            };
            // Two arrays (values and scores) of coff·m × coff·D.
            let frontier = |w: u64, coff: u64| 2 * coff * r * coff * w * f;
            let compressed = match cfg.attn_kind[l] {
                AttnKind::Sliding => 0,
                AttnKind::Hca => rows(d).saturating_add(frontier(d, 1)),
                AttnKind::Csa => rows(d)
                    .saturating_add(frontier(d, 2))
                    .saturating_add(rows(di))
                    .saturating_add(frontier(di, 2)),
            };
            window.saturating_add(compressed)
        })
        .fold(0u64, u64::saturating_add)
}

impl SessionState {
    /// An empty state for `ctx` tokens whose compressed-row storage is reserved up front
    /// (virtual memory; pages are touched as rows are written). An error names the context
    /// when the memory cannot be had.
    pub fn allocate(cfg: &ModelConfig, ctx: usize) -> Result<SessionState, ModelError> {
        let mut s = SessionState::new(cfg, ctx);
        for l in &mut s.layers {
            for c in [&mut l.attn, &mut l.index].into_iter().flatten() {
                c.rows.reserve().map_err(|_| ModelError::Allocation {
                    ctx,
                    bytes: kv_bytes(cfg, ctx),
                })?;
            }
        }
        Ok(s)
    }

    /// An empty state for `ctx` tokens; compressed rows take memory as they are produced
    /// (see [`SessionState::allocate`] to reserve it up front).
    pub fn new(cfg: &ModelConfig, ctx: usize) -> SessionState {
        let raw = raw_window_rows(cfg, ctx);
        let layers = (0..cfg.n_layers)
            .map(|l| {
                let ratio = cfg.compress_ratio[l] as usize;
                let comp = |width: usize, overlap: bool| CompressorState {
                    frontier: CompressorFrontier::new(ratio, width, overlap),
                    rows: CompressedRows::with_capacity(width, compressed_capacity(ctx, ratio)),
                };
                let (attn, index) = match cfg.attn_kind[l] {
                    AttnKind::Sliding => (None, None),
                    AttnKind::Hca => (Some(comp(cfg.head_dim, false)), None),
                    AttnKind::Csa => (
                        Some(comp(cfg.head_dim, true)),
                        Some(comp(cfg.index_head_dim, true)),
                    ),
                };
                LayerState {
                    raw: RawWindow::new(cfg.head_dim, raw),
                    attn,
                    index,
                }
            })
            .collect();
        SessionState {
            ctx,
            tokens: Vec::new(),
            last_logits: Vec::new(),
            layers,
        }
    }

    pub fn reset(&mut self) {
        self.tokens.clear();
        self.last_logits.clear();
        for l in &mut self.layers {
            for c in [&mut l.attn, &mut l.index].into_iter().flatten() {
                c.frontier.reset();
                c.rows.clear();
            }
        }
    }

    fn header(&self, cfg: &ModelConfig) -> [u32; 13] {
        let raw_window = raw_window_rows(cfg, self.ctx);
        [
            PAYLOAD_MAGIC,
            PAYLOAD_VERSION,
            self.ctx as u32,
            self.ctx.min(DS4_PREFILL_CAP) as u32,
            raw_window as u32,
            raw_window as u32,
            min_ratio_capacity(cfg, self.ctx) as u32,
            self.tokens.len() as u32,
            cfg.n_layers as u32,
            cfg.head_dim as u32,
            cfg.index_head_dim as u32,
            cfg.vocab_size as u32,
            self.tokens.len().min(raw_window) as u32,
        ]
    }

    /// The state in ds4's payload layout: 13 u32 header, tokens, last logits (vocab f32),
    /// per-layer compressed-row counts and indexer-row counts, then per layer the live raw
    /// rows oldest first, the compressed rows and the compressor frontier, and (CSA) the
    /// indexer rows and frontier. Little-endian.
    pub fn to_payload(&self, cfg: &ModelConfig) -> Vec<u8> {
        let mut out = Vec::new();
        let header = self.header(cfg);
        let raw_live = header[12] as usize;
        for v in header {
            out.extend_from_slice(&v.to_le_bytes());
        }
        for &t in &self.tokens {
            out.extend_from_slice(&t.to_le_bytes());
        }
        let mut logits = self.last_logits.clone();
        logits.resize(cfg.vocab_size, 0.0);
        put_f32s(&mut out, &logits);
        for l in &self.layers {
            let n = l.attn.as_ref().map_or(0, |c| c.rows.len()) as u32;
            out.extend_from_slice(&n.to_le_bytes());
        }
        for l in &self.layers {
            let n = l.index.as_ref().map_or(0, |c| c.rows.len()) as u32;
            out.extend_from_slice(&n.to_le_bytes());
        }
        let n_tok = self.tokens.len();
        for l in &self.layers {
            for pos in n_tok - raw_live..n_tok {
                put_f32s(&mut out, l.raw.get(pos));
            }
            for c in [&l.attn, &l.index].into_iter().flatten() {
                put_f32s(&mut out, c.rows.as_slice());
                let (kv, score) = c.frontier.state();
                put_f32s(&mut out, kv);
                put_f32s(&mut out, score);
            }
        }
        out
    }

    /// Replaces this state with a payload written by [`SessionState::to_payload`] for the
    /// same model. The state is unchanged on error.
    pub fn restore_payload(&mut self, cfg: &ModelConfig, bytes: &[u8]) -> Result<(), ModelError> {
        let bad = |m: String| ModelError::BadSnapshot(m);
        let mut r = Reader { bytes, pos: 0 };
        let mut h = [0u32; 13];
        for v in h.iter_mut() {
            *v = r.u32("header")?;
        }
        if h[0] != PAYLOAD_MAGIC || h[1] != PAYLOAD_VERSION {
            return Err(bad(format!(
                "magic/version {:#x}/{} is not a DSV4 v1 payload",
                h[0], h[1]
            )));
        }
        let (saved_ctx, n_tok) = (h[2] as usize, h[7] as usize);
        if saved_ctx > self.ctx {
            return Err(bad(format!(
                "saved context {saved_ctx} exceeds this session's {}",
                self.ctx
            )));
        }
        if n_tok >= self.ctx {
            return Err(bad(format!(
                "{n_tok} saved tokens do not fit a context of {}",
                self.ctx
            )));
        }
        let mine = self.header(cfg);
        let names = ["layers", "head_dim", "index_head_dim", "vocab"];
        for (i, name) in (8..12).zip(names) {
            if h[i] != mine[i] {
                return Err(bad(format!(
                    "{name} is {}, this model has {}",
                    h[i], mine[i]
                )));
            }
        }
        // The raw window must match (its rows are the state); the prefill chunk and ring
        // capacity are how the saving backend batched and stored them (ds4's GPU backends
        // keep a 2304-row ring), so a payload from any backend loads.
        if h[5] != mine[5] || (h[4] as usize) < h[5] as usize {
            return Err(bad(format!(
                "raw window {} (ring {}) differs from this session's {}",
                h[5], h[4], mine[5]
            )));
        }
        let raw_live = h[12] as usize;
        if raw_live != n_tok.min(mine[5] as usize) {
            return Err(bad(format!(
                "raw_live {raw_live} does not match {n_tok} tokens"
            )));
        }
        let mut next = SessionState::allocate(cfg, self.ctx)?;
        for i in 0..n_tok {
            let t = r.u32("tokens")?;
            if t as usize >= cfg.vocab_size {
                return Err(bad(format!("token {i} is {t}, outside the vocabulary")));
            }
            next.tokens.push(t);
        }
        next.last_logits = r.f32s(cfg.vocab_size, "logits")?;
        if n_tok == 0 {
            next.last_logits.clear();
        }
        let mut n_comp = Vec::new();
        for _ in 0..cfg.n_layers {
            n_comp.push(r.u32("compressed row counts")? as usize);
        }
        let mut n_index = Vec::new();
        for _ in 0..cfg.n_layers {
            n_index.push(r.u32("indexer row counts")? as usize);
        }
        for (l, layer) in next.layers.iter_mut().enumerate() {
            for pos in n_tok - raw_live..n_tok {
                let row = r.f32s(cfg.head_dim, "raw rows")?;
                layer.raw.put(pos, &row);
            }
            let ratio = cfg.compress_ratio[l] as usize;
            for (state, n) in [(&mut layer.attn, n_comp[l]), (&mut layer.index, n_index[l])] {
                let Some(c) = state else {
                    if n != 0 {
                        return Err(bad(format!(
                            "layer {l} has no compressor but {n} rows were saved"
                        )));
                    }
                    continue;
                };
                if n != (n_tok / ratio.max(1)) {
                    return Err(bad(format!(
                        "layer {l}: {n} compressed rows for {n_tok} tokens"
                    )));
                }
                let rows = r.f32s(n * c.rows.width(), "compressed rows")?;
                for row in rows.chunks_exact(c.rows.width()) {
                    if !c.rows.push(row) {
                        return Err(bad(format!("layer {l}: more rows than the capacity")));
                    }
                }
                let size = c.frontier.state().0.len();
                let kv = r.f32s(size, "compressor state")?;
                let score = r.f32s(size, "compressor scores")?;
                c.frontier.set_state(&kv, &score);
            }
        }
        if r.pos != bytes.len() {
            return Err(bad(format!("{} trailing bytes", bytes.len() - r.pos)));
        }
        *self = next;
        Ok(())
    }
}

/// ds4 records the capacity of the densest compressed layer (ctx/4 + 2 for Flash).
fn min_ratio_capacity(cfg: &ModelConfig, ctx: usize) -> usize {
    let r = cfg
        .compress_ratio
        .iter()
        .copied()
        .filter(|&r| r > 0)
        .min()
        .unwrap_or(4);
    compressed_capacity(ctx, r as usize)
}

fn put_f32s(out: &mut Vec<u8>, v: &[f32]) {
    for x in v {
        out.extend_from_slice(&x.to_le_bytes());
    }
}

struct Reader<'a> {
    bytes: &'a [u8],
    pos: usize,
}

impl Reader<'_> {
    fn take(&mut self, n: usize, what: &str) -> Result<&[u8], ModelError> {
        let end = self
            .pos
            .checked_add(n)
            .filter(|&e| e <= self.bytes.len())
            .ok_or_else(|| {
                ModelError::BadSnapshot(format!(
                    "truncated: {what} at offset {} needs {n} bytes",
                    self.pos
                ))
            })?;
        let s = &self.bytes[self.pos..end];
        self.pos = end;
        Ok(s)
    }

    fn u32(&mut self, what: &str) -> Result<u32, ModelError> {
        let b = self.take(4, what)?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }

    fn f32s(&mut self, n: usize, what: &str) -> Result<Vec<f32>, ModelError> {
        let len = n
            .checked_mul(4)
            .ok_or_else(|| ModelError::BadSnapshot(format!("{what}: size overflow")))?;
        Ok(self
            .take(len, what)?
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flash_kv_size_per_token_and_at_one_million_tokens() {
        let cfg = ModelConfig::flash();
        // 21 CSA layers × (512 + 128) f32 / 4 + 20 HCA layers × 512 f32 / 128.
        assert_eq!(kv_bytes_per_token(&cfg), 21.0 * 640.0 + 20.0 * 16.0);
        let ctx = 1 << 20;
        let total = kv_bytes(&cfg, ctx);
        let fixed = kv_bytes(&cfg, 128) - (kv_bytes_per_token(&cfg) * 128.0) as u64;
        // Growth is the per-token figure (up to the +2 rows of slack per layer).
        let grown = (total - fixed) as f64 / ctx as f64;
        assert!((grown - kv_bytes_per_token(&cfg)).abs() < 1.0, "{grown}");
        assert!(total > 14_000_000_000 && total < 15_000_000_000, "{total}");
        assert_eq!(kv_bytes(&cfg, usize::MAX), u64::MAX);
    }

    #[test]
    fn raw_window_never_exceeds_the_context() {
        let cfg = ModelConfig::flash();
        assert_eq!(raw_window_rows(&cfg, 32768), 128);
        assert_eq!(raw_window_rows(&cfg, 50), 50);
        assert_eq!(compressed_capacity(100, 4), 27);
    }
}
