// The KV compressors and the lightning indexer's selection (cpu/compressor.rs,
// cpu/indexer.rs, cpu/forward.rs compress_span; dsv4-arch.md §3.6-3.8).
//
// Frontier layout as the CPU's (ds4's): kv and score are coff*m rows of coff*D (coff = 2 with
// overlap). With overlap, rows [0, m) hold the previous window, [m, 2m) the current one.

// Two floats as a bf16 pair (round to nearest even; lo in the low half, as MMA fragments hold
// the lower column there).
__device__ __forceinline__ u32 bf16x2_rn(float lo, float hi) {
    u32 r;
    asm("cvt.rn.bf16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo));
    return r;
}

// One float as bf16 bits (round to nearest even, as bf16x2_rn).
__device__ __forceinline__ u16 bf16_rn(float v) {
    u16 r;
    asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(r) : "f"(v));
    return r;
}

// A pooled row (D values in shared `row`, complete for the CTA) normalized (weight `norm`),
// RoPE'd at row_pos, rounded (qat 1: FP8 nope + f16, as KV rows; qat 2: Hadamard + FP4 + f16,
// as indexer keys; 0: none) and stored at out, and as bf16 at out16 unless that is null (the
// indexer keys' copy for index_scores_mma). Every thread of the CTA must call it.
__device__ void compress_finish_row(float* row, const float* norm, i64 D, double eps, const double* inv_freq, i64 r,
                                    i64 row_pos, i64 qat, float* out, u16* out16) {
    double ss = 0.0;
    for (i64 c = threadIdx.x; c < D; c += blockDim.x) ss += (double)row[c] * (double)row[c];
    ss = cta_sum_f64(ss);
    const float inv = rms_scale(ss, D, eps);
    for (i64 c = threadIdx.x; c < D; c += blockDim.x) row[c] = row[c] * inv * norm[c];
    __syncthreads();
    for (int l = threadIdx.x; l < r / 2; l += blockDim.x) rope_pair(row, D, r, l, row_pos, inv_freq, false);
    __syncthreads();
    if (qat == 1) {
        const i64 nope = D - r;
        for (i64 b = threadIdx.x >> 5; b * 64 < nope; b += blockDim.x >> 5)
            fp8_block_warp(row + b * 64, (int)min64(64, nope - b * 64));
        __syncthreads();
    } else if (qat == 2) {
        cta_hadamard(row, (int)D);
        for (i64 b = threadIdx.x >> 5; b * 32 < D; b += blockDim.x >> 5)
            fp4_block_warp(row + b * 32, (int)min64(32, D - b * 32));
        __syncthreads();
    }
    for (i64 c = threadIdx.x; c < D; c += blockDim.x) {
        const float v = qat ? f16_round(row[c]) : row[c];
        out[c] = v;
        if (out16) out16[c] = bf16_rn(v);
    }
}

