//! The DeepSeek V4 forward pass over a span of tokens, layer by layer (dsv4-arch.md §3–4).
//!
//! A span is processed layer-major: every matmul of a layer runs once for all tokens of the
//! span (each weight row is read once), the per-token state updates (window, compressors)
//! run in token order, and attention runs in parallel over tokens. Each token's arithmetic
//! is the same whatever the span length, so full, chunked and one-token-at-a-time
//! evaluation give identical results.

use rayon::prelude::*;

use super::attention::attend_head;
use super::compressor::CompressedRows;
use super::hc::{self, HcMappings};
use super::indexer::select_rows;
use super::matmul::matmul;
use super::moe::{route, swiglu_clamped, Route, Selection};
use super::norm::{rms_norm, rms_norm_rows, rms_norm_unweighted};
use super::rope::RopeTable;
use crate::backend::{check_span, ModelError};
use crate::config::{AttnKind, ModelConfig, MoeKind};
use crate::numerics::{self, Numerics};
use crate::session::{LayerState, SessionState};
use crate::weights::{
    CompressorWeights, HcWeights, IndexerWeights, LayerWeights, Matrix, ModelWeights,
};

/// The indexer's per-token queries and head weights for a span.
struct IndexQueries {
    q: Vec<f32>,
    weights: Vec<f32>,
}

/// A model ready to run on the CPU: description, weights, numerics and RoPE tables.
pub struct CpuModel {
    pub cfg: ModelConfig,
    pub weights: ModelWeights,
    pub numerics: Numerics,
    rope_main: RopeTable,
    rope_compress: RopeTable,
}

impl CpuModel {
    pub fn new(
        cfg: ModelConfig,
        weights: ModelWeights,
        numerics: Numerics,
    ) -> Result<CpuModel, ModelError> {
        if numerics == Numerics::Ds4
            && cfg.attn_kind.contains(&AttnKind::Csa)
            && !cfg.index_head_dim.is_power_of_two()
        {
            return Err(ModelError::Unsupported(format!(
                "ds4 numerics rotate indexer vectors with a Hadamard transform, which needs a power-of-two indexer key length (got {})",
                cfg.index_head_dim
            )));
        }
        let rope_main = RopeTable::new(&cfg.rope_main, cfg.rope_dim);
        let rope_compress = RopeTable::new(&cfg.rope_compress, cfg.rope_dim);
        Ok(CpuModel {
            cfg,
            weights,
            numerics,
            rope_main,
            rope_compress,
        })
    }

    fn rope(&self, layer: usize) -> &RopeTable {
        match self.cfg.attn_kind[layer] {
            AttnKind::Sliding => &self.rope_main,
            _ => &self.rope_compress,
        }
    }

    /// y = W·x for every token of x.
    fn mm(&self, w: &Matrix, x: &[f32]) -> Vec<f32> {
        let n_tok = x.len() / w.cols;
        let mut out = vec![0f32; n_tok * w.rows];
        matmul(self.weights.bytes(), w, x, &mut out, self.numerics);
        out
    }

    /// Evaluates `tokens` after the state's tokens, appends them, and returns the logits of
    /// the span positions listed in `want` (indices into `tokens`, ascending), row-major.
    /// The state's last logits are always updated. Every input error (context, token ids,
    /// `want`) is found before the state is touched, so on error the state is unchanged.
    pub fn forward(
        &self,
        state: &mut SessionState,
        tokens: &[u32],
        want: &[usize],
    ) -> Result<Vec<f32>, ModelError> {
        let cfg = &self.cfg;
        if tokens.is_empty() {
            return Ok(Vec::new());
        }
        check_span(tokens, state.tokens.len(), state.ctx, cfg.vocab_size)?;
        if let Some(&bad) = want.iter().find(|&&i| i >= tokens.len()) {
            return Err(ModelError::Unsupported(format!(
                "logits requested for span position {bad} of a {}-token span",
                tokens.len()
            )));
        }
        let pos0 = state.tokens.len();
        let mut streams = self.embed(tokens);
        for l in 0..cfg.n_layers {
            self.forward_layer(l, &mut state.layers[l], &mut streams, tokens, pos0)?;
        }
        let last = tokens.len() - 1;
        let mut rows: Vec<usize> = want.to_vec();
        if rows.last() != Some(&last) {
            rows.push(last);
        }
        let logits = self.head(&streams, &rows);
        let v = cfg.vocab_size;
        state.last_logits = logits[(rows.len() - 1) * v..].to_vec();
        state.tokens.extend_from_slice(tokens);
        Ok(logits[..want.len() * v].to_vec())
    }

