//! The indexer's tensor-core scores (compressor.cu index_scores_mma) against its f32 kernel
//! (index_scores), bit for bit, on inputs shaped as ds4 numerics leaves them: queries and keys
//! whose every 32-channel block is e2m1 values times a power of two (the Hadamard + FP4 round
//! trip), keys also f16-exact (index_scores_mma reads their bf16 copy, as the indexer's
//! compressor keeps it), arbitrary f32 head weights. Cases cover the real shape (64 heads
//! x 128 channels, top-k 512) and the fixtures' (8 x 32, 8 x 16), a head count between 32 and
//! 64, ratio 4, spans that cross from "every row kept" (nv <= topk, nothing scored) to scored,
//! decode (one token, thousands of rows), partial token groups, and every tokens-per-CTA and
//! tiles-per-CTA choice the launcher makes. Both kernels write into scratch filled with the
//! same NaN sentinel, so the rows each writes (exactly the visible ones of the scored tokens)
//! are compared too.
//!
//! Block scales within a factor 2 of a per-vector base (as Hadamard-rotated vectors have) make
//! every partial sum exact in f32, hence the bit equality. With scales spread over 2^24 the
//! sums round and the two summation orders may differ: that case is held to a stated bound
//! (2^-20 of the head sum of |w| |q| . |k|) and its mismatch count printed.
//!
//! Without a GPU every test prints "skipped: no CUDA" and passes.

mod common;

use std::sync::{Arc, OnceLock};

use common::{gpu, Rng};
use cudarc::driver::{CudaModule, LaunchConfig};
use ds4_cuda::Gpu;

const FWD_COMMON: &str = include_str!("../src/fwd_common.cuh");
const COMPRESSOR: &str = include_str!("../src/compressor.cu");

/// compressor.cu INDEX_TILE_ROWS x INDEX_TILES (rows per CTA of index_scores), IDXM_ROWS
/// (index_scores_mma's key tile); its CTAs have 4 or 8 (IDXM_WARPS) warps.
const OLD_ROWS_PER_CTA: usize = 16 * 8;
const TILE: usize = 64;
const WARPS: [usize; 2] = [4, 8];
const RATIO: usize = 4;
const SENTINEL: u32 = 0x7fc0_1234;

/// compressor.cu compiled for the test GPU (once per process).
fn module(g: &Gpu) -> &'static Arc<CudaModule> {
    static MODULE: OnceLock<Arc<CudaModule>> = OnceLock::new();
    MODULE.get_or_init(|| common::load_module(g, "fwd_compressor", &[FWD_COMMON, COMPRESSOR]))
}

/// Launches compressor.cu's `name` with 8-byte arguments (addresses, counts, doubles as bit
/// patterns: every parameter of the module is 8 bytes) and waits for it.
fn launch(g: &Gpu, name: &str, cfg: LaunchConfig, args: &[u64]) {
    // SAFETY: every caller passes the kernel's parameter list, with buffers sized for the
    // accesses its grid makes: n_tok x ni x di queries, n_tok x ni weights, the visible
    // (pos0 + n_tok) / RATIO key rows, n_tok x max_rows scores.
    unsafe { common::launch_u64(g, module(g), name, cfg, args) }
}

/// `len` values (blocks of 32 channels) that are e2m1 magnitudes with random signs times
/// 2^(base + jitter), jitter uniform in [-spread, spread] per block; some blocks all zero.
fn fp4_shaped(rng: &mut Rng, len: usize, width: usize, base: i32, spread: i32) -> Vec<f32> {
    const E2M1: [f32; 8] = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0];
    let mut out = vec![0f32; len];
    for vec in out.chunks_exact_mut(width) {
        for block in vec.chunks_mut(32) {
            if rng.below(50) == 0 {
                continue; // an all-zero block (its scale is irrelevant)
            }
            let jitter = rng.below(2 * spread as u64 + 1) as i32 - spread;
            let scale = 2f32.powi(base + jitter);
            for v in block.iter_mut() {
                let m = E2M1[rng.below(8) as usize];
                *v = if rng.below(2) == 0 { m } else { -m } * scale;
            }
        }
    }
    out
}

struct Case {
    ni: usize,
    di: usize,
    topk: usize,
    pos0: usize,
    n_tok: usize,
    /// Block-scale jitter of the queries and keys (exponents; 1 = within a factor 2).
    spread: i32,
}

