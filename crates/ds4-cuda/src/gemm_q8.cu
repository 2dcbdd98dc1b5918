// Tensor-core GEMM for prefill: Y = W X with Q8_0 weights and Q8_0-quantized activations.
//
// Numerics (the Q8_0 dot product, block by block): for each 32-element block b the exact
// int32 sum isum_b = sum_i w_q[i] * x_q[i], then acc = fma(d_w[b] * d_x[b], isum_b, acc) in
// f32, blocks in ascending order, acc starting at 0: the scale product rounded (__fmul_rn),
// then one fused multiply-add (__fmaf_rn), as ds4-gguf's AVX2 vec_dot_q8_0 fuses its update.
// Three rounded operations per output and block instead of the scalar dot's four (its
// separate product and add round once more): the epilogue is most of what this kernel issues
// (docs/speed-log.md, sessions 27-28), and the fused update is at least as accurate.
// gemm_gpu checks every output bit for bit against this order on the CPU.
//
// One mma.m16n8k32 (s8 x s8 -> s32) covers exactly one block (k = 32) of a 16-row x 8-vector
// tile, so its outputs are the per-block integer sums. The accumulator input C is the bit
// pattern of 1.5 * 2^23: D = C + isum is then the float 12582912 + isum exactly (|isum| <=
// 32 * 128 * 127 < 2^22), and one f32 subtraction gives isum as a float without an I2F
// conversion (which issues at a fraction of the f32 add rate).
//
// Tiles: a CTA computes BM = 32 WM rows x GQ_BN = 64 vectors with 2 WM warps (WM along the rows
// x 2 along the vectors), each warp a 32 x 32 tile = 2 x 4 MMAs per block; WM = 4 (128 rows, 8
// warps) normally, WM = 2 (64 rows) when 128-row tiles would leave multiprocessors idle. Every
// output's arithmetic is the same in both. The K loop walks tiles of GQ_KB = 8 blocks (256
// elements: 272 weight bytes per row, 17 x 16 bytes, so a 16-byte aligned row stays aligned
// tile after tile); two shared-memory stages, filled by the copy engine (below), overlap the
// next tile's copy with this tile's math.
//
// Shared stage layout (bytes; stages 1024-byte aligned):
//   w  [BM][272]              the raw Q8_0 blocks of each row (f16 d | 32 x i8), as in memory
//   xq [2][GQ_BN][128]        each vector's 256 int8 values in two halves of 128 bytes, the
//                             16-byte chunk c of row v at chunk c ^ (v % 8) (the copy engine's
//                             128-byte swizzle)
//   xd [GQ_KB][GQ_BN] f32     the vectors' block scales, block-major, each 32-vector half in
//                             the order its readers take them (gq_dpos: a lane's 8 scales of
//                             a block, its 4 n tiles' vector pairs, are two 16-byte loads)
// Weight row strides of 272 bytes (68 words, 4 banks apart) make the fragment loads of 8 rows x
// 4 lanes conflict-free, and the swizzle the ldmatrix reads of 8 rows of one chunk. The raw
// weight rows leave each block's quants 2-byte aligned: odd blocks start their quants 4-byte
// aligned (34 b + 2), even blocks 2 bytes off, read as two aligned words and a funnel shift.
//
// Copies: thread 0 announces the stage's bytes on its mbarrier and issues the copy engine's
// tensor copies (TMA, cp.async.bulk.tensor; common.cuh) from the launch's tensor maps (gemm.rs
// makes them): one for all of the CTA's weight rows of the K tile (the matrix, or the stack of
// experts, as u16 rows; 16-byte aligned weights) and two for the vectors' halves (the
// activations as 3-d u8: values, vectors and slots in the order of their strides, swizzled);
// the CTA waits on the barrier's phase. Rows past n_rows and vectors past n_vecs arrive as
// zeros and are not stored. The 16-byte cp.async pieces these replace, with their address
// stepping, took ~150 (weights) and ~60 (activations) of a warp's ~1 720 instructions per K
// tile (SASS of 564bcd9). The block scales stay 4-byte cp.async copies. The module needs sm_90
// (compile.rs refuses older GPUs).
//
// Weights that are not 16-byte aligned (matrix address or row length; rows of a block count
// that is not a multiple of 8) are copied with synchronous 2-byte loads instead, and the last
// K tile may then hold fewer than 8 blocks (the activations past it are zeros or unread).
//
// Experts: with ids != 0, blockIdx.z is the expert slot s: the weights move to matrix ids[s]
// (expert_stride bytes apart), x vector v is s * x_slot_vecs + v * x_vec_stride, y vector v is
// s * y_slot_vecs + v * y_vec_stride (slot-major: strides 1, y_slot_vecs = n_vecs; interleaved,
// the attention output's token-major groups: slot strides 1, vector strides = slots). An id
// outside [0, n_experts) writes NaN outputs for the slot.

