//! Mutated requests (seeded, reproducible) against every POST route: every answer is a 200 or a
//! 4xx, never a 5xx or a dropped connection, and the server keeps serving.

mod support;

use ds4_server::testing::ScriptedRunner;
use ds4_server::ServerConfig;
use support::{get, raw, request, start};

const SEEDS: [&str; 4] = [
    r#"{"model":"m","messages":[{"role":"system","content":"s"},{"role":"user","content":[{"type":"text","text":"hi"}]},{"role":"assistant","content":null,"reasoning_content":"r","tool_calls":[{"id":"call_1","type":"function","function":{"name":"f","arguments":"{\"a\":1}"}}]},{"role":"tool","tool_call_id":"call_1","content":"ok"}],"tools":[{"type":"function","function":{"name":"f","parameters":{"type":"object"}}}],"max_tokens":4,"temperature":0.5,"top_p":0.9,"stop":["x"],"stream":false,"think":false}"#,
    r#"{"model":"m","prompt":"once","max_tokens":4,"stream":true,"stream_options":{"include_usage":true},"reasoning_effort":"none"}"#,
    r#"{"model":"m","instructions":"i","input":[{"role":"user","content":"q"},{"type":"function_call","call_id":"c","name":"f","arguments":"{}"},{"type":"function_call_output","call_id":"c","output":"o"}],"tools":[{"type":"function","name":"f"}],"max_output_tokens":4,"reasoning":{"effort":"none","summary":"auto"}}"#,
    r#"{"model":"m","max_tokens":4,"system":[{"type":"text","text":"s"}],"messages":[{"role":"user","content":"q"},{"role":"assistant","content":[{"type":"thinking","thinking":"t"},{"type":"tool_use","id":"t1","name":"f","input":{"a":[1,2]}}]},{"role":"user","content":[{"type":"tool_result","tool_use_id":"t1","content":[{"type":"text","text":"r"}]}]}],"thinking":{"type":"disabled"},"stop_sequences":["z"],"stream":true}"#,
];
const ROUTES: [&str; 4] = [
    "/v1/chat/completions",
    "/v1/completions",
    "/v1/responses",
    "/v1/messages",
];

/// xorshift64*: reproducible pseudo-random numbers for the mutations.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
}

const SNIPPETS: [&str; 14] = [
    "null",
    "-1",
    "1e400",
    "\"\"",
    "[]",
    "{}",
    "true",
    "\"\u{fffd}\"",
    "0.5",
    "\"user\"",
    "[{}]",
    "\"none\"",
    "18446744073709551616",
    "\"<｜end▁of▁sentence｜>\"",
];

fn mutate(rng: &mut Rng, seed: &str) -> Vec<u8> {
    let mut b = seed.as_bytes().to_vec();
    for _ in 0..1 + rng.below(3) {
        let at = rng.below(b.len());
        match rng.below(5) {
            0 => {
                let end = (at + 1 + rng.below(8)).min(b.len());
                b.drain(at..end);
            }
            1 => b.insert(at, (rng.next() & 0xff) as u8),
            2 => {
                // Replace a JSON value after a colon with another kind of value.
                if let Some(colon) = b[at..].iter().position(|&c| c == b':').map(|p| p + at) {
                    let end = b[colon + 1..]
                        .iter()
                        .position(|&c| c == b',' || c == b'}')
                        .map(|p| p + colon + 1)
                        .unwrap_or(b.len());
                    let snip = SNIPPETS[rng.below(SNIPPETS.len())].as_bytes();
                    b.splice(colon + 1..end, snip.iter().copied());
                }
            }
            3 => b.truncate(at),
            _ => {
                let end = (at + 1 + rng.below(16)).min(b.len());
                let copy = b[at..end].to_vec();
                let to = rng.below(b.len());
                b.splice(to..to, copy);
            }
        }
    }
    b
}

#[test]
fn mutated_requests_never_get_a_5xx() {
    let server = start(ScriptedRunner::new(&["ok"], 512), ServerConfig::default());
    let mut rng = Rng(0x5eed_1234_abcd_0001);
    let mut statuses = std::collections::BTreeMap::new();
    for i in 0..600 {
        let seed = SEEDS[i % SEEDS.len()];
        let route = ROUTES[rng.below(ROUTES.len())];
        let body = mutate(&mut rng, seed);
        let r = raw(server.addr, &request("POST", route, "", &body));
        assert!(
            r.status == 200 || (400..500).contains(&r.status),
            "status {} for {route} {}: {}",
            r.status,
            String::from_utf8_lossy(&body),
            r.text()
        );
        if r.status != 200 {
            // Errors are JSON in the route's shape.
            let v = r.json();
            assert!(v.get("error").is_some(), "{route}: {v}");
        }
        *statuses.entry(r.status).or_insert(0) += 1;
    }
    assert!(
        statuses.len() >= 2,
        "mutations should both pass and fail: {statuses:?}"
    );
    assert_eq!(get(server.addr, "/v1/models").status, 200);
}
