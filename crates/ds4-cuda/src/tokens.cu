// The two ends of a forward step that touch token ids: the embedding rows the chunk starts
// from, and the greedy pick a decode step can end with (the next token found on the GPU, fed
// to the next step without a round trip of the logits through the host).

// The chunk's embedding rows, each copied into all n residual streams of its token (every
// stream starts as the row: dsv4-arch.md §3.1), decoded from the table's storage type as the
// host's dequantization does: an f16 value and a Q8_0 product d * q are exact in f32, so the
// values are the same bits. The table stays where the weight upload put it, so a decode step
// reads 8 KB of it on the GPU instead of the host decoding and uploading a row per token.
// Bytes are assembled from byte loads: a file's alignment field may place the table anywhere.
// One CTA per token; an id outside the vocabulary (the host checks every id before a chunk
// runs) gives NaN rows rather than a read outside the table.
#define EMBED_F32 0
#define EMBED_F16 1
#define EMBED_Q8_0 2
__device__ __forceinline__ u32 embed_u16(const u8* p) { return (u32)p[0] | ((u32)p[1] << 8); }
// Grid: (d / (EMBED_THREADS x EMBED_PER_THREAD) slices, tokens): each thread's few values are
// loaded together, so a decode step's row costs one trip to HBM, not one per loop turn (one
// 256-thread CTA per token walked its row in 16 dependent turns: 17 us of a decode step).
#define EMBED_THREADS 256
#define EMBED_PER_THREAD 4
__device__ __forceinline__ float embed_value(const u8* row, i64 format, i64 i) {
    if (format == EMBED_F32) return __uint_as_float(embed_u16(row + 4 * i) | (embed_u16(row + 4 * i + 2) << 16));
    if (format == EMBED_F16) return f16_to_f32((u16)embed_u16(row + 2 * i));
    const u8* blk = row + (i / QK8_0) * Q8_0_BYTES;
    return (float)(i8)blk[2 + i % QK8_0] * f16_to_f32((u16)embed_u16(blk));
}
extern "C" __global__ void __launch_bounds__(EMBED_THREADS)
    embed_streams(u64 table_, i64 format, i64 row_bytes, i64 vocab, u64 tokens_, u64 streams_, i64 n, i64 d) {
    PDL_ENTRY();
    const i64 t = blockIdx.y;
    const int tok = ((const int*)tokens_)[t];
    const bool ok = tok >= 0 && tok < vocab;
    const u8* row = (const u8*)table_ + (ok ? (i64)tok : 0) * row_bytes;
    float* st = (float*)streams_ + t * n * d;
    const i64 i0 = (i64)blockIdx.x * (EMBED_THREADS * EMBED_PER_THREAD) + threadIdx.x;
    float v[EMBED_PER_THREAD];
#pragma unroll
    for (int k = 0; k < EMBED_PER_THREAD; k++) {
        const i64 i = i0 + k * EMBED_THREADS;
        v[k] = i < d ? embed_value(row, format, i) : 0.f;
    }
#pragma unroll
    for (int k = 0; k < EMBED_PER_THREAD; k++) {
        const i64 i = i0 + k * EMBED_THREADS;
        if (i >= d) break;
        const float x = ok ? v[k] : __int_as_float(0x7fc00000);
        for (i64 j = 0; j < n; j++) st[j * d + i] = x;
    }
}

