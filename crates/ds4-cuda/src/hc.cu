// Hyper-connections (mHC): the Sinkhorn-projected mixing of the n residual streams around
// every sublayer, and the final head mixing (cpu/hc.rs, dsv4-arch.md §3.3, §3.11).

#define HC_MAX_N 16

// One CTA per token. mix: n_tok x (2+n)n (fn . RMS0(streams)); maps out: n_tok x (2n + n^2)
// = [pre | post | comb]; x out: n_tok x d, the sublayer input sum_j pre_j X_j.
extern "C" __global__ void hc_pre(u64 mix_, u64 base_, u64 scale_, u64 streams_, u64 maps_, u64 x_, i64 n, i64 d,
                                  i64 iters, double eps_d) {
    const float eps = (float)eps_d;
    const i64 t = blockIdx.x;
    const i64 K = (2 + n) * n, M = 2 * n + n * n;
    __shared__ float m[2 * HC_MAX_N + HC_MAX_N * HC_MAX_N];
    const float* mix = (const float*)mix_ + t * K;
    const float* base = (const float*)base_;
    const float* scale = (const float*)scale_;
    if (threadIdx.x == 0) {
        float* pre = m;
        float* post = m + n;
        float* comb = m + 2 * n;
        for (int i = 0; i < n; i++) pre[i] = sigmoidf_ref(mix[i] * scale[0] + base[i]) + eps;
        for (int i = 0; i < n; i++) post[i] = 2.0f * sigmoidf_ref(mix[n + i] * scale[1] + base[n + i]);
        for (int i = 0; i < n * n; i++) comb[i] = mix[2 * n + i] * scale[2] + base[2 * n + i];
        for (int j = 0; j < n; j++) {
            float* row = comb + j * n;
            float mx = -FWD_INF;
            for (int k = 0; k < n; k++) mx = fmaxf(mx, row[k]);
            float s = 0.f;
            for (int k = 0; k < n; k++) {
                row[k] = expf(row[k] - mx);
                s += row[k];
            }
            for (int k = 0; k < n; k++) row[k] = row[k] / s + eps;
        }
        const i64 passes = iters > 0 ? iters : 1;  // the CPU always does the first column pass
        for (int it = 0; it < passes; it++) {
            if (it > 0) {
                for (int j = 0; j < n; j++) {
                    float s = 0.f;
                    for (int k = 0; k < n; k++) s += comb[j * n + k];
                    s += eps;
                    for (int k = 0; k < n; k++) comb[j * n + k] /= s;
                }
            }
            for (int k = 0; k < n; k++) {
                float s = 0.f;
                for (int j = 0; j < n; j++) s += comb[j * n + k];
                s += eps;
                for (int j = 0; j < n; j++) comb[j * n + k] /= s;
            }
        }
        float* maps = (float*)maps_ + t * M;
        for (int i = 0; i < M; i++) maps[i] = m[i];
    }
    __syncthreads();
    const float* st = (const float*)streams_ + t * n * d;
    float* x = (float*)x_ + t * d;
    for (i64 i = threadIdx.x; i < d; i += blockDim.x) {
        float acc = 0.f;
        for (int j = 0; j < n; j++) acc += m[j] * st[j * d + i];
        x[i] = acc;
    }
}

// X'_k = post_k y + sum_j comb[j,k] X_j, in place on the streams (n_tok x n x d).
extern "C" __global__ void hc_post(u64 maps_, u64 y_, u64 streams_, i64 n_tok, i64 n, i64 d) {
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
