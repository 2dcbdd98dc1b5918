//! `--trace FILE`: every request's rendered prompt and raw generation, appended in order.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::Path;
use std::sync::Mutex;

#[derive(Debug)]
pub struct Trace {
    file: Mutex<File>,
}

/// One finished request, as recorded.
pub struct TraceRecord<'a> {
    pub request_id: &'a str,
    pub prompt_tokens: usize,
    pub cached_tokens: usize,
    pub prompt: &'a str,
    pub generation: &'a str,
    pub finish: &'a str,
}

impl Trace {
    pub fn create(path: &Path) -> std::io::Result<Trace> {
        let file = OpenOptions::new().create(true).append(true).open(path)?;
        Ok(Trace {
            file: Mutex::new(file),
        })
    }

    /// Appends one record. A failed write is logged, never fatal: tracing must not stop serving.
    pub fn record(&self, r: &TraceRecord<'_>) {
        let text = format!(
            "=== request {} prompt_tokens={} cached_tokens={}\n--- prompt\n{}\n--- generation finish={}\n{}\n=== end {}\n",
            r.request_id, r.prompt_tokens, r.cached_tokens, r.prompt, r.finish, r.generation, r.request_id
        );
        let mut file = match self.file.lock() {
            Ok(f) => f,
            Err(poisoned) => poisoned.into_inner(),
        };
        if let Err(e) = file.write_all(text.as_bytes()).and_then(|_| file.flush()) {
            tracing::warn!("trace write failed: {e}");
        }
    }
}
