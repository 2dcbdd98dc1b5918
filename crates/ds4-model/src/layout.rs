//! ds4's GGUF tensor layout: every tensor's name, role, shape (from a [`ModelConfig`]) and
//! storage type (per weights mode), and the check of a file's tensor table against it.
//!
//! Shapes are GGUF dims: `dims[0]` is the contiguous row length, so a transformers linear
//! weight `[out, in]` is `[in, out]` here with the same bytes. Names and the ds4 type mix follow
//! ds4-spec.md §1 (and dsv4-arch.md B6).

use std::fmt;
use std::str::FromStr;

use ds4_gguf::{GgmlType, TensorInfo};

use crate::config::{AttnKind, ModelConfig, MoeKind};

/// How a file's weights are stored; `ds4 convert --weights`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WeightsMode {
    /// Everything F32 (tid2eid I32): bit-exact against the reference.
    F32,
    /// Every matrix F16, vectors (norms, biases, sinks, HC base/scale) F32.
    F16,
    /// ds4's mix with the routed experts in Q8_0 too.
    Q8,
    /// ds4's q2 mix: routed gate/up IQ2_XXS, down Q2_K.
    Ds4Q2,
    /// ds4's q4 mix: routed experts Q4_K.
    Ds4Q4,
}

impl WeightsMode {
    pub const ALL: [WeightsMode; 5] = [
        WeightsMode::F32,
        WeightsMode::F16,
        WeightsMode::Q8,
        WeightsMode::Ds4Q2,
        WeightsMode::Ds4Q4,
    ];

    pub const fn name(self) -> &'static str {
        match self {
            WeightsMode::F32 => "f32",
            WeightsMode::F16 => "f16",
            WeightsMode::Q8 => "q8",
            WeightsMode::Ds4Q2 => "ds4-q2",
            WeightsMode::Ds4Q4 => "ds4-q4",
        }
    }
}

impl fmt::Display for WeightsMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for WeightsMode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        WeightsMode::ALL
            .into_iter()
            .find(|m| m.name() == s)
            .ok_or_else(|| format!("unknown weights mode '{s}' (f32, f16, q8, ds4-q2, ds4-q4)"))
    }
}

/// What a tensor is, which decides its storage type.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TensorRole {
    /// Norm weights, HC base/scale, attention sinks, router bias: always F32.
    Vector,
    /// `token_embd`: F16 in ds4's mixes.
    Embedding,
    /// `output` (lm head): Q8_0 in ds4's mixes.
    Output,
    /// Attention projections and shared experts: Q8_0 in ds4's mixes.
    DenseQ8,
    /// HC `fn`, router, compressor/indexer projections and `ape`: F16 in ds4's mixes.
    DenseF16,
    /// Routed experts' gate and up (3-D).
    ExpertGateUp,
    /// Routed experts' down (3-D).
    ExpertDown,
    /// `ffn_gate_tid2eid`: I32 expert ids.
    HashTable,
}

impl TensorRole {
    /// The type this role is stored in for `mode` when its rows fit the type's blocks.
    pub fn mode_type(self, mode: WeightsMode) -> GgmlType {
        use GgmlType as T;
        use TensorRole as R;
        match (self, mode) {
            (R::HashTable, _) => T::I32,
            (R::Vector, _) | (_, WeightsMode::F32) => T::F32,
            (_, WeightsMode::F16) => T::F16,
            (R::Embedding | R::DenseF16, _) => T::F16,
            (R::Output | R::DenseQ8, _) => T::Q8_0,
            (R::ExpertGateUp | R::ExpertDown, WeightsMode::Q8) => T::Q8_0,
            (R::ExpertGateUp, WeightsMode::Ds4Q2) => T::IQ2XXS,
            (R::ExpertDown, WeightsMode::Ds4Q2) => T::Q2K,
            (R::ExpertGateUp | R::ExpertDown, WeightsMode::Ds4Q4) => T::Q4K,
        }
    }

