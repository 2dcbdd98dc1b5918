//! Where each ds4 tensor comes from among transformers' module tensors (see
//! [`super::checkpoint_names`] for other spellings), and the layout change.
//!
//! The layout change is small: GGUF dims are the reverse of torch's shape with the same bytes
//! (a linear `[out, in]` becomes `[in, out]`, `position_bias` `[m, w]` becomes `[w, m]`,
//! `down_proj` `[E, d, I]` becomes `[I, d, E]`, `tid2eid` `[V, k]` becomes `[k, V]`), except for
//! the routed experts' fused `gate_up_proj` `[E, 2I, d]`, whose first `I` rows of every expert are
//! `ffn_gate_exps` `[d, I, E]` and whose last `I` rows are `ffn_up_exps`.

use crate::layout::{router_bias, TensorSpec};

/// How a ds4 tensor is read from the checkpoint.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Source {
    /// One checkpoint tensor, bytes in order; `shape` is its expected torch shape.
    Whole { tensor: String, shape: Vec<u64> },
    /// One half of every expert's rows of `gate_up_proj` `[E, 2I, d]` (`upper`: the up half).
    ExpertHalf {
        tensor: String,
        shape: Vec<u64>,
        upper: bool,
    },
}

impl Source {
    pub fn tensor(&self) -> &str {
        match self {
            Source::Whole { tensor, .. } | Source::ExpertHalf { tensor, .. } => tensor,
        }
    }

    pub fn shape(&self) -> &[u64] {
        match self {
            Source::Whole { shape, .. } | Source::ExpertHalf { shape, .. } => shape,
        }
    }
}

/// The checkpoint name of a ds4 layer tensor stem.
fn layer_source(stem: &str) -> Option<&'static str> {
    Some(match stem {
        "hc_attn_fn" => "attn_hc.fn",
        "hc_attn_scale" => "attn_hc.scale",
        "hc_attn_base" => "attn_hc.base",
        "hc_ffn_fn" => "ffn_hc.fn",
        "hc_ffn_scale" => "ffn_hc.scale",
        "hc_ffn_base" => "ffn_hc.base",
        "attn_norm" => "input_layernorm.weight",
        "ffn_norm" => "post_attention_layernorm.weight",
        "attn_q_a" => "self_attn.q_a_proj.weight",
        "attn_q_a_norm" => "self_attn.q_a_norm.weight",
        "attn_q_b" => "self_attn.q_b_proj.weight",
        "attn_kv" => "self_attn.kv_proj.weight",
        "attn_kv_a_norm" => "self_attn.kv_norm.weight",
        "attn_sinks" => "self_attn.sinks",
        "attn_output_a" => "self_attn.o_a_proj.weight",
        "attn_output_b" => "self_attn.o_b_proj.weight",
        "attn_compressor_ape" => "self_attn.compressor.position_bias",
        "attn_compressor_kv" => "self_attn.compressor.kv_proj.weight",
        "attn_compressor_gate" => "self_attn.compressor.gate_proj.weight",
        "attn_compressor_norm" => "self_attn.compressor.kv_norm.weight",
        "indexer.attn_q_b" => "self_attn.compressor.indexer.q_b_proj.weight",
        "indexer.proj" => "self_attn.compressor.indexer.scorer.weights_proj.weight",
        "indexer_compressor_ape" => "self_attn.compressor.indexer.position_bias",
        "indexer_compressor_kv" => "self_attn.compressor.indexer.kv_proj.weight",
        "indexer_compressor_gate" => "self_attn.compressor.indexer.gate_proj.weight",
        "indexer_compressor_norm" => "self_attn.compressor.indexer.kv_norm.weight",
        "ffn_gate_inp" => "mlp.gate.weight",
        "ffn_gate_tid2eid" => "mlp.gate.tid2eid",
        "ffn_down_exps" => "mlp.experts.down_proj",
        "ffn_gate_shexp" => "mlp.shared_experts.gate_proj.weight",
        "ffn_up_shexp" => "mlp.shared_experts.up_proj.weight",
        "ffn_down_shexp" => "mlp.shared_experts.down_proj.weight",
        _ => return None,
    })
}

fn reversed(dims: &[u64]) -> Vec<u64> {
    dims.iter().rev().copied().collect()
}

