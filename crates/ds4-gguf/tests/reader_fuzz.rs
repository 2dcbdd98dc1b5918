//! The reader never panics and never over-allocates on damaged input, and names the damage.
//!
//! A seeded loop (deterministic, no shrinking needed: the failing case index is printed)
//! feeds well over 100,000 inputs to `GgufFile::from_bytes`: every truncation of two valid
//! files, random bit flips, overwrites with extreme counts/lengths/dims/type ids/offsets,
//! and random bytes with and without a valid header. The unit tests below check that specific
//! damages give the specific error at the right offset or tensor.

mod common;

use common::{
    check_accepted, header, pad32, put_str, put_tensor_info, put_u32, put_u64, sample_writer, Rng,
};
use ds4_gguf::{GgmlType, GgufError, GgufFile};

/// Counts the peak of live heap bytes per thread, so the fuzz loop can check that no input
/// makes the reader allocate far more than the input's size (a claimed count of 2^60 must be
/// refused, not preallocated).
mod peak_alloc {
    use std::alloc::{GlobalAlloc, Layout, System};
    use std::cell::Cell;

    pub struct PeakAlloc;

    thread_local! {
        static LIVE: Cell<usize> = const { Cell::new(0) };
        static PEAK: Cell<usize> = const { Cell::new(0) };
    }

    fn add(n: usize) {
        // try_with: the thread-locals may be gone while a thread shuts down.
        let _ = LIVE.try_with(|l| {
            let v = l.get() + n;
            l.set(v);
            let _ = PEAK.try_with(|p| p.set(p.get().max(v)));
        });
    }

    fn sub(n: usize) {
        let _ = LIVE.try_with(|l| l.set(l.get().saturating_sub(n)));
    }

    // SAFETY: forwards every call unchanged to the system allocator; the bookkeeping uses
    // const-initialised thread-locals, which never allocate.
    unsafe impl GlobalAlloc for PeakAlloc {
        unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
            add(layout.size());
            unsafe { System.alloc(layout) }
        }
        unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
            sub(layout.size());
            unsafe { System.dealloc(ptr, layout) }
        }
        unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
            add(new_size);
            sub(layout.size());
            unsafe { System.realloc(ptr, layout, new_size) }
        }
    }

    /// Starts a measurement: returns the current live bytes and resets the peak to them.
    pub fn start() -> usize {
        let live = LIVE.with(|l| l.get());
        PEAK.with(|p| p.set(live));
        live
    }

    /// Peak live bytes above `base` since `start`.
    pub fn peak_since(base: usize) -> usize {
        PEAK.with(|p| p.get()).saturating_sub(base)
    }
}

#[global_allocator]
static ALLOC: peak_alloc::PeakAlloc = peak_alloc::PeakAlloc;

/// Most heap bytes parsing an `n`-byte input may use: the aligned copy of the input plus the
/// parsed tables (each table entry costs a few times its minimum encoded size), plus slack.
fn alloc_budget(n: usize) -> usize {
    32 * n + 64 * 1024
}

/// The sample file of the round-trip tests (every metadata type, every tensor type, an
/// alias), as bytes.
fn sample_bytes() -> Vec<u8> {
    let dir = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("ds4-gguf-fuzz");
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("sample.gguf");
    let (w, _) = sample_writer(3);
    w.write_to_path(&path).unwrap();
    std::fs::read(&path).unwrap()
}

/// A small valid file built by hand: one key, two F32 tensors.
fn tiny_bytes() -> Vec<u8> {
    let mut b = header(2, 1);
    put_str(&mut b, "general.name");
    put_u32(&mut b, 8);
    put_str(&mut b, "tiny");
    put_tensor_info(&mut b, "a", &[4], 0, 0);
    put_tensor_info(&mut b, "b", &[2, 2], 0, 32);
    pad32(&mut b);
    b.extend((0..48).map(|i| i as u8));
    b
}