// Feeds n_tok tokens at positions *pos_.. (their projections kv_in/gate_in, each coff*D wide)
// to one compressor in token order, on one CTA. Each token that closes a window pools a row, which is normalized
// (weight `norm`), RoPE'd at its window start, rounded (qat 1: FP8 nope + f16, as KV rows;
// qat 2: Hadamard + FP4 + f16, as indexer keys; 0: none) and appended at row n_rows0, n_rows0+1...
// (and as bf16 into rows16_ unless it is 0). Dynamic shared: D floats.
extern "C" __global__ void compress_span(u64 kv_in_, u64 gate_in_, u64 ape_, u64 norm_, u64 skv_, u64 ssc_, u64 rows_,
                                         u64 rows16_,
                                         i64 n_tok, u64 pos_, i64 m, i64 D, i64 overlap, double eps, u64 inv_freq_,
                                         i64 r, i64 qat) {
    PDL_ENTRY();
    const i64 pos0 = *(const i64*)pos_, n_rows0 = pos0 / m;
    extern __shared__ float row[];
    const i64 coff = overlap ? 2 : 1, w = coff * D;
    float* skv = (float*)skv_;
    float* ssc = (float*)ssc_;
    const float* ape = (const float*)ape_;
    const float* norm = (const float*)norm_;
    i64 n_rows = n_rows0;
    for (i64 t = 0; t < n_tok; t++) {
        const i64 pos = pos0 + t, slot = pos % m, srow = (coff - 1) * m + slot;
        const float* kin = (const float*)kv_in_ + t * w;
        const float* gin = (const float*)gate_in_ + t * w;
        // Four elements' loads, then their stores (one at a time, each load would wait for
        // the store before it: the compiler cannot tell the frontier from the inputs).
        for (i64 c0 = threadIdx.x; c0 < w; c0 += 4 * (i64)blockDim.x) {
            float kv[4], sc[4];
#pragma unroll
            for (int u = 0; u < 4; u++) {
                const i64 c = c0 + u * (i64)blockDim.x;
                if (c < w) {
                    kv[u] = kin[c];
                    sc[u] = gin[c] + ape[slot * w + c];
                }
            }
#pragma unroll
            for (int u = 0; u < 4; u++) {
                const i64 c = c0 + u * (i64)blockDim.x;
                if (c < w) {
                    skv[srow * w + c] = kv[u];
                    ssc[srow * w + c] = sc[u];
                }
            }
        }
        __syncthreads();
        if ((pos + 1) % m != 0) continue;  // uniform over the CTA
        // Per-channel softmax over the window's slots (previous A half first when overlapping).
        const i64 nslots = coff * m;
        // (The slot loops unrolled: their loads go out together instead of one latency each.)
        for (i64 c = threadIdx.x; c < D; c += blockDim.x) {
            float mx = -FWD_INF;
#pragma unroll 8
            for (i64 s = 0; s < nslots; s++) {
                const i64 off = (overlap && s >= m) ? D : 0;
                mx = fmaxf(mx, ssc[s * w + off + c]);
            }
            float sum = 0.f, acc = 0.f;
#pragma unroll 8
            for (i64 s = 0; s < nslots; s++) {
                const i64 off = (overlap && s >= m) ? D : 0;
                const float e = expf(ssc[s * w + off + c] - mx);
                sum += e;
                acc += e * skv[s * w + off + c];
            }
            row[c] = acc / sum;
        }
        __syncthreads();
        compress_finish_row(row, norm, D, eps, (const double*)inv_freq_, r, pos + 1 - m, qat, (float*)rows_ + n_rows * D,
                            rows16_ ? (u16*)rows16_ + n_rows * D : nullptr);
        n_rows++;
        // Advance: the current window becomes the previous one (overlap); the current slots empty.
        if (overlap) {
            // Four elements' loads, then their stores (the halves do not overlap, which the
            // compiler cannot tell: one element at a time, each load waited for in turn, took
            // ~6 of a closing call's ~20 µs on the H100, on the path to the attention).
            for (i64 c0 = threadIdx.x; c0 < m * w; c0 += 4 * (i64)blockDim.x) {
                float kv[4], sc[4];
#pragma unroll
                for (int u = 0; u < 4; u++) {
                    const i64 c = c0 + u * (i64)blockDim.x;
                    if (c < m * w) {
                        kv[u] = skv[m * w + c];
                        sc[u] = ssc[m * w + c];
                    }
                }
#pragma unroll
                for (int u = 0; u < 4; u++) {
                    const i64 c = c0 + u * (i64)blockDim.x;
                    if (c < m * w) {
                        skv[c] = kv[u];
                        ssc[c] = sc[u];
                    }
                }
            }
            __syncthreads();
            for (i64 c = threadIdx.x; c < m * w; c += blockDim.x) {
                skv[m * w + c] = 0.f;
                ssc[m * w + c] = EMPTY_SCORE;
            }
        } else {
            for (i64 c = threadIdx.x; c < m * w; c += blockDim.x) {
                skv[c] = 0.f;
                ssc[c] = EMPTY_SCORE;
            }
        }
        __syncthreads();
    }
}

// compress_span for a span of several tokens in two parallel steps (same values bit for bit):
// compress_rows pools every window that closes in the span, one CTA per window, reading each
// slot from the span's projections or, for positions before the span, from the frontier as it
// was at the span's start; then compress_frontier rebuilds the frontier as compress_span
// leaves it. Positions: W0 = pos0 / m (window at the start), W1 = (pos0 + n_tok) / m.

// The w-wide kv and score rows of position q (score = gate + slot bias), from the span
// (q >= pos0) or the frontier at the span's start; q < 0 (before the first window) is empty.
__device__ __forceinline__ void compress_slot(const float* kv_in, const float* gate_in, const float* ape,
                                              const float* skv, const float* ssc, i64 q, i64 pos0, i64 m, i64 w,
                                              i64 coff, i64 c, float* kv, float* sc) {
    if (q >= pos0) {
        const i64 t = q - pos0;
        *kv = kv_in[t * w + c];
        *sc = gate_in[t * w + c] + ape[(q % m) * w + c];
    } else if (q < 0) {
        *kv = 0.f;
        *sc = EMPTY_SCORE;
    } else {
        // In the start's current window (rows (coff-1)m..) or, with overlap, its previous one.
        const i64 row = (q >= (pos0 / m) * m ? (coff - 1) * m : 0) + q % m;
        *kv = skv[row * w + c];
        *sc = ssc[row * w + c];
    }
}

