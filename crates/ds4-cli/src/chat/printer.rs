//! Streams sampled tokens as text: the reasoning of a thinking turn (up to `</think>`) to
//! stderr, dimmed when stderr is a terminal; the answer to stdout. UTF-8 sequences split
//! across tokens are held back until complete.

use std::io::{IsTerminal, Stderr, Stdout, Write};

use ds4_text::tokenizer::{Detokenizer, Tokenizer};

const DIM: &str = "\x1b[2m";
const RESET: &str = "\x1b[0m";

/// Writes a reply's answer to `A` and its reasoning to `R`.
pub struct TokenPrinter<'t, A: Write, R: Write> {
    detok: Detokenizer<'t>,
    think_start: u32,
    think_end: u32,
    answer: A,
    reasoning: R,
    in_reasoning: bool,
    /// Dim the reasoning with ANSI codes.
    dim_reasoning: bool,
    /// A dim attribute is switched on and not yet reset.
    dim_open: bool,
    /// Whether the last character written (to either stream) was a newline.
    at_line_start: bool,
    /// The answer stream is a closed pipe: the answer has nowhere to go.
    answer_closed: bool,
}

impl<'t> TokenPrinter<'t, Stdout, Stderr> {
    /// The console printer: answer to stdout, reasoning to stderr (dimmed on a terminal).
    /// `thinking`: the reply starts inside `<think>` (the prompt ended with it).
    pub fn console(tokenizer: &'t Tokenizer, thinking: bool) -> Self {
        let dim = std::io::stderr().is_terminal();
        TokenPrinter::new(
            tokenizer,
            thinking,
            std::io::stdout(),
            std::io::stderr(),
            dim,
        )
    }
}

impl<'t, A: Write, R: Write> TokenPrinter<'t, A, R> {
    pub fn new(
        tokenizer: &'t Tokenizer,
        thinking: bool,
        answer: A,
        reasoning: R,
        dim_reasoning: bool,
    ) -> Self {
        let specials = tokenizer.specials();
        TokenPrinter {
            detok: tokenizer.detokenizer(),
            think_start: specials.think_start,
            think_end: specials.think_end,
            answer,
            reasoning,
            in_reasoning: thinking,
            dim_reasoning,
            dim_open: false,
            at_line_start: true,
            answer_closed: false,
        }
    }

    /// Writes one token; returns false once the answer stream is a closed pipe (the reply is
    /// lost, so generation can stop).
    pub fn push(&mut self, token: u32) -> bool {
        if token == self.think_end || token == self.think_start {
            // The tags switch streams; flush what belongs to the old one first.
            let rest = self.detok.finish();
            self.write(&rest);
            self.end_dim();
            if token == self.think_end && self.in_reasoning && !self.at_line_start {
                self.write("\n");
            }
            self.in_reasoning = token == self.think_start;
            return !self.answer_closed;
        }
        let text = self.detok.push(token);
        self.write(&text);
        !self.answer_closed
    }

    /// Ends the reply: flushes held-back bytes and ends the line.
    pub fn finish(&mut self) {
        let rest = self.detok.finish();
        self.write(&rest);
        self.end_dim();
        if !self.at_line_start {
            self.write("\n");
        }
    }

    /// Resets the dim attribute if it is on.
    fn end_dim(&mut self) {
        if self.dim_open {
            let _ = self.reasoning.write_all(RESET.as_bytes());
            let _ = self.reasoning.flush();
            self.dim_open = false;
        }
    }

    fn write(&mut self, text: &str) {
        if text.is_empty() {
            return;
        }
        // Errors on the reasoning stream (stderr) are ignored; a closed answer stream is
        // remembered so generation stops, and the statistics still reach stderr.
        if self.in_reasoning {
            // The closing newline of the reasoning is written after the reset.
            if self.dim_reasoning && !self.dim_open && text != "\n" {
                let _ = self.reasoning.write_all(DIM.as_bytes());
                self.dim_open = true;
            }
            let _ = self.reasoning.write_all(text.as_bytes());
            let _ = self.reasoning.flush();
        } else {
            let written = self
                .answer
                .write_all(text.as_bytes())
                .and_then(|()| self.answer.flush());
            if written.is_err_and(|e| e.kind() == std::io::ErrorKind::BrokenPipe) {
                self.answer_closed = true;
            }
        }
        self.at_line_start = text.ends_with('\n');
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tokenizer() -> Tokenizer {
        let path = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../../tests/fixtures/tokenizer/tokenizer.json"
        );
        Tokenizer::from_tokenizer_json(path).expect("the fixture tokenizer loads")
    }

    /// Prints `text`'s tokens; returns (answer, reasoning).
    fn print(tok: &Tokenizer, thinking: bool, dim: bool, text: &str) -> (String, String) {
        let (mut answer, mut reasoning) = (Vec::new(), Vec::new());
        let mut p = TokenPrinter::new(tok, thinking, &mut answer, &mut reasoning, dim);
        for id in tok.encode(text) {
            assert!(p.push(id));
        }
        p.finish();
        (
            String::from_utf8(answer).unwrap(),
            String::from_utf8(reasoning).unwrap(),
        )
    }

    #[test]
    fn reasoning_and_answer_go_to_their_streams() {
        let tok = tokenizer();
        let (answer, reasoning) = print(&tok, true, false, "Let me think.</think>It is 4.");
        assert_eq!(reasoning, "Let me think.\n");
        assert_eq!(answer, "It is 4.\n");
        let (answer, reasoning) = print(&tok, true, true, "hmm</think>ok");
        assert_eq!(reasoning, format!("{DIM}hmm{RESET}\n"));
        assert_eq!(answer, "ok\n");
    }

    #[test]
    fn a_non_thinking_reply_is_all_answer() {
        let tok = tokenizer();
        let (answer, reasoning) = print(&tok, false, true, "Plain answer\n");
        assert_eq!(answer, "Plain answer\n");
        assert_eq!(reasoning, "");
    }

    #[test]
    fn characters_split_across_tokens_are_whole() {
        let tok = tokenizer();
        // Byte-level tokens of an emoji: each alone is not valid UTF-8.
        let text = "🦀 and 漢字";
        let (answer, _) = print(&tok, false, false, text);
        assert_eq!(answer, format!("{text}\n"));
    }

    #[test]
    fn a_closed_answer_stream_stops_the_reply() {
        struct ClosedPipe;
        impl Write for ClosedPipe {
            fn write(&mut self, _: &[u8]) -> std::io::Result<usize> {
                Err(std::io::ErrorKind::BrokenPipe.into())
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        let tok = tokenizer();
        let mut reasoning = Vec::new();
        let mut p = TokenPrinter::new(&tok, true, ClosedPipe, &mut reasoning, false);
        let ids = tok.encode("thinking</think>answer");
        let (last, before) = ids.split_last().unwrap();
        for &id in before {
            assert!(p.push(id), "reasoning still reaches its stream");
        }
        assert!(!p.push(*last));
    }
}
