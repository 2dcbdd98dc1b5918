//! The `--dump-logprobs` JSON document (ds4-spec.md §6): greedy steps with their top
//! alternatives.
//!
//! ```text
//! {"source":"ds4","prompt_tokens":N,"ctx":N,"top_k":K,
//!  "steps":[{"step":0,"selected":TOKEN,"top_logprobs":[{"token":TOKEN,"logit":x,"logprob":y},…]},…]}
//! TOKEN = {"id":…,"text":…,"bytes":[…]}
//! ```
//! `bytes` is authoritative: a piece that is not valid UTF-8 on its own gets a `text` with each
//! byte as the code point of the same value (ds4 writes those as `\u00XX`).

use serde_json::{json, Value};

use crate::sampler::{argmax, top_logprobs};
use crate::tokenizer::Tokenizer;

/// Alternatives per step when the flag is not given, and the most allowed.
pub const DEFAULT_TOP_K: usize = 20;
pub const MAX_TOP_K: usize = 128;

/// `{"id", "text", "bytes"}` of one token.
pub fn token_json(tokenizer: &Tokenizer, id: u32) -> Value {
    let bytes = tokenizer.token_bytes(id).unwrap_or_default();
    let text = match std::str::from_utf8(bytes) {
        Ok(s) => s.to_string(),
        Err(_) => bytes.iter().map(|&b| char::from(b)).collect(),
    };
    json!({"id": id, "text": text, "bytes": bytes})
}

/// Builds the document step by step.
#[derive(Clone, Debug)]
pub struct LogprobDump {
    prompt_tokens: usize,
    ctx: usize,
    top_k: usize,
    steps: Vec<Value>,
}

impl LogprobDump {
    /// `top_k` 0 means the default; larger than [`MAX_TOP_K`] is clamped.
    pub fn new(prompt_tokens: usize, ctx: usize, top_k: usize) -> LogprobDump {
        let top_k = if top_k == 0 {
            DEFAULT_TOP_K
        } else {
            top_k.min(MAX_TOP_K)
        };
        LogprobDump {
            prompt_tokens,
            ctx,
            top_k,
            steps: Vec::new(),
        }
    }

    /// Records a step from the logits of the next position; returns the greedy token (the
    /// caller feeds it back, and stops after EOS).
    pub fn push_step(&mut self, tokenizer: &Tokenizer, logits: &[f32]) -> u32 {
        let selected = argmax(logits);
        let top: Vec<Value> = top_logprobs(logits, self.top_k)
            .into_iter()
            .map(|t| json!({"token": token_json(tokenizer, t.id), "logit": t.logit, "logprob": t.logprob}))
            .collect();
        self.steps.push(json!({
            "step": self.steps.len(),
            "selected": token_json(tokenizer, selected),
            "top_logprobs": top,
        }));
        selected
    }

    /// Steps recorded so far.
    pub fn len(&self) -> usize {
        self.steps.len()
    }

    pub fn is_empty(&self) -> bool {
        self.steps.is_empty()
    }

    /// The whole document.
    pub fn to_json(&self) -> Value {
        json!({
            "source": "ds4",
            "prompt_tokens": self.prompt_tokens,
            "ctx": self.ctx,
            "top_k": self.top_k,
            "steps": self.steps,
        })
    }
}