/// Parses `bytes`; when it parses, touches everything a caller could touch. Returns `Ok` or
/// the error's variant name. Any panic fails the test (with the case label).
fn exercise(bytes: Vec<u8>) -> Result<(), String> {
    let len = bytes.len() as u64;
    let base = peak_alloc::start();
    let parsed = GgufFile::from_bytes(bytes);
    let peak = peak_alloc::peak_since(base);
    assert!(
        peak <= alloc_budget(len as usize),
        "parsing {len} bytes allocated {peak} bytes"
    );
    match parsed {
        Ok(f) => {
            check_accepted(&f, len);
            Ok(())
        }
        Err(e) => {
            // Every error renders a message.
            assert!(!e.to_string().is_empty());
            let debug = format!("{e:?}");
            Err(debug
                .split([' ', '{', '('])
                .next()
                .unwrap_or("")
                .to_string())
        }
    }
}

/// Runs `case` with a label printed on panic, so a failure names the input that caused it.
fn run_case(label: &str, bytes: Vec<u8>) -> Result<(), String> {
    let keep = bytes.clone();
    match std::panic::catch_unwind(|| exercise(bytes)) {
        Ok(parsed) => parsed,
        Err(_) => panic!(
            "reader panicked on {label}: {} bytes {:02x?}",
            keep.len(),
            &keep[..keep.len().min(256)]
        ),
    }
}

const INTERESTING_U64: [u64; 12] = [
    0,
    1,
    7,
    31,
    255,
    1 << 32,
    1 << 40,
    1 << 60,
    i64::MAX as u64,
    (i64::MAX as u64) + 1,
    u64::MAX - 31,
    u64::MAX,
];
const INTERESTING_U32: [u32; 10] = [0, 1, 8, 9, 12, 13, 16, 39, 0x8000_0000, u32::MAX];

#[test]
fn fuzz_reader_never_panics() {
    let sample = sample_bytes();
    let tiny = tiny_bytes();
    assert_eq!(
        exercise(sample.clone()),
        Ok(()),
        "the valid sample must parse"
    );
    assert_eq!(
        exercise(tiny.clone()),
        Ok(()),
        "the valid tiny file must parse"
    );
    let mut cases = 0usize;
    let mut outcomes: std::collections::BTreeMap<String, usize> = Default::default();

    // 1. Every truncation. A prefix that loses any tensor data must be rejected.
    for base in [&sample, &tiny] {
        let f = GgufFile::from_bytes(base.clone()).unwrap();
        let needed = f
            .tensors()
            .iter()
            .map(|t| f.data_offset() + t.offset + t.n_bytes)
            .max()
            .unwrap();
        for len in 0..base.len() {
            let parsed = run_case(&format!("truncation to {len}"), base[..len].to_vec()).is_ok();
            assert_eq!(
                parsed,
                len as u64 >= needed,
                "truncation to {len} of {}",
                base.len()
            );
            cases += 1;
        }
    }

    let mut rng = Rng(0x5eed_0001);
    for i in 0..300_000u64 {
        let base = if i % 3 == 0 { &tiny } else { &sample };
        let mut b = base.clone();
        match i % 6 {
            // 2. One to eight random bit flips.
            0 | 1 => {
                for _ in 0..=rng.below(8) {
                    let pos = rng.below(b.len() as u64) as usize;
                    b[pos] ^= 1 << rng.below(8);
                }
            }
            // 3. An extreme u64 (count, length, dim, offset) at a random position; the
            //    header and tensor table are where they matter, so favour the first bytes.
            2 => {
                let limit = if rng.below(2) == 0 {
                    256.min(b.len() - 8)
                } else {
                    b.len() - 8
                };
                let pos = rng.below(limit as u64) as usize;
                let v = INTERESTING_U64[rng.below(12) as usize];
                b[pos..pos + 8].copy_from_slice(&v.to_le_bytes());
            }
            // 4. An extreme u32 (type ids, ndim, alignment) at a random position.
            3 => {
                let pos = rng.below((b.len() - 4) as u64) as usize;
                let v = INTERESTING_U32[rng.below(10) as usize];
                b[pos..pos + 4].copy_from_slice(&v.to_le_bytes());
            }
            // 5. Random bytes after a valid magic and version (and sometimes valid counts).
            4 => {
                let n = rng.below(512) as usize;
                b.truncate(if rng.below(2) == 0 { 8 } else { 24 });
                b.extend(rng.bytes(n));
            }
            // 6. Random garbage, or a mutated file cut at a random length.
            _ => {
                if rng.below(2) == 0 {
                    let n = rng.below(256) as usize;
                    b = rng.bytes(n);
                } else {
                    let pos = rng.below(b.len() as u64) as usize;
                    b[pos] = rng.next_u64() as u8;
                    b.truncate(rng.below(b.len() as u64 + 1) as usize);
                }
            }
        }
        let outcome = run_case(&format!("mutation case {i}"), b);
        *outcomes
            .entry(outcome.err().unwrap_or_else(|| "Ok".into()))
            .or_default() += 1;
        cases += 1;
    }
    eprintln!("reader fuzz: {cases} inputs, no panic; mutation outcomes: {outcomes:?}");
    // The mutations reach every stage of the parser, not just the header.
    for stage in [
        "Ok",
        "BadMagic",
        "CountTooLarge",
        "StringTooLong",
        "UnknownValueType",
        "UnknownTensorType",
        "TensorOutsideFile",
        "MisalignedOffset",
    ] {
        assert!(outcomes.contains_key(stage), "no mutation ended in {stage}");
    }
    assert!(cases >= 100_000);
}