/// Runs both kernels on one case (index_scores_mma with each warp count, tokens-per-CTA and
/// tiles-per-CTA choice) and returns (values compared, mismatches, worst |diff| / bound) over all variants;
/// asserts bit equality when `exact`.
fn run_case(g: &Gpu, rng: &mut Rng, c: &Case, exact: bool) -> (usize, usize, f64) {
    let dev = &g.device;
    let (ni, di, n) = (c.ni, c.di, c.n_tok);
    let rows = (c.pos0 + n) / RATIO;
    // Scratch rows wider than the visible ones, and odd: the kernels must not assume
    // alignment of a token's scratch row.
    let max_rows = rows + 37;
    // Queries: a base per token; keys: one base, f16-exact (normal f16 exponents).
    let mut q = Vec::with_capacity(n * ni * di);
    for _ in 0..n {
        let base = -4 - rng.below(4) as i32;
        q.extend(fp4_shaped(rng, ni * di, di, base, c.spread));
    }
    let keys = fp4_shaped(rng, rows.max(1) * di, di, -6, c.spread.min(5));
    for &k in &keys {
        assert_eq!(half::f16::from_f32(k).to_f32(), k, "keys must be f16-exact");
    }
    let w: Vec<f32> = (0..n * ni).map(|_| rng.f32() * 3.0).collect();
    let w_scale = 1.0 / ((ni * di) as f64).sqrt() as f32;
    let dq = dev.upload(&q).unwrap();
    let dk = dev.upload(&keys).unwrap();
    // index_scores_mma reads the compressor's bf16 copy of the keys.
    let keys_bf16: Vec<u16> = keys
        .iter()
        .map(|&k| half::bf16::from_f32(k).to_bits())
        .collect();
    let dk16 = dev.upload(&keys_bf16).unwrap();
    let dw = dev.upload(&w).unwrap();
    let dpos = dev.upload(&[c.pos0 as i64]).unwrap();
    let sentinel = vec![f32::from_bits(SENTINEL); n * max_rows];
    let old = dev.upload(&sentinel).unwrap();
    let args = |scores: u64| {
        vec![
            dq.ptr(),
            dw.ptr(),
            (w_scale as f64).to_bits(),
            dk.ptr(),
            scores,
            dpos.ptr(),
            RATIO as u64,
            ni as u64,
            di as u64,
            c.topk as u64,
            max_rows as u64,
        ]
    };
    launch(
        g,
        "index_scores",
        LaunchConfig {
            grid_dim: (rows.div_ceil(OLD_ROWS_PER_CTA).max(1) as u32, n as u32, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: ((ni + 16) * (di + 1) * 4) as u32,
        },
        &args(old.ptr()),
    );
    let want: Vec<u32> = dev
        .download(&old)
        .unwrap()
        .iter()
        .map(|v| v.to_bits())
        .collect();
    // Every visible row of every scored token was written (and no other).
    for t in 0..n {
        let nv = (c.pos0 + t + 1) / RATIO;
        for r in 0..max_rows {
            let written = want[t * max_rows + r] != SENTINEL;
            assert_eq!(written, nv > c.topk && r < nv, "index_scores t {t} r {r}");
        }
    }
    // The head sum of |w| |q| . |k| per (token, row): the scale of rounding differences.
    let bound = |t: usize, r: usize| -> f64 {
        let mut s = 0f64;
        for h in 0..ni {
            let qh = &q[(t * ni + h) * di..(t * ni + h + 1) * di];
            let k = &keys[r * di..(r + 1) * di];
            let d: f64 = qh.iter().zip(k).map(|(&a, &b)| (a * b).abs() as f64).sum();
            s += (w[t * ni + h] * w_scale).abs() as f64 * d;
        }
        s * 2f64.powi(-20)
    };
    let (mut compared, mut mismatches, mut worst) = (0usize, 0usize, 0f64);
    let tiles = rows.div_ceil(TILE).max(1);
    let variants = WARPS.iter().flat_map(|&w| {
        [1usize, 2, 4, 8]
            .into_iter()
            .filter(move |&tpc| tpc <= w)
            .flat_map(move |tpc| [1usize, 3, 16].map(|tiles| (w, tpc, tiles)))
    });
    for (warps, tpc, tiles_per_cta) in variants {
        let new = dev.upload(&sentinel).unwrap();
        let mut a = args(new.ptr());
        a[3] = dk16.ptr();
        a.extend([n as u64, tpc as u64, tiles_per_cta as u64]);
        launch(
            g,
            "index_scores_mma",
            LaunchConfig {
                grid_dim: (
                    tiles.div_ceil(tiles_per_cta) as u32,
                    n.div_ceil(tpc) as u32,
                    1,
                ),
                block_dim: ((warps * 32) as u32, 1, 1),
                shared_mem_bytes: 0,
            },
            &a,
        );
        let got = dev.download(&new).unwrap();
        let at = format!(
            "ni {ni} di {di} pos0 {} warps {warps} tpc {tpc} tiles {tiles_per_cta}",
            c.pos0
        );
        for (i, (&gv, &wv)) in got.iter().zip(&want).enumerate() {
            let (t, r) = (i / max_rows, i % max_rows);
            let gb = gv.to_bits();
            if wv == SENTINEL || gb == SENTINEL {
                assert_eq!(gb, wv, "{at}: t {t} r {r} written by one kernel only");
                continue;
            }
            compared += 1;
            if gb != wv {
                mismatches += 1;
                let want_v = f32::from_bits(wv);
                worst = worst.max((gv as f64 - want_v as f64).abs() / bound(t, r));
                assert!(!exact, "{at}: t {t} r {r}: {gv:e} != {want_v:e}");
            }
        }
    }
    (compared, mismatches, worst)
}

#[test]
fn tensor_core_scores_equal_the_f32_kernel_bit_for_bit() {
    let Some(g) = gpu() else { return };
    let mut rng = Rng::new(0x1d3c);
    let cases = [
        // Real shape: the span crosses nv = topk (pos 2047 -> 2052).
        Case {
            ni: 64,
            di: 128,
            topk: 512,
            pos0: 2040,
            n_tok: 37,
            spread: 1,
        },
        // A prefill span at ~9K: 2 300 rows, a partial token group (n % 4 = 3).
        Case {
            ni: 64,
            di: 128,
            topk: 512,
            pos0: 9000,
            n_tok: 67,
            spread: 1,
        },
        // Decode: one token, ~4K rows; and one whose rows end mid-tile.
        Case {
            ni: 64,
            di: 128,
            topk: 512,
            pos0: 16380,
            n_tok: 1,
            spread: 1,
        },
        Case {
            ni: 64,
            di: 128,
            topk: 512,
            pos0: 2113,
            n_tok: 2,
            spread: 1,
        },
        // Small top-k: early tokens scored over few rows (first tiles partly visible).
        Case {
            ni: 64,
            di: 128,
            topk: 3,
            pos0: 0,
            n_tok: 130,
            spread: 1,
        },
        // The fixtures' shapes (top-k 4), and heads between 32 and 64 with 64 channels.
        Case {
            ni: 8,
            di: 32,
            topk: 4,
            pos0: 0,
            n_tok: 90,
            spread: 1,
        },
        Case {
            ni: 8,
            di: 16,
            topk: 4,
            pos0: 61,
            n_tok: 7,
            spread: 1,
        },
        Case {
            ni: 48,
            di: 64,
            topk: 20,
            pos0: 300,
            n_tok: 9,
            spread: 1,
        },
    ];
    let mut compared = 0;
    for c in &cases {
        compared += run_case(g, &mut rng, c, true).0;
    }
    println!(
        "{compared} scores compared over {} cases: all bit-equal",
        cases.len()
    );
}

#[test]
fn widely_spread_block_scales_stay_within_the_bound() {
    let Some(g) = gpu() else { return };
    let mut rng = Rng::new(0x5eed);
    let c = Case {
        ni: 64,
        di: 128,
        topk: 16,
        pos0: 200,
        n_tok: 24,
        spread: 12,
    };
    let (compared, mismatches, worst) = run_case(g, &mut rng, &c, false);
    println!(
        "block scales over 2^+-12: {mismatches} of {compared} scores differ; worst |diff| = {worst:.3} x 2^-20 sum |w||q||k|"
    );
    assert!(worst <= 1.0, "worst difference {worst} x the bound");
}
