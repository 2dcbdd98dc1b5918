//! Sampler semantics (ds4-spec.md §8): greedy rule, seeded reproducibility, the kept set of
//! top-k / top-p / min-p (tokens outside it are never drawn), draw frequencies (chi-square on
//! 20,000 seeded draws), top logprobs, and the DSML forcing tracker.

use ds4_text::sampler::{
    argmax, token_logprob, top_logprobs, DsmlDecodeState, DsmlDecodeTracker, Rng, Sampler,
    SamplerParams,
};

const DRAWS: usize = 20_000;

fn params(temperature: f32, top_p: f32, top_k: i32, min_p: f32, seed: u64) -> SamplerParams {
    SamplerParams {
        temperature,
        top_p,
        top_k,
        min_p,
        seed,
    }
}

/// Logits whose softmax weights relative to the top are `weights` (at T = 1).
fn logits_for(weights: &[f32]) -> Vec<f32> {
    weights.iter().map(|w| w.ln()).collect()
}

fn counts(p: SamplerParams, logits: &[f32]) -> Vec<usize> {
    let mut s = Sampler::new(p);
    let mut c = vec![0; logits.len()];
    for _ in 0..DRAWS {
        c[s.sample(logits) as usize] += 1;
    }
    c
}

/// Pearson chi-square of `observed` against probabilities `expected` (zero entries must be
/// unobserved), checked against the 99.99% quantile for up to 5 degrees of freedom.
fn assert_distribution(observed: &[usize], expected: &[f64]) {
    let total: usize = observed.iter().sum();
    let mut chi2 = 0.0;
    let mut df = 0usize;
    for (&o, &e) in observed.iter().zip(expected) {
        if e == 0.0 {
            assert_eq!(o, 0, "a token outside the kept set was drawn: {observed:?}");
            continue;
        }
        let want = e * total as f64;
        chi2 += (o as f64 - want).powi(2) / want;
        df += 1;
    }
    // 99.99% quantiles of chi-square with df-1 degrees of freedom.
    let limit: f64 = [0.0, 15.1, 18.4, 21.1, 23.5, 25.7][df.saturating_sub(1).min(5)];
    assert!(
        df <= 1 || chi2 < limit,
        "chi2 {chi2:.2} over {limit} (df {}): {observed:?} vs {expected:?}",
        df - 1
    );
}

fn normalized(w: &[f64]) -> Vec<f64> {
    let s: f64 = w.iter().sum();
    w.iter().map(|x| x / s).collect()
}

#[test]
fn greedy_takes_the_first_maximum() {
    let logits = [1.0, 3.0, f32::NAN, 3.0, 2.0];
    for t in [0.0, -1.0] {
        let mut s = Sampler::new(params(t, 0.9, 5, 0.1, 7));
        assert_eq!(s.sample(&logits), 1);
    }
    assert_eq!(argmax(&[f32::NAN, f32::NAN]), 0);
    assert_eq!(argmax(&[-1.0, f32::INFINITY, 5.0]), 1);
    // Temperature override for forced greedy steps.
    let mut s = Sampler::new(params(1.0, 1.0, 0, 0.0, 3));
    assert_eq!(s.sample_with_temperature(&[0.0, 0.1, 0.05], 0.0), 1);
}

#[test]
fn seeded_runs_repeat_and_seeds_differ() {
    let logits: Vec<f32> = (0..1000)
        .map(|i| ((i * 7919) % 1000) as f32 / 300.0)
        .collect();
    let run = |p: SamplerParams| -> Vec<u32> {
        let mut s = Sampler::new(p);
        (0..200).map(|_| s.sample(&logits)).collect()
    };
    for p in [
        params(1.0, 1.0, 0, 0.05, 1234),
        params(0.7, 0.9, 0, 0.0, 99),
        params(1.3, 0.95, 40, 0.02, 0),
    ] {
        assert_eq!(run(p), run(p));
        assert_ne!(
            run(p),
            run(SamplerParams {
                seed: p.seed + 1,
                ..p
            })
        );
    }
}

#[test]
fn vocab_order_walk_matches_a_hand_simulation() {
    // Full-vocab path (top_k 0, top_p 1): r = U * sum, subtract weights in id order.
    let weights = [0.2f32, 1.0, 0.5, 0.01, 0.7];
    let logits = logits_for(&weights);
    let min_p = 0.05;
    let mut rng = Rng::new(77);
    let mut s = Sampler::new(params(1.0, 1.0, 0, min_p, 77));
    for _ in 0..500 {
        let w: Vec<f32> = logits.iter().map(|l| (l - 0.0f32).exp()).collect();
        let sum: f32 = w.iter().filter(|&&p| p >= min_p).sum();
        let mut r = rng.next_f32() * sum;
        let mut want = 1; // best
        for (i, &p) in w.iter().enumerate() {
            if p < min_p {
                continue;
            }
            r -= p;
            if r <= 0.0 {
                want = i as u32;
                break;
            }
        }
        assert_eq!(s.sample(&logits), want);
    }
}

