// Attention pieces: RoPE on vector tails, ds4's KV/indexer rounding, the window ring, attention
// with sinks over window + compressed rows, and the grouped output layout (cpu/forward.rs
// attention path, cpu/attention.rs, cpu/rope.rs, numerics.rs; dsv4-arch.md §3.4-3.9).

// Rotates the last r channels of n_rows vectors of `width` (row i belongs to token
// i / rows_per_tok, at position pos0 + token; pos0 = *pos_, device memory so that a captured
// decode graph replays at every position). One thread per pair.
extern "C" __global__ void rope_tail(u64 x_, i64 n_rows, i64 width, i64 rows_per_tok, u64 pos_, u64 inv_freq_, i64 r,
                                     i64 inverse) {
    PDL_ENTRY();
    const i64 pos0 = *(const i64*)pos_;
    const i64 half = r / 2;
    for (i64 idx = (i64)blockIdx.x * blockDim.x + threadIdx.x; idx < n_rows * half; idx += (i64)gridDim.x * blockDim.x) {
        const i64 row = idx / half;
        const int l = (int)(idx % half);
        rope_pair((float*)x_ + row * width, width, r, l, pos0 + row / rows_per_tok, (const double*)inv_freq_,
                  inverse != 0);
    }
}

// The nr rows a token at position pos attends to, in order: the nw positions of its window
// from `first` (the ring), then its compressed rows: every ratio-th position so far (kind 1),
// the indexer's selection, whose count selc_ holds per token t (kind 2), or none (kind 0). CG:
// the count is read through L2 (a kernel's read before its PDL wait, see common.cuh).
struct TokenRows {
    i64 first, nw, nr;
};
template <bool CG>
__device__ __forceinline__ TokenRows token_rows(i64 pos, i64 window, i64 kind, i64 ratio, u64 selc_, i64 t) {
    const i64 first = pos + 1 > window ? pos + 1 - window : 0;
    const i64 nw = pos - first + 1;
    i64 nc = 0;
    if (kind == 1) {
        nc = (pos + 1) / ratio;
    } else if (kind == 2) {
        const int* selc = (const int*)selc_ + t;
        nc = CG ? ldcg_i32(selc) : *selc;
    }
    return {first, nw, nw + nc};
}

// One row of `width` values per CTA (row i of token i / rows_per_tok, at position pos0 +
// token): RMS norm (times w when w_ != 0), RoPE of the last r channels, and when nope >= 0
// ds4's stored-KV rounding (FP8 round trip of the first `nope` channels in blocks of 64, then
// f16 rounding of every channel: cpu/forward.rs store_kv_row) — the per-head query norm + RoPE,
// or the K=V row's norm + RoPE + rounding, in one launch (the same
// element formulas; the row's sum of squares in f64 as rmsnorm does). With ring_ != 0 each row
// is also stored into the K=V ring at slot (its position) % ring_cap, as ring_store does (a
// decode step's row: its slot holds a position outside the window, so attend may run after).
// Dynamic shared: width floats.
#define HNR_CTA_W 4  // weights per thread that head_norm_rope loads before its PDL wait
// What head_norm_rope does before its PDL wait, off the decode's serial chain: this thread's
// weights (up to HNR_CTA_W; ones without w) and its RoPE pair's rotation. Nothing in flight
// writes them: the position is uploaded before the span's kernels (read through L2, as
// attend_split_values reads it).
struct HnrPre {
    float wv[HNR_CTA_W];
    float2 rot;
    i64 pos;
};
__device__ __forceinline__ HnrPre head_norm_rope_prologue(u64 w_, i64 width, i64 rows_per_tok, u64 pos_,
                                                          u64 inv_freq_, i64 r) {
    HnrPre p;
    const float* w = (const float*)w_;
#pragma unroll
    for (int j = 0; j < HNR_CTA_W; j++) {
        const i64 i = threadIdx.x + (i64)j * blockDim.x;
        p.wv[j] = w && i < width ? w[i] : 1.0f;
    }
    p.pos = ldcg_i64((const void*)pos_) + (i64)blockIdx.x / rows_per_tok;
    p.rot = threadIdx.x < r / 2 ? rope_rotation(p.pos, ((const double*)inv_freq_)[threadIdx.x], false)
                                : make_float2(0.f, 0.f);
    return p;
}
extern "C" __global__ void head_norm_rope(u64 x_, u64 w_, u64 y_, i64 width, double eps, i64 rows_per_tok,
                                          u64 pos_, u64 inv_freq_, i64 r, i64 nope, u64 ring_, i64 ring_cap) {
    PDL_ENTRY_AFTER(const HnrPre pre = head_norm_rope_prologue(w_, width, rows_per_tok, pos_, inv_freq_, r));
    const i64 ri = blockIdx.x;
    const float* w = (const float*)w_;
    extern __shared__ float row[];
    const float* x = (const float*)x_ + ri * width;
    double ss = 0.0;
    for (i64 i = threadIdx.x; i < width; i += blockDim.x) {
        const float v = x[i];
        row[i] = v;
        ss += (double)v * (double)v;
    }
    ss = cta_sum_f64(ss);
    const float scale = rms_scale(ss, width, eps);
#pragma unroll
    for (int j = 0; j < HNR_CTA_W; j++) {
        const i64 i = threadIdx.x + (i64)j * blockDim.x;
        if (i < width) row[i] = row[i] * scale * pre.wv[j];
    }
    for (i64 i = threadIdx.x + HNR_CTA_W * (i64)blockDim.x; i < width; i += blockDim.x)
        row[i] = row[i] * scale * (w ? w[i] : 1.0f);
    __syncthreads();
    for (int l = threadIdx.x; l < r / 2; l += blockDim.x)
        rope_rotate(row + (width - r) + 2 * l,
                    l == (int)threadIdx.x ? pre.rot : rope_rotation(pre.pos, ((const double*)inv_freq_)[l], false));
    __syncthreads();
    if (nope >= 0) {
        const int warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
        for (i64 b = warp; b * 64 < nope; b += warps) fp8_block_warp(row + b * 64, (int)min64(64, nope - b * 64));
        __syncthreads();
        for (i64 i = threadIdx.x; i < width; i += blockDim.x) row[i] = f16_round(row[i]);
    }
    float* y = (float*)y_ + ri * width;
    for (i64 i = threadIdx.x; i < width; i += blockDim.x) y[i] = row[i];
    if (ring_) {
        float* slot = (float*)ring_ + (pre.pos % ring_cap) * width;
        for (i64 i = threadIdx.x; i < width; i += blockDim.x) slot[i] = row[i];
    }
}

// RoPE of the last r channels (width - r even) of a row that one warp holds as v[j] = element
// lane + 32 j, j < J <= MAXJ, at position pos: each pair's sine and cosine computed once into
// the warp's table rot (r / 2 entries, as rope_pair_at computes them), then every tail element
// combined with its pair's other element (lane ^ 1, same j) by rope_first / rope_second.
template <int MAXJ>
__device__ __forceinline__ void rope_tail_warp(float (&v)[MAXJ], int J, float2* rot, i64 width, i64 r, i64 pos,
                                               const double* inv_freq) {
    const int lane = threadIdx.x & 31;
    const i64 half = r / 2, tail = width - r;
    for (i64 l = lane; l < half; l += 32) {
        double sn, cs;
        sincos((double)pos * inv_freq[l], &sn, &cs);
        rot[l] = make_float2((float)(1.0 * sn), (float)cs);
    }
    __syncwarp();
#pragma unroll
    for (int j = 0; j < MAXJ; j++) {
        if (j >= J || 32 * (j + 1) <= tail) continue;  // uniform: the row's tail columns only
        const i64 e = lane + 32 * j;
        const float other = __shfl_xor_sync(FULL_MASK, v[j], 1);
        if (e >= tail) {
            const float2 sc = rot[(e - tail) >> 1];
            const bool first = ((e - tail) & 1) == 0;
            v[j] = first ? rope_first(v[j], other, sc.x, sc.y) : rope_second(other, v[j], sc.x, sc.y);
        }
    }
}

// head_norm_rope without the KV rounding (nope < 0: the per-head query norm + RoPE) for rows of
// width = 32 J values (J <= HNR_MAX_J, width - r even), one warp per row and HNR_WARPS rows
// per CTA. A prefill span has n_tok x 64 query heads: head_norm_rope's one 128-thread CTA per
// row, with its three CTA barriers and the double-precision work of a whole CTA's latency per
// 2 KB row, took ~1.5 ms per layer and 2 048-token span (9.5 % of the prefill's kernel time).
// Same bits as head_norm_rope: lane l holds elements l + 32 j, which are head_norm_rope's
// thread (l + 32 j) % 128 terms, so the four partial sums of squares (one per warp there, each
// over its terms in order) are formed, reduced by the same xor tree and added in the same
// order; the scale, the weight and the rotation (rope_tail_warp) are the same expressions.
#define HNR_WARPS 8
#define HNR_MAX_J 32
extern "C" __global__ void __launch_bounds__(HNR_WARPS * 32)
    head_norm_rope_rows(u64 x_, u64 w_, u64 y_, i64 n_rows, i64 width, double eps, i64 rows_per_tok, u64 pos_,
                        u64 inv_freq_, i64 r) {
    PDL_ENTRY();
    __shared__ float2 rot[HNR_WARPS][HNR_MAX_J * 16];  // (sin, cos) of the row's r / 2 pairs
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const i64 ri = (i64)blockIdx.x * HNR_WARPS + warp;
    if (ri >= n_rows) return;  // (no CTA barrier below)
    const int J = (int)(width / 32);
    const float* x = (const float*)x_ + ri * width;
    const float* w = (const float*)w_;
    float v[HNR_MAX_J];
#pragma unroll
    for (int j = 0; j < HNR_MAX_J; j++)
        if (j < J) v[j] = x[lane + 32 * j];
    // head_norm_rope's warp q = j % 4 sums its thread's terms j = q, q + 4, ... in order.
    double part[4] = {0.0, 0.0, 0.0, 0.0};
#pragma unroll
    for (int j = 0; j < HNR_MAX_J; j++)
        if (j < J) part[j % 4] += (double)v[j] * (double)v[j];
#pragma unroll
    for (int q = 0; q < 4; q++)
#pragma unroll
        for (int o = 16; o > 0; o >>= 1) part[q] += __shfl_xor_sync(FULL_MASK, part[q], o);
    double ss = 0.0;
#pragma unroll
    for (int q = 0; q < 4; q++) ss += part[q];
    const float scale = rms_scale(ss, width, eps);
#pragma unroll
    for (int j = 0; j < HNR_MAX_J; j++)
        if (j < J) v[j] = v[j] * scale * (w ? w[lane + 32 * j] : 1.0f);

    const i64 pos = *(const i64*)pos_ + ri / rows_per_tok;
    rope_tail_warp<HNR_MAX_J>(v, J, rot[warp], width, r, pos, (const double*)inv_freq_);
    float* y = (float*)y_ + ri * width;
#pragma unroll
    for (int j = 0; j < HNR_MAX_J; j++)
        if (j < J) y[lane + 32 * j] = v[j];
}

