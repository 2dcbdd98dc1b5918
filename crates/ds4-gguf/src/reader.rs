//! The GGUF v3 reader: parses the header, metadata and tensor infos of a file mapped read-only
//! (or held in memory) and hands out tensor bytes as slices of the mapping, never copied.
//!
//! Every count, length and offset read from the file is checked against the bytes that remain
//! before anything is allocated, so a damaged or hostile file gives a [`GgufError`] naming the
//! offset, key or tensor at fault, never a panic or a huge allocation.

use std::collections::HashMap;
use std::fs::File;
use std::path::{Path, PathBuf};

use memmap2::Mmap;

use crate::error::GgufError;
use crate::metadata::{MetaArray, MetaType, MetaValue};
use crate::types::GgmlType;

/// The magic bytes at offset 0.
pub const GGUF_MAGIC: [u8; 4] = *b"GGUF";
/// The only GGUF version read and written.
pub const GGUF_VERSION: u32 = 3;
/// The data alignment when `general.alignment` is absent.
pub const DEFAULT_ALIGNMENT: u32 = 32;
/// The metadata key that sets the data alignment.
pub const ALIGNMENT_KEY: &str = "general.alignment";
/// The most dimensions a tensor may have (ds4 accepts 1..=8; ggml itself uses at most 4).
pub const MAX_DIMS: usize = 8;
/// Arrays of arrays deeper than this are rejected (bounds recursion on hostile input).
pub const MAX_ARRAY_NESTING: usize = 16;

/// Fewest bytes one tensor info occupies: name length, ndim, one dim, type, offset.
const MIN_TENSOR_INFO_LEN: u64 = 8 + 4 + 8 + 4 + 8;
/// Fewest bytes one metadata pair occupies: key length, value type, a one-byte value.
const MIN_KV_LEN: u64 = 8 + 4 + 1;

/// One tensor's description from the file's tensor info table.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TensorInfo {
    pub name: String,
    /// Dimensions, dim0 first: dim0 is the contiguous row length.
    pub dims: Vec<u64>,
    pub ty: GgmlType,
    /// Byte offset of the data relative to the start of the data section.
    pub offset: u64,
    /// Product of the dimensions.
    pub n_elements: u64,
    /// Bytes of data: rows × row bytes.
    pub n_bytes: u64,
}

impl TensorInfo {
    /// Elements per row (dim0).
    pub fn row_len(&self) -> u64 {
        self.dims.first().copied().unwrap_or(1)
    }

    /// Number of rows: the product of every dimension after dim0.
    pub fn rows(&self) -> u64 {
        // Never overflows for validated infos; saturating so a hand-built info cannot panic.
        self.dims
            .iter()
            .skip(1)
            .fold(1u64, |acc, &d| acc.saturating_mul(d))
    }

    /// Bytes per row (validated when the info was read or built).
    pub fn row_bytes(&self) -> u64 {
        self.ty.row_bytes(self.row_len()).unwrap_or(0)
    }
}

/// Bytes behind a [`GgufFile`]: a read-only mapping or an owned, 64-byte aligned copy.
enum Storage {
    Mapped(Mmap),
    Owned {
        blocks: Vec<AlignedBlock>,
        len: usize,
    },
}

/// A 64-byte aligned chunk, so owned storage gives tensor data the same alignment guarantees
/// (for casting to f32/f16 slices) as a page-aligned mapping.
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
#[repr(C, align(64))]
struct AlignedBlock([u8; 64]);

impl Storage {
    fn bytes(&self) -> &[u8] {
        match self {
            Storage::Mapped(m) => m,
            Storage::Owned { blocks, len } => {
                let all: &[u8] = bytemuck::cast_slice(blocks);
                // `len` never exceeds the blocks' total size (set in `from_bytes`).
                all.get(..*len).unwrap_or(all)
            }
        }
    }
}

/// A parsed GGUF v3 file.
///
/// Tensor data is aligned in memory to at least `min(alignment, 64)` bytes (the mapping is
/// page-aligned and owned storage is 64-byte aligned), so `bytemuck::cast_slice` of F32/F16
/// tensor bytes succeeds for every valid file.
pub struct GgufFile {
    storage: Storage,
    path: Option<PathBuf>,
    metadata: Vec<(String, MetaValue)>,
    key_index: HashMap<String, usize>,
    tensors: Vec<TensorInfo>,
    tensor_index: HashMap<String, usize>,
    alignment: u32,
    data_offset: u64,
}

