//! Checkpoint tensor names → transformers' module names.
//!
//! A directory may hold DeepSeek's original names (the Hub checkpoints, and what
//! `save_pretrained` writes by default: `layers.0.attn.wq_a.weight`, one tensor per routed
//! expert) or transformers' own module names (`save_original_format=False`). Both are mapped to
//! the module names, with the renames transformers 5.23 applies when loading DeepSeek V4
//! (`conversion_mapping.py`, "deepseek_v4"): every rule in order, each replacing its first
//! match; then per-expert `w1`/`w3` are stacked into `gate_up_proj` (gate rows first) and `w2`
//! into `down_proj`.

use std::collections::BTreeMap;

use super::safetensors_dir::SourceDir;
use super::ConvertError;

/// A checkpoint directory seen through transformers' module names.
pub struct Checkpoint {
    pub dir: SourceDir,
    /// Module name → the stored tensors it concatenates (one, or the stacked experts).
    modules: BTreeMap<String, Vec<String>>,
}

impl Checkpoint {
    pub fn new(dir: SourceDir) -> Result<Checkpoint, ConvertError> {
        let modules = module_names(dir.names())?;
        Ok(Checkpoint { dir, modules })
    }

    /// The stored tensors behind a module name.
    pub fn stored(&self, module: &str) -> Option<&[String]> {
        self.modules.get(module).map(|v| v.as_slice())
    }

    /// The torch shape of a module tensor (stacked experts: `[E, 2I, d]` / `[E, d, I]`); an
    /// error when stacked parts disagree in shape or dtype.
    pub fn shape(&self, module: &str) -> Result<Option<Vec<u64>>, ConvertError> {
        let Some(parts) = self.stored(module) else {
            return Ok(None);
        };
        let first = self.dir.get(&parts[0]).expect("listed by the directory");
        let shape: Vec<u64> = first.shape.iter().map(|&x| x as u64).collect();
        if parts.len() == 1 {
            return Ok(Some(shape));
        }
        for p in &parts[1..] {
            let t = self.dir.get(p).expect("listed by the directory");
            if t.shape != first.shape || t.dtype != first.dtype {
                return Err(ConvertError::Shape {
                    name: p.clone(),
                    expected: shape.clone(),
                    found: t.shape.iter().map(|&x| x as u64).collect(),
                });
            }
        }
        let n = parts.len() as u64;
        Ok(Some(if module.ends_with(".gate_up_proj") {
            // Pairs of (w1, w3) per expert, each [I, d].
            let mut s = vec![n / 2, 2 * shape[0]];
            s.extend(&shape[1..]);
            s
        } else {
            let mut s = vec![n];
            s.extend(&shape);
            s
        }))
    }

    /// Elements `[start, start + len)` of a module tensor (torch order) as f32; a range may
    /// span several stacked parts.
    pub fn f32_range(
        &self,
        module: &str,
        mut start: usize,
        mut len: usize,
    ) -> Result<Vec<f32>, ConvertError> {
        let mut out = Vec::with_capacity(len);
        for p in self.parts(module)? {
            if len == 0 {
                break;
            }
            let n = self.dir.n_elements(p)?;
            if start >= n {
                start -= n;
                continue;
            }
            let take = len.min(n - start);
            out.extend(self.dir.f32_range(p, start, take)?);
            start = 0;
            len -= take;
        }
        if len > 0 {
            return Err(ConvertError::BadValue {
                name: module.to_string(),
                msg: "read past the end of the tensor".into(),
            });
        }
        Ok(out)
    }

    /// The module tensor's values as i64, in torch order.
    pub fn to_i64(&self, module: &str) -> Result<Vec<i64>, ConvertError> {
        let mut out = Vec::new();
        for p in self.parts(module)? {
            out.extend(self.dir.to_i64(p)?);
        }
        Ok(out)
    }

    fn parts(&self, module: &str) -> Result<&[String], ConvertError> {
        self.stored(module)
            .ok_or_else(|| ConvertError::MissingTensor {
                name: module.to_string(),
                needed_for: String::new(),
            })
    }
}

