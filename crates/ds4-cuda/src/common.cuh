// Device helpers shared by every ds4 kernel module. Prepended to each module's source before
// NVRTC compiles it, so the kernels need no CUDA headers (NVRTC has no include path here).

typedef unsigned char u8;
typedef signed char i8;
typedef unsigned short u16;
typedef short i16;
typedef unsigned int u32;
typedef int i32;
typedef unsigned long long u64;
typedef long long i64;

#define FULL_MASK 0xffffffffu

// Every kernel begins with PDL_ENTRY(). Kernels are launched with programmatic dependent
// launch (device.rs, KernelArgs::launch): the GPU may schedule a kernel's CTAs while the
// previous kernel of the stream still runs. griddepcontrol.wait blocks until that kernel has
// completed and its memory writes are visible, so nothing is read or written early;
// launch_dependents then lets the next kernel be scheduled the same way once every CTA of
// this one has started. The next kernel's launch latency hides behind this one's run.
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
#define PDL_ENTRY() asm volatile("griddepcontrol.wait;\n\tgriddepcontrol.launch_dependents;" ::: "memory")
#else
#define PDL_ENTRY() \
    do {           \
    } while (0)
#endif
// PDL_ENTRY_AFTER(work): `work` (a statement, which may declare a variable for the rest of the
// kernel), then PDL_ENTRY(). It runs while the previous kernel still does, so it may read only
// what that kernel does not write: constant tables uploaded once, or (attend_split_values) the
// outputs of the kernels before it, which have completed by then (this kernel is scheduled only
// after every CTA of the previous one passed its own wait), read through L2 (.cg) so that no
// stale L1 line is seen. Two statements: use it as a kernel's first, in place of PDL_ENTRY().
#define PDL_ENTRY_AFTER(...) \
    __VA_ARGS__;             \
    PDL_ENTRY()

__device__ __forceinline__ i64 min64(i64 a, i64 b) { return a < b ? a : b; }

// An RMS norm's scale (float)(1 / sqrt(ss / n + eps)) for a sum of squares ss over n > 0
// values, in f64 as the CPU reference. When n is a power of two (the model's widths), ss / n
// is ss times the exact reciprocal 2^-k: the same real number rounded once, so the same bits,
// without the f64 division's subroutine on a kernel's serial chain.
__device__ __forceinline__ float rms_scale(double ss, i64 n, double eps) {
    double mean;
    if (n > 0 && (n & (n - 1)) == 0) {
        const int k = 63 - __clzll(n);
        mean = ss * __longlong_as_double((long long)(1023 - k) << 52);
    } else {
        mean = ss / (double)n;
    }
    return (float)(1.0 / sqrt(mean + eps));
}

// IEEE half <-> float with the hardware conversion instructions (round to nearest even).
__device__ __forceinline__ float f16_to_f32(u16 h) {
    float f;
    asm("{ .reg .b16 t; mov.b16 t, %1; cvt.f32.f16 %0, t; }" : "=f"(f) : "h"(h));
    return f;
}
__device__ __forceinline__ u16 f32_to_f16(float f) {
    u16 h;
    asm("{ .reg .b16 t; cvt.rn.f16.f32 t, %1; mov.b16 %0, t; }" : "=h"(h) : "f"(f));
    return h;
}

// Four signed 8-bit products summed into c (sm_61+).
__device__ __forceinline__ int dp4a(int a, int b, int c) {
    int r;
    asm("dp4a.s32.s32 %0, %1, %2, %3;" : "=r"(r) : "r"(a), "r"(b), "r"(c));
    return r;
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(FULL_MASK, v, o);
    return v;
}
__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(FULL_MASK, v, o));
    return v;
}

// A streaming 16-byte load of weights: read-only, not kept in L1 (the activations live there),
// with a 256-byte L2 prefetch because the next bytes of the row are read next.
__device__ __forceinline__ uint4 load_stream16(const u8* p) {
    uint4 v;
    asm volatile("ld.global.nc.L1::no_allocate.L2::256B.v4.u32 {%0,%1,%2,%3}, [%4];"
                 : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
                 : "l"(p));
    return v;
}

// Little-endian reads from byte addresses with the alignment the block formats guarantee.
__device__ __forceinline__ u16 rd16(const u8* p) { return *(const u16*)p; }
__device__ __forceinline__ u32 rd32_a2(const u8* p) {  // 2-byte aligned
    const u16* q = (const u16*)p;
    return (u32)q[0] | ((u32)q[1] << 16);
}
__device__ __forceinline__ u32 rd32(const u8* p) { return *(const u32*)p; }  // 4-byte aligned