    /// Every type a file may store this role in (what the engine reads).
    pub fn allowed_types(self) -> &'static [GgmlType] {
        use GgmlType as T;
        match self {
            TensorRole::Vector => &[T::F32],
            TensorRole::HashTable => &[T::I32],
            TensorRole::Embedding
            | TensorRole::Output
            | TensorRole::DenseQ8
            | TensorRole::DenseF16 => &[T::F32, T::F16, T::Q8_0],
            TensorRole::ExpertGateUp | TensorRole::ExpertDown => {
                &[T::F32, T::F16, T::Q8_0, T::Q2K, T::Q4K, T::IQ2XXS]
            }
        }
    }
}

/// The storage type of a tensor of `role` with rows of `row_len` elements in `mode`. A row
/// length that is not a whole number of the type's blocks (tiny models: Q2_K/Q4_K/IQ2_XXS need
/// 256, Q8_0 needs 32) falls back to F16; the second value then says so.
pub fn storage_type(role: TensorRole, mode: WeightsMode, row_len: u64) -> (GgmlType, bool) {
    let ty = role.mode_type(mode);
    if row_len.is_multiple_of(ty.block_elems() as u64) {
        (ty, false)
    } else {
        (GgmlType::F16, true)
    }
}

/// One tensor of the layout.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TensorSpec {
    pub name: String,
    pub role: TensorRole,
    /// GGUF dims (`dims[0]` contiguous).
    pub dims: Vec<u64>,
    /// ds4 accepts the file without it (`exp_probs_b`: bias 0).
    pub optional: bool,
}

/// `blk.{layer}.{stem}.weight`.
pub fn layer_tensor(layer: usize, stem: &str) -> String {
    format!("blk.{layer}.{stem}.weight")
}

/// The router bias of a layer; the only tensor whose name ends in `.bias`.
pub fn router_bias(layer: usize) -> String {
    format!("blk.{layer}.exp_probs_b.bias")
}

/// Every tensor of a model described by `cfg`, in ds4's file order (globals, then layers).
pub fn expected_tensors(cfg: &ModelConfig) -> Vec<TensorSpec> {
    use TensorRole as R;
    let u = |x: usize| x as u64;
    let (d, v, n) = (u(cfg.hidden), u(cfg.vocab_size), u(cfg.hc_mult));
    let hc_rows = (2 + n) * n;
    let mut out = Vec::new();
    let mut push = |name: String, role, dims: Vec<u64>, optional| {
        out.push(TensorSpec {
            name,
            role,
            dims,
            optional,
        })
    };
    push("token_embd.weight".into(), R::Embedding, vec![d, v], false);
    push("output_hc_base.weight".into(), R::Vector, vec![n], false);
    push(
        "output_hc_fn.weight".into(),
        R::DenseF16,
        vec![n * d, n],
        false,
    );
    push("output_hc_scale.weight".into(), R::Vector, vec![1], false);
    push("output_norm.weight".into(), R::Vector, vec![d], false);
    push("output.weight".into(), R::Output, vec![d, v], false);

    let (heads, hd) = (u(cfg.n_heads), u(cfg.head_dim));
    let (ql, groups, ol) = (u(cfg.q_lora_rank), u(cfg.o_groups), u(cfg.o_lora_rank));
    let (e, k, ff) = (u(cfg.n_experts), u(cfg.n_experts_used), u(cfg.expert_ff));
    let (ih, id) = (u(cfg.index_heads), u(cfg.index_head_dim));
    for l in 0..cfg.n_layers {
        let t = |stem: &str| layer_tensor(l, stem);
        for hc in ["hc_attn", "hc_ffn"] {
            push(
                t(&format!("{hc}_fn")),
                R::DenseF16,
                vec![n * d, hc_rows],
                false,
            );
            push(t(&format!("{hc}_scale")), R::Vector, vec![3], false);
            push(t(&format!("{hc}_base")), R::Vector, vec![hc_rows], false);
        }
        push(t("attn_norm"), R::Vector, vec![d], false);
        push(t("ffn_norm"), R::Vector, vec![d], false);
        push(t("attn_q_a"), R::DenseQ8, vec![d, ql], false);
        push(t("attn_q_a_norm"), R::Vector, vec![ql], false);
        push(t("attn_q_b"), R::DenseQ8, vec![ql, heads * hd], false);
        push(t("attn_kv"), R::DenseQ8, vec![d, hd], false);
        push(t("attn_kv_a_norm"), R::Vector, vec![hd], false);
        push(t("attn_sinks"), R::Vector, vec![heads], false);
        push(
            t("attn_output_a"),
            R::DenseQ8,
            vec![heads * hd / groups.max(1), groups * ol],
            false,
        );
        push(t("attn_output_b"), R::DenseQ8, vec![groups * ol, d], false);
        let ratio = u64::from(cfg.compress_ratio[l]);
        if cfg.attn_kind[l] != AttnKind::Sliding {
            // CSA rows pool two overlapping windows: the projections are twice as wide.
            let width = if cfg.attn_kind[l] == AttnKind::Csa {
                2 * hd
            } else {
                hd
            };
            push(
                t("attn_compressor_ape"),
                R::DenseF16,
                vec![width, ratio],
                false,
            );
            push(t("attn_compressor_kv"), R::DenseF16, vec![d, width], false);
            push(
                t("attn_compressor_gate"),
                R::DenseF16,
                vec![d, width],
                false,
            );
            push(t("attn_compressor_norm"), R::Vector, vec![hd], false);
        }
        if cfg.attn_kind[l] == AttnKind::Csa {
            push(t("indexer.attn_q_b"), R::DenseF16, vec![ql, ih * id], false);
            push(t("indexer.proj"), R::DenseF16, vec![d, ih], false);
            push(
                t("indexer_compressor_ape"),
                R::DenseF16,
                vec![2 * id, ratio],
                false,
            );
            push(
                t("indexer_compressor_kv"),
                R::DenseF16,
                vec![d, 2 * id],
                false,
            );
            push(
                t("indexer_compressor_gate"),
                R::DenseF16,
                vec![d, 2 * id],
                false,
            );
            push(t("indexer_compressor_norm"), R::Vector, vec![id], false);
        }
        push(t("ffn_gate_inp"), R::DenseF16, vec![d, e], false);
        push(router_bias(l), R::Vector, vec![e], true);
        if cfg.moe_kind[l] == MoeKind::Hash {
            push(t("ffn_gate_tid2eid"), R::HashTable, vec![k, v], false);
        }
        push(t("ffn_gate_exps"), R::ExpertGateUp, vec![d, ff, e], false);
        push(t("ffn_up_exps"), R::ExpertGateUp, vec![d, ff, e], false);
        push(t("ffn_down_exps"), R::ExpertDown, vec![ff, d, e], false);
        push(t("ffn_gate_shexp"), R::DenseQ8, vec![d, ff], false);
        push(t("ffn_up_shexp"), R::DenseQ8, vec![d, ff], false);
        push(t("ffn_down_shexp"), R::DenseQ8, vec![ff, d], false);
    }
    out
}

