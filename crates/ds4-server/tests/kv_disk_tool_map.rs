//! The disk KV cache's save and restore as the engine worker calls them (`kv_disk`), on the
//! bundled tiny model through the real CPU backend: the tool-id map (KTM) keeps only the ids
//! whose DSML block occurs in the saved text and comes back into the tool memory; the restored
//! session equals the saved one; a checkpoint restores into a session of a larger context.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use ds4_gguf::reader::GgufFile;
use ds4_kvstore::{KvFile, SavePolicy, SaveReason};
use ds4_model::backend::Backend;
use ds4_model::cpu::CpuBackend;
use ds4_model::numerics::Numerics;
use ds4_server::kv_disk::{KvDisk, KvDiskOptions};
use ds4_server::model::{SessionRunner, TokenizerCodec};
use ds4_server::runner::{ModelRunner, TextCodec};
use ds4_server::tool_memory::{RememberedCall, ToolMemory};
use ds4_text::tokenizer::Tokenizer;

fn tiny() -> (CpuBackend, TokenizerCodec) {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../ds4-cli/assets/tiny-test-model.gguf");
    let gguf = Arc::new(GgufFile::open(&path).expect("the bundled tiny model"));
    let tokens = gguf.get_string_array("tokenizer.ggml.tokens").unwrap();
    let merges = gguf.get_string_array("tokenizer.ggml.merges").unwrap();
    let tokenizer = Tokenizer::from_gguf_vocab(tokens, merges).unwrap();
    let backend = CpuBackend::from_file(gguf, Numerics::Ds4).unwrap();
    (backend, TokenizerCodec(tokenizer))
}

fn scratch(name: &str) -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("kv_disk_tool_map-{name}"));
    if dir.exists() {
        std::fs::remove_dir_all(&dir).unwrap();
    }
    dir
}

fn options(dir: &Path) -> KvDiskOptions {
    KvDiskOptions {
        dir: dir.to_path_buf(),
        budget_bytes: 0,
        policy: SavePolicy {
            min_tokens: 8,
            ..SavePolicy::default()
        },
        reject_different_quant: false,
        quant_bits: 4,
    }
}

fn call(block: &str) -> RememberedCall {
    RememberedCall {
        raw_dsml: block.into(),
        reasoning: None,
    }
}

#[test]
fn tool_map_is_saved_for_blocks_in_the_text_and_restored_into_the_memory() {
    let (backend, codec) = tiny();
    let dir = scratch("ktm");
    let ctx = 256;
    let mut disk = KvDisk::open(backend.config(), ctx, &codec, options(&dir)).unwrap();
    let vocab = backend.config().vocab_size;

    let in_text = "\n\n<｜DSML｜tool_calls>\n<｜DSML｜invoke name=\"f\">\n</｜DSML｜invoke>\n</｜DSML｜tool_calls>";
    let text = format!("<｜begin▁of▁sentence｜>Call f.<｜Assistant｜></think>{in_text}");
    let mut live = SessionRunner::new(backend.new_session(ctx).unwrap(), vocab);
    live.eval(&codec.encode(&text)).unwrap();
    let logits = live.logits().to_vec();
    assert_eq!(logits.len(), vocab);
    let tools = Mutex::new(ToolMemory::new(100));
    {
        let mut m = tools.lock().unwrap();
        m.insert("call_in".into(), call(in_text));
        m.insert(
            "call_out".into(),
            call("\n\n<｜DSML｜tool_calls>other</｜DSML｜tool_calls>"),
        );
    }
    assert!(disk.save_live(&live, text.as_bytes(), SaveReason::Evict, &tools));

    let files: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .flatten()
        .filter(|e| e.path().extension().is_some_and(|x| x == "kv"))
        .collect();
    assert_eq!(files.len(), 1);
    let file = KvFile::decode(&std::fs::read(files[0].path()).unwrap()).unwrap();
    let ids: Vec<&str> = file.tool_map.iter().map(|e| e.id.as_str()).collect();
    assert_eq!(ids, ["call_in"]);

    // Another server: an empty tool memory and session; the prompt extends the saved text.
    let mut disk = KvDisk::open(backend.config(), ctx, &codec, options(&dir)).unwrap();
    let fresh_tools = Mutex::new(ToolMemory::new(100));
    let mut resumed = SessionRunner::new(backend.new_session(ctx).unwrap(), vocab);
    let prompt = format!("{text}<｜end▁of▁sentence｜><｜User｜>ok");
    let restored = disk
        .restore_longest_prefix(&mut resumed, &prompt, &fresh_tools)
        .expect("a disk hit");
    assert_eq!(restored.tokens, live.tokens().len());
    assert_eq!(restored.text_len, text.len());
    assert_eq!(resumed.logits(), logits);
    assert_eq!(resumed.tokens(), live.tokens());
    let m = fresh_tools.lock().unwrap();
    assert_eq!(m.get("call_in").map(|c| c.raw_dsml.as_str()), Some(in_text));
    assert!(m.get("call_out").is_none());
}

#[test]
fn a_checkpoint_from_a_smaller_context_restores_into_a_larger_one() {
    let (backend, codec) = tiny();
    let dir = scratch("larger-ctx");
    let vocab = backend.config().vocab_size;
    let text = "<｜begin▁of▁sentence｜>The quick brown fox jumps over the lazy dog.";
    let tools = Mutex::new(ToolMemory::new(100));
    let mut disk = KvDisk::open(backend.config(), 128, &codec, options(&dir)).unwrap();
    let mut live = SessionRunner::new(backend.new_session(128).unwrap(), vocab);
    live.eval(&codec.encode(text)).unwrap();
    let logits = live.logits().to_vec();
    assert_eq!(logits.len(), vocab);
    assert!(disk.save_live(&live, text.as_bytes(), SaveReason::Shutdown, &tools));

    // A server restarted with a larger context reuses the checkpoint (ds4 would refuse it for
    // its different prefill chunk; the state itself does not depend on that).
    let mut other = KvDisk::open(backend.config(), 4096, &codec, options(&dir)).unwrap();
    let mut session = SessionRunner::new(backend.new_session(4096).unwrap(), vocab);
    let hit = other.restore_longest_prefix(&mut session, &format!("{text} More."), &tools);
    let hit = hit.expect("the checkpoint restores");
    assert_eq!(hit.tokens, live.tokens().len());
    assert_eq!(session.logits(), logits);
    assert_eq!(session.tokens(), live.tokens());
}
