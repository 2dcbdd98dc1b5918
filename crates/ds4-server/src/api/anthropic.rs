//! POST /v1/messages (Anthropic): content blocks in, `message` or the message_start …
//! message_stop event stream out.

use axum::body::Body;
use axum::extract::State;
use axum::response::{IntoResponse, Response};
use ds4_text::chat::{ChatPrompt, Message, Role, ToolCall};
use serde_json::{json, Map, Value};

use super::common::{
    chat_prompt, effective_sampling, engine_error, model_name, raw_tools, read_json_object, render,
    resolve_think, respond, run_job, Collected, JobSpec,
};
use super::errors::{ApiError, Flavor};
use super::fields::{type_name, Fields};
use super::sse::{named, SseEncoder};
use crate::ids::random_hex32;
use crate::job::{EngineError, FinishReason, GenEvent, ToolIdStyle, Usage};
use crate::server::AppState;

const FLAVOR: Flavor = Flavor::Anthropic;

fn new_message(role: Role) -> Message {
    Message {
        role,
        content: String::new(),
        reasoning: None,
        tool_calls: Vec::new(),
        tool_call_id: None,
    }
}

fn bad(field: &str, what: String) -> ApiError {
    ApiError::field(FLAVOR, field, what)
}

/// Text of blocks or a string (system prompt, tool_result content).
fn blocks_text(
    field: &str,
    v: Option<&Value>,
    drop_anthropic_internal: bool,
) -> Result<String, ApiError> {
    match v {
        None | Some(Value::Null) => Ok(String::new()),
        Some(Value::String(s)) => Ok(s.clone()),
        Some(Value::Array(blocks)) => {
            let mut parts: Vec<&str> = Vec::new();
            for (i, b) in blocks.iter().enumerate() {
                let Value::Object(b) = b else {
                    return Err(bad(
                        field,
                        format!("'{field}[{i}]' must be an object, got {}", type_name(b)),
                    ));
                };
                match b.get("text") {
                    // Claude Code's internal system parts are not part of the prompt (ds4).
                    Some(Value::String(t))
                        if drop_anthropic_internal && t.starts_with("x-anthropic-") => {}
                    Some(Value::String(t)) => parts.push(t),
                    Some(other) => {
                        return Err(bad(
                            field,
                            format!(
                                "'{field}[{i}].text' must be a string, got {}",
                                type_name(other)
                            ),
                        ))
                    }
                    None => {}
                }
            }
            Ok(parts.join(if drop_anthropic_internal { "\n\n" } else { "" }))
        }
        Some(other) => Err(bad(
            field,
            format!(
                "'{field}' must be a string or an array of blocks, got {}",
                type_name(other)
            ),
        )),
    }
}

/// `</tool_result>` inside a result would end it early; ds4 escapes only that.
fn escape_tool_result(s: &str) -> String {
    s.replace("</tool_result>", "&lt;/tool_result>")
}

