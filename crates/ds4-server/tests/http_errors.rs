//! Malformed requests over raw HTTP: each gets the right 4xx status in its API's error shape,
//! and the server keeps serving afterwards.

mod support;

use ds4_server::testing::ScriptedRunner;
use ds4_server::ServerConfig;
use serde_json::Value;
use support::{get, raw, request, start};

#[derive(Clone, Copy, Debug, PartialEq)]
enum Shape {
    OpenAi,
    Anthropic,
}

struct Case {
    name: &'static str,
    method: &'static str,
    path: &'static str,
    headers: &'static str,
    body: Vec<u8>,
    status: u16,
    shape: Shape,
    /// A substring the error message must contain.
    says: &'static str,
}

fn case(
    name: &'static str,
    path: &'static str,
    body: &str,
    status: u16,
    says: &'static str,
) -> Case {
    let shape = if path.starts_with("/v1/messages") {
        Shape::Anthropic
    } else {
        Shape::OpenAi
    };
    Case {
        name,
        method: "POST",
        path,
        headers: "",
        body: body.as_bytes().to_vec(),
        status,
        shape,
        says,
    }
}

const CHAT: &str = "/v1/chat/completions";
const COMP: &str = "/v1/completions";
const RESP: &str = "/v1/responses";
const MSGS: &str = "/v1/messages";

