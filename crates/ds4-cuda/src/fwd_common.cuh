// Helpers shared by the forward-pass kernel modules (hc.cu, attention.cu, compressor.cu,
// moe.cu). Prepended after common.cuh. Every function mirrors a CPU reference function of
// ds4-model (cpu/*.rs, numerics.rs) operation for operation, so results agree to rounding.
//
// Kernel parameters are all 8 bytes wide (u64 pointers, i64 counts, double scalars): the
// Rust side passes each as one u64 bit pattern (fwd_kernels.rs).

#define EMPTY_SCORE (-1e30f)
#define FWD_INF __int_as_float(0x7f800000)
#define FP8_MAX 448.0f
#define FP4_MAX 6.0f

__device__ __forceinline__ float sigmoidf_ref(float x) { return 1.0f / (1.0f + expf(-x)); }

// NaN sorts below everything (the CPU's top-k key).
__device__ __forceinline__ float topk_key(float v) { return isnan(v) ? -FWD_INF : v; }

// Sum of a double over the CTA. Every thread must call it (uniform control flow).
__device__ double cta_sum_f64(double v) {
    __shared__ double part[32];
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(FULL_MASK, v, o);
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    __syncthreads();
    if (lane == 0) part[warp] = v;
    __syncthreads();
    double s = 0.0;
    const int nw = (blockDim.x + 31) >> 5;
    for (int i = 0; i < nw; i++) s += part[i];
    __syncthreads();
    return s;
}

// 2^ceil(log2(max(amax, floor) / max_code)): numerics.rs pow2_scale.
__device__ __forceinline__ float pow2_scale(float amax, float floor_, float max_code) {
    return exp2f(ceilf(log2f(fmaxf(amax, floor_) / max_code)));
}

// Nearest E4M3FN value (|x| <= 448), ties to even: numerics.rs fp8_e4m3_nearest.
__device__ __forceinline__ float fp8_e4m3_nearest(float x) {
    const float a = fabsf(x);
    if (a == 0.0f || isnan(a)) return x;
    float step;
    if (a < 0.015625f) {
        step = 0.001953125f;  // 2^-9
    } else {
        const int e = (int)((__float_as_uint(a) >> 23) & 0xff) - 127;
        step = ldexpf(1.0f, e - 3);
    }
    const float q = rintf(x / step) * step;
    return fminf(fmaxf(q, -FP8_MAX), FP8_MAX);
}

// FP8 round trip of one block of n <= 64 values by one warp, two values per lane
// (numerics.rs fp8_e4m3_round_trip_row, one block; its max is order-free, so the block scale
// equals the CPU's).
__device__ void fp8_block_warp(float* v, int n) {
    const int lane = threadIdx.x & 31;
    const float a = lane < n ? v[lane] : 0.f, b = lane + 32 < n ? v[lane + 32] : 0.f;
    float amax = fmaxf(fabsf(a), fabsf(b));
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) amax = fmaxf(amax, __shfl_xor_sync(FULL_MASK, amax, o));
    const float scale = pow2_scale(amax, 1e-4f, FP8_MAX);
    if (lane < n) v[lane] = fp8_e4m3_nearest(fminf(fmaxf(a / scale, -FP8_MAX), FP8_MAX)) * scale;
    if (lane + 32 < n) v[lane + 32] = fp8_e4m3_nearest(fminf(fmaxf(b / scale, -FP8_MAX), FP8_MAX)) * scale;
}

// Nearest E2M1 value (|x| <= 6), ties to the even code: numerics.rs fp4_e2m1_nearest.
__device__ __forceinline__ float fp4_e2m1_nearest(float x) {
    const float grid[8] = {0.0f, 0.5f, 1.0f, 1.5f, 2.0f, 3.0f, 4.0f, 6.0f};
    const float a = fabsf(x);
    int best = 0;
    for (int code = 1; code < 8; code++) {
        const float dn = fabsf(a - grid[code]), db = fabsf(a - grid[best]);
        if (dn < db || (dn == db && (code & 1) == 0)) best = code;
    }
    return copysignf(grid[best], x);
}

// FP4 round trip of one block of n <= 32 values by one warp, one value per lane
// (numerics.rs fp4_e2m1_round_trip, one block).
__device__ void fp4_block_warp(float* v, int n) {
    const int lane = threadIdx.x & 31;
    const float a = lane < n ? v[lane] : 0.f;
    float amax = fabsf(a);
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) amax = fmaxf(amax, __shfl_xor_sync(FULL_MASK, amax, o));
    const float scale = pow2_scale(amax, 7.05e-38f, FP4_MAX);
    if (lane < n) v[lane] = fp4_e2m1_nearest(fminf(fmaxf(a / scale, -FP4_MAX), FP4_MAX)) * scale;
}

// In-CTA Walsh-Hadamard transform of x[0..n) (n a power of two) in shared memory, then
// times 1/sqrt(n): numerics.rs hadamard_rotate. Every thread must call it.
__device__ void cta_hadamard(float* x, int n) {
    for (int h = 1; h < n; h *= 2) {
        __syncthreads();
        for (int idx = threadIdx.x; idx < n / 2; idx += blockDim.x) {
            const int i = (idx / h) * 2 * h + (idx % h), j = i + h;
            const float u = x[i], v = x[j];
            x[i] = u + v;
            x[j] = u - v;
        }
    }
    __syncthreads();
    const float s = 1.0f / sqrtf((float)n);
    for (int i = threadIdx.x; i < n; i += blockDim.x) x[i] *= s;
    __syncthreads();
}

