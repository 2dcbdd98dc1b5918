// Tensor-core grouped expert products for prefill (the routed MoE experts): for each expert e,
// Y[v] = W_e X[v] for its vectors v in [groups[e], groups[e+1]) (sorted by expert), with
// IQ2_XXS, Q2_K or Q4_K weights and Q8_K activations (int8 values, one f32 scale per 256).
//
// Numerics (bit-equal to ds4-gguf's scalar vec_dot_{iq2_xxs,q2_k,q4_k}): per 256-element block
// an exact int32 sum with the integer sub-block scales applied inside it, then one f32 update
// per block, blocks in ascending order, acc starting at 0, every operation rounded on its own
// (__fmul_rn / __fadd_rn / __fsub_rn, no FMA contraction; int -> f32 rounds to nearest even as
// Rust's `as f32`):
//   IQ2_XXS: isum = sum_items (2 s + 1) * sum_32 w_grid*sign * x_q
//            acc = acc + (f16(d) * d_x) * (f32)isum; the output is 0.125 * acc.
//   Q2_K:    isum = sum_16 (sc & 15) * sum_16 q * x_q,  msum = sum_16 (sc >> 4) * sum_16 x_q
//   Q4_K:    isum = sum_32 sc * sum_32 q * x_q,          msum = sum_32 m * sum_32 x_q
//            acc = acc + ((d_x * f16(d)) * (f32)isum - (d_x * f16(dmin)) * (f32)msum).
//
// Integer sums on the tensor cores: one mma.m16n8k32 (s8 x s8 -> s32) covers one 32-element
// item of a block for 16 rows x 8 vectors. The A fragments are decoded in registers straight
// from the raw blocks staged in shared memory:
//   IQ2_XXS: the signed grid values (|w| <= 43) by PRMT (common.cuh's selector words, here in a
//            bank-spread copy, with the sign bits computed from the 7-bit index); the item
//            sum is multiplied by the item's odd scale 2 s + 1 and added to isum. The K order
//            inside the item is permuted (in A and B alike, which leaves the sum unchanged) so
//            that each lane's registers hold one whole 8-weight group: one selector lookup per
//            row and item, and an 8-byte B load.
//   Q2_K:    sc * q (<= 15 * 3 = 45, fits int8), so the accumulator chain C = isum of the mma
//            sums the whole block; the min term is a second chained mma whose A holds the
//            sub-block's min (sc >> 4) in every element: sum_16 m * x_q = m * bsum_16, so the
//            16-value activation sums are never formed.
//   Q4_K:    q (0..15); the item sum is multiplied by the 6-bit scale (sc * q up to 945 does
//            not fit int8); the min term is a chained mma with m (<= 63) in every element.
// All of it is exact int32 arithmetic (|isum| < 2^26), so the order of the integer sums is free.
//
// Tiles: a CTA owns GE_BM = 64 rows of one expert (4 warps x 16 rows: one m16 tile each) and
// runs the expert's vectors in passes of up to NV (only the n8 tiles that hold vectors are
// computed), the K loop inside each pass: an expert with <= NV vectors reads and decodes its
// rows once per CTA; larger groups re-read (from L2 mostly) and decode them again per pass.
// Two widths: narrow kernels, NV = GE_NV = 32, three CTAs per SM (a 1 024-token span has
// 1 024 x 6 slots / 256 experts ~ 24 vectors per expert), and wide ones (`_wide`), NV =
// GE_NV_WIDE = 64, two CTAs per SM (their stages hold twice the activations), for 2 048-token
// spans (~48 vectors per expert: one decode instead of two). Grid: (row
// tiles, experts + 1, matrices): consecutive CTAs are row tiles of one expert, sharing its
// activations through L2; grid row `n_experts` writes NaN rows for the vectors outside every
// group; blockIdx.z = 1 runs the second matrix of a pair (gate and up in one launch).
//
// The K loop walks tiles of GE_KT = 2 blocks (512 elements) with two shared-memory stages: the
// weight bytes of the tile for 64 rows, the active vectors' 512 int8 values and their 2 block
// scales. With 16-byte aligned weights the weights are one tensor copy of the copy engine
// (TMA, common.cuh) per tile, issued by thread 0 from the launch's tensor map of the expert
// stack (u32 elements), counted in on the stage's mbarrier; a stage row starts at the 16-byte
// boundary at or before the tile, `boff` = tile start & 15 bytes early (the engine reads global
// rows from 16-byte aligned addresses; a box starting 4 bytes past one faults), and bytes past
// the row's end arrive as zeros. The 16-byte cp.async pieces this replaced (11-19 per row) and
// their address stepping cost every thread ~100 instructions per tile. Unaligned weights are
// copied 2 bytes at a time. The activations are tensor copies as well (boxes of 8 padded stage
// rows); the scales are 4-byte cp.async copies. The module needs sm_90 (compile.rs refuses
// older GPUs).
//
// Shared stage layout (bytes):
//   w  [GE_BM][WROW]        raw weight bytes of each row's tile (blocks at boff + b * BB)
//   xq [NV][XROW]           each vector's 512 int8 values, rows padded by 16 or 32 bytes
//   xd [GE_KT][NV] f32      the vectors' block scales, block-major (two vectors per float2)
// Weight row strides of 16 mod 32 bytes put the 8 rows a fragment load touches on disjoint
// banks; so do activation rows 16 mod 128 bytes apart for the 4-byte B loads of the K formats,
// and 32 mod 128 for IQ2_XXS's 8-byte B loads (16 lanes a wavefront: 4 rows x 32 bytes).
//
// Weights that are not 16-byte aligned (matrix address, row length or expert stride) are
// copied with synchronous 2-byte loads into the same stage positions (same bits, slower).
// Rows past n_rows arrive as zeros from the copy engine (the 2-byte path reads the last row)
// and vectors past the group's end read its last vector; neither is stored.
//
// What bounds it (H100 SXM, q2 model, 256 tokens): each expert's weights are read from memory
// once, 1.81 GB per layer for gate + up + down (~0.55 ms at 3.3 TB/s), while the integer work
// of ~6 vectors per expert is far below the tensor cores' rate. The IQ2_XXS decode is the other
// limit: an item for 16 rows and one n8 tile costs a warp ~52 instructions (per row two word
// loads, a funnel shift for even blocks, the grid index PRMT and address, one selector load,
// ~10 integer ops for the sign bits, two PRMT, the scale; counted in the SASS) and ~10
// shared-memory wavefronts (the word loads, two per selector lookup, two per B load). The
// selector lookups used to go to one 256-word table and the sign bits to a 128-word one, ~3
// wavefronts each for 32 random indices (~18 per item): shared-memory bound. The 16-copy grid
// table and the arithmetic signs leave the instruction issue as the limit (about the same
// count as before). Q2_K / Q4_K decode with a load, a shift, a mask and a multiply per 4
// weights and stay near the bandwidth bound. The per-block f32 epilogue (3-6 ops per output
// per 256 MACs) and the B fragment loads are minor at these batch sizes.
// At 1 024-token spans (~24 vectors per expert; ncu on an H200) the IQ2_XXS pair took 2.0 ms
// per layer with 61 % of the issue slots busy and DRAM at 13 %: issue-bound, at an occupancy of
// 12 warps per SM (registers allow 4 CTAs, shared memory 3). Per item and n tile the item-by-
// item loop also spent ~9 instructions (B load, mma, 4 IMAD, the nt test and branch); decoding
// a block's 8 items first (IQ2_XXS, Q2_K) makes that ~6. H100, 256 experts, uniform routing
// (expert_gemm_throughput), ms before -> after: IQ2_XXS pair 1 024 tokens 2.01 -> 1.53,
// 2 048 tokens 3.67 -> 2.58 (wide; narrow 2.78); Q2_K 1 024 tokens 0.90 -> 0.83, 2 048 tokens
// 1.66 -> 1.43 (wide). A shared table of the sign words (4 or 8 copies) instead of their ~9
// integer ops was 4-6 % faster item by item but 1-6 % slower with the items decoded first
// (more shared-memory wavefronts). Wide passes lose at 1 024 tokens (IQ2_XXS pair 1.89 vs
// 1.53 ms: occupancy), and Q4_K (items not decoded first) gains nothing from them at 2 048
// (2.00 vs 1.96 ms): the launcher picks the width (gemm_experts.rs). In the model (H200, q2
// aliased, 2 048-token prefill, DS4_CUDA_PROFILE=kernels) the IQ2_XXS pair went from 2.34 ms
// per layer and 1 024-token span (narrow, item by item) to 3.22 ms per 2 048-token span (wide,
// decode first): 200.9 -> 138.6 ms in all; Q2_K 1.04 -> 1.69 ms, 89.5 -> 72.9 ms.