// ---- specific damages give specific errors ----

fn parse(b: Vec<u8>) -> GgufError {
    let e = GgufFile::from_bytes(b).expect_err("damaged input must be rejected");
    eprintln!("{e:?}");
    e
}

#[test]
fn header_damage() {
    let mut b = tiny_bytes();
    b[0] = b'X';
    assert!(matches!(parse(b), GgufError::BadMagic { found } if &found == b"XGUF"));

    let mut b = tiny_bytes();
    b[4] = 2;
    let e = parse(b);
    assert!(matches!(e, GgufError::UnsupportedVersion { version: 2 }));
    assert_eq!(
        e.to_string(),
        "unsupported GGUF version 2 at offset 4 (only version 3 is supported)"
    );

    let e = parse(b"GGUF\x03\0\0".to_vec());
    assert!(matches!(
        e,
        GgufError::Truncated {
            offset: 4,
            needed: 4,
            available: 3,
            ..
        }
    ));
    assert!(matches!(
        parse(Vec::new()),
        GgufError::Truncated { offset: 0, .. }
    ));
}

#[test]
fn huge_counts_fail_before_allocating() {
    let e = parse(header(0, 1 << 60));
    assert!(matches!(e, GgufError::CountTooLarge { offset: 16, count, .. } if count == 1 << 60));
    assert!(e
        .to_string()
        .contains("metadata count at offset 16 claims 1152921504606846976 entries"));

    let e = parse(header(u64::MAX, 0));
    assert!(matches!(
        e,
        GgufError::CountTooLarge {
            offset: 8,
            count: u64::MAX,
            ..
        }
    ));

    // A 2^40-byte key.
    let mut b = header(0, 1);
    put_u64(&mut b, 1 << 40);
    b.extend_from_slice(b"abcdefghijklmnop");
    let e = parse(b);
    assert!(
        matches!(e, GgufError::StringTooLong { offset: 24, len, available: 16, .. } if len == 1 << 40)
    );

    // An array claiming 2^60 u32 elements.
    let mut b = header(0, 1);
    put_str(&mut b, "k");
    put_u32(&mut b, 9);
    let count_at = b.len() as u64 + 4;
    put_u32(&mut b, 4);
    put_u64(&mut b, 1 << 60);
    b.extend_from_slice(&[0; 16]);
    let e = parse(b);
    match e {
        GgufError::CountTooLarge {
            ref what,
            offset,
            max,
            ..
        } => {
            assert_eq!(offset, count_at);
            assert_eq!(max, 4);
            assert!(what.contains("`k`"), "{what}");
        }
        ref other => panic!("{other:?}"),
    }

    // 2^40 strings in an array: each needs at least 8 bytes.
    let mut b = header(0, 1);
    put_str(&mut b, "tokens");
    put_u32(&mut b, 9);
    put_u32(&mut b, 8);
    put_u64(&mut b, 1 << 40);
    assert!(matches!(parse(b), GgufError::CountTooLarge { .. }));
}

