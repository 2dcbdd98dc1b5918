//! The disk KV cache round trip on CUDA (issue 9): a CUDA session's snapshot is saved as a
//! real `.kv` file through the server's store (`KvStore::save`: temporary file, fsync,
//! rename), found again by prefix lookup, read back and fully validated (`KvStore::load`) and
//! restored into a fresh CUDA session. The restored session must give bit-identical
//! next-token logits and the same greedy continuation, with bit-identical logits at every
//! step, as the live session. The same file restored into a CPU session is compared too
//! (different summation order: bounded, not bit-identical).
//!
//! Every case prints one table row before any assertion, so one GPU run reports every
//! number. Without a GPU: "skipped: no CUDA".

mod common;

use std::path::{Path, PathBuf};

use common::argmax;
use ds4_cuda::CudaBackend;
use ds4_kvstore::{KvStore, SaveReason, SaveRequest, StoreOptions};
use ds4_model::backend::{Backend, Logits, ModelError, Session};
use ds4_model::convert::{convert, ConvertOptions};
use ds4_model::cpu::CpuBackend;
use ds4_model::layout::WeightsMode;
use ds4_model::npy;
use ds4_model::numerics::Numerics;

const FIXTURES: [&str; 4] = ["sliding_only", "flash_mini", "ratios_real", "vocab_real"];

/// Weight formats and numerics tried on every fixture: the exact path and ds4's q2 mix.
const CASES: [(WeightsMode, Numerics); 2] = [
    (WeightsMode::F32, Numerics::Reference),
    (WeightsMode::Ds4Q2, Numerics::Ds4),
];

/// Greedy tokens decoded after the restored prefix.
const CONTINUATION: usize = 16;

/// CPU vs CUDA in reference numerics: 1e-3 of the step's largest |logit| (as the forward
/// fixtures). In ds4 numerics the activation codes are discontinuous (see forward_fixtures.rs),
/// so there the CPU difference is reported only.
const CPU_BOUND: f32 = 1e-3;

/// The fixtures directory: under the working directory when run from the repository root
/// (e.g. a test binary carried to a GPU machine), else beside this crate.
fn fixtures_dir() -> PathBuf {
    let here = PathBuf::from("tests/fixtures/models");
    if here.is_dir() {
        return here;
    }
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/models")
}

/// A scratch directory of this test process for one device (the tests run in parallel).
fn scratch(device: &str) -> PathBuf {
    std::env::temp_dir().join(format!(
        "ds4-cuda-kv-roundtrip-{}-{device}",
        std::process::id()
    ))
}

fn load_tokens(name: &str) -> Result<Vec<u32>, String> {
    let path = fixtures_dir().join(name).join("tokens.npy");
    let bytes = std::fs::read(&path).map_err(|e| format!("{}: {e}", path.display()))?;
    let arr = npy::read(&bytes).map_err(|e| format!("{}: {e}", path.display()))?;
    Ok(arr.data.iter().map(|&v| v as u32).collect())
}

fn converted(dir: &Path, name: &str, mode: WeightsMode) -> Result<PathBuf, String> {
    std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let out = dir.join(format!("{name}-{}.gguf", mode.name()));
    if !out.exists() {
        convert(&fixtures_dir().join(name), &out, &ConvertOptions::new(mode))
            .map_err(|e| format!("converting {name} to {mode}: {e}"))?;
    }
    Ok(out)
}

/// The checkpoint's key text. The fixtures' prompts are token ids (most fixtures have no
/// tokenizer); the server's key is the detokenized text, any text works for the store.
fn key_text(tokens: &[u32]) -> String {
    tokens.iter().map(|t| format!("<{t}>")).collect()
}

fn bits_equal(a: &[f32], b: &[f32]) -> bool {
    a.len() == b.len() && a.iter().zip(b).all(|(x, y)| x.to_bits() == y.to_bits())
}

/// max|a − b| / max|b| (NaN counts as infinite).
fn rel_err(a: &[f32], b: &[f32]) -> f32 {
    if a.len() != b.len() {
        return f32::INFINITY;
    }
    let scale = b.iter().fold(0f32, |m, x| m.max(x.abs()));
    let err = a.iter().zip(b).fold(0f32, |m, (x, y)| m.max((x - y).abs()));
    if err.is_nan() {
        f32::INFINITY
    } else {
        err / scale
    }
}

/// One greedy step: the token the current logits pick, evaluated; returns it and the logits
/// after it.
fn greedy_step(s: &mut dyn Session) -> Result<(u32, Vec<f32>), String> {
    let t = argmax(s.last_logits());
    let logits = s
        .eval(&[t], Logits::Last)
        .map_err(|e| format!("decoding {t}: {e}"))?;
    Ok((t, logits))
}

