//! Starts the real router on a loopback port over a scripted model, and speaks raw HTTP/1.1.

#![allow(dead_code)]

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::Arc;
use std::time::Duration;

use ds4_server::testing::ByteCodec;
use ds4_server::{AppState, Engine, EngineOptions, ModelRunner, ServerConfig};

pub struct TestServer {
    pub addr: SocketAddr,
    pub engine: Engine,
}

/// Starts a server over `runner` (a scripted model answers with its replies in turn).
pub fn start(runner: impl ModelRunner + 'static, config: ServerConfig) -> TestServer {
    start_with(runner, config, None)
}

pub fn start_with(
    runner: impl ModelRunner + 'static,
    config: ServerConfig,
    trace: Option<ds4_server::trace::Trace>,
) -> TestServer {
    let engine = Engine::start(
        Box::new(runner),
        Arc::new(ByteCodec),
        EngineOptions {
            model_name: "deepseek-v4-flash".into(),
            trace,
            tool_memory_max_ids: 1000,
        },
    );
    let state = AppState {
        engine: engine.clone(),
        config: Arc::new(config),
    };
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            tx.send(listener.local_addr().unwrap()).unwrap();
            ds4_server::serve(listener, state).await.unwrap();
        });
    });
    let addr = rx.recv().unwrap();
    TestServer { addr, engine }
}

pub struct HttpResponse {
    pub status: u16,
    pub headers: String,
    pub body: Vec<u8>,
}

impl HttpResponse {
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| {
            panic!(
                "body is not JSON ({e}): {}",
                String::from_utf8_lossy(&self.body)
            )
        })
    }
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

/// Sends raw bytes and reads the whole response (the request asks to close the connection).
pub fn raw(addr: SocketAddr, request: &[u8]) -> HttpResponse {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    s.write_all(request).unwrap();
    let mut buf = Vec::new();
    let _ = s.read_to_end(&mut buf);
    parse_response(&buf)
}

pub fn parse_response(buf: &[u8]) -> HttpResponse {
    let split = buf
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .expect("no header end in response");
    let headers = String::from_utf8_lossy(&buf[..split]).into_owned();
    let status: u16 = headers.split_whitespace().nth(1).unwrap().parse().unwrap();
    let mut body = buf[split + 4..].to_vec();
    if headers
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        body = dechunk(&body);
    }
    HttpResponse {
        status,
        headers,
        body,
    }
}

fn dechunk(mut b: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    while let Some(eol) = b.windows(2).position(|w| w == b"\r\n") {
        let size =
            usize::from_str_radix(std::str::from_utf8(&b[..eol]).unwrap().trim(), 16).unwrap_or(0);
        if size == 0 {
            break;
        }
        out.extend_from_slice(&b[eol + 2..eol + 2 + size]);
        b = &b[eol + 2 + size + 2..];
    }
    out
}

/// A request with a body.
pub fn request(method: &str, path: &str, extra_headers: &str, body: &[u8]) -> Vec<u8> {
    let mut r = format!(
        "{method} {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\nContent-Type: application/json\r\n{extra_headers}Content-Length: {}\r\n\r\n",
        body.len()
    )
    .into_bytes();
    r.extend_from_slice(body);
    r
}

pub fn post(addr: SocketAddr, path: &str, body: &str) -> HttpResponse {
    raw(addr, &request("POST", path, "", body.as_bytes()))
}

pub fn get(addr: SocketAddr, path: &str) -> HttpResponse {
    raw(addr, &request("GET", path, "", b""))
}

/// The `data:` payloads of an SSE body (comments skipped), with their `event:` names.
pub fn sse_events(body: &str) -> Vec<(Option<String>, String)> {
    let mut out = Vec::new();
    for frame in body.split("\n\n") {
        let mut event = None;
        let mut data = None;
        for line in frame.lines() {
            if let Some(e) = line.strip_prefix("event: ") {
                event = Some(e.to_string());
            } else if let Some(d) = line.strip_prefix("data: ") {
                data = Some(d.to_string());
            }
        }
        if let Some(d) = data {
            out.push((event, d));
        }
    }
    out
}
