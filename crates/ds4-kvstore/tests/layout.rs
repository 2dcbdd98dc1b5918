//! The file and payload layouts checked field by field against ds4-spec.md §3, with bytes
//! built by hand here (not by the code under test).

mod common;

use common::{mini_config, synthetic_payload, tokens};
use ds4_kvstore::file::{decode_tool_map, KvFile, ToolMapEntry};
use ds4_kvstore::header::{ExtFlags, KvFileHeader, SaveReason, HEADER_BYTES};
use ds4_kvstore::payload::{payload_len, validate_payload, PayloadHeader};
use ds4_model::config::ModelConfig;

fn le32(v: u32) -> [u8; 4] {
    v.to_le_bytes()
}
fn le64(v: u64) -> [u8; 8] {
    v.to_le_bytes()
}

/// "KVC", version 1, quant 4, reason continued(2), flags 1, pad, tokens 1234, hits 7,
/// ctx 32768, 4×0, created, last used, payload bytes — as the spec lists them.
fn hand_header() -> Vec<u8> {
    let mut h = Vec::new();
    h.extend_from_slice(b"KVC");
    h.push(1);
    h.push(4);
    h.push(2);
    h.push(1);
    h.push(0);
    h.extend_from_slice(&le32(1234));
    h.extend_from_slice(&le32(7));
    h.extend_from_slice(&le32(32768));
    h.extend_from_slice(&[0; 4]);
    h.extend_from_slice(&le64(1_700_000_000));
    h.extend_from_slice(&le64(1_700_000_123));
    h.extend_from_slice(&le64(987_654));
    h
}

#[test]
fn header_is_48_bytes_in_spec_order() {
    let bytes = hand_header();
    assert_eq!(bytes.len(), 48);
    assert_eq!(HEADER_BYTES, 48);
    let h = KvFileHeader::decode(&bytes).unwrap();
    assert_eq!(h.quant_bits, 4);
    assert_eq!(h.reason, SaveReason::Continued);
    assert_eq!(h.ext_flags, ExtFlags(ExtFlags::TOOL_MAP));
    assert_eq!(h.tokens, 1234);
    assert_eq!(h.hits, 7);
    assert_eq!(h.ctx, 32768);
    assert_eq!(h.created, 1_700_000_000);
    assert_eq!(h.last_used, 1_700_000_123);
    assert_eq!(h.payload_bytes, 987_654);
    assert_eq!(h.encode().to_vec(), bytes);
}

#[test]
fn reason_codes_and_flags_are_the_specs() {
    let names = [
        (0, "unknown"),
        (1, "cold"),
        (2, "continued"),
        (3, "evict"),
        (4, "shutdown"),
        (5, "agent-system"),
        (6, "agent-session"),
    ];
    for (code, name) in names {
        let r = SaveReason::from_code(code).unwrap();
        assert_eq!((r.code(), r.name()), (code, name));
    }
    assert_eq!(SaveReason::from_code(7), None);
    assert_eq!(
        (
            ExtFlags::TOOL_MAP,
            ExtFlags::RESPONSES_VISIBLE,
            ExtFlags::THINKING_VISIBLE
        ),
        (1, 2, 4)
    );
    assert_eq!(ExtFlags(0).key_kind(), "token-text");
    assert_eq!(ExtFlags(2).key_kind(), "responses-visible");
    assert_eq!(ExtFlags(4).key_kind(), "thinking-visible");
}

#[test]
fn header_rejects_each_bad_field_by_name_and_offset() {
    let cases: [(usize, u8, &str, u64); 8] = [
        (0, b'X', "header.magic", 0),
        (3, 2, "header.version", 3),
        (4, 8, "header.quant_bits", 4),
        (5, 9, "header.reason", 5),
        (6, 0x10, "header.ext_flags", 6),
        (7, 1, "header.pad", 7),
        (21, 1, "header.reserved", 20),
        (8, 0, "header.tokens", 8),
    ];
    for (at, value, field, offset) in cases {
        let mut b = hand_header();
        b[at] = value;
        if field == "header.tokens" {
            b[8..12].copy_from_slice(&[0; 4]);
        }
        let e = KvFileHeader::decode(&b).unwrap_err();
        assert_eq!((e.field.as_str(), e.offset), (field, offset), "{e}");
    }
    // tokens must be below ctx.
    let mut b = hand_header();
    b[8..12].copy_from_slice(&le32(32768));
    assert_eq!(KvFileHeader::decode(&b).unwrap_err().field, "header.tokens");
    let e = KvFileHeader::decode(&hand_header()[..47]).unwrap_err();
    assert_eq!(e.field, "header");
}