// CTA k pools the window closing at p = (W0 + 1 + k) m - 1 (when p < pos0 + n_tok) into row
// p / m ... as compress_span does. Grid: at least W1 - W0 CTAs (n_tok / m + 1 always is).
// Dynamic shared: D floats.
extern "C" __global__ void compress_rows(u64 kv_in_, u64 gate_in_, u64 ape_, u64 norm_, u64 skv_, u64 ssc_, u64 rows_,
                                         u64 rows16_,
                                         i64 n_tok, u64 pos_, i64 m, i64 D, i64 overlap, double eps, u64 inv_freq_,
                                         i64 r, i64 qat) {
    PDL_ENTRY();
    extern __shared__ float row[];
    const i64 pos0 = *(const i64*)pos_;
    const i64 W0 = pos0 / m, W1 = (pos0 + n_tok) / m, k = blockIdx.x;
    if (W0 + k >= W1) return;  // uniform over the CTA
    const i64 p = (W0 + 1 + k) * m - 1, coff = overlap ? 2 : 1, w = coff * D;
    const float* kv_in = (const float*)kv_in_;
    const float* gate_in = (const float*)gate_in_;
    const float* ape = (const float*)ape_;
    const float* skv = (const float*)skv_;
    const float* ssc = (const float*)ssc_;
    const i64 nslots = coff * m, first = p + 1 - nslots;  // slot s holds position first + s
    for (i64 c = threadIdx.x; c < D; c += blockDim.x) {
        float mx = -FWD_INF;
        for (i64 s = 0; s < nslots; s++) {
            const i64 off = (overlap && s >= m) ? D : 0;
            float kv, sc;
            compress_slot(kv_in, gate_in, ape, skv, ssc, first + s, pos0, m, w, coff, off + c, &kv, &sc);
            mx = fmaxf(mx, sc);
        }
        float sum = 0.f, acc = 0.f;
        for (i64 s = 0; s < nslots; s++) {
            const i64 off = (overlap && s >= m) ? D : 0;
            float kv, sc;
            compress_slot(kv_in, gate_in, ape, skv, ssc, first + s, pos0, m, w, coff, off + c, &kv, &sc);
            const float e = expf(sc - mx);
            sum += e;
            acc += e * kv;
        }
        row[c] = acc / sum;
    }
    __syncthreads();
    compress_finish_row(row, (const float*)norm_, D, eps, (const double*)inv_freq_, r, p + 1 - m, qat,
                        (float*)rows_ + (W0 + k) * D, rows16_ ? (u16*)rows16_ + (W0 + k) * D : nullptr);
}

// The frontier after the span, element (slot i, channel c) per thread: the current window's
// slots of positions before pos0 + n_tok (from the span or, when no window closed, unchanged),
// the later ones empty once a window closed; with overlap, the previous window's rows.
extern "C" __global__ void compress_frontier(u64 kv_in_, u64 gate_in_, u64 ape_, u64 skv_, u64 ssc_, i64 n_tok,
                                             u64 pos_, i64 m, i64 D, i64 overlap) {
    PDL_ENTRY();
    const i64 pos0 = *(const i64*)pos_, coff = overlap ? 2 : 1, w = coff * D;
    const i64 W0 = pos0 / m, W1 = (pos0 + n_tok) / m, P = pos0 + n_tok;
    const float* kv_in = (const float*)kv_in_;
    const float* gate_in = (const float*)gate_in_;
    const float* ape = (const float*)ape_;
    float* skv = (float*)skv_;
    float* ssc = (float*)ssc_;
    for (i64 idx = (i64)blockIdx.x * blockDim.x + threadIdx.x; idx < m * w; idx += (i64)gridDim.x * blockDim.x) {
        const i64 i = idx / w, c = idx % w, cur = ((coff - 1) * m + i) * w + c;
        // The previous window (read the start's current slot i before overwriting it).
        if (overlap && W1 > W0) {
            const i64 q = (W1 - 1) * m + i;
            float kv, sc;
            compress_slot(kv_in, gate_in, ape, skv, ssc, q, pos0, m, w, coff, c, &kv, &sc);
            skv[i * w + c] = kv;
            ssc[i * w + c] = sc;
        }
        const i64 q = W1 * m + i;
        if (q < P) {
            if (q >= pos0) {
                skv[cur] = kv_in[(q - pos0) * w + c];
                ssc[cur] = gate_in[(q - pos0) * w + c] + ape[i * w + c];
            }  // else: q < pos0, so no window closed and the slot keeps its value
        } else if (W1 > W0) {
            skv[cur] = 0.f;
            ssc[cur] = EMPTY_SCORE;
        }
    }
}

