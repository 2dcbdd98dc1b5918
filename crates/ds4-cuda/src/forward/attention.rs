//! The attention sublayer (attention.cu, compressor.cu): query and K=V projections, RoPE and
//! per-head norms, the compressors and the indexer's row selection on side branches, attention
//! over window + compressed rows, and the grouped output projection.

use super::*;

/// Threads per CTA of the indexer's selection (compressor.cu SELECT_THREADS), a bound on its
/// static shared memory (histogram, warp counts), and the most keys it holds in shared memory:
/// what fits the launch default of 48 KiB with the static part (11 264 keys; a 64K context's
/// 16K rows read the rest again per pass). Opting into more failed the launch on an H200
/// (CUDA_ERROR_INVALID_VALUE at 64K context; cause not found).
const SELECT_THREADS: u32 = 1024;
const SELECT_STATIC_SHARED: usize = 4096;
const SELECT_CACHE_ROWS: usize = (MAX_SHARED - SELECT_STATIC_SHARED) / 4;
/// Key rows per tile and tiles per CTA of the indexer's scoring (compressor.cu
/// INDEX_TILE_ROWS, INDEX_TILES).
const INDEX_TILE_ROWS: usize = 16;
const INDEX_TILES: usize = 8;
/// Largest dynamic shared memory used without opting in.
const MAX_SHARED: usize = 48 * 1024;
/// Rows per CTA and most values per row / 32 of head_norm_rope_rows (attention.cu).
const HNR_WARPS: usize = 8;
const HNR_MAX_J: usize = 32;
/// Rows per CTA and most values per row / 32 of index_round_rows (attention.cu).
const IDXR_WARPS: usize = 8;
const IDXR_MAX_J: usize = 8;
/// One-warp CTAs that prefetch o_a into L2 during a decode step's attention. Decode 2K-6K on
/// an H100 against no prefetch: 8 +1.2 % to +3.0 % (three calls); 4, 6 and 12 within the
/// spread of 8; 32 −0.6 % and 128 −1.6 % (they take HBM from the attention kernels beside
/// them). docs/speed-log.md, session 15.
const O_A_PREFETCH_CTAS: usize = 8;
/// The first bytes of o_b prefetched after o_a's, by as many CTAs (the whole 35.6 MB o_b
/// beside o_a does not fit the 50 MB L2: −2.3 % in session 15). Decode 2K-6K on an H100,
/// medians of 3 rounds in one call: against o_a's prefetch alone, 8 MB +1.0 %, 16 MB +1.0 %,
/// 24 MB +0.9 % (session 16); since the matvecs' weight streams are evict-first in L2, 8 MB
/// is +0.8 % over 16 MB, 24 MB −0.8 %, 32 MB −3.5 % (session 17; docs/speed-log.md).
const O_B_PREFETCH_BYTES: usize = 8 << 20;

