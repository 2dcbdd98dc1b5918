//! Streaming parser of model output: splits reasoning, content and DSML tool calls, emitting
//! each piece as soon as it is certain (ds4-spec.md §4, "Parsing model output").
//!
//! Rules (as ds4's parse_generated_message_ex):
//! - thinking mode: a leading `<think>` is dropped; text up to the first `</think>` is reasoning
//!   (no `</think>` at all: everything is reasoning); tool calls can only follow it;
//! - the tool block starts at `<｜DSML｜tool_calls>`, `<DSML｜tool_calls>` or `<tool_calls>`
//!   (the first that occurs); the content before it loses its trailing whitespace; the block, from
//!   a directly preceding "\n\n", is kept byte-exact as `raw_dsml`;
//! - inside: invokes with a `name`, parameters with a `name` and an optional `string` attribute
//!   (missing → "true"); string values are entity-decoded, other values parsed as JSON (empty →
//!   null); an untyped parameter whose body is more parameters is a JSON object;
//! - anything that does not fit makes the block plain text (`malformed`): no text is lost.
//!
//! Where this differs from ds4, deliberately: without thinking, `</think>` is ordinary content;
//! text after the closing `</｜DSML｜tool_calls>` is dropped (generation stops there); a
//! parameter name repeated within one object makes the block malformed, so that the streamed
//! argument text is always the exact JSON of the final arguments; a typed value that is not valid
//! JSON becomes a string (ds4 would pass invalid JSON to the client).
//!
//! Streaming guarantees: the events depend only on the text, not on how it was split into
//! chunks (merging adjacent deltas of one kind gives the same sequence); the Reasoning/Content
//! deltas concatenate to the final message's reasoning/content; for each call the ToolCallArgs
//! fragments concatenate to `serde_json::to_string(&call.arguments)`.

use serde_json::{Map, Value};

use super::{unescape_entities, ENTITIES};
use crate::chat::ToolCall;

const THINK_START: &str = "<think>";
const THINK_END: &str = "</think>";

/// One piece of streamed output.
#[derive(Clone, Debug, PartialEq)]
pub enum StreamEvent {
    Reasoning(String),
    Content(String),
    /// A call's name is known.
    ToolCallStart {
        index: usize,
        name: String,
    },
    /// More of the call's arguments, as JSON text.
    ToolCallArgs {
        index: usize,
        fragment: String,
    },
    /// The block closed and this call is final (emitted for every call of the block at its end).
    ToolCallEnd {
        index: usize,
        call: ToolCall,
    },
}

/// The whole parsed assistant message.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ParsedMessage {
    /// `Some` in thinking mode.
    pub reasoning: Option<String>,
    pub content: String,
    pub tool_calls: Vec<ToolCall>,
    /// The sampled tool block, from its leading "\n\n", when one closed.
    pub raw_dsml: Option<String>,
    /// A tool block started but did not parse (or never closed); its text is in `content`.
    pub malformed: bool,
}

/// The three spellings of the block's tags.
struct Tags {
    calls_start: &'static str,
    calls_end: &'static str,
    invoke_start: &'static str,
    invoke_end: &'static str,
    param_start: &'static str,
    param_end: &'static str,
}

const STYLES: [Tags; 3] = [
    Tags {
        calls_start: "<｜DSML｜tool_calls>",
        calls_end: "</｜DSML｜tool_calls>",
        invoke_start: "<｜DSML｜invoke",
        invoke_end: "</｜DSML｜invoke>",
        param_start: "<｜DSML｜parameter",
        param_end: "</｜DSML｜parameter>",
    },
    Tags {
        calls_start: "<DSML｜tool_calls>",
        calls_end: "</DSML｜tool_calls>",
        invoke_start: "<DSML｜invoke",
        invoke_end: "</DSML｜invoke>",
        param_start: "<DSML｜parameter",
        param_end: "</DSML｜parameter>",
    },
    Tags {
        calls_start: "<tool_calls>",
        calls_end: "</tool_calls>",
        invoke_start: "<invoke",
        invoke_end: "</invoke>",
        param_start: "<parameter",
        param_end: "</parameter>",
    },
];

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Phase {
    /// Thinking mode, at the very start: a `<think>` there is dropped.
    ThinkStart,
    Reasoning,
    /// Visible text; with tools active, watching for a block start.
    Content,
    /// Inside a tool block.
    Block,
    /// After a malformed block: everything is content.
    Plain,
    /// After the block closed: the rest is ignored.
    Done,
}

