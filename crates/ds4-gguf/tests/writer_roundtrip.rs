//! Writer → reader round trips: every metadata type, every tensor type, aliases, producers,
//! deferred (parallel) writes, byte-exact rewrite, and the writer's input errors.
//!
//! With `DS4_GGUF_PYCHECK_DIR=DIR` set (relative to the workspace root), `export_for_python_check` also writes `DIR/sample.gguf`
//! and `DIR/sample.json` for `scripts/gguf/check_with_gguf_py.py`.

mod common;

use std::path::{Path, PathBuf};

use common::{every_metadata_type, n_bytes, sample_writer};
use ds4_gguf::writer::GgufWriter;
use ds4_gguf::{GgmlType, GgufError, GgufFile, MetaArray, MetaValue};

fn tmp(name: &str) -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("ds4-gguf-writer");
    std::fs::create_dir_all(&dir).unwrap();
    let p = dir.join(name);
    let _ = std::fs::remove_file(&p);
    p
}

fn tmp_sibling(p: &Path) -> PathBuf {
    let mut s = p.as_os_str().to_owned();
    s.push(".tmp");
    PathBuf::from(s)
}

/// Writes the sample file, reads it back and checks everything against what was written.
fn round_trip(alignment: Option<u32>, name: &str) -> (PathBuf, GgufFile) {
    let (mut w, data) = sample_writer(7);
    if let Some(a) = alignment {
        w.set_alignment(a).unwrap();
    }
    let expected_meta = w.metadata().to_vec();
    let path = tmp(name);
    let layout = w.write_to_path(&path).unwrap();
    assert!(!tmp_sibling(&path).exists(), "temporary file left behind");

    let f = GgufFile::open(&path).unwrap();
    assert_eq!(f.path(), Some(path.as_path()));
    let align = alignment.unwrap_or(32);
    assert_eq!(f.alignment(), align);
    assert_eq!(layout.alignment, align);
    assert_eq!(f.metadata(), &expected_meta[..]);
    assert_eq!(f.tensors(), &layout.tensors[..]);
    assert_eq!(f.data_offset(), layout.data_offset);
    assert_eq!(f.file_len(), layout.file_len);
    assert_eq!(f.data_offset() % u64::from(align), 0);
    for t in f.tensors() {
        assert_eq!(t.offset % u64::from(align), 0, "{}", t.name);
        assert_eq!(f.tensor_bytes(t).len() as u64, t.n_bytes);
        // Data is aligned in memory too, so it can be cast to f32/f16 slices.
        assert_eq!(
            f.tensor_bytes(t).as_ptr() as usize % align.min(64) as usize,
            0
        );
    }
    for (name, bytes) in &data {
        assert_eq!(f.tensor_data(name).unwrap(), &bytes[..], "{name}");
    }
    // Every tensor type is present with the sample shape.
    for ty in GgmlType::ALL {
        let t = f.tensor(&format!("t.{}", ty.name())).unwrap();
        assert_eq!(t.ty, ty);
        assert_eq!(t.dims, common::sample_dims(ty));
        assert_eq!(t.row_len(), 2 * ty.block_elems() as u64);
        assert_eq!(t.rows(), 3);
        assert_eq!(t.n_elements, 6 * ty.block_elems() as u64);
    }
    let alias = f.tensor("t.alias").unwrap();
    let target = f.tensor("t.Q8_0").unwrap();
    assert_eq!(alias.offset, target.offset);
    assert_eq!(alias.dims, vec![64, 3, 1]);
    assert_eq!(f.tensor_bytes(alias), f.tensor_bytes(target));

    // The in-memory parser agrees with the mapped one.
    let mem = GgufFile::from_bytes(std::fs::read(&path).unwrap()).unwrap();
    assert_eq!(mem.metadata(), f.metadata());
    assert_eq!(mem.tensors(), f.tensors());
    assert_eq!(mem.path(), None);
    (path, f)
}

