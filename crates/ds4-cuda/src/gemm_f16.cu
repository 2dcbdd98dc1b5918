// Y = W X for F16 weights and f32 activations, many vectors at once (prefill's router,
// compressor and indexer projections), on the CUDA cores in f32. W: rows x k f16 (row-major,
// 16-byte aligned rows, k a multiple of 32); X: n vectors of k f32; Y: n vectors of rows f32
// (y[v*rows + r]).
//
// Summation order (depends on k only, so a token's bits do not depend on its batch, its tile
// or the launch shape): K is cut into S chunks — S the smallest power of two >= k / 512, at
// most 8 (gemm_f16.rs, gemm_f16_split; 2 for k = 1024, 8 for 4096) — on 32-column bounds: with
// t = k / 32, chunk c covers columns [32*(c*t/S), 32*((c+1)*t/S)). Each chunk's sum starts at
// 0 and takes one fused multiply-add per column in ascending column order; the output is
// ((c0 + c1) + c2) + ... in ascending chunk order (c0 alone when S = 1).
//
// Work split: a CTA of 128 threads computes a BM-row x BN-vector tile over one chunk; the S
// CTAs of a tile's chunks form one thread-block cluster (__cluster_dims__(S, 1, 1), grid x =
// S), park their partial tiles in shared memory, and after a cluster barrier each adds up
// 1/S of the tile by reading that slice from every CTA of the cluster (distributed shared
// memory) in ascending chunk order and writes it to y. No global scratch, no second launch,
// no float atomics. Split-K gives small-row matrices S times more CTAs (64 x 4096 x 256
// vectors: 64 CTAs instead of 8) and shortens each thread's serial FMA chain S-fold.
//
// Tiles: "wide" 128 rows x 64 vectors, 8 x 8 outputs per thread (4 shared 16-byte loads per
// 64 FMAs: FMA-bound); "narrow" 64 rows x 32 vectors, 4 x 4 per thread, for matrices whose
// wide grid would not fill the GPU (router, small indexer projection). K advances 16 columns
// per stage through two shared-memory stages; a stage's weights and activations are loaded
// into registers two stages ahead (before the barrier that ends a stage, so the loads stay in
// flight through the next stage's 1024 FMAs per thread wide, 256 narrow) and stored to shared
// memory (weights converted to f32 once, there) after the FMAs of the stage before it.
//
// Bound: 2*rows*k*n FLOPs at the FP32 rate (~67 TFLOPS peak on an H100 SXM, ~50 reachable),
// far above the bytes (weights once from HBM and re-read per vector tile from L2, activations
// per row tile from L2). At n = 256: 256 x 4096 (router) 0.54 GFLOP = ~11 us at 50 TFLOPS;
// 512 x 4096 ~21 us; 1024 x 4096 ~43 us; 8192 x 1024 (indexer) 4.3 GFLOP ~86 us; 64 x 4096
// 0.13 GFLOP ~3 us, where too few CTAs (64 narrow ones) make latency the limit instead.
// Registers (ptxas, sm_90a): wide 153 (3 CTAs per SM, no spills), narrow 64.

#define GF_BK 16        // K columns per pipeline stage
#define GF_KTILE 32     // granularity of the chunk boundaries (k is a multiple of it)
#define GF_THREADS 128  // threads per CTA, every tile shape

// Shared-memory layout of one tile shape, in floats: two pipeline stages, each the weights
// (GF_BK k-rows of BM floats) then the activations (GF_BK k-rows of BN floats), k-major; after
// the main loop the same memory holds the CTA's partial tile, vector-major (BN rows of BM).
// Every row is padded by 4 floats (fewer bank conflicts, 16-byte alignment kept).
template <int BM, int BN>
struct GfSmem {
    enum {
        WS = BM + 4,
        XS = BN + 4,
        STAGE = GF_BK * (WS + XS),
        PIPE = 2 * STAGE,
        PS = BM + 4,
        PART = BN * PS,
        FLOATS = PIPE > PART ? PIPE : PART,
    };
};

