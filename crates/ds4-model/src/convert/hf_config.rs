//! transformers' `config.json` of a DeepseekV4ForCausalLM → [`ModelConfig`] and ds4's
//! `deepseek4.*` GGUF metadata (the reverse of `ModelConfig::from_gguf`).
//!
//! Missing fields take `DeepseekV4Config`'s defaults (the Flash values), like transformers does;
//! legacy spellings (`compress_ratios`, `compress_rate_csa/hca`, `num_hash_layers`,
//! `qk_rope_head_dim`, flat `rope_scaling`) are read as transformers reads them. Configurations
//! ds4's format cannot express are errors: a CSA rate other than 4 (ds4 keys CSA on ratio 4),
//! hash layers that are not a prefix, more than one shared expert, other scoring functions,
//! YaRN with an attention factor other than 1, quantized checkpoints.

use serde_json::Value;

use ds4_gguf::MetaValue;

use crate::config::{AttnKind, ModelConfig, MoeKind, RopeParams, Yarn, CSA_RATIO};

use super::ConvertError;

const CSA: &str = "compressed_sparse_attention";
const HCA: &str = "heavily_compressed_attention";
const SLIDING: &str = "sliding_attention";

/// What config.json says, in ds4's terms.
#[derive(Clone, Debug, PartialEq)]
pub struct HfModel {
    pub cfg: ModelConfig,
    /// `max_position_embeddings` (ds4's display-only `deepseek4.context_length`).
    pub context_length: u64,
    /// `tie_word_embeddings`: the lm head is the embedding.
    pub tied_embeddings: bool,
}

struct Fields<'a> {
    json: &'a serde_json::Map<String, Value>,
}

fn bad(key: &str, what: &str) -> ConvertError {
    ConvertError::Config(format!("config.json: '{key}' must be {what}"))
}

impl<'a> Fields<'a> {
    fn get(&self, key: &str) -> Option<&'a Value> {
        self.json.get(key).filter(|v| !v.is_null())
    }

    fn uint(&self, key: &str, default: u64) -> Result<u64, ConvertError> {
        match self.get(key) {
            None => Ok(default),
            Some(v) => v.as_u64().ok_or_else(|| bad(key, "a non-negative integer")),
        }
    }

    fn usize(&self, key: &str, default: u64) -> Result<usize, ConvertError> {
        usize::try_from(self.uint(key, default)?).map_err(|_| bad(key, "a smaller integer"))
    }

    fn float(&self, key: &str, default: f64) -> Result<f64, ConvertError> {
        match self.get(key) {
            None => Ok(default),
            Some(v) => v.as_f64().ok_or_else(|| bad(key, "a number")),
        }
    }

    fn boolean(&self, key: &str, default: bool) -> Result<bool, ConvertError> {
        match self.get(key) {
            None => Ok(default),
            Some(v) => v.as_bool().ok_or_else(|| bad(key, "true or false")),
        }
    }

    fn string(&self, key: &str, default: &'a str) -> Result<&'a str, ConvertError> {
        match self.get(key) {
            None => Ok(default),
            Some(v) => v.as_str().ok_or_else(|| bad(key, "a string")),
        }
    }
}

fn unsupported(msg: String) -> ConvertError {
    ConvertError::Unsupported(msg)
}

