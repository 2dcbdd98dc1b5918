//! Structural validation of a DSV4 session payload (ds4-spec.md §3) without running a model:
//! the 13-word header, the per-layer row counts, and the exact byte length those imply for the
//! model's shape. The floats themselves are not interpreted; [`ds4_model::backend::Session::restore`]
//! does the final check against a live session.
//!
//! Payload layout (little-endian): 13 × u32 header, `u32[T]` tokens, `f32[vocab]` logits,
//! `u32[layers]` compressed-row counts, `u32[layers]` indexer-row counts, then per layer: raw_live
//! raw rows (head_dim f32, oldest first); compressed layers: the rows (head_dim f32) and the
//! compressor frontier (state_kv and state_score, each coff·r × coff·head_dim f32, coff = 2 on
//! CSA layers, 1 on HCA); CSA layers also the indexer rows (index_head_dim f32) and frontier
//! (2·r × 2·index_head_dim f32, twice).

use ds4_model::config::{AttnKind, ModelConfig};
use ds4_model::session::{compressed_capacity, raw_window_rows, PAYLOAD_MAGIC, PAYLOAD_VERSION};

use crate::error::FormatError;

/// ds4 records its prefill chunk: 2048, or the context when smaller.
pub const DS4_PREFILL_CAP: u32 = 2048;
pub const PAYLOAD_HEADER_WORDS: usize = 13;

/// The 13 header words, by name.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PayloadHeader {
    pub magic: u32,
    pub version: u32,
    pub ctx: u32,
    pub prefill_cap: u32,
    pub raw_cap: u32,
    pub raw_window: u32,
    pub comp_cap: u32,
    pub n_tokens: u32,
    pub n_layers: u32,
    pub head_dim: u32,
    pub index_head_dim: u32,
    pub vocab: u32,
    pub raw_live: u32,
}

/// Field names of the header words, in order (used in error messages).
pub const HEADER_FIELDS: [&str; PAYLOAD_HEADER_WORDS] = [
    "magic",
    "version",
    "ctx",
    "prefill_cap",
    "raw_cap",
    "raw_window",
    "comp_cap",
    "n_tokens",
    "n_layers",
    "head_dim",
    "index_head_dim",
    "vocab",
    "raw_live",
];

impl PayloadHeader {
    /// Reads the 13 words (no validation beyond their presence).
    pub fn read(payload: &[u8]) -> Result<PayloadHeader, FormatError> {
        if payload.len() < PAYLOAD_HEADER_WORDS * 4 {
            return Err(FormatError::new(
                "payload.header",
                0,
                format!("needs 52 bytes, the payload has {}", payload.len()),
            ));
        }
        let w = |i: usize| u32_at(payload, i * 4);
        Ok(PayloadHeader {
            magic: w(0),
            version: w(1),
            ctx: w(2),
            prefill_cap: w(3),
            raw_cap: w(4),
            raw_window: w(5),
            comp_cap: w(6),
            n_tokens: w(7),
            n_layers: w(8),
            head_dim: w(9),
            index_head_dim: w(10),
            vocab: w(11),
            raw_live: w(12),
        })
    }

    pub fn words(&self) -> [u32; PAYLOAD_HEADER_WORDS] {
        [
            self.magic,
            self.version,
            self.ctx,
            self.prefill_cap,
            self.raw_cap,
            self.raw_window,
            self.comp_cap,
            self.n_tokens,
            self.n_layers,
            self.head_dim,
            self.index_head_dim,
            self.vocab,
            self.raw_live,
        ]
    }
}

/// ds4's GPU raw ring: clamp(align256(min(128 + prefill_cap, ctx)), 128, 8192).
pub fn gpu_raw_cap(ctx: u32) -> u32 {
    let prefill_cap = ctx.min(DS4_PREFILL_CAP);
    let want = (128 + prefill_cap).min(ctx);
    want.div_ceil(256).saturating_mul(256).clamp(128, 8192)
}