    /// The n hyper-connection streams of every token (n_tok × n × d), all equal to the
    /// token's embedding. Public, with [`CpuModel::forward_layer`] and [`CpuModel::head`], so
    /// other backends can be compared with this one layer by layer.
    pub fn embed(&self, tokens: &[u32]) -> Vec<f32> {
        let (d, n) = (self.cfg.hidden, self.cfg.hc_mult);
        let mut streams = vec![0f32; tokens.len() * n * d];
        for (t, &tok) in tokens.iter().enumerate() {
            let s = &mut streams[t * n * d..(t + 1) * n * d];
            self.weights
                .decode_row(&self.weights.embed, tok as usize, &mut s[..d]);
            for j in 1..n {
                s.copy_within(0..d, j * d);
            }
        }
        streams
    }

    /// One decoder layer on the span's streams (n_tok × n × d), in place.
    pub fn forward_layer(
        &self,
        l: usize,
        state: &mut LayerState,
        streams: &mut [f32],
        tokens: &[u32],
        pos0: usize,
    ) -> Result<(), ModelError> {
        let w = &self.weights.layers[l];
        let (x, maps) = self.hc_pre(&w.hc_attn, streams);
        let y = self.attention(l, w, state, x, pos0)?;
        self.hc_post(&maps, &y, streams);
        let (x, maps) = self.hc_pre(&w.hc_ffn, streams);
        let y = self.ffn(l, w, x, tokens)?;
        self.hc_post(&maps, &y, streams);
        Ok(())
    }

    /// HC pre for every token: the sublayer inputs (n_tok × d) and each token's mappings.
    fn hc_pre(&self, hcw: &HcWeights, streams: &[f32]) -> (Vec<f32>, Vec<HcMappings>) {
        let cfg = &self.cfg;
        let (d, n) = (cfg.hidden, cfg.hc_mult);
        let mut flat = streams.to_vec();
        for s in flat.chunks_exact_mut(n * d) {
            rms_norm_unweighted(s, cfg.rms_eps);
        }
        let mix = self.mm(&hcw.fn_, &flat);
        let k = (2 + n) * n;
        let maps: Vec<HcMappings> = mix
            .chunks_exact(k)
            .map(|m| {
                hc::split_sinkhorn(
                    m,
                    &hcw.base,
                    &hcw.scale,
                    n,
                    cfg.hc_sinkhorn_iters,
                    cfg.hc_eps,
                )
            })
            .collect();
        let mut x = vec![0f32; maps.len() * d];
        for ((xt, st), m) in x
            .chunks_exact_mut(d)
            .zip(streams.chunks_exact(n * d))
            .zip(&maps)
        {
            hc::combine(&m.pre, st, xt);
        }
        (x, maps)
    }

    fn hc_post(&self, maps: &[HcMappings], y: &[f32], streams: &mut [f32]) {
        let (d, n) = (self.cfg.hidden, self.cfg.hc_mult);
        for ((st, yt), m) in streams
            .chunks_exact_mut(n * d)
            .zip(y.chunks_exact(d))
            .zip(maps)
        {
            hc::post(m, yt, st);
        }
    }

