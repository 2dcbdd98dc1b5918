//! The GGUF v3 writer.
//!
//! Files are laid out first ([`GgufWriter::plan`]) and written second, so a multi-GB model is
//! never held in memory: tensor data comes from owned bytes, from a producer closure run when
//! the tensor is written, or is written later by the caller (from many threads at once) through
//! [`PlannedFile::write_tensor`] at the offsets the plan fixed. Output goes to `PATH.tmp` and is
//! renamed to `PATH` only after everything was written and synced, so a crash or error never
//! leaves a half file under the final name.
//!
//! ```no_run
//! use ds4_gguf::{GgmlType, MetaValue, writer::GgufWriter};
//! let mut w = GgufWriter::new();
//! w.add_meta("general.name", MetaValue::from("tiny"));
//! w.add_tensor("a.weight", GgmlType::F32, &[4], vec![0u8; 16])?;
//! w.add_tensor_alias("b.weight", GgmlType::F32, &[4], "a.weight")?;
//! w.write_to_path("tiny.gguf")?;
//! # Ok::<(), ds4_gguf::GgufError>(())
//! ```

use std::collections::HashMap;
use std::ffi::OsString;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use crate::error::GgufError;
use crate::metadata::{MetaArray, MetaValue};
use crate::reader::{
    align_up, tensor_size, TensorInfo, ALIGNMENT_KEY, DEFAULT_ALIGNMENT, GGUF_MAGIC, GGUF_VERSION,
    MAX_ARRAY_NESTING, MAX_DIMS,
};
use crate::types::GgmlType;

/// Fills a tensor's bytes (the slice has exactly the tensor's byte size).
pub type TensorProducer =
    Box<dyn FnOnce(&mut [u8]) -> Result<(), Box<dyn std::error::Error + Send + Sync>> + Send>;

/// Where a tensor's bytes come from.
enum Source {
    Bytes(Vec<u8>),
    Producer(TensorProducer),
    /// Written by the caller through [`PlannedFile::write_tensor`].
    Deferred,
    /// Shares the data of the named tensor.
    Alias(String),
}

struct PendingTensor {
    name: String,
    ty: GgmlType,
    dims: Vec<u64>,
    n_elements: u64,
    n_bytes: u64,
    source: Source,
}

/// Builds a GGUF v3 file: metadata in insertion order, tensor infos in insertion order, tensor
/// data in insertion order (aliases take no space).
#[derive(Default)]
pub struct GgufWriter {
    metadata: Vec<(String, MetaValue)>,
    key_index: HashMap<String, usize>,
    tensors: Vec<PendingTensor>,
    tensor_index: HashMap<String, usize>,
}

/// The byte layout of a planned file.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct GgufLayout {
    pub alignment: u32,
    /// Absolute offset of the data section.
    pub data_offset: u64,
    pub file_len: u64,
    /// Tensor infos in file order; `offset` is relative to `data_offset`.
    pub tensors: Vec<TensorInfo>,
}

impl GgufLayout {
    /// The info of the tensor called `name`.
    pub fn tensor(&self, name: &str) -> Option<&TensorInfo> {
        self.tensors.iter().find(|t| t.name == name)
    }
}

impl GgufWriter {
    pub fn new() -> GgufWriter {
        GgufWriter::default()
    }

    /// Sets the data alignment (a power of two), stored as `general.alignment` (UINT32).
    pub fn set_alignment(&mut self, alignment: u32) -> Result<(), GgufError> {
        if !alignment.is_power_of_two() {
            return Err(GgufError::BadAlignment {
                reason: format!("{alignment} is not a power of two"),
            });
        }
        self.add_meta(ALIGNMENT_KEY, MetaValue::U32(alignment));
        Ok(())
    }

    /// Adds a metadata pair; replacing an existing key keeps its position.
    pub fn add_meta(&mut self, key: impl Into<String>, value: impl Into<MetaValue>) {
        let key = key.into();
        let value = value.into();
        match self.key_index.get(&key) {
            Some(&i) => self.metadata[i].1 = value,
            None => {
                self.key_index.insert(key.clone(), self.metadata.len());
                self.metadata.push((key, value));
            }
        }
    }

    /// The metadata added so far.
    pub fn metadata(&self) -> &[(String, MetaValue)] {
        &self.metadata
    }