/// Parses `system` and `messages`.
pub fn parse_messages(f: &Fields<'_>) -> Result<Vec<Message>, ApiError> {
    let mut out = Vec::new();
    let system = blocks_text("system", f.get("system"), true)?;
    if !system.is_empty() {
        let mut m = new_message(Role::System);
        m.content = system;
        out.push(m);
    }
    let Some(list) = f.array("messages")? else {
        return Err(bad("messages", "'messages' is required".into()));
    };
    for (i, m) in list.iter().enumerate() {
        let field = format!("messages[{i}]");
        let Value::Object(m) = m else {
            return Err(bad(
                &field,
                format!("'{field}' must be an object, got {}", type_name(m)),
            ));
        };
        let role = match m.get("role") {
            Some(Value::String(r)) if r == "user" => Role::User,
            Some(Value::String(r)) if r == "assistant" => Role::Assistant,
            Some(Value::String(r)) => {
                return Err(bad(
                    &field,
                    format!("unknown role '{r}' in '{field}' (expected user or assistant)"),
                ))
            }
            Some(other) => {
                return Err(bad(
                    &field,
                    format!("'{field}.role' must be a string, got {}", type_name(other)),
                ))
            }
            None => return Err(bad(&field, format!("'{field}.role' is required"))),
        };
        let mut msg = new_message(role);
        match m.get("content") {
            Some(Value::String(s)) => msg.content = s.clone(),
            Some(Value::Array(blocks)) => {
                for (j, b) in blocks.iter().enumerate() {
                    let bf = format!("{field}.content[{j}]");
                    let Value::Object(b) = b else {
                        return Err(bad(
                            &bf,
                            format!("'{bf}' must be an object, got {}", type_name(b)),
                        ));
                    };
                    add_block(&mut msg, &bf, b)?;
                }
            }
            None | Some(Value::Null) => {}
            Some(other) => {
                return Err(bad(
                    &field,
                    format!(
                        "'{field}.content' must be a string or an array, got {}",
                        type_name(other)
                    ),
                ))
            }
        }
        out.push(msg);
    }
    Ok(out)
}

fn add_block(msg: &mut Message, bf: &str, b: &Map<String, Value>) -> Result<(), ApiError> {
    let kind = match b.get("type") {
        Some(Value::String(t)) => t.as_str(),
        _ => return Err(bad(bf, format!("'{bf}.type' must be a string"))),
    };
    let text_of = |key: &str| -> Result<String, ApiError> {
        match b.get(key) {
            Some(Value::String(s)) => Ok(s.clone()),
            Some(other) => Err(bad(
                bf,
                format!("'{bf}.{key}' must be a string, got {}", type_name(other)),
            )),
            None => Err(bad(bf, format!("'{bf}.{key}' is required"))),
        }
    };
    match (msg.role, kind) {
        (_, "text") => msg.content.push_str(&text_of("text")?),
        (Role::Assistant, "thinking") => {
            msg.reasoning
                .get_or_insert_with(String::new)
                .push_str(&text_of("thinking")?);
        }
        (Role::Assistant, "redacted_thinking") => {}
        (Role::Assistant, "tool_use") => {
            let id = text_of("id")?;
            let name = text_of("name")?;
            let input = match b.get("input") {
                Some(v @ Value::Object(_)) => v.clone(),
                None | Some(Value::Null) => Value::Object(Map::new()),
                Some(other) => {
                    return Err(bad(
                        bf,
                        format!("'{bf}.input' must be an object, got {}", type_name(other)),
                    ))
                }
            };
            msg.tool_calls.push(ToolCall {
                id: Some(id),
                name,
                arguments: input,
                raw_dsml: None,
            });
        }
        (Role::User, "tool_result") => {
            let result = blocks_text(&format!("{bf}.content"), b.get("content"), false)?;
            msg.content.push_str("<tool_result>");
            msg.content.push_str(&escape_tool_result(&result));
            msg.content.push_str("</tool_result>");
        }
        // Media is not understood by this text model; it is left out of the prompt.
        (_, "image" | "document") => {}
        (role, other) => {
            let who = if role == Role::User {
                "user"
            } else {
                "assistant"
            };
            return Err(bad(
                bf,
                format!("content block type '{other}' is not valid in a {who} message"),
            ));
        }
    }
    Ok(())
}

fn stop_reason(f: FinishReason) -> &'static str {
    match f {
        FinishReason::Stop | FinishReason::Error => "end_turn",
        FinishReason::Length => "max_tokens",
        FinishReason::ToolCalls => "tool_use",
    }
}

fn usage_json(u: &Usage) -> Value {
    json!({
        "input_tokens": u.prompt_tokens - u.cached_tokens,
        "output_tokens": u.completion_tokens,
        "cache_read_input_tokens": u.cached_tokens,
        "cache_creation_input_tokens": 0,
    })
}

pub async fn messages(State(state): State<AppState>, body: Body) -> Response {
    respond(handle(state, body).await)
}

