//! What a request asks of the engine (a [`GenJob`]) and what the engine reports back
//! ([`GenEvent`]). These types are API-neutral: each API module builds a job from its own
//! request shape and turns the events into its own response shape.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

/// Sampling settings of one request (ds4-spec §8).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Sampling {
    pub temperature: f32,
    pub top_p: f32,
    pub top_k: i32,
    pub min_p: f32,
    /// 0 = time-based.
    pub seed: u64,
}

impl Default for Sampling {
    /// ds4's request defaults: T 1, top_p 1, min_p 0.05, top_k 0.
    fn default() -> Self {
        Sampling {
            temperature: 1.0,
            top_p: 1.0,
            top_k: 0,
            min_p: 0.05,
            seed: 0,
        }
    }
}

/// Which prefix the engine writes before the 32 hex digits of a tool-call id.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ToolIdStyle {
    /// `call_…` (OpenAI chat, Responses).
    Call,
    /// `toolu_…` (Anthropic).
    Toolu,
}

impl ToolIdStyle {
    pub fn prefix(self) -> &'static str {
        match self {
            ToolIdStyle::Call => "call_",
            ToolIdStyle::Toolu => "toolu_",
        }
    }
}

/// One generation request, ready for the engine: the prompt is already rendered.
#[derive(Debug)]
pub struct GenJob {
    /// Request id, for logs and the trace file.
    pub request_id: String,
    /// The rendered prompt text (what `--trace` records).
    pub prompt_text: String,
    /// `prompt_text` tokenized; the engine may reuse the live session for a prefix of it.
    pub prompt_tokens: Vec<u32>,
    pub sampling: Sampling,
    /// Most tokens to generate (the engine also clamps to the context left).
    pub max_tokens: usize,
    /// Stop strings: generation ends at the earliest one, which is not returned.
    pub stop: Vec<String>,
    /// The prompt ends inside `<think>`: output starts as reasoning.
    pub thinking: bool,
    /// Tool schemas were rendered: DSML tool-call blocks in the output are calls.
    pub tools_active: bool,
    pub tool_ids: ToolIdStyle,
    /// The chat behind `prompt_text`, when there is one: after a thinking turn the engine
    /// renders how the client will send this turn back (reasoning dropped) to reuse the session.
    pub chat: Option<ds4_text::chat::ChatPrompt>,
}

/// Why a generation ended (mapped to each API's finish/stop reason).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FinishReason {
    /// EOS sampled or a stop string matched.
    Stop,
    /// max_tokens reached or the context is full.
    Length,
    /// A complete tool-call block was generated.
    ToolCalls,
    /// The output ended inside a tool-call block.
    Error,
}

impl FinishReason {
    /// The OpenAI spelling.
    pub fn openai(self) -> &'static str {
        match self {
            FinishReason::Stop => "stop",
            FinishReason::Length => "length",
            FinishReason::ToolCalls => "tool_calls",
            FinishReason::Error => "error",
        }
    }
}

/// Token counts of one request.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Usage {
    pub prompt_tokens: usize,
    /// Prompt tokens taken from the live session instead of being prefilled.
    pub cached_tokens: usize,
    pub completion_tokens: usize,
    /// Generated tokens that were reasoning (before `</think>`).
    pub reasoning_tokens: usize,
}

/// A finished tool call, as the API layers need it.
#[derive(Clone, Debug, PartialEq)]
pub struct ToolCallOut {
    pub id: String,
    pub name: String,
    /// The arguments object, key order as sampled.
    pub arguments: serde_json::Value,
}

/// What the engine streams back for one job, in order: `Started`, then any number of
/// output events, then exactly one of `Done` or `Failed`.
#[derive(Clone, Debug, PartialEq)]
pub enum GenEvent {
    /// The job left the queue; `cached_tokens` of the prompt are reused.
    Started {
        prompt_tokens: usize,
        cached_tokens: usize,
    },
    Reasoning(String),
    Content(String),
    ToolCallStart {
        index: usize,
        id: String,
        name: String,
    },
    /// JSON text of the arguments, as sampled (concatenated they form the arguments object).
    ToolCallArgs {
        index: usize,
        fragment: String,
    },
    ToolCallEnd {
        index: usize,
        call: ToolCallOut,
    },
    Done {
        finish: FinishReason,
        usage: Usage,
    },
    Failed(EngineError),
}

/// Failures of a job inside the engine.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
pub enum EngineError {
    #[error("the prompt has {prompt_tokens} tokens, the context holds {ctx}")]
    ContextLengthExceeded { prompt_tokens: usize, ctx: usize },
    #[error("model error: {0}")]
    Model(String),
    #[error("the engine is shut down")]
    Shutdown,
}

/// Set when the client went away; the worker checks it before every token.
#[derive(Clone, Debug, Default)]
pub struct CancelFlag(Arc<AtomicBool>);

impl CancelFlag {
    pub fn new() -> Self {
        CancelFlag::default()
    }
    pub fn cancel(&self) {
        self.0.store(true, Ordering::Release);
    }
    pub fn is_cancelled(&self) -> bool {
        self.0.load(Ordering::Acquire)
    }
}

/// Cancels the job when dropped: held by the response body (streaming) or the handler future
/// (non-streaming), both of which hyper drops when the client disconnects.
#[derive(Debug)]
pub struct CancelOnDrop(pub CancelFlag);

impl Drop for CancelOnDrop {
    fn drop(&mut self) {
        self.0.cancel();
    }
}
