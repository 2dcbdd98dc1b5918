//! Recorded model outputs with DSML tool blocks, fed token by token through the server's own
//! streaming path (OutputStream → each API's SSE encoder), checked against each API's shape.

mod support;

use ds4_server::api::anthropic::MessageStream;
use ds4_server::api::openai::ChatStream;
use ds4_server::api::responses::ResponseStream;
use ds4_server::api::sse::SseEncoder;
use ds4_server::generate::OutputStream;
use ds4_server::job::{FinishReason, GenEvent, ToolIdStyle, Usage};
use ds4_server::testing::ByteCodec;
use ds4_server::TextCodec;
use serde_json::{json, Value};
use support::sse_events;

/// A thinking-mode reply with two calls: typed arguments (number, bool, array, object) and a
/// string holding characters that must survive unescaped.
const RECORDED: &str = "The user wants files listed, then a count.</think>Let me check.\n\n<｜DSML｜tool_calls>\n\
<｜DSML｜invoke name=\"bash\">\n\
<｜DSML｜parameter name=\"command\" string=\"true\">ls -la && echo \"<done>\"</｜DSML｜parameter>\n\
<｜DSML｜parameter name=\"timeout\" string=\"false\">10</｜DSML｜parameter>\n\
</｜DSML｜invoke>\n\
<｜DSML｜invoke name=\"count\">\n\
<｜DSML｜parameter name=\"paths\" string=\"false\">[\"a.txt\", \"b.txt\"]</｜DSML｜parameter>\n\
<｜DSML｜parameter name=\"recursive\" string=\"false\">true</｜DSML｜parameter>\n\
<｜DSML｜parameter name=\"opts\" string=\"false\">{\"depth\": 2, \"hidden\": null}</｜DSML｜parameter>\n\
</｜DSML｜invoke>\n\
</｜DSML｜tool_calls>";

fn expected_args() -> [Value; 2] {
    [
        json!({"command": "ls -la && echo \"<done>\"", "timeout": 10}),
        json!({"paths": ["a.txt", "b.txt"], "recursive": true, "opts": {"depth": 2, "hidden": null}}),
    ]
}

/// Feeds the recorded text token by token (the byte codec splits multi-byte characters across
/// tokens, as a real BPE can) and collects the engine events, ending like the engine does.
fn run_output(style: ToolIdStyle) -> Vec<GenEvent> {
    let codec = ByteCodec;
    let mut out = OutputStream::new(true, true, &[], style);
    let mut events = vec![GenEvent::Started {
        prompt_tokens: 100,
        cached_tokens: 40,
    }];
    let mut generated = 0;
    let mut ended = FinishReason::Stop;
    for t in codec.encode(RECORDED) {
        generated += 1;
        events.extend(out.push_bytes(&codec.token_bytes(t)));
        if let Some(f) = out.finish_now() {
            ended = f;
            break;
        }
    }
    let (tail, summary) = out.finish(ended);
    events.extend(tail);
    assert_eq!(summary.finish, FinishReason::ToolCalls);
    assert_eq!(summary.tool_blocks.len(), 2);
    assert!(summary.tool_blocks[0]
        .1
        .starts_with("\n\n<｜DSML｜tool_calls>"));
    assert!(summary.tool_blocks[0].1.ends_with("</｜DSML｜tool_calls>"));
    events.push(GenEvent::Done {
        finish: summary.finish,
        usage: Usage {
            prompt_tokens: 100,
            cached_tokens: 40,
            completion_tokens: generated,
            reasoning_tokens: 9,
        },
    });
    events
}

fn encode(enc: &mut dyn SseEncoder, events: Vec<GenEvent>) -> Vec<(Option<String>, Value)> {
    let mut sse = String::new();
    for ev in events {
        sse += &enc.event(ev);
    }
    assert!(enc.finished());
    sse_events(&sse)
        .into_iter()
        .filter(|(_, d)| d != "[DONE]")
        .map(|(e, d)| (e, serde_json::from_str(&d).unwrap()))
        .collect()
}