#define GQ_BN 64
#define GQ_KB 8
#define GQ_WROW (GQ_KB * Q8_0_BYTES)  // 272
#define GQ_XHALF (GQ_BN * 128)  // one half of the vectors' K tile: 8192
#define GQ_STAGE_X (2 * GQ_XHALF)
#define GQ_STAGE_D (GQ_KB * GQ_BN * 4)
// One stage of a CTA with WM row warps: 53248 bytes for WM = 4, 35840 for WM = 2 (multiples
// of 1024, as are the weight parts, so the swizzled activation tiles start 1024-byte aligned).
#define GQ_STAGE_W(WM) (32 * (WM) * GQ_WROW)
#define GQ_STAGE(WM) (GQ_STAGE_W(WM) + GQ_STAGE_X + GQ_STAGE_D)
#define GQ_STAGES 2
// After the stages: one 8-byte mbarrier per stage (the tensor copies' completion). The
// dynamic shared memory has 1024 bytes more, so that the stages can start 1024-byte aligned.
#define GQ_BARRIERS(WM) (GQ_STAGES * GQ_STAGE(WM))
#define GQ_ALIGN 1024

// 1.5 * 2^23 as float bits: adding an integer |i| < 2^22 to them gives the float 12582912 + i.
#define GQ_MAGIC_BITS 0x4B400000
#if defined(__CUDA_ARCH__) && !TMA_COPIES
#error "gemm_q8 copies its tiles with the TMA engine: sm_90 or later"
#endif
#define GQ_MAGIC_F 12582912.0f

// Must match the #[repr(C, align(64))] GemmQ8Params in gemm.rs: 8-byte fields only, so no
// padding; the tensor map (the driver's opaque 128-byte CUtensorMap) at byte 128, 64-byte
// aligned as the copy engine requires. Kernels take it as a __grid_constant__ parameter so that
// the map's address is its place in the parameter space.
struct __align__(64) GemmQ8Params {
    u64 w;    // Q8_0 weights (first expert when ids != 0)
    u64 x;    // int8 activations, n_blocks * 32 per vector
    u64 xd;   // f32 scale per activation block
    u64 y;    // f32 output, vector-major: y[v * n_rows + r]
    u64 ids;  // i32 expert id per slot, or 0
    i64 row_bytes;
    i64 expert_stride;
    i64 n_experts;
    i64 n_rows;
    i64 n_blocks;     // Q8_0 blocks per row (cols / 32)
    i64 n_vecs;       // vectors per slot
    i64 x_slot_vecs;  // x vectors between slots (0: all slots read the same vectors)
    i64 aligned16;    // weights 16-byte aligned: w, row_bytes and expert_stride
    i64 x_vec_stride;  // x vectors between a slot's consecutive vectors
    i64 y_slot_vecs;   // y vectors between slots
    i64 y_vec_stride;  // y vectors between a slot's consecutive vectors
    u64 wmap[16];      // tensor map of the weights (u16 x rows x experts), when aligned16
    u64 xmap[16];      // tensor map of the activations (u8 x vectors x slots, 128-byte swizzle)
};

// Where vector v's block scale sits in a block's row of xd: a warp's lane with t = lane % 4
// reads vectors 32 wn + 8 nj + 2 t + e (n tile nj < 4, e < 2), so within each half of 32 the
// fields nj (bits 3-4) and t (bits 1-2) swap places and the lane's 8 scales are contiguous.
__device__ __forceinline__ int gq_dpos(int v) {
    return (v & ~31) | (((v >> 1) & 3) << 3) | (((v >> 3) & 3) << 1) | (v & 1);
}

