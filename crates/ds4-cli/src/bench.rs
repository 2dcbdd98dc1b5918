//! `ds4 bench -m MODEL [--ctx-start 2048] [--ctx-max 32768] [--step-incr 2048 | --step-mul F]
//! [--gen-tokens 128] [--csv F] [--prompt-file F] [--backend cpu|cuda] [--numerics ..]`:
//! ds4-bench's method (ds4-spec.md §6, driver in `ds4_model::bench`): prefill rate of each new
//! context interval and greedy decode rate at each frontier, as a table and as ds4-bench's CSV.
//!
//! `ds4 bench -m MODEL --kv-restore-tokens N [--kv-dir D] [--kv-drop-cache]` measures the disk
//! KV cache instead (see [`kv_restore`]): prefill N tokens vs restore them from a `.kv` file.

mod kv_restore;

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

use crate::model_file::{gguf_tokenizer, ModelFile};

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
    /// Context to allocate (default: the last frontier + --gen-tokens; with
    /// --kv-restore-tokens N: N + 9, the compared continuation and the checkpoint rule).
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
    /// Instead of the context sweep: prefill N tokens, save the session as a `.kv` file as
    /// `ds4 serve --kv-disk-dir` does, restore it into a fresh session, time both ways and
    /// check that the restored session continues bit-identically.
    #[arg(
        long,
        value_name = "N",
        conflicts_with_all = ["ctx_start", "ctx_max", "step_incr", "step_mul", "gen_tokens", "csv"]
    )]
    kv_restore_tokens: Option<usize>,
    /// Directory of the `.kv` file of --kv-restore-tokens, kept afterwards (default: a
    /// temporary directory, removed).
    #[arg(long, value_name = "DIR", requires = "kv_restore_tokens")]
    kv_dir: Option<PathBuf>,
    /// Drop the OS page cache before the restore (writes /proc/sys/vm/drop_caches, which
    /// needs root), so the file is read from the disk; reported when it cannot.
    #[arg(long, requires = "kv_restore_tokens")]
    kv_drop_cache: bool,
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

/// Loads the model on the chosen backend, for sessions of `ctx` tokens.
fn load_backend(
    kind: BackendKind,
    file: Arc<GgufFile>,
    numerics: Numerics,
    ctx: usize,
) -> anyhow::Result<Box<dyn Backend>> {
    match kind {
        BackendKind::Cpu => Ok(Box::new(CpuBackend::from_file(file, numerics)?)),
        BackendKind::Cuda => crate::backend_select::load_backend(
            file,
            Path::new("the model"),
            crate::backend_select::BackendChoice::Cuda,
            numerics,
            ctx,
        ),
    }
}

/// The model file, its description, numerics and tokenizer.
struct OpenedModel {
    path: PathBuf,
    file: Arc<GgufFile>,
    cfg: ModelConfig,
    numerics: Numerics,
    tokenizer: Option<Tokenizer>,
}

impl OpenedModel {
    fn open(args: &BenchArgs) -> anyhow::Result<OpenedModel> {
        let path = crate::chat::resolve_model_path(args.model.as_deref())?;
        let model = ModelFile::open(&path)?;
        let numerics = model.numerics(args.numerics.as_deref())?;
        let ModelFile { path, file, cfg } = model;
        // A synthetic model may carry no tokenizer.
        let tokenizer = match file.get("tokenizer.ggml.tokens") {
            Some(_) => Some(gguf_tokenizer(&file, &path)?),
            None => None,
        };
        Ok(OpenedModel {
            path,
            file,
            cfg,
            numerics,
            tokenizer,
        })
    }

    /// Greedy decoding never stops on EOS (ds4-bench excludes it).
    fn excluded(&self) -> Vec<u32> {
        self.tokenizer.iter().map(|t| t.specials().eos).collect()
    }

