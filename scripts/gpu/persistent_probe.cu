// How fast can a decode FFN's weights stream when one persistent kernel (one CTA per SM) stages
// each CTA's share of the next stage in shared memory while it waits for the stage's input,
// against a chain of one kernel per stage (programmatic dependent launch, replayed from a CUDA
// graph, as ds4-rs decodes today)? The premise test of docs/decode-persistent.md, before any
// of the real kernel is written.
//
// The work is synthetic but shaped like the q2 Flash FFN: four stages of 2.10 MB (router),
// 17.83 MB (shared expert gate + up), 25.95 MB (routed gate + up) and 25.43 MB (routed and
// shared down) a layer, 43 layers a run, the layers cycling through 8 copies of the weights
// (570 MB) so that no layer finds its weights in L2. A stage depends on the one before: every
// CTA reads the previous stage's whole output vector (4 096 words, as a matvec reads its
// activations), reduces it and runs `work` dependent operations (the glue), then combines every
// 16-byte piece of its share of the stage's weights through `alu` dependent steps of three
// integer instructions each, per stage (a stand-in for dequantization: "q2-like" is ~144
// instructions per 16 bytes of IQ2_XXS, what gemv_iq2_xxs_q8x_nb1's item loop issues (~148 an
// item of 2 rows x 8 quant bytes), ~54 for the down stage's Q2_K / Q8_0 mix, ~12 for the Q8_0
// and F16 ones) and writes its part of the stage's output. The glue either
// runs in every CTA of the stage ("fold") or, as in ds4-rs, in a one-CTA kernel between the
// stages ("glue kernel"). Every run's final value is checked against the host's model of the
// same arithmetic, so a stage that read its input before it was complete shows as a mismatch.
// A watchdog ends the persistent kernel's waits after ~1 s (reported as "timeout"), so a
// missing CTA cannot hang the device.
//
// On the GPU machine (nvcc there, no Rust needed):
//   nvcc -O3 -std=c++17 -arch=sm_90a scripts/gpu/persistent_probe.cu -o /tmp/pp && /tmp/pp [REPS]
// Session 32's H200 results and what they say: docs/decode-persistent.md, "The premise,
// measured" (the persistent variants gain 2 % on the chain with q2-like arithmetic).
#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <vector>
#include <cuda_runtime.h>

#define CK(x) do { cudaError_t e = (x); if (e != cudaSuccess) { printf("%s:%d %s\n", __FILE__, __LINE__, cudaGetErrorString(e)); exit(1); } } while (0)

typedef uint32_t u32;
typedef uint64_t u64;

#define MAX_STAGES 4
#define COPIES 8         // distinct weight copies the layers cycle through
#define MAX_ACT_WORDS 24576  // the most output words a stage writes for the next to read
#define CHUNK 16384      // bytes of one shared-memory stage buffer of the persistent kernel
#define NBUF 12          // its buffers: 192 KB of weights in flight or staged per SM
#define CHAIN_THREADS 128
#define CHAIN_U 4        // 16-byte loads in flight per thread of a chain kernel

struct Shape {
    int n_stages;
    u64 bytes[MAX_STAGES];   // multiples of 16
    u64 offset[MAX_STAGES];  // within a layer's copy
    u64 layer_bytes;
};

struct Params {
    const uint8_t* w;  // COPIES x layer_bytes
    Shape sh;
    int n_layers;
    u32* act;          // 2 x act_words (stage q writes half q & 1)
    int per;           // output words per CTA; act_words = per x grid
    u32* counters;     // persistent: CTAs done per stage (n_layers x n_stages), zeroed per run
    u32* xin;          // chain: each stage's input value (n_layers x n_stages + 1)
    u32 seed;
    int alu[MAX_STAGES];  // dependent 3-instruction steps per 16-byte piece, per stage
    int work;
    u32* result;       // the value after the last stage
    u32* timeout;      // set by a persistent wait that gave up
};

__host__ __device__ __forceinline__ u64 min_u64(u64 a, u64 b) { return a < b ? a : b; }

