//! POST /v1/chat/completions (OpenAI chat): request → chat prompt, output → `chat.completion`
//! or `chat.completion.chunk` events.

use axum::body::Body;
use axum::extract::State;
use axum::response::Response;
use ds4_text::chat::{Message, Role, ToolCall};
use serde_json::{json, Map, Value};

use super::common::{
    arguments_value, chat_prompt, content_text, effective_sampling, engine_error, model_name,
    raw_member, raw_tools, read_json_object, resolve_think, respond, run_job, Collected, JobSpec,
};
use super::errors::{ApiError, Flavor};
use super::fields::{type_name, Fields};
use super::sse::{data, SseEncoder};
use crate::ids::{random_hex32, unix_now};
use crate::job::{EngineError, FinishReason, GenEvent, ToolIdStyle, Usage};
use crate::server::AppState;

const FLAVOR: Flavor = Flavor::OpenAi;
const CHAT_CHUNK: &str = "chat.completion.chunk";

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

/// `stream_options.include_usage` (chat and completions): a final usage-only chunk.
pub fn include_usage(f: &Fields<'_>) -> Result<bool, ApiError> {
    Ok(match f.object("stream_options")? {
        Some(o) => Fields::new(o, FLAVOR)
            .bool("include_usage")?
            .unwrap_or(false),
        None => false,
    })
}

pub async fn chat_completions(State(state): State<AppState>, body: Body) -> Response {
    respond(handle(state, body).await)
}

async fn handle(state: AppState, body: Body) -> Result<Response, ApiError> {
    let (bytes, obj) = read_json_object(body, state.config.body_limit, FLAVOR).await?;
    let f = Fields::new(&obj, FLAVOR);
    let messages = parse_messages(&f)?;
    let tools = parse_tools(&bytes, &f)?;
    let think = resolve_think(&f, None)?;
    let sampling = effective_sampling(f.sampling()?, think);
    f.one_choice()?;
    f.no_logprobs()?;
    let max_tokens = match f.u64("max_completion_tokens")? {
        Some(n) => Some(n),
        None => f.u64("max_tokens")?,
    };
    let stop = f.stop("stop")?;
    let stream = f.bool("stream")?.unwrap_or(false);
    let include_usage = include_usage(&f)?;
    let model = model_name(&f, &state)?;
    let prompt = chat_prompt(&state, messages, tools, think);
    let id = format!("chatcmpl-{}", random_hex32());
    let spec = JobSpec {
        sampling,
        max_tokens,
        stop,
        ..JobSpec::chat(&state, FLAVOR, id.clone(), prompt, ToolIdStyle::Call)
    };
    let enc = stream.then(|| ChatStream::new(id.clone(), model.clone(), include_usage));
    run_job(&state, spec, enc, |c| completion_object(&id, &model, c)).await
}

/// The whole answer as a `chat.completion` object.
fn completion_object(id: &str, model: &str, c: Collected) -> Value {
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
    json!({
        "id": id, "object": "chat.completion", "created": unix_now(), "model": model,
        "choices": [{"index": 0, "message": message, "finish_reason": finish.openai(), "logprobs": null}],
        "usage": usage_json(&c.usage),
    })
}

/// Frame that ends every OpenAI stream (chat and completions).
pub const STREAM_DONE: &str = "data: [DONE]\n\n";

/// One frame of an OpenAI stream: the `object` envelope (`chat.completion.chunk` or
/// `text_completion`) around `choices`, with `usage` on the usage-only last chunk.
pub fn stream_chunk(
    object: &str,
    id: &str,
    created: u64,
    model: &str,
    choices: Value,
    usage: Option<&Usage>,
) -> String {
    let mut chunk = json!({
        "id": id, "object": object, "created": created, "model": model, "choices": choices,
    });
    if let Some(u) = usage {
        chunk["usage"] = usage_json(u);
    }
    data(&chunk)
}

/// The frames that end an OpenAI stream when the engine failed.
pub fn stream_error(err: &EngineError) -> String {
    data(&engine_error(FLAVOR, err).body()) + STREAM_DONE
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
    pub fn new(id: String, model: String, include_usage: bool) -> Self {
        ChatStream {
            id,
            model,
            created: unix_now(),
            include_usage,
            finished: false,
        }
    }

    fn chunk(&self, delta: Value, finish: Option<&str>) -> String {
        let choice = json!({"index": 0, "delta": delta, "finish_reason": finish, "logprobs": null});
        self.frame(json!([choice]), None)
    }

    fn frame(&self, choices: Value, usage: Option<&Usage>) -> String {
        let (id, model) = (&self.id, &self.model);
        stream_chunk(CHAT_CHUNK, id, self.created, model, choices, usage)
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
                    out += &self.frame(json!([]), Some(&usage));
                }
                out + STREAM_DONE
            }
            GenEvent::Failed(e) => self.fail(&e),
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
