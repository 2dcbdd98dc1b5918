//! The DeepSeek V4 chat template, byte-exact with ds4 (ds4-spec.md §4).
//!
//! A conversation renders as
//! `BOS [THINKMAX] [SYSTEM] <｜User｜>user… <｜Assistant｜>THINK content DSML EOS … <｜Assistant｜><think>`
//! where SYSTEM is the tools block and the system/developer messages joined by "\n\n". The
//! rendered text is tokenized with the special strings recognised anywhere
//! ([`crate::tokenizer::Tokenizer::encode`]).

use crate::dsml;
use crate::tokenizer::{ASSISTANT, BOS, EOS, THINK_END, THINK_START, USER};

/// Prepended after BOS in Think Max mode (three lines and an empty line).
pub const THINK_MAX_PREFIX: &str = "Reasoning Effort: Absolute maximum with no shortcuts permitted.\n\
You MUST be very thorough in your thinking and comprehensively decompose the problem to resolve the root cause, rigorously stress-testing your logic against all potential paths, edge cases, and adversarial scenarios.\n\
Explicitly write out your entire deliberation process, documenting every intermediate step, considered alternative, and rejected hypothesis to ensure absolutely no assumption is left unchecked.\n\n";

/// Think Max needs at least this context (384K tokens); below it, normal thinking is used.
pub const THINK_MAX_MIN_CTX: usize = 393_216;

/// The system prompt of the CLI's single-turn chat and of `/v1/completions`.
pub const DEFAULT_SYSTEM: &str = "You are a helpful assistant";

const TOOL_RESULT_OPEN: &str = "<tool_result>";
const TOOL_RESULT_CLOSE: &str = "</tool_result>";

/// Who wrote a message. OpenAI's "developer" is a [`Role::System`]; "function" is a
/// [`Role::Tool`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    System,
    User,
    Assistant,
    Tool,
}

/// One tool call of an assistant message.
#[derive(Clone, Debug, PartialEq)]
pub struct ToolCall {
    /// Client-visible id (`call_…`, `toolu_…`); the parser leaves it `None`.
    pub id: Option<String>,
    pub name: String,
    /// The arguments: normally a JSON object in the client's key order. Any other value renders
    /// as one `arguments` string parameter holding its text (a `Value::String` is used as is, so
    /// a client's unparseable argument text can be kept verbatim that way).
    pub arguments: serde_json::Value,
    /// The exact DSML block this call was sampled in (from its leading "\n\n"), for byte-exact
    /// replay of the history.
    pub raw_dsml: Option<String>,
}

/// One chat message.
#[derive(Clone, Debug, PartialEq)]
pub struct Message {
    pub role: Role,
    pub content: String,
    /// An assistant turn's thinking text (rendered only where the template keeps it).
    pub reasoning: Option<String>,
    pub tool_calls: Vec<ToolCall>,
    /// For tool messages: the id of the call this answers (not rendered; used by the API layer).
    pub tool_call_id: Option<String>,
}

impl Message {
    fn new(role: Role, content: impl Into<String>) -> Message {
        Message {
            role,
            content: content.into(),
            reasoning: None,
            tool_calls: Vec::new(),
            tool_call_id: None,
        }
    }
    pub fn system(content: impl Into<String>) -> Message {
        Message::new(Role::System, content)
    }
    pub fn user(content: impl Into<String>) -> Message {
        Message::new(Role::User, content)
    }
    pub fn assistant(content: impl Into<String>) -> Message {
        Message::new(Role::Assistant, content)
    }
    pub fn tool(content: impl Into<String>) -> Message {
        Message::new(Role::Tool, content)
    }
    /// Sets the reasoning (builder style).
    pub fn with_reasoning(mut self, reasoning: impl Into<String>) -> Message {
        self.reasoning = Some(reasoning.into());
        self
    }
    /// Adds a tool call (builder style).
    pub fn with_tool_call(mut self, call: ToolCall) -> Message {
        self.tool_calls.push(call);
        self
    }
}

/// The thinking mode a request asks for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ThinkMode {
    /// No thinking: the assistant turn opens with `</think>`.
    Off,
    /// Normal thinking: the assistant turn opens with `<think>`.
    High,
    /// Thinking with the Think Max preamble (only when the context is large enough).
    Max,
}

impl ThinkMode {
    /// The mode actually used with a context of `ctx` tokens: Max falls back to High below
    /// [`THINK_MAX_MIN_CTX`].
    pub fn for_context(self, ctx: usize) -> ThinkMode {
        if self == ThinkMode::Max && ctx < THINK_MAX_MIN_CTX {
            ThinkMode::High
        } else {
            self
        }
    }

    /// Whether the model thinks (High or Max).
    pub fn thinking(self) -> bool {
        self != ThinkMode::Off
    }
}

/// Everything that shapes the rendered prompt of a chat request.
#[derive(Clone, Debug, PartialEq)]
pub struct ChatPrompt {
    pub messages: Vec<Message>,
    /// Raw JSON text of each tool schema (OpenAI's `function` value or the whole
    /// Anthropic/Responses tool object), one per line in the tools block. Empty strings are
    /// skipped; none left: no tools block (as with tool_choice "none").
    pub tools: Vec<String>,
    pub think: ThinkMode,
    /// Context size in tokens (decides whether Think Max applies).
    pub ctx: usize,
}

