// Per-vector operations of the forward pass: RMS norm, the clamped SwiGLU of the experts, and
// the activation quantizers that feed the dp4a matrix-vector kernels.

// Sum of a double over the CTA (blockDim.x a multiple of 32, at most 1024).
__device__ double block_sum_f64(double v) {
    __shared__ double part[32];
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(FULL_MASK, v, o);
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    __syncthreads();  // part[] may still be read by a previous call
    if (lane == 0) part[warp] = v;
    __syncthreads();
    double s = 0.0;
    const int nw = blockDim.x >> 5;
    for (int i = 0; i < nw; i++) s += part[i];
    return s;
}

// y[r] = x[r] / sqrt(mean(x[r]^2) + eps) * w (w may be null). One CTA per row; the sum of
// squares is kept in double, as the CPU reference does.
extern "C" __global__ void rmsnorm_f32(const float* x, const float* w, float* y, i64 n, float eps) {
    const float* xr = x + (i64)blockIdx.x * n;
    float* yr = y + (i64)blockIdx.x * n;
    double s = 0.0;
    for (i64 i = threadIdx.x; i < n; i += blockDim.x) s += (double)xr[i] * (double)xr[i];
    s = block_sum_f64(s);
    const float scale = (float)(1.0 / sqrt(s / (double)n + (double)eps));
    for (i64 i = threadIdx.x; i < n; i += blockDim.x) {
        const float v = xr[i] * scale;
        yr[i] = w ? v * w[i] : v;
    }
}

// out[i] = silu(min(gate, limit)) * clamp(up, -limit, limit) * weight[i / per_slot]
// (weight may be null: 1). limit = +inf disables the clamp.
extern "C" __global__ void swiglu_clamp_f32(const float* gate, const float* up, float* out, const float* weight,
                                            i64 n, i64 per_slot, float limit) {
    for (i64 i = (i64)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (i64)gridDim.x * blockDim.x) {
        const float g = fminf(gate[i], limit);
        const float u = fminf(fmaxf(up[i], -limit), limit);
        const float silu = g / (1.0f + expf(-g));
        const float v = silu * u;
        out[i] = weight ? v * weight[i / per_slot] : v;
    }
}

// Q8_0 activations as ds4 quantizes them before a Q8_0 matmul: per 32 values d = amax/127
// (kept f32), q = round-half-to-even(x/d) clamped to +-127. One warp per block; q is
// i8[n_blocks*32], d is f32[n_blocks].
extern "C" __global__ void quantize_q8_0_f32(const float* x, i8* q, float* d, i64 n_blocks) {
    const i64 b = ((i64)blockIdx.x * blockDim.x + threadIdx.x) >> 5;
    if (b >= n_blocks) return;  // uniform per warp
    const int lane = threadIdx.x & 31;
    const float v = x[b * 32 + lane];
    const float amax = warp_max(fabsf(v));
    const float dd = amax / 127.0f;
    const float id = dd != 0.0f ? 1.0f / dd : 0.0f;
    q[b * 32 + lane] = (i8)max(-127, min(127, __float2int_rn(v * id)));
    if (lane == 0) d[b] = dd;
}

// Q8_K activations (ggml quantize_row_q8_K): per 256 values, max = the value of largest
// magnitude (first one on ties), iscale = -127/max, q = min(127, rint(iscale*x)), d = 1/iscale.
// One warp per block, 8 consecutive values per lane; q is i8[n_blocks*256], d is f32[n_blocks].
extern "C" __global__ void quantize_q8_k_f32(const float* x, i8* q, float* d, i64 n_blocks) {
    const i64 b = ((i64)blockIdx.x * blockDim.x + threadIdx.x) >> 5;
    if (b >= n_blocks) return;
    const int lane = threadIdx.x & 31;
    const float* xb = x + b * 256 + lane * 8;
    float v[8];
    float amax = 0.f, mx = 0.f;
    int idx = 1 << 30;
#pragma unroll
    for (int j = 0; j < 8; j++) {
        v[j] = xb[j];
        const float ax = fabsf(v[j]);
        if (ax > amax) { amax = ax; mx = v[j]; idx = lane * 8 + j; }
    }
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
        const float a2 = __shfl_xor_sync(FULL_MASK, amax, o);
        const float m2 = __shfl_xor_sync(FULL_MASK, mx, o);
        const int i2 = __shfl_xor_sync(FULL_MASK, idx, o);
        if (a2 > amax || (a2 == amax && i2 < idx)) { amax = a2; mx = m2; idx = i2; }
    }
    i8* qb = q + b * 256 + lane * 8;
    if (amax == 0.f) {
#pragma unroll
        for (int j = 0; j < 8; j++) qb[j] = 0;
        if (lane == 0) d[b] = 0.f;
        return;
    }
    const float iscale = -127.f / mx;
#pragma unroll
    for (int j = 0; j < 8; j++) qb[j] = (i8)min(127, __float2int_rn(iscale * v[j]));
    if (lane == 0) d[b] = 1.f / iscale;
}