fn u32_at(b: &[u8], o: usize) -> u32 {
    u32::from_le_bytes([b[o], b[o + 1], b[o + 2], b[o + 3]])
}

fn field_err(i: usize, msg: String) -> FormatError {
    FormatError::new(format!("payload.{}", HEADER_FIELDS[i]), (i * 4) as u64, msg)
}

/// Checks the header words against the model and against each other.
fn check_header(cfg: &ModelConfig, h: &PayloadHeader) -> Result<(), FormatError> {
    let expect = |i: usize, got: u32, want: u64| -> Result<(), FormatError> {
        if got as u64 != want {
            return Err(field_err(i, format!("is {got}, expected {want}")));
        }
        Ok(())
    };
    expect(0, h.magic, PAYLOAD_MAGIC as u64)?;
    expect(1, h.version, PAYLOAD_VERSION as u64)?;
    expect(8, h.n_layers, cfg.n_layers as u64)?;
    expect(9, h.head_dim, cfg.head_dim as u64)?;
    expect(10, h.index_head_dim, cfg.index_head_dim as u64)?;
    expect(11, h.vocab, cfg.vocab_size as u64)?;
    if h.ctx == 0 {
        return Err(field_err(2, "is 0".into()));
    }
    let ctx = h.ctx as usize;
    if h.n_tokens >= h.ctx {
        return Err(field_err(
            7,
            format!(
                "{} tokens do not fit the saved context of {}",
                h.n_tokens, h.ctx
            ),
        ));
    }
    expect(3, h.prefill_cap, h.ctx.min(DS4_PREFILL_CAP) as u64)?;
    let raw_window = raw_window_rows(cfg, ctx) as u64;
    expect(5, h.raw_window, raw_window)?;
    // The CPU keeps just the window; ds4's GPU backends keep a ring sized from the prefill cap.
    let gpu_ring = gpu_raw_cap(h.ctx);
    if h.raw_cap as u64 != raw_window && h.raw_cap != gpu_ring {
        return Err(field_err(
            4,
            format!(
                "is {}, expected the raw window {raw_window} or the GPU ring {gpu_ring}",
                h.raw_cap
            ),
        ));
    }
    let min_ratio = cfg
        .compress_ratio
        .iter()
        .copied()
        .filter(|&r| r > 0)
        .min()
        .unwrap_or(4) as usize;
    expect(6, h.comp_cap, compressed_capacity(ctx, min_ratio) as u64)?;
    expect(12, h.raw_live, (h.n_tokens as u64).min(raw_window))?;
    Ok(())
}

/// Validates a payload for the model `cfg`: header, tokens inside the vocabulary, row counts
/// that follow from the token count, and a length that is exactly what those imply.
pub fn validate_payload(cfg: &ModelConfig, payload: &[u8]) -> Result<PayloadHeader, FormatError> {
    validate_payload_head(cfg, payload, payload.len() as u64)
}

/// Bytes before the first layer's state (header, tokens, logits, row counts): what
/// [`validate_payload_head`] needs to see.
pub fn payload_head_len(cfg: &ModelConfig, n_tokens: u32) -> u64 {
    52 + 4 * n_tokens as u64 + 4 * cfg.vocab_size as u64 + 8 * cfg.n_layers as u64
}

