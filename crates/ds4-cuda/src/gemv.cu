// Matrix-vector products y = W x for ggml weight formats, the bandwidth-bound core of decode.
//
// Layout: W has n_rows rows of k elements, each row row_bytes long (ggml blocks, row-major);
// x holds NB vectors of k values, y receives NB vectors of n_rows values.
//
// Work split (details above each kernel): rows are taken in groups of R; p.split warps share
// a group, each taking part of every row (16-byte pieces for F16/F32, staged chunks of whole
// blocks for the quantized formats). Inside a warp, each lane applies the activation values it
// loaded once to all R rows, which keeps L1 traffic per weight byte low. A row's summation
// order depends on p.split only, which gemv.rs derives from the matrix shape alone.
//
// Activations come either as f32 (FMT x f32) or pre-quantized (Q8_0 blocks of 32 for Q8_0
// weights, Q8_K blocks of 256 for the k/iq formats) as an int8 array plus one f32 scale per
// block; the quantized variants use dp4a and reproduce ggml's integer dot products exactly.
//
// Pairs: with gridDim.z == 2, CTAs with blockIdx.z == 1 compute a second matrix (w_pair, same
// shape and format, same activations) into y_pair: two projections of one input per launch.
//
// Experts: with ids != 0, blockIdx.y is the expert slot; the weight base moves to expert
// ids[slot] (expert_stride bytes apart) without a host round trip, x vector = slot*x_slot_vecs+b
// and y vector = slot*y_slot_vecs+b. An id outside [0, n_experts) writes NaN rows.
//
// Grouped experts (prefill MoE, the *_grouped kernels): with groups != 0, x holds n_vecs_total
// vectors sorted by expert and blockIdx.y = e runs expert e against its vectors
// [groups[e], groups[e+1]) (absolute indices into x and y), staging its rows once for all of
// them; see gemv_quant_grouped.

#define FMT_F32 0
#define FMT_F16 1
#define FMT_Q8_0 2
#define FMT_Q2_K 3
#define FMT_Q4_K 4
#define FMT_IQ2_XXS 5

#define GEMV_MAX_WARPS 8

// Must match the #[repr(C)] GemvParams in gemv.rs: 8-byte fields only, so no padding.
struct GemvParams {
    u64 w;      // weights (first expert when ids != 0)
    u64 x;      // f32 activations, or int8 quantized activations
    u64 xd;     // f32 scale per activation block (quantized activations only)
    u64 y;      // f32 output
    u64 ids;    // i32 expert id per slot, or 0: slot s is expert s (one slot: a plain matrix)
    u64 grid;   // IQ2_XXS grid: 256 x u64
    i64 row_bytes;
    i64 expert_stride;
    i64 n_experts;
    i64 n_rows;
    i64 k;
    i64 x_slot_vecs;
    i64 y_slot_vecs;
    i64 aligned16;  // weights and row_bytes are multiples of 16: 16-byte loads allowed
    i64 split;      // warps per row group (1..8; divides the CTA's warps)
    i64 n_batches;  // quantized kernels: batches of NB vectors per launch (> 1: split >= chunks)
    u64 w_pair;     // blockIdx.z == 1: a second matrix of the same shape and format ...
    u64 y_pair;     // ... and its output (gate and up projections in one launch)
    u64 groups;     // grouped experts: i32 vector offsets per expert (n_experts + 1), or 0
    i64 n_vecs_total;  // grouped experts: vectors in x and y
};

// The matrix and output of this CTA (blockIdx.z picks one of a pair).
__device__ __forceinline__ const u8* gemv_w(const GemvParams& p) { return (const u8*)(blockIdx.z ? p.w_pair : p.w); }
__device__ __forceinline__ float* gemv_y(const GemvParams& p) { return (float*)(blockIdx.z ? p.y_pair : p.y); }

// Per format: block bytes, block elements, blocks per chunk (chunk bytes % 16 == 0),
// 32-element items per block, parts (scale groups) per item.
template <int FMT> struct Fmt;
template <> struct Fmt<FMT_Q8_0> { enum { BB = 34, BE = 32, CB = 32, ITEMS = 1, QB = 32 }; };
template <> struct Fmt<FMT_Q2_K> { enum { BB = 84, BE = 256, CB = 8, ITEMS = 8, QB = 256 }; };
template <> struct Fmt<FMT_Q4_K> { enum { BB = 144, BE = 256, CB = 8, ITEMS = 8, QB = 256 }; };
template <> struct Fmt<FMT_IQ2_XXS> { enum { BB = 66, BE = 256, CB = 16, ITEMS = 8, QB = 256 }; };

// The 16 bytes at p (2-byte aligned, mis = p & 2) of a shared-memory stage, as 4 words; like
// rd64_a2, four or five 32-bit loads instead of eight 16-bit loads.
__device__ __forceinline__ void rd128_a2(const u8* p, u32 mis, u32 (&w)[4]) {
    const u32* q = (const u32*)(p - mis);
    const u32 sh = mis * 8;
    u32 v[5];
#pragma unroll
    for (int j = 0; j < 4; j++) v[j] = q[j];
    v[4] = sh ? q[4] : v[3];
#pragma unroll
    for (int j = 0; j < 4; j++) w[j] = __funnelshift_r(v[j], v[j + 1], sh);
}

// ---- IQ2_XXS decoding: common.cuh's PRMT encoding in a table layout of this module ----
// At the start of the dynamic shared memory (the stages follow): the spread sign bits per 7-bit
// sign index (128 words), then the PRMT selector word per grid index (256 words). Each lookup's
// byte offset is a shift and a mask of the quant word, the table's base a constant.
#define IQ2_TAB_GRID 128  // word offset of the grid selectors
#define IQ2_TAB_BYTES (384 * 4)
// Table bytes the kernels of format FMT keep before their stages.
template <int FMT> struct TabBytes { static constexpr int V = FMT == FMT_IQ2_XXS ? IQ2_TAB_BYTES : 0; };
// After the tables, each warp's two stage barriers (mbarriers, 8 bytes each, for the copy
// engine's bulk copies: gemv_issue), then the stages (gemv.rs sizes the memory the same way).
#define GEMV_BAR_BYTES (GEMV_MAX_WARPS * 16)
template <int FMT> struct StageBase { static constexpr int V = TabBytes<FMT>::V + GEMV_BAR_BYTES; };
// The shared-window address of warp w's barrier of stage buffer b (0 or 1).
template <int FMT>
__device__ __forceinline__ u32 gemv_bar(int w, int b) {
    extern __shared__ __align__(16) u8 gemv_smem[];
    return smem_addr(gemv_smem) + TabBytes<FMT>::V + 16 * w + 8 * b;
}

// The selector word of group l (0..3) of an item (a0: its 4 grid indices, a1: its 4 7-bit
// sign indices and scale): prmt(IQ2_POS, IQ2_NEG, sel) gives weights 0-3 of the group,
// prmt(IQ2_POS, IQ2_NEG, sel >> 16) weights 4-7.
__device__ __forceinline__ u32 gemv_iq2_sel(const u32* tab, u32 a0, u32 a1, int l) {
    const int ss = 7 * l - 2, gs = 8 * l - 2;
    const u32 so = (ss >= 0 ? a1 >> ss : a1 << -ss) & (127u << 2);
    const u32 go = (gs >= 0 ? a0 >> gs : a0 << -gs) & (255u << 2);
    const u8* tb = (const u8*)tab;
    return *(const u32*)(tb + so) | *(const u32*)(tb + 4 * IQ2_TAB_GRID + go);
}

