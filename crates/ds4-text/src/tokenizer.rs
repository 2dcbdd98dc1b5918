//! DeepSeek V4's byte-level BPE tokenizer.
//!
//! Two ways to build one, both giving the ids of Hugging Face `tokenizers` on DeepSeek's
//! `tokenizer.json`:
//! - [`Tokenizer::from_tokenizer_json`] loads that file as is;
//! - [`Tokenizer::from_gguf_vocab`] rebuilds the same tokenizer from a GGUF's
//!   `tokenizer.ggml.tokens` and `tokenizer.ggml.merges` arrays, which is all a ds4 GGUF holds.
//!   The pre-tokenizer is DeepSeek's (fixed for the model family), and the added tokens are the
//!   vocabulary entries that byte-level BPE cannot produce (not a byte symbol, not a merge result).
//!   On DeepSeek's vocabulary that rule picks exactly the 1,283 added tokens of `tokenizer.json`.
//!
//! Added tokens (`<｜User｜>`, `<think>`, `｜DSML｜`, ...) are matched anywhere in the text, user
//! content included; the spans between them are pre-split and BPE-merged. All 1,283 added tokens
//! are recognised, as HF does (ds4 itself recognises only the seven it needs and BPE-merges the
//! text of the others; its hand-written pre-split also treats every non-ASCII char as a letter,
//! so on unusual text its ids can differ from the model's own tokenizer, which this one matches).
//!
//! Encoding runs on the crate's own fast encoder (modules `bpe` and `pretokenize`) for
//! DeepSeek's layout, about ten times faster than the HF engine, which stays available as
//! [`Tokenizer::encode_reference`] and encodes tokenizer.json files of any other layout.

use std::collections::HashMap;
use std::path::Path;

use tokenizers::models::bpe::{Vocab, BPE};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::pre_tokenizers::PreTokenizerWrapper;
use tokenizers::{AddedToken, DecoderWrapper, SplitDelimiterBehavior};

use crate::bpe::FastEncoder;

/// Strings of the special tokens the engine needs (｜ is U+FF5C, ▁ is U+2581).
pub const BOS: &str = "<｜begin▁of▁sentence｜>";
pub const EOS: &str = "<｜end▁of▁sentence｜>";
pub const USER: &str = "<｜User｜>";
pub const ASSISTANT: &str = "<｜Assistant｜>";
pub const THINK_START: &str = "<think>";
pub const THINK_END: &str = "</think>";
pub const DSML: &str = "｜DSML｜";

/// DeepSeek's pre-tokenizer: three regex splits applied in turn, each isolating its matches.
/// (1) runs of up to three digits; (2) runs of CJK ideographs, hiragana and katakana; (3) the
/// main GPT-style pattern (punctuation + letters, letter runs, punctuation runs with trailing
/// newlines, newline runs, whitespace not followed by a non-space, whitespace).
const PRE_SPLITS: [&str; 3] = [
    r"\p{N}{1,3}",
    "[\u{4E00}-\u{9FA5}\u{3040}-\u{309F}\u{30A0}-\u{30FF}]+",
    concat!(
        r##"[!"#$%&'()*+,\-./:;<=>?@\[\\\]^_`{|}~][A-Za-z]+"##,
        "|[^\r\n\\p{L}\\p{P}\\p{S}]?[\\p{L}\\p{M}]+",
        "| ?[\\p{P}\\p{S}]+[\r\n]*",
        "|\\s*[\r\n]+",
        "|\\s+(?!\\S)",
        "|\\s+",
    ),
];

/// Why a tokenizer could not be built.
#[derive(Debug, thiserror::Error)]
pub enum TokenizerError {
    #[error("cannot read tokenizer file {path}: {message}")]
    Load { path: String, message: String },
    #[error("merge #{index} {merge:?} is not two space-separated tokens")]
    BadMerge { index: usize, merge: String },
    #[error("merge #{index} {merge:?} refers to a token that is not in the vocabulary")]
    MergeOutOfVocab { index: usize, merge: String },
    #[error("token {token:?} appears twice in the vocabulary (ids {first} and {second})")]
    DuplicateToken {
        token: String,
        first: u32,
        second: u32,
    },
    #[error(
        "vocabulary lacks the byte symbol for byte 0x{byte:02x}, so some text cannot be encoded"
    )]
    MissingByte { byte: u8 },
    #[error("vocabulary lacks the special token {token:?}")]
    MissingSpecial { token: &'static str },
    #[error("vocabulary has {count} tokens, more than u32 ids can hold")]
    TooLarge { count: usize },
    #[error("tokenizer construction failed: {0}")]
    Build(String),
}