// Sign-extends byte j of w.
__device__ __forceinline__ int sbyte(u32 w, int j) { return ((int)(w << (24 - 8 * j))) >> 24; }

// ---- ggml block formats (sizes in bytes; element counts per block) ----
// Q8_0   (34 B / 32):  f16 d | i8 q[32]                       x = d*q
// Q2_K   (84 B / 256): u8 scales[16] | u8 qs[64] | f16 d | f16 dmin
//                      x = d*(sc&15)*q - dmin*(sc>>4) per 16; q = 2 bits of qs
// Q4_K  (144 B / 256): f16 d | f16 dmin | u8 scales[12] | u8 qs[128]
//                      x = d*sc*q - dmin*m per 32 (6-bit packed scale/min)
// IQ2_XXS (66 B / 256): f16 d | u16 qs[32]; per 32 elements two u32 words a0 (4 grid
//                      indices), a1 (4 x 7-bit sign indices, 4-bit scale in the top bits)
#define QK8_0 32
#define QK_K 256
#define Q8_0_BYTES 34
#define Q2_K_BYTES 84
#define Q4_K_BYTES 144
#define IQ2_XXS_BYTES 66

// Q4_K scale and min of sub-block j (0..7) from the 12 packed scale bytes.
__device__ __forceinline__ void q4k_scale_min(const u8* s, int j, int* sc, int* m) {
    if (j < 4) {
        *sc = s[j] & 63;
        *m = s[j + 4] & 63;
    } else {
        *sc = (s[j + 4] & 0x0F) | ((s[j - 4] >> 6) << 4);
        *m = (s[j + 4] >> 4) | ((s[j] >> 6) << 4);
    }
}

// IQ2_XXS sign byte for a 7-bit index: the eighth sign makes the count of minus signs even.
__device__ __forceinline__ u32 iq2_signs(u32 idx7) { return idx7 | ((__popc(idx7) & 1) << 7); }

// Four sign bits -> a byte mask word (0xFF where the bit is set).
__device__ __forceinline__ u32 sign_mask4(u32 bits) {
    return ((bits & 1) ? 0x000000FFu : 0u) | ((bits & 2) ? 0x0000FF00u : 0u) |
           ((bits & 4) ? 0x00FF0000u : 0u) | ((bits & 8) ? 0xFF000000u : 0u);
}
// Negates the bytes of w (each in 1..127) selected by mask m; no carry crosses bytes.
__device__ __forceinline__ u32 apply_signs(u32 w, u32 m) { return (w ^ m) + (m & 0x01010101u); }

// ---- IQ2_XXS decoding with PRMT (gemv.cu, gemm_experts.cu) ----
// A grid entry is 8 bytes, each 8, 25 or 43. The kernels keep it as a PRMT selector word
// (nibble j = 0, 1, 2 for byte j = 8, 25, 43; one 32-bit shared load per 8 weights). Setting
// bit 2 of a nibble selects the negated byte instead, so one PRMT turns selector | sign bits
// into 4 signed weights. The sign bits of each 7-bit sign index (with the parity bit that
// completes it) are kept pre-spread to those bit-2 positions in a second table: 1.5 KB in all
// (IQ2_TAB words), two 32-bit loads and an OR per 8 weights instead of ~12 integer ops.
#define IQ2_POS 0x002B1908u  // bytes 8, 25, 43
#define IQ2_NEG 0x00D5E7F8u  // bytes -8, -25, -43

__device__ __forceinline__ u32 prmt(u32 a, u32 b, u32 sel) {
    u32 d;
    asm("prmt.b32 %0, %1, %2, %3;" : "=r"(d) : "r"(a), "r"(b), "r"(sel));
    return d;
}

// Selector nibbles of 4 grid bytes (each 8, 25 or 43): code = bit 0 + bit 5 of the byte
// (8 -> 0, 25 -> 1, 43 -> 2), bytes packed into the low 4 nibbles.
__device__ __forceinline__ u32 iq2_codes4(u32 w) {
    u32 c = (w & 0x01010101u) + ((w >> 5) & 0x01010101u);  // one code per byte
    c = (c | (c >> 4)) & 0x00FF00FFu;                        // byte pairs -> nibble pairs
    return (c | (c >> 8)) & 0xFFFFu;
}

// Table layout: [0, 256) grid selectors, [256, 384) spread sign bits per 7-bit index. A
// module-scope shared array (only kernels that use it get it): its address is a constant, so
// each lookup is a shift, a mask and an LDS with an immediate offset.
#define IQ2_TAB 384
#define IQ2_SIGNS 256
__shared__ u32 iq2_tab[IQ2_TAB];