#if defined(__CUDA_ARCH__) && !TMA_COPIES
#error "gemm_experts copies its weight tiles with the TMA engine: sm_90 or later"
#endif

#define GE_WARPS 4
#define GE_THREADS (32 * GE_WARPS)
#define GE_BM 64
#define GE_NV 32       // vectors per pass of the narrow kernels (three CTAs per SM)
#define GE_NV_WIDE 64  // of the wide ones (two CTAs per SM)
#define GE_KT 2
#define GE_NJ 2  // n tiles walked together by the decode-first formats (ge_tile_math)
#define GE_XROW_IQ2_XXS (GE_KT * QK_K + 32)  // 544
#define GE_XROW_K (GE_KT * QK_K + 16)        // 528
// Stage row strides of the weights: the bytes of a tile (GE_KT blocks) starting up to 12 bytes
// past a 16-byte boundary, rounded up to 16, and 16 more where that is a multiple of 32.
#define GE_WROW_IQ2_XXS 176
#define GE_WROW_Q2_K 208
#define GE_WROW_Q4_K 304

#define GE_IQ2_XXS 0
#define GE_Q2_K 1
#define GE_Q4_K 2

template <int FMT> struct GeFmt;
// Per format: block bytes, weight and activation stage row strides.
template <> struct GeFmt<GE_IQ2_XXS> { enum { BB = IQ2_XXS_BYTES, WROW = GE_WROW_IQ2_XXS, XROW = GE_XROW_IQ2_XXS }; };
template <> struct GeFmt<GE_Q2_K> { enum { BB = Q2_K_BYTES, WROW = GE_WROW_Q2_K, XROW = GE_XROW_K }; };
template <> struct GeFmt<GE_Q4_K> { enum { BB = Q4_K_BYTES, WROW = GE_WROW_Q4_K, XROW = GE_XROW_K }; };

