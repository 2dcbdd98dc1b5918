//! The hyper-connection kernels (hc.cu) bit for bit against a host computation in their
//! operation order: the post mixing X'_k = post_k y + Σ_j comb[j,k] X_j (cpu/hc.rs `post`'s
//! order, with the FMAs the kernels compile to), the split-K projection partials
//! (per element an FMA chain over the streams, warp_sum's 32-lane tree, the four warps of a
//! 128-element slice in order; the sum of squares in f64) and hc_pre's sublayer input
//! (Σ_j pre_j X_j as an FMA chain). The decode kernels (hc_mix_partial, hc_post_mix) and the
//! span kernels (hc_mix_partial_span, hc_post_mix_span) must both equal it exactly, for any
//! number of tokens and tokens per CTA; so spans, chunks and decode agree bit for bit. The
//! pre/post mappings (sigmoid: the GPU's expf) are checked to 1e-6 and hc_comb's Sinkhorn
//! projection (expf) to 1e-5 against f64 (cpu/hc.rs split_sinkhorn's order). The decode's
//! fused hc_pre_norm must leave exactly what hc_pre followed by the RMS norm kernels
//! (vector_ops.cu, with their Q8_0 / Q8_K quantization) leave.
//!
//! Without a GPU every test prints "skipped: no CUDA" and passes.

mod common;

use std::sync::{Arc, OnceLock};

use common::{gpu, Rng};
use cudarc::driver::{CudaModule, LaunchConfig};
use ds4_cuda::{ActQuant, CudaDevice, DeviceBuffer, Gpu};

const FWD_COMMON: &str = include_str!("../src/fwd_common.cuh");
const ROW_NORM: &str = include_str!("../src/row_norm.cuh");
const HC_SOURCE: &str = include_str!("../src/hc.cu");

/// Streams (the span kernels' n) and mix rows (2 + n)n.
const N: usize = 4;
const R: usize = (2 + N) * N;
/// Map values per token: [pre | post | comb].
const M: usize = 2 * N + N * N;
/// hc.cu HC_MIX_THREADS (elements per slice) and HC_SPAN_MAX_TOKENS (checked against the
/// source by `constants_match_hc_cu`).
const SLICE: usize = 128;
const SPAN_MAX_TOKENS: usize = 256;

/// The integer value of hc.cu's `#define NAME value`: the split-K launch shape (HC_GROUP_ROWS
/// mix rows per CTA, HC_TOKENS tokens per CTA) is read from the source the test compiles, so
/// that retuning it in hc.cu cannot leave the test launching another grid.
fn hc_define(name: &str) -> usize {
    HC_SOURCE
        .lines()
        .find_map(|l| l.strip_prefix(&format!("#define {name} ")))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no integer #define {name} in hc.cu"))
}

/// The test's fixed constants are hc.cu's (they size arrays, so they cannot be read at run
/// time), and the split-K shape it reads is a real one.
#[test]
fn constants_match_hc_cu() {
    assert_eq!(hc_define("HC_MIX_THREADS"), SLICE);
    assert_eq!(hc_define("HC_SPAN_MAX_TOKENS"), SPAN_MAX_TOKENS);
    assert!((1..=R).contains(&hc_define("HC_GROUP_ROWS")));
    assert!(hc_define("HC_TOKENS") >= 1);
}

/// hc.cu compiled for the test GPU (once per process).
fn module(g: &Gpu) -> &'static Arc<CudaModule> {
    static MODULE: OnceLock<Arc<CudaModule>> = OnceLock::new();
    MODULE.get_or_init(|| common::load_module(g, "fwd_hc", &[FWD_COMMON, ROW_NORM, HC_SOURCE]))
}

/// Launches hc.cu's `name` with 8-byte arguments (every parameter of hc.cu is a u64 address,
/// an i64 count or a double, passed as its bit pattern) and waits for it.
fn launch(g: &Gpu, name: &str, cfg: LaunchConfig, args: &[u64]) {
    // SAFETY: every caller passes the kernel's parameter list, with buffers sized for the
    // accesses its grid makes (the layouts in hc.cu's comments).
    unsafe { common::launch_u64(g, module(g), name, cfg, args) }
}

