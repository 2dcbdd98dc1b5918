//! The request → engine → response path over raw HTTP with a scripted model: streaming shapes,
//! usage and prefix reuse, cancellation on disconnect, concurrent clients.

mod support;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use ds4_server::testing::{ByteCodec, ScriptedRunner};
use ds4_server::{ServerConfig, TextCodec};
use serde_json::Value;
use support::{post, request, sse_events, start};

const CHAT: &str = "/v1/chat/completions";

fn chat_body(messages: Value, extra: Value) -> String {
    let mut body =
        serde_json::json!({"model": "deepseek-v4-flash", "messages": messages, "think": false});
    if let (Value::Object(b), Value::Object(e)) = (&mut body, extra) {
        b.extend(e);
    }
    body.to_string()
}

#[test]
fn streaming_chat_has_role_content_finish_usage_and_done() {
    let server = start(
        ScriptedRunner::new(&["Hello there"], 4096),
        ServerConfig::default(),
    );
    let body = chat_body(
        serde_json::json!([{"role": "user", "content": "hi"}]),
        // n = 1 and logprobs = false, which clients send explicitly, ask for what the server
        // gives.
        serde_json::json!({"stream": true, "stream_options": {"include_usage": true}, "n": 1,
            "logprobs": false, "top_logprobs": 0}),
    );
    let r = post(server.addr, CHAT, &body);
    assert_eq!(r.status, 200);
    assert!(r.headers.contains("text/event-stream"), "{}", r.headers);
    let events = sse_events(&r.text());
    assert_eq!(events.last().unwrap().1, "[DONE]");
    let chunks: Vec<Value> = events[..events.len() - 1]
        .iter()
        .map(|(_, d)| serde_json::from_str(d).unwrap())
        .collect();
    assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
    let text: String = chunks
        .iter()
        .filter_map(|c| {
            c["choices"]
                .get(0)
                .and_then(|ch| ch["delta"]["content"].as_str())
                .map(str::to_string)
        })
        .collect();
    assert_eq!(text, "Hello there");
    let finish = chunks.iter().find_map(|c| {
        c["choices"]
            .get(0)
            .and_then(|ch| ch["finish_reason"].as_str())
    });
    assert_eq!(finish, Some("stop"));
    let usage = &chunks.last().unwrap()["usage"];
    assert_eq!(usage["completion_tokens"], 12, "11 bytes + EOS");
    assert_eq!(usage["prompt_tokens_details"]["cached_tokens"], 0);
    assert!(chunks
        .iter()
        .all(|c| c["object"] == "chat.completion.chunk" && c["id"] == chunks[0]["id"]));
}

#[test]
fn second_turn_prefills_only_the_new_suffix() {
    let server = start(
        ScriptedRunner::new(&["Hello there", "Fine"], 4096),
        ServerConfig::default(),
    );
    let first = post(
        server.addr,
        CHAT,
        &chat_body(
            serde_json::json!([{"role": "user", "content": "hi"}]),
            serde_json::json!({}),
        ),
    );
    let u1 = first.json()["usage"].clone();
    assert_eq!(
        first.json()["choices"][0]["message"]["content"],
        "Hello there"
    );
    let p1 = u1["prompt_tokens"].as_u64().unwrap();
    let second = post(
        server.addr,
        CHAT,
        &chat_body(
            serde_json::json!([
                {"role": "user", "content": "hi"},
                {"role": "assistant", "content": "Hello there"},
                {"role": "user", "content": "more"}
            ]),
            serde_json::json!({}),
        ),
    );
    let u2 = second.json()["usage"].clone();
    assert_eq!(second.json()["choices"][0]["message"]["content"], "Fine");
    let cached = u2["prompt_tokens_details"]["cached_tokens"]
        .as_u64()
        .unwrap();
    // Live session = first prompt + "Hello there" (EOS is never evaluated).
    assert_eq!(cached, p1 + 11);
    let suffix = ByteCodec.encode("<｜end▁of▁sentence｜><｜User｜>more<｜Assistant｜></think>");
    assert_eq!(
        u2["prompt_tokens"].as_u64().unwrap() - cached,
        suffix.len() as u64
    );
}

