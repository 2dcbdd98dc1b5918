//! Error responses in each API's shape. OpenAI (chat, completions, responses, models):
//! `{"error":{"message","type","param","code"}}`; Anthropic (messages):
//! `{"type":"error","error":{"type","message"}}`. Every client mistake maps to a 4xx here.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde_json::{json, Map, Value};

/// Which error shape a route uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Flavor {
    OpenAi,
    Anthropic,
}

impl Flavor {
    /// The flavor of a request path.
    pub fn of_path(path: &str) -> Flavor {
        if path.starts_with("/v1/messages") {
            Flavor::Anthropic
        } else {
            Flavor::OpenAi
        }
    }
}

/// A request that cannot be served, with what to tell the client.
#[derive(Clone, Debug, PartialEq)]
pub struct ApiError {
    pub flavor: Flavor,
    pub status: StatusCode,
    pub message: String,
    /// OpenAI `code` (e.g. `context_length_exceeded`); also the Anthropic type when set.
    pub code: Option<&'static str>,
    /// The offending request field, when one is to blame.
    pub param: Option<String>,
    /// Extra members of the error object (e.g. `n_prompt_tokens`, `n_ctx`); boxed to keep
    /// the error small on the happy path.
    pub extra: Option<Box<Map<String, Value>>>,
}

impl ApiError {
    pub fn new(flavor: Flavor, status: StatusCode, message: impl Into<String>) -> Self {
        ApiError {
            flavor,
            status,
            message: message.into(),
            code: None,
            param: None,
            extra: None,
        }
    }

    /// 400 invalid_request_error.
    pub fn bad_request(flavor: Flavor, message: impl Into<String>) -> Self {
        ApiError::new(flavor, StatusCode::BAD_REQUEST, message)
    }

    /// 400 blaming one field.
    pub fn field(flavor: Flavor, param: &str, message: impl Into<String>) -> Self {
        let mut e = ApiError::bad_request(flavor, message);
        e.param = Some(param.to_string());
        e
    }

    pub fn with_code(mut self, code: &'static str) -> Self {
        self.code = Some(code);
        self
    }

    /// ds4's prompt-too-long error.
    pub fn context_length_exceeded(flavor: Flavor, prompt_tokens: usize, ctx: usize) -> Self {
        let mut e = ApiError::bad_request(
            flavor,
            format!(
                "This model's maximum context length is {ctx} tokens, but the prompt has {prompt_tokens} tokens. \
                 Shorten the prompt or start the server with a larger --ctx."
            ),
        )
        .with_code("context_length_exceeded");
        let mut extra = Map::new();
        extra.insert("n_prompt_tokens".into(), json!(prompt_tokens));
        extra.insert("n_ctx".into(), json!(ctx));
        e.extra = Some(Box::new(extra));
        e
    }

    /// The OpenAI error `type` / Anthropic error `type` for this status.
    fn kind(&self) -> &'static str {
        match (self.flavor, self.status) {
            (_, StatusCode::UNAUTHORIZED) => "authentication_error",
            (Flavor::Anthropic, StatusCode::NOT_FOUND) => "not_found_error",
            (Flavor::Anthropic, StatusCode::PAYLOAD_TOO_LARGE) => "request_too_large",
            (Flavor::Anthropic, StatusCode::CONFLICT) => "invalid_request_error",
            (Flavor::Anthropic, s) if s.is_server_error() => "api_error",
            (Flavor::OpenAi, s) if s.is_server_error() => "server_error",
            _ => "invalid_request_error",
        }
    }

    /// The JSON body.
    pub fn body(&self) -> Value {
        match self.flavor {
            Flavor::OpenAi => {
                let mut err = Map::new();
                err.insert("message".into(), json!(self.message));
                err.insert("type".into(), json!(self.kind()));
                err.insert("param".into(), json!(self.param));
                err.insert("code".into(), json!(self.code));
                err.extend(self.extra.iter().flat_map(|m| m.as_ref().clone()));
                json!({ "error": err })
            }
            Flavor::Anthropic => {
                let mut err = Map::new();
                err.insert("type".into(), json!(self.kind()));
                err.insert("message".into(), json!(self.message));
                if let Some(code) = self.code {
                    err.insert("code".into(), json!(code));
                }
                err.extend(self.extra.iter().flat_map(|m| m.as_ref().clone()));
                json!({ "type": "error", "error": err })
            }
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = self.body().to_string();
        (
            self.status,
            [(axum::http::header::CONTENT_TYPE, "application/json")],
            body,
        )
            .into_response()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shapes_follow_each_api() {
        let o = ApiError::context_length_exceeded(Flavor::OpenAi, 10, 8).body();
        assert_eq!(o["error"]["code"], "context_length_exceeded");
        assert_eq!(o["error"]["type"], "invalid_request_error");
        assert_eq!(
            (
                o["error"]["n_prompt_tokens"].as_u64(),
                o["error"]["n_ctx"].as_u64()
            ),
            (Some(10), Some(8))
        );
        let a = ApiError::new(Flavor::Anthropic, StatusCode::NOT_FOUND, "nope").body();
        assert_eq!(a["type"], "error");
        assert_eq!(a["error"]["type"], "not_found_error");
        assert_eq!(a["error"]["message"], "nope");
    }
}