/// Where the block parser is.
#[derive(Clone, Debug)]
enum BlockState {
    /// Expecting an invoke or the end of the block.
    BetweenInvokes,
    /// Expecting a parameter or the end of the invoke.
    BetweenParams,
    /// Untyped parameter: string or nested parameters, decided by the body's first non-space.
    UntypedBody { key: String, start: usize },
    /// A string value streaming from `start`; `emitted` marks what was already sent.
    StringValue {
        key: String,
        start: usize,
        emitted: usize,
    },
    /// A typed (JSON) value, parsed once its closing tag arrives.
    TypedValue { key: String, start: usize },
    /// An untyped parameter holding leaf parameters.
    Nested {
        key: String,
        members: Map<String, Value>,
    },
}

/// Incremental parser; see the module documentation.
pub struct DsmlStreamParser {
    tools_active: bool,
    thinking: bool,
    text: String,
    /// Bytes of `text` already decided.
    pos: usize,
    phase: Phase,
    reasoning: String,
    content: String,
    // Block state.
    style: usize,
    block_start: usize,
    raw_start: usize,
    state: BlockState,
    calls: Vec<ToolCall>,
    current: Option<(String, Map<String, Value>)>,
    /// The open object (call arguments or nested) has written a member already.
    wrote_member: bool,
    raw_dsml: Option<String>,
    malformed: bool,
    flushed: bool,
}

enum Step {
    Progress,
    Wait,
}

/// Whether `rest` starts with `pat`, might once more text arrives, or cannot.
#[derive(PartialEq)]
enum Prefix {
    Yes,
    Maybe,
    No,
}

fn prefix(rest: &str, pat: &str) -> Prefix {
    if rest.starts_with(pat) {
        Prefix::Yes
    } else if pat.starts_with(rest) {
        Prefix::Maybe
    } else {
        Prefix::No
    }
}

/// C `isspace` on ASCII: space, \t, \n, \v, \f, \r.
fn is_space(b: u8) -> bool {
    matches!(b, b' ' | b'\t' | b'\n' | 0x0b | 0x0c | b'\r')
}

fn skip_space(text: &str, mut at: usize) -> usize {
    while at < text.len() && is_space(text.as_bytes()[at]) {
        at += 1;
    }
    at
}

/// Length of the longest suffix of `text` that is a proper prefix of one of `pats`.
fn partial_suffix(text: &str, pats: &[&str]) -> usize {
    let mut best = 0;
    for pat in pats {
        for len in (1..pat.len().min(text.len() + 1)).rev() {
            if len > best && pat.is_char_boundary(len) && text.ends_with(&pat[..len]) {
                best = len;
                break;
            }
        }
    }
    best
}

/// An attribute of a tag (`name="…"` anywhere in it), entity-decoded.
fn attr(tag: &str, name: &str) -> Option<String> {
    let pat = format!("{name}=\"");
    let at = tag.find(&pat)? + pat.len();
    let len = tag[at..].find('"')?;
    Some(unescape_entities(&tag[at..at + len]))
}

/// JSON text of a string without its quotes (escaping is per character, so pieces concatenate).
fn json_string_body(s: &str) -> String {
    let quoted = Value::String(s.to_string()).to_string();
    quoted[1..quoted.len() - 1].to_string()
}

/// A typed value: JSON (empty → null); text that is not JSON is kept as a string.
fn typed_value(raw: &str) -> Value {
    let trimmed = raw.trim_matches(|c: char| c.is_ascii() && is_space(c as u8));
    if trimmed.is_empty() {
        return Value::Null;
    }
    serde_json::from_str(trimmed).unwrap_or_else(|_| Value::String(raw.to_string()))
}

impl DsmlStreamParser {
    /// `thinking`: the prompt ended with `<think>`; `tools_active`: tool blocks are parsed.
    pub fn new(thinking: bool, tools_active: bool) -> DsmlStreamParser {
        DsmlStreamParser {
            tools_active,
            thinking,
            text: String::new(),
            pos: 0,
            phase: if thinking {
                Phase::ThinkStart
            } else {
                Phase::Content
            },
            reasoning: String::new(),
            content: String::new(),
            style: 0,
            block_start: 0,
            raw_start: 0,
            state: BlockState::BetweenInvokes,
            calls: Vec::new(),
            current: None,
            wrote_member: false,
            raw_dsml: None,
            malformed: false,
            flushed: false,
        }
    }

    /// All text pushed so far.
    pub fn text(&self) -> &str {
        &self.text
    }