/// Reads from a streaming response until `n` content chunks arrived.
/// A GPU backend runs whole prefill spans (2 048 tokens on CUDA): the engine's prefill chunks
/// are then that long, cut at absolute multiples of the span, not at the default 512.
#[test]
fn prefill_chunks_follow_the_backends_span() {
    let runner = ScriptedRunner::new(&["ok"], 1 << 16).with_span(1024);
    let sizes = runner.eval_sizes();
    let server = start(runner, ServerConfig::default());
    let long = "word ".repeat(700);
    let body = chat_body(
        serde_json::json!([{"role": "user", "content": long}]),
        serde_json::json!({}),
    );
    let r = post(server.addr, CHAT, &body);
    assert_eq!(r.status, 200, "{}", r.text());
    let sizes = sizes.lock().unwrap().clone();
    let prefill: Vec<usize> = sizes.iter().copied().take_while(|&n| n > 1).collect();
    let total: usize = prefill.iter().sum();
    assert!(total > 3000, "prompt of {total} tokens: {sizes:?}");
    let (last, full) = prefill.split_last().unwrap();
    assert!(full.iter().all(|&n| n == 1024), "chunks {prefill:?}");
    assert!(*last <= 1024 && *last > 0, "chunks {prefill:?}");
}

fn read_some_stream(s: &mut TcpStream, n: usize) {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    while String::from_utf8_lossy(&buf).matches("\"content\"").count() < n + 1 {
        let k = s.read(&mut chunk).unwrap();
        assert!(
            k > 0,
            "stream ended early: {}",
            String::from_utf8_lossy(&buf)
        );
        buf.extend_from_slice(&chunk[..k]);
    }
}

fn wait_idle(server: &support::TestServer, limit: Duration) -> Duration {
    let t = Instant::now();
    while server.engine.status().busy() && t.elapsed() < limit * 20 {
        std::thread::sleep(Duration::from_millis(1));
    }
    t.elapsed()
}

#[test]
fn disconnect_mid_generation_frees_the_worker_quickly() {
    let long = "a".repeat(100_000);
    let runner =
        ScriptedRunner::new(&[long.as_str(), "next"], 1 << 20).with_delay(Duration::from_millis(1));
    let server = start(runner, ServerConfig::default());

    // Streaming client goes away.
    let mut s = TcpStream::connect(server.addr).unwrap();
    let body = chat_body(
        serde_json::json!([{"role": "user", "content": "go"}]),
        serde_json::json!({"stream": true}),
    );
    s.write_all(&request("POST", CHAT, "", body.as_bytes()))
        .unwrap();
    read_some_stream(&mut s, 5);
    assert!(server.engine.status().busy());
    drop(s);
    let freed = wait_idle(&server, Duration::from_millis(100));
    assert!(
        freed < Duration::from_millis(100),
        "worker still busy {freed:?} after the disconnect"
    );

    // Non-streaming client goes away while waiting.
    let mut s = TcpStream::connect(server.addr).unwrap();
    let body = chat_body(
        serde_json::json!([{"role": "user", "content": "again"}]),
        serde_json::json!({}),
    );
    s.write_all(&request("POST", CHAT, "", body.as_bytes()))
        .unwrap();
    let t = Instant::now();
    while !server.engine.status().busy() && t.elapsed() < Duration::from_secs(10) {
        std::thread::sleep(Duration::from_millis(1));
    }
    std::thread::sleep(Duration::from_millis(20));
    drop(s);
    let freed = wait_idle(&server, Duration::from_millis(100));
    assert!(
        freed < Duration::from_millis(100),
        "worker still busy {freed:?} after a non-streaming disconnect"
    );

    // The worker serves the next request.
    let r = post(
        server.addr,
        CHAT,
        &chat_body(
            serde_json::json!([{"role": "user", "content": "x"}]),
            serde_json::json!({"max_tokens": 3}),
        ),
    );
    assert_eq!(r.status, 200, "{}", r.text());
}