// The indexer's choice (cpu/indexer.rs select_rows) in two launches over the chunk's tokens
// (the scores, then index_topk's selection and ordered compaction):
// with at most topk visible rows ((pos+1)/ratio) all are kept; otherwise every visible key is
// scored, score = sum_h w_h max(0, q_h . k), and the topk best are kept (ties: the lowest
// index), in ascending order. q: n_tok x ni x di, w: n_tok x ni (times w_scale here), keys:
// rows x di; scores/flags: n_tok x max_rows scratch. The span starts at position *pos_.

// Scores (reference numerics; ds4 numerics use index_scores_mma below, which gives the same
// bits): grid (rows / INDEX_TILE_ROWS / INDEX_TILES, n_tok), 256 threads. A CTA keeps its
// token's ni x di query in shared memory (row stride di + 1: lanes reading different heads hit
// different banks) and walks INDEX_TILES tiles of INDEX_TILE_ROWS keys, one warp per key row,
// lanes over heads; each head's dot product runs over the channels in order. Dynamic shared:
// (ni + INDEX_TILE_ROWS) x (di + 1) floats.
#define INDEX_TILE_ROWS 16
#define INDEX_TILES 8
extern "C" __global__ void index_scores(u64 q_, u64 w_, double w_scale_d, u64 keys_, u64 scores_, u64 pos_, i64 ratio,
                                        i64 ni, i64 di, i64 topk, i64 max_rows) {
    PDL_ENTRY();
    const float w_scale = (float)w_scale_d;
    extern __shared__ float qsh[];
    const i64 t = blockIdx.y, nv = (*(const i64*)pos_ + t + 1) / ratio;
    const i64 first = (i64)blockIdx.x * INDEX_TILE_ROWS * INDEX_TILES;
    if (nv <= topk || first >= nv) return;  // uniform over the CTA
    const i64 stride = di + 1;
    float* ksh = qsh + ni * stride;
    const float* q = (const float*)q_ + t * ni * di;
    const float* wt = (const float*)w_ + t * ni;
    for (i64 i = threadIdx.x; i < ni * di; i += blockDim.x) qsh[(i / di) * stride + i % di] = q[i];
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, warps = blockDim.x >> 5;
    for (int tile = 0; tile < INDEX_TILES; tile++) {
        const i64 r0 = first + (i64)tile * INDEX_TILE_ROWS;
        if (r0 >= nv) break;  // uniform
        const i64 nr = min64(INDEX_TILE_ROWS, nv - r0);
        __syncthreads();  // the previous tile's keys are used up (and the query is stored)
        const float* keys = (const float*)keys_ + r0 * di;
        for (i64 i = threadIdx.x; i < nr * di; i += blockDim.x) ksh[(i / di) * stride + i % di] = keys[i];
        __syncthreads();
        for (i64 r = warp; r < nr; r += warps) {
            const float* k = ksh + r * stride;
            float s = 0.f;
            for (i64 h = lane; h < ni; h += 32) {
                const float* qh = qsh + h * stride;
                float d = 0.f;
                for (i64 c = 0; c < di; c++) d += qh[c] * k[c];
                s += (wt[h] * w_scale) * fmaxf(d, 0.0f);
            }
            s = warp_sum(s);
            if (lane == 0) ((float*)scores_)[t * max_rows + r0 + r] = s;
        }
    }
}

