//! Model files are untrusted: the GGUF reader never panics on any bytes, a file it accepts
//! keeps every tensor inside the data it holds, and the model's metadata and tensor-table
//! checks (what `ds4` runs before loading) take whatever the reader accepted.
#![no_main]
use ds4_gguf::GgufFile;
use ds4_model::config::ModelConfig;
use ds4_model::layout::check_layout;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let len = data.len() as u64;
    let Ok(f) = GgufFile::from_bytes(data.to_vec()) else {
        return;
    };
    for t in f.tensors() {
        assert_eq!(f.tensor_bytes(t).len() as u64, t.n_bytes);
        assert!(t.n_bytes == 0 || f.data_offset() + t.offset + t.n_bytes <= len);
    }
    for (k, _) in f.metadata() {
        let _ = (f.get_u32(k), f.get_f32(k), f.get_str(k), f.get_bool(k));
        let _ = (
            f.get_u32_array(k),
            f.get_f32_array(k),
            f.get_string_array(k),
        );
    }
    if let Ok(cfg) = ModelConfig::from_gguf(&f) {
        if cfg.validate().is_ok() {
            let _ = check_layout(&cfg, f.tensors(), None);
        }
    }
});
