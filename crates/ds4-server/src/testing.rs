//! Deterministic stand-ins for a model and tokenizer, for tests that exercise the server
//! without model math: [`ByteCodec`] (one token per byte, plus DeepSeek's special strings)
//! and [`ScriptedRunner`] (its logits make the sampled text follow a given script).

use std::time::Duration;

use crate::runner::{ModelRunner, TextCodec};

/// DeepSeek V4's special token strings (matched anywhere in text, as the real tokenizer does).
pub const SPECIALS: [&str; 7] = [
    "<｜begin▁of▁sentence｜>",
    "<｜end▁of▁sentence｜>",
    "<｜User｜>",
    "<｜Assistant｜>",
    "<think>",
    "</think>",
    "｜DSML｜",
];

/// Token ids 0..256 are bytes; 256 + i is `SPECIALS[i]`.
#[derive(Clone, Copy, Debug, Default)]
pub struct ByteCodec;

impl ByteCodec {
    pub const VOCAB: usize = 256 + SPECIALS.len();
    pub const EOS: u32 = 257;
}

impl TextCodec for ByteCodec {
    fn encode(&self, text: &str) -> Vec<u32> {
        let mut out = Vec::with_capacity(text.len());
        let mut rest = text;
        'outer: while !rest.is_empty() {
            for (i, s) in SPECIALS.iter().enumerate() {
                if let Some(after) = rest.strip_prefix(s) {
                    out.push(256 + i as u32);
                    rest = after;
                    continue 'outer;
                }
            }
            let ch = rest.chars().next().map(char::len_utf8).unwrap_or(1);
            out.extend(rest.as_bytes()[..ch].iter().map(|&b| u32::from(b)));
            rest = &rest[ch..];
        }
        out
    }

    fn token_bytes(&self, id: u32) -> Vec<u8> {
        match id {
            0..=255 => vec![id as u8],
            _ => SPECIALS
                .get(id as usize - 256)
                .map(|s| s.as_bytes().to_vec())
                .unwrap_or_default(),
        }
    }

    fn eos(&self) -> u32 {
        Self::EOS
    }
}

/// A model whose every generation is the next of its scripted replies, token by token, then
/// EOS. A multi-token eval (or a token off the script) counts as a new prompt. Its logits put
/// the script's next token first; `decode_greedy` picks it as a device would and records it.
pub struct ScriptedRunner {
    replies: Vec<Vec<u32>>,
    current: usize,
    pos: usize,
    generating: bool,
    tokens: Vec<u32>,
    ctx: usize,
    delay: Duration,
    /// Tokens evaluated as prompt (prefill), summed over the runner's life.
    pub prefilled: usize,
    /// The prefill span it states (ModelRunner::preferred_span).
    span: usize,
    /// The length of every eval, shared with the test that reads it after the engine took
    /// the runner.
    eval_sizes: std::sync::Arc<std::sync::Mutex<Vec<usize>>>,
    /// Every `decode_greedy` call (not counted in `eval_sizes`), shared the same way.
    greedy_picks: std::sync::Arc<std::sync::Mutex<Vec<GreedyPick>>>,
    /// The logits after the last token (empty before the first eval).
    logits: Vec<f32>,
}

/// One `decode_greedy` call of a [`ScriptedRunner`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GreedyPick {
    /// The token the call evaluated.
    pub token: u32,
    /// The id it returned.
    pub pick: u32,
    /// Where the pick stands in its scripted reply (the reply's length: the EOS after it).
    pub reply_pos: usize,
}

impl ScriptedRunner {
    pub fn new(replies: &[&str], ctx: usize) -> Self {
        let codec = ByteCodec;
        ScriptedRunner {
            replies: replies.iter().map(|r| codec.encode(r)).collect(),
            current: 0,
            pos: 0,
            generating: false,
            tokens: Vec::new(),
            ctx,
            delay: Duration::ZERO,
            prefilled: 0,
            span: 0,
            eval_sizes: Default::default(),
            greedy_picks: Default::default(),
            logits: Vec::new(),
        }
    }

    /// Replies given as token ids (e.g. bytes of a special string, which the codec's `encode`
    /// would turn into the special id: a tokenization a prompt re-render will not reproduce).
    pub fn from_tokens(replies: Vec<Vec<u32>>, ctx: usize) -> Self {
        let mut r = ScriptedRunner::new(&[], ctx);
        r.replies = replies;
        r
    }

    /// Sleeps this long per evaluated call, to simulate a slow model.
    pub fn with_delay(mut self, delay: Duration) -> Self {
        self.delay = delay;
        self
    }

    /// States a prefill span, as a GPU backend does.
    pub fn with_span(mut self, span: usize) -> Self {
        self.span = span;
        self
    }