// Must match the #[repr(C, align(64))] GemmExpertsParams in gemm_experts.rs: 8-byte fields
// only (no padding), the tensor maps from byte 128, 64-byte aligned as the copy engine needs
// (kernels take the struct as a __grid_constant__ parameter: the maps' addresses are their
// places in the parameter space).
struct __align__(64) GemmExpertsParams {
    u64 w;       // expert stack (blockIdx.z == 0)
    u64 w_pair;  // second stack of the same shape (blockIdx.z == 1), or 0
    u64 x;       // int8 activations, n_vecs_total x n_blocks x 256
    u64 xd;      // f32 scale per activation block
    u64 y;       // f32 output, vector-major: y[v * n_rows + r]
    u64 y_pair;  // output of the second stack
    u64 groups;  // i32 vector offsets per expert (n_experts + 1)
    u64 grid;    // IQ2_XXS codebook: 256 x u64
    i64 row_bytes;
    i64 expert_stride;
    i64 n_experts;
    i64 n_rows;
    i64 n_blocks;      // 256-element blocks per row
    i64 n_vecs_total;  // vectors in x and y
    i64 aligned16;     // w, w_pair, row_bytes and expert_stride are multiples of 16
    i64 reserved;      // (the maps start at byte 128)
    u64 wmap[16];      // tensor map of w (u32 x rows x experts) when aligned16, sm_90
    u64 wmap_pair[16];  // of w_pair
    u64 xmap[16];       // of the activations (u32 x vectors), boxes of 8 stage rows
};

