// Hyper-connections (mHC): the Sinkhorn-projected mixing of the n residual streams around
// every sublayer, and the final head mixing (cpu/hc.rs, dsv4-arch.md §3.3, §3.11).

#define HC_MAX_N 16
// Mix rows (2+n)n the split-K projection handles (n <= 5), and its CTA size.
#define HC_MIX_MAX 40
#define HC_MIX_THREADS 128
// Mix rows per CTA of the split-K projection (the row groups are blockIdx.y). Fewer rows, more
// CTAs, each with a shorter chain of warp sums: decode +1.4 % at 3 against 6, 2 alike, 1 and 12
// slower (the same bits at any value; docs/speed-log.md session 22).
#define HC_GROUP_ROWS 3
#define HC_PER_LANE (HC_MAX_N * HC_MAX_N / 32)
// Streams of the kernels' n-specialized paths (the model's hc_mult).
#define HC_SPAN_N 4

// The mappings of one token from its mix (R = (2+n)n values in shared memory), in the CPU's
// operation order (split_sinkhorn in cpu/hc.rs): m = [pre | post | comb]. pre and post are
// plain sigmoids (hc_pre_post, any threads); comb is the Sinkhorn projection (hc_comb_warp,
// one warp), which only the post mixing after the sublayer needs: hc_comb runs it beside the
// sublayer, off the decode's critical path.
// Thread i's (i < n) weights of hc_pre_post: loadable before a kernel's PDL wait.
struct HcPrePostWeights {
    float base_pre, base_post, scale_pre, scale_post;
};
__device__ __forceinline__ HcPrePostWeights hc_pre_post_weights(const float* base, const float* scale, int n, int i) {
    return {base[i], base[n + i], scale[0], scale[1]};
}
__device__ __forceinline__ void hc_pre_post_one(const float* mix, HcPrePostWeights w, float* m, int n, int i,
                                                float eps) {
    m[i] = sigmoidf_ref(mix[i] * w.scale_pre + w.base_pre) + eps;
    m[n + i] = 2.0f * sigmoidf_ref(mix[n + i] * w.scale_post + w.base_post);
}
__device__ __forceinline__ void hc_pre_post(const float* mix, const float* base, const float* scale, float* m, int n,
                                            float eps) {
    for (int i = threadIdx.x; i < n; i += blockDim.x)
        hc_pre_post_one(mix, hc_pre_post_weights(base, scale, n, i), m, n, i, eps);
}

// hc_comb_warp for n*n <= 32: lane j*n + k holds comb[j][k] in a register; a row's or
// column's values are gathered with shuffles and summed in index order, as the CPU does (no
// tree reduction). NC > 0: n is NC, known here, so the gathers unroll (the Sinkhorn chain is
// hc_comb's latency); NC = 0: n = n_rt.
template <int NC>
__device__ __forceinline__ void hc_comb_regs(const float* mix, const float* base, const float* scale, float* comb,
                                             int n_rt, i64 iters, float eps) {
    const int n = NC > 0 ? NC : n_rt, nn = n * n, lane = threadIdx.x & 31;
    const bool act = lane < nn;
    const int row = act ? lane / n : 0, col = act ? lane % n : 0;
    float c = act ? mix[2 * n + lane] * scale[2] + base[2 * n + lane] : 0.f;
    float mx = -FWD_INF;
#pragma unroll
    for (int k = 0; k < n; k++) mx = fmaxf(mx, __shfl_sync(FULL_MASK, c, row * n + k));
    const float e = expf(c - mx);
    float s = 0.f;
#pragma unroll
    for (int k = 0; k < n; k++) s += __shfl_sync(FULL_MASK, e, row * n + k);
    c = e / s + eps;
    const i64 passes = iters > 0 ? iters : 1;  // the CPU always does the first column pass
    for (i64 it = 0; it < passes; it++) {
        if (it > 0) {
            s = 0.f;
#pragma unroll
            for (int k = 0; k < n; k++) s += __shfl_sync(FULL_MASK, c, row * n + k);
            c = c / (s + eps);
        }
        s = 0.f;
#pragma unroll
        for (int j = 0; j < n; j++) s += __shfl_sync(FULL_MASK, c, j * n + col);
        c = c / (s + eps);
    }
    if (act) comb[lane] = c;
    __syncwarp();
}

__device__ void hc_comb_warp(const float* mix, const float* base, const float* scale, float* comb, int n, i64 iters,
                             float eps) {
    const int lane = threadIdx.x & 31, nn = n * n;
    if (nn <= 32) {
        if (n == HC_SPAN_N)
            hc_comb_regs<HC_SPAN_N>(mix, base, scale, comb, n, iters, eps);
        else
            hc_comb_regs<0>(mix, base, scale, comb, n, iters, eps);
        return;
    }
    for (int e = lane; e < nn; e += 32) comb[e] = mix[2 * n + e] * scale[2] + base[2 * n + e];
    __syncwarp();
    float v[HC_PER_LANE];
    // Row softmax + eps: exp into v, then each row's sum in order.
#pragma unroll
    for (int q = 0; q < HC_PER_LANE; q++) {
        const int e = lane + 32 * q, row = e / n;
        if (e < nn) {
            float mx = -FWD_INF;
            for (int k = 0; k < n; k++) mx = fmaxf(mx, comb[row * n + k]);
            v[q] = expf(comb[e] - mx);
        }
    }
    __syncwarp();
#pragma unroll
    for (int q = 0; q < HC_PER_LANE; q++)
        if (lane + 32 * q < nn) comb[lane + 32 * q] = v[q];
    __syncwarp();
#pragma unroll
    for (int q = 0; q < HC_PER_LANE; q++) {
        const int e = lane + 32 * q, row = e / n;
        if (e < nn) {
            float s = 0.f;
            for (int k = 0; k < n; k++) s += comb[row * n + k];
            v[q] = comb[e] / s + eps;
        }
    }
    __syncwarp();
#pragma unroll
    for (int q = 0; q < HC_PER_LANE; q++)
        if (lane + 32 * q < nn) comb[lane + 32 * q] = v[q];
    __syncwarp();
    const i64 passes = iters > 0 ? iters : 1;  // the CPU always does the first column pass
    for (i64 it = 0; it < passes; it++) {
        for (int cols = (it > 0 ? 0 : 1); cols < 2; cols++) {  // rows (from the 2nd pass), then columns
#pragma unroll
            for (int q = 0; q < HC_PER_LANE; q++) {
                const int e = lane + 32 * q;
                if (e < nn) {
                    const int row = e / n, col = e % n;
                    float s = 0.f;
                    for (int k = 0; k < n; k++) s += cols ? comb[k * n + col] : comb[row * n + k];
                    v[q] = comb[e] / (s + eps);
                }
            }
            __syncwarp();
#pragma unroll
            for (int q = 0; q < HC_PER_LANE; q++)
                if (lane + 32 * q < nn) comb[lane + 32 * q] = v[q];
            __syncwarp();
        }
    }
}

