//! Shared request plumbing: body → JSON object, thinking mode, prompt → engine job, and the
//! non-streaming collection of a job's events.

use axum::body::{Body, Bytes};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use ds4_text::chat::{render_chat, ChatPrompt, ThinkMode};
use serde_json::{Map, Value};
use tokio::sync::mpsc::UnboundedReceiver;

use super::errors::{ApiError, Flavor};
use super::fields::{type_name, Fields};
use super::sse::{sse_response, SseEncoder};
use crate::job::{
    EngineError, FinishReason, GenEvent, GenJob, Sampling, ToolCallOut, ToolIdStyle, Usage,
};
use crate::server::AppState;
use crate::tool_memory::RememberedCall;

/// A handler's result as the HTTP response (errors in the API's own error shape).
pub fn respond(result: Result<Response, ApiError>) -> Response {
    result.unwrap_or_else(IntoResponse::into_response)
}

/// Reads the body (at most `limit` bytes) and parses it as a JSON object.
pub async fn read_json_object(
    body: Body,
    limit: usize,
    flavor: Flavor,
) -> Result<(Bytes, Map<String, Value>), ApiError> {
    let bytes = axum::body::to_bytes(body, limit).await.map_err(|e| {
        if is_length_limit(&e) {
            ApiError::new(
                flavor,
                StatusCode::PAYLOAD_TOO_LARGE,
                format!("request body exceeds the {limit}-byte limit"),
            )
        } else {
            ApiError::bad_request(flavor, format!("could not read the request body: {e}"))
        }
    })?;
    let obj = parse_json_object(&bytes, flavor)?;
    Ok((bytes, obj))
}

fn is_length_limit(e: &axum::Error) -> bool {
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(s) = source {
        if s.to_string().to_ascii_lowercase().contains("length limit") {
            return true;
        }
        source = s.source();
    }
    false
}

/// Bytes → JSON object, with a 400 naming what is wrong.
pub fn parse_json_object(bytes: &[u8], flavor: Flavor) -> Result<Map<String, Value>, ApiError> {
    if bytes.is_empty() {
        return Err(ApiError::bad_request(
            flavor,
            "the request body is empty; a JSON object is required",
        ));
    }
    if let Err(e) = std::str::from_utf8(bytes) {
        return Err(ApiError::bad_request(
            flavor,
            format!(
                "the request body is not valid UTF-8 (byte {})",
                e.valid_up_to()
            ),
        ));
    }
    match serde_json::from_slice::<Value>(bytes) {
        Ok(Value::Object(o)) => Ok(o),
        Ok(other) => Err(ApiError::bad_request(
            flavor,
            format!(
                "the request body must be a JSON object, got {}",
                type_name(&other)
            ),
        )),
        Err(e) => Err(ApiError::bad_request(
            flavor,
            format!("invalid JSON in the request body: {e}"),
        )),
    }
}

/// ds4's reasoning-effort words.
pub fn parse_effort(flavor: Flavor, field: &str, effort: &str) -> Result<ThinkMode, ApiError> {
    match effort {
        "max" => Ok(ThinkMode::Max),
        "xhigh" | "high" | "medium" | "low" | "minimal" => Ok(ThinkMode::High),
        "none" => Ok(ThinkMode::Off),
        other => Err(ApiError::field(
            flavor,
            field,
            format!("'{field}' must be one of max, xhigh, high, medium, low, minimal, none; got '{other}'"),
        )),
    }
}

/// Thinking mode of a request: explicit `thinking`/`think` switch, then the effort, then the
/// model name (`deepseek-chat` → off), else on (high). `effort` is the API's effort field,
/// already read by the caller along with its name.
pub fn resolve_think(f: &Fields<'_>, effort: Option<(&str, &str)>) -> Result<ThinkMode, ApiError> {
    let mut enabled: Option<bool> = None;
    if let Some(v) = f.get("thinking") {
        enabled = Some(match v {
            Value::Bool(b) => *b,
            Value::Object(o) => match o.get("type") {
                Some(Value::String(t)) if t == "enabled" || t == "adaptive" => true,
                Some(Value::String(t)) if t == "disabled" => false,
                _ => {
                    return Err(ApiError::field(
                        f.flavor,
                        "thinking",
                        "'thinking.type' must be \"enabled\", \"adaptive\" or \"disabled\"",
                    ))
                }
            },
            other => return Err(f.wrong_type("thinking", "a boolean or an object", other)),
        });
    }
    if let Some(b) = f.bool("think")? {
        enabled = Some(b);
    }
    let effort = match effort {
        Some((field, e)) => Some(parse_effort(f.flavor, field, e)?),
        None => match f.str("reasoning_effort")? {
            Some(e) => Some(parse_effort(f.flavor, "reasoning_effort", e)?),
            None => None,
        },
    };
    Ok(match (enabled, effort) {
        (Some(false), _) => ThinkMode::Off,
        (_, Some(e)) => e,
        (Some(true), None) => ThinkMode::High,
        (None, None) => match f.str("model")? {
            Some("deepseek-chat") => ThinkMode::Off,
            _ => ThinkMode::High,
        },
    })
}