    /// The length of every eval call, as the engine makes them.
    pub fn eval_sizes(&self) -> std::sync::Arc<std::sync::Mutex<Vec<usize>>> {
        self.eval_sizes.clone()
    }

    /// Appends `tokens` and sets the logits after them (the eval of both `eval` and
    /// `decode_greedy`).
    fn step(&mut self, tokens: &[u32]) -> Result<(), String> {
        if self.tokens.len() + tokens.len() > self.ctx {
            return Err(format!(
                "context overflow: {} + {} > {}",
                self.tokens.len(),
                tokens.len(),
                self.ctx
            ));
        }
        if !self.delay.is_zero() {
            std::thread::sleep(self.delay);
        }
        if self.generating && tokens.len() == 1 && tokens[0] == self.next_token() {
            self.pos += 1;
        } else {
            if self.generating && !self.replies.is_empty() {
                self.current = (self.current + 1) % self.replies.len();
            }
            self.generating = true;
            self.pos = 0;
            self.prefilled += tokens.len();
        }
        self.tokens.extend_from_slice(tokens);
        let next = self.next_token() as usize;
        self.logits.clear();
        self.logits.resize(ByteCodec::VOCAB, -1.0e9);
        self.logits[next] = 0.0;
        Ok(())
    }

    /// Every `decode_greedy` call, as the engine makes them.
    pub fn greedy_picks(&self) -> std::sync::Arc<std::sync::Mutex<Vec<GreedyPick>>> {
        self.greedy_picks.clone()
    }

    fn next_token(&self) -> u32 {
        let reply = self.replies.get(self.current);
        reply
            .and_then(|r| r.get(self.pos))
            .copied()
            .unwrap_or(ByteCodec::EOS)
    }
}

impl ModelRunner for ScriptedRunner {
    fn vocab_size(&self) -> usize {
        ByteCodec::VOCAB
    }
    fn ctx(&self) -> usize {
        self.ctx
    }
    fn tokens(&self) -> &[u32] {
        &self.tokens
    }
    fn eval(&mut self, tokens: &[u32]) -> Result<(), String> {
        self.step(tokens)?;
        if let Ok(mut sizes) = self.eval_sizes.lock() {
            sizes.push(tokens.len());
        }
        Ok(())
    }
    fn logits(&self) -> &[f32] {
        &self.logits
    }
    fn decode_greedy(&mut self, token: u32) -> Result<u32, String> {
        self.step(&[token])?;
        let pick = ds4_model::greedy::argmax(&self.logits);
        if let Ok(mut picks) = self.greedy_picks.lock() {
            picks.push(GreedyPick {
                token,
                pick,
                reply_pos: self.pos,
            });
        }
        Ok(pick)
    }
    fn reset(&mut self) {
        self.tokens.clear();
        self.logits.clear();
    }
    fn preferred_span(&self) -> usize {
        self.span
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codec_round_trips_specials_and_utf8() {
        let c = ByteCodec;
        let text = "<｜User｜>héllo<｜Assistant｜></think>x";
        let ids = c.encode(text);
        assert_eq!(ids[0], 258);
        let bytes: Vec<u8> = ids.iter().flat_map(|&i| c.token_bytes(i)).collect();
        assert_eq!(String::from_utf8(bytes).unwrap(), text);
    }

    #[test]
    fn runner_follows_the_script_then_eos() {
        let mut r = ScriptedRunner::new(&["abc"], 100);
        assert!(r.logits().is_empty());
        r.eval(&[1, 2, 3]).unwrap();
        assert_eq!(argmax(r.logits()), u32::from(b'a'));
        r.eval(&[u32::from(b'a')]).unwrap();
        assert_eq!(argmax(r.logits()), u32::from(b'b'));
        assert_eq!(r.decode_greedy(u32::from(b'b')).unwrap(), u32::from(b'c'));
        assert_eq!(argmax(r.logits()), u32::from(b'c'));
        assert_eq!(r.decode_greedy(u32::from(b'c')).unwrap(), ByteCodec::EOS);
        assert_eq!(r.tokens().len(), 6);
        assert_eq!(*r.eval_sizes().lock().unwrap(), [3, 1]);
        let picks: Vec<(u32, usize)> = r
            .greedy_picks()
            .lock()
            .unwrap()
            .iter()
            .map(|g| (g.pick, g.reply_pos))
            .collect();
        assert_eq!(picks, [(u32::from(b'c'), 2), (ByteCodec::EOS, 3)]);
    }

    fn argmax(l: &[f32]) -> u32 {
        l.iter()
            .enumerate()
            .fold((0, f32::MIN), |b, (i, &v)| if v > b.1 { (i, v) } else { b })
            .0 as u32
    }
}
