//! The interactive chat: a `ds4> ` prompt with line editing and history (~/.ds4_history),
//! commands, and turns that extend one live session (only each turn's new tokens are
//! prefilled). Ctrl+C during a reply stops it and returns to the prompt; Ctrl+C or Ctrl+D at
//! the prompt quits.

use std::path::PathBuf;

use anyhow::Context;
use ds4_model::backend::Session;
use ds4_text::chat::{ThinkMode, THINK_MAX_MIN_CTX};
use rustyline::error::ReadlineError;
use rustyline::DefaultEditor;

use super::generate::{generate, prefill, stats_line, Interrupt, StopReason};
use super::printer::TokenPrinter;
use super::transcript::{reusable_prefix, Transcript};
use super::{ChatSettings, LoadedModel};

const PROMPT: &str = "ds4> ";

const HELP: &str = "\
Commands:
  /help          this help
  /status        model, backend, thinking mode and context use
  /think         think before answering (default)
  /think-max     Think Max (needs /ctx >= 393216; below that, normal thinking)
  /nothink       answer without thinking
  /ctx N         use a context of N tokens (the conversation is re-processed)
  /read FILE     send the contents of FILE as your message
  /save FILE     save the conversation and its KV state (a ds4 .kv file)
  /load FILE     resume a conversation saved with /save
  /quit, /exit   leave (also Ctrl+D, or Ctrl+C at the prompt)
Ctrl+C while the model is answering stops the answer.";

/// One line typed at the prompt.
#[derive(Debug, PartialEq, Eq)]
pub enum Input {
    /// A message for the model.
    Message(String),
    Help,
    Status,
    Think(ThinkMode),
    Ctx(usize),
    Read(PathBuf),
    /// kv_session: save the conversation to a .kv file.
    Save(PathBuf),
    /// kv_session: resume a conversation from a .kv file.
    Load(PathBuf),
    Quit,
}

/// Parses a non-empty, trimmed line. Lines starting with `/` are commands; an unknown
/// command or a bad argument is an error message for the user.
pub fn parse_input(line: &str) -> Result<Input, String> {
    let Some(command) = line.strip_prefix('/') else {
        return Ok(Input::Message(line.to_string()));
    };
    let (name, arg) = match command.split_once(char::is_whitespace) {
        Some((n, a)) => (n, a.trim()),
        None => (command, ""),
    };
    let no_arg = |input: Input| {
        if arg.is_empty() {
            Ok(input)
        } else {
            Err(format!("/{name} takes no argument"))
        }
    };
    match name {
        "help" => no_arg(Input::Help),
        "status" => no_arg(Input::Status),
        "think" => no_arg(Input::Think(ThinkMode::High)),
        "think-max" => no_arg(Input::Think(ThinkMode::Max)),
        "nothink" => no_arg(Input::Think(ThinkMode::Off)),
        "quit" | "exit" => no_arg(Input::Quit),
        "ctx" => match arg.parse::<usize>() {
            Ok(n) if n >= 2 => Ok(Input::Ctx(n)),
            _ => Err(format!("/ctx needs a token count >= 2, got `{arg}`")),
        },
        "read" if !arg.is_empty() => Ok(Input::Read(PathBuf::from(arg))),
        "read" => Err("/read needs a file name".to_string()),
        "save" if !arg.is_empty() => Ok(Input::Save(PathBuf::from(arg))),
        "load" if !arg.is_empty() => Ok(Input::Load(PathBuf::from(arg))),
        "save" | "load" => Err(format!("/{name} needs a file name")),
        _ => Err(format!("unknown command /{name} (/help lists them)")),
    }
}

/// The live conversation: settings, session and the transcript it mirrors.
struct Chat<'m> {
    model: &'m LoadedModel,
    settings: ChatSettings,
    session: Box<dyn Session>,
    transcript: Transcript,
    interrupt: &'m Interrupt,
}

