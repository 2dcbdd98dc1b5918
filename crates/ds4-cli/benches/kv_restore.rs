//! Restore vs prefill for `ds4 serve --kv-disk-dir` on the CPU backend: how long a prompt
//! prefix takes to prefill, to save as a `.kv` checkpoint, and to come back from disk
//! (`lookup_longest_prefix` + `load` with full validation + `Session::restore`).
//!
//! `cargo bench -p ds4-cli --bench kv_restore [-- MODEL.gguf]` (default: the bundled tiny
//! test model). Best of 3 per row; the checkpoint directory is a fresh temporary one.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use ds4_gguf::reader::GgufFile;
use ds4_kvstore::{KvStore, SaveReason, SaveRequest, StoreOptions};
use ds4_model::backend::{Backend, Logits};
use ds4_model::cpu::session::CpuBackend;
use ds4_model::numerics::Numerics;

fn best_of<T>(runs: usize, mut f: impl FnMut() -> T) -> (f64, T) {
    let mut best = f64::INFINITY;
    let mut last = None;
    for _ in 0..runs {
        let t = Instant::now();
        let out = f();
        best = best.min(t.elapsed().as_secs_f64());
        last = Some(out);
    }
    (best, last.expect("at least one run"))
}

fn main() {
    let model = std::env::args()
        .skip(1)
        .find(|a| a.ends_with(".gguf"))
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("assets/tiny-test-model.gguf")
        });
    let gguf = Arc::new(GgufFile::open(&model).expect("opening the model"));
    let backend = CpuBackend::from_file(gguf, Numerics::Ds4).expect("loading the model");
    let cfg = backend.config().clone();
    let ctx = 8192usize;
    let dir = std::env::temp_dir().join(format!("ds4-kv-restore-bench-{}", std::process::id()));
    let mut opts = StoreOptions::new(ctx as u32, 4);
    opts.budget_bytes = 0;
    opts.min_tokens = 1;
    let mut store = KvStore::open(&dir, &cfg, opts).expect("opening the store");
    println!(
        "model {} (vocab {}, {} layers), ctx {ctx}",
        model.display(),
        cfg.vocab_size,
        cfg.n_layers
    );
    println!(
        "| tokens | prefill ms (tok/s) | save ms | file MiB | lookup+load+restore ms | speed-up |"
    );
    println!("|---|---|---|---|---|---|");
    for &n in &[256usize, 1024, 4096] {
        // Ordinary ids away from the special tokens at the end of the vocabulary.
        let tokens: Vec<u32> = (0..n)
            .map(|i| (100 + (i * 7919) % (cfg.vocab_size - 1000)) as u32)
            .collect();
        let (prefill_s, session) = best_of(3, || {
            let mut s = backend.new_session(ctx).expect("session");
            s.eval(&tokens, Logits::Last).expect("prefill");
            s
        });
        let payload = session.snapshot();
        // A distinct text key per row; the store only needs it to be the key of the prompt.
        let text = format!("bench-{n}-").repeat(8);
        let (save_s, saved) = best_of(3, || {
            let _ = std::fs::remove_file(dir.join(format!(
                "{}.kv",
                ds4_kvstore::store::hex(&ds4_kvstore::store::sha1(text.as_bytes()))
            )));
            store
                .save(&SaveRequest {
                    text: text.as_bytes(),
                    payload: &payload,
                    reason: SaveReason::Cold,
                    key_flags: 0,
                    tool_map: &[],
                })
                .expect("save")
        });
        let prompt = format!("{text} and the rest of the prompt");
        let mut target = backend.new_session(ctx).expect("session");
        let (restore_s, _) = best_of(3, || {
            let hit = store.lookup_longest_prefix(&prompt).expect("a hit");
            let file = store.load(&hit).expect("load");
            target.restore(&file.payload).expect("restore");
        });
        assert_eq!(target.tokens(), session.tokens());
        assert_eq!(target.last_logits(), session.last_logits());
        println!(
            "| {n} | {:.1} ({:.0}) | {:.1} | {:.2} | {:.1} | {:.1}x |",
            prefill_s * 1e3,
            n as f64 / prefill_s,
            save_s * 1e3,
            saved.file_bytes as f64 / (1 << 20) as f64,
            restore_s * 1e3,
            prefill_s / restore_s
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
}
