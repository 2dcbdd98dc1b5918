//! Helpers shared by the container tests: a seeded PRNG, raw GGUF encoding (to build damaged
//! files byte by byte) and a sample file with every metadata type and tensor type.
#![allow(dead_code)]

use ds4_gguf::reader::GgufFile;
use ds4_gguf::writer::GgufWriter;
use ds4_gguf::{GgmlType, MetaArray, MetaValue};

/// What holds for any file the reader accepted from `len` bytes (reader_fuzz and the
/// gguf_reader fuzz target, which includes this file by path): every tensor's bytes lie inside
/// the data, its shape matches its element count, and the lenient getters answer for every key
/// whatever its type.
pub fn check_accepted(f: &GgufFile, len: u64) {
    assert!(f.data_offset() <= len || f.tensors().iter().all(|t| t.n_bytes == 0));
    for t in f.tensors() {
        assert_eq!(f.tensor_bytes(t).len() as u64, t.n_bytes);
        assert!(t.n_bytes == 0 || f.data_offset() + t.offset + t.n_bytes <= len);
        assert_eq!(t.rows() * t.row_len(), t.n_elements);
    }
    for (k, _) in f.metadata() {
        let _ = (f.get_u32(k), f.get_f32(k), f.get_str(k), f.get_bool(k));
        let _ = (
            f.get_u32_array(k),
            f.get_f32_array(k),
            f.get_string_array(k),
        );
        let _ = (f.get_i64_array(k), f.get_u64(k), f.get_i64(k));
    }
}

/// SplitMix64: small, seeded, good enough to pick test cases and make test data.
pub struct Rng(pub u64);

impl Rng {
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in 0..n (n > 0).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n
    }

    pub fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| self.next_u64() as u8).collect()
    }

    /// Uniform in [0, 1), 53 bits.
    pub fn uniform(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }

    /// N(0, 1) by Box-Muller.
    pub fn normal(&mut self) -> f32 {
        let (u1, u2) = (self.uniform().max(1e-300), self.uniform());
        ((-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()) as f32
    }

    pub fn normals(&mut self, n: usize) -> Vec<f32> {
        (0..n).map(|_| self.normal()).collect()
    }

    /// A random positive normal f16 in [2^-10, 2^2), little-endian.
    pub fn f16_scale(&mut self) -> [u8; 2] {
        let exp = 5 + (self.next_u64() % 12) as u16;
        let bits = (exp << 10) | (self.next_u64() as u16 & 0x3ff);
        bits.to_le_bytes()
    }
}

pub fn put_u32(b: &mut Vec<u8>, x: u32) {
    b.extend_from_slice(&x.to_le_bytes());
}

pub fn put_u64(b: &mut Vec<u8>, x: u64) {
    b.extend_from_slice(&x.to_le_bytes());
}

pub fn put_str(b: &mut Vec<u8>, s: &str) {
    put_u64(b, s.len() as u64);
    b.extend_from_slice(s.as_bytes());
}

/// Magic, version 3, tensor count, metadata count.
pub fn header(n_tensors: u64, n_kv: u64) -> Vec<u8> {
    let mut b = b"GGUF".to_vec();
    put_u32(&mut b, 3);
    put_u64(&mut b, n_tensors);
    put_u64(&mut b, n_kv);
    b
}

/// One tensor info: name, ndim, dims, type id, offset.
pub fn put_tensor_info(b: &mut Vec<u8>, name: &str, dims: &[u64], type_id: u32, offset: u64) {
    put_str(b, name);
    put_u32(b, dims.len() as u32);
    for &d in dims {
        put_u64(b, d);
    }
    put_u32(b, type_id);
    put_u64(b, offset);
}

/// Pads to a multiple of 32 (the default alignment).
pub fn pad32(b: &mut Vec<u8>) {
    while !b.len().is_multiple_of(32) {
        b.push(0);
    }
}

