// Per-vector operations of the forward pass: RMS norm (optionally fused with the activation
// quantizer of the matvec it feeds), the clamped SwiGLU of the experts, and the activation
// quantizers that feed the dp4a matrix-vector kernels.
//
// Decode runs these on one token, i.e. rows of a few thousand values: they are latency-bound.
// The segment loads/stores, the quantizers and the RMS norm's row body are in row_norm.cuh
// (prepended to this module; hc.cu's fused hc_pre_norm uses them too).

// The launchable instances: plain, fused with Q8_0, Q8_K or both; each vectorized (_v4: x, w,
// y 16-byte aligned, q 8-byte aligned, n % 8 == 0) or general; each for rows of at most 4096
// values or longer (_long). Unselected q/d may be null.
#define RMSNORM_KERNEL(NAME, QUANT, V4, CACHED)                                                       \
    extern "C" __global__ void __launch_bounds__(RMS_THREADS)                                         \
        NAME(const float* __restrict__ x, const float* __restrict__ w, float* __restrict__ y, i8* q0, \
             float* d0, i8* qk, float* dk, i64 n, float eps) { PDL_ENTRY();                                        \
        rmsnorm_row<QUANT, V4, CACHED>(x, w, y, q0, d0, qk, dk, n, eps);                              \
    }
#define RMSNORM_KERNELS(NAME, QUANT)                                \
    RMSNORM_KERNEL(NAME, QUANT, false, 1)                           \
    RMSNORM_KERNEL(NAME##_v4, QUANT, true, 1)                       \
    RMSNORM_KERNEL(NAME##_long, QUANT, false, RMS_LONG_CACHED)      \
    RMSNORM_KERNEL(NAME##_v4_long, QUANT, true, RMS_LONG_CACHED)
RMSNORM_KERNELS(rmsnorm_f32, QUANT_NONE)
RMSNORM_KERNELS(rmsnorm_q8_0_f32, QUANT_Q8_0)
RMSNORM_KERNELS(rmsnorm_q8_k_f32, QUANT_Q8_K)
RMSNORM_KERNELS(rmsnorm_q8_0_q8_k_f32, QUANT_BOTH)

// ---- standalone activation quantizers ----
// One segment per thread over all vectors at once (the vectors are contiguous whole blocks);
// q is i8[n_seg*8], d f32[one per block].
template <int QUANT, bool V4>
__device__ __forceinline__ void quantize_all(const float* __restrict__ x, i8* __restrict__ q,
                                             float* __restrict__ d, i64 nseg) {
    const i64 s = (i64)blockIdx.x * blockDim.x + threadIdx.x;
    if (s - (threadIdx.x & 31) >= nseg) return;  // the whole warp is past the end
    const bool valid = s < nseg;
    float v[SEG];
    if (valid) {
        load_seg<V4>(x, s * SEG, nseg * SEG, v);
    } else {
#pragma unroll
        for (int j = 0; j < SEG; j++) v[j] = 0.0f;
    }
    quantize_seg<QUANT, V4>(v, valid, s, q, d, q, d);
}

#define QUANTIZE_KERNEL(NAME, QUANT, V4)                                                      \
    extern "C" __global__ void NAME(const float* __restrict__ x, i8* q, float* d, i64 nseg) { PDL_ENTRY(); \
        quantize_all<QUANT, V4>(x, q, d, nseg);                                               \
    }
QUANTIZE_KERNEL(quantize_q8_0_f32, QUANT_Q8_0, false)
QUANTIZE_KERNEL(quantize_q8_0_f32_v4, QUANT_Q8_0, true)
QUANTIZE_KERNEL(quantize_q8_k_f32, QUANT_Q8_K, false)
QUANTIZE_KERNEL(quantize_q8_k_f32_v4, QUANT_Q8_K, true)

// ---- SwiGLU ----

// out[i] = silu(min(gate, limit)) * clamp(up, -limit, limit) * weight[i / per_slot] over n
// values (weight may be null: 1; limit = +inf disables the clamp), one segment per thread.
// With QUANT (Q8_0 or Q8_K), out is also quantized into q (i8[n]) and d (f32 per block),
// exactly as the standalone quantizer would from out; n must then be whole blocks. _v4 also
// needs per_slot % 8 == 0 (one weight per segment).
template <int QUANT, bool V4>
__device__ __forceinline__ void swiglu_segs(const float* __restrict__ gate, const float* __restrict__ up,
                                            float* __restrict__ out, const float* __restrict__ weight, i8* q,
                                            float* d, i64 n, i64 per_slot, float limit) {
    const i64 s = (i64)blockIdx.x * blockDim.x + threadIdx.x;
    const i64 nseg = (n + SEG - 1) / SEG;
    if (s - (threadIdx.x & 31) >= nseg) return;  // the whole warp is past the end
    const bool valid = s < nseg;
    float g[SEG], u[SEG], o[SEG];
    if (valid) {
        load_seg<V4>(gate, s * SEG, n, g);
        load_seg<V4>(up, s * SEG, n, u);
    } else {
#pragma unroll
        for (int j = 0; j < SEG; j++) g[j] = u[j] = 0.0f;
    }
#pragma unroll
    for (int j = 0; j < SEG; j++) {
        const float gc = fminf(g[j], limit);
        const float uc = fminf(fmaxf(u[j], -limit), limit);
        const float silu = gc / (1.0f + expf(-gc));
        o[j] = silu * uc;
    }
    if (weight && valid) {
        if (V4) {
            const float wt = weight[s * SEG / per_slot];
#pragma unroll
            for (int j = 0; j < SEG; j++) o[j] *= wt;
        } else {
#pragma unroll
            for (int j = 0; j < SEG; j++)
                if (s * SEG + j < n) o[j] *= weight[(s * SEG + j) / per_slot];
        }
    }
    if (valid) store_seg<V4>(out, s * SEG, n, o);
    quantize_seg<QUANT, V4>(o, valid, s, q, d, q, d);
}

#define SWIGLU_KERNEL(NAME, QUANT, V4)                                                                   \
    extern "C" __global__ void NAME(const float* __restrict__ gate, const float* __restrict__ up,        \
                                    float* __restrict__ out, const float* __restrict__ weight, i8* q,    \
                                    float* d, i64 n, i64 per_slot, float limit) { PDL_ENTRY();                        \
        swiglu_segs<QUANT, V4>(gate, up, out, weight, q, d, n, per_slot, limit);                         \
    }
SWIGLU_KERNEL(swiglu_clamp_f32, QUANT_NONE, false)
SWIGLU_KERNEL(swiglu_clamp_f32_v4, QUANT_NONE, true)
SWIGLU_KERNEL(swiglu_clamp_q8_0_f32, QUANT_Q8_0, false)
SWIGLU_KERNEL(swiglu_clamp_q8_0_f32_v4, QUANT_Q8_0, true)
SWIGLU_KERNEL(swiglu_clamp_q8_k_f32, QUANT_Q8_K, false)
SWIGLU_KERNEL(swiglu_clamp_q8_k_f32_v4, QUANT_Q8_K, true)