#[test]
fn openai_chat_stream_has_tool_call_headers_and_argument_fragments() {
    let mut enc = ChatStream {
        id: "chatcmpl-1".into(),
        model: "m".into(),
        created: 0,
        include_usage: true,
        finished: false,
    };
    let frames = encode(&mut enc, run_output(ToolIdStyle::Call));
    let mut reasoning = String::new();
    let mut content = String::new();
    let mut calls: Vec<(String, String, String)> = Vec::new();
    let mut finish = None;
    for (_, f) in &frames {
        let Some(choice) = f["choices"].get(0) else {
            continue;
        };
        let d = &choice["delta"];
        reasoning += d["reasoning_content"].as_str().unwrap_or("");
        content += d["content"].as_str().unwrap_or("");
        if let Some(tcs) = d["tool_calls"].as_array() {
            for tc in tcs {
                let i = tc["index"].as_u64().unwrap() as usize;
                if let Some(id) = tc["id"].as_str() {
                    assert_eq!(i, calls.len());
                    assert_eq!(tc["type"], "function");
                    assert_eq!(tc["function"]["arguments"], "");
                    calls.push((
                        id.into(),
                        tc["function"]["name"].as_str().unwrap().into(),
                        String::new(),
                    ));
                } else {
                    calls[i].2 += tc["function"]["arguments"].as_str().unwrap();
                }
            }
        }
        if let Some(r) = choice["finish_reason"].as_str() {
            finish = Some(r.to_string());
        }
    }
    assert_eq!(reasoning, "The user wants files listed, then a count.");
    assert_eq!(content, "Let me check.");
    assert_eq!(finish.as_deref(), Some("tool_calls"));
    assert_eq!(calls.len(), 2);
    assert_eq!(
        (calls[0].1.as_str(), calls[1].1.as_str()),
        ("bash", "count")
    );
    for (call, want) in calls.iter().zip(expected_args()) {
        assert!(
            call.0.starts_with("call_") && call.0.len() == 37,
            "{}",
            call.0
        );
        assert_eq!(
            serde_json::from_str::<Value>(&call.2).unwrap(),
            want,
            "arguments {}",
            call.2
        );
    }
    // More than one fragment per call: the arguments really stream.
    let fragments = frames
        .iter()
        .filter(|(_, f)| {
            f["choices"][0]["delta"]["tool_calls"][0]["id"].is_null()
                && f["choices"][0]["delta"]["tool_calls"].is_array()
        })
        .count();
    assert!(fragments > 2, "{fragments} argument fragments");
    let usage = &frames.last().unwrap().1["usage"];
    assert_eq!(usage["prompt_tokens_details"]["cached_tokens"], 40);
}

#[test]
fn anthropic_stream_has_thinking_text_and_tool_use_blocks() {
    let mut enc = MessageStream::new("msg_1".into(), "m".into());
    let frames = encode(&mut enc, run_output(ToolIdStyle::Toolu));
    let names: Vec<&str> = frames.iter().map(|(e, _)| e.as_deref().unwrap()).collect();
    assert_eq!(names.first(), Some(&"message_start"));
    assert_eq!(names.last(), Some(&"message_stop"));
    for (e, f) in &frames {
        assert_eq!(
            f["type"].as_str(),
            e.as_deref(),
            "event name and type agree"
        );
    }
    // Blocks: thinking, text, tool_use, tool_use — each started, deltas, stopped, in order.
    let starts: Vec<&Value> = frames
        .iter()
        .filter(|(e, _)| e.as_deref() == Some("content_block_start"))
        .map(|(_, f)| f)
        .collect();
    let kinds: Vec<&str> = starts
        .iter()
        .map(|s| s["content_block"]["type"].as_str().unwrap())
        .collect();
    assert_eq!(kinds, ["thinking", "text", "tool_use", "tool_use"]);
    for (i, s) in starts.iter().enumerate() {
        assert_eq!(s["index"], i);
    }
    let mut inputs = vec![String::new(); 4];
    let mut thinking = String::new();
    let mut text = String::new();
    let mut signature = false;
    for (e, f) in &frames {
        if e.as_deref() != Some("content_block_delta") {
            continue;
        }
        let i = f["index"].as_u64().unwrap() as usize;
        match f["delta"]["type"].as_str().unwrap() {
            "thinking_delta" => thinking += f["delta"]["thinking"].as_str().unwrap(),
            "signature_delta" => signature = f["delta"]["signature"] == "msg_1",
            "text_delta" => text += f["delta"]["text"].as_str().unwrap(),
            "input_json_delta" => inputs[i] += f["delta"]["partial_json"].as_str().unwrap(),
            other => panic!("unexpected delta {other}"),
        }
    }
    assert!(signature);
    assert_eq!(thinking, "The user wants files listed, then a count.");
    assert_eq!(text, "Let me check.");
    for (k, want) in expected_args().into_iter().enumerate() {
        let s = starts[2 + k];
        assert!(s["content_block"]["id"]
            .as_str()
            .unwrap()
            .starts_with("toolu_"));
        assert_eq!(serde_json::from_str::<Value>(&inputs[2 + k]).unwrap(), want);
    }
    let delta = frames
        .iter()
        .find(|(e, _)| e.as_deref() == Some("message_delta"))
        .unwrap();
    assert_eq!(delta.1["delta"]["stop_reason"], "tool_use");
    assert_eq!(delta.1["usage"]["cache_read_input_tokens"], 40);
    assert_eq!(delta.1["usage"]["input_tokens"], 60);
}

