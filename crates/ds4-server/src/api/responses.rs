//! POST /v1/responses (OpenAI Responses): input items in, a `response` object or the
//! response.created … response.completed event lifecycle out.

use axum::body::Body;
use axum::extract::State;
use axum::response::Response;
use ds4_text::chat::{Message, Role, ToolCall};
use serde_json::{json, Map, Value};

use super::common::{
    arguments_value, chat_prompt, content_text, effective_sampling, model_name, raw_tools,
    read_json_object, resolve_think, respond, run_job, Collected, JobSpec,
};
use super::errors::{ApiError, Flavor};
use super::fields::{type_name, Fields};
use super::sse::{named, SseEncoder};
use crate::ids::{random_hex32, unix_now};
use crate::job::{EngineError, FinishReason, GenEvent, ToolCallOut, ToolIdStyle, Usage};
use crate::server::AppState;

const FLAVOR: Flavor = Flavor::OpenAi;

fn new_message(role: Role, content: String) -> Message {
    Message {
        role,
        content,
        reasoning: None,
        tool_calls: Vec::new(),
        tool_call_id: None,
    }
}

fn bad(field: &str, what: String) -> ApiError {
    ApiError::field(FLAVOR, field, what)
}

fn str_member<'a>(o: &'a Map<String, Value>, field: &str, key: &str) -> Result<&'a str, ApiError> {
    match o.get(key) {
        Some(Value::String(s)) => Ok(s),
        Some(other) => Err(bad(
            field,
            format!("'{field}.{key}' must be a string, got {}", type_name(other)),
        )),
        None => Err(bad(field, format!("'{field}.{key}' is required"))),
    }
}

/// Parses `instructions` and `input`.
pub fn parse_input(f: &Fields<'_>) -> Result<Vec<Message>, ApiError> {
    let mut out = Vec::new();
    if let Some(instr) = f.str("instructions")? {
        out.push(new_message(Role::System, instr.to_string()));
    }
    let items = match f.get("input") {
        Some(Value::String(s)) => {
            out.push(new_message(Role::User, s.clone()));
            return Ok(out);
        }
        Some(Value::Array(items)) => items,
        Some(other) => return Err(f.wrong_type("input", "a string or an array of items", other)),
        None => return Err(bad("input", "'input' is required".into())),
    };
    let mut pending_reasoning: Option<String> = None;
    for (i, item) in items.iter().enumerate() {
        let field = format!("input[{i}]");
        let Value::Object(o) = item else {
            return Err(bad(
                &field,
                format!("'{field}' must be an object, got {}", type_name(item)),
            ));
        };
        let kind = match o.get("type") {
            Some(Value::String(t)) => t.as_str(),
            None if o.contains_key("role") => "message",
            _ => return Err(bad(&field, format!("'{field}.type' must be a string"))),
        };
        match kind {
            "message" => {
                let role = match str_member(o, &field, "role")? {
                    "system" | "developer" => Role::System,
                    "user" => Role::User,
                    "assistant" => Role::Assistant,
                    other => {
                        return Err(bad(
                            &field,
                            format!("unknown role '{other}' in '{field}' (expected system, developer, user or assistant)"),
                        ))
                    }
                };
                let mut m = new_message(
                    role,
                    content_text(FLAVOR, &format!("{field}.content"), o.get("content"))?,
                );
                if role == Role::Assistant {
                    m.reasoning = pending_reasoning.take();
                }
                out.push(m);
            }
            "reasoning" => {
                let mut text = String::new();
                for key in ["content", "summary"] {
                    if let Some(Value::Array(parts)) = o.get(key) {
                        text = content_text(
                            FLAVOR,
                            &format!("{field}.{key}"),
                            Some(&Value::Array(parts.clone())),
                        )?;
                        if !text.is_empty() {
                            break;
                        }
                    }
                }
                pending_reasoning
                    .get_or_insert_with(String::new)
                    .push_str(&text);
            }
            "function_call" | "custom_tool_call" => {
                let call_id = str_member(o, &field, "call_id")?.to_string();
                let name = str_member(o, &field, "name")?.to_string();
                let arguments = if kind == "function_call" {
                    arguments_value(str_member(o, &field, "arguments")?)
                } else {
                    Value::String(str_member(o, &field, "input")?.to_string())
                };
                let call = ToolCall {
                    id: Some(call_id),
                    name,
                    arguments,
                    raw_dsml: None,
                };
                // Calls right after an assistant message (or after other calls) belong to it.
                match out.last_mut() {
                    Some(m) if m.role == Role::Assistant => m.tool_calls.push(call),
                    _ => {
                        let mut m = new_message(Role::Assistant, String::new());
                        m.reasoning = pending_reasoning.take();
                        m.tool_calls.push(call);
                        out.push(m);
                    }
                }
            }
            "function_call_output" | "custom_tool_call_output" => {
                let call_id = str_member(o, &field, "call_id")?.to_string();
                let output = content_text(FLAVOR, &format!("{field}.output"), o.get("output"))?;
                let mut m = new_message(Role::Tool, output);
                m.tool_call_id = Some(call_id);
                out.push(m);
            }
            other => {
                return Err(bad(
                    &field,
                    format!("input item type '{other}' is not supported"),
                ))
            }
        }
    }
    Ok(out)
}

