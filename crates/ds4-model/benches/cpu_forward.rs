//! Prefill and decode throughput of the CPU backend (results in BENCHMARKS.md, "CPU forward").
//!
//!     cargo bench -p ds4-model --bench cpu_forward [-- tiny|flash-layer|flash-layer:ds4]
//!
//! - tiny: the `flash_mini` fixture (converted to F32) and the synthetic small model (ds4-q2
//!   weights, ds4 numerics): prefill of the whole prompt, then decode.
//! - flash-layer: one full-size DeepSeek V4 Flash CSA layer with top-k MoE and synthetic
//!   weights in ds4's q2 mix (Q8_0 attention/shared, F16 compressor/indexer, IQ2_XXS/Q2_K
//!   experts), both numerics: prefill of 256 tokens, then 16 decode steps at that depth;
//!   best of 2 runs (the first one also pays the page faults of the fresh mapping).
//!
//! Plain `main` (no harness): each figure is the best of a few runs, in tokens per second.

#[path = "synthetic/mod.rs"]
mod synthetic;

use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use ds4_gguf::reader::GgufFile;
use ds4_model::backend::{Backend, Logits};
use ds4_model::config::ModelConfig;
use ds4_model::convert::{convert, ConvertOptions};
use ds4_model::cpu::CpuBackend;
use ds4_model::layout::WeightsMode;
use ds4_model::numerics::Numerics;

fn temp(name: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("ds4-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir.join(name)
}

fn synthetic_backend(
    cfg: &ModelConfig,
    mode: WeightsMode,
    numerics: Numerics,
    name: &str,
) -> CpuBackend {
    let path = temp(name);
    let t = Instant::now();
    synthetic::write_model(cfg, mode, &path, 1);
    let file = GgufFile::open(&path).unwrap();
    std::fs::remove_file(&path).ok(); // the mapping stays valid
    eprintln!(
        "  ({name}: {:.1} GB written in {:.1} s)",
        file.file_len() as f64 / 1e9,
        t.elapsed().as_secs_f64()
    );
    CpuBackend::with_config(Arc::new(file), cfg.clone(), numerics).unwrap()
}

/// (prefill tok/s, decode tok/s): best of `reps` prefills of `prompt`, then `decode` single
/// tokens after the prompt.
fn measure(backend: &CpuBackend, prompt: &[u32], decode: usize, reps: usize) -> (f64, f64) {
    let mut best_prefill = f64::MAX;
    let mut best_decode = f64::MAX;
    for _ in 0..reps {
        let mut s = backend.new_session(prompt.len() + decode + 1).unwrap();
        let t = Instant::now();
        s.eval(prompt, Logits::Last).unwrap();
        best_prefill = best_prefill.min(t.elapsed().as_secs_f64());
        let t = Instant::now();
        for i in 0..decode {
            s.eval(&[prompt[i % prompt.len()]], Logits::Last).unwrap();
        }
        best_decode = best_decode.min(t.elapsed().as_secs_f64());
    }
    (
        prompt.len() as f64 / best_prefill,
        decode as f64 / best_decode,
    )
}

fn report(what: &str, (prefill, decode): (f64, f64), prompt: usize) {
    println!(
        "{what:<58} prefill {prompt:>4} tok: {prefill:>9.1} tok/s   decode: {decode:>8.1} tok/s"
    );
}

fn tiny() {
    let fixture =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/models/flash_mini");
    let gguf = temp("flash_mini.gguf");
    let opts = ConvertOptions::new(WeightsMode::F32);
    convert(&fixture, &gguf, &opts).unwrap();
    let tokens = ds4_model::npy::read(&std::fs::read(fixture.join("tokens.npy")).unwrap()).unwrap();
    let tokens: Vec<u32> = tokens.data.iter().map(|&v| v as u32).collect();
    for numerics in [Numerics::Reference, Numerics::Ds4] {
        let b = CpuBackend::load(&gguf, numerics).unwrap();
        report(
            &format!("flash_mini (F32 weights, {numerics} numerics)"),
            measure(&b, &tokens, 32, 5),
            tokens.len(),
        );
    }
    let cfg = synthetic::small_config();
    let b = synthetic_backend(&cfg, WeightsMode::Ds4Q2, Numerics::Ds4, "small-q2.gguf");
    let prompt: Vec<u32> = (0..128u32).map(|i| (i * 37 + 11) % 512).collect();
    report(
        "synthetic small d=256 (ds4-q2 weights, ds4 numerics)",
        measure(&b, &prompt, 32, 5),
        prompt.len(),
    );
}

fn flash_layer(modes: &[Numerics]) {
    let cfg = synthetic::flash_layer_config();
    let prompt: Vec<u32> = (0..256u32).map(|i| (i * 37 + 11) % 256).collect();
    for &numerics in modes {
        let b = synthetic_backend(&cfg, WeightsMode::Ds4Q2, numerics, "flash-layer-q2.gguf");
        report(
            &format!("1 Flash CSA layer (ds4-q2 weights, {numerics} numerics)"),
            measure(&b, &prompt, 16, 2),
            prompt.len(),
        );
    }
}

fn main() {
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with('-'))
        .collect();
    let want = |name: &str| args.is_empty() || args.iter().any(|a| a == name);
    println!("rayon threads: {}", rayon::current_num_threads());
    if want("tiny") {
        tiny();
    }
    if want("flash-layer") {
        flash_layer(&[Numerics::Ds4, Numerics::Reference]);
    } else if want("flash-layer:ds4") {
        flash_layer(&[Numerics::Ds4]);
    }
    std::fs::remove_dir_all(temp("x").parent().unwrap()).ok();
}
