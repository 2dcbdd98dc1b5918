//! GEMV bandwidth at DeepSeek V4 Flash shapes, plus kernel compile / cache-hit times.
//!
//! `cargo run --release -p ds4-cuda --example gemv_bench [-- [--quick] [--filter TEXT] [--no-compile]]`
//! (`--filter`: only the cases whose name contains TEXT; `--no-compile`: skip the kernel
//! compile timings).
//!
//! Each case streams its weights from HBM: the matrices are replicated (dense) or drawn from a
//! full 256-expert stack with fresh random ids per call, so the 50 MB L2 cannot serve repeats.
//! Time = CUDA events around a loop of launches, median of 5 repeats; GB/s counts the weight
//! bytes one call must read (plus activations and outputs, which are tiny).

#[path = "../tests/common/mod.rs"]
mod common;

use std::time::Instant;

use common::{random_rows, Rng};
use ds4_cuda::{
    cuda_available, Activations, DeviceBuffer, DeviceWeights, Gpu, KernelCache, WeightFormat,
};

const HBM_PEAK_GBS: f64 = 3350.0; // H100 SXM datasheet

struct Case {
    name: &'static str,
    format: WeightFormat,
    cols: usize,
    rows: usize,
    /// 0: dense matrix; k: k experts chosen per call out of a 256-expert stack.
    experts_used: usize,
    n_vecs: usize,
    quantized_x: bool,
    /// Two matrices (stacks) of the shape per call (gemv_pair / expert_gemv_pair).
    pair: bool,
}

fn case(
    name: &'static str,
    format: WeightFormat,
    cols: usize,
    rows: usize,
    experts_used: usize,
    quantized_x: bool,
) -> Case {
    Case {
        name,
        format,
        cols,
        rows,
        experts_used,
        n_vecs: 1,
        quantized_x,
        pair: false,
    }
}

fn pair(mut c: Case) -> Case {
    c.pair = true;
    c
}

fn main() {
    if !cuda_available() {
        println!("skipped: no CUDA");
        return;
    }
    let args: Vec<String> = std::env::args().collect();
    let quick = args.iter().any(|a| a == "--quick");
    let no_compile = args.iter().any(|a| a == "--no-compile");
    let filter = args
        .iter()
        .position(|a| a == "--filter")
        .and_then(|i| args.get(i + 1).cloned());

    // Kernel load: cold (fresh cache dir: NVRTC compiles) then warm (cache hit).
    let dir = std::env::temp_dir().join(format!("ds4-bench-kcache-{}", std::process::id()));
    let cache = KernelCache::at(&dir);
    let t = Instant::now();
    let gpu = Gpu::open_with_cache(0, &cache).expect("open GPU");
    let cold = t.elapsed().as_secs_f64() * 1e3;
    let cold_stats = gpu.kernels.stats.clone();
    drop(gpu);
    let t = Instant::now();
    let gpu = Gpu::open_with_cache(0, &cache).expect("open GPU");
    let warm = t.elapsed().as_secs_f64() * 1e3;
    let info = gpu.device.info().clone();
    println!(
        "device: {} (cc {}.{}, {} SMs, {:.1} GiB, L2 {} MiB), NVRTC target {}",
        info.name,
        info.compute_capability.0,
        info.compute_capability.1,
        info.multiprocessors,
        info.total_memory as f64 / (1u64 << 30) as f64,
        info.l2_cache_bytes >> 20,
        gpu.device.nvrtc_arch()
    );
    println!("Gpu::open with cold kernel cache: {cold:.0} ms; with warm cache: {warm:.0} ms");
    if !no_compile {
        compile_times(&gpu, &cold_stats);
    }
    let _ = std::fs::remove_dir_all(&dir);
    bench_cases(&gpu, quick, filter.as_deref());
}

fn compile_times(gpu: &Gpu, cold_stats: &[ds4_cuda::compile::CompileStats]) {
    for (c, w) in cold_stats.iter().zip(&gpu.kernels.stats) {
        println!(
            "  module {:<10} compile {:>8.1} ms  cache hit {:>6.2} ms  cubin {} KiB  (hit: {} / {})",
            c.module,
            c.millis,
            w.millis,
            w.cubin_bytes >> 10,
            c.cache_hit,
            w.cache_hit
        );
    }
    // A compile that no cache of any kind can have seen: the gemv source plus a unique comment.
    let nonce_src = format!(
        "{}\n// nonce {} {:?}",
        ds4_cuda::kernels::MODULES[0].full_source(),
        std::process::id(),
        std::time::SystemTime::now()
    );
    let t = Instant::now();
    let cubin = ds4_cuda::compile::compile_cubin("gemv", &nonce_src, &gpu.device.nvrtc_arch())
        .expect("compile");
    println!(
        "NVRTC compile of gemv.cu with a fresh nonce: {:.0} ms ({} KiB cubin)",
        t.elapsed().as_secs_f64() * 1e3,
        cubin.len() >> 10
    );

    println!(
        "device-to-device copy (read+write): {:.0} GB/s",
        copy_bandwidth(gpu)
    );
}