#[test]
fn round_trip_default_alignment() {
    let (_, f) = round_trip(None, "default.gguf");
    assert!(f.get("general.alignment").is_none());
}

#[test]
fn round_trip_alignment_64_and_4096() {
    let (_, f) = round_trip(Some(64), "a64.gguf");
    assert_eq!(f.get_u32("general.alignment").unwrap(), 64);
    round_trip(Some(4096), "a4096.gguf");
    round_trip(Some(1), "a1.gguf");
}

/// Reading a file and writing its contents again gives the same bytes (so no metadata type,
/// float bit pattern or array nesting is lost on the way).
#[test]
fn rewrite_is_byte_identical() {
    let (path, f) = round_trip(Some(64), "rewrite_src.gguf");
    let mut w = GgufWriter::new();
    for (k, v) in f.metadata() {
        w.add_meta(k.clone(), v.clone());
    }
    let mut seen: std::collections::HashMap<u64, String> = std::collections::HashMap::new();
    for t in f.tensors() {
        match seen.get(&t.offset) {
            Some(first) => w.add_tensor_alias(&t.name, t.ty, &t.dims, first).unwrap(),
            None => {
                w.add_tensor(&t.name, t.ty, &t.dims, f.tensor_bytes(t).to_vec())
                    .unwrap();
                seen.insert(t.offset, t.name.clone());
            }
        }
    }
    let out = tmp("rewrite_dst.gguf");
    w.write_to_path(&out).unwrap();
    assert_eq!(std::fs::read(&out).unwrap(), std::fs::read(&path).unwrap());
}

#[test]
fn typed_getters() {
    let (_, f) = round_trip(None, "getters.gguf");
    assert_eq!(f.get_u32("t.u8").unwrap(), 255);
    assert_eq!(f.get_u32("t.u32").unwrap(), u32::MAX);
    assert!(matches!(
        f.get_u32("t.i32"),
        Err(GgufError::ValueOutOfRange { ref key, .. }) if key == "t.i32"
    ));
    assert_eq!(f.get_i64("t.i64").unwrap(), i64::MIN);
    assert_eq!(f.get_u64("t.u64").unwrap(), u64::MAX);
    assert_eq!(f.get_f32("t.f32").unwrap(), -1.5e-7);
    assert_eq!(f.get_f64("t.u16").unwrap(), 65535.0);
    assert_eq!(f.get_f32("t.f64").unwrap(), std::f32::consts::PI);
    assert!(f.get_bool("t.bool_t").unwrap());
    assert!(f.get_str("t.string").unwrap().contains("｜DSML｜"));
    assert_eq!(f.get_string_array("t.a_string").unwrap()[0], "<｜User｜>");
    assert_eq!(f.get_u32_array("t.a_u32").unwrap(), vec![0, 4, 128, 4, 128]);
    assert_eq!(f.get_u32_array("t.a_u8").unwrap(), vec![0, 1, 255]);
    assert!(matches!(
        f.get_u32_array("t.a_i32"),
        Err(GgufError::ValueOutOfRange { .. })
    ));
    assert_eq!(
        f.get_i64_array("t.a_i32").unwrap(),
        vec![-7, 4, i64::from(i32::MAX)]
    );
    assert_eq!(
        f.get_f32_array("t.a_f64").unwrap(),
        vec![1e300f64 as f32, -2.5]
    );
    assert_eq!(f.get_f32_array("t.a_empty_f32").unwrap(), Vec::<f32>::new());
    assert!(matches!(
        f.get_u32("missing.key"),
        Err(GgufError::MissingKey { ref key }) if key == "missing.key"
    ));
    let e = f.get_str("t.u32").unwrap_err();
    assert!(matches!(e, GgufError::WrongType { .. }));
    assert_eq!(
        e.to_string(),
        "metadata key `t.u32` has type UINT32, expected STRING"
    );
    assert!(matches!(
        f.get_string_array("t.a_u32"),
        Err(GgufError::WrongType { ref found, .. }) if found == "ARRAY[UINT32]"
    ));
    assert!(matches!(
        f.get_u32_array("t.a_f32"),
        Err(GgufError::WrongType { .. })
    ));
}

