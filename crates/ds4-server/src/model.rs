//! The real model and tokenizer behind the engine's traits: a ds4-model [`Session`] and the
//! ds4-text [`Tokenizer`].

use ds4_model::backend::{Logits, Session};
use ds4_text::tokenizer::Tokenizer;

use crate::runner::{ModelRunner, TextCodec};

/// A backend session as the engine's model.
pub struct SessionRunner {
    session: Box<dyn Session>,
    vocab: usize,
}

impl SessionRunner {
    pub fn new(session: Box<dyn Session>, vocab: usize) -> Self {
        SessionRunner { session, vocab }
    }
}

impl ModelRunner for SessionRunner {
    fn vocab_size(&self) -> usize {
        self.vocab
    }
    fn ctx(&self) -> usize {
        self.session.ctx()
    }
    fn tokens(&self) -> &[u32] {
        self.session.tokens()
    }
    fn preferred_span(&self) -> usize {
        self.session.preferred_span()
    }
    fn eval(&mut self, tokens: &[u32]) -> Result<(), String> {
        let result = match tokens {
            // A decode step leaves the logits in the session: no vector of its own.
            [token] => self.session.decode_step(*token).map(|_| ()),
            // Prefill (once per request): the returned copy of the last row is dropped.
            _ => self.session.eval(tokens, Logits::Last).map(|_| ()),
        };
        result.map_err(|e| e.to_string())
    }
    fn logits(&self) -> &[f32] {
        self.session.last_logits()
    }
    fn decode_greedy(&mut self, token: u32) -> Result<u32, String> {
        self.session
            .decode_greedy(token, &[])
            .map_err(|e| e.to_string())
    }
    fn reset(&mut self) {
        self.session.reset();
    }
    fn snapshot(&self) -> Option<Vec<u8>> {
        Some(self.session.snapshot())
    }
    fn restore(&mut self, payload: &[u8]) -> Result<(), String> {
        self.session.restore(payload).map_err(|e| e.to_string())
    }
}

/// DeepSeek's tokenizer as the engine's codec.
pub struct TokenizerCodec(pub Tokenizer);

impl TextCodec for TokenizerCodec {
    fn encode(&self, text: &str) -> Vec<u32> {
        self.0.encode(text)
    }
    fn token_bytes(&self, id: u32) -> Vec<u8> {
        self.0
            .token_bytes(id)
            .map(<[u8]>::to_vec)
            .unwrap_or_default()
    }
    fn eos(&self) -> u32 {
        self.0.specials().eos
    }
}