// Scores on tensor cores, for ds4 numerics: there the queries and keys have been through the
// Hadamard + FP4-E2M1 round trip with power-of-two block scales (index_round, compress_span
// qat 2), so every value is e2m1 x 2^e, exact in bf16; the products are exact and the dot
// products' partial sums (whole multiples of a few block-scale quanta) are exact in f32 for
// realistic block scales, so a bf16 m16n8k16 MMA with f32 accumulation gives index_scores's
// sequential f32 dot products bit for bit. The head sum then repeats index_scores's order
// exactly: lane L's FMA chain over heads L and L + 32, then warp_sum's xor tree (offsets 16,
// 8, 4, 2, 1), which here is two in-thread levels and three shuffles. Any ni <= 64 and
// di <= 128 with di % 8 == 0 (heads and channels beyond them are zero, which adds exact
// zeros, as index_scores's idle lanes).
//
// Grid (row chunks of tiles_per_cta x IDXM_ROWS rows, ceil(n_tok / tpc)); up to IDXM_WARPS
// warps. tpc tokens per CTA (a power of two dividing the warp count): warp w scores token
// blockIdx.y * tpc + w % tpc against the key tile's 8-row groups w / tpc, w / tpc + warps /
// tpc, ... (decode: tpc 1, the warps share the rows). Each warp holds its token's whole
// 64 x 128 query as bf16 A fragments in registers (4 head tiles x 8 k steps x 4 registers);
// the keys come from the compressor's bf16 copy of its rows (compress_finish_row: the same
// values, exact in bf16, so the same bits as converting the f32 rows here). The CTA walks its
// tiles of IDXM_ROWS keys in halves through two shared buffers: half j + 1 is copied with
// cp.async straight into the padded rows (IDXM_KSTRIDE: conflict-free ldmatrix) while every
// warp takes half j's B fragments with ldmatrix. (The query's 128 registers bound the CTA to
// 8 warps: two 4-warp CTAs or one 8-warp CTA per SM.) Measured on an H200 over a 32K prefill
// (1 024-token spans): 424 us per call with 8 warps and 8 tokens per CTA when the kernel
// still converted f32 keys, against index_scores's 8 757 us; every output bit equal
// (tests/index_scores_gpu.rs).
#define IDXM_HEADS 64
#define IDXM_DIM 128
#define IDXM_ROWS 64
#define IDXM_HALF (IDXM_ROWS / 2)
#define IDXM_KSTRIDE (IDXM_DIM + 8)
#define IDXM_WARPS 8