// ---- f32 activations: the 4 raw quant values of group i (elements 4i..4i+3 of an item) ----
template <int FMT>
__device__ __forceinline__ void item_q4(const u8* blk, int it, int i, u32 mis, const u32* tab, float q[4]) {
    if constexpr (FMT == FMT_Q8_0) {
        u32 w = rd32_a2(blk + 2 + 4 * i);
#pragma unroll
        for (int j = 0; j < 4; j++) q[j] = (float)sbyte(w, j);
    } else if constexpr (FMT == FMT_Q2_K) {
        const int h = it >> 2, s = it & 3;
        u32 w = rd32(blk + 16 + 32 * h + 4 * i) >> (2 * s);
#pragma unroll
        for (int j = 0; j < 4; j++) q[j] = (float)((w >> (8 * j)) & 3);
    } else if constexpr (FMT == FMT_Q4_K) {
        u32 w = rd32(blk + 16 + 32 * (it >> 1) + 4 * i) >> (4 * (it & 1));
#pragma unroll
        for (int j = 0; j < 4; j++) q[j] = (float)((w >> (8 * j)) & 15);
    } else {  // IQ2_XXS
        u32 a0, a1;
        rd64_a2(blk + 2 + 8 * it, mis, &a0, &a1);
        const u32 sel = gemv_iq2_sel(tab, a0, a1, i >> 1);
        const u32 w = prmt(IQ2_POS, IQ2_NEG, (i & 1) ? sel >> 16 : sel);
#pragma unroll
        for (int j = 0; j < 4; j++) q[j] = (float)sbyte(w, j);
    }
}

// Scale a and offset b of part p of an item: value = a*q + b.
template <int FMT>
__device__ __forceinline__ void item_scale(const u8* blk, int it, int p, float* a, float* b) {
    if constexpr (FMT == FMT_Q8_0) {
        *a = f16_to_f32(rd16(blk));
        *b = 0.f;
    } else if constexpr (FMT == FMT_Q2_K) {
        const int sc = blk[2 * it + p];  // 16 scales: index 8h + 2s + p = 2*it + p
        *a = f16_to_f32(rd16(blk + 80)) * (float)(sc & 15);
        *b = -f16_to_f32(rd16(blk + 82)) * (float)(sc >> 4);
    } else if constexpr (FMT == FMT_Q4_K) {
        int sc, m;
        q4k_scale_min(blk + 4, it, &sc, &m);
        *a = f16_to_f32(rd16(blk)) * (float)sc;
        *b = -f16_to_f32(rd16(blk + 2)) * (float)m;
    } else {
        const u32 a1 = rd32_a2(blk + 6 + 8 * it);
        *a = f16_to_f32(rd16(blk)) * (0.5f + (float)(a1 >> 28)) * 0.25f;
        *b = 0.f;
    }
}

// One item (32 elements at x of every vector, vectors xstride apart) against R staged rows
// (row r's block at blk0 + r * CHUNK), f32 activations.
template <int FMT, int R, int NB>
__device__ __forceinline__ void item_f32x(const u8* blk0, int it, const float* x, i64 xstride, u32 mis,
                                          const u32* tab, float (&acc)[R][NB]) {
    constexpr int CHUNK = Fmt<FMT>::CB * Fmt<FMT>::BB;
    constexpr int NP = (FMT == FMT_Q2_K) ? 2 : 1;  // Q2_K has a scale per 16 elements
    constexpr int GPP = 8 / NP;                       // groups of 4 per part
    constexpr bool HAS_MIN = (FMT == FMT_Q2_K || FMT == FMT_Q4_K);
#pragma unroll
    for (int p = 0; p < NP; p++) {
        float sqx[R][NB], sx[NB];
#pragma unroll
        for (int v = 0; v < NB; v++) {
            sx[v] = 0.f;
#pragma unroll
            for (int r = 0; r < R; r++) sqx[r][v] = 0.f;
        }
#pragma unroll
        for (int i = p * GPP; i < (p + 1) * GPP; i++) {
            float4 xv[NB];
#pragma unroll
            for (int v = 0; v < NB; v++) {
                xv[v] = *(const float4*)(x + v * xstride + 4 * i);
                if (HAS_MIN) sx[v] += (xv[v].x + xv[v].y) + (xv[v].z + xv[v].w);
            }
#pragma unroll
            for (int r = 0; r < R; r++) {
                float q[4];
                item_q4<FMT>(blk0 + r * CHUNK, it, i, mis, tab, q);
#pragma unroll
                for (int v = 0; v < NB; v++)
                    sqx[r][v] += q[0] * xv[v].x + q[1] * xv[v].y + q[2] * xv[v].z + q[3] * xv[v].w;
            }
        }
#pragma unroll
        for (int r = 0; r < R; r++) {
            float a, b;
            item_scale<FMT>(blk0 + r * CHUNK, it, p, &a, &b);
#pragma unroll
            for (int v = 0; v < NB; v++) acc[r][v] += a * sqx[r][v] + (HAS_MIN ? b * sx[v] : 0.f);
        }
    }
}

// item_q8x for IQ2_XXS: the same integer sums and float expression, fewer instructions. Each
// row's two quant words are read once (not once per half), the four groups' eight dp4a chain
// into one sum (integer: any order gives the same value), and IQ2_POS comes in `pos` (a
// register the caller made opaque: as an immediate, ptxas rebuilt it before every PRMT).
template <int R, int NB>
__device__ __forceinline__ void item_iq2_q8x(const u8* blk0, int it, const i8* xq, i64 xstride, const float* xd,
                                             i64 dstride, u32 mis, u32 pos, const u32* tab, float (&acc)[R][NB]) {
    constexpr int CHUNK = Fmt<FMT_IQ2_XXS>::CB * Fmt<FMT_IQ2_XXS>::BB;
    u32 a0[R], a1[R];
    int isum[R][NB];
#pragma unroll
    for (int r = 0; r < R; r++) {
        rd64_a2(blk0 + r * CHUNK + 2 + 8 * it, mis, &a0[r], &a1[r]);
#pragma unroll
        for (int v = 0; v < NB; v++) isum[r][v] = 0;
    }
#pragma unroll
    for (int h = 0; h < 2; h++) {  // 16-element halves: groups 2h, 2h + 1
        int4 xw[NB];
#pragma unroll
        for (int v = 0; v < NB; v++) xw[v] = *(const int4*)(xq + v * xstride + 16 * h);
#pragma unroll
        for (int r = 0; r < R; r++) {
            const u32 s0 = gemv_iq2_sel(tab, a0[r], a1[r], 2 * h), s1 = gemv_iq2_sel(tab, a0[r], a1[r], 2 * h + 1);
            const int w0 = (int)prmt(pos, IQ2_NEG, s0), w1 = (int)prmt(pos, IQ2_NEG, s0 >> 16);
            const int w2 = (int)prmt(pos, IQ2_NEG, s1), w3 = (int)prmt(pos, IQ2_NEG, s1 >> 16);
#pragma unroll
            for (int v = 0; v < NB; v++) {
                int s = dp4a(w0, xw[v].x, isum[r][v]);
                s = dp4a(w1, xw[v].y, s);
                s = dp4a(w2, xw[v].z, s);
                isum[r][v] = dp4a(w3, xw[v].w, s);
            }
        }
    }
#pragma unroll
    for (int r = 0; r < R; r++) {
        const int ls = 2 * (int)(a1[r] >> 28) + 1;
        const float d = f16_to_f32(rd16(blk0 + r * CHUNK));
#pragma unroll
        for (int v = 0; v < NB; v++) {
            const float dx = xd[v * dstride];
            acc[r][v] += 0.125f * (dx * d) * (float)(ls * isum[r][v]);
        }
    }
}

