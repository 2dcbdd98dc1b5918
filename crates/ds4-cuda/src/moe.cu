// Mixture-of-experts routing and combination (cpu/moe.rs, cpu/forward.rs ffn; dsv4-arch.md
// §3.10). The expert matvecs themselves are gemv.rs's expert_gemv with device-side ids.

#define ROUTE_MAX_K 16
#define ROUTE_THREADS 256
// Experts per thread whose selection keys stay in registers across the k picks (E <= 1024);
// any further ones are re-read every pick.
#define ROUTE_CACHED 4

// An expert's score from its router logit: sqrt(softplus(x)), softplus with the CPU's cut-offs
// (cpu/vecops.rs).
__device__ __forceinline__ float route_score(float x) {
    return sqrtf(x > 20.0f ? x : (x < -20.0f ? expf(x) : log1pf(expf(x))));
}

// One CTA of ROUTE_THREADS per token. logits (n_tok x E) are turned into scores
// sqrt(softplus) in place; ids/wts (n_tok x k) receive the experts (top-k of score + bias,
// lowest index on ties, NaN lowest, or the token's tid2eid row) and their weights:
// score / (sum, floored at 2^-14 in ds4 numerics, + 1e-20 in reference numerics) * routed_scale.
// Each of the k picks is a CTA-wide arg-max in the total order (key descending, index
// ascending): each thread's best live candidate, warp shuffles, then every thread reduces the
// warps' bests itself (one barrier per pick) and the owner retires the winner.
extern "C" __global__ void __launch_bounds__(ROUTE_THREADS)
    route(u64 logits_, u64 bias_, u64 tid2eid_, u64 tokens_, u64 ids_, u64 wts_, i64 n_tok, i64 E, i64 k,
          double routed_scale, i64 ds4) {
    PDL_ENTRY();
    const i64 t = blockIdx.x;
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
    __shared__ float wbest[2][ROUTE_THREADS / 32];
    __shared__ int wbest_i[2][ROUTE_THREADS / 32];
    __shared__ int picked[ROUTE_MAX_K];
    float* s = (float*)logits_ + t * E;
    const float* bias = (const float*)bias_;
    float key[ROUTE_CACHED];
    bool live[ROUTE_CACHED];
#pragma unroll
    for (int c = 0; c < ROUTE_CACHED; c++) {
        const i64 e = threadIdx.x + (i64)c * blockDim.x;
        live[c] = e < E;
        key[c] = 0.f;
        if (live[c]) {
            s[e] = route_score(s[e]);
            key[c] = topk_key(bias ? s[e] + bias[e] : s[e]);
        }
    }
    const i64 uncached = (i64)ROUTE_CACHED * blockDim.x;
    for (i64 e = threadIdx.x + uncached; e < E; e += blockDim.x) {
        s[e] = route_score(s[e]);
    }
    __syncthreads();
    if (tid2eid_) {
        const int tok = ((const int*)tokens_)[t];
        for (i64 j = threadIdx.x; j < k; j += blockDim.x) picked[j] = ((const int*)tid2eid_)[(i64)tok * k + j];
    } else {
        for (i64 j = 0; j < k; j++) {
            // This thread's best live expert (ascending index, strict >: lowest index on ties).
            bool has = false;
            float bv = -FWD_INF;
            int bi = 0x7fffffff;
#pragma unroll
            for (int c = 0; c < ROUTE_CACHED; c++)
                if (live[c] && (!has || key[c] > bv)) {
                    has = true;
                    bv = key[c];
                    bi = (int)(threadIdx.x + c * blockDim.x);
                }
            for (i64 e = threadIdx.x + uncached; e < E; e += blockDim.x) {
                bool taken = false;
                for (i64 p = 0; p < j; p++) taken |= picked[p] == e;
                if (taken) continue;
                const float v = topk_key(bias ? s[e] + bias[e] : s[e]);
                if (!has || v > bv) {
                    has = true;
                    bv = v;
                    bi = (int)e;
                }
            }
#pragma unroll
            for (int o = 16; o > 0; o >>= 1) {
                const float ov = __shfl_xor_sync(FULL_MASK, bv, o);
                const int oi = __shfl_xor_sync(FULL_MASK, bi, o);
                if (ov > bv || (ov == bv && oi < bi)) {
                    bv = ov;
                    bi = oi;
                }
            }
            const int buf = (int)(j & 1);  // alternate buffers: one barrier per pick suffices
            if (lane == 0) {
                wbest[buf][warp] = bv;
                wbest_i[buf][warp] = bi;
            }
            __syncthreads();
            float v = wbest[buf][0];
            int win = wbest_i[buf][0];
            for (int w = 1; w < nwarps; w++)
                if (wbest[buf][w] > v || (wbest[buf][w] == v && wbest_i[buf][w] < win)) {
                    v = wbest[buf][w];
                    win = wbest_i[buf][w];
                }
#pragma unroll
            for (int c = 0; c < ROUTE_CACHED; c++)
                if (win == (int)(threadIdx.x + c * blockDim.x)) live[c] = false;
            if (threadIdx.x == 0) picked[j] = win == 0x7fffffff ? 0 : win;  // only when k > E, which the config rejects
            if (E > uncached) __syncthreads();  // the re-read experts' taken checks read picked
        }
    }
    __syncthreads();
    if (threadIdx.x != 0) return;
    float sum = 0.f;
    for (i64 j = 0; j < k; j++) sum += s[picked[j]];
    const float denom = ds4 ? fmaxf(sum, 6.1035e-5f) : sum + 1e-20f;
    int* out_ids = (int*)ids_ + t * k;
    float* wts = (float*)wts_ + t * k;
    for (i64 j = 0; j < k; j++) {
        out_ids[j] = picked[j];
        wts[j] = s[picked[j]] / denom * (float)routed_scale;
    }
}

