//! `ds4 convert` on the committed tiny reference models (tests/fixtures/models): every GGUF
//! tensor equals its transformers tensor after the documented layout change, the metadata equals
//! config.json, the layout check accepts the result and names exactly what a damaged file gets
//! wrong, quantized modes stay close, and bad checkpoints give the errors they should.
//!
//! The HF → ds4 name table and the layout change are written out again here, independently of
//! `ds4_model::convert::tensor_map`, from dsv4-arch.md §2.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use ds4_gguf::quant::dequantize;
use ds4_gguf::writer::GgufWriter;
use ds4_gguf::{GgmlType, GgufFile, MetaValue};
use ds4_model::config::ModelConfig;
use ds4_model::convert::{convert, convert_in_chunks, read_config, ConvertError, ConvertOptions};
use ds4_model::layout::{check_layout, expected_tensors, LayoutIssue, WeightsMode};
use half::f16;
use safetensors::{Dtype, SafeTensors};
use serde_json::Value;

/// Checkpoint tensors as stored: name → (dtype, shape, bytes).
type RawTensors = BTreeMap<String, (Dtype, Vec<usize>, Vec<u8>)>;

/// An edit of one tensor info: (name, dims) → (name, dims).
type InfoEdit = dyn Fn(&str, &[u64]) -> (String, Vec<u64>);

const MODELS: [&str; 4] = ["flash_mini", "ratios_real", "vocab_real", "sliding_only"];

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures")
}

fn model_dir(name: &str) -> PathBuf {
    fixtures().join("models").join(name)
}