fn usage_json(u: &Usage) -> Value {
    json!({
        "input_tokens": u.prompt_tokens,
        "input_tokens_details": {"cached_tokens": u.cached_tokens},
        "output_tokens": u.completion_tokens,
        "output_tokens_details": {"reasoning_tokens": u.reasoning_tokens},
        "total_tokens": u.prompt_tokens + u.completion_tokens,
    })
}

/// The fixed part of a response object.
#[derive(Clone)]
struct ResponseHead {
    id: String,
    model: String,
    created: u64,
    effort: Option<String>,
    summary: Option<String>,
}

impl ResponseHead {
    fn object(
        &self,
        status: &str,
        output: Vec<Value>,
        usage: Option<Value>,
        finish: Option<FinishReason>,
    ) -> Value {
        let incomplete = match finish {
            Some(FinishReason::Length) => json!({"reason": "max_output_tokens"}),
            _ => Value::Null,
        };
        json!({
            "id": self.id, "object": "response", "created_at": self.created, "status": status,
            "model": self.model, "output": output, "usage": usage, "error": null,
            "incomplete_details": incomplete, "instructions": null, "metadata": {},
            "parallel_tool_calls": true, "tool_choice": "auto", "tools": [],
            "reasoning": {"effort": self.effort, "summary": self.summary},
            "text": {"format": {"type": "text"}},
        })
    }

    /// The whole answer as a `response` object.
    fn whole(&self, c: Collected) -> Value {
        let finish = c.finish.unwrap_or(FinishReason::Stop);
        let mut output = Vec::new();
        if self.summary.is_some() && !c.reasoning.is_empty() {
            output.push(reasoning_item(
                &format!("rs_{}", random_hex32()),
                &c.reasoning,
            ));
        }
        if !c.content.is_empty() || c.tool_calls.is_empty() {
            output.push(message_item(
                &format!("msg_{}", random_hex32()),
                &c.content,
                "completed",
            ));
        }
        for t in &c.tool_calls {
            output.push(call_item(t, &t.arguments.to_string(), "completed"));
        }
        self.object(
            status_of(finish),
            output,
            Some(usage_json(&c.usage)),
            Some(finish),
        )
    }
}

fn status_of(finish: FinishReason) -> &'static str {
    match finish {
        FinishReason::Length => "incomplete",
        _ => "completed",
    }
}

fn message_item(id: &str, text: &str, status: &str) -> Value {
    json!({"id": id, "type": "message", "status": status, "role": "assistant",
           "content": [{"type": "output_text", "text": text, "annotations": []}]})
}

fn reasoning_item(id: &str, text: &str) -> Value {
    json!({"id": id, "type": "reasoning", "summary": [{"type": "summary_text", "text": text}]})
}

fn call_item(call: &ToolCallOut, arguments: &str, status: &str) -> Value {
    json!({"id": format!("fc_{}", call.id.trim_start_matches("call_")), "type": "function_call", "status": status,
           "call_id": call.id, "name": call.name, "arguments": arguments})
}

pub async fn responses(State(state): State<AppState>, body: Body) -> Response {
    respond(handle(state, body).await)
}

