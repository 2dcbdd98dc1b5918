//! `ds4 synth` end to end: a synthetic file of a small description (every block format of the
//! q2/q4 mixes, every layer kind) must pass the layout check, load through the CPU backend and
//! give finite logits; aliasing must share data; the bytes must depend only on the seed.
//!
//! The full-shape Flash file (~4 GB aliased) is written only with `DS4_SYNTH_TEST=1` (too big
//! for CI): `DS4_SYNTH_TEST=1 cargo test -p ds4-model --test synth_model -- flash`.

use std::path::{Path, PathBuf};

use ds4_gguf::reader::GgufFile;
use ds4_gguf::GgmlType;
use ds4_model::backend::{Backend, Logits};
use ds4_model::config::{AttnKind, ModelConfig, MoeKind};
use ds4_model::cpu::CpuBackend;
use ds4_model::layout::{check_layout, WeightsMode};
use ds4_model::numerics::Numerics;
use ds4_model::synth::{synthesize, SynthOptions};

/// A 4-layer model whose rows fit every block type of the ds4 mixes (256-element K-quant and
/// IQ2_XXS blocks, 32-element Q8_0 blocks): sliding, CSA, HCA, CSA; hash then top-k MoE.
fn small_config() -> ModelConfig {
    let kinds = [
        AttnKind::Sliding,
        AttnKind::Csa,
        AttnKind::Hca,
        AttnKind::Csa,
    ];
    let ratios = [0u32, 4, 8, 4];
    ModelConfig {
        vocab_size: 512,
        hidden: 256,
        n_layers: 4,
        n_heads: 4,
        head_dim: 64,
        rope_dim: 16,
        q_lora_rank: 64,
        o_groups: 2,
        o_lora_rank: 64,
        n_experts: 8,
        n_experts_used: 2,
        expert_ff: 256,
        swiglu_clamp: vec![10.0; 4],
        sliding_window: 8,
        compress_ratio: ratios.to_vec(),
        attn_kind: kinds.to_vec(),
        moe_kind: vec![MoeKind::Hash, MoeKind::TopK, MoeKind::TopK, MoeKind::TopK],
        index_heads: 4,
        index_head_dim: 32,
        index_topk: 4,
        ..ModelConfig::flash()
    }
}