// route for E <= 32 * ROUTE_WARP_KEYS experts: one warp per token, the same outputs bit for bit.
// Lane l holds experts l + 32c (c < ROUTE_WARP_KEYS) with their scores and selection keys in
// registers; each of the k picks is the lane's best live candidate (ascending index, strict >)
// and five xor-shuffle rounds in the same total order (key descending, index ascending), after
// which every lane knows the winner: no shared memory, no barrier. The picked scores are
// shuffled from their owners, so the weights' sum adds the same values in the same order.
// tid2eid rows read the scores back from s (written above; __syncwarp orders them), as route.
#define ROUTE_WARP_KEYS 8
extern "C" __global__ void __launch_bounds__(32)
    route_warp(u64 logits_, u64 bias_, u64 tid2eid_, u64 tokens_, u64 ids_, u64 wts_, i64 n_tok, i64 E, i64 k,
               double routed_scale, i64 ds4) {
    PDL_ENTRY();
    const i64 t = blockIdx.x;
    const int lane = threadIdx.x & 31;
    float* s = (float*)logits_ + t * E;
    const float* bias = (const float*)bias_;
    float x[ROUTE_WARP_KEYS], b[ROUTE_WARP_KEYS], sc[ROUTE_WARP_KEYS], key[ROUTE_WARP_KEYS];
    bool live[ROUTE_WARP_KEYS];
#pragma unroll
    for (int c = 0; c < ROUTE_WARP_KEYS; c++) {  // all loads first: one memory round trip
        const int e = lane + 32 * c;
        live[c] = e < E;
        x[c] = live[c] ? s[e] : 0.f;
        b[c] = live[c] && bias ? bias[e] : 0.f;
    }
#pragma unroll
    for (int c = 0; c < ROUTE_WARP_KEYS; c++) {
        sc[c] = route_score(x[c]);
        key[c] = topk_key(bias ? sc[c] + b[c] : sc[c]);
        if (live[c]) s[lane + 32 * c] = sc[c];
    }
    int my_id = 0;       // lane j < k: pick j
    float my_score = 0.f;  // and its score
    float sum = 0.f;       // the picked scores, added in pick order (every lane)
    if (tid2eid_) {
        __syncwarp();
        const int tok = ((const int*)tokens_)[t];
        for (i64 j = 0; j < k; j++) {
            const int id = ((const int*)tid2eid_)[(i64)tok * k + j];
            const float v = s[id];
            sum += v;
            if (lane == j) {
                my_id = id;
                my_score = v;
            }
        }
    } else {
        for (i64 j = 0; j < k; j++) {
            bool has = false;
            float bv = -FWD_INF;
            int bi = 0x7fffffff;
#pragma unroll
            for (int c = 0; c < ROUTE_WARP_KEYS; c++)
                if (live[c] && (!has || key[c] > bv)) {
                    has = true;
                    bv = key[c];
                    bi = lane + 32 * c;
                }
#pragma unroll
            for (int o = 16; o > 0; o >>= 1) {
                const float ov = __shfl_xor_sync(FULL_MASK, bv, o);
                const int oi = __shfl_xor_sync(FULL_MASK, bi, o);
                if (ov > bv || (ov == bv && oi < bi)) {
                    bv = ov;
                    bi = oi;
                }
            }
            // Every lane has the winner (0x7fffffff only when k > E, which the config rejects).
            const int win = bi == 0x7fffffff ? 0 : bi;
            float mine = 0.f;
#pragma unroll
            for (int c = 0; c < ROUTE_WARP_KEYS; c++)
                if (win == lane + 32 * c) {
                    live[c] = false;
                    mine = sc[c];
                }
            const float v = __shfl_sync(FULL_MASK, mine, win & 31);
            sum += v;
            if (lane == j) {
                my_id = win;
                my_score = v;
            }
        }
    }
    const float denom = ds4 ? fmaxf(sum, 6.1035e-5f) : sum + 1e-20f;
    if (lane < k) {
        ((int*)ids_)[t * k + lane] = my_id;
        ((float*)wts_)[t * k + lane] = my_score / denom * (float)routed_scale;
    }
}

