//! The interactive chat driven through a pseudo-terminal (rexpect), on the bundled tiny test
//! model: two turns where the second prefills only its new tokens, commands, and a reply
//! stopped with Ctrl+C after which the prompt returns and the next turn reuses the session.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use rexpect::process::WaitStatus;
use rexpect::reader::Options;
use rexpect::session::{spawn_with_options, PtySession};

const TIMEOUT_MS: u64 = 60_000;

fn scratch(name: &str) -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("chat_pty-{name}"));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("creating the scratch directory");
    dir
}

fn spawn(dir: &Path, args: &[&str]) -> PtySession {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_ds4"));
    cmd.args(args)
        .current_dir(dir)
        .env("HOME", dir)
        .env("TERM", "xterm")
        .env(
            "XDG_CACHE_HOME",
            Path::new(env!("CARGO_TARGET_TMPDIR")).join("ds4-cache"),
        );
    spawn_with_options(
        cmd,
        Options::new()
            .timeout_ms(Some(TIMEOUT_MS))
            .strip_ansi_escape_codes(true),
    )
    .expect("spawning ds4 in a pty")
}

/// Waits for `prefill: N new tokens (M cached)` and returns (N, M).
fn expect_prefill(p: &mut PtySession) -> (usize, usize) {
    let (_, m) = p
        .exp_regex(r"prefill: \d+ new tokens \(\d+ cached\)")
        .expect("the prefill line");
    let nums: Vec<usize> = m
        .split(|c: char| !c.is_ascii_digit())
        .filter(|s| !s.is_empty())
        .map(|s| s.parse().unwrap())
        .collect();
    (nums[0], nums[1])
}

/// Waits for the statistics line and returns the generated token count.
fn expect_generated(p: &mut PtySession) -> usize {
    let (_, m) = p
        .exp_regex(r"generation: \d+ tokens")
        .expect("the statistics line");
    m.split_whitespace().nth(1).unwrap().parse().unwrap()
}

#[test]
fn two_turns_share_the_session_and_commands_work() {
    let dir = scratch("turns");
    let mut p = spawn(&dir, &["-n", "6", "--seed", "9"]);
    p.exp_string("ds4> ").unwrap();

    p.send_line("Hello there").unwrap();
    let (new1, cached1) = expect_prefill(&mut p);
    assert_eq!(cached1, 0);
    assert!(new1 > 5);
    assert!(expect_generated(&mut p) > 0);
    p.exp_string("ds4> ").unwrap();

    // A command between turns: thinking off (the transcript only grows, so the cache stays).
    p.send_line("/nothink").unwrap();
    p.exp_string("thinking: off").unwrap();
    p.exp_string("ds4> ").unwrap();

    p.send_line("And a second question").unwrap();
    let (new2, cached2) = expect_prefill(&mut p);
    assert!(
        cached2 > new1,
        "the second turn reuses the first: {cached2} cached"
    );
    assert!(new2 < cached2);
    assert!(expect_generated(&mut p) > 0);
    p.exp_string("ds4> ").unwrap();

    // /ctx gives a new session: the next turn processes the whole conversation again.
    p.send_line("/ctx 8192").unwrap();
    p.exp_string("context: 8192 tokens").unwrap();
    p.exp_string("ds4> ").unwrap();
    p.send_line("/help").unwrap();
    p.exp_string("/read FILE").unwrap();
    p.exp_string("ds4> ").unwrap();
    p.send_line("/status").unwrap();
    p.exp_regex(r"thinking off; context \d+ of 8192 tokens used \(0 held by the session\)")
        .unwrap();
    p.exp_string("ds4> ").unwrap();
    p.send_line("Third").unwrap();
    let (new3, cached3) = expect_prefill(&mut p);
    assert_eq!(cached3, 0);
    assert!(new3 > cached2 + new2);
    expect_generated(&mut p);
    p.exp_string("ds4> ").unwrap();

    p.send_line("/quit").unwrap();
    p.exp_eof().unwrap();
    assert_exit_0(&mut p);
    let history = std::fs::read_to_string(dir.join(".ds4_history")).unwrap();
    assert!(history.contains("And a second question"), "{history}");
}

