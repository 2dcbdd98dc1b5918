//! The engine: one worker thread owns the model session and runs jobs one at a time, in the
//! order they arrived (FIFO over a channel, so no request can starve another). Each job
//! streams [`GenEvent`]s back over its own channel; a job whose client went away (its cancel
//! flag set or its event receiver dropped) stops before the next token and frees the worker.
//!
//! Prefix reuse: a job whose prompt extends the live session (by tokens, or by rendered bytes
//! when the text starts with the live tokens' text, or by the thinking-visible key after a
//! thinking turn) prefills only the new suffix. With a disk KV cache ([`crate::kv_disk`]), a
//! job no live path can reuse saves the live session, restores the longest checkpoint that
//! prefixes its prompt and prefills the rest; prefill and decode stop for cold and continued
//! checkpoints, and [`Engine::shutdown`] saves the live session before the worker stops.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::Instant;

use ds4_kvstore::SaveReason;
use ds4_text::chat::{render_chat, ChatPrompt, Message};
use ds4_text::sampler::{DsmlDecodeTracker, Sampler, SamplerParams};
use tokio::sync::mpsc::{unbounded_channel, UnboundedReceiver, UnboundedSender};

use crate::generate::OutputStream;
use crate::job::{CancelFlag, CancelOnDrop, EngineError, FinishReason, GenEvent, GenJob, Usage};
use crate::kv_disk::KvDisk;
use crate::runner::{ModelRunner, TextCodec};
use crate::tool_memory::{RememberedCall, ToolMemory};
use crate::trace::{Trace, TraceRecord};

/// Prefill runs in chunks that end on absolute multiples of this many tokens (or of the
/// backend's prefill span when longer), so a cancel is noticed between chunks and chunk
/// boundaries do not depend on the cached prefix.
const PREFILL_CHUNK: usize = 512;

/// What the worker receives: a job, or (kv disk) the request to save and stop.
enum WorkerMessage {
    Job(Queued),
    /// Clean shutdown: save the live session (*shutdown*), answer, and stop.
    Shutdown(mpsc::Sender<()>),
}

/// A queued job with its reply channel.
struct Queued {
    job: GenJob,
    events: UnboundedSender<GenEvent>,
    cancel: CancelFlag,
}

/// Counters the server and the tests read.
#[derive(Debug, Default)]
pub struct EngineStatus {
    busy: AtomicBool,
    queued: AtomicUsize,
    completed: AtomicUsize,
}

impl EngineStatus {
    /// Whether the worker is running a job now.
    pub fn busy(&self) -> bool {
        self.busy.load(Ordering::Acquire)
    }
    /// Jobs submitted and not yet started.
    pub fn queued(&self) -> usize {
        self.queued.load(Ordering::Acquire)
    }
    /// Jobs finished (done, failed or cancelled).
    pub fn completed(&self) -> usize {
        self.completed.load(Ordering::Acquire)
    }
}

/// Handle to the worker; cheap to clone.
#[derive(Clone)]
pub struct Engine {
    queue: mpsc::Sender<WorkerMessage>,
    codec: Arc<dyn TextCodec>,
    tool_memory: Arc<Mutex<ToolMemory>>,
    status: Arc<EngineStatus>,
    ctx: usize,
    model_name: Arc<str>,
}

/// Engine options.
pub struct EngineOptions {
    pub model_name: String,
    pub trace: Option<Trace>,
    pub tool_memory_max_ids: usize,
}

impl Engine {
    /// Starts the worker thread, which owns `runner` from now on.
    pub fn start(
        runner: Box<dyn ModelRunner>,
        codec: Arc<dyn TextCodec>,
        opts: EngineOptions,
    ) -> Engine {
        Engine::start_with_kv_disk(runner, codec, opts, None)
    }