    /// Adds a tensor whose bytes are given now (`data.len()` must equal its byte size).
    pub fn add_tensor(
        &mut self,
        name: &str,
        ty: GgmlType,
        dims: &[u64],
        data: Vec<u8>,
    ) -> Result<(), GgufError> {
        let t = self.new_tensor(name, ty, dims, Source::Deferred)?;
        if data.len() as u64 != t.n_bytes {
            return Err(GgufError::InvalidInput {
                name: name.to_string(),
                reason: format!(
                    "{} data bytes given, a {ty} tensor of shape {dims:?} needs {}",
                    data.len(),
                    t.n_bytes
                ),
            });
        }
        self.push(PendingTensor {
            source: Source::Bytes(data),
            ..t
        });
        Ok(())
    }

    /// Adds a tensor whose bytes `producer` fills when the file is written (one tensor's
    /// buffer in memory at a time).
    pub fn add_tensor_with(
        &mut self,
        name: &str,
        ty: GgmlType,
        dims: &[u64],
        producer: TensorProducer,
    ) -> Result<(), GgufError> {
        let t = self.new_tensor(name, ty, dims, Source::Producer(producer))?;
        self.push(t);
        Ok(())
    }

    /// Adds a tensor whose bytes the caller writes after [`GgufWriter::create`], through
    /// [`PlannedFile::write_tensor`] (possibly from several threads).
    pub fn add_tensor_deferred(
        &mut self,
        name: &str,
        ty: GgmlType,
        dims: &[u64],
    ) -> Result<(), GgufError> {
        let t = self.new_tensor(name, ty, dims, Source::Deferred)?;
        self.push(t);
        Ok(())
    }

    /// Adds a tensor info that points at the data of tensor `same_as` (same offset). The two
    /// must have the same byte size; type and shape may differ. `same_as` may be added later
    /// and may itself be an alias.
    pub fn add_tensor_alias(
        &mut self,
        name: &str,
        ty: GgmlType,
        dims: &[u64],
        same_as: &str,
    ) -> Result<(), GgufError> {
        let t = self.new_tensor(name, ty, dims, Source::Alias(same_as.to_string()))?;
        self.push(t);
        Ok(())
    }

    fn new_tensor(
        &self,
        name: &str,
        ty: GgmlType,
        dims: &[u64],
        source: Source,
    ) -> Result<PendingTensor, GgufError> {
        if self.tensor_index.contains_key(name) {
            return Err(GgufError::DuplicateTensor {
                tensor: name.to_string(),
            });
        }
        if dims.is_empty() || dims.len() > MAX_DIMS {
            return Err(GgufError::InvalidInput {
                name: name.to_string(),
                reason: format!("{} dimensions (must be 1..={MAX_DIMS})", dims.len()),
            });
        }
        let (n_elements, n_bytes) = tensor_size(name, ty, dims)?;
        Ok(PendingTensor {
            name: name.to_string(),
            ty,
            dims: dims.to_vec(),
            n_elements,
            n_bytes,
            source,
        })
    }

    fn push(&mut self, t: PendingTensor) {
        self.tensor_index.insert(t.name.clone(), self.tensors.len());
        self.tensors.push(t);
    }

    fn alignment(&self) -> Result<u32, GgufError> {
        match self
            .key_index
            .get(ALIGNMENT_KEY)
            .map(|&i| &self.metadata[i].1)
        {
            None => Ok(DEFAULT_ALIGNMENT),
            Some(MetaValue::U32(a)) if a.is_power_of_two() => Ok(*a),
            Some(v) => Err(GgufError::BadAlignment {
                reason: format!("{ALIGNMENT_KEY} is {v:?}, expected a UINT32 power of two"),
            }),
        }
    }

    /// The tensor whose data `i` uses: itself, or the end of its alias chain.
    fn data_owner(&self, i: usize) -> Result<usize, GgufError> {
        let mut cur = i;
        // A chain longer than the number of tensors must loop.
        for _ in 0..=self.tensors.len() {
            match &self.tensors[cur].source {
                Source::Alias(target) => {
                    cur =
                        *self
                            .tensor_index
                            .get(target)
                            .ok_or_else(|| GgufError::InvalidInput {
                                name: self.tensors[i].name.clone(),
                                reason: format!("alias target `{target}` is not a tensor"),
                            })?;
                }
                _ => return Ok(cur),
            }
        }
        Err(GgufError::InvalidInput {
            name: self.tensors[i].name.clone(),
            reason: "alias chain loops".to_string(),
        })
    }

