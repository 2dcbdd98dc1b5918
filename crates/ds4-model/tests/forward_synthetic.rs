//! The forward pass on a synthetic model whose rows are long enough for ds4's expert formats
//! (IQ2_XXS gate/up, Q2_K down, Q8_K activations) and whose indexer heads are 128 wide (the
//! Hadamard of ds4 numerics): the tiny HF fixtures cannot exercise these paths.

#[path = "../benches/synthetic/mod.rs"]
mod synthetic;

use std::sync::Arc;

use ds4_gguf::reader::GgufFile;
use ds4_model::backend::{eval_all_positions, Backend, EvalMode, Logits};
use ds4_model::cpu::CpuBackend;
use ds4_model::layout::WeightsMode;
use ds4_model::numerics::Numerics;

fn model(mode: WeightsMode, numerics: Numerics) -> CpuBackend {
    let cfg = synthetic::small_config();
    let dir = std::env::temp_dir().join(format!("ds4-synthetic-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join(format!("small-{}-{numerics}.gguf", mode.name()));
    synthetic::write_model(&cfg, mode, &path, 7);
    let file = GgufFile::open(&path).unwrap();
    std::fs::remove_file(&path).ok();
    CpuBackend::with_config(Arc::new(file), cfg, numerics).unwrap()
}

fn tokens() -> Vec<u32> {
    (0..75u32).map(|i| (i * 37 + 11) % 512).collect()
}

fn rel_max_err(a: &[f32], b: &[f32], vocab: usize) -> f32 {
    a.chunks_exact(vocab)
        .zip(b.chunks_exact(vocab))
        .map(|(x, y)| {
            let scale = y.iter().fold(0f32, |m, v| m.max(v.abs()));
            x.iter().zip(y).fold(0f32, |m, (p, q)| m.max((p - q).abs())) / scale
        })
        .fold(0f32, f32::max)
}

#[test]
fn k_quant_experts_are_chunking_invariant_and_close_to_f32() {
    let toks = tokens();
    let f32_ref = model(WeightsMode::F32, Numerics::Reference);
    let vocab = f32_ref.config().vocab_size;
    let mut s = f32_ref.new_session(128).unwrap();
    let exact = eval_all_positions(s.as_mut(), &toks, EvalMode::Full).unwrap();
    assert!(exact.iter().all(|v| v.is_finite()));

    let mut q2_ds4 = None;
    for (mode, numerics, bound) in [
        (WeightsMode::F32, Numerics::Ds4, 0.5f32),
        (WeightsMode::Q8, Numerics::Ds4, 0.5),
        (WeightsMode::Ds4Q2, Numerics::Ds4, 1.5),
        (WeightsMode::Ds4Q2, Numerics::Reference, 1.5),
    ] {
        let backend = model(mode, numerics);
        let mut full = None;
        for eval_mode in [EvalMode::Full, EvalMode::Chunked(5), EvalMode::Decode] {
            let mut s = backend.new_session(128).unwrap();
            let got = eval_all_positions(s.as_mut(), &toks, eval_mode).unwrap();
            match &full {
                None => full = Some(got),
                Some(f) => assert!(&got == f, "{} {numerics} {eval_mode:?}", mode.name()),
            }
        }
        let full = full.unwrap();
        if (mode, numerics) == (WeightsMode::Ds4Q2, Numerics::Ds4) {
            q2_ds4 = Some(full.clone());
        }
        if (mode, numerics) == (WeightsMode::Ds4Q2, Numerics::Reference) {
            // Same 2-bit weights: only the activation quantization and QAT round trips differ.
            let err = rel_max_err(q2_ds4.as_ref().unwrap(), &full, vocab);
            println!("ds4-q2 weights: ds4 vs reference numerics: max rel err {err:.3e}");
            assert!(err > 0.0 && err < 0.5, "{err}");
        }
        let err = rel_max_err(&full, &exact, vocab);
        println!(
            "{} weights, {numerics} numerics vs F32 reference: max rel err {err:.3e}",
            mode.name()
        );
        assert!(
            err > 0.0 && err < bound,
            "{} {numerics}: {err}",
            mode.name()
        );
    }
}

#[test]
fn snapshot_restores_compressor_and_indexer_state() {
    let toks = tokens();
    let backend = model(WeightsMode::Ds4Q2, Numerics::Ds4);
    let mut a = backend.new_session(100).unwrap();
    let all = a.eval(&toks, Logits::All).unwrap();
    let vocab = backend.config().vocab_size;
    // Cut in the middle of a CSA window and of an HCA window (37 = 4·9 + 1 = 16·2 + 5).
    let cut = 37;
    let mut b = backend.new_session(100).unwrap();
    b.eval(&toks[..cut], Logits::Last).unwrap();
    let snap = b.snapshot();
    let mut c = backend.new_session(100).unwrap();
    c.restore(&snap).unwrap();
    let rest = c.eval(&toks[cut..], Logits::All).unwrap();
    assert!(rest == all[cut * vocab..]);
    // A session of another context size holds the payload only if its window sizes match.
    let mut small = backend.new_session(cut).unwrap();
    assert!(small.restore(&snap).is_err());
}