/// Ids of the special tokens the chat template and the generation loop use.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SpecialIds {
    pub bos: u32,
    pub eos: u32,
    pub user: u32,
    pub assistant: u32,
    pub think_start: u32,
    pub think_end: u32,
    pub dsml: u32,
}

/// A loaded tokenizer. Encoding uses the fast encoder (module `bpe`) for DeepSeek's layout and
/// HF `tokenizers` otherwise; decoding uses a per-id byte table.
pub struct Tokenizer {
    /// The HF engine: the reference, and the encoder for tokenizer.json files of another layout.
    inner: tokenizers::Tokenizer,
    /// The fast encoder, for DeepSeek's layout (always from a GGUF).
    fast: Option<FastEncoder>,
    /// Vocabulary string of each id (byte-level symbols for BPE tokens, literal text for added).
    token_strings: Vec<String>,
    /// The bytes each id decodes to.
    token_bytes: Vec<Box<[u8]>>,
    ids_by_string: HashMap<String, u32>,
    specials: SpecialIds,
}

impl std::fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tokenizer")
            .field("vocab_size", &self.token_strings.len())
            .field("specials", &self.specials)
            .finish()
    }
}

impl Tokenizer {
    /// Loads a Hugging Face `tokenizer.json` (DeepSeek's, or any byte-level BPE one that has the
    /// seven special tokens).
    pub fn from_tokenizer_json(path: impl AsRef<Path>) -> Result<Tokenizer, TokenizerError> {
        let path = path.as_ref();
        let load_error = |message: String| TokenizerError::Load {
            path: path.display().to_string(),
            message,
        };
        let bytes = std::fs::read(path).map_err(|e| load_error(e.to_string()))?;
        let inner =
            tokenizers::Tokenizer::from_bytes(&bytes).map_err(|e| load_error(e.to_string()))?;
        let json: serde_json::Value =
            serde_json::from_slice(&bytes).map_err(|e| load_error(e.to_string()))?;
        let size = inner.get_vocab_size(true);
        let mut token_strings = Vec::with_capacity(size);
        for id in 0..size {
            let id = u32::try_from(id).map_err(|_| TokenizerError::TooLarge { count: size })?;
            // Holes in the id space decode to nothing, as in HF (which skips unknown ids).
            token_strings.push(inner.id_to_token(id).unwrap_or_default());
        }
        let fast = match deepseek_layout(&json) {
            Some((merges, added)) => Some(fast_encoder(&token_strings, &merges, added)?),
            None => None,
        };
        Tokenizer::assemble(inner, fast, token_strings)
    }

