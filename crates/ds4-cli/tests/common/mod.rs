//! Helpers of the tests that feed the interactive chat from a pipe (no terminal: rustyline
//! reads plain lines) on the bundled tiny test model.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

/// An empty scratch directory `{test}-{name}` under the target's test directory.
pub fn scratch(test: &str, name: &str) -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("{test}-{name}"));
    if dir.exists() {
        std::fs::remove_dir_all(&dir).expect("emptying the scratch directory");
    }
    std::fs::create_dir_all(&dir).expect("creating the scratch directory");
    dir
}

/// Runs the REPL in `dir` (also its HOME) with `args` and `input` on stdin; checks that it
/// exits with status 0 without a panic; returns (stdout, stderr).
pub fn run_chat(dir: &Path, args: &[&str], input: &str) -> (String, String) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_ds4"))
        .args(args)
        .current_dir(dir)
        .env("HOME", dir)
        .env(
            "XDG_CACHE_HOME",
            Path::new(env!("CARGO_TARGET_TMPDIR")).join("ds4-cache"),
        )
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("running ds4");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(input.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(out.status.success(), "{err}");
    assert!(!err.contains("panicked"), "{err}");
    (String::from_utf8_lossy(&out.stdout).into_owned(), err)
}

/// Every `prefill: N new tokens (M cached)` line as (N, M).
pub fn prefills(stderr: &str) -> Vec<(usize, usize)> {
    stderr
        .lines()
        .filter_map(|l| l.strip_prefix("ds4: prefill: "))
        .filter(|l| l.contains("new tokens"))
        .map(|l| {
            let nums: Vec<usize> = l
                .split(|c: char| !c.is_ascii_digit())
                .filter(|s| !s.is_empty())
                .map(|s| s.parse().unwrap())
                .collect();
            (nums[0], nums[1])
        })
        .collect()
}