// ds4's indexer rounding of one vector per CTA: Hadamard rotation, FP4 round trip in blocks
// of 32, and (store != 0) f16 rounding (cpu/forward.rs index_qat). With r > 0 the vector's RoPE
// comes first (rope_tail's: the last r channels, row i of token i / rows_per_tok at position
// pos0 + token), one launch for the indexer queries' rope + rounding. Dynamic shared: width
// floats.
extern "C" __global__ void index_round(u64 x_, i64 width, i64 store, i64 rows_per_tok, u64 pos_, u64 inv_freq_,
                                       i64 r) {
    PDL_ENTRY();
    extern __shared__ float sh[];
    float* row = (float*)x_ + (i64)blockIdx.x * width;
    for (i64 i = threadIdx.x; i < width; i += blockDim.x) sh[i] = row[i];
    if (r > 0) {
        __syncthreads();
        const i64 pos = *(const i64*)pos_ + (i64)blockIdx.x / rows_per_tok;
        for (int l = threadIdx.x; l < r / 2; l += blockDim.x)
            rope_pair(sh, width, r, l, pos, (const double*)inv_freq_, false);
    }
    cta_hadamard(sh, (int)width);
    const int warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
    for (i64 b = warp; b * 32 < width; b += warps) fp4_block_warp(sh + b * 32, (int)min64(32, width - b * 32));
    __syncthreads();
    for (i64 i = threadIdx.x; i < width; i += blockDim.x) row[i] = store ? f16_round(sh[i]) : sh[i];
}

// index_round for a span's many rows (the indexer queries: n_tok x 64 heads of 128), one warp
// per row of width = 32 J values (J <= IDXR_MAX_J, a power of two) and IDXR_WARPS rows per
// CTA: index_round's one CTA per 512-byte row waited on seven CTA barriers for its Hadamard
// transform. Same bits: lane l holds elements l + 32 j; every butterfly of every stage adds or
// subtracts the same two values (stages below 32 across lanes by shuffles, the others inside
// a lane), the RoPE is rope_tail_warp, the FP4 block of 32 is one j across the warp.
#define IDXR_WARPS 8
#define IDXR_MAX_J 8
extern "C" __global__ void __launch_bounds__(IDXR_WARPS * 32)
    index_round_rows(u64 x_, i64 n_rows, i64 width, i64 store, i64 rows_per_tok, u64 pos_, u64 inv_freq_, i64 r) {
    PDL_ENTRY();
    __shared__ float2 rot[IDXR_WARPS][IDXR_MAX_J * 16];
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const i64 ri = (i64)blockIdx.x * IDXR_WARPS + warp;
    if (ri >= n_rows) return;  // (no CTA barrier below)
    const int J = (int)(width / 32);
    float* x = (float*)x_ + ri * width;
    float v[IDXR_MAX_J];
#pragma unroll
    for (int j = 0; j < IDXR_MAX_J; j++)
        if (j < J) v[j] = x[lane + 32 * j];
    if (r > 0) {
        const i64 pos = *(const i64*)pos_ + ri / rows_per_tok;
        rope_tail_warp<IDXR_MAX_J>(v, J, rot[warp], width, r, pos, (const double*)inv_freq_);
    }
    // Hadamard (cta_hadamard's butterflies: the lower element gets u + v, the upper u - v).
    for (int h = 1; h < 32 && h < width; h *= 2) {
        const bool upper = (lane & h) != 0;
#pragma unroll
        for (int j = 0; j < IDXR_MAX_J; j++) {
            if (j >= J) continue;
            const float other = __shfl_xor_sync(FULL_MASK, v[j], h);
            v[j] = upper ? other - v[j] : v[j] + other;
        }
    }
#pragma unroll
    for (int k = 1; k < IDXR_MAX_J; k *= 2) {
        if (k >= J) break;
        float t[IDXR_MAX_J];
#pragma unroll
        for (int j = 0; j < IDXR_MAX_J; j++)
            if (j < J) t[j] = (j & k) ? v[j ^ k] - v[j] : v[j] + v[j ^ k];
#pragma unroll
        for (int j = 0; j < IDXR_MAX_J; j++)
            if (j < J) v[j] = t[j];
    }
    const float sc = 1.0f / sqrtf((float)width);
#pragma unroll
    for (int j = 0; j < IDXR_MAX_J; j++)
        if (j < J) v[j] *= sc;
    // FP4 round trip per block of 32 (fp4_block_warp's arithmetic), then the store rounding.
#pragma unroll
    for (int j = 0; j < IDXR_MAX_J; j++) {
        if (j >= J) continue;
        float amax = fabsf(v[j]);
#pragma unroll
        for (int o = 16; o > 0; o >>= 1) amax = fmaxf(amax, __shfl_xor_sync(FULL_MASK, amax, o));
        const float scale = pow2_scale(amax, 7.05e-38f, FP4_MAX);
        const float q = fp4_e2m1_nearest(fminf(fmaxf(v[j] / scale, -FP4_MAX), FP4_MAX)) * scale;
        x[lane + 32 * j] = store ? f16_round(q) : q;
    }
}

// Stores the span's last min(n_tok, cap) K=V rows into the ring (slot = position % cap).
extern "C" __global__ void ring_store(u64 kv_, u64 ring_, i64 n_tok, u64 pos_, i64 hd, i64 cap) {
    PDL_ENTRY();
    const i64 pos0 = *(const i64*)pos_;
    const i64 start = n_tok > cap ? n_tok - cap : 0;
    const i64 total = (n_tok - start) * hd;
    for (i64 idx = (i64)blockIdx.x * blockDim.x + threadIdx.x; idx < total; idx += (i64)gridDim.x * blockDim.x) {
        const i64 t = start + idx / hd, c = idx % hd;
        ((float*)ring_)[((pos0 + t) % cap) * hd + c] = ((const float*)kv_)[t * hd + c];
    }
}

// Attention of one (token, head) per CTA over its window rows (positions
// max(0, pos+1-window)..=pos: earlier ones from the ring, the span's own from kv) and its
// compressed rows (kind 1 = HCA: rows 0..(pos+1)/ratio; kind 2 = CSA: the indexer's
// selection; kind 0: none), with the head's sink logit; then the inverse RoPE of the output
// tail (cpu/attention.rs attend_head). Dynamic shared: 2*hd + max rows floats, then max rows
// row pointers.
extern "C" __global__ void attend(u64 q_, u64 kv_, u64 ring_, u64 comp_, u64 sel_, u64 selc_, u64 sinks_, u64 out_,
                                  i64 H, i64 hd, u64 pos_, i64 window, i64 ring_cap, i64 kind, i64 ratio,
                                  i64 sel_stride, double scale_d, u64 inv_freq_, i64 r, i64 max_rows) {
    PDL_ENTRY();
    extern __shared__ float sh[];
    float* qs = sh;
    float* os = sh + hd;
    float* sc = sh + 2 * hd;
    const float** rp = (const float**)(sh + ((2 * hd + max_rows + 1) & ~(i64)1));
    __shared__ float red[32];
    __shared__ float mx_s, den_s;
    const i64 pos0 = *(const i64*)pos_;
    const i64 t = blockIdx.x / H, h = blockIdx.x % H;
    const i64 pos = pos0 + t;
    const TokenRows rows = token_rows<false>(pos, window, kind, ratio, selc_, t);
    const i64 first = rows.first, nw = rows.nw, nr = rows.nr;
    const float* kv = (const float*)kv_;
    const float* ring = (const float*)ring_;
    const float* comp = (const float*)comp_;
    const int* sel = (const int*)sel_ + t * sel_stride;
    const float* q = (const float*)q_ + (t * H + h) * hd;
    for (i64 c = threadIdx.x; c < hd; c += blockDim.x) qs[c] = q[c];
    for (i64 j = threadIdx.x; j < nr; j += blockDim.x) {
        const float* p;
        if (j < nw) {
            const i64 ps = first + j;
            p = ps >= pos0 ? kv + (ps - pos0) * hd : ring + (ps % ring_cap) * hd;
        } else {
            p = comp + (kind == 1 ? j - nw : (i64)sel[j - nw]) * hd;
        }
        rp[j] = p;
    }
    __syncthreads();
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
    const float scale = (float)scale_d;
    for (i64 j = warp; j < nr; j += nwarps) {
        const float* k = rp[j];
        float s = 0.f;
        for (i64 c = lane; c < hd; c += 32) s += qs[c] * k[c];
        s = warp_sum(s);
        if (lane == 0) sc[j] = s * scale;
    }
    __syncthreads();
    // Softmax with the sink: max, exponentials, and their sum with the sink's.
    const float sink = ((const float*)sinks_)[h];
    float m = -FWD_INF;
    for (i64 j = threadIdx.x; j < nr; j += blockDim.x) m = fmaxf(m, sc[j]);
    m = warp_max(m);
    if (lane == 0) red[warp] = m;
    __syncthreads();
    if (threadIdx.x == 0) {
        float mm = sink;
        for (int w = 0; w < nwarps; w++) mm = fmaxf(mm, red[w]);
        mx_s = mm;
    }
    __syncthreads();
    const float mx = mx_s;
    float part = 0.f;
    for (i64 j = threadIdx.x; j < nr; j += blockDim.x) {
        const float e = expf(sc[j] - mx);
        sc[j] = e;
        part += e;
    }
    part = warp_sum(part);
    __syncthreads();
    if (lane == 0) red[warp] = part;
    __syncthreads();
    if (threadIdx.x == 0) {
        float den = expf(sink - mx);
        for (int w = 0; w < nwarps; w++) den += red[w];
        den_s = den;
    }
    __syncthreads();
    const float den = den_s;
    for (i64 j = threadIdx.x; j < nr; j += blockDim.x) sc[j] = sc[j] / den;
    __syncthreads();
    for (i64 c = threadIdx.x; c < hd; c += blockDim.x) {
        float acc = 0.f;
        i64 j = 0;
        for (; j + 4 <= nr; j += 4) {
            const float a0 = rp[j][c], a1 = rp[j + 1][c], a2 = rp[j + 2][c], a3 = rp[j + 3][c];
            acc += sc[j] * a0;
            acc += sc[j + 1] * a1;
            acc += sc[j + 2] * a2;
            acc += sc[j + 3] * a3;
        }
        for (; j < nr; j++) acc += sc[j] * rp[j][c];
        os[c] = acc;
    }
    __syncthreads();
    for (int l = threadIdx.x; l < r / 2; l += blockDim.x) rope_pair(os, hd, r, l, pos, (const double*)inv_freq_, true);
    __syncthreads();
    float* out = (float*)out_ + (t * H + h) * hd;
    for (i64 c = threadIdx.x; c < hd; c += blockDim.x) out[c] = os[c];
}

