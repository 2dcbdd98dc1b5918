// Mixture-of-experts routing and combination (cpu/moe.rs, cpu/forward.rs ffn; dsv4-arch.md
// §3.10). The expert matvecs themselves are gemv.rs's expert_gemv with device-side ids.

#define ROUTE_MAX_K 16

// One warp per token. logits (n_tok x E) are turned into scores sqrt(softplus) in place;
// ids/wts (n_tok x k) receive the experts (top-k of score + bias, lowest index on ties, or the
// token's tid2eid row) and their weights: score / (sum, floored at 2^-14 in ds4 numerics,
// + 1e-20 in reference numerics) * routed_scale.
extern "C" __global__ void route(u64 logits_, u64 bias_, u64 tid2eid_, u64 tokens_, u64 ids_, u64 wts_, i64 n_tok, i64 E,
                                 i64 k, double routed_scale, i64 ds4) {
    const i64 t = ((i64)blockIdx.x * blockDim.x + threadIdx.x) >> 5;
    if (t >= n_tok) return;  // uniform per warp
    const int lane = threadIdx.x & 31;
    float* s = (float*)logits_ + t * E;
    for (i64 e = lane; e < E; e += 32) {
        const float x = s[e];
        const float sp = x > 20.0f ? x : (x < -20.0f ? expf(x) : log1pf(expf(x)));
        s[e] = sqrtf(sp);
    }
    __syncwarp();
    int ids[ROUTE_MAX_K];
    if (tid2eid_) {
        const int tok = ((const int*)tokens_)[t];
        for (i64 j = 0; j < k; j++) ids[j] = ((const int*)tid2eid_)[(i64)tok * k + j];
    } else {
        const float* bias = (const float*)bias_;
        for (i64 j = 0; j < k; j++) {
            bool has = false;
            float bv = 0.f;
            int bi = 0;
            for (i64 e = lane; e < E; e += 32) {
                bool taken = false;
                for (i64 p = 0; p < j; p++) taken |= ids[p] == e;
                if (taken) continue;
                const float v = topk_key(bias ? s[e] + bias[e] : s[e]);
                if (!has || v > bv) {
                    has = true;
                    bv = v;
                    bi = (int)e;
                }
            }
#pragma unroll
            for (int o = 16; o > 0; o >>= 1) {
                const float ov = __shfl_xor_sync(FULL_MASK, bv, o);
                const int oi = __shfl_xor_sync(FULL_MASK, bi, o);
                const bool oh = __shfl_xor_sync(FULL_MASK, (int)has, o) != 0;
                if (oh && (!has || ov > bv || (ov == bv && oi < bi))) {
                    has = true;
                    bv = ov;
                    bi = oi;
                }
            }
            ids[j] = bi;
        }
    }
    if (lane != 0) return;
    float sum = 0.f;
    for (i64 j = 0; j < k; j++) sum += s[ids[j]];
    const float denom = ds4 ? fmaxf(sum, 6.1035e-5f) : sum + 1e-20f;
    int* out_ids = (int*)ids_ + t * k;
    float* wts = (float*)wts_ + t * k;
    for (i64 j = 0; j < k; j++) {
        out_ids[j] = ids[j];
        wts[j] = s[ids[j]] / denom * (float)routed_scale;
    }
}

// xe[t*k + j] = x[t]: every routed slot gets its token's input vector.
extern "C" __global__ void replicate(u64 x_, u64 xe_, i64 n_tok, i64 k, i64 d) {
    const i64 total = n_tok * k * d;
    for (i64 idx = (i64)blockIdx.x * blockDim.x + threadIdx.x; idx < total; idx += (i64)gridDim.x * blockDim.x) {
        const i64 t = idx / (k * d), i = idx % d;
        ((float*)xe_)[idx] = ((const float*)x_)[t * d + i];
    }
}

// y[t] = shared[t] + sum over the token's slots in ascending expert order of a * down[slot]
// (a = the slot's weight when `weighted`, else 1: ds4 numerics weighed before the down
// projection).
extern "C" __global__ void moe_combine(u64 down_, u64 ids_, u64 wts_, u64 shared_, u64 y_, i64 n_tok, i64 k, i64 d,
                                       i64 weighted) {
    for (i64 idx = (i64)blockIdx.x * blockDim.x + threadIdx.x; idx < n_tok * d; idx += (i64)gridDim.x * blockDim.x) {
        const i64 t = idx / d, i = idx % d;
        const int* ids = (const int*)ids_ + t * k;
        const float* wts = (const float*)wts_ + t * k;
        float acc = 0.f;
        int last_id = -1;
        i64 last_slot = -1;
        for (i64 n = 0; n < k; n++) {
            // next slot in (expert id, slot) order
            i64 best = -1;
            for (i64 j = 0; j < k; j++) {
                const bool after = ids[j] > last_id || (ids[j] == last_id && j > last_slot);
                if (!after) continue;
                if (best < 0 || ids[j] < ids[best]) best = j;
            }
            const float a = weighted ? wts[best] : 1.0f;
            acc += a * ((const float*)down_)[(t * k + best) * d + i];
            last_id = ids[best];
            last_slot = best;
        }
        ((float*)y_)[idx] = ((const float*)shared_)[idx] + acc;
    }
}