// Streams the split-K kernels take ((2+n)n <= HC_MIX_MAX), and tokens per CTA: the CTA loads
// its projection weights once into registers and applies them to each of its tokens.
#define HC_SPLIT_N 5
#define HC_TOKENS 8

// The split-K kernels' weights: column c = k*d + i (stream k, element i = blockIdx.x * 128 +
// thread) of mix rows r0 = HC_GROUP_ROWS * blockIdx.y .. (at most HC_GROUP_ROWS, below R; F32
// or F16 rows n*d wide) for every stream k (0 outside the rows / elements). Loaded before the
// kernels' PDL wait (no kernel writes weights): in a decode step the load overlaps the
// previous kernel instead of following the wait.
struct HcMixWeights {
    float w[HC_GROUP_ROWS][HC_SPLIT_N];
};
__device__ __forceinline__ HcMixWeights hc_mix_weights(u64 fn_, i64 fn_f16, i64 n, i64 d, i64 R) {
    HcMixWeights m;
    const i64 i = (i64)blockIdx.x * HC_MIX_THREADS + threadIdx.x;
    const int r0 = blockIdx.y * HC_GROUP_ROWS;
#pragma unroll
    for (int j = 0; j < HC_GROUP_ROWS; j++)
#pragma unroll
        for (int k = 0; k < HC_SPLIT_N; k++) {
            float v = 0.f;
            if (k < n && i < d && r0 + j < R) {
                const i64 at = (i64)(r0 + j) * n * d + k * d + i;
                v = fn_f16 ? f16_to_f32(((const u16*)fn_)[at]) : ((const float*)fn_)[at];
            }
            m.w[j][k] = v;
        }
    return m;
}

// CTA sums of acc (rows r0..) and, for the row group that owns it (ss_owner), of ss; stored
// into the token's slice record out[0..R] (R = sum of squares). Every thread of the CTA calls
// it (it synchronizes, also before returning, so it can be called once per token).
__device__ __forceinline__ void hc_store_partial(float (&acc)[HC_GROUP_ROWS], double ss, int r0, int R, bool ss_owner,
                                                 float* out) {
    __shared__ float red[HC_MIX_THREADS / 32][HC_GROUP_ROWS + 1];
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
#pragma unroll
    for (int j = 0; j < HC_GROUP_ROWS; j++) {
        const float v = warp_sum(acc[j]);
        if (lane == 0) red[warp][j] = v;
    }
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) ss += __shfl_xor_sync(FULL_MASK, ss, o);
    if (lane == 0) red[warp][HC_GROUP_ROWS] = (float)ss;
    __syncthreads();
    const int j = threadIdx.x;
    if (j <= HC_GROUP_ROWS) {
        float v = 0.f;
        for (int w = 0; w < HC_MIX_THREADS / 32; w++) v += red[w][j];
        if (j < HC_GROUP_ROWS && r0 + j < R) out[r0 + j] = v;
        if (j == HC_GROUP_ROWS && ss_owner) out[R] = v;
    }
    __syncthreads();
}

// Split-K projection of the flattened streams (n x d per token) onto the R mix rows: CTA
// (s, g, z) covers element i = s*128 + thread of every stream against mix rows 6g..6g+5 for
// tokens z*HC_TOKENS.. and writes them into part[t][s] = [R dot products | sum of squares
// (row group 0)]. hc_pre finishes the sums and applies the RMS scale (the norm is one scalar
// per token, so fn . RMS0(x) = rms^-1 (fn . x)).
extern "C" __global__ void __launch_bounds__(HC_MIX_THREADS)
    hc_mix_partial(u64 streams_, u64 fn_, i64 fn_f16, u64 part_, i64 n, i64 d, i64 R, i64 n_tok) {
    PDL_ENTRY_AFTER(const HcMixWeights mw = hc_mix_weights(fn_, fn_f16, n, d, R));
    const i64 i = (i64)blockIdx.x * HC_MIX_THREADS + threadIdx.x;
    const int r0 = blockIdx.y * HC_GROUP_ROWS;
    for (i64 t = (i64)blockIdx.z * HC_TOKENS; t < n_tok && t < ((i64)blockIdx.z + 1) * HC_TOKENS; t++) {
        float acc[HC_GROUP_ROWS];
#pragma unroll
        for (int j = 0; j < HC_GROUP_ROWS; j++) acc[j] = 0.f;
        double ss = 0.0;
        if (i < d) {
            const float* st = (const float*)streams_ + t * n * d;
#pragma unroll
            for (int k = 0; k < HC_SPLIT_N; k++)
                if (k < n) {
                    const float x = st[k * d + i];
                    ss += (double)x * (double)x;
#pragma unroll
                    for (int j = 0; j < HC_GROUP_ROWS; j++) acc[j] += mw.w[j][k] * x;
                }
        }
        hc_store_partial(acc, ss, r0, (int)R, blockIdx.y == 0,
                         (float*)part_ + (t * gridDim.x + blockIdx.x) * (R + 1));
    }
}