// og[g][t][c] = o[t][g*gw + c]: each output group's heads as one vector per token.
extern "C" __global__ void group_split(u64 o_, u64 og_, i64 n_tok, i64 G, i64 gw) {
    PDL_ENTRY();
    const i64 total = n_tok * G * gw;
    for (i64 idx = (i64)blockIdx.x * blockDim.x + threadIdx.x; idx < total; idx += (i64)gridDim.x * blockDim.x) {
        const i64 g = idx / (n_tok * gw), rem = idx % (n_tok * gw), t = rem / gw, c = rem % gw;
        ((float*)og_)[idx] = ((const float*)o_)[t * G * gw + g * gw + c];
    }
}

// z[t][g*dg + c] = zg[g][t][c]: the groups' projections back in token-major order.
extern "C" __global__ void group_merge(u64 zg_, u64 z_, i64 n_tok, i64 G, i64 dg) {
    PDL_ENTRY();
    const i64 total = n_tok * G * dg;
    for (i64 idx = (i64)blockIdx.x * blockDim.x + threadIdx.x; idx < total; idx += (i64)gridDim.x * blockDim.x) {
        const i64 g = idx / (n_tok * dg), rem = idx % (n_tok * dg), t = rem / dg, c = rem % dg;
        ((float*)z_)[t * G * dg + g * dg + c] = ((const float*)zg_)[idx];
    }
}

// ---- attend_heads: prefill attention of one token and ATTN_HG heads per CTA ----
//
// All heads of a token attend over the same K=V rows, so one CTA stages the token's rows in
// shared memory once (ATTN_TR rows per tile, two tiles in flight through cp.async) and
// computes ATTN_HG heads from them, instead of attend's one CTA per head re-reading every row
// from L2. Two passes over the rows keep attend's arithmetic operation for operation, so the
// outputs are bit-identical to attend launched with the same ATTN_THREADS threads:
//  1. scores: lane l of a warp owns channels l, l+32, ... of 4 heads (q kept in registers) and
//     sums q·k over them for 8 rows, in attend's channel order; a butterfly over the warp then
//     adds the 32 lane partials of each (head, row) in warp_sum's pairing (16, 8, 4, 2, 1),
//     trading halves instead of whole registers so that 32 sums cost 31 shuffles, not 160;
//  2. softmax with the sink per head, with attend's thread/warp split of the max and the sum;
//  3. outputs: each thread accumulates 8 heads x 4 channels over the rows in ascending order,
//     then the inverse RoPE of the tails and the store (out[(t*H + h)*hd + c], as attend).
// Dynamic shared memory: 2 tiles of ATTN_TR x ATTN_HD floats (reused for the outputs), then
// max_rows x ATTN_HG scores (row-major: the ATTN_HG heads of a row side by side).
#define ATTN_HD 512      // head width the kernel is built for
#define ATTN_HG 16       // heads per CTA
#define ATTN_TR 16       // K=V rows per shared-memory tile
#define ATTN_THREADS 256 // 8 warps; the softmax split is attend's at its 256 threads
#define ATTN_CPL (ATTN_HD / 32)

// Row j of a token's attention rows, in attend's order: the window from its oldest position
// (earlier positions from the ring, the span's own from kv), then the compressed rows (kind 1:
// every one in order; kind 2: selected ones, sel_of(i) giving the i-th selection's index, read
// only for such a row).
template <class SelOf>
__device__ __forceinline__ const float* attn_row_of(i64 j, i64 nw, i64 first, i64 pos0, const float* kv,
                                                    const float* ring, i64 ring_cap, const float* comp, i64 kind,
                                                    SelOf sel_of) {
    if (j < nw) {
        const i64 ps = first + j;
        return ps >= pos0 ? kv + (ps - pos0) * ATTN_HD : ring + (ps % ring_cap) * ATTN_HD;
    }
    return comp + (kind == 1 ? j - nw : (i64)sel_of(j - nw)) * ATTN_HD;
}
// attn_row_of with the selection indices in `sel`.
__device__ __forceinline__ const float* attn_row(i64 j, i64 nw, i64 first, i64 pos0, const float* kv,
                                                 const float* ring, i64 ring_cap, const float* comp, i64 kind,
                                                 const int* sel) {
    return attn_row_of(j, nw, first, pos0, kv, ring, ring_cap, comp, kind, [sel](i64 i) { return sel[i]; });
}

// Starts copying rows row0 .. row0 + ATTN_TR of the token into `tile` (one cp.async group):
// warp w copies rows w and w + 8, 16 bytes per lane per step. Rows at or past nr are zeros.
// `row(j)` gives row j's address (called by all lanes of the warp alike).
template <class RowAt>
__device__ __forceinline__ void attn_stage(float* tile, i64 row0, i64 nr, const RowAt& row) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    for (int r = warp; r < ATTN_TR; r += ATTN_THREADS / 32) {
        float* dst = tile + r * ATTN_HD;
        const i64 j = row0 + r;
        if (j < nr) {
            const float* src = row(j);
            for (int c = 4 * lane; c < ATTN_HD; c += 128) cp_async16(dst + c, src + c);
        } else {
            for (int c = 4 * lane; c < ATTN_HD; c += 128) *(float4*)(dst + c) = make_float4(0.f, 0.f, 0.f, 0.f);
        }
    }
    cp_async_commit();
}

// Sums 32 values across the warp at once: v[k] of every lane, for k = 0..31, reduced with
// warp_sum's pairing (lane ^ 16, then ^ 8, 4, 2, 1). At each step a lane keeps one half of
// its values and trades the other half with its partner, so lane l ends with the sum of
// index l (float addition commutes, so every pairwise sum equals warp_sum's).
template <int O>
__device__ __forceinline__ void warp_sum_transposed_step(float (&v)[32], int lane) {
    const bool up = (lane & O) != 0;
#pragma unroll
    for (int k = 0; k < O; k++) {
        const float send = up ? v[k] : v[k + O];
        const float keep = up ? v[k + O] : v[k];
        v[k] = keep + __shfl_xor_sync(FULL_MASK, send, O);
    }
}
__device__ __forceinline__ float warp_sum_transposed32(float (&v)[32]) {
    const int lane = threadIdx.x & 31;
    warp_sum_transposed_step<16>(v, lane);
    warp_sum_transposed_step<8>(v, lane);
    warp_sum_transposed_step<4>(v, lane);
    warp_sum_transposed_step<2>(v, lane);
    warp_sum_transposed_step<1>(v, lane);
    return v[0];
}

// Pass 1 of attend_heads over the token's rows row_lo .. row_hi (row_lo a multiple of
// ATTN_TR; row(j) gives row j's address): the scores q·k × scale of heads h0 .. h0 + ATTN_HG
// (q_tok: head h0's query) go to sc[(j - row_lo) * sj + hl * sh] for row j and head h0 + hl.
// Warp w: heads 4*(w & 3) .. +4, rows 8*(w >> 2) .. +8 of each ATTN_TR-row tile; `tiles`
// holds two tiles. Ends synchronized.
template <class RowAt>
__device__ __forceinline__ void attn_scores_pass(float* tiles, const float* q_tok, i64 row_lo, i64 row_hi,
                                                 const RowAt& row, float scale, float* sc, i64 sj, i64 sh) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int hq = warp & 3, rs = (warp >> 2) * 8;
    const i64 ntiles = (row_hi - row_lo + ATTN_TR - 1) / ATTN_TR;
    float q[4][ATTN_CPL];