// The generic address of `p` (this CTA's shared memory) in cluster CTA `rank`'s shared memory.
__device__ __forceinline__ const float* gf_cluster_peer(const float* p, u32 rank) {
    u64 r;
    asm volatile("mapa.u64 %0, %1, %2;" : "=l"(r) : "l"(p), "r"(rank));
    return (const float*)r;
}

// Barrier of every thread of the cluster; shared-memory writes before it (release) are
// visible to every CTA of the cluster after it (acquire).
__device__ __forceinline__ void gf_cluster_sync() {
    asm volatile("barrier.cluster.arrive.release;\n\tbarrier.cluster.wait.acquire;" ::: "memory");
}

// One CTA: rows [blockIdx.y*BM, +BM) x vectors [blockIdx.z*BN, +BN) over chunk blockIdx.x of
// CL. TM x TN outputs per thread; 128 = (BM/TM) * (BN/TN) threads.
template <int BM, int BN, int TM, int TN, int CL>
__device__ __forceinline__ void gemm_f16_tile(const u8* __restrict__ w, i64 row_bytes,
                                              const float* __restrict__ x, float* __restrict__ y,
                                              i64 rows, i64 n, i64 k) {
    typedef GfSmem<BM, BN> S;
    constexpr int RG = BM / TM, VG = BN / TN;  // row groups and vector groups of threads
    constexpr int WP = BM * 2 / GF_THREADS;    // 8-half weight pieces per thread per stage
    constexpr int XP = BN * 4 / GF_THREADS;    // 4-float activation pieces per thread per stage
    static_assert(RG * VG == GF_THREADS, "one thread per TM x TN outputs");
    static_assert(TM % 4 == 0 && TN % 4 == 0, "fragments are float4s");
    static_assert(WP >= 1 && XP >= 1 && WP * GF_THREADS == BM * 2 && XP * GF_THREADS == BN * 4,
                  "whole pieces per thread");
    static_assert((BM * BN / 4) % CL == 0, "the finish splits the tile evenly");
    __shared__ __align__(16) float smem[S::FLOATS];

    const int tid = threadIdx.x;
    const int tv = tid % VG, tr = tid / VG;  // this thread's vector group and row group
    const int chunk = CL == 1 ? 0 : (int)blockIdx.x;
    const i64 r0 = (i64)blockIdx.y * BM, v0 = (i64)blockIdx.z * BN;
    const i64 tiles = k / GF_KTILE;
    const i64 kb = chunk * tiles / CL * GF_KTILE, ke = (chunk + 1) * tiles / CL * GF_KTILE;
    const int steps = (int)((ke - kb) / GF_BK);

    // This thread's loads: piece p of the weights is half (pc % 2) of row pc / 2's 16 columns,
    // piece p of the activations quarter (pc % 4) of vector pc / 4's (pc = tid + p * 128).
    // Rows and vectors past the end are clamped to the last one (their outputs are dropped).
    const u8* wsrc[WP];
    int wdst[WP];
#pragma unroll
    for (int p = 0; p < WP; p++) {
        const int pc = tid + p * GF_THREADS, row = pc / 2, half = pc % 2;
        const i64 gr = r0 + row < rows ? r0 + row : rows - 1;
        wsrc[p] = w + gr * row_bytes + (kb + half * 8) * 2;
        wdst[p] = half * 8 * S::WS + row;
    }
    const float* xsrc[XP];
    int xdst[XP];
#pragma unroll
    for (int p = 0; p < XP; p++) {
        const int pc = tid + p * GF_THREADS, vec = pc / 4, part = pc % 4;
        const i64 gv = v0 + vec < n ? v0 + vec : n - 1;
        xsrc[p] = x + gv * k + kb + part * 4;
        xdst[p] = GF_BK * S::WS + part * 4 * S::XS + vec;
    }
    uint4 wreg[WP];
    float4 xreg[XP];
    auto load = [&](int s) {
#pragma unroll
        for (int p = 0; p < WP; p++) wreg[p] = *(const uint4*)(wsrc[p] + (i64)s * GF_BK * 2);
#pragma unroll
        for (int p = 0; p < XP; p++) xreg[p] = *(const float4*)(xsrc[p] + (i64)s * GF_BK);
    };
    auto store = [&](int stage) {
        float* base = smem + stage * S::STAGE;
#pragma unroll
        for (int p = 0; p < WP; p++) {
            const u32 h[4] = {wreg[p].x, wreg[p].y, wreg[p].z, wreg[p].w};
#pragma unroll
            for (int j = 0; j < 4; j++) {
                base[wdst[p] + (2 * j) * S::WS] = f16_to_f32((u16)(h[j] & 0xffff));
                base[wdst[p] + (2 * j + 1) * S::WS] = f16_to_f32((u16)(h[j] >> 16));
            }
        }
#pragma unroll
        for (int p = 0; p < XP; p++) {
            base[xdst[p] + 0 * S::XS] = xreg[p].x;
            base[xdst[p] + 1 * S::XS] = xreg[p].y;
            base[xdst[p] + 2 * S::XS] = xreg[p].z;
            base[xdst[p] + 3 * S::XS] = xreg[p].w;
        }
    };

    // acc[i][j]: row (i/4)*RG*4 + tr*4 + i%4, vector (j/4)*VG*4 + tv*4 + j%4 of the tile.
    float acc[TM][TN];
#pragma unroll
    for (int i = 0; i < TM; i++)
#pragma unroll
        for (int j = 0; j < TN; j++) acc[i][j] = 0.f;

    // Stage s's loads are issued after stage s-2's FMAs, before the barrier that ends it
    // (which keeps ptxas from sinking them to their use), are in flight during stage s-1's
    // FMAs, go to shared memory after those, and stage s computes from there.
    if (steps > 0) {
        load(0);
        store(0);
    }
    if (steps > 1) load(1);
    __syncthreads();
    for (int s = 0; s < steps; s++) {
        const float* ws = smem + (s & 1) * S::STAGE;
        const float* xs = ws + GF_BK * S::WS;
#pragma unroll
        for (int kk = 0; kk < GF_BK; kk++) {
            float a[TM], b[TN];
#pragma unroll
            for (int p = 0; p < TM / 4; p++) {
                const float4 t = *(const float4*)&ws[kk * S::WS + p * RG * 4 + tr * 4];
                a[4 * p] = t.x, a[4 * p + 1] = t.y, a[4 * p + 2] = t.z, a[4 * p + 3] = t.w;
            }
#pragma unroll
            for (int q = 0; q < TN / 4; q++) {
                const float4 t = *(const float4*)&xs[kk * S::XS + q * VG * 4 + tv * 4];
                b[4 * q] = t.x, b[4 * q + 1] = t.y, b[4 * q + 2] = t.z, b[4 * q + 3] = t.w;
            }
#pragma unroll
            for (int i = 0; i < TM; i++)
#pragma unroll
                for (int j = 0; j < TN; j++) acc[i][j] = fmaf(a[i], b[j], acc[i][j]);
        }
        // Stage (s+1)&1 was last read in stage s-1, which every thread has left (the barrier
        // that ended it); stage s&1 is rewritten only after the barrier below.
        if (s + 1 < steps) store((s + 1) & 1);
        if (s + 2 < steps) load(s + 2);
        __syncthreads();
    }

    // The partial tile into shared memory (the pipeline stages are dead: every thread has
    // passed the last barrier), vector-major: part[v * PS + r].
#pragma unroll
    for (int j = 0; j < TN; j++) {
        const int v = (j / 4) * VG * 4 + tv * 4 + j % 4;
#pragma unroll
        for (int p = 0; p < TM / 4; p++) {
            const int r = p * RG * 4 + tr * 4;
            *(float4*)&smem[v * S::PS + r] =
                make_float4(acc[4 * p][j], acc[4 * p + 1][j], acc[4 * p + 2][j], acc[4 * p + 3][j]);
        }
    }
    if (CL > 1)
        gf_cluster_sync();
    else
        __syncthreads();

    // This CTA's 1/CL of the tile: groups of 4 rows of one vector, summed over the chunks in
    // ascending order and written to y (consecutive threads write consecutive rows).
    constexpr int GROUPS = BM * BN / 4 / CL;
    for (int g = tid; g < GROUPS; g += GF_THREADS) {
        const int f = chunk * GROUPS + g, v = f / (BM / 4), r = f % (BM / 4) * 4;
        const float* mine = &smem[v * S::PS + r];
        float4 sum = *(const float4*)(CL > 1 ? gf_cluster_peer(mine, 0) : mine);
#pragma unroll
        for (int c = 1; c < CL; c++) {
            const float4 t = *(const float4*)gf_cluster_peer(mine, c);
            sum.x += t.x, sum.y += t.y, sum.z += t.z, sum.w += t.w;
        }
        const i64 gv = v0 + v, gr = r0 + r;
        if (gv >= n) continue;
        float* out = y + gv * rows + gr;
        const float sv[4] = {sum.x, sum.y, sum.z, sum.w};
#pragma unroll
        for (int i = 0; i < 4; i++)
            if (gr + i < rows) out[i] = sv[i];
    }
    // No CTA may leave (freeing its shared memory) while the cluster still reads it.
    if (CL > 1) gf_cluster_sync();
}