// hc_post (below) fused with the next hyper-connection's hc_mix_partial: the new stream
// values are projected while still in registers. Every row group computes them from
// streams_in; group 0 stores them to streams_out (a different buffer, so no CTA can see
// another's update). With moe_down != 0 the sublayer output is combined here from the
// experts' outputs, slot rows and routing (moe_combined; y_ then holds the shared expert's
// output), saving moe_combine's launch.
extern "C" __global__ void __launch_bounds__(HC_MIX_THREADS)
    hc_post_mix(u64 maps_, u64 y_, u64 streams_in_, u64 streams_out_, u64 fn_, i64 fn_f16, u64 part_, i64 n, i64 d,
                i64 R, i64 n_tok, u64 moe_down, u64 moe_inv, u64 moe_ids, u64 moe_wts, i64 moe_k,
                i64 moe_weighted) {
    PDL_ENTRY_AFTER(const HcMixWeights mw = hc_mix_weights(fn_, fn_f16, n, d, R));
    const i64 i = (i64)blockIdx.x * HC_MIX_THREADS + threadIdx.x;
    const int r0 = blockIdx.y * HC_GROUP_ROWS;
    for (i64 t = (i64)blockIdx.z * HC_TOKENS; t < n_tok && t < ((i64)blockIdx.z + 1) * HC_TOKENS; t++) {
        float acc[HC_GROUP_ROWS];
#pragma unroll
        for (int j = 0; j < HC_GROUP_ROWS; j++) acc[j] = 0.f;
        double ss = 0.0;
        if (i < d) {
            const float* mp = (const float*)maps_ + t * (2 * n + n * n);
            const float* post = mp + n;
            const float* comb = mp + 2 * n;
            const float* st = (const float*)streams_in_ + t * n * d;
            float* out = (float*)streams_out_ + t * n * d;
            // Fully unrolled (guards instead of loop bounds) so old[] stays in registers. The
            // maps too, loaded here with the streams: in the loop below, after the first store
            // to out (which the compiler cannot tell from the maps), each k's loads would wait
            // for the one before.
            float old[HC_SPLIT_N], postv[HC_SPLIT_N], combv[HC_SPLIT_N][HC_SPLIT_N];
#pragma unroll
            for (int j = 0; j < HC_SPLIT_N; j++) {
                old[j] = j < n ? st[j * d + i] : 0.f;
                postv[j] = j < n ? post[j] : 0.f;
#pragma unroll
                for (int k = 0; k < HC_SPLIT_N; k++) combv[j][k] = j < n && k < n ? comb[j * n + k] : 0.f;
            }
            const float y = moe_down ? moe_combined((const float*)moe_down, (const int*)moe_inv, (const int*)moe_ids,
                                                    (const float*)moe_wts, (const float*)y_, t, i, moe_k, d,
                                                    moe_weighted)
                                     : ((const float*)y_)[t * d + i];
#pragma unroll
            for (int k = 0; k < HC_SPLIT_N; k++)
                if (k < n) {
                    float v = postv[k] * y;
#pragma unroll
                    for (int j = 0; j < HC_SPLIT_N; j++)
                        if (j < n) v += combv[j][k] * old[j];
                    if (blockIdx.y == 0) out[k * d + i] = v;
                    ss += (double)v * (double)v;
#pragma unroll
                    for (int j = 0; j < HC_GROUP_ROWS; j++) acc[j] += mw.w[j][k] * v;
                }
        }
        hc_store_partial(acc, ss, r0, (int)R, blockIdx.y == 0,
                         (float*)part_ + (t * gridDim.x + blockIdx.x) * (R + 1));
    }
}

// Span versions of hc_mix_partial / hc_post_mix for n = 4 streams (R = 24 mix rows). The
// split-K kernels above give each CTA HC_GROUP_ROWS of the rows, so each of their row groups
// re-reads (and hc_post_mix re-mixes) the token's streams, and every token pays two barriers
// and 5 (rows + 1) shuffles per warp per row group. Here one CTA takes all 24 rows of slice s
// (elements s*128 + thread, as there) for a range of tokens: the weights stay in registers across the
// range, the streams are copied ahead into shared memory (cp.async, HC_SPAN_STAGES tokens in
// flight per thread), and a warp's 24 row sums are reduced with 24 shuffles instead of 120.
// The arithmetic of every value is the split-K kernels': the same per-thread FMA chains, the
// same 32-lane tree (warp_sum's pairing: lane ^ 16, then ^ 8, 4, 2, 1), the four warps summed
// in order into the same slice record part[t][s].
#define HC_SPAN_R 24
#define HC_SPAN_STAGES 8
// Tokens per barrier (the warps' row sums are combined across the CTA once per batch).
#define HC_SPAN_BATCH 4
// Most tokens per CTA (its maps are staged in shared memory).
#define HC_SPAN_MAX_TOKENS 256

template <int N>
__device__ __forceinline__ void hc_cp_async_wait() {
    asm volatile("cp.async.wait_group %0;" ::"n"(N) : "memory");
}

