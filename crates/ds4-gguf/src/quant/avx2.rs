//! AVX2 + FMA + F16C versions of the dot products.
//!
//! Every function here is `unsafe` with one shared contract: **the CPU supports avx2, fma and
//! f16c** (the dispatcher in `mod.rs` calls them only when [`super::simd_level`] says so), and
//! the slice lengths satisfy the same relation the scalar kernel asserts (the safe wrappers
//! assert it before calling). All loads are unaligned loads from inside those slices.
//!
//! The integer parts are exact, as in the scalar kernels, so the results differ from the
//! scalar reference only by the order of the f32 additions.

use std::arch::x86_64::*;

use super::iq2_xxs::{GRID, SIGN_BYTES};
use super::q8_0::BlockQ8_0;
use super::q8_k::BlockQ8K;
use super::{iq2_xxs, q2_k, q4_k, q8_0};

/// Sum of the 8 lanes.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn hsum_ps(v: __m256) -> f32 {
    let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
    let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    let s = _mm_add_ss(s, _mm_movehdup_ps(s));
    _mm_cvtss_f32(s)
}

/// f16 bits to f32 with the F16C instruction.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn f16_to_f32(bits: u16) -> f32 {
    _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(bits as i32)))
}

/// 32 bytes starting at `bytes[at]`.
///
/// # Safety
/// `at + 32 <= bytes.len()`; AVX is available.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn load32(bytes: &[u8], at: usize) -> __m256i {
    debug_assert!(at + 32 <= bytes.len());
    // SAFETY: the caller guarantees the 32 bytes lie inside `bytes`; loadu has no alignment
    // requirement.
    unsafe { _mm256_loadu_si256(bytes.as_ptr().add(at) as *const __m256i) }
}

/// The 32 activation bytes of a Q8_0 block, or 32 bytes of a Q8_K block from `at`.
///
/// # Safety
/// `at + 32 <= q.len()`; AVX is available.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn load32_i8(q: &[i8], at: usize) -> __m256i {
    debug_assert!(at + 32 <= q.len());
    // SAFETY: as in `load32`.
    unsafe { _mm256_loadu_si256(q.as_ptr().add(at) as *const __m256i) }
}

/// Signed i8 × signed i8 products of 32 bytes, summed in pairs to 16 × i16.
/// Requires `y` (the activation) in [-127, 127]; `w` may be any i8.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn mul_i8_pairs(w: __m256i, y: __m256i) -> __m256i {
    // maddubs multiplies unsigned × signed: move w's sign onto y. |w| of -128 reads as 128
    // unsigned, which is still right; pair sums stay below 2·128·127 < 2^15.
    _mm256_maddubs_epi16(_mm256_sign_epi8(w, w), _mm256_sign_epi8(y, w))
}

/// The 8 partial integer sums of one Q8_0 block (as f32, exact) and the block's d_w·d_x.
///
/// # Safety
/// `blk.len() == 34`; AVX2/FMA/F16C are available.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn q8_0_block(blk: &[u8], a: &BlockQ8_0, ones: __m256i) -> (__m256, __m256) {
    let d = f16_to_f32(u16::from_le_bytes([blk[0], blk[1]])) * a.d;
    // SAFETY: blk[2..34] are the block's 32 levels; `a.qs` has 32 bytes.
    let (w, y) = unsafe { (load32(blk, 2), load32_i8(&a.qs, 0)) };
    let sums = _mm256_madd_epi16(mul_i8_pairs(w, y), ones);
    (_mm256_cvtepi32_ps(sums), _mm256_set1_ps(d))
}

/// # Safety
/// See the module contract; `row.len() == act.len() * 34`.
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn vec_dot_q8_0(row: &[u8], act: &[BlockQ8_0]) -> f32 {
    debug_assert_eq!(row.len(), act.len() * q8_0::BLOCK_BYTES);
    const BB: usize = q8_0::BLOCK_BYTES;
    let ones = _mm256_set1_epi16(1);
    // Four independent accumulators, so consecutive blocks do not wait on each other's FMA.
    let mut acc = [_mm256_setzero_ps(); 4];
    let quads = act.len() / 4;
    for (rows, acts) in row.chunks_exact(4 * BB).zip(act.chunks_exact(4)) {
        for k in 0..4 {
            // SAFETY: each 34-byte slice is one block of `rows`.
            let (p, d) = unsafe { q8_0_block(&rows[k * BB..(k + 1) * BB], &acts[k], ones) };
            acc[k] = _mm256_fmadd_ps(p, d, acc[k]);
        }
    }
    for (blk, a) in row[quads * 4 * BB..]
        .chunks_exact(BB)
        .zip(&act[quads * 4..])
    {
        // SAFETY: `blk` is one 34-byte block.
        let (p, d) = unsafe { q8_0_block(blk, a, ones) };
        acc[0] = _mm256_fmadd_ps(p, d, acc[0]);
    }
    hsum_ps(_mm256_add_ps(
        _mm256_add_ps(acc[0], acc[1]),
        _mm256_add_ps(acc[2], acc[3]),
    ))
}