__device__ __forceinline__ u32 gq_smem_addr(const void* p) {
    u64 a;
    asm("cvta.to.shared.u64 %0, %1;" : "=l"(a) : "l"(p));
    return (u32)a;
}
__device__ __forceinline__ void gq_cp4(void* dst, const void* src) {
    asm volatile("cp.async.ca.shared.global [%0], [%1], 4;" ::"r"(gq_smem_addr(dst)), "l"(src) : "memory");
}
// The same copy to a shared-memory address already in the shared window.
__device__ __forceinline__ void gq_cp4_s(u32 dst, const void* src) {
    asm volatile("cp.async.ca.shared.global [%0], [%1], 4;" ::"r"(dst), "l"(src) : "memory");
}
__device__ __forceinline__ void gq_commit() { asm volatile("cp.async.commit_group;" ::: "memory"); }

__device__ __forceinline__ void gq_wait_all() { asm volatile("cp.async.wait_group 0;" ::: "memory"); }

// Four 8x8 b16 matrices from shared memory: lanes 8m..8m+7 give the row addresses of matrix m;
// register m receives, in lane l, bytes 4(l%4)..4(l%4)+3 of row l/4 of matrix m.
// row_addr: the lane's row address in the shared window (32 bits).
__device__ __forceinline__ void gq_ldmatrix_x4(u32 row_addr, u32 (&r)[4]) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(row_addr));
}

// D = A B + C for a 16x32 s8 A (row-major) and a 32x8 s8 B (column-major), s32 C/D.
// Lane l, g = l/4, t = l%4 holds:
//   a[0]: A[g][4t..4t+3]    a[1]: A[g+8][4t..4t+3]   a[2]: A[g][16+4t..]   a[3]: A[g+8][16+4t..]
//   b[0]: B[4t..4t+3][g]    b[1]: B[16+4t..16+4t+3][g]
//   d[0]: D[g][2t]  d[1]: D[g][2t+1]  d[2]: D[g+8][2t]  d[3]: D[g+8][2t+1]
// (A pure function of its registers: not volatile, so the compiler may schedule it freely.)
__device__ __forceinline__ void gq_mma(const u32 (&a)[4], u32 b0, u32 b1, int c, int (&d)[4]) {
    asm(
        "mma.sync.aligned.m16n8k32.row.col.s32.s8.s8.s32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%10,%10,%10,%10};"
        : "=r"(d[0]), "=r"(d[1]), "=r"(d[2]), "=r"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1), "r"(c));
}

// Four quant bytes at p (shared memory): 4-byte aligned when ALIGNED, else 2 bytes past a
// 4-byte boundary (two aligned words and a funnel shift).
template <bool ALIGNED>
__device__ __forceinline__ u32 gq_quads(const u8* p) {
    if constexpr (ALIGNED) {
        return *(const u32*)p;
    } else {
        const u32 lo = *(const u32*)(p - 2), hi = *(const u32*)(p + 2);
        return __funnelshift_r(lo, hi, 16);
    }
}

