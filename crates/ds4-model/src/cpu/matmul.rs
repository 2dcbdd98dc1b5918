//! y = W·x for a span of tokens, multi-threaded over output rows.
//!
//! Each weight row is read once per span and dotted with every token's activation, so a
//! prefill streams the weights once. Every (row, token) dot product is computed the same way
//! whatever the span length, so results do not depend on how a prompt is chunked.
//!
//! Numerics (one switch, see `numerics.rs`):
//! - F32/F16/BF16 weights: f32 dot products in both modes.
//! - Quantized weights, `Reference`: the row is dequantized and dotted in f32.
//! - Quantized weights, `Ds4`: the activation is quantized once per token as ds4 does (Q8_0
//!   for Q8_0 rows, Q8_K for K/IQ rows) and dotted with the integer kernels.

use ds4_gguf::quant::{self, BlockQ8K, BlockQ8_0};
use ds4_gguf::GgmlType;
use rayon::prelude::*;

use super::vecops::dot;
use crate::numerics::Numerics;
use crate::weights::Matrix;

/// Output rows per parallel task: enough work per task to amortize scheduling.
const ROWS_PER_TASK: usize = 16;
/// Below this many multiply-adds a product runs on the calling thread: spreading it over the
/// pool would cost more than it saves (tiny models, decode of small projections).
const SERIAL_WORK: usize = 1 << 16;

/// One token's activation in the form a row type's kernel wants.
enum Act<'a> {
    F32(&'a [f32]),
    Q8_0(Vec<BlockQ8_0>),
    Q8K(Vec<BlockQ8K>),
}

/// `out[t·rows + r] = W[r] · x[t·cols ..]` for the `n_tok` tokens of `x`.
pub fn matmul(file: &[u8], w: &Matrix, x: &[f32], out: &mut [f32], numerics: Numerics) {
    let (rows, cols) = (w.rows, w.cols);
    let n_tok = x.len() / cols;
    debug_assert_eq!(x.len(), n_tok * cols);
    debug_assert_eq!(out.len(), n_tok * rows);
    if n_tok == 0 || rows == 0 {
        return;
    }
    let quantized = w.ty.is_quantized();
    let acts: Vec<Act> = if quantized && numerics == Numerics::Ds4 {
        x.par_chunks_exact(cols)
            .map(|xt| match w.ty {
                GgmlType::Q8_0 => Act::Q8_0(quant::quantize_q8_0_activation(xt)),
                _ => Act::Q8K(quant::quantize_q8_k_activation(xt)),
            })
            .collect()
    } else {
        x.chunks_exact(cols).map(Act::F32).collect()
    };
    // Row-major [rows × n_tok] scratch, transposed into `out` at the end.
    let mut tr = vec![0f32; rows * n_tok];
    let task = |(task, chunk): (usize, &mut [f32])| {
        let mut row_f32 = if quantized {
            vec![0f32; cols]
        } else {
            Vec::new()
        };
        for (i, dst) in chunk.chunks_exact_mut(n_tok).enumerate() {
            let r = task * ROWS_PER_TASK + i;
            let row = w.row(file, r);
            if quantized && numerics == Numerics::Reference {
                // Sizes were checked when the weights were bound.
                let _ = quant::dequantize(w.ty, row, &mut row_f32);
            }
            for (d, act) in dst.iter_mut().zip(&acts) {
                *d = dot_row(w.ty, row, &row_f32, act);
            }
        }
    };
    if rows * cols * n_tok < SERIAL_WORK {
        tr.chunks_mut(ROWS_PER_TASK * n_tok)
            .enumerate()
            .for_each(task);
    } else {
        tr.par_chunks_mut(ROWS_PER_TASK * n_tok)
            .enumerate()
            .for_each(task);
    }
    for (r, col) in tr.chunks_exact(n_tok).enumerate() {
        for (t, v) in col.iter().enumerate() {
            out[t * rows + r] = *v;
        }
    }
}

