//! Tokenizer throughput on the committed corpus (tests/fixtures/text/tokenizer_corpus.jsonl):
//! encoding each of its strings, encoding it as one long text (warm and cold piece cache, and
//! with the HF engine for comparison), and decoding.
//! Run: `cargo bench -p ds4-text --bench tokenizer`.

use std::path::PathBuf;

use divan::counter::BytesCount;
use divan::Bencher;
use ds4_text::tokenizer::Tokenizer;

fn main() {
    divan::main();
}

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn tokenizer() -> Tokenizer {
    Tokenizer::from_tokenizer_json(root().join("tests/fixtures/tokenizer/tokenizer.json"))
        .expect("tokenizer fixture loads")
}

fn corpus() -> Vec<String> {
    let text = std::fs::read_to_string(root().join("tests/fixtures/text/tokenizer_corpus.jsonl"))
        .expect("corpus fixture is committed");
    text.lines()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).expect("JSON line");
            v["text"].as_str().expect("text field").to_string()
        })
        .collect()
}

/// Each corpus string encoded separately (short strings: per-call overhead included).
#[divan::bench(sample_count = 10)]
fn encode_corpus_strings(bencher: Bencher) {
    let t = tokenizer();
    let texts = corpus();
    let bytes: usize = texts.iter().map(String::len).sum();
    bencher.counter(BytesCount::new(bytes)).bench_local(|| {
        let mut n = 0;
        for s in &texts {
            n += t.encode(divan::black_box(s)).len();
        }
        n
    });
}

/// The whole corpus as one ~0.6 MB text.
#[divan::bench(sample_count = 10)]
fn encode_one_long_text(bencher: Bencher) {
    let t = tokenizer();
    let text = corpus().join("\n");
    bencher
        .counter(BytesCount::new(text.len()))
        .bench_local(|| t.encode(divan::black_box(&text)).len());
}

/// The same with the piece cache emptied before every run (no piece seen before).
#[divan::bench(sample_count = 10)]
fn encode_one_long_text_cold_cache(bencher: Bencher) {
    let t = tokenizer();
    let text = corpus().join("\n");
    bencher
        .counter(BytesCount::new(text.len()))
        .with_inputs(|| t.clear_encode_cache())
        .bench_local_refs(|_| t.encode(divan::black_box(&text)).len());
}

/// The HF `tokenizers` engine on the same text (the reference the fast encoder matches).
#[divan::bench(sample_count = 10)]
fn encode_one_long_text_hf_engine(bencher: Bencher) {
    let t = tokenizer();
    let text = corpus().join("\n");
    bencher
        .counter(BytesCount::new(text.len()))
        .bench_local(|| t.encode_reference(divan::black_box(&text)).len());
}

/// Decoding the long text's ids (bytes counted are the decoded text's).
#[divan::bench(sample_count = 10)]
fn decode_one_long_text(bencher: Bencher) {
    let t = tokenizer();
    let text = corpus().join("\n");
    let ids = t.encode(&text);
    bencher
        .counter(BytesCount::new(text.len()))
        .bench_local(|| t.decode(divan::black_box(&ids)).len());
}