    /// Whether a tool block has started (and not turned out malformed).
    pub fn in_tool_block(&self) -> bool {
        self.phase == Phase::Block
    }

    /// Whether a tool block has closed (generation should stop: finish reason `tool_calls`).
    pub fn tool_block_closed(&self) -> bool {
        self.phase == Phase::Done
    }

    /// Adds sampled text; returns the events it made certain.
    pub fn push(&mut self, chunk: &str) -> Vec<StreamEvent> {
        let mut events = Vec::new();
        if self.flushed {
            return events;
        }
        self.text.push_str(chunk);
        while let Step::Progress = self.step(&mut events, false) {}
        events
    }

    /// Ends the input: whatever was held back is decided. Returns the last events.
    pub fn flush(&mut self) -> Vec<StreamEvent> {
        let mut events = Vec::new();
        if self.flushed {
            return events;
        }
        while let Step::Progress = self.step(&mut events, true) {}
        self.flushed = true;
        events
    }

    /// The parsed message (flushing first if needed; call [`Self::flush`] before to get the
    /// final events).
    pub fn finish(mut self) -> ParsedMessage {
        self.flush();
        ParsedMessage {
            reasoning: self.thinking.then_some(self.reasoning),
            content: self.content,
            tool_calls: if self.malformed {
                Vec::new()
            } else {
                self.calls
            },
            raw_dsml: self.raw_dsml,
            malformed: self.malformed,
        }
    }

    fn emit_reasoning(&mut self, events: &mut Vec<StreamEvent>, end: usize) {
        if end > self.pos {
            let s = self.text[self.pos..end].to_string();
            self.reasoning.push_str(&s);
            events.push(StreamEvent::Reasoning(s));
            self.pos = end;
        }
    }

    fn emit_content(&mut self, events: &mut Vec<StreamEvent>, end: usize) {
        if end > self.pos {
            let s = self.text[self.pos..end].to_string();
            self.content.push_str(&s);
            events.push(StreamEvent::Content(s));
            self.pos = end;
        }
    }

    fn emit_args(&mut self, events: &mut Vec<StreamEvent>, fragment: String) {
        if !fragment.is_empty() {
            events.push(StreamEvent::ToolCallArgs {
                index: self.calls.len(),
                fragment,
            });
        }
    }

    fn step(&mut self, events: &mut Vec<StreamEvent>, at_end: bool) -> Step {
        match self.phase {
            Phase::ThinkStart => {
                match prefix(&self.text, THINK_START) {
                    Prefix::Yes => self.pos = THINK_START.len(),
                    Prefix::Maybe if !at_end => return Step::Wait,
                    _ => {}
                }
                self.phase = Phase::Reasoning;
                Step::Progress
            }
            Phase::Reasoning => {
                if let Some(at) = self.text[self.pos..].find(THINK_END) {
                    self.emit_reasoning(events, self.pos + at);
                    self.pos += THINK_END.len();
                    self.phase = Phase::Content;
                    return Step::Progress;
                }
                let held = if at_end {
                    0
                } else {
                    partial_suffix(&self.text[self.pos..], &[THINK_END])
                };
                self.emit_reasoning(events, self.text.len() - held);
                Step::Wait
            }
            Phase::Content => {
                if !self.tools_active {
                    self.emit_content(events, self.text.len());
                    return Step::Wait;
                }
                let rest = &self.text[self.pos..];
                let found = STYLES
                    .iter()
                    .enumerate()
                    .filter_map(|(style, tags)| rest.find(tags.calls_start).map(|at| (at, style)))
                    .min();
                if let Some((at, style)) = found {
                    let tag_at = self.pos + at;
                    let body = &self.text[self.pos..tag_at];
                    let trimmed = body
                        .trim_end_matches(|c: char| c.is_ascii() && is_space(c as u8))
                        .len();
                    self.emit_content(events, self.pos + trimmed);
                    self.style = style;
                    self.block_start = self.pos;
                    self.raw_start = if self.text[..tag_at].ends_with("\n\n") {
                        tag_at - 2
                    } else {
                        tag_at
                    };
                    self.pos = tag_at + STYLES[style].calls_start.len();
                    self.state = BlockState::BetweenInvokes;
                    self.phase = Phase::Block;
                    return Step::Progress;
                }
                let mut safe = self.text.len();
                if !at_end {
                    let starts: Vec<&str> = STYLES.iter().map(|t| t.calls_start).collect();
                    safe -= partial_suffix(rest, &starts);
                    while safe > self.pos && is_space(self.text.as_bytes()[safe - 1]) {
                        safe -= 1;
                    }
                }
                self.emit_content(events, safe);
                Step::Wait
            }
            Phase::Block => match self.block_step(events, at_end) {
                Some(step) => step,
                None => {
                    // Malformed: the block and the whitespace before it become content.
                    self.malformed = true;
                    self.calls.clear();
                    self.current = None;
                    self.pos = self.block_start;
                    self.phase = Phase::Plain;
                    Step::Progress
                }
            },
            Phase::Plain => {
                self.emit_content(events, self.text.len());
                Step::Wait
            }
            Phase::Done => Step::Wait,
        }
    }