/// Renders a chat request exactly as ds4's server does.
pub fn render_chat(p: &ChatPrompt) -> String {
    let think = p.think.for_context(p.ctx);
    let thinking = think.thinking();
    let schemas: Vec<&str> = p
        .tools
        .iter()
        .map(String::as_str)
        .filter(|s| !s.is_empty())
        .collect();
    let tool_context = !schemas.is_empty()
        || p.messages.iter().any(|m| {
            m.role == Role::Tool || (m.role == Role::Assistant && !m.tool_calls.is_empty())
        });
    let last_user_like = p
        .messages
        .iter()
        .rposition(|m| matches!(m.role, Role::User | Role::Tool));

    let mut system = String::new();
    if !schemas.is_empty() {
        system.push_str(&tools_block(&schemas));
    }
    for m in p.messages.iter().filter(|m| m.role == Role::System) {
        if !system.is_empty() {
            system.push_str("\n\n");
        }
        system.push_str(&m.content);
    }

    let mut out = String::from(BOS);
    if think == ThinkMode::Max {
        out.push_str(THINK_MAX_PREFIX);
    }
    out.push_str(&system);

    // An assistant header is due after a user or tool message; consecutive tool messages share
    // one `<｜User｜>`.
    let mut assistant_due = false;
    let mut in_tool_results = false;
    for (i, m) in p.messages.iter().enumerate() {
        match m.role {
            Role::System => {}
            Role::User => {
                out.push_str(USER);
                out.push_str(&m.content);
                assistant_due = true;
                in_tool_results = false;
            }
            Role::Tool => {
                if !in_tool_results {
                    out.push_str(USER);
                }
                out.push_str(TOOL_RESULT_OPEN);
                push_escaped(&mut out, &m.content, TOOL_RESULT_CLOSE);
                out.push_str(TOOL_RESULT_CLOSE);
                assistant_due = true;
                in_tool_results = true;
            }
            Role::Assistant => {
                if assistant_due {
                    out.push_str(ASSISTANT);
                    // Past reasoning is kept when tools are involved or for turns after the last
                    // user/tool message; otherwise the turn shows only the closed think tag.
                    let keep_reasoning =
                        thinking && (tool_context || last_user_like.is_none_or(|u| i > u));
                    if keep_reasoning {
                        out.push_str(THINK_START);
                        out.push_str(m.reasoning.as_deref().unwrap_or(""));
                    }
                    out.push_str(THINK_END);
                }
                out.push_str(&m.content);
                out.push_str(&dsml::render_message_calls(&m.tool_calls));
                out.push_str(EOS);
                assistant_due = false;
                in_tool_results = false;
            }
        }
    }
    if assistant_due {
        out.push_str(ASSISTANT);
        out.push_str(if thinking { THINK_START } else { THINK_END });
    }
    out
}

/// The `/v1/completions` prompt: the default system prompt, the raw prompt as one user turn.
pub fn render_completion(prompt: &str, think: ThinkMode, ctx: usize) -> String {
    render_single_turn(DEFAULT_SYSTEM, prompt, think, ctx)
}

/// The CLI's single-turn prompt (`ds4 -p`): BOS, the Think Max preamble if any, system (may be empty), the user
/// prompt, and the assistant header.
pub fn render_single_turn(system: &str, prompt: &str, think: ThinkMode, ctx: usize) -> String {
    let think = think.for_context(ctx);
    let mut out = String::from(BOS);
    if think == ThinkMode::Max {
        out.push_str(THINK_MAX_PREFIX);
    }
    out.push_str(system);
    out.push_str(USER);
    out.push_str(prompt);
    out.push_str(ASSISTANT);
    out.push_str(if think.thinking() {
        THINK_START
    } else {
        THINK_END
    });
    out
}

/// The tools block of the system prompt (no trailing newline), one schema per line.
pub fn tools_block(schemas: &[&str]) -> String {
    const HEAD: &str = "## Tools\n\n\
You have access to a set of tools to help answer the user question. You can invoke tools by writing a \"<｜DSML｜tool_calls>\" block like the following:\n\n\
<｜DSML｜tool_calls>\n\
<｜DSML｜invoke name=\"$TOOL_NAME\">\n\
<｜DSML｜parameter name=\"$PARAMETER_NAME\" string=\"true|false\">$PARAMETER_VALUE</｜DSML｜parameter>\n\
...\n\
</｜DSML｜invoke>\n\
<｜DSML｜invoke name=\"$TOOL_NAME2\">\n\
...\n\
</｜DSML｜invoke>\n\
</｜DSML｜tool_calls>\n\n\
String parameters should be specified as raw text and set `string=\"true\"`. Preserve characters such as `>`, `&`, and `&&` exactly; never replace normal string characters with XML or HTML entity escapes. Only if a string value itself contains the exact closing parameter tag `</｜DSML｜parameter>`, write that tag as `&lt;/｜DSML｜parameter>` inside the value. For all other types (numbers, booleans, arrays, objects), pass the value in JSON format and set `string=\"false\"`.\n\n\
If thinking_mode is enabled (triggered by <think>), you MUST output your complete reasoning inside <think>...</think> BEFORE any tool calls or final response.\n\n\
Otherwise, output directly after </think> with tool calls or final response.\n\n\
### Available Tool Schemas\n\n";
    const TAIL: &str = "\n\nYou MUST strictly follow the above defined tool name and parameter schemas to invoke tool calls. Use the exact parameter names from the schemas.";
    let mut out = String::from(HEAD);
    out.push_str(&schemas.join("\n"));
    out.push_str(TAIL);
    out
}

/// Appends `text`, writing each occurrence of `tag` as `&lt;` + the tag without its `<`.
pub(crate) fn push_escaped(out: &mut String, text: &str, tag: &str) {
    let mut rest = text;
    while let Some(at) = rest.find(tag) {
        out.push_str(&rest[..at]);
        out.push_str("&lt;");
        out.push_str(&tag[1..]);
        rest = &rest[at + tag.len()..];
    }
    out.push_str(rest);
}