// The greedy pick of one row of logits (ds4-model greedy::argmax_excluding): the first
// maximum among the ids not in the exclusion list; NaN never wins; none left: id 0. Keys
// compare by value, then by the lower id, a total order, so partial picks combine in any
// order. GREEDY_CTAS CTAs each pick from a contiguous range, and the last to finish (an atomic
// counter it resets for the next launch) picks among their picks and writes the id where the
// next step reads it (its token slot, and `pick` for the host) and advances the position.
#define GREEDY_THREADS 256
#define GREEDY_MAX_EXCLUDE 16
#define GREEDY_LOADS 4
struct GreedyKey {
    float v;
    int i;  // -1: no candidate
};
__device__ __forceinline__ bool greedy_better(GreedyKey a, GreedyKey b) {
    return a.i >= 0 && (b.i < 0 || a.v > b.v || (a.v == b.v && a.i < b.i));
}
__device__ __forceinline__ GreedyKey greedy_block(GreedyKey k, GreedyKey* red) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
        const GreedyKey other = {__shfl_xor_sync(FULL_MASK, k.v, o), __shfl_xor_sync(FULL_MASK, k.i, o)};
        if (greedy_better(other, k)) k = other;
    }
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    if (lane == 0) red[warp] = k;
    __syncthreads();
    if (threadIdx.x == 0) {
        for (int w = 1; w < GREEDY_THREADS / 32; w++)
            if (greedy_better(red[w], k)) k = red[w];
    }
    return k;  // thread 0's is the CTA's
}
// exclude: [count, id, id, ...] (count <= GREEDY_MAX_EXCLUDE); partial: 2 ints per CTA;
// counter: one u32, 0 between launches; token: the step's token slot (i32); pos: its position
// (i64); pick: the id again, for the host. At most GREEDY_THREADS CTAs (the last one reduces
// one partial pick per thread).
extern "C" __global__ void __launch_bounds__(GREEDY_THREADS)
    greedy_pick(u64 logits_, i64 n, u64 exclude_, u64 partial_, u64 counter_, u64 token_, u64 pos_, u64 pick_) {
    PDL_ENTRY();
    __shared__ int ex[GREEDY_MAX_EXCLUDE];
    __shared__ GreedyKey red[GREEDY_THREADS / 32];
    __shared__ bool last;
    const int* exclude = (const int*)exclude_;
    const int n_ex = min(exclude[0], GREEDY_MAX_EXCLUDE);
    if (threadIdx.x < n_ex) ex[threadIdx.x] = exclude[1 + threadIdx.x];
    __syncthreads();
    const float* logits = (const float*)logits_;
    const i64 per = (n + gridDim.x - 1) / gridDim.x;
    const i64 lo = (i64)blockIdx.x * per, hi = min(n, lo + per);
    GreedyKey k = {0.f, -1};
    // Each thread walks its ids upwards, GREEDY_LOADS values loaded together per turn; a
    // strictly larger value replaces its key, so it keeps its first maximum.
    for (i64 base = lo + threadIdx.x; base < hi; base += GREEDY_LOADS * GREEDY_THREADS) {
        float v[GREEDY_LOADS];
#pragma unroll
        for (int u = 0; u < GREEDY_LOADS; u++) {
            const i64 i = base + u * GREEDY_THREADS;
            v[u] = i < hi ? logits[i] : __int_as_float(0x7fc00000);
        }
#pragma unroll
        for (int u = 0; u < GREEDY_LOADS; u++) {
            const int i = (int)(base + u * GREEDY_THREADS);
            bool skip = isnan(v[u]);
            for (int e = 0; e < n_ex; e++) skip |= ex[e] == i;
            if (!skip && (k.i < 0 || v[u] > k.v)) k = {v[u], i};
        }
    }
    k = greedy_block(k, red);
    int* partial = (int*)partial_;
    if (threadIdx.x == 0) {
        partial[2 * blockIdx.x] = __float_as_int(k.v);
        partial[2 * blockIdx.x + 1] = k.i;
        __threadfence();
        const unsigned done = atomicAdd((unsigned*)counter_, 1u);
        last = done == gridDim.x - 1;
    }
    __syncthreads();
    if (!last) return;
    // The last CTA: one partial pick per thread, reduced as above.
    __threadfence();
    GreedyKey p = {0.f, -1};
    if (threadIdx.x < gridDim.x)
        p = {__int_as_float(__ldcg(partial + 2 * threadIdx.x)), __ldcg(partial + 2 * threadIdx.x + 1)};
    __syncthreads();  // red is reused
    p = greedy_block(p, red);
    if (threadIdx.x == 0) {
        const int id = p.i < 0 ? 0 : p.i;
        *(unsigned*)counter_ = 0;
        *(int*)token_ = id;
        *(int*)pick_ = id;
        *(i64*)pos_ += 1;
    }
}
