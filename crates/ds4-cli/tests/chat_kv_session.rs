//! `/save FILE` and `/load FILE` in the interactive chat (fed from a pipe), on the bundled tiny
//! test model: a conversation saved by one process and resumed by another continues exactly
//! as if it had never stopped (same reply, greedy sampling), prefilling only the new turn.

mod common;

use std::path::{Path, PathBuf};

use common::{prefills, run_chat};
use ds4_kvstore::KvFile;

fn scratch(name: &str) -> PathBuf {
    common::scratch("chat_kv_session", name)
}

/// Runs the REPL with `input` on stdin; returns (stdout, stderr).
fn chat(dir: &Path, input: &str) -> (String, String) {
    run_chat(
        dir,
        &["--nothink", "--temp", "0", "-n", "6", "-c", "1024"],
        input,
    )
}

#[test]
fn saved_conversation_resumes_in_another_process() {
    let dir = scratch("resume");
    // One process: two turns.
    let (whole, whole_err) = chat(&dir, "Tell me about foxes.\nAnd dogs?\n");
    // Another: the first turn, saved; a third resumes it and sends the second turn.
    let (_, save_err) = chat(&dir, "Tell me about foxes.\n/save conv.kv\n");
    assert!(save_err.contains("ds4: saved"), "{save_err}");
    let file = KvFile::decode(&std::fs::read(dir.join("conv.kv")).unwrap()).unwrap();
    let saved_tokens = file.header.tokens as usize;
    let (resumed, resume_err) = chat(&dir, "/load conv.kv\nAnd dogs?\n");
    assert!(
        resume_err.contains(&format!("ds4: resumed {saved_tokens} tokens")),
        "{resume_err}"
    );

    // The resumed turn reuses every saved token and prefills only its own.
    let whole_p = prefills(&whole_err);
    let resumed_p = prefills(&resume_err);
    assert_eq!(whole_p.len(), 2, "{whole_err}");
    assert_eq!(resumed_p, vec![whole_p[1]], "{resume_err}");
    assert_eq!(resumed_p[0].1, saved_tokens);
    // Greedy sampling: the second answer is the same as without the restart.
    assert!(
        whole.ends_with(&resumed),
        "replies differ:\nwhole: {whole:?}\nresumed: {resumed:?}"
    );
    assert!(!resumed.trim().is_empty());
}

#[test]
fn bad_save_and_load_are_reported_and_the_chat_goes_on() {
    let dir = scratch("bad");
    std::fs::write(dir.join("junk.kv"), b"KVC not really").unwrap();
    let (_, err) = chat(
        &dir,
        "/save early.kv\n/load junk.kv\n/load missing.kv\n/save\nhello\n/save no/such/dir/x.kv\n",
    );
    assert!(err.contains("nothing to save"), "{err}");
    assert!(err.contains("junk.kv"), "{err}");
    assert!(err.contains("missing.kv"), "{err}");
    assert!(err.contains("/save needs a file name"), "{err}");
    assert!(err.contains("x.kv"), "{err}");
    // The message in between was answered normally.
    assert_eq!(prefills(&err).len(), 1, "{err}");
    assert!(!dir.join("early.kv").exists());
}