// A parsed file is shared across threads (Arc<GgufFile>) by the backends and the server.
const _: () = {
    const fn assert_send_sync<T: Send + Sync>() {}
    assert_send_sync::<GgufFile>();
};

impl std::fmt::Debug for GgufFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GgufFile")
            .field("path", &self.path)
            .field("file_len", &self.file_len())
            .field("n_metadata", &self.metadata.len())
            .field("n_tensors", &self.tensors.len())
            .field("alignment", &self.alignment)
            .field("data_offset", &self.data_offset)
            .finish()
    }
}

impl GgufFile {
    /// Maps `path` read-only and parses it.
    ///
    /// The file must not be truncated or modified by another process while this `GgufFile`
    /// exists: the mapping is read without copying, and shrinking a mapped file makes later
    /// reads of the lost pages fault (SIGBUS). This is the usual contract of mmap-based model
    /// loaders (ds4, llama.cpp).
    pub fn open(path: impl AsRef<Path>) -> Result<GgufFile, GgufError> {
        let path = path.as_ref();
        let file = File::open(path).map_err(|e| GgufError::io(path, e))?;
        let len = file.metadata().map_err(|e| GgufError::io(path, e))?.len();
        if len == 0 {
            // Mapping an empty file fails on some platforms; report it as what it is.
            return Err(GgufError::Truncated {
                what: format!("magic of {}", path.display()),
                offset: 0,
                needed: 4,
                available: 0,
            });
        }
        // SAFETY: the mapping is read-only and private to this process. Its contents are
        // only valid while nobody truncates or rewrites the file; that is the documented
        // contract of `open` (model files are not modified while in use). All parsing below
        // treats the bytes as untrusted and bounds-checks every access.
        let map = unsafe { Mmap::map(&file) }.map_err(|e| GgufError::io(path, e))?;
        let mut parsed = GgufFile::parse(Storage::Mapped(map))?;
        parsed.path = Some(path.to_path_buf());
        Ok(parsed)
    }

    /// Parses a GGUF file held in memory (the bytes are copied into 64-byte aligned storage).
    pub fn from_bytes(bytes: Vec<u8>) -> Result<GgufFile, GgufError> {
        let len = bytes.len();
        let mut blocks = vec![AlignedBlock([0; 64]); len.div_ceil(64)];
        let dst: &mut [u8] = bytemuck::cast_slice_mut(&mut blocks);
        dst[..len].copy_from_slice(&bytes);
        GgufFile::parse(Storage::Owned { blocks, len })
    }

    fn parse(storage: Storage) -> Result<GgufFile, GgufError> {
        let p = parse_layout(storage.bytes())?;
        Ok(GgufFile {
            storage,
            path: None,
            metadata: p.metadata,
            key_index: p.key_index,
            tensors: p.tensors,
            tensor_index: p.tensor_index,
            alignment: p.alignment,
            data_offset: p.data_offset,
        })
    }

    /// The path given to [`GgufFile::open`] (None for [`GgufFile::from_bytes`]).
    pub fn path(&self) -> Option<&Path> {
        self.path.as_deref()
    }

    /// Total file size in bytes.
    pub fn file_len(&self) -> u64 {
        self.storage.bytes().len() as u64
    }

    /// The whole file's bytes.
    pub fn bytes(&self) -> &[u8] {
        self.storage.bytes()
    }

    /// Absolute offset of the data section.
    pub fn data_offset(&self) -> u64 {
        self.data_offset
    }

    /// The data alignment (`general.alignment`, default 32).
    pub fn alignment(&self) -> u32 {
        self.alignment
    }

    /// All metadata pairs in file order.
    pub fn metadata(&self) -> &[(String, MetaValue)] {
        &self.metadata
    }

    /// The value of a metadata key.
    pub fn get(&self, key: &str) -> Option<&MetaValue> {
        self.key_index.get(key).map(|&i| &self.metadata[i].1)
    }

    /// All tensor infos in file order.
    pub fn tensors(&self) -> &[TensorInfo] {
        &self.tensors
    }

    /// The info of the tensor called `name`.
    pub fn tensor(&self, name: &str) -> Option<&TensorInfo> {
        self.tensor_index.get(name).map(|&i| &self.tensors[i])
    }