    /// Rounds a freshly computed KV row as ds4 stores it (FP8 on the nope channels, f16).
    fn store_kv_row(&self, row: &mut [f32]) {
        if self.numerics.simulates_qat() {
            let nope = self.cfg.head_dim - self.cfg.rope_dim;
            numerics::fp8_e4m3_round_trip_row(row, nope);
            numerics::f16_round_row(row);
        }
    }

    /// Rounds an indexer query or key as ds4 does (Hadamard rotation, FP4, optionally f16).
    fn index_qat(&self, v: &mut [f32], store: bool) {
        if self.numerics.simulates_qat() {
            numerics::hadamard_rotate(v);
            numerics::fp4_e2m1_round_trip(v);
            if store {
                numerics::f16_round_row(v);
            }
        }
    }

    /// A pooled compressor row → normed, RoPE'd at its window start, rounded as stored.
    fn finish_row(
        &self,
        cw: &CompressorWeights,
        rope: &RopeTable,
        mut row: Vec<f32>,
        pos: usize,
        indexer: bool,
    ) -> Vec<f32> {
        rms_norm(&mut row, &cw.norm, self.cfg.rms_eps);
        rope.rotate_tail(&mut row, pos, false);
        if indexer {
            self.index_qat(&mut row, true);
        } else {
            self.store_kv_row(&mut row);
        }
        row
    }

    /// The attention sublayer for the span (dsv4-arch §3.5–3.9); returns n_tok × d.
    fn attention(
        &self,
        l: usize,
        w: &LayerWeights,
        state: &mut LayerState,
        mut xn: Vec<f32>,
        pos0: usize,
    ) -> Result<Vec<f32>, ModelError> {
        let cfg = &self.cfg;
        let rope = self.rope(l);
        rms_norm_rows(&mut xn, &w.attn_norm, cfg.rms_eps);

        // Queries: low-rank, weighted norm on the rank, unweighted norm per head, RoPE.
        let mut qr = self.mm(&w.q_a, &xn);
        rms_norm_rows(&mut qr, &w.q_a_norm, cfg.rms_eps);
        let mut q = self.mm(&w.q_b, &qr);
        for (t, qt) in q.chunks_exact_mut(cfg.n_heads * cfg.head_dim).enumerate() {
            for head in qt.chunks_exact_mut(cfg.head_dim) {
                rms_norm_unweighted(head, cfg.rms_eps);
                rope.rotate_tail(head, pos0 + t, false);
            }
        }
        // The shared K=V row, rounded as it is stored.
        let mut kv = self.mm(&w.kv, &xn);
        rms_norm_rows(&mut kv, &w.kv_norm, cfg.rms_eps);
        for (t, row) in kv.chunks_exact_mut(cfg.head_dim).enumerate() {
            rope.rotate_tail(row, pos0 + t, false);
            self.store_kv_row(row);
        }

        let visible = self.compress_span(l, w, state, &xn, pos0)?;
        let index = w
            .indexer
            .as_ref()
            .map(|iw| self.index_queries(iw, rope, &qr, &xn, pos0));
        let o = self.attend_span(l, w, state, &q, &kv, &visible, index.as_ref(), pos0);
        Ok(self.grouped_output(w, &o))
    }

