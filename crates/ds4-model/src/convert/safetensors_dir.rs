//! The tensors of a transformers checkpoint directory: `model.safetensors`, or the shards named
//! by `model.safetensors.index.json`. Only the headers are read up front (parsed by the
//! `safetensors` crate, every range checked against the file); a tensor's bytes are read when
//! it is converted, so a checkpoint far larger than memory converts one tensor at a time.

use std::collections::BTreeMap;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use half::{bf16, f16};
use safetensors::tensor::Metadata;
use safetensors::Dtype;

use super::ConvertError;

/// Where one tensor lives.
#[derive(Clone, Debug)]
pub struct SourceTensor {
    pub dtype: Dtype,
    pub shape: Vec<usize>,
    shard: usize,
    /// Byte range inside the shard file.
    start: usize,
    end: usize,
}

/// Every tensor of a checkpoint directory.
pub struct SourceDir {
    shards: Vec<(PathBuf, File)>,
    tensors: BTreeMap<String, SourceTensor>,
}

/// Largest header accepted (the format's own limit is 100 MB).
const MAX_HEADER: u64 = 100_000_000;

impl SourceDir {
    pub fn open(dir: &Path) -> Result<SourceDir, ConvertError> {
        let files = shard_files(dir)?;
        let mut shards = Vec::with_capacity(files.len());
        let mut tensors = BTreeMap::new();
        for (i, path) in files.into_iter().enumerate() {
            let bad = |msg: String| ConvertError::Safetensors {
                path: path.clone(),
                msg,
            };
            let file = File::open(&path).map_err(|e| ConvertError::io(&path, e))?;
            let file_len = file
                .metadata()
                .map_err(|e| ConvertError::io(&path, e))?
                .len();
            let mut len_bytes = [0u8; 8];
            file.read_exact_at(&mut len_bytes, 0)
                .map_err(|e| bad(format!("cannot read the header length: {e}")))?;
            let header_len = u64::from_le_bytes(len_bytes);
            if header_len > MAX_HEADER || 8 + header_len > file_len {
                return Err(bad(format!(
                    "header length {header_len} does not fit the file of {file_len} bytes"
                )));
            }
            let mut header = vec![0u8; header_len as usize];
            file.read_exact_at(&mut header, 8)
                .map_err(|e| bad(format!("cannot read the header: {e}")))?;
            let meta: Metadata =
                serde_json::from_slice(&header).map_err(|e| bad(format!("bad header: {e}")))?;
            let data_start = 8 + header_len as usize;
            let data_len = (file_len - 8 - header_len) as usize;
            let mut ranges = Vec::new();
            for (name, info) in meta.tensors() {
                let (a, b) = info.data_offsets;
                let n_bytes = info
                    .shape
                    .iter()
                    .try_fold(1usize, |acc, &d| acc.checked_mul(d))
                    .and_then(|n| n.checked_mul(info.dtype.bitsize()))
                    .map(|bits| bits.div_ceil(8));
                if b < a || b > data_len || n_bytes != Some(b - a) {
                    return Err(bad(format!(
                        "tensor {name}: bytes {a}..{b} do not hold {:?} {:?} inside {data_len} \
                         data bytes",
                        info.dtype, info.shape
                    )));
                }
                ranges.push((a, b, name.clone()));
                let t = SourceTensor {
                    dtype: info.dtype,
                    shape: info.shape.clone(),
                    shard: i,
                    start: data_start + a,
                    end: data_start + b,
                };
                if tensors.insert(name.clone(), t).is_some() {
                    return Err(bad(format!("tensor {name} appears in more than one shard")));
                }
            }
            ranges.sort();
            for w in ranges.windows(2) {
                if w[1].0 < w[0].1 {
                    return Err(bad(format!("tensors {} and {} overlap", w[0].2, w[1].2)));
                }
            }
            shards.push((path, file));
        }
        Ok(SourceDir { shards, tensors })
    }

