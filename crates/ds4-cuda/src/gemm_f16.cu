// Y = W X for F16 weights and f32 activations, many vectors at once (prefill's router,
// compressor and indexer projections). Two kernel families: on the CUDA cores in f32 (this
// first part; used for k not a multiple of 64) and on the tensor cores with a hi/lo f16 split
// of the activations (gemm_f16_tc_*, below; every model shape). W: rows x k f16 (row-major,
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

// The split-K finish both kernel families share. Every CTA of the cluster has parked its
// partial tile in `part` (vector-major, rows PS floats apart); this CTA (chunk `chunk` of CL)
// adds up its 1/CL of the tile, groups of 4 rows of one vector summed over the chunks in
// ascending order, and writes it to y (consecutive threads write consecutive rows). NT: the
// CTA's threads.
template <int BM, int BN, int CL, int PS, int NT>
__device__ __forceinline__ void gf_finish(const float* part, int chunk, int tid, i64 v0, i64 r0, i64 n, i64 rows,
                                          float* __restrict__ y) {
    if (CL > 1)
        gf_cluster_sync();
    else
        __syncthreads();
    constexpr int GROUPS = BM * BN / 4 / CL;
    for (int g = tid; g < GROUPS; g += NT) {
        const int f = chunk * GROUPS + g, v = f / (BM / 4), r = f % (BM / 4) * 4;
        const float* mine = &part[v * PS + r];
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
    gf_finish<BM, BN, CL, S::PS, GF_THREADS>(smem, chunk, tid, v0, r0, n, rows, y);
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

// ---------------------------------------------------------------------------------------------
// The same product on the tensor cores, with f32-class accuracy (gemm_f16_tc_*).
//
// The weights are f16 already, exact as mma operands. Each activation block of GT_BK = 64
// columns of one vector is scaled by a power of two s (from the block's largest |x|, so that
// it lands in [2^14, 2^15): the f16 range holds it, whatever the activations' magnitude) and
// split into hi = f16(x s) and lo = f16(x s - hi): 22 significant bits, the rest lost only
// below 2^-25 of the block's maximum (lo's subnormals). Per block, mma.sync m16n8k16 (f16 in,
// f32 accumulate) sums W hi and W lo into a fresh accumulator t (k steps of 16 in ascending
// order, hi then lo in each); then acc = fma(t, 1/s, acc) in IEEE f32 (1/s a power of two, so
// this is a rounded add of the exactly unscaled block sum). So the tensor cores' accumulation
// spans only 128 products per output, and the long sums are f32 adds.
//
// Summation order (depends on the matrix only, never on the batch, the tile or the launch):
// the k / 64 blocks are cut into S chunks on block bounds (gemm_f16.rs, gemm_f16_tc_split,
// from rows and cols), chunk c covering blocks [c*B/S, (c+1)*B/S) of B; each chunk's acc
// starts at 0 and takes its blocks in ascending order; the output is the chunks' sum in
// ascending order, computed as in the CUDA-core kernel (a cluster of the S CTAs, distributed
// shared memory). An output's MMAs see its own row and vector only, so the tile that computes
// it does not change its bits.
//
// Tiles: "wide" 128 rows x 128 vectors, 8 warps of 64 x 32 (4 x 4 MMA tiles), one CTA per SM
// (191 KiB of shared memory); "narrow" 64 x 64, 4 warps of 32 x 32, two per SM, for grids
// that wide tiles would not fill. Per stage (64 columns) a CTA copies with cp.async the
// weights (BM rows of 128 bytes) and the raw f32 activations (BN rows of 256 bytes) two stages
// ahead, and converts the next stage's activations into hi / lo (each thread 8 values of one
// vector; the 8 threads of a vector share its block maximum by shuffles) while its MMAs run
// on this stage's. Shared rows of f16 are 144 bytes (64 halves + 16 bytes of padding), which
// makes the ldmatrix reads of 8 rows conflict-free.
//
// Bound: 4*rows*k*n FLOPs (hi and lo) at the f16 mma.sync rate (~500-600 TFLOPS on an H100 /
// H200), plus the conversion, which each row tile repeats (BM = 128: one convert per 32 MMA
// FLOPs). Measured (H200, 1 024 vectors, gemm_f16_gpu's throughput test): a wide stage takes
// ~2.5 us per SM, ~200 TFLOPS of MMAs (~100 of f32-equivalent product) — 1024 x 4096 81 us,
// 8192 x 1024 163 us against 252 and 445 on the CUDA cores; 64 x 4096 18 us against 62.
// What is left: two warps per scheduler and one barrier per 64 columns leave the MMA pipe
// idle part of the time; a pre-converted hi/lo copy of X (once per call, not per row tile)
// and a deeper pipeline would be the next steps. Registers (ptxas, sm_90a): wide 225-250,
// narrow 164-190, no spills.

#define GT_BK 64      // K columns per stage and per scale block
#define GT_WROW 144   // bytes per shared row of 64 halves (+16 bytes of padding)
#define GT_XROW 256   // bytes per shared row of 64 raw f32 activations

// Shared-memory layout (bytes) of a BM x BN tile: three stages of weights, two of raw
// activations, two of converted ones (hi rows, lo rows, then the BN inverse scales); after
// the main loop the partial tile, vector-major (BN rows of BM + 4 floats).
template <int BM, int BN>
struct GtSmem {
    enum {
        W_SLOT = BM * GT_WROW,
        X_SLOT = BN * GT_XROW,
        H_SLOT = 2 * BN * GT_WROW + BN * 4,
        X_OFF = 3 * W_SLOT,
        H_OFF = X_OFF + 2 * X_SLOT,
        PIPE = H_OFF + 2 * H_SLOT,
        PS = BM + 4,
        PART = BN * PS * 4,
        BYTES = PIPE > PART ? PIPE : PART,
    };
};

// 16 bytes from global (L2 only) to shared (an address in the shared window), without passing
// through registers; both 16-byte aligned.
__device__ __forceinline__ void gt_cp16_s(u32 dst, const void* src) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16;" ::"r"(dst), "l"(src) : "memory");
}
__device__ __forceinline__ void gt_commit() { asm volatile("cp.async.commit_group;" ::: "memory"); }
template <int N>
__device__ __forceinline__ void gt_wait() {
    asm volatile("cp.async.wait_group %0;" ::"n"(N) : "memory");
}

// Four 8x8 b16 matrices: lanes 8m..8m+7 give the (shared-window) row addresses of matrix m; register m
// receives, in lane l, the two elements 2(l%4), 2(l%4)+1 of row l/4 of matrix m.
__device__ __forceinline__ void gt_ldmatrix_x4(u32 row_addr, u32 (&r)[4]) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(row_addr));
}

