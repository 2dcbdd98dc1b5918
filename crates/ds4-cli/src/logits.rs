//! `ds4 logits`: the logits of every position of a token sequence, as a little-endian f32
//! `.npy` of shape [n_tokens, vocab] (DESIGN.md §3). The modes feed the same tokens through
//! a session differently (one prefill, fixed-size chunks, one token at a time); all agree.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use ds4_model::backend::{eval_all_positions, EvalMode};
use ds4_model::numerics::Numerics;

#[derive(clap::Args)]
pub struct LogitsArgs {
    /// Model GGUF (default: ./ds4flash.gguf).
    #[arg(short = 'm', long = "model")]
    model: Option<PathBuf>,
    /// Comma-separated token ids, e.g. 0,128803,23166.
    #[arg(
        long,
        conflicts_with = "tokens_file",
        required_unless_present = "tokens_file"
    )]
    tokens: Option<String>,
    /// Token ids from a file: .npy (int32/int64, 1-D) or text (ids separated by commas or
    /// whitespace).
    #[arg(long)]
    tokens_file: Option<PathBuf>,
    /// Output .npy (f32, [n_tokens, vocab]).
    #[arg(short = 'o', long = "output")]
    output: PathBuf,
    /// full (one prefill), chunked:N (prefill in N-token spans) or decode (one token at a time).
    #[arg(long, default_value = "full")]
    mode: String,
    /// reference (transformers' f32 math) or ds4 (FP8 KV, FP4 indexer, f16 cache rows,
    /// quantized activations). Default: ds4 for the real DeepSeek V4 Flash shape, reference
    /// for any other (test-sized) model.
    #[arg(long)]
    numerics: Option<String>,
    /// auto (CUDA when a GPU is usable), cpu or cuda.
    #[arg(long, default_value = "auto")]
    backend: String,
    /// Context to allocate (default: the number of tokens).
    #[arg(long)]
    ctx: Option<usize>,
}

pub fn run(args: LogitsArgs) -> anyhow::Result<()> {
    let model = crate::chat::resolve_model_path(args.model.as_deref())?;
    let tokens = match (&args.tokens, &args.tokens_file) {
        (Some(list), _) => parse_token_text(list).context("--tokens")?,
        (None, Some(path)) => read_tokens_file(path)?,
        (None, None) => bail!("pass --tokens or --tokens-file"),
    };
    if tokens.is_empty() {
        bail!("no tokens given");
    }
    let mode: EvalMode = args.mode.parse().map_err(anyhow::Error::msg)?;
    let explicit: Option<Numerics> = args
        .numerics
        .as_deref()
        .map(str::parse)
        .transpose()
        .map_err(anyhow::Error::msg)?;
    let choice: crate::backend_select::BackendChoice = args.backend.parse()?;
    // The numerics default depends on the model, which is only known after reading it.
    let opened = crate::model_file::ModelFile::open(&model)?;
    let numerics = explicit.unwrap_or(crate::model_file::default_numerics(&opened.cfg));
    let ctx = args.ctx.unwrap_or(tokens.len());
    let backend = crate::backend_select::load_backend(opened.file, &model, choice, numerics, ctx)?;
    let vocab = backend.config().vocab_size;
    let mut session = backend.new_session(ctx)?;
    let logits = eval_all_positions(session.as_mut(), &tokens, mode)?;
    let bytes = ds4_model::npy::write_f32(&[tokens.len(), vocab], &logits);
    std::fs::write(&args.output, bytes)
        .with_context(|| format!("writing {}", args.output.display()))?;
    eprintln!(
        "ds4 logits: {} tokens × {vocab} → {} ({} numerics, {:?})",
        tokens.len(),
        args.output.display(),
        numerics,
        mode
    );
    Ok(())
}

fn parse_token_text(text: &str) -> anyhow::Result<Vec<u32>> {
    text.split(|c: char| c == ',' || c.is_whitespace())
        .filter(|s| !s.is_empty())
        .map(|s| {
            s.parse::<u32>()
                .with_context(|| format!("`{s}` is not a token id"))
        })
        .collect()
}

fn read_tokens_file(path: &Path) -> anyhow::Result<Vec<u32>> {
    let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    if bytes.starts_with(b"\x93NUMPY") {
        let a = ds4_model::npy::read(&bytes)
            .map_err(anyhow::Error::msg)
            .with_context(|| format!("reading {}", path.display()))?;
        if !a.dtype.contains('i') {
            bail!(
                "{}: token ids must be int32 or int64, found {}",
                path.display(),
                a.dtype
            );
        }
        return a
            .data
            .iter()
            .map(|&v| {
                if v >= 0.0 && v <= u32::MAX as f64 {
                    Ok(v as u32)
                } else {
                    bail!("{}: {v} is not a token id", path.display())
                }
            })
            .collect();
    }
    let text = String::from_utf8(bytes)
        .with_context(|| format!("{} is neither .npy nor UTF-8 text", path.display()))?;
    parse_token_text(&text).with_context(|| format!("reading {}", path.display()))
}
