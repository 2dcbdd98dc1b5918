//! `--dump-logprobs FILE`: greedy decoding after the prompt, writing each step's selected token
//! and top log-probabilities in ds4's JSON shape:
//! `{source, model, prompt_tokens, ctx, top_k, steps: [{step, selected, top_logprobs:
//! [{token, logit, logprob}]}]}` with `token = {id, text, bytes}`. Like ds4, the step that
//! selects end-of-sentence is recorded and ends the dump.

use std::path::Path;

use anyhow::Context;
use ds4_model::backend::{Logits, Session};
use ds4_text::sampler::{argmax, top_logprobs};
use ds4_text::tokenizer::Tokenizer;
use serde_json::{json, Value};

use super::generate::room_for_reply;
use super::ChatSettings;

/// A token's text for JSON: its bytes as UTF-8 when they are valid, else each byte as the
/// code point of the same value (the `bytes` array is the exact form).
pub fn token_text(tokenizer: &Tokenizer, id: u32) -> String {
    let bytes = tokenizer.token_bytes(id).unwrap_or_default();
    match std::str::from_utf8(bytes) {
        Ok(s) => s.to_string(),
        Err(_) => bytes.iter().map(|&b| char::from(b)).collect(),
    }
}

fn token_json(tokenizer: &Tokenizer, id: u32) -> Value {
    json!({
        "id": id,
        "text": token_text(tokenizer, id),
        "bytes": tokenizer.token_bytes(id).unwrap_or_default(),
    })
}

/// An f32 as the JSON number with its shortest decimal form (not the f64 widening's digits).
fn number(x: f32) -> Value {
    x.to_string()
        .parse::<f64>()
        .ok()
        .and_then(serde_json::Number::from_f64)
        .map_or(Value::Null, Value::Number)
}

/// Greedy-decodes after the prefilled prompt and writes the dump; returns the step count.
pub fn dump(
    session: &mut dyn Session,
    tokenizer: &Tokenizer,
    model: &Path,
    prompt_tokens: usize,
    settings: &ChatSettings,
    top_k: usize,
    out: &Path,
) -> anyhow::Result<usize> {
    let eos = tokenizer.specials().eos;
    let budget = room_for_reply(session.ctx(), session.tokens().len(), settings.max_tokens);
    let mut steps = Vec::new();
    for step in 0..budget {
        let logits = session.last_logits();
        let selected = argmax(logits);
        let tops: Vec<Value> = top_logprobs(logits, top_k)
            .iter()
            .map(|t| {
                json!({
                    "token": token_json(tokenizer, t.id),
                    "logit": number(t.logit),
                    "logprob": number(t.logprob),
                })
            })
            .collect();
        steps.push(json!({
            "step": step,
            "selected": token_json(tokenizer, selected),
            "top_logprobs": tops,
        }));
        if selected == eos {
            break;
        }
        session
            .eval(&[selected], Logits::Last)
            .context("decoding while dumping logprobs")?;
    }
    let n = steps.len();
    let doc = json!({
        "source": "ds4-rs",
        "model": model.display().to_string(),
        "prompt_tokens": prompt_tokens,
        "ctx": settings.ctx,
        "top_k": top_k,
        "steps": steps,
    });
    let mut text = serde_json::to_string_pretty(&doc).context("encoding the logprobs dump")?;
    text.push('\n');
    std::fs::write(out, text).with_context(|| format!("writing {}", out.display()))?;
    Ok(n)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_use_the_shortest_f32_form() {
        assert_eq!(number(-1.1).to_string(), "-1.1");
        assert_eq!(number(0.5).to_string(), "0.5");
        assert_eq!(number(f32::NAN), Value::Null);
    }
}