// ---- the arithmetic (the host model repeats it) ----
__host__ __device__ __forceinline__ u32 lcg(u32 v) { return v * 1664525u + 1013904223u; }
__host__ __device__ __forceinline__ u32 piece_value(u32 a, u32 b, u32 c, u32 d, int alu) {
    u32 v = a + b + c + d;
    for (int k = 0; k < alu; k++) v = v * 1664525u + (a ^ (u32)k);
    return v;
}
__host__ __device__ __forceinline__ u32 glue(u32 t, u32 x_prev, u32 act_words, int work) {
    // t = per x sum_c (S_c + x_prev) = per S + act_words x_prev, so this is per S + x_prev.
    u32 x = t - (act_words - 1u) * x_prev;
    for (int k = 0; k < work; k++) x = lcg(x);
    return x;
}
__host__ __device__ __forceinline__ u32 weight_word(u64 i) {
    u32 z = (u32)i * 0x9E3779B9u + (u32)(i >> 32);
    z = (z ^ (z >> 16)) * 0x85EBCA6Bu;
    z = (z ^ (z >> 13)) * 0xC2B2AE35u;
    return z ^ (z >> 16);
}

__global__ void fill_weights(u32* w, u64 words) {
    for (u64 i = (u64)blockIdx.x * blockDim.x + threadIdx.x; i < words; i += (u64)gridDim.x * blockDim.x)
        w[i] = weight_word(i);
}

// ---- device helpers ----
__device__ __forceinline__ u32 smem_u32(const void* p) { return (u32)__cvta_generic_to_shared(p); }
__device__ __forceinline__ u32 ld_acquire(const u32* p) {
    u32 v;
    asm volatile("ld.acquire.gpu.global.u32 %0, [%1];" : "=r"(v) : "l"(p) : "memory");
    return v;
}
// As the engine's matvecs stream weights (common.cuh load_stream16; the probe stands alone).
__device__ __forceinline__ uint4 ld_stream(const void* p) {
    uint4 v;
    asm volatile("ld.global.nc.L1::no_allocate.L2::256B.v4.u32 {%0, %1, %2, %3}, [%4];"
                 : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
                 : "l"(p));
    return v;
}
// Sum over the CTA, the same value in every thread (two barriers; red has a slot per warp).
__device__ __forceinline__ u32 block_sum(u32 v, u32* red) {
    for (int o = 16; o; o >>= 1) v += __shfl_xor_sync(~0u, v, o);
    const int warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
    __syncthreads();  // red's previous use is over
    if ((threadIdx.x & 31) == 0) red[warp] = v;
    __syncthreads();
    u32 t = 0;
    for (int k = 0; k < warps; k++) t += red[k];
    return t;
}
// CTA c's share of stage s: pieces [P c / G, P (c + 1) / G) of the stage's P 16-byte pieces.
__device__ __forceinline__ void share(const Shape& sh, int s, int c, int G, u64* first_byte, u64* len) {
    const u64 P = sh.bytes[s] / 16, a = P * c / G, e = P * (c + 1) / G;
    *first_byte = a * 16;
    *len = (e - a) * 16;
}
// A stage's input from the previous stage's output half (every thread calls it).
__device__ __forceinline__ u32 read_input(const Params& p, int q, u32 x_prev, int act_words, u32* red) {
    const u32* act = p.act + ((q - 1) & 1) * act_words;
    u32 t = 0;
    for (int i = threadIdx.x; i < act_words; i += blockDim.x) t += __ldcg(act + i);
    return glue(block_sum(t, red), x_prev, (u32)act_words, p.work);
}