/// What one case measured.
struct Row {
    case: String,
    prefix: usize,
    file_bytes: u64,
    /// Next-token logits of the CUDA-restored session equal the live session's, bit for bit.
    logits_identical: bool,
    /// Greedy steps whose token and logits both match bit for bit (of CONTINUATION).
    steps_identical: usize,
    /// The first step whose token or logits differ.
    first_difference: Option<usize>,
    /// CPU restore of the same file, fed the live continuation: worst step's relative error.
    cpu_err: f32,
    /// Whether `cpu_err` is bounded in this numerics.
    cpu_bounded: bool,
}

impl Row {
    fn header() -> &'static str {
        "| case | prefix | file bytes | next logits identical | greedy steps identical | first difference | cpu restore rel err |\n|---|---|---|---|---|---|---|"
    }

    fn line(&self) -> String {
        format!(
            "| {} | {} | {} | {} | {}/{CONTINUATION} | {} | {:.3e}{} |",
            self.case,
            self.prefix,
            self.file_bytes,
            if self.logits_identical { "yes" } else { "NO" },
            self.steps_identical,
            self.first_difference
                .map_or("none".to_string(), |s| format!("step {s}")),
            self.cpu_err,
            if self.cpu_bounded {
                format!(" (bound {CPU_BOUND:.0e})")
            } else {
                " (reported)".to_string()
            }
        )
    }

    fn failures(&self) -> Vec<String> {
        let mut out = Vec::new();
        if !self.logits_identical {
            out.push(format!(
                "{}: restored next-token logits differ from the live session's",
                self.case
            ));
        }
        if let Some(step) = self.first_difference {
            out.push(format!(
                "{}: the restored continuation differs from step {step}",
                self.case
            ));
        }
        // rel_err counts NaN as infinite.
        if self.cpu_bounded && self.cpu_err > CPU_BOUND {
            out.push(format!(
                "{}: CPU restore differs by {:.3e} > {CPU_BOUND:.0e}",
                self.case, self.cpu_err
            ));
        }
        out
    }
}

/// Saves `live` through a fresh store in `dir` and loads it back as the server would: prefix
/// lookup of a prompt that continues past the checkpoint, then a fully validated read.
/// Returns the payload read from disk and the file's size.
fn through_disk(
    dir: &Path,
    backend: &dyn Backend,
    live: &dyn Session,
    quant_bits: u8,
) -> Result<(Vec<u8>, u64), String> {
    let mut store = KvStore::open(dir, backend.config(), store_options(live, quant_bits))
        .map_err(|e| format!("opening the store {}: {e}", dir.display()))?;
    let key = key_text(live.tokens());
    let payload = live.snapshot();
    let saved = store
        .save(&SaveRequest {
            text: key.as_bytes(),
            payload: &payload,
            reason: SaveReason::Cold,
            key_flags: 0,
            tool_map: &[],
        })
        .map_err(|e| format!("saving: {e}"))?;
    let on_disk = std::fs::metadata(&saved.path)
        .map_err(|e| format!("{}: {e}", saved.path.display()))?
        .len();
    if on_disk != saved.file_bytes {
        return Err(format!(
            "{}: {on_disk} bytes on disk, the store reported {}",
            saved.path.display(),
            saved.file_bytes
        ));
    }
    // A fresh store indexes the directory from scratch, as a restarted server does.
    drop(store);
    let mut store = KvStore::open(dir, backend.config(), store_options(live, quant_bits))
        .map_err(|e| format!("reopening the store {}: {e}", dir.display()))?;
    let prompt = format!("{key}<and the next turn>");
    let hit = store
        .lookup_longest_prefix(&prompt)
        .ok_or_else(|| format!("{}: no prefix hit for the saved key", dir.display()))?;
    if hit.path != saved.path || hit.text_len != key.len() {
        return Err(format!(
            "the lookup found {} ({} bytes of text), expected {} ({} bytes)",
            hit.path.display(),
            hit.text_len,
            saved.path.display(),
            key.len()
        ));
    }
    let file = store.load(&hit).map_err(|e| format!("loading: {e}"))?;
    if file.payload != payload {
        return Err(format!(
            "{}: the payload read back differs from the snapshot written",
            hit.path.display()
        ));
    }
    Ok((file.payload, on_disk))
}

/// The server's store options for this session's context, keeping every checkpoint (no
/// minimum length, no budget).
fn store_options(live: &dyn Session, quant_bits: u8) -> StoreOptions {
    let mut opts = StoreOptions::new(live.ctx() as u32, quant_bits);
    opts.min_tokens = 1;
    opts.budget_bytes = 0;
    opts
}

/// A device under test: its name and how a converted fixture is loaded on it.
struct Device {
    name: &'static str,
    load: fn(&Path, Numerics) -> Loaded,
}

type Loaded = Result<Box<dyn Backend>, ModelError>;