    /// Computes the layout: header size, every tensor's offset, the file size.
    pub fn plan(&self) -> Result<GgufLayout, GgufError> {
        let alignment = self.alignment()?;
        for (key, v) in &self.metadata {
            if let MetaValue::Array(a) = v {
                if array_depth(a) > MAX_ARRAY_NESTING {
                    return Err(GgufError::InvalidInput {
                        name: key.clone(),
                        reason: format!(
                            "arrays nested deeper than {MAX_ARRAY_NESTING} levels (readers reject it)"
                        ),
                    });
                }
            }
        }
        let header_len = self.header_bytes_len();
        let data_offset = align_up(header_len, alignment).ok_or_else(overflow)?;
        let mut offsets = vec![0u64; self.tensors.len()];
        let mut next = 0u64;
        for (i, t) in self.tensors.iter().enumerate() {
            if matches!(t.source, Source::Alias(_)) {
                continue;
            }
            offsets[i] = next;
            let end = next.checked_add(t.n_bytes).ok_or_else(overflow)?;
            next = align_up(end, alignment).ok_or_else(overflow)?;
        }
        for (i, t) in self.tensors.iter().enumerate() {
            let owner = self.data_owner(i)?;
            let target = &self.tensors[owner];
            if owner != i && target.n_bytes != t.n_bytes {
                return Err(GgufError::InvalidInput {
                    name: t.name.clone(),
                    reason: format!(
                        "alias of `{}` has {} bytes, the target has {}",
                        target.name, t.n_bytes, target.n_bytes
                    ),
                });
            }
            offsets[i] = offsets[owner];
        }
        let file_len = data_offset.checked_add(next).ok_or_else(overflow)?;
        let tensors = self
            .tensors
            .iter()
            .zip(offsets)
            .map(|(t, offset)| TensorInfo {
                name: t.name.clone(),
                dims: t.dims.clone(),
                ty: t.ty,
                offset,
                n_elements: t.n_elements,
                n_bytes: t.n_bytes,
            })
            .collect();
        Ok(GgufLayout {
            alignment,
            data_offset,
            file_len,
            tensors,
        })
    }

    fn header_bytes_len(&self) -> u64 {
        let mut n = 4 + 4 + 8 + 8;
        for (k, v) in &self.metadata {
            n += 8 + k.len() as u64 + 4 + value_len(v);
        }
        for t in &self.tensors {
            n += 8 + t.name.len() as u64 + 4 + 8 * t.dims.len() as u64 + 4 + 8;
        }
        n
    }

    fn header_bytes(&self, layout: &GgufLayout) -> Vec<u8> {
        let mut b = Vec::with_capacity(layout.data_offset as usize);
        b.extend_from_slice(&GGUF_MAGIC);
        b.extend_from_slice(&GGUF_VERSION.to_le_bytes());
        b.extend_from_slice(&(self.tensors.len() as u64).to_le_bytes());
        b.extend_from_slice(&(self.metadata.len() as u64).to_le_bytes());
        for (k, v) in &self.metadata {
            put_str(&mut b, k);
            b.extend_from_slice(&v.meta_type().id().to_le_bytes());
            put_value(&mut b, v);
        }
        for t in &layout.tensors {
            put_str(&mut b, &t.name);
            b.extend_from_slice(&(t.dims.len() as u32).to_le_bytes());
            for d in &t.dims {
                b.extend_from_slice(&d.to_le_bytes());
            }
            b.extend_from_slice(&t.ty.id().to_le_bytes());
            b.extend_from_slice(&t.offset.to_le_bytes());
        }
        // `plan` sized the header with `header_bytes_len`; both must describe the same bytes.
        debug_assert_eq!(b.len() as u64, self.header_bytes_len());
        b.resize(layout.data_offset as usize, 0);
        b
    }