/// Thinking mode ignores client sampling (ds4): the defaults apply, except the seed.
pub fn effective_sampling(client: Sampling, think: ThinkMode) -> Sampling {
    if think == ThinkMode::Off {
        client
    } else {
        Sampling {
            seed: client.seed,
            ..Sampling::default()
        }
    }
}

/// What every API hands over to make a job.
pub struct JobSpec {
    pub flavor: Flavor,
    pub request_id: String,
    pub prompt_text: String,
    pub sampling: Sampling,
    pub max_tokens: Option<u64>,
    pub stop: Vec<String>,
    pub thinking: bool,
    pub tools_active: bool,
    pub tool_ids: ToolIdStyle,
    /// The chat the prompt was rendered from (None for raw completions).
    pub chat: Option<ChatPrompt>,
}

impl JobSpec {
    /// The job of a chat prompt, rendered at the server's context size; thinking and tool-call
    /// parsing follow the prompt. Sampling, token limit and stop strings start at their
    /// defaults for the caller to fill in.
    pub fn chat(
        state: &AppState,
        flavor: Flavor,
        request_id: String,
        mut prompt: ChatPrompt,
        tool_ids: ToolIdStyle,
    ) -> JobSpec {
        JobSpec {
            flavor,
            request_id,
            prompt_text: render(&mut prompt, state),
            sampling: Sampling::default(),
            max_tokens: None,
            stop: Vec::new(),
            thinking: prompt.think != ThinkMode::Off,
            tools_active: !prompt.tools.is_empty(),
            tool_ids,
            chat: Some(prompt),
        }
    }
}

/// The chat prompt of a request's history, tools and thinking mode, with exact tool replay
/// applied to the history.
pub fn chat_prompt(
    state: &AppState,
    mut messages: Vec<ds4_text::chat::Message>,
    tools: Vec<String>,
    think: ThinkMode,
) -> ChatPrompt {
    apply_tool_replay(&mut messages, state);
    ChatPrompt {
        messages,
        tools,
        think,
        ctx: 0,
    }
}

/// The request's `model`, else the name of the loaded model.
pub fn model_name(f: &Fields<'_>, state: &AppState) -> Result<String, ApiError> {
    Ok(f.str("model")?
        .unwrap_or(state.engine.model_name())
        .to_string())
}

/// Renders a chat prompt, first giving it the server's context size.
pub fn render(prompt: &mut ChatPrompt, state: &AppState) -> String {
    prompt.ctx = state.engine.ctx();
    render_chat(prompt)
}

/// Tokenizes the prompt off the async threads and checks it fits the context.
pub async fn make_job(state: &AppState, spec: JobSpec) -> Result<GenJob, ApiError> {
    let codec = state.engine.codec().clone();
    let text = spec.prompt_text;
    let (text, tokens) = tokio::task::spawn_blocking(move || {
        let tokens = codec.encode(&text);
        (text, tokens)
    })
    .await
    .map_err(|e| {
        ApiError::new(
            spec.flavor,
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("tokenizer failed: {e}"),
        )
    })?;
    let ctx = state.engine.ctx();
    if tokens.len() >= ctx {
        return Err(ApiError::context_length_exceeded(
            spec.flavor,
            tokens.len(),
            ctx,
        ));
    }
    let max_tokens = spec
        .max_tokens
        .map(|m| m as usize)
        .unwrap_or(state.config.default_max_tokens);
    Ok(GenJob {
        request_id: spec.request_id,
        prompt_text: text,
        prompt_tokens: tokens,
        sampling: spec.sampling,
        max_tokens,
        stop: spec.stop,
        thinking: spec.thinking,
        tools_active: spec.tools_active,
        tool_ids: spec.tool_ids,
        chat: spec.chat,
    })
}

