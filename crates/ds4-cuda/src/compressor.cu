// The KV compressors and the lightning indexer's selection (cpu/compressor.rs,
// cpu/indexer.rs, cpu/forward.rs compress_span; dsv4-arch.md §3.6-3.8).
//
// Frontier layout as the CPU's (ds4's): kv and score are coff*m rows of coff*D (coff = 2 with
// overlap). With overlap, rows [0, m) hold the previous window, [m, 2m) the current one.

// Feeds n_tok tokens (their projections kv_in/gate_in, each coff*D wide) to one compressor in
// token order, on one CTA. Each token that closes a window pools a row, which is normalized
// (weight `norm`), RoPE'd at its window start, rounded (qat 1: FP8 nope + f16, as KV rows;
// qat 2: Hadamard + FP4 + f16, as indexer keys; 0: none) and appended at row n_rows0, n_rows0+1...
// Dynamic shared: D floats.
extern "C" __global__ void compress_span(u64 kv_in_, u64 gate_in_, u64 ape_, u64 norm_, u64 skv_, u64 ssc_, u64 rows_,
                                         i64 n_rows0, i64 n_tok, i64 pos0, i64 m, i64 D, i64 overlap, double eps,
                                         u64 inv_freq_, i64 r, i64 qat) {
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
        double ss = 0.0;
        for (i64 c = threadIdx.x; c < D; c += blockDim.x) ss += (double)row[c] * (double)row[c];
        ss = cta_sum_f64(ss);
        const float inv = (float)(1.0 / sqrt(ss / (double)D + eps));
        for (i64 c = threadIdx.x; c < D; c += blockDim.x) row[c] = row[c] * inv * norm[c];
        __syncthreads();
        const i64 row_pos = pos + 1 - m;
        for (int l = threadIdx.x; l < r / 2; l += blockDim.x) rope_pair(row, D, r, l, row_pos, (const double*)inv_freq_, false);
        __syncthreads();
        if (qat == 1) {
            const i64 nope = D - r;
            for (i64 b = threadIdx.x; b * 64 < nope; b += blockDim.x) fp8_block(row + b * 64, (int)min64(64, nope - b * 64));
            __syncthreads();
        } else if (qat == 2) {
            cta_hadamard(row, (int)D);
            for (i64 b = threadIdx.x; b * 32 < D; b += blockDim.x) fp4_block(row + b * 32, (int)min64(32, D - b * 32));
            __syncthreads();
        }
        float* out = (float*)rows_ + n_rows * D;
        for (i64 c = threadIdx.x; c < D; c += blockDim.x) out[c] = qat ? f16_round(row[c]) : row[c];
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

// The indexer's choice for one token per CTA: with at most topk visible rows ((pos+1)/ratio)
// all of them; otherwise score = sum_h w_h max(0, q_h . k) over every visible key and keep
// the topk best (ties: the lowest index), in ascending order. q: n_tok x ni x di, w: n_tok x
// ni (already scaled), keys: rows x di. Scratch: scores/flags of n_tok x max_rows.
extern "C" __global__ void index_select(u64 q_, u64 w_, u64 keys_, u64 scores_, u64 flags_, u64 sel_, u64 selc_,
                                        i64 pos0, i64 ratio, i64 ni, i64 di, i64 topk, i64 max_rows) {
    const i64 t = blockIdx.x, pos = pos0 + t, nv = (pos + 1) / ratio;
    int* sel = (int*)sel_ + t * topk;
    if (nv <= topk) {
        for (i64 i = threadIdx.x; i < nv; i += blockDim.x) sel[i] = (int)i;
        if (threadIdx.x == 0) ((int*)selc_)[t] = (int)nv;
        return;
    }
    float* sc = (float*)scores_ + t * max_rows;
    int* flag = (int*)flags_ + t * max_rows;
    const float* q = (const float*)q_ + t * ni * di;
    const float* wt = (const float*)w_ + t * ni;
    const float* keys = (const float*)keys_;
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
    for (i64 row = warp; row < nv; row += nwarps) {
        const float* k = keys + row * di;
        float s = 0.f;
        for (i64 h = 0; h < ni; h++) {
            float d = 0.f;
            for (i64 c = lane; c < di; c += 32) d += q[h * di + c] * k[c];
            d = warp_sum(d);
            s += wt[h] * fmaxf(d, 0.0f);
        }
        if (lane == 0) sc[row] = s;
    }
    __syncthreads();
    for (i64 i = threadIdx.x; i < nv; i += blockDim.x) {
        const float ki = topk_key(sc[i]);
        i64 rank = 0;
        for (i64 j = 0; j < nv && rank < topk; j++) {
            const float kj = topk_key(sc[j]);
            if (kj > ki || (kj == ki && j < i)) rank++;
        }
        flag[i] = rank < topk;
    }
    __syncthreads();
    if (threadIdx.x == 0) {
        int cnt = 0;
        for (i64 i = 0; i < nv; i++)
            if (flag[i]) sel[cnt++] = (int)i;
        ((int*)selc_)[t] = cnt;
    }
}
