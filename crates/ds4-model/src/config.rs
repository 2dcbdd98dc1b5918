//! The model description, read from GGUF metadata.
//!
//! Nothing here is hard-coded to DeepSeek V4 Flash: every dimension comes from the file's
//! `deepseek4.*` keys (ds4's names and types), so the tiny test models load through the same
//! path as the real one. `is_flash` tells whether a description equals the real model.

use ds4_gguf::metadata::MetaValue;
use ds4_gguf::reader::GgufFile;

/// The attention flavour of one layer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AttnKind {
    /// Sliding window only (compress ratio 0).
    Sliding,
    /// Compressed sparse attention: overlapping compressor windows plus the lightning indexer.
    Csa,
    /// Heavily compressed attention: non-overlapping windows, every row visible.
    Hca,
}

/// How a layer's tokens pick their routed experts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MoeKind {
    /// Fixed experts per token id (`ffn_gate_tid2eid`).
    Hash,
    /// Top-k of the biased router scores.
    TopK,
}

/// YaRN frequency scaling (DeepSeek V4 uses it on compressed layers only, attention factor 1).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Yarn {
    pub factor: f32,
    pub original_ctx: u32,
    pub beta_fast: f32,
    pub beta_slow: f32,
}

#[derive(Clone, Copy, Debug, PartialEq)]
pub struct RopeParams {
    pub theta: f32,
    pub yarn: Option<Yarn>,
}

#[derive(Clone, Debug, PartialEq)]
pub struct ModelConfig {
    pub vocab_size: usize,
    pub hidden: usize,
    pub n_layers: usize,
    pub n_heads: usize,
    pub head_dim: usize,
    /// Width of the rotated tail of each head (and of each indexer head).
    pub rope_dim: usize,
    pub q_lora_rank: usize,
    pub o_groups: usize,
    pub o_lora_rank: usize,
    pub n_experts: usize,
    pub n_experts_used: usize,
    pub expert_ff: usize,
    pub routed_scale: f32,
    /// SwiGLU clamp per layer (routed and shared experts alike).
    pub swiglu_clamp: Vec<f32>,
    pub sliding_window: usize,
    /// Per layer: 0 for sliding layers, else the layer's compression rate.
    pub compress_ratio: Vec<u32>,
    pub attn_kind: Vec<AttnKind>,
    pub moe_kind: Vec<MoeKind>,
    pub index_heads: usize,
    pub index_head_dim: usize,
    pub index_topk: usize,
    pub hc_mult: usize,
    pub hc_sinkhorn_iters: usize,
    pub hc_eps: f32,
    pub rms_eps: f32,
    /// RoPE of sliding layers.
    pub rope_main: RopeParams,
    /// RoPE of CSA/HCA layers (compress theta plus YaRN).
    pub rope_compress: RopeParams,
}

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum ConfigError {
    #[error("metadata key '{0}' is missing")]
    Missing(String),
    #[error("metadata key '{key}' has the wrong type or value: expected {expected}")]
    BadValue { key: String, expected: &'static str },
    #[error("invalid model description: {0}")]
    Invalid(String),
}

/// The compress ratio that marks a CSA layer (ds4's rule; true of every fixture model too).
pub const CSA_RATIO: u32 = 4;

const ARCH: &str = "deepseek4";

fn key(name: &str) -> String {
    format!("{ARCH}.{name}")
}

fn get<'a>(file: &'a GgufFile, name: &str) -> Result<&'a MetaValue, ConfigError> {
    let k = key(name);
    file.get(&k).ok_or(ConfigError::Missing(k))
}

fn get_usize(file: &GgufFile, name: &str) -> Result<usize, ConfigError> {
    get(file, name)?
        .as_u64_lossless()
        .and_then(|v| usize::try_from(v).ok())
        .ok_or(ConfigError::BadValue {
            key: key(name),
            expected: "a non-negative integer",
        })
}

fn get_f32(file: &GgufFile, name: &str) -> Result<f32, ConfigError> {
    get(file, name)?
        .as_f64()
        .map(|v| v as f32)
        .ok_or(ConfigError::BadValue {
            key: key(name),
            expected: "a number",
        })
}

fn opt_f32(file: &GgufFile, name: &str) -> Result<Option<f32>, ConfigError> {
    match file.get(&key(name)) {
        None => Ok(None),
        Some(_) => get_f32(file, name).map(Some),
    }
}

