//! `ds4 bench --kv-restore-tokens N [--kv-dir DIR] [--kv-drop-cache]`: what the disk KV cache
//! of `ds4 serve --kv-disk-dir` saves. N tokens are prefilled; the session is saved as a `.kv`
//! file through the server's store (`KvStore::save`: temporary file, fsync, rename) and
//! dropped; a fresh session gets it back as a restarted server does (prefix lookup, full read
//! and validation, `Session::restore`). Each step is timed, and the restored session must
//! continue exactly as the live one did: bit-identical next-token logits, then the same greedy
//! tokens with bit-identical logits.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context};
use ds4_kvstore::store::{hex, sha1};
use ds4_kvstore::{KvStore, SaveReason, SaveRequest, StoreOptions};
use ds4_model::backend::{Backend, Logits, Session};
use ds4_text::sampler::argmax_excluding;
use ds4_text::tokenizer::Tokenizer;

/// Greedy tokens compared after the restore.
pub const CONTINUATION: usize = 8;
/// Tokens of the warm-up run that takes first-use costs (allocator, library handles) out of
/// the timed prefill.
const WARMUP_TOKENS: usize = 16;

/// What to measure.
pub struct KvRestorePlan<'a> {
    /// The prefix to prefill, save and restore.
    pub tokens: &'a [u32],
    /// The checkpoint's key: the detokenized prefix, as the server writes it.
    pub key: String,
    /// Context of both sessions (at least tokens + CONTINUATION + 1).
    pub ctx: usize,
    /// Directory of the store; `None`: a fresh temporary directory, removed afterwards.
    pub dir: Option<PathBuf>,
    /// Try to drop the OS page cache before the restore.
    pub drop_cache: bool,
    /// The routed experts' quant bits for the file header.
    pub quant_bits: u8,
    /// Ids greedy decoding never picks (EOS).
    pub exclude: Vec<u32>,
}

/// Whether the restore read the file from the disk or from memory.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PageCache {
    /// Dropped before the restore: the file came from the disk.
    Dropped,
    /// Still cached (it was just written); why it was not dropped.
    Hot(String),
}

impl PageCache {
    fn label(&self) -> &'static str {
        match self {
            PageCache::Dropped => "cold",
            PageCache::Hot(_) => "hot",
        }
    }
}

/// What was measured.
pub struct KvRestoreReport {
    pub tokens: usize,
    pub prefill_s: f64,
    /// `Session::snapshot` (device → host).
    pub snapshot_s: f64,
    /// `KvStore::save`: write, fsync, rename, directory fsync.
    pub write_s: f64,
    pub file_bytes: u64,
    pub path: PathBuf,
    pub page_cache: PageCache,
    /// `lookup_longest_prefix` + `load` (read and full validation).
    pub load_s: f64,
    /// `Session::restore` (host → device).
    pub restore_s: f64,
    pub logits_identical: bool,
    /// Leading greedy steps whose token and logits matched bit for bit (of CONTINUATION).
    pub steps_identical: usize,
}

impl KvRestoreReport {
    pub fn save_s(&self) -> f64 {
        self.snapshot_s + self.write_s
    }

    pub fn total_restore_s(&self) -> f64 {
        self.load_s + self.restore_s
    }

    pub fn speedup(&self) -> f64 {
        self.prefill_s / self.total_restore_s().max(f64::MIN_POSITIVE)
    }

    pub fn continuation_identical(&self) -> bool {
        self.steps_identical == CONTINUATION
    }

    /// The table: a header, a separator and one row (Markdown, as BENCHMARKS.md).
    pub fn table(&self) -> String {
        let yes_no = |b: bool| if b { "yes" } else { "no" };
        format!(
            "| tokens | prefill s | prefill t/s | save s | file MiB | restore s | speedup | page cache | logits identical | continuation identical |\n\
             |---:|---:|---:|---:|---:|---:|---:|---|---|---|\n\
             | {} | {} | {:.1} | {} | {:.2} | {} | {:.1}x | {} | {} | {} ({}/{CONTINUATION}) |",
            self.tokens,
            secs(self.prefill_s),
            self.tokens as f64 / self.prefill_s.max(f64::MIN_POSITIVE),
            secs(self.save_s()),
            self.file_bytes as f64 / (1u64 << 20) as f64,
            secs(self.total_restore_s()),
            self.speedup(),
            self.page_cache.label(),
            yes_no(self.logits_identical),
            yes_no(self.continuation_identical()),
            self.steps_identical,
        )
    }