/// The loading renames, in transformers' order. `^` anchors a rule at the start of the name.
const RENAMES: &[(&str, &str)] = &[
    (".attn.", ".self_attn."),
    (".ffn.", ".mlp."),
    (".indexer.compressor.", ".compressor.indexer."),
    ("^embed.weight", "embed_tokens.weight"),
    ("^head.weight", "lm_head.weight"),
    ("^hc_head_fn", "hc_head.hc_fn"),
    ("^hc_head_base", "hc_head.hc_base"),
    ("^hc_head_scale", "hc_head.hc_scale"),
    (".attn_norm.", ".input_layernorm."),
    (".ffn_norm.", ".post_attention_layernorm."),
    (".hc_attn_fn", ".attn_hc.fn"),
    (".hc_attn_base", ".attn_hc.base"),
    (".hc_attn_scale", ".attn_hc.scale"),
    (".hc_ffn_fn", ".ffn_hc.fn"),
    (".hc_ffn_base", ".ffn_hc.base"),
    (".hc_ffn_scale", ".ffn_hc.scale"),
    (".attn_sink", ".sinks"),
    (
        ".indexer.weights_proj.",
        ".compressor.indexer.scorer.weights_proj.",
    ),
    (".indexer.wq_b.", ".compressor.indexer.q_b_proj."),
    (".norm.", ".kv_norm."),
    (".ape", ".position_bias"),
    (".wq_a.", ".q_a_proj."),
    (".self_attn.wq_b.", ".self_attn.q_b_proj."),
    (".wkv.", ".kv_proj."),
    (".wgate.", ".gate_proj."),
    (".wo_a.", ".o_a_proj."),
    (".wo_b.", ".o_b_proj."),
    (".q_norm.", ".q_a_norm."),
    (".gate.bias", ".gate.e_score_correction_bias"),
    (".shared_experts.w1.", ".shared_experts.gate_proj."),
    (".shared_experts.w2.", ".shared_experts.down_proj."),
    (".shared_experts.w3.", ".shared_experts.up_proj."),
];

fn rename(name: &str) -> String {
    let mut key = name.strip_prefix("model.").unwrap_or(name).to_string();
    for (from, to) in RENAMES {
        match from.strip_prefix('^') {
            Some(anchored) => {
                if let Some(rest) = key.strip_prefix(anchored) {
                    key = format!("{to}{rest}");
                }
            }
            None => {
                if let Some(i) = key.find(from) {
                    key.replace_range(i..i + from.len(), to);
                }
            }
        }
    }
    if key.starts_with("lm_head.") {
        key
    } else {
        format!("model.{key}")
    }
}

/// `model.layers.{layer}.mlp.experts.{expert}.w{1,2,3}.weight` → (prefix up to `experts`,
/// expert, projection).
fn per_expert(key: &str) -> Option<(&str, usize, u8)> {
    let i = key.find(".mlp.experts.")?;
    let (prefix, rest) = key.split_at(i + ".mlp.experts".len());
    let rest = rest.strip_prefix('.')?;
    let (expert, leaf) = rest.split_once('.')?;
    let w = match leaf {
        "w1.weight" => 1,
        "w2.weight" => 2,
        "w3.weight" => 3,
        _ => return None,
    };
    Some((prefix, expert.parse().ok()?, w))
}

