//! The cache directory: an index of its `.kv` files, longest-prefix lookup, validated loads,
//! atomic saves and eviction under a byte budget.
//!
//! Safety protocol (the directory may be shared by several servers, and any of them may die at
//! any moment):
//! - a file is written under a temporary name `<sha>.kv.tmp.<pid>.<n>`, flushed, fsynced, and
//!   only then renamed to `<sha>.kv` (then the directory is fsynced), so a `.kv` name always
//!   refers to a complete file; temporaries are never read, and are removed at open only when
//!   the process that wrote them no longer exists;
//! - every file is validated (header, lengths, text SHA1 against its name, payload structure
//!   against the model) before it enters the index and again, in full, when loaded; a bad file
//!   is skipped with a warning and never trusted;
//! - operations that change other files (eviction, rename into place, removing a corrupt
//!   file, the in-place hit counter update) run under an advisory lock on
//!   `<dir>/.ds4-kvstore.lock`; readers need no lock (a file they hold open stays readable
//!   after an unlink or a rename over it);
//! - any I/O error while saving (disk full included) removes the temporary file and is
//!   returned; the store stays usable.

use std::collections::HashMap;
use std::fs::{self, File, OpenOptions};
use std::io::{BufWriter, Read, Seek, SeekFrom};
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use ds4_model::config::ModelConfig;
use sha1::{Digest, Sha1};

use crate::error::{FormatError, KvError};
use crate::file::{
    decode_tool_map, file_bytes, write_file, FileLayout, KvFile, ToolMapEntry, TEXT_OFFSET,
};
use crate::header::{ExtFlags, KvFileHeader, SaveReason, HEADER_BYTES};
use crate::payload::{payload_head_len, validate_payload, validate_payload_head, PayloadHeader};

/// `--kv-disk-space-mb` when not given.
pub const DEFAULT_BUDGET_MB: u64 = 4096;
/// Hits lose half their weight in the eviction score every 6 hours without use.
pub const HIT_HALF_LIFE_SECS: f64 = 6.0 * 3600.0;
pub const LOCK_FILE_NAME: &str = ".ds4-kvstore.lock";
const TMP_MARK: &str = ".kv.tmp.";

/// How the store is used by this server.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StoreOptions {
    /// `--kv-disk-space-mb` in bytes; 0 disables the budget.
    pub budget_bytes: u64,
    /// This server's context: files written with a larger one are not used.
    pub ctx: u32,
    /// The model's routed-expert quant bits (2 or 4), written into every header.
    pub quant_bits: u8,
    /// `--kv-cache-reject-different-quant`: use only files of the same quant bits.
    pub reject_different_quant: bool,
    /// `--kv-cache-min-tokens`: shorter checkpoints are neither saved nor used.
    pub min_tokens: u32,
}

impl StoreOptions {
    /// ds4's defaults: 4096 MiB, min 512 tokens, other quants accepted.
    pub fn new(ctx: u32, quant_bits: u8) -> StoreOptions {
        StoreOptions {
            budget_bytes: DEFAULT_BUDGET_MB << 20,
            ctx,
            quant_bits,
            reject_different_quant: false,
            min_tokens: 512,
        }
    }
}

/// What identifies one version of a file on disk; an entry is re-validated when it changes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Identity {
    dev: u64,
    ino: u64,
    len: u64,
    mtime: i64,
    mtime_nsec: i64,
}

impl Identity {
    fn of(m: &fs::Metadata) -> Identity {
        Identity {
            dev: m.dev(),
            ino: m.ino(),
            len: m.len(),
            mtime: m.mtime(),
            mtime_nsec: m.mtime_nsec(),
        }
    }
}

/// One valid file of the directory.
#[derive(Clone, Debug, PartialEq)]
pub struct Entry {
    pub path: PathBuf,
    /// SHA1 of the text (the file name).
    pub sha: [u8; 20],
    pub header: KvFileHeader,
    pub text_len: u32,
    pub file_bytes: u64,
    identity: Identity,
}

