//! ds4-server: the OpenAI (chat, completions, responses) and Anthropic (messages) HTTP APIs
//! over one engine worker that owns the model session.
//!
//! Flow: a handler in [`api`] parses the request into a `ds4_text::chat::ChatPrompt`, renders
//! and tokenizes it, and submits a [`job::GenJob`] to the [`engine::Engine`]. The worker
//! thread runs jobs FIFO, reusing the live session's prefix, and streams [`job::GenEvent`]s
//! back; [`generate`] turns sampled tokens into those events. The handler shapes them into
//! its API's JSON or SSE.

pub mod api;
pub mod engine;
pub mod generate;
pub mod ids;
pub mod job;
pub mod kv_disk;
pub mod model;
pub mod runner;
pub mod server;
pub mod stops;
pub mod testing;
pub mod tool_memory;
pub mod trace;

pub use engine::{Engine, EngineOptions};
pub use runner::{ModelRunner, TextCodec};
pub use server::{router, serve, AppState, ServerConfig};