    /// The data of a tensor of this file (a slice of the mapping).
    ///
    /// Infos of this file always lie inside it; for an info from another file whose range
    /// does not fit, the result is empty.
    pub fn tensor_bytes(&self, t: &TensorInfo) -> &[u8] {
        let range = self
            .data_offset
            .checked_add(t.offset)
            .and_then(|start| Some(start..start.checked_add(t.n_bytes)?))
            .and_then(|r| Some(usize::try_from(r.start).ok()?..usize::try_from(r.end).ok()?));
        range
            .and_then(|r| self.storage.bytes().get(r))
            .unwrap_or(&[])
    }

    /// The data of the tensor called `name`.
    pub fn tensor_data(&self, name: &str) -> Option<&[u8]> {
        self.tensor(name).map(|t| self.tensor_bytes(t))
    }

    fn require(&self, key: &str) -> Result<&MetaValue, GgufError> {
        self.get(key).ok_or_else(|| GgufError::MissingKey {
            key: key.to_string(),
        })
    }

    fn integer(&self, key: &str, expected: &'static str) -> Result<i128, GgufError> {
        let v = self.require(key)?;
        v.as_i128().ok_or_else(|| wrong_type(key, expected, v))
    }

    /// An integer key of any integer type whose value fits in u32.
    pub fn get_u32(&self, key: &str) -> Result<u32, GgufError> {
        let x = self.integer(key, "an integer")?;
        u32::try_from(x).map_err(|_| out_of_range(key, x, "u32"))
    }

    /// An integer key of any integer type whose value fits in u64.
    pub fn get_u64(&self, key: &str) -> Result<u64, GgufError> {
        let x = self.integer(key, "an integer")?;
        u64::try_from(x).map_err(|_| out_of_range(key, x, "u64"))
    }

    /// An integer key of any integer type whose value fits in i64.
    pub fn get_i64(&self, key: &str) -> Result<i64, GgufError> {
        let x = self.integer(key, "an integer")?;
        i64::try_from(x).map_err(|_| out_of_range(key, x, "i64"))
    }

    /// A float key (f32 or f64) or an integer key, as f32.
    pub fn get_f32(&self, key: &str) -> Result<f32, GgufError> {
        self.get_f64(key).map(|x| x as f32)
    }

    /// A float key (f32 or f64) or an integer key, as f64.
    pub fn get_f64(&self, key: &str) -> Result<f64, GgufError> {
        let v = self.require(key)?;
        v.as_f64().ok_or_else(|| wrong_type(key, "a number", v))
    }

    pub fn get_bool(&self, key: &str) -> Result<bool, GgufError> {
        let v = self.require(key)?;
        v.as_bool().ok_or_else(|| wrong_type(key, "BOOL", v))
    }

    pub fn get_str(&self, key: &str) -> Result<&str, GgufError> {
        let v = self.require(key)?;
        v.as_str().ok_or_else(|| wrong_type(key, "STRING", v))
    }

    pub fn get_string_array(&self, key: &str) -> Result<&[String], GgufError> {
        let v = self.require(key)?;
        v.as_string_array()
            .ok_or_else(|| wrong_type(key, "ARRAY[STRING]", v))
    }

    /// An array of any integer type whose elements all fit in u32.
    pub fn get_u32_array(&self, key: &str) -> Result<Vec<u32>, GgufError> {
        let a = self.int_array(key)?;
        a.to_u32_vec()
            .ok_or_else(|| array_out_of_range(key, a, "u32"))
    }

    /// An array of any integer type whose elements all fit in i64.
    pub fn get_i64_array(&self, key: &str) -> Result<Vec<i64>, GgufError> {
        let a = self.int_array(key)?;
        a.to_i64_vec()
            .ok_or_else(|| array_out_of_range(key, a, "i64"))
    }

    /// An array of f32, f64 or integers, as f32.
    pub fn get_f32_array(&self, key: &str) -> Result<Vec<f32>, GgufError> {
        let v = self.require(key)?;
        v.as_f32_array()
            .ok_or_else(|| wrong_type(key, "an array of numbers", v))
    }

    fn int_array(&self, key: &str) -> Result<&MetaArray, GgufError> {
        let v = self.require(key)?;
        match v.as_array() {
            Some(a) if a.elem_type().is_integer() => Ok(a),
            _ => Err(wrong_type(key, "an array of integers", v)),
        }
    }
}