// The kernels: tile shape x split. Wide: 128 rows x 64 vectors, 8 x 8 per thread; narrow:
// 64 rows x 32 vectors, 4 x 4 per thread. The suffix is the split S (cluster size).
#define GF_ARGS                                                                                 \
    const u8 *__restrict__ w, i64 row_bytes, const float *__restrict__ x, float *__restrict__ y, \
        i64 rows, i64 n, i64 k

extern "C" __global__ void __launch_bounds__(GF_THREADS)
    gemm_f16_wide_s1(GF_ARGS) {
    PDL_ENTRY();
    gemm_f16_tile<128, 64, 8, 8, 1>(w, row_bytes, x, y, rows, n, k);
}
extern "C" __global__ void __launch_bounds__(GF_THREADS) __cluster_dims__(2, 1, 1)
    gemm_f16_wide_s2(GF_ARGS) {
    PDL_ENTRY();
    gemm_f16_tile<128, 64, 8, 8, 2>(w, row_bytes, x, y, rows, n, k);
}
extern "C" __global__ void __launch_bounds__(GF_THREADS) __cluster_dims__(4, 1, 1)
    gemm_f16_wide_s4(GF_ARGS) {
    PDL_ENTRY();
    gemm_f16_tile<128, 64, 8, 8, 4>(w, row_bytes, x, y, rows, n, k);
}
extern "C" __global__ void __launch_bounds__(GF_THREADS) __cluster_dims__(8, 1, 1)
    gemm_f16_wide_s8(GF_ARGS) {
    PDL_ENTRY();
    gemm_f16_tile<128, 64, 8, 8, 8>(w, row_bytes, x, y, rows, n, k);
}
extern "C" __global__ void __launch_bounds__(GF_THREADS)
    gemm_f16_narrow_s1(GF_ARGS) {
    PDL_ENTRY();
    gemm_f16_tile<64, 32, 4, 4, 1>(w, row_bytes, x, y, rows, n, k);
}
extern "C" __global__ void __launch_bounds__(GF_THREADS) __cluster_dims__(2, 1, 1)
    gemm_f16_narrow_s2(GF_ARGS) {
    PDL_ENTRY();
    gemm_f16_tile<64, 32, 4, 4, 2>(w, row_bytes, x, y, rows, n, k);
}
extern "C" __global__ void __launch_bounds__(GF_THREADS) __cluster_dims__(4, 1, 1)
    gemm_f16_narrow_s4(GF_ARGS) {
    PDL_ENTRY();
    gemm_f16_tile<64, 32, 4, 4, 4>(w, row_bytes, x, y, rows, n, k);
}
extern "C" __global__ void __launch_bounds__(GF_THREADS) __cluster_dims__(8, 1, 1)
    gemm_f16_narrow_s8(GF_ARGS) {
    PDL_ENTRY();
    gemm_f16_tile<64, 32, 4, 4, 8>(w, row_bytes, x, y, rows, n, k);
}
