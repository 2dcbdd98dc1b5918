//! GET /v1/models and /v1/models/{id}.

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde_json::{json, Value};

use super::errors::{ApiError, Flavor};
use crate::server::AppState;

/// Names clients may use for the one model served (ds4 accepts the DeepSeek API names too).
pub const ALIASES: [&str; 2] = ["deepseek-chat", "deepseek-reasoner"];

fn model_object(id: &str, created: u64) -> Value {
    json!({"id": id, "object": "model", "created": created, "owned_by": "ds4"})
}

pub async fn list(State(state): State<AppState>) -> Response {
    let created = state.config.started_at;
    axum::Json(
        json!({"object": "list", "data": [model_object(state.engine.model_name(), created)]}),
    )
    .into_response()
}

pub async fn get(State(state): State<AppState>, Path(id): Path<String>) -> Response {
    if id == state.engine.model_name() || ALIASES.contains(&id.as_str()) {
        return axum::Json(model_object(&id, state.config.started_at)).into_response();
    }
    ApiError::new(
        Flavor::OpenAi,
        StatusCode::NOT_FOUND,
        format!("The model '{id}' does not exist"),
    )
    .with_code("model_not_found")
    .into_response()
}
