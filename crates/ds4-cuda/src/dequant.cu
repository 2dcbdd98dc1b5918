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

// Q8_0, 8 values a thread (the prefill's f16 GEMMs dequantize each Q8_0 matrix per span, so
// this one runs at memory speed): consecutive threads take consecutive 8-value groups, 4 a
// block, and write them as one 16-byte store. The same arithmetic as dequant_item.
extern "C" __global__ void dequant_q8_0_f16(const u8* w, i64 row_bytes, i64 rows, i64 k, const u64* grid, u16* out) {
    PDL_ENTRY();
    const i64 groups_per_row = k / 8;
    for (i64 t = (i64)blockIdx.x * blockDim.x + threadIdx.x; t < rows * groups_per_row; t += (i64)gridDim.x * blockDim.x) {
        const i64 row = t / groups_per_row, g = t % groups_per_row;
        const u8* blk = w + row * row_bytes + (g / 4) * 34;
        const u8* q = blk + 2 + 8 * (g % 4);
        const float d = f16_to_f32(rd16(blk));
        u32 h[4];
#pragma unroll
        for (int j = 0; j < 4; j++) {
            const u32 pair = rd16(q + 2 * j);
            const u32 lo = f32_to_f16(__fmul_rn(d, (float)(i8)(pair & 255)));
            const u32 hi = f32_to_f16(__fmul_rn(d, (float)(i8)(pair >> 8)));
            h[j] = lo | (hi << 16);
        }
        *(uint4*)(out + row * k + 8 * g) = make_uint4(h[0], h[1], h[2], h[3]);
    }
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

// Activations to f16 for the prefill's f16 GEMMs, 8 values a thread (n % 8 == 0, x and out
// 16-byte aligned): rounded to nearest even, values beyond f16's range clamped to +-65504 so
// that an outlier gives a large finite product rather than inf (NaN stays NaN).
extern "C" __global__ void activations_f16(const float* __restrict__ x, u16* __restrict__ out, i64 n) {
    PDL_ENTRY();
    for (i64 t = (i64)blockIdx.x * blockDim.x + threadIdx.x; 8 * t < n; t += (i64)gridDim.x * blockDim.x) {
        const float4 a = ((const float4*)x)[2 * t], b = ((const float4*)x)[2 * t + 1];
        const float v[8] = {a.x, a.y, a.z, a.w, b.x, b.y, b.z, b.w};
        u32 h[4];
#pragma unroll
        for (int j = 0; j < 4; j++) {
            float lo = v[2 * j], hi = v[2 * j + 1];
            lo = isnan(lo) ? lo : fminf(fmaxf(lo, -65504.0f), 65504.0f);
            hi = isnan(hi) ? hi : fminf(fmaxf(hi, -65504.0f), 65504.0f);
            h[j] = (u32)f32_to_f16(lo) | ((u32)f32_to_f16(hi) << 16);
        }
        ((uint4*)out)[t] = make_uint4(h[0], h[1], h[2], h[3]);
    }
}