// The routed slots (slot = token * k + choice) in stable expert order, so that the expert
// matvec's consecutive CTAs read the same expert's rows (L2 reuse when a prefill chunk sends
// several tokens to one expert): order[p] = slot, inv[slot] = p. Ids outside [0, E) go last
// (their rows come out NaN from the matvec). group_start (E + 1 ints) receives each expert's
// first sorted position; [E] = valid slots.
//
// One CTA of whole warps, O(n_slots): after the bucket counts, the slots are placed a tile of
// blockDim slots at a time, in slot order: a slot's place is its bucket's next free position,
// plus the same bucket's slots in earlier warps of the tile, plus those in earlier lanes of its
// warp (__match_any_sync). Dynamic shared memory: (E + 1) * (1 + warps) ints.
extern "C" __global__ void sort_slots(u64 ids_, u64 order_, u64 inv_, u64 group_start_, i64 n_slots, i64 E) {
    PDL_ENTRY();
    extern __shared__ int next_free[];  // per bucket; then [warps][E + 1] tile offsets
    const int nb = (int)E + 1, warps = blockDim.x >> 5, warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    int* tile_off = next_free + nb;
    const int* ids = (const int*)ids_;
    auto bucket_of = [&](i64 s) { const int id = ids[s]; return (id >= 0 && id < E) ? (int)id : (int)E; };
    for (int e = threadIdx.x; e < nb; e += blockDim.x) next_free[e] = 0;
    __syncthreads();
    for (i64 s = threadIdx.x; s < n_slots; s += blockDim.x) atomicAdd(&next_free[bucket_of(s)], 1);
    __syncthreads();
    if (threadIdx.x == 0) {
        int sum = 0;
        for (int e = 0; e < nb; e++) {
            const int c = next_free[e];
            next_free[e] = sum;
            sum += c;
        }
    }
    __syncthreads();
    for (int e = threadIdx.x; e < nb; e += blockDim.x) ((int*)group_start_)[e] = next_free[e];
    const unsigned lanes_before = (1u << lane) - 1u;
    for (i64 tile = 0; tile < n_slots; tile += blockDim.x) {
        for (int i = threadIdx.x; i < warps * nb; i += blockDim.x) tile_off[i] = 0;
        __syncthreads();
        const i64 s = tile + threadIdx.x;
        const bool valid = s < n_slots;
        const int e = valid ? bucket_of(s) : -1;
        const unsigned same = __match_any_sync(FULL_MASK, e);
        const int rank = __popc(same & lanes_before);
        if (valid && rank == 0) tile_off[warp * nb + e] = __popc(same);
        __syncthreads();
        // Per bucket: counts of the tile's warps -> their first positions; advance next_free.
        for (int b = threadIdx.x; b < nb; b += blockDim.x) {
            int at = next_free[b];
            for (int w = 0; w < warps; w++) {
                const int c = tile_off[w * nb + b];
                tile_off[w * nb + b] = at;
                at += c;
            }
            next_free[b] = at;
        }
        __syncthreads();
        if (valid) {
            const int p = tile_off[warp * nb + e] + rank;
            ((int*)order_)[p] = (int)s;
            ((int*)inv_)[s] = p;
        }
        __syncthreads();
    }
}

// The sorted slots' inputs and routing: xe[p] = x[order[p] / k], ids_out[p] = ids[order[p]],
// wts_out[p] = wts[order[p]]. One CTA per slot p (grid n_slots): no division per element.
extern "C" __global__ void gather_slots(u64 x_, u64 order_, u64 ids_, u64 wts_, u64 xe_, u64 ids_out_, u64 wts_out_,
                                        i64 n_slots, i64 k, i64 d) {
    PDL_ENTRY();
    const i64 p = blockIdx.x;
    if (p >= n_slots) return;
    const i64 slot = ((const int*)order_)[p];
    const float* src = (const float*)x_ + (slot / k) * d;
    float* dst = (float*)xe_ + p * d;
    for (i64 i = threadIdx.x; i < d; i += blockDim.x) dst[i] = src[i];
    if (threadIdx.x == 0) {
        ((int*)ids_out_)[p] = ((const int*)ids_)[slot];
        ((float*)wts_out_)[p] = ((const float*)wts_)[slot];
    }
}