#[test]
fn concurrent_streaming_clients_get_whole_uncorrupted_streams() {
    let reply = "The quick brown fox jumps over the lazy dog 0123456789 ünïcödé ✓";
    let server = start(
        ScriptedRunner::new(&[reply], 1 << 20),
        ServerConfig::default(),
    );
    let addr = server.addr;
    let handles: Vec<_> = (0..32)
        .map(|i| {
            std::thread::spawn(move || {
                let body = chat_body(
                    serde_json::json!([{"role": "user", "content": format!("client {i}")}]),
                    serde_json::json!({"stream": true}),
                );
                let r = post(addr, CHAT, &body);
                assert_eq!(r.status, 200);
                let events = sse_events(&r.text());
                assert_eq!(events.last().unwrap().1, "[DONE]");
                let mut text = String::new();
                let mut id = None;
                for (_, d) in &events[..events.len() - 1] {
                    let v: Value = serde_json::from_str(d).unwrap();
                    let this = v["id"].as_str().unwrap().to_string();
                    assert_eq!(
                        id.get_or_insert_with(|| this.clone()),
                        &this,
                        "chunks of two requests mixed"
                    );
                    if let Some(t) = v["choices"][0]["delta"]["content"].as_str() {
                        text.push_str(t);
                    }
                }
                text
            })
        })
        .collect();
    for h in handles {
        assert_eq!(h.join().unwrap(), reply);
    }
    // The worker counts a job as completed just after it sent the job's last event, so the
    // last client can read [DONE] a moment before the count moves.
    let t = Instant::now();
    while server.engine.status().completed() < 32 && t.elapsed() < Duration::from_secs(5) {
        std::thread::sleep(Duration::from_millis(1));
    }
    assert_eq!(server.engine.status().completed(), 32);
}

#[test]
fn stop_strings_cut_the_text_and_finish_with_stop() {
    let server = start(
        ScriptedRunner::new(&["one two STOP three"], 4096),
        ServerConfig::default(),
    );
    let r = post(
        server.addr,
        CHAT,
        &chat_body(
            serde_json::json!([{"role": "user", "content": "count"}]),
            serde_json::json!({"stop": ["STOP"]}),
        ),
    );
    let v = r.json();
    assert_eq!(v["choices"][0]["message"]["content"], "one two ");
    assert_eq!(v["choices"][0]["finish_reason"], "stop");
    let r = post(
        server.addr,
        CHAT,
        &chat_body(
            serde_json::json!([{"role": "user", "content": "count"}]),
            serde_json::json!({"max_tokens": 3}),
        ),
    );
    assert_eq!(r.json()["choices"][0]["finish_reason"], "length");
    assert_eq!(r.json()["choices"][0]["message"]["content"], "one");
}