// Register slot m of a lane holds mix row hc_span_row(m, lane): the halves 12/6/3 of the 24
// rows are swapped where lane bit 16/8/4 is set, so that at each of those reduction steps
// every lane keeps its lower half and sends its upper half, which its partner holds for the
// very rows the lane keeps (no per-lane selects).
__device__ __forceinline__ int hc_span_row(int m, int lane) {
    return (((m / 12) ^ ((lane >> 4) & 1)) * 12) + ((((m / 6) & 1) ^ ((lane >> 3) & 1)) * 6) +
           ((((m / 3) & 1) ^ ((lane >> 2) & 1)) * 3) + m % 3;
}

// The row whose total hc_span_reduce leaves in `lane`: -1 in the second of the two lanes
// (3 and 2 mod 4) that end with the same row.
__device__ __forceinline__ int hc_span_final_row(int lane) {
    const bool hi2 = (lane & 2) != 0, hi1 = (lane & 1) != 0;
    const int base = ((lane >> 4) & 1) * 12 + ((lane >> 3) & 1) * 6 + ((lane >> 2) & 1) * 3;
    return hi2 ? (hi1 ? -1 : base + 2) : base + (hi1 ? 1 : 0);
}

// The warp sums of a lane's 24 row partials (slots as hc_span_row) into the value of row
// hc_span_final_row(lane): the tree of warp_sum for every row, with 24 shuffles.
__device__ __forceinline__ float hc_span_reduce(float (&acc)[HC_SPAN_R], int lane) {
#pragma unroll
    for (int m = 0; m < 12; m++) acc[m] += __shfl_xor_sync(FULL_MASK, acc[m + 12], 16);
#pragma unroll
    for (int m = 0; m < 6; m++) acc[m] += __shfl_xor_sync(FULL_MASK, acc[m + 6], 8);
#pragma unroll
    for (int m = 0; m < 3; m++) acc[m] += __shfl_xor_sync(FULL_MASK, acc[m + 3], 4);
    // Rows base + 0, 1, 2 over the four lanes of a quad: lanes with bit 2 clear end with rows
    // base + 0 (bit 1 clear) and base + 1, lanes with it set both with base + 2.
    const bool hi2 = (lane & 2) != 0, hi1 = (lane & 1) != 0;
    const float sa = (hi2 ? acc[2] : acc[0]) + __shfl_xor_sync(FULL_MASK, hi2 ? acc[0] : acc[2], 2);
    const float sb = acc[1] + __shfl_xor_sync(FULL_MASK, acc[1], 2);
    const float keep = (hi2 || !hi1) ? sa : sb;
    const float send = (hi2 || hi1) ? sa : sb;
    return keep + __shfl_xor_sync(FULL_MASK, send, 1);
}

