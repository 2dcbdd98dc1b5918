//! One-shot `ds4 -p` on the bundled tiny test model (real tokenizer, random weights): exit
//! status, statistics, --dump-tokens, --dump-logprobs in ds4's JSON shape, a missing -m file,
//! and --seed reproducibility. Each run uses its own HOME and an empty working directory (so
//! no ./ds4flash.gguf is found); the bundled model's cache is shared between tests.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use serde_json::Value;

/// An empty directory for one test, used as HOME and working directory.
fn scratch(name: &str) -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("chat_oneshot-{name}"));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("creating the scratch directory");
    dir
}

fn ds4(dir: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_ds4"))
        .args(args)
        .current_dir(dir)
        .env("HOME", dir)
        .env(
            "XDG_CACHE_HOME",
            Path::new(env!("CARGO_TARGET_TMPDIR")).join("ds4-cache"),
        )
        .output()
        .expect("running ds4")
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// The number in `generation: N tokens` of the statistics line.
fn generated_count(stderr: &str) -> usize {
    let line = stderr
        .lines()
        .find(|l| l.contains("generation: "))
        .unwrap_or_else(|| panic!("no statistics line in:\n{stderr}"));
    let after = line.split("generation: ").nth(1).unwrap();
    after
        .split_whitespace()
        .next()
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("bad statistics line: {line}"))
}

#[test]
fn one_shot_streams_a_reply_and_prints_statistics() {
    let dir = scratch("reply");
    let out = ds4(
        &dir,
        &["-p", "Hello", "--nothink", "-n", "8", "--seed", "5"],
    );
    let err = stderr(&out);
    assert!(out.status.success(), "{err}");
    assert!(err.contains("bundled tiny test model"), "{err}");
    assert!(err.contains("meaningless"), "{err}");
    assert!(err.contains("ds4: prefill: "), "{err}");
    assert!(err.contains(" t/s"), "{err}");
    let n = generated_count(&err);
    assert!((1..=8).contains(&n), "{err}");
    assert!(!stdout(&out).trim().is_empty(), "no reply on stdout");
    assert!(!err.contains("panicked"), "{err}");
}

#[test]
fn reasoning_goes_to_stderr_and_the_answer_to_stdout() {
    let dir = scratch("thinking");
    // With thinking on, the reply starts inside <think>: until the model samples </think>
    // (practically never in 8 tokens of the random tiny model) everything is reasoning.
    let out = ds4(&dir, &["-p", "Hello", "--think", "-n", "8", "--seed", "5"]);
    let err = stderr(&out);
    assert!(out.status.success(), "{err}");
    assert_eq!(generated_count(&err), 8, "{err}");
    assert!(stdout(&out).trim().is_empty(), "stdout: {:?}", stdout(&out));
    let reasoning = err
        .lines()
        .filter(|l| !l.starts_with("ds4: "))
        .collect::<String>();
    assert!(!reasoning.trim().is_empty(), "{err}");
}