// One item against R staged rows, int8 activations (Q8_0 / Q8_K), dp4a; mirrors ggml's
// vec_dot_{q8_0_q8_0, q2_K_q8_K, q4_K_q8_K} integer sums (IQ2_XXS: item_iq2_q8x). xq: the
// item's 32 values of vector 0 (vectors xstride apart); xd: its block scale (vectors dstride
// apart).
template <int FMT, int R, int NB>
__device__ __forceinline__ void item_q8x(const u8* blk0, int it, const i8* xq, i64 xstride, const float* xd,
                                         i64 dstride, u32 mis, float (&acc)[R][NB]) {
    static_assert(FMT != FMT_IQ2_XXS, "IQ2_XXS items go through item_iq2_q8x");
    constexpr int CHUNK = Fmt<FMT>::CB * Fmt<FMT>::BB;
    int isum[R][NB], imin[R][NB];
    int bsum[NB][2];
#pragma unroll
    for (int v = 0; v < NB; v++) {
        bsum[v][0] = bsum[v][1] = 0;
#pragma unroll
        for (int r = 0; r < R; r++) isum[r][v] = imin[r][v] = 0;
    }
#pragma unroll
    for (int h = 0; h < 2; h++) {  // 16-element halves
        int4 xw[NB];
#pragma unroll
        for (int v = 0; v < NB; v++) {
            xw[v] = *(const int4*)(xq + v * xstride + 16 * h);
            if (FMT == FMT_Q2_K || FMT == FMT_Q4_K) {
                int s = dp4a(0x01010101, xw[v].x, 0);
                s = dp4a(0x01010101, xw[v].y, s);
                s = dp4a(0x01010101, xw[v].z, s);
                bsum[v][h] = dp4a(0x01010101, xw[v].w, s);
            }
        }
#pragma unroll
        for (int r = 0; r < R; r++) {
            const u8* blk = blk0 + r * CHUNK;
            int w[4];
            if constexpr (FMT == FMT_Q8_0) {
                u32 q[4];
                rd128_a2(blk + 2 + 16 * h, mis, q);
#pragma unroll
                for (int j = 0; j < 4; j++) w[j] = (int)q[j];
            } else if constexpr (FMT == FMT_Q2_K) {
                const int hh = it >> 2, s = it & 3;
#pragma unroll
                for (int j = 0; j < 4; j++)
                    w[j] = (int)((rd32(blk + 16 + 32 * hh + 16 * h + 4 * j) >> (2 * s)) & 0x03030303u);
            } else if constexpr (FMT == FMT_Q4_K) {
#pragma unroll
                for (int j = 0; j < 4; j++)
                    w[j] = (int)((rd32(blk + 16 + 32 * (it >> 1) + 16 * h + 4 * j) >> (4 * (it & 1))) &
                                 0x0F0F0F0Fu);
            }
#pragma unroll
            for (int v = 0; v < NB; v++) {
                int s = dp4a(w[0], xw[v].x, 0);
                s = dp4a(w[1], xw[v].y, s);
                s = dp4a(w[2], xw[v].z, s);
                s = dp4a(w[3], xw[v].w, s);
                if constexpr (FMT == FMT_Q2_K) {
                    const int sc = blk[2 * it + h];
                    isum[r][v] += (sc & 15) * s;
                    imin[r][v] += (sc >> 4) * bsum[v][h];
                } else {
                    isum[r][v] += s;
                }
            }
        }
    }
#pragma unroll
    for (int r = 0; r < R; r++) {
        const u8* blk = blk0 + r * CHUNK;
#pragma unroll
        for (int v = 0; v < NB; v++) {
            const float dx = xd[v * dstride];
            if constexpr (FMT == FMT_Q8_0) {
                acc[r][v] += (float)isum[r][v] * (f16_to_f32(rd16(blk)) * dx);
            } else if constexpr (FMT == FMT_Q2_K) {
                acc[r][v] += (dx * f16_to_f32(rd16(blk + 80))) * (float)isum[r][v] -
                             (dx * f16_to_f32(rd16(blk + 82))) * (float)imin[r][v];
            } else if constexpr (FMT == FMT_Q4_K) {
                int sc, m;
                q4k_scale_min(blk + 4, it, &sc, &m);
                acc[r][v] += (dx * f16_to_f32(rd16(blk))) * (float)(sc * isum[r][v]) -
                             (dx * f16_to_f32(rd16(blk + 2))) * (float)(m * (bsum[v][0] + bsum[v][1]));
            }
        }
    }
}

// Resolves the expert of this CTA's slot; false (after writing NaN rows for all nb x n_batches
// vectors of the launch) for a bad id.
__device__ __forceinline__ bool expert_base(const GemvParams& p, int nb, const u8** W) {
    *W = gemv_w(p);
    if (p.ids == 0) {  // slot s is expert s (one slot for a plain matrix)
        *W += (i64)blockIdx.y * p.expert_stride;
        return true;
    }
    const int e = ((const int*)p.ids)[blockIdx.y];
    if (e >= 0 && e < p.n_experts) {
        *W += (i64)e * p.expert_stride;
        return true;
    }
    float* y = gemv_y(p);
    for (i64 row = (i64)blockIdx.x * blockDim.x + threadIdx.x; row < p.n_rows; row += (i64)gridDim.x * blockDim.x)
        for (i64 v = 0; v < nb * p.n_batches; v++)
            y[((i64)blockIdx.y * p.y_slot_vecs + v) * p.n_rows + row] = __int_as_float(0x7fc00000);
    return false;
}