// The rotated pair (x0, x1) by an angle of sine fs and cosine fc: one expression each, shared
// by every kernel that rotates, so that all contract them alike.
__device__ __forceinline__ float rope_first(float x0, float x1, float fs, float fc) { return x0 * fc - x1 * fs; }
__device__ __forceinline__ float rope_second(float x0, float x1, float fs, float fc) { return x0 * fs + x1 * fc; }

// Rotates the pair p[0], p[1] by pos × inv_freq (or backwards): rope.rs rotate_tail. The
// angle and its sine/cosine are computed in double, then rounded to f32, as the CPU does.
// The rotation as (sine, cosine) in f32, rope_pair_at's first half (a kernel can form it
// before its PDL wait).
__device__ __forceinline__ float2 rope_rotation(i64 pos, double inv_freq, bool inverse) {
    const double phi = (double)pos * inv_freq;
    double s, c;
    sincos(phi, &s, &c);
    return make_float2((float)((inverse ? -1.0 : 1.0) * s), (float)c);
}
__device__ __forceinline__ void rope_rotate(float* p, float2 sc) {
    const float x0 = p[0], x1 = p[1];
    p[0] = rope_first(x0, x1, sc.x, sc.y);
    p[1] = rope_second(x0, x1, sc.x, sc.y);
}
__device__ __forceinline__ void rope_pair_at(float* p, i64 pos, double inv_freq, bool inverse) {
    rope_rotate(p, rope_rotation(pos, inv_freq, inverse));
}
// Rotates pair l of the tail of a `width`-wide vector.
__device__ __forceinline__ void rope_pair(float* x, i64 width, i64 r, int l, i64 pos, const double* inv_freq,
                                          bool inverse) {
    rope_pair_at(x + (width - r) + 2 * l, pos, inv_freq[l], inverse);
}

__device__ __forceinline__ float f16_round(float x) { return f16_to_f32(f32_to_f16(x)); }

// The MoE output sums a token's k expert-output rows in ascending (expert id, slot) order:
// the slot after (last_id, last_slot) in that order (start from -1, -1).
__device__ __forceinline__ i64 moe_next_slot(const int* ids, i64 k, int last_id, i64 last_slot) {
    i64 best = -1;
    for (i64 j = 0; j < k; j++) {
        const bool after = ids[j] > last_id || (ids[j] == last_id && j > last_slot);
        if (!after) continue;
        if (best < 0 || ids[j] < ids[best]) best = j;
    }
    return best;
}

// Element i of token t's MoE output: shared[t][i] + the sum over the token's k slots, in
// moe_next_slot's order, of a * down[row][i] (a = the slot's weight when `weighted`, else 1;
// row = inv[slot] when the slots were sorted, inv != 0, else the slot). hc_post_mix computes
// it per element in place of reading y (registers only: decode's critical path); moe_combine
// orders the slots once per CTA and sums the same way. Up to MOE_FAST_K slots, each slot's
// rank in that order comes from register compares and all k rows are loaded at once (one
// memory round trip, not k dependent ones); the sum is taken in rank order, so the bits are
// those of the walk below, which serves larger k.
#define MOE_FAST_K 8
__device__ __forceinline__ float moe_combined(const float* down, const int* inv, const int* ids_, const float* wts_,
                                              const float* shared, i64 t, i64 i, i64 k, i64 d, i64 weighted) {
    const int* ids = ids_ + t * k;
    const float* wts = wts_ + t * k;
    float acc = 0.f;
    if (k <= MOE_FAST_K) {
        int id[MOE_FAST_K];
        float a[MOE_FAST_K], v[MOE_FAST_K];
#pragma unroll
        for (int j = 0; j < MOE_FAST_K; j++) {
            id[j] = j < k ? ids[j] : 0;
            a[j] = j < k && weighted ? wts[j] : 1.0f;
        }
#pragma unroll
        for (int j = 0; j < MOE_FAST_K; j++) {
            if (j < k) {
                const i64 slot = t * k + j, row = inv ? (i64)inv[slot] : slot;
                v[j] = down[row * d + i];
            } else {
                v[j] = 0.f;
            }
        }
        // rank[j]: slots before j in ascending (id, slot) order.
        int rank[MOE_FAST_K];
#pragma unroll
        for (int j = 0; j < MOE_FAST_K; j++) {
            int r = 0;
#pragma unroll
            for (int m = 0; m < MOE_FAST_K; m++)
                if (m < k && (id[m] < id[j] || (id[m] == id[j] && m < j))) r++;
            rank[j] = r;
        }
#pragma unroll
        for (int r = 0; r < MOE_FAST_K; r++) {
            if (r >= k) break;
            float ar = 0.f, vr = 0.f;
#pragma unroll
            for (int j = 0; j < MOE_FAST_K; j++)
                if (j < k && rank[j] == r) {
                    ar = a[j];
                    vr = v[j];
                }
            acc += ar * vr;
        }
        return shared[t * d + i] + acc;
    }
    int last_id = -1;
    i64 last_slot = -1;
    for (i64 n = 0; n < k; n++) {
        const i64 best = moe_next_slot(ids, k, last_id, last_slot);
        const float a = weighted ? wts[best] : 1.0f;
        const i64 slot = t * k + best, row = inv ? (i64)inv[slot] : slot;
        acc += a * down[row * d + i];
        last_id = ids[best];
        last_slot = best;
    }
    return shared[t * d + i] + acc;
}
