// What would an f16 tensor-core path for the prefill's Q8_0 projections buy, and what would it
// cost in accuracy? ds4 itself runs prefill through F16-dequantized weights and cuBLAS
// (../shared/reference/ds4-spec.md, section 7); ds4-rs runs the exact Q8_0 x Q8_0 GEMM
// (gemm_q8.cu), bound by its per-block f32 epilogue. This probe times, on the engine's Q8_0 GEMM
// shapes at 2 048 vectors:
//   - dequant: Q8_0 weights to an f16 copy (once per matrix and span in such a path),
//   - convert: f32 activations to f16,
//   - gemm: cuBLAS GemmEx, f16 x f16 with f32 accumulation, f32 output,
// and measures on sampled outputs how far each path lands from the exact product of the
// dequantized weights and the f32 activations (f64 on the host): the f16 path, and the Q8_0
// path (activations quantized per 32 as ds4-gguf's quantize_q8_0_activation does, integer block
// sums, f32 update per block). Not part of the engine: a measurement for deciding on an opt-in
// prefill path (docs/speed-log.md, session 32).
//
// Its dequantization kernel (a thread per 32-value block, 2-byte stores) is slow (~390 us for
// 33.5 M weights); the engine's (dequant.cu, 8 values and one 16-byte store a thread) is not
// timed here. Session 32's H200 results: docs/speed-log.md.
//
// On the GPU machine:
//   nvcc -O3 -std=c++17 -arch=sm_90a scripts/gpu/f16_gemm_probe.cu -lcublas -o /tmp/fp && /tmp/fp
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <vector>
#include <cublas_v2.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#define CK(x) do { cudaError_t e = (x); if (e != cudaSuccess) { printf("%s:%d %s\n", __FILE__, __LINE__, cudaGetErrorString(e)); exit(1); } } while (0)
#define CB(x) do { cublasStatus_t e = (x); if (e != CUBLAS_STATUS_SUCCESS) { printf("%s:%d cublas %d\n", __FILE__, __LINE__, (int)e); exit(1); } } while (0)

typedef uint8_t u8;
typedef uint32_t u32;
typedef uint64_t u64;

// Q8_0 block: f16 scale, 32 int8 levels (34 bytes).
struct BlockQ8 {
    uint16_t d;
    int8_t q[32];
};

static u64 rng_state = 0x9E3779B97F4A7C15ull;
static u32 rnd() {
    rng_state ^= rng_state << 13;
    rng_state ^= rng_state >> 7;
    rng_state ^= rng_state << 17;
    return (u32)(rng_state >> 16);
}
static float rnd_unit() { return (rnd() & 0xFFFFFF) / 16777216.0f * 2.0f - 1.0f; }  // [-1, 1)

static float h2f(uint16_t h) { return __half2float(__ushort_as_half(h)); }
static uint16_t f2h(float f) { return __half_as_ushort(__float2half_rn(f)); }

// One thread per block of 32: the f16 weights q * d, each rounded once.
__global__ void dequant_q8_0(const BlockQ8* __restrict__ w, __half* __restrict__ out, u64 blocks) {
    const u64 b = (u64)blockIdx.x * blockDim.x + threadIdx.x;
    if (b >= blocks) return;
    const BlockQ8 blk = w[b];
    const float d = __half2float(__ushort_as_half(blk.d));
#pragma unroll
    for (int i = 0; i < 32; i++) out[32 * b + i] = __float2half_rn(d * (float)blk.q[i]);
}

__global__ void f32_to_f16(const float* __restrict__ x, __half* __restrict__ out, u64 n) {
    const u64 i = (u64)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) out[i] = __float2half_rn(x[i]);
}

template <typename F>
static float median_ms(F f, cudaStream_t st, int reps) {
    std::vector<float> t;
    cudaEvent_t a, b;
    CK(cudaEventCreate(&a));
    CK(cudaEventCreate(&b));
    f();  // warm-up
    for (int r = 0; r < reps; r++) {
        CK(cudaEventRecord(a, st));
        f();
        CK(cudaEventRecord(b, st));
        CK(cudaEventSynchronize(b));
        float ms;
        CK(cudaEventElapsedTime(&ms, a, b));
        t.push_back(ms);
    }
    std::sort(t.begin(), t.end());
    CK(cudaEventDestroy(a));
    CK(cudaEventDestroy(b));
    return t[t.size() / 2];
}