// gather_slots on the quantized form of x (int8 rows of d values, d % 16 == 0 and 16-byte
// aligned rows; bpr f32 block scales per row) into the slots' quantized rows (q, dq): a row's
// quantization depends on the row alone, so these are the bits of quantizing the gathered f32
// rows, at a quarter of the bytes, and the n tokens are quantized once instead of n k slots.
extern "C" __global__ void gather_slots_q(u64 xq_, u64 xd_, u64 order_, u64 ids_, u64 wts_, u64 q_, u64 dq_,
                                          u64 ids_out_, u64 wts_out_, i64 n_slots, i64 k, i64 d, i64 bpr) {
    PDL_ENTRY();
    const i64 p = blockIdx.x;
    if (p >= n_slots) return;
    const i64 slot = ((const int*)order_)[p], row = slot / k;
    const uint4* src = (const uint4*)((const i8*)xq_ + row * d);
    uint4* dst = (uint4*)((i8*)q_ + p * d);
    for (i64 i = threadIdx.x; i < d / 16; i += blockDim.x) dst[i] = src[i];
    for (i64 b = threadIdx.x; b < bpr; b += blockDim.x) ((float*)dq_)[p * bpr + b] = ((const float*)xd_)[row * bpr + b];
    if (threadIdx.x == 0) {
        ((int*)ids_out_)[p] = ((const int*)ids_)[slot];
        ((float*)wts_out_)[p] = ((const float*)wts_)[slot];
    }
}

// y[t] = the MoE output (fwd_common.cuh moe_combined's sums): the shared expert's output plus
// the routed experts' in ascending expert order. Grid (slices of d, tokens): thread 0 orders
// the token's slots once (moe_next_slot) instead of every element doing it.
extern "C" __global__ void moe_combine(u64 down_, u64 inv_, u64 ids_, u64 wts_, u64 shared_, u64 y_, i64 n_tok, i64 k,
                                       i64 d, i64 weighted) {
    PDL_ENTRY();
    __shared__ i64 rows[16];  // k <= 16 (model.rs checks)
    __shared__ float factors[16];
    const i64 t = blockIdx.y;
    if (threadIdx.x == 0) {
        const int* ids = (const int*)ids_ + t * k;
        const int* inv = (const int*)inv_;
        int last_id = -1;
        i64 last_slot = -1;
        for (i64 n = 0; n < k; n++) {
            const i64 best = moe_next_slot(ids, k, last_id, last_slot);
            const i64 slot = t * k + best;
            factors[n] = weighted ? ((const float*)wts_)[slot] : 1.0f;
            rows[n] = inv ? (i64)inv[slot] : slot;
            last_id = ids[best];
            last_slot = best;
        }
    }
    __syncthreads();
    const float* down = (const float*)down_;
    for (i64 i = (i64)blockIdx.x * blockDim.x + threadIdx.x; i < d; i += (i64)gridDim.x * blockDim.x) {
        float acc = 0.f;
        for (i64 n = 0; n < k; n++) acc += factors[n] * down[rows[n] * d + i];
        ((float*)y_)[t * d + i] = ((const float*)shared_)[t * d + i] + acc;
    }
}

// The routed experts' down stack of a layer whose weights live in host memory, copied into
// the GPU's staging buffer ahead of a long span (forward's ExpertStaging): n16 16-byte words
// from src to dst. The copy is bound by PCIe (~45 GB/s on an H100; the copy engine's
// cuMemcpyDtoDAsync of that memory ran at ~13.5), so a few CTAs with eight 16-byte loads in
// flight per thread do it as fast as many: each CTA holds an SM slot for the whole copy
// (~15 ms a stack), which the span's GEMMs then lack (ffn.rs STAGE_COPY_CTAS).
extern "C" __global__ void __launch_bounds__(256) stage_copy(u64 dst_, u64 src_, i64 n16) {
    PDL_ENTRY();
    const uint4* src = (const uint4*)src_;
    uint4* dst = (uint4*)dst_;
    const i64 stride = (i64)gridDim.x * blockDim.x;
    i64 i = (i64)blockIdx.x * blockDim.x + threadIdx.x;
    for (; i + 7 * stride < n16; i += 8 * stride) {
        uint4 v[8];
#pragma unroll
        for (int j = 0; j < 8; j++) v[j] = src[i + j * stride];
#pragma unroll
        for (int j = 0; j < 8; j++) dst[i + j * stride] = v[j];
    }
    for (; i < n16; i += stride) dst[i] = src[i];
}