/// Parses config.json's object into ds4's model description.
pub fn parse_config(json: &Value) -> Result<HfModel, ConvertError> {
    let obj = json
        .as_object()
        .ok_or_else(|| ConvertError::Config("config.json is not a JSON object".into()))?;
    let f = Fields { json: obj };
    let model_type = f.string("model_type", "deepseek_v4")?;
    if model_type != "deepseek_v4" {
        return Err(unsupported(format!(
            "config.json: model_type is '{model_type}', convert handles 'deepseek_v4'"
        )));
    }
    if f.get("quantization_config").is_some() {
        return Err(unsupported(
            "config.json has a quantization_config (FP8/FP4 checkpoint); convert reads \
             unquantized float weights"
                .into(),
        ));
    }
    let n_layers = f.usize("num_hidden_layers", 43)?;
    let hidden = f.usize("hidden_size", 4096)?;
    let head_dim = f.usize("head_dim", 512)?;
    let n_heads = f.usize("num_attention_heads", 64)?;

    for (key, want) in [("num_key_value_heads", 1), ("n_shared_experts", 1)] {
        let v = f.uint(key, want)?;
        if v != want {
            return Err(unsupported(format!(
                "config.json: {key} is {v}; DeepSeek V4 (and ds4) has exactly {want}"
            )));
        }
    }
    for (key, want) in [("scoring_func", "sqrtsoftplus"), ("hidden_act", "silu")] {
        let v = f.string(key, want)?;
        if v != want {
            return Err(unsupported(format!(
                "config.json: {key} is '{v}'; ds4 implements '{want}' only"
            )));
        }
    }
    for key in ["attention_bias", "mlp_bias"] {
        if f.boolean(key, false)? {
            return Err(unsupported(format!(
                "config.json: {key} is true; ds4's layers have no biases"
            )));
        }
    }

    // Compression rates per attention type.
    let mut csa_rate = 4u64;
    let mut hca_rate = 128u64;
    if let Some(rates) = f.get("compress_rates") {
        let rates = rates
            .as_object()
            .ok_or_else(|| bad("compress_rates", "an object"))?;
        for (k, v) in rates {
            let r = v
                .as_u64()
                .ok_or_else(|| bad("compress_rates", "an object of integers"))?;
            match k.as_str() {
                CSA => csa_rate = r,
                HCA => hca_rate = r,
                other => {
                    return Err(unsupported(format!(
                        "config.json: unknown compress_rates key '{other}'"
                    )))
                }
            }
        }
    }
    csa_rate = f.uint("compress_rate_csa", csa_rate)?;
    hca_rate = f.uint("compress_rate_hca", hca_rate)?;

    // Attention schedule: layer_types, else legacy compress_ratios, else the transformers
    // default (which is V4-Pro's, not Flash's).
    let layer_types: Vec<String> = if let Some(v) = f.get("layer_types") {
        string_list(v, "layer_types")?
    } else if let Some(v) = f.get("compress_ratios") {
        let arr = v
            .as_array()
            .ok_or_else(|| bad("compress_ratios", "a list of integers"))?;
        arr.iter()
            .map(|r| match r.as_u64() {
                Some(0) => Ok(SLIDING.to_string()),
                Some(4) => Ok(CSA.to_string()),
                Some(128) => Ok(HCA.to_string()),
                _ => Err(bad("compress_ratios", "a list of 0, 4 and 128")),
            })
            .collect::<Result<_, _>>()?
    } else {
        (0..n_layers)
            .map(|i| match i {
                0 | 1 => HCA,
                _ if i % 2 == 1 => CSA,
                _ => HCA,
            })
            .map(String::from)
            .collect()
    };
    if layer_types.len() < n_layers {
        return Err(ConvertError::Config(format!(
            "config.json: {} attention layer types for {n_layers} layers",
            layer_types.len()
        )));
    }
    let mut compress_ratio = Vec::with_capacity(n_layers);
    let mut attn_kind = Vec::with_capacity(n_layers);
    for (i, t) in layer_types[..n_layers].iter().enumerate() {
        let (kind, ratio) = match t.as_str() {
            SLIDING => (AttnKind::Sliding, 0),
            CSA => (AttnKind::Csa, csa_rate),
            HCA => (AttnKind::Hca, hca_rate),
            other => {
                return Err(unsupported(format!(
                    "config.json: layer {i} has attention type '{other}'"
                )))
            }
        };
        attn_kind.push(kind);
        compress_ratio
            .push(u32::try_from(ratio).map_err(|_| bad("compress_rates", "a 32-bit integer"))?);
    }
    if attn_kind.contains(&AttnKind::Csa) && csa_rate != u64::from(CSA_RATIO) {
        return Err(unsupported(format!(
            "config.json: the CSA rate is {csa_rate}; ds4's format marks CSA layers by ratio \
             {CSA_RATIO}, so only {CSA_RATIO} can be expressed"
        )));
    }
    if attn_kind.contains(&AttnKind::Hca) && (hca_rate == 0 || hca_rate == u64::from(CSA_RATIO)) {
        return Err(unsupported(format!(
            "config.json: the HCA rate is {hca_rate}; ds4's format needs a rate other than 0 and \
             {CSA_RATIO} for HCA layers"
        )));
    }

    // MoE schedule: hash layers must be a prefix (ds4 stores only their count).
    let mlp_types: Vec<String> = match f.get("mlp_layer_types") {
        Some(v) => string_list(v, "mlp_layer_types")?,
        None => {
            let n_hash = f.usize("num_hash_layers", 3)?.min(n_layers);
            (0..n_layers)
                .map(|i| if i < n_hash { "hash_moe" } else { "moe" }.to_string())
                .collect()
        }
    };
    if mlp_types.len() < n_layers {
        return Err(ConvertError::Config(format!(
            "config.json: {} MLP layer types for {n_layers} layers",
            mlp_types.len()
        )));
    }
    let mut moe_kind = Vec::with_capacity(n_layers);
    for (i, t) in mlp_types[..n_layers].iter().enumerate() {
        let kind = match t.as_str() {
            "hash_moe" => MoeKind::Hash,
            "moe" => MoeKind::TopK,
            other => {
                return Err(unsupported(format!(
                    "config.json: layer {i} has MLP type '{other}'"
                )))
            }
        };
        if kind == MoeKind::Hash && i > 0 && moe_kind[i - 1] == MoeKind::TopK {
            return Err(unsupported(format!(
                "config.json: hash MoE layer {i} follows a top-k layer; ds4 stores hash layers \
                 as a prefix (deepseek4.hash_layer_count)"
            )));
        }
        moe_kind.push(kind);
    }

    // Rotary width: partial_rotary_factor · head_dim (transformers truncates), or the legacy
    // qk_rope_head_dim.
    let rope_dim = match f.get("partial_rotary_factor") {
        Some(v) => {
            let prf = v
                .as_f64()
                .ok_or_else(|| bad("partial_rotary_factor", "a number"))?;
            (head_dim as f64 * prf) as usize
        }
        None => f.usize("qk_rope_head_dim", (head_dim / 8) as u64)?,
    };

    let (rope_main, rope_compress) = parse_rope(&f)?;
    let swiglu_limit = f.float("swiglu_limit", 10.0)? as f32;
    let cfg = ModelConfig {
        vocab_size: f.usize("vocab_size", 129280)?,
        hidden,
        n_layers,
        n_heads,
        head_dim,
        rope_dim,
        q_lora_rank: f.usize("q_lora_rank", 1024)?,
        o_groups: f.usize("o_groups", 8)?,
        o_lora_rank: f.usize("o_lora_rank", 1024)?,
        n_experts: f.usize("n_routed_experts", 256)?,
        n_experts_used: f.usize("num_experts_per_tok", 6)?,
        expert_ff: f.usize("moe_intermediate_size", 2048)?,
        routed_scale: f.float("routed_scaling_factor", 1.5)? as f32,
        swiglu_clamp: vec![swiglu_limit; n_layers],
        sliding_window: f.usize("sliding_window", 128)?,
        compress_ratio,
        attn_kind,
        moe_kind,
        index_heads: f.usize("index_n_heads", 64)?,
        index_head_dim: f.usize("index_head_dim", 128)?,
        index_topk: f.usize("index_topk", 512)?,
        hc_mult: f.usize("hc_mult", 4)?,
        hc_sinkhorn_iters: f.usize("hc_sinkhorn_iters", 20)?,
        hc_eps: f.float("hc_eps", 1e-6)? as f32,
        rms_eps: f.float("rms_norm_eps", 1e-6)? as f32,
        rope_main,
        rope_compress,
    };
    check_shapes(&cfg)?;
    cfg.validate()
        .map_err(|e| ConvertError::Config(format!("config.json: {e}")))?;
    Ok(HfModel {
        cfg,
        context_length: f.uint("max_position_embeddings", 1 << 20)?,
        tied_embeddings: f.boolean("tie_word_embeddings", false)?,
    })
}