fn wrong_type(key: &str, expected: &'static str, found: &MetaValue) -> GgufError {
    GgufError::WrongType {
        key: key.to_string(),
        expected,
        found: found.type_description(),
    }
}

fn out_of_range(key: &str, value: i128, target: &'static str) -> GgufError {
    GgufError::ValueOutOfRange {
        key: key.to_string(),
        value: value.to_string(),
        target,
    }
}

fn array_out_of_range(key: &str, a: &MetaArray, target: &'static str) -> GgufError {
    GgufError::ValueOutOfRange {
        key: key.to_string(),
        value: format!(
            "an element of the {}-element {} array",
            a.len(),
            a.elem_type()
        ),
        target,
    }
}

/// The parsed header, metadata and tensor table of a file.
struct Layout {
    metadata: Vec<(String, MetaValue)>,
    key_index: HashMap<String, usize>,
    tensors: Vec<TensorInfo>,
    tensor_index: HashMap<String, usize>,
    alignment: u32,
    data_offset: u64,
}

/// A bounds-checked reader over untrusted bytes.
struct Cursor<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Cursor<'a> {
    fn offset(&self) -> u64 {
        self.pos as u64
    }

    fn remaining(&self) -> u64 {
        (self.buf.len() - self.pos.min(self.buf.len())) as u64
    }

    /// Takes `n` bytes; `what` names the field for the error message.
    fn take(&mut self, n: u64, what: impl FnOnce() -> String) -> Result<&'a [u8], GgufError> {
        let avail = self.remaining();
        if n > avail {
            return Err(GgufError::Truncated {
                what: what(),
                offset: self.offset(),
                needed: n,
                available: avail,
            });
        }
        // n <= remaining, so both conversions and the slice are in range.
        let n = n as usize;
        let s = &self.buf[self.pos..self.pos + n];
        self.pos += n;
        Ok(s)
    }

    fn array<const N: usize>(
        &mut self,
        what: impl FnOnce() -> String,
    ) -> Result<[u8; N], GgufError> {
        let s = self.take(N as u64, what)?;
        let mut a = [0u8; N];
        a.copy_from_slice(s);
        Ok(a)
    }

    fn u32(&mut self, what: impl FnOnce() -> String) -> Result<u32, GgufError> {
        self.array::<4>(what).map(u32::from_le_bytes)
    }

    fn u64(&mut self, what: impl FnOnce() -> String) -> Result<u64, GgufError> {
        self.array::<8>(what).map(u64::from_le_bytes)
    }

    /// A GGUF string: u64 length, then that many UTF-8 bytes.
    fn string(&mut self, what: impl Fn() -> String) -> Result<String, GgufError> {
        let at = self.offset();
        let len = self.u64(|| format!("length of {}", what()))?;
        if len > self.remaining() {
            return Err(GgufError::StringTooLong {
                what: what(),
                offset: at,
                len,
                available: self.remaining(),
            });
        }
        let bytes_at = self.offset();
        let bytes = self.take(len, &what)?;
        match std::str::from_utf8(bytes) {
            Ok(s) => Ok(s.to_string()),
            Err(source) => Err(GgufError::InvalidUtf8 {
                what: what(),
                offset: bytes_at,
                source,
            }),
        }
    }

    /// Reads a count and checks that `count` items of at least `min_len` bytes each fit in the
    /// remaining bytes, so the caller may preallocate `count` entries.
    fn count(&mut self, min_len: u64, what: impl Fn() -> String) -> Result<usize, GgufError> {
        let at = self.offset();
        let count = self.u64(&what)?;
        let available = self.remaining();
        let max = available / min_len.max(1);
        if count > max {
            return Err(GgufError::CountTooLarge {
                what: what(),
                offset: at,
                count,
                available,
                max,
            });
        }
        // count <= available <= usize::MAX.
        Ok(count as usize)
    }
}