fn cases() -> Vec<Case> {
    let long_prompt = format!(
        r#"{{"messages":[{{"role":"user","content":"{}"}}]}}"#,
        "x".repeat(300)
    );
    let huge = format!(
        r#"{{"messages":[{{"role":"user","content":"{}"}}]}}"#,
        "y".repeat(5000)
    );
    let mut v = vec![
        case(
            "truncated JSON",
            CHAT,
            r#"{"messages":["#,
            400,
            "invalid JSON",
        ),
        case(
            "JSON array body",
            CHAT,
            "[1,2]",
            400,
            "must be a JSON object",
        ),
        case(
            "JSON string body",
            CHAT,
            r#""hi""#,
            400,
            "must be a JSON object",
        ),
        case("empty body", CHAT, "", 400, "empty"),
        case(
            "messages missing",
            CHAT,
            r#"{"model":"x"}"#,
            400,
            "'messages' is required",
        ),
        case(
            "messages a string",
            CHAT,
            r#"{"messages":"hi"}"#,
            400,
            "'messages' must be an array",
        ),
        case(
            "message a number",
            CHAT,
            r#"{"messages":[3]}"#,
            400,
            "must be an object",
        ),
        case(
            "role missing",
            CHAT,
            r#"{"messages":[{"content":"hi"}]}"#,
            400,
            "role' is required",
        ),
        case(
            "role unknown",
            CHAT,
            r#"{"messages":[{"role":"wizard","content":"hi"}]}"#,
            400,
            "unknown role 'wizard'",
        ),
        case(
            "role a number",
            CHAT,
            r#"{"messages":[{"role":7,"content":"hi"}]}"#,
            400,
            "role' must be a string",
        ),
        case(
            "content a number",
            CHAT,
            r#"{"messages":[{"role":"user","content":5}]}"#,
            400,
            "content' must be a string or an array",
        ),
        case(
            "content part text a number",
            CHAT,
            r#"{"messages":[{"role":"user","content":[{"type":"text","text":1}]}]}"#,
            400,
            "part text must be a string",
        ),
        case(
            "temperature a string",
            CHAT,
            r#"{"messages":[],"temperature":"hot"}"#,
            400,
            "'temperature' must be a number",
        ),
        case(
            "temperature negative",
            CHAT,
            r#"{"messages":[],"temperature":-1}"#,
            400,
            "'temperature' must be >= 0",
        ),
        case(
            "top_p above 1",
            CHAT,
            r#"{"messages":[],"top_p":2}"#,
            400,
            "'top_p' must be between 0 and 1",
        ),
        case(
            "max_tokens negative",
            CHAT,
            r#"{"messages":[],"max_tokens":-1}"#,
            400,
            "'max_tokens' must be a non-negative integer",
        ),
        case(
            "max_tokens a string",
            CHAT,
            r#"{"messages":[],"max_tokens":"10"}"#,
            400,
            "'max_tokens' must be an integer",
        ),
        case(
            "two choices",
            CHAT,
            r#"{"messages":[],"n":2}"#,
            400,
            "'n' must be 1",
        ),
        case(
            "zero choices (legacy completions)",
            COMP,
            r#"{"prompt":"x","n":0}"#,
            400,
            "'n' must be 1",
        ),
        case(
            "log probabilities",
            CHAT,
            r#"{"messages":[],"logprobs":true}"#,
            400,
            "'logprobs' is not supported",
        ),
        case(
            "top log probabilities",
            CHAT,
            r#"{"messages":[],"logprobs":false,"top_logprobs":3}"#,
            400,
            "'logprobs' is not supported",
        ),
        case(
            "log probabilities (legacy completions)",
            COMP,
            r#"{"prompt":"x","logprobs":0}"#,
            400,
            "'logprobs' is not supported",
        ),
        case(
            "stream a string",
            CHAT,
            r#"{"messages":[],"stream":"yes"}"#,
            400,
            "'stream' must be a boolean",
        ),
        case(
            "stop a number",
            CHAT,
            r#"{"messages":[],"stop":5}"#,
            400,
            "'stop' must be a string or an array",
        ),
        case(
            "stop array with a number",
            CHAT,
            r#"{"messages":[],"stop":["a",1]}"#,
            400,
            "'stop' must be a string or an array",
        ),
        case(
            "tools not an array",
            CHAT,
            r#"{"messages":[],"tools":{}}"#,
            400,
            "'tools' must be an array",
        ),
        case(
            "tool without function",
            CHAT,
            r#"{"messages":[],"tools":[{"type":"function"}]}"#,
            400,
            "'tools[0]' must be an object with a 'function'",
        ),
        case(
            "tool_calls not an array",
            CHAT,
            r#"{"messages":[{"role":"assistant","tool_calls":{}}]}"#,
            400,
            "tool_calls' must be an array",
        ),
        case(
            "tool call without name",
            CHAT,
            r#"{"messages":[{"role":"assistant","tool_calls":[{"id":"c","function":{}}]}]}"#,
            400,
            "function.name",
        ),
        case(
            "reasoning_effort unknown",
            CHAT,
            r#"{"messages":[],"reasoning_effort":"extreme"}"#,
            400,
            "'reasoning_effort' must be one of",
        ),
        case(
            "thinking a string",
            CHAT,
            r#"{"messages":[],"thinking":"maybe"}"#,
            400,
            "'thinking' must be a boolean or an object",
        ),
        case(
            "thinking type unknown",
            CHAT,
            r#"{"messages":[],"thinking":{"type":"sometimes"}}"#,
            400,
            "thinking.type",
        ),
        case(
            "seed a float",
            CHAT,
            r#"{"messages":[],"seed":1.5}"#,
            400,
            "'seed' must be an integer",
        ),
        case(
            "stream_options a string",
            CHAT,
            r#"{"messages":[],"stream_options":"x"}"#,
            400,
            "'stream_options' must be an object",
        ),
        case(
            "prompt over the context",
            CHAT,
            &long_prompt,
            400,
            "maximum context length",
        ),
        case("body over the limit", CHAT, &huge, 413, "limit"),
        case(
            "completions prompt missing",
            COMP,
            r#"{"model":"x"}"#,
            400,
            "'prompt' is required",
        ),
        case(
            "completions prompt a number",
            COMP,
            r#"{"prompt":42}"#,
            400,
            "'prompt' must be a string",
        ),
        case(
            "completions two prompts",
            COMP,
            r#"{"prompt":["a","b"]}"#,
            400,
            "exactly one string",
        ),
        case(
            "responses input missing",
            RESP,
            r#"{"model":"x"}"#,
            400,
            "'input' is required",
        ),
        case(
            "responses input a number",
            RESP,
            r#"{"input":1}"#,
            400,
            "'input' must be a string or an array",
        ),
        case(
            "responses previous_response_id",
            RESP,
            r#"{"input":"hi","previous_response_id":"resp_1"}"#,
            400,
            "'previous_response_id' is not supported",
        ),
        case(
            "responses conversation",
            RESP,
            r#"{"input":"hi","conversation":"c"}"#,
            400,
            "'conversation' is not supported",
        ),
        case(
            "responses item type unknown",
            RESP,
            r#"{"input":[{"type":"telepathy"}]}"#,
            400,
            "'telepathy' is not supported",
        ),
        case(
            "responses call without call_id",
            RESP,
            r#"{"input":[{"type":"function_call","name":"f","arguments":"{}"}]}"#,
            400,
            "call_id' is required",
        ),
        case(
            "responses role unknown",
            RESP,
            r#"{"input":[{"type":"message","role":"oracle","content":"x"}]}"#,
            400,
            "unknown role 'oracle'",
        ),
        case(
            "responses effort unknown",
            RESP,
            r#"{"input":"x","reasoning":{"effort":"ultra"}}"#,
            400,
            "'reasoning.effort' must be one of",
        ),
        case("messages invalid JSON", MSGS, "{nope", 400, "invalid JSON"),
        case(
            "messages system role",
            MSGS,
            r#"{"max_tokens":5,"messages":[{"role":"system","content":"x"}]}"#,
            400,
            "unknown role 'system'",
        ),
        case(
            "messages block type unknown",
            MSGS,
            r#"{"max_tokens":5,"messages":[{"role":"user","content":[{"type":"hologram"}]}]}"#,
            400,
            "'hologram' is not valid",
        ),
        case(
            "messages tool_use input a string",
            MSGS,
            r#"{"max_tokens":5,"messages":[{"role":"assistant","content":[{"type":"tool_use","id":"t","name":"f","input":"x"}]}]}"#,
            400,
            "input' must be an object",
        ),
        case(
            "messages system a number",
            MSGS,
            r#"{"max_tokens":5,"system":3,"messages":[]}"#,
            400,
            "'system' must be a string or an array",
        ),
        case(
            "messages stop_sequences a number",
            MSGS,
            r#"{"max_tokens":5,"stop_sequences":1,"messages":[]}"#,
            400,
            "'stop_sequences' must be a string or an array",
        ),
        case(
            "messages tool_result in assistant",
            MSGS,
            r#"{"max_tokens":5,"messages":[{"role":"assistant","content":[{"type":"tool_result","tool_use_id":"t","content":"x"}]}]}"#,
            400,
            "not valid in a assistant message",
        ),
        case(
            "messages body not an object",
            MSGS,
            "[]",
            400,
            "must be a JSON object",
        ),
        case(
            "messages over the context",
            MSGS,
            &format!(
                r#"{{"max_tokens":5,"messages":[{{"role":"user","content":"{}"}}]}}"#,
                "z".repeat(300)
            ),
            400,
            "maximum context length",
        ),
    ];
    let mut bad_utf8 = br#"{"messages":[{"role":"user","content":""#.to_vec();
    bad_utf8.extend_from_slice(&[0xff, 0xfe]);
    bad_utf8.extend_from_slice(br#""}]}"#);
    v.push(Case {
        name: "non-UTF-8 body",
        method: "POST",
        path: CHAT,
        headers: "",
        body: bad_utf8.clone(),
        status: 400,
        shape: Shape::OpenAi,
        says: "not valid UTF-8",
    });
    v.push(Case {
        name: "non-UTF-8 body (messages)",
        method: "POST",
        path: MSGS,
        headers: "",
        body: bad_utf8,
        status: 400,
        shape: Shape::Anthropic,
        says: "not valid UTF-8",
    });
    v.push(Case {
        name: "unknown route",
        method: "POST",
        path: "/v1/teleport",
        headers: "",
        body: b"{}".to_vec(),
        status: 404,
        shape: Shape::OpenAi,
        says: "no route",
    });
    v.push(Case {
        name: "GET on a POST route",
        method: "GET",
        path: CHAT,
        headers: "",
        body: Vec::new(),
        status: 405,
        shape: Shape::OpenAi,
        says: "not allowed",
    });
    v.push(Case {
        name: "unknown model",
        method: "GET",
        path: "/v1/models/gpt-9",
        headers: "",
        body: Vec::new(),
        status: 404,
        shape: Shape::OpenAi,
        says: "does not exist",
    });
    v
}

fn check_shape(c: &Case, body: &Value) {
    let message = match c.shape {
        Shape::OpenAi => {
            let e = &body["error"];
            assert!(e["type"].is_string(), "{}: no error.type in {body}", c.name);
            assert!(
                e.get("code").is_some() && e.get("param").is_some(),
                "{}: OpenAI shape lacks code/param: {body}",
                c.name
            );
            e["message"].as_str()
        }
        Shape::Anthropic => {
            assert_eq!(body["type"], "error", "{}: {body}", c.name);
            assert!(body["error"]["type"].is_string(), "{}: {body}", c.name);
            body["error"]["message"].as_str()
        }
    };
    let message = message.unwrap_or_else(|| panic!("{}: no message in {body}", c.name));
    assert!(
        message.contains(c.says),
        "{}: message {message:?} lacks {:?}",
        c.name,
        c.says
    );
}

#[test]
fn malformed_requests_get_4xx_in_each_api_shape_and_the_server_survives() {
    let config = ServerConfig {
        body_limit: 4096,
        ..ServerConfig::default()
    };
    let server = start(ScriptedRunner::new(&["ok"], 256), config);
    let cases = cases();
    assert!(cases.len() >= 30, "only {} cases", cases.len());
    for c in &cases {
        let r = raw(server.addr, &request(c.method, c.path, c.headers, &c.body));
        assert_eq!(
            r.status,
            c.status,
            "{}: status {} body {}",
            c.name,
            r.status,
            r.text()
        );
        assert!(
            r.headers
                .to_ascii_lowercase()
                .contains("content-type: application/json"),
            "{}: {}",
            c.name,
            r.headers
        );
        check_shape(c, &r.json());
    }
    // Still serving, and the context error carries ds4's numbers.
    assert_eq!(get(server.addr, "/v1/models").status, 200);
    let long = format!(
        r#"{{"messages":[{{"role":"user","content":"{}"}}]}}"#,
        "x".repeat(300)
    );
    let r = support::post(server.addr, CHAT, &long);
    let e = &r.json()["error"];
    assert_eq!(e["code"], "context_length_exceeded");
    assert_eq!(e["n_ctx"], 256);
    assert!(e["n_prompt_tokens"].as_u64().unwrap() >= 300);
    let ok = support::post(
        server.addr,
        CHAT,
        r#"{"messages":[{"role":"user","content":"hi"}],"think":false}"#,
    );
    assert_eq!(ok.status, 200, "{}", ok.text());
    assert_eq!(ok.json()["choices"][0]["message"]["content"], "ok");
}

#[test]
fn api_key_is_required_when_configured() {
    let config = ServerConfig {
        api_key: Some("sekret".into()),
        ..ServerConfig::default()
    };
    let server = start(ScriptedRunner::new(&["ok"], 256), config);
    let body = br#"{"messages":[{"role":"user","content":"hi"}],"think":false}"#;
    let none = raw(server.addr, &request("POST", CHAT, "", body));
    assert_eq!(none.status, 401);
    assert_eq!(none.json()["error"]["type"], "authentication_error");
    let wrong = raw(
        server.addr,
        &request("POST", MSGS, "x-api-key: nope\r\n", body),
    );
    assert_eq!(wrong.status, 401);
    assert_eq!(wrong.json()["type"], "error");
    assert_eq!(wrong.json()["error"]["type"], "authentication_error");
    let bearer = raw(
        server.addr,
        &request("POST", CHAT, "Authorization: Bearer sekret\r\n", body),
    );
    assert_eq!(bearer.status, 200, "{}", bearer.text());
    let xkey = raw(
        server.addr,
        &request("GET", "/v1/models", "x-api-key: sekret\r\n", b""),
    );
    assert_eq!(xkey.status, 200);
    // CORS preflight needs no key.
    let pre = raw(server.addr, &request("OPTIONS", CHAT, "", b""));
    assert_eq!(pre.status, 204);
}