// Bit j of an 8-bit value moved to bit 4j + 2 (the "negate" bit of selector nibble j).
__device__ __forceinline__ u32 sign_nibbles8(u32 s8) {
    u32 x = (s8 | (s8 << 12)) & 0x000F000Fu;  // bits 0-3 stay, 4-7 -> 16-19
    x = (x | (x << 6)) & 0x03030303u;         // 2-bit pairs -> bytes
    x = (x | (x << 3)) & 0x11111111u;         // single bits -> nibbles
    return x << 2;
}

// Builds both tables from the u64 codebook at device address grid (every thread of the CTA
// calls it; the caller synchronizes before use).
__device__ __forceinline__ void iq2xxs_tables(u64 grid) {
    for (int i = threadIdx.x; i < 256; i += blockDim.x) {
        const u64 g = ((const u64*)grid)[i];
        iq2_tab[i] = iq2_codes4((u32)g) | (iq2_codes4((u32)(g >> 32)) << 16);
        if (i < 128) iq2_tab[IQ2_SIGNS + i] = sign_nibbles8(iq2_signs(i));
    }
}

// The 8 signed weights of group l (0..3) of an item: a0 holds the 4 grid indices, a1 the four
// 7-bit sign indices (the eighth sign makes the count of minus signs even). lo = weights 0-3.
__device__ __forceinline__ void iq2xxs_group(u32 a0, u32 a1, int l, u32* lo, u32* hi) {
    const u32 sel = iq2_tab[(a0 >> (8 * l)) & 255] | iq2_tab[IQ2_SIGNS + ((a1 >> (7 * l)) & 127)];
    *lo = prmt(IQ2_POS, IQ2_NEG, sel);
    *hi = prmt(IQ2_POS, IQ2_NEG, sel >> 16);
}

// The 8 bytes at p (2-byte aligned; mis = p & 2, which the caller knows once per lane) of a
// shared-memory stage that is readable in whole 4-byte words up to the last of these bytes:
// two or three 32-bit loads and a funnel shift instead of four 16-bit loads.
__device__ __forceinline__ void rd64_a2(const u8* p, u32 mis, u32* lo, u32* hi) {
    // Step back with pointer arithmetic (not through an integer) so the compiler still knows
    // this is shared memory and emits LDS.
    const u32* q = (const u32*)(p - mis);
    const u32 sh = mis * 8;
    const u32 w0 = q[0], w1 = q[1];
    const u32 w2 = sh ? q[2] : w1;  // the third word only when the bytes straddle it
    *lo = __funnelshift_r(w0, w1, sh);
    *hi = __funnelshift_r(w1, w2, sh);
}

// ---- asynchronous global -> shared copies (sm_80+; gemv.cu, gemm_experts.cu) ----
__device__ __forceinline__ u32 smem_addr(const void* p) {
    u64 a;
    asm("cvta.to.shared.u64 %0, %1;" : "=l"(a) : "l"(p));
    return (u32)a;
}
// 16 bytes from global (L2 only, 256-byte L2 prefetch: the rest of the row comes next) to
// shared, without passing through registers; both addresses 16-byte aligned.
__device__ __forceinline__ void cp_async16(void* dst, const void* src) {
    asm volatile("cp.async.cg.shared.global.L2::256B [%0], [%1], 16;" ::"r"(smem_addr(dst)), "l"(src) : "memory");
}
// threadIdx.x read through a volatile asm: a value the compiler cannot hoist out of a loop.
// Copy loops that derive per-thread offsets from it inside a K loop keep them out of the
// registers a kernel at its budget lacks (ptxas would otherwise precompute every iteration's
// offsets once and spill).
__device__ __forceinline__ int thread_index_per_call() {
    int tid;
    asm volatile("mov.u32 %0, %%tid.x;" : "=r"(tid));
    return tid;
}

// The L2 policy of a weight stream read once per token: its lines are evicted first, so that a
// decode step's ~9 GB of weights passing through the 50 MB L2 do not push out what is read again
// soon (activations, the KV rows, the weights prefetched ahead of the matvec that needs them).
__device__ __forceinline__ u64 l2_evict_first_policy() {
    u64 pol;
    asm volatile("createpolicy.fractional.L2::evict_first.b64 %0, 1.0;" : "=l"(pol));
    return pol;
}
// cp_async16 to a shared-memory address already in the shared window (32-bit address
// arithmetic instead of 64-bit generic pointers and a conversion per copy).
__device__ __forceinline__ void cp_async16_s(u32 dst, const void* src) {
    asm volatile("cp.async.cg.shared.global.L2::256B [%0], [%1], 16;" ::"r"(dst), "l"(src) : "memory");
}
// L2 loads (ld.global.cg: no L1 line of an earlier kernel can answer them), for what a
// kernel reads before its PDL wait (attend_split_values, head_norm_rope).
__device__ __forceinline__ i64 ldcg_i64(const void* p) {
    i64 v;
    asm("ld.global.cg.s64 %0, [%1];" : "=l"(v) : "l"(p));
    return v;
}
__device__ __forceinline__ int ldcg_i32(const void* p) {
    int v;
    asm("ld.global.cg.s32 %0, [%1];" : "=r"(v) : "l"(p));
    return v;
}