    /// One step inside the block. `None`: the block is malformed.
    fn block_step(&mut self, events: &mut Vec<StreamEvent>, at_end: bool) -> Option<Step> {
        let tags = &STYLES[self.style];
        // More text could still complete the construct: wait, unless the input has ended.
        let wait = if at_end { None } else { Some(Step::Wait) };
        match self.state.clone() {
            BlockState::BetweenInvokes => {
                let at = skip_space(&self.text, self.pos);
                let rest = &self.text[at..];
                if rest.is_empty() {
                    return wait;
                }
                let end = prefix(rest, tags.calls_end);
                let invoke = prefix(rest, tags.invoke_start);
                if end == Prefix::Yes {
                    let close = at + tags.calls_end.len();
                    let raw = self.text[self.raw_start..close].to_string();
                    for (index, call) in self.calls.iter_mut().enumerate() {
                        call.raw_dsml = Some(raw.clone());
                        events.push(StreamEvent::ToolCallEnd {
                            index,
                            call: call.clone(),
                        });
                    }
                    self.raw_dsml = Some(raw);
                    self.pos = close;
                    self.phase = Phase::Done;
                    return Some(Step::Wait);
                }
                if invoke == Prefix::Yes {
                    let gt = rest.find('>');
                    let Some(gt) = gt else { return wait };
                    let name = attr(&rest[..=gt], "name")?;
                    events.push(StreamEvent::ToolCallStart {
                        index: self.calls.len(),
                        name: name.clone(),
                    });
                    self.current = Some((name, Map::new()));
                    self.wrote_member = false;
                    self.emit_args(events, "{".to_string());
                    self.pos = at + gt + 1;
                    self.state = BlockState::BetweenParams;
                    return Some(Step::Progress);
                }
                if end == Prefix::Maybe || invoke == Prefix::Maybe {
                    return wait;
                }
                None
            }
            BlockState::BetweenParams => {
                let at = skip_space(&self.text, self.pos);
                let rest = &self.text[at..];
                if rest.is_empty() {
                    return wait;
                }
                let end = prefix(rest, tags.invoke_end);
                let param = prefix(rest, tags.param_start);
                if end == Prefix::Yes {
                    self.emit_args(events, "}".to_string());
                    let (name, args) = self.current.take()?;
                    self.calls.push(ToolCall {
                        id: None,
                        name,
                        arguments: Value::Object(args),
                        raw_dsml: None,
                    });
                    self.pos = at + tags.invoke_end.len();
                    self.state = BlockState::BetweenInvokes;
                    return Some(Step::Progress);
                }
                if param == Prefix::Yes {
                    let Some(gt) = rest.find('>') else {
                        return wait;
                    };
                    let tag = &rest[..=gt];
                    let key = attr(tag, "name")?;
                    let kind = attr(tag, "string");
                    if self.current.as_ref()?.1.contains_key(&key) {
                        return None;
                    }
                    let sep = if self.wrote_member { "," } else { "" };
                    self.wrote_member = true;
                    let head = format!("{sep}{}:", Value::String(key.clone()));
                    let start = at + gt + 1;
                    self.pos = start;
                    self.state = match kind.as_deref() {
                        None => {
                            self.emit_args(events, head);
                            BlockState::UntypedBody { key, start }
                        }
                        Some("true") => {
                            self.emit_args(events, head + "\"");
                            BlockState::StringValue {
                                key,
                                start,
                                emitted: start,
                            }
                        }
                        Some(_) => {
                            self.emit_args(events, head);
                            BlockState::TypedValue { key, start }
                        }
                    };
                    return Some(Step::Progress);
                }
                if end == Prefix::Maybe || param == Prefix::Maybe {
                    return wait;
                }
                None
            }
            BlockState::UntypedBody { key, start } => {
                let at = skip_space(&self.text, start);
                let rest = &self.text[at..];
                match prefix(rest, tags.param_start) {
                    Prefix::Yes => {
                        self.emit_args(events, "{".to_string());
                        self.pos = at;
                        self.state = BlockState::Nested {
                            key,
                            members: Map::new(),
                        };
                    }
                    Prefix::Maybe if !at_end => return Some(Step::Wait),
                    _ => {
                        self.emit_args(events, "\"".to_string());
                        self.state = BlockState::StringValue {
                            key,
                            start,
                            emitted: start,
                        };
                    }
                }
                Some(Step::Progress)
            }
            BlockState::StringValue {
                key,
                start,
                emitted,
            } => {
                if let Some(len) = self.text[emitted..].find(tags.param_end) {
                    let end = emitted + len;
                    let piece = unescape_entities(&self.text[emitted..end]);
                    self.emit_args(events, format!("{}\"", json_string_body(&piece)));
                    let value = unescape_entities(&self.text[start..end]);
                    self.current.as_mut()?.1.insert(key, Value::String(value));
                    self.pos = end + tags.param_end.len();
                    self.state = BlockState::BetweenParams;
                    return Some(Step::Progress);
                }
                if at_end {
                    return None;
                }
                // Stream what is certain: not a possible closing tag, not a possible entity.
                let mut safe =
                    self.text.len() - partial_suffix(&self.text[emitted..], &[tags.param_end]);
                if let Some(amp) = self.text[emitted..safe].rfind('&') {
                    let tail = &self.text[emitted + amp..safe];
                    if ENTITIES
                        .iter()
                        .any(|(e, _)| e.len() > tail.len() && e.starts_with(tail))
                    {
                        safe = emitted + amp;
                    }
                }
                if safe > emitted {
                    let piece = unescape_entities(&self.text[emitted..safe]);
                    self.emit_args(events, json_string_body(&piece));
                    self.state = BlockState::StringValue {
                        key,
                        start,
                        emitted: safe,
                    };
                }
                Some(Step::Wait)
            }
            BlockState::TypedValue { key, start } => {
                let Some(len) = self.text[start..].find(tags.param_end) else {
                    return wait;
                };
                let end = start + len;
                let value = typed_value(&self.text[start..end]);
                self.emit_args(events, value.to_string());
                self.current.as_mut()?.1.insert(key, value);
                self.pos = end + tags.param_end.len();
                self.state = BlockState::BetweenParams;
                Some(Step::Progress)
            }
            BlockState::Nested { key, mut members } => {
                let at = skip_space(&self.text, self.pos);
                let rest = &self.text[at..];
                match prefix(rest, tags.param_start) {
                    Prefix::Yes => {
                        let Some(gt) = rest.find('>') else {
                            return wait;
                        };
                        let tag = &rest[..=gt];
                        let leaf = attr(tag, "name")?;
                        let is_string = attr(tag, "string").is_none_or(|s| s == "true");
                        let value_start = at + gt + 1;
                        let Some(len) = self.text[value_start..].find(tags.param_end) else {
                            return wait;
                        };
                        let raw = &self.text[value_start..value_start + len];
                        let value = if is_string {
                            Value::String(unescape_entities(raw))
                        } else {
                            typed_value(raw)
                        };
                        if members.contains_key(&leaf) {
                            return None;
                        }
                        let sep = if members.is_empty() { "" } else { "," };
                        self.emit_args(
                            events,
                            format!("{sep}{}:{value}", Value::String(leaf.clone())),
                        );
                        members.insert(leaf, value);
                        self.pos = value_start + len + tags.param_end.len();
                        self.state = BlockState::Nested { key, members };
                        Some(Step::Progress)
                    }
                    Prefix::Maybe if !at_end => Some(Step::Wait),
                    _ if rest.is_empty() && !at_end => Some(Step::Wait),
                    _ => {
                        // The nested list ended; an optional closing tag of the outer parameter
                        // may follow.
                        let close = prefix(rest, tags.param_end);
                        if close == Prefix::Maybe && !at_end && !rest.is_empty() {
                            return Some(Step::Wait);
                        }
                        self.emit_args(events, "}".to_string());
                        self.current.as_mut()?.1.insert(key, Value::Object(members));
                        self.pos = if close == Prefix::Yes {
                            at + tags.param_end.len()
                        } else {
                            at
                        };
                        self.state = BlockState::BetweenParams;
                        Some(Step::Progress)
                    }
                }
            }
        }
    }
}