#[test]
fn min_p_full_vocab_distribution_and_support() {
    let weights = [1.0, 0.5, 0.25, 0.04, 0.01];
    let c = counts(params(1.0, 1.0, 0, 0.05, 11), &logits_for(&weights));
    assert_distribution(&c, &normalized(&[1.0, 0.5, 0.25, 0.0, 0.0]));
    // min_p 0 keeps everything.
    let c = counts(params(1.0, 1.0, 0, 0.0, 12), &logits_for(&weights));
    assert_distribution(&c, &normalized(&[1.0, 0.5, 0.25, 0.04, 0.01]));
}

#[test]
fn temperature_scales_logits() {
    // At T = 2 the weights become square roots.
    let c = counts(
        params(2.0, 1.0, 0, 0.0, 13),
        &logits_for(&[1.0, 0.25, 0.0625]),
    );
    assert_distribution(&c, &normalized(&[1.0, 0.5, 0.25]));
}

#[test]
fn top_k_keeps_the_k_largest() {
    let weights = [0.3, 1.0, 0.6, 0.9, 0.05, 0.9];
    let c = counts(params(1.0, 1.0, 3, 0.0, 14), &logits_for(&weights));
    // Ties (ids 3 and 5 at 0.9) keep the lower id.
    assert_distribution(&c, &normalized(&[0.0, 1.0, 0.0, 0.9, 0.0, 0.9]));
    let c = counts(params(1.0, 1.0, 1, 0.0, 15), &logits_for(&weights));
    assert_eq!(c[1], DRAWS);
    // top_k larger than the vocabulary: everything.
    let c = counts(params(1.0, 1.0, 5000, 0.0, 16), &logits_for(&weights));
    assert_distribution(&c, &normalized(&[0.3, 1.0, 0.6, 0.9, 0.05, 0.9]));
}

#[test]
fn top_p_keeps_the_crossing_token() {
    // Shares 0.5, 0.3, 0.2: 0.5 < 0.6, then 0.8 >= 0.6 stops with the second kept.
    let weights = [0.3, 0.5, 0.2];
    let c = counts(params(1.0, 0.6, 0, 0.0, 17), &logits_for(&weights));
    assert_distribution(&c, &normalized(&[0.3, 0.5, 0.0]));
    // top_p exactly reached by the first: only it.
    let c = counts(params(1.0, 0.5, 0, 0.0, 18), &logits_for(&weights));
    assert_eq!(c[1], DRAWS);
    // Out-of-range top_p means 1.
    let c = counts(params(1.0, 1.5, 0, 0.0, 19), &logits_for(&weights));
    assert_distribution(&c, &normalized(&[0.3, 0.5, 0.2]));
}

#[test]
fn min_p_in_the_sorted_path() {
    // Shares 0.5, 0.3, 0.2; min share = 0.5 * 0.5 = 0.25: the 0.2 token is dropped.
    let weights = [1.0, 0.6, 0.4];
    let c = counts(params(1.0, 0.99, 0, 0.5, 20), &logits_for(&weights));
    assert_distribution(&c, &normalized(&[1.0, 0.6, 0.0]));
    // With top_k as well.
    // With top_k as well: the top two are ids 0 and 2, and 0.6 >= 0.5 x 1 keeps id 2.
    let c = counts(params(1.0, 1.0, 2, 0.5, 21), &logits_for(&[1.0, 0.2, 0.6]));
    assert_distribution(&c, &normalized(&[1.0, 0.0, 0.6]));
    // 0.4 < 0.5 x 1: only the top token is left.
    let c = counts(params(1.0, 1.0, 2, 0.5, 22), &logits_for(&[1.0, 0.2, 0.4]));
    assert_eq!(c[0], DRAWS);
}

#[test]
fn non_finite_logits_are_never_drawn() {
    let logits = [f32::NEG_INFINITY, 0.0, f32::NAN, 0.0, f32::INFINITY];
    for p in [
        params(1.0, 1.0, 0, 0.0, 1),
        params(1.0, 0.9, 0, 0.0, 2),
        params(1.0, 1.0, 3, 0.0, 3),
    ] {
        let c = counts(p, &logits);
        assert_eq!(c[1] + c[3], DRAWS, "{p:?}: {c:?}");
    }
    // Nothing finite: argmax (+inf wins).
    let mut s = Sampler::new(params(1.0, 1.0, 0, 0.0, 4));
    assert_eq!(s.sample(&[f32::NEG_INFINITY, f32::INFINITY, f32::NAN]), 1);
}

