//! `ds4 inspect MODEL [--ctx N]`: a GGUF file's metadata, tensor table and total size, and for
//! DeepSeek V4 files (`general.architecture = deepseek4`) the model description, the check of
//! the tensor table against ds4's layout, and the session state a context of N tokens needs.

use std::collections::BTreeMap;
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
    let file =
        GgufFile::open(&args.model).with_context(|| format!("reading {}", args.model.display()))?;
    println!(
        "{}: GGUF v3, {} bytes, {} metadata keys, {} tensors, alignment {}, data at {}",
        args.model.display(),
        file.file_len(),
        file.metadata().len(),
        file.tensors().len(),
        file.alignment(),
        file.data_offset()
    );

    println!("\nmetadata:");
    for (key, value) in file.metadata() {
        println!(
            "  {key} = {}",
            format_value(value, if args.full { usize::MAX } else { SHORT_ARRAY })
        );
    }

    println!("\ntensors:");
    let width = file
        .tensors()
        .iter()
        .map(|t| t.name.len())
        .max()
        .unwrap_or(0);
    let mut per_type: BTreeMap<&str, (usize, u64)> = BTreeMap::new();
    let mut total = 0u64;
    for t in file.tensors() {
        println!(
            "  {:width$}  {:7}  {:24}  {:>12}",
            t.name,
            t.ty.name(),
            format!("{:?}", t.dims),
            t.n_bytes
        );
        let e = per_type.entry(t.ty.name()).or_default();
        e.0 += 1;
        e.1 += t.n_bytes;
        total += t.n_bytes;
    }
    println!("\ntensor data: {} ({total} bytes)", human(total));
    for (ty, (n, bytes)) in &per_type {
        println!("  {ty:7} {n:5} tensors  {}", human(*bytes));
    }

    let arch = file.get("general.architecture").and_then(|v| v.as_str());
    if arch != Some("deepseek4") {
        println!(
            "\ngeneral.architecture is {}: no DeepSeek V4 layout check",
            arch.map_or("absent".to_string(), |a| format!("'{a}'"))
        );
        return Ok(());
    }
    let cfg = ModelConfig::from_gguf(&file).context("reading the DeepSeek V4 description")?;
    print_config(&cfg);
    print_state(&cfg, args.ctx);

    let issues = check_layout(&cfg, file.tensors(), None);
    if issues.is_empty() {
        // The mix convert recorded, if the types follow it; else the first mix that fits.
        let recorded = file
            .get("deepseek4.convert.weights")
            .and_then(|v| v.as_str())
            .and_then(|s| s.parse::<WeightsMode>().ok())
            .filter(|&m| check_layout(&cfg, file.tensors(), Some(m)).is_empty());
        match recorded.or_else(|| detect_mode(&cfg, file.tensors())) {
            Some(mode) => println!("\nlayout: valid (types follow the {mode} mix)"),
            None => println!("\nlayout: valid (a mix of supported types)"),
        }
        return Ok(());
    }
    println!("\nlayout: {} problem(s)", issues.len());
    for issue in &issues {
        println!("  {issue}");
    }
    anyhow::bail!(
        "{} does not have the DeepSeek V4 tensor layout: {}",
        args.model.display(),
        issues[0]
    )
}

fn print_config(cfg: &ModelConfig) {
    let kinds: Vec<&str> = cfg
        .attn_kind
        .iter()
        .map(|k| match k {
            AttnKind::Sliding => "S",
            AttnKind::Csa => "CSA",
            AttnKind::Hca => "HCA",
        })
        .collect();
    println!(
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
    );
    println!(
        "  attention: {} heads × {} (rope {}), q rank {}, {} output groups × {}, window {}",
        cfg.n_heads,
        cfg.head_dim,
        cfg.rope_dim,
        cfg.q_lora_rank,
        cfg.o_groups,
        cfg.o_lora_rank,
        cfg.sliding_window
    );
    println!(
        "  compress ratios {:?}; indexer {} heads × {} top-{}",
        cfg.compress_ratio, cfg.index_heads, cfg.index_head_dim, cfg.index_topk
    );
    let n_hash = cfg
        .moe_kind
        .iter()
        .filter(|k| **k == ds4_model::config::MoeKind::Hash)
        .count();
    println!(
        "  MoE: {} experts, {} used, ff {}, {} hash layers, scale {}",
        cfg.n_experts, cfg.n_experts_used, cfg.expert_ff, n_hash, cfg.routed_scale
    );
    println!(
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
    );
}

// KV-STATE: the session state of one sequence at `ctx` tokens, as ds4_model::session sizes it
// (raw windows, compressed rows and indexer keys at capacity, compressor frontiers; f32).
fn print_state(cfg: &ModelConfig, ctx: u64) {
    let ctx = usize::try_from(ctx).unwrap_or(usize::MAX);
    println!(
        "  KV state at ctx {ctx}: {} (+{:.1} bytes per token of context)",
        human(kv_bytes(cfg, ctx)),
        kv_bytes_per_token(cfg)
    );
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
