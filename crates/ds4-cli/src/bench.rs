//! `ds4 bench -m MODEL [--ctx-start 2048] [--ctx-max 32768] [--step-incr 2048 | --step-mul F]
//! [--gen-tokens 128] [--csv F] [--prompt-file F] [--backend cpu|cuda] [--numerics ..]`:
//! ds4-bench's method (ds4-spec.md §6, driver in `ds4_model::bench`): prefill rate of each new
//! context interval and greedy decode rate at each frontier, as a table and as ds4-bench's CSV.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{bail, Context};
use ds4_gguf::reader::GgufFile;
use ds4_model::backend::Backend;
use ds4_model::bench::{
    pseudo_text, pseudo_tokens, repeat_to_len, run_bench, table_header, BenchPlan, BenchRow, Step,
};
use ds4_model::config::ModelConfig;
use ds4_model::cpu::CpuBackend;
use ds4_model::numerics::Numerics;
use ds4_text::tokenizer::Tokenizer;

#[derive(clap::Args)]
pub struct BenchArgs {
    /// Model GGUF (default: ./ds4flash.gguf).
    #[arg(short = 'm', long = "model")]
    model: Option<PathBuf>,
    /// First context frontier.
    #[arg(long, default_value_t = 2048)]
    ctx_start: usize,
    /// Largest context frontier.
    #[arg(long, default_value_t = 32768)]
    ctx_max: usize,
    /// Tokens added between frontiers.
    #[arg(long, default_value_t = 2048, conflicts_with = "step_mul")]
    step_incr: usize,
    /// Multiply the frontier by this factor instead of adding --step-incr.
    #[arg(long)]
    step_mul: Option<f64>,
    /// Tokens greedily decoded at each frontier.
    #[arg(long, default_value_t = 128)]
    gen_tokens: usize,
    /// Context to allocate (default: the last frontier + --gen-tokens).
    #[arg(long)]
    ctx_alloc: Option<usize>,
    /// Also write the rows as CSV (ds4-bench's columns).
    #[arg(long)]
    csv: Option<PathBuf>,
    /// Raw text (no BOS) tokenized and repeated to the largest context; default: a
    /// deterministic pseudo-English text.
    #[arg(long)]
    prompt_file: Option<PathBuf>,
    /// cpu or cuda.
    #[arg(long, default_value = "cpu")]
    backend: String,
    /// reference or ds4 (default: ds4 for the real Flash shape, reference otherwise).
    #[arg(long)]
    numerics: Option<String>,
}

/// The backends `--backend` names.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum BackendKind {
    Cpu,
    Cuda,
}

impl std::str::FromStr for BackendKind {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> anyhow::Result<Self> {
        match s {
            "cpu" => Ok(BackendKind::Cpu),
            "cuda" => Ok(BackendKind::Cuda),
            other => bail!("unknown backend `{other}` (expected cpu or cuda)"),
        }
    }
}

/// Loads the model on the chosen backend.
fn load_backend(
    kind: BackendKind,
    file: Arc<GgufFile>,
    numerics: Numerics,
) -> anyhow::Result<Box<dyn Backend>> {
    match kind {
        BackendKind::Cpu => Ok(Box::new(CpuBackend::from_file(file, numerics)?)),
        BackendKind::Cuda => crate::backend_select::load_backend(
            file,
            Path::new("the model"),
            crate::backend_select::BackendChoice::Cuda,
            numerics,
        ),
    }
}

