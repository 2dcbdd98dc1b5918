//! The indexer's top-k selection (compressor.cu index_topk) against a plain host reference:
//! for token t with nv = (pos0 + t + 1) / ratio visible rows, all rows when nv ≤ topk, else the
//! topk best by (score descending, row ascending), NaN ranking lowest (as -inf) and -0 equal
//! to +0, listed in ascending row order, with the count. Scores are drawn with many exact
//! ties, NaNs, ±0, ±inf and alike top bits; rows past nv hold large junk that must never be
//! chosen. Row counts straddle topk and go to 16K, 70K and 256K rows, with the shared key
//! cache covering all, part or (almost) none of the rows.
//!
//! Without a GPU every test prints "skipped: no CUDA" and passes.

mod common;

use std::sync::{Arc, OnceLock};

use common::{gpu, Rng};
use cudarc::driver::sys::CUfunction_attribute_enum;
use cudarc::driver::{CudaModule, LaunchConfig, PushKernelArg};
use ds4_cuda::Gpu;

const FWD_COMMON: &str = include_str!("../src/fwd_common.cuh");
const COMPRESSOR: &str = include_str!("../src/compressor.cu");

/// compressor.cu SELECT_THREADS; forward/attention.rs SELECT_CACHE_ROWS (the engine's largest cache).
const THREADS: u32 = 1024;
const CACHE_ROWS: usize = (48 * 1024 - 4096) / 4;
const RATIO: usize = 4;
/// What the kernel must leave in sel past the count.
const SENTINEL: i32 = -7;

/// compressor.cu compiled for the test GPU (once per process).
fn module(g: &Gpu) -> &'static Arc<CudaModule> {
    static MODULE: OnceLock<Arc<CudaModule>> = OnceLock::new();
    MODULE.get_or_init(|| common::load_module(g, "fwd_compressor", &[FWD_COMMON, COMPRESSOR]))
}

/// How a row's scores are drawn.
#[derive(Clone, Copy, Debug)]
enum Draw {
    /// A few values (±0 among them) with NaN, -inf and +inf: long runs of equal keys.
    Ties,
    /// 1 + k·2⁻²⁰: every key shares its top 12 bits (the hot histogram bins), with ties.
    Alike,
    /// Magnitudes over 16 decades, both signs.
    Spread,
    /// Mostly NaN and -inf (equal keys): the threshold falls among them.
    MostlyNan,
    /// All ±0: the lowest rows win.
    Zeros,
}

const DRAWS: [Draw; 5] = [
    Draw::Ties,
    Draw::Alike,
    Draw::Spread,
    Draw::MostlyNan,
    Draw::Zeros,
];

fn draw(rng: &mut Rng, how: Draw) -> f32 {
    const FEW: [f32; 10] = [-2.0, -1.0, -0.5, -0.0, 0.0, 0.5, 1.0, 1.5, 2.0, 3.0];
    match how {
        Draw::Ties => match rng.below(100) {
            0..=2 => f32::NAN,
            3..=4 => f32::NEG_INFINITY,
            5 => f32::INFINITY,
            _ => FEW[rng.below(FEW.len() as u64) as usize],
        },
        Draw::Alike => 1.0 + rng.below(1 << 12) as f32 * (1.0 / (1u32 << 20) as f32),
        Draw::Spread => rng.f32() * 10f32.powi(rng.below(16) as i32 - 8),
        Draw::MostlyNan => match rng.below(100) {
            0..=59 => f32::NAN,
            60..=96 => f32::NEG_INFINITY,
            _ => rng.f32(),
        },
        Draw::Zeros => {
            if rng.below(2) == 0 {
                0.0
            } else {
                -0.0
            }
        }
    }
}

/// The selection's rank of a score: NaN as -inf (and -0 == +0 under partial_cmp).
fn rank(v: f32) -> f32 {
    if v.is_nan() {
        f32::NEG_INFINITY
    } else {
        v
    }
}