#[test]
fn ctrl_c_stops_a_reply_and_the_chat_goes_on() {
    let dir = scratch("interrupt");
    std::fs::write(dir.join("question.txt"), "A question from a file").unwrap();
    // -n is far more than the test waits for: only Ctrl+C ends these replies.
    let mut p = spawn(&dir, &["--nothink", "-n", "1000000", "--seed", "3"]);
    p.exp_string("ds4> ").unwrap();

    p.send_line("/read question.txt").unwrap();
    p.exp_string("read 22 bytes from question.txt").unwrap();
    let (_, cached1) = expect_prefill(&mut p);
    assert_eq!(cached1, 0);
    std::thread::sleep(Duration::from_millis(800));
    p.send_control('c').unwrap();
    p.exp_string("[interrupted]").unwrap();
    let generated = expect_generated(&mut p);
    assert!(generated > 0, "the reply was under way");
    p.exp_string("ds4> ").unwrap();

    // The process is alive and the next turn extends the interrupted conversation.
    p.send_line("Go on").unwrap();
    let (new2, cached2) = expect_prefill(&mut p);
    assert!(
        cached2 > generated,
        "{cached2} cached after {generated} generated"
    );
    assert!(new2 > 0);
    std::thread::sleep(Duration::from_millis(500));
    p.send_control('c').unwrap();
    p.exp_string("[interrupted]").unwrap();
    assert!(expect_generated(&mut p) > 0);
    p.exp_string("ds4> ").unwrap();

    // Ctrl+C at the prompt quits.
    p.send_control('c').unwrap();
    p.exp_eof().unwrap();
    assert_exit_0(&mut p);
}

#[test]
fn ctrl_c_ends_a_one_shot_reply_with_statistics() {
    let dir = scratch("one-shot");
    let mut p = spawn(&dir, &["-p", "Hello", "--nothink", "-n", "1000000"]);
    // The reply's first visible character after the notice: generation is under way (a fixed
    // wait from the notice raced the model load on a busy machine, and a Ctrl+C before the
    // handler is installed ends the process as the default action does).
    p.exp_regex(r"meaningless\.\r\n\s*\S").unwrap();
    std::thread::sleep(Duration::from_millis(500));
    p.send_control('c').unwrap();
    p.exp_string("[interrupted]").unwrap();
    assert!(expect_generated(&mut p) > 0);
    p.exp_eof().unwrap();
    assert_exit_0(&mut p);
}

/// The process ended normally with status 0 (not killed by the signal).
fn assert_exit_0(p: &mut PtySession) {
    let status = p.process_mut().wait().expect("waiting for ds4");
    assert!(
        matches!(status, WaitStatus::Exited(_, 0)),
        "ds4 ended with {status:?}"
    );
}

#[test]
fn a_long_prompt_shows_a_prefill_progress_bar() {
    let dir = scratch("progress");
    // About 2000 tokens: several 256-token prefill spans.
    let words = ["river", "stone", "cloud", "seven", "orange", "quiet"];
    let text: Vec<&str> = (0..2000)
        .map(|i| words[(i * 7 + i / 3) % words.len()])
        .collect();
    std::fs::write(dir.join("long.txt"), text.join(" ")).unwrap();
    let mut p = spawn(
        &dir,
        &[
            "--prompt-file",
            "long.txt",
            "--nothink",
            "-n",
            "2",
            "--seed",
            "1",
        ],
    );
    let (_, bar) = p.exp_regex(r"prefill .*\d+/\d+ tokens").unwrap();
    let total: usize = bar
        .rsplit(' ')
        .nth(1)
        .and_then(|f| f.split('/').nth(1))
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("bad bar: {bar}"));
    assert!(total > 1000, "{bar}");
    p.exp_string("generation: ").unwrap();
    p.exp_eof().unwrap();
    assert_exit_0(&mut p);
}
