//! `ds4 bench`'s driver on a tiny fixture model (flash_mini: sliding, CSA and HCA layers):
//! well-formed rows and CSV, positive rates, snapshot sizes that grow with the context, and a
//! decode at each frontier that matches a fresh session's (so restoring the snapshot really
//! undid the generated tokens).

use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};

use ds4_model::backend::{Backend, Logits};
use ds4_model::bench::{pseudo_tokens, run_bench, BenchPlan, BenchRow, Step};
use ds4_model::convert::{convert, ConvertOptions};
use ds4_model::cpu::CpuBackend;
use ds4_model::layout::WeightsMode;
use ds4_model::numerics::Numerics;

fn flash_mini() -> CpuBackend {
    // Tests run in parallel: each conversion gets its own directory.
    static CALLS: AtomicUsize = AtomicUsize::new(0);
    let n = CALLS.fetch_add(1, Ordering::Relaxed);
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/models/flash_mini");
    let dir = std::env::temp_dir().join(format!("ds4-bench-{}-{n}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let out = dir.join("flash_mini.gguf");
    let opts = ConvertOptions {
        weights: WeightsMode::F32,
        tokenizer: None,
        name: None,
    };
    convert(&src, &out, &opts).unwrap();
    let backend = CpuBackend::load(&out, Numerics::Reference).unwrap();
    std::fs::remove_dir_all(&dir).unwrap();
    backend
}

#[test]
fn bench_rows_and_csv_are_well_formed() {
    let backend = flash_mini();
    let vocab = backend.config().vocab_size;
    let plan = BenchPlan {
        ctx_start: 16,
        ctx_max: 56,
        step: Step::Incr(16),
        gen_tokens: 5,
    };
    let stream = pseudo_tokens(vocab, 56);
    // Greedy, never id 1 (as `ds4 bench` never picks EOS).
    let exclude = [1];
    let mut session = backend.new_session(plan.ctx_needed().unwrap()).unwrap();
    let mut seen = 0;
    let rows = run_bench(session.as_mut(), &stream, &plan, &exclude, |_| seen += 1).unwrap();
    assert_eq!(seen, rows.len());
    let ctx: Vec<usize> = rows.iter().map(|r| r.ctx_tokens).collect();
    assert_eq!(ctx, vec![16, 32, 48]);
    for (i, r) in rows.iter().enumerate() {
        assert_eq!(r.prefill_tokens, 16);
        assert!(r.prefill_tps > 0.0 && r.gen_tps > 0.0, "{r:?}");
        assert_eq!(r.gen_tokens, 5);
        assert_eq!(r.generated.len(), 5);
        assert!(!r.generated.contains(&1), "excluded id decoded");
        if i > 0 {
            assert!(r.kvcache_bytes > rows[i - 1].kvcache_bytes);
        }
        let line = r.csv_line();
        let fields: Vec<&str> = line.split(',').collect();
        assert_eq!(fields.len(), BenchRow::CSV_HEADER.split(',').count());
        assert_eq!(fields[0].parse::<usize>().unwrap(), r.ctx_tokens);
        assert!(fields[2].parse::<f64>().unwrap() > 0.0);
        assert_eq!(fields[5].parse::<usize>().unwrap(), r.kvcache_bytes);
    }
    // The generated tokens were rolled back: the session holds exactly the stream.
    assert_eq!(session.tokens(), &stream[..48]);

    // A fresh session fed the stream to 32 decodes the same tokens as the bench did there,
    // picked by a plain scan: the first maximum, never id 1.
    let pick = |logits: &[f32]| -> u32 {
        let mut best: Option<usize> = None;
        for (i, &v) in logits.iter().enumerate() {
            if i != 1 && !v.is_nan() && best.is_none_or(|b| v > logits[b]) {
                best = Some(i);
            }
        }
        best.unwrap_or(0) as u32
    };
    let mut fresh = backend.new_session(64).unwrap();
    let mut logits = fresh.eval(&stream[..32], Logits::Last).unwrap();
    let mut want = Vec::new();
    for _ in 0..5 {
        let t = pick(&logits);
        want.push(t);
        logits = fresh.eval(&[t], Logits::Last).unwrap();
    }
    assert_eq!(rows[1].generated, want);
}

#[test]
fn bench_rejects_a_short_stream_or_small_session() {
    let backend = flash_mini();
    let plan = BenchPlan {
        ctx_start: 8,
        ctx_max: 16,
        step: Step::Incr(8),
        gen_tokens: 2,
    };
    let mut small = backend.new_session(16).unwrap();
    assert!(run_bench(small.as_mut(), &[3; 16], &plan, &[], |_| {}).is_err());
    let mut ok = backend.new_session(18).unwrap();
    assert!(run_bench(ok.as_mut(), &[3; 10], &plan, &[], |_| {}).is_err());
    assert!(run_bench(ok.as_mut(), &[3; 16], &plan, &[], |_| {}).is_ok());
}