/// Relations the tensor shapes rely on, stated in config.json's terms.
fn check_shapes(cfg: &ModelConfig) -> Result<(), ConvertError> {
    let fail = |m: String| Err(ConvertError::Unsupported(format!("config.json: {m}")));
    if cfg.rope_dim == 0 || !cfg.rope_dim.is_multiple_of(2) || cfg.rope_dim > cfg.head_dim {
        return fail(format!(
            "the rotary width {} (head_dim·partial_rotary_factor) must be even, positive and at \
             most head_dim {}",
            cfg.rope_dim, cfg.head_dim
        ));
    }
    if cfg.attn_kind.contains(&AttnKind::Csa) && cfg.rope_dim > cfg.index_head_dim {
        return fail(format!(
            "the rotary width {} exceeds index_head_dim {}",
            cfg.rope_dim, cfg.index_head_dim
        ));
    }
    if cfg.o_groups == 0 || !cfg.n_heads.is_multiple_of(cfg.o_groups) {
        return fail(format!(
            "num_attention_heads {} is not a multiple of o_groups {}",
            cfg.n_heads, cfg.o_groups
        ));
    }
    if cfg.n_experts_used == 0 || cfg.n_experts_used > cfg.n_experts {
        return fail(format!(
            "num_experts_per_tok {} must be in 1..=n_routed_experts {}",
            cfg.n_experts_used, cfg.n_experts
        ));
    }
    Ok(())
}