#pragma unroll
    for (int g = 0; g < 4; g++) {
        const float* qh = q_tok + (4 * hq + g) * ATTN_HD + lane;
#pragma unroll
        for (int i = 0; i < ATTN_CPL; i++) q[g][i] = qh[32 * i];
    }
    attn_stage(tiles, row_lo, row_hi, row);
    for (i64 tl = 0; tl < ntiles; tl++) {
        if (tl + 1 < ntiles) {
            attn_stage(tiles + ((tl + 1) & 1) * ATTN_TR * ATTN_HD, row_lo + (tl + 1) * ATTN_TR, row_hi, row);
            cp_async_wait_all_but_newest();
        } else {
            cp_async_wait_all();
        }
        __syncthreads();
        const i64 row0 = row_lo + tl * ATTN_TR + rs;
        if (row0 < row_hi) {
            const float* kb = tiles + (tl & 1) * ATTN_TR * ATTN_HD + rs * ATTN_HD + lane;
            float acc[32];
#pragma unroll
            for (int k = 0; k < 32; k++) acc[k] = 0.f;
#pragma unroll
            for (int i = 0; i < ATTN_CPL; i++) {
                float kr[8];
#pragma unroll
                for (int j = 0; j < 8; j++) kr[j] = kb[j * ATTN_HD + 32 * i];
#pragma unroll
                for (int g = 0; g < 4; g++) {
#pragma unroll
                    for (int j = 0; j < 8; j++) acc[g * 8 + j] += q[g][i] * kr[j];
                }
            }
            // Lane l now holds head 4*hq + (l >> 3), row row0 + (l & 7).
            const float s = warp_sum_transposed32(acc);
            const i64 j = row0 + (lane & 7);
            if (j < row_hi) sc[(j - row_lo) * sj + (4 * hq + (lane >> 3)) * sh] = s * scale;
        }
        __syncthreads();
    }
}

// Same parameters and meaning as attend, for spans: grid n_tok x (H / ATTN_HG), ATTN_THREADS
// threads, hd == ATTN_HD, H a multiple of ATTN_HG, kv / ring / comp 16-byte aligned (the
// launcher, attend.rs, checks all of this).
extern "C" __global__ void __launch_bounds__(ATTN_THREADS, 2)
    attend_heads(u64 q_, u64 kv_, u64 ring_, u64 comp_, u64 sel_, u64 selc_, u64 sinks_, u64 out_, i64 H, i64 hd,
                 u64 pos_, i64 window, i64 ring_cap, i64 kind, i64 ratio, i64 sel_stride, double scale_d,
                 u64 inv_freq_, i64 r, i64 max_rows) {
    PDL_ENTRY();
    extern __shared__ __align__(16) float sh[];
    float* tiles = sh;                             // 2 x ATTN_TR x ATTN_HD; later the outputs
    float* sc = sh + 2 * ATTN_TR * ATTN_HD;         // max_rows x ATTN_HG scores, then weights
    __shared__ float red[ATTN_HG][ATTN_THREADS / 32];
    __shared__ float mx_s[ATTN_HG], den_s[ATTN_HG];
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const i64 groups = H / ATTN_HG;
    const i64 t = blockIdx.x / groups, h0 = (blockIdx.x % groups) * ATTN_HG;
    const i64 pos0 = *(const i64*)pos_;
    const i64 pos = pos0 + t;
    const TokenRows rows = token_rows<false>(pos, window, kind, ratio, selc_, t);
    const i64 first = rows.first, nw = rows.nw, nr = rows.nr;
    const float* kv = (const float*)kv_;
    const float* ring = (const float*)ring_;
    const float* comp = (const float*)comp_;
    const int* sel = (const int*)sel_ + t * sel_stride;
    float* out = (float*)out_ + (t * H + h0) * ATTN_HD;
    if (hd != ATTN_HD) return;  // the launcher never does this: the layout is ATTN_HD wide
    if (nr > max_rows) {
        // More rows than the launch sized shared memory for: NaN outputs instead of overflowing.
        for (int c = tid; c < ATTN_HG * ATTN_HD; c += ATTN_THREADS) out[c] = __int_as_float(0x7fc00000);
        return;
    }
    const i64 ntiles = (nr + ATTN_TR - 1) / ATTN_TR;
    const float scale = (float)scale_d;

    const auto row = [&](i64 j) { return attn_row(j, nw, first, pos0, kv, ring, ring_cap, comp, kind, sel); };

    // Pass 1: scores of every row, into shared memory (row-major, the heads side by side).
    attn_scores_pass(tiles, (const float*)q_ + (t * H + h0) * ATTN_HD, 0, nr, row, scale, sc, ATTN_HG, 1);

    // Pass 2: softmax with the sink, per head: attend's split over 256 threads and 8 warps.
    {
        float m[ATTN_HG];
#pragma unroll
        for (int h = 0; h < ATTN_HG; h++) m[h] = -FWD_INF;
        for (i64 j = tid; j < nr; j += ATTN_THREADS) {
#pragma unroll
            for (int h = 0; h < ATTN_HG; h++) m[h] = fmaxf(m[h], sc[j * ATTN_HG + h]);
        }
#pragma unroll
        for (int h = 0; h < ATTN_HG; h++) {
            const float v = warp_max(m[h]);
            if (lane == 0) red[h][warp] = v;
        }
        __syncthreads();
        if (tid < ATTN_HG) {
            float mm = ((const float*)sinks_)[h0 + tid];
            for (int w = 0; w < ATTN_THREADS / 32; w++) mm = fmaxf(mm, red[tid][w]);
            mx_s[tid] = mm;
        }
        __syncthreads();
        float part[ATTN_HG];
#pragma unroll
        for (int h = 0; h < ATTN_HG; h++) part[h] = 0.f;
        for (i64 j = tid; j < nr; j += ATTN_THREADS) {
#pragma unroll
            for (int h = 0; h < ATTN_HG; h++) {
                const float e = expf(sc[j * ATTN_HG + h] - mx_s[h]);
                sc[j * ATTN_HG + h] = e;
                part[h] += e;
            }
        }
#pragma unroll
        for (int h = 0; h < ATTN_HG; h++) {
            const float v = warp_sum(part[h]);
            if (lane == 0) red[h][warp] = v;
        }
        __syncthreads();
        if (tid < ATTN_HG) {
            float den = expf(((const float*)sinks_)[h0 + tid] - mx_s[tid]);
            for (int w = 0; w < ATTN_THREADS / 32; w++) den += red[tid][w];
            den_s[tid] = den;
        }
        __syncthreads();
        for (i64 j = tid; j < nr; j += ATTN_THREADS) {
#pragma unroll
            for (int h = 0; h < ATTN_HG; h++) sc[j * ATTN_HG + h] = sc[j * ATTN_HG + h] / den_s[h];
        }
        __syncthreads();
    }

    // Pass 3: outputs. Thread: heads 8*(w >> 2) .. +8, channels 4*cq .. +4, rows ascending.
    const int hh = (warp >> 2) * 8, cq = (warp & 3) * 32 + lane;
    float acc[8][4];
#pragma unroll
    for (int g = 0; g < 8; g++) acc[g][0] = acc[g][1] = acc[g][2] = acc[g][3] = 0.f;
    attn_stage(tiles, 0, nr, row);
    for (i64 tl = 0; tl < ntiles; tl++) {
        if (tl + 1 < ntiles) {
            attn_stage(tiles + ((tl + 1) & 1) * ATTN_TR * ATTN_HD, (tl + 1) * ATTN_TR, nr, row);
            cp_async_wait_all_but_newest();
        } else {
            cp_async_wait_all();
        }
        __syncthreads();
        const float* kb = tiles + (tl & 1) * ATTN_TR * ATTN_HD + 4 * cq;
        const float* pb = sc + tl * ATTN_TR * ATTN_HG + hh;
        const int rows = (int)min64(ATTN_TR, nr - tl * ATTN_TR);
        for (int j = 0; j < rows; j++) {
            const float4 pa = *(const float4*)(pb + j * ATTN_HG);
            const float4 pz = *(const float4*)(pb + j * ATTN_HG + 4);
            const float4 k = *(const float4*)(kb + j * ATTN_HD);
            const float p[8] = {pa.x, pa.y, pa.z, pa.w, pz.x, pz.y, pz.z, pz.w};
#pragma unroll
            for (int g = 0; g < 8; g++) {
                acc[g][0] += p[g] * k.x;
                acc[g][1] += p[g] * k.y;
                acc[g][2] += p[g] * k.z;
                acc[g][3] += p[g] * k.w;
            }
        }
        __syncthreads();
    }
    // The tiles are free: the outputs go there for the inverse RoPE, then out.
    float* os = tiles;
#pragma unroll
    for (int g = 0; g < 8; g++)
        *(float4*)(os + (hh + g) * ATTN_HD + 4 * cq) = make_float4(acc[g][0], acc[g][1], acc[g][2], acc[g][3]);
    __syncthreads();
    const int half = (int)(r / 2);
    for (int idx = tid; idx < ATTN_HG * half; idx += ATTN_THREADS)
        rope_pair(os + (idx / half) * ATTN_HD, ATTN_HD, r, idx % half, pos, (const double*)inv_freq_, true);
    __syncthreads();
    for (int c = 4 * tid; c < ATTN_HG * ATTN_HD; c += 4 * ATTN_THREADS) *(float4*)(out + c) = *(const float4*)(os + c);
}

// ---- attend_split: decode attention over the whole GPU ----
//
// A single token has only H / ATTN_HG CTAs of attend_heads, and attend's one CTA per head walks
// its ~640 rows one dependent load after another (~115 us per layer at 2K context, ~180 at 64K).
// attend_split gives the same outputs bit for bit in two launches that spread the rows over
// many CTAs:
//  1. attend_split_scores: CTA (row block, group of ATTN_HG heads, token) runs attend_heads'
//     score pass over ASPLIT_ROWS rows, into scores[(t*H + h) * max_rows + j] (device memory);
//  2. attend_split_values: CTA (channel chunk of ASPLIT_CW, group of ASPLIT_HG heads, token)
//     redoes each head's softmax statistics with attend's split over 256 threads and 8 warps
//     (max, then the sum of expf(s - max) in the same order, the weights expf(s - max) / den:
//     the values attend divides), then accumulates its heads x channels over all rows in
//     ascending order, and applies the inverse RoPE to the channels of the tail.
// Each output is one chain of fused multiply-adds over the rows in attend's order, so the
// chains cannot be split across threads; what the kernels avoid is everything around them:
//  - every row address is resolved once, all of a CTA's selection loads in flight together
//    (not one row at a time behind the previous row's copies);
//  - the values CTA copies its rows' channels with cp.async before its PDL wait, while the
//    scores kernel runs (see attend_split_values), then loads its heads' scores into
//    registers in one round trip, and walks the rows in ASPLIT_PARTS groups as they land;
//  - a chain thread owns one head and two channels: per 4 rows one broadcast float4 of
//    weights and 4 float2 of values for 8 FMAs, so shared-memory loads do not bound the walk.
#define ASPLIT_ROWS 32   // rows per scores CTA (two ATTN_TR tiles; one per lane of a warp)
#define ASPLIT_HG 8      // heads per values CTA
#define ASPLIT_CW 32     // channels per values CTA
#define ASPLIT_VT 1024   // most rows per staged tile of the values pass
#define ASPLIT_PARTS 4   // cp.async groups a values tile's rows arrive in
#define ASPLIT_STEP 8    // rows of a values chain step: all their operands loaded, then their FMAs

