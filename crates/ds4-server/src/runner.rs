//! What the engine worker needs from a model and its tokenizer. The real implementations wrap
//! a ds4-model session and the ds4-text tokenizer; tests use the scripted ones in
//! [`crate::testing`].

/// A model session: a token sequence whose state (KV cache) is live.
pub trait ModelRunner: Send {
    /// Logit count of one position.
    fn vocab_size(&self) -> usize;
    /// Context size: the session holds at most this many tokens.
    fn ctx(&self) -> usize;
    /// The tokens whose state is live, oldest first.
    fn tokens(&self) -> &[u32];
    /// Appends `tokens` to the session (prefill when several, decode when one); the logits
    /// that follow the last of them are then [`ModelRunner::logits`]. `tokens` is never empty.
    fn eval(&mut self, tokens: &[u32]) -> Result<(), String>;
    /// The logits after the last evaluated (or restored) token, borrowed from the runner (no
    /// copy of a vocabulary per token). Valid until the next `eval`, `decode_greedy`, `reset`
    /// or `restore`; empty before the first. After `decode_greedy` a backend may fetch them
    /// from its device only now.
    fn logits(&self) -> &[f32];
    /// One greedy decode step: appends `token` and returns the first maximum of the logits
    /// after it ([`ds4_model::greedy::argmax`], the sampler's pick at temperature 0), which a
    /// backend may pick on its device without handing the logits to the host.
    /// [`ModelRunner::logits`] then holds the logits after `token`, as after `eval(&[token])`.
    fn decode_greedy(&mut self, token: u32) -> Result<u32, String> {
        self.eval(&[token])?;
        Ok(ds4_model::greedy::argmax(self.logits()))
    }
    /// Drops all live state.
    fn reset(&mut self);
    /// The backend's prefill span ([`ds4_model::backend::Session::preferred_span`]; 0: no
    /// preference): prefill chunks are at least this long.
    fn preferred_span(&self) -> usize {
        0
    }
    /// The live state in ds4's session payload layout, for the disk KV cache (`None`: this
    /// runner cannot be saved).
    fn snapshot(&self) -> Option<Vec<u8>> {
        None
    }
    /// Replaces the live state with a payload from [`ModelRunner::snapshot`]; the logits after
    /// its last token are then [`ModelRunner::logits`]. On error the state is unspecified; the
    /// caller resets.
    fn restore(&mut self, _payload: &[u8]) -> Result<(), String> {
        Err("this model runner cannot restore a saved session".into())
    }
}

/// Text ↔ token ids.
pub trait TextCodec: Send + Sync {
    /// Tokenizes text; the special token strings become their ids wherever they occur.
    fn encode(&self, text: &str) -> Vec<u32>;
    /// The bytes one token stands for (a token may hold part of a UTF-8 character).
    fn token_bytes(&self, id: u32) -> Vec<u8>;
    /// End of sentence: sampling it ends the generation.
    fn eos(&self) -> u32;
}

/// Turns a token stream into text, holding back an incomplete UTF-8 character until the token
/// that completes it arrives.
#[derive(Debug, Default)]
pub struct Utf8Stream {
    pending: Vec<u8>,
}

impl Utf8Stream {
    pub fn push(&mut self, bytes: &[u8]) -> String {
        self.pending.extend_from_slice(bytes);
        let mut out = String::new();
        loop {
            match std::str::from_utf8(&self.pending) {
                Ok(s) => {
                    out.push_str(s);
                    self.pending.clear();
                    return out;
                }
                Err(e) => {
                    let valid = e.valid_up_to();
                    // Safety of the slice: `valid` is a char boundary reported by from_utf8.
                    out.push_str(std::str::from_utf8(&self.pending[..valid]).unwrap_or_default());
                    match e.error_len() {
                        // Incomplete character at the end: wait for more bytes.
                        None => {
                            self.pending.drain(..valid);
                            return out;
                        }
                        // Invalid bytes can never become valid: replace them and go on.
                        Some(bad) => {
                            out.push(char::REPLACEMENT_CHARACTER);
                            self.pending.drain(..valid + bad);
                        }
                    }
                }
            }
        }
    }

    /// Whatever is still held at the end (an incomplete character becomes U+FFFD).
    pub fn finish(&mut self) -> String {
        let s = String::from_utf8_lossy(&self.pending).into_owned();
        self.pending.clear();
        s
    }
}

/// Decodes a token sequence to text (lossy for invalid UTF-8).
pub fn decode_tokens(codec: &dyn TextCodec, tokens: &[u32]) -> String {
    let mut bytes = Vec::new();
    for &t in tokens {
        bytes.extend(codec.token_bytes(t));
    }
    String::from_utf8_lossy(&bytes).into_owned()
}

#[cfg(test)]
mod tests {
    use super::Utf8Stream;

    #[test]
    fn split_character_is_held_until_complete() {
        let mut s = Utf8Stream::default();
        let e = "é".as_bytes();
        assert_eq!(s.push(b"ab"), "ab");
        assert_eq!(s.push(&e[..1]), "");
        assert_eq!(s.push(&e[1..]), "é");
        assert_eq!(s.push(&[0xff, b'x']), "\u{fffd}x");
        assert_eq!(s.push(&e[..1]), "");
        assert_eq!(s.finish(), "\u{fffd}");
    }
}