/// The host reference: every row up to topk visible, else the topk best by (score desc,
/// row asc), in ascending order.
fn reference(row: &[f32], nv: usize, topk: usize) -> Vec<i32> {
    if nv <= topk {
        return (0..nv as i32).collect();
    }
    let mut idx: Vec<usize> = (0..nv).collect();
    idx.sort_by(|&a, &b| {
        rank(row[b])
            .partial_cmp(&rank(row[a]))
            .unwrap()
            .then(a.cmp(&b))
    });
    idx.truncate(topk);
    idx.sort_unstable();
    idx.into_iter().map(|i| i as i32).collect()
}

/// One launch: n_tok tokens from position pos0, each with a max_rows-long score row (rows
/// past its nv are junk). Returns sel (n_tok × topk) and selc.
fn run(
    g: &Gpu,
    scores: &[f32],
    n_tok: usize,
    pos0: usize,
    topk: usize,
    max_rows: usize,
    cache_rows: usize,
) -> (Vec<i32>, Vec<i32>) {
    let dev = &g.device;
    let d_scores = dev.upload(scores).unwrap();
    let d_sel = dev.upload(&vec![SENTINEL; n_tok * topk]).unwrap();
    let d_selc = dev.upload(&vec![SENTINEL; n_tok]).unwrap();
    let d_pos = dev.upload(&[pos0 as i64]).unwrap();
    let shared = cache_rows * 4;
    let f = module(g).load_function("index_topk").unwrap();
    f.set_attribute(
        CUfunction_attribute_enum::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
        shared as i32,
    )
    .unwrap();
    let args: [u64; 8] = [
        d_scores.ptr(),
        d_sel.ptr(),
        d_selc.ptr(),
        d_pos.ptr(),
        RATIO as u64,
        topk as u64,
        max_rows as u64,
        cache_rows as u64,
    ];
    let stream = dev.stream();
    let mut b = stream.launch_builder(&f);
    for a in &args {
        b.arg(a);
    }
    let cfg = LaunchConfig {
        grid_dim: (n_tok as u32, 1, 1),
        block_dim: (THREADS, 1, 1),
        shared_mem_bytes: shared as u32,
    };
    // SAFETY: index_topk(scores, sel, selc, pos, ratio, topk, max_rows, cache_rows): every
    // token's nv = (pos0 + t + 1) / ratio ≤ max_rows (the callers choose pos0 so), the score
    // buffer holds n_tok × max_rows floats, sel n_tok × topk and selc n_tok ints; the dynamic
    // shared memory is cache_rows keys (allowed above), the CTA SELECT_THREADS threads.
    unsafe { b.launch(cfg) }.unwrap();
    dev.synchronize().unwrap();
    (
        dev.download(&d_sel).unwrap(),
        dev.download(&d_selc).unwrap(),
    )
}

/// Draws the scores for tokens at pos0.., runs the kernel with each cache size and compares
/// with the reference.
#[allow(clippy::too_many_arguments)]
fn check(
    g: &Gpu,
    rng: &mut Rng,
    how: Draw,
    n_tok: usize,
    pos0: usize,
    topk: usize,
    max_rows: usize,
    caches: &[usize],
) {
    let mut scores = vec![0f32; n_tok * max_rows];
    for (t, row) in scores.chunks_exact_mut(max_rows).enumerate() {
        let nv = (pos0 + t + 1) / RATIO;
        assert!(nv <= max_rows);
        for v in &mut row[..nv] {
            *v = draw(rng, how);
        }
        // Junk past the visible rows that would win if it were read.
        for v in &mut row[nv..] {
            *v = 1e30;
        }
    }
    for &cache in caches {
        let cache = cache.clamp(1, max_rows);
        let (sel, selc) = run(g, &scores, n_tok, pos0, topk, max_rows, cache);
        for t in 0..n_tok {
            let nv = (pos0 + t + 1) / RATIO;
            let want = reference(&scores[t * max_rows..(t + 1) * max_rows], nv, topk);
            let got_n = selc[t];
            let ctx = format!("{how:?} token {t} of {n_tok}, nv {nv}, topk {topk}, cache {cache}");
            assert_eq!(got_n as usize, want.len(), "count: {ctx}");
            let row = &sel[t * topk..(t + 1) * topk];
            if let Some(i) = (0..want.len()).find(|&i| row[i] != want[i]) {
                panic!(
                    "row {i}: got {} want {} (score {} vs {}): {ctx}",
                    row[i],
                    want[i],
                    scores[t * max_rows + row[i].max(0) as usize],
                    scores[t * max_rows + want[i] as usize]
                );
            }
            assert!(
                row[want.len()..].iter().all(|&v| v == SENTINEL),
                "wrote past the count: {ctx}"
            );
        }
    }
}