// Writes the R x NB sums (vectors v0..) of a row group owned by `ws` consecutive warps: each warp reduces its
// lanes (warp_sum), then (ws > 1) the first warp of the group adds the warps' partials in warp
// order. Every thread of the CTA must call it the same number of times (it may synchronize).
template <int R, int NB>
__device__ __forceinline__ void group_store(const GemvParams& p, i64 row0, int ws, float (&acc)[R][NB], float* red,
                                            i64 v0) {
    float* y = gemv_y(p);
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const i64 ybase = (i64)blockIdx.y * p.y_slot_vecs + v0;
#pragma unroll
    for (int r = 0; r < R; r++)
#pragma unroll
        for (int v = 0; v < NB; v++) {
            const float s = warp_sum(acc[r][v]);
            if (ws == 1) {
                if (lane == 0 && row0 + r < p.n_rows) y[(ybase + v) * p.n_rows + row0 + r] = s;
            } else if (lane == 0) {
                red[(warp * R + r) * NB + v] = s;
            }
        }
    if (ws == 1) return;
    __syncthreads();
    if (warp % ws == 0) {
        for (int i = lane; i < R * NB; i += 32) {
            const int r = i / NB, v = i % NB;
            float s = red[warp * R * NB + i];
            for (int w = 1; w < ws; w++) s += red[(warp + w) * R * NB + i];
            if (row0 + r < p.n_rows) y[(ybase + v) * p.n_rows + row0 + r] = s;
        }
    }
    __syncthreads();
}


// Starts copying chunk c of rows r0 .. r0 + R - 1 of W (rows past n_rows: r0 again) into
// stage buffer b (buf) of the warp: lane 0 announces the bytes on the buffer's barrier and
// issues one bulk copy per row to the copy engine (cp.async.bulk), which the buffer's next
// land waits for. 16-byte aligned rows only (chunks are 16-byte multiples). One instruction per
// row instead of a 16-byte cp.async per lane and piece: those took ~400 of the ~1 170
// instructions of a routed-expert IQ2_XXS warp (ncu source view, docs/speed-log.md session 29).
// The lines are marked evict-first in L2 (l2_evict_first_policy): decode +0.9 % on the full
// q2 model (H200), +1.3-1.9 % on the aliased one (H100), every output bit the same
// (docs/speed-log.md, session 17). The warp's lanes are done reading buf (a __syncwarp since).
template <int FMT, int R>
__device__ __forceinline__ void gemv_issue(const GemvParams& p, const u8* W, i64 r0, i64 c, u8* buf, int b, int lane) {
    constexpr int CHUNK = Fmt<FMT>::CB * Fmt<FMT>::BB;
    if (lane != 0) return;
    const u32 bytes = (u32)min64((i64)CHUNK, p.row_bytes - c * CHUNK);
    const u32 bar = gemv_bar<FMT>(threadIdx.x >> 5, b);
    const u64 pol = l2_evict_first_policy();
    tma_barrier_expect(bar, R * bytes);
#pragma unroll
    for (int r = 0; r < R; r++) {
        const u8* src = W + (r0 + r < p.n_rows ? r0 + r : r0) * p.row_bytes + c * CHUNK;
        bulk_copy_stream(smem_addr(buf + r * CHUNK), src, bytes, bar, pol);
    }
}

// Waits until stage buffer b's copy (gemv_issue) has landed; phases: the parity each buffer's
// barrier completes next (bit b), flipped here.
template <int FMT>
__device__ __forceinline__ void gemv_wait(int b, u32& phases) {
    tma_barrier_wait(gemv_bar<FMT>(threadIdx.x >> 5, b), (phases >> b) & 1);
    phases ^= 1u << b;
}

// The warp's first step of gemv_quant / gemv_quant_grouped (the first chunk wg of its first row
// group) copied into its first stage buffer (aligned rows; the others are copied when their
// step starts).
template <int FMT, int R>
__device__ __forceinline__ void gemv_issue_first(const GemvParams& p, const u8* W) {
    if (!p.aligned16) return;
    typedef Fmt<FMT> F;
    extern __shared__ __align__(16) u8 gemv_smem[];
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int ws = (int)p.split, wg = warp % ws;
    const i64 nchunks = (p.k / F::BE + F::CB - 1) / F::CB;
    const i64 row0 = (i64)blockIdx.x * (i64)(blockDim.x / (32 * ws)) * R + (i64)(warp / ws) * R;
    if (row0 < p.n_rows && wg < nchunks)
        gemv_issue<FMT, R>(p, W, row0, wg, gemv_smem + StageBase<FMT>::V + warp * 2 * R * F::CB * F::BB, 0, lane);
}

// What a gemv kernel does before its PDL wait (PDL_ENTRY_AFTER), while the previous kernel
// may still run: nothing in it depends on that kernel.
//  - A dense matrix's (no expert id to wait for; R > 0: gemv_quant; matrices are model
//    weights, uploaded before any kernel runs and never written by one) first weight chunk per
//    warp is copied into shared memory, so that it has landed when the wait returns instead of
//    the copy starting then (a decode step runs ~300 such GEMVs one after another).
//  - IQ2_XXS: the loads of the codebook entries of this thread's table words (the codebook is
//    uploaded once and never written by a kernel). They are only stored, decoded, by
//    gemv_tables after the weight copies are issued, so that a CTA that does not wait (the
//    previous kernel is done) does not wait on these loads either before it reads its expert
//    id and issues its copies.
#define IQ2_PRE 2  // grid entries loaded per thread before the wait (all of them from 128 threads)
struct GemvPre {
    u64 g[IQ2_PRE];  // grid entries threadIdx.x + j * blockDim.x (those below 256)
    bool staged;     // the first chunk is being copied (gemv_issue_first)
};

template <int FMT, int R>
__device__ __forceinline__ GemvPre gemv_prologue(const GemvParams& p) {
    // The warp's two stage barriers, once per kernel, before any copy (aligned rows only).
    if (p.aligned16) {
        if ((threadIdx.x & 31) == 0) {
            tma_barrier_init(gemv_bar<FMT>(threadIdx.x >> 5, 0));
            tma_barrier_init(gemv_bar<FMT>(threadIdx.x >> 5, 1));
            tma_barrier_init_fence();
        }
        __syncwarp();
    }
    GemvPre pre;
#pragma unroll
    for (int j = 0; j < IQ2_PRE; j++) {
        const int i = threadIdx.x + j * blockDim.x;
        pre.g[j] = FMT == FMT_IQ2_XXS && i < 256 ? ((const u64*)p.grid)[i] : 0;
    }
    pre.staged = false;
    if constexpr (R > 0) {
        if (p.ids == 0) {
            gemv_issue_first<FMT, R>(p, gemv_w(p) + (i64)blockIdx.y * p.expert_stride);
            pre.staged = true;
        }
    }
    return pre;
}

// Builds the IQ2_XXS tables at the start of the dynamic shared memory from the prologue's
// entries (and loads the rest of the codebook when the CTA has fewer than 128 threads); a
// no-op for the other formats. Every thread of the CTA calls it (it synchronizes).
template <int FMT>
__device__ __forceinline__ void gemv_tables(const GemvParams& p, const GemvPre pre) {
    if constexpr (FMT == FMT_IQ2_XXS) {
        extern __shared__ __align__(16) u8 gemv_smem[];
        u32* const tab = (u32*)gemv_smem;
        for (int i = threadIdx.x; i < IQ2_TAB_GRID; i += blockDim.x) tab[i] = sign_nibbles8(iq2_signs(i));
#pragma unroll
        for (int j = 0; j < IQ2_PRE; j++) {
            const int i = threadIdx.x + j * blockDim.x;
            if (i < 256) tab[IQ2_TAB_GRID + i] = iq2_codes4((u32)pre.g[j]) | (iq2_codes4((u32)(pre.g[j] >> 32)) << 16);
        }
        for (int i = threadIdx.x + IQ2_PRE * blockDim.x; i < 256; i += blockDim.x) {
            const u64 g = ((const u64*)p.grid)[i];
            tab[IQ2_TAB_GRID + i] = iq2_codes4((u32)g) | (iq2_codes4((u32)(g >> 32)) << 16);
        }
        __syncthreads();
    }
}

