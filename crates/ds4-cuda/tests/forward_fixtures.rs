//! The CUDA forward pass against the CPU backend and the transformers reference logits, on
//! every fixture model (tests/fixtures/models), every weight format `convert` produces, every
//! `ds4 logits` mode, both numerics modes; and session snapshots moving between backends.
//!
//! Errors are measured per position relative to that position's largest |logit| of the
//! comparison target, worst position reported. All results are printed as one table before
//! any assertion, so one GPU run reports every number. Without a GPU: "skipped: no CUDA".

use std::path::PathBuf;

use ds4_cuda::CudaBackend;
use ds4_model::backend::{eval_all_positions, Backend, EvalMode, Logits};
use ds4_model::convert::{convert, ConvertOptions};
use ds4_model::cpu::CpuBackend;
use ds4_model::layout::WeightsMode;
use ds4_model::npy;
use ds4_model::numerics::Numerics;

const FIXTURES: [&str; 4] = ["sliding_only", "flash_mini", "ratios_real", "vocab_real"];

const MODES: [EvalMode; 4] = [
    EvalMode::Full,
    EvalMode::Chunked(7),
    EvalMode::Chunked(64),
    EvalMode::Decode,
];

/// The fixtures directory: under the working directory when run from the repository root
/// (e.g. a test binary carried to a GPU machine), else beside this crate.
fn fixtures_dir() -> PathBuf {
    let here = PathBuf::from("tests/fixtures/models");
    if here.is_dir() {
        return here;
    }
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/models")
}

struct Fixture {
    tokens: Vec<u32>,
    logits: Vec<f32>,
    vocab: usize,
}

fn load_fixture(name: &str) -> Fixture {
    let dir = fixtures_dir().join(name);
    let tokens = npy::read(&std::fs::read(dir.join("tokens.npy")).unwrap()).unwrap();
    let logits = npy::read(&std::fs::read(dir.join("logits.npy")).unwrap()).unwrap();
    Fixture {
        tokens: tokens.data.iter().map(|&v| v as u32).collect(),
        vocab: logits.shape[1],
        logits: logits.as_f32(),
    }
}