// D = A B + C for a 16x16 bf16 A (row-major) and a 16x8 bf16 B (column-major), f32 C/D.
// Lane l, g = l/4, c = l%4 holds:
//   a[0]: A[g][2c..2c+1]  a[1]: A[g+8][2c..]  a[2]: A[g][2c+8..]  a[3]: A[g+8][2c+8..]
//   b0: B[2c..2c+1][g]    b1: B[2c+8..2c+9][g]
//   d[0]: D[g][2c]  d[1]: D[g][2c+1]  d[2]: D[g+8][2c]  d[3]: D[g+8][2c+1]
__device__ __forceinline__ void idxm_mma(float (&d)[4], const u32 (&a)[4], u32 b0, u32 b1) {
    asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

extern "C" __global__ void __launch_bounds__(IDXM_WARPS * 32)
    index_scores_mma(u64 q_, u64 w_, double w_scale_d, u64 keys16_, u64 scores_, u64 pos_, i64 ratio, i64 ni, i64 di,
                     i64 topk, i64 max_rows, i64 n_tok, i64 tpc, i64 tiles_per_cta) {
    PDL_ENTRY();
    __shared__ __align__(16) u16 ksh[2][IDXM_HALF * IDXM_KSTRIDE];
    const float w_scale = (float)w_scale_d;
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, c = lane & 3;
    const i64 pos0 = *(const i64*)pos_;
    const i64 tok0 = (i64)blockIdx.y * tpc;
    const i64 t_last = min64(n_tok, tok0 + tpc) - 1;
    // Rows visible to the CTA's last token: nv grows with the token.
    const i64 nv_max = (pos0 + t_last + 1) / ratio;
    const i64 first = (i64)blockIdx.x * tiles_per_cta * IDXM_ROWS;
    if (nv_max <= topk || first >= nv_max) return;  // uniform over the CTA

    const i64 t = tok0 + warp % tpc;
    const i64 nv = t < n_tok ? (pos0 + t + 1) / ratio : 0;
    const bool active = nv > topk;  // uniform over the warp

    // Both buffers zeroed once: channels past di are never copied and must add zeros. Rows
    // past nv_max keep whatever an earlier half left there: their columns of the MMAs are
    // never stored.
    for (int i = threadIdx.x; i < 2 * IDXM_HALF * IDXM_KSTRIDE / 8; i += blockDim.x)
        ((uint4*)&ksh[0][0])[i] = make_uint4(0u, 0u, 0u, 0u);

    // The token's query as A fragments (head tile m = heads 16m..16m+15, k step s), and the
    // weights of the eight heads g + 8j this lane's accumulators hold (zero past ni).
    u32 a[4][8][4];
    float wh[8];
    if (active) {
        const float* q = (const float*)q_ + t * ni * di;
        const int nh = (int)ni, nd = (int)di;
#pragma unroll
        for (int m = 0; m < 4; m++) {
#pragma unroll
            for (int s = 0; s < 8; s++)
#pragma unroll
                for (int i = 0; i < 4; i++) {
                    const int h = 16 * m + g + 8 * (i & 1), k = 16 * s + 2 * c + 8 * (i >> 1);
                    float2 v = make_float2(0.f, 0.f);
                    if (h < nh && k < nd) v = *(const float2*)(q + h * nd + k);
                    a[m][s][i] = bf16x2_rn(v.x, v.y);
                }
            // One head tile's loads in flight at a time: all 128 at once would hold 256
            // floats and spill.
            asm volatile("" ::: "memory");
        }
        const float* wt = (const float*)w_ + t * ni;
#pragma unroll
        for (int j = 0; j < 8; j++) wh[j] = g + 8 * j < ni ? wt[g + 8 * j] * w_scale : 0.f;
    }
    __syncthreads();  // the zeros are stored before any copy lands on them

    const u16* keys = (const u16*)keys16_;
    float* scores = (float*)scores_ + t * max_rows;
    const int groups = IDXM_HALF / 8, group_step = (int)(blockDim.x >> 5) / (int)tpc;
    // Starts copying half j's rows (first + IDXM_HALF j ..; those at or past nv_max are not
    // copied) into buffer j % 2, 8 channels a copy. (32-bit offsets from the half's first
    // row; thread_index_per_call so that nothing of this is hoisted into registers the kernel
    // lacks.)
    const auto issue = [&](i64 j) {
        const int tid = thread_index_per_call();
        const i64 h0 = first + j * IDXM_HALF;
        const u16* kh = keys + h0 * di;
        const int rows = (int)min64(IDXM_HALF, nv_max - h0), dn = (int)di, pieces = dn / 8;
        const u32 dst = smem_addr(&ksh[j & 1][0]);
        for (int i = tid; i < rows * pieces; i += blockDim.x) {
            const int r = i / pieces, k = 8 * (i - r * pieces);
            cp_async16_s(dst + 2 * (r * IDXM_KSTRIDE + k), kh + r * dn + k);
        }
        cp_async_commit();
    };
    const i64 halves = 2 * tiles_per_cta;
    issue(0);  // first < nv_max (checked above)
    for (i64 j = 0; j < halves; j++) {
        const i64 r0 = first + j * IDXM_HALF;
        if (r0 >= nv_max) break;  // uniform
        cp_async_wait_all();
        __syncthreads();  // half j has landed; half j - 1's buffer is used up
        if (j + 1 < halves && r0 + IDXM_HALF < nv_max) issue(j + 1);
        if (!active) continue;
        const u16* kbuf = &ksh[j & 1][0];
        for (int grp = warp / (int)tpc; grp < groups; grp += group_step) {
            const i64 rn = r0 + 8 * grp;
            if (rn >= nv) break;  // uniform over the warp
            float acc[4][4];
#pragma unroll
            for (int m = 0; m < 4; m++)
#pragma unroll
                for (int i = 0; i < 4; i++) acc[m][i] = 0.f;
            // Lane l addresses row l % 8 of matrix l / 8: channels 16s + 8(l / 8) of the pair
            // of k steps s, s + 1 (b0, b1 of step s, then of step s + 1).
            const u32 base = smem_addr(kbuf + (8 * grp + (lane & 7)) * IDXM_KSTRIDE + 8 * (lane >> 3));
#pragma unroll
            for (int s = 0; s < 8; s += 2) {
                u32 b[4];
                asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];"
                             : "=r"(b[0]), "=r"(b[1]), "=r"(b[2]), "=r"(b[3])
                             : "r"(base + 16 * s * 2));
#pragma unroll
                for (int m = 0; m < 4; m++) {
                    idxm_mma(acc[m], a[m][s], b[0], b[1]);
                    idxm_mma(acc[m], a[m][s + 1], b[2], b[3]);
                }
            }
            // acc[m][e] (e = 0, 1) is head 16m + g's dot with row rn + 2c + e, acc[m][2 + e]
            // head 16m + 8 + g's: head g + 8j is acc[j / 2][2 (j % 2) + e]. index_scores's
            // lane L = g + 8j' (j' < 4) sums heads L and L + 32 (j' and j' + 4).
#pragma unroll
            for (int e = 0; e < 2; e++) {
                float sl[4];
#pragma unroll
                for (int jl = 0; jl < 4; jl++) {
                    const int jh = jl + 4;
                    float s = 0.f;
                    s += wh[jl] * fmaxf(acc[jl / 2][2 * (jl % 2) + e], 0.0f);
                    s += wh[jh] * fmaxf(acc[jh / 2][2 * (jh % 2) + e], 0.0f);
                    sl[jl] = s;
                }
                // warp_sum's tree: lane L ^ 16 is j' ^ 2, L ^ 8 is j' ^ 1, then L ^ 4, 2, 1
                // are g ^ 4, 2, 1: lane ^ 16, 8, 4.
                float v = (sl[0] + sl[2]) + (sl[1] + sl[3]);
                v += __shfl_xor_sync(FULL_MASK, v, 16);
                v += __shfl_xor_sync(FULL_MASK, v, 8);
                v += __shfl_xor_sync(FULL_MASK, v, 4);
                const i64 r = rn + 2 * c + e;
                if (g == 0 && r < nv) scores[r] = v;
            }
        }
    }
}