/// One way a file's tensor table differs from the layout.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LayoutIssue {
    /// A required tensor is absent.
    Missing { name: String, dims: Vec<u64> },
    /// A tensor the layout does not have.
    Unexpected {
        name: String,
        ty: GgmlType,
        dims: Vec<u64>,
    },
    /// A required tensor is absent and exactly one unexpected tensor has its type and shape.
    Renamed { expected: String, found: String },
    WrongShape {
        name: String,
        expected: Vec<u64>,
        found: Vec<u64>,
    },
    WrongType {
        name: String,
        allowed: Vec<GgmlType>,
        found: GgmlType,
    },
    /// A routed expert's gate and up are stored in different types (ds4 reads them as a pair).
    MismatchedExpertTypes {
        gate: String,
        gate_ty: GgmlType,
        up_ty: GgmlType,
    },
}

impl fmt::Display for LayoutIssue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            LayoutIssue::Missing { name, dims } => {
                write!(f, "tensor {name} {dims:?} is missing")
            }
            LayoutIssue::Unexpected { name, ty, dims } => {
                write!(f, "tensor {name} ({ty} {dims:?}) is not part of the layout")
            }
            LayoutIssue::Renamed { expected, found } => write!(
                f,
                "tensor {expected} is missing and {found} (same type and shape) is not part of \
                 the layout: renamed?"
            ),
            LayoutIssue::WrongShape {
                name,
                expected,
                found,
            } => write!(
                f,
                "tensor {name} has shape {found:?}, expected {expected:?}"
            ),
            LayoutIssue::WrongType {
                name,
                allowed,
                found,
            } => {
                let allowed: Vec<&str> = allowed.iter().map(|t| t.name()).collect();
                write!(
                    f,
                    "tensor {name} is {found}, expected one of {}",
                    allowed.join("|")
                )
            }
            LayoutIssue::MismatchedExpertTypes {
                gate,
                gate_ty,
                up_ty,
            } => write!(
                f,
                "tensor {gate} is {gate_ty} but its up projection is {up_ty}; they must match"
            ),
        }
    }
}

