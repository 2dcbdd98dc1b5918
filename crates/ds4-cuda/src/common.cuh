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

__device__ __forceinline__ i64 min64(i64 a, i64 b) { return a < b ? a : b; }

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
