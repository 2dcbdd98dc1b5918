//! Snapshot → .kv file → restore on the CPU backend with the tiny Flash-like fixture
//! (tests/fixtures/models/flash_mini): the restored session has bit-identical next-token
//! logits and the same greedy continuation as the live one.

mod common;

use std::path::{Path, PathBuf};

use common::{render, scratch_dir};
use ds4_kvstore::{KvStore, SaveReason, SaveRequest, StoreOptions, ToolMapEntry};
use ds4_model::backend::{Backend, Logits, Session};
use ds4_model::convert::{convert, ConvertOptions};
use ds4_model::cpu::CpuBackend;
use ds4_model::layout::WeightsMode;
use ds4_model::npy;
use ds4_model::numerics::Numerics;

fn fixture_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/models/flash_mini")
}

fn backend(work: &Path) -> CpuBackend {
    let out = work.join("flash_mini.gguf");
    let opts = ConvertOptions {
        weights: WeightsMode::F32,
        tokenizer: None,
        name: None,
    };
    convert(&fixture_dir(), &out, &opts).unwrap();
    CpuBackend::load(&out, Numerics::Reference).unwrap()
}

fn argmax(v: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &x) in v.iter().enumerate() {
        if x > v[best] {
            best = i;
        }
    }
    best as u32
}

/// Greedy decoding of `n` tokens; returns the tokens and every step's logits.
fn greedy(s: &mut dyn Session, n: usize) -> (Vec<u32>, Vec<Vec<f32>>) {
    let mut toks = Vec::new();
    let mut logits = Vec::new();
    for _ in 0..n {
        let t = argmax(s.last_logits());
        toks.push(t);
        logits.push(s.eval(&[t], Logits::Last).unwrap());
    }
    (toks, logits)
}

fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

#[test]
fn restored_session_continues_bit_identically() {
    let work = scratch_dir("roundtrip");
    let model = backend(&work);
    let cfg = model.config().clone();
    let prompt: Vec<u32> = npy::read(&std::fs::read(fixture_dir().join("tokens.npy")).unwrap())
        .unwrap()
        .data
        .iter()
        .map(|&v| v as u32)
        .collect();
    assert!(prompt.len() > 60);
    let ctx = 128;
    let cut = 45; // the checkpoint: window 12 < 45, 11 CSA rows, 2 HCA rows, open frontiers
    let cache = work.join("kv");
    let mut opts = StoreOptions::new(ctx as u32, 4);
    opts.min_tokens = 16;
    opts.budget_bytes = 64 << 20;

    // The live session: prefill the checkpoint prefix, save it.
    let mut live = model.new_session(ctx).unwrap();
    live.eval(&prompt[..cut], Logits::Last).unwrap();
    let payload = live.snapshot();
    let key = render(&prompt[..cut]);
    let tool_map = [ToolMapEntry {
        id: "call_0".into(),
        dsml: format!("<t{}>", prompt[3]),
    }];
    {
        let mut store = KvStore::open(&cache, &cfg, opts.clone()).unwrap();
        let saved = store
            .save(&SaveRequest {
                text: key.as_bytes(),
                payload: &payload,
                reason: SaveReason::Cold,
                key_flags: 0,
                tool_map: &tool_map,
            })
            .unwrap();
        assert!(saved.written);
        assert_eq!(
            saved.path.file_name().unwrap().to_str().unwrap(),
            format!(
                "{}.kv",
                ds4_kvstore::store::hex(&ds4_kvstore::store::sha1(key.as_bytes()))
            )
        );
    }

    // A new server process: open the directory, look the full prompt up, load, restore.
    let mut store = KvStore::open(&cache, &cfg, opts).unwrap();
    assert_eq!(store.entries().len(), 1);
    let full_text = render(&prompt);
    let hit = store
        .lookup_longest_prefix(&full_text)
        .expect("the prefix is cached");
    assert_eq!(hit.text_len, key.len());
    assert_eq!(hit.tokens, cut as u32);
    let file = store.load(&hit).unwrap();
    assert_eq!(
        file.payload, payload,
        "the payload survives the file byte for byte"
    );
    assert_eq!(file.header.reason, SaveReason::Cold);
    assert_eq!(file.tool_map, tool_map);
    assert_eq!(file.text, key.as_bytes());
    let mut restored = model.new_session(ctx).unwrap();
    restored.restore(&file.payload).unwrap();
    assert_eq!(restored.tokens(), &prompt[..cut]);
    assert_eq!(bits(restored.last_logits()), bits(live.last_logits()));
    assert_eq!(restored.snapshot(), payload);

    // Only the suffix is evaluated; both sessions then decode greedily.
    let suffix = &prompt[cut..60];
    let a = live.eval(suffix, Logits::All).unwrap();
    let b = restored.eval(suffix, Logits::All).unwrap();
    assert_eq!(bits(&a), bits(&b), "suffix prefill diverges");
    let (ta, la) = greedy(live.as_mut(), 8);
    let (tb, lb) = greedy(restored.as_mut(), 8);
    assert_eq!(ta, tb, "greedy continuation differs");
    for (x, y) in la.iter().zip(&lb) {
        assert_eq!(bits(x), bits(y));
    }

    // The hit was counted in the header.
    store.refresh();
    assert_eq!(store.entries()[0].header.hits, 1);
    std::fs::remove_dir_all(&work).ok();
}

#[test]
fn payload_of_another_model_shape_is_not_indexed() {
    let work = scratch_dir("othermodel");
    let model = backend(&work);
    let cfg = model.config().clone();
    let mut s = model.new_session(64).unwrap();
    let toks: Vec<u32> = (0..20).collect();
    s.eval(&toks, Logits::Last).unwrap();
    let payload = s.snapshot();
    let mut opts = StoreOptions::new(64, 4);
    opts.min_tokens = 1;
    let dir = work.join("kv");
    let mut store = KvStore::open(&dir, &cfg, opts.clone()).unwrap();
    store
        .save(&SaveRequest {
            text: render(&toks).as_bytes(),
            payload: &payload,
            reason: SaveReason::Shutdown,
            key_flags: 0,
            tool_map: &[],
        })
        .unwrap();
    // A server of a model with another head size sees the file as invalid, skips it with a
    // reason, and never deletes it (it belongs to the other server).
    let mut other = cfg.clone();
    other.head_dim += 1;
    let mut store2 = KvStore::open(&dir, &other, opts).unwrap();
    assert!(store2.entries().is_empty());
    assert_eq!(store2.skipped().len(), 1);
    assert!(
        store2.skipped()[0].reason.contains("payload.head_dim"),
        "{:?}",
        store2.skipped()
    );
    assert!(store2.lookup_longest_prefix(&render(&toks)).is_none());
    assert_eq!(
        std::fs::read_dir(&dir).unwrap().count(),
        2,
        "the .kv and the lock file"
    );
    std::fs::remove_dir_all(&work).ok();
}