    /// Rebuilds DeepSeek's tokenizer from a GGUF vocabulary (`tokenizer.ggml.tokens`, id = index)
    /// and merge list (`tokenizer.ggml.merges`, "left right", rank = index).
    pub fn from_gguf_vocab(
        tokens: &[String],
        merges: &[String],
    ) -> Result<Tokenizer, TokenizerError> {
        let count = tokens.len();
        if u32::try_from(count).is_err() {
            return Err(TokenizerError::TooLarge { count });
        }
        let mut vocab: HashMap<String, u32> = HashMap::with_capacity(count);
        for (id, token) in tokens.iter().enumerate() {
            if let Some(&first) = vocab.get(token) {
                return Err(TokenizerError::DuplicateToken {
                    token: token.clone(),
                    first,
                    second: id as u32,
                });
            }
            vocab.insert(token.clone(), id as u32);
        }
        let byte_symbols = byte_to_symbol();
        for (byte, symbol) in byte_symbols.iter().enumerate() {
            if !vocab.contains_key(&symbol.to_string()) {
                return Err(TokenizerError::MissingByte { byte: byte as u8 });
            }
        }

        // Tokens BPE can produce: the byte symbols and every merge result.
        let mut producible: std::collections::HashSet<String> =
            byte_symbols.iter().map(|c| c.to_string()).collect();
        let mut merge_pairs = Vec::with_capacity(merges.len());
        for (index, merge) in merges.iter().enumerate() {
            let Some((left, right)) = merge.split_once(' ') else {
                return Err(TokenizerError::BadMerge {
                    index,
                    merge: merge.clone(),
                });
            };
            if left.is_empty() || right.is_empty() || right.contains(' ') {
                return Err(TokenizerError::BadMerge {
                    index,
                    merge: merge.clone(),
                });
            }
            let merged = format!("{left}{right}");
            if !vocab.contains_key(left)
                || !vocab.contains_key(right)
                || !vocab.contains_key(&merged)
            {
                return Err(TokenizerError::MergeOutOfVocab {
                    index,
                    merge: merge.clone(),
                });
            }
            producible.insert(merged);
            merge_pairs.push((left.to_string(), right.to_string()));
        }

        let added_strings: Vec<(String, u32)> = tokens
            .iter()
            .enumerate()
            .filter(|(_, t)| !producible.contains(t.as_str()))
            .map(|(id, t)| (t.clone(), id as u32))
            .collect();
        let fast = fast_encoder(tokens, &merge_pairs, added_strings)?;
        let added: Vec<AddedToken> = tokens
            .iter()
            .filter(|t| !producible.contains(t.as_str()))
            // Matched on the raw text, one pass, longest leftmost: DeepSeek's tokenizer.json has
            // no normalizer, so its normalized/non-normalized split changes nothing.
            .map(|t| AddedToken::from(t.clone(), true))
            .collect();

        let bpe_vocab: Vocab = vocab.into_iter().collect();
        let bpe = BPE::builder()
            .vocab_and_merges(bpe_vocab, merge_pairs)
            .build()
            .map_err(|e| TokenizerError::Build(e.to_string()))?;
        let mut splits = Vec::with_capacity(PRE_SPLITS.len() + 1);
        for pattern in PRE_SPLITS {
            let split = Split::new(
                SplitPattern::Regex(pattern.to_string()),
                SplitDelimiterBehavior::Isolated,
                false,
            )
            .map_err(|e| TokenizerError::Build(e.to_string()))?;
            splits.push(PreTokenizerWrapper::Split(split));
        }
        splits.push(PreTokenizerWrapper::ByteLevel(ByteLevel::new(
            false, true, false,
        )));

        let mut inner = tokenizers::Tokenizer::new(bpe);
        inner.with_pre_tokenizer(Some(PreTokenizerWrapper::Sequence(Sequence::new(splits))));
        inner.with_decoder(Some(DecoderWrapper::ByteLevel(ByteLevel::default())));
        inner.add_special_tokens(&added);
        Tokenizer::assemble(inner, Some(fast), tokens.to_vec())
    }

