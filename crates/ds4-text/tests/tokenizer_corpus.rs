//! Golden test: both ways of building the tokenizer give, on every string of the committed corpus,
//! exactly the ids Hugging Face `tokenizers` gave (scripts/text/make_tokenizer_corpus.py), and
//! decoding gives the string back, whole or token by token.

use std::path::PathBuf;

use ds4_text::tokenizer::Tokenizer;
use serde_json::Value;

fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn tokenizer_json_path() -> PathBuf {
    repo_root().join("tests/fixtures/tokenizer/tokenizer.json")
}

struct Sample {
    kind: String,
    text: String,
    ids: Vec<u32>,
}

fn corpus() -> Vec<Sample> {
    let path = repo_root().join("tests/fixtures/text/tokenizer_corpus.jsonl");
    let text = std::fs::read_to_string(&path).expect("corpus fixture is committed");
    text.lines()
        .map(|line| {
            let v: Value = serde_json::from_str(line).expect("corpus line is JSON");
            Sample {
                kind: v["kind"].as_str().unwrap().to_string(),
                text: v["text"].as_str().unwrap().to_string(),
                ids: v["ids"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|x| x.as_u64().unwrap() as u32)
                    .collect(),
            }
        })
        .collect()
}

/// The token and merge arrays a GGUF would hold, taken from tokenizer.json (id = index).
fn gguf_arrays() -> (Vec<String>, Vec<String>) {
    let json: Value =
        serde_json::from_str(&std::fs::read_to_string(tokenizer_json_path()).unwrap()).unwrap();
    let mut by_id: Vec<Option<String>> = Vec::new();
    let mut put = |id: usize, s: &str| {
        if by_id.len() <= id {
            by_id.resize(id + 1, None);
        }
        by_id[id] = Some(s.to_string());
    };
    for (token, id) in json["model"]["vocab"].as_object().unwrap() {
        put(id.as_u64().unwrap() as usize, token);
    }
    for added in json["added_tokens"].as_array().unwrap() {
        put(
            added["id"].as_u64().unwrap() as usize,
            added["content"].as_str().unwrap(),
        );
    }
    let tokens = by_id
        .into_iter()
        .map(|t| t.expect("no holes in DeepSeek's id space"))
        .collect();
    let merges = json["model"]["merges"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| match m {
            Value::String(s) => s.clone(),
            Value::Array(pair) => format!(
                "{} {}",
                pair[0].as_str().unwrap(),
                pair[1].as_str().unwrap()
            ),
            other => panic!("unexpected merge {other}"),
        })
        .collect();
    (tokens, merges)
}

fn check(tokenizer: &Tokenizer, samples: &[Sample], label: &str) {
    assert!(
        samples.len() >= 5000,
        "corpus has {} strings",
        samples.len()
    );
    let mut id_mismatches = Vec::new();
    let mut roundtrip_failures = Vec::new();
    for s in samples {
        let ids = tokenizer.encode(&s.text);
        if ids != s.ids {
            id_mismatches.push(format!(
                "[{}] {:?}: got {:?} want {:?}",
                s.kind, s.text, ids, s.ids
            ));
        }
        let reference = tokenizer.encode_reference(&s.text);
        if reference != s.ids {
            id_mismatches.push(format!(
                "[{}] HF engine {:?}: got {:?} want {:?}",
                s.kind, s.text, reference, s.ids
            ));
        }
        let decoded = tokenizer.decode(&ids);
        let mut stream = tokenizer.detokenizer();
        let mut streamed: String = ids.iter().map(|&id| stream.push(id)).collect();
        streamed.push_str(&stream.finish());
        if decoded != s.text || streamed != s.text {
            roundtrip_failures.push(format!(
                "[{}] {:?}: decode {:?} stream {:?}",
                s.kind, s.text, decoded, streamed
            ));
        }
    }
    assert!(
        id_mismatches.is_empty(),
        "{label}: {} of {} strings tokenize differently from HF, first: {:#?}",
        id_mismatches.len(),
        samples.len(),
        &id_mismatches[..id_mismatches.len().min(5)]
    );
    assert!(
        roundtrip_failures.is_empty(),
        "{label}: {} strings do not round-trip, first: {:#?}",
        roundtrip_failures.len(),
        &roundtrip_failures[..roundtrip_failures.len().min(5)]
    );
}