fn parse_layout(buf: &[u8]) -> Result<Layout, GgufError> {
    let mut c = Cursor { buf, pos: 0 };
    let magic = c.array::<4>(|| "magic".to_string())?;
    if magic != GGUF_MAGIC {
        return Err(GgufError::BadMagic { found: magic });
    }
    let version = c.u32(|| "version".to_string())?;
    if version != GGUF_VERSION {
        return Err(GgufError::UnsupportedVersion { version });
    }
    let n_tensors = c.u64(|| "tensor count".to_string())?;
    let n_kv = c.u64(|| "metadata count".to_string())?;

    // Both tables follow; each entry needs a minimum number of bytes.
    let available = c.remaining();
    let kv_max = available / MIN_KV_LEN;
    if n_kv > kv_max {
        return Err(GgufError::CountTooLarge {
            what: "metadata count".to_string(),
            offset: 16,
            count: n_kv,
            available,
            max: kv_max,
        });
    }
    let tensor_max = available / MIN_TENSOR_INFO_LEN;
    if n_tensors > tensor_max {
        return Err(GgufError::CountTooLarge {
            what: "tensor count".to_string(),
            offset: 8,
            count: n_tensors,
            available,
            max: tensor_max,
        });
    }

    let n_kv = n_kv as usize;
    let mut metadata = Vec::with_capacity(n_kv);
    let mut key_index = HashMap::with_capacity(n_kv);
    for i in 0..n_kv {
        let key_at = c.offset();
        let key = c.string(|| format!("key of metadata pair #{i}"))?;
        let type_at = c.offset();
        let type_id = c.u32(|| format!("value type of metadata key `{key}`"))?;
        let ty = MetaType::from_id(type_id).ok_or_else(|| GgufError::UnknownValueType {
            key: key.clone(),
            type_id,
            offset: type_at,
        })?;
        let value = read_value(&mut c, ty, &key)?;
        if key_index.insert(key.clone(), metadata.len()).is_some() {
            return Err(GgufError::DuplicateKey {
                key,
                offset: key_at,
            });
        }
        metadata.push((key, value));
    }

    let alignment = match key_index.get(ALIGNMENT_KEY).map(|&i| &metadata[i].1) {
        None => DEFAULT_ALIGNMENT,
        Some(MetaValue::U32(a)) if a.is_power_of_two() => *a,
        Some(MetaValue::U32(a)) => {
            return Err(GgufError::BadAlignment {
                reason: format!("{a} is not a power of two"),
            })
        }
        Some(v) => {
            return Err(GgufError::BadAlignment {
                reason: format!("type is {}, expected UINT32", v.type_description()),
            })
        }
    };

    let n_tensors = n_tensors as usize;
    let mut tensors = Vec::with_capacity(n_tensors);
    let mut tensor_index = HashMap::with_capacity(tensors.capacity());
    for i in 0..n_tensors {
        let t = read_tensor_info(&mut c, i)?;
        if tensor_index.insert(t.name.clone(), tensors.len()).is_some() {
            return Err(GgufError::DuplicateTensor { tensor: t.name });
        }
        tensors.push(t);
    }

    let file_len = buf.len() as u64;
    let data_offset = align_up(c.offset(), alignment).ok_or_else(|| GgufError::BadAlignment {
        reason: format!("aligning offset {} to {alignment} overflows", c.offset()),
    })?;
    check_tensor_ranges(&tensors, data_offset, alignment, file_len)?;

    Ok(Layout {
        metadata,
        key_index,
        tensors,
        tensor_index,
        alignment,
        data_offset,
    })
}

/// Rounds `x` up to a multiple of `align` (a power of two), None on overflow.
pub fn align_up(x: u64, align: u32) -> Option<u64> {
    let a = u64::from(align.max(1));
    Some(x.checked_add(a - 1)? / a * a)
}

fn read_value(c: &mut Cursor<'_>, ty: MetaType, key: &str) -> Result<MetaValue, GgufError> {
    let what = || format!("value of metadata key `{key}`");
    Ok(match ty {
        MetaType::U8 => MetaValue::U8(c.array::<1>(what)?[0]),
        MetaType::I8 => MetaValue::I8(i8::from_le_bytes(c.array::<1>(what)?)),
        MetaType::U16 => MetaValue::U16(u16::from_le_bytes(c.array::<2>(what)?)),
        MetaType::I16 => MetaValue::I16(i16::from_le_bytes(c.array::<2>(what)?)),
        MetaType::U32 => MetaValue::U32(c.u32(what)?),
        MetaType::I32 => MetaValue::I32(i32::from_le_bytes(c.array::<4>(what)?)),
        MetaType::F32 => MetaValue::F32(f32::from_le_bytes(c.array::<4>(what)?)),
        MetaType::U64 => MetaValue::U64(c.u64(what)?),
        MetaType::I64 => MetaValue::I64(i64::from_le_bytes(c.array::<8>(what)?)),
        MetaType::F64 => MetaValue::F64(f64::from_le_bytes(c.array::<8>(what)?)),
        MetaType::Bool => {
            let at = c.offset();
            let b = c.array::<1>(what)?[0];
            MetaValue::Bool(to_bool(b, key, at)?)
        }
        MetaType::String => MetaValue::String(c.string(what)?),
        MetaType::Array => MetaValue::Array(read_array(c, key, 1)?),
    })
}