fn string_list(v: &Value, key: &str) -> Result<Vec<String>, ConvertError> {
    v.as_array()
        .and_then(|a| {
            a.iter()
                .map(|x| x.as_str().map(String::from))
                .collect::<Option<Vec<_>>>()
        })
        .ok_or_else(|| bad(key, "a list of strings"))
}

/// The two RoPE tables: `main` (sliding layers) and `compress` (CSA/HCA, maybe YaRN).
fn parse_rope(f: &Fields) -> Result<(RopeParams, RopeParams), ConvertError> {
    let rope_theta = f.float("rope_theta", 10000.0)?;
    let compress_theta = f.float("compress_rope_theta", 160000.0)?;
    let max_pos = f.uint("max_position_embeddings", 1 << 20)?;
    let params = f.get("rope_parameters").or_else(|| f.get("rope_scaling"));
    let nested = params
        .and_then(|p| p.as_object())
        .filter(|p| p.contains_key("main") || p.contains_key("compress"));
    let (main, compress) = match nested {
        Some(p) => (p.get("main"), p.get("compress")),
        // Flat form: the YaRN keys apply to the compress table only.
        None => (None, params),
    };
    let main_theta = theta_of(main, rope_theta, "rope_parameters.main")?;
    if let Some(t) = rope_type(main)? {
        if t != "default" {
            return Err(unsupported(format!(
                "config.json: the main RoPE type is '{t}'; DeepSeek V4 uses plain RoPE there"
            )));
        }
    }
    let compress_theta = theta_of(compress, compress_theta, "rope_parameters.compress")?;
    let yarn = match rope_type(compress)?.as_deref() {
        None | Some("default") => None,
        Some("yarn") => {
            let c = compress.and_then(|c| c.as_object()).expect("has a type");
            let num = |k: &str| c.get(k).filter(|v| !v.is_null()).and_then(|v| v.as_f64());
            let factor = num("factor").ok_or_else(|| {
                bad(
                    "rope_parameters.compress.factor",
                    "a number (YaRN needs it)",
                )
            })?;
            if let Some(a) = num("attention_factor") {
                if a != 1.0 {
                    return Err(unsupported(format!(
                        "config.json: YaRN attention_factor {a}; DeepSeek V4 (and ds4) use 1"
                    )));
                }
            }
            if c.get("truncate").and_then(|v| v.as_bool()) == Some(false) {
                return Err(unsupported(
                    "config.json: YaRN with truncate=false (ds4 rounds the correction range)"
                        .into(),
                ));
            }
            // transformers' default for a missing original length is max_position_embeddings.
            let original = num("original_max_position_embeddings").unwrap_or(max_pos as f64);
            Some(Yarn {
                factor: factor as f32,
                original_ctx: original as u32,
                beta_fast: num("beta_fast").filter(|&b| b != 0.0).unwrap_or(32.0) as f32,
                beta_slow: num("beta_slow").filter(|&b| b != 0.0).unwrap_or(1.0) as f32,
            })
        }
        Some(other) => {
            return Err(unsupported(format!(
                "config.json: compress RoPE type '{other}' (ds4 implements default and yarn)"
            )))
        }
    };
    Ok((
        RopeParams {
            theta: main_theta as f32,
            yarn: None,
        },
        RopeParams {
            theta: compress_theta as f32,
            yarn,
        },
    ))
}

fn theta_of(table: Option<&Value>, default: f64, key: &str) -> Result<f64, ConvertError> {
    match table.and_then(|t| t.get("rope_theta")) {
        None | Some(Value::Null) => Ok(default),
        Some(v) => v
            .as_f64()
            .ok_or_else(|| bad(key, "an object with a numeric rope_theta")),
    }
}