async fn handle(state: AppState, body: Body) -> Result<Response, ApiError> {
    let (bytes, obj) = read_json_object(body, state.config.body_limit, FLAVOR).await?;
    let f = Fields::new(&obj, FLAVOR);
    for key in ["previous_response_id", "conversation"] {
        if f.get(key).is_some() {
            return Err(bad(key, format!("'{key}' is not supported: this server keeps no stored responses; send the whole input")));
        }
    }
    let messages = parse_input(&f)?;
    let tools: Vec<String> = if f.str("tool_choice").ok().flatten() == Some("none") {
        Vec::new()
    } else {
        let mut out = Vec::new();
        for (i, raw) in raw_tools(&bytes, FLAVOR)?.into_iter().enumerate() {
            let v: Value = serde_json::from_str(raw.get()).unwrap_or(Value::Null);
            match v.get("type").and_then(Value::as_str) {
                Some("function") | Some("custom") => out.push(raw.get().to_string()),
                Some(_) => {} // hosted tools (web search, …) do not exist here
                None => {
                    return Err(bad(
                        "tools",
                        format!("'tools[{i}]' must be an object with a 'type'"),
                    ))
                }
            }
        }
        out
    };
    let (effort, summary) = match f.object("reasoning")? {
        Some(o) => {
            let rf = Fields::new(o, FLAVOR);
            (
                rf.str("effort")?.map(str::to_string),
                rf.str("summary")?.map(str::to_string),
            )
        }
        None => (None, None),
    };
    let think = resolve_think(&f, effort.as_deref().map(|e| ("reasoning.effort", e)))?;
    let sampling = effective_sampling(f.sampling()?, think);
    let max_tokens = match f.u64("max_output_tokens")? {
        Some(n) => Some(n),
        None => f.u64("max_tokens")?,
    };
    let stream = f.bool("stream")?.unwrap_or(false);
    let model = model_name(&f, &state)?;
    let prompt = chat_prompt(&state, messages, tools, think);
    let head = ResponseHead {
        id: format!("resp_{}", random_hex32()),
        model,
        created: unix_now(),
        effort,
        summary,
    };
    let spec = JobSpec {
        sampling,
        max_tokens,
        stop: f.stop("stop")?,
        ..JobSpec::chat(&state, FLAVOR, head.id.clone(), prompt, ToolIdStyle::Call)
    };
    let enc = stream.then(|| {
        ResponseStream::new(
            head.id.clone(),
            head.model.clone(),
            head.effort.clone(),
            head.summary.clone(),
        )
    });
    run_job(&state, spec, enc, |c| head.whole(c)).await
}

/// Which output item is open in the stream.
enum OpenItem {
    None,
    Reasoning {
        id: String,
        index: usize,
        text: String,
    },
    Message {
        id: String,
        index: usize,
        text: String,
    },
    Call {
        index: usize,
        call_id: String,
        name: String,
        args: String,
    },
}

/// The Responses event stream.
pub struct ResponseStream {
    head: ResponseHead,
    seq: u64,
    output: Vec<Value>,
    open: OpenItem,
    finished: bool,
}

impl ResponseStream {
    /// A stream for response `id`; reasoning items appear only when a `summary` was asked for.
    pub fn new(id: String, model: String, effort: Option<String>, summary: Option<String>) -> Self {
        let head = ResponseHead {
            id,
            model,
            created: unix_now(),
            effort,
            summary,
        };
        ResponseStream {
            head,
            seq: 0,
            output: Vec::new(),
            open: OpenItem::None,
            finished: false,
        }
    }

    fn ev(&mut self, kind: &str, mut body: Value) -> String {
        body["type"] = json!(kind);
        body["sequence_number"] = json!(self.seq);
        self.seq += 1;
        named(kind, &body)
    }

    fn close(&mut self) -> String {
        match std::mem::replace(&mut self.open, OpenItem::None) {
            OpenItem::None => String::new(),
            OpenItem::Reasoning { id, index, text } => {
                let part = json!({"type": "summary_text", "text": text});
                let item = reasoning_item(&id, &text);
                let mut out = self.ev(
                    "response.reasoning_summary_text.done",
                    json!({"item_id": id, "output_index": index, "summary_index": 0, "text": text}),
                );
                out += &self.ev(
                    "response.reasoning_summary_part.done",
                    json!({"item_id": id, "output_index": index, "summary_index": 0, "part": part}),
                );
                out += &self.ev(
                    "response.output_item.done",
                    json!({"output_index": index, "item": item}),
                );
                self.output.push(item);
                out
            }
            OpenItem::Message { id, index, text } => {
                let part = json!({"type": "output_text", "text": text, "annotations": []});
                let item = message_item(&id, &text, "completed");
                let mut out = self.ev(
                    "response.output_text.done",
                    json!({"item_id": id, "output_index": index, "content_index": 0, "text": text}),
                );
                out += &self.ev(
                    "response.content_part.done",
                    json!({"item_id": id, "output_index": index, "content_index": 0, "part": part}),
                );
                out += &self.ev(
                    "response.output_item.done",
                    json!({"output_index": index, "item": item}),
                );
                self.output.push(item);
                out
            }
            OpenItem::Call {
                index,
                call_id,
                name,
                args,
            } => {
                let call = ToolCallOut {
                    id: call_id,
                    name,
                    arguments: Value::Null,
                };
                let item = call_item(&call, &args, "completed");
                let item_id = item["id"].clone();
                let mut out = self.ev(
                    "response.function_call_arguments.done",
                    json!({"item_id": item_id, "output_index": index, "arguments": args}),
                );
                out += &self.ev(
                    "response.output_item.done",
                    json!({"output_index": index, "item": item}),
                );
                self.output.push(item);
                out
            }
        }
    }

    fn next_index(&self) -> usize {
        self.output.len()
    }
}