/// Maps every stored name to a module name. A module tensor is one stored tensor, or the
/// concatenation (in order) of several (stacked experts).
fn module_names<'a>(
    stored: impl Iterator<Item = &'a str>,
) -> Result<BTreeMap<String, Vec<String>>, ConvertError> {
    let mut out: BTreeMap<String, Vec<String>> = BTreeMap::new();
    // prefix → projection (1, 2, 3) → expert → stored name
    let mut experts: BTreeMap<String, BTreeMap<u8, BTreeMap<usize, String>>> = BTreeMap::new();
    for name in stored {
        let key = rename(name);
        if let Some((prefix, e, w)) = per_expert(&key) {
            experts
                .entry(prefix.to_string())
                .or_default()
                .entry(w)
                .or_default()
                .insert(e, name.to_string());
            continue;
        }
        if let Some(prev) = out.insert(key.clone(), vec![name.to_string()]) {
            return Err(ConvertError::Config(format!(
                "checkpoint tensors {} and {name} both mean {key}",
                prev[0]
            )));
        }
    }
    for (prefix, by_w) in experts {
        let complete = |w: u8| -> Result<Vec<String>, ConvertError> {
            let m = by_w.get(&w).cloned().unwrap_or_default();
            // Experts 0..n, each present once.
            for (i, e) in m.keys().enumerate() {
                if *e != i {
                    return Err(ConvertError::MissingTensor {
                        name: format!("{prefix}.{i}.w{w}.weight"),
                        needed_for: " (the routed experts are numbered from 0 without gaps)".into(),
                    });
                }
            }
            Ok(m.into_values().collect())
        };
        let (w1, w2, w3) = (complete(1)?, complete(2)?, complete(3)?);
        if w1.len() != w3.len() {
            return Err(ConvertError::MissingTensor {
                name: format!("{prefix}.{}.w3.weight", w3.len().min(w1.len())),
                needed_for: " (every expert needs w1 and w3)".into(),
            });
        }
        // gate_up_proj [E, 2I, d]: expert e's gate rows (w1) then its up rows (w3).
        let gate_up = w1
            .into_iter()
            .zip(w3)
            .flat_map(|(g, u)| [g, u])
            .collect::<Vec<_>>();
        if !gate_up.is_empty() {
            out.insert(format!("{prefix}.gate_up_proj"), gate_up);
        }
        if !w2.is_empty() {
            out.insert(format!("{prefix}.down_proj"), w2);
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::rename;

    #[test]
    fn original_names_map_to_module_names() {
        for (orig, module) in [
            ("embed.weight", "model.embed_tokens.weight"),
            ("head.weight", "lm_head.weight"),
            ("hc_head_fn", "model.hc_head.hc_fn"),
            ("norm.weight", "model.norm.weight"),
            (
                "layers.3.attn.kv_norm.weight",
                "model.layers.3.self_attn.kv_norm.weight",
            ),
            (
                "model.layers.3.attn.norm.weight",
                "model.layers.3.self_attn.kv_norm.weight",
            ),
            (
                "layers.3.attn_norm.weight",
                "model.layers.3.input_layernorm.weight",
            ),
            ("layers.3.hc_ffn_base", "model.layers.3.ffn_hc.base"),
            ("layers.3.attn.attn_sink", "model.layers.3.self_attn.sinks"),
            (
                "layers.3.attn.wq_b.weight",
                "model.layers.3.self_attn.q_b_proj.weight",
            ),
            (
                "layers.2.attn.indexer.wq_b.weight",
                "model.layers.2.self_attn.compressor.indexer.q_b_proj.weight",
            ),
            (
                "layers.2.attn.indexer.compressor.norm.weight",
                "model.layers.2.self_attn.compressor.indexer.kv_norm.weight",
            ),
            (
                "layers.2.attn.indexer.compressor.ape",
                "model.layers.2.self_attn.compressor.indexer.position_bias",
            ),
            (
                "layers.2.attn.indexer.weights_proj.weight",
                "model.layers.2.self_attn.compressor.indexer.scorer.weights_proj.weight",
            ),
            (
                "layers.2.attn.compressor.wgate.weight",
                "model.layers.2.self_attn.compressor.gate_proj.weight",
            ),
            (
                "layers.5.ffn.gate.bias",
                "model.layers.5.mlp.gate.e_score_correction_bias",
            ),
            (
                "layers.0.ffn.gate.tid2eid",
                "model.layers.0.mlp.gate.tid2eid",
            ),
            (
                "layers.0.ffn.shared_experts.w2.weight",
                "model.layers.0.mlp.shared_experts.down_proj.weight",
            ),
            (
                "layers.0.ffn.experts.7.w3.weight",
                "model.layers.0.mlp.experts.7.w3.weight",
            ),
            // Module names are fixed points.
            (
                "model.layers.2.self_attn.compressor.indexer.kv_norm.weight",
                "model.layers.2.self_attn.compressor.indexer.kv_norm.weight",
            ),
            ("model.embed_tokens.weight", "model.embed_tokens.weight"),
            ("lm_head.weight", "lm_head.weight"),
        ] {
            assert_eq!(rename(orig), module, "{orig}");
        }
    }
}