// ---- the persistent kernel: one CTA per SM ----
__device__ __forceinline__ void mbar_init(u32 bar) { asm volatile("mbarrier.init.shared::cta.b64 [%0], 1;" ::"r"(bar) : "memory"); }
__device__ __forceinline__ void copy_chunk(u32 dst, const void* src, u32 bytes, u32 bar) {
    asm volatile(
        "fence.proxy.async.shared::cta;\n\t"
        "mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" ::"r"(bar),
        "r"(bytes)
        : "memory");
    asm volatile("cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];" ::"r"(dst),
                 "l"(src), "r"(bytes), "r"(bar)
                 : "memory");
}
__device__ __forceinline__ bool mbar_wait(u32 bar, u32 parity, u32* timeout) {
    const long long t0 = clock64();
    u32 done = 0;
    while (true) {
        asm volatile(
            "{\n\t.reg .pred p;\n\tmbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\n\tselp.u32 %0, 1, 0, p;\n\t}"
            : "=r"(done)
            : "r"(bar), "r"(parity)
            : "memory");
        if (done) return true;
        if (clock64() - t0 > 2000000000ll) {
            atomicExch(timeout, 1u);
            return false;
        }
    }
}
__device__ __forceinline__ void wait_count(const u32* counter, u32 target, u32* timeout) {
    const long long t0 = clock64();
    while (ld_acquire(counter) < target) {
        if (clock64() - t0 > 2000000000ll) {
            atomicExch(timeout, 1u);
            return;
        }
    }
}

// A ring owner's copy cursor: the next chunk of its sequence of shares (layer by layer, stage
// by stage), which weights alone decide, so it runs ahead of the stages' inputs.
struct Cursor {
    int layer, stage;
    u64 done;    // bytes of the current share already issued
    u64 issued;  // chunks issued
};

// One CTA per SM, streaming every stage's share of the weights through shared-memory rings
// while it waits for the stage's input (counters between stages). Two ways to own the rings:
//  - WARP_RINGS false: one ring of NBUF 16 KB buffers for the CTA, thread 0 issuing the copies,
//    a CTA barrier after every chunk ("persistent N");
//  - WARP_RINGS true: every warp its own three buffers and its part of the CTA's share, lane 0
//    refilling a buffer as soon as its warp is done with it, as the engine's matvecs stage their
//    rows ("warp rings N").
// The same 192 KB of weights are in flight or staged per SM either way.
#define BAR_BYTES 1024             // up to 128 mbarriers
#define RING_BYTES (NBUF * CHUNK)  // 192 KB
#define WARP_BUFS 3
template <int THREADS, bool WARP_RINGS>
__global__ void __launch_bounds__(THREADS, 1) persistent_ffn(Params p) {
    constexpr int WARPS = THREADS / 32;
    constexpr int OWNERS = WARP_RINGS ? WARPS : 1;       // rings per CTA
    constexpr int BUFS = WARP_RINGS ? WARP_BUFS : NBUF;  // buffers per ring
    constexpr u32 CS = WARP_RINGS ? (RING_BYTES / WARPS / WARP_BUFS) / 16 * 16 : CHUNK;  // buffer bytes
    constexpr int SHARERS = WARP_RINGS ? 32 : THREADS;   // threads reading one ring
    static_assert(OWNERS * BUFS * 8 <= BAR_BYTES, "barriers");
    extern __shared__ __align__(128) uint8_t smem[];
    __shared__ u32 red[32];
    const int G = gridDim.x, c = blockIdx.x, tid = threadIdx.x;
    const int owner = WARP_RINGS ? tid >> 5 : 0, rank = WARP_RINGS ? tid & 31 : tid;  // rank in the ring's threads
    const int act_words = p.per * G;
    const u32 bars = smem_u32(smem) + 8 * BUFS * owner;
    const u32 ring = smem_u32(smem) + BAR_BYTES + owner * BUFS * CS;
    const uint8_t* ring_ptr = smem + BAR_BYTES + owner * BUFS * CS;
    auto ring_sync = [] {
        if (WARP_RINGS)
            __syncwarp();
        else
            __syncthreads();
    };
    if (rank == 0) {
        for (int b = 0; b < BUFS; b++) mbar_init(bars + 8 * b);
        asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
    }
    ring_sync();
    // The ring's part of the CTA's share of stage s (16-byte pieces split over the rings).
    auto ring_share = [&](int s, u64* first, u64* len) {
        u64 f, n;
        share(p.sh, s, c, G, &f, &n);
        const u64 P = n / 16, a = P * owner / OWNERS, e = P * (owner + 1) / OWNERS;
        *first = f + a * 16;
        *len = (e - a) * 16;
    };
    Cursor cur = {0, 0, 0, 0};
    auto issue_next = [&]() {  // the ring's rank 0 only
        while (cur.layer < p.n_layers) {
            u64 first, len;
            ring_share(cur.stage, &first, &len);
            if (cur.done < len) {
                const u32 n = (u32)min_u64(CS, len - cur.done);
                const uint8_t* src = p.w + (u64)(cur.layer % COPIES) * p.sh.layer_bytes + p.sh.offset[cur.stage] + first + cur.done;
                const u32 b = (u32)(cur.issued % BUFS);
                copy_chunk(ring + b * CS, src, n, bars + 8 * b);
                cur.done += n;
                cur.issued++;
                return;
            }
            cur.done = 0;
            if (++cur.stage == p.sh.n_stages) cur.stage = 0, cur.layer++;
        }
    };
    if (rank == 0)
        for (int b = 0; b < BUFS; b++) issue_next();
    u64 consumed = 0;
    u32 x = p.seed;
    for (int l = 0; l < p.n_layers; l++) {
        for (int s = 0; s < p.sh.n_stages; s++) {
            const int q = l * p.sh.n_stages + s;
            if (q > 0) {
                if (tid == 0) wait_count(p.counters + q - 1, (u32)G, p.timeout);
                __syncthreads();
                x = read_input(p, q, x, act_words, red);
            }
            u64 first, len;
            ring_share(s, &first, &len);
            u32 acc = 0;
            for (u64 off = 0; off < len; off += CS) {
                const u32 n = (u32)min_u64(CS, len - off);
                const u32 b = (u32)(consumed % BUFS);
                mbar_wait(bars + 8 * b, (u32)((consumed / BUFS) & 1), p.timeout);
                const uint4* pc = (const uint4*)(ring_ptr + b * CS);
                for (u32 i = rank; i < n / 16; i += SHARERS) {
                    const uint4 v = pc[i];
                    acc += piece_value(v.x, v.y, v.z, v.w, p.alu[s]);
                }
                ring_sync();  // the ring's threads are done with buffer b: refill it
                if (rank == 0) issue_next();
                consumed++;
            }
            const u32 r = block_sum(acc, red) + x;
            u32* act = p.act + (q & 1) * act_words;
            for (int j = tid; j < p.per; j += THREADS) act[c * p.per + j] = r;
            __syncthreads();
            if (tid == 0) {
                __threadfence();
                asm volatile("red.release.gpu.global.add.u32 [%0], 1;" ::"l"(p.counters + q) : "memory");
            }
        }
    }
    if (c == 0) {
        const int q = p.n_layers * p.sh.n_stages;
        if (tid == 0) wait_count(p.counters + q - 1, (u32)G, p.timeout);
        __syncthreads();
        x = read_input(p, q, x, act_words, red);
        if (tid == 0) *p.result = x;
    }
}