impl Entry {
    /// ds4's eviction score: (hits·2^(−age/6h) + 1)·tokens/size, lowest evicted first.
    pub fn eviction_score(&self, now: u64) -> f64 {
        let used_at = if self.header.last_used != 0 {
            self.header.last_used
        } else {
            self.header.created
        };
        let hits = if used_at == 0 {
            0.0
        } else {
            let age = now.saturating_sub(used_at) as f64;
            self.header.hits as f64 * (-age / HIT_HALF_LIFE_SECS).exp2()
        };
        (hits + 1.0) * self.header.tokens as f64 / self.file_bytes.max(1) as f64
    }
}

/// The result of a lookup: a file whose text is a prefix of the prompt.
#[derive(Clone, Debug, PartialEq)]
pub struct Hit {
    pub path: PathBuf,
    pub sha: [u8; 20],
    /// Bytes of the prompt covered by the checkpoint; the server tokenizes only the rest.
    pub text_len: usize,
    pub tokens: u32,
    pub header: KvFileHeader,
}

/// A file left out of the index, and why.
#[derive(Clone, Debug, PartialEq)]
pub struct Skipped {
    pub path: PathBuf,
    pub reason: String,
}

/// What to save.
#[derive(Clone, Copy, Debug)]
pub struct SaveRequest<'a> {
    /// The key: the detokenized checkpoint tokens (or a visible-transcript override).
    pub text: &'a [u8],
    /// `Session::snapshot()` of the live session holding exactly the checkpoint's tokens.
    pub payload: &'a [u8],
    pub reason: SaveReason,
    /// [`ExtFlags::RESPONSES_VISIBLE`] / [`ExtFlags::THINKING_VISIBLE`] when the text is an
    /// override; 0 for detokenized tokens.
    pub key_flags: u8,
    /// Tool ids and their exact DSML blocks; only those whose block occurs in the text are kept.
    pub tool_map: &'a [ToolMapEntry],
}

/// The outcome of a save.
#[derive(Clone, Debug, PartialEq)]
pub struct Saved {
    pub path: PathBuf,
    pub file_bytes: u64,
    /// False when a compatible file with the same text already existed and was kept.
    pub written: bool,
    /// Files removed to stay inside the budget.
    pub evicted: Vec<PathBuf>,
}

/// The disk KV cache of one server.
pub struct KvStore {
    dir: PathBuf,
    model: ModelConfig,
    opts: StoreOptions,
    entries: Vec<Entry>,
    skipped: Vec<Skipped>,
    /// Files already reported as bad, so each version is warned about once.
    known_bad: HashMap<PathBuf, Identity>,
    tmp_seq: u64,
}

/// SHA1 of `bytes`.
pub fn sha1(bytes: &[u8]) -> [u8; 20] {
    Sha1::digest(bytes).into()
}

pub fn hex(sha: &[u8; 20]) -> String {
    sha.iter().map(|b| format!("{b:02x}")).collect()
}