__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;" ::: "memory"); }
__device__ __forceinline__ void cp_async_wait_all() { asm volatile("cp.async.wait_group 0;" ::: "memory"); }
// 4 bytes from global (through L1) to shared; both addresses 4-byte aligned.
__device__ __forceinline__ void cp_async4(void* dst, const void* src) {
    asm volatile("cp.async.ca.shared.global [%0], [%1], 4;" ::"r"(smem_addr(dst)), "l"(src) : "memory");
}
// Waits until at most the newest committed group is still in flight (double buffering: the
// stage about to be read has landed while the next one is still being copied).
__device__ __forceinline__ void cp_async_wait_all_but_newest() { asm volatile("cp.async.wait_group 1;" ::: "memory"); }

// The copy engine (TMA, sm_90 and later): tensor copies of boxes of a global tensor into shared
// memory, described by a tensor map the host makes (tensor_map.rs) and passes in a kernel's
// __grid_constant__ parameters; an mbarrier in shared memory counts the bytes in. One thread
// issues a copy that would take a CTA's threads hundreds of cp.async pieces, and the issue
// slots and load/store unit stay with the math. (The prefill GEMMs use it, so the backend needs
// sm_90: compile.rs's require_supported.)
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
#define TMA_COPIES 1
#else
#define TMA_COPIES 0
#endif
#if TMA_COPIES
// A stage barrier: one arrival (the thread that announces the stage's bytes) and the bytes of
// its copies. Initialised once by one thread, then tma_barrier_init_fence and a __syncthreads.
__device__ __forceinline__ void tma_barrier_init(u32 bar) {
    asm volatile("mbarrier.init.shared::cta.b64 [%0], 1;" ::"r"(bar) : "memory");
}
// Makes initialised barriers visible to the copy engine.
__device__ __forceinline__ void tma_barrier_init_fence() { asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory"); }
// Announces `bytes` of copies into a stage on its barrier (its arrival), after a proxy fence
// that orders the CTA's earlier reads of the stage (before the __syncthreads that preceded this
// call) before the copy engine's writes into it.
__device__ __forceinline__ void tma_barrier_expect(u32 bar, u32 bytes) {
    asm volatile(
        "fence.proxy.async.shared::cta;\n\t"
        "mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" ::"r"(bar),
        "r"(bytes)
        : "memory");
}
// Copies the box at element coordinates (c0, c1, c2) of a 3-d tensor map into shared memory
// at dst (128-byte aligned; 1024 for a 128-byte swizzle); elements outside the tensor arrive as
// zeros. The barrier's phase completes when all announced bytes have landed.
__device__ __forceinline__ void tma_copy_3d(u32 dst, const void* map, int c0, int c1, int c2, u32 bar) {
    asm volatile(
        "cp.async.bulk.tensor.3d.shared::cluster.global.tile.mbarrier::complete_tx::bytes [%0], [%1, {%2, %3, %4}], [%5];" ::"r"(
            dst),
        "l"(map), "r"(c0), "r"(c1), "r"(c2), "r"(bar)
        : "memory");
}
// Copies `bytes` (a multiple of 16; both addresses 16-byte aligned) from global memory to
// shared memory at dst with the copy engine, counted in on `bar`, under the L2 policy `pol`
// (l2_evict_first_policy: a weight stream).
__device__ __forceinline__ void bulk_copy_stream(u32 dst, const void* src, u32 bytes, u32 bar, u64 pol) {
    asm volatile(
        "cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes.L2::cache_hint [%0], [%1], %2, [%3], %4;" ::"r"(dst),
        "l"(src), "r"(bytes), "r"(bar), "l"(pol)
        : "memory");
}
// Waits until the barrier's phase of the given parity has completed (the stage's copies landed).
__device__ __forceinline__ void tma_barrier_wait(u32 bar, u32 parity) {
    u32 done;
    do {
        asm volatile(
            "{\n\t.reg .pred p;\n\tmbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\n\tselp.u32 %0, 1, 0, p;\n\t}"
            : "=r"(done)
            : "r"(bar), "r"(parity)
            : "memory");
    } while (!done);
}
#endif