fn get_f32_array(file: &GgufFile, name: &str) -> Result<Vec<f32>, ConfigError> {
    get(file, name)?
        .as_f32_array()
        .ok_or(ConfigError::BadValue {
            key: key(name),
            expected: "an array of numbers",
        })
}

fn get_u32_array(file: &GgufFile, name: &str) -> Result<Vec<u32>, ConfigError> {
    get(file, name)?
        .as_u32_array()
        .ok_or(ConfigError::BadValue {
            key: key(name),
            expected: "an array of non-negative integers",
        })
}

impl ModelConfig {
    /// Reads the description from a GGUF file's `deepseek4.*` metadata and checks that it is
    /// internally consistent (shapes that the forward pass relies on divide evenly, etc.).
    pub fn from_gguf(file: &GgufFile) -> Result<ModelConfig, ConfigError> {
        match file.get("general.architecture").and_then(|v| v.as_str()) {
            Some(ARCH) => {}
            Some(other) => {
                return Err(ConfigError::Invalid(format!(
                    "general.architecture is '{other}', expected '{ARCH}'"
                )))
            }
            None => return Err(ConfigError::Missing("general.architecture".into())),
        }
        let n_layers = get_usize(file, "block_count")?;
        let ratios = get_u32_array(file, "attention.compress_ratios")?;
        if ratios.len() < n_layers {
            return Err(ConfigError::Invalid(format!(
                "{} has {} entries for {n_layers} layers",
                key("attention.compress_ratios"),
                ratios.len()
            )));
        }
        // ds4's files carry one more entry (the MTP layer); only the first n_layers count.
        let compress_ratio = ratios[..n_layers].to_vec();
        let attn_kind = compress_ratio
            .iter()
            .map(|&r| match r {
                0 => AttnKind::Sliding,
                CSA_RATIO => AttnKind::Csa,
                _ => AttnKind::Hca,
            })
            .collect();
        let n_hash = get_usize(file, "hash_layer_count")?;
        let moe_kind = (0..n_layers)
            .map(|l| {
                if l < n_hash {
                    MoeKind::Hash
                } else {
                    MoeKind::TopK
                }
            })
            .collect();
        let clamp = get_f32_array(file, "swiglu_clamp_exp")?;
        if clamp.len() < n_layers {
            return Err(ConfigError::Invalid(format!(
                "{} has {} entries for {n_layers} layers",
                key("swiglu_clamp_exp"),
                clamp.len()
            )));
        }
        let yarn = match opt_f32(file, "rope.scaling.factor")? {
            Some(factor) if factor != 1.0 => Some(Yarn {
                factor,
                original_ctx: get_usize(file, "rope.scaling.original_context_length")? as u32,
                beta_fast: get_f32(file, "rope.scaling.yarn_beta_fast")?,
                beta_slow: get_f32(file, "rope.scaling.yarn_beta_slow")?,
            }),
            _ => None,
        };
        let vocab_size = match file.get(&key("vocab_size")) {
            Some(_) => get_usize(file, "vocab_size")?,
            // Some GGUF writers omit it; the embedding's row count is the vocabulary.
            None => file
                .tensor("token_embd.weight")
                .and_then(|t| t.dims.get(1).copied())
                .map(|v| v as usize)
                .ok_or(ConfigError::Missing(key("vocab_size")))?,
        };
        let cfg = ModelConfig {
            vocab_size,
            hidden: get_usize(file, "embedding_length")?,
            n_layers,
            n_heads: get_usize(file, "attention.head_count")?,
            head_dim: get_usize(file, "attention.key_length")?,
            rope_dim: get_usize(file, "rope.dimension_count")?,
            q_lora_rank: get_usize(file, "attention.q_lora_rank")?,
            o_groups: get_usize(file, "attention.output_group_count")?,
            o_lora_rank: get_usize(file, "attention.output_lora_rank")?,
            n_experts: get_usize(file, "expert_count")?,
            n_experts_used: get_usize(file, "expert_used_count")?,
            expert_ff: get_usize(file, "expert_feed_forward_length")?,
            routed_scale: get_f32(file, "expert_weights_scale")?,
            swiglu_clamp: clamp[..n_layers].to_vec(),
            sliding_window: get_usize(file, "attention.sliding_window")?,
            compress_ratio,
            attn_kind,
            moe_kind,
            index_heads: get_usize(file, "attention.indexer.head_count")?,
            index_head_dim: get_usize(file, "attention.indexer.key_length")?,
            index_topk: get_usize(file, "attention.indexer.top_k")?,
            hc_mult: get_usize(file, "hyper_connection.count")?,
            hc_sinkhorn_iters: get_usize(file, "hyper_connection.sinkhorn_iterations")?,
            hc_eps: get_f32(file, "hyper_connection.epsilon")?,
            rms_eps: get_f32(file, "attention.layer_norm_rms_epsilon")?,
            rope_main: RopeParams {
                theta: get_f32(file, "rope.freq_base")?,
                yarn: None,
            },
            rope_compress: RopeParams {
                theta: get_f32(file, "attention.compress_rope_freq_base")?,
                yarn,
            },
        };
        cfg.validate()?;
        Ok(cfg)
    }