#[test]
fn tool_call_turn_replayed_from_client_json_reuses_the_live_session() {
    let block = "\n\n<｜DSML｜tool_calls>\n<｜DSML｜invoke name=\"bash\">\n\
<｜DSML｜parameter name=\"command\" string=\"true\">ls   -la</｜DSML｜parameter>\n\
<｜DSML｜parameter name=\"timeout\" string=\"false\">10</｜DSML｜parameter>\n\
</｜DSML｜invoke>\n</｜DSML｜tool_calls>";
    let reply = format!("Need ls.</think>{block}");
    let trace_path =
        std::env::temp_dir().join(format!("ds4-server-trace-{}.txt", std::process::id()));
    let _ = std::fs::remove_file(&trace_path);
    let trace = ds4_server::trace::Trace::create(&trace_path).unwrap();
    let server = support::start_with(
        ScriptedRunner::new(&[reply.as_str(), "Counted.</think>Two files."], 1 << 16),
        ServerConfig::default(),
        Some(trace),
    );
    let tools = serde_json::json!([{"type": "function", "function": {"name": "bash", "description": "Run a command",
        "parameters": {"type": "object", "properties": {"command": {"type": "string"}, "timeout": {"type": "integer"}}}}}]);
    let user = serde_json::json!({"role": "user", "content": "List files"});
    let body = serde_json::json!({"messages": [user], "tools": tools}).to_string();
    let first = post(server.addr, CHAT, &body).json();
    let choice = &first["choices"][0];
    assert_eq!(choice["finish_reason"], "tool_calls");
    let call = &choice["message"]["tool_calls"][0];
    assert_eq!(call["function"]["name"], "bash");
    let args: Value =
        serde_json::from_str(call["function"]["arguments"].as_str().unwrap()).unwrap();
    assert_eq!(
        args,
        serde_json::json!({"command": "ls   -la", "timeout": 10})
    );
    let p1 = first["usage"]["prompt_tokens"].as_u64().unwrap();
    let generated = ByteCodec.encode(&reply).len() as u64;

    // The client sends the call back in its own JSON (arguments re-serialized: the spacing of
    // the sampled block is not recoverable from it) plus the tool result.
    let assistant = serde_json::json!({"role": "assistant", "content": null,
        "reasoning_content": choice["message"]["reasoning_content"], "tool_calls": [call]});
    let tool =
        serde_json::json!({"role": "tool", "tool_call_id": call["id"], "content": "a.txt\nb.txt"});
    let body = serde_json::json!({"messages": [user, assistant, tool], "tools": tools}).to_string();
    let second = post(server.addr, CHAT, &body).json();
    assert_eq!(second["choices"][0]["message"]["content"], "Two files.");
    let cached = second["usage"]["prompt_tokens_details"]["cached_tokens"]
        .as_u64()
        .unwrap();
    assert_eq!(
        cached,
        p1 + generated,
        "the whole first turn, tool block included, is reused"
    );
    let suffix = ByteCodec.encode("<｜end▁of▁sentence｜><｜User｜><tool_result>a.txt\nb.txt</tool_result><｜Assistant｜><think>");
    assert_eq!(
        second["usage"]["prompt_tokens"].as_u64().unwrap() - cached,
        suffix.len() as u64
    );

    // The trace shows the rendered prompt: tool schema, exact replayed block, tool result.
    let trace = std::fs::read_to_string(&trace_path).unwrap();
    assert_eq!(trace.matches("=== request ").count(), 2);
    let second_prompt = trace.split("=== request ").nth(2).unwrap();
    assert!(second_prompt.contains("\"name\":\"bash\""));
    assert!(second_prompt.contains(&format!("Need ls.</think>{block}<｜end▁of▁sentence｜>")));
    assert!(second_prompt.contains("<tool_result>a.txt\nb.txt</tool_result>"));
    let _ = std::fs::remove_file(&trace_path);
}

#[test]
fn slow_prefill_streams_keepalive_comments_before_the_first_token() {
    let runner = ScriptedRunner::new(&["ok"], 4096).with_delay(Duration::from_millis(300));
    let config = ServerConfig {
        keepalive: Duration::from_millis(50),
        ..ServerConfig::default()
    };
    let server = start(runner, config);
    let body = chat_body(
        serde_json::json!([{"role": "user", "content": "hi"}]),
        serde_json::json!({"stream": true}),
    );
    let r = post(server.addr, CHAT, &body);
    let text = r.text();
    let keepalive = text.find(": prefill\n\n").expect("no keep-alive comment");
    let first_token = text.find("\"content\":\"o").expect("no content");
    assert!(keepalive < first_token, "{text}");
    assert!(text.ends_with("data: [DONE]\n\n"));
}