/// Compares a file's tensor table with the layout of `cfg`. Types are checked against what the
/// engine can read ([`TensorRole::allowed_types`]), or exactly against `mode`'s mix (with the
/// F16 fallback of [`storage_type`]) when a mode is given. An empty result means valid.
pub fn check_layout(
    cfg: &ModelConfig,
    tensors: &[TensorInfo],
    mode: Option<WeightsMode>,
) -> Vec<LayoutIssue> {
    let expected = expected_tensors(cfg);
    let by_name: std::collections::HashMap<&str, &TensorInfo> =
        tensors.iter().map(|t| (t.name.as_str(), t)).collect();
    let known: std::collections::HashSet<&str> = expected.iter().map(|s| s.name.as_str()).collect();
    let mut issues = Vec::new();
    let mut missing: Vec<&TensorSpec> = Vec::new();
    for spec in &expected {
        let Some(t) = by_name.get(spec.name.as_str()) else {
            if !spec.optional {
                missing.push(spec);
            }
            continue;
        };
        if t.dims != spec.dims {
            issues.push(LayoutIssue::WrongShape {
                name: spec.name.clone(),
                expected: spec.dims.clone(),
                found: t.dims.clone(),
            });
            continue;
        }
        let allowed: Vec<GgmlType> = match mode {
            Some(m) => vec![storage_type(spec.role, m, spec.dims[0]).0],
            None => spec.role.allowed_types().to_vec(),
        };
        if !allowed.contains(&t.ty) {
            issues.push(LayoutIssue::WrongType {
                name: spec.name.clone(),
                allowed,
                found: t.ty,
            });
        }
    }
    // Expert gate/up pairs share one type (ds4 binds them together).
    for l in 0..cfg.n_layers {
        let gate = layer_tensor(l, "ffn_gate_exps");
        if let (Some(g), Some(u)) = (
            by_name.get(gate.as_str()),
            by_name.get(layer_tensor(l, "ffn_up_exps").as_str()),
        ) {
            if g.ty != u.ty {
                issues.push(LayoutIssue::MismatchedExpertTypes {
                    gate,
                    gate_ty: g.ty,
                    up_ty: u.ty,
                });
            }
        }
    }
    let unexpected: Vec<&TensorInfo> = tensors
        .iter()
        .filter(|t| !known.contains(t.name.as_str()))
        .collect();
    let mut paired = vec![false; unexpected.len()];
    for spec in missing {
        // A rename: exactly one unexpected tensor could be this one.
        let candidates: Vec<usize> = unexpected
            .iter()
            .enumerate()
            .filter(|(i, t)| {
                !paired[*i] && t.dims == spec.dims && spec.role.allowed_types().contains(&t.ty)
            })
            .map(|(i, _)| i)
            .collect();
        if let [i] = candidates[..] {
            paired[i] = true;
            issues.push(LayoutIssue::Renamed {
                expected: spec.name.clone(),
                found: unexpected[i].name.clone(),
            });
        } else {
            issues.push(LayoutIssue::Missing {
                name: spec.name.clone(),
                dims: spec.dims.clone(),
            });
        }
    }
    for (t, paired) in unexpected.iter().zip(paired) {
        if !paired {
            issues.push(LayoutIssue::Unexpected {
                name: t.name.clone(),
                ty: t.ty,
                dims: t.dims.clone(),
            });
        }
    }
    issues
}