fn converted(name: &str, mode: WeightsMode) -> PathBuf {
    // The tests run in parallel and may want the same file: one conversion at a time, so no
    // test opens a file another is still writing.
    static CONVERTING: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _one_at_a_time = CONVERTING.lock().unwrap_or_else(|e| e.into_inner());
    let dir = std::env::temp_dir().join(format!("ds4-cuda-fwd-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let out = dir.join(format!("{name}-{}.gguf", mode.name()));
    if !out.exists() {
        convert(&fixtures_dir().join(name), &out, &ConvertOptions::new(mode)).unwrap();
    }
    out
}

/// Per-position |a − b| / max|b|, sorted ascending (NaN counts as infinite).
fn position_errors(got: &[f32], want: &[f32], vocab: usize) -> Vec<f32> {
    assert_eq!(got.len(), want.len());
    let mut errs: Vec<f32> = got
        .chunks_exact(vocab)
        .zip(want.chunks_exact(vocab))
        .map(|(g, w)| {
            let scale = w.iter().fold(0f32, |m, x| m.max(x.abs()));
            let err = g.iter().zip(w).fold(0f32, |m, (a, b)| m.max((a - b).abs()));
            if err.is_nan() {
                f32::INFINITY
            } else {
                err / scale
            }
        })
        .collect();
    errs.sort_by(f32::total_cmp);
    errs
}

/// Worst per-position error.
fn rel_err(got: &[f32], want: &[f32], vocab: usize) -> f32 {
    *position_errors(got, want, vocab).last().unwrap()
}

/// Median per-position error.
fn median_err(got: &[f32], want: &[f32], vocab: usize) -> f32 {
    let e = position_errors(got, want, vocab);
    e[e.len() / 2]
}

fn run(backend: &dyn Backend, tokens: &[u32], mode: EvalMode) -> Vec<f32> {
    let mut s = backend.new_session(tokens.len() + 1).unwrap();
    eval_all_positions(s.as_mut(), tokens, mode).unwrap()
}

/// One measured comparison and its bound.
struct Check {
    what: String,
    err: f32,
    bound: f32,
}

/// Reference numerics must agree to 1e-3 of the largest logit (the acceptance).
const REFERENCE_BOUND: f32 = 1e-3;
/// ds4 numerics: int8 activation codes and FP8/FP4 codes are discontinuous, so an ulp of
/// difference (GPU vs CPU summation order) can round a code the other way, and these random
/// models amplify it (the CPU's own ds4-vs-reference gap reaches 1.4 on flash_mini) until an
/// indexer choice flips. The median position is the meaningful check there: measured on an
/// H100 and bounded here; the worst position is reported.
const DS4_MEDIAN_BOUND: f32 = 2e-2;
fn cuda() -> Option<()> {
    if ds4_cuda::cuda_available() {
        Some(())
    } else {
        println!("skipped: no CUDA");
        None
    }
}

fn check_fixture(name: &str, checks: &mut Vec<Check>) {
    let f = load_fixture(name);
    let v = f.vocab;
    let mut add = |what: String, err: f32, bound: f32| {
        println!("{what}: rel err {err:.3e} (bound {bound:.0e})");
        checks.push(Check { what, err, bound });
    };

    // Reference numerics, f32 weights: every mode vs the CPU and vs transformers.
    let path = converted(name, WeightsMode::F32);
    let cpu = CpuBackend::load(&path, Numerics::Reference).unwrap();
    let gpu = CudaBackend::load(&path, Numerics::Reference, 0).unwrap();
    let cpu_full = run(&cpu, &f.tokens, EvalMode::Full);
    for mode in MODES {
        let got = run(&gpu, &f.tokens, mode);
        add(
            format!("{name} f32 reference {mode:?}: cuda vs cpu"),
            rel_err(&got, &cpu_full, v),
            REFERENCE_BOUND,
        );
        add(
            format!("{name} f32 reference {mode:?}: cuda vs transformers"),
            rel_err(&got, &f.logits, v),
            REFERENCE_BOUND,
        );
    }

    // Snapshot moves: CUDA → CPU and CPU → CUDA, then continue.
    let half = f.tokens.len() / 2;
    let ctx = f.tokens.len() + 1;
    let mut g = gpu.new_session(ctx).unwrap();
    g.eval(&f.tokens[..half], Logits::Last).unwrap();
    let mut c = cpu.new_session(ctx).unwrap();
    c.restore(&g.snapshot()).unwrap();
    let rest = c.eval(&f.tokens[half..], Logits::All).unwrap();
    add(
        format!("{name} snapshot cuda→cpu, continued on cpu"),
        rel_err(&rest, &cpu_full[half * v..], v),
        REFERENCE_BOUND,
    );
    let mut c = cpu.new_session(ctx).unwrap();
    c.eval(&f.tokens[..half], Logits::Last).unwrap();
    let mut g = gpu.new_session(ctx).unwrap();
    g.restore(&c.snapshot()).unwrap();
    assert_eq!(g.tokens(), &f.tokens[..half]);
    assert_eq!(g.last_logits(), c.last_logits());
    let rest = g.eval(&f.tokens[half..], Logits::All).unwrap();
    add(
        format!("{name} snapshot cpu→cuda, continued on cuda"),
        rel_err(&rest, &cpu_full[half * v..], v),
        REFERENCE_BOUND,
    );
    drop((cpu, gpu));

    // ds4 numerics on f32 weights, and every other weight format (q8: reference numerics as
    // the CPU fixture test; the ds4 mixes in ds4 numerics; f16 in both).
    let cases = [
        (WeightsMode::F32, Numerics::Ds4),
        (WeightsMode::F16, Numerics::Reference),
        (WeightsMode::F16, Numerics::Ds4),
        (WeightsMode::Q8, Numerics::Reference),
        (WeightsMode::Q8, Numerics::Ds4),
        (WeightsMode::Ds4Q2, Numerics::Ds4),
        (WeightsMode::Ds4Q2, Numerics::Reference),
        (WeightsMode::Ds4Q4, Numerics::Ds4),
    ];
    for (wm, num) in cases {
        let path = converted(name, wm);
        let cpu = CpuBackend::load(&path, num).unwrap();
        let gpu = CudaBackend::load(&path, num, 0).unwrap();
        let want = run(&cpu, &f.tokens, EvalMode::Full);
        for mode in [EvalMode::Full, EvalMode::Decode] {
            let got = run(&gpu, &f.tokens, mode);
            let what = format!("{name} {} {num} {mode:?}: cuda vs cpu", wm.name());
            if num == Numerics::Reference {
                add(what, rel_err(&got, &want, v), REFERENCE_BOUND);
            } else {
                println!("{what}: worst position {:.3e}", rel_err(&got, &want, v));
                add(
                    format!("{what}, median position"),
                    median_err(&got, &want, v),
                    DS4_MEDIAN_BOUND,
                );
            }
        }
    }
}

#[test]
fn cuda_matches_cpu_and_reference_on_every_fixture() {
    if cuda().is_none() {
        return;
    }
    let mut checks = Vec::new();
    for name in FIXTURES {
        check_fixture(name, &mut checks);
    }
    let failed: Vec<&Check> = checks
        .iter()
        .filter(|c| c.err.is_nan() || c.err > c.bound)
        .collect();
    for c in &failed {
        println!("FAILED {}: {:.3e} > {:.0e}", c.what, c.err, c.bound);
    }
    assert!(
        failed.is_empty(),
        "{} of {} checks failed",
        failed.len(),
        checks.len()
    );
}

#[test]
fn cuda_session_errors_are_values() {
    if cuda().is_none() {
        return;
    }
    let path = converted("sliding_only", WeightsMode::F32);
    let gpu = CudaBackend::load(&path, Numerics::Reference, 0).unwrap();
    let mut s = gpu.new_session(4).unwrap();
    assert!(
        s.eval(&[1, 2, 3, 4, 5], Logits::Last).is_err(),
        "context overflow"
    );
    assert!(
        s.eval(&[1, 100_000], Logits::Last).is_err(),
        "token outside the vocabulary"
    );
    assert!(s.tokens().is_empty());
    s.eval(&[1, 2], Logits::Last).unwrap();
    s.reset();
    assert!(s.tokens().is_empty());
    assert!(s.restore(b"not a payload").is_err());
}

/// Weights in host memory (what an 80 GB GPU does with ds4's 80.76 GiB q2 file): the kernels
/// read them over PCIe through the same addresses, so every logit keeps its bits. All of the
/// region goes to host memory here, so every kernel, the tensor-copy GEMMs included, reads
/// its weights there, and spans of 128 tokens or more (ratios_real's 603 in one span) read
/// the routed experts' down stacks from their copies in the staging buffer.
#[test]
fn weights_in_host_memory_give_the_same_logits() {
    if cuda().is_none() {
        return;
    }
    use ds4_cuda::HostWeights;
    for (name, mode) in [
        ("flash_mini", WeightsMode::Ds4Q2),
        ("ratios_real", WeightsMode::Ds4Q2),
        ("ratios_real", WeightsMode::Q8),
    ] {
        let f = load_fixture(name);
        let path = converted(name, mode);
        let on_gpu = CudaBackend::load_placed(&path, Numerics::Ds4, 0, HostWeights::Off).unwrap();
        let on_host = CudaBackend::load_placed(&path, Numerics::Ds4, 0, HostWeights::All).unwrap();
        assert_eq!(on_gpu.model().host_weight_bytes(), 0);
        assert!(on_host.model().host_weight_bytes() >= on_host.model().weight_bytes());
        assert_eq!(on_gpu.model().staged_down_layers(), 0);
        assert_eq!(
            on_host.model().staged_down_layers(),
            on_host.model().cfg.n_layers
        );
        for eval in [EvalMode::Full, EvalMode::Chunked(64), EvalMode::Decode] {
            let want = run(&on_gpu, &f.tokens, eval);
            let got = run(&on_host, &f.tokens, eval);
            let same = want
                .iter()
                .zip(&got)
                .all(|(a, b)| a.to_bits() == b.to_bits());
            assert!(
                same && want.len() == got.len(),
                "{name} {}: logits with the weights in host memory differ",
                mode.name()
            );
            println!(
                "{name} {} {eval:?}: same bits, weights on GPU or in host memory",
                mode.name()
            );
        }
        // ratios_real's 603 tokens in one span read every layer's staged down stack.
        if f.tokens.len() >= 128 {
            assert!(
                on_host.model().staged_reads() >= on_host.model().cfg.n_layers,
                "{name}: {} staged reads",
                on_host.model().staged_reads()
            );
        }
    }
}