/// The source of `spec`; `tied`: the lm head is the embedding. `None` for a ds4 tensor the
/// checkpoint cannot have (a bug in the layout table).
pub fn source_of(spec: &TensorSpec, tied: bool) -> Option<Source> {
    let whole = |tensor: &str| Source::Whole {
        tensor: tensor.to_string(),
        shape: reversed(&spec.dims),
    };
    let global = match spec.name.as_str() {
        "token_embd.weight" => Some("model.embed_tokens.weight"),
        "output_hc_base.weight" => Some("model.hc_head.hc_base"),
        "output_hc_fn.weight" => Some("model.hc_head.hc_fn"),
        "output_hc_scale.weight" => Some("model.hc_head.hc_scale"),
        "output_norm.weight" => Some("model.norm.weight"),
        "output.weight" if tied => Some("model.embed_tokens.weight"),
        "output.weight" => Some("lm_head.weight"),
        _ => None,
    };
    if let Some(t) = global {
        return Some(whole(t));
    }
    let rest = spec.name.strip_prefix("blk.")?;
    let (layer, rest) = rest.split_once('.')?;
    let layer: usize = layer.parse().ok()?;
    let prefix = format!("model.layers.{layer}.");
    if spec.name == router_bias(layer) {
        return Some(whole(&format!("{prefix}mlp.gate.e_score_correction_bias")));
    }
    let stem = rest.strip_suffix(".weight")?;
    if let Some(upper) = match stem {
        "ffn_gate_exps" => Some(false),
        "ffn_up_exps" => Some(true),
        _ => None,
    } {
        // GGUF [d, I, E] of each half; the fused tensor is [E, 2I, d].
        let (d, i, e) = (spec.dims[0], spec.dims[1], spec.dims[2]);
        return Some(Source::ExpertHalf {
            tensor: format!("{prefix}mlp.experts.gate_up_proj"),
            shape: vec![e, 2 * i, d],
            upper,
        });
    }
    layer_source(stem).map(|s| whole(&format!("{prefix}{s}")))
}

/// The element ranges `(start, len)` of the checkpoint tensor that make up `src`'s GGUF tensor,
/// in GGUF order: each a whole number of GGUF rows of `row_len` elements and, when a row fits,
/// at most `max_elems` long (so a tensor converts a bounded chunk at a time).
pub fn segments(src: &Source, row_len: usize, max_elems: usize) -> Vec<(usize, usize)> {
    let chunk = (max_elems / row_len.max(1)).max(1) * row_len.max(1);
    let split = |start: usize, len: usize, out: &mut Vec<(usize, usize)>| {
        let mut at = 0;
        while at < len {
            let n = chunk.min(len - at);
            out.push((start + at, n));
            at += n;
        }
    };
    let mut out = Vec::new();
    match src {
        Source::Whole { shape, .. } => {
            split(0, shape.iter().product::<u64>() as usize, &mut out);
        }
        Source::ExpertHalf { shape, upper, .. } => {
            let (e, two_i, d) = (shape[0] as usize, shape[1] as usize, shape[2] as usize);
            let half = two_i / 2 * d;
            for expert in 0..e {
                let start = expert * two_i * d + if *upper { half } else { 0 };
                split(start, half, &mut out);
            }
        }
    }
    out
}

/// Reads `src`'s elements in GGUF order from the checkpoint tensor's values (torch order).
pub fn gather<T: Copy>(src: &Source, values: &[T]) -> Vec<T> {
    match src {
        Source::Whole { .. } => values.to_vec(),
        Source::ExpertHalf { shape, upper, .. } => {
            let (e, two_i, d) = (shape[0] as usize, shape[1] as usize, shape[2] as usize);
            let half = two_i / 2 * d;
            let start = if *upper { half } else { 0 };
            let mut out = Vec::with_capacity(e * half);
            for expert in values.chunks_exact(two_i * d).take(e) {
                out.extend_from_slice(&expert[start..start + half]);
            }
            out
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn segments_cover_the_gguf_order_in_whole_rows() {
        let whole = Source::Whole {
            tensor: "t".into(),
            shape: vec![5, 4],
        };
        assert_eq!(segments(&whole, 4, 9), vec![(0, 8), (8, 8), (16, 4)]);
        assert_eq!(
            segments(&whole, 4, 1),
            vec![(0, 4), (4, 4), (8, 4), (12, 4), (16, 4)]
        );
        // gate_up [E=2, 2I=4, d=3]: the gate half is rows 0..2 of each expert.
        let gate = Source::ExpertHalf {
            tensor: "t".into(),
            shape: vec![2, 4, 3],
            upper: false,
        };
        let up = Source::ExpertHalf {
            tensor: "t".into(),
            shape: vec![2, 4, 3],
            upper: true,
        };
        assert_eq!(segments(&gate, 3, 100), vec![(0, 6), (12, 6)]);
        assert_eq!(segments(&up, 3, 3), vec![(6, 3), (9, 3), (18, 3), (21, 3)]);
        let values: Vec<u32> = (0..24).collect();
        let gathered: Vec<u32> = segments(&up, 3, 100)
            .into_iter()
            .flat_map(|(s, n)| values[s..s + n].to_vec())
            .collect();
        assert_eq!(gathered, gather(&up, &values));
    }
}