#[test]
fn file_is_header_text_payload_then_ktm_trailer() {
    let text = "<｜User｜>hi".as_bytes();
    let payload = b"PAYLOAD-BYTES".to_vec();
    let mut hand = hand_header();
    hand[40..48].copy_from_slice(&le64(payload.len() as u64));
    hand.extend_from_slice(&le32(text.len() as u32));
    hand.extend_from_slice(text);
    hand.extend_from_slice(&payload);
    // "KTM", version 1, count 2, {id_len, dsml_len, id, dsml}*
    hand.extend_from_slice(b"KTM");
    hand.push(1);
    hand.extend_from_slice(&le32(2));
    for (id, dsml) in [("call_1", "<dsml a>"), ("c2", "<x>")] {
        hand.extend_from_slice(&le32(id.len() as u32));
        hand.extend_from_slice(&le32(dsml.len() as u32));
        hand.extend_from_slice(id.as_bytes());
        hand.extend_from_slice(dsml.as_bytes());
    }
    let f = KvFile::decode(&hand).unwrap();
    assert_eq!(f.text, text);
    assert_eq!(f.payload, payload);
    assert_eq!(
        f.tool_map,
        vec![
            ToolMapEntry {
                id: "call_1".into(),
                dsml: "<dsml a>".into()
            },
            ToolMapEntry {
                id: "c2".into(),
                dsml: "<x>".into()
            },
        ]
    );
    assert_eq!(f.encode(), hand);

    // Without the trailer the flag must be clear, and vice versa.
    let no_map = KvFile {
        tool_map: Vec::new(),
        ..f.clone()
    };
    let enc = no_map.encode();
    assert_eq!(enc[6], 0);
    assert_eq!(enc.len(), 48 + 4 + text.len() + payload.len());
    let mut flagged = enc.clone();
    flagged[6] = 1;
    assert_eq!(KvFile::decode(&flagged).unwrap_err().field, "ktm");
    let mut trailing = enc.clone();
    trailing.push(0);
    let e = KvFile::decode(&trailing).unwrap_err();
    assert_eq!((e.field.as_str(), e.offset), ("trailer", enc.len() as u64));
    let mut long_text = enc.clone();
    long_text[48..52].copy_from_slice(&le32(1 << 20));
    assert_eq!(KvFile::decode(&long_text).unwrap_err().field, "text_len");
    let mut long_payload = enc;
    long_payload[40..48].copy_from_slice(&le64(u64::MAX));
    assert_eq!(
        KvFile::decode(&long_payload).unwrap_err().field,
        "header.payload_bytes"
    );
    let e = decode_tool_map(b"KTM\x01\xff\xff\xff\xff").unwrap_err();
    assert_eq!(e.field, "ktm.count");
}

/// Reads u32 words.
fn word(b: &[u8], i: usize) -> u32 {
    u32::from_le_bytes(b[4 * i..4 * i + 4].try_into().unwrap())
}

