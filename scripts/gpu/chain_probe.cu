// The cost of one link of a chain of dependent kernels, replayed from a CUDA graph, three ways:
// (plain) stream order; (pdl-wait) programmatic dependent launch with griddepcontrol.wait at
// the kernel's start, as ds4-rs's kernels do (common.cuh PDL_ENTRY); (flag, flag-rel) programmatic
// launch with a release/acquire counter instead of the wait: what a grid barrier of a persistent
// kernel costs. Each kernel's CTAs read all of the previous kernel's values (a reduction, as a
// norm does) and write their own, so the chain is a real data dependency; the last values are
// checked. Shapes: one CTA of 512 threads (hc_pre_norm), 32, 256 (hc_post_mix) and 512
// (matvec) CTAs of 128; `work`: a dependent chain of that many FMAs per CTA. docs/speed-log.md,
// session 26. On the GPU machine (nvcc there, no Rust needed):
//   nvcc -O3 -std=c++17 -arch=sm_90a scripts/gpu/chain_probe.cu -o /tmp/chain_probe && /tmp/chain_probe
#include <cstdio>
#include <cstdlib>
#include <vector>
#include <cuda_runtime.h>

#define CK(x) do { cudaError_t e = (x); if (e != cudaSuccess) { printf("%s:%d %s\n", __FILE__, __LINE__, cudaGetErrorString(e)); exit(1); } } while (0)

__device__ __forceinline__ unsigned long long ld_acquire(const unsigned long long* p) {
    unsigned long long v;
    asm volatile("ld.acquire.gpu.global.u64 %0, [%1];" : "=l"(v) : "l"(p) : "memory");
    return v;
}

// mode 0: plain, 1: pdl wait, 2: flag (fence + atomic add), 3: flag (red.release).
// buf: 2 x ctas values (ping-pong), flags: one per link.
__global__ void chain_link(float* buf, unsigned long long* flags, int i, int ctas, int mode, int work) {
    if (mode == 1) asm volatile("griddepcontrol.wait;\n\tgriddepcontrol.launch_dependents;" ::: "memory");
    if (mode >= 2) {
        if (i > 0) {
            if (threadIdx.x == 0) {
                while (ld_acquire(&flags[i - 1]) < (unsigned long long)ctas) { }
            }
            __syncthreads();
        }
        asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
    }
    // Every CTA reads all of the previous link's values (a reduction, like a norm) and writes
    // its own.
    const float* prev = buf + ((i + 1) & 1) * ctas;
    float* cur = buf + (i & 1) * ctas;
    __shared__ float red[32];
    float s = 0.f;
    for (int k = threadIdx.x; k < ctas; k += blockDim.x) s += __ldcg(prev + k);
    for (int o = 16; o; o >>= 1) s += __shfl_xor_sync(~0u, s, o);
    if ((threadIdx.x & 31) == 0) red[threadIdx.x >> 5] = s;
    __syncthreads();
    if (threadIdx.x == 0) {
        float t = 0.f;
        for (int w = 0; w < (int)blockDim.x / 32; w++) t += red[w];
        float w = t;
        for (int r = 0; r < work; r++) w = fmaf(w, 0.999f, 1.f);  // a dependent chain of `work` FMAs
        __stcg(cur + blockIdx.x, t / ctas + 1.f + w * 0.f);
        if (mode == 2) {
            __threadfence();
            atomicAdd(&flags[i], 1ull);
        } else if (mode == 3) {
            asm volatile("red.release.gpu.global.add.u64 [%0], 1;" ::"l"(&flags[i]) : "memory");
        }
    }
}

int main() {
    int links = 400, reps = 50;
    int dev = 0;
    CK(cudaSetDevice(dev));
    cudaDeviceProp p;
    CK(cudaGetDeviceProperties(&p, dev));
    printf("%s, %d SMs\n", p.name, p.multiProcessorCount);
    struct Shape { int ctas, threads; const char* what; } shapes[] = {
        {1, 512, "1 CTA x 512 (hc_pre_norm-like)"},
        {32, 128, "32 CTAs x 128"},
        {256, 128, "256 CTAs x 128 (hc_post_mix-like)"},
        {512, 128, "512 CTAs x 128 (matvec-like)"},
    };
    const char* names[] = {"plain", "pdl-wait", "flag", "flag-rel"};
    float* buf;
    unsigned long long* flags;
    CK(cudaMalloc(&buf, 2 * 4096 * sizeof(float)));
    CK(cudaMalloc(&flags, links * sizeof(unsigned long long)));
    cudaStream_t st;
    CK(cudaStreamCreateWithFlags(&st, cudaStreamNonBlocking));
    for (auto& sh : shapes) {
        for (int work : {0, 200}) {
            for (int mode = 0; mode < 4; mode++) {
                CK(cudaMemsetAsync(buf, 0, 2 * 4096 * sizeof(float), st));
                CK(cudaStreamBeginCapture(st, cudaStreamCaptureModeThreadLocal));
                CK(cudaMemsetAsync(flags, 0, links * sizeof(unsigned long long), st));
                for (int i = 0; i < links; i++) {
                    cudaLaunchConfig_t cfg = {};
                    cfg.gridDim = dim3(sh.ctas);
                    cfg.blockDim = dim3(sh.threads);
                    cfg.stream = st;
                    cudaLaunchAttribute at[1];
                    at[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
                    at[0].val.programmaticStreamSerializationAllowed = 1;
                    cfg.attrs = at;
                    cfg.numAttrs = (mode > 0 && i > 0) ? 1 : 0;
                    CK(cudaLaunchKernelEx(&cfg, chain_link, buf, flags, i, sh.ctas, mode, work));
                }
                cudaGraph_t g;
                CK(cudaStreamEndCapture(st, &g));
                cudaGraphExec_t ge;
                CK(cudaGraphInstantiate(&ge, g, 0));
                CK(cudaGraphLaunch(ge, st));
                CK(cudaStreamSynchronize(st));
                cudaEvent_t a, b;
                CK(cudaEventCreate(&a));
                CK(cudaEventCreate(&b));
                CK(cudaEventRecord(a, st));
                for (int r = 0; r < reps; r++) CK(cudaGraphLaunch(ge, st));
                CK(cudaEventRecord(b, st));
                CK(cudaStreamSynchronize(st));
                float ms;
                CK(cudaEventElapsedTime(&ms, a, b));
                // Check: every value of the last link equals the chain's expected value.
                std::vector<float> h(2 * 4096);
                CK(cudaMemcpy(h.data(), buf, h.size() * 4, cudaMemcpyDeviceToHost));
                const float* last = h.data() + ((links - 1) & 1) * sh.ctas;
                bool same = true;
                for (int k = 1; k < sh.ctas; k++) same &= last[k] == last[0];
                same &= last[0] == (float)(links * (reps + 1));
                printf("%-36s work %3d %-8s %8.3f us/link  (values as expected: %s, %g)\n", sh.what, work,
                       names[mode], ms * 1000.f / (reps * links), same ? "yes" : "NO", last[0]);
                CK(cudaEventDestroy(a));
                CK(cudaEventDestroy(b));
                CK(cudaGraphExecDestroy(ge));
                CK(cudaGraphDestroy(g));
            }
        }
    }
    return 0;
}