/// Metadata with every value type: scalars at their extremes, unicode, empty arrays, arrays of
/// every element type, nested arrays with mixed inner types.
pub fn every_metadata_type() -> Vec<(String, MetaValue)> {
    let v: Vec<(&str, MetaValue)> = vec![
        ("general.architecture", "deepseek4".into()),
        ("t.u8", MetaValue::U8(255)),
        ("t.i8", MetaValue::I8(-128)),
        ("t.u16", MetaValue::U16(65535)),
        ("t.i16", MetaValue::I16(-32768)),
        ("t.u32", MetaValue::U32(u32::MAX)),
        ("t.i32", MetaValue::I32(i32::MIN)),
        ("t.f32", MetaValue::F32(-1.5e-7)),
        ("t.f32_inf", MetaValue::F32(f32::INFINITY)),
        ("t.bool_t", MetaValue::Bool(true)),
        ("t.bool_f", MetaValue::Bool(false)),
        ("t.string", "héllo ｜DSML｜ ▁ 🦀 \n\t\"q\"".into()),
        ("t.empty_string", "".into()),
        ("t.u64", MetaValue::U64(u64::MAX)),
        ("t.i64", MetaValue::I64(i64::MIN)),
        ("t.f64", MetaValue::F64(std::f64::consts::PI)),
        ("t.f64_neg_zero", MetaValue::F64(-0.0)),
        ("t.a_u8", vec![0u8, 1, 255].into()),
        ("t.a_i8", vec![-1i8, 0, 127].into()),
        ("t.a_u16", vec![1u16, 65535].into()),
        ("t.a_i16", vec![-2i16, 300].into()),
        ("t.a_u32", vec![0u32, 4, 128, 4, 128].into()),
        ("t.a_i32", vec![-7i32, 4, i32::MAX].into()),
        ("t.a_f32", vec![10.0f32, -0.25, f32::MIN_POSITIVE].into()),
        ("t.a_bool", vec![true, false, true].into()),
        (
            "t.a_string",
            MetaValue::string_array(["<｜User｜>", "", "a b", "Ġthe"]),
        ),
        ("t.a_u64", vec![u64::MAX, 0].into()),
        ("t.a_i64", vec![i64::MIN, -1].into()),
        ("t.a_f64", vec![1e300f64, -2.5].into()),
        ("t.a_empty_f32", MetaArray::F32(vec![]).into()),
        ("t.a_empty_string", MetaArray::String(vec![]).into()),
        (
            "t.a_nested",
            MetaArray::Array(vec![
                MetaArray::U32(vec![1, 2, 3]),
                MetaArray::String(vec!["x".into(), "yz".into()]),
                MetaArray::Array(vec![MetaArray::F64(vec![0.5]), MetaArray::Bool(vec![])]),
                MetaArray::I8(vec![]),
            ])
            .into(),
        ),
        ("t.a_empty_nested", MetaArray::Array(vec![]).into()),
    ];
    v.into_iter().map(|(k, v)| (k.to_string(), v)).collect()
}

/// Shape of the sample tensor of type `ty`: two blocks per row, three rows.
pub fn sample_dims(ty: GgmlType) -> Vec<u64> {
    vec![2 * ty.block_elems() as u64, 3]
}

/// Byte size of a tensor of type `ty` and shape `dims`.
pub fn n_bytes(ty: GgmlType, dims: &[u64]) -> usize {
    let rows: u64 = dims[1..].iter().product();
    (ty.row_bytes(dims[0]).unwrap() * rows) as usize
}

/// A writer holding every metadata type, one tensor of every type (random bytes), a 3-D
/// tensor, a producer-filled tensor and an alias. Returns it with the expected data of
/// every non-alias tensor.
pub fn sample_writer(seed: u64) -> (GgufWriter, Vec<(String, Vec<u8>)>) {
    let mut rng = Rng(seed);
    let mut w = GgufWriter::new();
    for (k, v) in every_metadata_type() {
        w.add_meta(k, v);
    }
    let mut data = Vec::new();
    for ty in GgmlType::ALL {
        let dims = sample_dims(ty);
        let bytes = rng.bytes(n_bytes(ty, &dims));
        let name = format!("t.{}", ty.name());
        w.add_tensor(&name, ty, &dims, bytes.clone()).unwrap();
        data.push((name, bytes));
    }
    let dims3 = [64u64, 2, 3];
    let bytes3 = rng.bytes(n_bytes(GgmlType::Q8_0, &dims3));
    w.add_tensor(
        "blk.0.ffn_up_exps.weight",
        GgmlType::Q8_0,
        &dims3,
        bytes3.clone(),
    )
    .unwrap();
    data.push(("blk.0.ffn_up_exps.weight".into(), bytes3));
    let produced: Vec<u8> = (0..7 * 4).map(|i| i as u8).collect();
    let p = produced.clone();
    w.add_tensor_with(
        "t.produced",
        GgmlType::F32,
        &[7],
        Box::new(move |buf: &mut [u8]| {
            buf.copy_from_slice(&p);
            Ok(())
        }),
    )
    .unwrap();
    data.push(("t.produced".into(), produced));
    // Same bytes as t.Q8_0 ([64, 3] → 6 blocks of 34), seen as a [64, 3, 1] tensor.
    w.add_tensor_alias("t.alias", GgmlType::Q8_0, &[64, 3, 1], "t.Q8_0")
        .unwrap();
    (w, data)
}