fn bench_cases(gpu: &Gpu, quick: bool, filter: Option<&str>) {
    use WeightFormat::*;
    let mut cases = vec![
        case("attn_q_a 4096->1024", Q8_0, 4096, 1024, 0, false),
        case("attn_q_a 4096->1024", Q8_0, 4096, 1024, 0, true),
        case("attn_q_b 1024->32768", Q8_0, 1024, 32768, 0, false),
        case("attn_q_b 1024->32768", Q8_0, 1024, 32768, 0, true),
        case("q8 4096->32768", Q8_0, 4096, 32768, 0, false),
        case("q8 4096->32768", Q8_0, 4096, 32768, 0, true),
        case("attn_output_b 8192->4096", Q8_0, 8192, 4096, 0, false),
        case("attn_output_b 8192->4096", Q8_0, 8192, 4096, 0, true),
        case("output 4096->129280", Q8_0, 4096, 129280, 0, false),
        case("output 4096->129280", Q8_0, 4096, 129280, 0, true),
        case("shexp gate 4096->2048", Q8_0, 4096, 2048, 0, true),
        pair(case("shexp gate+up 4096->2048", Q8_0, 4096, 2048, 0, true)),
        case("shexp down 2048->4096", Q8_0, 2048, 4096, 0, true),
        case("router 4096->256 F16", F16, 4096, 256, 0, false),
        case("indexer q_b 1024->8192 F16", F16, 1024, 8192, 0, false),
        case("F32 4096->4096", F32, 4096, 4096, 0, false),
        case(
            "exp gate IQ2_XXS 4096->2048 x6",
            IQ2XXS,
            4096,
            2048,
            6,
            false,
        ),
        case(
            "exp gate IQ2_XXS 4096->2048 x6",
            IQ2XXS,
            4096,
            2048,
            6,
            true,
        ),
        pair(case(
            "exp gate+up IQ2_XXS 4096->2048 x6",
            IQ2XXS,
            4096,
            2048,
            6,
            true,
        )),
        case("exp down Q2_K 2048->4096 x6", Q2K, 2048, 4096, 6, false),
        case("exp down Q2_K 2048->4096 x6", Q2K, 2048, 4096, 6, true),
        case("exp gate Q4_K 4096->2048 x6", Q4K, 4096, 2048, 6, false),
        case("exp gate Q4_K 4096->2048 x6", Q4K, 4096, 2048, 6, true),
        case("exp down Q4_K 2048->4096 x6", Q4K, 2048, 4096, 6, true),
        case("IQ2_XXS 4096->2048 dense", IQ2XXS, 4096, 2048, 0, true),
        case("Q2_K 2048->4096 dense", Q2K, 2048, 4096, 0, true),
    ];
    // Small batches (prefill-ish / speculative): weights read once for all vectors.
    for nb in [2usize, 4, 8] {
        let mut c = case("attn_output_b 8192->4096", Q8_0, 8192, 4096, 0, true);
        c.n_vecs = nb;
        cases.push(c);
        let mut c = case(
            "exp gate IQ2_XXS 4096->2048 x6",
            IQ2XXS,
            4096,
            2048,
            6,
            true,
        );
        c.n_vecs = nb;
        cases.push(c);
    }
    if quick {
        cases.truncate(4);
    }
    if let Some(f) = filter {
        cases.retain(|c| c.name.contains(f));
    }
    println!(
        "\nGB/s = bytes one call must move / time. stream: back-to-back launches from the host, {} warps per CTA; \
         wN [capM]: {ITERS} calls captured in one CUDA graph and replayed, N warps per CTA [grid capped at M CTAs per SM].",
        ds4_cuda::kernels::DEFAULT_GEMV_WARPS
    );
    println!(
        "\n| case | format | x | vecs | MB/call | stream us | stream GB/s | w4 | w8 | w4 cap2 | w4 cap4 | w4 cap8 | w8 cap4 | best us | best % of 3.35 TB/s |\n|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"
    );
    for c in &cases {
        let r = run_case(gpu, c);
        let gbs = |us: f64| r.bytes as f64 / (us * 1e-6) / 1e9;
        let best = r.graph_us.iter().cloned().fold(f64::INFINITY, f64::min);
        let cols: Vec<String> = r
            .graph_us
            .iter()
            .map(|&us| format!("{:.0}", gbs(us)))
            .collect();
        println!(
            "| {}{} | {:?} | {} | {} | {:.2} | {:.2} | {:.0} | {} | {:.2} | {:.0}% |",
            c.name,
            if c.pair { " pair" } else { "" },
            c.format,
            if c.quantized_x { "q8 (dp4a)" } else { "f32" },
            c.n_vecs,
            r.bytes as f64 / 1e6,
            r.stream_us,
            gbs(r.stream_us),
            cols.join(" | "),
            best,
            100.0 * gbs(best) / HBM_PEAK_GBS
        );
    }
}

