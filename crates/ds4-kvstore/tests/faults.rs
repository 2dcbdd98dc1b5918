//! Faults: a writer killed with SIGKILL in the middle of a save, and a full disk.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{mini_config, render, scratch_dir, synthetic_payload, tokens};
use ds4_kvstore::store::{parse_kv_name, verify_file, LOCK_FILE_NAME};
use ds4_kvstore::{KvError, KvStore, SaveReason, SaveRequest, StoreOptions};
use ds4_model::config::ModelConfig;

const WRITER_ENV: &str = "DS4_KVSTORE_TEST_WRITER_DIR";
const WRITER_CTX: usize = 4096;
const WRITER_TOKENS: usize = 2000;

fn writer_opts() -> StoreOptions {
    let mut o = StoreOptions::new(WRITER_CTX as u32, 2);
    o.min_tokens = 16;
    o.budget_bytes = 400 << 20;
    o
}

fn writer_text(i: usize) -> String {
    format!("checkpoint {i:06} {}", "x".repeat(1000))
}

/// The child process of `kill_9_during_a_write_leaves_no_usable_partial_file`: saves
/// ~50 MB Flash-shaped checkpoints in a loop until it is killed.
#[test]
#[ignore = "helper process, started by kill_9_during_a_write_leaves_no_usable_partial_file"]
fn writer_child_process() {
    let Some(dir) = std::env::var_os(WRITER_ENV) else {
        eprintln!("{WRITER_ENV} not set: nothing to do (this test is a helper process)");
        return;
    };
    let cfg = ModelConfig::flash();
    let toks = tokens(WRITER_TOKENS, cfg.vocab_size, 5);
    let payload = synthetic_payload(&cfg, WRITER_CTX, &toks, 6);
    let mut store = KvStore::open(PathBuf::from(dir), &cfg, writer_opts()).unwrap();
    for i in 0.. {
        store
            .save(&SaveRequest {
                text: writer_text(i).as_bytes(),
                payload: &payload,
                reason: SaveReason::Continued,
                key_flags: 0,
                tool_map: &[],
            })
            .unwrap();
    }
}

fn names(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter(|n| n != LOCK_FILE_NAME)
        .collect();
    v.sort();
    v
}

#[test]
fn kill_9_during_a_write_leaves_no_usable_partial_file() {
    let cfg = ModelConfig::flash();
    let exe = std::env::current_exe().unwrap();
    let mut caught = None;
    for attempt in 0..5 {
        let dir = scratch_dir(&format!("kill9-{attempt}"));
        let mut child = Command::new(&exe)
            .args([
                "writer_child_process",
                "--exact",
                "--ignored",
                "--nocapture",
            ])
            .env(WRITER_ENV, &dir)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        // Wait for at least one complete file and a temporary file with data in it.
        let deadline = Instant::now() + Duration::from_secs(120);
        let mut partial = None;
        while Instant::now() < deadline {
            let n = names(&dir);
            let complete = n.iter().any(|x| x.ends_with(".kv"));
            let tmp = n.iter().find(|x| x.contains(".kv.tmp.")).cloned();
            if let (true, Some(t)) = (complete, tmp) {
                if std::fs::metadata(dir.join(&t)).is_ok_and(|m| m.len() > 1 << 20) {
                    child.kill().unwrap(); // SIGKILL
                    partial = Some(t);
                    break;
                }
            }
            if let Ok(Some(status)) = child.try_wait() {
                panic!("the writer exited by itself: {status}");
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        child.kill().ok();
        child.wait().unwrap();
        let partial = partial.expect("the writer made progress within the deadline");
        if dir.join(&partial).exists() {
            caught = Some((dir, partial));
            break;
        }
        // The rename won the race with the kill: try again.
        std::fs::remove_dir_all(&dir).ok();
    }
    let (dir, partial) = caught.expect("a kill landed inside a write in 5 attempts");
    let partial_len = std::fs::metadata(dir.join(&partial)).unwrap().len();

    // Every .kv name in the directory is a complete, valid file.
    let kv: Vec<String> = names(&dir)
        .into_iter()
        .filter(|n| n.ends_with(".kv"))
        .collect();
    assert!(!kv.is_empty());
    for n in &kv {
        let sha = parse_kv_name(n).unwrap();
        verify_file(&cfg, &sha, &std::fs::read(dir.join(n)).unwrap())
            .unwrap_or_else(|e| panic!("{n}: {e}"));
    }
    // A new server: the dead writer's temporary is removed, never indexed; every checkpoint
    // is found and loads.
    let mut store = KvStore::open(&dir, &cfg, writer_opts()).unwrap();
    assert!(
        !dir.join(&partial).exists(),
        "orphan {partial} ({partial_len} bytes) removed"
    );
    assert!(store.skipped().is_empty(), "{:?}", store.skipped());
    assert_eq!(store.entries().len(), kv.len());
    let texts: Vec<String> = (0..1000)
        .map(writer_text)
        .filter(|t| {
            kv.contains(&format!(
                "{}.kv",
                ds4_kvstore::store::hex(&ds4_kvstore::store::sha1(t.as_bytes()))
            ))
        })
        .collect();
    assert_eq!(texts.len(), kv.len());
    for t in &texts {
        let hit = store
            .lookup_longest_prefix(&format!("{t} and more"))
            .unwrap();
        let f = store.load(&hit).unwrap();
        assert_eq!(f.header.tokens as usize, WRITER_TOKENS);
    }
    println!(
        "killed during the write of {partial} at {partial_len} bytes; {} complete files",
        kv.len()
    );
    std::fs::remove_dir_all(&dir).ok();
}

/// A tmpfs of a fixed size, unmounted when dropped.
struct SmallFs {
    path: PathBuf,
}

impl SmallFs {
    fn mount(path: PathBuf, size: &str) -> Result<SmallFs, String> {
        std::fs::create_dir_all(&path).map_err(|e| e.to_string())?;
        let out = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(&path)
            .output()
            .map_err(|e| format!("cannot run mount: {e}"))?;
        if !out.status.success() {
            return Err(String::from_utf8_lossy(&out.stderr).trim().to_string());
        }
        Ok(SmallFs { path })
    }
}

impl Drop for SmallFs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.path).status();
        let _ = std::fs::remove_dir(&self.path);
    }
}

