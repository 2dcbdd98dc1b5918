//! Server-sent events: framing, and the response body that turns a job's events into frames,
//! with keep-alive comments while nothing is produced (queue wait, long prefill).

use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::http::header;
use axum::response::{IntoResponse, Response};
use serde_json::Value;
use tokio::sync::mpsc::UnboundedReceiver;

use crate::job::{CancelOnDrop, EngineError, GenEvent};

/// `data: {json}` frame.
pub fn data(v: &Value) -> String {
    format!("data: {v}\n\n")
}

/// `event: name` + `data: {json}` frame (Anthropic and Responses style).
pub fn named(event: &str, v: &Value) -> String {
    format!("event: {event}\ndata: {v}\n\n")
}

/// Keep-alive comment (ds4 sends `: prefill` during long prefills).
pub const KEEPALIVE: &str = ": prefill\n\n";

/// One API's streaming shape.
pub trait SseEncoder: Send + 'static {
    /// Frames for one engine event (possibly none).
    fn event(&mut self, ev: GenEvent) -> String;
    /// Whether the final frames were written.
    fn finished(&self) -> bool;
    /// Frames that end the stream when the engine failed (after the headers were sent).
    fn fail(&mut self, err: &EngineError) -> String;
}

struct BodyState<E> {
    rx: UnboundedReceiver<GenEvent>,
    enc: E,
    keepalive: Duration,
    /// When the last bytes went out: silence longer than `keepalive` gets a comment, also
    /// while events arrive that show nothing (e.g. reasoning a Responses client did not ask
    /// for), so idle clients stay connected and a gone client is noticed on the next write.
    last_sent: tokio::time::Instant,
    done: bool,
    /// Dropped with the body, i.e. when the client disconnects: cancels the job.
    _guard: CancelOnDrop,
}

type Chunk = Result<Bytes, std::convert::Infallible>;

/// The streaming response for a submitted job.
pub fn sse_response<E: SseEncoder>(
    rx: UnboundedReceiver<GenEvent>,
    guard: CancelOnDrop,
    enc: E,
    keepalive: Duration,
) -> Response {
    let state = BodyState {
        rx,
        enc,
        keepalive,
        last_sent: tokio::time::Instant::now(),
        done: false,
        _guard: guard,
    };
    let stream = futures_util::stream::unfold(state, |mut st| async move {
        loop {
            if st.done {
                return None;
            }
            let deadline = st.last_sent + st.keepalive;
            let frames = match tokio::time::timeout_at(deadline, st.rx.recv()).await {
                Err(_) => KEEPALIVE.to_string(),
                Ok(Some(ev)) => {
                    let frames = st.enc.event(ev);
                    st.done = st.enc.finished();
                    if frames.is_empty() && tokio::time::Instant::now() >= deadline {
                        KEEPALIVE.to_string()
                    } else {
                        frames
                    }
                }
                Ok(None) => {
                    st.done = true;
                    st.enc.fail(&EngineError::Shutdown)
                }
            };
            if !frames.is_empty() {
                st.last_sent = tokio::time::Instant::now();
                return Some((Chunk::Ok(Bytes::from(frames)), st));
            }
        }
    });
    (
        [
            (header::CONTENT_TYPE, "text/event-stream"),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        Body::from_stream(stream),
    )
        .into_response()
}
