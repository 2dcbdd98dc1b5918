//! Greedy decode steps: at temperature 0 and for DSML structure the engine evaluates a token
//! with `ModelRunner::decode_greedy` (the pick on the backend's device) instead of sampling
//! from downloaded logits, with the same output; the live logits stay usable by the next job.

mod support;

use std::sync::Arc;

use ds4_server::engine::{Engine, EngineOptions};
use ds4_server::job::{FinishReason, GenEvent, GenJob, Sampling, ToolIdStyle, Usage};
use ds4_server::testing::{ByteCodec, ScriptedRunner};
use ds4_server::{ModelRunner, ServerConfig, TextCodec};
use ds4_text::sampler::DsmlDecodeTracker;
use serde_json::Value;
use support::{post, start};

const CHAT: &str = "/v1/chat/completions";

/// The scripted model behind the trait's default `decode_greedy` (an eval, then the argmax of
/// the host logits): what the engine picked before greedy steps moved into the runner.
struct HostGreedy(ScriptedRunner);

impl ModelRunner for HostGreedy {
    fn vocab_size(&self) -> usize {
        self.0.vocab_size()
    }
    fn ctx(&self) -> usize {
        self.0.ctx()
    }
    fn tokens(&self) -> &[u32] {
        self.0.tokens()
    }
    fn eval(&mut self, tokens: &[u32]) -> Result<(), String> {
        self.0.eval(tokens)
    }
    fn logits(&self) -> &[f32] {
        self.0.logits()
    }
    fn reset(&mut self) {
        self.0.reset()
    }
}

#[test]
fn temperature_zero_decodes_through_decode_greedy_with_the_same_text() {
    let reply = "Hello there";
    let body = serde_json::json!({"messages": [{"role": "user", "content": "hi"}],
        "think": false, "temperature": 0})
    .to_string();

    let runner = ScriptedRunner::new(&[reply], 4096);
    let picks_handle = runner.greedy_picks();
    let sizes = runner.eval_sizes();
    let server = start(runner, ServerConfig::default());
    let device = post(server.addr, CHAT, &body).json();

    let host_runner = ScriptedRunner::new(&[reply], 4096);
    let host_picks = host_runner.greedy_picks();
    let host_sizes = host_runner.eval_sizes();
    let host_server = start(HostGreedy(host_runner), ServerConfig::default());
    let host = post(host_server.addr, CHAT, &body).json();

    assert_eq!(device["choices"][0]["message"]["content"], reply);
    assert_eq!(
        device["choices"][0]["message"],
        host["choices"][0]["message"]
    );
    assert_eq!(device["choices"][0]["finish_reason"], "stop");
    assert_eq!(device["usage"], host["usage"]);

    // The first token comes from the prefill's logits; every reply token after it is
    // evaluated by a greedy step that picks the next one (the last picks EOS), and no decode
    // step goes through eval.
    let picks = picks_handle.lock().unwrap().clone();
    let picked: Vec<u32> = picks.iter().map(|p| p.pick).collect();
    let mut expected: Vec<u32> = ByteCodec.encode(reply)[1..].to_vec();
    expected.push(ByteCodec::EOS);
    assert_eq!(picked, expected);
    let evaluated: Vec<u32> = picks.iter().map(|p| p.token).collect();
    assert_eq!(evaluated, ByteCodec.encode(reply));
    let prompt_tokens = device["usage"]["prompt_tokens"].as_u64().unwrap() as usize;
    assert_eq!(*sizes.lock().unwrap(), [prompt_tokens]);

    // The default decode_greedy is an eval: one per reply token.
    assert!(host_picks.lock().unwrap().is_empty());
    assert_eq!(host_sizes.lock().unwrap().len(), 1 + reply.len());

    // At temperature 1 (no tools) no token goes through decode_greedy.
    let before = picks.len();
    let sampled = serde_json::json!({"messages": [{"role": "user", "content": "again"}],
        "think": false, "temperature": 1})
    .to_string();
    let r = post(server.addr, CHAT, &sampled).json();
    assert_eq!(r["choices"][0]["message"]["content"], reply);
    assert_eq!(picks_handle.lock().unwrap().len(), before);
}