    /// Feeds the span to the layer's compressors (attention and indexer) in token order and
    /// returns, per token, how many compressed rows exist once that token is in (rows become
    /// visible at the token that closes their window, §3.9).
    fn compress_span(
        &self,
        l: usize,
        w: &LayerWeights,
        state: &mut LayerState,
        xn: &[f32],
        pos0: usize,
    ) -> Result<Vec<usize>, ModelError> {
        let n_tok = xn.len() / self.cfg.hidden;
        let (Some(cw), Some(cs)) = (&w.compressor, state.attn.as_mut()) else {
            return Ok(vec![0; n_tok]);
        };
        let rope = self.rope(l);
        let ratio = self.cfg.compress_ratio[l] as usize;
        let ckv = self.mm(&cw.kv, xn);
        let cg = self.mm(&cw.gate, xn);
        let mut index = match (&w.indexer, state.index.as_mut()) {
            (Some(iw), Some(is)) => {
                let ikv = self.mm(&iw.compressor.kv, xn);
                let ig = self.mm(&iw.compressor.gate, xn);
                Some((&iw.compressor, is, ikv, ig))
            }
            _ => None,
        };
        let mut visible = Vec::with_capacity(n_tok);
        for t in 0..n_tok {
            let pos = pos0 + t;
            // A row's RoPE position is the first token of its window.
            let row_pos = (pos + 1).saturating_sub(ratio);
            let width = cs.frontier.input_width();
            let span = t * width..(t + 1) * width;
            if let Some(row) = cs
                .frontier
                .push(pos, &ckv[span.clone()], &cg[span], &cw.ape)
            {
                let row = self.finish_row(cw, rope, row, row_pos, false);
                push_row(&mut cs.rows, &row, l)?;
            }
            if let Some((icw, is, ikv, ig)) = index.as_mut() {
                let width = is.frontier.input_width();
                let span = t * width..(t + 1) * width;
                if let Some(row) = is
                    .frontier
                    .push(pos, &ikv[span.clone()], &ig[span], &icw.ape)
                {
                    let row = self.finish_row(icw, rope, row, row_pos, true);
                    push_row(&mut is.rows, &row, l)?;
                }
            }
            visible.push(cs.rows.len());
        }
        Ok(visible)
    }

    /// The indexer's queries (n_tok × n_I·d_I: RoPE'd, and in ds4 numerics rotated and
    /// FP4-rounded) and head weights (n_tok × n_I, times 1/sqrt(n_I·d_I), C12).
    fn index_queries(
        &self,
        iw: &IndexerWeights,
        rope: &RopeTable,
        qr: &[f32],
        xn: &[f32],
        pos0: usize,
    ) -> IndexQueries {
        let (ni, di) = (self.cfg.index_heads, self.cfg.index_head_dim);
        let mut q = self.mm(&iw.q_b, qr);
        for (t, qt) in q.chunks_exact_mut(ni * di).enumerate() {
            for head in qt.chunks_exact_mut(di) {
                rope.rotate_tail(head, pos0 + t, false);
                self.index_qat(head, false);
            }
        }
        let mut weights = self.mm(&iw.proj, xn);
        let s = 1.0 / ((ni * di) as f32).sqrt();
        weights.iter_mut().for_each(|v| *v *= s);
        IndexQueries { q, weights }
    }