/// Shuffle masks that spread Q2_K scale bytes 2g and 2g+1 over the i16 lanes that hold the
/// pair sums of a 32-element group g: lanes 0..8 (elements 0..16) get scale 2g, lanes 8..16
/// get scale 2g+1. Bytes of 0x80 zero the high half of each i16.
const fn q2k_scale_shuffles() -> [[u8; 32]; 8] {
    let mut out = [[0x80u8; 32]; 8];
    let mut g = 0;
    while g < 8 {
        let mut i = 0;
        while i < 8 {
            out[g][2 * i] = 2 * g as u8;
            out[g][16 + 2 * i] = 2 * g as u8 + 1;
            i += 1;
        }
        g += 1;
    }
    out
}
const Q2K_SCALE_SHUFFLES: [[u8; 32]; 8] = q2k_scale_shuffles();

/// # Safety
/// See the module contract; `row.len() == act.len() * 84`.
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn vec_dot_q2_k(row: &[u8], act: &[BlockQ8K]) -> f32 {
    debug_assert_eq!(row.len(), act.len() * q2_k::BLOCK_BYTES);
    let mask3 = _mm256_set1_epi8(3);
    let low4 = _mm_set1_epi8(0x0F);
    let mut acc = _mm256_setzero_ps();
    let mut acc_min = _mm256_setzero_ps();
    for (b, a) in act.iter().enumerate() {
        let blk = &row[b * q2_k::BLOCK_BYTES..(b + 1) * q2_k::BLOCK_BYTES];
        let d = a.d * f16_to_f32(u16::from_le_bytes([blk[80], blk[81]]));
        let dmin = a.d * f16_to_f32(u16::from_le_bytes([blk[82], blk[83]]));
        // SAFETY: blk[0..16] are the 16 scale bytes; `a.bsums` is 16 × i16 = 32 bytes.
        let (sc, bsums) = unsafe {
            (
                _mm_loadu_si128(blk.as_ptr() as *const __m128i),
                _mm256_loadu_si256(a.bsums.as_ptr() as *const __m256i),
            )
        };
        let mins = _mm256_cvtepu8_epi16(_mm_and_si128(_mm_srli_epi16::<4>(sc), low4));
        let msum = _mm256_madd_epi16(mins, bsums);
        acc_min = _mm256_fmadd_ps(_mm256_cvtepi32_ps(msum), _mm256_set1_ps(dmin), acc_min);

        let scales = _mm256_broadcastsi128_si256(_mm_and_si128(sc, low4));
        let mut isum = _mm256_setzero_si256();
        for h in 0..2 {
            // SAFETY: bytes 16 + 32h .. 48 + 32h lie inside the 84-byte block.
            let q2 = unsafe { load32(blk, 16 + 32 * h) };
            let levels = [
                _mm256_and_si256(q2, mask3),
                _mm256_and_si256(_mm256_srli_epi16::<2>(q2), mask3),
                _mm256_and_si256(_mm256_srli_epi16::<4>(q2), mask3),
                _mm256_and_si256(_mm256_srli_epi16::<6>(q2), mask3),
            ];
            for (j, lv) in levels.into_iter().enumerate() {
                let g = 4 * h + j;
                // SAFETY: 32·g + 32 <= 256 = a.qs.len(); the shuffle table has 32 bytes.
                let (y, shuf) = unsafe {
                    (
                        load32_i8(&a.qs, 32 * g),
                        _mm256_loadu_si256(Q2K_SCALE_SHUFFLES[g].as_ptr() as *const __m256i),
                    )
                };
                let sc16 = _mm256_shuffle_epi8(scales, shuf);
                let p16 = _mm256_maddubs_epi16(lv, y);
                isum = _mm256_add_epi32(isum, _mm256_madd_epi16(p16, sc16));
            }
        }
        acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(isum), _mm256_set1_ps(d), acc);
    }
    hsum_ps(acc) - hsum_ps(acc_min)
}

