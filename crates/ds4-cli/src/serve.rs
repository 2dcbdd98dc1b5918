//! `ds4 serve`: the OpenAI/Anthropic-compatible HTTP server (crates/ds4-server) over one
//! model session. Flags follow ds4's (ds4-spec.md §5).

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use ds4_kvstore::SavePolicy;
use ds4_model::backend::Backend;
use ds4_server::kv_disk::{KvDisk, KvDiskOptions};
use ds4_server::model::{SessionRunner, TokenizerCodec};
use ds4_server::trace::Trace;
use ds4_server::{AppState, Engine, EngineOptions, ServerConfig};
use ds4_text::tokenizer::Tokenizer;

/// The name the APIs report (ds4's).
const MODEL_NAME: &str = "deepseek-v4-flash";

#[derive(clap::Args, Debug)]
pub struct ServeArgs {
    /// Model GGUF (default ./ds4flash.gguf).
    #[arg(short = 'm', long = "model")]
    model: Option<PathBuf>,
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1")]
    host: String,
    /// Port to listen on (0 picks a free one; the address is printed).
    #[arg(long, default_value_t = 8000)]
    port: u16,
    /// Context size in tokens.
    #[arg(short = 'c', long = "ctx", default_value_t = 32768)]
    ctx: usize,
    /// Default max_tokens of a request that gives none.
    #[arg(short = 'n', long = "tokens", default_value_t = ds4_server::server::DEFAULT_MAX_TOKENS)]
    max_tokens: usize,
    /// Require this key (Authorization: Bearer KEY or x-api-key: KEY).
    #[arg(long = "api-key")]
    api_key: Option<String>,
    /// Answer with permissive CORS headers (browser clients).
    #[arg(long)]
    cors: bool,
    /// Append every rendered prompt and generation to FILE.
    #[arg(long)]
    trace: Option<PathBuf>,
    /// auto (the GPU when CUDA is usable, else the CPU), cpu or cuda.
    #[arg(long, default_value = "auto")]
    backend: String,
    /// reference or ds4. Default as for `ds4 -p`: ds4 for the real DeepSeek V4 Flash shape,
    /// reference for any other (test-sized) model, so both answer alike at temperature 0.
    #[arg(long)]
    numerics: Option<String>,
    /// Tokenizer from a Hugging Face tokenizer.json instead of the GGUF's vocabulary.
    #[arg(long)]
    tokenizer: Option<PathBuf>,
    /// Render past tool calls canonically instead of replaying the sampled DSML.
    #[arg(long = "disable-exact-dsml-tool-replay")]
    disable_exact_dsml_tool_replay: bool,
    /// How many tool-call ids to remember for exact replay.
    #[arg(long = "tool-memory-max-ids", default_value_t = ds4_server::tool_memory::DEFAULT_MAX_IDS)]
    tool_memory_max_ids: usize,
    /// Request body limit in bytes.
    #[arg(long = "body-limit", default_value_t = ds4_server::server::DEFAULT_BODY_LIMIT)]
    body_limit: usize,
    /// Seconds without output after which a stream gets a keep-alive comment.
    #[arg(long = "keepalive-secs", default_value_t = 5.0)]
    keepalive_secs: f64,
    #[command(flatten)]
    kv: KvDiskArgs,
}

/// The disk KV cache (ds4-spec.md §3): checkpoints of the session under `--kv-disk-dir`.
#[derive(clap::Args, Debug)]
pub struct KvDiskArgs {
    /// Save and reuse KV checkpoints in this directory (off when not given).
    #[arg(long = "kv-disk-dir")]
    kv_disk_dir: Option<PathBuf>,
    /// Disk budget of the directory in MiB (0: none); the least useful files are evicted.
    #[arg(long = "kv-disk-space-mb", default_value_t = ds4_kvstore::store::DEFAULT_BUDGET_MB)]
    kv_disk_space_mb: u64,
    /// Checkpoints shorter than this are neither saved nor used.
    #[arg(long = "kv-cache-min-tokens", default_value_t = 512)]
    min_tokens: u32,
    /// Cold saves only for prompts up to this many tokens (0: never).
    #[arg(long = "kv-cache-cold-max-tokens", default_value_t = 30000)]
    cold_max_tokens: u32,
    /// Save the live session every this many tokens, rounded up to the alignment (0: never).
    #[arg(long = "kv-cache-continued-interval-tokens", default_value_t = 10000)]
    continued_interval_tokens: u32,
    /// Tokens dropped from a prompt's tail before a cold save.
    #[arg(long = "kv-cache-boundary-trim-tokens", default_value_t = 32)]
    boundary_trim_tokens: u32,
    /// Saved lengths are rounded down to a multiple of this.
    #[arg(long = "kv-cache-boundary-align-tokens", default_value_t = 2048)]
    boundary_align_tokens: u32,
    /// Use only checkpoints written with the same routed-expert quantization.
    #[arg(long = "kv-cache-reject-different-quant")]
    reject_different_quant: bool,
}