    /// Attention of every span token (in parallel) over its window rows and its visible (HCA)
    /// or selected (CSA) compressed rows, with the head sinks; inverse RoPE on the outputs.
    /// Stores the span's last rows in the window ring. Returns n_tok × H·D.
    #[allow(clippy::too_many_arguments)]
    fn attend_span(
        &self,
        l: usize,
        w: &LayerWeights,
        state: &mut LayerState,
        q: &[f32],
        kv: &[f32],
        visible: &[usize],
        index: Option<&IndexQueries>,
        pos0: usize,
    ) -> Vec<f32> {
        let cfg = &self.cfg;
        let (hd, h) = (cfg.head_dim, cfg.n_heads);
        let n_tok = kv.len() / hd;
        let rope = self.rope(l);
        // The window rows: those before the span (oldest first), then the span's own.
        let cap = state.raw.capacity();
        let ext_start = pos0.saturating_sub(cap - 1);
        let mut ext: Vec<f32> = Vec::with_capacity((pos0 - ext_start + n_tok) * hd);
        for p in ext_start..pos0 {
            ext.extend_from_slice(state.raw.get(p));
        }
        ext.extend_from_slice(kv);
        let window = cfg.sliding_window.min(cap);

        let comp_rows = state.attn.as_ref().map(|c| &c.rows);
        let index_keys = state.index.as_ref().map(|c| &c.rows);
        let scale = 1.0 / (hd as f32).sqrt();
        let mut o = vec![0f32; n_tok * h * hd];
        o.par_chunks_exact_mut(h * hd)
            .enumerate()
            .for_each(|(t, ot)| {
                let pos = pos0 + t;
                let first = (pos + 1).saturating_sub(window);
                let mut rows: Vec<&[f32]> = (first..=pos)
                    .map(|p| &ext[(p - ext_start) * hd..(p - ext_start + 1) * hd])
                    .collect();
                if let Some(cr) = comp_rows {
                    let n_vis = visible[t];
                    match (index_keys, index) {
                        (Some(keys), Some(iq)) => {
                            let (ni, di) = (cfg.index_heads, cfg.index_head_dim);
                            let picked = select_rows(
                                &iq.q[t * ni * di..(t + 1) * ni * di],
                                &iq.weights[t * ni..(t + 1) * ni],
                                &keys.as_slice()[..n_vis * di],
                                di,
                                cfg.index_topk,
                            );
                            rows.extend(picked.into_iter().map(|i| cr.row(i)));
                        }
                        _ => rows.extend((0..n_vis).map(|i| cr.row(i))),
                    }
                }
                let mut scores = Vec::with_capacity(rows.len());
                let qt = &q[t * h * hd..(t + 1) * h * hd];
                for (i, (qh, oh)) in qt.chunks_exact(hd).zip(ot.chunks_exact_mut(hd)).enumerate() {
                    attend_head(qh, &rows, w.sinks[i], scale, &mut scores, oh);
                    rope.rotate_tail(oh, pos, true);
                }
            });
        for (t, row) in kv
            .chunks_exact(hd)
            .enumerate()
            .skip(n_tok.saturating_sub(cap))
        {
            state.raw.put(pos0 + t, row);
        }
        o
    }

    /// Grouped output projection: group g's consecutive heads go through rows
    /// [g·d_o, (g+1)·d_o) of o_a, then o_b mixes the concatenation. Returns n_tok × d.
    fn grouped_output(&self, w: &LayerWeights, o: &[f32]) -> Vec<f32> {
        let cfg = &self.cfg;
        let hhd = cfg.n_heads * cfg.head_dim;
        let (g_n, d_o) = (cfg.o_groups, cfg.o_lora_rank);
        let gw = hhd / g_n;
        let n_tok = o.len() / hhd;
        let mut z = vec![0f32; n_tok * g_n * d_o];
        for g in 0..g_n {
            let og: Vec<f32> = o
                .chunks_exact(hhd)
                .flat_map(|ot| ot[g * gw..(g + 1) * gw].iter().copied())
                .collect();
            let zg = self.mm(&w.o_a.rows_range(g * d_o, d_o), &og);
            for (zt, zgt) in z.chunks_exact_mut(g_n * d_o).zip(zg.chunks_exact(d_o)) {
                zt[g * d_o..(g + 1) * d_o].copy_from_slice(zgt);
            }
        }
        self.mm(&w.o_b, &z)
    }