    fn assemble(
        inner: tokenizers::Tokenizer,
        fast: Option<FastEncoder>,
        token_strings: Vec<String>,
    ) -> Result<Tokenizer, TokenizerError> {
        let symbol_bytes: HashMap<char, u8> = byte_to_symbol()
            .iter()
            .enumerate()
            .map(|(b, &c)| (c, b as u8))
            .collect();
        for (byte, symbol) in byte_to_symbol().iter().enumerate() {
            if inner.token_to_id(&symbol.to_string()).is_none() {
                return Err(TokenizerError::MissingByte { byte: byte as u8 });
            }
        }
        let token_bytes = token_strings
            .iter()
            .map(|t| decode_symbols(t, &symbol_bytes))
            .collect();
        let ids_by_string: HashMap<String, u32> = token_strings
            .iter()
            .enumerate()
            .filter(|(_, t)| !t.is_empty())
            .map(|(id, t)| (t.clone(), id as u32))
            .collect();
        let lookup = |token: &'static str| {
            ids_by_string
                .get(token)
                .copied()
                .ok_or(TokenizerError::MissingSpecial { token })
        };
        let specials = SpecialIds {
            bos: lookup(BOS)?,
            eos: lookup(EOS)?,
            user: lookup(USER)?,
            assistant: lookup(ASSISTANT)?,
            think_start: lookup(THINK_START)?,
            think_end: lookup(THINK_END)?,
            dsml: lookup(DSML)?,
        };
        Ok(Tokenizer {
            inner,
            fast,
            token_strings,
            token_bytes,
            ids_by_string,
            specials,
        })
    }

    /// Number of ids (BPE tokens plus added tokens).
    pub fn vocab_size(&self) -> usize {
        self.token_strings.len()
    }

    /// The special ids the engine uses.
    pub fn specials(&self) -> SpecialIds {
        self.specials
    }

    /// Id of a vocabulary string (byte-level symbols for BPE tokens, e.g. "Ġthe").
    pub fn token_id(&self, token: &str) -> Option<u32> {
        self.ids_by_string.get(token).copied()
    }

    /// Vocabulary string of an id.
    pub fn token_string(&self, id: u32) -> Option<&str> {
        self.token_strings.get(id as usize).map(String::as_str)
    }

    /// The bytes an id decodes to (may be part of a UTF-8 sequence).
    pub fn token_bytes(&self, id: u32) -> Option<&[u8]> {
        self.token_bytes.get(id as usize).map(|b| &b[..])
    }

    /// Token ids of `text`; added tokens are recognised anywhere in it. No BOS is added.
    pub fn encode(&self, text: &str) -> Vec<u32> {
        if let Some(fast) = &self.fast {
            let mut ids = Vec::with_capacity(text.len() / 3 + 1);
            fast.encode(text, &mut ids);
            return ids;
        }
        self.encode_reference(text)
    }

    /// Drops the fast encoder's cache of recently seen pieces (it holds at most 200,000 pieces
    /// of up to 64 bytes and refills as text is encoded).
    pub fn clear_encode_cache(&self) {
        if let Some(fast) = &self.fast {
            fast.clear_cache();
        }
    }

    /// Whether [`Self::encode`] uses the fast encoder (DeepSeek's layout).
    pub fn has_fast_encoder(&self) -> bool {
        self.fast.is_some()
    }

    /// Token ids from the HF `tokenizers` engine (the reference the fast encoder is tested
    /// against).
    pub fn encode_reference(&self, text: &str) -> Vec<u32> {
        match self.inner.encode_fast(text, false) {
            Ok(encoding) => encoding.get_ids().to_vec(),
            // Unreachable: construction checked that every byte has a symbol, so byte-level BPE
            // cannot fail. Should it ever, the unmerged byte tokens still decode to the text.
            Err(_) => self.encode_bytes_unmerged(text),
        }
    }

    fn encode_bytes_unmerged(&self, text: &str) -> Vec<u32> {
        let symbols = byte_to_symbol();
        text.bytes()
            .filter_map(|b| self.token_id(&symbols[b as usize].to_string()))
            .collect()
    }

    /// Text of `ids`: their bytes concatenated, invalid UTF-8 replaced by U+FFFD. Ids outside
    /// the vocabulary are skipped (as HF does).
    pub fn decode(&self, ids: &[u32]) -> String {
        let mut bytes = Vec::new();
        for &id in ids {
            if let Some(b) = self.token_bytes(id) {
                bytes.extend_from_slice(b);
            }
        }
        String::from_utf8_lossy(&bytes).into_owned()
    }

    /// A streaming decoder for this tokenizer.
    pub fn detokenizer(&self) -> Detokenizer<'_> {
        Detokenizer {
            tokenizer: self,
            pending: Vec::new(),
        }
    }
}

/// Decodes one token at a time, holding back an incomplete UTF-8 sequence until the bytes that
/// complete it arrive. The concatenated output equals [`Tokenizer::decode`] of all ids.
pub struct Detokenizer<'t> {
    tokenizer: &'t Tokenizer,
    pending: Vec<u8>,
}

impl Detokenizer<'_> {
    /// Adds one token; returns the text that is now complete (possibly empty).
    pub fn push(&mut self, id: u32) -> String {
        if let Some(b) = self.tokenizer.token_bytes(id) {
            self.pending.extend_from_slice(b);
        }
        let mut out = String::new();
        let mut rest: &[u8] = &self.pending;
        loop {
            match std::str::from_utf8(rest) {
                Ok(s) => {
                    out.push_str(s);
                    rest = &[];
                    break;
                }
                Err(e) => {
                    let (valid, after) = rest.split_at(e.valid_up_to());
                    // from_utf8 just validated this prefix, so the fallback is never taken.
                    out.push_str(std::str::from_utf8(valid).unwrap_or_default());
                    match e.error_len() {
                        // An invalid sequence: replaced, exactly as from_utf8_lossy does.
                        Some(n) => {
                            out.push(char::REPLACEMENT_CHARACTER);
                            rest = &after[n..];
                        }
                        // A sequence cut by the end of the input: wait for more bytes.
                        None => {
                            rest = after;
                            break;
                        }
                    }
                }
            }
        }
        let keep = rest.len();
        let start = self.pending.len() - keep;
        self.pending.drain(..start);
        out
    }

    /// Bytes held back waiting for the rest of a UTF-8 sequence.
    pub fn pending(&self) -> &[u8] {
        &self.pending
    }

    /// Ends the stream: an incomplete trailing sequence becomes U+FFFD.
    pub fn finish(&mut self) -> String {
        let out = String::from_utf8_lossy(&self.pending).into_owned();
        self.pending.clear();
        out
    }
}