    /// Creates `PATH.tmp`, writes the header and every tensor given as bytes or producer, and
    /// returns the open file for the deferred tensors. Call [`PlannedFile::finish`] to rename
    /// it to `path`; dropping it unfinished deletes the temporary file.
    pub fn create(self, path: impl AsRef<Path>) -> Result<PlannedFile, GgufError> {
        let layout = self.plan()?;
        let header = self.header_bytes(&layout);
        let final_path = path.as_ref().to_path_buf();
        let mut tmp: OsString = final_path.as_os_str().to_owned();
        tmp.push(".tmp");
        let tmp_path = PathBuf::from(tmp);
        let file = File::create(&tmp_path).map_err(|e| GgufError::io(&tmp_path, e))?;
        let out = PlannedFile {
            file,
            tmp_path,
            final_path,
            written: layout.tensors.iter().map(|_| AtomicU64::new(0)).collect(),
            deferred: self
                .tensors
                .iter()
                .map(|t| matches!(t.source, Source::Deferred))
                .collect(),
            index: self.tensor_index.clone(),
            layout,
            finished: false,
        };
        out.file
            .set_len(out.layout.file_len)
            .map_err(|e| GgufError::io(&out.tmp_path, e))?;
        out.write_at(&header, 0)?;
        for (i, t) in self.tensors.into_iter().enumerate() {
            let bytes = match t.source {
                Source::Bytes(b) => b,
                Source::Producer(produce) => {
                    let mut buf = vec![0u8; t.n_bytes as usize];
                    produce(&mut buf).map_err(|e| GgufError::Producer {
                        tensor: t.name.clone(),
                        message: e.to_string(),
                    })?;
                    buf
                }
                Source::Deferred | Source::Alias(_) => continue,
            };
            out.write_at(
                &bytes,
                out.layout.data_offset + out.layout.tensors[i].offset,
            )?;
            out.written[i].store(t.n_bytes, Ordering::Relaxed);
        }
        Ok(out)
    }

    /// Writes the whole file (no deferred tensors allowed) and returns its layout.
    pub fn write_to_path(self, path: impl AsRef<Path>) -> Result<GgufLayout, GgufError> {
        self.create(path)?.finish()
    }
}

fn overflow() -> GgufError {
    GgufError::InvalidInput {
        name: "file".to_string(),
        reason: "layout size overflows u64".to_string(),
    }
}

/// An output file whose header is written and whose deferred tensors the caller fills.
/// `write_tensor` takes `&self`, so threads can fill different tensors at once.
pub struct PlannedFile {
    file: File,
    tmp_path: PathBuf,
    final_path: PathBuf,
    layout: GgufLayout,
    index: HashMap<String, usize>,
    deferred: Vec<bool>,
    /// Bytes written so far, per tensor.
    written: Vec<AtomicU64>,
    finished: bool,
}

impl PlannedFile {
    /// The layout (offsets of every tensor).
    pub fn layout(&self) -> &GgufLayout {
        &self.layout
    }

    fn write_at(&self, bytes: &[u8], offset: u64) -> Result<(), GgufError> {
        self.file
            .write_all_at(bytes, offset)
            .map_err(|e| GgufError::io(&self.tmp_path, e))
    }

    /// Writes the whole data of deferred tensor `name`.
    pub fn write_tensor(&self, name: &str, data: &[u8]) -> Result<(), GgufError> {
        let n = self.deferred_tensor(name)?.n_bytes;
        if data.len() as u64 != n {
            return Err(GgufError::InvalidInput {
                name: name.to_string(),
                reason: format!("{} bytes given, the tensor has {n}", data.len()),
            });
        }
        self.write_tensor_part(name, 0, data)
    }

    /// Writes `data` at byte `start` of deferred tensor `name` (for tensors produced in
    /// pieces). Every byte of every deferred tensor must be written exactly once before
    /// [`PlannedFile::finish`].
    pub fn write_tensor_part(&self, name: &str, start: u64, data: &[u8]) -> Result<(), GgufError> {
        let t = self.deferred_tensor(name)?;
        let end = start.checked_add(data.len() as u64);
        if end.is_none_or(|end| end > t.n_bytes) {
            return Err(GgufError::InvalidInput {
                name: name.to_string(),
                reason: format!(
                    "{} bytes at {start} exceed the tensor's {} bytes",
                    data.len(),
                    t.n_bytes
                ),
            });
        }
        self.write_at(data, self.layout.data_offset + t.offset + start)?;
        let i = self.index[name];
        self.written[i].fetch_add(data.len() as u64, Ordering::Relaxed);
        Ok(())
    }

    fn deferred_tensor(&self, name: &str) -> Result<&TensorInfo, GgufError> {
        match self.index.get(name) {
            Some(&i) if self.deferred[i] => Ok(&self.layout.tensors[i]),
            Some(_) => Err(GgufError::InvalidInput {
                name: name.to_string(),
                reason: "not a deferred tensor (its data was given or it is an alias)".to_string(),
            }),
            None => Err(GgufError::InvalidInput {
                name: name.to_string(),
                reason: "no such tensor".to_string(),
            }),
        }
    }