/// The prompt parts of a Messages request: history (with exact tool replay), tools, thinking.
fn prompt_of(state: &AppState, bytes: &[u8], f: &Fields<'_>) -> Result<ChatPrompt, ApiError> {
    let messages = parse_messages(f)?;
    let tool_choice_none = matches!(
        f.object("tool_choice")?.and_then(|o| o.get("type")),
        Some(Value::String(t)) if t == "none"
    );
    let tools: Vec<String> = if tool_choice_none {
        Vec::new()
    } else {
        raw_tools(bytes, FLAVOR)?
            .into_iter()
            .map(|r| r.get().to_string())
            .collect()
    };
    if let Some(i) = tools.iter().position(|t| !t.trim_start().starts_with('{')) {
        return Err(bad("tools", format!("'tools[{i}]' must be an object")));
    }
    let effort = match f.object("output_config")? {
        Some(o) => Fields::new(o, FLAVOR)
            .str("effort")?
            .map(|e| ("output_config.effort", e)),
        None => None,
    };
    let think = resolve_think(f, effort)?;
    Ok(chat_prompt(state, messages, tools, think))
}

/// POST /v1/messages/count_tokens: the prompt's token count as this server renders it.
pub async fn count_tokens(State(state): State<AppState>, body: Body) -> Response {
    let result = async {
        let (bytes, obj) = read_json_object(body, state.config.body_limit, FLAVOR).await?;
        let mut prompt = prompt_of(&state, &bytes, &Fields::new(&obj, FLAVOR))?;
        let text = render(&mut prompt, &state);
        let codec = state.engine.codec().clone();
        let n = tokio::task::spawn_blocking(move || codec.encode(&text).len())
            .await
            .map_err(|e| {
                ApiError::new(
                    FLAVOR,
                    axum::http::StatusCode::INTERNAL_SERVER_ERROR,
                    e.to_string(),
                )
            })?;
        Ok(axum::Json(json!({ "input_tokens": n })).into_response())
    }
    .await;
    respond(result)
}

async fn handle(state: AppState, body: Body) -> Result<Response, ApiError> {
    let (bytes, obj) = read_json_object(body, state.config.body_limit, FLAVOR).await?;
    let f = Fields::new(&obj, FLAVOR);
    let prompt = prompt_of(&state, &bytes, &f)?;
    let sampling = effective_sampling(f.sampling()?, prompt.think);
    let max_tokens = f.u64("max_tokens")?;
    let stop = f.stop("stop_sequences")?;
    let stream = f.bool("stream")?.unwrap_or(false);
    let model = model_name(&f, &state)?;
    let id = format!("msg_{}", random_hex32());
    let spec = JobSpec {
        sampling,
        max_tokens,
        stop,
        ..JobSpec::chat(&state, FLAVOR, id.clone(), prompt, ToolIdStyle::Toolu)
    };
    let enc = stream.then(|| MessageStream::new(id.clone(), model.clone()));
    run_job(&state, spec, enc, |c| message_object(&id, &model, c)).await
}