/// `<40 hex digits>.kv` → the digest (ds4 writes lower case; upper case is accepted).
pub fn parse_kv_name(name: &str) -> Option<[u8; 20]> {
    let stem = name.strip_suffix(".kv")?;
    if stem.len() != 40 || !stem.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    let mut out = [0u8; 20];
    for (i, o) in out.iter_mut().enumerate() {
        *o = u8::from_str_radix(&stem[2 * i..2 * i + 2], 16).ok()?;
    }
    Some(out)
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// The directory's advisory lock, released when dropped (closing the file releases it).
struct DirLock {
    _file: File,
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    needle.is_empty() || haystack.windows(needle.len()).any(|w| w == needle)
}

/// Reads up to `buf.len()` bytes (fewer only at the end of the file).
fn read_up_to(f: &mut File, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match f.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}

/// Whether a process with this id exists (Linux /proc); when that cannot be known, it is
/// assumed to exist, so its temporary files are left alone.
fn process_exists(pid: u32) -> bool {
    let proc_root = Path::new("/proc");
    if !proc_root.join("self").exists() {
        return true;
    }
    proc_root.join(pid.to_string()).exists()
}

/// The writer's pid of a temporary file name (`<sha>.kv.tmp.<pid>[.<n>]`).
fn tmp_owner(name: &str) -> Option<u32> {
    let (_, tail) = name.split_once(TMP_MARK)?;
    tail.split('.').next()?.parse().ok()
}

/// The header, text and payload must agree with each other, with the file name and with the
/// model. `payload_head` is the beginning of the payload (see [`payload_head_len`]).
fn check_contents(
    model: &ModelConfig,
    sha: &[u8; 20],
    layout: &FileLayout,
    text: &[u8],
    payload_head: &[u8],
) -> Result<PayloadHeader, FormatError> {
    if sha1(text) != *sha {
        return Err(FormatError::new(
            "text",
            TEXT_OFFSET as u64,
            format!("SHA1 {} does not match the file name", hex(&sha1(text))),
        ));
    }
    let ph = validate_payload_head(model, payload_head, layout.header.payload_bytes)
        .map_err(|e| e.shifted("", layout.payload_offset))?;
    if ph.n_tokens != layout.header.tokens {
        return Err(FormatError::new(
            "header.tokens",
            8,
            format!(
                "{} tokens, the payload holds {}",
                layout.header.tokens, ph.n_tokens
            ),
        ));
    }
    if ph.ctx != layout.header.ctx {
        return Err(FormatError::new(
            "header.ctx",
            16,
            format!("context {}, the payload's is {}", layout.header.ctx, ph.ctx),
        ));
    }
    Ok(ph)
}

/// Decodes a whole file and validates everything the format allows without a session: the
/// header, every length, the text against `sha` (the file name), the tool map, and the
/// payload's structure and size against the model.
pub fn verify_file(
    model: &ModelConfig,
    sha: &[u8; 20],
    bytes: &[u8],
) -> Result<KvFile, FormatError> {
    let file = KvFile::decode(bytes)?;
    let layout = FileLayout::read(bytes, bytes.len() as u64)?;
    // With the whole payload as its head, this validates the complete payload.
    check_contents(model, sha, &layout, &file.text, &file.payload)?;
    Ok(file)
}

/// Why a file could not be indexed or loaded.
enum Reject {
    /// It could not be read (it may have been removed meanwhile).
    Io(std::io::Error),
    /// Its content is invalid.
    Format(FormatError),
}

impl From<std::io::Error> for Reject {
    fn from(e: std::io::Error) -> Reject {
        if e.kind() == std::io::ErrorKind::UnexpectedEof {
            Reject::Format(FormatError::new("file", 0, "shrank while being read"))
        } else {
            Reject::Io(e)
        }
    }
}

impl From<FormatError> for Reject {
    fn from(e: FormatError) -> Reject {
        Reject::Format(e)
    }
}

impl std::fmt::Display for Reject {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Reject::Io(e) => write!(f, "{e}"),
            Reject::Format(e) => write!(f, "{e}"),
        }
    }
}

/// Validates a file's header, text and payload structure without reading the payload's rows.
fn inspect(model: &ModelConfig, path: &Path, sha: [u8; 20]) -> Result<Entry, Reject> {
    let mut f = File::open(path)?;
    let meta = f.metadata()?;
    let len = meta.len();
    let mut prefix = [0u8; TEXT_OFFSET];
    let n = read_up_to(&mut f, &mut prefix)?;
    let layout = FileLayout::read(&prefix[..n], len)?;
    let mut text = vec![0u8; layout.text_len as usize];
    f.read_exact(&mut text)?;
    let head_len = payload_head_len(model, layout.header.tokens).min(layout.header.payload_bytes);
    let mut head = vec![0u8; head_len as usize];
    f.read_exact(&mut head)?;
    check_contents(model, &sha, &layout, &text, &head)?;
    if layout.header.ext_flags.has(ExtFlags::TOOL_MAP) {
        f.seek(SeekFrom::Start(layout.payload_end))?;
        let mut trailer = Vec::new();
        f.read_to_end(&mut trailer)?;
        decode_tool_map(&trailer).map_err(|e| e.shifted("", layout.payload_end))?;
    }
    Ok(Entry {
        path: path.to_path_buf(),
        sha,
        header: layout.header,
        text_len: layout.text_len,
        file_bytes: len,
        identity: Identity::of(&meta),
    })
}