    /// The MoE sublayer (routed experts + shared expert); returns n_tok × d.
    fn ffn(
        &self,
        l: usize,
        w: &LayerWeights,
        mut xn: Vec<f32>,
        tokens: &[u32],
    ) -> Result<Vec<f32>, ModelError> {
        let cfg = &self.cfg;
        let d = cfg.hidden;
        let k = cfg.n_experts_used;
        let limit = cfg.swiglu_clamp[l];
        rms_norm_rows(&mut xn, &w.ffn_norm, cfg.rms_eps);
        let logits = self.mm(&w.router, &xn);
        let routes: Vec<Route> = logits
            .chunks_exact(cfg.n_experts)
            .zip(tokens)
            .map(|(lt, &tok)| {
                let selection = match (cfg.moe_kind[l], &w.tid2eid) {
                    (MoeKind::Hash, Some(table)) => Selection::Hash {
                        experts: &table[tok as usize * k..(tok as usize + 1) * k],
                    },
                    _ => Selection::TopK {
                        bias: w.router_bias.as_deref(),
                    },
                };
                route(lt, selection, k, cfg.routed_scale, self.numerics)
                    .map_err(|e| ModelError::Unsupported(format!("layer {l}: {e}")))
            })
            .collect::<Result<_, _>>()?;

        // Shared expert over the whole span.
        let mut y = {
            let mut g = self.mm(&w.gate_shexp, &xn);
            let u = self.mm(&w.up_shexp, &xn);
            swiglu_clamped(&mut g, &u, limit);
            self.mm(&w.down_shexp, &g)
        };
        // Routed experts, in ascending expert order: each token's contributions are added in
        // the same order whatever else is in the span.
        let mut by_expert: Vec<Vec<(usize, f32)>> = vec![Vec::new(); cfg.n_experts];
        for (t, r) in routes.iter().enumerate() {
            for (&e, &wt) in r.experts.iter().zip(&r.weights) {
                by_expert[e].push((t, wt));
            }
        }
        let mut routed = vec![0f32; y.len()];
        for (e, users) in by_expert.iter().enumerate() {
            if users.is_empty() {
                continue;
            }
            let xe: Vec<f32> = users
                .iter()
                .flat_map(|&(t, _)| xn[t * d..(t + 1) * d].iter().copied())
                .collect();
            let mut g = self.mm(&w.gate_exps.expert(e), &xe);
            let u = self.mm(&w.up_exps.expert(e), &xe);
            swiglu_clamped(&mut g, &u, limit);
            let ff = cfg.expert_ff;
            let ds4 = self.numerics == Numerics::Ds4;
            if ds4 {
                // ds4 (like the official code) weighs the intermediate before the down
                // projection, whose input is then quantized (C2).
                for (ht, &(_, wt)) in g.chunks_exact_mut(ff).zip(users) {
                    ht.iter_mut().for_each(|v| *v *= wt);
                }
            }
            let down = self.mm(&w.down_exps.expert(e), &g);
            for (dt, &(t, wt)) in down.chunks_exact(d).zip(users) {
                let a = if ds4 { 1.0 } else { wt };
                super::vecops::axpy(&mut routed[t * d..(t + 1) * d], a, dt);
            }
        }
        for (yv, rv) in y.iter_mut().zip(&routed) {
            *yv += rv;
        }
        Ok(y)
    }

    /// The HC head, final norm and LM head for the listed span rows; rows.len() × vocab.
    pub fn head(&self, streams: &[f32], rows: &[usize]) -> Vec<f32> {
        let cfg = &self.cfg;
        let (d, n) = (cfg.hidden, cfg.hc_mult);
        let ow = &self.weights;
        let mut flat: Vec<f32> = rows
            .iter()
            .flat_map(|&t| streams[t * n * d..(t + 1) * n * d].iter().copied())
            .collect();
        let raw = flat.clone();
        for s in flat.chunks_exact_mut(n * d) {
            rms_norm_unweighted(s, cfg.rms_eps);
        }
        let mix = self.mm(&ow.output_hc.fn_, &flat);
        let mut u = vec![0f32; rows.len() * d];
        for ((ut, st), mt) in u
            .chunks_exact_mut(d)
            .zip(raw.chunks_exact(n * d))
            .zip(mix.chunks_exact(n))
        {
            let a = hc::head_weights(mt, &ow.output_hc.base, ow.output_hc.scale[0], cfg.hc_eps);
            hc::combine(&a, st, ut);
            rms_norm(ut, &ow.output_norm, cfg.rms_eps);
        }
        self.mm(&ow.output, &u)
    }
}

/// Appends a compressed row. The capacity (ctx/ratio + 2) always suffices once the span was
/// checked against the context, so the error is a defensive check, not an expected path.
fn push_row(rows: &mut CompressedRows, row: &[f32], layer: usize) -> Result<(), ModelError> {
    if rows.push(row) {
        Ok(())
    } else {
        Err(ModelError::Unsupported(format!(
            "layer {layer}: the compressed-row capacity {} is exhausted",
            rows.capacity()
        )))
    }
}