/// [`validate_payload`] for a payload of `total_len` bytes of which only the beginning,
/// `head`, is in memory: it must hold [`payload_head_len`] bytes (or the whole payload when
/// that is shorter, which is then reported as truncated).
pub fn validate_payload_head(
    cfg: &ModelConfig,
    head: &[u8],
    total_len: u64,
) -> Result<PayloadHeader, FormatError> {
    let h = PayloadHeader::read(head)?;
    check_header(cfg, &h)?;
    let layers = cfg.n_layers;
    let n_tok = h.n_tokens as u64;
    let len = total_len;
    let tokens_at = 52u64;
    let counts_at = tokens_at + 4 * n_tok + 4 * cfg.vocab_size as u64;
    let body_at = counts_at + 8 * layers as u64;
    if body_at > len {
        return Err(FormatError::new(
            "payload",
            len,
            format!("truncated: tokens, logits and row counts need {body_at} bytes, the payload has {len}"),
        ));
    }
    if body_at > head.len() as u64 {
        return Err(FormatError::new(
            "payload",
            head.len() as u64,
            format!(
                "only {} of the {body_at} leading bytes were read",
                head.len()
            ),
        ));
    }
    for i in 0..n_tok as usize {
        let t = u32_at(head, tokens_at as usize + 4 * i);
        if t as usize >= cfg.vocab_size {
            return Err(FormatError::new(
                format!("payload.tokens[{i}]"),
                tokens_at + 4 * i as u64,
                format!("{t} is outside the vocabulary of {}", cfg.vocab_size),
            ));
        }
    }
    let f = 4u64;
    let hd = cfg.head_dim as u64;
    let di = cfg.index_head_dim as u64;
    let mut body = 0u64;
    for l in 0..layers {
        let n_comp = u32_at(head, counts_at as usize + 4 * l) as u64;
        let n_index = u32_at(head, counts_at as usize + 4 * (layers + l)) as u64;
        let r = cfg.compress_ratio[l] as u64;
        let (want_comp, want_index, coff) = match cfg.attn_kind[l] {
            AttnKind::Sliding => (0, 0, 0),
            AttnKind::Hca => (n_tok / r, 0, 1),
            AttnKind::Csa => (n_tok / r, n_tok / r, 2),
        };
        if n_comp != want_comp {
            return Err(FormatError::new(
                format!("payload.n_comp[{l}]"),
                counts_at + 4 * l as u64,
                format!("{n_comp} compressed rows, expected {want_comp} for {n_tok} tokens"),
            ));
        }
        if n_index != want_index {
            return Err(FormatError::new(
                format!("payload.n_index_comp[{l}]"),
                counts_at + 4 * (layers + l) as u64,
                format!("{n_index} indexer rows, expected {want_index} for {n_tok} tokens"),
            ));
        }
        let frontier = |w: u64| 2 * (coff * r) * (coff * w) * f;
        body += h.raw_live as u64 * hd * f;
        if coff > 0 {
            body += n_comp * hd * f + frontier(hd);
        }
        if coff == 2 {
            body += n_index * di * f + frontier(di);
        }
    }
    let want = body_at + body;
    if len != want {
        let (offset, msg) = if len < want {
            (
                len,
                format!(
                    "truncated: the layer state needs {want} bytes in all, the payload has {len}"
                ),
            )
        } else {
            (
                want,
                format!("{} trailing bytes after the last layer", len - want),
            )
        };
        return Err(FormatError::new("payload", offset, msg));
    }
    Ok(h)
}

/// The exact payload length a session of `n_tokens` tokens at context `ctx` serializes to
/// (used to size files before writing and in tests).
pub fn payload_len(cfg: &ModelConfig, ctx: usize, n_tokens: usize) -> u64 {
    let f = 4u64;
    let raw_live = n_tokens.min(raw_window_rows(cfg, ctx)) as u64;
    let (hd, di, t) = (
        cfg.head_dim as u64,
        cfg.index_head_dim as u64,
        n_tokens as u64,
    );
    let mut total = 52 + 4 * t + 4 * cfg.vocab_size as u64 + 8 * cfg.n_layers as u64;
    for l in 0..cfg.n_layers {
        let r = cfg.compress_ratio[l] as u64;
        total += raw_live * hd * f;
        match cfg.attn_kind[l] {
            AttnKind::Sliding => {}
            AttnKind::Hca => total += (t / r) * hd * f + 2 * r * hd * f,
            AttnKind::Csa => {
                total += (t / r) * hd * f + 2 * (2 * r) * (2 * hd) * f;
                total += (t / r) * di * f + 2 * (2 * r) * (2 * di) * f;
            }
        }
    }
    total
}
