//! `ds4 bench --kv-restore-tokens N` on the bundled tiny test model (CPU): the report's table
//! parses, the restored session matched the live one, the `.kv` file left in --kv-dir is a
//! valid checkpoint of N tokens; bad arguments are errors, not panics.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use ds4_kvstore::KvFile;

fn tiny_model() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("assets/tiny-test-model.gguf")
}

/// An empty directory for one test.
fn scratch(name: &str) -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("bench_kv_restore-{name}"));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("creating the scratch directory");
    dir
}

fn ds4_bench(dir: &Path, args: &[&str]) -> Output {
    let model = tiny_model();
    let out = Command::new(env!("CARGO_BIN_EXE_ds4"))
        .arg("bench")
        .arg("-m")
        .arg(&model)
        .args(args)
        .current_dir(dir)
        .env("HOME", dir)
        .output()
        .expect("running ds4");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!stderr.contains("panicked"), "{stderr}");
    out
}

/// The cells of the table row that follows the header starting with `| tokens |`.
fn table_row(stdout: &str) -> Vec<String> {
    let lines: Vec<&str> = stdout.lines().collect();
    let header = lines
        .iter()
        .position(|l| l.starts_with("| tokens |"))
        .unwrap_or_else(|| panic!("no table in:\n{stdout}"));
    let cells = |l: &str| -> Vec<String> {
        l.trim()
            .trim_matches('|')
            .split('|')
            .map(|c| c.trim().to_string())
            .collect()
    };
    let names = cells(lines[header]);
    let row = cells(lines[header + 2]);
    assert_eq!(names.len(), row.len(), "{stdout}");
    assert_eq!(
        names,
        [
            "tokens",
            "prefill s",
            "prefill t/s",
            "save s",
            "file MiB",
            "restore s",
            "speedup",
            "page cache",
            "logits identical",
            "continuation identical"
        ]
    );
    row
}

fn number(cell: &str) -> f64 {
    cell.trim_end_matches('x')
        .parse()
        .unwrap_or_else(|e| panic!("`{cell}` is not a number: {e}"))
}

#[test]
fn restore_of_200_tokens_matches_the_live_session_and_leaves_a_valid_file() {
    let dir = scratch("restore");
    let kv_dir = dir.join("kv");
    let out = ds4_bench(
        &dir,
        &[
            "--kv-restore-tokens",
            "200",
            "--kv-dir",
            kv_dir.to_str().unwrap(),
        ],
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let row = table_row(&stdout);
    assert_eq!(number(&row[0]), 200.0);
    let prefill_s = number(&row[1]);
    let prefill_tps = number(&row[2]);
    assert!(prefill_s > 0.0 && prefill_tps > 0.0, "{stdout}");
    // t/s is the token count over the prefill time (both rounded in the table).
    assert!(
        (prefill_tps * prefill_s / 200.0 - 1.0).abs() < 0.01,
        "{stdout}"
    );
    assert!(number(&row[3]) > 0.0, "save s: {stdout}");
    let file_mib = number(&row[4]);
    let restore_s = number(&row[5]);
    assert!(restore_s > 0.0, "{stdout}");
    let speedup = number(&row[6]);
    // Printed with one decimal, from the unrounded times.
    let ratio = prefill_s / restore_s;
    assert!((speedup - ratio).abs() <= 0.05 + 0.01 * ratio, "{stdout}");
    assert_eq!(row[7], "hot", "no --kv-drop-cache: {stdout}");
    assert_eq!(row[8], "yes", "{stdout}");
    assert_eq!(row[9], "yes (8/8)", "{stdout}");

    // The file is kept in --kv-dir: a valid checkpoint of the 200 tokens, of the reported size.
    let files: Vec<PathBuf> = std::fs::read_dir(&kv_dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "kv"))
        .collect();
    assert_eq!(files.len(), 1, "{files:?}");
    assert!(stdout.contains(&files[0].display().to_string()), "{stdout}");
    let bytes = std::fs::read(&files[0]).unwrap();
    assert!((bytes.len() as f64 / (1u64 << 20) as f64 - file_mib).abs() < 0.006);
    let file = KvFile::decode(&bytes).unwrap();
    assert_eq!(file.header.tokens, 200);
    // The context is sized from N: the tokens, 8 continuation tokens, one more.
    assert_eq!(file.header.ctx, 209);

    // A second run into the same directory replaces the file (the save is measured again).
    let again = ds4_bench(
        &dir,
        &[
            "--kv-restore-tokens",
            "200",
            "--kv-dir",
            kv_dir.to_str().unwrap(),
        ],
    );
    assert!(again.status.success());
    assert_eq!(table_row(&String::from_utf8_lossy(&again.stdout))[8], "yes");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn bad_kv_restore_arguments_are_clear_errors() {
    let dir = scratch("errors");
    let err = |args: &[&str]| -> String {
        let out = ds4_bench(&dir, args);
        assert!(!out.status.success(), "{args:?} succeeded");
        String::from_utf8_lossy(&out.stderr).into_owned()
    };

    let e = err(&["--kv-restore-tokens", "200", "--ctx-alloc", "100"]);
    assert!(e.contains("--ctx-alloc 100") && e.contains("209"), "{e}");

    let e = err(&["--kv-restore-tokens", "0"]);
    assert!(e.contains("--kv-restore-tokens"), "{e}");

    // --kv-dir is a regular file: the error names it.
    let not_a_dir = dir.join("plain-file");
    std::fs::write(&not_a_dir, b"x").unwrap();
    let e = err(&[
        "--kv-restore-tokens",
        "20",
        "--kv-dir",
        not_a_dir.to_str().unwrap(),
    ]);
    assert!(e.contains("plain-file"), "{e}");

    // The restore measurement replaces the context sweep; its options only go with it.
    let e = err(&["--kv-restore-tokens", "20", "--ctx-max", "4096"]);
    assert!(e.contains("--ctx-max"), "{e}");
    let e = err(&["--kv-dir", dir.to_str().unwrap()]);
    assert!(e.contains("--kv-restore-tokens"), "{e}");
    let _ = std::fs::remove_dir_all(&dir);
}
