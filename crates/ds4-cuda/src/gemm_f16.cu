// Y = W X for F16 weights and f32 activations, many vectors at once (prefill's router,
// compressor and indexer projections), on the CUDA cores in f32: every output is one f32
// sum over k in ascending order (fused multiply-adds), independent of the tile it falls in,
// so the bits do not depend on the batch. W: rows x k f16 (row-major, 16-byte aligned rows);
// X: n vectors of k f32; Y: n vectors of rows f32 (y[v*rows + r]).
//
// Tiles: a CTA of 128 threads computes 32 rows x 64 vectors (4 x 4 per thread) over K tiles
// of 32, staging the weights converted to f32 and the activations in shared memory, k-major,
// so each step is two 16-byte shared loads and 16 FMAs per thread.

#define GF_BM 32
#define GF_BN 64
#define GF_BK 32
#define GF_THREADS 128

extern "C" __global__ void __launch_bounds__(GF_THREADS)
    gemm_f16_f32(const u8* __restrict__ w, i64 row_bytes, const float* __restrict__ x, float* __restrict__ y,
                 i64 rows, i64 n, i64 k) {
    PDL_ENTRY();
    __shared__ __align__(16) float ws[GF_BK][GF_BM + 4];
    __shared__ __align__(16) float xs[GF_BK][GF_BN + 4];
    const int tid = threadIdx.x;
    const int tr = tid % 8, tv = tid / 8;  // this thread's 4 rows (tr*4..) and 4 vectors (tv*4..)
    const i64 r0 = (i64)blockIdx.x * GF_BM, v0 = (i64)blockIdx.y * GF_BN;
    float acc[4][4];
#pragma unroll
    for (int i = 0; i < 4; i++)
#pragma unroll
        for (int j = 0; j < 4; j++) acc[i][j] = 0.f;
    for (i64 k0 = 0; k0 < k; k0 += GF_BK) {
        // Weights: 32 rows x 32 halves = 128 pieces of 8 halves, one per thread.
        {
            const int row = tid / 4, part = tid % 4;
            const i64 gr = r0 + row < rows ? r0 + row : rows - 1;
            const uint4 q = *(const uint4*)(w + gr * row_bytes + (k0 + part * 8) * 2);
            const u32 h[4] = {q.x, q.y, q.z, q.w};
#pragma unroll
            for (int j = 0; j < 4; j++) {
                ws[part * 8 + 2 * j][row] = f16_to_f32((u16)(h[j] & 0xffff));
                ws[part * 8 + 2 * j + 1][row] = f16_to_f32((u16)(h[j] >> 16));
            }
        }
        // Activations: 64 vectors x 32 floats = 512 float4, four per thread.
#pragma unroll
        for (int p = 0; p < 4; p++) {
            const int piece = tid + p * GF_THREADS, vec = piece / 8, part = piece % 8;
            const i64 gv = v0 + vec < n ? v0 + vec : n - 1;
            const float4 f = *(const float4*)(x + gv * k + k0 + part * 4);
            xs[part * 4 + 0][vec] = f.x;
            xs[part * 4 + 1][vec] = f.y;
            xs[part * 4 + 2][vec] = f.z;
            xs[part * 4 + 3][vec] = f.w;
        }
        __syncthreads();
#pragma unroll 8
        for (int kk = 0; kk < GF_BK; kk++) {
            const float4 a = *(const float4*)&ws[kk][tr * 4];
            const float4 b = *(const float4*)&xs[kk][tv * 4];
            const float av[4] = {a.x, a.y, a.z, a.w}, bv[4] = {b.x, b.y, b.z, b.w};
#pragma unroll
            for (int i = 0; i < 4; i++)
#pragma unroll
                for (int j = 0; j < 4; j++) acc[i][j] = fmaf(av[i], bv[j], acc[i][j]);
        }
        __syncthreads();
    }
#pragma unroll
    for (int j = 0; j < 4; j++) {
        const i64 v = v0 + tv * 4 + j;
        if (v >= n) continue;
#pragma unroll
        for (int i = 0; i < 4; i++) {
            const i64 r = r0 + tr * 4 + i;
            if (r < rows) y[v * rows + r] = acc[i][j];
        }
    }
}