const CUDA: Device = Device {
    name: "cuda",
    load: load_cuda,
};
const CPU: Device = Device {
    name: "cpu",
    load: load_cpu,
};

fn load_cuda(path: &Path, num: Numerics) -> Loaded {
    Ok(Box::new(CudaBackend::load(path, num, 0)?))
}

fn load_cpu(path: &Path, num: Numerics) -> Loaded {
    Ok(Box::new(CpuBackend::load(path, num)?))
}

/// Prefill on the device, snapshot → `.kv` file → restore into a fresh device session and
/// into a CPU session, then continue greedily on all three.
fn roundtrip(name: &str, wm: WeightsMode, num: Numerics, device: &Device) -> Result<Row, String> {
    let tokens = load_tokens(name)?;
    let dir = scratch(device.name);
    let path = converted(&dir, name, wm)?;
    let dev = (device.load)(&path, num).map_err(|e| format!("{name} {wm} {num}: load: {e}"))?;
    let case = format!("{name} {wm} {num} on {}", dev.name());
    let cpu = CpuBackend::load(&path, num).map_err(|e| format!("{case}: cpu load: {e}"))?;
    let ctx = tokens.len() + CONTINUATION + 1;
    let new_session = |b: &dyn Backend| {
        b.new_session(ctx)
            .map_err(|e| format!("{case}: {} session: {e}", b.name()))
    };

    let mut live = new_session(dev.as_ref())?;
    live.eval(&tokens, Logits::Last)
        .map_err(|e| format!("{case}: prefill: {e}"))?;
    let quant_bits = if wm == WeightsMode::Ds4Q2 { 2 } else { 4 };
    let dir = dir.join(format!("store-{name}-{wm}-{num}"));
    let (payload, file_bytes) = through_disk(&dir, dev.as_ref(), live.as_ref(), quant_bits)
        .map_err(|e| format!("{case}: {e}"))?;
    let _ = std::fs::remove_dir_all(&dir);

    let mut restored = new_session(dev.as_ref())?;
    restored
        .restore(&payload)
        .map_err(|e| format!("{case}: {} restore: {e}", dev.name()))?;
    if restored.tokens() != live.tokens() {
        return Err(format!("{case}: the restored session holds other tokens"));
    }
    let logits_identical = bits_equal(restored.last_logits(), live.last_logits());

    let mut cpu_session = new_session(&cpu)?;
    cpu_session
        .restore(&payload)
        .map_err(|e| format!("{case}: cpu restore: {e}"))?;
    let mut cpu_err = rel_err(cpu_session.last_logits(), live.last_logits());

    let mut steps_identical = 0;
    let mut first_difference = None;
    for step in 0..CONTINUATION {
        let (want_t, want) = greedy_step(live.as_mut()).map_err(|e| format!("{case}: live {e}"))?;
        let (got_t, got) =
            greedy_step(restored.as_mut()).map_err(|e| format!("{case}: restored {e}"))?;
        if got_t == want_t && bits_equal(&got, &want) {
            steps_identical += 1;
        } else {
            first_difference.get_or_insert(step);
        }
        // The CPU follows the live tokens, so its logits stay comparable after a tie flip.
        let on_cpu = cpu_session
            .eval(&[want_t], Logits::Last)
            .map_err(|e| format!("{case}: cpu decoding {want_t}: {e}"))?;
        cpu_err = cpu_err.max(rel_err(&on_cpu, &want));
    }
    Ok(Row {
        case,
        prefix: tokens.len(),
        file_bytes,
        logits_identical,
        steps_identical,
        first_difference,
        cpu_err,
        cpu_bounded: num == Numerics::Reference,
    })
}

/// Runs every case on the device, prints the table, then asserts.
fn check_every_fixture(device: &Device) {
    println!("{}", Row::header());
    let mut failures = Vec::new();
    for name in FIXTURES {
        for (wm, num) in CASES {
            match roundtrip(name, wm, num, device) {
                Ok(row) => {
                    println!("{}", row.line());
                    failures.extend(row.failures());
                }
                Err(e) => {
                    println!("| {name} {wm} {num} | error: {e} |");
                    failures.push(e);
                }
            }
        }
    }
    let _ = std::fs::remove_dir_all(scratch(device.name));
    for f in &failures {
        println!("FAILED {f}");
    }
    assert!(failures.is_empty(), "{} failures", failures.len());
}

#[test]
fn kv_file_roundtrip_on_cuda_is_bit_identical() {
    if !ds4_cuda::cuda_available() {
        println!("skipped: no CUDA");
        return;
    }
    check_every_fixture(&CUDA);
}

/// The same harness with the CPU as the device: runs everywhere (the CPU half of the
/// acceptance on the fixture models, and a check of the harness itself).
#[test]
fn kv_file_roundtrip_on_cpu_is_bit_identical() {
    check_every_fixture(&CPU);
}
