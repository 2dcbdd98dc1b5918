//! The MoE feed-forward sublayer (moe.cu): the shared expert on a side branch, routing, the
//! routed experts (sorted and grouped by expert for spans) and their combination.

use super::*;

/// Tokens from which a span's routed experts run grouped (about 6 × 256 / 256 slots per
/// expert at 256 tokens; below ~16 most experts have none and per-slot launches do as well).
const GROUPED_MIN_TOKENS: usize = 16;

/// Spans of at least this many tokens copy the down stacks that live in host memory into the
/// staging buffer (ExpertStaging): 128 tokens route to ~243 of 256 experts, so the GEMM would
/// read nearly the whole stack over PCIe anyway, in small pieces.
const STAGE_MIN_TOKENS: usize = 128;
/// CTAs of stage_copy. The copy is PCIe-bound, and each CTA keeps an SM slot from the span's
/// GEMMs for the whole copy: on an 80 GB H100 with the full q2 file (6 staged stacks), a CTA
/// per SM made every layer beside a copy ~2.5× slower (2K prefill 4 392 t/s); 4-16 CTAs copy
/// as fast (~15.7 ms a stack) and the layers barely notice (~5 000-5 100 t/s; docs/speed-log.md,
/// session 21).
const STAGE_COPY_CTAS: u32 = 8;

/// Most experts route_warp takes: 32 lanes × ROUTE_WARP_KEYS (moe.cu).
const ROUTE_WARP_EXPERTS: usize = 32 * 8;

/// CTAs per multiprocessor the shared expert's gate and up matvec of a decode step may take.
/// It runs on a side branch beside the router, and uncapped (2 048 CTAs, ~1.5 waves) it held
/// every multiprocessor while the routed experts' matvec waited ~5 µs after the router to
/// start; capped, that matvec starts before the router ends and the branch still finishes
/// first. H100, one call: decode 2K-6K 131.4 → 133.5 t/s (9 points, 3 rounds; cap 3, 8 and
/// 4 with the down projection capped too within the spread of 4), same bits.
const SHARED_EXPERT_CTAS_PER_SM: usize = 4;

/// One-warp CTAs that prefetch a hyper-connection's projection rows (786 KB in the Flash
/// shape) into L2 before the hc_post_mix that reads them: with this layer's (attention.rs) and
/// the next layer's, decode 2K-6K +0.5 % on an H100 (141.2 -> 142.0 t/s, medians of 3 rounds
/// in one call; docs/speed-log.md, session 16).
pub(super) const HC_FN_PREFETCH_CTAS: usize = 2;

