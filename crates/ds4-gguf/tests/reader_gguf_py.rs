//! Reads a file written by gguf-py's GGUFWriter (another implementation), made by
//! scripts/gguf/make_reader_fixture.py, and checks every value that script wrote.

use ds4_gguf::{GgmlType, GgufFile, MetaArray, MetaValue};

fn fixture() -> GgufFile {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/gguf_py_written.gguf");
    GgufFile::open(path).unwrap()
}

fn f32s(b: &[u8]) -> Vec<f32> {
    b.chunks_exact(4)
        .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
        .collect()
}

#[test]
fn metadata_written_by_gguf_py() {
    let f = fixture();
    assert_eq!(f.alignment(), 64);
    assert_eq!(f.data_offset() % 64, 0);
    assert_eq!(f.get_str("general.architecture").unwrap(), "deepseek4");
    assert_eq!(f.get("deepseek4.block_count"), Some(&MetaValue::U32(43)));
    assert_eq!(f.get("x.i32"), Some(&MetaValue::I32(-5)));
    assert_eq!(f.get("x.u64"), Some(&MetaValue::U64((1 << 63) + 1)));
    assert_eq!(f.get("x.f32"), Some(&MetaValue::F32(1e-6)));
    assert_eq!(f.get("x.f64"), Some(&MetaValue::F64(0.1)));
    assert!(f.get_bool("x.bool").unwrap());
    assert_eq!(f.get_str("x.str").unwrap(), "<｜User｜>");
    assert_eq!(
        f.get_string_array("x.tokens").unwrap(),
        ["<｜begin▁of▁sentence｜>", "Ġa", "b c"]
    );
    assert_eq!(
        f.get("x.ratios"),
        Some(&MetaValue::Array(MetaArray::U32(vec![0, 0, 4, 128])))
    );
    assert_eq!(f.get_f32_array("x.clamp").unwrap(), vec![10.0, 10.0]);
    assert_eq!(
        f.get("x.nested"),
        Some(&MetaValue::Array(MetaArray::Array(vec![
            MetaArray::I32(vec![1, 2]),
            MetaArray::I32(vec![3]),
        ])))
    );
    let keys: Vec<&str> = f.metadata().iter().map(|(k, _)| k.as_str()).collect();
    assert_eq!(keys.len(), 13);
    assert_eq!(keys[0], "general.architecture");
}

#[test]
fn tensors_written_by_gguf_py() {
    let f = fixture();
    let names: Vec<&str> = f.tensors().iter().map(|t| t.name.as_str()).collect();
    assert_eq!(names, ["f32", "f16", "i32", "q8"]);

    let t = f.tensor("f32").unwrap();
    assert_eq!(
        (t.ty, t.dims.as_slice(), t.rows(), t.row_len()),
        (GgmlType::F32, &[4u64, 3][..], 3, 4)
    );
    let want: Vec<f32> = (0..12).map(|i| i as f32).collect();
    assert_eq!(f32s(f.tensor_bytes(t)), want);
    // Tensor data is aligned in memory, so it can be viewed as f32 without copying.
    let view: &[f32] = bytemuck::cast_slice(f.tensor_bytes(t));
    assert_eq!(view, &want[..]);

    let t = f.tensor("f16").unwrap();
    assert_eq!((t.ty, t.dims.as_slice()), (GgmlType::F16, &[32u64, 2][..]));
    let halves: Vec<f32> = f
        .tensor_bytes(t)
        .chunks_exact(2)
        .map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32())
        .collect();
    assert_eq!(halves, (0..64).map(|i| i as f32 / 8.0).collect::<Vec<_>>());

    let t = f.tensor("i32").unwrap();
    assert_eq!((t.ty, t.dims.as_slice()), (GgmlType::I32, &[6u64, 1][..]));
    let ints: Vec<i32> = f
        .tensor_bytes(t)
        .chunks_exact(4)
        .map(|c| i32::from_le_bytes(c.try_into().unwrap()))
        .collect();
    assert_eq!(ints, [-3, -2, -1, 0, 1, 2]);

    let t = f.tensor("q8").unwrap();
    assert_eq!(
        (t.ty, t.dims.as_slice(), t.n_bytes),
        (GgmlType::Q8_0, &[32u64, 2][..], 68)
    );
    // First block: the row starts at -1, so its scale is 1/127 and its first quant is -127.
    let b = f.tensor_bytes(t);
    let d = half::f16::from_le_bytes([b[0], b[1]]).to_f32();
    assert!((d - 1.0 / 127.0).abs() < 1e-5, "{d}");
    assert_eq!(b[2] as i8, -127);
    for t in f.tensors() {
        assert_eq!(t.offset % 64, 0);
    }
}