impl KvDiskArgs {
    fn options(&self, gguf: &ds4_gguf::reader::GgufFile) -> Option<KvDiskOptions> {
        let dir = self.kv_disk_dir.clone()?;
        Some(KvDiskOptions {
            dir,
            budget_bytes: self.kv_disk_space_mb.saturating_mul(1 << 20),
            policy: SavePolicy {
                min_tokens: self.min_tokens,
                cold_max_tokens: self.cold_max_tokens,
                continued_interval_tokens: self.continued_interval_tokens,
                boundary_trim_tokens: self.boundary_trim_tokens,
                boundary_align_tokens: self.boundary_align_tokens,
            },
            reject_different_quant: self.reject_different_quant,
            quant_bits: crate::kv_session::routed_quant_bits(gguf),
        })
    }
}

pub fn run(args: ServeArgs) -> anyhow::Result<()> {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .try_init();
    if args.ctx < 2 {
        bail!("--ctx must be at least 2, got {}", args.ctx);
    }
    if !(args.keepalive_secs > 0.0 && args.keepalive_secs.is_finite()) {
        bail!("--keepalive-secs must be a positive number");
    }
    let model_path = crate::chat::resolve_model_path(args.model.as_deref())?;
    let model = crate::model_file::ModelFile::open(&model_path)?;
    let numerics = model.numerics(args.numerics.as_deref())?;
    let gguf = model.file;
    let tokenizer = match &args.tokenizer {
        Some(path) => Tokenizer::from_tokenizer_json(path)
            .with_context(|| format!("tokenizer {}", path.display()))?,
        None => crate::model_file::gguf_tokenizer(&gguf, &model_path)?,
    };
    let backend: Box<dyn Backend> = crate::backend_select::load_backend(
        gguf.clone(),
        &model_path,
        args.backend.parse()?,
        numerics,
        args.ctx,
    )?;
    let vocab = backend.config().vocab_size;
    crate::model_file::check_vocab(&tokenizer, vocab, &model_path)?;
    let session = backend
        .new_session(args.ctx)
        .context("creating the session")?;
    let trace = match &args.trace {
        Some(p) => Some(
            Trace::create(p).with_context(|| format!("opening the trace file {}", p.display()))?,
        ),
        None => None,
    };
    let codec = Arc::new(TokenizerCodec(tokenizer));
    // A cache directory that cannot be opened is reported and the server runs without it.
    let kv_disk = args.kv.options(&gguf).and_then(|opts| {
        let dir = opts.dir.clone();
        match KvDisk::open(backend.config(), args.ctx, codec.as_ref(), opts) {
            Ok(kv) => Some(kv),
            Err(e) => {
                eprintln!(
                    "ds4 serve: kv cache disabled, cannot open {}: {e}",
                    dir.display()
                );
                None
            }
        }
    });
    let engine = Engine::start_with_kv_disk(
        Box::new(SessionRunner::new(session, vocab)),
        codec,
        EngineOptions {
            model_name: MODEL_NAME.to_string(),
            trace,
            tool_memory_max_ids: args.tool_memory_max_ids,
        },
        kv_disk,
    );
    let config = ServerConfig {
        body_limit: args.body_limit,
        keepalive: Duration::from_secs_f64(args.keepalive_secs),
        default_max_tokens: args.max_tokens,
        api_key: args.api_key.clone(),
        cors: args.cors,
        exact_tool_replay: !args.disable_exact_dsml_tool_replay,
        ..ServerConfig::default()
    };
    let state = AppState {
        engine: engine.clone(),
        config: Arc::new(config),
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting tokio")?;
    runtime.block_on(async move {
        // (host, port) also takes names ("localhost") and IPv6 addresses ("::1").
        let listener = tokio::net::TcpListener::bind((args.host.as_str(), args.port))
            .await
            .with_context(|| format!("listening on --host {} --port {}", args.host, args.port))?;
        let local = listener.local_addr().context("reading the bound address")?;
        eprintln!(
            "ds4 serve: {} ({} backend, ctx {}) listening on http://{local}",
            model_path.display(),
            args.backend,
            args.ctx
        );
        axum::serve(listener, ds4_server::router(state))
            .with_graceful_shutdown(shutdown_signal())
            .await
            .context("serving")
    })?;
    // SIGINT/SIGTERM: the listener is closed; the worker finishes its job, saves the live
    // session (*shutdown* checkpoint, with --kv-disk-dir) and stops.
    eprintln!("ds4 serve: shutting down");
    engine.shutdown();
    Ok(())
}

/// Resolves at the first SIGINT or SIGTERM, after which the open requests finish; a second
/// signal exits at once (without the shutdown checkpoint).
async fn shutdown_signal() {
    termination().await;
    eprintln!("ds4 serve: stopping after the open requests (signal again to exit now)");
    tokio::spawn(async {
        termination().await;
        eprintln!("ds4 serve: exiting now");
        std::process::exit(130);
    });
}

/// The next SIGINT or SIGTERM.
async fn termination() {
    let interrupt = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = interrupt => {}
                    _ = term.recv() => {}
                }
            }
            Err(e) => {
                eprintln!("ds4 serve: cannot watch SIGTERM: {e}");
                let _ = interrupt.await;
            }
        }
    }
    #[cfg(not(unix))]
    let _ = interrupt.await;
}
