//! The token transcript of an interactive chat, as ds4's CLI keeps it:
//! `BOS [THINKMAX preamble] system` then per turn `<｜User｜>text<｜Assistant｜><think>|</think>`,
//! the sampled reply tokens exactly as drawn (reasoning included), and `<｜end▁of▁sentence｜>`.
//!
//! Turns only append, so the session's tokens stay a prefix of the transcript and a new turn
//! prefills only its own tokens. The sampled EOS is never evaluated: it is appended here and
//! becomes the first token the next turn prefills. Changing the Think Max preamble (it sits
//! right after BOS) or the context rewrites earlier tokens; [`reusable_prefix`] then says the
//! session must be rebuilt.

use ds4_text::chat::{ThinkMode, THINK_MAX_PREFIX};
use ds4_text::tokenizer::{Tokenizer, ASSISTANT, THINK_END, THINK_START, USER};

#[derive(Clone, Debug)]
pub struct Transcript {
    tokens: Vec<u32>,
    /// Where the Think Max preamble starts (right after BOS) and how many tokens it has.
    preamble_at: usize,
    preamble_len: usize,
}

impl Transcript {
    /// A transcript holding BOS, the preamble of `think` (the mode in effect at the context
    /// size) and the system prompt.
    pub fn new(tokenizer: &Tokenizer, system: &str, think: ThinkMode) -> Transcript {
        let mut t = Transcript {
            tokens: vec![tokenizer.specials().bos],
            preamble_at: 1,
            preamble_len: 0,
        };
        t.set_think_preamble(tokenizer, think);
        t.tokens.extend(tokenizer.encode(system));
        t
    }

    /// A transcript resumed from saved tokens (`/load`), which start with BOS; a Think Max
    /// preamble right after it is recognised so a later mode change can remove it.
    pub fn from_tokens(tokenizer: &Tokenizer, tokens: Vec<u32>) -> Transcript {
        let preamble = tokenizer.encode(THINK_MAX_PREFIX);
        let preamble_len = if tokens.len() > preamble.len() && tokens[1..].starts_with(&preamble) {
            preamble.len()
        } else {
            0
        };
        Transcript {
            tokens,
            preamble_at: 1,
            preamble_len,
        }
    }

    pub fn tokens(&self) -> &[u32] {
        &self.tokens
    }

    pub fn len(&self) -> usize {
        self.tokens.len()
    }

    /// Puts the Think Max preamble in place when `think` (already adjusted to the context) is
    /// Max, and removes it otherwise. Returns whether the tokens changed.
    pub fn set_think_preamble(&mut self, tokenizer: &Tokenizer, think: ThinkMode) -> bool {
        let wanted = if think == ThinkMode::Max {
            tokenizer.encode(THINK_MAX_PREFIX)
        } else {
            Vec::new()
        };
        let range = self.preamble_at..self.preamble_at + self.preamble_len;
        if self.tokens[range.clone()] == wanted[..] {
            return false;
        }
        self.preamble_len = wanted.len();
        self.tokens.splice(range, wanted);
        true
    }

    /// Appends a user turn and the assistant header that opens the reply (`<think>` when
    /// thinking, `</think>` otherwise). Returns the length before the turn, for
    /// [`Transcript::truncate`].
    pub fn begin_turn(&mut self, tokenizer: &Tokenizer, text: &str, thinking: bool) -> usize {
        let before = self.tokens.len();
        let tag = if thinking { THINK_START } else { THINK_END };
        self.tokens
            .extend(tokenizer.encode(&format!("{USER}{text}{ASSISTANT}{tag}")));
        before
    }

    /// Appends one sampled token (or the EOS that ends a reply).
    pub fn push(&mut self, token: u32) {
        self.tokens.push(token);
    }

    /// Drops everything after the first `len` tokens (a turn that produced nothing).
    pub fn truncate(&mut self, len: usize) {
        if len >= self.preamble_at {
            self.tokens.truncate(len);
        }
    }
}

/// How many leading tokens of `transcript` a session holding `session` can keep: all of them
/// when they are a prefix of the transcript, else `None` (the session must be reset and the
/// whole transcript prefilled).
pub fn reusable_prefix(session: &[u32], transcript: &[u32]) -> Option<usize> {
    transcript.starts_with(session).then_some(session.len())
}

