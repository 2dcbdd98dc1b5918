//! Disk KV cache timings for Flash-shaped checkpoints (BENCHMARKS.md "KV cache"): save (write,
//! fsync, rename, directory fsync), lookup (directory scan + SHA1 of prompt prefixes) and load
//! (read + full validation). Run: `cargo bench -p ds4-kvstore --bench store [DIR]`; DIR
//! defaults to the system temp directory (put it on the disk you want to measure).

#[path = "../tests/common/mod.rs"]
mod common;

use std::time::Instant;

use common::{synthetic_payload, tokens};
use ds4_kvstore::{KvStore, SaveReason, SaveRequest, StoreOptions};
use ds4_model::config::ModelConfig;
use ds4_model::session::kv_bytes;

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn main() {
    let base = std::env::args()
        .nth(1)
        .filter(|a| !a.starts_with('-'))
        .map(std::path::PathBuf::from)
        .unwrap_or_else(std::env::temp_dir);
    let cfg = ModelConfig::flash();
    let ctx = 32768usize;
    println!(
        "Flash, ctx {ctx}: live KV state at capacity {:.1} MiB",
        kv_bytes(&cfg, ctx) as f64 / (1 << 20) as f64
    );
    println!(
        "| tokens | file MiB | save ms (MB/s) | lookup ms (10 files) | load+verify ms (MB/s) |"
    );
    println!("|---|---|---|---|---|");
    for n_tok in [2048usize, 8192, 30000] {
        let dir = base.join(format!("ds4-kvstore-bench-{}-{n_tok}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let toks = tokens(n_tok, cfg.vocab_size, 1);
        let payload = synthetic_payload(&cfg, ctx, &toks, 2);
        let mut opts = StoreOptions::new(ctx as u32, 2);
        opts.budget_bytes = 0;
        let mut store = KvStore::open(&dir, &cfg, opts).unwrap();
        // ~4 bytes of text per token; each file gets its own text (key).
        let text = |i: usize| format!("{i:04}{}", "abcd".repeat(n_tok));
        let (mut saves, mut size) = (Vec::new(), 0);
        for i in 0..10 {
            let t = text(i);
            let t0 = Instant::now();
            let s = store
                .save(&SaveRequest {
                    text: t.as_bytes(),
                    payload: &payload,
                    reason: SaveReason::Cold,
                    key_flags: 0,
                    tool_map: &[],
                })
                .unwrap();
            saves.push(t0.elapsed().as_secs_f64());
            size = s.file_bytes;
        }
        let prompt = format!("{} and the rest of the conversation", text(7));
        let mut lookups = Vec::new();
        let mut hit = None;
        for _ in 0..20 {
            let t0 = Instant::now();
            hit = store.lookup_longest_prefix(&prompt);
            lookups.push(t0.elapsed().as_secs_f64());
        }
        let hit = hit.expect("hit");
        let mut loads = Vec::new();
        for _ in 0..5 {
            let t0 = Instant::now();
            let f = store.load(&hit).unwrap();
            loads.push(t0.elapsed().as_secs_f64());
            assert_eq!(f.payload.len(), payload.len());
        }
        let (s, l, k) = (median(saves), median(lookups), median(loads));
        let mb = size as f64 / 1e6;
        println!(
            "| {n_tok} | {:.1} | {:.0} ({:.0}) | {:.2} | {:.0} ({:.0}) |",
            size as f64 / (1 << 20) as f64,
            s * 1e3,
            mb / s,
            l * 1e3,
            k * 1e3,
            mb / k
        );
        drop(store);
        std::fs::remove_dir_all(&dir).ok();
    }
}