#[test]
fn replacing_a_key_keeps_its_position() {
    let mut w = GgufWriter::new();
    w.add_meta("a", MetaValue::U32(1));
    w.add_meta("b", MetaValue::U32(2));
    w.add_meta("a", MetaValue::from("one"));
    let keys: Vec<_> = w.metadata().iter().map(|(k, _)| k.as_str()).collect();
    assert_eq!(keys, ["a", "b"]);
    assert_eq!(w.metadata()[0].1, MetaValue::from("one"));
}

/// Tensors filled after planning, in pieces, from several threads at once.
#[test]
fn deferred_tensors_written_in_parallel() {
    let mut w = GgufWriter::new();
    w.add_meta("general.name", "parallel");
    let names: Vec<String> = (0..8)
        .map(|i| format!("blk.{i}.ffn_down_exps.weight"))
        .collect();
    let dims = [256u64, 4, 3];
    for n in &names {
        w.add_tensor_deferred(n, GgmlType::Q2K, &dims).unwrap();
    }
    w.add_tensor_alias("alias", GgmlType::Q2K, &dims, &names[3])
        .unwrap();
    let path = tmp("parallel.gguf");
    let out = w.create(&path).unwrap();
    let size = n_bytes(GgmlType::Q2K, &dims);
    assert_eq!(out.layout().tensor(&names[0]).unwrap().n_bytes, size as u64);
    let fill = |i: usize| -> Vec<u8> { (0..size).map(|j| (i * 31 + j) as u8).collect() };
    std::thread::scope(|s| {
        for (i, n) in names.iter().enumerate() {
            let out = &out;
            let fill = &fill;
            s.spawn(move || {
                let bytes = fill(i);
                // Two halves, second first, to exercise piecewise writes.
                let half = size / 2;
                out.write_tensor_part(n, half as u64, &bytes[half..])
                    .unwrap();
                out.write_tensor_part(n, 0, &bytes[..half]).unwrap();
            });
        }
    });
    assert!(matches!(
        out.write_tensor("alias", &vec![0; size]),
        Err(GgufError::InvalidInput { .. })
    ));
    assert!(out.write_tensor(&names[0], &[0; 3]).is_err());
    assert!(out.write_tensor_part(&names[0], size as u64, &[0]).is_err());
    out.finish().unwrap();
    let f = GgufFile::open(&path).unwrap();
    for (i, n) in names.iter().enumerate() {
        assert_eq!(f.tensor_data(n).unwrap(), &fill(i)[..]);
    }
    assert_eq!(f.tensor_data("alias").unwrap(), &fill(3)[..]);
}

#[test]
fn unfinished_file_never_appears_under_its_name() {
    let path = tmp("unfinished.gguf");
    let mut w = GgufWriter::new();
    w.add_tensor_deferred("a", GgmlType::F32, &[8]).unwrap();
    w.add_tensor_deferred("b", GgmlType::F32, &[8]).unwrap();
    let out = w.create(&path).unwrap();
    assert!(tmp_sibling(&path).exists());
    out.write_tensor("a", &[1; 32]).unwrap();
    out.write_tensor_part("b", 0, &[1; 16]).unwrap();
    let e = out.finish().unwrap_err();
    assert_eq!(
        e.to_string(),
        "invalid writer input for `b`: 16 of its 32 bytes were written"
    );
    assert!(!path.exists());
    assert!(!tmp_sibling(&path).exists());

    // A failing producer also leaves nothing behind.
    let mut w = GgufWriter::new();
    w.add_tensor_with(
        "p",
        GgmlType::F32,
        &[8],
        Box::new(|_| Err("disk full".into())),
    )
    .unwrap();
    let e = w.write_to_path(&path).unwrap_err();
    assert_eq!(
        e.to_string(),
        "producing data of tensor `p` failed: disk full"
    );
    assert!(!path.exists());
    assert!(!tmp_sibling(&path).exists());
}

