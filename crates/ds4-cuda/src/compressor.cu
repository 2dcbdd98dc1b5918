// The KV compressors and the lightning indexer's selection (cpu/compressor.rs,
// cpu/indexer.rs, cpu/forward.rs compress_span; dsv4-arch.md §3.6-3.8).
//
// Frontier layout as the CPU's (ds4's): kv and score are coff*m rows of coff*D (coff = 2 with
// overlap). With overlap, rows [0, m) hold the previous window, [m, 2m) the current one.

// A pooled row (D values in shared `row`, complete for the CTA) normalized (weight `norm`),
// RoPE'd at row_pos, rounded (qat 1: FP8 nope + f16, as KV rows; qat 2: Hadamard + FP4 + f16,
// as indexer keys; 0: none) and stored at out. Every thread of the CTA must call it.
__device__ void compress_finish_row(float* row, const float* norm, i64 D, double eps, const double* inv_freq, i64 r,
                                    i64 row_pos, i64 qat, float* out) {
    double ss = 0.0;
    for (i64 c = threadIdx.x; c < D; c += blockDim.x) ss += (double)row[c] * (double)row[c];
    ss = cta_sum_f64(ss);
    const float inv = (float)(1.0 / sqrt(ss / (double)D + eps));
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
    for (i64 c = threadIdx.x; c < D; c += blockDim.x) out[c] = qat ? f16_round(row[c]) : row[c];
}