const BLOCK: &str = "\n\n<｜DSML｜tool_calls>\n<｜DSML｜invoke name=\"get_weather\">\n\
<｜DSML｜parameter name=\"city\" string=\"true\">Paris</｜DSML｜parameter>\n\
<｜DSML｜parameter name=\"days\" string=\"false\">3</｜DSML｜parameter>\n\
</｜DSML｜invoke>\n</｜DSML｜tool_calls>";

#[test]
fn anthropic_tool_use_round_trip_reuses_the_session() {
    let reply = format!("Look it up.</think>{BLOCK}");
    let server = start(
        ScriptedRunner::new(&[reply.as_str(), "Done.</think>Sunny."], 1 << 16),
        ServerConfig::default(),
    );
    let tools = serde_json::json!([{"name": "get_weather", "description": "Weather",
        "input_schema": {"type": "object", "properties": {"city": {"type": "string"}, "days": {"type": "integer"}}}}]);
    let user = serde_json::json!({"role": "user", "content": "Weather in Paris?"});
    let body =
        serde_json::json!({"max_tokens": 500, "messages": [user], "tools": tools}).to_string();
    let first = post(server.addr, "/v1/messages", &body).json();
    assert_eq!(first["stop_reason"], "tool_use");
    let content = first["content"].as_array().unwrap();
    assert_eq!(content[0]["type"], "thinking");
    assert_eq!(content[0]["thinking"], "Look it up.");
    let tool_use = content.iter().find(|b| b["type"] == "tool_use").unwrap();
    assert!(tool_use["id"].as_str().unwrap().starts_with("toolu_"));
    assert_eq!(
        tool_use["input"],
        serde_json::json!({"city": "Paris", "days": 3})
    );
    let live = first["usage"]["input_tokens"].as_u64().unwrap()
        + first["usage"]["cache_read_input_tokens"].as_u64().unwrap()
        + ByteCodec.encode(&reply).len() as u64;

    let assistant = serde_json::json!({"role": "assistant", "content": content});
    let result = serde_json::json!({"role": "user", "content": [
        {"type": "tool_result", "tool_use_id": tool_use["id"], "content": "sunny"}]});
    let body = serde_json::json!({"max_tokens": 500, "messages": [user, assistant, result], "tools": tools}).to_string();
    let second = post(server.addr, "/v1/messages", &body).json();
    assert_eq!(second["stop_reason"], "end_turn");
    assert_eq!(second["content"][1]["text"], "Sunny.");
    assert_eq!(
        second["usage"]["cache_read_input_tokens"].as_u64().unwrap(),
        live
    );
    let suffix = ByteCodec.encode(
        "<｜end▁of▁sentence｜><｜User｜><tool_result>sunny</tool_result><｜Assistant｜><think>",
    );
    assert_eq!(
        second["usage"]["input_tokens"].as_u64().unwrap(),
        suffix.len() as u64
    );
}