const ITERS: usize = 200;
/// (warps per CTA, grid cap in CTAs per SM) of the graph-timed columns.
const GRAPH_CONFIGS: [(usize, Option<usize>); 6] = [
    (4, None),
    (8, None),
    (4, Some(2)),
    (4, Some(4)),
    (4, Some(8)),
    (8, Some(4)),
];

/// Median over 5 repeats of the per-call time (µs) of `iters` calls of `f(i)`.
fn time_calls(gpu: &Gpu, iters: usize, mut f: impl FnMut(usize)) -> f64 {
    for i in 0..10 {
        f(i);
    }
    let mut samples = Vec::new();
    for rep in 0..5 {
        let start = gpu.device.record_event().unwrap();
        for i in 0..iters {
            f(rep * iters + i);
        }
        let end = gpu.device.record_event().unwrap();
        samples.push(gpu.device.elapsed_ms(&start, &end).unwrap() as f64 * 1e3 / iters as f64);
    }
    samples.sort_by(|a, b| a.partial_cmp(b).unwrap());
    samples[2]
}

/// Per-call µs of `iters` calls of `f(i)` captured into one CUDA graph (median of 5 replays).
fn time_graph(gpu: &Gpu, iters: usize, mut f: impl FnMut(usize)) -> f64 {
    use cudarc::driver::sys::{CUgraphInstantiate_flags, CUstreamCaptureMode};
    for i in 0..3 {
        f(i);
    }
    gpu.device.synchronize().unwrap();
    let stream = gpu.device.stream();
    stream
        .begin_capture(CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_RELAXED)
        .unwrap();
    for i in 0..iters {
        f(i);
    }
    let graph = stream
        .end_capture(CUgraphInstantiate_flags(0))
        .unwrap()
        .expect("captured graph");
    graph.launch().unwrap();
    let mut samples = Vec::new();
    for _ in 0..5 {
        let start = gpu.device.record_event().unwrap();
        graph.launch().unwrap();
        let end = gpu.device.record_event().unwrap();
        samples.push(gpu.device.elapsed_ms(&start, &end).unwrap() as f64 * 1e3 / iters as f64);
    }
    samples.sort_by(|a, b| a.partial_cmp(b).unwrap());
    samples[2]
}

fn copy_bandwidth(gpu: &Gpu) -> f64 {
    let n = 1usize << 30;
    let a = gpu.device.alloc_filled::<u8>(n, 1).unwrap();
    let b = gpu.device.alloc::<u8>(n).unwrap();
    let stream = gpu.device.stream().cu_stream();
    let us = time_calls(gpu, 10, |_| {
        // SAFETY: both buffers hold n bytes and live until after the timing.
        unsafe { cudarc::driver::result::memcpy_dtod_async(b.ptr(), a.ptr(), n, stream) }.unwrap();
    });
    2.0 * n as f64 / (us * 1e-6) / 1e9
}

struct Measured {
    /// Bytes one call must move (weights read, activations read, outputs written).
    bytes: usize,
    stream_us: f64,
    /// Graph-replayed µs per call for each of GRAPH_CONFIGS.
    graph_us: [f64; 6],
}