#[test]
fn writer_rejects_bad_input() {
    let mut w = GgufWriter::new();
    let e = w
        .add_tensor("x", GgmlType::F32, &[4], vec![0; 15])
        .unwrap_err();
    assert_eq!(
        e.to_string(),
        "invalid writer input for `x`: 15 data bytes given, a F32 tensor of shape [4] needs 16"
    );
    w.add_tensor("x", GgmlType::F32, &[4], vec![0; 16]).unwrap();
    assert!(matches!(
        w.add_tensor("x", GgmlType::F32, &[4], vec![0; 16]),
        Err(GgufError::DuplicateTensor { .. })
    ));
    assert!(matches!(
        w.add_tensor_deferred("q", GgmlType::Q4K, &[100, 2]),
        Err(GgufError::PartialBlock {
            row_len: 100,
            block_elems: 256,
            ..
        })
    ));
    assert!(w.add_tensor_deferred("nd0", GgmlType::F32, &[]).is_err());
    assert!(w
        .add_tensor_deferred("nd9", GgmlType::F32, &[1; 9])
        .is_err());
    assert!(matches!(
        w.add_tensor_deferred("big", GgmlType::F32, &[1 << 40, 1 << 40]),
        Err(GgufError::DimsOverflow { .. })
    ));
    assert!(matches!(
        w.set_alignment(48),
        Err(GgufError::BadAlignment { .. })
    ));
    assert!(matches!(
        w.set_alignment(0),
        Err(GgufError::BadAlignment { .. })
    ));

    // Alias problems are found when planning (the target may be added later).
    let mut w2 = GgufWriter::new();
    w2.add_tensor_alias("a", GgmlType::F32, &[4], "later")
        .unwrap();
    w2.add_tensor("later", GgmlType::F32, &[2, 2], vec![0; 16])
        .unwrap();
    let layout = w2.plan().unwrap();
    assert_eq!(
        layout.tensor("a").unwrap().offset,
        layout.tensor("later").unwrap().offset
    );
    w2.add_tensor_alias("wrong_size", GgmlType::F16, &[4], "later")
        .unwrap();
    let e = w2.plan().unwrap_err();
    assert_eq!(
        e.to_string(),
        "invalid writer input for `wrong_size`: alias of `later` has 8 bytes, the target has 16"
    );
    let mut w3 = GgufWriter::new();
    w3.add_tensor_alias("a", GgmlType::F32, &[4], "nowhere")
        .unwrap();
    assert!(w3
        .plan()
        .unwrap_err()
        .to_string()
        .contains("`nowhere` is not a tensor"));
    let mut w4 = GgufWriter::new();
    w4.add_tensor_alias("a", GgmlType::F32, &[4], "b").unwrap();
    w4.add_tensor_alias("b", GgmlType::F32, &[4], "a").unwrap();
    assert!(w4.plan().unwrap_err().to_string().contains("loops"));

    // A `general.alignment` of the wrong type is refused, as readers would refuse it.
    let mut w5 = GgufWriter::new();
    w5.add_meta("general.alignment", MetaValue::U64(32));
    assert!(matches!(w5.plan(), Err(GgufError::BadAlignment { .. })));

    // Nesting deeper than readers accept is refused.
    let mut deep = MetaArray::U8(vec![1]);
    for _ in 0..20 {
        deep = MetaArray::Array(vec![deep]);
    }
    let mut w6 = GgufWriter::new();
    w6.add_meta("deep", deep);
    assert!(w6.plan().is_err());
}

// ---- export for scripts/gguf/check_with_gguf_py.py ----