/// The two GGUF tokenizer arrays: `tokenizer.ggml.tokens` (id = index) and
/// `tokenizer.ggml.merges` ("left right", rank = index).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GgufVocab {
    pub tokens: Vec<String>,
    pub merges: Vec<String>,
}

/// Reads a Hugging Face tokenizer.json into the arrays a ds4 GGUF stores (for `ds4 convert`).
/// [`Tokenizer::from_gguf_vocab`] of the result tokenizes exactly as the file does.
pub fn gguf_vocab_from_tokenizer_json(path: impl AsRef<Path>) -> Result<GgufVocab, TokenizerError> {
    use serde_json::Value;
    let path = path.as_ref();
    let error = |message: String| TokenizerError::Load {
        path: path.display().to_string(),
        message,
    };
    let bytes = std::fs::read(path).map_err(|e| error(e.to_string()))?;
    let json: Value = serde_json::from_slice(&bytes).map_err(|e| error(e.to_string()))?;
    let mut by_id: Vec<Option<String>> = Vec::new();
    let mut put = |id: &Value, token: &str, field: &str| -> Result<(), TokenizerError> {
        let id = id
            .as_u64()
            .and_then(|i| u32::try_from(i).ok())
            .ok_or_else(|| error(format!("{field}: id of {token:?} is not a u32")))?
            as usize;
        if by_id.len() <= id {
            by_id.resize(id + 1, None);
        }
        by_id[id] = Some(token.to_string());
        Ok(())
    };
    let vocab = json["model"]["vocab"]
        .as_object()
        .ok_or_else(|| error("model.vocab is not an object".into()))?;
    for (token, id) in vocab {
        put(id, token, "model.vocab")?;
    }
    for added in json["added_tokens"]
        .as_array()
        .map(Vec::as_slice)
        .unwrap_or_default()
    {
        let content = added["content"]
            .as_str()
            .ok_or_else(|| error("added_tokens: content is not a string".into()))?;
        put(&added["id"], content, "added_tokens")?;
    }
    let tokens = by_id
        .into_iter()
        .enumerate()
        .map(|(id, t)| {
            t.ok_or_else(|| {
                error(format!(
                    "no token has id {id} (GGUF vocabularies are contiguous)"
                ))
            })
        })
        .collect::<Result<Vec<String>, _>>()?;
    let merges = json["model"]["merges"]
        .as_array()
        .ok_or_else(|| error("model.merges is not an array".into()))?
        .iter()
        .enumerate()
        .map(|(i, m)| match m {
            Value::String(s) => Ok(s.clone()),
            Value::Array(pair) if pair.len() == 2 && pair.iter().all(Value::is_string) => {
                Ok(format!(
                    "{} {}",
                    pair[0].as_str().unwrap_or_default(),
                    pair[1].as_str().unwrap_or_default()
                ))
            }
            _ => Err(error(format!(
                "model.merges[{i}] is neither \"a b\" nor [\"a\", \"b\"]"
            ))),
        })
        .collect::<Result<Vec<String>, _>>()?;
    Ok(GgufVocab { tokens, merges })
}

/// Builds the fast encoder from the vocabulary strings (id = index), merge pairs in rank order
/// and the added tokens.
fn fast_encoder(
    token_strings: &[String],
    merges: &[(String, String)],
    added: Vec<(String, u32)>,
) -> Result<FastEncoder, TokenizerError> {
    let ids: HashMap<&str, u32> = token_strings
        .iter()
        .enumerate()
        .map(|(id, t)| (t.as_str(), id as u32))
        .collect();
    let mut byte_ids = [0u32; 256];
    for (byte, symbol) in byte_to_symbol().iter().enumerate() {
        byte_ids[byte] = *ids
            .get(symbol.to_string().as_str())
            .ok_or(TokenizerError::MissingByte { byte: byte as u8 })?;
    }
    let mut merge_ids = Vec::with_capacity(merges.len());
    for (index, (left, right)) in merges.iter().enumerate() {
        let merged = format!("{left}{right}");
        match (
            ids.get(left.as_str()),
            ids.get(right.as_str()),
            ids.get(merged.as_str()),
        ) {
            (Some(&a), Some(&b), Some(&ab)) => merge_ids.push((a, b, ab)),
            _ => {
                return Err(TokenizerError::MergeOutOfVocab {
                    index,
                    merge: format!("{left} {right}"),
                })
            }
        }
    }
    FastEncoder::new(byte_ids, merge_ids, added).map_err(TokenizerError::Build)
}