#[test]
fn responses_function_call_round_trip_reuses_the_session() {
    let reply = format!("Look it up.</think>{BLOCK}");
    let server = start(
        ScriptedRunner::new(&[reply.as_str(), "Done.</think>Sunny."], 1 << 16),
        ServerConfig::default(),
    );
    let tools = serde_json::json!([{"type": "function", "name": "get_weather",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}, "days": {"type": "integer"}}}}]);
    let user = serde_json::json!({"role": "user", "content": "Weather in Paris?"});
    let body =
        serde_json::json!({"input": [user], "tools": tools, "reasoning": {"summary": "auto"}})
            .to_string();
    let first = post(server.addr, "/v1/responses", &body).json();
    assert_eq!(first["status"], "completed");
    let output = first["output"].as_array().unwrap();
    let kinds: Vec<&str> = output.iter().map(|o| o["type"].as_str().unwrap()).collect();
    assert_eq!(kinds, ["reasoning", "function_call"]);
    let call = &output[1];
    let args: Value = serde_json::from_str(call["arguments"].as_str().unwrap()).unwrap();
    assert_eq!(args, serde_json::json!({"city": "Paris", "days": 3}));
    let live =
        first["usage"]["input_tokens"].as_u64().unwrap() + ByteCodec.encode(&reply).len() as u64;

    // Codex-style replay: reasoning item, function_call item, function_call_output item.
    let input = serde_json::json!([
        user,
        {"type": "reasoning", "summary": [{"type": "summary_text", "text": "Look it up."}]},
        {"type": "function_call", "call_id": call["call_id"], "name": "get_weather", "arguments": call["arguments"]},
        {"type": "function_call_output", "call_id": call["call_id"], "output": "sunny"}
    ]);
    let body = serde_json::json!({"input": input, "tools": tools}).to_string();
    let second = post(server.addr, "/v1/responses", &body).json();
    assert_eq!(second["output"][0]["content"][0]["text"], "Sunny.");
    let cached = second["usage"]["input_tokens_details"]["cached_tokens"]
        .as_u64()
        .unwrap();
    assert_eq!(cached, live);
    assert_eq!(
        second["usage"]["output_tokens_details"]["reasoning_tokens"],
        5
    );
}

#[test]
fn rendered_text_prefix_is_reused_when_tokens_differ() {
    // The model spells "<｜User｜>" byte by byte; the re-rendered history tokenizes it as the
    // special id, so only the rendered-bytes path can match the live session.
    let mut reply: Vec<u32> = "ab".bytes().map(u32::from).collect();
    reply.extend("<｜User｜>".bytes().map(u32::from));
    reply.extend("cd".bytes().map(u32::from));
    let server = start(
        ScriptedRunner::from_tokens(vec![reply.clone(), vec![u32::from(b'z')]], 4096),
        ServerConfig::default(),
    );
    let user = serde_json::json!({"role": "user", "content": "hi"});
    let first = post(
        server.addr,
        CHAT,
        &chat_body(serde_json::json!([user]), serde_json::json!({})),
    )
    .json();
    let text = first["choices"][0]["message"]["content"]
        .as_str()
        .unwrap()
        .to_string();
    assert_eq!(text, "ab<｜User｜>cd");
    let p1 = first["usage"]["prompt_tokens"].as_u64().unwrap();
    let messages = serde_json::json!([user, {"role": "assistant", "content": text}, {"role": "user", "content": "more"}]);
    let second = post(
        server.addr,
        CHAT,
        &chat_body(messages, serde_json::json!({})),
    )
    .json();
    let cached = second["usage"]["prompt_tokens_details"]["cached_tokens"]
        .as_u64()
        .unwrap();
    assert_eq!(cached, p1 + reply.len() as u64);
    let suffix = ByteCodec.encode("<｜end▁of▁sentence｜><｜User｜>more<｜Assistant｜></think>");
    assert_eq!(
        second["usage"]["prompt_tokens"].as_u64().unwrap() - cached,
        suffix.len() as u64
    );
}

#[test]
fn cors_headers_when_enabled() {
    let config = ServerConfig {
        cors: true,
        ..ServerConfig::default()
    };
    let server = start(ScriptedRunner::new(&["ok"], 4096), config);
    let pre = support::raw(
        server.addr,
        &request(
            "OPTIONS",
            CHAT,
            "Origin: http://example.com\r\nAccess-Control-Request-Method: POST\r\nAccess-Control-Request-Headers: content-type, authorization\r\n",
            b"",
        ),
    );
    assert!(pre.status == 200 || pre.status == 204, "{}", pre.status);
    assert!(
        pre.headers
            .to_ascii_lowercase()
            .contains("access-control-allow-origin: *"),
        "{}",
        pre.headers
    );
    let r = support::raw(
        server.addr,
        &request("GET", "/v1/models", "Origin: http://example.com\r\n", b""),
    );
    assert!(
        r.headers
            .to_ascii_lowercase()
            .contains("access-control-allow-origin: *"),
        "{}",
        r.headers
    );
    // Without --cors, no CORS headers.
    let plain = start(ScriptedRunner::new(&["ok"], 4096), ServerConfig::default());
    let r = support::raw(
        plain.addr,
        &request("GET", "/v1/models", "Origin: http://example.com\r\n", b""),
    );
    assert!(!r
        .headers
        .to_ascii_lowercase()
        .contains("access-control-allow-origin"));
}