// Feeds n_tok tokens at positions *pos_.. (their projections kv_in/gate_in, each coff*D wide)
// to one compressor in token order, on one CTA. Each token that closes a window pools a row, which is normalized
// (weight `norm`), RoPE'd at its window start, rounded (qat 1: FP8 nope + f16, as KV rows;
// qat 2: Hadamard + FP4 + f16, as indexer keys; 0: none) and appended at row n_rows0, n_rows0+1...
// Dynamic shared: D floats.
extern "C" __global__ void compress_span(u64 kv_in_, u64 gate_in_, u64 ape_, u64 norm_, u64 skv_, u64 ssc_, u64 rows_,
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
        for (i64 c = threadIdx.x; c < w; c += blockDim.x) {
            skv[srow * w + c] = kin[c];
            ssc[srow * w + c] = gin[c] + ape[slot * w + c];
        }
        __syncthreads();
        if ((pos + 1) % m != 0) continue;  // uniform over the CTA
        // Per-channel softmax over the window's slots (previous A half first when overlapping).
        const i64 nslots = coff * m;
        for (i64 c = threadIdx.x; c < D; c += blockDim.x) {
            float mx = -FWD_INF;
            for (i64 s = 0; s < nslots; s++) {
                const i64 off = (overlap && s >= m) ? D : 0;
                mx = fmaxf(mx, ssc[s * w + off + c]);
            }
            float sum = 0.f, acc = 0.f;
            for (i64 s = 0; s < nslots; s++) {
                const i64 off = (overlap && s >= m) ? D : 0;
                const float e = expf(ssc[s * w + off + c] - mx);
                sum += e;
                acc += e * skv[s * w + off + c];
            }
            row[c] = acc / sum;
        }
        __syncthreads();
        compress_finish_row(row, norm, D, eps, (const double*)inv_freq_, r, pos + 1 - m, qat, (float*)rows_ + n_rows * D);
        n_rows++;
        // Advance: the current window becomes the previous one (overlap); the current slots empty.
        if (overlap) {
            for (i64 c = threadIdx.x; c < m * w; c += blockDim.x) {
                skv[c] = skv[m * w + c];
                ssc[c] = ssc[m * w + c];
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
                        (float*)rows_ + (W0 + k) * D);
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

// The indexer's choice (cpu/indexer.rs select_rows) in three steps over the chunk's tokens
// (scores, threshold by radix selection, ordered compaction):
// with at most topk visible rows ((pos+1)/ratio) all are kept; otherwise every visible key is
// scored, score = sum_h w_h max(0, q_h . k), and the topk best are kept (ties: the lowest
// index), in ascending order. q: n_tok x ni x di, w: n_tok x ni (times w_scale here), keys:
// rows x di; scores/flags: n_tok x max_rows scratch. The span starts at position *pos_.

// Scores: grid (rows / INDEX_TILE_ROWS / INDEX_TILES, n_tok), 256 threads. A CTA keeps its
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

// Scores as unsigned keys in the same order (NaN lowest, as topk_key): larger float, larger key.
__device__ __forceinline__ u32 score_key(float v) {
    const u32 u = __float_as_uint(topk_key(v) + 0.0f);  // + 0: -0 and +0 compare equal
    return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

#define SELECT_THREADS 1024

// The topk-th largest key among a token's visible rows, by radix selection (4 passes of 8
// bits over the keys, a 256-bin histogram each): sel_key[t] = that key, sel_eq[t] = how many
// rows with exactly that key are kept (the rest of the topk are the rows above it). One CTA
// per token; tokens with at most topk visible rows keep all and skip this.
extern "C" __global__ void __launch_bounds__(SELECT_THREADS)
    index_threshold(u64 scores_, u64 sel_key_, u64 sel_eq_, u64 pos_, i64 ratio, i64 topk, i64 max_rows) {
    PDL_ENTRY();
    const i64 t = blockIdx.x, nv = (*(const i64*)pos_ + t + 1) / ratio;
    if (nv <= topk) return;  // uniform over the CTA
    const float* sc = (const float*)scores_ + t * max_rows;
    __shared__ u32 hist[256];
    __shared__ u32 prefix_s, remaining_s;
    if (threadIdx.x == 0) {
        prefix_s = 0;
        remaining_s = (u32)topk;
    }
    for (int shift = 24; shift >= 0; shift -= 8) {
        for (int i = threadIdx.x; i < 256; i += blockDim.x) hist[i] = 0;
        __syncthreads();
        const u32 prefix = prefix_s;
        const u32 mask = shift == 24 ? 0u : (0xFFFFFFFFu << (shift + 8));
        for (i64 i = threadIdx.x; i < nv; i += blockDim.x) {
            const u32 key = score_key(sc[i]);
            if ((key & mask) == prefix) atomicAdd(&hist[(key >> shift) & 255], 1u);
        }
        __syncthreads();
        if (threadIdx.x == 0) {
            // The digit holding the remaining-th largest key: skip the counts above it.
            u32 remaining = remaining_s;
            int d = 255;
            for (; d > 0; d--) {
                if (hist[d] >= remaining) break;
                remaining -= hist[d];
            }
            prefix_s = prefix | ((u32)d << shift);
            remaining_s = remaining;
        }
        __syncthreads();
    }
    if (threadIdx.x == 0) {
        ((u32*)sel_key_)[t] = prefix_s;
        ((int*)sel_eq_)[t] = (int)remaining_s;
    }
}

// Selection lists: one warp per token writes the kept rows in ascending order and their count:
// the rows whose key is above the token's threshold, and the first sel_eq of those equal to it
// (ties go to the lowest index, as the CPU's rank order).
extern "C" __global__ void index_compact(u64 scores_, u64 sel_key_, u64 sel_eq_, u64 sel_, u64 selc_, u64 pos_,
                                         i64 ratio, i64 topk, i64 max_rows) {
    PDL_ENTRY();
    const i64 t = blockIdx.x, nv = (*(const i64*)pos_ + t + 1) / ratio;
    const int lane = threadIdx.x & 31;
    int* sel = (int*)sel_ + t * topk;
    if (nv <= topk) {
        for (i64 i = lane; i < nv; i += 32) sel[i] = (int)i;
        if (lane == 0) ((int*)selc_)[t] = (int)nv;
        return;
    }
    const float* sc = (const float*)scores_ + t * max_rows;
    const u32 thr = ((const u32*)sel_key_)[t];
    int eq_left = ((const int*)sel_eq_)[t];
    int base = 0;
    for (i64 i0 = 0; i0 < nv; i0 += 32) {
        const i64 i = i0 + lane;
        const u32 key = i < nv ? score_key(sc[i]) : 0u;
        const bool above = i < nv && key > thr, equal = i < nv && key == thr;
        const unsigned eq_mask = __ballot_sync(FULL_MASK, equal);
        const bool f = above || (equal && __popc(eq_mask & ((1u << lane) - 1u)) < eq_left);
        eq_left -= min(eq_left, __popc(eq_mask));
        const unsigned mask = __ballot_sync(FULL_MASK, f);
        if (f) sel[base + __popc(mask & ((1u << lane) - 1u))] = (int)i;
        base += __popc(mask);
    }
    if (lane == 0) ((int*)selc_)[t] = base;
}