// CTA (s, g): slice s of tokens g*tpc .. (at most HC_SPAN_MAX_TOKENS), n = 4 streams, R = 24.
// POST: hc_post_mix's work (the new streams into streams_out, their projection into part);
// else hc_mix_partial's (the projection of streams_in). The loop is issue-bound (~350 SASS
// instructions per warp and token, 112 of them the FMAs; H200, 1 024 tokens: 72 us against
// ~30 us of memory traffic), so it keeps running pointers and power-of-two ring indices.
template <bool POST>
__device__ __forceinline__ void hc_span_body(u64 maps_, u64 y_, u64 streams_in_, u64 streams_out_, u64 fn_,
                                             i64 fn_f16, u64 part_, i64 d, i64 n_tok, i64 tpc) {
    constexpr int N = HC_SPAN_N, R = HC_SPAN_R, NV = POST ? N + 1 : N, M = 2 * N + N * N;
    constexpr int T = HC_MIX_THREADS, W = HC_MIX_THREADS / 32, S = HC_SPAN_STAGES, B = HC_SPAN_BATCH;
    static_assert((S & (S - 1)) == 0 && B * 2 == 8, "ring indices are masks");
    // Per-thread copies of the streams (and y) of the tokens ahead: a thread reads back only
    // what it copied, so the stages need no barrier.
    __shared__ float stage[S][NV][T];
    // post and comb of each token of the range: 5 float4 (maps[t][n ..]).
    __shared__ float4 smaps[POST ? HC_SPAN_MAX_TOKENS * 5 : 1];
    // The warps' row sums of the current and the previous batch ((u / B) & 1, u % B) = u & 7.
    __shared__ float red[2 * B][W][R + 1];
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const i64 i = (i64)blockIdx.x * T + tid;
    const i64 t0 = (i64)blockIdx.y * tpc, t1 = min64(n_tok, t0 + tpc);
    if (t0 >= t1) return;
    const int cnt = (int)(t1 - t0);
    const bool in = i < d;
    const i64 nd = N * d;
    // Copies of token u + S - 1 (issued at token u) come from these, advanced per token.
    const float* src = (const float*)streams_in_ + t0 * nd + i;
    const float* ysrc = (const float*)y_ + t0 * d + i;
    if (POST) {
        const float4* mp = (const float4*)maps_;
        for (int e = tid; e < cnt * 5; e += T) cp_async16(&smaps[e], mp + (t0 + e / 5) * (M / 4) + 1 + e % 5);
    }
#pragma unroll
    for (int u = 0; u < S - 1; u++) {
        if (u < cnt && in) {
#pragma unroll
            for (int k = 0; k < N; k++) cp_async4(&stage[u][k][tid], src + k * d);
            if (POST) cp_async4(&stage[u][N][tid], ysrc);
        }
        cp_async_commit();
        src += nd;
        ysrc += d;
    }
    float w[R][N];
#pragma unroll
    for (int m = 0; m < R; m++) {
        const i64 row = hc_span_row(m, lane);
#pragma unroll
        for (int k = 0; k < N; k++) {
            const i64 at = row * nd + k * d + i;
            w[m][k] = !in ? 0.f : fn_f16 ? f16_to_f32(((const u16*)fn_)[at]) : ((const float*)fn_)[at];
        }
    }
    float* out = (float*)streams_out_ + t0 * nd + i;
    // The finishing thread (r = tid % 25 of token tid / 25 of a batch) and its record.
    const int fin_b = tid / (R + 1), fin_r = tid % (R + 1);
    const i64 part_step = (i64)gridDim.x * (R + 1);
    float* part = (float*)part_ + (t0 + fin_b) * part_step + (i64)blockIdx.x * (R + 1) + fin_r;
    const float* my_stage = &stage[0][0][tid];
    // Where this lane's row total goes (hc_span_reduce; the ss of lane 0 at R).
    const int my_row = hc_span_final_row(lane);
    float* my_red = &red[0][0][0] + warp * (R + 1) + (my_row < 0 ? R : my_row);
    for (int u = 0; u < cnt; u++) {
        if (u + S - 1 < cnt && in) {
            float* dst = &stage[(u + S - 1) & (S - 1)][0][tid];
#pragma unroll
            for (int k = 0; k < N; k++) cp_async4(dst + k * T, src + k * d);
            if (POST) cp_async4(dst + N * T, ysrc);
        }
        cp_async_commit();
        src += nd;
        ysrc += d;
        hc_cp_async_wait<S - 1>();
        if (POST && u == 0) __syncthreads();  // every thread's map copies (group 0) landed
        const float* sv = my_stage + (u & (S - 1)) * NV * T;
        // Out-of-range lanes (i >= d) take zeros (their weights are 0): acc and ss stay +0,
        // as the split-K kernels' skipped lanes.
        float acc[R];
        double ss = 0.0;
        if (POST) {
            float old[N];
#pragma unroll
            for (int j = 0; j < N; j++) old[j] = in ? sv[j * T] : 0.f;
            const float y = in ? sv[N * T] : 0.f;
            const float4 p4 = smaps[u * 5];
            const float post[N] = {p4.x, p4.y, p4.z, p4.w};
            float comb[N * N];
#pragma unroll
            for (int j = 0; j < N; j++) {
                const float4 c4 = smaps[u * 5 + 1 + j];
                comb[j * N] = c4.x;
                comb[j * N + 1] = c4.y;
                comb[j * N + 2] = c4.z;
                comb[j * N + 3] = c4.w;
            }
#pragma unroll
            for (int k = 0; k < N; k++) {
                float v = post[k] * y;
#pragma unroll
                for (int j = 0; j < N; j++) v += comb[j * N + k] * old[j];
                if (in) out[k * d] = v;
                ss += (double)v * (double)v;
#pragma unroll
                for (int m = 0; m < R; m++) {
                    if (k == 0) acc[m] = 0.f;
                    acc[m] += w[m][k] * v;
                }
            }
        } else {
#pragma unroll
            for (int k = 0; k < N; k++) {
                const float x = in ? sv[k * T] : 0.f;
                ss += (double)x * (double)x;
#pragma unroll
                for (int m = 0; m < R; m++) {
                    if (k == 0) acc[m] = 0.f;
                    acc[m] += w[m][k] * x;
                }
            }
        }
        out += nd;
        const float tot = hc_span_reduce(acc, lane);
#pragma unroll
        for (int o = 16; o > 0; o >>= 1) ss += __shfl_xor_sync(FULL_MASK, ss, o);
        const int rofs = (u & 7) * (W * (R + 1));
        if (my_row >= 0) my_red[rofs] = tot;
        if (lane == 0) (&red[0][0][0])[rofs + warp * (R + 1) + R] = (float)ss;
        const int b = u & (B - 1);
        if (b == B - 1 || u == cnt - 1) {
            // The batch's slice records: the warps' sums in warp order (hc_store_partial).
            // red is double-buffered by batch, so one barrier per batch suffices.
            __syncthreads();
            if (fin_b <= b) {
                const float* rr = &red[(u & 4) + fin_b][0][fin_r];
                float v = 0.f;
#pragma unroll
                for (int q = 0; q < W; q++) v += rr[q * (R + 1)];
                *part = v;
            }
            part += B * part_step;
        }
    }
    hc_cp_async_wait<0>();
}

// hc_mix_partial for spans (hc_span_body): grid (d / 128 slices, ceil(n_tok / tpc)).
extern "C" __global__ void __launch_bounds__(HC_MIX_THREADS, 3)
    hc_mix_partial_span(u64 streams_, u64 fn_, i64 fn_f16, u64 part_, i64 d, i64 n_tok, i64 tpc) {
    PDL_ENTRY();
    hc_span_body<false>(0, 0, streams_, 0, fn_, fn_f16, part_, d, n_tok, tpc);
}

// hc_post_mix for spans without a pending MoE combination (hc_span_body): grid as
// hc_mix_partial_span; streams_out is another buffer than streams_in.
extern "C" __global__ void __launch_bounds__(HC_MIX_THREADS, 3)
    hc_post_mix_span(u64 maps_, u64 y_, u64 streams_in_, u64 streams_out_, u64 fn_, i64 fn_f16, u64 part_, i64 d,
                     i64 n_tok, i64 tpc) {
    PDL_ENTRY();
    hc_span_body<true>(maps_, y_, streams_in_, streams_out_, fn_, fn_f16, part_, d, n_tok, tpc);
}