// Copies K tile kt (blocks 8kt .. 8kt+7, those < n_blocks) of the CTA's rows and vectors into
// one stage: thread 0 the copy engine's part (above), every thread its block scales as 4-byte
// cp.async copies (scale tid % 8 of every THREADS / 8-th vector), and with unaligned weights
// the weight bytes 2 at a time. Results of rows and vectors past the ends are never stored.
template <int WM>
__device__ __forceinline__ void gq_load_tile(u8* stage, u32 bar, const GemmQ8Params& p, int expert, int x_slot,
                                             const u8* w, const float* xd, i64 row0, i64 vec0, i64 kt) {
    constexpr int BM = 32 * WM, THREADS = 64 * WM;
    const i64 kblk0 = kt * GQ_KB;
    u8* sw = stage;
    u8* sx = stage + GQ_STAGE_W(WM);
    float* sd = (float*)(stage + GQ_STAGE_W(WM) + GQ_STAGE_X);
    // Read per tile: the per-thread offsets below stay out of the registers the kernel lacks.
    const int tid = thread_index_per_call();
    // The CTA's last valid vector, relative to its first (the launcher keeps GQ_BN vectors'
    // activations, and so their scales, under 4 GiB: see gemm.rs).
    const int last_vec = (int)min64(GQ_BN, p.n_vecs - vec0) - 1;
    const u32 d_vec = (u32)(p.x_vec_stride * p.n_blocks);
    if (tid == 0) {
        tma_barrier_expect(bar, (p.aligned16 ? BM * GQ_WROW : 0) + GQ_STAGE_X);
        if (p.aligned16) tma_copy_3d(gq_smem_addr(sw), p.wmap, (int)kt * (GQ_WROW / 2), (int)row0, expert, bar);
        // The activations' map has the slots inside the vectors when they are interleaved.
        const bool slot_inner = p.x_vec_stride != 1;
        for (int h = 0; h < 2; h++)
            tma_copy_3d(gq_smem_addr(sx) + h * GQ_XHALF, p.xmap, (int)kt * (GQ_KB * QK8_0) + 128 * h,
                        slot_inner ? x_slot : (int)vec0, slot_inner ? (int)vec0 : x_slot, bar);
    }
    if (p.aligned16) {
        const float* dt = xd + vec0 * (i64)d_vec + kblk0 + (tid & 7);
        const u32 s_d = gq_smem_addr(sd) + 4 * (tid & 7) * GQ_BN;
#pragma unroll
        for (int k = 0; k < GQ_BN * GQ_KB / THREADS; k++) {
            const int v = (tid >> 3) + (THREADS / 8) * k;
            gq_cp4_s(s_d + 4 * gq_dpos(v), dt + (u32)min(v, last_vec) * d_vec);
        }
        return;
    }
    // 2-byte units of the tile's valid blocks (17 per block), plain loads and stores.
    const int nbt = (int)min64(GQ_KB, p.n_blocks - kblk0);
    const int units = nbt * (Q8_0_BYTES / 2);
    for (int i = tid; i < BM * (GQ_WROW / 2); i += THREADS) {
        const int r = i / (GQ_WROW / 2), c = i - (GQ_WROW / 2) * r;
        if (c < units) {
            const i64 row = min64(row0 + r, p.n_rows - 1);
            const u16* src = (const u16*)(w + row * p.row_bytes + kblk0 * Q8_0_BYTES) + c;
            ((u16*)(sw + r * GQ_WROW))[c] = *src;
        }
    }
    for (int i = tid; i < GQ_BN * GQ_KB; i += THREADS) {
        const int v = i >> 3, b = i & 7;
        if (b < nbt) {
            const i64 vec = min64(vec0 + v, p.n_vecs - 1);
            gq_cp4(sd + b * GQ_BN + gq_dpos(v), xd + vec * p.x_vec_stride * p.n_blocks + kblk0 + b);
        }
    }
}

