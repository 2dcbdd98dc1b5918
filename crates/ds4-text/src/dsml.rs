//! DSML, DeepSeek's tool-call markup: rendering calls into prompts (canonical form) and parsing
//! the model's output as it streams ([`stream`]).
//!
//! Canonical form of one block (ds4-spec.md §4):
//! ```text
//! \n\n<｜DSML｜tool_calls>
//! <｜DSML｜invoke name="NAME">
//! <｜DSML｜parameter name="KEY" string="true">raw string</｜DSML｜parameter>
//! <｜DSML｜parameter name="KEY2" string="false">{"json":1}</｜DSML｜parameter>
//! </｜DSML｜invoke>
//! </｜DSML｜tool_calls>
//! ```

use serde_json::Value;

use crate::chat::{push_escaped, ToolCall};

pub mod stream;

pub use stream::{DsmlStreamParser, ParsedMessage, StreamEvent};

/// The closing tag of a parameter; the only thing escaped inside string values.
pub const PARAM_END: &str = "</｜DSML｜parameter>";
pub const TOOL_CALLS_START: &str = "<｜DSML｜tool_calls>";
pub const TOOL_CALLS_END: &str = "</｜DSML｜tool_calls>";

/// The DSML of an assistant message's calls: the recorded sampled block when every call carries
/// the same one (byte-exact replay), else the canonical rendering. No calls: empty.
pub fn render_message_calls(calls: &[ToolCall]) -> String {
    let Some(first) = calls.first() else {
        return String::new();
    };
    if let Some(raw) = first.raw_dsml.as_deref().filter(|r| !r.is_empty()) {
        if calls.iter().all(|c| c.raw_dsml.as_deref() == Some(raw)) {
            return raw.to_string();
        }
    }
    render_tool_calls(calls)
}

/// The canonical DSML block of `calls` (starting with "\n\n"). No calls: empty.
pub fn render_tool_calls(calls: &[ToolCall]) -> String {
    if calls.is_empty() {
        return String::new();
    }
    let mut out = String::from("\n\n<｜DSML｜tool_calls>\n");
    for call in calls {
        out.push_str("<｜DSML｜invoke name=\"");
        push_attr_escaped(&mut out, &call.name);
        out.push_str("\">\n");
        match &call.arguments {
            Value::Object(map) => {
                for (key, value) in map {
                    push_parameter(&mut out, key, value);
                }
            }
            // Anything but an object is passed as its text in one `arguments` parameter.
            Value::String(text) => push_string_parameter(&mut out, "arguments", text),
            other => push_string_parameter(&mut out, "arguments", &other.to_string()),
        }
        out.push_str("</｜DSML｜invoke>\n");
    }
    out.push_str(TOOL_CALLS_END);
    out
}

fn push_parameter(out: &mut String, key: &str, value: &Value) {
    match value {
        Value::String(text) => push_string_parameter(out, key, text),
        other => {
            out.push_str("<｜DSML｜parameter name=\"");
            push_attr_escaped(out, key);
            out.push_str("\" string=\"false\">");
            // Minified JSON; a closing parameter tag inside a JSON string is written with its
            // `<` as the JSON escape \u003c, which keeps the value's meaning.
            let json = other.to_string();
            let mut rest = json.as_str();
            while let Some(at) = rest.find(PARAM_END) {
                out.push_str(&rest[..at]);
                out.push_str("\\u003c");
                out.push_str(&PARAM_END[1..]);
                rest = &rest[at + PARAM_END.len()..];
            }
            out.push_str(rest);
            out.push_str(PARAM_END);
            out.push('\n');
        }
    }
}

fn push_string_parameter(out: &mut String, key: &str, text: &str) {
    out.push_str("<｜DSML｜parameter name=\"");
    push_attr_escaped(out, key);
    out.push_str("\" string=\"true\">");
    push_escaped(out, text, PARAM_END);
    out.push_str(PARAM_END);
    out.push('\n');
}

/// Attribute values escape the four XML-significant characters.
fn push_attr_escaped(out: &mut String, text: &str) {
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            c => out.push(c),
        }
    }
}

/// Undoes the five entities DSML text may carry (`&amp; &lt; &gt; &quot; &apos;`); any other
/// `&` stays as it is.
pub fn unescape_entities(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(at) = rest.find('&') {
        out.push_str(&rest[..at]);
        rest = &rest[at..];
        match ENTITIES.iter().find(|(entity, _)| rest.starts_with(entity)) {
            Some((entity, c)) => {
                out.push(*c);
                rest = &rest[entity.len()..];
            }
            None => {
                out.push('&');
                rest = &rest[1..];
            }
        }
    }
    out.push_str(rest);
    out
}

pub(crate) const ENTITIES: [(&str, char); 5] = [
    ("&amp;", '&'),
    ("&lt;", '<'),
    ("&gt;", '>'),
    ("&quot;", '"'),
    ("&apos;", '\''),
];
