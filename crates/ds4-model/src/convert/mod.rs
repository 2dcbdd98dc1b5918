//! `ds4 convert`: a directory written by transformers' `DeepseekV4ForCausalLM.save_pretrained`
//! (config.json + safetensors, with DeepSeek's original tensor names or transformers' module
//! names, see [`checkpoint_names`]) → a GGUF in ds4's tensor naming, shapes and metadata.
//!
//! Every tensor ds4's layout needs ([`crate::layout::expected_tensors`]) is read from the
//! checkpoint ([`tensor_map`]), its shape is checked against config.json, and it is stored in
//! the type the weights mode gives its role ([`crate::layout::storage_type`]); a checkpoint
//! tensor the layout does not use is an error, as is a missing one. With `--weights f32` the
//! values are copied exactly (f16/bf16 sources widen losslessly).

pub mod checkpoint_names;
mod hf_config;
mod safetensors_dir;
pub mod tensor_map;
mod tokenizer;

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use ds4_gguf::quant::quantize;
use ds4_gguf::writer::GgufWriter;
use ds4_gguf::{GgmlType, GgufError, MetaValue};
use rayon::prelude::*;
use safetensors::Dtype;

use crate::config::ModelConfig;
use crate::layout::{expected_tensors, storage_type, TensorRole, WeightsMode};

pub use checkpoint_names::Checkpoint;
pub use hf_config::{model_metadata, parse_config, HfModel};
pub use safetensors_dir::SourceDir;
pub use tensor_map::{gather, segments, source_of, Source};
pub use tokenizer::tokenizer_metadata;

/// Data alignment of the files we write (`general.alignment`).
pub const ALIGNMENT: u32 = 32;

/// Default elements converted at a time per thread (16 MiB of f32): memory stays bounded for
/// any tensor size.
pub const CHUNK_ELEMS: usize = 4 << 20;