/// Merge pairs (left, right) in rank order.
type MergePairs = Vec<(String, String)>;
/// Added tokens: literal text and id.
type AddedTokens = Vec<(String, u32)>;

/// If a tokenizer.json has exactly DeepSeek's layout (no normalizer, DeepSeek's pre-tokenizer,
/// plain byte-level BPE, added tokens without stripping rules), its merges and added tokens.
fn deepseek_layout(json: &serde_json::Value) -> Option<(MergePairs, AddedTokens)> {
    use serde_json::Value;
    let normalizer_ok = match &json["normalizer"] {
        Value::Null => true,
        n => n["type"] == "Sequence" && n["normalizers"].as_array().is_some_and(Vec::is_empty),
    };
    let pre = &json["pre_tokenizer"];
    let steps = pre["pretokenizers"].as_array()?;
    let splits_ok = pre["type"] == "Sequence"
        && steps.len() == PRE_SPLITS.len() + 1
        && PRE_SPLITS.iter().zip(steps).all(|(pattern, step)| {
            step["type"] == "Split"
                && step["pattern"]["Regex"] == *pattern
                && step["behavior"] == "Isolated"
                && step["invert"] == false
        });
    let byte_level = &steps[PRE_SPLITS.len()];
    let byte_level_ok = byte_level["type"] == "ByteLevel"
        && byte_level["add_prefix_space"] == false
        && byte_level["use_regex"] == false;
    let model = &json["model"];
    let empty_or_null = |v: &Value| v.is_null() || v == "";
    let model_ok = model["type"] == "BPE"
        && model["dropout"].is_null()
        && model["unk_token"].is_null()
        && empty_or_null(&model["continuing_subword_prefix"])
        && empty_or_null(&model["end_of_word_suffix"])
        && model["byte_fallback"] != true
        && model["ignore_merges"] != true;
    if !(normalizer_ok && splits_ok && byte_level_ok && model_ok) {
        return None;
    }
    let mut merges = Vec::new();
    for m in model["merges"].as_array()? {
        match m {
            Value::String(s) => {
                let (a, b) = s.split_once(' ')?;
                merges.push((a.to_string(), b.to_string()));
            }
            Value::Array(pair) if pair.len() == 2 => {
                merges.push((pair[0].as_str()?.to_string(), pair[1].as_str()?.to_string()));
            }
            _ => return None,
        }
    }
    let mut added = Vec::new();
    for t in json["added_tokens"].as_array()? {
        if t["single_word"] == true || t["lstrip"] == true || t["rstrip"] == true {
            return None;
        }
        added.push((
            t["content"].as_str()?.to_string(),
            u32::try_from(t["id"].as_u64()?).ok()?,
        ));
    }
    Some((merges, added))
}

/// GPT-2's byte → printable symbol table used by byte-level BPE: printable Latin-1 bytes map to
/// themselves, the other 68 bytes to U+0100.. in byte order.
pub fn byte_to_symbol() -> [char; 256] {
    let mut table = ['\0'; 256];
    let mut next_extra = 0u32;
    for byte in 0..=255u8 {
        let printable = matches!(byte, b'!'..=b'~' | 0xA1..=0xAC | 0xAE..=0xFF);
        let code = if printable {
            u32::from(byte)
        } else {
            next_extra += 1;
            255 + next_extra
        };
        table[byte as usize] = char::from_u32(code).unwrap_or('\0');
    }
    table
}

/// Bytes of one vocabulary string: byte symbols mapped back to bytes; a string with any other
/// character (an added token such as `<｜User｜>`) is its own UTF-8 text.
fn decode_symbols(token: &str, symbol_bytes: &HashMap<char, u8>) -> Box<[u8]> {
    let mapped: Option<Vec<u8>> = token
        .chars()
        .map(|c| symbol_bytes.get(&c).copied())
        .collect();
    mapped
        .unwrap_or_else(|| token.as_bytes().to_vec())
        .into_boxed_slice()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn byte_table_is_a_bijection_onto_gpt2_symbols() {
        let table = byte_to_symbol();
        let distinct: std::collections::HashSet<char> = table.iter().copied().collect();
        assert_eq!(distinct.len(), 256);
        assert_eq!(table[b' ' as usize], 'Ġ');
        assert_eq!(table[b'\n' as usize], 'Ċ');
        assert_eq!(table[b'a' as usize], 'a');
        assert_eq!(table[0xAD], '\u{143}');
    }
}
