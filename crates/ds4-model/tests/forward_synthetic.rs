//! The forward pass on a synthetic model whose rows are long enough for ds4's expert formats
//! (IQ2_XXS gate/up, Q2_K down, Q8_K activations) and whose indexer heads are 128 wide (the
//! Hadamard of ds4 numerics): the tiny HF fixtures cannot exercise these paths.

#[path = "../benches/synthetic/mod.rs"]
mod synthetic;

use std::sync::Arc;

use ds4_gguf::reader::GgufFile;
use ds4_model::backend::{eval_all_positions, Backend, EvalMode, Logits, Session};
use ds4_model::cpu::CpuBackend;
use ds4_model::layout::WeightsMode;
use ds4_model::numerics::Numerics;

fn model(mode: WeightsMode, numerics: Numerics) -> CpuBackend {
    let cfg = synthetic::small_config();
    let dir = std::env::temp_dir().join(format!("ds4-synthetic-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    // Tests run in parallel: every model gets its own file.
    static NEXT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let path = dir.join(format!("small-{}-{numerics}-{n}.gguf", mode.name()));
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
    // A session of a larger context takes the payload and continues the same way; one too
    // small for the saved tokens refuses it.
    let mut large = backend.new_session(400).unwrap();
    large.restore(&snap).unwrap();
    assert!(large.eval(&toks[cut..], Logits::All).unwrap() == all[cut * vocab..]);
    let mut small = backend.new_session(cut).unwrap();
    assert!(small.restore(&snap).is_err());
}

/// Significant bits of an f32 (0 for zero): 24 minus the trailing zero bits of the mantissa.
fn significant_bits(v: f32) -> u32 {
    if v == 0.0 {
        return 0;
    }
    let mantissa = (v.to_bits() & 0x7f_ffff) | 0x80_0000;
    24 - mantissa.trailing_zeros()
}

#[test]
fn ds4_numerics_store_fp8_kv_and_fp4_indexer_rows_in_f16() {
    let toks = tokens();
    let cfg = synthetic::small_config();
    let nope = cfg.head_dim - cfg.rope_dim;
    for numerics in [Numerics::Ds4, Numerics::Reference] {
        let backend = model(WeightsMode::F32, numerics);
        let mut s = backend.session(128).unwrap();
        s.eval(&toks, Logits::Last).unwrap();
        let state = s.state();
        let (mut kv_values, mut kv_fp8, mut index_values, mut index_fp4) = (0, 0, 0, 0);
        let mut all_f16 = true;
        for layer in &state.layers {
            let mut kv_rows: Vec<&[f32]> = (toks.len() - 16..toks.len())
                .map(|p| layer.raw.get(p))
                .collect();
            if let Some(c) = &layer.attn {
                kv_rows.extend((0..c.rows.len()).map(|i| c.rows.row(i)));
            }
            for row in kv_rows {
                all_f16 &= row.iter().all(|&v| ds4_model::numerics::f16_round(v) == v);
                kv_values += nope;
                kv_fp8 += row[..nope]
                    .iter()
                    .filter(|&&v| significant_bits(v) <= 4)
                    .count();
            }
            if let Some(c) = &layer.index {
                for i in 0..c.rows.len() {
                    let row = c.rows.row(i);
                    all_f16 &= row.iter().all(|&v| ds4_model::numerics::f16_round(v) == v);
                    index_values += row.len();
                    index_fp4 += row.iter().filter(|&&v| significant_bits(v) <= 2).count();
                }
            }
        }
        assert!(kv_values > 0 && index_values > 0);
        if numerics == Numerics::Ds4 {
            // E4M3 has 3 mantissa bits, E2M1 one: every stored value has at most 4 / 2
            // significant bits, and every cached row is f16.
            assert!(all_f16, "ds4 numerics store f16 rows");
            assert_eq!(
                kv_fp8, kv_values,
                "every nope KV value is an FP8 code times a power of two"
            );
            assert_eq!(
                index_fp4, index_values,
                "every indexer key value is an FP4 code times a power of two"
            );
        } else {
            assert!(!all_f16, "reference numerics keep f32 rows");
            assert!(kv_fp8 < kv_values / 10 && index_fp4 < index_values / 10);
        }
    }
}

#[test]
fn an_impossible_context_is_an_error() {
    let backend = model(WeightsMode::F32, Numerics::Reference);
    assert!(backend.new_session(0).is_err());
    let err = backend
        .new_session(usize::MAX / 2)
        .err()
        .expect("cannot allocate");
    assert!(err.to_string().contains("cannot allocate"), "{err}");
}
