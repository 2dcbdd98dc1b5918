//! `ds4 serve --kv-disk-dir` end to end, on the bundled tiny test model (real tokenizer,
//! random weights): a cold save on a total miss, a shutdown save on SIGTERM, a restarted server
//! that answers every API (chat completions, completions, messages, responses) from the disk
//! checkpoint by prefilling only the suffix, corrupt files skipped with a warning, and a full
//! disk that never stops the serving.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{mpsc, Arc, Mutex};
use std::time::Duration;

use ds4_kvstore::{KvFile, SaveReason};
use serde_json::{json, Value};

fn tiny_model() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("assets/tiny-test-model.gguf")
}

/// An empty directory for one test.
fn scratch(name: &str) -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("serve_kv_disk-{name}"));
    if dir.exists() {
        std::fs::remove_dir_all(&dir)
            .unwrap_or_else(|e| panic!("cannot clear {}: {e}", dir.display()));
    }
    std::fs::create_dir_all(&dir).expect("creating the scratch directory");
    dir
}

/// A running `ds4 serve`; its stderr is collected line by line.
struct Server {
    child: Child,
    addr: SocketAddr,
    log: Arc<Mutex<Vec<String>>>,
}

impl Server {
    /// Starts `ds4 serve` on a free port with the cache in `kv_dir` and small knobs (min 16
    /// tokens, alignment 16) so the tiny prompts here are worth saving.
    fn start(work: &Path, kv_dir: &Path) -> Server {
        Server::start_with(work, kv_dir, &[])
    }

