//! `ds4` without a subcommand: chat with the model. One-shot with `-p`/`--prompt-file`
//! (render one turn, prefill, stream the reply), interactive without (a `ds4>` prompt whose
//! turns extend one live session). Flags follow ds4's (ds4-spec.md §6, DESIGN.md §3).
//!
//! Output streams: the answer goes to stdout; the reasoning of a thinking turn goes to stderr
//! (dimmed on a terminal), so `ds4 -p ... > answer.txt` captures only the answer. Statistics,
//! notices and the prefill progress bar also go to stderr.

pub(crate) mod bundled;
mod generate;
mod logprobs;
mod printer;
mod repl;
mod transcript;

use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use ds4_model::backend::Backend;
use ds4_text::chat::{render_single_turn, ThinkMode, DEFAULT_SYSTEM};
use ds4_text::sampler::{
    SamplerParams, DEFAULT_MIN_P, DEFAULT_TEMPERATURE, DEFAULT_TOP_K, DEFAULT_TOP_P, MAX_TOP_K,
};
use ds4_text::tokenizer::{Tokenizer, BOS, USER};

use crate::backend_select::{load_backend, BackendChoice};
use crate::model_file::{check_vocab, gguf_tokenizer, ModelFile};
use generate::{generate, prefill, Interrupt, StopReason};
use printer::TokenPrinter;

/// ds4's conventional model path, used when `-m` is not given.
const DEFAULT_MODEL: &str = "ds4flash.gguf";
/// ds4's default for `-n`.
const DEFAULT_MAX_TOKENS: usize = 50_000;
/// ds4's default and cap for `--logprobs-top-k`.
const DEFAULT_LOGPROBS_TOP_K: usize = 20;
const MAX_LOGPROBS_TOP_K: usize = 128;

#[derive(clap::Args, Debug)]
pub struct ChatArgs {
    /// Model GGUF (default: ./ds4flash.gguf, else the bundled tiny test model).
    #[arg(short = 'm', long = "model")]
    model: Option<PathBuf>,
    /// One-shot: answer this prompt and exit (interactive chat without it).
    #[arg(short = 'p', long = "prompt", conflicts_with = "prompt_file")]
    prompt: Option<String>,
    /// One-shot with the prompt read from a file.
    #[arg(long = "prompt-file")]
    prompt_file: Option<PathBuf>,
    /// System prompt (`-sys` also works, as in ds4).
    #[arg(long = "system", default_value = DEFAULT_SYSTEM)]
    system: String,
    /// Answer without thinking.
    #[arg(long, conflicts_with_all = ["think", "think_max"])]
    nothink: bool,
    /// Think before answering (the default). The reasoning is written to stderr.
    #[arg(long)]
    think: bool,
    /// Think Max (needs --ctx >= 393216; below that, normal thinking).
    #[arg(long = "think-max", conflicts_with = "think")]
    think_max: bool,
    /// Sampling temperature (0: greedy).
    #[arg(long = "temp", default_value_t = DEFAULT_TEMPERATURE)]
    temp: f32,
    /// Nucleus sampling threshold (1: off).
    #[arg(long = "top-p", default_value_t = DEFAULT_TOP_P)]
    top_p: f32,
    /// Keep only the K most likely tokens (0: off; ds4's CLI has no top-k).
    #[arg(long = "top-k", default_value_t = DEFAULT_TOP_K)]
    top_k: i32,
    /// Drop tokens less likely than this fraction of the most likely one.
    #[arg(long = "min-p", default_value_t = DEFAULT_MIN_P)]
    min_p: f32,
    /// Sampling seed (default: time-based). The same seed gives the same output.
    #[arg(long)]
    seed: Option<u64>,
    /// Most tokens to generate per reply.
    #[arg(short = 'n', long = "tokens", default_value_t = DEFAULT_MAX_TOKENS)]
    max_tokens: usize,
    /// Context size in tokens.
    #[arg(short = 'c', long = "ctx", default_value_t = 32768)]
    ctx: usize,
    /// auto, cpu or cuda.
    #[arg(long, default_value = "auto")]
    backend: String,
    /// reference or ds4 (default: ds4 for the real Flash shape, reference otherwise).
    #[arg(long)]
    numerics: Option<String>,
    /// Print the prompt's tokens (position, id, text) to stdout and exit without generating.
    #[arg(long = "dump-tokens")]
    dump_tokens: bool,
    /// Greedy-decode the prompt and write each step's top log-probabilities as JSON (ds4's
    /// shape) to FILE.
    #[arg(long = "dump-logprobs", value_name = "FILE")]
    dump_logprobs: Option<PathBuf>,
    /// Entries per step in --dump-logprobs (at most 128).
    #[arg(long = "logprobs-top-k", default_value_t = DEFAULT_LOGPROBS_TOP_K)]
    logprobs_top_k: usize,
}