// ---- the chain: one kernel per stage (and, with glue kernels, one between stages) ----
// Stage q = (l, s): its input from xin[q] (glue kernel) or, folded, from the previous
// stage's outputs read by every CTA (then CTA 0 records it in xin[q] for the next stage).
template <bool FOLD>
__global__ void __launch_bounds__(CHAIN_THREADS) chain_stage(Params p, int l, int s, int q) {
    __shared__ u32 red[32];
    const int G = gridDim.x, c = blockIdx.x, tid = threadIdx.x;
    const int act_words = p.per * G;
    u64 first, len;
    share(p.sh, s, c, G, &first, &len);
    const uint8_t* w = p.w + (u64)(l % COPIES) * p.sh.layer_bytes + p.sh.offset[s] + first;
    const u64 pieces = len / 16;
    // Weights do not depend on the previous kernel: the first loads go out before the wait.
    uint4 v[CHAIN_U];
#pragma unroll
    for (int u = 0; u < CHAIN_U; u++) {
        const u64 i = tid + (u64)u * CHAIN_THREADS;
        if (i < pieces) v[u] = ld_stream(w + 16 * i);
    }
    asm volatile("griddepcontrol.wait;\n\tgriddepcontrol.launch_dependents;" ::: "memory");
    u32 x;
    if (q == 0) {
        x = p.seed;
    } else if (FOLD) {
        x = read_input(p, q, __ldcg(p.xin + q - 1), p.per * G, red);
        if (c == 0 && tid == 0) p.xin[q] = x;
    } else {
        x = __ldcg(p.xin + q);
    }
    if (q == 0 && c == 0 && tid == 0) p.xin[0] = x;
    u32 acc = 0;
    for (u64 base = 0; base < pieces; base += (u64)CHAIN_U * CHAIN_THREADS) {
#pragma unroll
        for (int u = 0; u < CHAIN_U; u++) {
            const u64 i = base + tid + (u64)u * CHAIN_THREADS;
            if (i < pieces) acc += piece_value(v[u].x, v[u].y, v[u].z, v[u].w, p.alu[s]);
        }
#pragma unroll
        for (int u = 0; u < CHAIN_U; u++) {
            const u64 i = base + (u64)CHAIN_U * CHAIN_THREADS + tid + (u64)u * CHAIN_THREADS;
            if (i < pieces) v[u] = ld_stream(w + 16 * i);
        }
    }
    const u32 r = block_sum(acc, red) + x;
    u32* act = p.act + (q & 1) * act_words;
    for (int j = tid; j < p.per; j += CHAIN_THREADS) act[c * p.per + j] = r;
}

