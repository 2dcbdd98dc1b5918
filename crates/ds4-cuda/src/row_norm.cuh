// The segment machinery of the per-vector kernels, shared by vector_ops.cu and hc.cu (whose
// hc_pre_norm fuses the hyper-connection pre-mix with the RMS norm that follows it, and must
// give the norm kernels' bits): segment loads and stores, the activation quantizers and the
// row RMS norm. Prepended to those modules after common.cuh (kernels.rs, fwd_kernels.rs).
//
// Every thread owns "segments" of 8 consecutive values, issues all of its loads (two 16-byte
// loads per segment when the data is aligned) before doing arithmetic on them, and the
// quantizers reduce inside a warp: a Q8_0 block (32 values) is 4 adjacent lanes, a Q8_K block
// (256 values) is one warp.

#define SEG 8

// Which quantizers, if any, follow the norm or the SwiGLU (a bit set).
#define QUANT_NONE 0
#define QUANT_Q8_0 1
#define QUANT_Q8_K 2
#define QUANT_BOTH 3

// Most threads per row of the RMS norm, and the segments a thread keeps in registers between
// reading a row and writing it back: one in the short-row kernels (rows of up to 512 * 8 =
// 4096 values, few registers), RMS_LONG_CACHED in the _long ones (rows of up to 16384 values
// are read once, longer rows a second time; 512 threads leave 128 registers per thread).
#define RMS_THREADS 512
#define RMS_LONG_CACHED 4

// ---- segment loads and stores ----
// V4: the row is 16-byte aligned and n % 8 == 0, so a segment that starts inside the row is
// whole and two float4 accesses move it. Otherwise scalar accesses guarded by the row end.

template <bool V4>
__device__ __forceinline__ void load_seg(const float* __restrict__ p, i64 i0, i64 n, float v[SEG]) {
    if (V4) {
        const float4 a = *(const float4*)(p + i0);
        const float4 b = *(const float4*)(p + i0 + 4);
        v[0] = a.x, v[1] = a.y, v[2] = a.z, v[3] = a.w;
        v[4] = b.x, v[5] = b.y, v[6] = b.z, v[7] = b.w;
    } else {
#pragma unroll
        for (int j = 0; j < SEG; j++) v[j] = i0 + j < n ? p[i0 + j] : 0.0f;
    }
}

template <bool V4>
__device__ __forceinline__ void store_seg(float* __restrict__ p, i64 i0, i64 n, const float v[SEG]) {
    if (V4) {
        *(float4*)(p + i0) = make_float4(v[0], v[1], v[2], v[3]);
        *(float4*)(p + i0 + 4) = make_float4(v[4], v[5], v[6], v[7]);
    } else {
#pragma unroll
        for (int j = 0; j < SEG; j++)
            if (i0 + j < n) p[i0 + j] = v[j];
    }
}

// 8 int8 values at p (8-byte aligned when V4).
template <bool V4>
__device__ __forceinline__ void store_q_seg(i8* __restrict__ p, const int q[SEG]) {
    if (V4) {
        u32 lo = 0, hi = 0;
#pragma unroll
        for (int j = 0; j < 4; j++) {
            lo |= ((u32)q[j] & 0xFFu) << (8 * j);
            hi |= ((u32)q[j + 4] & 0xFFu) << (8 * j);
        }
        *(uint2*)p = make_uint2(lo, hi);
    } else {
#pragma unroll
        for (int j = 0; j < SEG; j++) p[j] = (i8)q[j];
    }
}

// ---- activation quantizers, one segment per lane ----
// All 32 lanes of the warp must call these together (they shuffle); `valid` says whether the
// lane's segment exists (whole quantization blocks are either valid or not). `seg` is the
// segment index counted from q (and the block index of d is derived from it); the lanes of a
// warp hold 32 consecutive segments starting at a multiple of 32.

// Q8_0 as ds4 quantizes activations before a Q8_0 matmul: per 32 values d = amax/127 (kept
// f32), q = round-half-to-even(x/d) clamped to +-127. The block is 4 adjacent lanes.
template <bool V4>
__device__ __forceinline__ void quantize_seg_q8_0(const float v[SEG], bool valid, i64 seg, i8* __restrict__ q,
                                                  float* __restrict__ d) {
    float amax = 0.0f;
#pragma unroll
    for (int j = 0; j < SEG; j++) amax = fmaxf(amax, fabsf(v[j]));
    amax = fmaxf(amax, __shfl_xor_sync(FULL_MASK, amax, 1));
    amax = fmaxf(amax, __shfl_xor_sync(FULL_MASK, amax, 2));
    const float dd = amax / 127.0f;
    const float id = dd != 0.0f ? 1.0f / dd : 0.0f;
    int qv[SEG];
#pragma unroll
    for (int j = 0; j < SEG; j++) qv[j] = max(-127, min(127, __float2int_rn(v[j] * id)));
    if (!valid) return;
    store_q_seg<V4>(q + seg * SEG, qv);
    if ((seg & 3) == 0) d[seg >> 2] = dd;
}

