//! Disk KV cache files are untrusted (a crash mid-write, another program, a bad disk): the
//! strict decoder never panics, a file it accepts encodes back to the same bytes, and the
//! payload validator takes any payload, here against a miniature Flash-like model (vocab 300,
//! 4 layers: sliding, sliding, CSA, HCA) so that valid payloads stay small enough to mutate.
#![no_main]
use ds4_kvstore::file::decode_tool_map;
use ds4_kvstore::payload::validate_payload;
use ds4_kvstore::KvFile;
use ds4_model::config::{AttnKind, ModelConfig};
use libfuzzer_sys::fuzz_target;
use std::sync::OnceLock;

fn mini_config() -> &'static ModelConfig {
    static CFG: OnceLock<ModelConfig> = OnceLock::new();
    CFG.get_or_init(|| {
        let mut c = ModelConfig::flash();
        c.vocab_size = 300;
        c.n_layers = 4;
        c.head_dim = 16;
        c.index_head_dim = 8;
        c.sliding_window = 6;
        c.compress_ratio = vec![0, 0, 4, 16];
        c.attn_kind = vec![
            AttnKind::Sliding,
            AttnKind::Sliding,
            AttnKind::Csa,
            AttnKind::Hca,
        ];
        c.moe_kind.truncate(4);
        c.swiglu_clamp.truncate(4);
        c
    })
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
