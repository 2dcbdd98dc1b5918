//! `ds4 bench`: ds4-bench's method (ds4-spec.md §6) over any [`Session`].
//!
//! One token stream is walked to a series of context frontiers. Reaching a frontier prefills
//! only the tokens since the previous one (incremental prefill), which gives the prefill rate of
//! that interval. At the frontier the session is snapshotted, `gen_tokens` tokens are decoded
//! with the caller's pick (`ds4 bench`: greedy, never EOS) for the decode rate, and the snapshot is
//! restored, so the stream continues from the frontier as if nothing had been generated.

use std::fmt;
use std::time::Instant;

use crate::backend::{Logits, ModelError, Session};
use crate::greedy::argmax_excluding;

/// How the frontiers grow.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Step {
    /// Add this many tokens (`--step-incr`).
    Incr(usize),
    /// Multiply by this factor (`--step-mul`, > 1).
    Mul(f64),
}

/// The frontiers to visit and how much to decode at each.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct BenchPlan {
    pub ctx_start: usize,
    pub ctx_max: usize,
    pub step: Step,
    pub gen_tokens: usize,
}

#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    #[error("bad benchmark plan: {0}")]
    Plan(String),
    #[error("the token stream has {have} tokens, the plan needs {need}")]
    ShortStream { have: usize, need: usize },
    #[error("at context {ctx}: {source}")]
    Model {
        ctx: usize,
        #[source]
        source: ModelError,
    },
}

impl BenchPlan {
    /// The context sizes measured, ascending: ctx_start, then each step, while ≤ ctx_max.
    pub fn frontiers(&self) -> Result<Vec<usize>, BenchError> {
        if self.ctx_start == 0 {
            return Err(BenchError::Plan(
                "the start context must be positive".into(),
            ));
        }
        if self.ctx_max < self.ctx_start {
            return Err(BenchError::Plan(format!(
                "the largest context {} is below the start {}",
                self.ctx_max, self.ctx_start
            )));
        }
        let mut out = vec![self.ctx_start];
        loop {
            let cur = *out.last().unwrap_or(&self.ctx_start);
            let next = match self.step {
                Step::Incr(0) => return Err(BenchError::Plan("the step must be positive".into())),
                Step::Incr(n) => cur.saturating_add(n),
                Step::Mul(f) if !(f > 1.0 && f.is_finite()) => {
                    return Err(BenchError::Plan(format!(
                        "the step factor {f} must exceed 1"
                    )))
                }
                // At least one token further, so a small factor still advances.
                Step::Mul(f) => ((cur as f64 * f).floor() as usize).max(cur + 1),
            };
            if next > self.ctx_max {
                return Ok(out);
            }
            out.push(next);
        }
    }

    /// The session context needed: the last frontier plus the generated tokens.
    pub fn ctx_needed(&self) -> Result<usize, BenchError> {
        let last = self.frontiers()?.last().copied().unwrap_or(0);
        Ok(last + self.gen_tokens)
    }
}

/// One measured frontier (one CSV row).
#[derive(Clone, Debug, PartialEq)]
pub struct BenchRow {
    /// Context length at the frontier.
    pub ctx_tokens: usize,
    /// Tokens prefilled to reach it (the interval since the previous frontier).
    pub prefill_tokens: usize,
    pub prefill_tps: f64,
    pub gen_tokens: usize,
    pub gen_tps: f64,
    /// Size of the session snapshot (ds4's payload) at the frontier.
    pub kvcache_bytes: usize,
    /// The greedily decoded tokens (for checking, not part of the CSV).
    pub generated: Vec<u32>,
}

impl BenchRow {
    /// ds4-bench's CSV header.
    pub const CSV_HEADER: &'static str =
        "ctx_tokens,prefill_tokens,prefill_tps,gen_tokens,gen_tps,kvcache_bytes";

    /// This row as a CSV line (no newline).
    pub fn csv_line(&self) -> String {
        format!(
            "{},{},{:.2},{},{:.2},{}",
            self.ctx_tokens,
            self.prefill_tokens,
            self.prefill_tps,
            self.gen_tokens,
            self.gen_tps,
            self.kvcache_bytes
        )
    }
}

