//! 200 randomly corrupted or truncated cache files are all rejected cleanly: no panic, a
//! located error, left out of the index, never returned by a lookup.
//!
//! The format has no checksum (ds4's layout), so a flipped bit inside a float of the logits or
//! of the layer state, or in a metadata field whose every value is legal (hits, timestamps,
//! reason, a token id changed to another valid id, the bytes of a tool id) cannot be told from
//! a real checkpoint. The corruptions therefore target everything the format does constrain:
//! the length of the file, every length and count field, the magic numbers, the text (bound to
//! the file name by SHA1), the payload header and row counts, token ids, and the trailer.

mod common;

use common::{mini_config, render, scratch_dir, synthetic_payload, tokens, Rng};
use ds4_kvstore::file::{FileLayout, KvFile, TEXT_OFFSET};
use ds4_kvstore::store::{parse_kv_name, verify_file};
use ds4_kvstore::{KvStore, SaveReason, SaveRequest, StoreOptions, ToolMapEntry};

const CTX: usize = 128;

/// Byte ranges of the constrained fields of one file.
struct Regions {
    len: usize,
    text: (usize, usize),
    payload: usize,
    tokens: usize,
    n_tokens: usize,
    counts: (usize, usize),
    trailer: usize,
}

fn regions(bytes: &[u8], vocab: usize, layers: usize) -> Regions {
    let l = FileLayout::read(bytes, bytes.len() as u64).unwrap();
    let payload = l.payload_offset as usize;
    let n_tokens = l.header.tokens as usize;
    let counts = payload + 52 + 4 * n_tokens + 4 * vocab;
    Regions {
        len: bytes.len(),
        text: (TEXT_OFFSET, payload),
        payload,
        tokens: payload + 52,
        n_tokens,
        counts: (counts, counts + 8 * layers),
        trailer: l.payload_end as usize,
    }
}

/// One random corruption; returns the new bytes and a description.
fn corrupt(orig: &[u8], r: &Regions, rng: &mut Rng) -> (Vec<u8>, String) {
    let mut b = orig.to_vec();
    let pick = |rng: &mut Rng, v: &[usize]| v[rng.below(v.len() as u64) as usize];
    let nonzero = |rng: &mut Rng| 1 + rng.below(255) as u8;
    match rng.below(8) {
        0 => {
            let n = rng.below(r.len as u64) as usize;
            b.truncate(n);
            (b, format!("truncated to {n}"))
        }
        1 => {
            let n = 1 + rng.below(64) as usize;
            for _ in 0..n {
                b.push(rng.next() as u8);
            }
            (b, format!("appended {n} bytes"))
        }
        2 => {
            // Header: magic, version, pad, tokens, ctx, reserved, payload bytes, text length.
            let offsets: Vec<usize> = [0..4, 7..12, 16..24, 40..52]
                .into_iter()
                .flatten()
                .collect();
            let at = pick(rng, &offsets);
            b[at] ^= nonzero(rng);
            (b, format!("header byte {at} changed"))
        }
        3 => {
            let at = r.text.0 + rng.below((r.text.1 - r.text.0) as u64) as usize;
            b[at] ^= nonzero(rng);
            (b, format!("text byte {at} changed"))
        }
        4 => {
            let at = r.payload + rng.below(52) as usize;
            b[at] ^= nonzero(rng);
            (b, format!("payload header byte {at} changed"))
        }
        5 => {
            // A token id pushed outside the vocabulary (its high byte set).
            let i = rng.below(r.n_tokens as u64) as usize;
            let at = r.tokens + 4 * i + 3;
            b[at] ^= nonzero(rng);
            (b, format!("token {i} out of range"))
        }
        6 => {
            let at = r.counts.0 + rng.below((r.counts.1 - r.counts.0) as u64) as usize;
            b[at] ^= nonzero(rng);
            (b, format!("row count byte {at} changed"))
        }
        _ => {
            // Trailer structure: magic, version, count, first entry's two lengths.
            let offsets: Vec<usize> = (0..16).map(|o| r.trailer + o).collect();
            let at = pick(rng, &offsets);
            b[at] ^= nonzero(rng);
            (b, format!("trailer byte {} changed", at - r.trailer))
        }
    }
}