/// The whole answer as a `message` object.
fn message_object(id: &str, model: &str, c: Collected) -> Value {
    let mut content = Vec::new();
    if !c.reasoning.is_empty() {
        content.push(json!({"type": "thinking", "thinking": c.reasoning, "signature": id}));
    }
    if !c.content.is_empty() || c.tool_calls.is_empty() {
        content.push(json!({"type": "text", "text": c.content}));
    }
    for t in &c.tool_calls {
        content.push(json!({"type": "tool_use", "id": t.id, "name": t.name, "input": t.arguments}));
    }
    let finish = c.finish.unwrap_or(FinishReason::Stop);
    json!({
        "id": id, "type": "message", "role": "assistant", "model": model, "content": content,
        "stop_reason": stop_reason(finish), "stop_sequence": null, "usage": usage_json(&c.usage),
    })
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Block {
    Thinking,
    Text,
    Tool(usize),
}

/// The Anthropic event stream.
pub struct MessageStream {
    id: String,
    model: String,
    /// Index of the next content block.
    next_index: usize,
    open: Option<Block>,
    finished: bool,
}

impl MessageStream {
    pub fn new(id: String, model: String) -> Self {
        MessageStream {
            id,
            model,
            next_index: 0,
            open: None,
            finished: false,
        }
    }

    fn close_open(&mut self) -> String {
        let Some(block) = self.open.take() else {
            return String::new();
        };
        let index = self.next_index - 1;
        let mut out = String::new();
        if block == Block::Thinking {
            out += &named(
                "content_block_delta",
                &json!({"type": "content_block_delta", "index": index,
                        "delta": {"type": "signature_delta", "signature": self.id}}),
            );
        }
        out + &named(
            "content_block_stop",
            &json!({"type": "content_block_stop", "index": index}),
        )
    }

    /// Makes `want` the open block (closing another), returning the frames and its index.
    fn ensure(&mut self, want: Block, start: Value) -> (String, usize) {
        if self.open == Some(want) {
            return (String::new(), self.next_index - 1);
        }
        let mut out = self.close_open();
        let index = self.next_index;
        self.next_index += 1;
        self.open = Some(want);
        out += &named(
            "content_block_start",
            &json!({"type": "content_block_start", "index": index, "content_block": start}),
        );
        (out, index)
    }

    fn delta(index: usize, delta: Value) -> String {
        named(
            "content_block_delta",
            &json!({"type": "content_block_delta", "index": index, "delta": delta}),
        )
    }
}

impl SseEncoder for MessageStream {
    fn event(&mut self, ev: GenEvent) -> String {
        match ev {
            GenEvent::Started {
                prompt_tokens,
                cached_tokens,
            } => named(
                "message_start",
                &json!({"type": "message_start", "message": {
                    "id": self.id, "type": "message", "role": "assistant", "model": self.model,
                    "content": [], "stop_reason": null, "stop_sequence": null,
                    "usage": usage_json(&Usage { prompt_tokens, cached_tokens, ..Usage::default() }),
                }}),
            ),
            GenEvent::Reasoning(t) => {
                let (out, index) =
                    self.ensure(Block::Thinking, json!({"type": "thinking", "thinking": ""}));
                out + &Self::delta(index, json!({"type": "thinking_delta", "thinking": t}))
            }
            GenEvent::Content(t) => {
                let (out, index) = self.ensure(Block::Text, json!({"type": "text", "text": ""}));
                out + &Self::delta(index, json!({"type": "text_delta", "text": t}))
            }
            GenEvent::ToolCallStart { index, id, name } => {
                self.ensure(
                    Block::Tool(index),
                    json!({"type": "tool_use", "id": id, "name": name, "input": {}}),
                )
                .0
            }
            GenEvent::ToolCallArgs { index, fragment } => {
                let (out, bi) = self.ensure(
                    Block::Tool(index),
                    json!({"type": "tool_use", "id": "", "name": "", "input": {}}),
                );
                out + &Self::delta(
                    bi,
                    json!({"type": "input_json_delta", "partial_json": fragment}),
                )
            }
            GenEvent::ToolCallEnd { .. } => self.close_open(),
            GenEvent::Done { finish, usage } => {
                self.finished = true;
                let mut out = self.close_open();
                out += &named(
                    "message_delta",
                    &json!({"type": "message_delta",
                            "delta": {"stop_reason": stop_reason(finish), "stop_sequence": null},
                            "usage": usage_json(&usage)}),
                );
                out + &named("message_stop", &json!({"type": "message_stop"}))
            }
            GenEvent::Failed(e) => self.fail(&e),
        }
    }

    fn finished(&self) -> bool {
        self.finished
    }

    fn fail(&mut self, err: &EngineError) -> String {
        self.finished = true;
        named("error", &engine_error(FLAVOR, err).body())
    }
}