impl fmt::Display for BenchRow {
    /// A human-readable table row (see [`table_header`]).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{:>9} {:>9} {:>12.2} {:>6} {:>10.2} {:>12.1}",
            self.ctx_tokens,
            self.prefill_tokens,
            self.prefill_tps,
            self.gen_tokens,
            self.gen_tps,
            self.kvcache_bytes as f64 / (1u64 << 20) as f64
        )
    }
}

/// The header of the table printed by the `Display` of [`BenchRow`].
pub fn table_header() -> String {
    format!(
        "{:>9} {:>9} {:>12} {:>6} {:>10} {:>12}",
        "ctx", "prefill", "prefill t/s", "gen", "gen t/s", "KV MiB"
    )
}

/// Runs the plan on `session` (which must be empty and hold [`BenchPlan::ctx_needed`] tokens),
/// feeding `stream` (at least ctx_max tokens are used). `on_row` sees each row as it is
/// measured. Decoding is greedy ([`Session::decode_greedy`]), never picking an id of `exclude`
/// (the CLI excludes EOS, so that every row decodes its whole count).
pub fn run_bench(
    session: &mut dyn Session,
    stream: &[u32],
    plan: &BenchPlan,
    exclude: &[u32],
    mut on_row: impl FnMut(&BenchRow),
) -> Result<Vec<BenchRow>, BenchError> {
    let frontiers = plan.frontiers()?;
    let last = frontiers.last().copied().unwrap_or(0);
    if stream.len() < last {
        return Err(BenchError::ShortStream {
            have: stream.len(),
            need: last,
        });
    }
    let need = plan.ctx_needed()?;
    if session.ctx() < need {
        return Err(BenchError::Plan(format!(
            "the session holds {} tokens, the plan needs {need}",
            session.ctx()
        )));
    }
    if !session.tokens().is_empty() {
        return Err(BenchError::Plan("the session is not empty".into()));
    }
    let mut rows = Vec::with_capacity(frontiers.len());
    let mut pos = 0;
    for ctx in frontiers {
        let model_err = |source| BenchError::Model { ctx, source };
        let span = &stream[pos..ctx];
        let t0 = Instant::now();
        let logits = session.eval(span, Logits::Last).map_err(model_err)?;
        let prefill_secs = t0.elapsed().as_secs_f64();
        pos = ctx;

        let snapshot = session.snapshot();
        let mut generated = Vec::with_capacity(plan.gen_tokens);
        let t1 = Instant::now();
        let mut token = argmax_excluding(&logits, exclude);
        for _ in 0..plan.gen_tokens {
            generated.push(token);
            token = session.decode_greedy(token, exclude).map_err(model_err)?;
        }
        let gen_secs = t1.elapsed().as_secs_f64();
        session.restore(&snapshot).map_err(model_err)?;

        let row = BenchRow {
            ctx_tokens: ctx,
            prefill_tokens: span.len(),
            prefill_tps: rate(span.len(), prefill_secs),
            gen_tokens: plan.gen_tokens,
            gen_tps: rate(plan.gen_tokens, gen_secs),
            kvcache_bytes: snapshot.len(),
            generated,
        };
        on_row(&row);
        rows.push(row);
    }
    Ok(rows)
}

fn rate(tokens: usize, secs: f64) -> f64 {
    if tokens == 0 || secs <= 0.0 {
        0.0
    } else {
        tokens as f64 / secs
    }
}

/// `tokens` repeated (cut at the end) to exactly `n` tokens; empty if `tokens` is.
pub fn repeat_to_len(tokens: &[u32], n: usize) -> Vec<u32> {
    if tokens.is_empty() {
        return Vec::new();
    }
    tokens.iter().copied().cycle().take(n).collect()
}

