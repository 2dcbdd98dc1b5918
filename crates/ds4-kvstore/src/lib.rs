//! The KV cache as a disk citizen (ds4-spec.md §3): ds4's `.kv` checkpoint files, a directory
//! store with longest-prefix lookup, atomic multi-process-safe saves and budgeted eviction,
//! and the save-trigger policy of `ds4 serve`.
//!
//! - [`header`]: the 48-byte KVC header.
//! - [`file`](mod@file): a whole file (header, text, payload, KTM tool map).
//! - [`payload`]: structural validation of the DSV4 session payload against a model.
//! - [`store`]: the directory.
//! - [`policy`]: when to save (cold, continued, evict, shutdown).

//!
//! # How `ds4 serve` uses it (ds4-spec.md §3 and §5)
//!
//! At start, with `--kv-disk-dir D`: `KvStore::open(D, model_config, StoreOptions { budget_bytes:
//! --kv-disk-space-mb << 20 (4096 MiB default), ctx: --ctx, quant_bits: 2 for IQ2_XXS routed
//! experts else 4, reject_different_quant, min_tokens: --kv-cache-min-tokens })` and a
//! [`SavePolicy`] from the `--kv-cache-*` knobs. The worker that owns the session owns the store
//! and keeps `last_saved_tokens` (the continued frontier).
//!
//! Per request, after the in-memory prefix paths of §5 missed:
//! 1. *evict*: if `policy.live_worth_saving(live.tokens().len())`, save the live session with
//!    [`SaveReason::Evict`] (text = detokenized live tokens, payload = `live.snapshot()`).
//! 2. `store.lookup_longest_prefix(&rendered_prompt)`; on a hit, `store.load(&hit)`, then
//!    `session.restore(&file.payload)`. If either fails, log it and go cold. On success the
//!    effective prompt is `session.tokens()` + `tokenize_rendered_chat(&rendered_prompt[hit.text_len..])`,
//!    only that suffix is prefilled, and `last_saved_tokens = hit.tokens`.
//! 3. *cold* (total miss): `policy.cold_save_len(&prompt_tokens, user_id, assistant_id)`; when it
//!    is `Some(n)` with `n < len`, prefill `prompt[..n]`, save with [`SaveReason::Cold`], then
//!    prefill the rest; when `n == len`, save after the whole prompt. Set `last_saved_tokens = n`.
//! 4. *continued*: split prefill at `policy.continued_points(from, to, last_saved_tokens)` and
//!    after each decode step check `policy.continued_due(len, last_saved_tokens)` (not inside a
//!    DSML tool call); save with [`SaveReason::Continued`], then `last_saved_tokens = len`.
//! 5. *shutdown*: on SIGINT/SIGTERM, if worth saving, save with [`SaveReason::Shutdown`].
//!
//! Every save is `store.save(&SaveRequest { text, payload, reason, key_flags, tool_map })`; an
//! error (disk full, over budget, ...) is logged and the request goes on: the store stays usable.

pub mod error;
pub mod file;
pub mod header;
pub mod payload;
pub mod policy;
pub mod store;

pub use error::{FormatError, KvError};
pub use file::{KvFile, ToolMapEntry};
pub use header::{ExtFlags, KvFileHeader, SaveReason};
pub use policy::SavePolicy;
pub use store::{Hit, KvStore, SaveRequest, Saved, StoreOptions};