    pub fn get(&self, name: &str) -> Option<&SourceTensor> {
        self.tensors.get(name)
    }

    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.tensors.keys().map(|s| s.as_str())
    }

    /// Reads bytes `[from, to)` of a tensor's data (open checked its range against the file).
    fn bytes(
        &self,
        name: &str,
        t: &SourceTensor,
        from: usize,
        to: usize,
    ) -> Result<Vec<u8>, ConvertError> {
        let (path, file) = &self.shards[t.shard];
        debug_assert!(from <= to && t.start + to <= t.end);
        let mut buf = vec![0u8; to - from];
        file.read_exact_at(&mut buf, (t.start + from) as u64)
            .map_err(|e| ConvertError::Safetensors {
                path: path.clone(),
                msg: format!("reading tensor {name}: {e}"),
            })?;
        Ok(buf)
    }

    /// Number of elements of a tensor.
    pub fn n_elements(&self, name: &str) -> Result<usize, ConvertError> {
        Ok(self.require(name)?.shape.iter().product())
    }

    /// Elements `[start, start + len)` of a float tensor (F32, F16, BF16) as f32.
    pub fn f32_range(
        &self,
        name: &str,
        start: usize,
        len: usize,
    ) -> Result<Vec<f32>, ConvertError> {
        let t = self.require(name)?;
        let n: usize = t.shape.iter().product();
        if start.checked_add(len).is_none_or(|end| end > n) {
            return Err(ConvertError::BadValue {
                name: name.to_string(),
                msg: format!("elements {start}..+{len} are outside its {n}"),
            });
        }
        let size = match t.dtype {
            Dtype::F32 => 4,
            Dtype::F16 | Dtype::BF16 => 2,
            other => return Err(unsupported_dtype(name, other, "F32, F16 or BF16")),
        };
        let b = self.bytes(name, t, start * size, (start + len) * size)?;
        Ok(match t.dtype {
            Dtype::F32 => b
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect(),
            Dtype::F16 => b
                .chunks_exact(2)
                .map(|c| f16::from_le_bytes([c[0], c[1]]).to_f32())
                .collect(),
            _ => b
                .chunks_exact(2)
                .map(|c| bf16::from_le_bytes([c[0], c[1]]).to_f32())
                .collect(),
        })
    }

    /// The tensor's values as i64 (integer sources: I32, I64, U8, I16).
    pub fn to_i64(&self, name: &str) -> Result<Vec<i64>, ConvertError> {
        let t = self.require(name)?;
        let b = &self.bytes(name, t, 0, t.end - t.start)?;
        let out = match t.dtype {
            Dtype::I64 => b
                .chunks_exact(8)
                .map(|c| i64::from_le_bytes(c.try_into().expect("8-byte chunk")))
                .collect(),
            Dtype::I32 => b
                .chunks_exact(4)
                .map(|c| i64::from(i32::from_le_bytes([c[0], c[1], c[2], c[3]])))
                .collect(),
            Dtype::I16 => b
                .chunks_exact(2)
                .map(|c| i64::from(i16::from_le_bytes([c[0], c[1]])))
                .collect(),
            Dtype::U8 => b.iter().map(|&x| i64::from(x)).collect(),
            other => return Err(unsupported_dtype(name, other, "an integer type")),
        };
        Ok(out)
    }

    fn require(&self, name: &str) -> Result<&SourceTensor, ConvertError> {
        self.get(name).ok_or_else(|| ConvertError::MissingTensor {
            name: name.to_string(),
            needed_for: String::new(),
        })
    }
}

fn unsupported_dtype(name: &str, dtype: Dtype, wanted: &str) -> ConvertError {
    ConvertError::Unsupported(format!(
        "tensor {name} is stored as {dtype:?}; convert reads {wanted} (quantized FP8/FP4 \
         checkpoints must be dequantized first)"
    ))
}

/// The safetensors files of `dir`: the index's shards, or `model.safetensors`.
fn shard_files(dir: &Path) -> Result<Vec<PathBuf>, ConvertError> {
    let index = dir.join("model.safetensors.index.json");
    if index.exists() {
        let text = std::fs::read_to_string(&index).map_err(|e| ConvertError::io(&index, e))?;
        let json: serde_json::Value =
            serde_json::from_str(&text).map_err(|e| ConvertError::Json {
                path: index.clone(),
                msg: e.to_string(),
            })?;
        let map = json
            .get("weight_map")
            .and_then(|m| m.as_object())
            .ok_or_else(|| ConvertError::Json {
                path: index.clone(),
                msg: "no 'weight_map' object".into(),
            })?;
        let mut files: Vec<String> = Vec::new();
        for v in map.values() {
            let f = v.as_str().ok_or_else(|| ConvertError::Json {
                path: index.clone(),
                msg: "a 'weight_map' value is not a file name".into(),
            })?;
            // A shard name is a plain file inside the directory.
            if f.contains('/') || f.contains('\\') || f == ".." {
                return Err(ConvertError::Json {
                    path: index.clone(),
                    msg: format!("shard name '{f}' is not a plain file name"),
                });
            }
            if !files.iter().any(|x| x == f) {
                files.push(f.to_string());
            }
        }
        files.sort();
        return Ok(files.into_iter().map(|f| dir.join(f)).collect());
    }
    let single = dir.join("model.safetensors");
    if single.exists() {
        return Ok(vec![single]);
    }
    Err(ConvertError::io(
        &single,
        std::io::Error::new(
            std::io::ErrorKind::NotFound,
            "neither model.safetensors nor model.safetensors.index.json exists",
        ),
    ))
}
