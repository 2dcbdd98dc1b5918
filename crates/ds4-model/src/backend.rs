//! The interface every backend (CPU, CUDA) offers to the CLI and the server: a model that makes
//! sessions, and a session that evaluates token spans and keeps the incremental state.

use crate::config::{ConfigError, ModelConfig};
use crate::numerics::Numerics;
use crate::weights::WeightError;

/// Everything that can go wrong while loading a model or running a session.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error("model file: {0}")]
    Gguf(#[from] ds4_gguf::error::GgufError),
    #[error("model description: {0}")]
    Config(#[from] ConfigError),
    #[error("model weights: {0}")]
    Weight(#[from] WeightError),
    #[error("context overflow: {needed} tokens do not fit a context of {ctx}")]
    ContextOverflow { ctx: usize, needed: usize },
    #[error("cannot allocate the KV state for a context of {ctx} tokens ({bytes} bytes)")]
    Allocation { ctx: usize, bytes: u64 },
    #[error("token id {token} at span index {index} is outside the vocabulary of {vocab}")]
    BadToken {
        token: u32,
        index: usize,
        vocab: usize,
    },
    #[error("session snapshot: {0}")]
    BadSnapshot(String),
    #[error("{0}")]
    Unsupported(String),
}

/// Which logits an evaluation returns.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Logits {
    /// The logits after the last token of the span (vocab floats).
    Last,
    /// The logits after every token of the span (n_tokens × vocab floats, row-major).
    All,
}

/// A loaded model on some device.
pub trait Backend: Send + Sync {
    fn config(&self) -> &ModelConfig;
    fn numerics(&self) -> Numerics;
    /// A short name for messages ("cpu", "cuda").
    fn name(&self) -> &'static str;
    /// A fresh, empty session whose state is allocated for `ctx` tokens.
    fn new_session(&self, ctx: usize) -> Result<Box<dyn Session>, ModelError>;
    /// (used, total) bytes of the accelerator's memory, device-wide, for backends that have
    /// one (None for the CPU).
    fn device_memory(&self) -> Option<(usize, usize)> {
        None
    }
    /// (planned, taken) accelerator bytes of a session of `ctx` tokens: what the backend's
    /// fit checks reserve for one, and what its sessions have taken since the model was loaded
    /// (None for the CPU).
    fn session_memory(&self, _ctx: usize) -> Option<(usize, usize)> {
        None
    }
}

/// The incremental state of one token stream.
pub trait Session: Send {
    /// Maximum number of tokens the session can hold.
    fn ctx(&self) -> usize;
    /// The tokens evaluated so far.
    fn tokens(&self) -> &[u32];
    /// Appends `tokens` (a prefill when more than one, a decode step when one) and returns the
    /// requested logits. On error the session is unchanged.
    fn eval(&mut self, tokens: &[u32], want: Logits) -> Result<Vec<f32>, ModelError>;
    /// The logits after the last evaluated token (empty before the first eval).
    fn last_logits(&self) -> &[f32];
    /// One decode step: appends `token` and returns the logits after it (those of
    /// [`Session::last_logits`]). The same as `eval(&[token], Logits::Last)`, without handing
    /// out a vector of its own: a backend can fill one it keeps (a vocabulary of logits is
    /// half a megabyte per token). On error the session is unchanged.
    fn decode_step(&mut self, token: u32) -> Result<&[f32], ModelError> {
        self.eval(&[token], Logits::Last)?;
        Ok(self.last_logits())
    }
    /// One greedy decode step: appends `token` and returns the id
    /// [`crate::greedy::argmax_excluding`] picks from the logits after it, never one in
    /// `exclude`. A backend may pick on its device (the CUDA backend then hands no logits to
    /// the host unless [`Session::last_logits`] asks for them, and feeds the pick to its next
    /// greedy step without a round trip). On error the session is unchanged.
    fn decode_greedy(&mut self, token: u32, exclude: &[u32]) -> Result<u32, ModelError> {
        let logits = self.decode_step(token)?;
        Ok(crate::greedy::argmax_excluding(logits, exclude))
    }
    /// The whole state in ds4's session payload layout (ds4-spec.md §3).
    fn snapshot(&self) -> Vec<u8>;
    /// Replaces the state with a snapshot taken from a session of the same model.
    fn restore(&mut self, bytes: &[u8]) -> Result<(), ModelError>;
    /// Forgets every token.
    fn reset(&mut self);
    /// The most tokens one `eval` can take at full speed (the backend's prefill span; 0: any
    /// split is as fast). Callers that split a long prompt, for progress or cancellation,
    /// should not cut it finer: the CUDA backend runs up to 2 048 tokens per span, and 256-token
    /// pieces cost it a third of its prefill speed.
    fn preferred_span(&self) -> usize {
        0
    }
}

/// Checks a span before any backend touches its state: it must fit the context after the
/// `held` tokens already evaluated, and every id must be inside the vocabulary.
pub fn check_span(tokens: &[u32], held: usize, ctx: usize, vocab: usize) -> Result<(), ModelError> {
    let needed = held + tokens.len();
    if needed > ctx {
        return Err(ModelError::ContextOverflow { ctx, needed });
    }
    match tokens.iter().position(|&t| t as usize >= vocab) {
        Some(index) => Err(ModelError::BadToken {
            token: tokens[index],
            index,
            vocab,
        }),
        None => Ok(()),
    }
}

/// How a token sequence is fed to a session (`ds4 logits --mode`); all modes must agree.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EvalMode {
    /// One prefill of every token.
    Full,
    /// Prefill in spans of N tokens.
    Chunked(usize),
    /// One token at a time.
    Decode,
}

impl std::str::FromStr for EvalMode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "full" => Ok(EvalMode::Full),
            "decode" => Ok(EvalMode::Decode),
            _ => match s.strip_prefix("chunked:").map(str::parse::<usize>) {
                Some(Ok(n)) if n > 0 => Ok(EvalMode::Chunked(n)),
                _ => Err(format!(
                    "unknown mode `{s}` (expected full, decode or chunked:N with N > 0)"
                )),
            },
        }
    }
}

/// Evaluates `tokens` in `mode` and returns the logits of every position (n × vocab).
pub fn eval_all_positions(
    session: &mut dyn Session,
    tokens: &[u32],
    mode: EvalMode,
) -> Result<Vec<f32>, ModelError> {
    let span = match mode {
        EvalMode::Full => tokens.len().max(1),
        EvalMode::Chunked(n) => n,
        EvalMode::Decode => 1,
    };
    let mut out = Vec::new();
    for chunk in tokens.chunks(span) {
        out.extend(session.eval(chunk, Logits::All)?);
    }
    Ok(out)
}
