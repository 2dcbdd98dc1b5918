//! The `ds4` binary. Each subcommand lives in its own module with its clap arguments and
//! its `run`; this file only dispatches. See DESIGN.md §3 for the contract.

use clap::{Parser, Subcommand};

mod backend_select;
mod bench;
mod chat;
mod convert;
mod inspect;
mod kv_session;
mod logits;
mod model_file;
mod serve;
mod synth;
mod tokenize;

#[derive(Parser)]
#[command(name = "ds4", version, about = "DeepSeek V4 Flash inference engine")]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    /// Chat (one-shot with -p, interactive without) when no subcommand is given.
    #[command(flatten)]
    chat: chat::ChatArgs,
}

#[derive(Subcommand)]
enum Command {
    /// Show a GGUF file's metadata and tensors, and check it against the DeepSeek V4 layout.
    Inspect(inspect::InspectArgs),
    /// Convert a transformers DeepseekV4ForCausalLM directory to a ds4 GGUF.
    Convert(convert::ConvertArgs),
    /// Write the logits of every position of a token sequence as .npy.
    Logits(logits::LogitsArgs),
    /// Serve the OpenAI and Anthropic HTTP APIs.
    Serve(serve::ServeArgs),
    /// Tokenize text with the model's tokenizer.
    Tokenize(tokenize::TokenizeArgs),
    /// Write a full-shape DeepSeek V4 Flash GGUF with random weights (for benchmarks).
    Synth(synth::SynthArgs),
    /// Measure prefill and decode speed at growing context sizes (ds4-bench's method).
    Bench(bench::BenchArgs),
}

fn main() {
    let cli = Cli::parse_from(chat::normalize_args(std::env::args_os()));
    let result = match cli.command {
        Some(Command::Inspect(a)) => inspect::run(a),
        Some(Command::Convert(a)) => convert::run(a),
        Some(Command::Logits(a)) => logits::run(a),
        Some(Command::Serve(a)) => serve::run(a),
        Some(Command::Tokenize(a)) => tokenize::run(a),
        Some(Command::Synth(a)) => synth::run(a),
        Some(Command::Bench(a)) => bench::run(a),
        None => chat::run(cli.chat),
    };
    if let Err(e) = result {
        eprintln!("ds4: error: {e:#}");
        std::process::exit(1);
    }
}