    /// Checks the relations between dimensions that the forward pass depends on.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let fail = |m: String| Err(ConfigError::Invalid(m));
        let positive = [
            ("vocab_size", self.vocab_size),
            ("embedding_length", self.hidden),
            ("block_count", self.n_layers),
            ("attention.head_count", self.n_heads),
            ("attention.key_length", self.head_dim),
            ("attention.q_lora_rank", self.q_lora_rank),
            ("attention.output_group_count", self.o_groups),
            ("attention.output_lora_rank", self.o_lora_rank),
            ("expert_count", self.n_experts),
            ("expert_used_count", self.n_experts_used),
            ("expert_feed_forward_length", self.expert_ff),
            ("attention.sliding_window", self.sliding_window),
            ("hyper_connection.count", self.hc_mult),
            (
                "hyper_connection.sinkhorn_iterations",
                self.hc_sinkhorn_iters,
            ),
        ];
        for (name, v) in positive {
            if v == 0 {
                return fail(format!("{} must be positive", key(name)));
            }
        }
        // Bound every size so that products below cannot overflow and no allocation is
        // absurd: Flash's largest values are far inside these.
        if self.hidden > 1 << 16
            || self.head_dim > 1 << 14
            || self.n_heads > 1 << 12
            || self.vocab_size > 1 << 24
            || self.n_layers > 1 << 10
            || self.n_experts > 1 << 14
            || self.expert_ff > 1 << 17
            || self.hc_mult > 64
            || self.index_heads > 1 << 12
            || self.index_head_dim > 1 << 14
            || self.q_lora_rank > 1 << 17
            || self.o_lora_rank > 1 << 17
            || self.sliding_window > 1 << 20
        {
            return fail("a dimension is implausibly large".into());
        }
        if !self.rope_dim.is_multiple_of(2) || self.rope_dim > self.head_dim {
            return fail(format!(
                "rope.dimension_count {} must be even and at most key_length {}",
                self.rope_dim, self.head_dim
            ));
        }
        if !self.n_heads.is_multiple_of(self.o_groups) {
            return fail(format!(
                "head_count {} is not a multiple of output_group_count {}",
                self.n_heads, self.o_groups
            ));
        }
        if self.n_experts_used > self.n_experts {
            return fail("expert_used_count exceeds expert_count".into());
        }
        if self.attn_kind.contains(&AttnKind::Csa) {
            if self.index_heads == 0 || self.index_head_dim == 0 || self.index_topk == 0 {
                return fail("CSA layers need indexer heads, key length and top_k".into());
            }
            if self.rope_dim > self.index_head_dim {
                return fail("rope.dimension_count exceeds attention.indexer.key_length".into());
            }
        }
        if let Some(&r) = self.compress_ratio.iter().find(|&&r| r > 1 << 16) {
            return fail(format!("compress ratio {r} is implausibly large"));
        }
        Ok(())
    }

    pub fn is_csa(&self, layer: usize) -> bool {
        self.attn_kind[layer] == AttnKind::Csa
    }

    /// The RoPE parameters a layer uses.
    pub fn rope_for_layer(&self, layer: usize) -> &RopeParams {
        match self.attn_kind[layer] {
            AttnKind::Sliding => &self.rope_main,
            AttnKind::Csa | AttnKind::Hca => &self.rope_compress,
        }
    }

    /// Whether this description is DeepSeek V4 Flash (ds4-spec §1 values and schedule).
    pub fn is_flash(&self) -> bool {
        let schedule_ok = self.n_layers == 43
            && self.compress_ratio.iter().enumerate().all(|(l, &r)| {
                r == match l {
                    0 | 1 => 0,
                    l if l % 2 == 0 => 4,
                    _ => 128,
                }
            });
        let yarn_ok = self.rope_compress.yarn
            == Some(Yarn {
                factor: 16.0,
                original_ctx: 65536,
                beta_fast: 32.0,
                beta_slow: 1.0,
            });
        schedule_ok
            && yarn_ok
            && self.vocab_size == 129280
            && self.hidden == 4096
            && self.n_heads == 64
            && self.head_dim == 512
            && self.rope_dim == 64
            && self.q_lora_rank == 1024
            && self.o_groups == 8
            && self.o_lora_rank == 1024
            && self.n_experts == 256
            && self.n_experts_used == 6
            && self.expert_ff == 2048
            && self
                .moe_kind
                .iter()
                .filter(|&&k| k == MoeKind::Hash)
                .count()
                == 3
            && self.sliding_window == 128
            && self.index_heads == 64
            && self.index_head_dim == 128
            && self.index_topk == 512
            && self.hc_mult == 4
            && self.hc_sinkhorn_iters == 20
            && self.swiglu_clamp.iter().all(|&c| c == 10.0)
            && self.rope_main.theta == 10000.0
            && self.rope_compress.theta == 160000.0
            && (self.routed_scale - 1.5).abs() < 1e-6
    }

    /// The DeepSeek V4 Flash description (for `synth` and tests).
    pub fn flash() -> ModelConfig {
        let n_layers = 43;
        let compress_ratio: Vec<u32> = (0..n_layers)
            .map(|l| match l {
                0 | 1 => 0,
                l if l % 2 == 0 => 4,
                _ => 128,
            })
            .collect();
        ModelConfig {
            vocab_size: 129280,
            hidden: 4096,
            n_layers,
            n_heads: 64,
            head_dim: 512,
            rope_dim: 64,
            q_lora_rank: 1024,
            o_groups: 8,
            o_lora_rank: 1024,
            n_experts: 256,
            n_experts_used: 6,
            expert_ff: 2048,
            routed_scale: 1.5,
            swiglu_clamp: vec![10.0; n_layers],
            sliding_window: 128,
            attn_kind: compress_ratio
                .iter()
                .map(|&r| match r {
                    0 => AttnKind::Sliding,
                    4 => AttnKind::Csa,
                    _ => AttnKind::Hca,
                })
                .collect(),
            compress_ratio,
            moe_kind: (0..n_layers)
                .map(|l| if l < 3 { MoeKind::Hash } else { MoeKind::TopK })
                .collect(),
            index_heads: 64,
            index_head_dim: 128,
            index_topk: 512,
            hc_mult: 4,
            hc_sinkhorn_iters: 20,
            hc_eps: 1e-6,
            rms_eps: 1e-6,
            rope_main: RopeParams {
                theta: 10000.0,
                yarn: None,
            },
            rope_compress: RopeParams {
                theta: 160000.0,
                yarn: Some(Yarn {
                    factor: 16.0,
                    original_ctx: 65536,
                    beta_fast: 32.0,
                    beta_slow: 1.0,
                }),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flash_description_is_flash_and_valid() {
        let f = ModelConfig::flash();
        assert!(f.is_flash());
        f.validate().unwrap();
        assert_eq!(
            f.attn_kind.iter().filter(|&&k| k == AttnKind::Csa).count(),
            21
        );
        assert_eq!(
            f.attn_kind.iter().filter(|&&k| k == AttnKind::Hca).count(),
            20
        );
    }

    #[test]
    fn inconsistent_descriptions_are_rejected() {
        let mut f = ModelConfig::flash();
        f.o_groups = 7;
        assert!(
            matches!(f.validate(), Err(ConfigError::Invalid(m)) if m.contains("output_group_count"))
        );
        let mut f = ModelConfig::flash();
        f.rope_dim = 63;
        assert!(f.validate().is_err());
        let mut f = ModelConfig::flash();
        f.hidden = 0;
        assert!(f.validate().is_err());
    }
}
