//! POST /v1/chat/completions (OpenAI chat): request → chat prompt, output → `chat.completion`
//! or `chat.completion.chunk` events.

use axum::body::Body;
use axum::extract::State;
use axum::response::{IntoResponse, Response};
use ds4_text::chat::{ChatPrompt, Message, Role, ThinkMode, ToolCall};
use serde_json::{json, Map, Value};

use super::common::{
    apply_tool_replay, arguments_value, collect, content_text, effective_sampling, engine_error,
    make_job, raw_member, raw_tools, read_json_object, render, resolve_think, JobSpec,
};
use super::errors::{ApiError, Flavor};
use super::fields::{type_name, Fields};
use super::sse::{data, sse_response, SseEncoder};
use crate::ids::{random_hex32, unix_now};
use crate::job::{EngineError, FinishReason, GenEvent, ToolIdStyle, Usage};
use crate::server::AppState;

const FLAVOR: Flavor = Flavor::OpenAi;

/// Parses OpenAI `messages`.
pub fn parse_messages(f: &Fields<'_>) -> Result<Vec<Message>, ApiError> {
    let Some(list) = f.array("messages")? else {
        return Err(ApiError::field(
            FLAVOR,
            "messages",
            "'messages' is required",
        ));
    };
    let mut out = Vec::with_capacity(list.len());
    for (i, m) in list.iter().enumerate() {
        let field = format!("messages[{i}]");
        let Value::Object(m) = m else {
            return Err(ApiError::field(
                FLAVOR,
                &field,
                format!("'{field}' must be an object, got {}", type_name(m)),
            ));
        };
        let role = match m.get("role") {
            Some(Value::String(r)) => r.as_str(),
            Some(other) => {
                return Err(ApiError::field(
                    FLAVOR,
                    &field,
                    format!("'{field}.role' must be a string, got {}", type_name(other)),
                ))
            }
            None => {
                return Err(ApiError::field(
                    FLAVOR,
                    &field,
                    format!("'{field}.role' is required"),
                ))
            }
        };
        let role = match role {
            "system" | "developer" => Role::System,
            "user" => Role::User,
            "assistant" => Role::Assistant,
            "tool" | "function" => Role::Tool,
            other => {
                return Err(ApiError::field(
                    FLAVOR,
                    &field,
                    format!("unknown role '{other}' in '{field}' (expected system, developer, user, assistant or tool)"),
                ))
            }
        };
        let content = content_text(FLAVOR, &format!("{field}.content"), m.get("content"))?;
        let mut msg = Message {
            role,
            content,
            reasoning: None,
            tool_calls: Vec::new(),
            tool_call_id: None,
        };
        if role == Role::Assistant {
            for key in ["reasoning_content", "reasoning"] {
                match m.get(key) {
                    Some(Value::String(s)) => msg.reasoning = Some(s.clone()),
                    None | Some(Value::Null) => continue,
                    Some(other) => {
                        return Err(ApiError::field(
                            FLAVOR,
                            &field,
                            format!("'{field}.{key}' must be a string, got {}", type_name(other)),
                        ))
                    }
                }
                break;
            }
            msg.tool_calls = parse_tool_calls(&field, m.get("tool_calls"))?;
        }
        if role == Role::Tool {
            match m.get("tool_call_id") {
                Some(Value::String(s)) => msg.tool_call_id = Some(s.clone()),
                None | Some(Value::Null) => {}
                Some(other) => {
                    return Err(ApiError::field(
                        FLAVOR,
                        &field,
                        format!(
                            "'{field}.tool_call_id' must be a string, got {}",
                            type_name(other)
                        ),
                    ))
                }
            }
        }
        out.push(msg);
    }
    Ok(out)
}

fn parse_tool_calls(field: &str, v: Option<&Value>) -> Result<Vec<ToolCall>, ApiError> {
    let calls = match v {
        None | Some(Value::Null) => return Ok(Vec::new()),
        Some(Value::Array(a)) => a,
        Some(other) => {
            return Err(ApiError::field(
                FLAVOR,
                field,
                format!(
                    "'{field}.tool_calls' must be an array, got {}",
                    type_name(other)
                ),
            ))
        }
    };
    let mut out = Vec::new();
    for (j, c) in calls.iter().enumerate() {
        let cf = format!("{field}.tool_calls[{j}]");
        let bad = |what: &str| ApiError::field(FLAVOR, &cf, format!("'{cf}' {what}"));
        let Value::Object(c) = c else {
            return Err(bad("must be an object"));
        };
        let Some(Value::Object(func)) = c.get("function") else {
            return Err(bad("needs a 'function' object"));
        };
        let Some(Value::String(name)) = func.get("name") else {
            return Err(bad("needs a string 'function.name'"));
        };
        let arguments = match func.get("arguments") {
            None | Some(Value::Null) => Value::Object(Map::new()),
            Some(Value::String(s)) => arguments_value(s),
            Some(v @ Value::Object(_)) => v.clone(),
            Some(_) => return Err(bad("'function.arguments' must be a JSON string")),
        };
        let id = match c.get("id") {
            Some(Value::String(s)) => Some(s.clone()),
            _ => None,
        };
        out.push(ToolCall {
            id,
            name: name.clone(),
            arguments,
            raw_dsml: None,
        });
    }
    Ok(out)
}

