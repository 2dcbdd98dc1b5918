//! A transformers `tokenizer.json` (byte-level BPE) → the GGUF tokenizer keys ds4 reads:
//! `tokenizer.ggml.tokens` (id = index) and `tokenizer.ggml.merges` ("a b", rank = index), plus
//! the usual `tokenizer.ggml.model`, `token_type` and BOS/EOS ids.

use std::path::Path;

use serde_json::Value;

use ds4_gguf::MetaValue;

use super::ConvertError;

/// GGUF token types (llama.cpp's numbering).
const TOKEN_NORMAL: i32 = 1;
const TOKEN_CONTROL: i32 = 3;
const TOKEN_USER_DEFINED: i32 = 4;

const BOS: &str = "<｜begin▁of▁sentence｜>";
const EOS: &str = "<｜end▁of▁sentence｜>";

/// The tokenizer metadata for a model with `vocab_size` tokens.
pub fn tokenizer_metadata(
    path: &Path,
    vocab_size: usize,
) -> Result<Vec<(String, MetaValue)>, ConvertError> {
    let err = |msg: String| ConvertError::Tokenizer {
        path: path.to_path_buf(),
        msg,
    };
    let text = std::fs::read_to_string(path).map_err(|e| ConvertError::io(path, e))?;
    let json: Value = serde_json::from_str(&text).map_err(|e| err(e.to_string()))?;
    let model = json
        .get("model")
        .ok_or_else(|| err("no 'model' object".into()))?;
    if model.get("type").and_then(|t| t.as_str()) != Some("BPE") {
        return Err(err("the model type is not BPE".into()));
    }
    let vocab = model
        .get("vocab")
        .and_then(|v| v.as_object())
        .ok_or_else(|| err("no 'model.vocab' object".into()))?;
    let mut tokens: Vec<Option<String>> = vec![None; vocab_size];
    let mut types = vec![TOKEN_NORMAL; vocab_size];
    let mut place = |id: u64, text: &str| -> Result<(), ConvertError> {
        let slot = usize::try_from(id)
            .ok()
            .and_then(|i| tokens.get_mut(i))
            .ok_or_else(|| {
                err(format!(
                    "token id {id} ('{text}') is outside the model's vocabulary of {vocab_size}"
                ))
            })?;
        match slot {
            Some(prev) if prev != text => {
                Err(err(format!("token id {id} is both '{prev}' and '{text}'")))
            }
            _ => {
                *slot = Some(text.to_string());
                Ok(())
            }
        }
    };
    for (text, id) in vocab {
        let id = id
            .as_u64()
            .ok_or_else(|| err(format!("vocab entry '{text}' has no integer id")))?;
        place(id, text)?;
    }
    let added = match json.get("added_tokens") {
        None | Some(Value::Null) => Vec::new(),
        Some(v) => v
            .as_array()
            .ok_or_else(|| err("'added_tokens' is not a list".into()))?
            .clone(),
    };
    let mut added_ids = Vec::with_capacity(added.len());
    for a in &added {
        let id = a.get("id").and_then(|v| v.as_u64());
        let content = a.get("content").and_then(|v| v.as_str());
        let (Some(id), Some(content)) = (id, content) else {
            return Err(err("an added token lacks 'id' or 'content'".into()));
        };
        place(id, content)?;
        let special = a.get("special").and_then(|v| v.as_bool()).unwrap_or(false);
        added_ids.push((id as usize, special));
    }
    for (id, special) in added_ids {
        types[id] = if special {
            TOKEN_CONTROL
        } else {
            TOKEN_USER_DEFINED
        };
    }
    let tokens: Vec<String> = tokens
        .into_iter()
        .enumerate()
        .map(|(i, t)| t.ok_or_else(|| err(format!("no token has id {i}"))))
        .collect::<Result<_, _>>()?;

    let merges = model
        .get("merges")
        .and_then(|m| m.as_array())
        .ok_or_else(|| err("no 'model.merges' list".into()))?;
    let merges: Vec<String> = merges
        .iter()
        .map(|m| match m {
            Value::String(s) => Ok(s.clone()),
            // Newer tokenizer.json files store a merge as a pair.
            Value::Array(p) => match (p.first().and_then(|x| x.as_str()), p.get(1)) {
                (Some(a), Some(Value::String(b))) if p.len() == 2 => Ok(format!("{a} {b}")),
                _ => Err(err("a merge pair is not two strings".into())),
            },
            _ => Err(err("a merge is neither a string nor a pair".into())),
        })
        .collect::<Result<_, _>>()?;

    let mut meta = vec![
        ("tokenizer.ggml.model".to_string(), MetaValue::from("gpt2")),
        (
            "tokenizer.ggml.tokens".to_string(),
            MetaValue::from(tokens.clone()),
        ),
        (
            "tokenizer.ggml.token_type".to_string(),
            MetaValue::from(types),
        ),
        ("tokenizer.ggml.merges".to_string(), MetaValue::from(merges)),
    ];
    for (key, text) in [
        ("tokenizer.ggml.bos_token_id", BOS),
        ("tokenizer.ggml.eos_token_id", EOS),
    ] {
        if let Some(id) = tokens.iter().position(|t| t == text) {
            meta.push((key.to_string(), MetaValue::U32(id as u32)));
        }
    }
    Ok(meta)
}