const BLOCK: &str = "\n\n<｜DSML｜tool_calls>\n<｜DSML｜invoke name=\"get_weather\">\n\
<｜DSML｜parameter name=\"city\" string=\"true\">Paris</｜DSML｜parameter>\n\
<｜DSML｜parameter name=\"days\" string=\"false\">3</｜DSML｜parameter>\n\
</｜DSML｜invoke>\n</｜DSML｜tool_calls>";

/// The reply positions whose token the engine must pick greedily: after each token evaluated
/// in the decode loop (all but the last, the block's closing `>`, which ends the generation),
/// the next one when the DSML tracker, fed the text after `</think>`, forces structure.
fn forced_positions(reply: &[u32]) -> Vec<usize> {
    let think_end = ByteCodec.encode("</think>")[0];
    let start = reply.iter().position(|&t| t == think_end).unwrap();
    let mut tracker = DsmlDecodeTracker::new();
    let mut out = Vec::new();
    for (i, &t) in reply
        .iter()
        .enumerate()
        .take(reply.len() - 1)
        .skip(start + 1)
    {
        tracker.push(&String::from_utf8_lossy(&ByteCodec.token_bytes(t)));
        if tracker.state().forces_greedy() {
            out.push(i + 1);
        }
    }
    out
}

#[test]
fn dsml_structure_goes_through_decode_greedy_and_payload_is_sampled() {
    let reply = format!("Look it up.</think>{BLOCK}");
    let tokens = ByteCodec.encode(&reply);
    let tools = serde_json::json!([{"type": "function", "function": {"name": "get_weather",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}, "days": {"type": "integer"}}}}}]);
    // Thinking on: the request samples at temperature 1.
    let body = serde_json::json!({"messages": [{"role": "user", "content": "Weather in Paris?"}],
        "tools": tools})
    .to_string();

    let runner = ScriptedRunner::new(&[reply.as_str()], 1 << 16);
    let picks = runner.greedy_picks();
    let server = start(runner, ServerConfig::default());
    let device = post(server.addr, CHAT, &body).json();
    let host_server = start(
        HostGreedy(ScriptedRunner::new(&[reply.as_str()], 1 << 16)),
        ServerConfig::default(),
    );
    let host = post(host_server.addr, CHAT, &body).json();

    // The tool call is the one the script dictates, and the one the host path gives.
    for r in [&device, &host] {
        let choice = &r["choices"][0];
        assert_eq!(choice["finish_reason"], "tool_calls");
        assert_eq!(choice["message"]["reasoning_content"], "Look it up.");
        let call = &choice["message"]["tool_calls"][0];
        assert_eq!(call["function"]["name"], "get_weather");
        let args: Value =
            serde_json::from_str(call["function"]["arguments"].as_str().unwrap()).unwrap();
        assert_eq!(args, serde_json::json!({"city": "Paris", "days": 3}));
    }
    assert_eq!(device["usage"], host["usage"]);

    // Exactly the structure positions were picked by decode_greedy.
    let picks = picks.lock().unwrap().clone();
    let positions: Vec<usize> = picks.iter().map(|p| p.reply_pos).collect();
    let expected = forced_positions(&tokens);
    assert_eq!(positions, expected);
    for p in &picks {
        assert_eq!(p.pick, tokens[p.reply_pos]);
        assert_eq!(p.token, tokens[p.reply_pos - 1]);
    }
    // Spot checks: the reasoning and the string payload are sampled, the tags are greedy.
    let think_end = tokens
        .iter()
        .position(|&t| t == ByteCodec.encode("</think>")[0]);
    let think_end = think_end.unwrap();
    assert!(positions.iter().all(|&p| p > think_end));
    let paris = reply.find("Paris").unwrap();
    let paris_pos = ByteCodec.encode(&reply[..paris]).len();
    assert_eq!(tokens[paris_pos], u32::from(b'P'));
    assert!(!positions.contains(&paris_pos) && !positions.contains(&(paris_pos + 1)));
    let invoke = reply.find("invoke name").unwrap();
    let invoke_pos = ByteCodec.encode(&reply[..invoke]).len();
    assert!(positions.contains(&invoke_pos) && positions.contains(&(invoke_pos + 3)));
}