/// Saves ever larger checkpoints into `dir` until a write fails; checks that the failure is an
/// I/O error of `kind`, that no temporary file is left, that every earlier checkpoint is still
/// found and loads, and that a small save succeeds afterwards (`free` makes room first).
fn fill_until_write_fails(dir: &Path, kind: std::io::ErrorKind, free: bool) -> String {
    let cfg = mini_config();
    let ctx = 4096;
    let mut o = StoreOptions::new(ctx as u32, 4);
    o.min_tokens = 16;
    o.budget_bytes = 0; // the storage, not the budget, is the limit
    let mut store = KvStore::open(dir, &cfg, o).unwrap();
    let toks = tokens(3000, cfg.vocab_size, 30);
    let mut saved = Vec::new();
    let err = loop {
        let n = 1000 + 100 * saved.len();
        assert!(n < 3000, "the storage never filled");
        let payload = synthetic_payload(&cfg, ctx, &toks[..n], n as u64);
        let text = render(&toks[..n]);
        match store.save(&SaveRequest {
            text: text.as_bytes(),
            payload: &payload,
            reason: SaveReason::Continued,
            key_flags: 0,
            tool_map: &[],
        }) {
            Ok(_) => saved.push(text),
            Err(e) => break e,
        }
    };
    assert!(!saved.is_empty());
    match &err {
        KvError::Io { source, .. } => assert_eq!(source.kind(), kind, "{err}"),
        other => panic!("expected an I/O error, got {other}"),
    }
    let left = names(dir);
    assert!(left.iter().all(|n| n.ends_with(".kv")), "{left:?}");
    assert_eq!(left.len(), saved.len());
    for text in &saved {
        let hit = store.lookup_longest_prefix(text).unwrap();
        assert_eq!(hit.text_len, text.len());
        store.load(&hit).unwrap();
    }
    if free {
        std::fs::remove_file(&store.entries()[0].path).unwrap();
    }
    let payload = synthetic_payload(&cfg, ctx, &toks[..100], 1);
    store
        .save(&SaveRequest {
            text: b"after the failed write",
            payload: &payload,
            reason: SaveReason::Shutdown,
            key_flags: 0,
            tool_map: &[],
        })
        .unwrap();
    format!("write failed after {} files: {err}", saved.len())
}

#[test]
fn full_disk_fails_the_save_and_the_store_keeps_serving() {
    let work = scratch_dir("diskfull");
    let fs = match SmallFs::mount(work.join("mnt"), "1m") {
        Ok(fs) => fs,
        Err(e) => {
            eprintln!(
                "SKIPPED full_disk test: a 1 MiB tmpfs cannot be mounted here ({e}); run as root \
                 to cover ENOSPC (file_size_limit_... covers the same failure path)"
            );
            return;
        }
    };
    let report = fill_until_write_fails(&fs.path, std::io::ErrorKind::StorageFull, true);
    println!("1 MiB tmpfs: {report}");
    drop(fs);
    std::fs::remove_dir_all(&work).ok();
}

const LIMITED_ENV: &str = "DS4_KVSTORE_TEST_LIMITED_DIR";

/// The child of `file_size_limit_fails_the_save_and_the_store_keeps_serving`, started with
/// RLIMIT_FSIZE = 64 KiB and SIGXFSZ ignored, so oversized writes fail with EFBIG.
#[test]
#[ignore = "helper process, started by file_size_limit_fails_the_save_and_the_store_keeps_serving"]
fn limited_writer_child_process() {
    let Some(dir) = std::env::var_os(LIMITED_ENV) else {
        eprintln!("{LIMITED_ENV} not set: nothing to do (this test is a helper process)");
        return;
    };
    let report = fill_until_write_fails(Path::new(&dir), std::io::ErrorKind::FileTooLarge, false);
    println!("RESULT {report}");
}

#[test]
fn file_size_limit_fails_the_save_and_the_store_keeps_serving() {
    // Works without root: bash sets the file-size limit and ignores SIGXFSZ (an ignored signal
    // stays ignored across exec), then runs this test binary's helper.
    let dir = scratch_dir("fsize");
    let exe = std::env::current_exe().unwrap();
    let out = match Command::new("bash")
        .args(["-c", "trap '' XFSZ; ulimit -f 64 && exec \"$0\" \"$@\""])
        .arg(&exe)
        .args([
            "limited_writer_child_process",
            "--exact",
            "--ignored",
            "--nocapture",
        ])
        .env(LIMITED_ENV, &dir)
        .output()
    {
        Ok(out) => out,
        Err(e) => {
            eprintln!("SKIPPED file size limit test: cannot run bash ({e})");
            return;
        }
    };
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && stdout.contains("RESULT"),
        "child failed: {}\n{stdout}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    println!(
        "{}",
        stdout.lines().find(|l| l.starts_with("RESULT")).unwrap()
    );
    std::fs::remove_dir_all(&dir).ok();
}
