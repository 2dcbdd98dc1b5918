//! Disk KV cache files are untrusted (a crash mid-write, another program, a bad disk): the
//! strict decoder never panics, a file it accepts encodes back to the same bytes, and the
//! payload validator takes any payload, here against a miniature Flash-like model (vocab 300,
//! 4 layers: sliding, sliding, CSA, HCA) so that valid payloads stay small enough to mutate.
#![no_main]
use ds4_kvstore::file::decode_tool_map;
use ds4_kvstore::payload::validate_payload;
use ds4_kvstore::KvFile;
use ds4_model::config::ModelConfig;
use libfuzzer_sys::fuzz_target;
use std::sync::OnceLock;

// The kvstore tests' miniature model (and payload helpers).
#[path = "../../crates/ds4-kvstore/tests/common/mod.rs"]
mod common;

fn mini_config() -> &'static ModelConfig {
    static CFG: OnceLock<ModelConfig> = OnceLock::new();
    CFG.get_or_init(common::mini_config)
}

fuzz_target!(|data: &[u8]| {
    match KvFile::decode(data) {
        Ok(file) => {
            assert_eq!(
                file.encode(),
                data,
                "a decoded file re-encodes to its bytes"
            );
            let _ = validate_payload(mini_config(), &file.payload);
        }
        Err(e) => assert!(!e.to_string().is_empty()),
    }
    let _ = decode_tool_map(data);
});
