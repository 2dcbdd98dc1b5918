//! `ds4 convert HF_DIR -o OUT.gguf [--weights f32|f16|q8|ds4-q2|ds4-q4] [--tokenizer tokenizer.json]`

use std::path::PathBuf;

use anyhow::Context;
use ds4_model::convert::{convert, ConvertOptions};
use ds4_model::layout::WeightsMode;

#[derive(clap::Args)]
pub struct ConvertArgs {
    /// Directory written by transformers' DeepseekV4ForCausalLM.save_pretrained (config.json +
    /// safetensors with HF module names).
    pub hf_dir: PathBuf,
    /// Output GGUF file.
    #[arg(short = 'o', long = "output")]
    pub output: PathBuf,
    /// Storage types: f32 (exact), f16, q8 (ds4's mix with Q8_0 experts), ds4-q2, ds4-q4.
    #[arg(long, default_value = "f32", value_parser = parse_mode)]
    pub weights: WeightsMode,
    /// tokenizer.json whose tokens and merges are stored in the file.
    #[arg(long)]
    pub tokenizer: Option<PathBuf>,
    /// general.name (default: the directory's name).
    #[arg(long)]
    pub name: Option<String>,
}

fn parse_mode(s: &str) -> Result<WeightsMode, String> {
    s.parse()
}

pub fn run(args: ConvertArgs) -> anyhow::Result<()> {
    let opts = ConvertOptions {
        tokenizer: args.tokenizer,
        name: args.name,
        ..ConvertOptions::new(args.weights)
    };
    let report = convert(&args.hf_dir, &args.output, &opts).with_context(|| {
        format!(
            "converting {} to {}",
            args.hf_dir.display(),
            args.output.display()
        )
    })?;
    let mut notes: Vec<String> = Vec::new();
    for f in &report.fallbacks {
        notes.push(format!(
            "  {} stored as F16: rows of {} elements do not fit {} blocks of {}",
            f.tensor,
            f.row_len,
            f.wanted,
            f.wanted.block_elems()
        ));
    }
    println!(
        "wrote {} ({} tensors, {} bytes, weights {}; {} layers, vocabulary {})",
        args.output.display(),
        report.n_tensors,
        report.file_bytes,
        opts.weights,
        report.config.n_layers,
        report.config.vocab_size
    );
    if !notes.is_empty() {
        println!("note: {} tensors fell back to F16:", notes.len());
        for n in notes {
            println!("{n}");
        }
    }
    Ok(())
}