/// pos0 for a single token with nv visible rows.
fn pos_for(nv: usize) -> usize {
    nv * RATIO - 1
}

#[test]
fn rank_treats_nan_as_neg_inf_and_zeros_alike() {
    assert_eq!(rank(f32::NAN), f32::NEG_INFINITY);
    assert_eq!(
        rank(-0.0).partial_cmp(&rank(0.0)),
        Some(std::cmp::Ordering::Equal)
    );
    let r = reference(&[f32::NAN, -0.0, 0.0, f32::NEG_INFINITY, 1.0, -0.0], 6, 3);
    assert_eq!(r, vec![1, 2, 4]);
    let r = reference(&[f32::NAN, -1.0, f32::NEG_INFINITY, f32::NAN], 4, 3);
    assert_eq!(r, vec![0, 1, 2]);
}

#[test]
fn single_tokens_around_topk() {
    let Some(g) = gpu() else { return };
    let mut rng = Rng::new(1);
    for topk in [1usize, 4, 512] {
        for nv in [
            topk.saturating_sub(1).max(1),
            topk,
            topk + 1,
            topk + 2,
            3 * topk + 5,
        ] {
            for how in DRAWS {
                check(
                    g,
                    &mut rng,
                    how,
                    1,
                    pos_for(nv),
                    topk,
                    nv + 7,
                    &[CACHE_ROWS, 1],
                );
            }
        }
    }
}

#[test]
fn single_tokens_16k_rows() {
    let Some(g) = gpu() else { return };
    let mut rng = Rng::new(2);
    for nv in [16383usize, 16384, 16385] {
        for how in DRAWS {
            check(
                g,
                &mut rng,
                how,
                1,
                pos_for(nv),
                512,
                16400,
                &[CACHE_ROWS, 5000, 1],
            );
        }
    }
}

#[test]
fn single_tokens_70k_and_256k_rows() {
    let Some(g) = gpu() else { return };
    let mut rng = Rng::new(3);
    for how in DRAWS {
        check(
            g,
            &mut rng,
            how,
            1,
            pos_for(70_000),
            512,
            70_003,
            &[CACHE_ROWS, 1],
        );
    }
    for how in [Draw::Ties, Draw::Spread] {
        check(
            g,
            &mut rng,
            how,
            1,
            pos_for(1 << 18),
            512,
            1 << 18,
            &[CACHE_ROWS],
        );
    }
}

#[test]
fn spans_of_tokens_at_different_positions() {
    let Some(g) = gpu() else { return };
    let mut rng = Rng::new(4);
    for how in DRAWS {
        // nv from 507 to 517: tokens keep all rows, then exactly 512.
        check(g, &mut rng, how, 40, 2030, 512, 520, &[CACHE_ROWS, 300]);
        // A prefill chunk deep in the context (one score row per token, rows past nv junk).
        check(g, &mut rng, how, 64, 65_000, 512, 16_400, &[CACHE_ROWS, 1]);
        // The synthetic model's top-4 over a short span.
        check(g, &mut rng, how, 96, 0, 4, 32, &[CACHE_ROWS]);
    }
}