/// The `function` objects of OpenAI `tools`, as raw JSON text; empty if `tool_choice` is "none".
pub fn parse_tools(bytes: &[u8], f: &Fields<'_>) -> Result<Vec<String>, ApiError> {
    if f.str("tool_choice").ok().flatten() == Some("none") {
        return Ok(Vec::new());
    }
    let mut out = Vec::new();
    for (i, raw) in raw_tools(bytes, FLAVOR)?.into_iter().enumerate() {
        match raw_member(raw, "function") {
            Some(func) if func.get().trim_start().starts_with('{') => {
                out.push(func.get().to_string())
            }
            _ => {
                return Err(ApiError::field(
                    FLAVOR,
                    "tools",
                    format!("'tools[{i}]' must be an object with a 'function' object"),
                ))
            }
        }
    }
    Ok(out)
}

/// Usage object of chat and completions.
pub fn usage_json(u: &Usage) -> Value {
    json!({
        "prompt_tokens": u.prompt_tokens,
        "completion_tokens": u.completion_tokens,
        "total_tokens": u.prompt_tokens + u.completion_tokens,
        "prompt_tokens_details": { "cached_tokens": u.cached_tokens, "cache_write_tokens": 0 },
        "completion_tokens_details": { "reasoning_tokens": u.reasoning_tokens },
    })
}

pub async fn chat_completions(State(state): State<AppState>, body: Body) -> Response {
    match handle(state, body).await {
        Ok(r) => r,
        Err(e) => e.into_response(),
    }
}

async fn handle(state: AppState, body: Body) -> Result<Response, ApiError> {
    let (bytes, obj) = read_json_object(body, state.config.body_limit, FLAVOR).await?;
    let f = Fields::new(&obj, FLAVOR);
    let mut messages = parse_messages(&f)?;
    let tools = parse_tools(&bytes, &f)?;
    let think = resolve_think(&f, None)?;
    let sampling = effective_sampling(f.sampling()?, think);
    let max_tokens = match f.u64("max_completion_tokens")? {
        Some(n) => Some(n),
        None => f.u64("max_tokens")?,
    };
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
    apply_tool_replay(&mut messages, &state);
    let tools_active = !tools.is_empty();
    let mut prompt = ChatPrompt {
        messages,
        tools,
        think,
        ctx: 0,
    };
    let id = format!("chatcmpl-{}", random_hex32());
    let job = make_job(
        &state,
        JobSpec {
            flavor: FLAVOR,
            request_id: id.clone(),
            prompt_text: render(&mut prompt, &state),
            chat: Some(prompt.clone()),
            sampling,
            max_tokens,
            stop,
            thinking: think != ThinkMode::Off,
            tools_active,
            tool_ids: ToolIdStyle::Call,
        },
    )
    .await?;
    let (rx, guard) = state.engine.submit(job);
    if stream {
        let enc = ChatStream {
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
    let mut message = Map::new();
    message.insert("role".into(), json!("assistant"));
    let content = if c.content.is_empty() && !c.tool_calls.is_empty() {
        Value::Null
    } else {
        json!(c.content)
    };
    message.insert("content".into(), content);
    if !c.reasoning.is_empty() {
        message.insert("reasoning_content".into(), json!(c.reasoning));
    }
    if !c.tool_calls.is_empty() {
        let calls: Vec<Value> = c
            .tool_calls
            .iter()
            .map(|t| {
                json!({"id": t.id, "type": "function",
                       "function": {"name": t.name, "arguments": t.arguments.to_string()}})
            })
            .collect();
        message.insert("tool_calls".into(), Value::Array(calls));
    }
    let body = json!({
        "id": id, "object": "chat.completion", "created": unix_now(), "model": model,
        "choices": [{"index": 0, "message": message, "finish_reason": finish.openai(), "logprobs": null}],
        "usage": usage_json(&c.usage),
    });
    Ok(axum::Json(body).into_response())
}

/// `chat.completion.chunk` stream.
pub struct ChatStream {
    pub id: String,
    pub model: String,
    pub created: u64,
    pub include_usage: bool,
    pub finished: bool,
}

impl ChatStream {
    fn chunk(&self, delta: Value, finish: Option<&str>) -> String {
        data(&json!({
            "id": self.id, "object": "chat.completion.chunk", "created": self.created, "model": self.model,
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": null}],
        }))
    }
}

impl SseEncoder for ChatStream {
    fn event(&mut self, ev: GenEvent) -> String {
        match ev {
            GenEvent::Started { .. } => {
                self.chunk(json!({"role": "assistant", "content": ""}), None)
            }
            GenEvent::Reasoning(t) => self.chunk(json!({"reasoning_content": t}), None),
            GenEvent::Content(t) => self.chunk(json!({"content": t}), None),
            GenEvent::ToolCallStart { index, id, name } => self.chunk(
                json!({"tool_calls": [{"index": index, "id": id, "type": "function",
                                        "function": {"name": name, "arguments": ""}}]}),
                None,
            ),
            GenEvent::ToolCallArgs { index, fragment } => self.chunk(
                json!({"tool_calls": [{"index": index, "function": {"arguments": fragment}}]}),
                None,
            ),
            GenEvent::ToolCallEnd { .. } => String::new(),
            GenEvent::Done { finish, usage } => {
                self.finished = true;
                let mut out = self.chunk(json!({}), Some(finish.openai()));
                if self.include_usage {
                    out += &data(&json!({
                        "id": self.id, "object": "chat.completion.chunk", "created": self.created,
                        "model": self.model, "choices": [], "usage": usage_json(&usage),
                    }));
                }
                out + "data: [DONE]\n\n"
            }
            GenEvent::Failed(e) => self.fail(&e),
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