// The glue as its own one-CTA kernel: stage q's input (q = n_stages x n_layers: the result).
__global__ void __launch_bounds__(256) chain_glue(Params p, int q, int stage_grid) {
    __shared__ u32 red[32];
    asm volatile("griddepcontrol.wait;\n\tgriddepcontrol.launch_dependents;" ::: "memory");
    const u32 x = read_input(p, q, __ldcg(p.xin + q - 1), p.per * stage_grid, red);
    if (threadIdx.x == 0) {
        p.xin[q] = x;
        if (q == p.n_layers * p.sh.n_stages) *p.result = x;
    }
}

// ---- host ----
static Shape make_shape(std::vector<u64> bytes) {
    Shape sh = {};
    sh.n_stages = (int)bytes.size();
    u64 off = 0;
    for (int s = 0; s < sh.n_stages; s++) {
        sh.bytes[s] = bytes[s] / 16 * 16;
        sh.offset[s] = off;
        off += sh.bytes[s];
    }
    sh.layer_bytes = off;
    return sh;
}

// The sum of piece_value over stage s of copy k (independent of how CTAs share it).
static u32 stage_sum(const Shape& sh, int k, int s, int alu) {
    const u64 w0 = ((u64)k * sh.layer_bytes + sh.offset[s]) / 4;
    u32 t = 0;
    for (u64 i = 0; i < sh.bytes[s] / 4; i += 4)
        t += piece_value(weight_word(w0 + i), weight_word(w0 + i + 1), weight_word(w0 + i + 2), weight_word(w0 + i + 3), alu);
    return t;
}

static u32 expected(const Shape& sh, const std::vector<u32>& sums, int n_layers, int per, int act_words, u32 seed, int work) {
    u32 x = seed;
    for (int l = 0; l < n_layers; l++)
        for (int s = 0; s < sh.n_stages; s++) {
            const u32 r_sum = sums[(l % COPIES) * sh.n_stages + s];  // S; every CTA adds x
            const u32 t = (u32)per * r_sum + (u32)act_words * x;
            x = glue(t, x, (u32)act_words, work);
        }
    return x;
}

