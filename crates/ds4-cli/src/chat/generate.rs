//! Prefill and decode over a session: chunked prefill with a progress bar, the sampling loop,
//! Ctrl+C as a flag both check, and the tokens/s line printed after a reply.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use ds4_model::backend::{Logits, Session};
use ds4_text::sampler::{Sampler, SamplerParams};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

/// Prompts are prefilled in spans of this many tokens, so a long prompt shows progress and
/// Ctrl+C can stop it between spans.
pub const PREFILL_CHUNK: usize = 256;

/// The Ctrl+C flag: the SIGINT handler sets it, generation checks it between tokens.
#[derive(Clone)]
pub struct Interrupt {
    flag: Arc<AtomicBool>,
}

impl Interrupt {
    /// Installs the process's SIGINT handler. A first Ctrl+C stops the current prefill or
    /// generation; a second one while the first is still pending ends the process (exit 130),
    /// so a stuck step can always be left.
    pub fn install() -> anyhow::Result<Interrupt> {
        let flag = Arc::new(AtomicBool::new(false));
        let handler_flag = flag.clone();
        ctrlc::set_handler(move || {
            if handler_flag.swap(true, Ordering::SeqCst) {
                std::process::exit(130);
            }
        })
        .context("installing the Ctrl+C handler")?;
        Ok(Interrupt { flag })
    }

    /// Whether Ctrl+C was pressed since the last [`Interrupt::clear`].
    pub fn requested(&self) -> bool {
        self.flag.load(Ordering::SeqCst)
    }

    pub fn clear(&self) {
        self.flag.store(false, Ordering::SeqCst);
    }
}

/// What a prefill did.
#[derive(Clone, Copy, Debug)]
pub struct PrefillStats {
    /// Tokens evaluated.
    pub tokens: usize,
    pub elapsed: Duration,
    /// Stopped by Ctrl+C before all tokens were evaluated.
    pub interrupted: bool,
}

/// Evaluates `tokens` in spans of [`PREFILL_CHUNK`] tokens or the backend's own prefill span
/// when longer (`Session::preferred_span`), with a progress bar on stderr when
/// there is more than one span and stderr is a terminal.
pub fn prefill(
    session: &mut dyn Session,
    tokens: &[u32],
    interrupt: &Interrupt,
) -> anyhow::Result<PrefillStats> {
    let start = Instant::now();
    let span = PREFILL_CHUNK.max(session.preferred_span());
    let bar = if tokens.len() > span {
        let bar =
            ProgressBar::with_draw_target(Some(tokens.len() as u64), ProgressDrawTarget::stderr());
        if let Ok(style) = ProgressStyle::with_template(
            "prefill {bar:40.cyan/blue} {pos}/{len} tokens (eta {eta})",
        ) {
            bar.set_style(style);
        }
        Some(bar)
    } else {
        None
    };
    let mut done = 0;
    let mut interrupted = false;
    for chunk in tokens.chunks(span) {
        if interrupt.requested() {
            interrupted = true;
            break;
        }
        session
            .eval(chunk, Logits::Last)
            .context("processing the prompt")?;
        done += chunk.len();
        if let Some(bar) = &bar {
            bar.set_position(done as u64);
        }
    }
    if let Some(bar) = bar {
        bar.finish_and_clear();
    }
    Ok(PrefillStats {
        tokens: done,
        elapsed: start.elapsed(),
        interrupted,
    })
}

/// Why a reply ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StopReason {
    /// The model sampled end-of-sentence (not evaluated, not part of the reply).
    Eos,
    /// `-n` tokens were generated, or the context is full.
    Length,
    /// Ctrl+C.
    Interrupted,
    /// Nobody reads the reply any more (stdout is a closed pipe).
    OutputClosed,
}

/// A finished reply.
#[derive(Clone, Debug)]
pub struct Reply {
    /// The sampled tokens, all evaluated into the session.
    pub tokens: Vec<u32>,
    pub elapsed: Duration,
    pub stop: StopReason,
}