#[cfg(test)]
mod tests {
    use super::*;
    use ds4_text::chat::{render_chat, ChatPrompt, Message};

    fn tokenizer() -> Tokenizer {
        let path = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../../tests/fixtures/tokenizer/tokenizer.json"
        );
        Tokenizer::from_tokenizer_json(path).expect("the fixture tokenizer loads")
    }

    #[test]
    fn non_thinking_turns_match_the_servers_rendering() {
        let tok = tokenizer();
        let mut t = Transcript::new(&tok, "You are a helpful assistant", ThinkMode::Off);
        t.begin_turn(&tok, "Hello there", false);
        let reply = tok.encode("Hi! How can I help?");
        for &id in &reply {
            t.push(id);
        }
        t.push(tok.specials().eos);
        let before_second = t.len();
        t.begin_turn(&tok, "Tell me about 42.", false);
        let rendered = render_chat(&ChatPrompt {
            messages: vec![
                Message::system("You are a helpful assistant"),
                Message::user("Hello there"),
                Message::assistant("Hi! How can I help?"),
                Message::user("Tell me about 42."),
            ],
            tools: Vec::new(),
            think: ThinkMode::Off,
            ctx: 32768,
        });
        assert_eq!(tok.decode(t.tokens()), rendered);
        assert_eq!(t.tokens(), &tok.encode(&rendered)[..]);
        // The session after the first reply holds everything but the EOS: all of it is reused.
        let session = &t.tokens()[..before_second - 1];
        assert_eq!(
            reusable_prefix(session, t.tokens()),
            Some(before_second - 1)
        );
    }

    #[test]
    fn thinking_turn_opens_with_think_and_keeps_reasoning() {
        let tok = tokenizer();
        let mut t = Transcript::new(&tok, "sys", ThinkMode::High);
        t.begin_turn(&tok, "q", true);
        let text = tok.decode(t.tokens());
        assert!(
            text.ends_with("<｜User｜>q<｜Assistant｜><think>"),
            "{text}"
        );
        for id in tok.encode("reasoning</think>answer") {
            t.push(id);
        }
        t.push(tok.specials().eos);
        t.begin_turn(&tok, "q2", true);
        let text = tok.decode(t.tokens());
        assert!(
            text.ends_with("<think>reasoning</think>answer<｜end▁of▁sentence｜><｜User｜>q2<｜Assistant｜><think>"),
            "{text}"
        );
    }

    #[test]
    fn think_max_preamble_goes_after_bos_and_back() {
        let tok = tokenizer();
        let mut t = Transcript::new(&tok, "sys", ThinkMode::High);
        t.begin_turn(&tok, "q", true);
        let plain = t.tokens().to_vec();
        assert!(t.set_think_preamble(&tok, ThinkMode::Max));
        let text = tok.decode(t.tokens());
        assert!(text.starts_with(&format!("<｜begin▁of▁sentence｜>{THINK_MAX_PREFIX}sys")));
        assert!(!t.set_think_preamble(&tok, ThinkMode::Max));
        // The session's old tokens are no longer a prefix: it must be rebuilt.
        assert_eq!(reusable_prefix(&plain, t.tokens()), None);
        assert!(t.set_think_preamble(&tok, ThinkMode::High));
        assert_eq!(t.tokens(), &plain[..]);
    }

    #[test]
    fn truncate_rolls_a_turn_back() {
        let tok = tokenizer();
        let mut t = Transcript::new(&tok, "sys", ThinkMode::Off);
        let start = t.tokens().to_vec();
        let before = t.begin_turn(&tok, "question", false);
        assert!(t.len() > before);
        t.truncate(before);
        assert_eq!(t.tokens(), &start[..]);
    }

    #[test]
    fn a_longer_session_is_not_reusable() {
        assert_eq!(reusable_prefix(&[1, 2, 3], &[1, 2]), None);
        assert_eq!(reusable_prefix(&[1, 2], &[1, 3, 4]), None);
        assert_eq!(reusable_prefix(&[], &[1, 3, 4]), Some(0));
    }
}