// The items of staged chunk c (R rows at `cur`, CHUNK bytes apart) against activation vectors
// xv .. xv+NB-1: lane l takes item l % ITEMS of the chunk's blocks l / ITEMS, + STEP, ...
// (nblocks: blocks per row; dstride: activation scales per vector.)
template <int FMT, int R, int NB, bool QX>
__device__ __forceinline__ void chunk_dot(const GemvParams& p, const u8* cur, i64 c, i64 xv, i64 nblocks,
                                          i64 dstride, int lane, float (&acc)[R][NB]) {
    extern __shared__ __align__(16) u8 gemv_smem[];
    const u32* const tab = (const u32*)gemv_smem;  // IQ2_XXS tables (gemv_tables)
    typedef Fmt<FMT> F;
    constexpr int STEP = 32 / F::ITEMS;  // blocks a warp advances per pass over its lanes
    const int nbv = (int)min64((i64)F::CB, nblocks - c * F::CB);
    const int it = lane % F::ITEMS;
    int lb = lane / F::ITEMS;       // block of the lane's first item
    const i64 b0 = c * F::CB + lb;  // its index in the row
    const u8* sb = cur + lb * F::BB;
    // Q8_0 / IQ2_XXS: alignment of the lane's quants in the stage (the same for every item
    // of the lane: it advances by STEP blocks of 34 or 66 bytes, 4-byte multiples, and
    // chunks are 16-byte multiples).
    const u32 mis = (u32)(lb * F::BB + 2 + 8 * it) & 2;
    if constexpr (QX) {
        const i8* xq = (const i8*)p.x + xv * p.k + b0 * F::BE + 32 * it;
        const float* xd = (const float*)p.xd + xv * dstride + b0 * (F::BE / F::QB);
        if constexpr (FMT == FMT_IQ2_XXS) {
            // IQ2_POS as a value ptxas cannot rebuild from an immediate: n_rows >= 1, so its
            // sign bit is 0, but the compiler cannot know that.
            const u32 pos = IQ2_POS | (u32)((u64)p.n_rows >> 63);
            for (; lb < nbv; lb += STEP, sb += STEP * F::BB, xq += STEP * F::BE, xd += STEP)
                item_iq2_q8x<R, NB>(sb, it, xq, p.k, xd, dstride, mis, pos, tab, acc);
        } else {
            for (; lb < nbv; lb += STEP, sb += STEP * F::BB, xq += STEP * F::BE, xd += STEP * (F::BE / F::QB))
                item_q8x<FMT, R, NB>(sb, it, xq, p.k, xd, dstride, mis, acc);
        }
    } else {
        const float* x = (const float*)p.x + xv * p.k + b0 * F::BE + 32 * it;
        for (; lb < nbv; lb += STEP, sb += STEP * F::BB, x += STEP * F::BE)
            item_f32x<FMT, R, NB>(sb, it, x, p.k, mis, tab, acc);
    }
}

// Block-quantized weights, staged through shared memory.
//
// Work split: a row group (R rows) belongs to p.split warps (gemv.rs picks it from the matrix
// shape alone); warp wg of the group takes chunks wg, wg+ws, ... of the group's rows. Each warp
// has two stage buffers of R chunks: while it computes on one, the next step's chunk (the
// next chunk of its rows, or the first one of its next row group) is copied into the other
// by the copy engine (gemv_issue), so no registers hold loads in flight. Rows that are not
// 16-byte aligned are copied with 2-byte loads when their step starts (same stage contents,
// same bits).
template <int FMT, int R, int NB, bool QX>
__device__ __forceinline__ void gemv_quant(const GemvParams& p, const GemvPre pre) {
    typedef Fmt<FMT> F;
    constexpr int CHUNK = F::CB * F::BB;
    // Dynamic shared memory: the IQ2_XXS tables (TabBytes), the stage barriers, then warps x 2 x
    // R x CHUNK bytes (gemv.rs sizes it with the same numbers).
    extern __shared__ __align__(16) u8 gemv_smem[];
    u8* const stage_dyn = gemv_smem + StageBase<FMT>::V;
    __shared__ float red[GEMV_MAX_WARPS * R * NB];
    const u8* W;
    if (!expert_base(p, NB, &W)) return;

    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int ws = (int)p.split, wg = warp % ws;  // warps per row group, this warp's rank in it
    u8* const stage = stage_dyn + warp * 2 * R * CHUNK;
    const i64 nblocks = p.k / F::BE;
    const i64 nchunks = (nblocks + F::CB - 1) / F::CB;
    const i64 xv0 = (i64)blockIdx.y * p.x_slot_vecs;  // first activation vector of this slot
    const i64 dstride = p.k / F::QB;                  // activation scales per vector

    // Row blocks of the CTA (groups x R rows) in grid-stride order, the same count for every
    // warp (group_store synchronizes). A warp's (block, chunk) steps alternate buffers.
    const i64 rows_per_cta = (i64)(blockDim.x / (32 * ws)) * R;
    const i64 block_stride = (i64)gridDim.x * rows_per_cta;
    const i64 group_row = (i64)(warp / ws) * R;
    auto row_ptr = [&](i64 r0, int r) { return W + (r0 + r < p.n_rows ? r0 + r : r0) * p.row_bytes; };
    // Starts the copy of chunk c of rows r0.. into buf (aligned rows only).
    auto issue = [&](i64 r0, i64 c, u8* buf) {
        if (p.aligned16) gemv_issue<FMT, R>(p, W, r0, c, buf, buf != stage, lane);
    };
    // Makes chunk c of rows r0.. visible to the whole warp in buf.
    u32 phases = 0;
    auto land = [&](i64 r0, i64 c, u8* buf) {
        if (p.aligned16) {
            gemv_wait<FMT>(buf != stage, phases);
        } else {  // every block size is even: 2-byte copies always work
            const int n2 = (int)(min64((i64)CHUNK, p.row_bytes - c * CHUNK) / 2);
#pragma unroll
            for (int r = 0; r < R; r++) {
                const u16* src = (const u16*)(row_ptr(r0, r) + c * CHUNK);
                for (int j = lane; j < n2; j += 32) ((u16*)(buf + r * CHUNK))[j] = src[j];
            }
        }
        __syncwarp();
    };
    if (!pre.staged) gemv_issue_first<FMT, R>(p, W);  // (else the prologue did)
    gemv_tables<FMT>(p, pre);                          // while the first copies are in flight
    // The items of chunk c of the staged rows in `cur` against vectors v0 .. v0+NB-1.
    auto compute = [&](const u8* cur, i64 c, i64 v0, float (&acc)[R][NB]) {
        chunk_dot<FMT, R, NB, QX>(p, cur, c, xv0 + v0, nblocks, dstride, lane, acc);
    };
    int buf = 0;
    for (i64 blk = blockIdx.x; blk * rows_per_cta < p.n_rows; blk += gridDim.x) {
        const i64 row0 = blk * rows_per_cta + group_row;
        float acc[R][NB];
        if constexpr (NB == 8) {  // only the 8-vector kernels are launched with batches
            if (p.n_batches > 1) {
                // n_batches batches of NB vectors against the same staged weights (gemv.rs only
                // asks for this when every warp has at most one chunk per row group, c = wg): the
                // weights are read once for all batches. Per vector, the same sums as one batch.
                const bool mine = row0 < p.n_rows && wg < nchunks;
                u8* const cur = stage + buf * R * CHUNK;
                if (mine) {
                    land(row0, wg, cur);
                    if (row0 + block_stride < p.n_rows) issue(row0 + block_stride, wg, stage + (buf ^ 1) * R * CHUNK);
                    buf ^= 1;
                }
                for (i64 b = 0; b < p.n_batches; b++) {
#pragma unroll
                    for (int r = 0; r < R; r++)
#pragma unroll
                        for (int v = 0; v < NB; v++) acc[r][v] = 0.f;
                    if (mine) compute(cur, wg, b * NB, acc);
                    group_store<R, NB>(p, row0, ws, acc, red, b * NB);
                }
                continue;
            }
        }
#pragma unroll
        for (int r = 0; r < R; r++)
#pragma unroll
            for (int v = 0; v < NB; v++) acc[r][v] = 0.f;
        for (i64 c = wg; row0 < p.n_rows && c < nchunks; c += ws, buf ^= 1) {
            u8* const cur = stage + buf * R * CHUNK;
            // After land's __syncwarp every lane is done with the previous step, so the
            // other buffer (read by that step) may be refilled.
            land(row0, c, cur);
            i64 nr = row0, nc = c + ws;
            if (nc >= nchunks) {
                nr = row0 + block_stride;
                nc = wg;
            }
            if (nr < p.n_rows) issue(nr, nc, stage + (buf ^ 1) * R * CHUNK);
            compute(cur, c, 0, acc);
        }
        group_store<R, NB>(p, row0, ws, acc, red, 0);
    }
}

