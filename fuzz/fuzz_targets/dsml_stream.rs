//! The streaming DSML parser on arbitrary model output: never panics, its events agree with
//! its final message, and any split of the text into chunks (as tokens arrive) gives the same
//! events and message. The decode tracker that forces greedy sampling inside tool blocks
//! follows the same text without panicking.
//!
//! Input: byte 0 = flags (thinking, tools), byte 1 = number of cut points n (mod 16), the next
//! n bytes the cut points (scaled onto the text's char boundaries), the rest the text (UTF-8,
//! lossy).
#![no_main]
use ds4_text::sampler::DsmlDecodeTracker;
use ds4_text::{DsmlStreamParser, ParsedMessage, StreamEvent};
use libfuzzer_sys::fuzz_target;

fn run(chunks: &[&str], thinking: bool, tools: bool) -> (Vec<StreamEvent>, ParsedMessage) {
    let mut parser = DsmlStreamParser::new(thinking, tools);
    let mut events = Vec::new();
    for c in chunks {
        events.extend(parser.push(c));
    }
    events.extend(parser.flush());
    (merge(events), parser.finish())
}

/// Adjacent deltas of one kind joined, so that streams split differently compare equal.
fn merge(events: Vec<StreamEvent>) -> Vec<StreamEvent> {
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

/// The stream's deltas concatenate to the message's reasoning, content and arguments.
fn check_consistent(events: &[StreamEvent], msg: &ParsedMessage) {
    let (mut reasoning, mut content) = (String::new(), String::new());
    let mut args: Vec<String> = Vec::new();
    let mut ended = Vec::new();
    for e in events {
        match e {
            StreamEvent::Reasoning(s) => reasoning.push_str(s),
            StreamEvent::Content(s) => content.push_str(s),
            StreamEvent::ToolCallStart { index, .. } => {
                assert_eq!(*index, args.len(), "tool call indices in order");
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

fuzz_target!(|data: &[u8]| {
    if data.len() < 2 {
        return;
    }
    let (thinking, tools) = (data[0] & 1 != 0, data[0] & 2 != 0);
    let rest = &data[2..];
    let (cuts, text) = rest.split_at(((data[1] % 16) as usize).min(rest.len()));
    let text = String::from_utf8_lossy(text);

    let whole = run(&[&text], thinking, tools);
    check_consistent(&whole.0, &whole.1);

    let bounds: Vec<usize> = (0..=text.len())
        .filter(|&i| text.is_char_boundary(i))
        .collect();
    let mut points: Vec<usize> = cuts
        .iter()
        .map(|&c| bounds[c as usize * (bounds.len() - 1) / 255])
        .chain([0, text.len()])
        .collect();
    points.sort_unstable();
    points.dedup();
    let chunks: Vec<&str> = points.windows(2).map(|w| &text[w[0]..w[1]]).collect();
    assert_eq!(run(&chunks, thinking, tools), whole, "chunks {chunks:?}");

    let mut tracker = DsmlDecodeTracker::new();
    for c in &chunks {
        tracker.push(c);
    }
});