// D = A B + C, A 16x16 f16 (row-major), B 16x8 f16 (column-major), f32 C / D. Lane l,
// g = l/4, t = l%4: a[0] A[g][2t..2t+1], a[1] A[g+8][2t..], a[2] A[g][8+2t..], a[3]
// A[g+8][8+2t..]; b[0] B[2t..2t+1][g], b[1] B[8+2t..][g]; d[0] D[g][2t], d[1] D[g][2t+1],
// d[2] D[g+8][2t], d[3] D[g+8][2t+1]. gt_mma0 takes C = 0.
__device__ __forceinline__ void gt_mma(float (&d)[4], const u32 (&a)[4], u32 b0, u32 b1) {
    asm("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}
__device__ __forceinline__ void gt_mma0(float (&d)[4], const u32 (&a)[4], u32 b0, u32 b1) {
    asm("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%10,%10,%10,%10};"
        : "=f"(d[0]), "=f"(d[1]), "=f"(d[2]), "=f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1), "f"(0.f));
}

// Two floats to f16 (round to nearest even), `first` in the low half (the lower k index).
__device__ __forceinline__ u32 gt_pack_f16x2(float first, float second) {
    u32 d;
    asm("cvt.rn.f16x2.f32 %0, %1, %2;" : "=r"(d) : "f"(second), "f"(first));
    return d;
}

// Splits 4 scaled values into hi and lo f16 pairs: hi = f16(v), lo = f16(v - hi) (the
// difference is exact in f32).
__device__ __forceinline__ void gt_split4(float a, float b, float c, float d, uint2& hi, uint2& lo) {
    hi.x = gt_pack_f16x2(a, b);
    hi.y = gt_pack_f16x2(c, d);
    lo.x = gt_pack_f16x2(a - f16_to_f32((u16)(hi.x & 0xffff)), b - f16_to_f32((u16)(hi.x >> 16)));
    lo.y = gt_pack_f16x2(c - f16_to_f32((u16)(hi.y & 0xffff)), d - f16_to_f32((u16)(hi.y >> 16)));
}

// One CTA: rows [blockIdx.y*BM, +BM) x vectors [blockIdx.z*BN, +BN) over chunk blockIdx.x of
// CL. WM x WN warps, each MI x NJ MMA tiles of 16 x 8.
template <int WM, int WN, int MI, int NJ, int CL>
__device__ __forceinline__ void gemm_f16_tc_tile(const u8* __restrict__ w, i64 row_bytes,
                                                 const float* __restrict__ x, float* __restrict__ y,
                                                 i64 rows, i64 n, i64 k) {
    constexpr int BM = WM * MI * 16, BN = WN * NJ * 8, THREADS = WM * WN * 32;
    typedef GtSmem<BM, BN> S;
    constexpr int WCP = BM * (GT_BK * 2 / 16) / THREADS;  // 16-byte weight copies per thread
    constexpr int XCP = BN * (GT_BK * 4 / 16) / THREADS;  // 16-byte activation copies per thread
    constexpr int KS = GT_BK / 16;                         // MMA k steps per stage
    static_assert(WCP * THREADS == BM * 8 && XCP * THREADS == BN * 16, "whole copies per thread");
    static_assert(BN * 8 == KS * THREADS, "one conversion task (8 values) per thread per k step");
    static_assert(NJ % 2 == 0, "B fragments load two 8-vector tiles at a time");
    static_assert((BM * BN / 4) % CL == 0, "the finish splits the tile evenly");
    extern __shared__ __align__(16) u8 gt_smem[];

    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const int wm = warp % WM, wn = warp / WM;  // warp tile: rows wm*MI*16.., vectors wn*NJ*8..
    const int g = lane >> 2, t = lane & 3;
    const int chunk = CL == 1 ? 0 : (int)blockIdx.x;
    const i64 r0 = (i64)blockIdx.y * BM, v0 = (i64)blockIdx.z * BN;
    const i64 blocks = k / GT_BK;
    const i64 kb = chunk * blocks / CL * GT_BK, ke = (chunk + 1) * blocks / CL * GT_BK;
    const int steps = (int)((ke - kb) / GT_BK);

    // Stage s into weight slot s % 3 and raw activation slot s % 2, one commit group per
    // stage (empty past the end, so the group count stays regular). Rows and vectors past
    // the end read the last valid one; their outputs are not stored. Addresses: one 64-bit
    // base per stage (the tile's first row / vector at the stage's column), 32-bit offsets
    // from it (below BM rows / BN vectors: gemm_f16.rs bounds them) and 32-bit shared
    // addresses; the thread index read per call (thread_index_per_call), so that ptxas
    // recomputes these few instructions instead of keeping every copy's 64-bit addresses in
    // the registers the kernel lacks (each copy took ~30 instructions of 64-bit products,
    // clamps and generic-to-shared conversions).
    const u32 smem0 = smem_addr(gt_smem);
    const u32 last_row = (u32)(rows - 1 - r0), last_vec = (u32)(n - 1 - v0);
    const u32 wrow = (u32)row_bytes, xrow = (u32)k;
    auto issue = [&](int s) {
        if (s < steps) {
            const u32 tid_ = (u32)thread_index_per_call();
            const i64 kc = kb + (i64)s * GT_BK;
            const u8* wk = w + r0 * row_bytes + kc * 2;
            const float* xk = x + v0 * k + kc;
            const u32 ws = smem0 + (s % 3) * S::W_SLOT;
            const u32 xs = smem0 + S::X_OFF + (s & 1) * S::X_SLOT;
#pragma unroll
            for (int p = 0; p < WCP; p++) {
                const u32 i = tid_ + p * THREADS, r = i >> 3, c = i & 7;
                gt_cp16_s(ws + r * GT_WROW + c * 16, wk + min(r, last_row) * wrow + c * 16);
            }
#pragma unroll
            for (int p = 0; p < XCP; p++) {
                const u32 i = tid_ + p * THREADS, v = i >> 4, c = i & 15;
                gt_cp16_s(xs + v * GT_XROW + c * 16, xk + min(v, last_vec) * xrow + c * 4);
            }
        }
        gt_commit();
    };

    // Conversion task `part` of stage s: vector v's values 4j..4j+3 and 32+4j..32+4j+3 (8
    // consecutive lanes hold one vector), scaled by the block's power of two, split into hi
    // and lo; lane j = 0 stores the inverse scale.
    auto convert = [&](int s, int part) {
        const u8* xs = gt_smem + S::X_OFF + (s & 1) * S::X_SLOT;
        u8* hs = gt_smem + S::H_OFF + (s & 1) * S::H_SLOT;
        const int q = tid + part * THREADS, v = q >> 3, j = q & 7;
        const float4 a = *(const float4*)(xs + v * GT_XROW + j * 16);
        const float4 b = *(const float4*)(xs + v * GT_XROW + 128 + j * 16);
        float m = fmaxf(fmaxf(fmaxf(fabsf(a.x), fabsf(a.y)), fmaxf(fabsf(a.z), fabsf(a.w))),
                        fmaxf(fmaxf(fabsf(b.x), fabsf(b.y)), fmaxf(fabsf(b.z), fabsf(b.w))));
        m = fmaxf(m, __shfl_xor_sync(FULL_MASK, m, 1));
        m = fmaxf(m, __shfl_xor_sync(FULL_MASK, m, 2));
        m = fmaxf(m, __shfl_xor_sync(FULL_MASK, m, 4));
        // m's biased exponent e, kept in [16, 254]: s = 2^(141 - e) maps m into [2^14, 2^15)
        // (an all-zero or subnormal block gets s = 2^125, an infinite one 2^-113); s and 1/s
        // = 2^(e - 141) are normal floats.
        u32 e = __float_as_uint(m) >> 23;
        e = e < 16u ? 16u : (e > 254u ? 254u : e);
        const float sc = __uint_as_float((268u - e) << 23);
        uint2 h0, l0, h1, l1;
        gt_split4(a.x * sc, a.y * sc, a.z * sc, a.w * sc, h0, l0);
        gt_split4(b.x * sc, b.y * sc, b.z * sc, b.w * sc, h1, l1);
        u8* hrow = hs + v * GT_WROW;
        u8* lrow = hs + BN * GT_WROW + v * GT_WROW;
        *(uint2*)(hrow + j * 8) = h0;
        *(uint2*)(hrow + 64 + j * 8) = h1;
        *(uint2*)(lrow + j * 8) = l0;
        *(uint2*)(lrow + 64 + j * 8) = l1;
        if (j == 0) ((float*)(hs + 2 * BN * GT_WROW))[v] = __uint_as_float((e - 14u) << 23);
    };

    // acc[mi][nj][i]: row wm*MI*16 + 16 mi + g + 8 (i >> 1), vector wn*NJ*8 + 8 nj + 2t + (i & 1).
    float acc[MI][NJ][4];
#pragma unroll
    for (int mi = 0; mi < MI; mi++)
#pragma unroll
        for (int nj = 0; nj < NJ; nj++)
#pragma unroll
            for (int i = 0; i < 4; i++) acc[mi][nj][i] = 0.f;

    // Stage s's copies are issued at the top of iteration s - 2, land by the top of
    // iteration s - 1 (wait_group 0 there), are converted during iteration s - 1, and feed
    // the MMAs of iteration s.
    issue(0);
    issue(1);
    gt_wait<1>();
    __syncthreads();
    if (steps > 0) {
#pragma unroll
        for (int part = 0; part < KS; part++) convert(0, part);
    }
    for (int s = 0; s < steps; s++) {
        // Stage s + 1 landed (this thread's copies; the barrier makes everyone's visible).
        // After the barrier every thread has finished iteration s - 1: its MMAs (weight slot
        // (s + 2) % 3, converted slot (s + 1) % 2) and its conversion of stage s (raw slot
        // s % 2, which stage s + 2 now overwrites).
        gt_wait<0>();
        __syncthreads();
        issue(s + 2);
        // (Shared addresses for ldmatrix as 32-bit values in the shared window.)
        const u32 ws = smem0 + (s % 3) * S::W_SLOT;
        const u8* hs = gt_smem + S::H_OFF + (s & 1) * S::H_SLOT;
        const u32 hs32 = smem0 + S::H_OFF + (s & 1) * S::H_SLOT, ls32 = hs32 + BN * GT_WROW;
        float tmp[MI][NJ][4];
#pragma unroll
        for (int kk = 0; kk < KS; kk++) {
            u32 af[MI][4];
#pragma unroll
            for (int mi = 0; mi < MI; mi++) {
                const int row = wm * MI * 16 + mi * 16 + (lane & 7) + ((lane >> 3) & 1) * 8;
                gt_ldmatrix_x4(ws + row * GT_WROW + (kk * 16 + (lane >> 4) * 8) * 2, af[mi]);
            }
            u32 bh[NJ][2], bl[NJ][2];
#pragma unroll
            for (int p = 0; p < NJ / 2; p++) {
                const int vec = wn * NJ * 8 + p * 16 + (lane & 7) + (lane >> 4) * 8;
                const int off = vec * GT_WROW + (kk * 16 + ((lane >> 3) & 1) * 8) * 2;
                u32 r[4];
                gt_ldmatrix_x4(hs32 + off, r);
                bh[2 * p][0] = r[0], bh[2 * p][1] = r[1], bh[2 * p + 1][0] = r[2], bh[2 * p + 1][1] = r[3];
                gt_ldmatrix_x4(ls32 + off, r);
                bl[2 * p][0] = r[0], bl[2 * p][1] = r[1], bl[2 * p + 1][0] = r[2], bl[2 * p + 1][1] = r[3];
            }
#pragma unroll
            for (int mi = 0; mi < MI; mi++)
#pragma unroll
                for (int nj = 0; nj < NJ; nj++) {
                    if (kk == 0)
                        gt_mma0(tmp[mi][nj], af[mi], bh[nj][0], bh[nj][1]);
                    else
                        gt_mma(tmp[mi][nj], af[mi], bh[nj][0], bh[nj][1]);
                    gt_mma(tmp[mi][nj], af[mi], bl[nj][0], bl[nj][1]);
                }
            // One conversion task of the next stage per k step, between the MMAs. Unguarded,
            // so the whole iteration is one basic block that ptxas interleaves (a branch here
            // kept each k step's ldmatrix, MMAs and conversion strictly in sequence). In the
            // last iteration it converts a stale raw slot (no copy is pending into it) into
            // the converted slot that no MMA reads again.
            convert(s + 1, kk);
        }
        // The block's sums, unscaled, into the f32 accumulators.
        const float* inv = (const float*)(hs + 2 * BN * GT_WROW);
#pragma unroll
        for (int nj = 0; nj < NJ; nj++) {
            const int v = wn * NJ * 8 + nj * 8 + 2 * t;
            const float i0 = inv[v], i1 = inv[v + 1];
#pragma unroll
            for (int mi = 0; mi < MI; mi++) {
                acc[mi][nj][0] = fmaf(tmp[mi][nj][0], i0, acc[mi][nj][0]);
                acc[mi][nj][1] = fmaf(tmp[mi][nj][1], i1, acc[mi][nj][1]);
                acc[mi][nj][2] = fmaf(tmp[mi][nj][2], i0, acc[mi][nj][2]);
                acc[mi][nj][3] = fmaf(tmp[mi][nj][3], i1, acc[mi][nj][3]);
            }
        }
    }

    // The partial tile into shared memory once every thread is past its last MMA (the copy
    // groups still pending are empty), vector-major: part[v * PS + r].
    gt_wait<0>();
    __syncthreads();
    float* part = (float*)gt_smem;
#pragma unroll
    for (int mi = 0; mi < MI; mi++)
#pragma unroll
        for (int nj = 0; nj < NJ; nj++) {
            const int r = wm * MI * 16 + mi * 16 + g, v = wn * NJ * 8 + nj * 8 + 2 * t;
            part[v * S::PS + r] = acc[mi][nj][0];
            part[(v + 1) * S::PS + r] = acc[mi][nj][1];
            part[v * S::PS + r + 8] = acc[mi][nj][2];
            part[(v + 1) * S::PS + r + 8] = acc[mi][nj][3];
        }
    gf_finish<BM, BN, CL, S::PS, THREADS>(part, chunk, tid, v0, r0, n, rows, y);
}

// The tensor-core kernels: tile shape x split. Wide: 2 x 4 warps of 4 x 4 MMA tiles (128 rows
// x 128 vectors), one CTA per SM; narrow: 2 x 2 warps of 2 x 4 (64 x 64), two per SM.
#define GT_WIDE 2, 4, 4, 4
#define GT_NARROW 2, 2, 2, 4
extern "C" __global__ void __launch_bounds__(256, 1)
    gemm_f16_tc_wide_s1(GF_ARGS) {
    PDL_ENTRY();
    gemm_f16_tc_tile<GT_WIDE, 1>(w, row_bytes, x, y, rows, n, k);
}
extern "C" __global__ void __launch_bounds__(256, 1) __cluster_dims__(2, 1, 1)
    gemm_f16_tc_wide_s2(GF_ARGS) {
    PDL_ENTRY();
    gemm_f16_tc_tile<GT_WIDE, 2>(w, row_bytes, x, y, rows, n, k);
}
extern "C" __global__ void __launch_bounds__(256, 1) __cluster_dims__(4, 1, 1)
    gemm_f16_tc_wide_s4(GF_ARGS) {
    PDL_ENTRY();
    gemm_f16_tc_tile<GT_WIDE, 4>(w, row_bytes, x, y, rows, n, k);
}
extern "C" __global__ void __launch_bounds__(256, 1) __cluster_dims__(8, 1, 1)
    gemm_f16_tc_wide_s8(GF_ARGS) {
    PDL_ENTRY();
    gemm_f16_tc_tile<GT_WIDE, 8>(w, row_bytes, x, y, rows, n, k);
}
extern "C" __global__ void __launch_bounds__(128, 2)
    gemm_f16_tc_narrow_s1(GF_ARGS) {
    PDL_ENTRY();
    gemm_f16_tc_tile<GT_NARROW, 1>(w, row_bytes, x, y, rows, n, k);
}
extern "C" __global__ void __launch_bounds__(128, 2) __cluster_dims__(2, 1, 1)
    gemm_f16_tc_narrow_s2(GF_ARGS) {
    PDL_ENTRY();
    gemm_f16_tc_tile<GT_NARROW, 2>(w, row_bytes, x, y, rows, n, k);
}
extern "C" __global__ void __launch_bounds__(128, 2) __cluster_dims__(4, 1, 1)
    gemm_f16_tc_narrow_s4(GF_ARGS) {
    PDL_ENTRY();
    gemm_f16_tc_tile<GT_NARROW, 4>(w, row_bytes, x, y, rows, n, k);
}
extern "C" __global__ void __launch_bounds__(128, 2) __cluster_dims__(8, 1, 1)
    gemm_f16_tc_narrow_s8(GF_ARGS) {
    PDL_ENTRY();
    gemm_f16_tc_tile<GT_NARROW, 8>(w, row_bytes, x, y, rows, n, k);
}