/// Makes the job and submits it. With an encoder (the client asked for a stream) the answer
/// is the job's event stream; otherwise its whole output, shaped by `whole` into one JSON
/// body. Either way the job is cancelled if the client goes away first.
pub async fn run_job<E: SseEncoder>(
    state: &AppState,
    spec: JobSpec,
    stream: Option<E>,
    whole: impl FnOnce(Collected) -> Value,
) -> Result<Response, ApiError> {
    let flavor = spec.flavor;
    let job = make_job(state, spec).await?;
    let (rx, guard) = state.engine.submit(job);
    if let Some(enc) = stream {
        return Ok(sse_response(rx, guard, enc, state.config.keepalive));
    }
    let c = collect(rx).await.map_err(|e| engine_error(flavor, &e))?;
    drop(guard);
    Ok(axum::Json(whole(c)).into_response())
}

/// A job's whole output, for non-streaming responses.
#[derive(Debug, Default)]
pub struct Collected {
    pub reasoning: String,
    pub content: String,
    pub tool_calls: Vec<ToolCallOut>,
    pub finish: Option<FinishReason>,
    pub usage: Usage,
}

/// Waits for the job to finish.
pub async fn collect(mut rx: UnboundedReceiver<GenEvent>) -> Result<Collected, EngineError> {
    let mut c = Collected::default();
    while let Some(ev) = rx.recv().await {
        match ev {
            GenEvent::Started { .. } => {}
            GenEvent::Reasoning(t) => c.reasoning.push_str(&t),
            GenEvent::Content(t) => c.content.push_str(&t),
            GenEvent::ToolCallStart { .. } | GenEvent::ToolCallArgs { .. } => {}
            GenEvent::ToolCallEnd { call, .. } => c.tool_calls.push(call),
            GenEvent::Done { finish, usage } => {
                c.finish = Some(finish);
                c.usage = usage;
                return Ok(c);
            }
            GenEvent::Failed(e) => return Err(e),
        }
    }
    Err(EngineError::Shutdown)
}

/// An engine failure as an API error.
pub fn engine_error(flavor: Flavor, e: &EngineError) -> ApiError {
    match e {
        EngineError::ContextLengthExceeded { prompt_tokens, ctx } => {
            ApiError::context_length_exceeded(flavor, *prompt_tokens, *ctx)
        }
        other => ApiError::new(flavor, StatusCode::INTERNAL_SERVER_ERROR, other.to_string()),
    }
}

/// Text of a message `content`: a string, or the concatenated `text` of its parts.
pub fn content_text(flavor: Flavor, field: &str, v: Option<&Value>) -> Result<String, ApiError> {
    match v {
        None | Some(Value::Null) => Ok(String::new()),
        Some(Value::String(s)) => Ok(s.clone()),
        Some(Value::Array(parts)) => {
            let mut out = String::new();
            for p in parts {
                match p {
                    Value::String(s) => out.push_str(s),
                    Value::Object(o) => match o.get("text") {
                        Some(Value::String(s)) => out.push_str(s),
                        Some(other) => {
                            return Err(ApiError::field(
                                flavor,
                                field,
                                format!(
                                    "'{field}' part text must be a string, got {}",
                                    type_name(other)
                                ),
                            ))
                        }
                        None => {}
                    },
                    other => {
                        return Err(ApiError::field(
                            flavor,
                            field,
                            format!("'{field}' parts must be objects, got {}", type_name(other)),
                        ))
                    }
                }
            }
            Ok(out)
        }
        Some(other) => Err(ApiError::field(
            flavor,
            field,
            format!(
                "'{field}' must be a string or an array of parts, got {}",
                type_name(other)
            ),
        )),
    }
}

/// The raw JSON text of each element of the top-level `tools` array (ds4 renders tool schemas
/// from the client's exact bytes).
pub fn raw_tools(
    bytes: &[u8],
    flavor: Flavor,
) -> Result<Vec<&serde_json::value::RawValue>, ApiError> {
    #[derive(serde::Deserialize)]
    struct Tools<'a> {
        #[serde(borrow, default)]
        tools: Option<Vec<&'a serde_json::value::RawValue>>,
    }
    let t: Tools<'_> = serde_json::from_slice(bytes).map_err(|e| {
        ApiError::field(
            flavor,
            "tools",
            format!("'tools' must be an array of objects: {e}"),
        )
    })?;
    Ok(t.tools.unwrap_or_default())
}