#[inline]
fn dot_row(ty: GgmlType, row: &[u8], row_f32: &[f32], act: &Act) -> f32 {
    match (act, ty) {
        (Act::F32(x), GgmlType::F32) => quant::dot_f32(row, x),
        (Act::F32(x), GgmlType::F16) => quant::dot_f16(row, x),
        (Act::F32(x), GgmlType::BF16) => quant::dot_bf16(row, x),
        (Act::F32(x), _) => dot(row_f32, x),
        (Act::Q8_0(a), _) => quant::vec_dot_q8_0(row, a),
        (Act::Q8K(a), GgmlType::Q2K) => quant::vec_dot_q2_k(row, a),
        (Act::Q8K(a), GgmlType::Q4K) => quant::vec_dot_q4_k(row, a),
        (Act::Q8K(a), _) => quant::vec_dot_iq2_xxs(row, a),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn matrix(ty: GgmlType, rows: usize, cols: usize, values: &[f32]) -> (Vec<u8>, Matrix) {
        let row_bytes = ty.row_bytes(cols as u64).unwrap() as usize;
        let mut bytes = vec![0u8; rows * row_bytes];
        quant::quantize(ty, values, &mut bytes).unwrap();
        let m = Matrix {
            name: "w".into(),
            ty,
            rows,
            cols,
            offset: 0,
            row_bytes,
        };
        (bytes, m)
    }

    #[test]
    fn matches_naive_product_for_every_span_length() {
        let (rows, cols) = (37, 64);
        let w: Vec<f32> = (0..rows * cols)
            .map(|i| ((i * 13 % 29) as f32 - 14.0) * 0.01)
            .collect();
        let x: Vec<f32> = (0..5 * cols).map(|i| (i as f32 * 0.05).sin()).collect();
        for ty in [GgmlType::F32, GgmlType::F16, GgmlType::Q8_0] {
            let (bytes, m) = matrix(ty, rows, cols, &w);
            let mut wq = vec![0f32; rows * cols];
            quant::dequantize(ty, &bytes, &mut wq).unwrap();
            let mut all = vec![0f32; 5 * rows];
            matmul(&bytes, &m, &x, &mut all, Numerics::Reference);
            for t in 0..5 {
                for r in 0..rows {
                    let want: f32 = (0..cols).map(|c| wq[r * cols + c] * x[t * cols + c]).sum();
                    assert!((all[t * rows + r] - want).abs() < 1e-4, "{ty} t{t} r{r}");
                }
                // One token alone gives bit-identical results.
                let mut one = vec![0f32; rows];
                matmul(
                    &bytes,
                    &m,
                    &x[t * cols..(t + 1) * cols],
                    &mut one,
                    Numerics::Reference,
                );
                assert_eq!(one, all[t * rows..(t + 1) * rows]);
            }
            // ds4 numerics: quantized activations stay close to the f32 product.
            let mut q = vec![0f32; 5 * rows];
            matmul(&bytes, &m, &x, &mut q, Numerics::Ds4);
            for (a, b) in q.iter().zip(&all) {
                assert!((a - b).abs() < 2e-2, "{ty}: {a} vs {b}");
            }
        }
    }

    #[test]
    fn k_quant_rows_use_q8_k_activations_in_ds4_numerics() {
        // Expert formats: 256-element blocks, dotted against Q8_K activations by ds4.
        let (rows, cols, n_tok) = (9, 512, 3);
        let w: Vec<f32> = (0..rows * cols)
            .map(|i| ((i * 7919 % 1000) as f32 / 1000.0 - 0.5) * 0.1)
            .collect();
        let x: Vec<f32> = (0..n_tok * cols)
            .map(|i| (i as f32 * 0.013).sin())
            .collect();
        for ty in [GgmlType::Q2K, GgmlType::Q4K, GgmlType::IQ2XXS] {
            let (bytes, m) = matrix(ty, rows, cols, &w);
            let mut wq = vec![0f32; rows * cols];
            quant::dequantize(ty, &bytes, &mut wq).unwrap();
            let mut reference = vec![0f32; n_tok * rows];
            matmul(&bytes, &m, &x, &mut reference, Numerics::Reference);
            let mut ds4 = vec![0f32; n_tok * rows];
            matmul(&bytes, &m, &x, &mut ds4, Numerics::Ds4);
            for t in 0..n_tok {
                let xq = quant::quantize_q8_k_activation(&x[t * cols..(t + 1) * cols]);
                for r in 0..rows {
                    let want: f32 = (0..cols).map(|c| wq[r * cols + c] * x[t * cols + c]).sum();
                    let got = reference[t * rows + r];
                    assert!((got - want).abs() < 1e-4, "{ty} reference");
                    // ds4 numerics: exactly the format's Q8_K kernel on the quantized input.
                    let row = m.row(&bytes, r);
                    let kernel = match ty {
                        GgmlType::Q2K => quant::vec_dot_q2_k(row, &xq),
                        GgmlType::Q4K => quant::vec_dot_q4_k(row, &xq),
                        _ => quant::vec_dot_iq2_xxs(row, &xq),
                    };
                    assert_eq!(ds4[t * rows + r], kernel, "{ty} ds4");
                    assert!(
                        (kernel - want).abs() < 0.05 * (1.0 + want.abs()),
                        "{ty}: {kernel} vs {want}"
                    );
                }
            }
        }
    }
}