// Scores as unsigned keys in the same order (NaN lowest, as topk_key): larger float, larger key.
__device__ __forceinline__ u32 score_key(float v) {
    const u32 u = __float_as_uint(topk_key(v) + 0.0f);  // + 0: -0 and +0 compare equal
    return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

#define SELECT_THREADS 1024
#define SELECT_WARPS (SELECT_THREADS / 32)

// A visible row's key: from the shared cache below `cached` rows, else from its score.
__device__ __forceinline__ u32 select_key(const u32* cache, int cached, const float* sc, int i) {
    return i < cached ? cache[i] : score_key(sc[i]);
}

// The selection lists, one CTA of SELECT_THREADS per token: with at most topk visible rows
// ((pos+1)/ratio) all are kept; otherwise exactly topk: the rows whose key is above the
// topk-th largest key and the lowest-index rows equal to it (the CPU's rank order), written in
// ascending order to sel[t * topk ..], their count to selc[t].
// 1. The topk-th largest key by radix selection, 8 bits a pass from the top: a 256-bin
//    histogram of the keys matching the digits chosen so far. The scores' top bits are alike,
//    so lanes of a warp hitting the same bin add once (__match_any_sync) instead of
//    serializing on it, and one warp finds the digit by a suffix scan. It stops early when the
//    chosen bin is kept whole (then every key from that bin's lowest value up is kept). The
//    first pass stores the keys of rows below cache_rows in dynamic shared memory
//    (cache_rows x 4 bytes); later walks read rows past it from the scores again, so any row
//    count is handled.
// 2. Compaction: warp w walks a contiguous run of rows 32 at a time and counts the rows above
//    and equal to the threshold; from the counts of the warps before it each warp knows its
//    first output slot and how many equal rows precede its run, and a second walk writes.
// Scores: n_tok x max_rows (row t * max_rows); the span starts at position *pos_.
extern "C" __global__ void __launch_bounds__(SELECT_THREADS, 2)
    index_topk(u64 scores_, u64 sel_, u64 selc_, u64 pos_, i64 ratio, i64 topk, i64 max_rows, i64 cache_rows) {
    PDL_ENTRY();
    extern __shared__ u32 kcache[];
    __shared__ u32 hist[256];
    __shared__ u32 prefix_s, remaining_s, thr_s, keep_eq_s;
    __shared__ int done_s;
    __shared__ u32 warp_above[SELECT_WARPS], warp_equal[SELECT_WARPS];
    const i64 t = blockIdx.x;
    const int nv = (int)((*(const i64*)pos_ + t + 1) / ratio);
    int* sel = (int*)sel_ + t * topk;
    if (nv <= topk) {  // uniform over the CTA
        for (int i = threadIdx.x; i < nv; i += SELECT_THREADS) sel[i] = i;
        if (threadIdx.x == 0) ((int*)selc_)[t] = nv;
        return;
    }
    const float* sc = (const float*)scores_ + t * max_rows;
    const int cached = (int)min64(nv, cache_rows);
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const unsigned lanes_below = (1u << lane) - 1u;
    if (threadIdx.x == 0) {
        prefix_s = 0;
        remaining_s = (u32)topk;
        done_s = 0;
    }
    for (int shift = 24; shift >= 0; shift -= 8) {
        if (threadIdx.x < 256) hist[threadIdx.x] = 0;
        __syncthreads();  // the histogram is clear and the previous pass's digit visible
        const u32 prefix = prefix_s;
        const u32 mask = shift == 24 ? 0u : 0xFFFFFFFFu << (shift + 8);
        for (int i0 = 0; i0 < nv; i0 += SELECT_THREADS) {
            const int i = i0 + threadIdx.x;
            u32 key = 0;
            if (i < nv) {
                if (shift == 24) {
                    key = score_key(sc[i]);
                    if (i < cached) kcache[i] = key;
                } else {
                    key = select_key(kcache, cached, sc, i);
                }
            }
            const bool in = i < nv && (key & mask) == prefix;
            const unsigned active = __ballot_sync(FULL_MASK, in);
            if (in) {
                const u32 bin = (key >> shift) & 255u;
                const unsigned peers = __match_any_sync(active, bin);
                if ((peers & lanes_below) == 0) atomicAdd(&hist[bin], (u32)__popc(peers));
            }
        }
        __syncthreads();
        if (warp == 0) {
            // Lane l holds bins 8l .. 8l+7; S: the count of its bins and all above them.
            u32 s = 0;
#pragma unroll
            for (int k = 0; k < 8; k++) s += hist[lane * 8 + k];
            u32 S = s;
#pragma unroll
            for (int o = 1; o < 32; o <<= 1) {
                const u32 v = __shfl_down_sync(FULL_MASK, S, o);
                if (lane + o < 32) S += v;
            }
            const u32 remaining = remaining_s, above = S - s;
            // Exactly one lane holds the remaining-th largest key's digit (the matching keys
            // number at least `remaining`); it walks its bins from the top.
            if (above < remaining && remaining <= S) {
                u32 rem = remaining - above, cd;
                int d = lane * 8 + 7;
                for (;; d--) {
                    cd = hist[d];
                    if (cd >= rem || d == lane * 8) break;
                    rem -= cd;
                }
                const u32 p = prefix | ((u32)d << shift);
                prefix_s = p;
                remaining_s = rem;
                if (cd == rem && p > 0) {  // the whole bin is kept: every key >= p
                    thr_s = p - 1;
                    keep_eq_s = 0;
                    done_s = 1;
                } else {
                    thr_s = p;
                    keep_eq_s = rem;
                }
            }
        }
        __syncthreads();
        if (done_s) break;  // uniform
    }
    const u32 thr = thr_s, keep_eq = keep_eq_s;
    const int run = (nv + SELECT_THREADS - 1) / SELECT_THREADS * 32;
    const int lo = min(warp * run, nv), hi = min(lo + run, nv);
    u32 n_above = 0, n_equal = 0;
    for (int i0 = lo; i0 < hi; i0 += 32) {
        const int i = i0 + lane;
        const u32 key = i < hi ? select_key(kcache, cached, sc, i) : 0u;
        n_above += __popc(__ballot_sync(FULL_MASK, i < hi && key > thr));
        n_equal += __popc(__ballot_sync(FULL_MASK, i < hi && key == thr));
    }
    if (lane == 0) {
        warp_above[warp] = n_above;
        warp_equal[warp] = n_equal;
    }
    __syncthreads();
    // The rows kept before this warp's run: all above, and the equal ones while keep_eq lasts.
    u32 a0 = lane < warp ? warp_above[lane] : 0u, eq_seen = lane < warp ? warp_equal[lane] : 0u;
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
        a0 += __shfl_xor_sync(FULL_MASK, a0, o);
        eq_seen += __shfl_xor_sync(FULL_MASK, eq_seen, o);
    }
    u32 base = a0 + min(eq_seen, keep_eq);
    for (int i0 = lo; i0 < hi; i0 += 32) {
        const int i = i0 + lane;
        const u32 key = i < hi ? select_key(kcache, cached, sc, i) : 0u;
        const bool above = i < hi && key > thr, equal = i < hi && key == thr;
        const unsigned eq_mask = __ballot_sync(FULL_MASK, equal);
        const bool f = above || (equal && eq_seen + __popc(eq_mask & lanes_below) < keep_eq);
        const unsigned kept = __ballot_sync(FULL_MASK, f);
        if (f) sel[base + __popc(kept & lanes_below)] = i;
        base += __popc(kept);
        eq_seen += __popc(eq_mask);
    }
    if (warp == SELECT_WARPS - 1 && lane == 0) ((int*)selc_)[t] = (int)base;
}