fn temp_dir(tag: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("ds4-synth-{}-{tag}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn options(mode: WeightsMode, seed: u64, alias: bool) -> SynthOptions {
    SynthOptions {
        config: small_config(),
        weights: mode,
        seed,
        alias_layers: alias,
        tokenizer: None,
        name: "synth-test".into(),
        threads: Some(2),
    }
}

fn synth(path: &Path, opts: &SynthOptions) -> ds4_model::synth::SynthReport {
    synthesize(path, opts, &|_, _| {}).unwrap()
}

#[test]
fn small_synthetic_models_load_and_give_finite_logits() {
    let dir = temp_dir("load");
    for mode in [WeightsMode::Ds4Q2, WeightsMode::Ds4Q4] {
        for alias in [false, true] {
            let path = dir.join(format!("{mode}-{alias}.gguf"));
            let report = synth(&path, &options(mode, 5, alias));
            let file = GgufFile::open(&path).unwrap();
            assert_eq!(file.file_len(), report.file_bytes);
            let cfg = ModelConfig::from_gguf(&file).unwrap();
            assert_eq!(cfg, small_config());
            // The exact type mix of the mode, no F16 fallbacks.
            let issues = check_layout(&cfg, file.tensors(), Some(mode));
            assert!(issues.is_empty(), "{mode}: {issues:?}");
            let gate = file.tensor("blk.1.ffn_gate_exps.weight").unwrap();
            let down = file.tensor("blk.1.ffn_down_exps.weight").unwrap();
            let (want_gate, want_down) = match mode {
                WeightsMode::Ds4Q2 => (GgmlType::IQ2XXS, GgmlType::Q2K),
                _ => (GgmlType::Q4K, GgmlType::Q4K),
            };
            assert_eq!((gate.ty, down.ty), (want_gate, want_down));
            assert_eq!(
                file.tensor("blk.0.attn_q_b.weight").unwrap().ty,
                GgmlType::Q8_0
            );
            if alias {
                assert!(report.file_bytes < report.logical_bytes);
            } else {
                assert!(report.file_bytes >= report.logical_bytes);
                assert_eq!(report.n_data_tensors, report.n_tensors);
            }

            let backend = CpuBackend::from_file(std::sync::Arc::new(file), Numerics::Ds4).unwrap();
            let mut session = backend.new_session(64).unwrap();
            let tokens: Vec<u32> = (0..40).map(|i| (i * 37 + 11) % 512).collect();
            let logits = session.eval(&tokens, Logits::All).unwrap();
            assert_eq!(logits.len(), 40 * 512);
            assert!(logits.iter().all(|x| x.is_finite()), "{mode} alias={alias}");
            let spread = logits.iter().fold(0f32, |m, &x| m.max(x.abs()));
            assert!(spread > 0.0 && spread < 1e4, "{mode}: max |logit| {spread}");
            let next = session.eval(&[3], Logits::Last).unwrap();
            assert!(next.iter().all(|x| x.is_finite()));
        }
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn aliased_layers_share_offsets_by_kind() {
    let dir = temp_dir("alias");
    let path = dir.join("a.gguf");
    synth(&path, &options(WeightsMode::Ds4Q2, 1, true));
    let file = GgufFile::open(&path).unwrap();
    let off = |n: &str| file.tensor(n).unwrap().offset;
    // Routed experts: one copy for every layer.
    for l in 1..4 {
        for stem in ["ffn_gate_exps", "ffn_up_exps", "ffn_down_exps"] {
            assert_eq!(
                off(&format!("blk.{l}.{stem}.weight")),
                off(&format!("blk.0.{stem}.weight"))
            );
        }
    }
    // Attention: shared by layers of one kind (1 and 3 are CSA), distinct across kinds.
    assert_eq!(off("blk.1.attn_q_b.weight"), off("blk.3.attn_q_b.weight"));
    assert_eq!(
        off("blk.1.indexer.attn_q_b.weight"),
        off("blk.3.indexer.attn_q_b.weight")
    );
    assert_ne!(off("blk.0.attn_q_b.weight"), off("blk.1.attn_q_b.weight"));
    assert_ne!(off("blk.1.attn_q_b.weight"), off("blk.2.attn_q_b.weight"));
    // The gate and up projections of one layer are different data.
    assert_ne!(
        off("blk.0.ffn_gate_exps.weight"),
        off("blk.0.ffn_up_exps.weight")
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn values_are_sane_and_deterministic() {
    let dir = temp_dir("values");
    let (a, b, c) = (dir.join("a.gguf"), dir.join("b.gguf"), dir.join("c.gguf"));
    synth(&a, &options(WeightsMode::Ds4Q2, 9, false));
    synth(&b, &options(WeightsMode::Ds4Q2, 9, false));
    synth(&c, &options(WeightsMode::Ds4Q2, 10, false));
    let (ba, bb, bc) = (
        std::fs::read(&a).unwrap(),
        std::fs::read(&b).unwrap(),
        std::fs::read(&c).unwrap(),
    );
    assert!(ba == bb, "same seed, different bytes");
    assert!(ba != bc, "different seeds, same bytes");

    let file = GgufFile::open(&a).unwrap();
    let f32s = |name: &str| -> Vec<f32> {
        let t = file.tensor(name).unwrap();
        let mut v = vec![0f32; t.n_elements as usize];
        ds4_gguf::quant::dequantize(t.ty, file.tensor_bytes(t), &mut v).unwrap();
        v
    };
    assert!(f32s("blk.2.attn_norm.weight").iter().all(|&x| x == 1.0));
    assert!(f32s("output_norm.weight").iter().all(|&x| x == 1.0));
    for name in [
        "token_embd.weight",
        "blk.0.ffn_gate_exps.weight",
        "blk.0.ffn_down_exps.weight",
        "blk.3.attn_output_a.weight",
    ] {
        let v = f32s(name);
        let n = v.len() as f64;
        let mean = v.iter().map(|&x| f64::from(x)).sum::<f64>() / n;
        let std = (v
            .iter()
            .map(|&x| (f64::from(x) - mean).powi(2))
            .sum::<f64>()
            / n)
            .sqrt();
        assert!(mean.abs() < 1e-3, "{name}: mean {mean}");
        assert!((std - 0.02).abs() < 0.002, "{name}: std {std}");
    }
    // Hash routing: every token's experts are distinct and in range.
    let t = file.tensor("blk.0.ffn_gate_tid2eid.weight").unwrap();
    assert_eq!(t.ty, GgmlType::I32);
    let ids: Vec<i32> = file
        .tensor_bytes(t)
        .chunks_exact(4)
        .map(|b| i32::from_le_bytes(b.try_into().unwrap()))
        .collect();
    for row in ids.chunks_exact(2) {
        assert!(row.iter().all(|&e| (0..8).contains(&e)));
        assert_ne!(row[0], row[1]);
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn metadata_has_ds4_types_and_the_mtp_ratio() {
    let dir = temp_dir("meta");
    let path = dir.join("m.gguf");
    let mut opts = options(WeightsMode::Ds4Q2, 0, true);
    opts.config.vocab_size = 129280;
    opts.tokenizer = Some(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/tokenizer/tokenizer.json"),
    );
    synth(&path, &opts);
    let file = GgufFile::open(&path).unwrap();
    use ds4_gguf::MetaValue;
    assert!(matches!(
        file.get("deepseek4.block_count"),
        Some(MetaValue::U32(4))
    ));
    assert!(matches!(
        file.get("deepseek4.expert_weights_norm"),
        Some(MetaValue::Bool(true))
    ));
    assert_eq!(
        file.get_u32_array("deepseek4.attention.compress_ratios")
            .unwrap(),
        vec![0, 4, 8, 4, 0]
    );
    assert_eq!(file.get_str("general.architecture").unwrap(), "deepseek4");
    let tokens = file.get_string_array("tokenizer.ggml.tokens").unwrap();
    assert_eq!(tokens.len(), 129280);
    assert_eq!(tokens[0], "<｜begin▁of▁sentence｜>");
    assert!(!file
        .get_string_array("tokenizer.ggml.merges")
        .unwrap()
        .is_empty());
    std::fs::remove_dir_all(&dir).unwrap();
}

/// The full-shape Flash file, aliased (~4 GB). Only with DS4_SYNTH_TEST=1.
#[test]
fn flash_aliased_file_is_valid_flash() {
    if std::env::var("DS4_SYNTH_TEST").as_deref() != Ok("1") {
        eprintln!("skipped: set DS4_SYNTH_TEST=1 to write the ~4 GB Flash file");
        return;
    }
    let dir = temp_dir("flash");
    let path = dir.join("flash-q2.gguf");
    let mut opts = SynthOptions::flash(WeightsMode::Ds4Q2);
    opts.alias_layers = true;
    let report = synth(&path, &opts);
    let file = GgufFile::open(&path).unwrap();
    let cfg = ModelConfig::from_gguf(&file).unwrap();
    assert!(cfg.is_flash());
    assert!(check_layout(&cfg, file.tensors(), Some(WeightsMode::Ds4Q2)).is_empty());
    assert!(report.file_bytes < 5 << 30, "{} bytes", report.file_bytes);
    CpuBackend::from_file(std::sync::Arc::new(file), Numerics::Ds4).unwrap();
    std::fs::remove_dir_all(&dir).unwrap();
}
