//! Bit-exactness with gguf-py 0.19: dequantize of random blocks, and quantize where gguf-py
//! defines a quantizer. Fixtures: tests/fixtures/quants/, written by
//! scripts/gguf/make_quant_fixtures.py.

use std::path::PathBuf;

use ds4_gguf::quant::{dequantize, quantize};
use ds4_gguf::GgmlType;

fn fixture(name: &str) -> Vec<u8> {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/fixtures/quants")
        .join(name);
    std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().unwrap())
}

fn f32s(b: &[u8]) -> Vec<f32> {
    b.chunks_exact(4)
        .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
        .collect()
}

/// Dequantize the fixture's blocks and compare every value's bits with gguf-py's output.
/// Returns the number of blocks checked.
fn check_dequant(name: &str, ty: GgmlType) -> usize {
    let file = fixture(&format!("dequant_{name}.bin"));
    assert_eq!(&file[..8], b"DS4QDQ01");
    assert_eq!(u32_at(&file, 8), ty.id());
    let n_blocks = u32_at(&file, 12) as usize;
    let raw_len = n_blocks * ty.block_bytes();
    let raw = &file[16..16 + raw_len];
    let expected = f32s(&file[16 + raw_len..]);
    assert_eq!(expected.len(), n_blocks * ty.block_elems());

    let mut got = vec![0f32; expected.len()];
    dequantize(ty, raw, &mut got).unwrap();
    let mismatches: Vec<usize> = (0..got.len())
        .filter(|&i| got[i].to_bits() != expected[i].to_bits())
        .collect();
    assert!(
        mismatches.is_empty(),
        "{name}: {} of {} values differ; first at {}: got {} want {}",
        mismatches.len(),
        got.len(),
        mismatches[0],
        got[mismatches[0]],
        expected[mismatches[0]]
    );

    // The same bytes at an odd address decode identically (no alignment assumption).
    let mut shifted = vec![0u8; raw.len() + 1];
    shifted[1..].copy_from_slice(raw);
    let mut got2 = vec![0f32; expected.len()];
    dequantize(ty, &shifted[1..], &mut got2).unwrap();
    assert!(got2
        .iter()
        .zip(&got)
        .all(|(a, b)| a.to_bits() == b.to_bits()));
    n_blocks
}

#[test]
fn dequantize_q8_0_matches_gguf_py() {
    assert!(check_dequant("Q8_0", GgmlType::Q8_0) >= 1000);
}

#[test]
fn dequantize_q2_k_matches_gguf_py() {
    assert!(check_dequant("Q2_K", GgmlType::Q2K) >= 1000);
}

#[test]
fn dequantize_q4_k_matches_gguf_py() {
    assert!(check_dequant("Q4_K", GgmlType::Q4K) >= 1000);
}

#[test]
fn dequantize_iq2_xxs_matches_gguf_py() {
    // The first 8 blocks use every codebook index and every sign index once, so this also
    // checks both tables entry by entry.
    assert!(check_dequant("IQ2_XXS", GgmlType::IQ2XXS) >= 1000);
}

#[test]
fn dequantize_f16_and_bf16_match_gguf_py() {
    assert_eq!(check_dequant("F16", GgmlType::F16), 8192);
    assert_eq!(check_dequant("BF16", GgmlType::BF16), 8192);
}

#[test]
fn dequantize_f16_of_any_length_and_offset_matches_gguf_py() {
    // The SIMD path converts 8 values at a time; lengths and offsets that are not multiples
    // of 8 exercise its scalar tail.
    let file = fixture("dequant_F16.bin");
    let raw = &file[16..16 + 2 * 8192];
    let expected = f32s(&file[16 + 2 * 8192..]);
    for (start, len) in [(0usize, 8191usize), (3, 13), (5, 1), (1001, 4000)] {
        let mut got = vec![0f32; len];
        dequantize(GgmlType::F16, &raw[2 * start..2 * (start + len)], &mut got).unwrap();
        for (i, g) in got.iter().enumerate() {
            assert_eq!(
                g.to_bits(),
                expected[start + i].to_bits(),
                "start {start} i {i}"
            );
        }
    }
}

/// Quantize the fixture's input and compare the bytes with gguf-py's.
fn check_quant(name: &str, ty: GgmlType) {
    let file = fixture(&format!("quant_{name}.bin"));
    assert_eq!(&file[..8], b"DS4QQ001");
    assert_eq!(u32_at(&file, 8), ty.id());
    let n = u32_at(&file, 12) as usize;
    let input = f32s(&file[16..16 + 4 * n]);
    let expected = &file[16 + 4 * n..];
    let mut got = vec![0u8; expected.len()];
    quantize(ty, &input, &mut got).unwrap();
    let bad: Vec<usize> = (0..got.len()).filter(|&i| got[i] != expected[i]).collect();
    assert!(
        bad.is_empty(),
        "{name}: {} of {} bytes differ, first at byte {}",
        bad.len(),
        got.len(),
        bad[0]
    );
}

#[test]
fn quantize_q8_0_matches_gguf_py() {
    check_quant("Q8_0", GgmlType::Q8_0);
}

#[test]
fn quantize_f16_matches_gguf_py() {
    check_quant("F16", GgmlType::F16);
}

#[test]
fn quantize_bf16_matches_gguf_py() {
    check_quant("BF16", GgmlType::BF16);
}