fn run_case(gpu: &Gpu, c: &Case) -> Measured {
    let mut rng = Rng::new(c.cols as u64 * 31 + c.rows as u64);
    let row_bytes = c.format.ggml().row_bytes(c.cols as u64).unwrap() as usize;
    let matrix_bytes = row_bytes * c.rows;
    // Dense: enough copies to exceed L2 several times over. Experts: one 256-expert stack.
    // Pairs: two stacks, or an even number of copies (call i reads copies 2i and 2i + 1).
    let (stack, copies) = if c.experts_used > 0 {
        (256, if c.pair { 2 } else { 1 })
    } else {
        let n = (512usize << 20).div_ceil(matrix_bytes).clamp(1, 64);
        (1, if c.pair { (n + 1) & !1 } else { n })
    };
    // Random data for one matrix, tiled to fill the region (content does not change timing).
    let one = random_rows(&mut rng, c.format, c.cols, c.rows);
    let total = matrix_bytes * stack * copies;
    let mut region = Vec::with_capacity(total);
    while region.len() < total {
        let take = (total - region.len()).min(one.len());
        region.extend_from_slice(&one[..take]);
    }
    let weights = DeviceWeights::upload(&gpu.device, &region, 0, &mut |_, _| {}).unwrap();
    drop(region);
    let mats: Vec<_> = (0..copies)
        .map(|i| {
            weights
                .matrix(i * matrix_bytes * stack, c.format, c.cols, c.rows, stack)
                .unwrap()
        })
        .collect();
    let slots = c.experts_used.max(1);
    let x = gpu.device.upload(&rng.f32s(c.cols * c.n_vecs)).unwrap();
    let mut qa = c
        .format
        .activation_quant()
        .map(|k| gpu.alloc_quantized(k, c.cols, c.n_vecs).unwrap());
    if let Some(q) = qa.as_mut() {
        gpu.quantize_activations(&x, q).unwrap();
    }
    let mut y = gpu.device.alloc::<f32>(c.rows * c.n_vecs * slots).unwrap();
    let mut y2 = gpu.device.alloc::<f32>(c.rows * c.n_vecs * slots).unwrap();
    // 64 id sets of distinct experts, cycled.
    let id_sets: Vec<DeviceBuffer<i32>> = (0..64)
        .map(|_| {
            let mut ids: Vec<i32> = Vec::new();
            while ids.len() < c.experts_used {
                let e = rng.below(256) as i32;
                if !ids.contains(&e) {
                    ids.push(e);
                }
            }
            gpu.device.upload(&ids).unwrap()
        })
        .collect();
    let act = if c.quantized_x {
        Activations::Quantized(qa.as_ref().unwrap())
    } else {
        Activations::F32(&x)
    };
    let mut call = |i: usize| {
        let ids = &id_sets[i % id_sets.len()];
        match (c.pair, c.experts_used > 0) {
            (false, true) => gpu
                .expert_gemv(&mats[0], ids, c.experts_used, act, false, c.n_vecs, &mut y)
                .unwrap(),
            (false, false) => gpu.gemv(&mats[i % copies], act, c.n_vecs, &mut y).unwrap(),
            (true, true) => gpu
                .expert_gemv_pair(
                    [&mats[0], &mats[1]],
                    ids,
                    c.experts_used,
                    act,
                    false,
                    c.n_vecs,
                    [&mut y, &mut y2],
                )
                .unwrap(),
            (true, false) => gpu
                .gemv_pair(
                    [&mats[(2 * i) % copies], &mats[(2 * i + 1) % copies]],
                    act,
                    c.n_vecs,
                    [&mut y, &mut y2],
                    None,
                )
                .unwrap(),
        }
    };
    gpu.set_gemv_warps(ds4_cuda::kernels::DEFAULT_GEMV_WARPS)
        .unwrap();
    let stream_us = time_calls(gpu, ITERS, &mut call);
    let mut graph_us = [0f64; 6];
    for (slot, (warps, cap)) in GRAPH_CONFIGS.into_iter().enumerate() {
        gpu.set_gemv_warps(warps).unwrap();
        gpu.set_gemv_grid_cap(cap);
        graph_us[slot] = time_graph(gpu, ITERS, &mut call);
    }
    gpu.set_gemv_warps(ds4_cuda::kernels::DEFAULT_GEMV_WARPS)
        .unwrap();
    gpu.set_gemv_grid_cap(None);
    let x_bytes = if c.quantized_x {
        c.cols * c.n_vecs * 9 / 8
    } else {
        c.cols * c.n_vecs * 4
    };
    Measured {
        bytes: (matrix_bytes * slots + c.rows * c.n_vecs * slots * 4) * (1 + c.pair as usize)
            + x_bytes,
        stream_us,
        graph_us,
    }
}
