//! The fast BPE encoder against the HF tokenizers engine on arbitrary text, with the DeepSeek
//! V4 tokenizer the tests use: the same ids (a mismatch changes what the model sees and breaks
//! prefix reuse of the disk KV cache), and decoding gives the text back.
#![no_main]
use ds4_text::Tokenizer;
use libfuzzer_sys::fuzz_target;
use std::sync::OnceLock;

fn tokenizer() -> &'static Tokenizer {
    static T: OnceLock<Tokenizer> = OnceLock::new();
    T.get_or_init(|| {
        let path = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../tests/fixtures/tokenizer/tokenizer.json"
        );
        Tokenizer::from_tokenizer_json(path).expect("the test tokenizer loads")
    })
}

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let t = tokenizer();
    let ids = t.encode(text);
    assert_eq!(ids, t.encode_reference(text), "text {text:?}");
    assert_eq!(t.decode(&ids), text);
});