#if ASPLIT_ROWS != 32
#error "attend_split_scores resolves one row per lane"
#endif

// Grid (max_rows / ASPLIT_ROWS rounded up, H / ATTN_HG, n_tok), ATTN_THREADS threads, dynamic
// shared memory 2 x ATTN_TR x ATTN_HD floats. Same parameters as attend plus the scores
// scratch (n_tok x H x max_rows floats).
extern "C" __global__ void __launch_bounds__(ATTN_THREADS, 2)
    attend_split_scores(u64 q_, u64 kv_, u64 ring_, u64 comp_, u64 sel_, u64 selc_, u64 scores_, i64 H, u64 pos_,
                        i64 window, i64 ring_cap, i64 kind, i64 ratio, i64 sel_stride, double scale_d,
                        i64 max_rows) {
    PDL_ENTRY();
    extern __shared__ __align__(16) float sh[];
    const i64 t = blockIdx.z, h0 = (i64)blockIdx.y * ATTN_HG;
    const i64 pos0 = *(const i64*)pos_;
    const i64 pos = pos0 + t;
    const TokenRows rows = token_rows<false>(pos, window, kind, ratio, selc_, t);
    const i64 first = rows.first, nw = rows.nw, nr = rows.nr;
    const i64 row_lo = (i64)blockIdx.x * ASPLIT_ROWS;
    // Rows past the token's count (the grid covers max_rows), or more rows than the scratch
    // holds (the values launch then writes NaN outputs): nothing to do. Uniform over the CTA.
    if (row_lo >= nr || nr > max_rows) return;
    const i64 row_hi = min64(row_lo + ASPLIT_ROWS, nr);
    // Lane l of every warp resolves row row_lo + l; the staging takes each address from its
    // lane, so the CTA's selection loads are one round trip.
    const int lane = threadIdx.x & 31;
    const u64 mine = row_lo + lane < row_hi
                         ? (u64)attn_row(row_lo + lane, nw, first, pos0, (const float*)kv_, (const float*)ring_,
                                         ring_cap, (const float*)comp_, kind, (const int*)sel_ + t * sel_stride)
                         : 0;
    const u32 mine_lo = (u32)mine, mine_hi = (u32)(mine >> 32);
    const auto row = [&](i64 j) {
        const int src = (int)(j - row_lo);
        const u64 lo = __shfl_sync(FULL_MASK, mine_lo, src), hi = __shfl_sync(FULL_MASK, mine_hi, src);
        return (const float*)(lo | (hi << 32));
    };
    attn_scores_pass(sh, (const float*)q_ + (t * H + h0) * ATTN_HD, row_lo, row_hi, row, (float)scale_d,
                     (float*)scores_ + (t * H + h0) * max_rows + row_lo, 1, max_rows);
}

// Floats between two heads' scores in attend_split_values' shared memory: vt rounded up to
// 32, plus 4, so that the two heads a warp reads sit on different banks.
__device__ __forceinline__ i64 asplit_score_stride(i64 vt) { return ((vt + 31) & ~(i64)31) + 4; }

// cp.async.wait_group n for n = 0 .. ASPLIT_PARTS (an immediate operand).
__device__ __forceinline__ void asplit_wait_group(int n) {
    switch (n) {
    case 0: asm volatile("cp.async.wait_group 0;" ::: "memory"); break;
    case 1: asm volatile("cp.async.wait_group 1;" ::: "memory"); break;
    case 2: asm volatile("cp.async.wait_group 2;" ::: "memory"); break;
    case 3: asm volatile("cp.async.wait_group 3;" ::: "memory"); break;
    default: asm volatile("cp.async.wait_group 4;" ::: "memory"); break;
    }
}
#if ASPLIT_PARTS != 4
#error "asplit_wait_group covers 4 parts"
#endif

// Rows of a values tile each thread handles (row tid + ATTN_THREADS * i) in the statistics
// and the address pass.
#define ASPLIT_RPT (ASPLIT_VT / ATTN_THREADS)
#if ASPLIT_VT != ASPLIT_RPT * ATTN_THREADS
#error "a values tile is a whole number of rows per thread"
#endif
#if ASPLIT_STEP % 4 != 0
#error "a values chain step is whole float4 weight loads"
#endif
#if ASPLIT_HG * ASPLIT_CW / 2 > ATTN_THREADS
#error "one thread per RoPE pair of a values CTA"
#endif

// A token's rows as attend_split_values reads them (attn_row_of's parameters).
struct AsplitRows {
    const float* kv;
    const float* ring;
    const float* comp;
    const int* sel;
    i64 pos0, first, nw, ring_cap, kind;
};

// Rows a values tile of `rows` rows copies per cp.async group (a multiple of 4).
__device__ __forceinline__ int asplit_part(int rows) { return (((rows + ASPLIT_PARTS - 1) / ASPLIT_PARTS) + 3) & ~3; }

// Resolves the row addresses of tile tl (vt rows a tile; this one has `rows`) into shared
// memory, all of a thread's selection loads in flight together, then copies the rows'
// channels c0 .. c0 + ASPLIT_CW (8 x 16 bytes a row) in ASPLIT_PARTS cp.async groups of
// asplit_part(rows) rows. Every thread of the CTA calls it (it synchronizes).
__device__ __forceinline__ void asplit_stage_rows(const AsplitRows& k, i64 tl, i64 vt, int rows, i64 c0) {
    extern __shared__ __align__(16) float vsh[];
    float* const vrows = vsh;
    const float** const rp = (const float**)(vsh + vt * ASPLIT_CW + ASPLIT_HG * asplit_score_stride(vt));
    const int tid = threadIdx.x;
    // The selected rows' indices first, all loads in flight together; the address arithmetic
    // (a 64-bit modulo for ring rows) stays in a rolled loop, each pass taking the next index.
    int sel_j[ASPLIT_RPT];
#pragma unroll
    for (int i = 0; i < ASPLIT_RPT; i++) {
        const i64 j = tl * vt + tid + i * ATTN_THREADS;
        sel_j[i] = k.kind == 2 && tid + i * ATTN_THREADS < rows && j >= k.nw ? ldcg_i32(k.sel + (j - k.nw)) : 0;
    }
#pragma unroll 1
    for (int i = 0; i < ASPLIT_RPT; i++) {
        const int j = tid + i * ATTN_THREADS;
        const int sj = sel_j[0];  // this row's selection index, loaded above
        if (j < rows)
            rp[j] = attn_row_of(tl * vt + j, k.nw, k.first, k.pos0, k.kv, k.ring, k.ring_cap, k.comp, k.kind,
                                [sj](i64) { return sj; });
#pragma unroll
        for (int q = 0; q + 1 < ASPLIT_RPT; q++) sel_j[q] = sel_j[q + 1];
    }
    __syncthreads();
    const int part = asplit_part(rows);
#pragma unroll
    for (int q = 0; q < ASPLIT_PARTS; q++) {
        const int lo = min(rows, q * part), hi = min(rows, (q + 1) * part);
#pragma unroll 1
        for (int e = tid + lo * (ASPLIT_CW / 4); e < hi * (ASPLIT_CW / 4); e += ATTN_THREADS) {
            const int rr = e / (ASPLIT_CW / 4), cc = (e % (ASPLIT_CW / 4)) * 4;
            cp_async16(vrows + rr * ASPLIT_CW + cc, rp[rr] + c0 + cc);
        }
        cp_async_commit();
    }
}

// What attend_split_values does before its PDL wait, while attend_split_scores still runs:
// the token's row count, the first tile's rows copied (asplit_stage_rows), and the inverse
// RoPE's frequency of this thread's pair (thread k < 128: head k / 16, channels rope_c and
// the next; rope_c = -1 for the other threads).
//
// This reads what the kernels before attend_split_scores wrote (the position, the selection
// count and indices, the span's K=V rows, the ring, the compressed rows), not only constant
// tables: that is sound here because this grid starts only once every CTA of
// attend_split_scores has passed its own griddepcontrol.wait (PDL_ENTRY waits, then
// triggers), i.e. once every kernel before it has completed with its writes visible, and
// attend_split_scores writes only the scores scratch, which is read after the wait. The early
// reads go to L2 (ld.global.cg, cp.async.cg), never to an L1 line an earlier kernel left.
struct AsplitPre {
    AsplitRows rows;
    i64 pos, nr, rope_c;
    double rope_f;
    int rows0;   // rows of the first tile: min(vt, nr)
    bool fits;   // nr <= max_rows (else the outputs are NaN; nothing was copied)
};
__device__ __forceinline__ AsplitPre asplit_values_prologue(u64 kv_, u64 ring_, u64 comp_, u64 sel_, u64 selc_,
                                                            u64 pos_, i64 window, i64 ring_cap, i64 kind, i64 ratio,
                                                            i64 sel_stride, u64 inv_freq_, i64 r, i64 max_rows,
                                                            i64 vt) {
    AsplitPre p;
    const i64 t = blockIdx.z, c0 = (i64)blockIdx.x * ASPLIT_CW;
    const i64 pos0 = ldcg_i64((const void*)pos_);
    p.pos = pos0 + t;
    const TokenRows rows = token_rows<true>(p.pos, window, kind, ratio, selc_, t);
    const i64 first = rows.first, nw = rows.nw;
    p.nr = rows.nr;
    p.rows = AsplitRows{(const float*)kv_, (const float*)ring_, (const float*)comp_,
                        (const int*)sel_ + t * sel_stride, pos0, first, nw, ring_cap, kind};
    p.fits = p.nr <= max_rows;  // uniform over the CTA
    p.rows0 = (int)min64(vt, p.nr);
    if (p.fits) asplit_stage_rows(p.rows, 0, vt, p.rows0, c0);
    const i64 tail = ATTN_HD - r;
    const int tid = threadIdx.x;
    p.rope_c = tid < ASPLIT_HG * (ASPLIT_CW / 2) ? c0 + 2 * (tid % (ASPLIT_CW / 2)) : -1;
    p.rope_f = p.rope_c >= tail ? ((const double*)inv_freq_)[(p.rope_c - tail) / 2] : 0.0;
    return p;
}