    fn load(&self, kind: BackendKind, ctx: usize) -> anyhow::Result<Box<dyn Backend>> {
        load_backend(kind, self.file.clone(), self.numerics, ctx)
            .with_context(|| format!("loading {}", self.path.display()))
    }
}

pub fn run(args: BenchArgs) -> anyhow::Result<()> {
    let kind: BackendKind = args.backend.parse()?;
    match args.kv_restore_tokens {
        Some(n) => run_kv_restore(&args, kind, n),
        None => run_sweep(&args, kind),
    }
}

/// The context sweep (ds4-bench's method).
fn run_sweep(args: &BenchArgs, kind: BackendKind) -> anyhow::Result<()> {
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

    let model = OpenedModel::open(args)?;
    let (stream, source) = token_stream(
        model.tokenizer.as_ref(),
        args.prompt_file.as_deref(),
        model.cfg.vocab_size,
        stream_len,
    )?;
    let exclude = model.excluded();

    let backend = model.load(kind, ctx)?;
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
        model.path.display(),
        backend.name(),
        model.numerics,
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
    // The session's state and scratch are allocated up front for the whole context, so this
    // is about the sweep's peak (device-wide: other processes' memory included).
    if let Some((used, total)) = backend.device_memory() {
        println!(
            "device memory in use after the sweep: {} MiB of {} MiB",
            used >> 20,
            total >> 20
        );
    }
    // The fit checks' plan for the session against what it took (its KV cache, scratch,
    // quantized activations and decode graphs).
    if let Some((planned, taken)) = backend.session_memory(ctx) {
        println!(
            "session of {ctx} tokens: {} MiB planned, {} MiB taken",
            planned >> 20,
            taken >> 20
        );
    }
    Ok(())
}

/// `--kv-restore-tokens N`: prefill vs restore from a `.kv` file.
fn run_kv_restore(args: &BenchArgs, kind: BackendKind, n: usize) -> anyhow::Result<()> {
    if n == 0 {
        bail!("--kv-restore-tokens must be at least 1");
    }
    let needed = n + kv_restore::CONTINUATION + 1;
    let ctx = args.ctx_alloc.unwrap_or(needed);
    if ctx < needed {
        bail!(
            "--ctx-alloc {ctx} is too small for --kv-restore-tokens {n}: the session needs {needed} \
             ({n} tokens, {} compared continuation tokens, and a checkpoint must be shorter than \
             its context)",
            kv_restore::CONTINUATION
        );
    }
    // A bad --kv-dir fails now, not after the model is loaded.
    if let Some(dir) = &args.kv_dir {
        std::fs::create_dir_all(dir)
            .with_context(|| format!("--kv-dir {}: cannot create the directory", dir.display()))?;
    }
    let model = OpenedModel::open(args)?;
    let (tokens, source) = token_stream(
        model.tokenizer.as_ref(),
        args.prompt_file.as_deref(),
        model.cfg.vocab_size,
        n,
    )?;
    let plan = kv_restore::KvRestorePlan {
        key: kv_restore::key_text(model.tokenizer.as_ref(), &tokens),
        tokens: &tokens,
        ctx,
        dir: args.kv_dir.clone(),
        drop_cache: args.kv_drop_cache,
        quant_bits: crate::kv_session::routed_quant_bits(&model.file),
        exclude: model.excluded(),
    };
    let backend = model.load(kind, ctx)?;
    println!(
        "ds4 bench: kv restore of {n} tokens, {} on {} ({} numerics), context {ctx}, stream: {source}",
        model.path.display(),
        backend.name(),
        model.numerics
    );
    let report = kv_restore::measure(backend.as_ref(), &plan)?;
    println!("{}", report.table());
    println!("{}", report.details());
    if !report.logits_identical {
        bail!("the restored session's next-token logits differ from the live session's");
    }
    if !report.continuation_identical() {
        bail!(
            "the restored session's greedy continuation differs from the live session's at step {}",
            report.steps_identical
        );
    }
    Ok(())
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
