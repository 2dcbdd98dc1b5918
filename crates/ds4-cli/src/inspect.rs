//! `ds4 inspect MODEL [--ctx N]`: a GGUF file's metadata, tensor table and total size, and for
//! DeepSeek V4 files (`general.architecture = deepseek4`) the model description, the check of
//! the tensor table against ds4's layout, and the session state a context of N tokens needs.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::PathBuf;

use anyhow::Context;
use ds4_gguf::{GgufFile, MetaArray, MetaValue};
use ds4_model::config::{AttnKind, ModelConfig};
use ds4_model::layout::{check_layout, detect_mode, WeightsMode};
use ds4_model::session::{kv_bytes, kv_bytes_per_token};

#[derive(clap::Args)]
pub struct InspectArgs {
    /// GGUF file.
    pub model: PathBuf,
    /// Context length for the KV/session state estimate.
    #[arg(long, default_value_t = 4096)]
    pub ctx: u64,
    /// Print every element of metadata arrays (default: the first 8).
    #[arg(long)]
    pub full: bool,
}

/// Array elements shown without --full.
const SHORT_ARRAY: usize = 8;

pub fn run(args: InspectArgs) -> anyhow::Result<()> {
    let mut out = String::new();
    let result = report(&args, &mut out);
    print!("{out}");
    result
}

/// Writes the report of `args.model` to `out`; an error when the file cannot be read or a
/// DeepSeek V4 file does not have the layout (after the report lists every problem).
fn report(args: &InspectArgs, out: &mut String) -> anyhow::Result<()> {
    let file =
        GgufFile::open(&args.model).with_context(|| format!("reading {}", args.model.display()))?;
    writeln!(
        out,
        "{}: GGUF v3, {} bytes, {} metadata keys, {} tensors, alignment {}, data at {}",
        args.model.display(),
        file.file_len(),
        file.metadata().len(),
        file.tensors().len(),
        file.alignment(),
        file.data_offset()
    )?;

    writeln!(out, "\nmetadata:")?;
    for (key, value) in file.metadata() {
        writeln!(
            out,
            "  {key} = {}",
            format_value(value, if args.full { usize::MAX } else { SHORT_ARRAY })
        )?;
    }

    writeln!(out, "\ntensors:")?;
    let width = file
        .tensors()
        .iter()
        .map(|t| t.name.len())
        .max()
        .unwrap_or(0);
    let mut per_type: BTreeMap<&str, (usize, u64)> = BTreeMap::new();
    let mut total = 0u64;
    for t in file.tensors() {
        writeln!(
            out,
            "  {:width$}  {:7}  {:24}  {:>12}",
            t.name,
            t.ty.name(),
            format!("{:?}", t.dims),
            t.n_bytes
        )?;
        let e = per_type.entry(t.ty.name()).or_default();
        e.0 += 1;
        e.1 += t.n_bytes;
        total += t.n_bytes;
    }
    writeln!(out, "\ntensor data: {} ({total} bytes)", human(total))?;
    for (ty, (n, bytes)) in &per_type {
        writeln!(out, "  {ty:7} {n:5} tensors  {}", human(*bytes))?;
    }

    let arch = file.get("general.architecture").and_then(|v| v.as_str());
    if arch != Some("deepseek4") {
        writeln!(
            out,
            "\ngeneral.architecture is {}: no DeepSeek V4 layout check",
            arch.map_or("absent".to_string(), |a| format!("'{a}'"))
        )?;
        return Ok(());
    }
    let cfg = ModelConfig::from_gguf(&file).context("reading the DeepSeek V4 description")?;
    print_config(&cfg, out)?;
    print_state(&cfg, args.ctx, out)?;

    let issues = check_layout(&cfg, file.tensors(), None);
    if issues.is_empty() {
        // The mix convert recorded, if the types follow it; else the first mix that fits.
        let recorded = file
            .get("deepseek4.convert.weights")
            .and_then(|v| v.as_str())
            .and_then(|s| s.parse::<WeightsMode>().ok())
            .filter(|&m| check_layout(&cfg, file.tensors(), Some(m)).is_empty());
        match recorded.or_else(|| detect_mode(&cfg, file.tensors())) {
            Some(mode) => writeln!(out, "\nlayout: valid (types follow the {mode} mix)")?,
            None => writeln!(out, "\nlayout: valid (a mix of supported types)")?,
        }
        return Ok(());
    }
    writeln!(out, "\nlayout: {} problem(s)", issues.len())?;
    for issue in &issues {
        writeln!(out, "  {issue}")?;
    }
    anyhow::bail!(
        "{} does not have the DeepSeek V4 tensor layout: {}",
        args.model.display(),
        issues[0]
    )
}