// Grid (ATTN_HD / ASPLIT_CW, H / ASPLIT_HG, n_tok), ATTN_THREADS threads. Dynamic shared
// memory, for tiles of vt = min(max_rows, ASPLIT_VT) rows: the tile's values (vt x ASPLIT_CW
// floats), its weights (ASPLIT_HG x asplit_score_stride(vt) floats) and its row addresses (vt
// pointers). Reads the scores attend_split_scores wrote; out as attend's, and when oq_ != 0
// also its Q8_0 form (int8 values at oq_, one f32 scale per 32 at od_), which saves the decode
// step a quantization launch. The first tile's rows are copied before the PDL wait
// (asplit_values_prologue says why that is sound).
extern "C" __global__ void __launch_bounds__(ATTN_THREADS)
    attend_split_values(u64 scores_, u64 kv_, u64 ring_, u64 comp_, u64 sel_, u64 selc_, u64 sinks_, u64 out_,
                        i64 H, u64 pos_, i64 window, i64 ring_cap, i64 kind, i64 ratio, i64 sel_stride,
                        u64 inv_freq_, i64 r, i64 max_rows, i64 vt, u64 oq_, u64 od_) {
    PDL_ENTRY_AFTER(const AsplitPre pre = asplit_values_prologue(kv_, ring_, comp_, sel_, selc_, pos_, window, ring_cap,
                                                                 kind, ratio, sel_stride, inv_freq_, r, max_rows, vt));
    extern __shared__ __align__(16) float vsh[];
    const i64 ps = asplit_score_stride(vt);
    float* const vrows = vsh;                // [vt][ASPLIT_CW] values
    float* const pt = vsh + vt * ASPLIT_CW;  // [ASPLIT_HG][ps] weights
    __shared__ float red[ASPLIT_HG][ATTN_THREADS / 32];
    __shared__ float mx_s[ASPLIT_HG], den_s[ASPLIT_HG];
    __shared__ __align__(16) float os[ASPLIT_HG][ASPLIT_CW];
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const i64 c0 = (i64)blockIdx.x * ASPLIT_CW, h0 = (i64)blockIdx.y * ASPLIT_HG, t = blockIdx.z;
    const i64 pos = pre.pos, nr = pre.nr;
    const int rows0 = pre.rows0;
    const i64 ntiles = (nr + vt - 1) / vt;
    float* out = (float*)out_ + (t * H + h0 + warp) * ATTN_HD + c0 + lane;
    if (!pre.fits) {
        *out = __int_as_float(0x7fc00000);  // more rows than the scores scratch: NaN, as attend_heads
        return;
    }

    // Softmax statistics of the ASPLIT_HG heads, attend's split: thread tid takes rows tid,
    // tid + 256, ... in ascending order; warps combine by warp_max / warp_sum, then thread h
    // over the 8 warps. The first tile's scores are loaded in one round trip into the weights'
    // place in shared memory, where each thread turns its own rows into expf(s - max), then
    // into weights; rows past the tile, if any, are read from the scratch. The loops over
    // rows stay rolled: every CTA runs this code once, from a cold instruction cache, and the
    // unrolled form (~7 000 instructions, 115 KB) stalled on instruction fetch (ncu, session 23).
    const float* sc = (const float*)scores_ + (t * H + h0) * max_rows;
    const float* sinks = (const float*)sinks_ + h0;
    i64 jtail = tid;  // this thread's first row past the first tile
    while (jtail < rows0) jtail += ATTN_THREADS;
    {
        // All loads first (the compiler cannot move a load above a store through pt).
        float sv[ASPLIT_RPT][ASPLIT_HG];
#pragma unroll
        for (int i = 0; i < ASPLIT_RPT; i++) {
            const int j = tid + i * ATTN_THREADS;
#pragma unroll
            for (int h = 0; h < ASPLIT_HG; h++) sv[i][h] = j < rows0 ? sc[h * max_rows + j] : -FWD_INF;
        }
        float m[ASPLIT_HG];
#pragma unroll
        for (int h = 0; h < ASPLIT_HG; h++) {
            m[h] = -FWD_INF;
#pragma unroll
            for (int i = 0; i < ASPLIT_RPT; i++) m[h] = fmaxf(m[h], sv[i][h]);
        }
#pragma unroll
        for (int i = 0; i < ASPLIT_RPT; i++) {
            const int j = tid + i * ATTN_THREADS;
            if (j < rows0) {
#pragma unroll
                for (int h = 0; h < ASPLIT_HG; h++) pt[h * ps + j] = sv[i][h];
            }
        }
#pragma unroll 1
        for (i64 j = jtail; j < nr; j += ATTN_THREADS) {
#pragma unroll
            for (int h = 0; h < ASPLIT_HG; h++) m[h] = fmaxf(m[h], sc[h * max_rows + j]);
        }
#pragma unroll
        for (int h = 0; h < ASPLIT_HG; h++) {
            const float v = warp_max(m[h]);
            if (lane == 0) red[h][warp] = v;
        }
    }
    __syncthreads();
    if (tid < ASPLIT_HG) {
        float mm = sinks[tid];
        for (int w = 0; w < ATTN_THREADS / 32; w++) mm = fmaxf(mm, red[tid][w]);
        mx_s[tid] = mm;
    }
    __syncthreads();
    {
        float part_sum[ASPLIT_HG];
#pragma unroll
        for (int h = 0; h < ASPLIT_HG; h++) part_sum[h] = 0.f;
#pragma unroll 1
        for (int i = 0; i < ASPLIT_RPT; i++) {
            const int j = tid + i * ATTN_THREADS;
            if (j < rows0) {
#pragma unroll
                for (int h = 0; h < ASPLIT_HG; h++) {
                    const float e = expf(pt[h * ps + j] - mx_s[h]);
                    pt[h * ps + j] = e;
                    part_sum[h] += e;
                }
            }
        }
#pragma unroll 1
        for (i64 j = jtail; j < nr; j += ATTN_THREADS) {
#pragma unroll
            for (int h = 0; h < ASPLIT_HG; h++) part_sum[h] += expf(sc[h * max_rows + j] - mx_s[h]);
        }
#pragma unroll
        for (int h = 0; h < ASPLIT_HG; h++) {
            const float v = warp_sum(part_sum[h]);
            if (lane == 0) red[h][warp] = v;
        }
    }
    __syncthreads();
    if (tid < ASPLIT_HG) {
        float den = expf(sinks[tid] - mx_s[tid]);
        for (int w = 0; w < ATTN_THREADS / 32; w++) den += red[tid][w];
        den_s[tid] = den;
    }
    __syncthreads();
    // The first tile's weights e / den: attend's values.
#pragma unroll 1
    for (int i = 0; i < ASPLIT_RPT; i++) {
        const int j = tid + i * ATTN_THREADS;
        if (j < rows0) {
#pragma unroll
            for (int h = 0; h < ASPLIT_HG; h++) pt[h * ps + j] = pt[h * ps + j] / den_s[h];
        }
    }

    // Values. Chain threads (warps 0 .. ASPLIT_HG / 2 - 1): head hl = 2 * warp + lane / 16,
    // channels c0 + 2 * cq and the next; rows in ascending order, acc += p * v (attend's
    // operation), each part of the tile as it lands. A step loads the weights and values of
    // ASPLIT_STEP rows, then runs their FMAs: one shared-memory latency per step. (ptxas undid
    // the 4-row software pipeline that was here; ncu in a CSA layer, 640 rows at 2K: 4-row
    // steps 17.8-18.2 us, 8-row 15.7-16.1, 16-row 14.5-14.9; session 24.)
    const bool chain = warp < ASPLIT_HG / 2;
    const int hl = 2 * warp + (lane >> 4), cq = lane & 15;
    float acc0 = 0.f, acc1 = 0.f;
    for (i64 tl = 0; tl < ntiles; tl++) {
        const int rows = (int)min64(vt, nr - tl * vt), part = asplit_part(rows);
        if (tl > 0) {
            __syncthreads();  // the previous tile's values, weights and addresses are used up
            asplit_stage_rows(pre.rows, tl, vt, rows, c0);
#pragma unroll 1
            for (int k = tid; k < ASPLIT_HG * rows; k += ATTN_THREADS) {
                const int h = k / rows, rr = k % rows;
                pt[h * ps + rr] = expf(sc[h * max_rows + tl * vt + rr] - mx_s[h]) / den_s[h];
            }
        }
        const float* p = pt + hl * ps;
        const float2* v = (const float2*)vrows + cq;  // row j: v[j * (ASPLIT_CW / 2)]
#pragma unroll
        for (int q = 0; q < ASPLIT_PARTS; q++) {
            asplit_wait_group(ASPLIT_PARTS - 1 - q);
            __syncthreads();
            if (!chain) continue;
            const int hi = min(rows, (q + 1) * part);
            int j = min(rows, q * part);
#pragma unroll 1
            for (; j + ASPLIT_STEP <= hi; j += ASPLIT_STEP) {
                float4 w[ASPLIT_STEP / 4];
                float2 x[ASPLIT_STEP];
#pragma unroll
                for (int u = 0; u < ASPLIT_STEP / 4; u++) w[u] = *(const float4*)(p + j + 4 * u);
#pragma unroll
                for (int u = 0; u < ASPLIT_STEP; u++) x[u] = v[(j + u) * (ASPLIT_CW / 2)];
#pragma unroll
                for (int u = 0; u < ASPLIT_STEP / 4; u++) {
                    acc0 += w[u].x * x[4 * u].x;
                    acc1 += w[u].x * x[4 * u].y;
                    acc0 += w[u].y * x[4 * u + 1].x;
                    acc1 += w[u].y * x[4 * u + 1].y;
                    acc0 += w[u].z * x[4 * u + 2].x;
                    acc1 += w[u].z * x[4 * u + 2].y;
                    acc0 += w[u].w * x[4 * u + 3].x;
                    acc1 += w[u].w * x[4 * u + 3].y;
                }
            }
#pragma unroll 1
            for (; j < hi; j++) {
                const float w = p[j];
                const float2 a = v[j * (ASPLIT_CW / 2)];
                acc0 += w * a.x;
                acc1 += w * a.y;
            }
        }
    }

    // The inverse RoPE of the tail channels (pairs 2l, 2l + 1 never straddle a chunk: the tail
    // starts at an even channel and chunks are ASPLIT_CW wide), then the store: warp = head
    // h0 + warp, lane = channel c0 + lane.
    if (chain) *(float2*)&os[hl][2 * cq] = make_float2(acc0, acc1);
    __syncthreads();
    if (c0 + ASPLIT_CW > ATTN_HD - r) {
        if (pre.rope_c >= ATTN_HD - r)
            rope_pair_at(&os[tid / (ASPLIT_CW / 2)][pre.rope_c - c0], pos, pre.rope_f, true);
        __syncthreads();
    }
    const float y = os[warp][lane];
    *out = y;
    if (oq_ != 0) {
        // The output's Q8_0 form (the o_a product's input), as quantize_seg_q8_0 makes it: a
        // warp's 32 channels of one head are one block of the flat output.
        const float amax = warp_max(fabsf(y));
        const float dd = amax / 127.0f;
        const float id = dd != 0.0f ? 1.0f / dd : 0.0f;
        const i64 at = (t * H + h0 + warp) * ATTN_HD + c0 + lane;
        ((i8*)oq_)[at] = (i8)max(-127, min(127, __float2int_rn(y * id)));
        if (lane == 0) ((float*)od_)[at / 32] = dd;
    }
}