    fn start_with(work: &Path, kv_dir: &Path, extra: &[&str]) -> Server {
        let mut child = Command::new(env!("CARGO_BIN_EXE_ds4"))
            .arg("serve")
            .arg("-m")
            .arg(tiny_model())
            .args(["--backend", "cpu", "--port", "0", "--ctx", "512"])
            .arg("--kv-disk-dir")
            .arg(kv_dir)
            .args(["--kv-cache-min-tokens", "16"])
            .args(["--kv-cache-cold-max-tokens", "100000"])
            .args(["--kv-cache-boundary-align-tokens", "16"])
            .arg("--trace")
            .arg(work.join("trace.txt"))
            .args(extra)
            .current_dir(work)
            .env("HOME", work)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("starting ds4 serve");
        let stderr = child.stderr.take().unwrap();
        let log = Arc::new(Mutex::new(Vec::new()));
        let (tx, rx) = mpsc::channel();
        let sink = log.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                if let Some(addr) = line.split("listening on http://").nth(1) {
                    let _ = tx.send(addr.trim().to_string());
                }
                sink.lock().unwrap().push(line);
            }
        });
        let addr = match rx.recv_timeout(Duration::from_secs(60)) {
            Ok(a) => a.parse().expect("the printed address"),
            Err(_) => {
                let _ = child.kill();
                panic!(
                    "ds4 serve did not start:\n{}",
                    log.lock().unwrap().join("\n")
                );
            }
        };
        Server { child, addr, log }
    }

    fn log_text(&self) -> String {
        self.log.lock().unwrap().join("\n")
    }

    /// The log once it holds `n` request-done lines (stderr is read by another thread, so
    /// a line may arrive after the HTTP response).
    fn log_after_requests(&self, n: usize) -> String {
        for _ in 0..100 {
            let log = self.log_text();
            if log.matches("request done").count() >= n {
                return log;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("fewer than {n} requests logged:\n{}", self.log_text());
    }

    fn post(&self, path: &str, body: &Value) -> Value {
        let body = body.to_string();
        let mut s = TcpStream::connect(self.addr).expect("connecting to ds4 serve");
        s.set_read_timeout(Some(Duration::from_secs(120))).unwrap();
        write!(
            s,
            "POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        )
        .unwrap();
        let mut raw = Vec::new();
        s.read_to_end(&mut raw).unwrap();
        let text = String::from_utf8_lossy(&raw).into_owned();
        let (head, body) = text.split_once("\r\n\r\n").expect("an HTTP response");
        assert!(
            head.starts_with("HTTP/1.1 200"),
            "{path} failed: {head}\n{body}\nserver log:\n{}",
            self.log_text()
        );
        serde_json::from_str(body).unwrap_or_else(|e| panic!("{path}: not JSON ({e}): {body}"))
    }

    /// SIGTERM, then waits for a clean exit.
    fn terminate(mut self) -> String {
        let status = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .expect("running kill");
        assert!(status.success());
        let exit = self.child.wait().expect("waiting for ds4 serve");
        // Let the reader thread drain the last lines.
        std::thread::sleep(Duration::from_millis(200));
        let log = self.log_text();
        assert!(exit.success(), "ds4 serve exited with {exit}:\n{log}");
        log
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The decoded `.kv` files of a directory.
fn kv_files(dir: &Path) -> Vec<(PathBuf, KvFile)> {
    let mut out = Vec::new();
    for de in std::fs::read_dir(dir).unwrap().flatten() {
        let path = de.path();
        if path.extension().and_then(|e| e.to_str()) == Some("kv") {
            let bytes = std::fs::read(&path).unwrap();
            let file = KvFile::decode(&bytes)
                .unwrap_or_else(|e| panic!("{} does not decode: {e}", path.display()));
            out.push((path, file));
        }
    }
    out
}

/// The rendered prompt of the last request in the trace file.
fn last_traced_prompt(work: &Path) -> String {
    let trace = std::fs::read_to_string(work.join("trace.txt")).unwrap();
    let start = trace.rfind("--- prompt\n").expect("a traced prompt") + "--- prompt\n".len();
    let end = trace[start..]
        .find("\n--- generation")
        .expect("the traced generation")
        + start;
    trace[start..end].to_string()
}

/// Token count of the longest checkpoint whose text is a prefix of `prompt` (0: none).
fn longest_prefix_tokens(files: &[(PathBuf, KvFile)], prompt: &str) -> usize {
    files
        .iter()
        .filter(|(_, f)| prompt.as_bytes().starts_with(&f.text))
        .map(|(_, f)| f.header.tokens as usize)
        .max()
        .unwrap_or(0)
}

/// `prefilled_tokens` of the engine's log line for the last request done.
fn last_prefilled(log: &str) -> usize {
    let line = log
        .lines()
        .rev()
        .find(|l| l.contains("request done"))
        .expect("a request-done log line");
    line.split("prefilled_tokens=")
        .nth(1)
        .and_then(|t| t.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no prefilled_tokens in {line}"))
}

/// A system prompt long enough for a checkpoint of at least 16 tokens.
const SYSTEM: &str = "You answer questions about foxes. The quick brown fox jumps over the lazy \
dog. The quick brown fox jumps over the lazy dog. The quick brown fox jumps over the lazy dog.";

fn first_chat_request() -> Value {
    json!({
        "model": "deepseek-chat",
        "max_tokens": 4,
        "temperature": 0,
        "messages": [
            {"role": "system", "content": SYSTEM},
            {"role": "user", "content": "hello there"}
        ]
    })
}

/// The prompt of the completions conversation (the completions API renders it as the user
/// message of a chat, so it has checkpoints of its own: without a system prompt the chat
/// anchor is too short, and the cold save keeps the prompt less its last 32 tokens, aligned).
const COMPLETION_PROMPT: &str = "Once upon a time a quick brown fox jumped over a lazy dog, \
and the dog did not move at all, because the dog was very lazy and the fox was very quick. \
The next morning the fox came back to the same field and jumped over the same lazy dog again";

fn first_completion_request() -> Value {
    json!({"model": "deepseek-chat", "max_tokens": 4, "temperature": 0,
           "prompt": COMPLETION_PROMPT})
}

/// Runs request 1 (chat), then a completions request, on a fresh server over `kv_dir`, and
/// stops it with SIGTERM. Returns the chat reply, the chat usage and the server log.
fn first_session(work: &Path, kv_dir: &Path) -> (String, Value, String) {
    let server = Server::start(work, kv_dir);
    let r = server.post("/v1/chat/completions", &first_chat_request());
    let reply = r["choices"][0]["message"]["content"]
        .as_str()
        .unwrap()
        .to_string();
    let usage = r["usage"].clone();
    let c = server.post("/v1/completions", &first_completion_request());
    assert_eq!(c["usage"]["prompt_tokens_details"]["cached_tokens"], 0);
    let log = server.terminate();
    (reply, usage, log)
}

#[test]
fn restarted_server_prefills_only_the_suffix_through_every_api() {
    let work = scratch("restart");
    let kv_dir = work.join("kv");
    let (reply, usage1, log1) = first_session(&work, &kv_dir);
    let prompt1 = usage1["prompt_tokens"].as_u64().unwrap() as u32;
    assert_eq!(usage1["prompt_tokens_details"]["cached_tokens"], 0);

    // Each total miss saved cold (the chat's at its anchor: the system prompt before
    // `<｜User｜>`); the completions request evicted the chat session to disk, and SIGTERM
    // saved the completions session.
    let files = kv_files(&kv_dir);
    let with_reason = |reason: SaveReason| -> Vec<&KvFile> {
        files
            .iter()
            .filter(|(_, f)| f.header.reason == reason)
            .map(|(_, f)| f)
            .collect()
    };
    let (cold, evict, shutdown) = (
        with_reason(SaveReason::Cold),
        with_reason(SaveReason::Evict),
        with_reason(SaveReason::Shutdown),
    );
    assert_eq!(
        (cold.len(), evict.len(), shutdown.len(), files.len()),
        (2, 1, 1, 4),
        "files after the first server:\n{log1}"
    );
    let chat_cold_tokens = cold.iter().map(|f| f.header.tokens).min().unwrap();
    assert!(
        (16..prompt1).contains(&chat_cold_tokens),
        "cold {chat_cold_tokens} of {prompt1}"
    );
    let chat_live_tokens = evict[0].header.tokens;
    assert!(
        chat_live_tokens > prompt1,
        "evict {chat_live_tokens} vs prompt {prompt1}"
    );

    // A new server on the same directory: each API extends request 1's conversation.
    let server = Server::start(&work, &kv_dir);
    let history = |next: &str| {
        json!([
            {"role": "user", "content": "hello there"},
            {"role": "assistant", "content": reply},
            {"role": "user", "content": next}
        ])
    };
    let mut chat = first_chat_request();
    chat["messages"] = json!([{"role": "system", "content": SYSTEM}]);
    chat["messages"]
        .as_array_mut()
        .unwrap()
        .extend(history("and the dog?").as_array().unwrap().iter().cloned());
    let requests: Vec<(&str, Value)> = vec![
        ("/v1/chat/completions", chat),
        (
            "/v1/completions",
            json!({"model": "deepseek-chat", "max_tokens": 4, "temperature": 0,
                   "prompt": format!("{COMPLETION_PROMPT}, and then the fox ran away")}),
        ),
        (
            "/v1/messages",
            json!({"model": "deepseek-chat", "max_tokens": 4, "temperature": 0,
                   "thinking": {"type": "disabled"}, "system": SYSTEM,
                   "messages": history("why brown?")}),
        ),
        (
            "/v1/responses",
            json!({"model": "deepseek-chat", "max_output_tokens": 4, "temperature": 0,
                   "instructions": SYSTEM, "input": history("how lazy?")}),
        ),
    ];
    for (i, (path, body)) in requests.iter().enumerate() {
        let on_disk = kv_files(&kv_dir);
        let r = server.post(path, body);
        let u = &r["usage"];
        let (prompt, cached) = match *path {
            "/v1/messages" => {
                let cached = u["cache_read_input_tokens"].as_u64().unwrap();
                (u["input_tokens"].as_u64().unwrap() + cached, cached)
            }
            "/v1/responses" => (
                u["input_tokens"].as_u64().unwrap(),
                u["input_tokens_details"]["cached_tokens"].as_u64().unwrap(),
            ),
            _ => (
                u["prompt_tokens"].as_u64().unwrap(),
                u["prompt_tokens_details"]["cached_tokens"]
                    .as_u64()
                    .unwrap(),
            ),
        };
        let rendered = last_traced_prompt(&work);
        let expected = longest_prefix_tokens(&on_disk, &rendered);
        assert!(
            expected >= 16,
            "{path}: no checkpoint is a prefix of the prompt:\n{rendered}"
        );
        if *path == "/v1/chat/completions" {
            // The whole first conversation (prompt and reply) came back from disk.
            assert_eq!(expected, chat_live_tokens as usize, "{rendered}");
        }
        assert_eq!(
            cached as usize,
            expected,
            "{path}: cached tokens\n{}",
            server.log_text()
        );
        assert_eq!(
            last_prefilled(&server.log_after_requests(i + 1)) as u64,
            prompt - cached,
            "{path}: only the suffix is prefilled"
        );
    }
    let log = server.terminate();
    assert_eq!(
        log.matches("kv cache: restored from disk").count(),
        4,
        "{log}"
    );
}

#[test]
fn corrupt_cache_files_are_skipped_and_the_server_serves() {
    let work = scratch("corrupt");
    let kv_dir = work.join("kv");
    first_session(&work, &kv_dir);
    let files = kv_files(&kv_dir);
    assert!(!files.is_empty());
    for (path, _) in &files {
        let len = std::fs::metadata(path).unwrap().len();
        let f = std::fs::OpenOptions::new().write(true).open(path).unwrap();
        f.set_len(len / 2).unwrap();
    }
    let server = Server::start(&work, &kv_dir);
    let r = server.post("/v1/chat/completions", &first_chat_request());
    assert_eq!(r["usage"]["prompt_tokens_details"]["cached_tokens"], 0);
    // The server goes on: the same prompt again is served from the cold checkpoint that the
    // first request wrote in place of the corrupt files.
    let r = server.post("/v1/chat/completions", &first_chat_request());
    assert!(r["usage"]["prompt_tokens_details"]["cached_tokens"].as_u64() > Some(0));
    let log = server.terminate();
    assert!(log.contains("kv cache: skipping"), "no warning:\n{log}");
}

/// Mounts a 1 MiB tmpfs on `dir` (needs root); `None` when that is not possible here.
fn mount_tiny_tmpfs(dir: &Path) -> Option<()> {
    std::fs::create_dir_all(dir).unwrap();
    let ok = Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=1m", "tmpfs"])
        .arg(dir)
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    ok.then_some(())
}

#[test]
fn a_full_disk_leaves_the_server_serving() {
    let work = scratch("full");
    let kv_dir = work.join("kv");
    if mount_tiny_tmpfs(&kv_dir).is_none() {
        eprintln!("skipped: cannot mount a 1 MiB tmpfs (needs root)");
        return;
    }
    struct Unmount(PathBuf);
    impl Drop for Unmount {
        fn drop(&mut self) {
            let _ = Command::new("umount").arg(&self.0).status();
        }
    }
    let _unmount = Unmount(kv_dir.clone());
    let server = Server::start(&work, &kv_dir);
    // Each request misses (a new system prompt), saves cold and evicts the previous session:
    // a checkpoint of the tiny model is about half a MiB, so the disk fills at once.
    for i in 0..4 {
        let mut body = first_chat_request();
        body["messages"][0]["content"] = json!(format!("Variant {i}. {SYSTEM}"));
        let r = server.post("/v1/chat/completions", &body);
        assert_eq!(r["choices"][0]["finish_reason"], "length");
    }
    let log = server.terminate();
    assert!(
        log.contains("kv cache: save failed"),
        "the disk never filled:\n{log}"
    );
    // No temporary file is left behind.
    for de in std::fs::read_dir(&kv_dir).unwrap().flatten() {
        let name = de.file_name().to_string_lossy().into_owned();
        assert!(!name.contains(".tmp."), "left over: {name}");
    }
}

#[test]
fn continued_checkpoints_split_a_long_prefill() {
    let work = scratch("continued");
    let kv_dir = work.join("kv");
    // Every 32 tokens (the interval rounded up to the 16-token alignment).
    let server = Server::start_with(
        &work,
        &kv_dir,
        &["--kv-cache-continued-interval-tokens", "20"],
    );
    let r = server.post("/v1/chat/completions", &first_chat_request());
    let prompt = r["usage"]["prompt_tokens"].as_u64().unwrap() as u32;
    let log = server.terminate();
    let mut saved: Vec<(SaveReason, u32)> = kv_files(&kv_dir)
        .into_iter()
        .map(|(_, f)| (f.header.reason, f.header.tokens))
        .collect();
    saved.sort_by_key(|&(_, t)| t);
    let continued: Vec<u32> = saved
        .iter()
        .filter(|(r, _)| *r == SaveReason::Continued)
        .map(|&(_, t)| t)
        .collect();
    let expected: Vec<u32> = (1..=prompt / 32).map(|k| k * 32).collect();
    assert!(!expected.is_empty(), "prompt of {prompt} tokens");
    assert_eq!(continued, expected, "{log}");
    assert_eq!(
        saved.iter().filter(|(r, _)| *r == SaveReason::Cold).count(),
        1,
        "{log}"
    );
}
