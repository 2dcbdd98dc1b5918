//! POST /v1/completions: a prompt rendered as one chat turn under ds4's default system
//! prompt (ds4-spec §4), answered in the `text_completion` shape.

use axum::body::Body;
use axum::extract::State;
use axum::response::Response;
use ds4_text::chat::{render_completion, ThinkMode};
use serde_json::{json, Value};

use super::common::{
    effective_sampling, model_name, read_json_object, resolve_think, respond, run_job, Collected,
    JobSpec,
};
use super::errors::{ApiError, Flavor};
use super::fields::Fields;
use super::openai::{include_usage, stream_chunk, stream_error, usage_json, STREAM_DONE};
use super::sse::SseEncoder;
use crate::ids::{random_hex32, unix_now};
use crate::job::{EngineError, FinishReason, GenEvent, ToolIdStyle, Usage};
use crate::server::AppState;

const FLAVOR: Flavor = Flavor::OpenAi;
const TEXT_COMPLETION: &str = "text_completion";

pub async fn completions(State(state): State<AppState>, body: Body) -> Response {
    respond(handle(state, body).await)
}

async fn handle(state: AppState, body: Body) -> Result<Response, ApiError> {
    let (_, obj) = read_json_object(body, state.config.body_limit, FLAVOR).await?;
    let f = Fields::new(&obj, FLAVOR);
    let prompt = match f.get("prompt") {
        Some(Value::String(s)) => s.clone(),
        Some(Value::Array(a)) if a.len() == 1 && a[0].is_string() => {
            a[0].as_str().unwrap_or_default().to_string()
        }
        Some(Value::Array(_)) => {
            return Err(ApiError::field(
                FLAVOR,
                "prompt",
                "'prompt' arrays must hold exactly one string",
            ))
        }
        Some(other) => return Err(f.wrong_type("prompt", "a string", other)),
        None => return Err(ApiError::field(FLAVOR, "prompt", "'prompt' is required")),
    };
    let think = resolve_think(&f, None)?;
    let sampling = effective_sampling(f.sampling()?, think);
    f.one_choice()?;
    f.no_logprobs()?;
    let max_tokens = f.u64("max_tokens")?;
    let stop = f.stop("stop")?;
    let stream = f.bool("stream")?.unwrap_or(false);
    let include_usage = include_usage(&f)?;
    let model = model_name(&f, &state)?;
    let id = format!("cmpl-{}", random_hex32());
    let spec = JobSpec {
        flavor: FLAVOR,
        request_id: id.clone(),
        prompt_text: render_completion(&prompt, think, state.engine.ctx()),
        sampling,
        max_tokens,
        stop,
        thinking: think != ThinkMode::Off,
        tools_active: false,
        tool_ids: ToolIdStyle::Call,
        chat: None,
    };
    let enc = stream.then(|| CompletionStream::new(id.clone(), model.clone(), include_usage));
    run_job(&state, spec, enc, |c| completion_object(&id, &model, c)).await
}

/// The whole answer as a `text_completion` object.
fn completion_object(id: &str, model: &str, c: Collected) -> Value {
    let finish = c.finish.unwrap_or(FinishReason::Stop);
    let mut choice =
        json!({"index": 0, "text": c.content, "finish_reason": finish.openai(), "logprobs": null});
    if !c.reasoning.is_empty() {
        choice["reasoning_content"] = json!(c.reasoning);
    }
    json!({
        "id": id, "object": TEXT_COMPLETION, "created": unix_now(), "model": model,
        "choices": [choice], "usage": usage_json(&c.usage),
    })
}

/// `text_completion` stream.
pub struct CompletionStream {
    pub id: String,
    pub model: String,
    pub created: u64,
    pub include_usage: bool,
    pub finished: bool,
}

impl CompletionStream {
    pub fn new(id: String, model: String, include_usage: bool) -> Self {
        CompletionStream {
            id,
            model,
            created: unix_now(),
            include_usage,
            finished: false,
        }
    }

    fn chunk(&self, choice: Value) -> String {
        self.frame(json!([choice]), None)
    }

    fn frame(&self, choices: Value, usage: Option<&Usage>) -> String {
        let (id, model) = (&self.id, &self.model);
        stream_chunk(TEXT_COMPLETION, id, self.created, model, choices, usage)
    }
}

impl SseEncoder for CompletionStream {
    fn event(&mut self, ev: GenEvent) -> String {
        match ev {
            GenEvent::Reasoning(t) => {
                self.chunk(json!({"index": 0, "text": "", "reasoning_content": t, "finish_reason": null, "logprobs": null}))
            }
            GenEvent::Content(t) => self.chunk(json!({"index": 0, "text": t, "finish_reason": null, "logprobs": null})),
            GenEvent::Done { finish, usage } => {
                self.finished = true;
                let mut out =
                    self.chunk(json!({"index": 0, "text": "", "finish_reason": finish.openai(), "logprobs": null}));
                if self.include_usage {
                    out += &self.frame(json!([]), Some(&usage));
                }
                out + STREAM_DONE
            }
            GenEvent::Failed(e) => self.fail(&e),
            GenEvent::Started { .. }
            | GenEvent::ToolCallStart { .. }
            | GenEvent::ToolCallArgs { .. }
            | GenEvent::ToolCallEnd { .. } => String::new(),
        }
    }

    fn finished(&self) -> bool {
        self.finished
    }

    fn fail(&mut self, err: &EngineError) -> String {
        self.finished = true;
        stream_error(err)
    }
}