impl KvStore {
    /// Opens (creating it if needed) the cache directory for a model, indexes it, removes
    /// temporary files of writers that no longer exist and evicts down to the budget.
    pub fn open(
        dir: impl Into<PathBuf>,
        model: &ModelConfig,
        opts: StoreOptions,
    ) -> Result<KvStore, KvError> {
        let dir = dir.into();
        if opts.quant_bits != 2 && opts.quant_bits != 4 {
            return Err(KvError::Invalid(format!(
                "quant bits {} (the file format knows 2 and 4)",
                opts.quant_bits
            )));
        }
        if opts.ctx == 0 {
            return Err(KvError::Invalid("context 0".into()));
        }
        fs::create_dir_all(&dir).map_err(|e| KvError::io(&dir, "create directory", e))?;
        let mut store = KvStore {
            dir,
            model: model.clone(),
            opts,
            entries: Vec::new(),
            skipped: Vec::new(),
            known_bad: HashMap::new(),
            tmp_seq: 0,
        };
        let _lock = store.lock()?;
        store.evict_locked(None);
        Ok(store)
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn options(&self) -> &StoreOptions {
        &self.opts
    }

    /// The valid files as of the last scan.
    pub fn entries(&self) -> &[Entry] {
        &self.entries
    }

    /// Files left out of the index by the last scan, with the reason.
    pub fn skipped(&self) -> &[Skipped] {
        &self.skipped
    }

    /// Bytes of the valid files as of the last scan.
    pub fn total_bytes(&self) -> u64 {
        self.entries.iter().map(|e| e.file_bytes).sum()
    }

    fn lock(&self) -> Result<DirLock, KvError> {
        let path = self.dir.join(LOCK_FILE_NAME);
        let file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .read(true)
            .write(true)
            .open(&path)
            .map_err(|e| KvError::io(&path, "open lock file", e))?;
        file.lock().map_err(|e| KvError::io(&path, "lock", e))?;
        Ok(DirLock { _file: file })
    }

    fn remove_stale_temps(&self) {
        let Ok(rd) = fs::read_dir(&self.dir) else {
            return;
        };
        for de in rd.flatten() {
            let name = de.file_name();
            let Some(name) = name.to_str() else { continue };
            let Some(pid) = tmp_owner(name) else { continue };
            if !process_exists(pid) {
                let path = de.path();
                match fs::remove_file(&path) {
                    Ok(()) => tracing::warn!(
                        "kv cache: removed {} left by a writer (pid {pid}) that no longer exists",
                        path.display()
                    ),
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                    Err(e) => tracing::warn!("kv cache: cannot remove {}: {e}", path.display()),
                }
            }
        }
    }

    /// Re-reads the directory: new and changed files are validated, vanished ones dropped.
    pub fn refresh(&mut self) {
        let rd = match fs::read_dir(&self.dir) {
            Ok(rd) => rd,
            Err(e) => {
                tracing::warn!("kv cache: cannot list {}: {e}", self.dir.display());
                return;
            }
        };
        let mut old: HashMap<PathBuf, Entry> = self
            .entries
            .drain(..)
            .map(|e| (e.path.clone(), e))
            .collect();
        let mut skipped = Vec::new();
        let mut bad = HashMap::new();
        for de in rd.flatten() {
            let name = de.file_name();
            let Some(sha) = name.to_str().and_then(parse_kv_name) else {
                continue;
            };
            let path = de.path();
            let Ok(meta) = fs::metadata(&path) else {
                continue;
            };
            if !meta.is_file() {
                continue;
            }
            let id = Identity::of(&meta);
            if let Some(e) = old.remove(&path) {
                if e.identity == id {
                    self.entries.push(e);
                    continue;
                }
            }
            match inspect(&self.model, &path, sha) {
                Ok(e) => self.entries.push(e),
                Err(Reject::Io(e)) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(why) => {
                    if self.known_bad.get(&path) != Some(&id) {
                        tracing::warn!("kv cache: skipping {}: {why}", path.display());
                    }
                    bad.insert(path.clone(), id);
                    skipped.push(Skipped {
                        path,
                        reason: why.to_string(),
                    });
                }
            }
        }
        self.entries.sort_by(|a, b| a.path.cmp(&b.path));
        self.skipped = skipped;
        self.known_bad = bad;
    }

    /// The longest checkpoint whose text is a prefix of `prompt` (ds4's rule: the SHA1 of
    /// `prompt[..len]` equals the file's name), ending at a character boundary, with at least
    /// `min_tokens` tokens, written for a context no larger than ours and, with
    /// `reject_different_quant`, the same quant bits. Ties go to more tokens.
    pub fn lookup_longest_prefix(&mut self, prompt: &str) -> Option<Hit> {
        self.refresh();
        let bytes = prompt.as_bytes();
        let mut candidates: Vec<&Entry> = self
            .entries
            .iter()
            .filter(|e| {
                let n = e.text_len as usize;
                n <= bytes.len()
                    && prompt.is_char_boundary(n)
                    && e.header.tokens >= self.opts.min_tokens
                    && e.header.ctx <= self.opts.ctx
                    && (!self.opts.reject_different_quant
                        || e.header.quant_bits == self.opts.quant_bits)
            })
            .collect();
        candidates.sort_by_key(|e| std::cmp::Reverse((e.text_len, e.header.tokens)));
        let mut digest_of_len: HashMap<u32, [u8; 20]> = HashMap::new();
        let e = candidates.into_iter().find(|e| {
            let d = *digest_of_len
                .entry(e.text_len)
                .or_insert_with(|| sha1(&bytes[..e.text_len as usize]));
            d == e.sha
        })?;
        Some(Hit {
            path: e.path.clone(),
            sha: e.sha,
            text_len: e.text_len as usize,
            tokens: e.header.tokens,
            header: e.header,
        })
    }

    /// Reads and fully validates the file of a hit, then counts the hit in its header. A file
    /// found invalid is removed from the index and deleted (it passed validation when indexed,
    /// so it was damaged since); the caller falls back to a cold prefill.
    pub fn load(&mut self, hit: &Hit) -> Result<KvFile, KvError> {
        let bytes = match fs::read(&hit.path) {
            Ok(b) => b,
            Err(e) => {
                self.entries.retain(|x| x.path != hit.path);
                return Err(KvError::io(&hit.path, "read", e));
            }
        };
        let file = match verify_file(&self.model, &hit.sha, &bytes) {
            Ok(f) => f,
            Err(e) => {
                tracing::warn!(
                    "kv cache: {} is invalid, removing it: {e}",
                    hit.path.display()
                );
                self.entries.retain(|x| x.path != hit.path);
                self.remove_if_unchanged(&hit.path, &bytes);
                return Err(KvError::Format {
                    path: hit.path.clone(),
                    source: e,
                });
            }
        };
        if let Err(e) = self.touch(&hit.path, &file.header) {
            tracing::warn!(
                "kv cache: cannot update the hit count of {}: {e}",
                hit.path.display()
            );
        }
        Ok(file)
    }

    /// Deletes a corrupt file, unless another process replaced it since it was read.
    fn remove_if_unchanged(&self, path: &Path, read: &[u8]) {
        let Ok(_lock) = self.lock() else { return };
        let Ok(now) = fs::read(path) else { return };
        if now == read {
            if let Err(e) = fs::remove_file(path) {
                tracing::warn!("kv cache: cannot remove {}: {e}", path.display());
            }
        }
    }

    /// Rewrites the header in place with one more hit and the current time. Only the hit and
    /// last-used fields change, so a concurrent reader sees either value of each, never an
    /// invalid header.
    fn touch(&mut self, path: &Path, header: &KvFileHeader) -> Result<(), KvError> {
        let _lock = self.lock()?;
        let f = OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .map_err(|e| KvError::io(path, "open for hit update", e))?;
        let mut current = [0u8; HEADER_BYTES];
        f.read_exact_at(&mut current, 0)
            .map_err(|e| KvError::io(path, "read header", e))?;
        if current != header.encode() {
            // Replaced or touched by another process since it was read: leave it.
            return Ok(());
        }
        let mut h = *header;
        h.hits = h.hits.saturating_add(1);
        h.last_used = unix_now();
        f.write_all_at(&h.encode(), 0)
            .map_err(|e| KvError::io(path, "write header", e))?;
        Ok(())
    }

    /// Saves a checkpoint as `<sha1(text)>.kv`: validated, written to a temporary file,
    /// fsynced, renamed into place, then the directory is trimmed to the budget (never
    /// removing the new file unless it alone exceeds the budget).
    pub fn save(&mut self, req: &SaveRequest) -> Result<Saved, KvError> {
        let ph = validate_payload(&self.model, req.payload).map_err(|e| KvError::Format {
            path: PathBuf::from("<payload to save>"),
            source: e,
        })?;
        if ph.n_tokens == 0 || ph.n_tokens < self.opts.min_tokens {
            return Err(KvError::Invalid(format!(
                "a checkpoint of {} tokens is below the minimum of {}",
                ph.n_tokens, self.opts.min_tokens
            )));
        }
        let visible = ExtFlags::RESPONSES_VISIBLE | ExtFlags::THINKING_VISIBLE;
        if req.key_flags & !visible != 0 {
            return Err(KvError::Invalid(format!(
                "key flags {:#04x} are not key-kind bits",
                req.key_flags
            )));
        }
        if u32::try_from(req.text.len()).is_err() {
            return Err(KvError::Invalid(format!(
                "text of {} bytes exceeds the format's u32 length",
                req.text.len()
            )));
        }
        let tool_map: Vec<ToolMapEntry> = req
            .tool_map
            .iter()
            .filter(|e| contains(req.text, e.dsml.as_bytes()))
            .cloned()
            .collect();
        let size = file_bytes(req.text.len() as u64, req.payload.len() as u64, &tool_map);
        let required = size + size.div_ceil(100);
        if self.opts.budget_bytes > 0 && required > self.opts.budget_bytes {
            return Err(KvError::OverBudget {
                file_bytes: size,
                required_bytes: required,
                budget_bytes: self.opts.budget_bytes,
            });
        }
        let sha = sha1(req.text);
        let path = self.dir.join(format!("{}.kv", hex(&sha)));
        if tool_map.is_empty() && self.existing_is_usable(&path, sha, ph.n_tokens) {
            return Ok(Saved {
                path,
                file_bytes: size,
                written: false,
                evicted: Vec::new(),
            });
        }
        self.tmp_seq += 1;
        let tmp = self.dir.join(format!(
            "{}{TMP_MARK}{}.{}",
            hex(&sha),
            std::process::id(),
            self.tmp_seq
        ));
        let now = unix_now();
        let header = KvFileHeader {
            quant_bits: self.opts.quant_bits,
            reason: req.reason,
            ext_flags: ExtFlags(req.key_flags),
            tokens: ph.n_tokens,
            hits: 0,
            ctx: ph.ctx,
            created: now,
            last_used: now,
            payload_bytes: req.payload.len() as u64,
        };
        let written =
            write_synced(&tmp, &header, req.text, req.payload, &tool_map).and_then(|()| {
                let lock = self.lock()?;
                fs::rename(&tmp, &path).map_err(|e| KvError::io(&path, "rename into place", e))?;
                Ok(lock)
            });
        let _lock = match written {
            Ok(lock) => lock,
            Err(e) => {
                if let Err(rm) = fs::remove_file(&tmp) {
                    if rm.kind() != std::io::ErrorKind::NotFound {
                        tracing::warn!("kv cache: cannot remove {}: {rm}", tmp.display());
                    }
                }
                tracing::warn!("kv cache: save ({}) failed: {e}", req.reason.name());
                return Err(e);
            }
        };
        if let Err(e) = File::open(&self.dir).and_then(|d| d.sync_all()) {
            tracing::warn!("kv cache: fsync of {} failed: {e}", self.dir.display());
        }
        let evicted = self.evict_locked(Some(sha));
        Ok(Saved {
            path,
            file_bytes: size,
            written: true,
            evicted,
        })
    }

    /// A valid file for the same text exists, usable by this server: keep it (and its hits).
    fn existing_is_usable(&mut self, path: &Path, sha: [u8; 20], tokens: u32) -> bool {
        match inspect(&self.model, path, sha) {
            Ok(e) => {
                e.header.tokens == tokens
                    && e.header.ctx <= self.opts.ctx
                    && (!self.opts.reject_different_quant
                        || e.header.quant_bits == self.opts.quant_bits)
            }
            Err(_) => false,
        }
    }

    /// Removes orphaned temporaries, then the lowest-scoring files until the directory fits
    /// the budget. Caller holds the lock.
    fn evict_locked(&mut self, protected: Option<[u8; 20]>) -> Vec<PathBuf> {
        // Writers that died since the last pass leave temporaries that only take space.
        self.remove_stale_temps();
        self.refresh();
        let budget = self.opts.budget_bytes;
        let mut evicted = Vec::new();
        if budget == 0 {
            return evicted;
        }
        let now = unix_now();
        let mut total = self.total_bytes();
        // A file larger than the whole budget cannot be protected.
        let protected = protected.filter(|sha| {
            self.entries
                .iter()
                .any(|e| e.sha == *sha && e.file_bytes <= budget)
        });
        while total > budget && !self.entries.is_empty() {
            let score = |e: &Entry| {
                if Some(e.sha) == protected {
                    f64::INFINITY
                } else {
                    e.eviction_score(now)
                }
            };
            let mut victim = 0;
            for i in 1..self.entries.len() {
                let (e, v) = (&self.entries[i], &self.entries[victim]);
                let (se, sv) = (score(e), score(v));
                if se < sv || (se == sv && e.header.last_used < v.header.last_used) {
                    victim = i;
                }
            }
            let e = self.entries.remove(victim);
            match fs::remove_file(&e.path) {
                Ok(()) => {
                    tracing::info!(
                        "kv cache: evicted {} (tokens={} hits={} size={} bytes) to fit the budget of {budget} bytes",
                        e.path.display(),
                        e.header.tokens,
                        e.header.hits,
                        e.file_bytes
                    );
                    evicted.push(e.path);
                }
                Err(err) if err.kind() == std::io::ErrorKind::NotFound => {}
                Err(err) => {
                    tracing::warn!("kv cache: cannot evict {}: {err}", e.path.display());
                    break;
                }
            }
            total = total.saturating_sub(e.file_bytes);
        }
        evicted
    }

    /// Trims the directory to the budget now (also done at open and after every save).
    pub fn evict(&mut self) -> Result<Vec<PathBuf>, KvError> {
        let _lock = self.lock()?;
        Ok(self.evict_locked(None))
    }
}

/// Writes a complete file under `tmp` (which must not exist) and fsyncs it.
fn write_synced(
    tmp: &Path,
    header: &KvFileHeader,
    text: &[u8],
    payload: &[u8],
    tool_map: &[ToolMapEntry],
) -> Result<(), KvError> {
    let f = OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(tmp)
        .map_err(|e| KvError::io(tmp, "create", e))?;
    let mut w = BufWriter::with_capacity(1 << 20, f);
    write_file(&mut w, header, text, payload, tool_map)
        .map_err(|e| KvError::io(tmp, "write", e))?;
    let f = w
        .into_inner()
        .map_err(|e| KvError::io(tmp, "write", e.into_error()))?;
    f.sync_all().map_err(|e| KvError::io(tmp, "fsync", e))?;
    Ok(())
}