impl Chat<'_> {
    fn think(&self) -> ThinkMode {
        self.settings.think.for_context(self.settings.ctx)
    }

    fn set_think(&mut self, mode: ThinkMode) {
        self.settings.think = mode;
        eprintln!("ds4: thinking: {}", think_name(mode));
        if mode == ThinkMode::Max && self.think() != ThinkMode::Max {
            eprintln!(
                "ds4: warning: Think Max needs a context >= {THINK_MAX_MIN_CTX}; with ctx={} \
                 it uses normal thinking",
                self.settings.ctx
            );
        }
    }

    fn print_status(&self) {
        eprintln!(
            "ds4: model {} ({} backend); thinking {}; context {} of {} tokens used ({} held by \
             the session)",
            self.model.path.display(),
            self.model.backend.name(),
            think_name(self.think()),
            self.transcript.len(),
            self.settings.ctx,
            self.session.tokens().len()
        );
    }

    fn set_ctx(&mut self, ctx: usize) {
        if ctx <= self.transcript.len() {
            eprintln!(
                "ds4: the conversation already has {} tokens; /ctx must be larger",
                self.transcript.len()
            );
            return;
        }
        match self.model.backend.new_session(ctx) {
            Ok(session) => {
                self.session = session;
                self.settings.ctx = ctx;
                eprintln!(
                    "ds4: context: {ctx} tokens (the conversation is processed again at the \
                     next turn)"
                );
            }
            Err(e) => eprintln!("ds4: error: a session of {ctx} tokens: {e}"),
        }
    }

    /// One user turn: extend the transcript, prefill what the session lacks, stream the reply.
    fn turn(&mut self, text: &str) -> anyhow::Result<()> {
        let tokenizer = &self.model.tokenizer;
        let think = self.think();
        self.transcript.set_think_preamble(tokenizer, think);
        let rollback = self
            .transcript
            .begin_turn(tokenizer, text, think.thinking());
        if self.transcript.len() + 1 >= self.settings.ctx {
            eprintln!(
                "ds4: the context is full ({} of {} tokens with this message); use /ctx N \
                 with a larger N",
                self.transcript.len(),
                self.settings.ctx
            );
            self.transcript.truncate(rollback);
            return Ok(());
        }
        let cached = match reusable_prefix(self.session.tokens(), self.transcript.tokens()) {
            Some(n) => n,
            None => {
                self.session.reset();
                0
            }
        };
        let new_tokens = &self.transcript.tokens()[cached..];
        eprintln!(
            "ds4: prefill: {} new tokens ({cached} cached)",
            new_tokens.len()
        );
        self.interrupt.clear();
        let p = match prefill(self.session.as_mut(), new_tokens, self.interrupt) {
            Ok(p) => p,
            Err(e) => {
                self.transcript.truncate(rollback);
                return Err(e);
            }
        };
        if p.interrupted {
            self.transcript.truncate(rollback);
            self.interrupt.clear();
            eprintln!("ds4: [interrupted]");
            return Ok(());
        }
        let mut printer = TokenPrinter::console(tokenizer, think.thinking());
        let transcript = &mut self.transcript;
        let result = generate(
            self.session.as_mut(),
            tokenizer.specials().eos,
            self.settings.sampler,
            self.settings.max_tokens,
            self.interrupt,
            &mut |t| {
                transcript.push(t);
                printer.push(t)
            },
        );
        printer.finish();
        let reply = match result {
            Ok(r) => r,
            Err(e) => {
                // The session may hold part of the reply; the prefix check rebuilds it.
                self.transcript.truncate(rollback);
                return Err(e);
            }
        };
        if reply.tokens.is_empty() && reply.stop == StopReason::Interrupted {
            self.transcript.truncate(rollback);
        } else {
            // The reply ends with EOS even when it was cut short, as in ds4's transcript.
            self.transcript.push(tokenizer.specials().eos);
        }
        if reply.stop == StopReason::Interrupted {
            eprintln!("ds4: [interrupted]");
        }
        // A Ctrl+C that came as the reply ended must not stop the next one.
        self.interrupt.clear();
        // The next turn's sampler continues from a different seed, so repeated questions do not
        // get identical answers while a fixed --seed still reproduces the whole conversation.
        self.settings.sampler.seed = self.settings.sampler.seed.wrapping_add(1);
        eprintln!("{}", stats_line(&p, &reply));
        Ok(())
    }
}

/// `/save` and `/load` (the file format lives in [`crate::kv_session`]).
impl Chat<'_> {
    fn save(&self, path: &std::path::Path) -> anyhow::Result<()> {
        let bits = crate::kv_session::quant_bits_of(&self.model.path)?;
        let bytes = crate::kv_session::save_session(
            path,
            self.session.as_ref(),
            self.transcript.tokens(),
            &self.model.tokenizer,
            bits,
        )?;
        eprintln!(
            "ds4: saved {} tokens to {} ({bytes} bytes)",
            self.session.tokens().len(),
            path.display()
        );
        Ok(())
    }

    fn load(&mut self, path: &std::path::Path) -> anyhow::Result<()> {
        let tokens = crate::kv_session::load_session(
            path,
            self.session.as_mut(),
            self.model.backend.config(),
            &self.model.tokenizer,
        )?;
        self.transcript = Transcript::from_tokens(&self.model.tokenizer, tokens);
        eprintln!(
            "ds4: resumed {} tokens from {} (the next message continues it)",
            self.session.tokens().len(),
            path.display()
        );
        Ok(())
    }
}