// A compile-time vector count (selects a kernel body inside one launch).
template <int N> struct Nb { static constexpr int value = N; };

// Grouped experts: the vectors of this CTA's expert e = blockIdx.y, [v_begin, v_end) of x and y.
// Offsets are clamped to [0, p.n_vecs_total] and an end below its start counts as empty, so no
// device data can send a CTA outside x or y. The extra row of CTAs blockIdx.y == n_experts writes
// NaN rows for the vectors no expert covers: before groups[0] and from groups[n_experts] on (the
// slots of out-of-range expert ids, which sorting puts last), as expert_base does for a bad id.
// Returns false (the CTA has nothing more to do) for that row and for an expert without vectors.
__device__ __forceinline__ bool group_range(const GemvParams& p, i64* v_begin, i64* v_end) {
    const int* groups = (const int*)p.groups;
    const i64 n = p.n_vecs_total;
    auto offset = [&](i64 e) {
        const i64 v = groups[e];
        return v < 0 ? (i64)0 : (v > n ? n : v);
    };
    if ((i64)blockIdx.y == p.n_experts) {
        const i64 head = offset(0), last = offset(p.n_experts), tail = last > head ? last : head;
        float* y = gemv_y(p);
        for (i64 row = (i64)blockIdx.x * blockDim.x + threadIdx.x; row < p.n_rows; row += (i64)gridDim.x * blockDim.x) {
            for (i64 v = 0; v < head; v++) y[v * p.n_rows + row] = __int_as_float(0x7fc00000);
            for (i64 v = tail; v < n; v++) y[v * p.n_rows + row] = __int_as_float(0x7fc00000);
        }
        return false;
    }
    const i64 b = offset(blockIdx.y), e = offset((i64)blockIdx.y + 1);
    *v_begin = b;
    *v_end = e > b ? e : b;
    return *v_end > *v_begin;
}

// Grouped experts (prefill MoE): expert blockIdx.y against all of its vectors, which are
// contiguous in x and y (sorted by expert; p.groups holds the offsets). The work split, staging
// and per-vector sums are those of gemv_quant; only the vector loop differs. Each row group runs
// the expert's vectors in batches of 8 and one batch of the 1..7 left (an NB instance per size,
// so the tail decodes the weights once and computes no padding vectors): every vector gets
// exactly the bits gemv_quant gives it (the NB variants differ only in how many vectors share a
// weight decode).
// When every warp holds all of its part of a row group in its stage (p.split >= chunks, the
// model's expert shapes), the weights are staged once for all batches; otherwise every batch
// streams the row group's chunks again (same double-buffered steps, batch after batch).
template <int FMT, int R, bool QX>
__device__ __forceinline__ void gemv_quant_grouped(const GemvParams& p, const GemvPre pre) {
    typedef Fmt<FMT> F;
    constexpr int CHUNK = F::CB * F::BB;
    // Dynamic shared memory: the IQ2_XXS tables (TabBytes), the stage barriers, then warps x 2 x
    // R x CHUNK bytes.
    extern __shared__ __align__(16) u8 gemv_smem[];
    u8* const stage_dyn = gemv_smem + StageBase<FMT>::V;
    __shared__ float red[GEMV_MAX_WARPS * R * 8];
    i64 v_begin, v_end;
    if (!group_range(p, &v_begin, &v_end)) return;  // uniform in the CTA
    const u8* const W = gemv_w(p) + (i64)blockIdx.y * p.expert_stride;

    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int ws = (int)p.split, wg = warp % ws;
    u8* const stage = stage_dyn + warp * 2 * R * CHUNK;
    const i64 nblocks = p.k / F::BE;
    const i64 nchunks = (nblocks + F::CB - 1) / F::CB;
    const i64 dstride = p.k / F::QB;
    const bool resident = nchunks <= ws;  // at most one chunk per warp and row group

    const i64 rows_per_cta = (i64)(blockDim.x / (32 * ws)) * R;
    const i64 block_stride = (i64)gridDim.x * rows_per_cta;
    const i64 group_row = (i64)(warp / ws) * R;
    auto row_ptr = [&](i64 r0, int r) { return W + (r0 + r < p.n_rows ? r0 + r : r0) * p.row_bytes; };
    // issue / land: as in gemv_quant.
    auto issue = [&](i64 r0, i64 c, u8* buf) {
        if (p.aligned16) gemv_issue<FMT, R>(p, W, r0, c, buf, buf != stage, lane);
    };
    u32 phases = 0;
    auto land = [&](i64 r0, i64 c, u8* buf) {
        if (p.aligned16) {
            gemv_wait<FMT>(buf != stage, phases);
        } else {
            const int n2 = (int)(min64((i64)CHUNK, p.row_bytes - c * CHUNK) / 2);
#pragma unroll
            for (int r = 0; r < R; r++) {
                const u16* src = (const u16*)(row_ptr(r0, r) + c * CHUNK);
                for (int j = lane; j < n2; j += 32) ((u16*)(buf + r * CHUNK))[j] = src[j];
            }
        }
        __syncwarp();
    };
    gemv_issue_first<FMT, R>(p, W);
    gemv_tables<FMT>(p, pre);
    int buf = 0;
    // One batch of NB vectors from v0 against the row group at row0. Resident: its chunk is in
    // `staged`. Streaming: its chunks are landed step by step; the step after the last chunk is
    // the first chunk of the same rows for the next batch, or of the next row group after the
    // `last` batch.
    auto batch = [&](auto nb, i64 row0, i64 v0, const u8* staged, bool last) {
        constexpr int NB = decltype(nb)::value;
        float acc[R][NB];
#pragma unroll
        for (int r = 0; r < R; r++)
#pragma unroll
            for (int v = 0; v < NB; v++) acc[r][v] = 0.f;
        if (resident) {
            if (row0 < p.n_rows && wg < nchunks) chunk_dot<FMT, R, NB, QX>(p, staged, wg, v0, nblocks, dstride, lane, acc);
        } else {
            for (i64 c = wg; row0 < p.n_rows && c < nchunks; c += ws, buf ^= 1) {
                u8* const cur = stage + buf * R * CHUNK;
                land(row0, c, cur);
                i64 nr = row0, nc = c + ws;
                if (nc >= nchunks) {
                    nc = wg;
                    if (last) nr = row0 + block_stride;
                }
                if (nr < p.n_rows) issue(nr, nc, stage + (buf ^ 1) * R * CHUNK);
                chunk_dot<FMT, R, NB, QX>(p, cur, c, v0, nblocks, dstride, lane, acc);
            }
        }
        group_store<R, NB>(p, row0, ws, acc, red, v0);
    };
    // Row blocks in grid-stride order; the batch sequence depends on the CTA's expert only, so
    // every warp makes the same group_store calls.
    for (i64 blk = blockIdx.x; blk * rows_per_cta < p.n_rows; blk += gridDim.x) {
        const i64 row0 = blk * rows_per_cta + group_row;
        const u8* staged = stage + buf * R * CHUNK;
        if (resident && row0 < p.n_rows && wg < nchunks) {
            land(row0, wg, stage + buf * R * CHUNK);
            if (row0 + block_stride < p.n_rows) issue(row0 + block_stride, wg, stage + (buf ^ 1) * R * CHUNK);
            buf ^= 1;
        }
        // Batches of 8, then one batch of the 1..7 left: one weight decode per batch.
        for (i64 v0 = v_begin; v0 < v_end; v0 += 8) {
            const i64 left = v_end - v0;
            switch (left < 8 ? (int)left : 8) {
            case 1: batch(Nb<1>(), row0, v0, staged, true); break;
            case 2: batch(Nb<2>(), row0, v0, staged, true); break;
            case 3: batch(Nb<3>(), row0, v0, staged, true); break;
            case 4: batch(Nb<4>(), row0, v0, staged, true); break;
            case 5: batch(Nb<5>(), row0, v0, staged, true); break;
            case 6: batch(Nb<6>(), row0, v0, staged, true); break;
            case 7: batch(Nb<7>(), row0, v0, staged, true); break;
            default: batch(Nb<8>(), row0, v0, staged, left == 8); break;
            }
        }
    }
}