// ---- attend_mma: prefill attention on the tensor cores (ds4 numerics) ----
//
// attend_heads does 2 x 64 heads x rows x 512 f32 FMAs per token on the CUDA cores and runs
// at their peak (~1.35 ms per 1 024-token span and layer at 640 rows). Here one CTA takes one
// token and 64 heads and runs flash attention with mma.sync m16n8k16 (f16 in, f32
// accumulate), f32-class accuracy kept by splitting the f32 operands into two f16 terms:
//  - K=V rows are f16 values in ds4 numerics (raw rows and compressed rows go through f16
//    storage), so they are exact operands; the launcher uses this kernel only then;
//  - the queries and the softmax weights are x = hi + lo with hi = f16(x), lo = f16(x - hi)
//    (22 significant bits), and every product is taken twice (hi and lo) into f32.
// The outputs are not bit-identical to attend's (another summation order, online softmax);
// they agree to ~1e-6 relative.
//
// Per tile of AM_TR rows: S = Q K^T (warp w: heads 16 (w / 4) .., rows 8 (w % 4) ..), the
// online softmax with the sink (the running max starts at the sink's logit and the running
// sum at exp(0) = 1, which is attend's denominator exp(sink - max) + sum exp(s - max)), and
// O = O * alpha + P V (warp w: heads 16 (w / 4) .., channels 128 (w % 4) ..: 16 n8 tiles of
// f32 accumulators in registers). Two row tiles in shared memory (f16) take turns: during
// tile t's softmax, tile t + 1's rows go from registers (f32, loaded during tile t - 1) into the
// other one and tile t + 2's loads start, so a tile needs two CTA barriers, not four.
#define AM_HEADS 64
#define AM_TR 32          // rows per tile
#define AM_THREADS 512    // 16 warps
#define AM_QS (ATTN_HD + 8)   // f16 row stride of Q and the rows (16 bytes of padding: ldmatrix rows on distinct banks)
#define AM_SS (AM_TR + 4)     // f32 row stride of the scores
#define AM_PS (AM_TR + 8)     // f16 row stride of the weights
#define AM_OS (ATTN_HD + 4)   // f32 row stride of the outputs (reusing the Q area)

struct AmSmem {
    enum {
        Q_HI = 0,
        Q_LO = Q_HI + AM_HEADS * AM_QS * 2,
        KV = Q_LO + AM_HEADS * AM_QS * 2,   // two row tiles (KV_TILE bytes each), used in turn
        KV_TILE = AM_TR * AM_QS * 2,
        S = KV + 2 * KV_TILE,
        P_HI = S + AM_HEADS * AM_SS * 4,
        P_LO = P_HI + AM_HEADS * AM_PS * 2,
        STATS = P_LO + AM_HEADS * AM_PS * 2,   // max, sum, alpha per head
        BYTES = STATS + 3 * AM_HEADS * 4,
    };
};

// ldmatrix from 32-bit shared-window addresses (a: the lane's row address), computed once per
// kernel so that each load is the base register plus an immediate: with generic pointers,
// every load paid a 64-bit add and a cvta.to.shared (~60 of the 94 instructions of four
// S = Q K^T steps, SASS of 55de7a3).
__device__ __forceinline__ void am_ldmatrix_x4(u32 a, u32 (&r)[4]) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(a));
}
__device__ __forceinline__ void am_ldmatrix_x2(u32 a, u32 (&r)[2]) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x2.shared.b16 {%0,%1}, [%2];" : "=r"(r[0]), "=r"(r[1]) : "r"(a));
}
__device__ __forceinline__ void am_ldmatrix_x4_trans(u32 a, u32 (&r)[4]) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(a));
}
__device__ __forceinline__ void am_mma(float (&c)[4], const u32 (&a)[4], u32 b0, u32 b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}
// Two f32 as two f16 in one word (x0 in the low half).
__device__ __forceinline__ u32 am_pack(float x0, float x1) {
    return (u32)f32_to_f16(x0) | ((u32)f32_to_f16(x1) << 16);
}
// x = hi + lo: hi = f16(x), lo = f16(x - hi).
__device__ __forceinline__ void am_split(float x, u16* hi, u16* lo) {
    const u16 h = f32_to_f16(x);
    *hi = h;
    *lo = f32_to_f16(x - f16_to_f32(h));
}

