//! The tensors of a transformers checkpoint directory: `model.safetensors`, or the shards named
//! by `model.safetensors.index.json`, read into memory and validated by the `safetensors` crate.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use half::{bf16, f16};
use safetensors::{Dtype, SafeTensors};

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
    shards: Vec<(PathBuf, Vec<u8>)>,
    tensors: BTreeMap<String, SourceTensor>,
}

impl SourceDir {
    pub fn open(dir: &Path) -> Result<SourceDir, ConvertError> {
        let files = shard_files(dir)?;
        let mut shards = Vec::with_capacity(files.len());
        let mut tensors = BTreeMap::new();
        for (i, path) in files.into_iter().enumerate() {
            let bytes = std::fs::read(&path).map_err(|e| ConvertError::io(&path, e))?;
            let (header_len, meta) =
                SafeTensors::read_metadata(&bytes).map_err(|e| ConvertError::Safetensors {
                    path: path.clone(),
                    msg: e.to_string(),
                })?;
            let data_start = 8 + header_len;
            for (name, info) in meta.tensors() {
                let (a, b) = info.data_offsets;
                let t = SourceTensor {
                    dtype: info.dtype,
                    shape: info.shape.clone(),
                    shard: i,
                    start: data_start + a,
                    end: data_start + b,
                };
                if tensors.insert(name.clone(), t).is_some() {
                    return Err(ConvertError::Safetensors {
                        path: path.clone(),
                        msg: format!("tensor {name} appears in more than one shard"),
                    });
                }
            }
            shards.push((path, bytes));
        }
        Ok(SourceDir { shards, tensors })
    }

    pub fn get(&self, name: &str) -> Option<&SourceTensor> {
        self.tensors.get(name)
    }

    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.tensors.keys().map(|s| s.as_str())
    }

    fn bytes(&self, t: &SourceTensor) -> &[u8] {
        // read_metadata checked every range against the file length.
        &self.shards[t.shard].1[t.start..t.end]
    }

    /// The tensor's values as f32 (F32, F16 and BF16 sources).
    pub fn to_f32(&self, name: &str) -> Result<Vec<f32>, ConvertError> {
        let t = self.require(name)?;
        let b = self.bytes(t);
        let out = match t.dtype {
            Dtype::F32 => b
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect(),
            Dtype::F16 => b
                .chunks_exact(2)
                .map(|c| f16::from_le_bytes([c[0], c[1]]).to_f32())
                .collect(),
            Dtype::BF16 => b
                .chunks_exact(2)
                .map(|c| bf16::from_le_bytes([c[0], c[1]]).to_f32())
                .collect(),
            other => return Err(unsupported_dtype(name, other, "F32, F16 or BF16")),
        };
        Ok(out)
    }

    /// The tensor's values as i64 (integer sources: I32, I64, U8, I16).
    pub fn to_i64(&self, name: &str) -> Result<Vec<i64>, ConvertError> {
        let t = self.require(name)?;
        let b = self.bytes(t);
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