// The mix of token t: from `mix` rows of R values, or (part != 0) the sum of n_part split-K
// slice records of hc_mix_partial / hc_post_mix times the RMS scale. Into mix[0..R) (shared).
// Per row: lane s sums slices s, s + 32, ... in order, then warp_sum's tree over the lanes.
// One warp (every lane calls it; it ends with __syncwarp). With R = 24 the rows' trees run
// transposed (hc_span_reduce: 24 shuffles, not 120) and all loads are issued at once.
__device__ void hc_mix_of_warp(u64 mix_, u64 part_, i64 n_part, i64 t, i64 R, i64 width, double rms_eps, float* mix) {
    const int lane = threadIdx.x & 31;
    if (!part_) {
        for (i64 r = lane; r < R; r += 32) mix[r] = ((const float*)mix_)[t * R + r];
        __syncwarp();
        return;
    }
    const float* part = (const float*)part_ + t * n_part * (R + 1);
    if (R == HC_SPAN_R) {
        float acc[HC_SPAN_R];
        float ssv = 0.f;
#pragma unroll
        for (int m = 0; m < HC_SPAN_R; m++) acc[m] = 0.f;
        for (i64 s = lane; s < n_part; s += 32) {
#pragma unroll
            for (int m = 0; m < HC_SPAN_R; m++) acc[m] += part[s * (HC_SPAN_R + 1) + hc_span_row(m, lane)];
            ssv += part[s * (HC_SPAN_R + 1) + HC_SPAN_R];
        }
        const int row = hc_span_final_row(lane);
        const float tot = hc_span_reduce(acc, lane);
        const float ss = warp_sum(ssv);
        const float inv = rms_scale((double)ss, width, rms_eps);
        if (row >= 0) mix[row] = tot * inv;
        __syncwarp();
        return;
    }
    for (i64 r = 0; r <= R; r++) {
        float v = 0.f;
        for (i64 s = lane; s < n_part; s += 32) v += part[s * (R + 1) + r];
        v = warp_sum(v);
        if (lane == 0) mix[r] = v;  // the sums; scaled below
    }
    __syncwarp();
    const float inv = rms_scale((double)mix[R], width, rms_eps);
    __syncwarp();
    for (i64 r = lane; r < R; r += 32) mix[r] = mix[r] * inv;
    __syncwarp();
}

// hc_mix_of_warp's result for a CTA: its warps share the rows (each row's sum as there), into
// shared mix[0..R) (capacity (2 + HC_MAX_N) HC_MAX_N + 1), visible to every thread on return.
// (No transposed rows here: hc_pre keeps its streams in registers meanwhile.)
__device__ void hc_load_mix(u64 mix_, u64 part_, i64 n_part, i64 t, i64 R, i64 width, double rms_eps, float* mix) {
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, warps = blockDim.x >> 5;
    if (part_) {
        const float* part = (const float*)part_ + t * n_part * (R + 1);
        __shared__ float sums[(2 + HC_MAX_N) * HC_MAX_N + 1];
        for (i64 r = warp; r <= R; r += warps) {
            float v = 0.f;
            for (i64 s = lane; s < n_part; s += 32) v += part[s * (R + 1) + r];
            v = warp_sum(v);
            if (lane == 0) sums[r] = v;
        }
        __syncthreads();
        const float inv = rms_scale((double)sums[R], width, rms_eps);
        for (i64 r = threadIdx.x; r < R; r += blockDim.x) mix[r] = sums[r] * inv;
    } else {
        for (i64 r = threadIdx.x; r < R; r += blockDim.x) mix[r] = ((const float*)mix_)[t * R + r];
    }
    __syncthreads();
}

// CTA (s, t): token t's mix (hc_load_mix), its pre and post mappings (CTA s = 0 stores them
// into maps, n_tok x (2n + n^2) = [pre | post | comb]; comb is hc_comb's) and elements
// s*slice .. of the sublayer input x = sum_j pre_j X_j (n_tok x d). Every CTA of a token derives
// the same pre. With n = 4 and slices of at most 16 elements per thread (multiples of 4), the
// streams are loaded as float4 before the mix is reduced, so their latency overlaps it.
extern "C" __global__ void hc_pre(u64 mix_, u64 part_, i64 n_part, u64 base_, u64 scale_, u64 streams_, u64 maps_,
                                  u64 x_, i64 n, i64 d, double eps_d, double rms_eps, i64 slice) {
    PDL_ENTRY();
    const i64 t = blockIdx.y;
    const i64 R = (2 + n) * n, M = 2 * n + n * n;
    __shared__ float mix[(2 + HC_MAX_N) * HC_MAX_N + 1];
    __shared__ float m[2 * HC_MAX_N];
    const float* st = (const float*)streams_ + t * n * d;
    float* x = (float*)x_ + t * d;
    const i64 lo = (i64)blockIdx.x * slice, hi = min64(d, lo + slice);
    constexpr int Q = 4;  // float4 per stream and thread
    const bool vec = n == HC_SPAN_N && d % 4 == 0 && slice % 4 == 0 && slice <= 4 * Q * (i64)blockDim.x;
    float4 s4[Q][HC_SPAN_N];
    if (vec) {
#pragma unroll
        for (int q = 0; q < Q; q++) {
            const i64 e = lo + 4 * (q * (i64)blockDim.x + threadIdx.x);
            if (e < hi)
#pragma unroll
                for (int j = 0; j < HC_SPAN_N; j++) s4[q][j] = *(const float4*)(st + j * d + e);
        }
    }
    hc_load_mix(mix_, part_, n_part, t, R, n * d, rms_eps, mix);
    hc_pre_post(mix, (const float*)base_, (const float*)scale_, m, (int)n, (float)eps_d);
    __syncthreads();
    if (blockIdx.x == 0)
        for (i64 i = threadIdx.x; i < 2 * n; i += blockDim.x) ((float*)maps_)[t * M + i] = m[i];
    if (vec) {
        // Per element the same chain as the loop below: acc = 0, acc += pre_j X_j in j order.
#pragma unroll
        for (int q = 0; q < Q; q++) {
            const i64 e = lo + 4 * (q * (i64)blockDim.x + threadIdx.x);
            if (e < hi) {
                float4 acc = make_float4(0.f, 0.f, 0.f, 0.f);
#pragma unroll
                for (int j = 0; j < HC_SPAN_N; j++) {
                    acc.x += m[j] * s4[q][j].x;
                    acc.y += m[j] * s4[q][j].y;
                    acc.z += m[j] * s4[q][j].z;
                    acc.w += m[j] * s4[q][j].w;
                }
                __stwb((float4*)(x + e), acc);
            }
        }
        return;
    }
    for (i64 i = lo + threadIdx.x; i < hi; i += blockDim.x) {
        float acc = 0.f;
        for (int j = 0; j < n; j++) acc += m[j] * st[j * d + i];
        x[i] = acc;
    }
}