/// # Safety
/// See the module contract; `row.len() == act.len() * 144`.
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn vec_dot_q4_k(row: &[u8], act: &[BlockQ8K]) -> f32 {
    debug_assert_eq!(row.len(), act.len() * q4_k::BLOCK_BYTES);
    let mask4 = _mm256_set1_epi8(0x0F);
    let mut acc = _mm256_setzero_ps();
    let mut min_sum = 0.0f32;
    for (b, a) in act.iter().enumerate() {
        let blk = &row[b * q4_k::BLOCK_BYTES..(b + 1) * q4_k::BLOCK_BYTES];
        let d = a.d * f16_to_f32(u16::from_le_bytes([blk[0], blk[1]]));
        let dmin = a.d * f16_to_f32(u16::from_le_bytes([blk[2], blk[3]]));
        let (sc, m) = q4_k::unpack_scales(&blk[4..16]);
        let msum: i32 = (0..8)
            .map(|j| m[j] as i32 * (a.bsums[2 * j] as i32 + a.bsums[2 * j + 1] as i32))
            .sum();
        min_sum += dmin * msum as f32;
        let mut isum = _mm256_setzero_si256();
        for c in 0..4 {
            // SAFETY: bytes 16 + 32c .. 48 + 32c lie inside the 144-byte block; activation
            // bytes 64c .. 64c + 64 inside the 256 of `a.qs`.
            let (q4, ylo, yhi) = unsafe {
                (
                    load32(blk, 16 + 32 * c),
                    load32_i8(&a.qs, 64 * c),
                    load32_i8(&a.qs, 64 * c + 32),
                )
            };
            let lo = _mm256_and_si256(q4, mask4);
            let hi = _mm256_and_si256(_mm256_srli_epi16::<4>(q4), mask4);
            let plo = _mm256_madd_epi16(
                _mm256_maddubs_epi16(lo, ylo),
                _mm256_set1_epi16(sc[2 * c] as i16),
            );
            let phi = _mm256_madd_epi16(
                _mm256_maddubs_epi16(hi, yhi),
                _mm256_set1_epi16(sc[2 * c + 1] as i16),
            );
            isum = _mm256_add_epi32(isum, _mm256_add_epi32(plo, phi));
        }
        acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(isum), _mm256_set1_ps(d), acc);
    }
    hsum_ps(acc) - min_sum
}

/// # Safety
/// See the module contract; `row.len() == act.len() * 66`.
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn vec_dot_iq2_xxs(row: &[u8], act: &[BlockQ8K]) -> f32 {
    debug_assert_eq!(row.len(), act.len() * iq2_xxs::BLOCK_BYTES);
    let mut acc = _mm256_setzero_ps();
    for (b, a) in act.iter().enumerate() {
        let blk = &row[b * iq2_xxs::BLOCK_BYTES..(b + 1) * iq2_xxs::BLOCK_BYTES];
        let d = a.d * f16_to_f32(u16::from_le_bytes([blk[0], blk[1]]));
        let mut isum = _mm256_setzero_si256();
        for ib in 0..8 {
            let aux = u64::from_le_bytes(blk[2 + 8 * ib..10 + 8 * ib].try_into().expect("8 bytes"));
            let (a0, a1) = (aux as u32, (aux >> 32) as u32);
            let grid = _mm256_set_epi64x(
                GRID[(a0 >> 24) as usize] as i64,
                GRID[((a0 >> 16) & 0xff) as usize] as i64,
                GRID[((a0 >> 8) & 0xff) as usize] as i64,
                GRID[(a0 & 0xff) as usize] as i64,
            );
            let signs = _mm256_set_epi64x(
                SIGN_BYTES[((a1 >> 21) & 127) as usize] as i64,
                SIGN_BYTES[((a1 >> 14) & 127) as usize] as i64,
                SIGN_BYTES[((a1 >> 7) & 127) as usize] as i64,
                SIGN_BYTES[(a1 & 127) as usize] as i64,
            );
            // SAFETY: 32·ib + 32 <= 256 = a.qs.len().
            let y = unsafe { load32_i8(&a.qs, 32 * ib) };
            // Codebook magnitudes (8, 25, 43) are unsigned; the signs go onto the activation.
            let p16 = _mm256_maddubs_epi16(grid, _mm256_sign_epi8(y, signs));
            let ls = _mm256_set1_epi16(2 * (a1 >> 28) as i16 + 1);
            isum = _mm256_add_epi32(isum, _mm256_madd_epi16(p16, ls));
        }
        acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(isum), _mm256_set1_ps(d), acc);
    }
    0.125 * hsum_ps(acc)
}