// D = A B + C for a 16x32 s8 A (row-major) and a 32x8 s8 B (column-major), s32 C/D.
// Lane l, g = l/4, t = l%4 holds:
//   a[0]: A[g][4t..4t+3]    a[1]: A[g+8][4t..4t+3]   a[2]: A[g][16+4t..]   a[3]: A[g+8][16+4t..]
//   b0: B[4t..4t+3][g]      b1: B[16+4t..16+4t+3][g]
//   c[0]: C[g][2t]  c[1]: C[g][2t+1]  c[2]: C[g+8][2t]  c[3]: C[g+8][2t+1]
// c is updated in place (D = C).
__device__ __forceinline__ void ge_mma(const u32 (&a)[4], u32 b0, u32 b1, int (&c)[4]) {
    asm("mma.sync.aligned.m16n8k32.row.col.s32.s8.s8.s32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};"
        : "+r"(c[0]), "+r"(c[1]), "+r"(c[2]), "+r"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// IQ2_XXS decoding without bank conflicts. The grid selector words of common.cuh
// (iq2xxs_tables) kept in 16 copies, copy c of entry i at word 16 i + c: lane l reads copy
// l % 16, so its word is on bank l % 16 + 16 (i % 2) and the 32 lookups of a warp take at
// most two wavefronts, where one 256-word table averages ~3.2 (random indices over 32 banks).
#define GE_IQ2_COPIES 16
__shared__ u32 ge_iq2_grid[256 * GE_IQ2_COPIES];
// IQ2_POS, read from shared memory once per tile so that it stays in a register (PRMT's first
// source) instead of being moved in before every PRMT.
__shared__ u32 ge_iq2_pos;

// Fills ge_iq2_grid from the u64 codebook at device address grid; needs GE_WARPS = 4 (warp w
// owns entries 64 w .. 64 w + 63). The caller synchronizes before the first lookup.
__device__ __forceinline__ void ge_iq2_grid_table(u64 grid) {
    static_assert(GE_WARPS == 4, "four warps of 64 grid entries each");
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const u64* g = (const u64*)grid + 64 * warp;
    const u64 ga = g[lane], gb = g[32 + lane];
    const u32 sa = iq2_codes4((u32)ga) | (iq2_codes4((u32)(ga >> 32)) << 16);
    const u32 sb = iq2_codes4((u32)gb) | (iq2_codes4((u32)(gb >> 32)) << 16);
    if (threadIdx.x == 0) ge_iq2_pos = IQ2_POS;
    // Word 1024 w + 32 j + lane (consecutive words: conflict-free stores) is copy lane % 16 of
    // entry 64 w + 2 j + lane / 16, whose selector lane (2 j + lane / 16) % 32 holds in sa
    // (j < 16) or sb.
    u32* dst = ge_iq2_grid + 1024 * warp + lane;
#pragma unroll
    for (int j = 0; j < 32; j++) {
        const int src = (2 * j + (lane >> 4)) & 31;
        dst[32 * j] = __shfl_sync(0xffffffffu, j < 16 ? sa : sb, src);
    }
}

// The sign bits of an IQ2_XXS sign index (the low 7 bits of x; the rest is ignored),
// completed by the parity bit, at the negate bits 4 j + 2 of selector nibble j: the same word
// as sign_nibbles8(iq2_signs(x & 127)) (checked for all 128 indices), computed instead of
// looked up. Each product adds two copies of bit groups that do not overlap (an OR): 4-bit
// halves to bits 0 and 16, 2-bit quarters to bytes, single bits to nibbles (bit 2).
__device__ __forceinline__ u32 ge_iq2_sign_bits(u32 x) {
    const u32 s7 = x & 127;
    u32 s;  // s7 + 128 popc(s7) < 2^10 in one IMAD: bit 7 is the parity; bits 8-9 fall out below
    asm("mad.lo.u32 %0, %1, 128, %2;" : "=r"(s) : "r"((u32)__popc(s7)), "r"(s7));
    u32 y = (s * 0x1001u) & 0x000F000Fu;    // bits 0-3 stay, 4-7 -> 16-19
    y = (y * 0x41u) & 0x03030303u;          // bit pairs -> bytes
    return (y * 0x24u) & 0x44444444u;       // (y << 2) | (y << 5): bits -> bit 2 of nibbles
}

// Copies K tile kt (blocks GE_KT kt .., those < n_blocks) of the CTA's rows and of vector rows
// 0 .. nvr-1 (vectors v0 + i) into one stage: the weights by the copy engine (above; rows past
// n_rows arrive as zeros) or, unaligned, 2 bytes at a time (rows past n_rows read the last
// row); the activations by the copy engine too, one box of 8 stage rows per n8 tile, each row
// XROW bytes from the tile's first value (the K tile's 512 values and the next 16 or 32, which
// fill the padding that spreads the rows over the banks; zeros past the row's end; vectors past
// the group are other groups' or zeros, never stored); the scales as 4-byte cp.async copies of
// vectors clamped to v_last.
template <int FMT, int NV>
__device__ __forceinline__ void ge_load_tile(u8* stage, u32 bar, const GemmExpertsParams& p, const u8* W, i64 row0,
                                             i64 v0, int nvr, i64 v_last, i64 kt) {
    constexpr int BB = GeFmt<FMT>::BB, WROW = GeFmt<FMT>::WROW, XROW = GeFmt<FMT>::XROW;
    static_assert(WROW % 16 == 0 && GE_KT * 16 == 32, "stage rows of whole 16-byte pieces; a warp per activation row");
    // Read per tile: the per-thread offsets below stay out of the registers the kernel lacks.
    const int tid = thread_index_per_call();
    const i64 kb0 = kt * GE_KT;
    const int nbt = (int)min64(GE_KT, p.n_blocks - kb0);
    const i64 t0 = kb0 * BB;  // the tile's first byte in a row
    const int boff = (int)(t0 & 15);
    u8* sw = stage;
    u8* sx = stage + GE_BM * WROW;
    float* sd = (float*)(sx + NV * XROW);
    if (tid == 0) {
        tma_barrier_expect(bar, (p.aligned16 ? GE_BM * WROW : 0) + nvr * XROW);
        // A stage row of u32 from the tile's first 16-byte piece (the copy engine reads rows from
        // 16-byte aligned addresses), for the CTA's 64 rows of expert blockIdx.y.
        if (p.aligned16)
            tma_copy_3d(smem_addr(sw), blockIdx.z ? p.wmap_pair : p.wmap, (int)((t0 - boff) / 4), (int)row0,
                        (int)blockIdx.y, bar);
        for (int j = 0; j < nvr; j += 8)
            tma_copy_3d(smem_addr(sx) + j * XROW, p.xmap, (int)(kb0 * (QK_K / 4)), (int)(v0 + j), 0, bar);
    }
    if (!p.aligned16) {
        // The tile's bytes only, 2 at a time (every block size is even: 2-byte aligned).
        const int n2 = nbt * BB / 2;
        for (int i = tid; i < GE_BM * n2; i += GE_THREADS) {
            const int r = i / n2, c = i - r * n2;
            const i64 row = min64(row0 + r, p.n_rows - 1);
            ((u16*)(sw + r * WROW + boff))[c] = ((const u16*)(W + row * p.row_bytes + t0))[c];
        }
    }
    const float* xd = (const float*)p.xd;
    for (int i = tid; i < nvr * GE_KT; i += GE_THREADS) {
        const int v = i / GE_KT, b = i - v * GE_KT;
        if (b < nbt) {
            const i64 vec = min64(v0 + v, v_last);
            cp_async4(sd + b * NV + v, xd + vec * p.n_blocks + kb0 + b);
        }
    }
}

// The blocks of one staged K tile for the warp's 16 rows against the pass's first nt n8 tiles
// of vectors: acc[nj][i] is row 16 warp + g + 8 (i >> 1), vector 8 nj + 2 t + (i & 1).
// DF (decode first): the block's 8 items are decoded into registers before its n tiles run,
// so the `nj < nt` test comes once per n tile and block instead of once per item (and the
// B loads and mma of a tile issue back to back); else item by item.
template <int FMT, int NV, bool DF>
__device__ __forceinline__ void ge_tile_math(const u8* stage, const GemmExpertsParams& p, i64 kt, int nt,
                                             float (&acc)[NV / 8][4]) {
    constexpr int NT = NV / 8;
    constexpr int BB = GeFmt<FMT>::BB, WROW = GeFmt<FMT>::WROW, XROW = GeFmt<FMT>::XROW;
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int g = lane >> 2, t = lane & 3;
    const i64 kb0 = kt * GE_KT;
    const int nbt = (int)min64(GE_KT, p.n_blocks - kb0);
    const int boff = (int)((kb0 * BB) & 15);
    const u8* wrow[2];  // rows g and g + 8 of the warp's m tile
    wrow[0] = stage + (16 * warp + g) * WROW + boff;
    wrow[1] = wrow[0] + 8 * WROW;
    // Vector g of n tile 0, bytes 4t..: the B fragments' rows (+ 8 XROW per n tile).
    const u8* xs = stage + GE_BM * WROW + g * XROW + 4 * t;
    const float* sd = (const float*)(stage + GE_BM * WROW + NV * XROW);
    // IQ2_XXS: the lane's copy of the grid selectors, the PRMT selector that extracts byte t,
    // and the positive grid bytes in a register (PRMT's first source).
    const u8* grid_copy = FMT == GE_IQ2_XXS ? (const u8*)(ge_iq2_grid + lane % GE_IQ2_COPIES) : nullptr;
    const u32 byte_t = 0x4440u | (u32)t;
    const u32 pos = FMT == GE_IQ2_XXS ? *(volatile u32*)&ge_iq2_pos : 0;
#pragma unroll
    for (int b = 0; b < GE_KT; b++) {
        if (b >= nbt) break;
        const u8* blk[2] = {wrow[0] + b * BB, wrow[1] + b * BB};
        int isum[NT][4], msum[NT][4];
#pragma unroll
        for (int nj = 0; nj < NT; nj++)
#pragma unroll
            for (int i = 0; i < 4; i++) isum[nj][i] = msum[nj][i] = 0;
        // Item it's A fragments for rows g and g + 8 (and the K formats' min fragments, the
        // per-row integer factor of the item sum).
        auto decode = [&](int it, u32 (&a)[4], u32 (&am)[4], int (&scale)[2]) {
#pragma unroll
            for (int r = 0; r < 2; r++) {
                if constexpr (FMT == GE_IQ2_XXS) {
                    // a0 / a1 at blk + 2 + 8 it: the tile starts 4-byte aligned (GE_KT even:
                    // 132-byte steps) and the row stride is a multiple of 16, so the words are
                    // 2 bytes off a 4-byte boundary exactly for even blocks.
                    // K order: the lane's k positions 4t..4t+3 and 16+4t..16+4t+3 carry the
                    // item's group t (elements 8t..8t+7) here and in the B fragments, so one
                    // selector lookup gives both registers (the item sum is the same).
                    u32 a0, a1;
                    rd64_a2(blk[r] + 2 + 8 * it, (u32)((2 * b + 2) & 2), &a0, &a1);
                    scale[r] = 2 * (int)(a1 >> 28) + 1;
                    const u32 gi = prmt(a0, 0, byte_t);  // grid index: byte t of a0
                    const u32 gsel = *(const u32*)(grid_copy + 4 * GE_IQ2_COPIES * gi);
                    const u32 sel = gsel | ge_iq2_sign_bits(a1 >> (7 * t));
                    a[r] = prmt(pos, IQ2_NEG, sel);            // elements 8t..8t+3
                    a[2 + r] = prmt(pos, IQ2_NEG, sel >> 16);  // elements 8t+4..8t+7
                } else if constexpr (FMT == GE_Q2_K) {
                    // Elements 32 it + l: level (qs[32 h + l] >> 2 j) & 3, h = it / 4, j = it % 4;
                    // sub-blocks 2 it (l < 16) and 2 it + 1 (l >= 16).
                    const int h = it >> 2, j = it & 3;
                    const u32 sc2 = rd16(blk[r] + 2 * it);
                    const u32 sc_lo = sc2 & 15, sc_hi = (sc2 >> 8) & 15;
                    a[r] = ((rd32(blk[r] + 16 + 32 * h + 4 * t) >> (2 * j)) & 0x03030303u) * sc_lo;
                    a[2 + r] = ((rd32(blk[r] + 32 + 32 * h + 4 * t) >> (2 * j)) & 0x03030303u) * sc_hi;
                    am[r] = ((sc2 >> 4) & 15) * 0x01010101u;
                    am[2 + r] = ((sc2 >> 12) & 15) * 0x01010101u;
                } else {
                    // Elements 32 it + l: level (qs[32 c + l] >> 4 (it % 2)) & 15, c = it / 2.
                    const int c = it >> 1, sh = 4 * (it & 1);
                    int sc, m;
                    q4k_scale_min(blk[r] + 4, it, &sc, &m);
                    scale[r] = sc;
                    a[r] = (rd32(blk[r] + 16 + 32 * c + 4 * t) >> sh) & 0x0F0F0F0Fu;
                    a[2 + r] = (rd32(blk[r] + 32 + 32 * c + 4 * t) >> sh) & 0x0F0F0F0Fu;
                    am[r] = am[2 + r] = (u32)m * 0x01010101u;
                }
            }
        };
        // Item it against n tile nj.
        auto tile = [&](int it, int nj, const u32 (&a)[4], const u32 (&am)[4], const int (&scale)[2]) {
            // B rows in the A fragments' K order: elements 8t..8t+7 of the item (IQ2_XXS),
            // elements 4t..4t+3 and 16+4t..16+4t+3 (the K formats).
            u32 b0, b1;
            if constexpr (FMT == GE_IQ2_XXS) {
                const uint2 bb = *(const uint2*)(xs + nj * 8 * XROW + b * QK_K + 32 * it + 4 * t);
                b0 = bb.x;
                b1 = bb.y;
            } else {
                const u8* xb = xs + nj * 8 * XROW + b * QK_K + 32 * it;
                b0 = *(const u32*)xb;
                b1 = *(const u32*)(xb + 16);
            }
            if constexpr (FMT == GE_Q2_K) {
                ge_mma(a, b0, b1, isum[nj]);
                ge_mma(am, b0, b1, msum[nj]);
            } else {
                int d[4] = {0, 0, 0, 0};
                ge_mma(a, b0, b1, d);
#pragma unroll
                for (int i = 0; i < 4; i++) isum[nj][i] += scale[i >> 1] * d[i];
                if constexpr (FMT == GE_Q4_K) ge_mma(am, b0, b1, msum[nj]);
            }
        };
        if constexpr (DF) {
            // All 8 items decoded first: one n-tile test per block and group of n tiles instead
            // of per item. Each n tile's sums are dependency chains over the items: Q2_K's
            // through the mma's C (the running sum), IQ2_XXS's through the IMAD that adds each
            // item's scaled sum. A group of GE_NJ n tiles walks its items together, so that
            // GE_NJ independent chains are in flight instead of one waiting on its previous
            // link. The group's tiles past nt hold the vectors after the pass's (staged whole,
            // gemm_experts_tile) and are never stored.
            static_assert(NT % GE_NJ == 0, "whole groups of n tiles");
            u32 a[8][4], am[8][4];
            int scale[8][2];
#pragma unroll
            for (int it = 0; it < 8; it++) decode(it, a[it], am[it], scale[it]);
#pragma unroll
            for (int nj = 0; nj < NT; nj += GE_NJ) {
                if (nj >= nt) break;
#pragma unroll
                for (int it = 0; it < 8; it++)
#pragma unroll
                    for (int s = 0; s < GE_NJ; s++) tile(it, nj + s, a[it], am[it], scale[it]);
            }
        } else {
#pragma unroll
            for (int it = 0; it < 8; it++) {
                u32 a[4], am[4];  // the item's weights (A) and, for the K formats, its mins (A')
                int scale[2];     // integer factor of the item sum per row (IQ2_XXS, Q4_K)
                decode(it, a, am, scale);
#pragma unroll
                for (int nj = 0; nj < NT; nj++) {
                    if (nj >= nt) break;
                    tile(it, nj, a, am, scale);
                }
            }
        }
        // One f32 update per block and output, in the scalar reference's operation order.
        float dw[2], dm[2];
#pragma unroll
        for (int r = 0; r < 2; r++) {
            if constexpr (FMT == GE_IQ2_XXS) {
                dw[r] = f16_to_f32(rd16(blk[r]));
                dm[r] = 0.f;
            } else if constexpr (FMT == GE_Q2_K) {
                dw[r] = f16_to_f32(rd16(blk[r] + 80));
                dm[r] = f16_to_f32(rd16(blk[r] + 82));
            } else {
                dw[r] = f16_to_f32(rd16(blk[r]));
                dm[r] = f16_to_f32(rd16(blk[r] + 2));
            }
        }
#pragma unroll
        for (int nj = 0; nj < NT; nj++) {
            if (nj >= nt) break;
            const float2 dx2 = *(const float2*)(sd + b * NV + 8 * nj + 2 * t);
#pragma unroll
            for (int i = 0; i < 4; i++) {
                const float dx = (i & 1) ? dx2.y : dx2.x;
                const float fi = __int2float_rn(isum[nj][i]);
                if constexpr (FMT == GE_IQ2_XXS) {
                    acc[nj][i] = __fadd_rn(acc[nj][i], __fmul_rn(__fmul_rn(dw[i >> 1], dx), fi));
                } else {
                    const float d = __fmul_rn(dx, dw[i >> 1]), dmin = __fmul_rn(dx, dm[i >> 1]);
                    const float fm = __int2float_rn(msum[nj][i]);
                    acc[nj][i] = __fadd_rn(acc[nj][i], __fsub_rn(__fmul_rn(d, fi), __fmul_rn(dmin, fm)));
                }
            }
        }
    }
}

// NV vectors per pass. Decode first (see ge_tile_math) for IQ2_XXS and Q2_K; Q4_K's 8 items
// (weights, mins, scales: ~80 registers) would spill at three CTAs per SM.
template <int FMT, int NV>
__device__ __forceinline__ void gemm_experts_tile(const GemmExpertsParams& p) {
    constexpr int WROW = GeFmt<FMT>::WROW, NT = NV / 8;
    constexpr int STAGE = GE_BM * WROW + NV * GeFmt<FMT>::XROW + GE_KT * NV * 4;
    constexpr bool DF = FMT != GE_Q4_K;
    static_assert(NV % 8 == 0, "whole n8 tiles");
    static_assert(GE_KT % 2 == 0, "IQ2_XXS word alignment assumes 4-byte aligned tiles");
    static_assert(WROW % 32 == 16, "weight rows 16 mod 32 bytes apart: conflict-free fragments");
    // A tile starts boff = (GE_KT kt BB) & 15 bytes into its first 16-byte piece: 0 when
    // GE_KT BB is a multiple of 16, else at most 12 (tiles start 4-byte aligned). IQ2_XXS's
    // word reads may touch 2 bytes past the tile (rd64_a2's third word).
    constexpr int BOFF_MAX = (GE_KT * GeFmt<FMT>::BB) % 16 == 0 ? 0 : 12;
    constexpr int OVER_READ = FMT == GE_IQ2_XXS ? 4 : 0;
    static_assert(WROW >= ((BOFF_MAX + GE_KT * GeFmt<FMT>::BB + 15) / 16) * 16 + OVER_READ,
                  "a stage row holds the tile's 16-byte pieces and the IQ2_XXS over-read");
    static_assert((GE_KT * GeFmt<FMT>::BB) % 4 == 0, "tiles start 4-byte aligned");
    static_assert(STAGE % 128 == 0, "stages keep the 128-byte alignment of the copy engine's tiles");
    static_assert(WROW % 16 == 0 && WROW / 4 <= 256, "a stage row is one box row of u32");
    static_assert(GeFmt<FMT>::XROW >= GE_KT * QK_K && GeFmt<FMT>::XROW % 128 == (FMT == GE_IQ2_XXS ? 32 : 16),
                  "activation rows hold a K tile, spread over the banks for the B loads");
    extern __shared__ __align__(128) u8 ge_smem[];
    const u8* W = (const u8*)(blockIdx.z ? p.w_pair : p.w);
    float* Y = (float*)(blockIdx.z ? p.y_pair : p.y);
    const i64 row0 = (i64)blockIdx.x * GE_BM;
    const float nan = __int_as_float(0x7fc00000);

    // Group offsets come from the device and are not trusted: clamped to [0, n_vecs_total],
    // and a group that ends before it starts is empty.
    const int* groups = (const int*)p.groups;
    const i64 n = p.n_vecs_total;
    auto offset = [&](i64 e) {
        const i64 v = groups[e];
        return v < 0 ? (i64)0 : (v > n ? n : v);
    };
    if ((i64)blockIdx.y == p.n_experts) {
        // NaN rows (this CTA's row tile) for the vectors before the first group and from the
        // end of the last one on.
        const i64 head = offset(0), last = offset(p.n_experts), tail = last > head ? last : head;
        const i64 count = head + (n - tail);
        for (i64 i = threadIdx.x; i < count * GE_BM; i += GE_THREADS) {
            const i64 k = i / GE_BM, row = row0 + (i - k * GE_BM);
            const i64 v = k < head ? k : tail + (k - head);
            if (row < p.n_rows) Y[v * p.n_rows + row] = nan;
        }
        return;
    }
    const i64 v_begin = offset(blockIdx.y), e_end = offset((i64)blockIdx.y + 1);
    const i64 v_end = e_end > v_begin ? e_end : v_begin;
    if (v_end == v_begin) return;  // uniform in the CTA
    W += (i64)blockIdx.y * p.expert_stride;
    // The stages' barriers (after the two stages), and the parity of each one's next phase.
    const u32 bars = smem_addr(ge_smem + 2 * STAGE);
    u32 phases = 0;
    if (threadIdx.x == 0) {
        tma_barrier_init(bars);
        tma_barrier_init(bars + 8);
        tma_barrier_init_fence();
    }
    __syncthreads();


    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int g = lane >> 2, t = lane & 3;
    const i64 n_tiles = (p.n_blocks + GE_KT - 1) / GE_KT;
    for (i64 v0 = v_begin; v0 < v_end; v0 += NV) {
        const int nv = (int)min64(NV, v_end - v0), nt = (nv + 7) >> 3;
        // The decode-first formats walk whole groups of GE_NJ n tiles (ge_tile_math): all of
        // them are staged.
        const int nt_staged = DF ? (nt + GE_NJ - 1) / GE_NJ * GE_NJ : nt;
        float acc[NT][4];
#pragma unroll
        for (int nj = 0; nj < NT; nj++)
#pragma unroll
            for (int i = 0; i < 4; i++) acc[nj][i] = 0.f;
        // Both stages are free here: the previous pass ended with a barrier after its last
        // reads.
        ge_load_tile<FMT, NV>(ge_smem, bars, p, W, row0, v0, 8 * nt_staged, v_end - 1, 0);
        cp_async_commit();
        // The grid table is built once, while the first tile is in flight, and read after the
        // K loop's first barrier.
        if constexpr (FMT == GE_IQ2_XXS)
            if (v0 == v_begin) ge_iq2_grid_table(p.grid);
        for (i64 kt = 0; kt < n_tiles; kt++) {
            // Tile kt: this thread's scale copies, the copy engine's part; the barrier makes
            // them visible to every warp.
            cp_async_wait_all();
            {
                const u32 st = (u32)(kt & 1);
                tma_barrier_wait(bars + 8 * st, (phases >> st) & 1);
                phases ^= 1u << st;
            }
            __syncthreads();
            // Past that barrier every warp is done with tile kt - 1, so the next tile may go
            // into its stage now: one CTA barrier a K tile instead of a second after the math.
            if (kt + 1 < n_tiles) {
                ge_load_tile<FMT, NV>(ge_smem + ((kt + 1) & 1) * STAGE, bars + 8 * ((kt + 1) & 1), p, W, row0, v0,
                                      8 * nt_staged, v_end - 1, kt + 1);
                cp_async_commit();
            }
            ge_tile_math<FMT, NV, DF>(ge_smem + (kt & 1) * STAGE, p, kt, nt, acc);
        }
        // The next pass (or the grid table's readers: none after the last pass) reuses both
        // stages: every warp must be done with this pass's last tile first.
        __syncthreads();
#pragma unroll
        for (int nj = 0; nj < NT; nj++)
#pragma unroll
            for (int i = 0; i < 4; i++) {
                const i64 row = row0 + 16 * warp + g + 8 * (i >> 1);
                const int vi = 8 * nj + 2 * t + (i & 1);
                if (row < p.n_rows && vi < nv) {
                    const float out = FMT == GE_IQ2_XXS ? __fmul_rn(0.125f, acc[nj][i]) : acc[nj][i];
                    Y[(v0 + vi) * p.n_rows + row] = out;
                }
            }
    }
}

// 64 rows of one expert per CTA, 4 warps. Narrow kernels: passes of GE_NV vectors, two stages
// of 28928 (IQ2_XXS), 30464 (Q2_K) or 36608 (Q4_K) bytes and their 16 bytes of barriers (and
// IQ2_XXS's 16400 static bytes: grid table and ge_iq2_pos), three CTAs per SM. Wide kernels:
// passes of GE_NV_WIDE vectors, stages of 46592, 47616 or 53760 bytes, two CTAs per SM.
extern "C" __global__ void __launch_bounds__(128, 3) gemm_experts_iq2_xxs(const __grid_constant__ GemmExpertsParams p) {
    PDL_ENTRY();
    gemm_experts_tile<GE_IQ2_XXS, GE_NV>(p);
}
extern "C" __global__ void __launch_bounds__(128, 2) gemm_experts_iq2_xxs_wide(const __grid_constant__ GemmExpertsParams p) {
    PDL_ENTRY();
    gemm_experts_tile<GE_IQ2_XXS, GE_NV_WIDE>(p);
}
extern "C" __global__ void __launch_bounds__(128, 3) gemm_experts_q2_k(const __grid_constant__ GemmExpertsParams p) {
    PDL_ENTRY();
    gemm_experts_tile<GE_Q2_K, GE_NV>(p);
}
extern "C" __global__ void __launch_bounds__(128, 2) gemm_experts_q2_k_wide(const __grid_constant__ GemmExpertsParams p) {
    PDL_ENTRY();
    gemm_experts_tile<GE_Q2_K, GE_NV_WIDE>(p);
}
extern "C" __global__ void __launch_bounds__(128, 3) gemm_experts_q4_k(const __grid_constant__ GemmExpertsParams p) {
    PDL_ENTRY();
    gemm_experts_tile<GE_Q4_K, GE_NV>(p);
}
extern "C" __global__ void __launch_bounds__(128, 2) gemm_experts_q4_k_wide(const __grid_constant__ GemmExpertsParams p) {
    PDL_ENTRY();
    gemm_experts_tile<GE_Q4_K, GE_NV_WIDE>(p);
}
