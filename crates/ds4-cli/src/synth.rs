//! `ds4 synth -o OUT.gguf --experts q2|q4 [--seed S] [--alias-layers] [--threads N]`: a
//! full-shape DeepSeek V4 Flash GGUF in ds4's layout with random, numerically sane weights
//! and the real tokenizer (DESIGN.md §3).

use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Instant;

use anyhow::{bail, Context};
use ds4_model::layout::WeightsMode;
use ds4_model::synth::{synthesize, SynthOptions};

/// Where the repository keeps DeepSeek's tokenizer.json.
const TOKENIZER_IN_REPO: &str = "tests/fixtures/tokenizer/tokenizer.json";

#[derive(clap::Args)]
pub struct SynthArgs {
    /// Output GGUF file.
    #[arg(short = 'o', long = "output")]
    output: PathBuf,
    /// Routed experts: q2 (gate/up IQ2_XXS, down Q2_K) or q4 (Q4_K).
    #[arg(long, value_parser = ["q2", "q4"])]
    experts: String,
    /// Seed of every tensor's random values.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Layers of one kind share one copy of their tensor data (~4 GB instead of ~81 GB).
    #[arg(long)]
    alias_layers: bool,
    /// Generator threads (default: one per core).
    #[arg(long)]
    threads: Option<usize>,
    /// tokenizer.json to store (default: the repository's copy of DeepSeek's).
    #[arg(long)]
    tokenizer: Option<PathBuf>,
}

pub fn run(args: SynthArgs) -> anyhow::Result<()> {
    let weights = match args.experts.as_str() {
        "q2" => WeightsMode::Ds4Q2,
        "q4" => WeightsMode::Ds4Q4,
        other => bail!("--experts must be q2 or q4, not `{other}`"),
    };
    if args.threads == Some(0) {
        bail!("--threads must be at least 1");
    }
    let tokenizer = match args.tokenizer {
        Some(path) => path,
        None => default_tokenizer()?,
    };
    let mut opts = SynthOptions::flash(weights);
    opts.seed = args.seed;
    opts.alias_layers = args.alias_layers;
    opts.threads = args.threads;
    opts.tokenizer = Some(tokenizer);

    let start = Instant::now();
    let last_shown = Mutex::new(0u64);
    let progress = |done: u64, total: u64| {
        // One line per ~10% (the file can take minutes when not aliased).
        let pct = done * 10 / total.max(1);
        if let Ok(mut shown) = last_shown.lock() {
            if pct > *shown {
                *shown = pct;
                eprintln!(
                    "ds4 synth: {:>3}% of {:.2} GiB data ({:.1} s)",
                    pct * 10,
                    total as f64 / (1u64 << 30) as f64,
                    start.elapsed().as_secs_f64()
                );
            }
        }
    };
    let report = synthesize(&args.output, &opts, &progress)
        .with_context(|| format!("writing {}", args.output.display()))?;
    let secs = start.elapsed().as_secs_f64();
    println!(
        "wrote {} in {secs:.1} s: {} bytes ({:.2} GiB; {:.2} GiB without aliasing), {} tensors \
         ({} with their own data), DeepSeek V4 Flash, experts {}, seed {}",
        args.output.display(),
        report.file_bytes,
        report.file_bytes as f64 / (1u64 << 30) as f64,
        report.logical_bytes as f64 / (1u64 << 30) as f64,
        report.n_tensors,
        report.n_data_tensors,
        args.experts,
        opts.seed
    );
    Ok(())
}

/// The repository's tokenizer.json: relative to the working directory, else to the source
/// tree this binary was built from.
fn default_tokenizer() -> anyhow::Result<PathBuf> {
    let candidates = [
        PathBuf::from(TOKENIZER_IN_REPO),
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../..")
            .join(TOKENIZER_IN_REPO),
    ];
    match candidates.iter().find(|p| p.is_file()) {
        Some(p) => Ok(p.clone()),
        None => bail!(
            "no tokenizer: {TOKENIZER_IN_REPO} not found from here or the source tree; pass \
             --tokenizer tokenizer.json"
        ),
    }
}
