//! Directory behaviour: lookup rules, budget and eviction order, temporary files, sharing.

mod common;

use std::path::Path;

use common::{mini_config, render, scratch_dir, synthetic_payload, tokens};
use ds4_kvstore::store::{Entry, LOCK_FILE_NAME};
use ds4_kvstore::{KvError, KvStore, SaveReason, SaveRequest, StoreOptions};
use ds4_model::config::ModelConfig;

const CTX: usize = 256;

fn opts() -> StoreOptions {
    let mut o = StoreOptions::new(CTX as u32, 2);
    o.min_tokens = 8;
    o.budget_bytes = 0;
    o
}

fn save(
    store: &mut KvStore,
    cfg: &ModelConfig,
    text: &str,
    toks: &[u32],
    ctx: usize,
) -> ds4_kvstore::Saved {
    let payload = synthetic_payload(cfg, ctx, toks, toks.len() as u64 + 17);
    store
        .save(&SaveRequest {
            text: text.as_bytes(),
            payload: &payload,
            reason: SaveReason::Continued,
            key_flags: 0,
            tool_map: &[],
        })
        .unwrap()
}

fn kv_files(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .filter(|n| n != LOCK_FILE_NAME)
        .collect();
    v.sort();
    v
}

#[test]
fn lookup_takes_the_longest_usable_prefix() {
    let cfg = mini_config();
    let dir = scratch_dir("lookup");
    let mut store = KvStore::open(&dir, &cfg, opts()).unwrap();
    let toks = tokens(100, cfg.vocab_size, 1);
    let prompt = render(&toks);
    for n in [10, 40, 70] {
        save(&mut store, &cfg, &render(&toks[..n]), &toks[..n], CTX);
    }
    // Not a prefix of the prompt: never a hit, however long.
    let other = tokens(90, cfg.vocab_size, 2);
    save(&mut store, &cfg, &render(&other), &other, CTX);
    let hit = store.lookup_longest_prefix(&prompt).unwrap();
    assert_eq!((hit.tokens, hit.text_len), (70, render(&toks[..70]).len()));
    // A prompt that only shares the first 50 tokens gets the 40-token checkpoint.
    let mut forked = toks[..50].to_vec();
    forked.extend(tokens(30, cfg.vocab_size, 3));
    let hit = store.lookup_longest_prefix(&render(&forked)).unwrap();
    assert_eq!(hit.tokens, 40);
    assert!(store.lookup_longest_prefix("<t1>").is_none());

    // min_tokens: a 40-token minimum hides the 10-token checkpoint.
    let mut o = opts();
    o.min_tokens = 41;
    let mut strict = KvStore::open(&dir, &cfg, o).unwrap();
    assert!(strict.lookup_longest_prefix(&render(&toks[..30])).is_none());
    assert_eq!(strict.lookup_longest_prefix(&prompt).unwrap().tokens, 70);

    // A checkpoint written with a larger context than ours is not used.
    let mut small = opts();
    small.ctx = 200;
    let mut s200 = KvStore::open(&dir, &cfg, small).unwrap();
    assert!(s200.lookup_longest_prefix(&prompt).is_none());

    // Quant bits: accepted unless rejecting.
    let mut q4 = opts();
    q4.quant_bits = 4;
    let mut s4 = KvStore::open(&dir, &cfg, q4.clone()).unwrap();
    assert_eq!(s4.lookup_longest_prefix(&prompt).unwrap().tokens, 70);
    q4.reject_different_quant = true;
    let mut s4r = KvStore::open(&dir, &cfg, q4).unwrap();
    assert!(s4r.lookup_longest_prefix(&prompt).is_none());
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn lookup_ends_at_character_boundaries() {
    let cfg = mini_config();
    let dir = scratch_dir("charb");
    let mut store = KvStore::open(&dir, &cfg, opts()).unwrap();
    let toks = tokens(20, cfg.vocab_size, 4);
    let prompt = format!("{}é tail", render(&toks));
    // A key that ends inside "é" (its first byte): a prefix of the prompt's bytes, but the
    // rest could not be tokenized as text.
    let cut = render(&toks).len() + 1;
    let payload = synthetic_payload(&cfg, CTX, &toks, 5);
    store
        .save(&SaveRequest {
            text: &prompt.as_bytes()[..cut],
            payload: &payload,
            reason: SaveReason::Cold,
            key_flags: 0,
            tool_map: &[],
        })
        .unwrap();
    assert!(store.lookup_longest_prefix(&prompt).is_none());
    save(&mut store, &cfg, &prompt[..cut + 1], &toks, CTX);
    assert_eq!(
        store.lookup_longest_prefix(&prompt).unwrap().text_len,
        cut + 1
    );
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn saving_the_same_text_twice_keeps_the_first_file() {
    let cfg = mini_config();
    let dir = scratch_dir("twice");
    let mut store = KvStore::open(&dir, &cfg, opts()).unwrap();
    let toks = tokens(30, cfg.vocab_size, 6);
    let text = render(&toks);
    assert!(save(&mut store, &cfg, &text, &toks, CTX).written);
    let hit = store.lookup_longest_prefix(&text).unwrap();
    store.load(&hit).unwrap();
    let again = save(&mut store, &cfg, &text, &toks, CTX);
    assert!(!again.written);
    store.refresh();
    assert_eq!(store.entries()[0].header.hits, 1, "the hit count survives");
    assert_eq!(kv_files(&dir).len(), 1);
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn saves_are_validated() {
    let cfg = mini_config();
    let dir = scratch_dir("validate");
    let mut store = KvStore::open(&dir, &cfg, opts()).unwrap();
    let toks = tokens(5, cfg.vocab_size, 7);
    let payload = synthetic_payload(&cfg, CTX, &toks, 1);
    let req = SaveRequest {
        text: b"short",
        payload: &payload,
        reason: SaveReason::Cold,
        key_flags: 0,
        tool_map: &[],
    };
    assert!(
        matches!(store.save(&req), Err(KvError::Invalid(_))),
        "below min_tokens"
    );
    let toks = tokens(20, cfg.vocab_size, 7);
    let mut payload = synthetic_payload(&cfg, CTX, &toks, 1);
    payload.pop();
    let req = SaveRequest {
        payload: &payload,
        ..req
    };
    assert!(matches!(store.save(&req), Err(KvError::Format { .. })));
    let payload = synthetic_payload(&cfg, CTX, &toks, 1);
    let req = SaveRequest {
        payload: &payload,
        key_flags: 1,
        ..req
    };
    assert!(
        matches!(store.save(&req), Err(KvError::Invalid(_))),
        "tool-map bit is not a key kind"
    );
    assert!(kv_files(&dir).is_empty());
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn eviction_keeps_the_directory_inside_the_budget() {
    let cfg = mini_config();
    let dir = scratch_dir("evict");
    let toks = tokens(120, cfg.vocab_size, 8);
    let one = {
        let mut store = KvStore::open(&dir, &cfg, opts()).unwrap();
        save(&mut store, &cfg, &render(&toks[..40]), &toks[..40], CTX).file_bytes
    };
    std::fs::remove_dir_all(&dir).ok();
    // Room for about three 40-token files.
    let mut o = opts();
    o.budget_bytes = one * 3 + one / 2;
    let mut store = KvStore::open(&dir, &cfg, o.clone()).unwrap();
    let texts: Vec<String> = (0..3).map(|i| render(&toks[i..40 + i])).collect();
    for (i, t) in texts.iter().enumerate() {
        save(&mut store, &cfg, t, &toks[i..40 + i], CTX);
    }
    assert_eq!(store.entries().len(), 3);
    // A hit on the first makes it more valuable than the second and third.
    let hit = store.lookup_longest_prefix(&texts[0]).unwrap();
    store.load(&hit).unwrap();
    let saved = save(&mut store, &cfg, &render(&toks[3..43]), &toks[3..43], CTX);
    assert_eq!(saved.evicted.len(), 1);
    assert!(store.total_bytes() <= o.budget_bytes);
    let left: Vec<u32> = store.entries().iter().map(|e| e.header.hits).collect();
    assert_eq!(left.iter().sum::<u32>(), 1, "the file with a hit stays");
    assert!(
        store.entries().iter().any(|e| e.path == saved.path),
        "the new file stays"
    );
    // A file larger than the whole budget is refused before anything is written.
    let mut tiny = o;
    tiny.budget_bytes = one / 2;
    let mut t = KvStore::open(&dir, &cfg, tiny).unwrap();
    assert_eq!(t.total_bytes(), 0, "open trims to the budget");
    let payload = synthetic_payload(&cfg, CTX, &toks[..40], 1);
    let err = t
        .save(&SaveRequest {
            text: b"x",
            payload: &payload,
            reason: SaveReason::Cold,
            key_flags: 0,
            tool_map: &[],
        })
        .unwrap_err();
    assert!(matches!(err, KvError::OverBudget { .. }), "{err}");
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn eviction_score_is_ds4s() {
    let cfg = mini_config();
    let dir = scratch_dir("score");
    let mut store = KvStore::open(&dir, &cfg, opts()).unwrap();
    let toks = tokens(64, cfg.vocab_size, 9);
    save(&mut store, &cfg, &render(&toks), &toks, CTX);
    let mut e: Entry = store.entries()[0].clone();
    e.header.hits = 3;
    e.header.last_used = 1_000_000;
    let size = e.file_bytes as f64;
    let at = |age: u64| e.eviction_score(1_000_000 + age);
    assert!((at(0) - 4.0 * 64.0 / size).abs() < 1e-12);
    // One half-life: 3 hits count 1.5.
    assert!((at(6 * 3600) - 2.5 * 64.0 / size).abs() < 1e-12);
    e.header.hits = 0;
    assert!((e.eviction_score(2_000_000) - 64.0 / size).abs() < 1e-12);
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn temporary_files_are_never_indexed_and_only_orphans_are_removed() {
    let cfg = mini_config();
    let dir = scratch_dir("temps");
    let toks = tokens(30, cfg.vocab_size, 10);
    let mut store = KvStore::open(&dir, &cfg, opts()).unwrap();
    let saved = save(&mut store, &cfg, &render(&toks), &toks, CTX);
    let bytes = std::fs::read(&saved.path).unwrap();
    let name = saved
        .path
        .file_name()
        .unwrap()
        .to_str()
        .unwrap()
        .to_string();
    // A complete temporary of a live writer (this process) and one of a dead writer.
    let live = dir.join(format!("{name}.tmp.{}.99", std::process::id()));
    let dead_pid = u32::MAX - 1; // above pid_max: no such process
    let dead = dir.join(format!("{name}.tmp.{dead_pid}.1"));
    std::fs::write(&live, &bytes).unwrap();
    std::fs::write(&dead, &bytes[..100]).unwrap();
    let store = KvStore::open(&dir, &cfg, opts()).unwrap();
    assert_eq!(store.entries().len(), 1);
    assert!(live.exists(), "a live writer's file is left alone");
    assert!(!dead.exists(), "an orphan is removed");
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn two_stores_share_one_directory() {
    // Two servers on one directory (each with its own lock handle): saves, lookups, loads and
    // evictions interleave; a load never sees a partial or invalid file.
    let cfg = mini_config();
    let dir = scratch_dir("shared");
    let toks = tokens(200, cfg.vocab_size, 11);
    let one = {
        let mut s = KvStore::open(&dir, &cfg, opts()).unwrap();
        let f = save(&mut s, &cfg, &render(&toks[..40]), &toks[..40], CTX).file_bytes;
        std::fs::remove_file(s.entries()[0].path.clone()).unwrap();
        f
    };
    let mut o = opts();
    o.budget_bytes = one * 4;
    let threads: Vec<_> = (0..2)
        .map(|w| {
            let (cfg, dir, toks, o) = (cfg.clone(), dir.clone(), toks.clone(), o.clone());
            std::thread::spawn(move || {
                let mut store = KvStore::open(&dir, &cfg, o).unwrap();
                let mut hits = 0;
                for i in 0..60 {
                    let start = (i * 7 + w * 3) % 100;
                    let n = 30 + (i % 20);
                    let t = &toks[start..start + n];
                    save(&mut store, &cfg, &render(t), t, CTX);
                    let probe = &toks[start..start + n + 10];
                    if let Some(hit) = store.lookup_longest_prefix(&render(probe)) {
                        match store.load(&hit) {
                            Ok(f) => {
                                assert_eq!(f.header.tokens, hit.tokens);
                                hits += 1;
                            }
                            // Evicted by the other store between lookup and load.
                            Err(KvError::Io { .. }) => {}
                            Err(e) => panic!("invalid file seen: {e}"),
                        }
                    }
                }
                hits
            })
        })
        .collect();
    let hits: usize = threads.into_iter().map(|t| t.join().unwrap()).sum();
    assert!(hits > 0);
    let store = KvStore::open(&dir, &cfg, o.clone()).unwrap();
    assert!(store.skipped().is_empty(), "{:?}", store.skipped());
    assert!(store.total_bytes() <= o.budget_bytes);
    assert!(
        kv_files(&dir).iter().all(|n| n.ends_with(".kv")),
        "{:?}",
        kv_files(&dir)
    );
    std::fs::remove_dir_all(&dir).ok();
}