fn grid(x: usize, y: usize, z: usize, threads: usize) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (x as u32, y as u32, z as u32),
        block_dim: (threads as u32, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// One test case's inputs on the host and the device.
struct Case {
    d: usize,
    n_tok: usize,
    slices: usize,
    /// n_tok × N × d streams, n_tok × d sublayer outputs, n_tok × M maps.
    streams: Vec<f32>,
    y: Vec<f32>,
    maps: Vec<f32>,
    /// The R × N·d projection rows as the kernels see them (F16 rows: their f32 values).
    fn_: Vec<f32>,
    fn_f16: bool,
    dev_streams: DeviceBuffer<f32>,
    dev_y: DeviceBuffer<f32>,
    dev_maps: DeviceBuffer<f32>,
    dev_fn: u64,
    _fn_keep: (Option<DeviceBuffer<f32>>, Option<DeviceBuffer<u16>>),
}

impl Case {
    fn new(dev: &CudaDevice, rng: &mut Rng, d: usize, n_tok: usize, fn_f16: bool) -> Case {
        // Streams of mixed magnitude (a few large ones, as residual streams get).
        let streams: Vec<f32> = (0..n_tok * N * d)
            .map(|i| rng.f32() * if i % 97 == 0 { 40.0 } else { 1.5 })
            .collect();
        let y = rng.f32s(n_tok * d);
        let mut maps = vec![0f32; n_tok * M];
        for m in maps.chunks_exact_mut(M) {
            for v in &mut m[..N] {
                *v = rng.f32().abs() + 1e-6;
            }
            for v in &mut m[N..2 * N] {
                *v = 2.0 * rng.f32().abs();
            }
            for v in &mut m[2 * N..] {
                *v = 0.25 + 0.2 * rng.f32();
            }
        }
        let raw: Vec<f32> = (0..R * N * d).map(|_| rng.f32() * 0.05).collect();
        let (fn_, dev_fn, keep) = if fn_f16 {
            let bits: Vec<u16> = raw
                .iter()
                .map(|&v| half::f16::from_f32(v).to_bits())
                .collect();
            let vals = bits
                .iter()
                .map(|&b| half::f16::from_bits(b).to_f32())
                .collect();
            let buf = dev.upload(&bits).unwrap();
            (vals, buf.ptr(), (None, Some(buf)))
        } else {
            let buf = dev.upload(&raw).unwrap();
            (raw, buf.ptr(), (Some(buf), None))
        };
        Case {
            d,
            n_tok,
            slices: d.div_ceil(SLICE),
            dev_streams: dev.upload(&streams).unwrap(),
            dev_y: dev.upload(&y).unwrap(),
            dev_maps: dev.upload(&maps).unwrap(),
            streams,
            y,
            maps,
            fn_,
            fn_f16,
            dev_fn,
            _fn_keep: keep,
        }
    }

    /// The post-mixed streams (cpu/hc.rs `post`: product, then one FMA per source stream).
    fn post_mixed(&self) -> Vec<f32> {
        let d = self.d;
        let mut out = vec![0f32; self.streams.len()];
        for t in 0..self.n_tok {
            let mp = &self.maps[t * M..(t + 1) * M];
            let (post, comb) = (&mp[N..2 * N], &mp[2 * N..]);
            let st = &self.streams[t * N * d..(t + 1) * N * d];
            for k in 0..N {
                for i in 0..d {
                    // post_k y + comb[0,k] X_0 is one FMA over the second product (as NVVM
                    // contracts `v = post * y; v += comb * old`, read in the PTX), then one
                    // FMA per further source stream, in stream order.
                    let mut v = post[k].mul_add(self.y[t * d + i], comb[k] * st[i]);
                    for j in 1..N {
                        v = comb[j * N + k].mul_add(st[j * d + i], v);
                    }
                    out[t * N * d + k * d + i] = v;
                }
            }
        }
        out
    }

    /// The slice records n_tok × slices × (R + 1) of the projection of `vals` (n_tok × N × d):
    /// per element acc_r = fma chain over the streams and ss = Σ v² in f64; warp_sum's tree
    /// over each 32 elements; the four warps of a slice summed in order (ss as f32 per warp).
    fn partials(&self, vals: &[f32]) -> Vec<f32> {
        let (d, s_n) = (self.d, self.slices);
        let mut part = vec![0f32; self.n_tok * s_n * (R + 1)];
        let mut lanes = [[0f32; 32]; R];
        let mut lanes_ss = [0f64; 32];
        for t in 0..self.n_tok {
            let st = &vals[t * N * d..(t + 1) * N * d];
            for s in 0..s_n {
                let mut red = [[0f32; R + 1]; SLICE / 32];
                for (w, red_w) in red.iter_mut().enumerate() {
                    for lane in 0..32 {
                        let i = s * SLICE + w * 32 + lane;
                        let mut ss = 0f64;
                        for (r, l) in lanes.iter_mut().enumerate() {
                            l[lane] = 0.0;
                            if i < d {
                                for k in 0..N {
                                    let wt = self.fn_[r * N * d + k * d + i];
                                    l[lane] = wt.mul_add(st[k * d + i], l[lane]);
                                }
                            }
                        }
                        if i < d {
                            for k in 0..N {
                                let v = st[k * d + i] as f64;
                                ss = v.mul_add(v, ss);
                            }
                        }
                        lanes_ss[lane] = ss;
                    }
                    for (r, l) in lanes.iter().enumerate() {
                        red_w[r] = tree_f32(*l);
                    }
                    red_w[R] = tree_f64(lanes_ss) as f32;
                }
                let rec = &mut part[(t * s_n + s) * (R + 1)..(t * s_n + s + 1) * (R + 1)];
                for (r, out) in rec.iter_mut().enumerate() {
                    let mut v = 0f32;
                    for red_w in &red {
                        v += red_w[r];
                    }
                    *out = v;
                }
            }
        }
        part
    }
}

/// warp_sum's result: lane l adds lane l ^ o for o = 16, 8, 4, 2, 1 (every lane ends with the
/// same value, as float addition commutes).
fn tree_f32(mut v: [f32; 32]) -> f32 {
    for o in [16, 8, 4, 2, 1] {
        let prev = v;
        for l in 0..32 {
            v[l] = prev[l] + prev[l ^ o];
        }
    }
    v[0]
}

fn tree_f64(mut v: [f64; 32]) -> f64 {
    for o in [16, 8, 4, 2, 1] {
        let prev = v;
        for l in 0..32 {
            v[l] = prev[l] + prev[l ^ o];
        }
    }
    v[0]
}

/// Index and values of the first difference of two f32 slices in bits, if any.
fn first_bit_difference(a: &[f32], b: &[f32]) -> Option<(usize, f32, f32)> {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .position(|(x, y)| x.to_bits() != y.to_bits())
        .map(|i| (i, a[i], b[i]))
}

/// Records in `failures` a description of how `gpu` differs from `host` in bits, if it does
/// (every check of a test runs, so one GPU run reports them all).
fn check_bits(failures: &mut Vec<String>, what: &str, gpu: &[f32], host: &[f32]) {
    if let Some((i, g, h)) = first_bit_difference(gpu, host) {
        let n = gpu
            .iter()
            .zip(host)
            .filter(|(x, y)| x.to_bits() != y.to_bits())
            .count();
        let msg = format!(
            "{what}: {n} of {} values differ; first at {i}: gpu {g:e} host {h:e}",
            gpu.len()
        );
        eprintln!("{msg}");
        failures.push(msg);
    }
}

fn assert_none(failures: Vec<String>) {
    assert!(
        failures.is_empty(),
        "{} checks failed:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

/// The cases: production width (4096: 32 full slices), a partial last slice, a width below one
/// slice (the fixtures'), with F32 and F16 projection rows.
fn cases(g: &Gpu) -> Vec<Case> {
    let mut rng = Rng::new(7);
    [
        (4096, 300, false),
        (4096, 70, true),
        (200, 100, true),
        (200, 9, false),
        (64, 77, false),
        (8, 5, true),
    ]
    .iter()
    .map(|&(d, n_tok, f16)| Case::new(&g.device, &mut rng, d, n_tok, f16))
    .collect()
}

/// Tokens per CTA the span kernels are run with for a case: one, a ragged batch, the launch
/// code's range sizes and the largest.
fn tokens_per_cta(n_tok: usize) -> Vec<usize> {
    let mut v: Vec<usize> = [1, 7, 79, n_tok.div_ceil(13), SPAN_MAX_TOKENS]
        .into_iter()
        .map(|t| t.clamp(1, SPAN_MAX_TOKENS.min(n_tok)))
        .collect();
    v.sort_unstable();
    v.dedup();
    v
}

#[test]
fn post_mix_and_projection_match_the_host_bit_for_bit() {
    let Some(g) = gpu() else { return };
    let dev = &g.device;
    let mut failures = Vec::new();
    for c in cases(g) {
        let what = format!("d {} tokens {} f16 {}", c.d, c.n_tok, c.fn_f16);
        let mixed = c.post_mixed();
        let want_post = c.partials(&mixed);
        let want_pre = c.partials(&c.streams);
        let part_len = c.n_tok * c.slices * (R + 1);
        let out = dev.alloc::<f32>(c.streams.len()).unwrap();
        let part = dev.alloc::<f32>(part_len).unwrap();
        let fn_f16 = c.fn_f16 as u64;
        let (d, n_tok) = (c.d as u64, c.n_tok as u64);

        // The split-K kernels (decode's), as forward/hc.rs launches them.
        let split = grid(
            c.slices,
            R.div_ceil(hc_define("HC_GROUP_ROWS")),
            c.n_tok.div_ceil(hc_define("HC_TOKENS")),
            SLICE,
        );
        dev.fill_bytes(&out, 0xff).unwrap();
        dev.fill_bytes(&part, 0xff).unwrap();
        #[rustfmt::skip]
        launch(g, "hc_post_mix", split, &[
            c.dev_maps.ptr(), c.dev_y.ptr(), c.dev_streams.ptr(), out.ptr(), c.dev_fn, fn_f16,
            part.ptr(), N as u64, d, R as u64, n_tok, 0, 0, 0, 0, 0, 0,
        ]);
        check_bits(
            &mut failures,
            &format!("hc_post_mix streams, {what}"),
            &dev.download(&out).unwrap(),
            &mixed,
        );
        check_bits(
            &mut failures,
            &format!("hc_post_mix partials, {what}"),
            &dev.download(&part).unwrap(),
            &want_post,
        );
        dev.fill_bytes(&part, 0xff).unwrap();
        #[rustfmt::skip]
        launch(g, "hc_mix_partial", split, &[
            c.dev_streams.ptr(), c.dev_fn, fn_f16, part.ptr(), N as u64, d, R as u64, n_tok,
        ]);
        check_bits(
            &mut failures,
            &format!("hc_mix_partial, {what}"),
            &dev.download(&part).unwrap(),
            &want_pre,
        );

        // The span kernels, over every split of the tokens into CTA ranges.
        for tpc in tokens_per_cta(c.n_tok) {
            let span = grid(c.slices, c.n_tok.div_ceil(tpc), 1, SLICE);
            dev.fill_bytes(&out, 0xff).unwrap();
            dev.fill_bytes(&part, 0xff).unwrap();
            #[rustfmt::skip]
            launch(g, "hc_post_mix_span", span, &[
                c.dev_maps.ptr(), c.dev_y.ptr(), c.dev_streams.ptr(), out.ptr(), c.dev_fn, fn_f16,
                part.ptr(), d, n_tok, tpc as u64,
            ]);
            let ctx = format!("{what}, {tpc} tokens per CTA");
            check_bits(
                &mut failures,
                &format!("hc_post_mix_span streams, {ctx}"),
                &dev.download(&out).unwrap(),
                &mixed,
            );
            check_bits(
                &mut failures,
                &format!("hc_post_mix_span partials, {ctx}"),
                &dev.download(&part).unwrap(),
                &want_post,
            );
            dev.fill_bytes(&part, 0xff).unwrap();
            #[rustfmt::skip]
            launch(g, "hc_mix_partial_span", span, &[
                c.dev_streams.ptr(), c.dev_fn, fn_f16, part.ptr(), d, n_tok, tpc as u64,
            ]);
            check_bits(
                &mut failures,
                &format!("hc_mix_partial_span, {ctx}"),
                &dev.download(&part).unwrap(),
                &want_pre,
            );
        }
        eprintln!("{what}: split-K and span kernels checked");
    }
    assert_none(failures);
}

fn sigmoid(x: f64) -> f64 {
    1.0 / (1.0 + (-x).exp())
}

/// cpu/hc.rs split_sinkhorn's comb in f64: row softmax + eps, a column pass, then
/// `iters - 1` (row, column) passes.
fn sinkhorn(mix: &[f32], base: &[f32], scale: f32, iters: usize, eps: f64) -> Vec<f64> {
    let mut c: Vec<f64> = (0..N * N)
        .map(|e| mix[2 * N + e] as f64 * scale as f64 + base[2 * N + e] as f64)
        .collect();
    for row in c.chunks_exact_mut(N) {
        let mx = row.iter().cloned().fold(f64::MIN, f64::max);
        let s: f64 = row.iter().map(|v| (v - mx).exp()).sum();
        for v in row.iter_mut() {
            *v = (*v - mx).exp() / s + eps;
        }
    }
    let cols = |c: &mut Vec<f64>| {
        for k in 0..N {
            let s: f64 = (0..N).map(|j| c[j * N + k]).sum::<f64>() + eps;
            for j in 0..N {
                c[j * N + k] /= s;
            }
        }
    };
    cols(&mut c);
    for _ in 1..iters {
        for row in c.chunks_exact_mut(N) {
            let s: f64 = row.iter().sum::<f64>() + eps;
            for v in row.iter_mut() {
                *v /= s;
            }
        }
        cols(&mut c);
    }
    c
}

#[test]
fn pre_and_comb_match_the_host() {
    let Some(g) = gpu() else { return };
    let dev = &g.device;
    let (eps, rms_eps, iters) = (1e-6f64, 1e-6f64, 20usize);
    let mut rng = Rng::new(11);
    let mut failures = Vec::new();
    for c in cases(g) {
        let (d, n_tok) = (c.d, c.n_tok);
        // The partials hc_pre reduces, from the kernel that produces them.
        let part_host = c.partials(&c.streams);
        let part = dev.upload(&part_host).unwrap();
        let base: Vec<f32> = (0..R).map(|_| rng.f32()).collect();
        let scale = [0.7f32, 1.3, 0.9];
        let (dev_base, dev_scale) = (dev.upload(&base).unwrap(), dev.upload(&scale).unwrap());
        // The mix per token as hc_load_mix forms it: lane s sums slices s, s + 32, ... in
        // order, warp_sum's tree, times the RMS scale (f64).
        let mut want_pre = vec![0f32; n_tok * N];
        let mut want_post = vec![0f32; n_tok * N];
        let mut mixes = vec![[0f32; R]; n_tok];
        for t in 0..n_tok {
            let mut sums = [0f32; R + 1];
            for (r, sum) in sums.iter_mut().enumerate() {
                let mut lanes = [0f32; 32];
                for (lane, l) in lanes.iter_mut().enumerate() {
                    for s in (lane..c.slices).step_by(32) {
                        *l += part_host[(t * c.slices + s) * (R + 1) + r];
                    }
                }
                *sum = tree_f32(lanes);
            }
            let inv = (1.0 / (sums[R] as f64 / (N * d) as f64 + rms_eps).sqrt()) as f32;
            for r in 0..R {
                mixes[t][r] = sums[r] * inv;
            }
            for j in 0..N {
                let pre = sigmoid(mixes[t][j] as f64 * scale[0] as f64 + base[j] as f64) + eps;
                let post =
                    2.0 * sigmoid(mixes[t][N + j] as f64 * scale[1] as f64 + base[N + j] as f64);
                want_pre[t * N + j] = pre as f32;
                want_post[t * N + j] = post as f32;
            }
        }
        let maps = dev.alloc::<f32>(n_tok * M).unwrap();
        let x = dev.alloc::<f32>(n_tok * d).unwrap();
        // Slices and CTA sizes of hc_pre: decode's 1024 elements per 256 threads, spans' 4096
        // per 256 or 2048 per 128 (16 elements a thread), and a slice that is not a multiple
        // of 4 (the scalar loop).
        let d4 = d.next_multiple_of(4);
        for (slice, threads) in [
            (1024, 256),
            (d4.min(4096), 256),
            (d4.min(2048), 128),
            (100, 256),
        ] {
            dev.fill_bytes(&maps, 0xff).unwrap();
            dev.fill_bytes(&x, 0xff).unwrap();
            #[rustfmt::skip]
            launch(g, "hc_pre", grid(d.div_ceil(slice), n_tok, 1, threads), &[
                0, part.ptr(), c.slices as u64, dev_base.ptr(), dev_scale.ptr(),
                c.dev_streams.ptr(), maps.ptr(), x.ptr(), N as u64, d as u64, eps.to_bits(),
                rms_eps.to_bits(), slice as u64,
            ]);
            let got_maps = dev.download(&maps).unwrap();
            let got_x = dev.download(&x).unwrap();
            let what = format!("hc_pre d {d} tokens {n_tok} slice {slice} threads {threads}");
            let mut want_x = vec![0f32; n_tok * d];
            let mut worst = 0f32;
            for t in 0..n_tok {
                let pre = &got_maps[t * M..t * M + N];
                let post = &got_maps[t * M + N..t * M + 2 * N];
                for j in 0..N {
                    for (got, want) in [
                        (pre[j], want_pre[t * N + j]),
                        (post[j], want_post[t * N + j]),
                    ] {
                        worst = worst.max((got - want).abs() / want.abs().max(1.0));
                    }
                }
                // x from the GPU's own pre, as an FMA chain from 0 in stream order.
                let st = &c.streams[t * N * d..(t + 1) * N * d];
                for i in 0..d {
                    let mut acc = 0f32;
                    for (j, &p) in pre.iter().enumerate() {
                        acc = p.mul_add(st[j * d + i], acc);
                    }
                    want_x[t * d + i] = acc;
                }
            }
            if worst.is_nan() || worst > 1e-6 {
                failures.push(format!(
                    "{what}: pre/post mappings off by {worst:e} (relative)"
                ));
            }
            check_bits(&mut failures, &format!("{what}: x"), &got_x, &want_x);
        }
        // hc_comb: a warp per token, four per CTA (the last CTA partly idle when n_tok is not a
        // multiple of four), against the f64 Sinkhorn of the exact mix.
        dev.fill_bytes(&maps, 0xff).unwrap();
        #[rustfmt::skip]
        launch(g, "hc_comb", grid(n_tok.div_ceil(4), 1, 1, 128), &[
            0, part.ptr(), c.slices as u64, dev_base.ptr(), dev_scale.ptr(), maps.ptr(),
            N as u64, d as u64, iters as u64, eps.to_bits(), rms_eps.to_bits(), n_tok as u64,
        ]);
        let got_maps = dev.download(&maps).unwrap();
        let mut worst = 0f64;
        for t in 0..n_tok {
            let want = sinkhorn(&mixes[t], &base, scale[2], iters, eps);
            for (e, w) in want.iter().enumerate() {
                worst = worst.max((got_maps[t * M + 2 * N + e] as f64 - w).abs());
            }
        }
        if worst.is_nan() || worst > 1e-5 {
            failures.push(format!(
                "hc_comb d {d} tokens {n_tok}: comb off by {worst:e}"
            ));
        }
        eprintln!("hc_pre / hc_comb d {d} tokens {n_tok} checked (comb within {worst:.1e})");
    }
    assert_none(failures);
}

/// Records in `failures` a description of how `gpu` differs from `want`, if it does.
fn check_i8(failures: &mut Vec<String>, what: &str, gpu: &[i8], want: &[i8]) {
    assert_eq!(gpu.len(), want.len());
    if let Some(i) = gpu.iter().zip(want).position(|(a, b)| a != b) {
        let n = gpu.iter().zip(want).filter(|(a, b)| a != b).count();
        let msg = format!(
            "{what}: {n} of {} values differ; first at {i}: {} vs {}",
            gpu.len(),
            gpu[i],
            want[i]
        );
        eprintln!("{msg}");
        failures.push(msg);
    }
}

/// hc_pre_norm (decode: hc_pre fused with the sublayer's RMS norm and its quantization) against
/// the two launches it replaces, hc_pre (decode's slices) and then the rmsnorm kernel (the
/// launch code's choice), bit for bit: x, the pre/post maps, the normalized row and its Q8_0 /
/// Q8_K forms, for every quantizer set the widths allow, one CTA per token.
#[test]
fn pre_norm_matches_hc_pre_then_rmsnorm() {
    let Some(g) = gpu() else { return };
    let dev = &g.device;
    let (eps, rms_eps) = (1e-6f64, 1e-6f32);
    let mut rng = Rng::new(23);
    let mut failures = Vec::new();
    for c in cases(g) {
        let (d, n_tok) = (c.d, c.n_tok);
        if d % 8 != 0 || d > 4096 {
            continue;
        }
        let part = dev.upload(&c.partials(&c.streams)).unwrap();
        let base: Vec<f32> = (0..R).map(|_| rng.f32()).collect();
        let scale = [0.7f32, 1.3, 0.9];
        let (dev_base, dev_scale) = (dev.upload(&base).unwrap(), dev.upload(&scale).unwrap());
        let w: Vec<f32> = (0..d).map(|_| 1.0 + 0.5 * rng.f32()).collect();
        let dev_w = dev.upload(&w).unwrap();
        // The two-launch path: hc_pre as decode runs it, then the norm of every quantizer set.
        let maps_ref = dev.alloc::<f32>(n_tok * M).unwrap();
        let x_ref = dev.alloc::<f32>(n_tok * d).unwrap();
        dev.fill_bytes(&maps_ref, 0xff).unwrap();
        #[rustfmt::skip]
        launch(g, "hc_pre", grid(d.div_ceil(1024), n_tok, 1, 256), &[
            0, part.ptr(), c.slices as u64, dev_base.ptr(), dev_scale.ptr(),
            c.dev_streams.ptr(), maps_ref.ptr(), x_ref.ptr(), N as u64, d as u64, eps.to_bits(),
            (rms_eps as f64).to_bits(), 1024,
        ]);
        let want_maps: Vec<f32> = dev.download(&maps_ref).unwrap();
        let want_x = dev.download(&x_ref).unwrap();
        let threads = d.div_ceil(8).next_multiple_of(32).clamp(32, 512);
        for (name, q8_0, q8_k) in [
            ("hc_pre_norm", false, false),
            ("hc_pre_norm_q8_0", true, false),
            ("hc_pre_norm_q8_k", false, true),
            ("hc_pre_norm_q8_0_q8_k", true, true),
        ] {
            if (q8_0 && d % 32 != 0) || (q8_k && d % 256 != 0) {
                continue;
            }
            let alloc = |kind, on: bool| on.then(|| g.alloc_quantized(kind, d, n_tok).unwrap());
            let (mut r0, mut rk) = (alloc(ActQuant::Q8_0, q8_0), alloc(ActQuant::Q8K, q8_k));
            let (f0, fk) = (alloc(ActQuant::Q8_0, q8_0), alloc(ActQuant::Q8K, q8_k));
            for qa in [&r0, &rk, &f0, &fk].into_iter().flatten() {
                dev.fill_bytes(&qa.q, 0x5a).unwrap();
                dev.fill_bytes(&qa.d, 0xff).unwrap();
            }
            let mut y_ref = dev.alloc::<f32>(n_tok * d).unwrap();
            match (r0.as_mut(), rk.as_mut()) {
                (Some(a), Some(b)) => g
                    .rmsnorm_quantized_both(
                        &x_ref,
                        Some(&dev_w),
                        d,
                        n_tok,
                        rms_eps,
                        &mut y_ref,
                        a,
                        b,
                    )
                    .unwrap(),
                (Some(a), None) | (None, Some(a)) => g
                    .rmsnorm_quantized(&x_ref, Some(&dev_w), d, n_tok, rms_eps, &mut y_ref, a)
                    .unwrap(),
                (None, None) => g
                    .rmsnorm(&x_ref, Some(&dev_w), d, n_tok, rms_eps, &mut y_ref)
                    .unwrap(),
            }
            dev.synchronize().unwrap();
            let maps = dev.alloc::<f32>(n_tok * M).unwrap();
            let x = dev.alloc::<f32>(n_tok * d).unwrap();
            let y = dev.alloc::<f32>(n_tok * d).unwrap();
            dev.fill_bytes(&maps, 0xff).unwrap();
            dev.fill_bytes(&x, 0xff).unwrap();
            dev.fill_bytes(&y, 0xff).unwrap();
            let ptrs = |qa: &Option<ds4_cuda::QuantizedActivations>| {
                qa.as_ref().map_or((0, 0), |qa| (qa.q.ptr(), qa.d.ptr()))
            };
            let ((q0, d0), (qk, dk)) = (ptrs(&f0), ptrs(&fk));
            #[rustfmt::skip]
            launch(g, name, grid(n_tok, 1, 1, threads), &[
                0, part.ptr(), c.slices as u64, dev_base.ptr(), dev_scale.ptr(),
                c.dev_streams.ptr(), maps.ptr(), x.ptr(), N as u64, d as u64, eps.to_bits(),
                (rms_eps as f64).to_bits(), dev_w.ptr(), y.ptr(), q0, d0, qk, dk,
                (rms_eps as f64).to_bits(),
            ]);
            let what = format!("{name} d {d} tokens {n_tok}");
            // The pre and post maps (hc_pre leaves comb to hc_comb: not compared).
            let pick = |m: &[f32]| -> Vec<f32> {
                m.chunks_exact(M)
                    .flat_map(|t| t[..2 * N].to_vec())
                    .collect()
            };
            let got_maps = dev.download(&maps).unwrap();
            check_bits(
                &mut failures,
                &format!("{what}: maps"),
                &pick(&got_maps),
                &pick(&want_maps),
            );
            check_bits(
                &mut failures,
                &format!("{what}: x"),
                &dev.download(&x).unwrap(),
                &want_x,
            );
            check_bits(
                &mut failures,
                &format!("{what}: y"),
                &dev.download(&y).unwrap(),
                &dev.download(&y_ref).unwrap(),
            );
            for (kind, got, want) in [("Q8_0", &f0, &r0), ("Q8_K", &fk, &rk)] {
                let (Some(got), Some(want)) = (got, want) else {
                    continue;
                };
                check_i8(
                    &mut failures,
                    &format!("{what}: {kind} values"),
                    &dev.download(&got.q).unwrap(),
                    &dev.download(&want.q).unwrap(),
                );
                check_bits(
                    &mut failures,
                    &format!("{what}: {kind} scales"),
                    &dev.download(&got.d).unwrap(),
                    &dev.download(&want.d).unwrap(),
                );
            }
        }
        eprintln!("hc_pre_norm d {d} tokens {n_tok} checked");
    }
    assert_none(failures);
}