    /// [`Engine::start`] with the disk KV cache (`--kv-disk-dir`), which the worker owns.
    pub fn start_with_kv_disk(
        runner: Box<dyn ModelRunner>,
        codec: Arc<dyn TextCodec>,
        opts: EngineOptions,
        kv_disk: Option<KvDisk>,
    ) -> Engine {
        let (tx, rx) = mpsc::channel::<WorkerMessage>();
        let status = Arc::new(EngineStatus::default());
        let tool_memory = Arc::new(Mutex::new(ToolMemory::new(opts.tool_memory_max_ids)));
        let ctx = runner.ctx();
        let mut worker = Worker {
            runner,
            codec: codec.clone(),
            live_bytes: Vec::new(),
            live_logits: false,
            visible_key: None,
            tool_memory: tool_memory.clone(),
            trace: opts.trace,
            status: status.clone(),
            kv_disk,
        };
        std::thread::Builder::new()
            .name("ds4-engine".into())
            .spawn(move || worker.run(rx))
            .expect("spawning the engine thread");
        Engine {
            queue: tx,
            codec,
            tool_memory,
            status,
            ctx,
            model_name: opts.model_name.into(),
        }
    }

    /// Queues a job. Dropping the returned guard (or the receiver) cancels it.
    pub fn submit(&self, job: GenJob) -> (UnboundedReceiver<GenEvent>, CancelOnDrop) {
        let (events, rx) = unbounded_channel();
        let cancel = CancelFlag::new();
        self.status.queued.fetch_add(1, Ordering::AcqRel);
        let queued = Queued {
            job,
            events,
            cancel: cancel.clone(),
        };
        if let Err(mpsc::SendError(WorkerMessage::Job(q))) =
            self.queue.send(WorkerMessage::Job(queued))
        {
            self.status.queued.fetch_sub(1, Ordering::AcqRel);
            let _ = q.events.send(GenEvent::Failed(EngineError::Shutdown));
        }
        (rx, CancelOnDrop(cancel))
    }

    /// Clean shutdown: the worker finishes the running job, saves the live session to the
    /// disk KV cache (when one is configured and the session is worth it) and stops; later
    /// jobs fail with [`EngineError::Shutdown`]. Blocks until the worker is done.
    pub fn shutdown(&self) {
        let (tx, rx) = mpsc::channel();
        if self.queue.send(WorkerMessage::Shutdown(tx)).is_ok() {
            let _ = rx.recv();
        }
    }

    pub fn codec(&self) -> &Arc<dyn TextCodec> {
        &self.codec
    }
    pub fn tool_memory(&self) -> &Arc<Mutex<ToolMemory>> {
        &self.tool_memory
    }
    pub fn status(&self) -> &Arc<EngineStatus> {
        &self.status
    }
    pub fn ctx(&self) -> usize {
        self.ctx
    }
    pub fn model_name(&self) -> &str {
        &self.model_name
    }
}

struct Worker {
    runner: Box<dyn ModelRunner>,
    codec: Arc<dyn TextCodec>,
    /// The text bytes of `runner.tokens()`, kept in step with it.
    live_bytes: Vec<u8>,
    /// Whether `runner.logits()` are the logits after the last live token (kept between jobs
    /// so that a prompt equal to the live session samples without an eval).
    live_logits: bool,
    /// After a thinking turn: the rendered text of the conversation as the client will send it
    /// back (reasoning dropped, up to the end of the answer), which stands for the live session.
    visible_key: Option<String>,
    tool_memory: Arc<Mutex<ToolMemory>>,
    trace: Option<Trace>,
    status: Arc<EngineStatus>,
    /// `--kv-disk-dir`: checkpoints on disk (see [`crate::kv_disk`]).
    kv_disk: Option<KvDisk>,
}

/// How a job's prompt maps onto the live session.
struct Plan {
    /// Prompt tokens reused from the live session.
    cached: usize,
    /// Tokens still to prefill.
    suffix: Vec<u32>,
    /// kv disk: the prompt missed memory and disk, so a cold checkpoint may be saved.
    total_miss: bool,
}