// F32 / F16 weights, f32 activations, read straight from global memory.
//
// Work split: a row group (R rows) belongs to p.split warps (1..8; gemv.rs picks it from the
// row length alone, so results never depend on the launch shape). Its TPR = 32*split threads
// cut every row into 16-byte pieces: thread t takes pieces t, t+TPR, t+2*TPR, ... and keeps
// U pieces x R rows of loads in flight before it does the math. A 4096-column F16 row is 512
// pieces, so with split = 8 each thread has 2 pieces per row and a 256-row matrix becomes 256
// (R = 1) CTAs instead of 32 warps each walking 4096 columns.
//
// Order of the f32 sums (deterministic): each thread fmas its pieces in order, element by
// element; lanes are combined by warp_sum; the split warps' partials are added in warp order.
// R and NB do not change it. Rows that are not 16-byte aligned (or whose length is not whole
// pieces) take scalar loads of the same elements in the same order.
template <int FMT, int R, int NB>
__device__ __forceinline__ void gemv_plain(const GemvParams& p) {
    constexpr int ES = FMT == FMT_F32 ? 4 : 2;  // bytes per weight
    constexpr int EPP = 16 / ES;                // elements per 16-byte piece
    constexpr int U = 2;                        // pieces per row in flight per thread
    __shared__ float red[GEMV_MAX_WARPS * R * NB];
    const u8* W;
    if (!expert_base(p, NB, &W)) return;
    const int ws = (int)p.split, tpr = 32 * ws;
    const int g = threadIdx.x / tpr, t = threadIdx.x % tpr;
    const i64 rows_per_cta = (i64)(blockDim.x / tpr) * R;
    const float* x = (const float*)p.x + (i64)blockIdx.y * p.x_slot_vecs * p.k;
    const bool vec = p.aligned16 && (p.k % EPP == 0);
    // Uniform trip count in the CTA (group_store synchronizes it).
    for (i64 blk = blockIdx.x; blk * rows_per_cta < p.n_rows; blk += gridDim.x) {
        const i64 row0 = blk * rows_per_cta + (i64)g * R;
        float acc[R][NB];
#pragma unroll
        for (int r = 0; r < R; r++)
#pragma unroll
            for (int v = 0; v < NB; v++) acc[r][v] = 0.f;
        if (row0 < p.n_rows) {
            const u8* rows[R];
#pragma unroll
            for (int r = 0; r < R; r++) rows[r] = W + (row0 + r < p.n_rows ? row0 + r : row0) * p.row_bytes;
            for (i64 e0 = (i64)EPP * t; e0 < p.k; e0 += (i64)EPP * tpr * U) {
                uint4 wv[U][R];
                if (vec) {
#pragma unroll
                    for (int u = 0; u < U; u++) {
                        const i64 e = e0 + (i64)EPP * tpr * u;
#pragma unroll
                        for (int r = 0; r < R; r++)
                            if (e < p.k) wv[u][r] = load_stream16(rows[r] + e * ES);
                    }
                }
#pragma unroll
                for (int u = 0; u < U; u++) {
                    const i64 e = e0 + (i64)EPP * tpr * u;
                    if (e >= p.k) break;
                    // Weights of this piece as floats (0 past the row end; never added).
                    float w[R][EPP];
#pragma unroll
                    for (int r = 0; r < R; r++) {
                        if (vec) {
                            const u32 h[4] = {wv[u][r].x, wv[u][r].y, wv[u][r].z, wv[u][r].w};
#pragma unroll
                            for (int j = 0; j < 4; j++) {
                                if constexpr (FMT == FMT_F32) {
                                    w[r][j] = __uint_as_float(h[j]);
                                } else {
                                    w[r][2 * j] = f16_to_f32((u16)(h[j] & 0xffff));
                                    w[r][2 * j + 1] = f16_to_f32((u16)(h[j] >> 16));
                                }
                            }
                        } else {
#pragma unroll
                            for (int j = 0; j < EPP; j++) {
                                w[r][j] = 0.f;
                                if (e + j < p.k)
                                    w[r][j] = FMT == FMT_F32 ? ((const float*)rows[r])[e + j]
                                                             : f16_to_f32(((const u16*)rows[r])[e + j]);
                            }
                        }
                    }
#pragma unroll
                    for (int v = 0; v < NB; v++) {
                        const float* xv = x + v * p.k + e;
                        float xs[EPP];
                        if (vec) {
#pragma unroll
                            for (int j = 0; j < EPP; j += 4) {
                                const float4 f = *(const float4*)(xv + j);
                                xs[j] = f.x; xs[j + 1] = f.y; xs[j + 2] = f.z; xs[j + 3] = f.w;
                            }
                        } else {
#pragma unroll
                            for (int j = 0; j < EPP; j++) xs[j] = e + j < p.k ? xv[j] : 0.f;
                        }
#pragma unroll
                        for (int r = 0; r < R; r++)
#pragma unroll
                            for (int j = 0; j < EPP; j++)
                                if (vec || e + j < p.k) acc[r][v] = fmaf(w[r][j], xs[j], acc[r][v]);
                    }
                }
            }
        }
        group_store<R, NB>(p, row0, ws, acc, red, 0);
    }
}

