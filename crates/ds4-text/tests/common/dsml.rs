//! The DSML stream parser's event/message checks, shared by `dsml_parse.rs` and the
//! `dsml_stream` fuzz target (fuzz/, which includes this file by path).
#![allow(dead_code)]

use ds4_text::dsml::{DsmlStreamParser, ParsedMessage, StreamEvent};

/// Pushes `chunks`, flushes, and returns the merged events and the parsed message.
pub fn run(chunks: &[&str], thinking: bool, tools: bool) -> (Vec<StreamEvent>, ParsedMessage) {
    let mut parser = DsmlStreamParser::new(thinking, tools);
    let mut events = Vec::new();
    for c in chunks {
        events.extend(parser.push(c));
    }
    events.extend(parser.flush());
    (merge(events), parser.finish())
}

/// Joins adjacent deltas of one kind, so streams split differently compare equal.
pub fn merge(events: Vec<StreamEvent>) -> Vec<StreamEvent> {
    let mut out: Vec<StreamEvent> = Vec::new();
    for e in events {
        match (out.last_mut(), e) {
            (Some(StreamEvent::Reasoning(a)), StreamEvent::Reasoning(b)) => a.push_str(&b),
            (Some(StreamEvent::Content(a)), StreamEvent::Content(b)) => a.push_str(&b),
            (
                Some(StreamEvent::ToolCallArgs {
                    index: i,
                    fragment: a,
                }),
                StreamEvent::ToolCallArgs {
                    index: j,
                    fragment: b,
                },
            ) if *i == j => a.push_str(&b),
            (_, e) => out.push(e),
        }
    }
    out
}

/// Checks the stream against the message: deltas concatenate to reasoning/content, argument
/// fragments to each call's arguments JSON, ToolCallEnd carries the final calls.
pub fn check_consistent(events: &[StreamEvent], msg: &ParsedMessage) {
    let mut reasoning = String::new();
    let mut content = String::new();
    let mut args: Vec<String> = Vec::new();
    let mut ended = Vec::new();
    for e in events {
        match e {
            StreamEvent::Reasoning(s) => reasoning.push_str(s),
            StreamEvent::Content(s) => content.push_str(s),
            StreamEvent::ToolCallStart { index, .. } => {
                assert_eq!(*index, args.len());
                args.push(String::new());
            }
            StreamEvent::ToolCallArgs { index, fragment } => args[*index].push_str(fragment),
            StreamEvent::ToolCallEnd { call, .. } => ended.push(call.clone()),
        }
    }
    assert_eq!(msg.reasoning.clone().unwrap_or_default(), reasoning);
    assert_eq!(msg.content, content);
    assert_eq!(msg.tool_calls, ended);
    for (i, call) in msg.tool_calls.iter().enumerate() {
        assert_eq!(serde_json::to_string(&call.arguments).unwrap(), args[i]);
    }
}