    /// The parts of the save and restore times, and where the file is.
    pub fn details(&self) -> String {
        let cache = match &self.page_cache {
            PageCache::Dropped => "dropped before the restore (read from the disk)".to_string(),
            PageCache::Hot(why) => format!("the file was in the page cache ({why})"),
        };
        format!(
            "save = snapshot {} s + write/fsync/rename {} s; restore = lookup+read+validate {} s + restore {} s\n\
             file: {}\n\
             page cache: {cache}",
            secs(self.snapshot_s),
            secs(self.write_s),
            secs(self.load_s),
            secs(self.restore_s),
            self.path.display()
        )
    }
}

/// The key text of `tokens`: the detokenized text, or the ids when the model has no tokenizer.
pub fn key_text(tokenizer: Option<&Tokenizer>, tokens: &[u32]) -> String {
    match tokenizer {
        Some(t) => t.decode(tokens),
        None => tokens.iter().map(|t| format!("<{t}>")).collect(),
    }
}

/// The store directory, removed on drop when it is a temporary one.
struct StoreDir {
    path: PathBuf,
    temporary: bool,
}

impl StoreDir {
    fn new(dir: Option<&Path>) -> StoreDir {
        match dir {
            Some(d) => StoreDir {
                path: d.to_path_buf(),
                temporary: false,
            },
            None => StoreDir {
                path: std::env::temp_dir().join(format!("ds4-bench-kv-{}", std::process::id())),
                temporary: true,
            },
        }
    }
}

impl Drop for StoreDir {
    fn drop(&mut self) {
        if self.temporary {
            let _ = std::fs::remove_dir_all(&self.path);
        }
    }
}

/// Seconds with 4 significant digits (a 25k-token GPU prefill and a tiny CPU restore alike).
fn secs(s: f64) -> String {
    let decimals = if s > 0.0 {
        (3 - s.log10().floor() as i32).clamp(0, 7) as usize
    } else {
        3
    };
    format!("{s:.decimals$}")
}

fn bits_equal(a: &[f32], b: &[f32]) -> bool {
    a.len() == b.len() && a.iter().zip(b).all(|(x, y)| x.to_bits() == y.to_bits())
}

/// Decodes `n` greedy tokens; returns each token with the logits after it.
fn continue_greedily(
    session: &mut dyn Session,
    n: usize,
    exclude: &[u32],
) -> anyhow::Result<Vec<(u32, Vec<f32>)>> {
    let mut steps = Vec::with_capacity(n);
    for _ in 0..n {
        let token = argmax_excluding(session.last_logits(), exclude);
        let logits = session
            .eval(&[token], Logits::Last)
            .with_context(|| format!("decoding token {token}"))?;
        steps.push((token, logits));
    }
    Ok(steps)
}

/// Asks the kernel to drop clean cached pages (the store fsynced the file, so it is clean).
/// Works only with the privilege to write /proc/sys/vm/drop_caches.
fn drop_page_cache() -> PageCache {
    const KNOB: &str = "/proc/sys/vm/drop_caches";
    match std::fs::write(KNOB, "1\n") {
        Ok(()) => PageCache::Dropped,
        Err(e) => PageCache::Hot(format!("could not drop it: {KNOB}: {e}")),
    }
}