impl CudaModel {
    /// s.y = the MoE output of the chunk (moe_combine).
    pub(super) fn moe_combine(&self, s: &Scratch, n: usize, p: MoePending) -> Result<()> {
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

    /// Starts copying the down stack of the first staged layer after `after` (all of them:
    /// None) into the staging buffer on LANE_STAGE, behind the work issued so far (the
    /// previous staged layer's GEMM, the staging buffer's last reader); that layer's down
    /// GEMM joins the lane. Spans of STAGE_MIN_TOKENS or more, outside graph captures.
    pub(super) fn stage_down_after(
        &self,
        s: &mut Scratch,
        n: usize,
        after: Option<usize>,
    ) -> Result<()> {
        let Some(staging) = &self.staging else {
            return Ok(());
        };
        if n < STAGE_MIN_TOKENS || s.capturing {
            return Ok(());
        }
        let next = staging
            .layers
            .iter()
            .copied()
            .find(|&l| after.is_none_or(|a| l > a));
        if let Some(l) = next {
            let m = &self.layers[l].down_exps;
            let src = self.matrix(m)?;
            let bytes = src.row_bytes * src.rows * src.experts;
            if bytes > staging.buf.bytes() || !bytes.is_multiple_of(16) || src.ptr % 16 != 0 {
                return Err(CudaError::InvalidArgument(format!(
                    "layer {l}'s down stack ({bytes} bytes at {:#x}) cannot be staged into {} bytes",
                    src.ptr,
                    staging.buf.bytes()
                )));
            }
            let dev = &self.gpu.device;
            let a = kargs![staging.buf.ptr(), src.ptr, (bytes / 16) as i64];
            let grid = cudarc::driver::LaunchConfig {
                grid_dim: (STAGE_COPY_CTAS, 1, 1),
                block_dim: (256, 1, 1),
                shared_mem_bytes: 0,
            };
            dev.fork(LANE_STAGE)?;
            // SAFETY: stage_copy reads `bytes` bytes at src.ptr (the stack, inside the weight
            // region) and writes as many into the staging buffer (checked above); the buffer's
            // readers join LANE_STAGE first.
            let launched = unsafe { self.fk.launch(dev, "fwd_moe", "stage_copy", grid, &a) };
            dev.to_main();
            launched?;
            s.staged = Some(l);
        }
        Ok(())
    }

    /// Whether a span's routed-expert slots of layer `w` gather the tokens' quantized rows
    /// (gather_slots_q): gate and up take the same quantized activations. Otherwise they
    /// gather f32 rows into Scratch's xe.
    pub(super) fn gathers_quantized(&self, w: &crate::model::DevLayer) -> bool {
        gathers_quantized(&self.cfg, self.numerics, &w.gate_exps, &w.up_exps)
    }

    /// The MoE sublayer: s.x → s.y.
    pub(super) fn ffn(&self, l: usize, s: &mut Scratch, n: usize) -> Result<()> {
        let c = &self.cfg;
        let w = &self.layers[l];
        let ds4 = self.numerics == Numerics::Ds4;
        let (d, k, ff) = (c.hidden, c.n_experts_used, c.expert_ff);
        let limit = Some(c.swiglu_clamp[l]);
        let dev = &self.gpu.device;
        // The normalized input, quantized once for the shared expert's gate and up, and for
        // the routed experts (a single token's read it directly, a span's slots gather its
        // rows); hc_pre may have made them.
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
                        Some(SHARED_EXPERT_CTAS_PER_SM),
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
        // One warp per token while its lanes hold every expert in registers (route_warp, the
        // same outputs), else one CTA of 256 threads per token (moe.cu ROUTE_THREADS).
        let (name, threads) = if c.n_experts <= ROUTE_WARP_EXPERTS {
            ("route_warp", 32)
        } else {
            ("route", 256)
        };
        // SAFETY: route / route_warp read n × E logits (rewritten in place as scores), E
        // biases, the chunk's token ids and their k-wide tid2eid rows (ids < vocab, checked at
        // eval), and write n × k ids and weights (k <= 16, checked at load).
        unsafe {
            self.fk
                .launch(dev, "fwd_moe", name, per_item(n, threads, 0), &a)?
        };

        s.prof.mark(self, "ffn.route")?;
        if let Some(next) = self.layers.get(l + 1).filter(|_| n == 1) {
            // The next layer's first hyper-connection projection rows into L2 while the routed
            // experts run: hc_post_mix, after them, then reads its split-K slices from L2. On
            // LANE_COMPRESSOR, idle in the FFN; the next layer's attention joins it.
            let hc_fn = self.matrix(&next.hc_attn.fn_)?;
            self.branch(LANE_COMPRESSOR, || {
                self.gpu.prefetch_l2(&hc_fn, HC_FN_PREFETCH_CTAS)
            })?;
        }
        // Routed experts: one slot per (token, choice), ids on the device. A span of several
        // tokens sorts its slots by expert first, so that slots of one expert are neighbours in
        // the matvec grid and share its rows through L2 (same arithmetic per slot either way).
        let slots = n * k;
        let sorted = n > 1;
        // Gate and up read the same vectors: quantized once when their formats agree.
        let gate_kind = act_quant_of(self, &w.gate_exps);
        let up_q = gate_kind.is_some() && gate_kind == act_quant_of(self, &w.up_exps);
        // Whether the sorted slots' quantized inputs were gathered already.
        let mut gathered_q = false;
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
            let one_per_slot = per_item(slots, 256, 0);
            match gate_kind.filter(|_| self.gathers_quantized(w)) {
                Some(kind) => {
                    // The tokens' quantized rows, gathered per slot (the quantized form of
                    // s.xe, made without s.xe: same bits, a quarter of the bytes).
                    let (xq, xd) = {
                        let qa = if experts_q {
                            s.quant.get(kind, d, n, s.xn.ptr())?
                        } else {
                            quantized(self, &mut s.quant, &w.gate_exps, &s.xn, n)?
                                .ok_or_else(|| CudaError::InvalidArgument("expert inputs".into()))?
                        };
                        (qa.q.ptr(), qa.d.ptr())
                    };
                    let qe = quant_slot(self, &mut s.quant, kind, d, slots, s.xe.ptr())?;
                    let a = kargs![
                        xq,
                        xd,
                        s.slot_order.ptr(),
                        s.ids.ptr(),
                        s.wts.ptr(),
                        qe.q.ptr(),
                        qe.d.ptr(),
                        s.sorted_ids.ptr(),
                        s.sorted_wts.ptr(),
                        slots,
                        k,
                        d,
                        d / kind.block_elems()
                    ];
                    // SAFETY: gather_slots_q reads the permutation, the n quantized rows (d
                    // int8, 16-byte aligned: d % 16 == 0 in a fresh allocation) and their
                    // scales, n·k ids/weights, and writes n·k quantized rows and scales of the
                    // slot's buffers (quant_slot sized them) and n·k sorted ids/weights.
                    unsafe {
                        self.fk
                            .launch(dev, "fwd_moe", "gather_slots_q", one_per_slot, &a)?
                    };
                    gathered_q = true;
                }
                None => {
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
                    // SAFETY: gather_slots reads the permutation, n × d inputs and n·k
                    // ids/weights, and writes n·k × d values of s.xe and n·k sorted ids/weights.
                    unsafe {
                        self.fk
                            .launch(dev, "fwd_moe", "gather_slots", one_per_slot, &a)?
                    };
                }
            }
        }
        let (slot_ids, slot_wts) = if sorted {
            (&s.sorted_ids, &s.sorted_wts)
        } else {
            (&s.ids, &s.wts)
        };
        let (x_in, per_slot) = if sorted {
            (&s.xe, true)
        } else {
            (&s.xn, false)
        };
        // Spans long enough to give experts several slots each run grouped.
        let groups = (sorted && n >= GROUPED_MIN_TOKENS).then_some(&s.group_start);
        // The sorted slots read s.xe, whose quantized form exists only when gathered; xn's
        // (experts_q) serves the unsorted single token.
        let input = SlotInput {
            per_slot,
            prequantized: if sorted { gathered_q } else { experts_q },
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
                None,
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
                None,
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
        let down_input = SlotInput {
            per_slot: true,
            prequantized: ehq,
            groups,
        };
        // A down stack in host memory is read from its staged copy (stage_down_after).
        let staged = match (&self.staging, s.staged.take_if(|sl| *sl == l)) {
            (Some(staging), Some(_)) => {
                dev.join(LANE_STAGE)?;
                Some(staging)
            }
            _ => None,
        };
        mm_experts(
            self,
            &mut s.quant,
            &w.down_exps,
            staged.map(|st| &st.buf),
            slot_ids,
            slots,
            &s.eh,
            1,
            down_input,
            &mut s.edown,
        )?;
        if let Some(staging) = staged {
            staging
                .reads
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            self.stage_down_after(s, n, Some(l))?;
        }
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
}

/// [`CudaModel::gathers_quantized`] from the expert stacks' formats (the loader asks before
/// the weights are bound).
pub(crate) fn gathers_quantized(c: &ModelConfig, numerics: Numerics, gate: &Mat, up: &Mat) -> bool {
    let kind = act_quant(numerics, gate);
    kind.is_some() && kind == act_quant(numerics, up) && c.hidden.is_multiple_of(16)
}

#[cfg(test)]
mod tests {
    use crate::fwd_kernels::test_support::{gpu, xorshift};
    use crate::fwd_kernels::{kargs, per_item};

    /// stage_copy moves exactly its n16 16-byte words, whatever their count against the grid's
    /// 8-deep steps (none, only the tail, whole steps and a tail), and nothing past them.
    #[test]
    fn stage_copy_copies_every_word_and_no_more() {
        let Some((dev, fk)) = gpu() else { return };
        let mut next = xorshift(0x51a6_e0c0_9f3d_2b17);
        for ctas in [super::STAGE_COPY_CTAS, 3] {
            let stride = ctas as usize * 256;
            for n16 in [
                0,
                1,
                stride - 1,
                8 * stride,
                8 * stride + 5,
                3 * 8 * stride + 777,
            ] {
                let guard = 64; // words past the end that must keep their bytes
                let src: Vec<u32> = (0..4 * n16).map(|_| next() as u32).collect();
                let dsrc = dev.upload(&src).unwrap();
                let dst = dev.alloc_filled::<u32>(4 * (n16 + guard), 0xAB).unwrap();
                let a = kargs![dst.ptr(), dsrc.ptr(), n16 as i64];
                let grid = cudarc::driver::LaunchConfig {
                    grid_dim: (ctas, 1, 1),
                    block_dim: (256, 1, 1),
                    shared_mem_bytes: 0,
                };
                // SAFETY: stage_copy reads n16 16-byte words of dsrc (4·n16 u32) and writes as
                // many into dst (4·(n16 + guard) u32).
                unsafe { fk.launch(&dev, "fwd_moe", "stage_copy", grid, &a).unwrap() };
                let got = dev.download(&dst).unwrap();
                assert!(
                    got[..4 * n16] == src[..],
                    "{ctas} CTAs, {n16} words: copy differs"
                );
                assert!(
                    got[4 * n16..].iter().all(|&w| w == 0xABAB_ABAB),
                    "{ctas} CTAs, {n16} words: wrote past the end"
                );
            }
        }
    }

    /// route_warp against route (the CTA kernel) bit for bit: ids, weights and the scores left
    /// in place, with many ties (few distinct logits), NaN logits, with and without bias and
    /// tid2eid rows, for expert counts up to ROUTE_WARP_EXPERTS and k up to 16.
    #[test]
    fn route_warp_equals_route() {
        let Some((dev, fk)) = gpu() else { return };
        let mut next = xorshift(0x9e37_79b9_7f4a_7c15);
        let mut cases = 0;
        for (e_count, k) in [
            (7usize, 6usize),
            (33, 16),
            (200, 6),
            (256, 6),
            (256, 8),
            (256, 16),
        ] {
            for (with_bias, hashed, ds4) in [
                (false, false, true),
                (true, false, true),
                (true, false, false),
                (false, true, true),
            ] {
                let n_tok = 9;
                let vocab = 5;
                // Few distinct logits (ties), NaN now and then, both far tails of softplus.
                let logits: Vec<f32> = (0..n_tok * e_count)
                    .map(|_| match next() % 23 {
                        0 => f32::NAN,
                        1 => 25.0,
                        2 => -30.0,
                        r => (r % 9) as f32 * 0.75 - 3.0,
                    })
                    .collect();
                let bias: Vec<f32> = (0..e_count)
                    .map(|_| (next() % 4) as f32 * 0.25 - 0.5)
                    .collect();
                let tokens: Vec<i32> = (0..n_tok).map(|_| (next() % vocab as u64) as i32).collect();
                let tid2eid: Vec<i32> = (0..vocab * k)
                    .map(|_| (next() % e_count as u64) as i32)
                    .collect();
                let db = dev.upload(&bias).unwrap();
                let dtok = dev.upload(&tokens).unwrap();
                let dt2e = dev.upload(&tid2eid).unwrap();
                let mut outs = Vec::new();
                for (name, threads) in [("route", 256u32), ("route_warp", 32)] {
                    let dl = dev.upload(&logits).unwrap();
                    let ids = dev.alloc_filled::<i32>(n_tok * k, 0xFF).unwrap();
                    let wts = dev.alloc_filled::<f32>(n_tok * k, 0xFF).unwrap();
                    let a = kargs![
                        dl.ptr(),
                        if with_bias { db.ptr() } else { 0 },
                        if hashed { dt2e.ptr() } else { 0 },
                        dtok.ptr(),
                        ids.ptr(),
                        wts.ptr(),
                        n_tok,
                        e_count,
                        k,
                        1.5f64,
                        ds4
                    ];
                    // SAFETY: both kernels read n_tok × E logits (rewritten as scores), E
                    // biases, n_tok tokens (< vocab) and their k-wide tid2eid rows (ids < E),
                    // and write n_tok × k ids and weights: the buffers above.
                    unsafe {
                        fk.launch(&dev, "fwd_moe", name, per_item(n_tok, threads, 0), &a)
                            .unwrap()
                    };
                    let bits = |v: Vec<f32>| v.into_iter().map(f32::to_bits).collect::<Vec<_>>();
                    outs.push((
                        dev.download(&ids).unwrap(),
                        bits(dev.download(&wts).unwrap()),
                        bits(dev.download(&dl).unwrap()),
                    ));
                }
                let what = format!("E {e_count} k {k} bias {with_bias} hashed {hashed} ds4 {ds4}");
                assert_eq!(outs[0].0, outs[1].0, "ids: {what}");
                assert_eq!(outs[0].1, outs[1].1, "weights: {what}");
                assert_eq!(outs[0].2, outs[1].2, "scores: {what}");
                cases += 1;
            }
        }
        assert_eq!(cases, 24);
    }
}