/// The weights mode whose exact type mix the file follows, if any (the first that fits, so a
/// tiny model whose experts fell back to F16 may match several; the earliest is named).
pub fn detect_mode(cfg: &ModelConfig, tensors: &[TensorInfo]) -> Option<WeightsMode> {
    WeightsMode::ALL
        .into_iter()
        .find(|&m| check_layout(cfg, tensors, Some(m)).is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A tensor table exactly like the layout, in `mode`'s types.
    fn table(cfg: &ModelConfig, mode: WeightsMode) -> Vec<TensorInfo> {
        expected_tensors(cfg)
            .into_iter()
            .map(|s| {
                let ty = storage_type(s.role, mode, s.dims[0]).0;
                let n: u64 = s.dims.iter().product();
                TensorInfo {
                    name: s.name,
                    ty,
                    n_elements: n,
                    n_bytes: ty.row_bytes(n).unwrap(),
                    dims: s.dims,
                    offset: 0,
                }
            })
            .collect()
    }

    #[test]
    fn every_mode_of_flash_is_valid_and_detected() {
        let cfg = ModelConfig::flash();
        for mode in WeightsMode::ALL {
            let t = table(&cfg, mode);
            assert_eq!(check_layout(&cfg, &t, None), vec![], "{mode}");
            assert_eq!(check_layout(&cfg, &t, Some(mode)), vec![], "{mode}");
            assert_eq!(detect_mode(&cfg, &t), Some(mode), "{mode}");
        }
    }

    #[test]
    fn each_kind_of_damage_is_named() {
        let cfg = ModelConfig::flash();
        let good = table(&cfg, WeightsMode::Ds4Q2);

        let mut t = good.clone();
        t.retain(|x| x.name != "blk.7.attn_sinks.weight");
        assert_eq!(
            check_layout(&cfg, &t, None),
            vec![LayoutIssue::Missing {
                name: "blk.7.attn_sinks.weight".into(),
                dims: vec![64]
            }]
        );

        // The router bias is optional (ds4 treats a missing one as zero).
        let mut t = good.clone();
        t.retain(|x| x.name != "blk.7.exp_probs_b.bias");
        assert_eq!(check_layout(&cfg, &t, None), vec![]);

        let mut t = good.clone();
        let mut extra = t[0].clone();
        extra.name = "mtp.0.e_proj.weight".into();
        extra.dims = vec![4096, 4096];
        t.push(extra);
        assert!(matches!(
            &check_layout(&cfg, &t, None)[..],
            [LayoutIssue::Unexpected { name, .. }] if name == "mtp.0.e_proj.weight"
        ));

        let mut t = good.clone();
        let i = t
            .iter()
            .position(|x| x.name == "blk.4.attn_norm.weight")
            .unwrap();
        t[i].ty = GgmlType::F16;
        assert_eq!(
            check_layout(&cfg, &t, None),
            vec![LayoutIssue::WrongType {
                name: "blk.4.attn_norm.weight".into(),
                allowed: vec![GgmlType::F32],
                found: GgmlType::F16
            }]
        );

        let mut t = good.clone();
        let i = t
            .iter()
            .position(|x| x.name == "blk.9.ffn_up_exps.weight")
            .unwrap();
        t[i].ty = GgmlType::Q4K;
        assert_eq!(
            check_layout(&cfg, &t, None),
            vec![LayoutIssue::MismatchedExpertTypes {
                gate: "blk.9.ffn_gate_exps.weight".into(),
                gate_ty: GgmlType::IQ2XXS,
                up_ty: GgmlType::Q4K
            }]
        );
        // Against the exact q2 mix the Q4_K up projection is also the wrong type.
        assert_eq!(check_layout(&cfg, &t, Some(WeightsMode::Ds4Q2)).len(), 2);
    }

    #[test]
    fn fallback_only_when_rows_do_not_fit() {
        use GgmlType as T;
        assert_eq!(
            storage_type(TensorRole::ExpertGateUp, WeightsMode::Ds4Q2, 4096),
            (T::IQ2XXS, false)
        );
        assert_eq!(
            storage_type(TensorRole::ExpertGateUp, WeightsMode::Ds4Q2, 64),
            (T::F16, true)
        );
        assert_eq!(
            storage_type(TensorRole::DenseQ8, WeightsMode::Q8, 48),
            (T::F16, true)
        );
        assert_eq!(
            storage_type(TensorRole::Vector, WeightsMode::Ds4Q4, 7),
            (T::F32, false)
        );
        assert_eq!("ds4-q4".parse::<WeightsMode>(), Ok(WeightsMode::Ds4Q4));
        assert!("q3".parse::<WeightsMode>().is_err());
    }
}