// Rows per row group (R) per variant: F16/F32 come as _r1 and _r4 (gemv.rs picks one per launch),
// the quantized kernels have R = 2. gemv.rs mirrors R and the chunk sizes of Fmt<> to size the
// grid (any grid is correct: the row-block loop is grid-stride) and the dynamic shared memory.
// The one-vector (decode) quantized kernels at 5 CTAs of 256 threads per SM, which caps them at
// 48 registers: 10 of the decode's 4-warp CTAs fit an SM. Left to itself ptxas gave them 48-58
// (80 with a minimum of 1). Against that, decode t/s on the H200 with the q2 file: 48 registers
// +2.1 %, 40 (a minimum of 6, a few spills) -1.3 %, 80 -2.4 % (docs/speed-log.md, session 30).
// Same arithmetic.
#define GEMV_NB1_MIN_CTAS 5
#define GEMV_Q(name, FMT, R, QX)                                                                        \
    extern "C" __global__ void __launch_bounds__(GEMV_MAX_WARPS * 32, GEMV_NB1_MIN_CTAS) name##_nb1(const GemvParams p) { PDL_ENTRY_AFTER(const GemvPre pre = gemv_prologue<FMT, R>(p)); gemv_quant<FMT, R, 1, QX>(p, pre); } \
    extern "C" __global__ void __launch_bounds__(GEMV_MAX_WARPS * 32) name##_nb2(const GemvParams p) { PDL_ENTRY_AFTER(const GemvPre pre = gemv_prologue<FMT, R>(p)); gemv_quant<FMT, R, 2, QX>(p, pre); } \
    extern "C" __global__ void __launch_bounds__(GEMV_MAX_WARPS * 32) name##_nb4(const GemvParams p) { PDL_ENTRY_AFTER(const GemvPre pre = gemv_prologue<FMT, R>(p)); gemv_quant<FMT, R, 4, QX>(p, pre); } \
    extern "C" __global__ void __launch_bounds__(GEMV_MAX_WARPS * 32) name##_nb8(const GemvParams p) { PDL_ENTRY_AFTER(const GemvPre pre = gemv_prologue<FMT, R>(p)); gemv_quant<FMT, R, 8, QX>(p, pre); }
#define GEMV_P(name, FMT, R)                                                                            \
    extern "C" __global__ void __launch_bounds__(GEMV_MAX_WARPS * 32) name##_nb1(const GemvParams p) { PDL_ENTRY(); gemv_plain<FMT, R, 1>(p); } \
    extern "C" __global__ void __launch_bounds__(GEMV_MAX_WARPS * 32) name##_nb2(const GemvParams p) { PDL_ENTRY(); gemv_plain<FMT, R, 2>(p); } \
    extern "C" __global__ void __launch_bounds__(GEMV_MAX_WARPS * 32) name##_nb4(const GemvParams p) { PDL_ENTRY(); gemv_plain<FMT, R, 4>(p); } \
    extern "C" __global__ void __launch_bounds__(GEMV_MAX_WARPS * 32) name##_nb8(const GemvParams p) { PDL_ENTRY(); gemv_plain<FMT, R, 8>(p); }

GEMV_P(gemv_f32_f32x_r1, FMT_F32, 1)
GEMV_P(gemv_f32_f32x_r4, FMT_F32, 4)
GEMV_P(gemv_f16_f32x_r1, FMT_F16, 1)
GEMV_P(gemv_f16_f32x_r4, FMT_F16, 4)
GEMV_Q(gemv_q8_0_f32x, FMT_Q8_0, 2, false)
GEMV_Q(gemv_q2_k_f32x, FMT_Q2_K, 2, false)
GEMV_Q(gemv_q4_k_f32x, FMT_Q4_K, 2, false)
GEMV_Q(gemv_iq2_xxs_f32x, FMT_IQ2_XXS, 2, false)
GEMV_Q(gemv_q8_0_q8x, FMT_Q8_0, 2, true)
GEMV_Q(gemv_q2_k_q8x, FMT_Q2_K, 2, true)
GEMV_Q(gemv_q4_k_q8x, FMT_Q4_K, 2, true)
GEMV_Q(gemv_iq2_xxs_q8x, FMT_IQ2_XXS, 2, true)

// Grouped expert products (quantized activations only: ds4's expert numerics), R = 2.
#define GEMV_G(name, FMT)                                                                                \
    extern "C" __global__ void __launch_bounds__(GEMV_MAX_WARPS * 32) name##_grouped(const GemvParams p) { PDL_ENTRY_AFTER(const GemvPre pre = gemv_prologue<FMT, 0>(p)); gemv_quant_grouped<FMT, 2, true>(p, pre); }
GEMV_G(gemv_q8_0_q8x, FMT_Q8_0)
GEMV_G(gemv_q2_k_q8x, FMT_Q2_K)
GEMV_G(gemv_q4_k_q8x, FMT_Q4_K)
GEMV_G(gemv_iq2_xxs_q8x, FMT_IQ2_XXS)

// Asks L2 to fetch `bytes` of weights at w (a hint: nothing is loaded into the SM, nothing
// written), one bulk prefetch of up to 16 KB per thread and step; w and bytes are multiples of
// 16 (gemv.rs prefetch_range). Weights never change, so it issues before its PDL wait.
extern "C" __global__ void prefetch_l2(const u8* w, i64 bytes) {
    PDL_ENTRY_AFTER(
        const i64 chunk = 16384;
        for (i64 off = ((i64)blockIdx.x * blockDim.x + threadIdx.x) * chunk; off < bytes;
             off += (i64)gridDim.x * blockDim.x * chunk) {
            const unsigned len = (unsigned)(min64(chunk, bytes - off) & ~(i64)15);
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
            if (len) asm volatile("cp.async.bulk.prefetch.L2.global [%0], %1;" ::"l"(w + off), "r"(len) : "memory");
#else
            for (unsigned b = 0; b < len; b += 128) asm volatile("prefetch.global.L2 [%0];" ::"l"(w + off + b));
#endif
        });
}
