//! The HTTP APIs: request parsing into chat prompts, response and event shapes, errors.

pub mod anthropic;
pub mod common;
pub mod completions;
pub mod errors;
pub mod fields;
pub mod models;
pub mod openai;
pub mod responses;
pub mod sse;
