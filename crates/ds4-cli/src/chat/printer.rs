//! Streams sampled tokens as text: the reasoning of a thinking turn (up to `</think>`) to
//! stderr, dimmed when stderr is a terminal; the answer to stdout. UTF-8 sequences split
//! across tokens are held back until complete.

use std::io::{IsTerminal, Write};

use ds4_text::tokenizer::{Detokenizer, Tokenizer};

const DIM: &str = "\x1b[2m";
const RESET: &str = "\x1b[0m";

pub struct TokenPrinter<'t> {
    detok: Detokenizer<'t>,
    think_start: u32,
    think_end: u32,
    in_reasoning: bool,
    color: bool,
    /// Whether the last character written (to either stream) was a newline.
    at_line_start: bool,
    /// stdout is a closed pipe: the answer has nowhere to go.
    stdout_closed: bool,
}

impl<'t> TokenPrinter<'t> {
    /// `thinking`: the reply starts inside `<think>` (the prompt ended with it).
    pub fn new(tokenizer: &'t Tokenizer, thinking: bool) -> TokenPrinter<'t> {
        let specials = tokenizer.specials();
        TokenPrinter {
            detok: tokenizer.detokenizer(),
            think_start: specials.think_start,
            think_end: specials.think_end,
            in_reasoning: thinking,
            color: std::io::stderr().is_terminal(),
            at_line_start: true,
            stdout_closed: false,
        }
    }

    /// Writes one token; returns false once stdout is a closed pipe (the reply is lost, so
    /// generation can stop).
    pub fn push(&mut self, token: u32) -> bool {
        if token == self.think_end || token == self.think_start {
            // The tags switch streams; flush what belongs to the old one first.
            let rest = self.detok.finish();
            self.write(&rest);
            if token == self.think_end && self.in_reasoning && !self.at_line_start {
                self.write("\n");
            }
            self.in_reasoning = token == self.think_start;
            return !self.stdout_closed;
        }
        let text = self.detok.push(token);
        self.write(&text);
        !self.stdout_closed
    }

    /// Ends the reply: flushes held-back bytes and ends the line.
    pub fn finish(&mut self) {
        let rest = self.detok.finish();
        self.write(&rest);
        if !self.at_line_start {
            self.write("\n");
        }
    }

    fn write(&mut self, text: &str) {
        if text.is_empty() {
            return;
        }
        // Write errors on stderr are ignored; a closed stdout is remembered so generation
        // stops, and the statistics still reach stderr.
        if self.in_reasoning {
            let mut err = std::io::stderr().lock();
            let _ = if self.color {
                write!(err, "{DIM}{text}{RESET}")
            } else {
                write!(err, "{text}")
            };
            let _ = err.flush();
        } else {
            let mut out = std::io::stdout().lock();
            let written = out.write_all(text.as_bytes()).and_then(|()| out.flush());
            if written.is_err_and(|e| e.kind() == std::io::ErrorKind::BrokenPipe) {
                self.stdout_closed = true;
            }
        }
        self.at_line_start = text.ends_with('\n');
    }
}