#[test]
fn two_hundred_corrupt_files_are_rejected() {
    let cfg = mini_config();
    let dir = scratch_dir("corrupt-src");
    let mut opts = StoreOptions::new(CTX as u32, 4);
    opts.min_tokens = 8;
    let toks = tokens(50, cfg.vocab_size, 21);
    let text = render(&toks);
    let payload = synthetic_payload(&cfg, CTX, &toks, 3);
    let tool_map = [ToolMapEntry {
        id: "call_7".into(),
        dsml: format!("<t{}>", toks[2]),
    }];
    let saved = KvStore::open(&dir, &cfg, opts.clone())
        .unwrap()
        .save(&SaveRequest {
            text: text.as_bytes(),
            payload: &payload,
            reason: SaveReason::Cold,
            key_flags: 0,
            tool_map: &tool_map,
        })
        .unwrap();
    let name = saved
        .path
        .file_name()
        .unwrap()
        .to_str()
        .unwrap()
        .to_string();
    let sha = parse_kv_name(&name).unwrap();
    let orig = std::fs::read(&saved.path).unwrap();
    let f = verify_file(&cfg, &sha, &orig).unwrap();
    assert_eq!(f.tool_map.len(), 1);
    let r = regions(&orig, cfg.vocab_size, cfg.n_layers);

    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let mut kinds = std::collections::BTreeMap::new();
    for i in 0..200 {
        let (bad, what) = corrupt(&orig, &r, &mut rng);
        assert_ne!(bad, orig);
        *kinds
            .entry(what.split(' ').next().unwrap().to_string())
            .or_insert(0) += 1;
        // The codec alone: an error, never a panic.
        let err = verify_file(&cfg, &sha, &bad).expect_err(&what);
        assert!(!err.field.is_empty());
        if let Ok(file) = KvFile::decode(&bad) {
            // Structurally a file: the payload or text checks caught it.
            assert!(
                err.field.starts_with("payload")
                    || err.field == "text"
                    || err.field.starts_with("header."),
                "{what}: {err} ({} payload bytes)",
                file.payload.len()
            );
        }
        // The store: skipped with a warning, never a hit, nothing deleted.
        let case = dir.join(format!("case{i}"));
        std::fs::create_dir_all(&case).unwrap();
        std::fs::write(case.join(&name), &bad).unwrap();
        let mut store = KvStore::open(&case, &cfg, opts.clone()).unwrap();
        assert!(store.entries().is_empty(), "{what}: indexed");
        assert_eq!(store.skipped().len(), 1, "{what}");
        assert!(store.lookup_longest_prefix(&text).is_none(), "{what}");
        assert!(case.join(&name).exists());
        std::fs::remove_dir_all(&case).unwrap();
    }
    println!("corruption kinds: {kinds:?}");
    assert!(
        kinds.len() == 8,
        "every kind of corruption was drawn: {kinds:?}"
    );
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn damaged_after_indexing_is_caught_at_load_and_removed() {
    let cfg = mini_config();
    let dir = scratch_dir("corrupt-late");
    let mut opts = StoreOptions::new(CTX as u32, 4);
    opts.min_tokens = 8;
    let toks = tokens(40, cfg.vocab_size, 22);
    let text = render(&toks);
    let payload = synthetic_payload(&cfg, CTX, &toks, 4);
    let mut store = KvStore::open(&dir, &cfg, opts).unwrap();
    let saved = store
        .save(&SaveRequest {
            text: text.as_bytes(),
            payload: &payload,
            reason: SaveReason::Evict,
            key_flags: 0,
            tool_map: &[],
        })
        .unwrap();
    let hit = store.lookup_longest_prefix(&text).unwrap();
    // Damaged between lookup and load (another process, the disk...): truncated by 8 bytes.
    let mut bytes = std::fs::read(&saved.path).unwrap();
    bytes.truncate(bytes.len() - 8);
    std::fs::write(&saved.path, &bytes).unwrap();
    let err = store.load(&hit).unwrap_err();
    assert!(err.to_string().contains("payload_bytes"), "{err}");
    assert!(!saved.path.exists(), "a damaged file is removed");
    assert!(store.lookup_longest_prefix(&text).is_none());
    std::fs::remove_dir_all(&dir).ok();
}

mod fuzz {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2000))]
        /// Arbitrary bytes, and valid files with arbitrary splices, never panic the decoder.
        #[test]
        fn decode_never_panics(data in proptest::collection::vec(any::<u8>(), 0..400), cut in 0usize..400) {
            let cfg = mini_config();
            let _ = KvFile::decode(&data);
            let _ = verify_file(&cfg, &[0; 20], &data);
            let mut h = b"KVC\x01\x04\x01\x00\x00".to_vec();
            h.extend_from_slice(&data);
            let _ = verify_file(&cfg, &[0; 20], &h);
            let _ = h.get(..cut.min(h.len())).map(KvFile::decode);
        }
    }
}