// hc_pre (above) fused with the RMS norm of the sublayer input that follows it and the norm's
// activation quantization (vector_ops.cu's rmsnorm*_f32_v4 on x): a decode sublayer then
// starts without a second dependent launch. CTA t = token t, with the norm kernel's CTA size
// (rms_threads(d) in vector_ops.rs), so that its reduction has the same shape: thread s forms
// elements 8s .. 8s+7 of x, each as hc_pre does (acc = 0, acc += pre_j X_j in j order), stores
// them into x (n_tok x d) and hands them to rmsnorm_row_body as its one cached segment (the
// norm kernels' code): y (n_tok x d) and the quantized forms (q0/d0 Q8_0, qk/dk Q8_K, as
// QUANT selects; n_tok vectors of d) get those kernels' bits. The maps' pre and post are
// hc_pre's. Needs n = HC_SPAN_N (the streams are loaded before the mix is reduced; one
// instance, so that hc_load_mix is inlined), d % 8 == 0 and d <= 8 blockDim.x; the streams, x,
// y and w (null: 1) 16-byte aligned, q0 and qk 8-byte aligned (the _v4 kernels' conditions).
// What hc_pre_norm loads before its PDL wait (no kernel writes weights): its segment of the
// norm weight and, in threads i < n, hc_pre_post's weights; their loads overlap the previous
// kernel's end instead of adding a round trip after the mix barrier.
struct HcPreNormWeights {
    float wv[1][SEG];
    HcPrePostWeights hw;
};
__device__ __forceinline__ HcPreNormWeights hc_pre_norm_prologue(u64 w_, i64 d, u64 base_, u64 scale_) {
    HcPreNormWeights p;
    rmsnorm_load_weight<true, 1>((const float*)w_, d, p.wv);
    p.hw = {0.f, 0.f, 0.f, 0.f};
    if (threadIdx.x < HC_SPAN_N)
        p.hw = hc_pre_post_weights((const float*)base_, (const float*)scale_, HC_SPAN_N, threadIdx.x);
    return p;
}

template <int QUANT>
__device__ __forceinline__ void hc_pre_norm_body(const HcPreNormWeights& pre, u64 mix_, u64 part_, i64 n_part,
                                                 u64 streams_, u64 maps_, u64 x_, i64 n, i64 d, double eps_d,
                                                 double rms_eps, u64 w_, u64 y_, u64 q0_, u64 d0_, u64 qk_, u64 dk_,
                                                 double norm_eps) {
    constexpr int N = HC_SPAN_N;
    const i64 t = blockIdx.x;
    const i64 R = (2 + N) * N, M = 2 * N + N * N;
    __shared__ float mix[(2 + N) * N + 1];
    __shared__ float m[2 * N];
    const float* st = (const float*)streams_ + t * N * d;
    const float* w = (const float*)w_;
    const i64 s = threadIdx.x, nseg = d / SEG;
    const bool valid = s < nseg;
    if (n != N) return;  // (uniform; the launch code checks it)
    // The streams first: their latency overlaps the mix reduction.
    float xs[N][SEG];
    if (valid)
#pragma unroll
        for (int j = 0; j < N; j++) load_seg<true>(st + j * d, s * SEG, d, xs[j]);
    hc_load_mix(mix_, part_, n_part, t, R, N * d, rms_eps, mix);
    if (threadIdx.x < N) hc_pre_post_one(mix, pre.hw, m, N, threadIdx.x, (float)eps_d);
    __syncthreads();
    if (threadIdx.x < 2 * N) ((float*)maps_)[t * M + threadIdx.x] = m[threadIdx.x];
    float* x = (float*)x_ + t * d;
    float v[1][SEG];
#pragma unroll
    for (int e = 0; e < SEG; e++) {
        float acc = 0.f;
        if (valid)
#pragma unroll
            for (int j = 0; j < N; j++) acc += m[j] * xs[j][e];
        v[0][e] = acc;  // 0 past the row end, as rmsnorm_row's
    }
    if (valid) store_seg<true>(x, s * SEG, d, v[0]);
    i8 *q0 = (i8*)q0_, *qk = (i8*)qk_;
    float *d0 = (float*)d0_, *dk = (float*)dk_;
    if (QUANT & QUANT_Q8_0) q0 += t * d, d0 += t * (d / 32);
    if (QUANT & QUANT_Q8_K) qk += t * d, dk += t * (d / 256);
    rmsnorm_row_body<QUANT, true, 1>(v, pre.wv, x, w, (float*)y_ + t * d, q0, d0, qk, dk, d, (float)norm_eps);
}