#[test]
fn thinking_turn_is_reused_when_the_client_drops_the_reasoning() {
    let reply = "Let me think.</think>Hello!";
    let server = start(
        ScriptedRunner::new(&[reply, "Hm.</think>Bye."], 4096),
        ServerConfig::default(),
    );
    let user = serde_json::json!({"role": "user", "content": "hi"});
    let body = serde_json::json!({"messages": [user]}).to_string();
    let first = post(server.addr, CHAT, &body).json();
    assert_eq!(
        first["choices"][0]["message"]["reasoning_content"],
        "Let me think."
    );
    assert_eq!(first["choices"][0]["message"]["content"], "Hello!");
    let p1 = first["usage"]["prompt_tokens"].as_u64().unwrap();
    assert_eq!(
        first["usage"]["completion_tokens_details"]["reasoning_tokens"],
        13
    );
    // A plain chat client sends back only the visible answer.
    let messages = serde_json::json!([user, {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "bye"}]);
    let second = post(
        server.addr,
        CHAT,
        &serde_json::json!({"messages": messages}).to_string(),
    )
    .json();
    assert_eq!(second["choices"][0]["message"]["content"], "Bye.");
    let cached = second["usage"]["prompt_tokens_details"]["cached_tokens"]
        .as_u64()
        .unwrap();
    assert_eq!(
        cached,
        p1 + ByteCodec.encode(reply).len() as u64,
        "the live session, reasoning included"
    );
    let suffix = ByteCodec.encode("<｜end▁of▁sentence｜><｜User｜>bye<｜Assistant｜><think>");
    assert_eq!(
        second["usage"]["prompt_tokens"].as_u64().unwrap() - cached,
        suffix.len() as u64
    );
}

#[test]
fn tool_call_turn_is_reused_when_the_client_drops_the_reasoning() {
    let reply = format!("Check the weather.</think>{BLOCK}");
    let server = start(
        ScriptedRunner::new(&[reply.as_str(), "Ok.</think>Sunny."], 1 << 16),
        ServerConfig::default(),
    );
    let tools = serde_json::json!([{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]);
    let user = serde_json::json!({"role": "user", "content": "Weather?"});
    let first = post(
        server.addr,
        CHAT,
        &serde_json::json!({"messages": [user], "tools": tools}).to_string(),
    )
    .json();
    let call = first["choices"][0]["message"]["tool_calls"][0].clone();
    let p1 = first["usage"]["prompt_tokens"].as_u64().unwrap();
    // No reasoning_content in the replayed assistant message.
    let assistant = serde_json::json!({"role": "assistant", "content": "", "tool_calls": [call]});
    let tool = serde_json::json!({"role": "tool", "tool_call_id": call["id"], "content": "sunny"});
    let body = serde_json::json!({"messages": [user, assistant, tool], "tools": tools}).to_string();
    let second = post(server.addr, CHAT, &body).json();
    assert_eq!(second["choices"][0]["message"]["content"], "Sunny.");
    let cached = second["usage"]["prompt_tokens_details"]["cached_tokens"]
        .as_u64()
        .unwrap();
    assert_eq!(cached, p1 + ByteCodec.encode(&reply).len() as u64);
}