fn json_str(s: &str) -> String {
    let mut o = String::from("\"");
    for c in s.chars() {
        match c {
            '"' => o.push_str("\\\""),
            '\\' => o.push_str("\\\\"),
            c if (c as u32) < 0x20 => o.push_str(&format!("\\u{:04x}", c as u32)),
            c => o.push(c),
        }
    }
    o.push('"');
    o
}

fn json_list<T>(v: &[T], f: impl Fn(&T) -> String) -> String {
    format!("[{}]", v.iter().map(f).collect::<Vec<_>>().join(","))
}

/// Arrays as {"elem_type", "items"}; floats as their bit patterns (exact, inf-safe).
fn json_array(a: &MetaArray) -> String {
    let items = match a {
        MetaArray::U8(v) => json_list(v, |x| x.to_string()),
        MetaArray::I8(v) => json_list(v, |x| x.to_string()),
        MetaArray::U16(v) => json_list(v, |x| x.to_string()),
        MetaArray::I16(v) => json_list(v, |x| x.to_string()),
        MetaArray::U32(v) => json_list(v, |x| x.to_string()),
        MetaArray::I32(v) => json_list(v, |x| x.to_string()),
        MetaArray::U64(v) => json_list(v, |x| x.to_string()),
        MetaArray::I64(v) => json_list(v, |x| x.to_string()),
        MetaArray::F32(v) => json_list(v, |x| x.to_bits().to_string()),
        MetaArray::F64(v) => json_list(v, |x| x.to_bits().to_string()),
        MetaArray::Bool(v) => json_list(v, |x| x.to_string()),
        MetaArray::String(v) => json_list(v, |x| json_str(x)),
        MetaArray::Array(v) => json_list(v, json_array),
    };
    format!(
        r#"{{"elem_type":"{}","items":{items}}}"#,
        a.elem_type().name()
    )
}

fn json_value(v: &MetaValue) -> String {
    match v {
        MetaValue::F32(x) => x.to_bits().to_string(),
        MetaValue::F64(x) => x.to_bits().to_string(),
        MetaValue::String(s) => json_str(s),
        MetaValue::Array(a) => json_array(a),
        MetaValue::Bool(b) => b.to_string(),
        v => v.as_i128().unwrap().to_string(),
    }
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// Writes `sample.gguf` and its JSON description when `DS4_GGUF_PYCHECK_DIR` is set.
#[test]
fn export_for_python_check() {
    let Some(dir) = std::env::var_os("DS4_GGUF_PYCHECK_DIR") else {
        return;
    };
    // A relative path is relative to the workspace root (tests run in the crate directory).
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .join(dir);
    std::fs::create_dir_all(&dir).unwrap();
    let (mut w, _) = sample_writer(11);
    w.set_alignment(64).unwrap();
    let gguf = dir.join("sample.gguf");
    w.write_to_path(&gguf).unwrap();
    let f = GgufFile::open(&gguf).unwrap();
    let meta = json_list(f.metadata(), |(k, v)| {
        format!(
            r#"{{"key":{},"type":"{}","value":{}}}"#,
            json_str(k),
            v.meta_type().name(),
            json_value(v)
        )
    });
    let tensors = json_list(f.tensors(), |t| {
        format!(
            r#"{{"name":{},"type":"{}","type_id":{},"dims":{},"offset":{},"n_bytes":{},"data_hex":"{}"}}"#,
            json_str(&t.name),
            t.ty.name(),
            t.ty.id(),
            json_list(&t.dims, |d| d.to_string()),
            t.offset,
            t.n_bytes,
            hex(f.tensor_bytes(t))
        )
    });
    let json = format!(
        r#"{{"alignment":{},"data_offset":{},"metadata":{meta},"tensors":{tensors}}}"#,
        f.alignment(),
        f.data_offset()
    );
    std::fs::write(dir.join("sample.json"), json).unwrap();
    // The sample covers every metadata type.
    assert_eq!(f.metadata().len(), every_metadata_type().len() + 1);
}