fn print_config(cfg: &ModelConfig, out: &mut String) -> std::fmt::Result {
    let kinds: Vec<&str> = cfg
        .attn_kind
        .iter()
        .map(|k| match k {
            AttnKind::Sliding => "S",
            AttnKind::Csa => "CSA",
            AttnKind::Hca => "HCA",
        })
        .collect();
    writeln!(
        out,
        "\nmodel: {} layers [{}], hidden {}, vocabulary {}{}",
        cfg.n_layers,
        kinds.join(" "),
        cfg.hidden,
        cfg.vocab_size,
        if cfg.is_flash() {
            " (DeepSeek V4 Flash)"
        } else {
            ""
        }
    )?;
    writeln!(
        out,
        "  attention: {} heads × {} (rope {}), q rank {}, {} output groups × {}, window {}",
        cfg.n_heads,
        cfg.head_dim,
        cfg.rope_dim,
        cfg.q_lora_rank,
        cfg.o_groups,
        cfg.o_lora_rank,
        cfg.sliding_window
    )?;
    writeln!(
        out,
        "  compress ratios {:?}; indexer {} heads × {} top-{}",
        cfg.compress_ratio, cfg.index_heads, cfg.index_head_dim, cfg.index_topk
    )?;
    let n_hash = cfg
        .moe_kind
        .iter()
        .filter(|k| **k == ds4_model::config::MoeKind::Hash)
        .count();
    writeln!(
        out,
        "  MoE: {} experts, {} used, ff {}, {} hash layers, scale {}",
        cfg.n_experts, cfg.n_experts_used, cfg.expert_ff, n_hash, cfg.routed_scale
    )?;
    writeln!(
        out,
        "  RoPE: main θ {}, compress θ {}{}",
        cfg.rope_main.theta,
        cfg.rope_compress.theta,
        match cfg.rope_compress.yarn {
            Some(y) => format!(
                " + YaRN ×{} (original {}, β {}/{})",
                y.factor, y.original_ctx, y.beta_fast, y.beta_slow
            ),
            None => String::new(),
        }
    )
}

// KV-STATE: the session state of one sequence at `ctx` tokens, as ds4_model::session sizes it
// (raw windows, compressed rows and indexer keys at capacity, compressor frontiers; f32).
fn print_state(cfg: &ModelConfig, ctx: u64, out: &mut String) -> std::fmt::Result {
    let ctx = usize::try_from(ctx).unwrap_or(usize::MAX);
    writeln!(
        out,
        "  KV state at ctx {ctx}: {} (+{:.1} bytes per token of context)",
        human(kv_bytes(cfg, ctx)),
        kv_bytes_per_token(cfg)
    )
}

fn human(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = bytes as f64;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < UNITS.len() {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{bytes} B")
    } else {
        format!("{v:.2} {}", UNITS[u])
    }
}

fn format_value(v: &MetaValue, max_items: usize) -> String {
    match v {
        MetaValue::String(s) => format!("{s:?}"),
        MetaValue::Array(a) => format_array(a, max_items),
        MetaValue::U8(x) => format!("{x} (u8)"),
        MetaValue::I8(x) => format!("{x} (i8)"),
        MetaValue::U16(x) => format!("{x} (u16)"),
        MetaValue::I16(x) => format!("{x} (i16)"),
        MetaValue::U32(x) => format!("{x} (u32)"),
        MetaValue::I32(x) => format!("{x} (i32)"),
        MetaValue::U64(x) => format!("{x} (u64)"),
        MetaValue::I64(x) => format!("{x} (i64)"),
        MetaValue::F32(x) => format!("{x} (f32)"),
        MetaValue::F64(x) => format!("{x} (f64)"),
        MetaValue::Bool(x) => format!("{x}"),
    }
}