#[test]
fn metadata_damage() {
    // Unknown value type.
    let mut b = header(0, 1);
    put_str(&mut b, "my.key");
    let type_at = b.len() as u64;
    put_u32(&mut b, 13);
    b.push(0);
    let e = parse(b);
    assert!(
        matches!(e, GgufError::UnknownValueType { ref key, type_id: 13, offset } if key == "my.key" && offset == type_at)
    );

    // Unknown array element type.
    let mut b = header(0, 1);
    put_str(&mut b, "arr");
    put_u32(&mut b, 9);
    let elem_at = b.len() as u64;
    put_u32(&mut b, 99);
    put_u64(&mut b, 0);
    assert!(
        matches!(parse(b), GgufError::UnknownValueType { type_id: 99, offset, .. } if offset == elem_at)
    );

    // Invalid UTF-8 in a key.
    let mut b = header(0, 1);
    put_u64(&mut b, 2);
    b.extend_from_slice(&[0xff, 0xfe]);
    put_u32(&mut b, 0);
    b.push(1);
    assert!(matches!(
        parse(b),
        GgufError::InvalidUtf8 { offset: 32, .. }
    ));

    // A bool byte that is neither 0 nor 1.
    let mut b = header(0, 1);
    put_str(&mut b, "flag");
    put_u32(&mut b, 7);
    let at = b.len() as u64;
    b.push(2);
    assert!(matches!(parse(b), GgufError::InvalidBool { value: 2, offset, .. } if offset == at));

    // Duplicate key.
    let mut b = header(0, 2);
    for _ in 0..2 {
        put_str(&mut b, "dup");
        put_u32(&mut b, 0);
        b.push(1);
    }
    assert!(matches!(parse(b), GgufError::DuplicateKey { ref key, offset: 40 } if key == "dup"));

    // Arrays nested 100 deep (each level: type ARRAY, count 1).
    let mut b = header(0, 1);
    put_str(&mut b, "deep");
    put_u32(&mut b, 9);
    for _ in 0..100 {
        put_u32(&mut b, 9);
        put_u64(&mut b, 1);
    }
    put_u32(&mut b, 0);
    put_u64(&mut b, 0);
    assert!(matches!(parse(b), GgufError::NestingTooDeep { ref key, .. } if key == "deep"));

    // Alignment not a power of two, or not a u32.
    let mut b = header(0, 1);
    put_str(&mut b, "general.alignment");
    put_u32(&mut b, 4);
    put_u32(&mut b, 48);
    assert!(matches!(parse(b), GgufError::BadAlignment { .. }));
    let mut b = header(0, 1);
    put_str(&mut b, "general.alignment");
    put_u32(&mut b, 10);
    put_u64(&mut b, 64);
    let e = parse(b);
    assert_eq!(
        e.to_string(),
        "bad `general.alignment`: type is UINT64, expected UINT32"
    );
}

/// A file with one metadata-free tensor table, padded, plus `data` bytes of data.
fn with_tensors(infos: &[(&str, &[u64], u32, u64)], data: usize) -> Vec<u8> {
    let mut b = header(infos.len() as u64, 0);
    for &(name, dims, ty, off) in infos {
        put_tensor_info(&mut b, name, dims, ty, off);
    }
    pad32(&mut b);
    b.extend(std::iter::repeat_n(0u8, data));
    b
}