impl CudaModel {
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
    /// position), x → y, in one launch. y may be x: both kernels read a row whole (into
    /// shared memory or registers) before they write it.
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
        ring: Option<&GpuLayerState>,
    ) -> Result<()> {
        let c = &self.cfg;
        let hd = c.head_dim;
        // A span's query heads (no KV rounding) go one per warp: head_norm_rope_rows, same
        // bits, far faster for many rows; a decode step's 64 measured ~0.6 us slower per layer
        // with it (GPU step +27 us), so few rows keep a CTA each.
        if nope.is_none()
            && ring.is_none()
            && rows >= 4096
            && hd.is_multiple_of(32)
            && hd <= 32 * HNR_MAX_J
            && (hd - c.rope_dim).is_multiple_of(2)
        {
            let a = kargs![
                x.ptr(),
                w.map_or(0, |w| w.ptr()),
                y.ptr(),
                rows,
                hd,
                c.rms_eps as f64,
                rows_per_tok,
                pos,
                self.rope_for(l).ptr(),
                c.rope_dim
            ];
            let cfg = cudarc::driver::LaunchConfig {
                grid_dim: (rows.div_ceil(HNR_WARPS) as u32, 1, 1),
                block_dim: ((HNR_WARPS * 32) as u32, 1, 1),
                shared_mem_bytes: 0,
            };
            // SAFETY: head_norm_rope_rows reads `rows` vectors of hd values of x (and hd
            // weights), rope_dim/2 frequencies and the span position, and writes `rows` vectors
            // of y (the caller's scratch holds them); hd <= 32 HNR_MAX_J, the kernel's register
            // row and rotation table.
            return unsafe {
                self.fk.launch(
                    &self.gpu.device,
                    "fwd_attention",
                    "head_norm_rope_rows",
                    cfg,
                    &a,
                )
            };
        }
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
            nope.map_or(-1, |n| n as i64),
            ring.map_or(0, |st| st.ring.ptr()),
            ring.map_or(1, |st| st.ring_cap)
        ];
        // SAFETY: head_norm_rope reads `rows` vectors of hd values of x (and hd weights),
        // r/2 frequencies and the span position, and writes `rows` vectors of y; x and y hold
        // the chunk's rows (the caller's scratch). With a ring, each row also goes to one of its
        // ring_cap slots of hd values (slot = position % ring_cap). Dynamic shared: hd floats.
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

    /// Whether a span of at least GEMM_MIN_VECS tokens runs layer `w`'s grouped output
    /// projection straight on the token-major layout (expert_gemm_q8_0_interleaved), without
    /// the group permutations and their buffers (Scratch's og and zg).
    pub(super) fn o_a_token_major(&self, w: &crate::model::DevLayer) -> bool {
        o_a_token_major(&self.cfg, self.numerics, &w.o_a_groups)
    }

    /// The attention sublayer: s.x (n × d) → s.y (n × d).
    pub(super) fn attention(
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

        // Branches: the shared K=V row (rounded as stored), and the attention compressor on a
        // stream of its own (both read only xn: in parallel, attend waits for the longer one,
        // not their sum). They read xn (and its quantized form) and write kv, kvn (and the
        // ring slot) / ckv, cg and the compressor state.
        self.branch(LANE_KV, || {
            let own = &mut s.lane_quant[LANE_KV];
            let kv_q = xq && act_quant_of(self, &w.kv) == act_quant_of(self, &w.q_a);
            mm_branch(self, &s.quant, own, kv_q, &w.kv, &s.xn, n, &mut s.kv)?;
            let nope = ds4.then(|| hd - c.rope_dim);
            // A single token's row goes into the ring as it is made (no ring_store launch on
            // this branch, which attend joins): its slot (pos % cap) holds position pos − cap,
            // outside the window (≤ cap), and attend reads the token's own row from kvn.
            let ring = (n == 1).then_some(&*state);
            self.head_norm_rope(
                l,
                &s.kv,
                Some(&w.kv_norm),
                &s.kvn,
                n,
                1,
                s.pos.ptr(),
                nope,
                ring,
            )
        })?;
        if let (Some(cw), Some(cs)) = (&w.compressor, state.attn.as_mut()) {
            self.branch(LANE_COMPRESSOR, || {
                let own = &mut s.lane_quant[LANE_COMPRESSOR];
                let pre = xq && act_quant_of(self, &cw.kv) == act_quant_of(self, &w.q_a);
                let (kv, gate) = (&cw.kv, &cw.gate);
                let outs = [&mut s.ckv, &mut s.cg];
                mm_pair_branch(self, &s.quant, own, pre, [kv, gate], &s.xn, n, outs)?;
                let qat = if ds4 { 1 } else { 0 };
                self.compress(l, cw, cs, &s.ckv, &s.cg, n, pos0, s.pos.ptr(), qat)
            })?;
        }

        // Branches: the indexer selects the compressed rows of CSA layers. Its keys (its
        // compressor) and head weights read xn: issued now on one side stream, beside the
        // query projection; its queries read qrn: a second side stream takes them once qrn is
        // made, and its scores and top-k after the first stream's work. They write ikv, ig,
        // iw (first stream), iq, iscores, sel (second) and the indexer state.
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
                let (kv, gate) = (&icw.kv, &icw.gate);
                let outs = [&mut s.ikv, &mut s.ig];
                mm_pair_branch(self, &s.quant, own, pre, [kv, gate], &s.xn, n, outs)?;
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
            self.branch(LANE_INDEX_QUERY, || {
                let (ni, di) = (c.index_heads, c.index_head_dim);
                let own = &mut s.lane_quant[LANE_INDEX_QUERY];
                let pre = qrq && act_quant_of(self, &iw.q_b) == act_quant_of(self, &w.q_b);
                mm_branch(self, &s.quant, own, pre, &iw.q_b, &s.qrn, n, &mut s.iq)?;
                let rows = n * ni;
                if ds4
                    && rows >= 4096
                    && di.is_power_of_two()
                    && (32..=32 * IDXR_MAX_J).contains(&di)
                    && c.rope_dim <= di
                    && (di - c.rope_dim).is_multiple_of(2)
                {
                    // A span's query heads one per warp (index_round_rows: same bits).
                    let a = kargs![
                        s.iq.ptr(),
                        rows,
                        di,
                        false,
                        ni,
                        s.pos.ptr(),
                        self.rope_for(l).ptr(),
                        c.rope_dim
                    ];
                    let cfg = cudarc::driver::LaunchConfig {
                        grid_dim: (rows.div_ceil(IDXR_WARPS) as u32, 1, 1),
                        block_dim: ((IDXR_WARPS * 32) as u32, 1, 1),
                        shared_mem_bytes: 0,
                    };
                    // SAFETY: index_round_rows ropes and rounds `rows` vectors of di values of
                    // s.iq in place (di <= 32 IDXR_MAX_J, its register row and rotation
                    // table), reading r/2 frequencies and the span position.
                    unsafe {
                        self.fk
                            .launch(dev, "fwd_attention", "index_round_rows", cfg, &a)?
                    };
                } else if ds4 {
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
                // The scores read the keys' compressed rows and the head weights.
                dev.lane_waits_for(LANE_INDEX_QUERY, LANE_INDEXER)?;
                self.index_select(s, is, ratio, n, pos0)
            })?;
        }

        if w.indexer.is_some() {
            // Not a dependent launch: q_b's CTAs, launched early, would fill every
            // multiprocessor and wait there, and the indexer's kernels (the longer path to the
            // attention in these layers) would start only once q_b drains. Launched when the
            // norm is done, they share the GPU with the indexer's (GPU step 7 890 → 7 719 µs
            // at 2K, H100, with the indexer lanes' priority; docs/speed-log.md, session 8).
            dev.plain_next_launch();
        }
        mm_prequantized(self, &mut s.quant, qrq, &w.q_b, &s.qrn, n, &mut s.q)?;
        // In place: each row is read whole before it is written.
        self.head_norm_rope(l, &s.q, None, &s.q, n * h, h, s.pos.ptr(), None, None)?;
        dev.join(LANE_KV)?;
        dev.join(LANE_COMPRESSOR)?;
        dev.join(LANE_INDEX_QUERY)?;
        dev.join(LANE_INDEXER)?;
        s.prof.mark(self, "attn.qkv")?;
        if n == 1 {
            // o_a's weights into L2 while the attention kernels run: they are latency-bound and
            // leave HBM nearly idle, and o_a, next on the critical path, then reads L2; then
            // the start of o_b, which follows o_a, and the projection rows of the
            // hyper-connection after the attention. On LANE_KV, which the FFN's shared-expert
            // branch joins. (The router's 2 MB as well: -1.0 %, session 16.)
            let o_a = self.matrix(&w.o_a_groups)?;
            let o_b = self.matrix(&w.o_b)?;
            let hc_fn = self.matrix(&w.hc_ffn.fn_)?;
            self.branch(LANE_KV, || {
                self.gpu.prefetch_l2(&o_a, O_A_PREFETCH_CTAS)?;
                self.gpu
                    .prefetch_l2_prefix(&o_b, O_B_PREFETCH_BYTES, O_A_PREFETCH_CTAS)?;
                self.gpu
                    .prefetch_l2(&hc_fn, super::ffn::HC_FN_PREFETCH_CTAS)
            })?;
        }

        // Attention over window + compressed rows, with sinks; inverse RoPE on the outputs.
        let window = c.sliding_window.min(state.ring_cap);
        let (kind, comp_ptr, max_comp) = match (c.attn_kind[l], state.attn.as_ref()) {
            (AttnKind::Hca, Some(cs)) => (1i64, cs.rows.ptr(), cs.capacity),
            (AttnKind::Csa, Some(cs)) => (2i64, cs.rows.ptr(), c.index_topk),
            _ => (0i64, 0u64, 0usize),
        };
        let args = crate::attend::AttendArgs {
            q: s.q.ptr(),
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
            // Group i of s.o through matrix i of the stack: no ids to read, so its weight copies
            // start before attend ends.
            mm_stacked(
                self,
                &mut s.quant,
                &w.o_a_groups,
                &s.o,
                1,
                o_quantized.is_some(),
                &mut s.z,
            )?;
        } else if n >= GEMM_MIN_VECS && self.o_a_token_major(w) {
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
                None,
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
        let mma_keys = is
            .rows_bf16
            .as_ref()
            .filter(|_| ni <= IDXM_HEADS && di <= IDXM_DIM && di % 8 == 0);
        if let Some(keys) = mma_keys {
            // ds4 numerics: queries and keys are FP4-shaped, exact in bf16, so the tensor-core
            // kernel gives the f32 kernel's scores (compressor.cu); the keys come from the
            // compressor's bf16 copy.
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
                keys.ptr(),
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
            // and ni weights, and of the bf16 keys only the (pos+1)/ratio ≤ max_index_rows
            // rows written so far (di % 8 == 0: 16-byte copies), and writes one score per visible
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
            cs.rows_bf16.as_ref().map_or(0, |b| b.ptr()),
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
}

/// [`CudaModel::o_a_token_major`] from the grouped output projection's shape and format (the
/// loader asks before the weights are bound).
pub(crate) fn o_a_token_major(c: &ModelConfig, numerics: Numerics, o_a_groups: &Mat) -> bool {
    act_quant(numerics, o_a_groups) == Some(ActQuant::Q8_0)
        && o_a_groups.cols == c.n_heads * c.head_dim / c.o_groups
}

#[cfg(test)]
mod tests {
    use super::{HNR_WARPS, IDXR_WARPS};
    use crate::fwd_kernels::test_support::{gpu, xorshift};
    use crate::fwd_kernels::{kargs, per_item};
    use cudarc::driver::LaunchConfig;

    fn warp_rows(rows: usize, warps: usize) -> LaunchConfig {
        LaunchConfig {
            grid_dim: (rows.div_ceil(warps) as u32, 1, 1),
            block_dim: ((warps * 32) as u32, 1, 1),
            shared_mem_bytes: 0,
        }
    }

    /// The warp-per-row span kernels against the CTA-per-row ones bit for bit, on the model's
    /// shapes (query heads of 512 with a 64-channel RoPE tail, with and without a norm weight;
    /// indexer heads of 128) at positions far into the context, over values from tiny to large
    /// (the FP4 blocks' scales and the norm's sums of squares span many binades).
    #[test]
    fn row_kernels_equal_the_cta_kernels() {
        let Some((dev, fk)) = gpu() else { return };
        let mut next = xorshift(0x2545_f491_4f6c_dd1d);
        let mut values = |n: usize| -> Vec<f32> {
            (0..n)
                .map(|_| {
                    let r = next();
                    let mag = 2f32.powi((r % 24) as i32 - 12);
                    let unit = ((r >> 8) % 2001) as f32 / 1000.0 - 1.0;
                    unit * mag
                })
                .collect()
        };
        let r = 64usize;
        // The kernels read f64 frequencies (uploaded as their bits, as model.rs does).
        let inv_freq: Vec<u64> = (0..r / 2)
            .map(|i| (1.0 / 10000f64.powf(2.0 * i as f64 / r as f64)).to_bits())
            .collect();
        let dfreq = dev.upload(&inv_freq).unwrap();
        let dpos = dev.upload(&[123_456i64]).unwrap();
        let bits = |v: Vec<f32>| v.into_iter().map(f32::to_bits).collect::<Vec<_>>();

        // Queries: 70 tokens x 64 heads of 512 (rows not a multiple of the CTA's 8 + 8 more).
        let (width, per_tok) = (512usize, 64usize);
        let rows = 70 * per_tok + 5;
        let xv = values(rows * width);
        let x = dev.upload(&xv).unwrap();
        let w = dev.upload(&values(width)).unwrap();
        for weight in [None, Some(&w)] {
            let mut outs = Vec::new();
            // Each kernel out of place and in place (y = x: the decode and prefill query heads).
            for (rows_kernel, in_place) in
                [(false, false), (true, false), (false, true), (true, true)]
            {
                let y = if in_place {
                    dev.upload(&xv).unwrap()
                } else {
                    dev.alloc_filled::<f32>(rows * width, 0xFF).unwrap()
                };
                let x = if in_place { &y } else { &x };
                let wp = weight.map_or(0, |w| w.ptr());
                // SAFETY: both kernels read `rows` vectors of `width` values of x, `width`
                // weights, r/2 frequencies and one position, and write `rows` vectors of y
                // (which may be x: each reads a row whole before writing it).
                unsafe {
                    if rows_kernel {
                        let a = kargs![
                            x.ptr(),
                            wp,
                            y.ptr(),
                            rows,
                            width,
                            1e-6f64,
                            per_tok,
                            dpos.ptr(),
                            dfreq.ptr(),
                            r
                        ];
                        let cfg = warp_rows(rows, HNR_WARPS);
                        fk.launch(&dev, "fwd_attention", "head_norm_rope_rows", cfg, &a)
                    } else {
                        let a = kargs![
                            x.ptr(),
                            wp,
                            y.ptr(),
                            width,
                            1e-6f64,
                            per_tok,
                            dpos.ptr(),
                            dfreq.ptr(),
                            r,
                            -1i64,
                            0u64,
                            1i64
                        ];
                        let cfg = per_item(rows, 128, width * 4);
                        fk.launch(&dev, "fwd_attention", "head_norm_rope", cfg, &a)
                    }
                    .unwrap()
                };
                outs.push(bits(dev.download(&y).unwrap()));
            }
            assert!(
                outs[0] == outs[1],
                "head_norm_rope_rows (weight {})",
                weight.is_some()
            );
            assert!(
                outs[2] == outs[0] && outs[3] == outs[0],
                "in place (weight {})",
                weight.is_some()
            );
        }

        // Indexer queries: 70 tokens x 64 heads of 128, rounded in place.
        let width = 128usize;
        let rows = 70 * per_tok + 3;
        let input = values(rows * width);
        let mut outs = Vec::new();
        for rows_kernel in [false, true] {
            let x = dev.upload(&input).unwrap();
            // SAFETY: both kernels rope and round `rows` vectors of `width` values of x in
            // place, reading r/2 frequencies and one position.
            unsafe {
                if rows_kernel {
                    let a = kargs![
                        x.ptr(),
                        rows,
                        width,
                        false,
                        per_tok,
                        dpos.ptr(),
                        dfreq.ptr(),
                        r
                    ];
                    let cfg = warp_rows(rows, IDXR_WARPS);
                    fk.launch(&dev, "fwd_attention", "index_round_rows", cfg, &a)
                } else {
                    let a = kargs![x.ptr(), width, false, per_tok, dpos.ptr(), dfreq.ptr(), r];
                    let cfg = per_item(rows, 256, width * 4);
                    fk.launch(&dev, "fwd_attention", "index_round", cfg, &a)
                }
                .unwrap()
            };
            outs.push(bits(dev.download(&x).unwrap()));
        }
        assert!(outs[0] == outs[1], "index_round_rows");
    }
}