/// Rewrites ds4's single-dash long flag `-sys` to `--system` (clap's short flags are one
/// character). Applied to the command line before parsing.
pub fn normalize_args(
    args: impl IntoIterator<Item = std::ffi::OsString>,
) -> Vec<std::ffi::OsString> {
    args.into_iter()
        .map(|a| match a.to_str() {
            Some("-sys") => "--system".into(),
            Some(s) if s.starts_with("-sys=") => format!("--system={}", &s[5..]).into(),
            _ => a,
        })
        .collect()
}

impl ChatArgs {
    fn think_mode(&self) -> ThinkMode {
        if self.nothink {
            ThinkMode::Off
        } else if self.think_max {
            ThinkMode::Max
        } else {
            ThinkMode::High
        }
    }

    fn sampler_params(&self) -> anyhow::Result<SamplerParams> {
        if !self.temp.is_finite() || self.temp < 0.0 {
            bail!("--temp must be a number >= 0, got {}", self.temp);
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            bail!("--top-p must be in (0, 1], got {}", self.top_p);
        }
        if !(0.0..=1.0).contains(&self.min_p) {
            bail!("--min-p must be in [0, 1], got {}", self.min_p);
        }
        if self.top_k < 0 || self.top_k as usize > MAX_TOP_K {
            bail!("--top-k must be in 0..={MAX_TOP_K}, got {}", self.top_k);
        }
        Ok(SamplerParams {
            temperature: self.temp,
            top_p: self.top_p,
            top_k: self.top_k,
            min_p: self.min_p,
            seed: self.seed.unwrap_or_else(time_seed),
        })
    }
}

/// A seed that differs between runs (ds4 mixes the time and the process id).
fn time_seed() -> u64 {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0);
    (nanos ^ (u64::from(std::process::id()) << 32)) | 1
}

/// Where the model comes from.
pub(crate) struct ModelSource {
    pub path: PathBuf,
    /// The bundled tiny test model (random weights).
    pub bundled: bool,
}

/// `-m`, else ./ds4flash.gguf, else the bundled tiny test model (DESIGN.md §3; other commands
/// that run a model can share this rule).
pub(crate) fn resolve_model(arg: Option<&Path>) -> anyhow::Result<ModelSource> {
    if let Some(path) = arg {
        if !path.exists() {
            bail!("{}", missing_model_message(path));
        }
        return Ok(ModelSource {
            path: path.to_path_buf(),
            bundled: false,
        });
    }
    if Path::new(DEFAULT_MODEL).exists() {
        return Ok(ModelSource {
            path: PathBuf::from(DEFAULT_MODEL),
            bundled: false,
        });
    }
    Ok(ModelSource {
        path: bundled::materialize()?,
        bundled: true,
    })
}

/// [`resolve_model`] for the commands other than chat: the path to open, with the bundled
/// model's notice printed on stderr when it is the one chosen.
pub(crate) fn resolve_model_path(arg: Option<&Path>) -> anyhow::Result<PathBuf> {
    let source = resolve_model(arg)?;
    if source.bundled {
        eprintln!("{}", bundled::NOTICE);
    }
    Ok(source.path)
}

/// The one-line error for a `-m` path that does not exist: how to get the real model.
fn missing_model_message(path: &Path) -> String {
    format!(
        "model file {} not found. Get one of ds4's DeepSeek V4 Flash GGUFs \
         (q2: DeepSeek-V4-Flash-IQ2XXS-w2Q2K-AProjQ8-SExpQ8-OutQ8-chat-v2.gguf, ~81 GiB; \
         q4: DeepSeek-V4-Flash-Q4KExperts-F16HC-F16Compressor-F16Indexer-Q8Attn-Q8Shared-Q8Out-chat-v2.gguf) \
         and pass it with -m or link it as ./{DEFAULT_MODEL} (see README.md); \
         without -m, ds4 runs its bundled tiny test model",
        path.display()
    )
}

/// A loaded model: the backend, its tokenizer and where it came from.
pub(crate) struct LoadedModel {
    backend: Box<dyn Backend>,
    tokenizer: Tokenizer,
    path: PathBuf,
}

fn load_model(
    args: &ChatArgs,
    source: &ModelSource,
    choice: BackendChoice,
) -> anyhow::Result<LoadedModel> {
    let path = &source.path;
    let model = ModelFile::open(path)?;
    let numerics = model.numerics(args.numerics.as_deref())?;
    let tokenizer = gguf_tokenizer(&model.file, path)?;
    let backend = load_backend(model.file, path, choice, numerics, args.ctx)?;
    check_vocab(&tokenizer, backend.config().vocab_size, path)?;
    Ok(LoadedModel {
        backend,
        tokenizer,
        path: path.clone(),
    })
}

/// Everything a chat run needs besides the model.
pub(crate) struct ChatSettings {
    pub system: String,
    pub think: ThinkMode,
    pub sampler: SamplerParams,
    pub max_tokens: usize,
    pub ctx: usize,
}