/// Samples up to `max_tokens` tokens after the session's last logits (fewer when the context
/// would overflow), evaluating each so the session ends holding the whole reply. Stops at EOS
/// (`eos`, which is not evaluated) and at Ctrl+C. `on_token` sees each token as it is drawn
/// and returns false when the reply can no longer be delivered.
pub fn generate(
    session: &mut dyn Session,
    eos: u32,
    params: SamplerParams,
    max_tokens: usize,
    interrupt: &Interrupt,
    on_token: &mut dyn FnMut(u32) -> bool,
) -> anyhow::Result<Reply> {
    let start = Instant::now();
    let budget = room_for_reply(session.ctx(), session.tokens().len(), max_tokens);
    let mut sampler = Sampler::new(params);
    // At temperature 0 each step returns its own pick (Session::decode_greedy: the CUDA
    // backend picks on the GPU, and the logits never cross to the host).
    let greedy = params.temperature <= 0.0;
    let mut picked = None;
    let mut tokens = Vec::new();
    let stop = loop {
        if interrupt.requested() {
            break StopReason::Interrupted;
        }
        if tokens.len() >= budget {
            break StopReason::Length;
        }
        let token = match picked.take() {
            Some(token) => token,
            None => sampler.sample(session.last_logits()),
        };
        if token == eos {
            break StopReason::Eos;
        }
        let delivered = on_token(token);
        tokens.push(token);
        if greedy {
            picked = Some(session.decode_greedy(token, &[]).context("decoding")?);
        } else {
            session.decode_step(token).context("decoding")?;
        }
        if !delivered {
            break StopReason::OutputClosed;
        }
    };
    Ok(Reply {
        tokens,
        elapsed: start.elapsed(),
        stop,
    })
}

/// How many tokens a reply may have: `max_tokens`, but one position is always left free
/// (ds4's rule), and none when the session is (nearly) full.
pub fn room_for_reply(ctx: usize, used: usize, max_tokens: usize) -> usize {
    let room = ctx.saturating_sub(used);
    if room <= 1 {
        0
    } else {
        max_tokens.min(room - 1)
    }
}

fn rate(tokens: usize, elapsed: Duration) -> f64 {
    let secs = elapsed.as_secs_f64();
    if secs > 0.0 {
        tokens as f64 / secs
    } else {
        0.0
    }
}

/// `ds4: prefill: N tokens, R t/s; generation: M tokens, R t/s`.
pub fn stats_line(prefill: &PrefillStats, reply: &Reply) -> String {
    format!(
        "ds4: prefill: {} tokens, {:.2} t/s; generation: {} tokens, {:.2} t/s",
        prefill.tokens,
        rate(prefill.tokens, prefill.elapsed),
        reply.tokens.len(),
        rate(reply.tokens.len(), reply.elapsed)
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use ds4_model::backend::ModelError;

    /// A session that records the length of every eval and states a prefill span.
    struct SpanRecorder {
        span: usize,
        tokens: Vec<u32>,
        evals: Vec<usize>,
    }

    impl Session for SpanRecorder {
        fn ctx(&self) -> usize {
            1 << 20
        }
        fn tokens(&self) -> &[u32] {
            &self.tokens
        }
        fn eval(&mut self, tokens: &[u32], _: Logits) -> Result<Vec<f32>, ModelError> {
            self.evals.push(tokens.len());
            self.tokens.extend_from_slice(tokens);
            Ok(vec![0.0])
        }
        fn last_logits(&self) -> &[f32] {
            &[]
        }
        fn snapshot(&self) -> Vec<u8> {
            Vec::new()
        }
        fn restore(&mut self, _: &[u8]) -> Result<(), ModelError> {
            Ok(())
        }
        fn reset(&mut self) {
            self.tokens.clear();
        }
        fn preferred_span(&self) -> usize {
            self.span
        }
    }

    #[test]
    fn prefill_pieces_are_never_shorter_than_the_backends_span() {
        let never = Interrupt {
            flag: Arc::new(AtomicBool::new(false)),
        };
        let prompt: Vec<u32> = (0..2500).collect();
        for (span, want) in [
            (2048, vec![2048, 452]),
            (0, [vec![256; 9], vec![196]].concat()),
            (100, [vec![256; 9], vec![196]].concat()),
        ] {
            let mut s = SpanRecorder {
                span,
                tokens: Vec::new(),
                evals: Vec::new(),
            };
            let stats = prefill(&mut s, &prompt, &never).unwrap();
            assert_eq!(s.evals, want, "span {span}");
            assert_eq!(
                (stats.tokens, s.tokens.as_slice()),
                (2500, prompt.as_slice())
            );
        }
    }

    #[test]
    fn reply_room_leaves_one_position_free() {
        assert_eq!(room_for_reply(100, 10, 50), 50);
        assert_eq!(room_for_reply(100, 90, 50), 9);
        assert_eq!(room_for_reply(100, 99, 50), 0);
        assert_eq!(room_for_reply(100, 100, 50), 0);
        assert_eq!(room_for_reply(100, 120, 50), 0);
    }

    #[test]
    fn stats_line_reports_counts() {
        let p = PrefillStats {
            tokens: 12,
            elapsed: Duration::from_secs(2),
            interrupted: false,
        };
        let r = Reply {
            tokens: vec![1, 2, 3],
            elapsed: Duration::from_secs(1),
            stop: StopReason::Length,
        };
        assert_eq!(
            stats_line(&p, &r),
            "ds4: prefill: 12 tokens, 6.00 t/s; generation: 3 tokens, 3.00 t/s"
        );
    }
}