impl Worker {
    fn run(&mut self, rx: mpsc::Receiver<WorkerMessage>) {
        while let Ok(msg) = rx.recv() {
            let q = match msg {
                WorkerMessage::Job(q) => q,
                WorkerMessage::Shutdown(done) => {
                    self.save_at_shutdown();
                    let _ = done.send(());
                    return;
                }
            };
            self.status.queued.fetch_sub(1, Ordering::AcqRel);
            if q.cancel.is_cancelled() || q.events.is_closed() {
                self.status.completed.fetch_add(1, Ordering::AcqRel);
                continue;
            }
            self.status.busy.store(true, Ordering::Release);
            let events = q.events.clone();
            let request_id = q.job.request_id.clone();
            // A bug in one job must not take the worker (and with it the server) down.
            let outcome =
                std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| self.run_job(q)));
            if outcome.is_err() {
                tracing::error!(request = %request_id, "generation panicked; session reset");
                self.reset();
                let _ = events.send(GenEvent::Failed(EngineError::Model(
                    "internal error during generation".into(),
                )));
            }
            self.status.busy.store(false, Ordering::Release);
            self.status.completed.fetch_add(1, Ordering::AcqRel);
        }
    }

    fn reset(&mut self) {
        self.runner.reset();
        self.live_bytes.clear();
        self.live_logits = false;
        self.visible_key = None;
        if let Some(kv) = &mut self.kv_disk {
            kv.forget_live();
        }
    }

    /// kv disk hook (*shutdown* save).
    fn save_at_shutdown(&mut self) {
        if let Some(kv) = &mut self.kv_disk {
            kv.save_live_if_worth(
                self.runner.as_ref(),
                &self.live_bytes,
                SaveReason::Shutdown,
                &self.tool_memory,
            );
        }
    }

    /// kv disk hook, after every live-session path missed: save the live session (*evict*),
    /// then restore the longest cached prefix of the prompt from disk. Returns the plan that
    /// prefills only the rest of the prompt, or `None` (session reset) on a disk miss.
    fn plan_from_disk(&mut self, job: &GenJob) -> Option<Plan> {
        let kv = self.kv_disk.as_mut()?;
        kv.save_live_if_worth(
            self.runner.as_ref(),
            &self.live_bytes,
            SaveReason::Evict,
            &self.tool_memory,
        );
        self.runner.reset();
        self.live_bytes.clear();
        self.live_logits = false;
        self.visible_key = None;
        kv.forget_live();
        let restored =
            kv.restore_longest_prefix(self.runner.as_mut(), &job.prompt_text, &self.tool_memory)?;
        let suffix = self.codec.encode(&job.prompt_text[restored.text_len..]);
        self.live_bytes = restored.text;
        // The runner's logits are the restored checkpoint's.
        self.live_logits = suffix.is_empty();
        Some(Plan {
            cached: restored.tokens,
            suffix,
            total_miss: false,
        })
    }

    /// kv disk hook: saves a checkpoint of the live session now, for `reason`.
    fn save_checkpoint(&mut self, reason: SaveReason) {
        if let Some(kv) = &mut self.kv_disk {
            kv.save_live(
                self.runner.as_ref(),
                &self.live_bytes,
                reason,
                &self.tool_memory,
            );
        }
    }

    /// Chooses the reuse path (ds4's order): exact token prefix, then the thinking-visible key,
    /// then rendered-text prefix, else a cold prefill.
    fn plan(&mut self, job: &GenJob) -> Plan {
        let live_len = self.runner.tokens().len();
        if live_len > 0 {
            let live = self.runner.tokens();
            if job.prompt_tokens.len() >= live_len && job.prompt_tokens[..live_len] == *live {
                let suffix = job.prompt_tokens[live_len..].to_vec();
                if !suffix.is_empty() || self.live_logits {
                    return Plan {
                        cached: live_len,
                        suffix,
                        total_miss: false,
                    };
                }
            }
            // Thinking-visible key: the client dropped the reasoning of the last turn, which
            // the live session holds; ds4 reuses the session all the same.
            if let Some(key) = self.visible_key.as_deref() {
                if job.prompt_text.len() > key.len()
                    && job.prompt_text.starts_with(key)
                    && job.prompt_text.is_char_boundary(key.len())
                {
                    let suffix = self.codec.encode(&job.prompt_text[key.len()..]);
                    return Plan {
                        cached: live_len,
                        suffix,
                        total_miss: false,
                    };
                }
            }
            let text = job.prompt_text.as_bytes();
            if text.len() > self.live_bytes.len()
                && text.starts_with(&self.live_bytes)
                && job.prompt_text.is_char_boundary(self.live_bytes.len())
            {
                let suffix = self.codec.encode(&job.prompt_text[self.live_bytes.len()..]);
                if !suffix.is_empty() {
                    return Plan {
                        cached: live_len,
                        suffix,
                        total_miss: false,
                    };
                }
            }
        }
        if let Some(plan) = self.plan_from_disk(job) {
            return plan;
        }
        self.reset();
        Plan {
            cached: 0,
            suffix: job.prompt_tokens.clone(),
            total_miss: true,
        }
    }

    /// Appends tokens to the session, keeping `live_bytes` in step; the logits after them are
    /// `runner.logits()`.
    fn eval(&mut self, tokens: &[u32]) -> Result<(), EngineError> {
        self.runner.eval(tokens).map_err(EngineError::Model)?;
        self.extend_live_bytes(tokens);
        Ok(())
    }

    /// Appends `token` to the session and returns the greedy pick after it (on the backend's
    /// device where it can), keeping `live_bytes` in step.
    fn decode_greedy(&mut self, token: u32) -> Result<u32, EngineError> {
        let pick = self
            .runner
            .decode_greedy(token)
            .map_err(EngineError::Model)?;
        self.extend_live_bytes(&[token]);
        Ok(pick)
    }

    fn extend_live_bytes(&mut self, tokens: &[u32]) {
        for &t in tokens {
            self.live_bytes.extend(self.codec.token_bytes(t));
        }
    }

    fn run_job(&mut self, q: Queued) {
        let Queued {
            job,
            events,
            cancel,
        } = q;
        let send = |ev: GenEvent| {
            let _ = events.send(ev);
        };
        let cancelled = || cancel.is_cancelled() || events.is_closed();
        let ctx = self.runner.ctx();

        let plan = self.plan(&job);
        self.visible_key = None;
        let prompt_len = plan.cached + plan.suffix.len();
        if prompt_len >= ctx {
            send(GenEvent::Failed(EngineError::ContextLengthExceeded {
                prompt_tokens: prompt_len,
                ctx,
            }));
            return;
        }
        send(GenEvent::Started {
            prompt_tokens: prompt_len,
            cached_tokens: plan.cached,
        });

        // Prefill the suffix. An empty one samples from the live session's kept logits.
        let prefill_start = Instant::now();
        let mut have_logits = plan.suffix.is_empty() && self.live_logits;
        self.live_logits = false;
        let mut pos = plan.cached;
        // At least the backend's own span (2 048 tokens on CUDA): shorter chunks cost it speed.
        let span = PREFILL_CHUNK.max(self.runner.preferred_span());
        let mut rest = plan.suffix.as_slice();
        // kv disk hook: the prefill stops where a cold or continued checkpoint is due.
        let cold_len = match &self.kv_disk {
            Some(kv) if plan.total_miss => kv.cold_save_len(&job.prompt_tokens),
            _ => None,
        };
        let save_stops = match &self.kv_disk {
            Some(kv) => kv.prefill_stops(pos, prompt_len, cold_len),
            None => Vec::new(),
        };
        while !rest.is_empty() {
            if cancelled() {
                self.log_cancel(&job, "prefill");
                return;
            }
            let chunk_end = ((pos / span) + 1) * span;
            let chunk_end = save_stops
                .iter()
                .copied()
                .find(|&s| s > pos)
                .map_or(chunk_end, |s| s.min(chunk_end));
            let n = (chunk_end - pos).min(rest.len());
            match self.eval(&rest[..n]) {
                Ok(()) => have_logits = true,
                Err(e) => {
                    self.reset();
                    send(GenEvent::Failed(e));
                    return;
                }
            }
            pos += n;
            rest = &rest[n..];
            if save_stops.contains(&pos) {
                let reason = if Some(pos) == cold_len {
                    SaveReason::Cold
                } else {
                    SaveReason::Continued
                };
                self.save_checkpoint(reason);
            }
        }
        if !have_logits {
            // Unreachable by `plan`'s construction; recover by a cold start next time.
            self.reset();
            send(GenEvent::Failed(EngineError::Model(
                "no logits after prefill".into(),
            )));
            return;
        }
        let prefill_secs = prefill_start.elapsed().as_secs_f64();

        // Decode.
        let decode_start = Instant::now();
        let seed = if job.sampling.seed > 0 {
            job.sampling.seed
        } else {
            time_seed()
        };
        let mut sampler = Sampler::new(SamplerParams {
            temperature: job.sampling.temperature,
            top_p: job.sampling.top_p,
            top_k: job.sampling.top_k,
            min_p: job.sampling.min_p,
            seed,
        });
        let mut out = OutputStream::new(job.thinking, job.tools_active, &job.stop, job.tool_ids);
        // With tools, the structure of a DSML block is sampled greedily (ds4's DSML forcing).
        // Tool blocks only count after the reasoning, so the tracker starts at `</think>`.
        let mut forcing = job.tools_active.then(DsmlDecodeTracker::new);
        let mut reasoning_open = job.thinking;
        let mut reasoning_tokens = 0usize;
        let eos = self.codec.eos();
        let mut generated = 0usize;
        let mut eos_sampled = false;
        // Temperature 0 is the sampler's argmax, which leaves its RNG untouched: such tokens,
        // and the DSML structure tokens, are picked by `decode_greedy` in the step that
        // evaluates the token before them (on the device: no logits downloaded) and wait in
        // `pending_pick` for the next iteration.
        let always_greedy = job.sampling.temperature <= 0.0;
        let mut pending_pick: Option<u32> = None;
        let ended = loop {
            if cancelled() {
                self.log_cancel(&job, "decode");
                return;
            }
            if generated >= job.max_tokens || self.runner.tokens().len() >= ctx {
                // A pending pick is dropped; the runner's logits are still those after the
                // last live token.
                self.live_logits = true;
                break FinishReason::Length;
            }
            let token = match pending_pick.take() {
                Some(pick) => pick,
                None => {
                    let greedy = forcing.as_ref().is_some_and(|f| f.state().forces_greedy());
                    let logits = self.runner.logits();
                    if logits.is_empty() {
                        self.reset();
                        send(GenEvent::Failed(EngineError::Model(
                            "the model returned no logits".into(),
                        )));
                        return;
                    }
                    if greedy {
                        sampler.sample_with_temperature(logits, 0.0)
                    } else {
                        sampler.sample(logits)
                    }
                }
            };
            generated += 1;
            if token == eos {
                // EOS is never evaluated; the live session keeps its logits.
                self.live_logits = true;
                eos_sampled = true;
                break FinishReason::Stop;
            }
            let bytes = self.codec.token_bytes(token);
            let piece = String::from_utf8_lossy(&bytes);
            let after_reasoning = if !reasoning_open {
                Some(&piece[..])
            } else if let Some(p) = piece.find("</think>") {
                reasoning_open = false;
                Some(&piece[p + "</think>".len()..])
            } else {
                None
            };
            if reasoning_open {
                reasoning_tokens += 1;
            }
            if let (Some(f), Some(text)) = (forcing.as_mut(), after_reasoning) {
                f.push(text);
            }
            for ev in out.push_bytes(&bytes) {
                send(ev);
            }
            match out.finish_now() {
                // A stop string cut the text: the sampled token is not part of the answer.
                Some(FinishReason::Stop) => {
                    self.live_logits = true;
                    break FinishReason::Stop;
                }
                Some(reason) => {
                    // The closing tag is kept in the session so a replayed call matches it.
                    match self.eval(&[token]) {
                        Ok(()) => self.live_logits = true,
                        Err(e) => {
                            self.reset();
                            send(GenEvent::Failed(e));
                            return;
                        }
                    }
                    break reason;
                }
                None => {}
            }
            // The next token is greedy at temperature 0, or where the tracker (now past this
            // token) forces DSML structure.
            let next_greedy =
                always_greedy || forcing.as_ref().is_some_and(|f| f.state().forces_greedy());
            let step = if next_greedy {
                self.decode_greedy(token).map(Some)
            } else {
                self.eval(&[token]).map(|()| None)
            };
            match step {
                Ok(pick) => pending_pick = pick,
                Err(e) => {
                    self.reset();
                    send(GenEvent::Failed(e));
                    return;
                }
            }
            // kv disk hook: *continued* checkpoints, never inside a tool call.
            let in_tool_call = forcing.as_ref().is_some_and(|f| f.state().in_tool_call());
            let due = self
                .kv_disk
                .as_ref()
                .is_some_and(|kv| kv.continued_due(self.runner.tokens().len()));
            if due && !in_tool_call {
                self.save_checkpoint(SaveReason::Continued);
            }
        };
        let (tail, summary) = out.finish(ended);
        // With tools the reasoning stays in the rendered history, so the rendered-bytes path
        // already matches; without, the client's next prompt lacks it.
        if eos_sampled && summary.finish == FinishReason::Stop && job.thinking && !job.tools_active
        {
            self.visible_key = job
                .chat
                .as_ref()
                .and_then(|c| visible_key(c, &summary.content));
        }
        for ev in tail {
            send(ev);
        }
        if !summary.tool_blocks.is_empty() {
            let mut memory = match self.tool_memory.lock() {
                Ok(m) => m,
                Err(p) => p.into_inner(),
            };
            let reasoning = job.thinking.then(|| summary.reasoning.clone());
            for (id, block) in &summary.tool_blocks {
                let call = RememberedCall {
                    raw_dsml: block.clone(),
                    reasoning: reasoning.clone(),
                };
                memory.insert(id.clone(), call);
            }
        }
        let usage = Usage {
            prompt_tokens: prompt_len,
            cached_tokens: plan.cached,
            completion_tokens: generated,
            reasoning_tokens,
        };
        let decode_secs = decode_start.elapsed().as_secs_f64();
        tracing::info!(
            request = %job.request_id,
            prompt_tokens = prompt_len,
            cached_tokens = plan.cached,
            prefilled_tokens = plan.suffix.len(),
            generated_tokens = generated,
            prefill_tps = format!("{:.1}", rate(plan.suffix.len(), prefill_secs)),
            decode_tps = format!("{:.1}", rate(generated, decode_secs)),
            finish = summary.finish.openai(),
            "request done"
        );
        if let Some(trace) = &self.trace {
            trace.record(&TraceRecord {
                request_id: &job.request_id,
                prompt_tokens: prompt_len,
                cached_tokens: plan.cached,
                prompt: &job.prompt_text,
                generation: &summary.raw_text,
                finish: summary.finish.openai(),
            });
        }
        send(GenEvent::Done {
            finish: summary.finish,
            usage,
        });
    }

    fn log_cancel(&self, job: &GenJob, phase: &str) {
        tracing::info!(request = %job.request_id, phase, "client gone, generation cancelled");
    }
}

/// The conversation as the client will send it back after this turn (the answer without its
/// reasoning), rendered up to the end of the answer. The sampled EOS is not in the session, so
/// the key stops before it and the next prefill starts with it.
fn visible_key(chat: &ChatPrompt, content: &str) -> Option<String> {
    const TAIL: &str = "<｜end▁of▁sentence｜><｜User｜><｜Assistant｜><think>";
    let mut next = chat.clone();
    next.messages.push(Message::assistant(content));
    next.messages.push(Message::user(""));
    render_chat(&next).strip_suffix(TAIL).map(str::to_string)
}

fn rate(tokens: usize, secs: f64) -> f64 {
    if secs > 0.0 {
        tokens as f64 / secs
    } else {
        0.0
    }
}

/// A seed from the clock, for requests that give none (ds4: time-based).
fn time_seed() -> u64 {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0x9e37_79b9_7f4a_7c15);
    nanos | 1
}
