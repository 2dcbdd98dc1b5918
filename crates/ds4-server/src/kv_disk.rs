//! The disk KV cache as the engine worker uses it (`--kv-disk-dir`, ds4-spec.md §3 and §5):
//! ds4's save moments (cold, continued, evict, shutdown) and the disk lookup that comes after
//! the live-session reuse paths missed.
//!
//! The worker owns one [`KvDisk`] next to its session. Every store error (disk full, budget,
//! a corrupt or vanished file) is logged and the request goes on: a cache can only save work,
//! never cost a request.

use std::path::PathBuf;
use std::sync::Mutex;

use ds4_kvstore::{KvStore, SavePolicy, SaveReason, SaveRequest, StoreOptions, ToolMapEntry};
use ds4_model::config::ModelConfig;

use crate::runner::{ModelRunner, TextCodec};
use crate::tool_memory::{RememberedCall, ToolMemory};

/// `--kv-disk-dir` and the `--kv-cache-*` knobs.
#[derive(Clone, Debug)]
pub struct KvDiskOptions {
    pub dir: PathBuf,
    /// `--kv-disk-space-mb` in bytes (0: no budget).
    pub budget_bytes: u64,
    pub policy: SavePolicy,
    /// `--kv-cache-reject-different-quant`.
    pub reject_different_quant: bool,
    /// The routed experts' quant bits (2 for IQ2_XXS, else 4), written into every file.
    pub quant_bits: u8,
}

/// A checkpoint restored from disk into the session (whose [`ModelRunner::logits`] are then
/// the logits after the checkpoint's last token).
pub struct Restored {
    /// Tokens of the session now (the checkpoint's).
    pub tokens: usize,
    /// Bytes of the prompt the checkpoint covers; the rest is tokenized and prefilled.
    pub text_len: usize,
    /// The checkpoint's text (the detokenized session tokens).
    pub text: Vec<u8>,
}

/// The store, the save policy and the continued-save frontier of the live session.
pub struct KvDisk {
    store: KvStore,
    policy: SavePolicy,
    /// Length of the live session's last checkpoint (0 when none): continued saves go beyond it.
    last_saved_tokens: u32,
    /// `<｜User｜>` and `<｜Assistant｜>` ids, for the cold save's chat anchor.
    user_token: Option<u32>,
    assistant_token: Option<u32>,
}

/// The single id a special token's text encodes to.
fn special_id(codec: &dyn TextCodec, text: &str) -> Option<u32> {
    match codec.encode(text).as_slice() {
        [id] => Some(*id),
        _ => None,
    }
}

impl KvDisk {
    /// Opens the cache directory (indexing it, skipping bad files with a warning).
    pub fn open(
        model: &ModelConfig,
        ctx: usize,
        codec: &dyn TextCodec,
        opts: KvDiskOptions,
    ) -> Result<KvDisk, ds4_kvstore::KvError> {
        let ctx = u32::try_from(ctx)
            .map_err(|_| ds4_kvstore::KvError::Invalid(format!("context {ctx} too large")))?;
        let store_opts = StoreOptions {
            budget_bytes: opts.budget_bytes,
            ctx,
            quant_bits: opts.quant_bits,
            reject_different_quant: opts.reject_different_quant,
            min_tokens: opts.policy.min_tokens,
        };
        let store = KvStore::open(&opts.dir, model, store_opts)?;
        let mut disk = KvDisk {
            store,
            policy: opts.policy,
            last_saved_tokens: 0,
            user_token: special_id(codec, "<｜User｜>"),
            assistant_token: special_id(codec, "<｜Assistant｜>"),
        };
        disk.store.refresh();
        tracing::info!(
            dir = %disk.store.dir().display(),
            files = disk.store.entries().len(),
            skipped = disk.store.skipped().len(),
            bytes = disk.store.total_bytes(),
            "kv cache: disk store open"
        );
        Ok(disk)
    }

    pub fn store(&self) -> &KvStore {
        &self.store
    }

    pub fn policy(&self) -> &SavePolicy {
        &self.policy
    }

    /// The live session was replaced or reset: no checkpoint of it exists yet.
    pub fn forget_live(&mut self) {
        self.last_saved_tokens = 0;
    }

    /// Saves the live session (`text` = its detokenized tokens) for `reason`, with the tool
    /// ids whose DSML block occurs in the text. Errors are logged; returns whether a file
    /// holds the checkpoint now.
    pub fn save_live(
        &mut self,
        runner: &dyn ModelRunner,
        text: &[u8],
        reason: SaveReason,
        tools: &Mutex<ToolMemory>,
    ) -> bool {
        let tokens = runner.tokens().len();
        let Some(payload) = runner.snapshot() else {
            return false;
        };
        let tool_map = tool_map_for(tools, text);
        let req = SaveRequest {
            text,
            payload: &payload,
            reason,
            key_flags: 0,
            tool_map: &tool_map,
        };
        match self.store.save(&req) {
            Ok(saved) => {
                tracing::info!(
                    reason = reason.name(),
                    tokens,
                    path = %saved.path.display(),
                    bytes = saved.file_bytes,
                    written = saved.written,
                    evicted = saved.evicted.len(),
                    "kv cache: saved"
                );
                self.last_saved_tokens = tokens as u32;
                true
            }
            Err(e) => {
                tracing::warn!(reason = reason.name(), tokens, "kv cache: save failed: {e}");
                false
            }
        }
    }

