//! Model files are untrusted: the GGUF reader never panics on any bytes, a file it accepts
//! keeps every tensor inside the data it holds, and the model's metadata and tensor-table
//! checks (what `ds4` runs before loading) take whatever the reader accepted.
#![no_main]
use ds4_gguf::GgufFile;
use ds4_model::config::ModelConfig;
use ds4_model::layout::check_layout;
use libfuzzer_sys::fuzz_target;

// The container tests' helpers, check_accepted among them.
#[path = "../../crates/ds4-gguf/tests/common/mod.rs"]
mod common;

fuzz_target!(|data: &[u8]| {
    let len = data.len() as u64;
    let Ok(f) = GgufFile::from_bytes(data.to_vec()) else {
        return;
    };
    common::check_accepted(&f, len);
    if let Ok(cfg) = ModelConfig::from_gguf(&f) {
        if cfg.validate().is_ok() {
            let _ = check_layout(&cfg, f.tensors(), None);
        }
    }
});
