//! Hyper-connections around every sublayer (hc.cu): the pre-mix of the streams into the
//! sublayer's input (with its norm, fused), the Sinkhorn projection on a side
//! branch, and the post-mix fused with the next hyper-connection's projection.

use super::*;

/// The most mix rows the split-K projection handles (hc.cu HC_MIX_MAX).
const HC_MIX_MAX: usize = 40;
/// Mix rows per CTA of the split-K projection (hc.cu HC_GROUP_ROWS).
const HC_GROUP_ROWS: usize = 3;
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
/// Tokens (one warp each) per CTA of hc_comb (hc.cu HC_COMB_WARPS).
const HC_COMB_WARPS: usize = 4;
/// Values per thread and most threads per row of the RMS norm kernels (vector_ops.rs SEG,
/// RMS_THREADS): hc_pre_norm takes rows of at most their product, with their CTA shape.
const NORM_SEG: usize = 8;
const NORM_THREADS: usize = 512;

impl CudaModel {
    /// Whether the split-K projection kernels take this hyper-connection (F32/F16 rows, at
    /// most HC_MIX_MAX of them); else it goes through rmsnorm + the generic matvec.
    pub(super) fn hc_split_k(&self, hc: &DevHc) -> bool {
        hc_split_k(&self.cfg, &hc.fn_)
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
    /// here. The sublayer's `norm` is applied here too when hc_pre_norm takes it
    /// (s.pre_normed then says so).
    pub(super) fn hc_pre(
        &self,
        s: &mut Scratch,
        hc: &DevHc,
        n: usize,
        norm: Option<PreNorm>,
    ) -> Result<()> {
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

    /// hc_pre fused with the sublayer's `norm` (and its quantization, as norm_for /
    /// norm_for_both make it), one CTA per token (a decode step's, or a span's): s.x, s.maps'
    /// pre and post, s.xn and the quant slots of xn as the two launches would leave them, bit
    /// for bit. Returns whether it ran (else
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
        let Some(norm) = norm else {
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
    pub(super) fn hc_post(&self, s: &mut Scratch, n: usize, next: Option<&DevHc>) -> Result<()> {
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
}

/// [`CudaModel::hc_split_k`] from the projection's shape and format (the loader asks before
/// the weights are bound).
pub(crate) fn hc_split_k(c: &ModelConfig, fn_: &Mat) -> bool {
    let nc = c.hc_mult;
    matches!(fn_.format, WeightFormat::F32 | WeightFormat::F16)
        && (2 + nc) * nc <= HC_MIX_MAX
        && fn_.rows == (2 + nc) * nc
        && fn_.cols == nc * c.hidden
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::compile::source_define as define;

    /// The launchers size the grids and CTAs of hc.cu's kernels from these constants: a
    /// mismatch would leave mix rows or tokens uncomputed, silently. They must be hc.cu's.
    #[test]
    fn constants_match_the_kernel_source() {
        let src = include_str!("../hc.cu");
        assert_eq!(define(src, "HC_MIX_MAX"), HC_MIX_MAX);
        assert_eq!(define(src, "HC_MIX_THREADS"), HC_MIX_THREADS);
        assert_eq!(define(src, "HC_GROUP_ROWS"), HC_GROUP_ROWS);
        assert_eq!(define(src, "HC_TOKENS"), HC_TOKENS);
        assert_eq!(define(src, "HC_SPAN_N"), HC_SPAN_N);
        assert_eq!(define(src, "HC_SPAN_MAX_TOKENS"), HC_SPAN_MAX_TOKENS);
        assert_eq!(define(src, "HC_COMB_WARPS"), HC_COMB_WARPS);
    }
}