#[test]
fn flash_payload_matches_the_spec_field_by_field() {
    // Flash at ctx 4096 holding 9 tokens: header words as the spec lists them.
    let cfg = ModelConfig::flash();
    let ctx = 4096;
    let toks = tokens(9, cfg.vocab_size, 3);
    let p = synthetic_payload(&cfg, ctx, &toks, 11);
    let want = [
        0x3456_5344, // "DSV4"
        1,
        4096,
        2048, // prefill_cap = min(ctx, 2048)
        128,  // raw_cap (CPU: the window)
        128,  // raw_window = min(128, ctx)
        4096 / 4 + 2,
        9,
        43,
        512,
        128,
        129280,
        9, // raw_live = min(T, raw_window)
    ];
    for (i, w) in want.iter().enumerate() {
        assert_eq!(word(&p, i), *w, "header word {i}");
    }
    assert_eq!(&p[0..4], b"DSV4");
    let mut at = 52;
    for (i, t) in toks.iter().enumerate() {
        assert_eq!(word(&p[at..], i), *t);
    }
    at += 4 * 9 + 4 * 129280;
    // n_comp then n_index_comp for 43 layers: 9 tokens → 2 rows on ratio-4 layers, 0 on 128.
    for l in 0..43 {
        let (comp, index) = match l {
            0 | 1 => (0, 0),
            l if l % 2 == 0 => (2, 2),
            _ => (0, 0),
        };
        assert_eq!(word(&p[at..], l), comp, "n_comp[{l}]");
        assert_eq!(word(&p[at..], 43 + l), index, "n_index_comp[{l}]");
    }
    at += 8 * 43;
    // Per layer: 9 raw rows of 512 f32; CSA: 2 rows × 512 + state_kv and state_score of
    // 8×1024 each + 2 indexer rows × 128 + 2 × (8×256); HCA: 0 rows + 2 × (128×512).
    for l in 0..43 {
        at += 9 * 512 * 4;
        match l {
            0 | 1 => {}
            l if l % 2 == 0 => at += (2 * 512 + 2 * 8 * 1024 + 2 * 128 + 2 * 8 * 256) * 4,
            _ => at += 2 * 128 * 512 * 4,
        }
    }
    assert_eq!(at, p.len());
    assert_eq!(payload_len(&cfg, ctx, 9) as usize, p.len());
    let h = validate_payload(&cfg, &p).unwrap();
    assert_eq!(h.words(), want);
    assert_eq!(PayloadHeader::read(&p).unwrap(), h);
}

#[test]
fn payload_checks_name_the_field() {
    let cfg = mini_config();
    let ctx = 64;
    let toks = tokens(37, cfg.vocab_size, 5);
    let p = synthetic_payload(&cfg, ctx, &toks, 9);
    assert_eq!(payload_len(&cfg, ctx, 37) as usize, p.len());
    validate_payload(&cfg, &p).unwrap();
    let set = |i: usize, v: u32| {
        let mut q = p.clone();
        q[4 * i..4 * i + 4].copy_from_slice(&v.to_le_bytes());
        validate_payload(&cfg, &q).unwrap_err()
    };
    for (i, field) in [
        (0, "payload.magic"),
        (1, "payload.version"),
        (3, "payload.prefill_cap"),
        (5, "payload.raw_window"),
        (6, "payload.comp_cap"),
        (8, "payload.n_layers"),
        (9, "payload.head_dim"),
        (10, "payload.index_head_dim"),
        (11, "payload.vocab"),
        (12, "payload.raw_live"),
    ] {
        let e = set(i, word(&p, i) + 1);
        assert_eq!((e.field.as_str(), e.offset), (field, 4 * i as u64), "{e}");
    }
    assert_eq!(set(7, 64).field, "payload.n_tokens");
    // A token outside the vocabulary.
    let e = set(13 + 4, 300);
    assert_eq!((e.field.as_str(), e.offset), ("payload.tokens[4]", 68));
    // Row counts: layer 2 (CSA, ratio 4) must hold 37/4 = 9 rows.
    let counts = 52 + 4 * 37 + 4 * 300;
    let e = set(counts / 4 + 2, 8);
    assert_eq!(e.field, "payload.n_comp[2]");
    let e = set(counts / 4 + 4 + 3, 1);
    assert_eq!(e.field, "payload.n_index_comp[3]");
    let e = validate_payload(&cfg, &p[..p.len() - 4]).unwrap_err();
    assert!(e.msg.contains("truncated"), "{e}");
    let mut long = p.clone();
    long.extend_from_slice(&[0; 4]);
    let e = validate_payload(&cfg, &long).unwrap_err();
    assert!(e.msg.contains("trailing"), "{e}");
    assert_eq!(e.offset, p.len() as u64);
}