template <int WM>
__device__ __forceinline__ void gemm_q8_0_tile(const GemmQ8Params& p) {
    constexpr int BM = 32 * WM, STAGE = GQ_STAGE(WM), STAGE_W = GQ_STAGE_W(WM);
    extern __shared__ __align__(16) u8 gq_smem_raw[];
    // The stages from the first 1024-byte boundary (the launch gives GQ_ALIGN bytes more).
    u8* gq_smem = gq_smem_raw + ((GQ_ALIGN - (gq_smem_addr(gq_smem_raw) & (GQ_ALIGN - 1))) & (GQ_ALIGN - 1));
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int wm = warp % WM, wn = warp / WM;  // warp tile: rows 32 wm.., vectors 32 wn..
    const int g = lane >> 2, t = lane & 3;
    const i64 vec0 = (i64)blockIdx.x * GQ_BN;
    const i64 row0 = (i64)blockIdx.y * BM;
    const i64 slot = blockIdx.z;

    const u8* w = (const u8*)p.w;
    bool bad_id = false;
    int expert = 0;
    if (p.ids != 0) {
        const int e = ((const int*)p.ids)[slot];
        bad_id = e < 0 || e >= p.n_experts;
        expert = bad_id ? 0 : e;
        w += (i64)expert * p.expert_stride;
    }
    const int x_slot = p.x_slot_vecs != 0 ? (int)slot : 0;  // the slot in the activations' tensor map
    const float* xd = (const float*)p.xd + slot * p.x_slot_vecs * p.n_blocks;

    // acc[mi][nj][i]: row 32 wm + 16 mi + g + 8 (i >> 1), vector 32 wn + 8 nj + 2t + (i & 1).
    float acc[2][4][4];
#pragma unroll
    for (int mi = 0; mi < 2; mi++)
#pragma unroll
        for (int nj = 0; nj < 4; nj++)
#pragma unroll
            for (int i = 0; i < 4; i++) acc[mi][nj][i] = 0.0f;

    const i64 n_tiles = (p.n_blocks + GQ_KB - 1) / GQ_KB;
    const u32 bars = gq_smem_addr(gq_smem + GQ_BARRIERS(WM));
    if (threadIdx.x == 0) {
        for (int st = 0; st < GQ_STAGES; st++) tma_barrier_init(bars + 8 * st);
        tma_barrier_init_fence();
    }
    __syncthreads();
    if (!bad_id) {
        gq_load_tile<WM>(gq_smem, bars, p, expert, x_slot, w, xd, row0, vec0, 0);
        gq_commit();
    }
    for (i64 kt = 0; kt < n_tiles && !bad_id; kt++) {
        // Tile kt: this thread's scale copies, then the copy engine's part (stage kt & 1's
        // (kt / 2)-th use: that phase of its barrier); the barrier makes all of it visible to
        // every warp.
        gq_wait_all();
        tma_barrier_wait(bars + 8 * (kt & 1), (u32)(kt >> 1) & 1);
        __syncthreads();
        // Past that barrier every warp is done with tile kt - 1, so the next tile may go into
        // its stage now: one CTA barrier a K tile instead of a second one after the math.
        if (kt + 1 < n_tiles) {
            gq_load_tile<WM>(gq_smem + ((kt + 1) & 1) * STAGE, bars + 8 * ((kt + 1) & 1), p, expert, x_slot, w, xd, row0,
                             vec0, kt + 1);
            gq_commit();
        }

        const u8* stage = gq_smem + (kt & 1) * STAGE;
        const u8* sw = stage + (32 * wm + g) * GQ_WROW;
        const u8* sx = stage + STAGE_W;
        const float* sd = (const float*)(stage + STAGE_W + GQ_STAGE_X);
        // ldmatrix rows: lanes 8m..8m+7 address matrix m = (vectors 8(m/2)..+7, bytes 16(m%2)..+15
        // of the block) of a 16-vector pair of n-tiles; the lane's vector is lane % 8 mod 8, so
        // its chunks' swizzle key.
        // The row in the shared window (32-bit addresses: no generic address per block), and
        // the swizzled chunk's byte offset: 16 ((2 (b & 3) + x_chunk) ^ x_key), where
        // 2 (b & 3) and x_chunk < 2 share no bit, is 32 (b & 3) ^ 16 (x_chunk ^ x_key).
        const u32 sx_lane = gq_smem_addr(sx) + (32 * wn + 8 * (lane >> 4) + (lane & 7)) * 128;
        const u32 x_swz = 16 * (((lane >> 3) & 1) ^ (lane & 7));
        const int nbt = (int)min64(GQ_KB, p.n_blocks - kt * GQ_KB);
        // Block b of the tile: its A and B fragments, 8 mma and their f32 updates.
        auto block = [&](int b) {
            // A fragments and weight scales of the warp's 2 m-tiles (rows g, g + 8 of each).
            u32 a[2][4];
            float dw[2][2];
#pragma unroll
            for (int mi = 0; mi < 2; mi++) {
                const u8* r0 = sw + (16 * mi) * GQ_WROW + b * Q8_0_BYTES;
                const u8* r1 = r0 + 8 * GQ_WROW;
                if (b & 1) {
                    a[mi][0] = gq_quads<true>(r0 + 2 + 4 * t);
                    a[mi][1] = gq_quads<true>(r1 + 2 + 4 * t);
                    a[mi][2] = gq_quads<true>(r0 + 18 + 4 * t);
                    a[mi][3] = gq_quads<true>(r1 + 18 + 4 * t);
                } else {
                    a[mi][0] = gq_quads<false>(r0 + 2 + 4 * t);
                    a[mi][1] = gq_quads<false>(r1 + 2 + 4 * t);
                    a[mi][2] = gq_quads<false>(r0 + 18 + 4 * t);
                    a[mi][3] = gq_quads<false>(r1 + 18 + 4 * t);
                }
                dw[mi][0] = f16_to_f32(rd16(r0));
                dw[mi][1] = f16_to_f32(rd16(r1));
            }
            // B fragments of the warp's 4 n-tiles: two ldmatrix.x4, each two n-tiles.
            u32 bq[4][2];
#pragma unroll
            for (int pair = 0; pair < 2; pair++) {
                u32 r[4];
                // 16 bytes of block b's 32
                gq_ldmatrix_x4(sx_lane + (b >> 2) * GQ_XHALF + pair * 16 * 128 + (x_swz ^ (32 * (b & 3))), r);
                bq[2 * pair][0] = r[0];
                bq[2 * pair][1] = r[1];
                bq[2 * pair + 1][0] = r[2];
                bq[2 * pair + 1][1] = r[3];
            }
            // The lane's vector pairs of its 4 n tiles, contiguous (gq_dpos).
            const float4* dxs = (const float4*)(sd + b * GQ_BN + 32 * wn + 8 * t);
            const float4 dx01 = dxs[0], dx23 = dxs[1];
#pragma unroll
            for (int nj = 0; nj < 4; nj++) {
                const float4 dq = nj < 2 ? dx01 : dx23;
                const float2 dx = (nj & 1) ? make_float2(dq.z, dq.w) : make_float2(dq.x, dq.y);
#pragma unroll
                for (int mi = 0; mi < 2; mi++) {
                    int d[4];
                    gq_mma(a[mi], bq[nj][0], bq[nj][1], GQ_MAGIC_BITS, d);
#pragma unroll
                    for (int i = 0; i < 4; i++) {
                        const float isum = __fsub_rn(__int_as_float(d[i]), GQ_MAGIC_F);  // exact
                        const float scale = __fmul_rn(dw[mi][i >> 1], (i & 1) ? dx.y : dx.x);
                        acc[mi][nj][i] = __fmaf_rn(scale, isum, acc[mi][nj][i]);
                    }
                }
            }
        };
        if (nbt == GQ_KB) {  // every tile but an unaligned matrix's last: no per-block test
#pragma unroll
            for (int b = 0; b < GQ_KB; b++) block(b);
        } else {
#pragma unroll
            for (int b = 0; b < GQ_KB; b++) {
                if (b >= nbt) break;
                block(b);
            }
        }
    }

    const float nan = __int_as_float(0x7fc00000);
    float* y = (float*)p.y + slot * p.y_slot_vecs * p.n_rows;
#pragma unroll
    for (int mi = 0; mi < 2; mi++)
#pragma unroll
        for (int nj = 0; nj < 4; nj++)
#pragma unroll
            for (int i = 0; i < 4; i++) {
                const i64 row = row0 + 32 * wm + 16 * mi + g + 8 * (i >> 1);
                const i64 vec = vec0 + 32 * wn + 8 * nj + 2 * t + (i & 1);
                if (row < p.n_rows && vec < p.n_vecs) y[vec * p.y_vec_stride * p.n_rows + row] = bad_id ? nan : acc[mi][nj][i];
            }
}

// 128 rows x 64 vectors, 8 warps; 2 stages of 53248 bytes (and the barriers), two CTAs per SM.
extern "C" __global__ void __launch_bounds__(256, 2) gemm_q8_0_q8x_m128(const __grid_constant__ GemmQ8Params p) {
    PDL_ENTRY();
    gemm_q8_0_tile<4>(p);
}
// 64 rows x 64 vectors, 4 warps; 2 stages of 35840 bytes (and the barriers), three CTAs per SM.
extern "C" __global__ void __launch_bounds__(128, 3) gemm_q8_0_q8x_m64(const __grid_constant__ GemmQ8Params p) {
    PDL_ENTRY();
    gemm_q8_0_tile<2>(p);
}