#[test]
fn tokenizer_json_matches_hf_ids_on_corpus() {
    let tokenizer = Tokenizer::from_tokenizer_json(tokenizer_json_path()).unwrap();
    assert!(
        tokenizer.has_fast_encoder(),
        "DeepSeek's tokenizer.json is recognised"
    );
    check(&tokenizer, &corpus(), "tokenizer.json");
}

#[test]
fn gguf_vocab_matches_hf_ids_on_corpus() {
    let (tokens, merges) = gguf_arrays();
    let tokenizer = Tokenizer::from_gguf_vocab(&tokens, &merges).unwrap();
    assert_eq!(tokenizer.vocab_size(), 129280);
    assert!(tokenizer.has_fast_encoder());
    check(&tokenizer, &corpus(), "gguf vocab+merges");
}

#[test]
fn gguf_arrays_from_tokenizer_json() {
    let (tokens, merges) = gguf_arrays();
    let vocab = ds4_text::tokenizer::gguf_vocab_from_tokenizer_json(tokenizer_json_path()).unwrap();
    assert_eq!((vocab.tokens, vocab.merges), (tokens, merges));
}

#[test]
fn special_ids_are_found_by_string() {
    let (tokens, merges) = gguf_arrays();
    let from_gguf = Tokenizer::from_gguf_vocab(&tokens, &merges).unwrap();
    let from_json = Tokenizer::from_tokenizer_json(tokenizer_json_path()).unwrap();
    for t in [&from_gguf, &from_json] {
        let s = t.specials();
        assert_eq!((s.bos, s.eos, s.user, s.assistant), (0, 1, 128803, 128804));
        assert_eq!(
            (s.think_start, s.think_end, s.dsml),
            (128821, 128822, 128825)
        );
    }
}

#[test]
fn detokenizer_holds_back_partial_utf8() {
    let t = Tokenizer::from_tokenizer_json(tokenizer_json_path()).unwrap();
    // Byte tokens of "é" (0xC3 0xA9) fed one at a time: nothing until the sequence completes.
    let symbols = ds4_text::tokenizer::byte_to_symbol();
    let c3 = t.token_id(&symbols[0xC3].to_string()).unwrap();
    let a9 = t.token_id(&symbols[0xA9].to_string()).unwrap();
    let mut d = t.detokenizer();
    assert_eq!(d.push(c3), "");
    assert_eq!(d.pending(), &[0xC3]);
    assert_eq!(d.push(a9), "é");
    // An invalid continuation is replaced at once; a dangling lead byte at the end on finish.
    assert_eq!(d.push(a9), "\u{FFFD}");
    assert_eq!(d.push(c3), "");
    assert_eq!(d.finish(), "\u{FFFD}");
    assert_eq!(t.decode(&[c3, a9, a9, c3]), "é\u{FFFD}\u{FFFD}");
}