// Q8_K (ggml quantize_row_q8_K): per 256 values, max = the value of largest magnitude (first
// one on ties), iscale = -127/max, q = min(127, rint(iscale*x)), d = 1/iscale; an all-zero
// block gives d = 0, q = 0. The block is one warp.
template <bool V4>
__device__ __forceinline__ void quantize_seg_q8_k(const float v[SEG], bool valid, i64 seg, i8* __restrict__ q,
                                                  float* __restrict__ d) {
    const int lane = threadIdx.x & 31;
    float amax = 0.0f, mx = 0.0f;
    int idx = 1 << 30;
#pragma unroll
    for (int j = 0; j < SEG; j++) {
        const float ax = fabsf(v[j]);
        if (ax > amax) amax = ax, mx = v[j], idx = lane * SEG + j;
    }
    // (amax descending, index ascending) is a total order, so every lane ends on the same max.
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
        const float a2 = __shfl_xor_sync(FULL_MASK, amax, o);
        const float m2 = __shfl_xor_sync(FULL_MASK, mx, o);
        const int i2 = __shfl_xor_sync(FULL_MASK, idx, o);
        if (a2 > amax || (a2 == amax && i2 < idx)) amax = a2, mx = m2, idx = i2;
    }
    int qv[SEG];
    float dd = 0.0f;
    if (amax == 0.0f) {
#pragma unroll
        for (int j = 0; j < SEG; j++) qv[j] = 0;
    } else {
        const float iscale = -127.0f / mx;
#pragma unroll
        for (int j = 0; j < SEG; j++) qv[j] = min(127, __float2int_rn(iscale * v[j]));
        dd = 1.0f / iscale;
    }
    if (!valid) return;
    store_q_seg<V4>(q + seg * SEG, qv);
    if (lane == 0) d[seg >> 5] = dd;
}

// The quantizers selected by QUANT: Q8_0 into (q0, d0), Q8_K into (qk, dk).
template <int QUANT, bool V4>
__device__ __forceinline__ void quantize_seg(const float v[SEG], bool valid, i64 seg, i8* q0, float* d0, i8* qk,
                                             float* dk) {
    if (QUANT & QUANT_Q8_0) quantize_seg_q8_0<V4>(v, valid, seg, q0, d0);
    if (QUANT & QUANT_Q8_K) quantize_seg_q8_k<V4>(v, valid, seg, qk, dk);
}

// ---- RMS norm ----

__device__ __forceinline__ double warp_sum_f64(double v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(FULL_MASK, v, o);
    return v;
}

// Sum of v over the CTA (blockDim.x a multiple of 32, at most 1024), the same bits in every
// thread: a xor butterfly adds the same pairs in every lane (a + b == b + a), and every warp
// reduces the same per-warp partials. One __syncthreads; call it once per kernel (part[] is
// not protected against reuse).
__device__ __forceinline__ double block_sum_f64(double v) {
    __shared__ double part[32];
    v = warp_sum_f64(v);
    const int nw = blockDim.x >> 5;
    if (nw == 1) return v;
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    if (lane == 0) part[warp] = v;
    __syncthreads();
    return warp_sum_f64(lane < nw ? part[lane] : 0.0);
}