#[test]
fn dump_tokens_shows_the_rendered_single_turn_prompt() {
    let dir = scratch("dump-tokens");
    let out = ds4(&dir, &["-p", "Hello", "--dump-tokens"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let text = stdout(&out);
    let mut joined = String::new();
    for (i, line) in text.lines().enumerate() {
        let fields: Vec<&str> = line.splitn(3, '\t').collect();
        assert_eq!(fields.len(), 3, "line {line:?}");
        assert_eq!(fields[0], i.to_string());
        fields[1].parse::<u32>().expect("a token id");
        let piece: String = serde_json::from_str(fields[2]).expect("a JSON string");
        joined.push_str(&piece);
    }
    assert_eq!(
        joined,
        "<｜begin▁of▁sentence｜>You are a helpful assistant<｜User｜>Hello<｜Assistant｜><think>"
    );
    assert!(text.starts_with("0\t0\t"), "BOS is id 0: {text}");
    // No generation in this diagnostic mode.
    assert!(!stderr(&out).contains("generation:"));
}

#[test]
fn system_flag_and_nothink_shape_the_prompt() {
    let dir = scratch("sys");
    let out = ds4(
        &dir,
        &[
            "-sys",
            "Be brief.",
            "--nothink",
            "-p",
            "Hi",
            "--dump-tokens",
        ],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let joined: String = stdout(&out)
        .lines()
        .map(|l| serde_json::from_str::<String>(l.splitn(3, '\t').nth(2).unwrap()).unwrap())
        .collect();
    assert_eq!(
        joined,
        "<｜begin▁of▁sentence｜>Be brief.<｜User｜>Hi<｜Assistant｜></think>"
    );
}

#[test]
fn prompt_file_is_read() {
    let dir = scratch("prompt-file");
    std::fs::write(dir.join("q.txt"), "What is 2+2?").unwrap();
    let out = ds4(
        &dir,
        &["--prompt-file", "q.txt", "--nothink", "--dump-tokens"],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stdout(&out).contains("\"2\""), "{}", stdout(&out));
    let missing = ds4(&dir, &["--prompt-file", "nope.txt"]);
    assert_eq!(missing.status.code(), Some(1));
    assert!(stderr(&missing).contains("nope.txt"));
}

#[test]
fn dump_logprobs_writes_ds4s_json_shape() {
    let dir = scratch("logprobs");
    let args = ["-p", "Hello", "--nothink"];
    let tokens = ds4(&dir, &[&args[..], &["--dump-tokens"]].concat());
    let prompt_tokens = stdout(&tokens).lines().count();
    let out = ds4(
        &dir,
        &[
            &args[..],
            &[
                "-n",
                "4",
                "--dump-logprobs",
                "lp.json",
                "--logprobs-top-k",
                "5",
            ],
        ]
        .concat(),
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let doc: Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("lp.json")).unwrap()).unwrap();
    assert!(doc["source"].is_string());
    assert_eq!(doc["prompt_tokens"].as_u64(), Some(prompt_tokens as u64));
    assert_eq!(doc["ctx"].as_u64(), Some(32768));
    assert_eq!(doc["top_k"].as_u64(), Some(5));
    let steps = doc["steps"].as_array().expect("steps");
    assert!((1..=4).contains(&steps.len()), "{} steps", steps.len());
    for (i, step) in steps.iter().enumerate() {
        assert_eq!(step["step"].as_u64(), Some(i as u64));
        let tops = step["top_logprobs"].as_array().expect("top_logprobs");
        assert_eq!(tops.len(), 5);
        // Greedy: the selected token is the most likely one.
        assert_eq!(step["selected"]["id"], tops[0]["token"]["id"]);
        let mut offsets = Vec::new();
        let mut previous = f64::INFINITY;
        for entry in tops {
            let token = &entry["token"];
            assert!(token["id"].is_u64());
            let bytes: Vec<u8> = token["bytes"]
                .as_array()
                .unwrap()
                .iter()
                .map(|b| b.as_u64().unwrap() as u8)
                .collect();
            if let Ok(s) = std::str::from_utf8(&bytes) {
                assert_eq!(token["text"].as_str(), Some(s));
            }
            let logit = entry["logit"].as_f64().unwrap();
            let logprob = entry["logprob"].as_f64().unwrap();
            assert!(logprob <= 0.0 && logprob <= previous + 1e-6);
            previous = logprob;
            // logit − logprob is the same log-sum-exp for every entry of a step.
            offsets.push(logit - logprob);
        }
        let spread = offsets.iter().cloned().fold(f64::NEG_INFINITY, f64::max)
            - offsets.iter().cloned().fold(f64::INFINITY, f64::min);
        assert!(spread < 1e-3, "log-sum-exp differs by {spread}");
    }
}

#[test]
fn a_missing_model_file_says_how_to_get_one() {
    let dir = scratch("missing");
    let out = ds4(&dir, &["-m", "no-such-model.gguf", "-p", "hi"]);
    assert_eq!(out.status.code(), Some(1));
    let err = stderr(&out);
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    assert!(err.contains("no-such-model.gguf"), "{err}");
    assert!(err.contains("DeepSeek-V4-Flash"), "{err}");
    assert!(err.contains("ds4flash.gguf"), "{err}");
    assert!(!err.contains("panicked"), "{err}");
}

#[test]
fn a_seed_reproduces_the_reply() {
    let dir = scratch("seed");
    let run = |seed: &str| {
        let out = ds4(
            &dir,
            &["-p", "Hello", "--nothink", "-n", "12", "--seed", seed],
        );
        assert!(out.status.success(), "{}", stderr(&out));
        stdout(&out)
    };
    let a = run("42");
    assert_eq!(a, run("42"));
    assert_ne!(a, run("43"));
}

#[test]
fn bad_sampling_flags_are_errors() {
    let dir = scratch("bad-flags");
    for args in [
        &["-p", "x", "--top-p", "0"][..],
        &["-p", "x", "--temp=-1"],
        &["-p", "x", "--logprobs-top-k", "500"],
        &["-p", "x", "--backend", "tpu"],
    ] {
        let out = ds4(&dir, args);
        assert_eq!(out.status.code(), Some(1), "{args:?}");
        let err = stderr(&out);
        assert!(
            err.lines()
                .last()
                .is_some_and(|l| l.starts_with("ds4: error:")),
            "{err}"
        );
    }
}

#[test]
fn an_already_rendered_prompt_is_used_as_it_is() {
    let dir = scratch("rendered");
    let rendered = "<｜begin▁of▁sentence｜>Sys<｜User｜>Hi<｜Assistant｜></think>";
    let out = ds4(&dir, &["-p", rendered, "--think", "--dump-tokens"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let joined: String = stdout(&out)
        .lines()
        .map(|l| serde_json::from_str::<String>(l.splitn(3, '\t').nth(2).unwrap()).unwrap())
        .collect();
    assert_eq!(joined, rendered);
    // Its reply is the answer (the prompt closed the think block), whatever --think says.
    let out = ds4(&dir, &["-p", rendered, "--think", "-n", "6", "--seed", "2"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(!stdout(&out).trim().is_empty());
}

#[test]
fn a_closed_stdout_stops_generation() {
    use std::io::Read;
    use std::process::Stdio;
    let dir = scratch("closed-stdout");
    let mut child = Command::new(env!("CARGO_BIN_EXE_ds4"))
        .args(["-p", "Hello", "--nothink", "-n", "5000", "--seed", "4"])
        .current_dir(&dir)
        .env("HOME", &dir)
        .env(
            "XDG_CACHE_HOME",
            Path::new(env!("CARGO_TARGET_TMPDIR")).join("ds4-cache"),
        )
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("running ds4");
    // Read the first bytes of the reply, then close the pipe as `| head -c 1` would.
    let mut first = [0u8; 1];
    child.stdout.take().unwrap().read_exact(&mut first).unwrap();
    let out = child.wait_with_output().unwrap();
    let err = stderr(&out);
    assert!(out.status.success(), "{err}");
    assert!(generated_count(&err) < 5000, "{err}");
}

#[test]
fn dump_flags_need_a_prompt() {
    let dir = scratch("dump-no-prompt");
    let out = ds4(&dir, &["--dump-tokens"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("need a prompt"), "{}", stderr(&out));
}