impl SseEncoder for ResponseStream {
    fn event(&mut self, ev: GenEvent) -> String {
        match ev {
            GenEvent::Started { .. } => {
                let r = self.head.object("in_progress", Vec::new(), None, None);
                let out = self.ev("response.created", json!({"response": r}));
                out + &self.ev("response.in_progress", json!({"response": r}))
            }
            GenEvent::Reasoning(t) => {
                if self.head.summary.is_none() {
                    return String::new();
                }
                let mut out = String::new();
                if !matches!(self.open, OpenItem::Reasoning { .. }) {
                    out += &self.close();
                    let id = format!("rs_{}", random_hex32());
                    let index = self.next_index();
                    out += &self.ev(
                        "response.output_item.added",
                        json!({"output_index": index, "item": {"id": id, "type": "reasoning", "summary": []}}),
                    );
                    out += &self.ev(
                        "response.reasoning_summary_part.added",
                        json!({"item_id": id, "output_index": index, "summary_index": 0,
                               "part": {"type": "summary_text", "text": ""}}),
                    );
                    self.open = OpenItem::Reasoning {
                        id,
                        index,
                        text: String::new(),
                    };
                }
                let (id, index) = match &mut self.open {
                    OpenItem::Reasoning { id, index, text } => {
                        text.push_str(&t);
                        (id.clone(), *index)
                    }
                    _ => return out,
                };
                out + &self.ev(
                    "response.reasoning_summary_text.delta",
                    json!({"item_id": id, "output_index": index, "summary_index": 0, "delta": t}),
                )
            }
            GenEvent::Content(t) => {
                let mut out = String::new();
                if !matches!(self.open, OpenItem::Message { .. }) {
                    out += &self.close();
                    let id = format!("msg_{}", random_hex32());
                    let index = self.next_index();
                    out += &self.ev(
                        "response.output_item.added",
                        json!({"output_index": index, "item": {"id": id, "type": "message",
                               "status": "in_progress", "role": "assistant", "content": []}}),
                    );
                    out += &self.ev(
                        "response.content_part.added",
                        json!({"item_id": id, "output_index": index, "content_index": 0,
                               "part": {"type": "output_text", "text": "", "annotations": []}}),
                    );
                    self.open = OpenItem::Message {
                        id,
                        index,
                        text: String::new(),
                    };
                }
                let (id, index) = match &mut self.open {
                    OpenItem::Message { id, index, text } => {
                        text.push_str(&t);
                        (id.clone(), *index)
                    }
                    _ => return out,
                };
                out + &self.ev(
                    "response.output_text.delta",
                    json!({"item_id": id, "output_index": index, "content_index": 0, "delta": t}),
                )
            }
            GenEvent::ToolCallStart { id, name, .. } => {
                let mut out = self.close();
                let index = self.next_index();
                let call = ToolCallOut {
                    id: id.clone(),
                    name: name.clone(),
                    arguments: Value::Null,
                };
                out += &self.ev(
                    "response.output_item.added",
                    json!({"output_index": index, "item": call_item(&call, "", "in_progress")}),
                );
                self.open = OpenItem::Call {
                    index,
                    call_id: id,
                    name,
                    args: String::new(),
                };
                out
            }
            GenEvent::ToolCallArgs { fragment, .. } => {
                let (item_id, index) = match &mut self.open {
                    OpenItem::Call {
                        index,
                        call_id,
                        args,
                        ..
                    } => {
                        args.push_str(&fragment);
                        (
                            format!("fc_{}", call_id.trim_start_matches("call_")),
                            *index,
                        )
                    }
                    _ => return String::new(),
                };
                self.ev(
                    "response.function_call_arguments.delta",
                    json!({"item_id": item_id, "output_index": index, "delta": fragment}),
                )
            }
            GenEvent::ToolCallEnd { call, .. } => {
                // The arguments as sampled when they form valid JSON, else the parsed object.
                if let OpenItem::Call { args, .. } = &mut self.open {
                    if serde_json::from_str::<Value>(args).is_err() {
                        *args = call.arguments.to_string();
                    }
                }
                self.close()
            }
            GenEvent::Done { finish, usage } => {
                self.finished = true;
                let mut out = self.close();
                let status = status_of(finish);
                let r = self.head.object(
                    status,
                    self.output.clone(),
                    Some(usage_json(&usage)),
                    Some(finish),
                );
                let kind = if status == "incomplete" {
                    "response.incomplete"
                } else {
                    "response.completed"
                };
                out += &self.ev(kind, json!({"response": r}));
                out
            }
            GenEvent::Failed(e) => self.fail(&e),
        }
    }

    fn finished(&self) -> bool {
        self.finished
    }

    fn fail(&mut self, err: &EngineError) -> String {
        self.finished = true;
        let mut r = self.head.object("failed", self.output.clone(), None, None);
        r["error"] = json!({"code": "server_error", "message": err.to_string()});
        self.ev("response.failed", json!({"response": r}))
    }
}