pub fn run(args: ChatArgs) -> anyhow::Result<()> {
    if args.ctx < 2 {
        bail!("--ctx must be at least 2, got {}", args.ctx);
    }
    if args.logprobs_top_k == 0 || args.logprobs_top_k > MAX_LOGPROBS_TOP_K {
        bail!(
            "--logprobs-top-k must be in 1..={MAX_LOGPROBS_TOP_K}, got {}",
            args.logprobs_top_k
        );
    }
    // Checked before the model is read, so a typo fails at once.
    let backend: BackendChoice = args.backend.parse()?;
    let settings = ChatSettings {
        system: args.system.clone(),
        think: args.think_mode(),
        sampler: args.sampler_params()?,
        max_tokens: args.max_tokens,
        ctx: args.ctx,
    };
    if settings.think == ThinkMode::Max
        && settings.think.for_context(settings.ctx) != ThinkMode::Max
    {
        eprintln!(
            "ds4: warning: --think-max needs --ctx >= {}; ctx={} uses normal thinking instead",
            ds4_text::chat::THINK_MAX_MIN_CTX,
            settings.ctx
        );
    }
    let prompt = match (&args.prompt, &args.prompt_file) {
        (Some(p), _) => Some(p.clone()),
        (None, Some(f)) => Some(
            std::fs::read_to_string(f)
                .with_context(|| format!("reading the prompt file {}", f.display()))?,
        ),
        (None, None) => None,
    };
    if prompt.is_none() && (args.dump_tokens || args.dump_logprobs.is_some()) {
        bail!("--dump-tokens and --dump-logprobs need a prompt (-p or --prompt-file)");
    }
    let source = resolve_model(args.model.as_deref())?;
    if source.bundled {
        eprintln!("{}", bundled::NOTICE);
    }
    let model = load_model(&args, &source, backend)?;
    let interrupt = Interrupt::install()?;
    match prompt {
        Some(prompt) => one_shot(&args, &settings, &model, &prompt, &interrupt),
        None => repl::run(&model, settings, &interrupt),
    }
}

/// The tokens of the one-shot prompt: ds4's single-turn rendering, or the prompt as it is when
/// it is already a rendered chat (starts with BOS or `<｜User｜>`).
fn one_shot_tokens(tokenizer: &Tokenizer, settings: &ChatSettings, prompt: &str) -> Vec<u32> {
    if prompt.starts_with(BOS) || prompt.starts_with(USER) {
        return tokenizer.encode(prompt);
    }
    tokenizer.encode(&render_single_turn(
        &settings.system,
        prompt,
        settings.think,
        settings.ctx,
    ))
}

fn one_shot(
    args: &ChatArgs,
    settings: &ChatSettings,
    model: &LoadedModel,
    prompt: &str,
    interrupt: &Interrupt,
) -> anyhow::Result<()> {
    let tokenizer = &model.tokenizer;
    let tokens = one_shot_tokens(tokenizer, settings, prompt);
    if args.dump_tokens {
        print_tokens(tokenizer, &tokens)?;
        eprintln!("ds4: {} prompt tokens", tokens.len());
        return Ok(());
    }
    if tokens.len() >= settings.ctx {
        bail!(
            "the prompt has {} tokens and does not fit a context of {} (raise --ctx)",
            tokens.len(),
            settings.ctx
        );
    }
    let mut session = model
        .backend
        .new_session(settings.ctx)
        .context("creating the session")?;
    if let Some(path) = &args.dump_logprobs {
        let p = prefill(session.as_mut(), &tokens, interrupt)?;
        if p.interrupted {
            bail!("interrupted while processing the prompt");
        }
        let steps = logprobs::dump(
            session.as_mut(),
            tokenizer,
            &model.path,
            tokens.len(),
            settings,
            args.logprobs_top_k,
            path,
        )?;
        eprintln!("ds4: wrote {steps} greedy steps to {}", path.display());
        return Ok(());
    }
    let p = prefill(session.as_mut(), &tokens, interrupt)?;
    if p.interrupted {
        eprintln!("ds4: interrupted while processing the prompt");
        return Ok(());
    }
    // The reply is reasoning when the prompt opened a think block (also for a prompt given
    // already rendered).
    let thinking = tokens.last() == Some(&tokenizer.specials().think_start);
    let mut printer = TokenPrinter::console(tokenizer, thinking);
    let out = generate(
        session.as_mut(),
        tokenizer.specials().eos,
        settings.sampler,
        settings.max_tokens,
        interrupt,
        &mut |t| printer.push(t),
    )?;
    printer.finish();
    if out.stop == StopReason::Interrupted {
        eprintln!("ds4: [interrupted]");
    }
    eprintln!("{}", generate::stats_line(&p, &out));
    Ok(())
}

/// `--dump-tokens`: one line per prompt token: position, id and its text as a JSON string.
/// A closed stdout (`| head`) ends the listing quietly.
fn print_tokens(tokenizer: &Tokenizer, tokens: &[u32]) -> anyhow::Result<()> {
    let mut out = std::io::stdout().lock();
    let written = tokens.iter().enumerate().try_for_each(|(i, &id)| {
        let text = serde_json::Value::String(logprobs::token_text(tokenizer, id));
        writeln!(out, "{i}\t{id}\t{text}")
    });
    match written.and_then(|()| out.flush()) {
        Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => {
            Err(anyhow::Error::new(e).context("writing the tokens to stdout"))
        }
        _ => Ok(()),
    }
}