    /// Saves the live session if it is worth keeping and has grown since its last save:
    /// *evict* before a disk load or cold prefill replaces it, *shutdown* at a clean exit.
    pub fn save_live_if_worth(
        &mut self,
        runner: &dyn ModelRunner,
        live_text: &[u8],
        reason: SaveReason,
        tools: &Mutex<ToolMemory>,
    ) {
        let live = runner.tokens().len() as u32;
        if self.policy.live_worth_saving(live) && live > self.last_saved_tokens {
            self.save_live(runner, live_text, reason, tools);
        }
    }

    /// Looks up the longest cached prefix of `prompt` and restores it into the (reset) session.
    /// A miss or any failure leaves the session empty and returns `None`.
    pub fn restore_longest_prefix(
        &mut self,
        runner: &mut dyn ModelRunner,
        prompt: &str,
        tools: &Mutex<ToolMemory>,
    ) -> Option<Restored> {
        let hit = self.store.lookup_longest_prefix(prompt)?;
        let file = match self.store.load(&hit) {
            Ok(f) => f,
            Err(e) => {
                tracing::warn!(path = %hit.path.display(), "kv cache: load failed, prefilling cold: {e}");
                return None;
            }
        };
        if let Err(e) = runner.restore(&file.payload) {
            tracing::warn!(path = %hit.path.display(), "kv cache: restore failed, prefilling cold: {e}");
            runner.reset();
            return None;
        }
        if runner.tokens().len() != hit.tokens as usize {
            tracing::warn!(path = %hit.path.display(), "kv cache: restored session length differs from the header; prefilling cold");
            runner.reset();
            return None;
        }
        let mut memory = match tools.lock() {
            Ok(m) => m,
            Err(p) => p.into_inner(),
        };
        for entry in &file.tool_map {
            if memory.get(&entry.id).is_none() {
                memory.insert(
                    entry.id.clone(),
                    RememberedCall {
                        raw_dsml: entry.dsml.clone(),
                        reasoning: None,
                    },
                );
            }
        }
        self.last_saved_tokens = hit.tokens;
        tracing::info!(
            path = %hit.path.display(),
            tokens = hit.tokens,
            reason = hit.header.reason.name(),
            "kv cache: restored from disk"
        );
        Some(Restored {
            tokens: hit.tokens as usize,
            text_len: hit.text_len,
            text: file.text,
        })
    }

    /// The cold checkpoint length of a prompt that missed memory and disk (`None`: no save).
    pub fn cold_save_len(&self, prompt: &[u32]) -> Option<usize> {
        let (user, assistant) = (self.user_token?, self.assistant_token?);
        self.policy
            .cold_save_len(prompt, user, assistant)
            .map(|n| n as usize)
    }

    /// Where a prefill from `from` to `to` tokens must stop for a save: the cold length (when
    /// inside the span) and the continued points.
    pub fn prefill_stops(&self, from: usize, to: usize, cold: Option<usize>) -> Vec<usize> {
        let mut stops: Vec<usize> = self
            .policy
            .continued_points(from as u32, to as u32, self.last_saved_tokens)
            .into_iter()
            .map(|p| p as usize)
            .collect();
        if let Some(n) = cold.filter(|&n| n > from && n <= to) {
            stops.push(n);
        }
        stops.sort_unstable();
        stops.dedup();
        stops
    }

    /// Whether the live session, now `live` tokens long, is due a *continued* save.
    pub fn continued_due(&self, live: usize) -> bool {
        self.policy
            .continued_due(live as u32, self.last_saved_tokens)
    }
}

/// Tool ids and blocks of the memory whose block occurs in `text` (the store keeps only those
/// too; filtering here keeps the request small). Every block holds the DSML marker, so only
/// the marker's places in the text are tried: linear in the text and the memory, not their
/// product.
fn tool_map_for(tools: &Mutex<ToolMemory>, text: &[u8]) -> Vec<ToolMapEntry> {
    let mark = ds4_text::tokenizer::DSML.as_bytes();
    let marks: Vec<usize> = text
        .windows(mark.len())
        .enumerate()
        .filter(|(_, w)| *w == mark)
        .map(|(i, _)| i)
        .collect();
    if marks.is_empty() {
        return Vec::new();
    }
    let memory = match tools.lock() {
        Ok(m) => m,
        Err(p) => p.into_inner(),
    };
    memory
        .iter()
        .filter(|(_, call)| {
            let block = call.raw_dsml.as_bytes();
            let Some(offset) = block.windows(mark.len()).position(|w| w == mark) else {
                return false;
            };
            marks
                .iter()
                .any(|&q| q >= offset && text[q - offset..].starts_with(block))
        })
        .map(|(id, call)| ToolMapEntry {
            id: id.to_string(),
            dsml: call.raw_dsml.clone(),
        })
        .collect()
}