#[test]
fn top_logprobs_are_log_softmax() {
    let logits = [
        0.0f32,
        2.0f32.ln(),
        f32::NEG_INFINITY,
        2.0f32.ln(),
        1.0f32.ln(),
    ];
    // Weights 1, 2, 2, 1 (the -inf is excluded): sum 6.
    let top = top_logprobs(&logits, 3);
    assert_eq!(top.iter().map(|t| t.id).collect::<Vec<_>>(), vec![1, 3, 0]);
    for t in &top {
        let want = (f64::from(t.logit).exp() / 6.0).ln() as f32;
        assert!((t.logprob - want).abs() < 1e-6, "{t:?} vs {want}");
    }
    assert_eq!(top_logprobs(&logits, 100).len(), 4);
    assert!(top_logprobs(&[f32::NAN, f32::NEG_INFINITY], 5).is_empty());
    let one = token_logprob(&logits, 2).unwrap();
    assert_eq!(one.logprob, f32::NEG_INFINITY);
    assert!((token_logprob(&logits, 0).unwrap().logprob - (1.0f32 / 6.0).ln()).abs() < 1e-6);
    assert!(token_logprob(&logits, 99).is_none());
}

#[test]
fn dsml_tracker_forces_structure_and_frees_payload() {
    use DsmlDecodeState::*;
    let mut t = DsmlDecodeTracker::new();
    let steps: &[(&str, DsmlDecodeState)] = &[
        ("I will run it.", Outside),
        ("\n\n<｜DSML｜tool", Outside),
        ("_calls>", Structural),
        ("\n<｜DSML｜invoke name=\"bash\">\n", Structural),
        (
            "<｜DSML｜parameter name=\"command\" string=\"true\">",
            StringBody,
        ),
        ("ls -la <x>", StringBody),
        ("<", StringBody), // one byte of a closing tag is not enough to know
        ("/", Structural), // "</" may start the closing tag
        ("｜DSML｜parameter>\n", Structural),
        (
            "<｜DSML｜parameter name=\"opts\" string=\"false\">",
            JsonStructural,
        ),
        ("{\"a\": \"", JsonString),
        ("x\\\" }", JsonString),
        ("\"", JsonStructural),
        ("}</", Structural),
        ("｜DSML｜parameter>\n</｜DSML｜invoke>\n", Structural),
        ("</｜DSML｜tool_calls>", Outside),
        ("<｜DSML｜tool_calls>", Outside), // one block per message
    ];
    for (piece, want) in steps {
        assert_eq!(t.push(piece), *want, "after {piece:?}");
        assert_eq!(
            t.state().forces_greedy(),
            matches!(want, Structural | JsonStructural)
        );
    }
    // Missing string attribute: treated as JSON (greedy outside string literals).
    let mut t = DsmlDecodeTracker::new();
    t.push("<tool_calls><invoke name=\"f\"><parameter name=\"p\">");
    assert_eq!(t.state(), JsonStructural);
    assert!(t.state().in_tool_call());
}

#[test]
fn logprob_dump_has_ds4_shape() {
    use ds4_text::logprobs::{token_json, LogprobDump};
    use ds4_text::tokenizer::{byte_to_symbol, Tokenizer};
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/fixtures/tokenizer/tokenizer.json");
    let t = Tokenizer::from_tokenizer_json(path).unwrap();
    let hello = t.encode("Hello")[0];
    let mut logits = vec![f32::NEG_INFINITY; t.vocab_size()];
    logits[hello as usize] = 2.0;
    logits[1] = 2.0f32 - 2.0f32.ln(); // EOS with half the weight
    let mut dump = LogprobDump::new(7, 4096, 0);
    assert_eq!(dump.push_step(&t, &logits), hello);
    let doc = dump.to_json();
    assert_eq!(doc["source"], "ds4");
    assert_eq!(
        (
            doc["prompt_tokens"].as_u64(),
            doc["ctx"].as_u64(),
            doc["top_k"].as_u64()
        ),
        (Some(7), Some(4096), Some(20))
    );
    let step = &doc["steps"][0];
    assert_eq!(step["step"], 0);
    assert_eq!(
        step["selected"],
        serde_json::json!({"id": hello, "text": "Hello", "bytes": [72, 101, 108, 108, 111]})
    );
    let top = step["top_logprobs"].as_array().unwrap();
    assert_eq!(top.len(), 2, "only finite logits are listed");
    assert_eq!(top[1]["token"]["text"], "<｜end▁of▁sentence｜>");
    let lp0 = top[0]["logprob"].as_f64().unwrap();
    assert!((lp0 - (2.0f64 / 3.0).ln()).abs() < 1e-6, "{lp0}");
    // A lone UTF-8 lead byte: bytes authoritative, text maps each byte to the same code point.
    let c3 = t.token_id(&byte_to_symbol()[0xC3].to_string()).unwrap();
    assert_eq!(
        token_json(&t, c3),
        serde_json::json!({"id": c3, "text": "\u{C3}", "bytes": [0xC3]})
    );
    assert_eq!(LogprobDump::new(1, 1, 500).to_json()["top_k"], 128);
}