// Same parameters and meaning as attend. Grid (n_tok, H / AM_HEADS), AM_THREADS threads,
// AmSmem::BYTES of dynamic shared memory; hd == ATTN_HD, kv / ring / comp 16-byte aligned
// (attend.rs checks all of this).
extern "C" __global__ void __launch_bounds__(AM_THREADS, 1)
    attend_mma(u64 q_, u64 kv_, u64 ring_, u64 comp_, u64 sel_, u64 selc_, u64 sinks_, u64 out_, i64 H, i64 hd,
               u64 pos_, i64 window, i64 ring_cap, i64 kind, i64 ratio, i64 sel_stride, double scale_d,
               u64 inv_freq_, i64 r, i64 max_rows) {
    PDL_ENTRY();
    extern __shared__ __align__(16) u8 am_sh[];
    u16* const sq_hi = (u16*)(am_sh + AmSmem::Q_HI);
    u16* const sq_lo = (u16*)(am_sh + AmSmem::Q_LO);
    u16* const skv = (u16*)(am_sh + AmSmem::KV);
    float* const ss = (float*)(am_sh + AmSmem::S);
    u16* const sp_hi = (u16*)(am_sh + AmSmem::P_HI);
    u16* const sp_lo = (u16*)(am_sh + AmSmem::P_LO);
    float* const smax = (float*)(am_sh + AmSmem::STATS);
    float* const ssum = smax + AM_HEADS;
    float* const salpha = ssum + AM_HEADS;
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const i64 t = blockIdx.x, h0 = (i64)blockIdx.y * AM_HEADS;
    const i64 pos0 = *(const i64*)pos_;
    const i64 pos = pos0 + t;
    const TokenRows rows = token_rows<false>(pos, window, kind, ratio, selc_, t);
    const i64 first = rows.first, nw = rows.nw, nr = rows.nr;
    const float* kv = (const float*)kv_;
    const float* ring = (const float*)ring_;
    const float* comp = (const float*)comp_;
    const int* sel = (const int*)sel_ + t * sel_stride;
    float* out = (float*)out_ + (t * H + h0) * ATTN_HD;
    if (hd != ATTN_HD) return;  // the launcher never does this
    const float scale = (float)scale_d;

    // Queries as hi/lo f16; the statistics start at the sink.
    {
        const float* q = (const float*)q_ + (t * H + h0) * ATTN_HD;
        for (int i = tid; i < AM_HEADS * ATTN_HD / 4; i += AM_THREADS) {
            const int h = (4 * i) / ATTN_HD, c = (4 * i) % ATTN_HD;
            const float4 v = *(const float4*)(q + h * ATTN_HD + c);
            u16 hi[4], lo[4];
            am_split(v.x, &hi[0], &lo[0]);
            am_split(v.y, &hi[1], &lo[1]);
            am_split(v.z, &hi[2], &lo[2]);
            am_split(v.w, &hi[3], &lo[3]);
            *(uint2*)(sq_hi + h * AM_QS + c) = make_uint2(hi[0] | ((u32)hi[1] << 16), hi[2] | ((u32)hi[3] << 16));
            *(uint2*)(sq_lo + h * AM_QS + c) = make_uint2(lo[0] | ((u32)lo[1] << 16), lo[2] | ((u32)lo[3] << 16));
        }
        if (tid < AM_HEADS) {
            smax[tid] = ((const float*)sinks_)[h0 + tid];
            ssum[tid] = 1.0f;
        }
    }

    // Row loading: thread tid takes row tid / 16 of the tile, channels 4 (tid % 16) + 64 i.
    const int lrow = tid >> 4, lcol = 4 * (tid & 15);
    float4 nxt[8];
    auto load = [&](i64 row0) {
        const i64 j = row0 + lrow;
        if (j < nr) {
            const float* src = attn_row(j, nw, first, pos0, kv, ring, ring_cap, comp, kind, sel) + lcol;
#pragma unroll
            for (int i = 0; i < 8; i++) nxt[i] = *(const float4*)(src + 64 * i);
        } else {
#pragma unroll
            for (int i = 0; i < 8; i++) nxt[i] = make_float4(0.f, 0.f, 0.f, 0.f);
        }
    };
    // Into row tile b (0 or 1).
    auto store = [&](int b) {
        u16* dst = skv + b * (AmSmem::KV_TILE / 2) + lrow * AM_QS + lcol;
#pragma unroll
        for (int i = 0; i < 8; i++)
            *(uint2*)(dst + 64 * i) = make_uint2(am_pack(nxt[i].x, nxt[i].y), am_pack(nxt[i].z, nxt[i].w));
    };

    const int g = lane >> 2, qd = lane & 3;  // mma fragment row group and column pair
    const int mi = warp >> 2;                // heads 16 mi .. 16 mi + 15
    const int ni = warp & 3;                 // S: rows 8 ni ..; O: channels 128 ni ..
    float o[16][4];
#pragma unroll
    for (int j = 0; j < 16; j++) o[j][0] = o[j][1] = o[j][2] = o[j][3] = 0.f;
    // The lanes' ldmatrix row addresses (bytes in the shared window): Q (S's A: heads 16 mi +
    // lane % 16, channels 8 (lane / 16) ..; the lo copy a constant offset away), the rows (S's
    // B: row 8 ni + lane % 8, channels 8 ((lane / 8) % 2) ..), the weights (PV's A: heads as for
    // Q, rows 8 (lane / 16) ..) and the rows as V (PV's B, transposed: row lane % 16, channels
    // 128 ni + 8 (lane / 16) ..).
    const u32 sh0 = smem_addr(am_sh);
    const u32 qa_hi_s = sh0 + AmSmem::Q_HI + 2 * ((16 * mi + (lane & 15)) * AM_QS + 8 * (lane >> 4));
    const u32 kb_s = sh0 + AmSmem::KV + 2 * ((8 * ni + (lane & 7)) * AM_QS + 8 * ((lane >> 3) & 1));
    const u32 pa_hi_s = sh0 + AmSmem::P_HI + 2 * ((16 * mi + (lane & 15)) * AM_PS + 8 * (lane >> 4));
    const u32 vb_s = sh0 + AmSmem::KV + 2 * ((lane & 15) * AM_QS + 128 * ni + 8 * (lane >> 4));

    const i64 ntiles = (nr + AM_TR - 1) / AM_TR;
    // Two barriers a tile: row tile tl % 2 holds tile tl's rows, the other one receives tile
    // tl + 1's during tl's softmax (its readers, tile tl - 1's S and P V, are past the barrier
    // after tl's S), and the rows of tile tl + 2 are loaded into registers then.
    load(0);
    store(0);
    if (ntiles > 1) load(AM_TR);
    __syncthreads();  // the queries, the statistics and tile 0's rows
    for (i64 tl = 0; tl < ntiles; tl++) {
        const u32 kv_off = (u32)(tl & 1) * AmSmem::KV_TILE;  // this tile's rows

        // S = Q K^T for 16 heads x 8 rows.
        {
            float s[4] = {0.f, 0.f, 0.f, 0.f};
#pragma unroll
            for (int k = 0; k < ATTN_HD / 16; k++) {
                u32 ah[4], al[4], b[2];
                am_ldmatrix_x4(qa_hi_s + 32 * k, ah);
                am_ldmatrix_x4(qa_hi_s + (AmSmem::Q_LO - AmSmem::Q_HI) + 32 * k, al);
                am_ldmatrix_x2(kb_s + kv_off + 32 * k, b);
                am_mma(s, ah, b[0], b[1]);
                am_mma(s, al, b[0], b[1]);
            }
            float* d0 = ss + (16 * mi + g) * AM_SS + 8 * ni + 2 * qd;
            float* d1 = d0 + 8 * AM_SS;
            d0[0] = s[0] * scale;
            d0[1] = s[1] * scale;
            d1[0] = s[2] * scale;
            d1[1] = s[3] * scale;
        }
        __syncthreads();  // the scores; every thread is done with tile tl - 1

        // Online softmax: thread tid takes head tid / 8, rows 4 (tid % 8) .. + 3 of the tile.
        {
            const int h = tid >> 3, r0 = 4 * (tid & 7);
            const i64 j0 = tl * AM_TR + r0;
            float v[4], mt = -FWD_INF;
#pragma unroll
            for (int k = 0; k < 4; k++) {
                v[k] = j0 + k < nr ? ss[h * AM_SS + r0 + k] : -FWD_INF;
                mt = fmaxf(mt, v[k]);
            }
            mt = fmaxf(mt, __shfl_xor_sync(FULL_MASK, mt, 1));
            mt = fmaxf(mt, __shfl_xor_sync(FULL_MASK, mt, 2));
            mt = fmaxf(mt, __shfl_xor_sync(FULL_MASK, mt, 4));
            const float m_old = smax[h];
            const float m_new = fmaxf(m_old, mt);
            float psum = 0.f;
            u16 hi[4], lo[4];
#pragma unroll
            for (int k = 0; k < 4; k++) {
                const float p = j0 + k < nr ? expf(v[k] - m_new) : 0.f;
                psum += p;
                am_split(p, &hi[k], &lo[k]);
            }
            *(uint2*)(sp_hi + h * AM_PS + r0) = make_uint2(hi[0] | ((u32)hi[1] << 16), hi[2] | ((u32)hi[3] << 16));
            *(uint2*)(sp_lo + h * AM_PS + r0) = make_uint2(lo[0] | ((u32)lo[1] << 16), lo[2] | ((u32)lo[3] << 16));
            psum += __shfl_xor_sync(FULL_MASK, psum, 1);
            psum += __shfl_xor_sync(FULL_MASK, psum, 2);
            psum += __shfl_xor_sync(FULL_MASK, psum, 4);
            __syncwarp();
            if ((tid & 7) == 0) {
                const float alpha = expf(m_old - m_new);
                salpha[h] = alpha;
                smax[h] = m_new;
                ssum[h] = ssum[h] * alpha + psum;
            }
        }
        if (tl + 1 < ntiles) {
            store((int)((tl + 1) & 1));
            if (tl + 2 < ntiles) load((tl + 2) * AM_TR);
        }
        __syncthreads();  // the weights, alpha and tile tl + 1's rows

        // O = O * alpha + P V for 16 heads x 128 channels.
        {
            const float a0 = salpha[16 * mi + g], a1 = salpha[16 * mi + g + 8];
#pragma unroll
            for (int j = 0; j < 16; j++) {
                o[j][0] *= a0;
                o[j][1] *= a0;
                o[j][2] *= a1;
                o[j][3] *= a1;
            }
#pragma unroll
            for (int ks = 0; ks < AM_TR / 16; ks++) {
                u32 ph[4], pl[4];
                am_ldmatrix_x4(pa_hi_s + 32 * ks, ph);
                am_ldmatrix_x4(pa_hi_s + (AmSmem::P_LO - AmSmem::P_HI) + 32 * ks, pl);
#pragma unroll
                for (int jp = 0; jp < 8; jp++) {  // two n8 tiles per ldmatrix
                    u32 b[4];
                    am_ldmatrix_x4_trans(vb_s + kv_off + 2 * 16 * AM_QS * ks + 32 * jp, b);
                    am_mma(o[2 * jp], ph, b[0], b[1]);
                    am_mma(o[2 * jp], pl, b[0], b[1]);
                    am_mma(o[2 * jp + 1], ph, b[2], b[3]);
                    am_mma(o[2 * jp + 1], pl, b[2], b[3]);
                }
            }
        }
    }
    __syncthreads();

    // Outputs / sum, into shared memory (the query area), the inverse RoPE of the tails, store.
    float* so = (float*)am_sh;
    {
        const float l0 = ssum[16 * mi + g], l1 = ssum[16 * mi + g + 8];
#pragma unroll
        for (int j = 0; j < 16; j++) {
            const int c = 128 * ni + 8 * j + 2 * qd;
            so[(16 * mi + g) * AM_OS + c] = o[j][0] / l0;
            so[(16 * mi + g) * AM_OS + c + 1] = o[j][1] / l0;
            so[(16 * mi + g + 8) * AM_OS + c] = o[j][2] / l1;
            so[(16 * mi + g + 8) * AM_OS + c + 1] = o[j][3] / l1;
        }
    }
    __syncthreads();
    const int half = (int)(r / 2);
    for (int idx = tid; idx < AM_HEADS * half; idx += AM_THREADS)
        rope_pair(so + (idx / half) * AM_OS, ATTN_HD, r, idx % half, pos, (const double*)inv_freq_, true);
    __syncthreads();
    for (int i = tid; i < AM_HEADS * ATTN_HD / 4; i += AM_THREADS) {
        const int h = (4 * i) / ATTN_HD, c = (4 * i) % ATTN_HD;
        *(float4*)(out + h * ATTN_HD + c) = *(const float4*)(so + h * AM_OS + c);
    }
}
