//! The router and its layers: authentication, CORS, unknown routes, request logging.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::extract::{Request, State};
use axum::http::{header, Method, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;

use crate::api::errors::{ApiError, Flavor};
use crate::api::{anthropic, completions, models, openai, responses};
use crate::engine::Engine;

/// ds4's request body limit.
pub const DEFAULT_BODY_LIMIT: usize = 64 << 20;
/// ds4's `-n` default.
pub const DEFAULT_MAX_TOKENS: usize = 393_216;

/// Server options.
#[derive(Clone, Debug)]
pub struct ServerConfig {
    pub body_limit: usize,
    /// Idle time after which a stream gets a `: prefill` keep-alive comment.
    pub keepalive: Duration,
    pub default_max_tokens: usize,
    /// When set, requests need `Authorization: Bearer KEY` or `x-api-key: KEY`.
    pub api_key: Option<String>,
    pub cors: bool,
    /// Render remembered tool calls byte for byte (ds4 default; off = canonical DSML).
    pub exact_tool_replay: bool,
    /// Unix time of start-up (models' `created`).
    pub started_at: u64,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            body_limit: DEFAULT_BODY_LIMIT,
            keepalive: Duration::from_secs(5),
            default_max_tokens: DEFAULT_MAX_TOKENS,
            api_key: None,
            cors: false,
            exact_tool_replay: true,
            started_at: crate::ids::unix_now(),
        }
    }
}

/// What every handler gets.
#[derive(Clone)]
pub struct AppState {
    pub engine: Engine,
    pub config: Arc<ServerConfig>,
}

/// All routes with their layers.
pub fn router(state: AppState) -> Router {
    let mut app = Router::new()
        .route("/v1/models", get(models::list))
        .route("/v1/models/{id}", get(models::get))
        .route("/v1/chat/completions", post(openai::chat_completions))
        .route("/v1/completions", post(completions::completions))
        .route("/v1/responses", post(responses::responses))
        .route("/v1/messages", post(anthropic::messages))
        .route("/v1/messages/count_tokens", post(anthropic::count_tokens))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(middleware::from_fn_with_state(state.clone(), authenticate))
        .layer(middleware::from_fn(preflight_and_log));
    if state.config.cors {
        use tower_http::cors::{Any, CorsLayer};
        app = app.layer(
            CorsLayer::new()
                .allow_origin(Any)
                .allow_methods(Any)
                .allow_headers(Any),
        );
    }
    app.with_state(state)
}

/// Serves until the listener fails.
pub async fn serve(listener: tokio::net::TcpListener, state: AppState) -> std::io::Result<()> {
    axum::serve(listener, router(state)).await
}

async fn not_found(req: Request) -> Response {
    let path = req.uri().path().to_string();
    ApiError::new(
        Flavor::of_path(&path),
        StatusCode::NOT_FOUND,
        format!("no route for {} {path}", req.method()),
    )
    .into_response()
}

async fn method_not_allowed(req: Request) -> Response {
    let path = req.uri().path().to_string();
    ApiError::new(
        Flavor::of_path(&path),
        StatusCode::METHOD_NOT_ALLOWED,
        format!("method {} is not allowed on {path}", req.method()),
    )
    .into_response()
}

/// Checks the API key (when one is configured). Comparison is constant-time in the key length.
async fn authenticate(State(state): State<AppState>, req: Request, next: Next) -> Response {
    let Some(key) = state.config.api_key.as_deref() else {
        return next.run(req).await;
    };
    let headers = req.headers();
    let bearer = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| {
            v.strip_prefix("Bearer ")
                .or_else(|| v.strip_prefix("bearer "))
        });
    let x_api_key = headers.get("x-api-key").and_then(|v| v.to_str().ok());
    let ok = [bearer, x_api_key]
        .into_iter()
        .flatten()
        .any(|given| constant_time_eq(given.trim().as_bytes(), key.as_bytes()));
    if ok {
        next.run(req).await
    } else {
        let path = req.uri().path().to_string();
        ApiError::new(
            Flavor::of_path(&path),
            StatusCode::UNAUTHORIZED,
            "missing or invalid API key",
        )
        .with_code("invalid_api_key")
        .into_response()
    }
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

static REQUEST_SEQ: AtomicU64 = AtomicU64::new(1);

/// OPTIONS → 204 (ds4), and one log line per request.
async fn preflight_and_log(req: Request, next: Next) -> Response {
    if req.method() == Method::OPTIONS {
        return StatusCode::NO_CONTENT.into_response();
    }
    let n = REQUEST_SEQ.fetch_add(1, Ordering::Relaxed);
    let method = req.method().clone();
    let path = req.uri().path().to_string();
    let start = Instant::now();
    let resp = next.run(req).await;
    tracing::info!(
        http_request = n,
        %method,
        path = %path,
        status = resp.status().as_u16(),
        ms = start.elapsed().as_millis() as u64,
        "http"
    );
    resp
}
