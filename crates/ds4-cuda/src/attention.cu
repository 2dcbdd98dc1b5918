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

// ds4's stored-KV rounding of one row per CTA: FP8 round trip of the first `nope` channels in
// blocks of 64, then f16 rounding of every channel (forward.rs store_kv_row).
extern "C" __global__ void kv_round(u64 x_, i64 width, i64 nope) {
    PDL_ENTRY();
    float* row = (float*)x_ + (i64)blockIdx.x * width;
    const int warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
    for (i64 b = warp; b * 64 < nope; b += warps) fp8_block_warp(row + b * 64, (int)min64(64, nope - b * 64));
    __syncthreads();
    for (i64 i = threadIdx.x; i < width; i += blockDim.x) row[i] = f16_round(row[i]);
}

// ds4's indexer rounding of one vector per CTA: Hadamard rotation, FP4 round trip in blocks
// of 32, and (store != 0) f16 rounding (forward.rs index_qat). Dynamic shared: width floats.
extern "C" __global__ void index_round(u64 x_, i64 width, i64 store) {
    PDL_ENTRY();
    extern __shared__ float sh[];
    float* row = (float*)x_ + (i64)blockIdx.x * width;
    for (i64 i = threadIdx.x; i < width; i += blockDim.x) sh[i] = row[i];
    cta_hadamard(sh, (int)width);
    const int warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
    for (i64 b = warp; b * 32 < width; b += warps) fp4_block_warp(sh + b * 32, (int)min64(32, width - b * 32));
    __syncthreads();
    for (i64 i = threadIdx.x; i < width; i += blockDim.x) row[i] = store ? f16_round(sh[i]) : sh[i];
}

// x[i] *= s
extern "C" __global__ void scale_f32(u64 x_, i64 n, double s) {
    PDL_ENTRY();
    for (i64 i = (i64)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (i64)gridDim.x * blockDim.x)
        ((float*)x_)[i] *= (float)s;
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
    const i64 first = pos + 1 > window ? pos + 1 - window : 0;
    const i64 nw = pos - first + 1;
    const i64 nc = kind == 1 ? (pos + 1) / ratio : (kind == 2 ? (i64)((const int*)selc_)[t] : 0);
    const i64 nr = nw + nc;
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