/// Runs the measurement on `backend`.
pub fn measure(backend: &dyn Backend, plan: &KvRestorePlan) -> anyhow::Result<KvRestoreReport> {
    let n = plan.tokens.len();
    if n == 0 {
        bail!("--kv-restore-tokens must be at least 1");
    }
    if plan.ctx < n + CONTINUATION + 1 {
        bail!(
            "--ctx-alloc {} is too small for {n} tokens, {CONTINUATION} compared continuation \
             tokens and the checkpoint rule (tokens < context): use at least {}",
            plan.ctx,
            n + CONTINUATION + 1
        );
    }
    let ctx32 = u32::try_from(plan.ctx)
        .map_err(|_| anyhow::anyhow!("context {} exceeds the .kv format's u32", plan.ctx))?;

    let mut warmup = backend
        .new_session(WARMUP_TOKENS + 1)
        .context("creating the warm-up session")?;
    warmup
        .eval(&plan.tokens[..n.min(WARMUP_TOKENS)], Logits::Last)
        .context("warm-up prefill")?;
    drop(warmup);

    let mut live = backend
        .new_session(plan.ctx)
        .with_context(|| format!("creating a session of {} tokens", plan.ctx))?;
    let t = Instant::now();
    live.eval(plan.tokens, Logits::Last)
        .with_context(|| format!("prefilling {n} tokens"))?;
    let prefill_s = t.elapsed().as_secs_f64();

    let dir = StoreDir::new(plan.dir.as_deref());
    let opts = StoreOptions {
        budget_bytes: 0,
        ctx: ctx32,
        quant_bits: plan.quant_bits,
        reject_different_quant: false,
        min_tokens: 1,
    };
    // The store's errors name the file and the operation; their source is already in the text.
    let mut store = KvStore::open(&dir.path, backend.config(), opts)
        .map_err(|e| anyhow::anyhow!("opening the KV cache directory: {e}"))?;
    // A file of an earlier run with the same key would be kept instead of written: remove it
    // so the write is measured.
    let path = dir
        .path
        .join(format!("{}.kv", hex(&sha1(plan.key.as_bytes()))));
    match std::fs::remove_file(&path) {
        Ok(()) => eprintln!(
            "ds4 bench: removed {} of an earlier run to measure the save",
            path.display()
        ),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e).with_context(|| format!("removing {}", path.display())),
    }

    let t = Instant::now();
    let payload = live.snapshot();
    let snapshot_s = t.elapsed().as_secs_f64();
    if payload.is_empty() {
        bail!(
            "the {} backend could not read the session state",
            backend.name()
        );
    }
    let t = Instant::now();
    let saved = store
        .save(&SaveRequest {
            text: plan.key.as_bytes(),
            payload: &payload,
            reason: SaveReason::Cold,
            key_flags: 0,
            tool_map: &[],
        })
        .map_err(|e| anyhow::anyhow!("saving the session to {}: {e}", dir.path.display()))?;
    let write_s = t.elapsed().as_secs_f64();
    drop(payload);

    // The live session's answer, then it is gone: the restore cannot lean on it.
    let live_logits = live.last_logits().to_vec();
    let live_steps = continue_greedily(live.as_mut(), CONTINUATION, &plan.exclude)
        .context("continuing the live session")?;
    drop(live);

    let page_cache = if plan.drop_cache {
        drop_page_cache()
    } else {
        PageCache::Hot("just written; drop it with --kv-drop-cache, as root".to_string())
    };

    let mut restored = backend
        .new_session(plan.ctx)
        .with_context(|| format!("creating a session of {} tokens", plan.ctx))?;
    // The server looks up a whole rendered prompt; the checkpoint covers its beginning.
    let prompt = format!("{}<｜User｜>and the rest of the request", plan.key);
    let t = Instant::now();
    let hit = store.lookup_longest_prefix(&prompt).with_context(|| {
        format!(
            "{}: the saved checkpoint was not found by prefix lookup",
            saved.path.display()
        )
    })?;
    let file = store
        .load(&hit)
        .map_err(|e| anyhow::anyhow!("loading the checkpoint: {e}"))?;
    let load_s = t.elapsed().as_secs_f64();
    let t = Instant::now();
    restored
        .restore(&file.payload)
        .with_context(|| format!("restoring {}", hit.path.display()))?;
    let restore_s = t.elapsed().as_secs_f64();
    if restored.tokens() != plan.tokens {
        bail!(
            "{}: the restored session holds {} tokens that are not the {n} prefilled",
            hit.path.display(),
            restored.tokens().len()
        );
    }

    let logits_identical = bits_equal(restored.last_logits(), &live_logits);
    let restored_steps = continue_greedily(restored.as_mut(), CONTINUATION, &plan.exclude)
        .context("continuing the restored session")?;
    let steps_identical = live_steps
        .iter()
        .zip(&restored_steps)
        .take_while(|((ta, la), (tb, lb))| ta == tb && bits_equal(la, lb))
        .count();

    Ok(KvRestoreReport {
        tokens: n,
        prefill_s,
        snapshot_s,
        write_s,
        file_bytes: saved.file_bytes,
        path: if dir.temporary {
            PathBuf::from("(temporary, removed)")
        } else {
            saved.path
        },
        page_cache,
        load_s,
        restore_s,
        logits_identical,
        steps_identical,
    })
}