int main() {
    const int n = 2048;  // vectors: a prefill span
    struct Shape { int rows, cols; const char* what; } shapes[] = {
        {4096, 8192, "o_b"}, {8192, 4096, "o_a group stack / shared gate+up"}, {1024, 4096, "q_a"}, {32768, 1024, "q_b"}};
    cublasHandle_t h;
    CB(cublasCreate(&h));
    cudaStream_t st;
    CK(cudaStreamCreate(&st));
    CB(cublasSetStream(h, st));
    printf("%-34s %9s %9s %9s %8s   %s\n", "shape (rows x cols x 2048 vectors)", "dequant", "convert", "gemm",
           "TFLOPS", "error vs exact: max / rms, relative to the row's largest |term| sum");
    for (const Shape& s : shapes) {
        const u64 nb = (u64)s.rows * s.cols / 32;
        // Weights: levels uniform in [-127, 127], f16 scales of a typical magnitude.
        std::vector<BlockQ8> w(nb);
        for (auto& b : w) {
            b.d = f2h(0.002f + 0.004f * (rnd() & 1023) / 1024.0f);
            for (int i = 0; i < 32; i++) b.q[i] = (int8_t)((int)(rnd() % 255) - 127);
        }
        // Activations: unit scale with a few larger channels, as normalized hidden states have.
        std::vector<float> x((u64)n * s.cols);
        for (u64 i = 0; i < x.size(); i++) x[i] = rnd_unit() * ((i % s.cols) % 97 == 0 ? 8.0f : 1.0f);
        BlockQ8* dw;
        float *dx, *dy;
        __half *dwh, *dxh;
        CK(cudaMalloc(&dw, nb * sizeof(BlockQ8)));
        CK(cudaMalloc(&dx, x.size() * 4));
        CK(cudaMalloc(&dy, (u64)n * s.rows * 4));
        CK(cudaMalloc(&dwh, (u64)s.rows * s.cols * 2));
        CK(cudaMalloc(&dxh, x.size() * 2));
        CK(cudaMemcpy(dw, w.data(), nb * sizeof(BlockQ8), cudaMemcpyHostToDevice));
        CK(cudaMemcpy(dx, x.data(), x.size() * 4, cudaMemcpyHostToDevice));
        const float t_deq = median_ms([&] { dequant_q8_0<<<(unsigned)((nb + 255) / 256), 256, 0, st>>>(dw, dwh, nb); }, st, 10);
        const float t_cvt = median_ms([&] { f32_to_f16<<<(unsigned)((x.size() + 255) / 256), 256, 0, st>>>(dx, dxh, x.size()); }, st, 10);
        const float one = 1.0f, zero = 0.0f;
        // y[v * rows + r] = sum_k W[r][k] x[v][k]: column-major C (rows x n) = W^T (W as a cols x
        // rows column-major matrix) times X (cols x n).
        const float t_gemm = median_ms(
            [&] {
                CB(cublasGemmEx(h, CUBLAS_OP_T, CUBLAS_OP_N, s.rows, n, s.cols, &one, dwh, CUDA_R_16F, s.cols, dxh,
                                CUDA_R_16F, s.cols, &zero, dy, CUDA_R_32F, s.rows, CUBLAS_COMPUTE_32F,
                                CUBLAS_GEMM_DEFAULT));
            },
            st, 10);
        CK(cudaStreamSynchronize(st));
        std::vector<float> y((u64)n * s.rows);
        CK(cudaMemcpy(y.data(), dy, y.size() * 4, cudaMemcpyDeviceToHost));
        // Sampled outputs against the exact product (f64), both paths.
        double f16_max = 0, f16_sq = 0, q8_max = 0, q8_sq = 0;
        int samples = 0;
        for (int k = 0; k < 400; k++) {
            const int r = rnd() % s.rows, v = rnd() % n;
            const float* xv = &x[(u64)v * s.cols];
            double exact = 0, mag = 0;
            float q8 = 0;
            for (int b = 0; b < s.cols / 32; b++) {
                const BlockQ8& blk = w[(u64)r * (s.cols / 32) + b];
                const float d = h2f(blk.d);
                // ds4-gguf's quantize_q8_0_activation: d = amax / 127, levels rounded.
                float amax = 0;
                for (int i = 0; i < 32; i++) amax = std::max(amax, std::fabs(xv[32 * b + i]));
                const float dxq = amax / 127.0f, id = dxq != 0 ? 1.0f / dxq : 0.0f;
                int isum = 0;
                for (int i = 0; i < 32; i++) {
                    const double term = (double)d * blk.q[i] * xv[32 * b + i];
                    exact += term;
                    mag += std::fabs(term);
                    isum += blk.q[i] * (int)std::nearbyint(xv[32 * b + i] * id);
                }
                q8 = std::fma(d * dxq, (float)isum, q8);
            }
            const double ef = std::fabs(y[(u64)v * s.rows + r] - exact) / mag, eq = std::fabs(q8 - exact) / mag;
            f16_max = std::max(f16_max, ef);
            q8_max = std::max(q8_max, eq);
            f16_sq += ef * ef;
            q8_sq += eq * eq;
            samples++;
        }
        char name[64];
        snprintf(name, sizeof name, "%d x %d (%s)", s.rows, s.cols, s.what);
        printf("%-34s %7.1f us %7.1f us %7.1f us %8.1f   f16 %.2e / %.2e, Q8_0 activations %.2e / %.2e\n", name,
               t_deq * 1e3, t_cvt * 1e3, t_gemm * 1e3, 2.0 * s.rows * s.cols * n / (t_gemm * 1e-3) / 1e12, f16_max,
               std::sqrt(f16_sq / samples), q8_max, std::sqrt(q8_sq / samples));
        fflush(stdout);
        CK(cudaFree(dw));
        CK(cudaFree(dx));
        CK(cudaFree(dy));
        CK(cudaFree(dwh));
        CK(cudaFree(dxh));
    }
    CB(cublasDestroy(h));
    return 0;
}