#[test]
fn tensor_damage() {
    // Unknown type id, naming the tensor and the id.
    let e = parse(with_tensors(&[("blk.0.attn_q_a.weight", &[32], 39, 0)], 64));
    let type_at = 24 + 8 + 21 + 4 + 8;
    assert!(
        matches!(e, GgufError::UnknownTensorType { ref tensor, type_id: 39, offset }
        if tensor == "blk.0.attn_q_a.weight" && offset == type_at)
    );
    assert_eq!(
        e.to_string(),
        format!("tensor `blk.0.attn_q_a.weight`: unknown ggml type id 39 at offset {type_at}")
    );

    // ndim 0 and 9.
    let mut b = header(1, 0);
    put_str(&mut b, "t");
    put_u32(&mut b, 0);
    b.extend_from_slice(&[0; 32]);
    assert!(matches!(
        parse(b),
        GgufError::BadNdim {
            ndim: 0,
            offset: 33,
            ..
        }
    ));
    let mut b = header(1, 0);
    put_str(&mut b, "t");
    put_u32(&mut b, 9);
    b.extend_from_slice(&[0; 100]);
    assert!(matches!(parse(b), GgufError::BadNdim { ndim: 9, .. }));

    // Element count overflow, and a dimension above i64::MAX.
    let e = parse(with_tensors(&[("t", &[1 << 33, 1 << 33], 0, 0)], 0));
    assert!(matches!(e, GgufError::DimsOverflow { ref tensor, .. } if tensor == "t"));
    assert!(matches!(
        parse(with_tensors(&[("t", &[1 << 63], 0, 0)], 0)),
        GgufError::DimsOverflow { .. }
    ));

    // Row length not a whole number of blocks.
    let e = parse(with_tensors(
        &[("q", &[100, 2], GgmlType::Q4K.id(), 0)],
        1024,
    ));
    assert!(
        matches!(e, GgufError::PartialBlock { ref tensor, row_len: 100, block_elems: 256, .. } if tensor == "q")
    );

    // Data past the end of the file (16 bytes needed, 15 present).
    let b = with_tensors(&[("t", &[4], 0, 0)], 15);
    let len = b.len() as u64;
    let e = parse(b);
    assert!(
        matches!(e, GgufError::TensorOutsideFile { ref tensor, end, file_len, .. }
        if tensor == "t" && end == len + 1 && file_len == len)
    );
    // An offset that overflows.
    assert!(matches!(
        parse(with_tensors(&[("t", &[4], 0, u64::MAX - 31)], 64)),
        GgufError::TensorOutsideFile { end: u64::MAX, .. }
    ));

    // Misaligned offset.
    let e = parse(with_tensors(&[("t", &[4], 0, 16)], 64));
    assert!(
        matches!(e, GgufError::MisalignedOffset { ref tensor, offset: 16, alignment: 32 } if tensor == "t")
    );

    // Duplicate names.
    let e = parse(with_tensors(&[("t", &[4], 0, 0), ("t", &[4], 0, 32)], 64));
    assert!(matches!(e, GgufError::DuplicateTensor { ref tensor } if tensor == "t"));

    // Partly overlapping data; identical ranges (aliases) are fine.
    let e = parse(with_tensors(&[("a", &[16], 0, 0), ("b", &[16], 0, 32)], 96));
    assert!(
        matches!(e, GgufError::OverlappingTensors { ref first, ref second } if first == "a" && second == "b")
    );
    let f =
        GgufFile::from_bytes(with_tensors(&[("a", &[8], 0, 0), ("b", &[2, 4], 0, 0)], 32)).unwrap();
    assert_eq!(f.tensor_data("a"), f.tensor_data("b"));

    // Truncated inside the tensor table names the tensor and field. (A long first name keeps
    // the tensor count plausible for the bytes that remain.)
    let mut b = header(2, 0);
    let long = "x".repeat(40);
    put_tensor_info(&mut b, &long, &[4], 0, 0);
    put_str(&mut b, "w");
    put_u32(&mut b, 2);
    put_u64(&mut b, 4);
    let e = parse(b);
    match e {
        GgufError::Truncated {
            ref what,
            offset: 117,
            needed: 8,
            available: 0,
        } => {
            assert_eq!(what, "dimension 1 of tensor `w`")
        }
        ref other => panic!("{other:?}"),
    }
}

#[test]
fn open_reports_the_path() {
    let e = GgufFile::open("/nonexistent/dir/model.gguf").unwrap_err();
    assert!(matches!(e, GgufError::Io { .. }));
    assert!(
        e.to_string().starts_with("/nonexistent/dir/model.gguf: "),
        "{e}"
    );

    let dir = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("ds4-gguf-fuzz");
    std::fs::create_dir_all(&dir).unwrap();
    let empty = dir.join("empty.gguf");
    std::fs::write(&empty, b"").unwrap();
    assert!(matches!(
        GgufFile::open(&empty),
        Err(GgufError::Truncated { offset: 0, .. })
    ));
    let tiny = dir.join("tiny.gguf");
    std::fs::write(&tiny, tiny_bytes()).unwrap();
    let f = GgufFile::open(&tiny).unwrap();
    assert_eq!(f.get_str("general.name").unwrap(), "tiny");
    assert_eq!(
        f.tensor_data("b").unwrap(),
        &(32..48).collect::<Vec<u8>>()[..]
    );
}
