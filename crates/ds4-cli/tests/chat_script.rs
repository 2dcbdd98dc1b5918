//! The interactive chat fed from a pipe (no terminal: rustyline reads plain lines), on the
//! bundled tiny test model: how commands change what each turn prefills, and the messages for
//! bad input. End of input quits with status 0.

mod common;

use std::path::{Path, PathBuf};

use common::{prefills, run_chat};

fn scratch(name: &str) -> PathBuf {
    common::scratch("chat_script", name)
}

/// Runs the REPL with `input` on stdin; returns stderr (statistics and notices).
fn chat(dir: &Path, args: &[&str], input: &str) -> String {
    run_chat(dir, args, input).1
}

#[test]
fn think_max_preamble_changes_force_a_full_prefill() {
    let dir = scratch("think-max");
    let err = chat(
        &dir,
        &["-n", "3", "--seed", "1", "-c", "4096"],
        "one\n/think-max\ntwo\n/ctx 400000\nthree\nfour\n/think\nfive\n",
    );
    let p = prefills(&err);
    assert_eq!(p.len(), 5, "{err}");
    // Turn one starts empty.
    assert_eq!(p[0].1, 0);
    // Think Max is not in effect at ctx 4096: nothing earlier changes, the cache is kept.
    assert!(err.contains("Think Max needs a context >= 393216"), "{err}");
    assert!(p[1].1 > 0, "{err}");
    // A new context means a new session; with ctx 400000 the preamble goes in after BOS.
    assert_eq!(p[2].1, 0, "{err}");
    // The Think Max preamble alone is about 90 tokens.
    assert!(p[2].0 > p[1].1 + p[1].0 + 50, "{err}");
    assert!(p[3].1 > 0, "{err}");
    // Taking the preamble out rewrites the start of the transcript: all is processed again.
    assert_eq!(p[4].1, 0, "{err}");
}

#[test]
fn bad_input_is_reported_and_the_chat_goes_on() {
    let dir = scratch("bad-input");
    let long = "word ".repeat(200);
    let err = chat(
        &dir,
        &["--nothink", "-n", "2", "--seed", "1", "-c", "64"],
        &format!("/read missing.txt\n/frobnicate\n/ctx 1\n{long}\nshort\n/ctx 8\n"),
    );
    assert!(err.contains("cannot read missing.txt"), "{err}");
    assert!(err.contains("unknown command /frobnicate"), "{err}");
    assert!(err.contains("/ctx needs a token count >= 2"), "{err}");
    assert!(err.contains("the context is full"), "{err}");
    assert!(err.contains("/ctx must be larger"), "{err}");
    // Only the short message reached the model, on an empty session.
    let p = prefills(&err);
    assert_eq!(p.len(), 1, "{err}");
    assert_eq!(p[0].1, 0);
    assert!(err.contains("generation: "), "{err}");
}