/// The raw JSON text of member `key` of a raw JSON object, if present.
pub fn raw_member<'a>(
    raw: &'a serde_json::value::RawValue,
    key: &str,
) -> Option<&'a serde_json::value::RawValue> {
    let map: std::collections::HashMap<String, &'a serde_json::value::RawValue> =
        serde_json::from_str(raw.get()).ok()?;
    map.get(key).copied()
}

/// Exact DSML replay: an assistant message whose tool-call ids all map to one remembered
/// block gets that block, so it renders byte for byte as it was sampled.
pub fn apply_tool_replay(messages: &mut [ds4_text::chat::Message], state: &AppState) {
    if !state.config.exact_tool_replay {
        return;
    }
    let memory = match state.engine.tool_memory().lock() {
        Ok(m) => m,
        Err(p) => p.into_inner(),
    };
    for m in messages.iter_mut() {
        if m.tool_calls.is_empty() {
            continue;
        }
        let remembered: Vec<Option<&RememberedCall>> = m
            .tool_calls
            .iter()
            .map(|c| c.id.as_deref().and_then(|id| memory.get(id)))
            .collect();
        let Some(first) = remembered[0] else { continue };
        if remembered
            .iter()
            .all(|r| r.map(|r| &r.raw_dsml) == Some(&first.raw_dsml))
        {
            for c in m.tool_calls.iter_mut() {
                c.raw_dsml = Some(first.raw_dsml.clone());
            }
            // Clients often drop the reasoning of a tool-call turn; the model saw it.
            if m.reasoning.as_deref().unwrap_or("").is_empty() {
                m.reasoning.clone_from(&first.reasoning);
            }
        }
    }
}

/// Tool-call arguments as the client sent them (a JSON string in OpenAI shapes) → object.
/// Text that is not JSON is kept as a string (rendered as one `arguments` parameter).
pub fn arguments_value(text: &str) -> Value {
    match serde_json::from_str::<Value>(text) {
        Ok(v) => v,
        Err(_) => Value::String(text.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn think(body: Value, effort: Option<(&str, &str)>) -> Result<ThinkMode, ApiError> {
        let Value::Object(o) = body else {
            unreachable!()
        };
        resolve_think(&Fields::new(&o, Flavor::OpenAi), effort)
    }

    #[test]
    fn thinking_defaults_and_effort_mapping_follow_ds4() {
        assert_eq!(think(json!({}), None).unwrap(), ThinkMode::High);
        assert_eq!(
            think(json!({"model": "deepseek-chat"}), None).unwrap(),
            ThinkMode::Off
        );
        assert_eq!(
            think(json!({"model": "deepseek-reasoner"}), None).unwrap(),
            ThinkMode::High
        );
        assert_eq!(
            think(json!({"model": "deepseek-chat", "think": true}), None).unwrap(),
            ThinkMode::High
        );
        for e in ["xhigh", "high", "medium", "low", "minimal"] {
            assert_eq!(
                think(json!({"reasoning_effort": e}), None).unwrap(),
                ThinkMode::High,
                "{e}"
            );
        }
        assert_eq!(
            think(json!({"reasoning_effort": "max"}), None).unwrap(),
            ThinkMode::Max
        );
        assert_eq!(
            think(json!({"reasoning_effort": "none"}), None).unwrap(),
            ThinkMode::Off
        );
        assert_eq!(
            think(
                json!({"thinking": {"type": "disabled"}, "reasoning_effort": "max"}),
                None
            )
            .unwrap(),
            ThinkMode::Off
        );
        assert_eq!(
            think(json!({"thinking": false}), None).unwrap(),
            ThinkMode::Off
        );
        assert_eq!(
            think(
                json!({"thinking": {"type": "enabled"}}),
                Some(("output_config.effort", "max"))
            )
            .unwrap(),
            ThinkMode::Max
        );
        assert!(think(json!({"reasoning_effort": "huge"}), None).is_err());
    }

    #[test]
    fn thinking_ignores_client_sampling_but_keeps_the_seed() {
        let client = Sampling {
            temperature: 0.0,
            top_p: 0.5,
            top_k: 3,
            min_p: 0.2,
            seed: 9,
        };
        assert_eq!(effective_sampling(client, ThinkMode::Off), client);
        let s = effective_sampling(client, ThinkMode::High);
        assert_eq!(
            s,
            Sampling {
                seed: 9,
                ..Sampling::default()
            }
        );
    }
}
