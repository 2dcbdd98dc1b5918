// Dequantization of ggml weight rows to f16, for the tensor-core (cuBLAS) prefill path.
// One thread per 32-element item. The arithmetic mirrors the CPU reference step by step, with
// __fmul_rn/__fsub_rn so no multiply-add gets fused: the f16 results equal the CPU's bit for bit.

#define FMT_F32 0
#define FMT_Q8_0 2
#define FMT_Q2_K 3
#define FMT_Q4_K 4
#define FMT_IQ2_XXS 5

template <int FMT>
__device__ __forceinline__ void dequant_item(const u8* blk, int it, const u64* grid, u16* out) {
    if constexpr (FMT == FMT_Q8_0) {
        const float d = f16_to_f32(rd16(blk));
        for (int l = 0; l < 32; l++) out[l] = f32_to_f16(__fmul_rn(d, (float)(i8)blk[2 + l]));
    } else if constexpr (FMT == FMT_Q2_K) {
        const int h = it >> 2, s = it & 3;
        const float d = f16_to_f32(rd16(blk + 80)), dmin = f16_to_f32(rd16(blk + 82));
        for (int l = 0; l < 32; l++) {
            const int sc = blk[2 * it + (l >> 4)];
            const float dl = __fmul_rn(d, (float)(sc & 15)), ml = __fmul_rn(dmin, (float)(sc >> 4));
            const int qv = (blk[16 + 32 * h + l] >> (2 * s)) & 3;
            out[l] = f32_to_f16(__fsub_rn(__fmul_rn(dl, (float)qv), ml));
        }
    } else if constexpr (FMT == FMT_Q4_K) {
        int sc, m;
        q4k_scale_min(blk + 4, it, &sc, &m);
        const float d1 = __fmul_rn(f16_to_f32(rd16(blk)), (float)sc);
        const float m1 = __fmul_rn(f16_to_f32(rd16(blk + 2)), (float)m);
        for (int l = 0; l < 32; l++) {
            const int qv = (blk[16 + 32 * (it >> 1) + l] >> (4 * (it & 1))) & 15;
            out[l] = f32_to_f16(__fsub_rn(__fmul_rn(d1, (float)qv), m1));
        }
    } else {  // IQ2_XXS
        const u32 a0 = (u32)rd16(blk + 2 + 8 * it) | ((u32)rd16(blk + 4 + 8 * it) << 16);
        const u32 a1 = (u32)rd16(blk + 6 + 8 * it) | ((u32)rd16(blk + 8 + 8 * it) << 16);
        const float db = __fmul_rn(__fmul_rn(f16_to_f32(rd16(blk)), 0.5f + (float)(a1 >> 28)), 0.25f);
        for (int l = 0; l < 4; l++) {
            const u64 g = grid[(a0 >> (8 * l)) & 255];
            const u32 sg = iq2_signs((a1 >> (7 * l)) & 127);
            for (int m = 0; m < 8; m++) {
                const float v = __fmul_rn(db, (float)((g >> (8 * m)) & 255));
                out[8 * l + m] = f32_to_f16((sg >> m) & 1 ? -v : v);
            }
        }
    }
}

// out[row * k + e] = W[row][e] as f16, for rows x k elements.
template <int FMT>
__device__ __forceinline__ void dequant_rows(const u8* w, i64 row_bytes, i64 rows, i64 k, const u64* grid, u16* out) {
    constexpr int BB = FMT == FMT_Q8_0 ? 34 : FMT == FMT_Q2_K ? 84 : FMT == FMT_Q4_K ? 144 : 66;
    constexpr int ITEMS = FMT == FMT_Q8_0 ? 1 : 8;
    const i64 items_per_row = k / 32;
    for (i64 t = (i64)blockIdx.x * blockDim.x + threadIdx.x; t < rows * items_per_row; t += (i64)gridDim.x * blockDim.x) {
        const i64 row = t / items_per_row, item = t % items_per_row;
        const i64 blk = item / ITEMS;
        const int it = (int)(item % ITEMS);
        u16 v[32];
        dequant_item<FMT>(w + row * row_bytes + blk * BB, it, grid, v);
        u16* o = out + row * k + item * 32;
        for (int l = 0; l < 32; l++) o[l] = v[l];
    }
}

extern "C" __global__ void dequant_q8_0_f16(const u8* w, i64 row_bytes, i64 rows, i64 k, const u64* grid, u16* out) {
    PDL_ENTRY();
    dequant_rows<FMT_Q8_0>(w, row_bytes, rows, k, grid, out);
}
extern "C" __global__ void dequant_q2_k_f16(const u8* w, i64 row_bytes, i64 rows, i64 k, const u64* grid, u16* out) {
    PDL_ENTRY();
    dequant_rows<FMT_Q2_K>(w, row_bytes, rows, k, grid, out);
}
extern "C" __global__ void dequant_q4_k_f16(const u8* w, i64 row_bytes, i64 rows, i64 k, const u64* grid, u16* out) {
    PDL_ENTRY();
    dequant_rows<FMT_Q4_K>(w, row_bytes, rows, k, grid, out);
}
extern "C" __global__ void dequant_iq2_xxs_f16(const u8* w, i64 row_bytes, i64 rows, i64 k, const u64* grid, u16* out) {
    PDL_ENTRY();
    dequant_rows<FMT_IQ2_XXS>(w, row_bytes, rows, k, grid, out);
}
// F32 rows -> f16 (round to nearest even); F16 weights need no conversion.
extern "C" __global__ void dequant_f32_f16(const u8* w, i64 row_bytes, i64 rows, i64 k, const u64* grid, u16* out) {
    PDL_ENTRY();
    for (i64 t = (i64)blockIdx.x * blockDim.x + threadIdx.x; t < rows * k; t += (i64)gridDim.x * blockDim.x) {
        const i64 row = t / k, e = t % k;
        out[t] = f32_to_f16(((const float*)(w + row * row_bytes))[e]);
    }
}