// The launchable instances by the quantized forms made (as the rmsnorm kernels'): hc_pre's
// parameters, then the norm weight w, its output y, the Q8_0 (q0, d0) and Q8_K (qk, dk)
// outputs (unselected ones 0) and the norm's eps (an f32 value).
#define HC_PRE_NORM_KERNEL(NAME, QUANT)                                                                              \
    extern "C" __global__ void __launch_bounds__(RMS_THREADS)                                                        \
        NAME(u64 mix_, u64 part_, i64 n_part, u64 base_, u64 scale_, u64 streams_, u64 maps_, u64 x_, i64 n, i64 d, \
             double eps_d, double rms_eps, u64 w_, u64 y_, u64 q0_, u64 d0_, u64 qk_, u64 dk_,                       \
             double norm_eps) {                                                                                      \
        PDL_ENTRY_AFTER(const HcPreNormWeights pre = hc_pre_norm_prologue(w_, d, base_, scale_));                    \
        hc_pre_norm_body<QUANT>(pre, mix_, part_, n_part, streams_, maps_, x_, n, d, eps_d, rms_eps, w_, y_, q0_,    \
                                d0_, qk_, dk_, norm_eps);                                                            \
    }
HC_PRE_NORM_KERNEL(hc_pre_norm, QUANT_NONE)
HC_PRE_NORM_KERNEL(hc_pre_norm_q8_0, QUANT_Q8_0)
HC_PRE_NORM_KERNEL(hc_pre_norm_q8_k, QUANT_Q8_K)
HC_PRE_NORM_KERNEL(hc_pre_norm_q8_0_q8_k, QUANT_BOTH)

// Tokens (warps) per CTA of hc_comb.
#define HC_COMB_WARPS 4

// Warp w of CTA c: token t = c * HC_COMB_WARPS + w's comb mapping (the Sinkhorn projection of
// its mix, hc_mix_of_warp's inputs as for hc_pre) into maps[t][2n ..). Each warp works alone
// (no CTA barrier): the mix reduction and the Sinkhorn chain of HC_COMB_WARPS tokens overlap.
extern "C" __global__ void __launch_bounds__(HC_COMB_WARPS * 32)
    hc_comb(u64 mix_, u64 part_, i64 n_part, u64 base_, u64 scale_, u64 maps_, i64 n, i64 d, i64 iters, double eps_d,
            double rms_eps, i64 n_tok) {
    PDL_ENTRY();
    const int warp = threadIdx.x >> 5;
    const i64 t = (i64)blockIdx.x * HC_COMB_WARPS + warp;
    if (t >= n_tok) return;
    const i64 R = (2 + n) * n, M = 2 * n + n * n;
    __shared__ float mix_s[HC_COMB_WARPS][(2 + HC_MAX_N) * HC_MAX_N + 1];
    __shared__ float comb_s[HC_COMB_WARPS][HC_MAX_N * HC_MAX_N];
    float* mix = mix_s[warp];
    float* comb = comb_s[warp];
    hc_mix_of_warp(mix_, part_, n_part, t, R, n * d, rms_eps, mix);
    hc_comb_warp(mix, (const float*)base_, (const float*)scale_, comb, (int)n, iters, (float)eps_d);
    for (i64 i = threadIdx.x & 31; i < n * n; i += 32) ((float*)maps_)[t * M + 2 * n + i] = comb[i];
}

// X'_k = post_k y + sum_j comb[j,k] X_j, in place on the streams (n_tok x n x d).
extern "C" __global__ void hc_post(u64 maps_, u64 y_, u64 streams_, i64 n_tok, i64 n, i64 d) {
    PDL_ENTRY();
    const i64 M = 2 * n + n * n;
    for (i64 idx = (i64)blockIdx.x * blockDim.x + threadIdx.x; idx < n_tok * d; idx += (i64)gridDim.x * blockDim.x) {
        const i64 t = idx / d, i = idx % d;
        const float* mp = (const float*)maps_ + t * M;
        const float* post = mp + n;
        const float* comb = mp + 2 * n;
        float* st = (float*)streams_ + t * n * d;
        float old[HC_MAX_N];
        for (int j = 0; j < n; j++) old[j] = st[j * d + i];
        const float y = ((const float*)y_)[t * d + i];
        for (int k = 0; k < n; k++) {
            float v = post[k] * y;
            for (int j = 0; j < n; j++) v += comb[j * n + k] * old[j];
            st[k * d + i] = v;
        }
    }
}

// The head: a_j = sigmoid(scale mix_j + base_j) + eps, u = sum_j a_j X_j. One CTA per row;
// streams: rows x n x d, mix: rows x n, u: rows x d.
extern "C" __global__ void hc_head(u64 mix_, u64 base_, u64 scale_, u64 streams_, u64 u_, i64 n, i64 d, double eps_d) {
    PDL_ENTRY();
    const i64 r = blockIdx.x;
    __shared__ float a[HC_MAX_N];
    if (threadIdx.x == 0) {
        const float* mix = (const float*)mix_ + r * n;
        const float sc = ((const float*)scale_)[0];
        for (int j = 0; j < n; j++) a[j] = sigmoidf_ref(mix[j] * sc + ((const float*)base_)[j]) + (float)eps_d;
    }
    __syncthreads();
    const float* st = (const float*)streams_ + r * n * d;
    float* u = (float*)u_ + r * d;
    for (i64 i = threadIdx.x; i < d; i += blockDim.x) {
        float acc = 0.f;
        for (int j = 0; j < n; j++) acc += a[j] * st[j * d + i];
        u[i] = acc;
    }
}