int main(int argc, char** argv) {
    const int n_layers = 43, reps = argc > 1 ? atoi(argv[1]) : 10;
    CK(cudaSetDevice(0));
    cudaDeviceProp prop;
    CK(cudaGetDeviceProperties(&prop, 0));
    const int sms = prop.multiProcessorCount;
    printf("%s, %d SMs, %.0f MB L2\n", prop.name, sms, prop.l2CacheSize / 1e6);
    // Each configuration: the arithmetic per stage (alu: dependent steps of 3 instructions per
    // 16 weight bytes), work (dependent operations of the glue) and the words a stage's output has
    // (at least; rounded up to whole CTAs): 4 096 as a 4 096-row matvec's, 24 576 (96 KB) as the
    // six experts' gate and up values that the down projections read.
    struct Config { const char* alu_name; int alu[MAX_STAGES]; int work, act; };
    const Config none = {"none", {0, 0, 0, 0}, 0, 4096};
    const Config q2 = {"q2-like", {4, 4, 48, 18}, 200, 4096};
    struct Case { const char* what; std::vector<u64> bytes; std::vector<Config> configs; } cases[] = {
        {"FFN q2 (4 stages)", {2100000, 17830000, 25950000, 25430000},
         {none, {"none", {0, 0, 0, 0}, 200, 4096}, q2, {"q2-like", {4, 4, 48, 18}, 1000, 4096},
          {"q2-like", {4, 4, 48, 18}, 200, 24576}, {"half", {2, 2, 24, 9}, 200, 4096}}},
        // The bytes-weighted mean of q2-like's arithmetic.
        {"same bytes, 1 stage", {71310000}, {none, {"q2-like", {25, 0, 0, 0}, 200, 4096}}},
    };
    u64 max_layer = 0;
    for (auto& cs : cases) max_layer = std::max(max_layer, make_shape(cs.bytes).layer_bytes);
    uint8_t* w;
    CK(cudaMalloc(&w, COPIES * max_layer + 16));
    fill_weights<<<4 * sms, 256>>>((u32*)w, COPIES * max_layer / 4);
    CK(cudaGetLastError());
    u32 *act, *counters, *xin, *result, *timeout;
    const int max_q = n_layers * MAX_STAGES + 1;
    const int chain_grid = 8 * sms;
    CK(cudaMalloc(&act, 2 * (MAX_ACT_WORDS + chain_grid) * sizeof(u32)));
    CK(cudaMalloc(&counters, max_q * sizeof(u32)));
    CK(cudaMalloc(&xin, max_q * sizeof(u32)));
    CK(cudaMalloc(&result, sizeof(u32)));
    CK(cudaMalloc(&timeout, sizeof(u32)));
    CK(cudaMemset(timeout, 0, sizeof(u32)));
    const int smem = BAR_BYTES + RING_BYTES;
    CK(cudaFuncSetAttribute(persistent_ffn<256, false>, cudaFuncAttributeMaxDynamicSharedMemorySize, smem));
    CK(cudaFuncSetAttribute(persistent_ffn<512, false>, cudaFuncAttributeMaxDynamicSharedMemorySize, smem));
    CK(cudaFuncSetAttribute(persistent_ffn<512, true>, cudaFuncAttributeMaxDynamicSharedMemorySize, smem));
    CK(cudaFuncSetAttribute(persistent_ffn<1024, true>, cudaFuncAttributeMaxDynamicSharedMemorySize, smem));
    cudaStream_t st;
    CK(cudaStreamCreateWithFlags(&st, cudaStreamNonBlocking));
    printf("%-20s %-23s %8s %5s %6s %9s %8s  %s\n", "weights", "variant", "alu", "work", "act KB", "us/layer", "GB/s",
           "check");
    for (auto& cs : cases) {
        const Shape sh = make_shape(cs.bytes);
        std::vector<u32> sums(COPIES * sh.n_stages);
        for (const Config& cf : cs.configs) {
            const int work = cf.work;
            for (int k = 0; k < COPIES; k++)
                for (int s = 0; s < sh.n_stages; s++) sums[k * sh.n_stages + s] = stage_sum(sh, k, s, cf.alu[s]);
            for (int variant = 0; variant < 6; variant++) {
                const bool persistent = variant < 2 || variant >= 4;
                const int grid = persistent ? sms : chain_grid;
                const int per = (cf.act + grid - 1) / grid;
                Params p = {w, sh, n_layers, act, per, counters, xin, 0x1234567u, {}, work, result, timeout};
                for (int s = 0; s < MAX_STAGES; s++) p.alu[s] = cf.alu[s];
                const char* names[] = {"persistent 256 threads", "persistent 512 threads", "chain, glue folded",
                                       "chain, glue kernels",    "warp rings 512 threads", "warp rings 1024 threads"};
                cudaGraphExec_t ge = nullptr;
                cudaGraph_t g = nullptr;
                CK(cudaStreamBeginCapture(st, cudaStreamCaptureModeThreadLocal));
                if (persistent) {
                    CK(cudaMemsetAsync(counters, 0, max_q * sizeof(u32), st));
                    if (variant == 0)
                        persistent_ffn<256, false><<<sms, 256, smem, st>>>(p);
                    else if (variant == 1)
                        persistent_ffn<512, false><<<sms, 512, smem, st>>>(p);
                    else if (variant == 4)
                        persistent_ffn<512, true><<<sms, 512, smem, st>>>(p);
                    else
                        persistent_ffn<1024, true><<<sms, 1024, smem, st>>>(p);
                    CK(cudaGetLastError());
                } else {
                    const bool fold = variant == 2;
                    bool first = true;
                    auto launch = [&](auto kernel, int ctas, int threads, auto... args) {
                        cudaLaunchConfig_t cfg = {};
                        cfg.gridDim = dim3(ctas);
                        cfg.blockDim = dim3(threads);
                        cfg.stream = st;
                        cudaLaunchAttribute at[1];
                        at[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
                        at[0].val.programmaticStreamSerializationAllowed = 1;
                        cfg.attrs = at;
                        cfg.numAttrs = first ? 0 : 1;
                        first = false;
                        CK(cudaLaunchKernelEx(&cfg, kernel, args...));
                    };
                    for (int l = 0; l < n_layers; l++)
                        for (int s = 0; s < sh.n_stages; s++) {
                            const int q = l * sh.n_stages + s;
                            if (!fold && q > 0) launch(chain_glue, 1, 256, p, q, grid);
                            if (fold)
                                launch(chain_stage<true>, grid, CHAIN_THREADS, p, l, s, q);
                            else
                                launch(chain_stage<false>, grid, CHAIN_THREADS, p, l, s, q);
                        }
                    // The result (folded: the last stage's outputs read as the next input).
                    launch(chain_glue, 1, 256, p, n_layers * sh.n_stages, grid);
                }
                CK(cudaStreamEndCapture(st, &g));
                CK(cudaGraphInstantiate(&ge, g, 0));
                CK(cudaMemsetAsync(result, 0, sizeof(u32), st));
                CK(cudaGraphLaunch(ge, st));  // warm-up
                CK(cudaStreamSynchronize(st));
                std::vector<float> times;
                bool ok = true;
                u32 got = 0;
                const u32 want = expected(sh, sums, n_layers, per, per * grid, p.seed, work);
                for (int r = 0; r < reps; r++) {
                    cudaEvent_t a, b;
                    CK(cudaEventCreate(&a));
                    CK(cudaEventCreate(&b));
                    CK(cudaMemsetAsync(result, 0, sizeof(u32), st));
                    CK(cudaEventRecord(a, st));
                    CK(cudaGraphLaunch(ge, st));
                    CK(cudaEventRecord(b, st));
                    CK(cudaStreamSynchronize(st));
                    float ms;
                    CK(cudaEventElapsedTime(&ms, a, b));
                    times.push_back(ms);
                    CK(cudaMemcpy(&got, result, sizeof(u32), cudaMemcpyDeviceToHost));
                    ok &= got == want;
                    CK(cudaEventDestroy(a));
                    CK(cudaEventDestroy(b));
                }
                u32 to = 0;
                CK(cudaMemcpy(&to, timeout, sizeof(u32), cudaMemcpyDeviceToHost));
                std::sort(times.begin(), times.end());
                const double us = times[times.size() / 2] * 1000.0 / n_layers;
                printf("%-20s %-23s %8s %5d %6.1f %9.2f %8.0f  %s%s\n", cs.what, names[variant], cf.alu_name, work,
                       per * grid * 4 / 1024.0, us, sh.layer_bytes / us / 1e3, ok ? "ok" : "MISMATCH",
                       to ? " timeout" : "");
                fflush(stdout);
                CK(cudaGraphExecDestroy(ge));
                CK(cudaGraphDestroy(g));
            }
        }
    }
    return 0;
}