#[test]
fn bad_gguf_vocab_gives_errors_naming_the_problem() {
    let (tokens, merges) = gguf_arrays();
    let mut bad_merges = merges.clone();
    bad_merges[7] = "nospace".to_string();
    let err = Tokenizer::from_gguf_vocab(&tokens, &bad_merges)
        .unwrap_err()
        .to_string();
    assert!(err.contains("merge #7"), "{err}");
    let mut bad_merges = merges.clone();
    bad_merges[3] = "Ġ zzzznotatoken".to_string();
    let err = Tokenizer::from_gguf_vocab(&tokens, &bad_merges)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("merge #3") && err.contains("not in the vocabulary"),
        "{err}"
    );
    let mut no_user = tokens.clone();
    no_user[128803] = "<｜Someone｜>".to_string();
    let err = Tokenizer::from_gguf_vocab(&no_user, &merges)
        .unwrap_err()
        .to_string();
    assert!(err.contains("<｜User｜>"), "{err}");
    let mut dup = tokens.clone();
    dup[5] = dup[6].clone();
    let err = Tokenizer::from_gguf_vocab(&dup, &merges)
        .unwrap_err()
        .to_string();
    assert!(err.contains("twice"), "{err}");
    let err = Tokenizer::from_tokenizer_json("/nonexistent/tokenizer.json")
        .unwrap_err()
        .to_string();
    assert!(err.contains("/nonexistent/tokenizer.json"), "{err}");
}

/// Random strings over a mix of scripts, digits, punctuation, whitespace, marks, emoji and
/// special-token fragments: the fast encoder and the HF engine agree, and decoding round-trips.
mod differential {
    use super::*;
    use proptest::prelude::*;
    use std::sync::OnceLock;

    fn tokenizer() -> &'static Tokenizer {
        static T: OnceLock<Tokenizer> = OnceLock::new();
        T.get_or_init(|| Tokenizer::from_tokenizer_json(tokenizer_json_path()).unwrap())
    }

    fn piece() -> impl Strategy<Value = String> {
        prop_oneof![
            "[a-zA-Z]{1,8}",
            "[0-9]{1,7}",
            "[ \\t\\r\\n\\u{a0}\\u{3000}\\u{2028}\\u{85}\\u{b}\\u{c}]{1,5}",
            "[!-/:-@\\\\\\[-`{-~]{1,4}",
            "[\\u{4e00}-\\u{9fa5}\\u{3040}-\\u{30ff}]{1,6}",
            "[\\u{300}-\\u{36f}\\u{64b}\\u{93f}]{1,3}",
            "[àéìòùçßøåæœ]{1,4}",
            "[\\u{1f300}-\\u{1f6ff}\\u{200d}\\u{fe0f}]{1,4}",
            "[\\u{0}-\\u{1f}\\u{7f}-\\u{9f}]{1,3}",
            "[\\u{ff01}-\\u{ff5e}\\u{2000}-\\u{206f}]{1,3}",
            "[\\u{10000}-\\u{10ffff}]{1,2}",
            Just("<｜User｜>".to_string()),
            Just("<think>".to_string()),
            Just("｜DSML｜".to_string()),
            Just("<｜".to_string()),
            Just("<｜fim▁hole｜>".to_string()),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 2000, failure_persistence: None, ..ProptestConfig::default() })]

        #[test]
        fn fast_encoder_matches_hf_engine(parts in prop::collection::vec(piece(), 0..16)) {
            let text: String = parts.concat();
            let t = tokenizer();
            let ids = t.encode(&text);
            prop_assert_eq!(&ids, &t.encode_reference(&text), "text {:?}", text);
            prop_assert_eq!(t.decode(&ids), text);
        }

        #[test]
        fn fast_encoder_matches_hf_engine_on_any_string(text in any::<String>()) {
            let t = tokenizer();
            let ids = t.encode(&text);
            prop_assert_eq!(&ids, &t.encode_reference(&text), "text {:?}", text);
            prop_assert_eq!(t.decode(&ids), text);
        }
    }
}

/// The engine shares one tokenizer and one parser per request across threads.
#[test]
fn shared_types_are_send_and_sync() {
    fn send_sync<T: Send + Sync>() {}
    send_sync::<Tokenizer>();
    send_sync::<ds4_text::DsmlStreamParser>();
    send_sync::<ds4_text::Sampler>();
    send_sync::<ds4_text::sampler::DsmlDecodeTracker>();
}