/// Shared loop of the float dots: `load(i)` gives 8 f32 weights from element i.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn dot_float_body(
    n: usize,
    x: &[f32],
    load: impl Fn(usize) -> __m256,
    tail: impl Fn(usize) -> f32,
) -> f32 {
    let mut acc = [_mm256_setzero_ps(); 4];
    let mut i = 0;
    while i + 32 <= n {
        for (k, a) in acc.iter_mut().enumerate() {
            let at = i + 8 * k;
            // SAFETY: at + 8 <= n == x.len().
            let xv = unsafe { _mm256_loadu_ps(x.as_ptr().add(at)) };
            *a = _mm256_fmadd_ps(load(at), xv, *a);
        }
        i += 32;
    }
    while i + 8 <= n {
        // SAFETY: i + 8 <= n == x.len().
        let xv = unsafe { _mm256_loadu_ps(x.as_ptr().add(i)) };
        acc[0] = _mm256_fmadd_ps(load(i), xv, acc[0]);
        i += 8;
    }
    let mut sum = hsum_ps(_mm256_add_ps(
        _mm256_add_ps(acc[0], acc[1]),
        _mm256_add_ps(acc[2], acc[3]),
    ));
    for (j, &xv) in x.iter().enumerate().skip(i) {
        sum += tail(j) * xv;
    }
    sum
}

/// # Safety
/// See the module contract; `row.len() == x.len() * 4`.
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn dot_f32(row: &[u8], x: &[f32]) -> f32 {
    assert_eq!(row.len(), x.len() * 4);
    dot_float_body(
        x.len(),
        x,
        // SAFETY: the body only asks for i + 8 <= x.len(), so bytes 4i .. 4i + 32 are in `row`.
        |i| unsafe { _mm256_loadu_ps(row.as_ptr().add(4 * i) as *const f32) },
        |i| f32::from_le_bytes([row[4 * i], row[4 * i + 1], row[4 * i + 2], row[4 * i + 3]]),
    )
}

/// # Safety
/// See the module contract; `row.len() == x.len() * 2`.
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn dot_f16(row: &[u8], x: &[f32]) -> f32 {
    assert_eq!(row.len(), x.len() * 2);
    dot_float_body(
        x.len(),
        x,
        // SAFETY: i + 8 <= x.len(), so bytes 2i .. 2i + 16 are in `row`; F16C is available.
        |i| unsafe { _mm256_cvtph_ps(_mm_loadu_si128(row.as_ptr().add(2 * i) as *const __m128i)) },
        |i| super::float::f16_to_f32(u16::from_le_bytes([row[2 * i], row[2 * i + 1]])),
    )
}

/// # Safety
/// See the module contract; `row.len() == x.len() * 2`.
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn dot_bf16(row: &[u8], x: &[f32]) -> f32 {
    assert_eq!(row.len(), x.len() * 2);
    dot_float_body(
        x.len(),
        x,
        // SAFETY: i + 8 <= x.len(), so bytes 2i .. 2i + 16 are in `row`; AVX2 is available.
        |i| unsafe {
            let h = _mm_loadu_si128(row.as_ptr().add(2 * i) as *const __m128i);
            _mm256_castsi256_ps(_mm256_slli_epi32::<16>(_mm256_cvtepu16_epi32(h)))
        },
        |i| super::float::bf16_to_f32(u16::from_le_bytes([row[2 * i], row[2 * i + 1]])),
    )
}

/// F16 → f32 for a whole tensor, 8 values per F16C conversion (exact; a signalling NaN comes
/// out quiet, which the scalar path would keep signalling).
///
/// # Safety
/// See the module contract; `src.len() == dst.len() * 2`.
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn dequantize_f16(src: &[u8], dst: &mut [f32]) {
    assert_eq!(src.len(), dst.len() * 2);
    let whole = dst.len() / 8 * 8;
    for (s, d) in src[..2 * whole]
        .chunks_exact(16)
        .zip(dst[..whole].chunks_exact_mut(8))
    {
        // SAFETY: `s` is 16 readable bytes and `d` 8 writable f32s; both accesses are unaligned.
        unsafe {
            let h = _mm_loadu_si128(s.as_ptr() as *const __m128i);
            _mm256_storeu_ps(d.as_mut_ptr(), _mm256_cvtph_ps(h));
        }
    }
    super::float::dequantize_f16(&src[2 * whole..], &mut dst[whole..]);
}
