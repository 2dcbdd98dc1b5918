//! POST /v1/completions: a prompt rendered as one chat turn under ds4's default system
//! prompt (ds4-spec §4), answered in the `text_completion` shape.

use axum::body::Body;
use axum::extract::State;
use axum::response::{IntoResponse, Response};
use ds4_text::chat::{render_completion, ThinkMode};
use serde_json::{json, Value};

use super::common::{
    collect, effective_sampling, engine_error, make_job, read_json_object, resolve_think, JobSpec,
};
use super::errors::{ApiError, Flavor};
use super::fields::Fields;
use super::openai::usage_json;
use super::sse::{data, sse_response, SseEncoder};
use crate::ids::{random_hex32, unix_now};
use crate::job::{EngineError, FinishReason, GenEvent, ToolIdStyle};
use crate::server::AppState;

const FLAVOR: Flavor = Flavor::OpenAi;

pub async fn completions(State(state): State<AppState>, body: Body) -> Response {
    match handle(state, body).await {
        Ok(r) => r,
        Err(e) => e.into_response(),
    }
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
    let max_tokens = f.u64("max_tokens")?;
    let stop = f.stop("stop")?;
    let stream = f.bool("stream")?.unwrap_or(false);
    let include_usage = match f.object("stream_options")? {
        Some(o) => Fields::new(o, FLAVOR)
            .bool("include_usage")?
            .unwrap_or(false),
        None => false,
    };
    let model = f
        .str("model")?
        .unwrap_or(state.engine.model_name())
        .to_string();
    let id = format!("cmpl-{}", random_hex32());
    let job = make_job(
        &state,
        JobSpec {
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
        },
    )
    .await?;
    let (rx, guard) = state.engine.submit(job);
    if stream {
        let enc = CompletionStream {
            id,
            model,
            created: unix_now(),
            include_usage,
            finished: false,
        };
        return Ok(sse_response(rx, guard, enc, state.config.keepalive));
    }
    let c = collect(rx).await.map_err(|e| engine_error(FLAVOR, &e))?;
    drop(guard);
    let finish = c.finish.unwrap_or(FinishReason::Stop);
    let mut choice =
        json!({"index": 0, "text": c.content, "finish_reason": finish.openai(), "logprobs": null});
    if !c.reasoning.is_empty() {
        choice["reasoning_content"] = json!(c.reasoning);
    }
    Ok(axum::Json(json!({
        "id": id, "object": "text_completion", "created": unix_now(), "model": model,
        "choices": [choice], "usage": usage_json(&c.usage),
    }))
    .into_response())
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
    fn chunk(&self, choice: Value) -> String {
        data(&json!({
            "id": self.id, "object": "text_completion", "created": self.created, "model": self.model,
            "choices": [choice],
        }))
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
                    out += &data(&json!({
                        "id": self.id, "object": "text_completion", "created": self.created,
                        "model": self.model, "choices": [], "usage": usage_json(&usage),
                    }));
                }
                out + "data: [DONE]\n\n"
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
        data(&engine_error(FLAVOR, err).body()) + "data: [DONE]\n\n"
    }
}