fn to_bool(b: u8, key: &str, offset: u64) -> Result<bool, GgufError> {
    match b {
        0 => Ok(false),
        1 => Ok(true),
        value => Err(GgufError::InvalidBool {
            key: key.to_string(),
            offset,
            value,
        }),
    }
}

/// Splits `n * N` bytes into `n` little-endian values.
fn fixed<const N: usize, T>(
    c: &mut Cursor<'_>,
    n: usize,
    key: &str,
    conv: impl Fn([u8; N]) -> T,
) -> Result<Vec<T>, GgufError> {
    // `n` was bounded by `count` to remaining / N, so this cannot overflow.
    let bytes = c.take((n as u64) * N as u64, || {
        format!("array elements of metadata key `{key}`")
    })?;
    Ok(bytes
        .chunks_exact(N)
        .map(|ch| {
            let mut a = [0u8; N];
            a.copy_from_slice(ch);
            conv(a)
        })
        .collect())
}

fn read_array(c: &mut Cursor<'_>, key: &str, depth: usize) -> Result<MetaArray, GgufError> {
    let type_at = c.offset();
    if depth > MAX_ARRAY_NESTING {
        return Err(GgufError::NestingTooDeep {
            key: key.to_string(),
            offset: type_at,
            max_depth: MAX_ARRAY_NESTING,
        });
    }
    let type_id = c.u32(|| format!("array element type of metadata key `{key}`"))?;
    let ty = MetaType::from_id(type_id).ok_or_else(|| GgufError::UnknownValueType {
        key: key.to_string(),
        type_id,
        offset: type_at,
    })?;
    let n = c.count(ty.min_encoded_len(), || {
        format!("array length of metadata key `{key}`")
    })?;
    Ok(match ty {
        MetaType::U8 => MetaArray::U8(fixed(c, n, key, |a: [u8; 1]| a[0])?),
        MetaType::I8 => MetaArray::I8(fixed(c, n, key, i8::from_le_bytes)?),
        MetaType::U16 => MetaArray::U16(fixed(c, n, key, u16::from_le_bytes)?),
        MetaType::I16 => MetaArray::I16(fixed(c, n, key, i16::from_le_bytes)?),
        MetaType::U32 => MetaArray::U32(fixed(c, n, key, u32::from_le_bytes)?),
        MetaType::I32 => MetaArray::I32(fixed(c, n, key, i32::from_le_bytes)?),
        MetaType::F32 => MetaArray::F32(fixed(c, n, key, f32::from_le_bytes)?),
        MetaType::U64 => MetaArray::U64(fixed(c, n, key, u64::from_le_bytes)?),
        MetaType::I64 => MetaArray::I64(fixed(c, n, key, i64::from_le_bytes)?),
        MetaType::F64 => MetaArray::F64(fixed(c, n, key, f64::from_le_bytes)?),
        MetaType::Bool => {
            let at = c.offset();
            let raw = fixed(c, n, key, |a: [u8; 1]| a[0])?;
            let mut v = Vec::with_capacity(n);
            for (i, &b) in raw.iter().enumerate() {
                v.push(to_bool(b, key, at + i as u64)?);
            }
            MetaArray::Bool(v)
        }
        MetaType::String => {
            let mut v = Vec::with_capacity(n);
            for i in 0..n {
                v.push(c.string(|| format!("element #{i} of metadata key `{key}`"))?);
            }
            MetaArray::String(v)
        }
        MetaType::Array => {
            let mut v = Vec::with_capacity(n);
            for _ in 0..n {
                v.push(read_array(c, key, depth + 1)?);
            }
            MetaArray::Array(v)
        }
    })
}