/// A fresh scratch directory for one test.
fn scratch(tag: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("ds4-convert-test-{}-{tag}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn opts(weights: WeightsMode) -> ConvertOptions {
    ConvertOptions::new(weights)
}

fn convert_fixture(name: &str, weights: WeightsMode, tag: &str) -> (PathBuf, GgufFile) {
    let out = scratch(tag).join(format!("{name}.gguf"));
    convert(&model_dir(name), &out, &opts(weights)).unwrap_or_else(|e| panic!("{name}: {e}"));
    let file = GgufFile::open(&out).unwrap();
    (out, file)
}

/// A checkpoint tensor as f32 values (float) or i64 values (tid2eid), with its shape.
enum HfValues {
    Float(Vec<f32>),
    Int(Vec<i64>),
}

fn read_safetensors(dir: &Path) -> BTreeMap<String, (Vec<usize>, HfValues)> {
    let bytes = std::fs::read(dir.join("model.safetensors")).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let mut out = BTreeMap::new();
    for (name, view) in st.tensors() {
        let d = view.data();
        let values = match view.dtype() {
            Dtype::F16 => HfValues::Float(
                d.chunks_exact(2)
                    .map(|c| f16::from_le_bytes([c[0], c[1]]).to_f32())
                    .collect(),
            ),
            Dtype::F32 => HfValues::Float(
                d.chunks_exact(4)
                    .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
                    .collect(),
            ),
            Dtype::I32 => HfValues::Int(
                d.chunks_exact(4)
                    .map(|c| i64::from(i32::from_le_bytes(c.try_into().unwrap())))
                    .collect(),
            ),
            other => panic!("{name}: unexpected dtype {other:?} in a fixture"),
        };
        out.insert(name, (view.shape().to_vec(), values));
    }
    out
}

/// ds4's name of a transformers tensor (dsv4-arch.md §2), or the two names of the fused
/// expert gate/up tensor.
fn ds4_names(hf: &str) -> Vec<String> {
    let globals = [
        ("model.embed_tokens.weight", "token_embd.weight"),
        ("model.hc_head.hc_base", "output_hc_base.weight"),
        ("model.hc_head.hc_fn", "output_hc_fn.weight"),
        ("model.hc_head.hc_scale", "output_hc_scale.weight"),
        ("model.norm.weight", "output_norm.weight"),
        ("lm_head.weight", "output.weight"),
    ];
    if let Some((_, d)) = globals.iter().find(|(h, _)| *h == hf) {
        return vec![d.to_string()];
    }
    let rest = hf.strip_prefix("model.layers.").expect(hf);
    let (layer, leaf) = rest.split_once('.').unwrap();
    let per_layer = [
        ("attn_hc.fn", "hc_attn_fn"),
        ("attn_hc.base", "hc_attn_base"),
        ("attn_hc.scale", "hc_attn_scale"),
        ("ffn_hc.fn", "hc_ffn_fn"),
        ("ffn_hc.base", "hc_ffn_base"),
        ("ffn_hc.scale", "hc_ffn_scale"),
        ("input_layernorm.weight", "attn_norm"),
        ("post_attention_layernorm.weight", "ffn_norm"),
        ("self_attn.q_a_proj.weight", "attn_q_a"),
        ("self_attn.q_a_norm.weight", "attn_q_a_norm"),
        ("self_attn.q_b_proj.weight", "attn_q_b"),
        ("self_attn.kv_proj.weight", "attn_kv"),
        ("self_attn.kv_norm.weight", "attn_kv_a_norm"),
        ("self_attn.o_a_proj.weight", "attn_output_a"),
        ("self_attn.o_b_proj.weight", "attn_output_b"),
        ("self_attn.sinks", "attn_sinks"),
        ("self_attn.compressor.kv_proj.weight", "attn_compressor_kv"),
        (
            "self_attn.compressor.gate_proj.weight",
            "attn_compressor_gate",
        ),
        ("self_attn.compressor.position_bias", "attn_compressor_ape"),
        (
            "self_attn.compressor.kv_norm.weight",
            "attn_compressor_norm",
        ),
        (
            "self_attn.compressor.indexer.kv_proj.weight",
            "indexer_compressor_kv",
        ),
        (
            "self_attn.compressor.indexer.gate_proj.weight",
            "indexer_compressor_gate",
        ),
        (
            "self_attn.compressor.indexer.position_bias",
            "indexer_compressor_ape",
        ),
        (
            "self_attn.compressor.indexer.kv_norm.weight",
            "indexer_compressor_norm",
        ),
        (
            "self_attn.compressor.indexer.q_b_proj.weight",
            "indexer.attn_q_b",
        ),
        (
            "self_attn.compressor.indexer.scorer.weights_proj.weight",
            "indexer.proj",
        ),
        ("mlp.gate.weight", "ffn_gate_inp"),
        ("mlp.gate.tid2eid", "ffn_gate_tid2eid"),
        ("mlp.experts.down_proj", "ffn_down_exps"),
        ("mlp.shared_experts.gate_proj.weight", "ffn_gate_shexp"),
        ("mlp.shared_experts.up_proj.weight", "ffn_up_shexp"),
        ("mlp.shared_experts.down_proj.weight", "ffn_down_shexp"),
    ];
    if leaf == "mlp.gate.e_score_correction_bias" {
        return vec![format!("blk.{layer}.exp_probs_b.bias")];
    }
    if leaf == "mlp.experts.gate_up_proj" {
        return vec![
            format!("blk.{layer}.ffn_gate_exps.weight"),
            format!("blk.{layer}.ffn_up_exps.weight"),
        ];
    }
    let (_, stem) = per_layer
        .iter()
        .find(|(h, _)| *h == leaf)
        .unwrap_or_else(|| panic!("no ds4 name for {hf}"));
    vec![format!("blk.{layer}.{stem}.weight")]
}

/// GGUF tensor values as f32 (any float or quant type) or i64 (I32).
fn gguf_values(file: &GgufFile, name: &str) -> (GgmlType, Vec<u64>, HfValues) {
    let t = file
        .tensor(name)
        .unwrap_or_else(|| panic!("{name} missing"));
    let bytes = file.tensor_data(name).unwrap();
    if t.ty == GgmlType::I32 {
        let v = bytes
            .chunks_exact(4)
            .map(|c| i64::from(i32::from_le_bytes(c.try_into().unwrap())))
            .collect();
        return (t.ty, t.dims.clone(), HfValues::Int(v));
    }
    let mut out = vec![0f32; t.n_elements as usize];
    dequantize(t.ty, bytes, &mut out).unwrap();
    (t.ty, t.dims.clone(), HfValues::Float(out))
}

/// The checkpoint tensor rearranged into GGUF element order and dims (the layout change):
/// dims reversed, bytes unchanged, except the fused gate_up whose halves split per expert.
fn hf_in_gguf_order(
    shape: &[usize],
    values: &HfValues,
    split: Option<usize>,
) -> (Vec<u64>, HfValues) {
    let rev: Vec<u64> = shape.iter().rev().map(|&x| x as u64).collect();
    let Some(half) = split else {
        let v = match values {
            HfValues::Float(v) => HfValues::Float(v.clone()),
            HfValues::Int(v) => HfValues::Int(v.clone()),
        };
        return (rev, v);
    };
    let (e, two_i, d) = (shape[0], shape[1], shape[2]);
    let HfValues::Float(v) = values else {
        panic!("gate_up is float")
    };
    let i = two_i / 2;
    let mut out = Vec::with_capacity(e * i * d);
    for expert in 0..e {
        for row in 0..i {
            let r = expert * two_i + half * i + row;
            out.extend_from_slice(&v[r * d..(r + 1) * d]);
        }
    }
    (vec![d as u64, i as u64, e as u64], HfValues::Float(out))
}

#[test]
fn f32_conversion_equals_every_hf_tensor() {
    for name in MODELS {
        let (_, file) = convert_fixture(name, WeightsMode::F32, &format!("exact-{name}"));
        let hf = read_safetensors(&model_dir(name));
        let mut seen = 0usize;
        for (hf_name, (shape, values)) in &hf {
            let ds4 = ds4_names(hf_name);
            for (half, ds4_name) in ds4.iter().enumerate() {
                let split = (ds4.len() == 2).then_some(half);
                let (want_dims, want) = hf_in_gguf_order(shape, values, split);
                let (ty, dims, got) = gguf_values(&file, ds4_name);
                assert_eq!(dims, want_dims, "{name}: {ds4_name} dims");
                match (&want, &got) {
                    (HfValues::Float(w), HfValues::Float(g)) => {
                        assert_eq!(ty, GgmlType::F32, "{name}: {ds4_name} type");
                        let same = w.iter().zip(g).all(|(a, b)| a.to_bits() == b.to_bits());
                        assert!(same, "{name}: {ds4_name} differs from {hf_name}");
                    }
                    (HfValues::Int(w), HfValues::Int(g)) => {
                        assert_eq!(w, g, "{name}: {ds4_name} differs from {hf_name}")
                    }
                    _ => panic!("{name}: {ds4_name} has the wrong kind of values"),
                }
                seen += 1;
            }
        }
        // Nothing else in the file: every GGUF tensor came from one checkpoint tensor.
        assert_eq!(seen, file.tensors().len(), "{name}: extra GGUF tensors");
    }
}

fn u32_key(file: &GgufFile, key: &str) -> u64 {
    match file.get(key) {
        Some(MetaValue::U32(v)) => u64::from(*v),
        other => panic!("{key} is {other:?}, expected a UINT32"),
    }
}

fn f32_key(file: &GgufFile, key: &str) -> f64 {
    match file.get(key) {
        Some(MetaValue::F32(v)) => f64::from(*v),
        other => panic!("{key} is {other:?}, expected a FLOAT32"),
    }
}

#[test]
fn metadata_equals_config_json() {
    for name in MODELS {
        let (_, file) = convert_fixture(name, WeightsMode::F32, &format!("meta-{name}"));
        let text = std::fs::read_to_string(model_dir(name).join("config.json")).unwrap();
        let c: Value = serde_json::from_str(&text).unwrap();
        let int = |k: &str| c[k].as_u64().unwrap_or_else(|| panic!("{k}"));
        let k = |s: &str| format!("deepseek4.{s}");
        assert_eq!(
            file.get("general.architecture").and_then(|v| v.as_str()),
            Some("deepseek4")
        );
        assert_eq!(u32_key(&file, "general.alignment"), 32);
        for (key, field) in [
            ("block_count", "num_hidden_layers"),
            ("embedding_length", "hidden_size"),
            ("vocab_size", "vocab_size"),
            ("attention.head_count", "num_attention_heads"),
            ("attention.head_count_kv", "num_key_value_heads"),
            ("attention.key_length", "head_dim"),
            ("attention.value_length", "head_dim"),
            ("rope.dimension_count", "qk_rope_head_dim"),
            ("attention.q_lora_rank", "q_lora_rank"),
            ("attention.output_lora_rank", "o_lora_rank"),
            ("attention.output_group_count", "o_groups"),
            ("expert_count", "n_routed_experts"),
            ("expert_used_count", "num_experts_per_tok"),
            ("expert_feed_forward_length", "moe_intermediate_size"),
            ("expert_shared_count", "n_shared_experts"),
            ("attention.sliding_window", "sliding_window"),
            ("attention.indexer.head_count", "index_n_heads"),
            ("attention.indexer.key_length", "index_head_dim"),
            ("attention.indexer.top_k", "index_topk"),
            ("hyper_connection.count", "hc_mult"),
            ("hyper_connection.sinkhorn_iterations", "hc_sinkhorn_iters"),
            ("context_length", "max_position_embeddings"),
        ] {
            assert_eq!(u32_key(&file, &k(key)), int(field), "{name}: {key}");
        }
        let prf = c["partial_rotary_factor"].as_f64().unwrap();
        assert_eq!(
            u32_key(&file, &k("rope.dimension_count")),
            (int("head_dim") as f64 * prf) as u64
        );
        let n_hash = c["mlp_layer_types"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|t| t == &"hash_moe")
            .count() as u64;
        assert_eq!(u32_key(&file, &k("hash_layer_count")), n_hash, "{name}");
        let rates = &c["compress_rates"];
        let ratios: Vec<u32> = c["layer_types"]
            .as_array()
            .unwrap()
            .iter()
            .map(|t| match t.as_str().unwrap() {
                "sliding_attention" => 0,
                other => rates[other].as_u64().unwrap() as u32,
            })
            .collect();
        assert_eq!(
            file.get(&k("attention.compress_ratios")),
            Some(&MetaValue::from(ratios)),
            "{name}: compress ratios"
        );
        let limit = c["swiglu_limit"].as_f64().unwrap() as f32;
        assert_eq!(
            file.get(&k("swiglu_clamp_exp")),
            Some(&MetaValue::from(vec![
                limit;
                int("num_hidden_layers") as usize
            ])),
        );
        let close = |a: f64, b: f64| (a - b).abs() <= 1e-6 * b.abs();
        let rope = &c["rope_parameters"];
        for (key, want) in [
            (
                "rope.freq_base",
                rope["main"]["rope_theta"].as_f64().unwrap(),
            ),
            (
                "attention.compress_rope_freq_base",
                rope["compress"]["rope_theta"].as_f64().unwrap(),
            ),
            (
                "expert_weights_scale",
                c["routed_scaling_factor"].as_f64().unwrap(),
            ),
            (
                "attention.layer_norm_rms_epsilon",
                c["rms_norm_eps"].as_f64().unwrap(),
            ),
            ("hyper_connection.epsilon", c["hc_eps"].as_f64().unwrap()),
        ] {
            assert!(close(f32_key(&file, &k(key)), want), "{name}: {key}");
        }
        assert_eq!(
            file.get(&k("expert_weights_norm")),
            Some(&MetaValue::Bool(true))
        );
        let comp = &rope["compress"];
        if comp["rope_type"] == "yarn" {
            for (key, field) in [
                ("rope.scaling.factor", "factor"),
                ("rope.scaling.yarn_beta_fast", "beta_fast"),
                ("rope.scaling.yarn_beta_slow", "beta_slow"),
            ] {
                assert!(close(
                    f32_key(&file, &k(key)),
                    comp[field].as_f64().unwrap()
                ));
            }
            assert_eq!(
                u32_key(&file, &k("rope.scaling.original_context_length")),
                comp["original_max_position_embeddings"].as_u64().unwrap()
            );
        } else {
            assert!(file.get(&k("rope.scaling.factor")).is_none(), "{name}");
        }
        // The engine's reader gets back exactly what convert read from config.json.
        let from_file = ModelConfig::from_gguf(&file).unwrap();
        let from_json = read_config(&model_dir(name)).unwrap().cfg;
        assert_eq!(from_file, from_json, "{name}");
        assert!(!from_file.is_flash());
    }
}

#[test]
fn converted_layout_is_valid_and_damage_is_named_exactly() {
    let (_, file) = convert_fixture("flash_mini", WeightsMode::F32, "damage");
    let cfg = ModelConfig::from_gguf(&file).unwrap();
    assert_eq!(check_layout(&cfg, file.tensors(), None), vec![]);
    assert_eq!(
        check_layout(&cfg, file.tensors(), Some(WeightsMode::F32)),
        vec![]
    );

    // Rebuild the file with one change to one tensor info.
    let rewrite = |tag: &str, edit: &InfoEdit| {
        let mut w = GgufWriter::new();
        for (k, v) in file.metadata() {
            w.add_meta(k.clone(), v.clone());
        }
        for t in file.tensors() {
            let (name, dims) = edit(&t.name, &t.dims);
            let data = file.tensor_data(&t.name).unwrap().to_vec();
            w.add_tensor(&name, t.ty, &dims, data).unwrap();
        }
        let path = scratch(tag).join("damaged.gguf");
        w.write_to_path(&path).unwrap();
        GgufFile::open(&path).unwrap()
    };

    let renamed = rewrite("renamed", &|n, d| {
        if n == "blk.3.attn_kv.weight" {
            ("blk.3.attn_kv_renamed.weight".into(), d.to_vec())
        } else {
            (n.into(), d.to_vec())
        }
    });
    assert_eq!(
        check_layout(&cfg, renamed.tensors(), None),
        vec![LayoutIssue::Renamed {
            expected: "blk.3.attn_kv.weight".into(),
            found: "blk.3.attn_kv_renamed.weight".into()
        }]
    );

    let reshaped = rewrite("reshaped", &|n, d| {
        if n == "blk.2.attn_q_a.weight" {
            (n.into(), vec![d[1], d[0]])
        } else {
            (n.into(), d.to_vec())
        }
    });
    assert_eq!(
        check_layout(&cfg, reshaped.tensors(), None),
        vec![LayoutIssue::WrongShape {
            name: "blk.2.attn_q_a.weight".into(),
            expected: vec![64, 32],
            found: vec![32, 64],
        }]
    );
    let shown = check_layout(&cfg, reshaped.tensors(), None)[0].to_string();
    assert_eq!(
        shown,
        "tensor blk.2.attn_q_a.weight has shape [32, 64], expected [64, 32]"
    );
}

#[test]
fn layout_of_flash_matches_ds4_spec() {
    let flash = ModelConfig::flash();
    let specs = expected_tensors(&flash);
    let dims: HashMap<&str, &[u64]> = specs
        .iter()
        .map(|s| (s.name.as_str(), s.dims.as_slice()))
        .collect();
    for (name, want) in [
        ("token_embd.weight", &[4096u64, 129280][..]),
        ("output_hc_fn.weight", &[16384, 4]),
        ("output.weight", &[4096, 129280]),
        ("blk.0.hc_attn_fn.weight", &[16384, 24]),
        ("blk.0.hc_ffn_base.weight", &[24]),
        ("blk.0.attn_q_b.weight", &[1024, 32768]),
        ("blk.0.attn_kv.weight", &[4096, 512]),
        ("blk.0.attn_output_a.weight", &[4096, 8192]),
        ("blk.0.attn_output_b.weight", &[8192, 4096]),
        ("blk.0.ffn_gate_tid2eid.weight", &[6, 129280]),
        ("blk.2.attn_compressor_ape.weight", &[1024, 4]),
        ("blk.2.attn_compressor_kv.weight", &[4096, 1024]),
        ("blk.3.attn_compressor_ape.weight", &[512, 128]),
        ("blk.3.attn_compressor_gate.weight", &[4096, 512]),
        ("blk.2.indexer.attn_q_b.weight", &[1024, 8192]),
        ("blk.2.indexer.proj.weight", &[4096, 64]),
        ("blk.2.indexer_compressor_ape.weight", &[256, 4]),
        ("blk.42.ffn_gate_exps.weight", &[4096, 2048, 256]),
        ("blk.42.ffn_down_exps.weight", &[2048, 4096, 256]),
        ("blk.42.ffn_down_shexp.weight", &[2048, 4096]),
    ] {
        assert_eq!(dims.get(name).copied(), Some(want), "{name}");
    }
    assert!(!dims.contains_key("blk.3.ffn_gate_tid2eid.weight"));
    assert!(!dims.contains_key("blk.3.indexer.proj.weight"));
    assert!(!dims.contains_key("blk.1.attn_compressor_kv.weight"));
    // ds4's q2 mix, with Flash-sized rows (no fallback).
    let ty = |name: &str| {
        let s = specs.iter().find(|s| s.name == name).unwrap();
        ds4_model::layout::storage_type(s.role, WeightsMode::Ds4Q2, s.dims[0])
    };
    assert_eq!(ty("blk.5.ffn_gate_exps.weight"), (GgmlType::IQ2XXS, false));
    assert_eq!(ty("blk.5.ffn_down_exps.weight"), (GgmlType::Q2K, false));
    assert_eq!(ty("blk.5.attn_q_a.weight"), (GgmlType::Q8_0, false));
    assert_eq!(ty("blk.5.hc_attn_fn.weight"), (GgmlType::F16, false));
    assert_eq!(ty("token_embd.weight"), (GgmlType::F16, false));
    assert_eq!(ty("output.weight"), (GgmlType::Q8_0, false));
    assert_eq!(ty("blk.5.attn_sinks.weight"), (GgmlType::F32, false));
}

/// Relative RMS error of every tensor of a quantized conversion against the f32 one.
fn worst_relative_rms(name: &str, mode: WeightsMode) -> (f64, String) {
    let (_, exact) = convert_fixture(name, WeightsMode::F32, &format!("q-ref-{name}-{mode}"));
    let (_, q) = convert_fixture(name, mode, &format!("q-{name}-{mode}"));
    let cfg = ModelConfig::from_gguf(&q).unwrap();
    assert_eq!(
        check_layout(&cfg, q.tensors(), Some(mode)),
        vec![],
        "{name} {mode}"
    );
    let mut worst = (0.0f64, String::new());
    for t in exact.tensors() {
        let (_, _, HfValues::Float(a)) = gguf_values(&exact, &t.name) else {
            continue;
        };
        let (_, _, HfValues::Float(b)) = gguf_values(&q, &t.name) else {
            panic!("{}", t.name)
        };
        let num: f64 = a
            .iter()
            .zip(&b)
            .map(|(x, y)| f64::from(x - y).powi(2))
            .sum();
        let den: f64 = a.iter().map(|x| f64::from(*x).powi(2)).sum();
        let rel = (num / den.max(1e-30)).sqrt();
        if rel > worst.0 {
            worst = (rel, t.name.clone());
        }
    }
    worst
}

#[test]
fn quantized_modes_are_valid_and_close() {
    // Measured worst tensors (relative RMS): f16 0 (the fixtures are f16-exact), Q8_0 about
    // 1e-2 at most; the tiny models' expert rows fall back to F16 in the K/IQ mixes.
    for name in ["flash_mini", "ratios_real"] {
        let (f16_err, _) = worst_relative_rms(name, WeightsMode::F16);
        assert_eq!(f16_err, 0.0, "{name}: f16 of f16-exact values");
        for mode in [WeightsMode::Q8, WeightsMode::Ds4Q2, WeightsMode::Ds4Q4] {
            let (err, tensor) = worst_relative_rms(name, mode);
            eprintln!("{name} {mode}: worst relative RMS error {err:.2e} ({tensor})");
            assert!(err > 0.0 && err < 0.02, "{name} {mode}: {tensor} {err}");
        }
    }
}

#[test]
fn fallback_to_f16_is_reported() {
    let out = scratch("fallback").join("fm.gguf");
    let report = convert(&model_dir("flash_mini"), &out, &opts(WeightsMode::Ds4Q2)).unwrap();
    // Expert rows of 64 / 32 elements cannot hold 256-element IQ2_XXS / Q2_K blocks.
    let names: Vec<&str> = report.fallbacks.iter().map(|f| f.tensor.as_str()).collect();
    assert_eq!(report.fallbacks.len(), 18, "{names:?}");
    assert!(names.contains(&"blk.0.ffn_gate_exps.weight"));
    assert!(report
        .fallbacks
        .iter()
        .all(|f| matches!(f.wanted, GgmlType::IQ2XXS | GgmlType::Q2K)));
    let file = GgufFile::open(&out).unwrap();
    assert_eq!(
        file.tensor("blk.0.ffn_gate_exps.weight").unwrap().ty,
        GgmlType::F16
    );
    assert_eq!(
        file.tensor("blk.0.attn_q_a.weight").unwrap().ty,
        GgmlType::Q8_0
    );
}

#[test]
fn tokenizer_goes_into_the_file() {
    let out = scratch("tokenizer").join("vr.gguf");
    let mut o = opts(WeightsMode::F32);
    o.tokenizer = Some(fixtures().join("tokenizer/tokenizer.json"));
    convert(&model_dir("vocab_real"), &out, &o).unwrap();
    let file = GgufFile::open(&out).unwrap();
    let tokens = file.get_string_array("tokenizer.ggml.tokens").unwrap();
    assert_eq!(tokens.len(), 129280);
    assert_eq!(tokens[0], "<｜begin▁of▁sentence｜>");
    assert_eq!(tokens[128803], "<｜User｜>");
    assert_eq!(tokens[128822], "</think>");
    let merges = file.get_string_array("tokenizer.ggml.merges").unwrap();
    assert_eq!(merges.len(), 127741);
    assert_eq!(merges[0], "Ġ t");
    assert_eq!(u32_key(&file, "tokenizer.ggml.bos_token_id"), 0);
    assert_eq!(u32_key(&file, "tokenizer.ggml.eos_token_id"), 1);

    // A tokenizer larger than the model's vocabulary is refused.
    let err = convert(
        &model_dir("flash_mini"),
        &scratch("tok-bad").join("x.gguf"),
        &o,
    )
    .unwrap_err();
    assert!(matches!(err, ConvertError::Tokenizer { .. }), "{err}");
    assert!(err.to_string().contains("vocabulary of 512"), "{err}");
}

/// A copy of `sliding_only` with the checkpoint or config edited.
fn edited_checkpoint(
    tag: &str,
    edit_tensors: &dyn Fn(&mut RawTensors),
    edit_config: &dyn Fn(&mut Value),
) -> PathBuf {
    edited_copy("sliding_only", tag, edit_tensors, edit_config)
}

/// A copy of fixture `model` with the checkpoint or config edited.
fn edited_copy(
    model: &str,
    tag: &str,
    edit_tensors: &dyn Fn(&mut RawTensors),
    edit_config: &dyn Fn(&mut Value),
) -> PathBuf {
    let src = model_dir(model);
    let dir = scratch(tag);
    let bytes = std::fs::read(src.join("model.safetensors")).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let mut tensors: RawTensors = st
        .tensors()
        .into_iter()
        .map(|(n, v)| (n, (v.dtype(), v.shape().to_vec(), v.data().to_vec())))
        .collect();
    edit_tensors(&mut tensors);
    let views: Vec<(String, safetensors::tensor::TensorView)> = tensors
        .iter()
        .map(|(n, (dt, shape, data))| {
            (
                n.clone(),
                safetensors::tensor::TensorView::new(*dt, shape.clone(), data).unwrap(),
            )
        })
        .collect();
    let out = safetensors::serialize(views, None).unwrap();
    std::fs::write(dir.join("model.safetensors"), out).unwrap();
    let mut config: Value =
        serde_json::from_str(&std::fs::read_to_string(src.join("config.json")).unwrap()).unwrap();
    edit_config(&mut config);
    std::fs::write(dir.join("config.json"), config.to_string()).unwrap();
    dir
}

fn convert_err(dir: &Path) -> ConvertError {
    convert(dir, &dir.join("out.gguf"), &opts(WeightsMode::F32)).unwrap_err()
}

#[test]
fn bad_checkpoints_are_clear_errors() {
    let keep = |_: &mut RawTensors| {};
    let same = |_: &mut Value| {};

    // The unedited copy converts (so each failure below is the edit's doing).
    let ok = edited_checkpoint("ok", &keep, &same);
    convert(&ok, &ok.join("out.gguf"), &opts(WeightsMode::F32)).unwrap();

    let missing = edited_checkpoint(
        "missing",
        &|t| {
            t.remove("model.layers.1.self_attn.kv_norm.weight");
        },
        &same,
    );
    let e = convert_err(&missing);
    assert_eq!(
        e.to_string(),
        "missing tensor model.layers.1.self_attn.kv_norm.weight (needed for \
         blk.1.attn_kv_a_norm.weight)"
    );

    let unknown = edited_checkpoint(
        "unknown",
        &|t| {
            let v = t["model.norm.weight"].clone();
            t.insert("model.layers.0.self_attn.extra.weight".into(), v);
        },
        &same,
    );
    let e = convert_err(&unknown);
    assert!(
        matches!(&e, ConvertError::UnknownTensor { name, .. } if name == "model.layers.0.self_attn.extra.weight"),
        "{e}"
    );

    let reshaped = edited_checkpoint(
        "shape",
        &|t| {
            let e = t
                .get_mut("model.layers.0.self_attn.q_a_proj.weight")
                .unwrap();
            e.1 = vec![e.1[1], e.1[0]];
        },
        &same,
    );
    let e = convert_err(&reshaped);
    assert_eq!(
        e.to_string(),
        "tensor model.layers.0.self_attn.q_a_proj.weight has shape [32, 16], config.json \
         implies [16, 32]"
    );

    let bad_rate = edited_checkpoint("rate", &keep, &|c| {
        c["layer_types"][1] = "compressed_sparse_attention".into();
        c["compress_rates"]["compressed_sparse_attention"] = 8.into();
    });
    let e = convert_err(&bad_rate);
    assert!(matches!(e, ConvertError::Unsupported(_)), "{e}");
    assert!(e.to_string().contains("CSA rate is 8"), "{e}");

    let hash_after_topk = edited_checkpoint("hash", &keep, &|c| {
        c["mlp_layer_types"] = serde_json::json!(["moe", "hash_moe"]);
    });
    let e = convert_err(&hash_after_topk);
    assert!(
        e.to_string()
            .contains("hash MoE layer 1 follows a top-k layer"),
        "{e}"
    );

    let two_shared = edited_checkpoint("shared", &keep, &|c| {
        c["n_shared_experts"] = 2.into();
    });
    assert!(convert_err(&two_shared)
        .to_string()
        .contains("n_shared_experts is 2"));

    let fp8 = edited_checkpoint(
        "fp8",
        &|t| {
            let e = t
                .get_mut("model.layers.1.self_attn.kv_proj.weight")
                .unwrap();
            e.0 = Dtype::F8_E4M3;
            let n = e.1.iter().product::<usize>();
            e.2.truncate(n);
        },
        &same,
    );
    let e = convert_err(&fp8);
    assert!(
        e.to_string()
            .contains("tensor model.layers.1.self_attn.kv_proj.weight is stored as F8_E4M3"),
        "{e}"
    );

    let bad_ids = edited_checkpoint(
        "tid2eid",
        &|t| {
            let e = t.get_mut("model.layers.0.mlp.gate.tid2eid").unwrap();
            e.2[0..4].copy_from_slice(&9i32.to_le_bytes());
        },
        &same,
    );
    let e = convert_err(&bad_ids);
    assert!(
        e.to_string().contains("entry 0 is expert 9, outside 0..4"),
        "{e}"
    );
}

/// A checkpoint with 256-wide expert rows (the fixtures' rows are too short for the K/IQ
/// blocks): `sliding_only`'s config with hidden and expert width 256, seeded pseudo-random f16
/// weights generated from the layout itself.
fn wide_checkpoint(tag: &str) -> PathBuf {
    let dir = scratch(tag);
    let mut config: Value = serde_json::from_str(
        &std::fs::read_to_string(model_dir("sliding_only").join("config.json")).unwrap(),
    )
    .unwrap();
    config["hidden_size"] = 256.into();
    config["moe_intermediate_size"] = 256.into();
    config["vocab_size"] = 64.into();
    std::fs::write(dir.join("config.json"), config.to_string()).unwrap();
    let cfg = read_config(&dir).unwrap().cfg;

    let mut state = 0x9e3779b97f4a7c15u64;
    let mut uniform = move || {
        state ^= state >> 12;
        state ^= state << 25;
        state ^= state >> 27;
        ((state.wrapping_mul(0x2545F4914F6CDD1D) >> 40) as f32) / (1u64 << 24) as f32
    };
    let mut tensors = RawTensors::new();
    for spec in expected_tensors(&cfg) {
        let src = ds4_model::convert::source_of(&spec, false).unwrap();
        let layer_is_hash = spec.name.starts_with("blk.")
            && cfg.moe_kind[spec.name[4..]
                .split('.')
                .next()
                .unwrap()
                .parse::<usize>()
                .unwrap()]
                == ds4_model::config::MoeKind::Hash;
        if spec.optional && layer_is_hash {
            continue; // hash layers have no router bias
        }
        let shape: Vec<usize> = src.shape().iter().map(|&x| x as usize).collect();
        let n: usize = shape.iter().product();
        let entry = if spec.name.ends_with("tid2eid.weight") {
            let e = cfg.n_experts as i32;
            let data = (0..n as i32)
                .flat_map(|i| ((i / 2 + i % 2) % e).to_le_bytes())
                .collect();
            (Dtype::I32, shape, data)
        } else {
            // Sum of uniforms: roughly normal, scale 1.
            let data = (0..n)
                .flat_map(|_| {
                    let x = (0..4).map(|_| uniform()).sum::<f32>() - 2.0;
                    f16::from_f32(x * 1.7).to_le_bytes()
                })
                .collect();
            (Dtype::F16, shape, data)
        };
        tensors.insert(src.tensor().to_string(), entry);
    }
    let views: Vec<(String, safetensors::tensor::TensorView)> = tensors
        .iter()
        .map(|(n, (dt, shape, data))| {
            (
                n.clone(),
                safetensors::tensor::TensorView::new(*dt, shape.clone(), data).unwrap(),
            )
        })
        .collect();
    std::fs::write(
        dir.join("model.safetensors"),
        safetensors::serialize(views, None).unwrap(),
    )
    .unwrap();
    dir
}

#[test]
fn k_quant_mixes_on_256_wide_rows() {
    let dir = wide_checkpoint("wide");
    let exact_path = dir.join("f32.gguf");
    convert(&dir, &exact_path, &opts(WeightsMode::F32)).unwrap();
    let exact = GgufFile::open(&exact_path).unwrap();
    // Measured relative RMS errors of the experts on this data: IQ2_XXS 0.33, Q2_K 0.26,
    // Q4_K 0.069, Q8_0 0.0051.
    for (mode, gate_ty, down_ty, bound) in [
        (WeightsMode::Ds4Q2, GgmlType::IQ2XXS, GgmlType::Q2K, 0.4),
        (WeightsMode::Ds4Q4, GgmlType::Q4K, GgmlType::Q4K, 0.09),
        (WeightsMode::Q8, GgmlType::Q8_0, GgmlType::Q8_0, 0.008),
    ] {
        let path = dir.join(format!("{mode}.gguf"));
        let report = convert(&dir, &path, &opts(mode)).unwrap();
        let file = GgufFile::open(&path).unwrap();
        let cfg = ModelConfig::from_gguf(&file).unwrap();
        assert_eq!(check_layout(&cfg, file.tensors(), Some(mode)), vec![]);
        assert!(report.fallbacks.iter().all(|f| !f.tensor.contains("_exps")));
        for (stem, ty) in [
            ("ffn_gate_exps", gate_ty),
            ("ffn_up_exps", gate_ty),
            ("ffn_down_exps", down_ty),
        ] {
            let name = format!("blk.1.{stem}.weight");
            assert_eq!(file.tensor(&name).unwrap().ty, ty, "{mode} {name}");
            let (_, _, HfValues::Float(a)) = gguf_values(&exact, &name) else {
                panic!()
            };
            let (_, _, HfValues::Float(b)) = gguf_values(&file, &name) else {
                panic!()
            };
            let num: f64 = a
                .iter()
                .zip(&b)
                .map(|(x, y)| f64::from(x - y).powi(2))
                .sum();
            let den: f64 = a.iter().map(|x| f64::from(*x).powi(2)).sum();
            let rel = (num / den).sqrt();
            eprintln!("{mode} {name} ({ty}): relative RMS error {rel:.3e}");
            assert!(rel > 0.0 && rel < bound, "{mode} {name}: {rel}");
        }
    }
}

#[test]
fn original_checkpoint_names_convert_to_the_same_file() {
    // `ratios_real_original` holds ratios_real's weights as save_pretrained writes them by
    // default: DeepSeek's names (`attn.wq_a`, `attn.norm` for kv_norm, `ffn.gate.bias`, ...)
    // and one w1/w2/w3 tensor per routed expert.
    let (_, module_names) = convert_fixture("ratios_real", WeightsMode::F32, "orig-a");
    let (_, original) = convert_fixture("ratios_real_original", WeightsMode::F32, "orig-b");
    assert_eq!(module_names.tensors().len(), original.tensors().len());
    for t in module_names.tensors() {
        let o = original
            .tensor(&t.name)
            .unwrap_or_else(|| panic!("{}", t.name));
        assert_eq!((o.ty, &o.dims), (t.ty, &t.dims), "{}", t.name);
        assert_eq!(
            original.tensor_data(&t.name),
            module_names.tensor_data(&t.name),
            "{}",
            t.name
        );
    }
    for (k, v) in module_names.metadata() {
        if k != "general.name" {
            assert_eq!(original.get(k), Some(v), "{k}");
        }
    }
}

#[test]
fn original_names_with_a_missing_expert_are_an_error() {
    let dir = edited_copy(
        "ratios_real_original",
        "orig-gap",
        &|t| {
            t.remove("model.layers.2.ffn.experts.3.w1.weight");
        },
        &|_| {},
    );
    let e = convert_err(&dir);
    assert!(
        e.to_string()
            .contains("missing tensor model.layers.2.mlp.experts.3.w1.weight"),
        "{e}"
    );
}

#[test]
fn damaged_safetensors_files_are_clear_errors() {
    let dir = scratch("truncated");
    std::fs::copy(
        model_dir("sliding_only").join("config.json"),
        dir.join("config.json"),
    )
    .unwrap();
    let bytes = std::fs::read(model_dir("sliding_only").join("model.safetensors")).unwrap();
    // Truncated data: the last tensor's bytes run past the end of the file.
    std::fs::write(dir.join("model.safetensors"), &bytes[..bytes.len() - 10]).unwrap();
    let e = convert_err(&dir);
    assert!(matches!(e, ConvertError::Safetensors { .. }), "{e}");
    assert!(e.to_string().contains("do not hold"), "{e}");
    // A header length beyond the file.
    let mut bad = bytes.clone();
    bad[..8].copy_from_slice(&(u64::MAX / 2).to_le_bytes());
    std::fs::write(dir.join("model.safetensors"), &bad).unwrap();
    let e = convert_err(&dir);
    assert!(e.to_string().contains("header length"), "{e}");
    // Not JSON.
    let mut bad = bytes;
    bad[8] = b'#';
    std::fs::write(dir.join("model.safetensors"), &bad).unwrap();
    let e = convert_err(&dir);
    assert!(e.to_string().contains("bad header"), "{e}");
}

#[test]
fn small_chunks_give_the_same_file() {
    // Converting a few rows at a time (as a huge checkpoint would be) changes nothing.
    for (model, mode) in [
        ("flash_mini", WeightsMode::Q8),
        ("ratios_real_original", WeightsMode::F32),
    ] {
        let dir = scratch(&format!("chunks-{model}"));
        let whole = dir.join("whole.gguf");
        let chunked = dir.join("chunked.gguf");
        convert(&model_dir(model), &whole, &opts(mode)).unwrap();
        convert_in_chunks(&model_dir(model), &chunked, &opts(mode), 100).unwrap();
        assert_eq!(
            std::fs::read(&whole).unwrap(),
            std::fs::read(&chunked).unwrap(),
            "{model} {mode}"
        );
    }
}