pub fn run(args: BenchArgs) -> anyhow::Result<()> {
    let kind: BackendKind = args.backend.parse()?;
    let model = crate::chat::resolve_model_path(args.model.as_deref())?;
    let step = match args.step_mul {
        Some(f) => Step::Mul(f),
        None => Step::Incr(args.step_incr),
    };
    let plan = BenchPlan {
        ctx_start: args.ctx_start,
        ctx_max: args.ctx_max,
        step,
        gen_tokens: args.gen_tokens,
    };
    let frontiers = plan.frontiers()?;
    let stream_len = frontiers.last().copied().unwrap_or(0);
    let ctx = match args.ctx_alloc {
        Some(c) => c,
        None => plan.ctx_needed()?,
    };

    let file =
        Arc::new(GgufFile::open(&model).with_context(|| format!("opening {}", model.display()))?);
    let cfg = ModelConfig::from_gguf(&file)
        .with_context(|| format!("reading the model description of {}", model.display()))?;
    let numerics = match args.numerics.as_deref() {
        Some(s) => s.parse().map_err(anyhow::Error::msg)?,
        None if cfg.is_flash() => Numerics::Ds4,
        None => Numerics::Reference,
    };
    let tokenizer = model_tokenizer(&file)
        .with_context(|| format!("reading the tokenizer of {}", model.display()))?;
    let (stream, source) = token_stream(
        tokenizer.as_ref(),
        args.prompt_file.as_deref(),
        cfg.vocab_size,
        stream_len,
    )?;
    // Greedy decoding never stops on EOS (ds4-bench excludes it).
    let exclude: Vec<u32> = tokenizer.iter().map(|t| t.specials().eos).collect();

    let backend = load_backend(kind, file, numerics)
        .with_context(|| format!("loading {}", model.display()))?;
    let mut session = backend.new_session(ctx)?;
    let mut csv = match &args.csv {
        Some(path) => {
            let mut f = std::fs::File::create(path)
                .with_context(|| format!("creating {}", path.display()))?;
            writeln!(f, "{}", BenchRow::CSV_HEADER)?;
            Some((f, path))
        }
        None => None,
    };
    println!(
        "ds4 bench: {} on {} ({} numerics), context {ctx}, {} frontiers, {} gen tokens each, \
         stream: {source}",
        model.display(),
        backend.name(),
        numerics,
        frontiers.len(),
        plan.gen_tokens
    );
    println!("{}", table_header());
    let mut write_error: Option<anyhow::Error> = None;
    run_bench(session.as_mut(), &stream, &plan, &exclude, |row| {
        println!("{row}");
        if let Some((f, path)) = csv.as_mut() {
            // Each row is flushed so an interrupted run keeps what it measured.
            let written = writeln!(f, "{}", row.csv_line()).and_then(|_| f.flush());
            if let Err(e) = written {
                write_error.get_or_insert(
                    anyhow::Error::new(e).context(format!("writing {}", path.display())),
                );
            }
        }
    })?;
    if let Some(e) = write_error {
        return Err(e);
    }
    Ok(())
}

/// The tokenizer stored in the model, if it has one.
fn model_tokenizer(file: &GgufFile) -> anyhow::Result<Option<Tokenizer>> {
    if file.get("tokenizer.ggml.tokens").is_none() {
        return Ok(None);
    }
    let tokens = file.get_string_array("tokenizer.ggml.tokens")?;
    let merges = file.get_string_array("tokenizer.ggml.merges")?;
    Ok(Some(Tokenizer::from_gguf_vocab(tokens, merges)?))
}

/// The benchmark's token stream of `len` tokens and a description of where it came from.
fn token_stream(
    tokenizer: Option<&Tokenizer>,
    prompt_file: Option<&Path>,
    vocab: usize,
    len: usize,
) -> anyhow::Result<(Vec<u32>, String)> {
    let (base, source) = match (prompt_file, tokenizer) {
        (Some(path), Some(tok)) => {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("reading {}", path.display()))?;
            (tok.encode(&text), format!("{} (repeated)", path.display()))
        }
        (Some(path), None) => bail!(
            "--prompt-file {}: the model has no tokenizer (tokenizer.ggml.tokens) to read it with",
            path.display()
        ),
        // About 1.3 tokens per word: enough words that the text rarely needs repeating.
        (None, Some(tok)) => (
            tok.encode(&pseudo_text(len * 3 / 4 + 64)),
            "pseudo-English text".to_string(),
        ),
        (None, None) => (
            pseudo_tokens(vocab, len),
            "pseudo-random ids (the model has no tokenizer)".to_string(),
        ),
    };
    if base.is_empty() {
        bail!("the prompt tokenizes to no tokens");
    }
    if let Some(&bad) = base.iter().find(|&&t| t as usize >= vocab) {
        bail!("token {bad} of the prompt is outside the model's vocabulary of {vocab}");
    }
    Ok((repeat_to_len(&base, len), source))
}