// The row x (n values) of the RMS norm y = x * scale * w, scale = (float)(1 / sqrt(sum(x^2) / n
// + eps)), from this thread's cached segments v (x's segments threadIdx.x + k * blockDim.x,
// zeros past the row end) and wv (w's, ones where w is null or past the end): the sum of
// squares in double (each square of a float is exact in double) per thread, then over the
// CTA (block_sum_f64); segments beyond the cached ones are read from x again. y's row yr and
// the row's quantized outputs (q0/d0, qk/dk: offset to the row, selected by QUANT) are
// written. Every thread of the CTA calls it (it synchronizes).
template <int QUANT, bool V4, int CACHED>
__device__ __forceinline__ void rmsnorm_row_body(const float (&v)[CACHED][SEG], const float (&wv)[CACHED][SEG],
                                                 const float* __restrict__ xr, const float* __restrict__ w,
                                                 float* __restrict__ yr, i8* __restrict__ q0, float* __restrict__ d0,
                                                 i8* __restrict__ qk, float* __restrict__ dk, i64 n, float eps) {
    const i64 nseg = (n + SEG - 1) / SEG;
    const i64 nthreads = blockDim.x;
    double ss = 0.0;
#pragma unroll
    for (int k = 0; k < CACHED; k++) {
        if (k * nthreads >= nseg) break;  // uniform: short rows skip the unused slots
#pragma unroll
        for (int j = 0; j < SEG; j++) ss += (double)v[k][j] * (double)v[k][j];
    }
    for (i64 s = threadIdx.x + CACHED * nthreads; s < nseg; s += nthreads) {
        float t[SEG];
        load_seg<V4>(xr, s * SEG, n, t);
#pragma unroll
        for (int j = 0; j < SEG; j++) ss += (double)t[j] * (double)t[j];
    }
    ss = block_sum_f64(ss);
    const float scale = rms_scale(ss, n, (double)eps);

    // Write back. Loop bounds are uniform over the CTA so that whole warps reach the shuffles
    // of the quantizers; lanes past the row end only skip their stores.
#pragma unroll
    for (int k = 0; k < CACHED; k++) {
        if (k * nthreads >= nseg) break;
        const i64 s = threadIdx.x + k * nthreads;
        float o[SEG];
#pragma unroll
        for (int j = 0; j < SEG; j++) o[j] = v[k][j] * scale * wv[k][j];
        if (s < nseg) store_seg<V4>(yr, s * SEG, n, o);
        quantize_seg<QUANT, V4>(o, s < nseg, s, q0, d0, qk, dk);
    }
    for (i64 base = CACHED * nthreads; base < nseg; base += nthreads) {
        const i64 s = base + threadIdx.x;
        const bool valid = s < nseg;
        float t[SEG], tw[SEG], o[SEG];
        if (valid) {
            load_seg<V4>(xr, s * SEG, n, t);
        } else {
#pragma unroll
            for (int j = 0; j < SEG; j++) t[j] = 0.0f;
        }
        if (w && valid) {
            load_seg<V4>(w, s * SEG, n, tw);
        } else {
#pragma unroll
            for (int j = 0; j < SEG; j++) tw[j] = 1.0f;
        }
#pragma unroll
        for (int j = 0; j < SEG; j++) o[j] = t[j] * scale * tw[j];
        if (valid) store_seg<V4>(yr, s * SEG, n, o);
        quantize_seg<QUANT, V4>(o, valid, s, q0, d0, qk, dk);
    }
}

// This thread's cached segments of w (rmsnorm_row_body's wv): ones where w is null or past
// the row end (x * scale * 1 == x * scale exactly).
template <bool V4, int CACHED>
__device__ __forceinline__ void rmsnorm_load_weight(const float* __restrict__ w, i64 n, float (&wv)[CACHED][SEG]) {
    const i64 nseg = (n + SEG - 1) / SEG;
#pragma unroll
    for (int k = 0; k < CACHED; k++) {
        const i64 s = threadIdx.x + k * (i64)blockDim.x;
        if (w && s < nseg) {
            load_seg<V4>(w, s * SEG, n, wv[k]);
        } else {
#pragma unroll
            for (int j = 0; j < SEG; j++) wv[k][j] = 1.0f;
        }
    }
}

// y[r] = x[r] * scale * w, scale = (float)(1 / sqrt(sum(x[r]^2) / n + eps)), the sum of squares
// in double, as the CPU reference computes it; only the order of the additions differs. w may
// be null (1). One CTA per row, blockDim.x a multiple of 32. With QUANT, the f32 output is
// also quantized, exactly as the standalone quantizer would from y: Q8_0 into q0 (i8[rows*n])
// and d0 (f32 per 32 values), Q8_K into qk and dk (f32 per 256 values); n must then be whole
// blocks.
template <int QUANT, bool V4, int CACHED>
__device__ __forceinline__ void rmsnorm_row(const float* __restrict__ x, const float* __restrict__ w,
                                            float* __restrict__ y, i8* __restrict__ q0, float* __restrict__ d0,
                                            i8* __restrict__ qk, float* __restrict__ dk, i64 n, float eps) {
    const i64 row = blockIdx.x;
    const float* xr = x + row * n;
    float* yr = y + row * n;
    // The quantized outputs are only touched (and only non-null) when selected.
    if (QUANT & QUANT_Q8_0) q0 += row * n, d0 += row * (n / 32);
    if (QUANT & QUANT_Q8_K) qk += row * n, dk += row * (n / 256);
    const i64 nseg = (n + SEG - 1) / SEG;

    // Every load of the cached segments (x and w) is issued before any arithmetic waits on one.
    float v[CACHED][SEG], wv[CACHED][SEG];
#pragma unroll
    for (int k = 0; k < CACHED; k++) {
        const i64 s = threadIdx.x + k * (i64)blockDim.x;
        if (s < nseg) {
            load_seg<V4>(xr, s * SEG, n, v[k]);
        } else {
#pragma unroll
            for (int j = 0; j < SEG; j++) v[k][j] = 0.0f;
        }
    }
    rmsnorm_load_weight<V4, CACHED>(w, n, wv);
    rmsnorm_row_body<QUANT, V4, CACHED>(v, wv, xr, w, yr, q0, d0, qk, dk, n, eps);
}
