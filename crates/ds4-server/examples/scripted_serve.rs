//! The real router over a scripted model (byte-level codec, replies from a JSON file), for
//! driving the server's tool-call paths with the official SDKs, which a random-weight model
//! cannot exercise (it never writes DSML).
//!
//!     cargo run -p ds4-server --example scripted_serve -- REPLIES.json [PORT]
//!
//! REPLIES.json is an array of strings; each generation produces the next one (cycling).

use std::sync::Arc;

use ds4_server::testing::{ByteCodec, ScriptedRunner};
use ds4_server::{AppState, Engine, EngineOptions, ServerConfig};

fn main() {
    if let Err(e) = run() {
        eprintln!("scripted_serve: error: {e}");
        std::process::exit(1);
    }
}

fn run() -> Result<(), String> {
    let mut args = std::env::args().skip(1);
    let path = args
        .next()
        .ok_or("usage: scripted_serve REPLIES.json [PORT]")?;
    let port: u16 = match args.next() {
        Some(p) => p.parse().map_err(|e| format!("bad port {p}: {e}"))?,
        None => 0,
    };
    let text = std::fs::read_to_string(&path).map_err(|e| format!("{path}: {e}"))?;
    let replies: Vec<String> = serde_json::from_str(&text).map_err(|e| format!("{path}: {e}"))?;
    let refs: Vec<&str> = replies.iter().map(String::as_str).collect();
    let engine = Engine::start(
        Box::new(ScriptedRunner::new(&refs, 1 << 16)),
        Arc::new(ByteCodec),
        EngineOptions {
            model_name: "deepseek-v4-flash".into(),
            trace: None,
            tool_memory_max_ids: 1000,
        },
    );
    let state = AppState {
        engine,
        config: Arc::new(ServerConfig::default()),
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| e.to_string())?;
    rt.block_on(async move {
        let listener = tokio::net::TcpListener::bind(("127.0.0.1", port))
            .await
            .map_err(|e| e.to_string())?;
        let addr = listener.local_addr().map_err(|e| e.to_string())?;
        eprintln!("scripted_serve: listening on http://{addr}");
        ds4_server::serve(listener, state)
            .await
            .map_err(|e| e.to_string())
    })
}