fn format_array(a: &MetaArray, max_items: usize) -> String {
    fn list<T>(v: &[T], max: usize, f: impl Fn(&T) -> String) -> String {
        let mut parts: Vec<String> = v.iter().take(max).map(f).collect();
        if v.len() > max {
            parts.push("…".to_string());
        }
        parts.join(", ")
    }
    let items = match a {
        MetaArray::U8(v) => list(v, max_items, |x| x.to_string()),
        MetaArray::I8(v) => list(v, max_items, |x| x.to_string()),
        MetaArray::U16(v) => list(v, max_items, |x| x.to_string()),
        MetaArray::I16(v) => list(v, max_items, |x| x.to_string()),
        MetaArray::U32(v) => list(v, max_items, |x| x.to_string()),
        MetaArray::I32(v) => list(v, max_items, |x| x.to_string()),
        MetaArray::U64(v) => list(v, max_items, |x| x.to_string()),
        MetaArray::I64(v) => list(v, max_items, |x| x.to_string()),
        MetaArray::F32(v) => list(v, max_items, |x| x.to_string()),
        MetaArray::F64(v) => list(v, max_items, |x| x.to_string()),
        MetaArray::Bool(v) => list(v, max_items, |x| x.to_string()),
        MetaArray::String(v) => list(v, max_items, |x| format!("{x:?}")),
        MetaArray::Array(v) => list(v, max_items, |x| format_array(x, max_items)),
    };
    format!("[{} × {}] [{items}]", a.elem_type(), a.len())
}

#[cfg(test)]
mod tests {
    use super::*;
    use ds4_gguf::writer::GgufWriter;
    use ds4_model::convert::{convert, ConvertOptions};
    use std::path::Path;

    fn scratch(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("ds4-inspect-{}-{tag}", std::process::id()));
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    /// An edit of one tensor info: (name, dims) → (name, dims).
    type InfoEdit = dyn Fn(&str, &[u64]) -> (String, Vec<u64>);

    /// `flash_mini` converted to f32, then rewritten with `edit` applied to every tensor info.
    fn converted(tag: &str, edit: &InfoEdit) -> PathBuf {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/models");
        let clean = scratch(tag).join("clean.gguf");
        let opts = ConvertOptions::new(WeightsMode::F32);
        convert(&dir.join("flash_mini"), &clean, &opts).unwrap();
        let file = GgufFile::open(&clean).unwrap();
        let mut w = GgufWriter::new();
        for (k, v) in file.metadata() {
            w.add_meta(k.clone(), v.clone());
        }
        for t in file.tensors() {
            let (name, dims) = edit(&t.name, &t.dims);
            let data = file.tensor_data(&t.name).unwrap().to_vec();
            w.add_tensor(&name, t.ty, &dims, data).unwrap();
        }
        let out = scratch(tag).join("edited.gguf");
        w.write_to_path(&out).unwrap();
        out
    }

    fn inspect(path: &Path) -> (String, anyhow::Result<()>) {
        let args = InspectArgs {
            model: path.to_path_buf(),
            ctx: 1000,
            full: false,
        };
        let mut out = String::new();
        let r = report(&args, &mut out);
        (out, r)
    }

    fn problems(out: &str) -> Vec<&str> {
        let start = out.find("\nlayout: ").expect("a layout line");
        out[start..].lines().skip(2).collect()
    }

    #[test]
    fn a_converted_tiny_model_is_valid() {
        let path = converted("valid", &|n, d| (n.to_string(), d.to_vec()));
        let (out, r) = inspect(&path);
        assert!(r.is_ok(), "{out}");
        assert!(
            out.contains("\nlayout: valid (types follow the f32 mix)"),
            "{out}"
        );
        assert!(out.contains("model: 6 layers [S S CSA HCA CSA HCA], hidden 64"));
        assert!(
            out.contains("deepseek4.attention.compress_ratios = [UINT32 × 6] [0, 0, 4, 16, 4, 16]")
        );
        assert!(out.contains("blk.5.ffn_down_exps.weight"));
    }

    #[test]
    fn a_renamed_tensor_is_reported_exactly() {
        let path = converted("renamed", &|n, d| {
            let n = if n == "blk.4.indexer.proj.weight" {
                "blk.4.indexer.projection.weight"
            } else {
                n
            };
            (n.to_string(), d.to_vec())
        });
        let (out, r) = inspect(&path);
        assert!(r.is_err());
        assert_eq!(
            problems(&out),
            vec![
                "  tensor blk.4.indexer.proj.weight is missing and blk.4.indexer.projection.weight \
                 (same type and shape) is not part of the layout: renamed?"
            ],
            "{out}"
        );
    }

    #[test]
    fn a_changed_shape_is_reported_exactly() {
        let path = converted("shape", &|n, d| {
            let d = if n == "blk.1.attn_sinks.weight" {
                vec![d[0], 1]
            } else {
                d.to_vec()
            };
            (n.to_string(), d)
        });
        let (out, r) = inspect(&path);
        assert!(r.is_err());
        assert_eq!(
            problems(&out),
            vec!["  tensor blk.1.attn_sinks.weight has shape [4, 1], expected [4]"],
            "{out}"
        );
    }
}