#[derive(Debug, thiserror::Error)]
pub enum ConvertError {
    /// (The I/O error is part of the message, not a `source`, so chains print it once.)
    #[error("{}: {err}", path.display())]
    Io { path: PathBuf, err: std::io::Error },
    #[error("{}: {msg}", path.display())]
    Json { path: PathBuf, msg: String },
    #[error("{0}")]
    Config(String),
    #[error("unsupported: {0}")]
    Unsupported(String),
    #[error("{}: not a valid safetensors file: {msg}", path.display())]
    Safetensors { path: PathBuf, msg: String },
    #[error("missing tensor {name}{needed_for}")]
    MissingTensor { name: String, needed_for: String },
    #[error("unknown tensor {name} in the checkpoint{more} (not part of the DeepSeek V4 layout)")]
    UnknownTensor { name: String, more: String },
    #[error("tensor {name} has shape {found:?}, config.json implies {expected:?}")]
    Shape {
        name: String,
        expected: Vec<u64>,
        found: Vec<u64>,
    },
    #[error("tensor {name}: {msg}")]
    BadValue { name: String, msg: String },
    #[error("{}: {msg}", path.display())]
    Tokenizer { path: PathBuf, msg: String },
    #[error("writing the GGUF: {0}")]
    Gguf(#[from] GgufError),
}

impl ConvertError {
    pub(crate) fn io(path: &Path, err: std::io::Error) -> ConvertError {
        ConvertError::Io {
            path: path.to_path_buf(),
            err,
        }
    }
}

/// `ds4 convert` options.
#[derive(Clone, Debug)]
pub struct ConvertOptions {
    pub weights: WeightsMode,
    /// A tokenizer.json whose tokens and merges go into the file.
    pub tokenizer: Option<PathBuf>,
    /// `general.name`; default: the checkpoint directory's name.
    pub name: Option<String>,
}

impl ConvertOptions {
    pub fn new(weights: WeightsMode) -> ConvertOptions {
        ConvertOptions {
            weights,
            tokenizer: None,
            name: None,
        }
    }
}

/// What a conversion did.
#[derive(Clone, Debug)]
pub struct ConvertReport {
    pub config: ModelConfig,
    pub n_tensors: usize,
    pub file_bytes: u64,
    /// Tensors stored as F16 because their rows do not fit the mode's block size.
    pub fallbacks: Vec<Fallback>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Fallback {
    pub tensor: String,
    pub wanted: GgmlType,
    pub row_len: u64,
}

/// One planned GGUF tensor.
struct Planned {
    name: String,
    ty: GgmlType,
    dims: Vec<u64>,
    role: TensorRole,
    source: Source,
}

/// Reads config.json of `dir`.
pub fn read_config(dir: &Path) -> Result<HfModel, ConvertError> {
    let path = dir.join("config.json");
    let text = std::fs::read_to_string(&path).map_err(|e| ConvertError::io(&path, e))?;
    let json: serde_json::Value = serde_json::from_str(&text).map_err(|e| ConvertError::Json {
        path: path.clone(),
        msg: e.to_string(),
    })?;
    parse_config(&json)
}

/// Converts the checkpoint in `dir` to the GGUF `out`.
pub fn convert(
    dir: &Path,
    out: &Path,
    opts: &ConvertOptions,
) -> Result<ConvertReport, ConvertError> {
    convert_in_chunks(dir, out, opts, CHUNK_ELEMS)
}

/// [`convert`], reading and quantizing about `chunk_elems` elements (whole rows) at a time.
pub fn convert_in_chunks(
    dir: &Path,
    out: &Path,
    opts: &ConvertOptions,
    chunk_elems: usize,
) -> Result<ConvertReport, ConvertError> {
    let model = read_config(dir)?;
    let sources = Arc::new(Checkpoint::new(SourceDir::open(dir)?)?);
    let plan = plan_tensors(&model, &sources, opts.weights)?;

    let mut w = GgufWriter::new();
    w.set_alignment(ALIGNMENT)?;
    w.add_meta("general.architecture", MetaValue::from("deepseek4"));
    let name = opts.name.clone().unwrap_or_else(|| {
        dir.canonicalize()
            .ok()
            .and_then(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
            .unwrap_or_else(|| "deepseek4".to_string())
    });
    w.add_meta("general.name", MetaValue::from(name));
    w.add_meta(
        "deepseek4.convert.weights",
        MetaValue::from(opts.weights.name()),
    );
    for (k, v) in model_metadata(&model) {
        w.add_meta(k, v);
    }
    if let Some(path) = &opts.tokenizer {
        for (k, v) in tokenizer_metadata(path, model.cfg.vocab_size)? {
            w.add_meta(k, v);
        }
    }

    let mut fallbacks = Vec::new();
    let n_experts = model.cfg.n_experts as i64;
    for p in &plan {
        let wanted = p.role.mode_type(opts.weights);
        if wanted != p.ty {
            fallbacks.push(Fallback {
                tensor: p.name.clone(),
                wanted,
                row_len: p.dims[0],
            });
        }
        let sources = Arc::clone(&sources);
        let (source, ty, name) = (p.source.clone(), p.ty, p.name.clone());
        let is_table = p.role == TensorRole::HashTable;
        let row_len = p.dims[0] as usize;
        let chunk = chunk_elems;
        w.add_tensor_with(
            &p.name,
            p.ty,
            &p.dims,
            Box::new(move |dst: &mut [u8]| {
                if is_table {
                    let ids = gather(&source, &sources.to_i64(source.tensor())?);
                    write_expert_ids(&name, &ids, n_experts, dst)?;
                } else {
                    write_values(&sources, &source, ty, row_len, chunk, &name, dst)?;
                }
                Ok(())
            }),
        )?;
    }
    let layout = w.write_to_path(out)?;
    Ok(ConvertReport {
        config: model.cfg,
        n_tensors: plan.len(),
        file_bytes: layout.file_len,
        fallbacks,
    })
}

/// Converts one float tensor into `dst`: whole-row chunks of about `chunk` elements, each read
/// from the checkpoint and quantized into its own part of `dst`, in parallel (memory: one chunk
/// per thread).
fn write_values(
    sources: &Checkpoint,
    source: &Source,
    ty: GgmlType,
    row_len: usize,
    chunk: usize,
    name: &str,
    dst: &mut [u8],
) -> Result<(), ConvertError> {
    let bad = |msg: String| ConvertError::BadValue {
        name: name.to_string(),
        msg,
    };
    let mut jobs = Vec::new();
    let mut rest = dst;
    for (start, len) in segments(source, row_len, chunk) {
        // Segments are whole rows, and rows fit the type's blocks (storage_type).
        let bytes = ty
            .row_bytes(len as u64)
            .ok_or_else(|| bad(format!("{len} elements are not whole {ty} blocks")))?
            as usize;
        if bytes > rest.len() {
            return Err(bad(
                "the checkpoint holds more values than the GGUF tensor".into()
            ));
        }
        let (part, tail) = rest.split_at_mut(bytes);
        jobs.push((start, len, part));
        rest = tail;
    }
    if !rest.is_empty() {
        return Err(bad(
            "the checkpoint holds fewer values than the GGUF tensor".into(),
        ));
    }
    jobs.into_par_iter().try_for_each(|(start, len, part)| {
        let values = sources.f32_range(source.tensor(), start, len)?;
        quantize(ty, &values, part).map_err(|e| bad(e.to_string()))
    })
}

/// tid2eid values as I32, each an expert index.
fn write_expert_ids(
    name: &str,
    ids: &[i64],
    n_experts: i64,
    dst: &mut [u8],
) -> Result<(), ConvertError> {
    for (i, (&id, out)) in ids.iter().zip(dst.chunks_exact_mut(4)).enumerate() {
        if !(0..n_experts).contains(&id) {
            return Err(ConvertError::BadValue {
                name: name.to_string(),
                msg: format!("entry {i} is expert {id}, outside 0..{n_experts}"),
            });
        }
        out.copy_from_slice(&(id as i32).to_le_bytes());
    }
    Ok(())
}

/// Matches every layout tensor with its checkpoint source, checks shapes and dtypes, and finds
/// checkpoint tensors nothing uses.
fn plan_tensors(
    model: &HfModel,
    sources: &Checkpoint,
    mode: WeightsMode,
) -> Result<Vec<Planned>, ConvertError> {
    let mut used: HashSet<String> = HashSet::new();
    let mut plan = Vec::new();
    for spec in expected_tensors(&model.cfg) {
        let source = source_of(&spec, model.tied_embeddings).ok_or_else(|| {
            ConvertError::Unsupported(format!("no checkpoint source known for {}", spec.name))
        })?;
        let Some(found_shape) = sources.shape(source.tensor())? else {
            if spec.optional {
                continue;
            }
            return Err(ConvertError::MissingTensor {
                name: source.tensor().to_string(),
                needed_for: format!(" (needed for {})", spec.name),
            });
        };
        if found_shape != source.shape() {
            return Err(ConvertError::Shape {
                name: source.tensor().to_string(),
                expected: source.shape().to_vec(),
                found: found_shape,
            });
        }
        for stored in sources.stored(source.tensor()).unwrap_or_default() {
            let dtype = sources
                .dir
                .get(stored)
                .expect("listed by the directory")
                .dtype;
            let readable = if spec.role == TensorRole::HashTable {
                matches!(dtype, Dtype::I64 | Dtype::I32 | Dtype::I16 | Dtype::U8)
            } else {
                matches!(dtype, Dtype::F32 | Dtype::F16 | Dtype::BF16)
            };
            if !readable {
                return Err(ConvertError::Unsupported(format!(
                    "tensor {stored} is stored as {dtype:?}; convert reads F32/F16/BF16 weights \
                     and integer tid2eid tables (quantized FP8/FP4 checkpoints must be \
                     dequantized first)"
                )));
            }
            used.insert(stored.clone());
        }
        let (ty, _) = storage_type(spec.role, mode, spec.dims[0]);
        plan.push(Planned {
            name: spec.name,
            ty,
            dims: spec.dims,
            role: spec.role,
            source,
        });
    }
    let unknown: Vec<&str> = sources
        .dir
        .names()
        .filter(|n| !used.contains(*n) && !n.starts_with("mtp."))
        .collect();
    if let Some(first) = unknown.first() {
        let more = match unknown.len() {
            1 => String::new(),
            n => format!(" and {} more", n - 1),
        };
        return Err(ConvertError::UnknownTensor {
            name: first.to_string(),
            more,
        });
    }
    Ok(plan)
}