/// Element count and byte size of a tensor of type `ty` and shape `dims`, validated: every
/// dimension fits in i64 (ggml's type), dim0 is a whole number of blocks, nothing overflows.
pub fn tensor_size(name: &str, ty: GgmlType, dims: &[u64]) -> Result<(u64, u64), GgufError> {
    let overflow = || GgufError::DimsOverflow {
        tensor: name.to_string(),
        dims: dims.to_vec(),
    };
    let mut n_elements: u64 = 1;
    for &d in dims {
        if d > i64::MAX as u64 {
            return Err(overflow());
        }
        n_elements = n_elements.checked_mul(d).ok_or_else(overflow)?;
    }
    if n_elements > i64::MAX as u64 {
        return Err(overflow());
    }
    let row_len = dims.first().copied().unwrap_or(1);
    let block_elems = ty.block_elems() as u64;
    if !row_len.is_multiple_of(block_elems) {
        return Err(GgufError::PartialBlock {
            tensor: name.to_string(),
            ty,
            row_len,
            block_elems,
        });
    }
    let row_bytes = ty.row_bytes(row_len).ok_or_else(overflow)?;
    // Checked separately: with dim0 = 0 the element count is 0 whatever the other dims are.
    let rows = dims
        .iter()
        .skip(1)
        .try_fold(1u64, |acc, &d| acc.checked_mul(d))
        .ok_or_else(overflow)?;
    let n_bytes = row_bytes.checked_mul(rows).ok_or_else(overflow)?;
    Ok((n_elements, n_bytes))
}

fn read_tensor_info(c: &mut Cursor<'_>, i: usize) -> Result<TensorInfo, GgufError> {
    let name = c.string(|| format!("name of tensor #{i}"))?;
    let ndim_at = c.offset();
    let ndim = c.u32(|| format!("dimension count of tensor `{name}`"))?;
    if ndim == 0 || ndim as usize > MAX_DIMS {
        return Err(GgufError::BadNdim {
            tensor: name,
            ndim,
            offset: ndim_at,
        });
    }
    let mut dims = Vec::with_capacity(ndim as usize);
    for d in 0..ndim {
        dims.push(c.u64(|| format!("dimension {d} of tensor `{name}`"))?);
    }
    let type_at = c.offset();
    let type_id = c.u32(|| format!("type of tensor `{name}`"))?;
    let offset = c.u64(|| format!("data offset of tensor `{name}`"))?;
    let ty = GgmlType::from_id(type_id).ok_or_else(|| GgufError::UnknownTensorType {
        tensor: name.clone(),
        type_id,
        offset: type_at,
    })?;
    let (n_elements, n_bytes) = tensor_size(&name, ty, &dims)?;
    Ok(TensorInfo {
        name,
        dims,
        ty,
        offset,
        n_elements,
        n_bytes,
    })
}

/// Checks that every tensor's data is aligned, inside the file, and either disjoint from or
/// identical to every other tensor's range (identical ranges are aliases).
fn check_tensor_ranges(
    tensors: &[TensorInfo],
    data_offset: u64,
    alignment: u32,
    file_len: u64,
) -> Result<(), GgufError> {
    let mut ranges = Vec::with_capacity(tensors.len());
    for (i, t) in tensors.iter().enumerate() {
        if !t.offset.is_multiple_of(u64::from(alignment)) {
            return Err(GgufError::MisalignedOffset {
                tensor: t.name.clone(),
                offset: t.offset,
                alignment,
            });
        }
        if t.n_bytes == 0 {
            continue; // an empty tensor has no data to lie anywhere
        }
        // Saturating: an overflowing range is reported as ending at u64::MAX.
        let start = data_offset.saturating_add(t.offset);
        let end = start.saturating_add(t.n_bytes);
        if end > file_len {
            return Err(GgufError::TensorOutsideFile {
                tensor: t.name.clone(),
                start,
                end,
                file_len,
            });
        }
        ranges.push((start, end, i));
    }
    ranges.sort_unstable();
    let mut widest: Option<(u64, u64, usize)> = None;
    for r in ranges {
        if let Some(w) = widest {
            if r.0 < w.1 && (r.0, r.1) != (w.0, w.1) {
                return Err(GgufError::OverlappingTensors {
                    first: tensors[w.2].name.clone(),
                    second: tensors[r.2].name.clone(),
                });
            }
            if r.1 <= w.1 {
                continue;
            }
        }
        widest = Some(r);
    }
    Ok(())
}