fn rope_type(table: Option<&Value>) -> Result<Option<String>, ConvertError> {
    let Some(t) = table else { return Ok(None) };
    let t = t
        .as_object()
        .ok_or_else(|| bad("rope_parameters", "an object"))?;
    match t.get("rope_type").or_else(|| t.get("type")) {
        None | Some(Value::Null) => Ok(Some("default".into())),
        Some(v) => v
            .as_str()
            .map(|s| Some(s.to_string()))
            .ok_or_else(|| bad("rope_parameters.rope_type", "a string")),
    }
}

/// ds4's `deepseek4.*` metadata for `cfg`, with ds4's key names and types: integers UINT32,
/// `compress_ratios` an array of UINT32, `swiglu_clamp_exp` an array of FLOAT32. The
/// `rope.scaling.*` keys are written only when the compressed layers use YaRN.
pub fn model_metadata(m: &HfModel) -> Vec<(String, MetaValue)> {
    let cfg = &m.cfg;
    let u = |x: usize| MetaValue::U32(x as u32);
    let n_hash = cfg.moe_kind.iter().filter(|&&k| k == MoeKind::Hash).count();
    let mut out: Vec<(&str, MetaValue)> = vec![
        (
            "context_length",
            MetaValue::U32(m.context_length.min(u64::from(u32::MAX)) as u32),
        ),
        ("block_count", u(cfg.n_layers)),
        ("embedding_length", u(cfg.hidden)),
        ("vocab_size", u(cfg.vocab_size)),
        ("attention.head_count", u(cfg.n_heads)),
        ("attention.head_count_kv", u(1)),
        ("attention.key_length", u(cfg.head_dim)),
        ("attention.value_length", u(cfg.head_dim)),
        ("rope.dimension_count", u(cfg.rope_dim)),
        ("attention.q_lora_rank", u(cfg.q_lora_rank)),
        ("attention.output_lora_rank", u(cfg.o_lora_rank)),
        ("attention.output_group_count", u(cfg.o_groups)),
        ("expert_count", u(cfg.n_experts)),
        ("expert_used_count", u(cfg.n_experts_used)),
        ("expert_feed_forward_length", u(cfg.expert_ff)),
        ("expert_shared_count", u(1)),
        ("hash_layer_count", u(n_hash)),
        ("attention.sliding_window", u(cfg.sliding_window)),
        ("attention.indexer.head_count", u(cfg.index_heads)),
        ("attention.indexer.key_length", u(cfg.index_head_dim)),
        ("attention.indexer.top_k", u(cfg.index_topk)),
        ("hyper_connection.count", u(cfg.hc_mult)),
        (
            "hyper_connection.sinkhorn_iterations",
            u(cfg.hc_sinkhorn_iters),
        ),
        (
            "attention.compress_ratios",
            MetaValue::from(cfg.compress_ratio.clone()),
        ),
        (
            "swiglu_clamp_exp",
            MetaValue::from(cfg.swiglu_clamp.clone()),
        ),
        ("rope.freq_base", MetaValue::F32(cfg.rope_main.theta)),
        (
            "attention.compress_rope_freq_base",
            MetaValue::F32(cfg.rope_compress.theta),
        ),
        ("expert_weights_scale", MetaValue::F32(cfg.routed_scale)),
        ("expert_weights_norm", MetaValue::Bool(true)),
        (
            "attention.layer_norm_rms_epsilon",
            MetaValue::F32(cfg.rms_eps),
        ),
        ("hyper_connection.epsilon", MetaValue::F32(cfg.hc_eps)),
    ];
    if let Some(y) = cfg.rope_compress.yarn {
        out.push(("rope.scaling.type", MetaValue::from("yarn")));
        out.push(("rope.scaling.factor", MetaValue::F32(y.factor)));
        out.push((
            "rope.scaling.original_context_length",
            MetaValue::U32(y.original_ctx),
        ));
        out.push(("rope.scaling.yarn_beta_fast", MetaValue::F32(y.beta_fast)));
        out.push(("rope.scaling.yarn_beta_slow", MetaValue::F32(y.beta_slow)));
    }
    out.into_iter()
        .map(|(k, v)| (format!("deepseek4.{k}"), v))
        .collect()
}