fn think_name(mode: ThinkMode) -> &'static str {
    match mode {
        ThinkMode::Off => "off",
        ThinkMode::High => "on",
        ThinkMode::Max => "max",
    }
}

/// `~/.ds4_history` (ds4's file), or none without a home directory.
fn history_path() -> Option<PathBuf> {
    std::env::var_os("HOME")
        .filter(|h| !h.is_empty())
        .map(|h| PathBuf::from(h).join(".ds4_history"))
}

pub fn run(
    model: &LoadedModel,
    settings: ChatSettings,
    interrupt: &Interrupt,
) -> anyhow::Result<()> {
    let session = model
        .backend
        .new_session(settings.ctx)
        .context("creating the session")?;
    let transcript = Transcript::new(
        &model.tokenizer,
        &settings.system,
        settings.think.for_context(settings.ctx),
    );
    let mut chat = Chat {
        model,
        settings,
        session,
        transcript,
        interrupt,
    };
    let mut editor = DefaultEditor::new().context("starting the line editor")?;
    let history = history_path();
    if let Some(h) = &history {
        // A missing or unreadable history file just means an empty history.
        let _ = editor.load_history(h);
    }
    eprintln!(
        "ds4: chatting with {} ({} backend, ctx {}). /help for commands, Ctrl+D to quit.",
        model.path.display(),
        model.backend.name(),
        chat.settings.ctx
    );
    loop {
        let line = match editor.readline(PROMPT) {
            Ok(line) => line,
            Err(ReadlineError::Interrupted | ReadlineError::Eof) => break,
            Err(e) => return Err(anyhow::Error::new(e).context("reading the prompt")),
        };
        let line = line.trim();
        if line.is_empty() {
            continue;
        }
        let _ = editor.add_history_entry(line);
        if let Some(h) = &history {
            let _ = editor.save_history(h);
        }
        let outcome = match parse_input(line) {
            Err(message) => {
                eprintln!("ds4: {message}");
                Ok(())
            }
            Ok(Input::Quit) => break,
            Ok(Input::Help) => {
                eprintln!("{HELP}");
                Ok(())
            }
            Ok(Input::Status) => {
                chat.print_status();
                Ok(())
            }
            Ok(Input::Think(mode)) => {
                chat.set_think(mode);
                Ok(())
            }
            Ok(Input::Ctx(n)) => {
                chat.set_ctx(n);
                Ok(())
            }
            Ok(Input::Read(path)) => match std::fs::read_to_string(&path) {
                Ok(text) => {
                    eprintln!("ds4: read {} bytes from {}", text.len(), path.display());
                    chat.turn(&text)
                }
                Err(e) => {
                    eprintln!("ds4: cannot read {}: {e}", path.display());
                    Ok(())
                }
            },
            Ok(Input::Message(text)) => chat.turn(&text),
            Ok(Input::Save(path)) => chat.save(&path),
            Ok(Input::Load(path)) => chat.load(&path),
        };
        // A failed turn is reported and the chat goes on.
        if let Err(e) = outcome {
            eprintln!("ds4: error: {e:#}");
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commands_parse() {
        assert_eq!(
            parse_input("hello /x"),
            Ok(Input::Message("hello /x".into()))
        );
        assert_eq!(parse_input("/help"), Ok(Input::Help));
        assert_eq!(parse_input("/status"), Ok(Input::Status));
        assert_eq!(parse_input("/think"), Ok(Input::Think(ThinkMode::High)));
        assert_eq!(parse_input("/think-max"), Ok(Input::Think(ThinkMode::Max)));
        assert_eq!(parse_input("/nothink"), Ok(Input::Think(ThinkMode::Off)));
        assert_eq!(parse_input("/ctx 4096"), Ok(Input::Ctx(4096)));
        assert_eq!(
            parse_input("/read a b.txt"),
            Ok(Input::Read("a b.txt".into()))
        );
        assert_eq!(parse_input("/quit"), Ok(Input::Quit));
        assert_eq!(parse_input("/exit"), Ok(Input::Quit));
    }

    #[test]
    fn bad_commands_say_why() {
        assert!(parse_input("/ctx").unwrap_err().contains("/ctx"));
        assert!(parse_input("/ctx lots").unwrap_err().contains("lots"));
        assert!(parse_input("/ctx 1").is_err());
        assert!(parse_input("/read").unwrap_err().contains("file"));
        assert!(parse_input("/nothink now")
            .unwrap_err()
            .contains("no argument"));
        assert!(parse_input("/frobnicate").unwrap_err().contains("/help"));
    }
}