fn job(prompt: &[u32], temperature: f32, max_tokens: usize) -> GenJob {
    let text: Vec<u8> = prompt
        .iter()
        .flat_map(|&t| ByteCodec.token_bytes(t))
        .collect();
    GenJob {
        request_id: "greedy-test".into(),
        prompt_text: String::from_utf8(text).unwrap(),
        prompt_tokens: prompt.to_vec(),
        sampling: Sampling {
            temperature,
            seed: 7,
            ..Sampling::default()
        },
        max_tokens,
        stop: Vec::new(),
        thinking: false,
        tools_active: false,
        tool_ids: ToolIdStyle::Call,
        chat: None,
    }
}

/// Runs a job to its end: (content, finish, usage).
fn run(engine: &Engine, job: GenJob) -> (String, FinishReason, Usage) {
    let (mut rx, _guard) = engine.submit(job);
    let mut content = String::new();
    while let Some(ev) = rx.blocking_recv() {
        match ev {
            GenEvent::Content(t) => content.push_str(&t),
            GenEvent::Done { finish, usage } => return (content, finish, usage),
            GenEvent::Failed(e) => panic!("job failed: {e}"),
            _ => {}
        }
    }
    panic!("the engine dropped the job");
}

#[test]
fn a_prompt_equal_to_the_live_session_samples_from_the_kept_logits() {
    let runner = ScriptedRunner::new(&["abcdef"], 4096);
    let sizes = runner.eval_sizes();
    let picks = runner.greedy_picks();
    let engine = Engine::start(
        Box::new(runner),
        Arc::new(ByteCodec),
        EngineOptions {
            model_name: "m".into(),
            trace: None,
            tool_memory_max_ids: 10,
        },
    );
    let prompt = ByteCodec.encode("<｜User｜>hi<｜Assistant｜></think>");
    let p = prompt.len();

    // Greedy, cut by max_tokens after a greedy step picked `d`: the pick is dropped.
    let (text, finish, usage) = run(&engine, job(&prompt, 0.0, 3));
    assert_eq!((text.as_str(), finish), ("abc", FinishReason::Length));
    assert_eq!(usage.cached_tokens, 0);
    assert!(!picks.lock().unwrap().is_empty());

    // The prompt is the live session exactly: nothing to prefill, the kept logits give `d`
    // (sampled at temperature 1), and the script runs on to EOS.
    let live = ByteCodec.encode("<｜User｜>hi<｜Assistant｜></think>abc");
    let (text, finish, usage) = run(&engine, job(&live, 1.0, 100));
    assert_eq!((text.as_str(), finish), ("def", FinishReason::Stop));
    assert_eq!((usage.prompt_tokens, usage.cached_tokens), (p + 3, p + 3));
    assert_eq!(usage.completion_tokens, 4);

    // After EOS (never evaluated) the live session is the prompt and the whole reply; the
    // same again samples from its kept logits: EOS at once, greedily this time.
    let live = ByteCodec.encode("<｜User｜>hi<｜Assistant｜></think>abcdef");
    let (text, finish, usage) = run(&engine, job(&live, 0.0, 100));
    assert_eq!((text.as_str(), finish), ("", FinishReason::Stop));
    assert_eq!((usage.prompt_tokens, usage.cached_tokens), (p + 6, p + 6));
    assert_eq!(usage.completion_tokens, 1);

    // One prefill in all: the later jobs evaluated only single decode steps.
    let sizes = sizes.lock().unwrap().clone();
    assert_eq!(sizes.iter().filter(|&&n| n > 1).count(), 1, "{sizes:?}");
    assert_eq!(sizes[0], p);
}
