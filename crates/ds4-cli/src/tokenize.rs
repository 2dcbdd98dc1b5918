//! `ds4 tokenize`: token ids of a text, or of many texts in one process (`--jsonl`).
//!
//! The tokenizer comes from a model GGUF (`-m`, its `tokenizer.ggml.tokens` and
//! `tokenizer.ggml.merges`) or from a Hugging Face `tokenizer.json` (`--tokenizer`); with neither,
//! from `./ds4flash.gguf` when it exists.

use std::io::{BufRead, BufWriter, Write};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use ds4_text::tokenizer::Tokenizer;

const DEFAULT_MODEL: &str = "ds4flash.gguf";

#[derive(clap::Args)]
pub struct TokenizeArgs {
    /// Model GGUF whose vocabulary to use.
    #[arg(short = 'm', long = "model", conflicts_with = "tokenizer")]
    model: Option<PathBuf>,
    /// Hugging Face tokenizer.json to use instead of a model.
    #[arg(long)]
    tokenizer: Option<PathBuf>,
    /// Print only the ids, comma-separated (the form `ds4 logits --tokens` takes).
    #[arg(long)]
    ids: bool,
    /// Read JSON lines, each an object with a "text" string ("-" = stdin); write one JSON array
    /// of ids per line.
    #[arg(long, value_name = "FILE", conflicts_with = "text")]
    jsonl: Option<PathBuf>,
    /// The text to tokenize.
    #[arg(required_unless_present = "jsonl")]
    text: Option<String>,
}

pub fn run(args: TokenizeArgs) -> anyhow::Result<()> {
    let tokenizer = load_tokenizer(args.model.as_deref(), args.tokenizer.as_deref())?;
    let stdout = std::io::stdout();
    let mut out = BufWriter::new(stdout.lock());
    if let Some(path) = &args.jsonl {
        tokenize_jsonl(&tokenizer, path, &mut out)?;
    } else if let Some(text) = &args.text {
        let ids = tokenizer.encode(text);
        if args.ids {
            let list: Vec<String> = ids.iter().map(u32::to_string).collect();
            writeln!(out, "{}", list.join(","))?;
        } else {
            for id in ids {
                let bytes = tokenizer.token_bytes(id).unwrap_or_default();
                let text = serde_json::to_string(&String::from_utf8_lossy(bytes))?;
                writeln!(out, "{id}\t{text}")?;
            }
        }
    }
    out.flush()?;
    Ok(())
}

fn load_tokenizer(
    model: Option<&Path>,
    tokenizer_json: Option<&Path>,
) -> anyhow::Result<Tokenizer> {
    if let Some(path) = tokenizer_json {
        return Ok(Tokenizer::from_tokenizer_json(path)?);
    }
    let model = match model {
        Some(path) => path.to_path_buf(),
        None if Path::new(DEFAULT_MODEL).exists() => PathBuf::from(DEFAULT_MODEL),
        None => bail!("no tokenizer: pass -m MODEL.gguf or --tokenizer tokenizer.json (./{DEFAULT_MODEL} not found)"),
    };
    let gguf = ds4_gguf::reader::GgufFile::open(&model)
        .with_context(|| format!("opening {}", model.display()))?;
    crate::model_file::gguf_tokenizer(&gguf, &model)
}

fn tokenize_jsonl(tokenizer: &Tokenizer, path: &Path, out: &mut impl Write) -> anyhow::Result<()> {
    let input: Box<dyn BufRead> = if path == Path::new("-") {
        Box::new(std::io::stdin().lock())
    } else {
        let file =
            std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
        Box::new(std::io::BufReader::new(file))
    };
    for (index, line) in input.lines().enumerate() {
        let line_no = index + 1;
        let line = line.with_context(|| format!("{}:{line_no}: reading", path.display()))?;
        if line.trim().is_empty() {
            continue;
        }
        let value: serde_json::Value = serde_json::from_str(&line)
            .with_context(|| format!("{}:{line_no}: not JSON", path.display()))?;
        let Some(text) = value.get("text").and_then(|t| t.as_str()) else {
            bail!(
                "{}:{line_no}: expected an object with a \"text\" string",
                path.display()
            );
        };
        let ids = tokenizer.encode(text);
        writeln!(out, "{}", serde_json::to_string(&ids)?)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fixture_tokenizer() -> Tokenizer {
        let path = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../../tests/fixtures/tokenizer/tokenizer.json");
        load_tokenizer(None, Some(&path)).unwrap()
    }

    #[test]
    fn jsonl_gives_one_id_array_per_line() {
        let t = fixture_tokenizer();
        let dir = std::env::temp_dir().join(format!("ds4-tokenize-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let input = dir.join("in.jsonl");
        std::fs::write(
            &input,
            "{\"text\":\"Hello\"}\n\n{\"text\":\"<｜User｜>123456\",\"other\":1}\n",
        )
        .unwrap();
        let mut out = Vec::new();
        tokenize_jsonl(&t, &input, &mut out).unwrap();
        let lines: Vec<&str> = std::str::from_utf8(&out).unwrap().lines().collect();
        assert_eq!(lines, vec!["[19923]", "[128803,6895,18009]"]);

        std::fs::write(&input, "{\"text\":\"ok\"}\n{\"txt\":\"no\"}\n").unwrap();
        let err = tokenize_jsonl(&t, &input, &mut Vec::new())
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("in.jsonl:2") && err.contains("\"text\""),
            "{err}"
        );
        std::fs::write(&input, "not json\n").unwrap();
        let err = tokenize_jsonl(&t, &input, &mut Vec::new())
            .unwrap_err()
            .to_string();
        assert!(err.contains("in.jsonl:1: not JSON"), "{err}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn missing_files_are_named() {
        let err = load_tokenizer(Some(Path::new("/nonexistent/m.gguf")), None).unwrap_err();
        assert!(
            format!("{err:#}").contains("/nonexistent/m.gguf"),
            "{err:#}"
        );
        let err = load_tokenizer(None, Some(Path::new("/nonexistent/t.json"))).unwrap_err();
        assert!(
            format!("{err:#}").contains("/nonexistent/t.json"),
            "{err:#}"
        );
    }
}