/// A deterministic English-like text of at least `min_words` words (the stream when no
/// prompt file is given and the model has a tokenizer): sentences of common words from a
/// fixed linear congruential sequence.
pub fn pseudo_text(min_words: usize) -> String {
    const WORDS: [&str; 48] = [
        "the",
        "model",
        "reads",
        "a",
        "long",
        "document",
        "about",
        "rivers",
        "and",
        "cities",
        "in",
        "which",
        "people",
        "build",
        "bridges",
        "over",
        "water",
        "while",
        "engineers",
        "measure",
        "the",
        "speed",
        "of",
        "every",
        "train",
        "that",
        "crosses",
        "old",
        "stone",
        "arches",
        "during",
        "winter",
        "nights",
        "when",
        "lights",
        "reflect",
        "on",
        "quiet",
        "streets",
        "near",
        "markets",
        "selling",
        "bread",
        "fruit",
        "tea",
        "books",
        "maps",
        "music",
    ];
    let mut state: u64 = 0x2545_F491_4F6C_DD1D;
    let mut next = || {
        state = state
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        (state >> 33) as usize
    };
    let mut text = String::new();
    let mut words = 0;
    while words < min_words {
        let len = 6 + next() % 12;
        for i in 0..len {
            let w = WORDS[next() % WORDS.len()];
            if i == 0 {
                let mut c = w.chars();
                if let Some(f) = c.next() {
                    text.extend(f.to_uppercase());
                    text.push_str(c.as_str());
                }
            } else {
                text.push(' ');
                text.push_str(w);
            }
        }
        text.push_str(if next() % 5 == 0 { ".\n" } else { ". " });
        words += len;
    }
    text
}

/// Deterministic pseudo-random token ids in `0..vocab` (the stream when the model has no
/// tokenizer).
pub fn pseudo_tokens(vocab: usize, n: usize) -> Vec<u32> {
    let mut state: u64 = 0x9E37_79B9_7F4A_7C15;
    (0..n)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            (state % vocab.max(1) as u64) as u32
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frontiers_follow_the_step() {
        let plan = |step| BenchPlan {
            ctx_start: 2048,
            ctx_max: 8192,
            step,
            gen_tokens: 128,
        };
        assert_eq!(
            plan(Step::Incr(2048)).frontiers().unwrap(),
            vec![2048, 4096, 6144, 8192]
        );
        assert_eq!(
            plan(Step::Incr(3000)).frontiers().unwrap(),
            vec![2048, 5048, 8048]
        );
        assert_eq!(
            plan(Step::Mul(2.0)).frontiers().unwrap(),
            vec![2048, 4096, 8192]
        );
        assert_eq!(plan(Step::Incr(2048)).ctx_needed().unwrap(), 8192 + 128);
        assert!(plan(Step::Incr(0)).frontiers().is_err());
        assert!(plan(Step::Mul(1.0)).frontiers().is_err());
        let backwards = BenchPlan {
            ctx_max: 100,
            ..plan(Step::Incr(1))
        };
        assert!(backwards.frontiers().is_err());
    }

    #[test]
    fn streams_have_the_requested_length() {
        assert_eq!(repeat_to_len(&[1, 2, 3], 7), vec![1, 2, 3, 1, 2, 3, 1]);
        assert!(repeat_to_len(&[], 7).is_empty());
        let t = pseudo_text(500);
        assert!(t.split_whitespace().count() >= 500);
        assert_eq!(t, pseudo_text(500));
        let ids = pseudo_tokens(50, 1000);
        assert_eq!(ids.len(), 1000);
        assert!(ids.iter().all(|&i| i < 50));
    }

    #[test]
    fn csv_line_has_the_header_fields() {
        let row = BenchRow {
            ctx_tokens: 2048,
            prefill_tokens: 2048,
            prefill_tps: 1234.567,
            gen_tokens: 128,
            gen_tps: 30.0,
            kvcache_bytes: 999,
            generated: vec![],
        };
        assert_eq!(row.csv_line(), "2048,2048,1234.57,128,30.00,999");
        assert_eq!(BenchRow::CSV_HEADER.split(',').count(), 6);
    }
}