#[test]
fn responses_stream_has_the_event_lifecycle_and_function_call_items() {
    let mut enc = ResponseStream::new(
        "resp_1".into(),
        "m".into(),
        Some("high".into()),
        Some("auto".into()),
    );
    let frames = encode(&mut enc, run_output(ToolIdStyle::Call));
    for (k, (e, f)) in frames.iter().enumerate() {
        assert_eq!(f["sequence_number"], k, "sequence numbers count up");
        assert_eq!(f["type"].as_str(), e.as_deref());
    }
    let names: Vec<&str> = frames.iter().map(|(e, _)| e.as_deref().unwrap()).collect();
    assert_eq!(&names[..2], ["response.created", "response.in_progress"]);
    assert_eq!(names.last(), Some(&"response.completed"));
    let added: Vec<&str> = frames
        .iter()
        .filter(|(e, _)| e.as_deref() == Some("response.output_item.added"))
        .map(|(_, f)| f["item"]["type"].as_str().unwrap())
        .collect();
    assert_eq!(
        added,
        ["reasoning", "message", "function_call", "function_call"]
    );
    let done_items: Vec<&Value> = frames
        .iter()
        .filter(|(e, _)| e.as_deref() == Some("response.output_item.done"))
        .map(|(_, f)| &f["item"])
        .collect();
    assert_eq!(done_items.len(), 4);
    assert_eq!(
        done_items[0]["summary"][0]["text"],
        "The user wants files listed, then a count."
    );
    assert_eq!(done_items[1]["content"][0]["text"], "Let me check.");
    for (item, want) in done_items[2..].iter().zip(expected_args()) {
        assert_eq!(item["type"], "function_call");
        assert!(item["call_id"].as_str().unwrap().starts_with("call_"));
        assert_eq!(
            serde_json::from_str::<Value>(item["arguments"].as_str().unwrap()).unwrap(),
            want
        );
    }
    // The streamed argument deltas of each call add up to its final arguments.
    for item in &done_items[2..] {
        let deltas: String = frames
            .iter()
            .filter(|(e, f)| {
                e.as_deref() == Some("response.function_call_arguments.delta")
                    && f["item_id"] == item["id"]
            })
            .map(|(_, f)| f["delta"].as_str().unwrap().to_string())
            .collect();
        assert_eq!(deltas, item["arguments"].as_str().unwrap());
    }
    let completed = &frames.last().unwrap().1["response"];
    assert_eq!(completed["status"], "completed");
    assert_eq!(completed["output"].as_array().unwrap().len(), 4);
    assert_eq!(
        completed["usage"]["input_tokens_details"]["cached_tokens"],
        40
    );
}