    /// Checks that every deferred tensor was written, syncs the file and renames it to its
    /// final path.
    pub fn finish(mut self) -> Result<GgufLayout, GgufError> {
        for (i, t) in self.layout.tensors.iter().enumerate() {
            let w = self.written[i].load(Ordering::Relaxed);
            if self.deferred[i] && w != t.n_bytes {
                return Err(GgufError::InvalidInput {
                    name: t.name.clone(),
                    reason: format!("{w} of its {} bytes were written", t.n_bytes),
                });
            }
        }
        self.file
            .sync_all()
            .map_err(|e| GgufError::io(&self.tmp_path, e))?;
        std::fs::rename(&self.tmp_path, &self.final_path)
            .map_err(|e| GgufError::io(&self.final_path, e))?;
        self.finished = true;
        // Make the rename durable; failure here does not lose data already synced.
        if let Some(dir) = self.final_path.parent() {
            let dir = if dir.as_os_str().is_empty() {
                Path::new(".")
            } else {
                dir
            };
            if let Ok(d) = File::open(dir) {
                let _ = d.sync_all();
            }
        }
        Ok(std::mem::take(&mut self.layout))
    }
}

impl Drop for PlannedFile {
    fn drop(&mut self) {
        if !self.finished {
            // Best effort: never leave a partial file behind.
            let _ = std::fs::remove_file(&self.tmp_path);
        }
    }
}

/// Nesting depth of an array (1 for an array of scalars).
fn array_depth(a: &MetaArray) -> usize {
    match a {
        MetaArray::Array(v) => 1 + v.iter().map(array_depth).max().unwrap_or(0),
        _ => 1,
    }
}

fn put_str(b: &mut Vec<u8>, s: &str) {
    b.extend_from_slice(&(s.len() as u64).to_le_bytes());
    b.extend_from_slice(s.as_bytes());
}

/// Encoded size of a value (without its type id).
fn value_len(v: &MetaValue) -> u64 {
    match v {
        MetaValue::String(s) => 8 + s.len() as u64,
        MetaValue::Array(a) => array_len(a),
        v => v.meta_type().min_encoded_len(),
    }
}

/// Encoded size of an array: element type, count, elements.
fn array_len(a: &MetaArray) -> u64 {
    let body = match a {
        MetaArray::String(v) => v.iter().map(|s| 8 + s.len() as u64).sum(),
        MetaArray::Array(v) => v.iter().map(array_len).sum(),
        a => a.len() as u64 * a.elem_type().min_encoded_len(),
    };
    12 + body
}

fn put_value(b: &mut Vec<u8>, v: &MetaValue) {
    match v {
        MetaValue::U8(x) => b.push(*x),
        MetaValue::I8(x) => b.extend_from_slice(&x.to_le_bytes()),
        MetaValue::U16(x) => b.extend_from_slice(&x.to_le_bytes()),
        MetaValue::I16(x) => b.extend_from_slice(&x.to_le_bytes()),
        MetaValue::U32(x) => b.extend_from_slice(&x.to_le_bytes()),
        MetaValue::I32(x) => b.extend_from_slice(&x.to_le_bytes()),
        MetaValue::F32(x) => b.extend_from_slice(&x.to_le_bytes()),
        MetaValue::Bool(x) => b.push(u8::from(*x)),
        MetaValue::String(s) => put_str(b, s),
        MetaValue::Array(a) => put_array(b, a),
        MetaValue::U64(x) => b.extend_from_slice(&x.to_le_bytes()),
        MetaValue::I64(x) => b.extend_from_slice(&x.to_le_bytes()),
        MetaValue::F64(x) => b.extend_from_slice(&x.to_le_bytes()),
    }
}

fn put_array(b: &mut Vec<u8>, a: &MetaArray) {
    b.extend_from_slice(&a.elem_type().id().to_le_bytes());
    b.extend_from_slice(&(a.len() as u64).to_le_bytes());
    macro_rules! le {
        ($v:expr) => {
            for x in $v {
                b.extend_from_slice(&x.to_le_bytes());
            }
        };
    }
    match a {
        MetaArray::U8(v) => b.extend_from_slice(v),
        MetaArray::I8(v) => le!(v),
        MetaArray::U16(v) => le!(v),
        MetaArray::I16(v) => le!(v),
        MetaArray::U32(v) => le!(v),
        MetaArray::I32(v) => le!(v),
        MetaArray::F32(v) => le!(v),
        MetaArray::Bool(v) => b.extend(v.iter().map(|&x| u8::from(x))),
        MetaArray::String(v) => v.iter().for_each(|s| put_str(b, s)),
        MetaArray::Array(v) => v.iter().for_each(|x| put_array(b, x)),
        MetaArray::U64(v) => le!(v),
        MetaArray::I64(v) => le!(v),
        MetaArray::F64(v) => le!(v),
    }
}
