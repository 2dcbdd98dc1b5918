//! A model file as the commands open it: the GGUF, its model description, the default
//! numerics and the tokenizer stored in it, with errors that name the file.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::Context;
use ds4_gguf::reader::GgufFile;
use ds4_model::config::ModelConfig;
use ds4_model::numerics::Numerics;
use ds4_text::tokenizer::Tokenizer;

pub(crate) struct ModelFile {
    pub path: PathBuf,
    pub file: Arc<GgufFile>,
    pub cfg: ModelConfig,
}

impl ModelFile {
    /// Opens `path` and reads its model description.
    pub fn open(path: &Path) -> anyhow::Result<ModelFile> {
        let file =
            Arc::new(GgufFile::open(path).with_context(|| format!("opening {}", path.display()))?);
        let cfg = ModelConfig::from_gguf(&file)
            .with_context(|| format!("reading the model description of {}", path.display()))?;
        Ok(ModelFile {
            path: path.to_path_buf(),
            file,
            cfg,
        })
    }

    /// `--numerics` when given, else [`default_numerics`].
    pub fn numerics(&self, arg: Option<&str>) -> anyhow::Result<Numerics> {
        match arg {
            Some(s) => s.parse().map_err(anyhow::Error::msg),
            None => Ok(default_numerics(&self.cfg)),
        }
    }
}

/// ds4's numerics for the real DeepSeek V4 Flash shape, the reference's for any other
/// (test-sized) model.
pub(crate) fn default_numerics(cfg: &ModelConfig) -> Numerics {
    if cfg.is_flash() {
        Numerics::Ds4
    } else {
        Numerics::Reference
    }
}

/// The tokenizer stored in the GGUF at `path` (its vocabulary and merges).
pub(crate) fn gguf_tokenizer(file: &GgufFile, path: &Path) -> anyhow::Result<Tokenizer> {
    let tokens = file
        .get_string_array("tokenizer.ggml.tokens")
        .with_context(|| format!("reading the vocabulary of {}", path.display()))?;
    let merges = file
        .get_string_array("tokenizer.ggml.merges")
        .with_context(|| format!("reading the merges of {}", path.display()))?;
    Tokenizer::from_gguf_vocab(tokens, merges)
        .with_context(|| format!("building the tokenizer of {}", path.display()))
}

/// A tokenizer whose ids the model cannot score is a mismatched pair of files.
pub(crate) fn check_vocab(
    tokenizer: &Tokenizer,
    model_vocab: usize,
    path: &Path,
) -> anyhow::Result<()> {
    if tokenizer.vocab_size() > model_vocab {
        anyhow::bail!(
            "{}: the tokenizer has {} tokens but the model only {model_vocab} logits",
            path.display(),
            tokenizer.vocab_size()
        );
    }
    Ok(())
}
