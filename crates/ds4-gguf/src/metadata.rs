//! GGUF metadata values: the 13 value types, typed arrays (so a file read and written again is
//! byte-identical, empty and nested arrays included) and lenient accessors for readers.

use std::fmt;

/// The GGUF metadata value type ids.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum MetaType {
    U8,
    I8,
    U16,
    I16,
    U32,
    I32,
    F32,
    Bool,
    String,
    Array,
    U64,
    I64,
    F64,
}

impl MetaType {
    pub const ALL: [MetaType; 13] = [
        MetaType::U8,
        MetaType::I8,
        MetaType::U16,
        MetaType::I16,
        MetaType::U32,
        MetaType::I32,
        MetaType::F32,
        MetaType::Bool,
        MetaType::String,
        MetaType::Array,
        MetaType::U64,
        MetaType::I64,
        MetaType::F64,
    ];

    /// The id stored in the file.
    pub const fn id(self) -> u32 {
        match self {
            MetaType::U8 => 0,
            MetaType::I8 => 1,
            MetaType::U16 => 2,
            MetaType::I16 => 3,
            MetaType::U32 => 4,
            MetaType::I32 => 5,
            MetaType::F32 => 6,
            MetaType::Bool => 7,
            MetaType::String => 8,
            MetaType::Array => 9,
            MetaType::U64 => 10,
            MetaType::I64 => 11,
            MetaType::F64 => 12,
        }
    }

    pub fn from_id(id: u32) -> Option<MetaType> {
        MetaType::ALL.into_iter().find(|t| t.id() == id)
    }

    /// The GGUF spec's upper-case name (`UINT32`, `STRING`, ...).
    pub const fn name(self) -> &'static str {
        match self {
            MetaType::U8 => "UINT8",
            MetaType::I8 => "INT8",
            MetaType::U16 => "UINT16",
            MetaType::I16 => "INT16",
            MetaType::U32 => "UINT32",
            MetaType::I32 => "INT32",
            MetaType::F32 => "FLOAT32",
            MetaType::Bool => "BOOL",
            MetaType::String => "STRING",
            MetaType::Array => "ARRAY",
            MetaType::U64 => "UINT64",
            MetaType::I64 => "INT64",
            MetaType::F64 => "FLOAT64",
        }
    }

    /// Whether this is one of the eight integer types.
    pub const fn is_integer(self) -> bool {
        matches!(
            self,
            MetaType::U8
                | MetaType::I8
                | MetaType::U16
                | MetaType::I16
                | MetaType::U32
                | MetaType::I32
                | MetaType::U64
                | MetaType::I64
        )
    }

    /// The fewest bytes one value of this type occupies in a file (used to bound counts
    /// before allocating).
    pub const fn min_encoded_len(self) -> u64 {
        match self {
            MetaType::U8 | MetaType::I8 | MetaType::Bool => 1,
            MetaType::U16 | MetaType::I16 => 2,
            MetaType::U32 | MetaType::I32 | MetaType::F32 => 4,
            MetaType::U64 | MetaType::I64 | MetaType::F64 => 8,
            // u64 length (+ bytes)
            MetaType::String => 8,
            // u32 element type + u64 count (+ elements)
            MetaType::Array => 12,
        }
    }
}

impl fmt::Display for MetaType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// One metadata value.
#[derive(Clone, Debug, PartialEq)]
pub enum MetaValue {
    U8(u8),
    I8(i8),
    U16(u16),
    I16(i16),
    U32(u32),
    I32(i32),
    F32(f32),
    Bool(bool),
    String(String),
    Array(MetaArray),
    U64(u64),
    I64(i64),
    F64(f64),
}

/// A typed GGUF array. The variant is the element type, so an empty array keeps its type and
/// an array of arrays keeps each inner array's own element type.
#[derive(Clone, Debug, PartialEq)]
pub enum MetaArray {
    U8(Vec<u8>),
    I8(Vec<i8>),
    U16(Vec<u16>),
    I16(Vec<i16>),
    U32(Vec<u32>),
    I32(Vec<i32>),
    F32(Vec<f32>),
    Bool(Vec<bool>),
    String(Vec<String>),
    Array(Vec<MetaArray>),
    U64(Vec<u64>),
    I64(Vec<i64>),
    F64(Vec<f64>),
}

impl MetaArray {
    /// The element type.
    pub fn elem_type(&self) -> MetaType {
        match self {
            MetaArray::U8(_) => MetaType::U8,
            MetaArray::I8(_) => MetaType::I8,
            MetaArray::U16(_) => MetaType::U16,
            MetaArray::I16(_) => MetaType::I16,
            MetaArray::U32(_) => MetaType::U32,
            MetaArray::I32(_) => MetaType::I32,
            MetaArray::F32(_) => MetaType::F32,
            MetaArray::Bool(_) => MetaType::Bool,
            MetaArray::String(_) => MetaType::String,
            MetaArray::Array(_) => MetaType::Array,
            MetaArray::U64(_) => MetaType::U64,
            MetaArray::I64(_) => MetaType::I64,
            MetaArray::F64(_) => MetaType::F64,
        }
    }

    pub fn len(&self) -> usize {
        match self {
            MetaArray::U8(v) => v.len(),
            MetaArray::I8(v) => v.len(),
            MetaArray::U16(v) => v.len(),
            MetaArray::I16(v) => v.len(),
            MetaArray::U32(v) => v.len(),
            MetaArray::I32(v) => v.len(),
            MetaArray::F32(v) => v.len(),
            MetaArray::Bool(v) => v.len(),
            MetaArray::String(v) => v.len(),
            MetaArray::Array(v) => v.len(),
            MetaArray::U64(v) => v.len(),
            MetaArray::I64(v) => v.len(),
            MetaArray::F64(v) => v.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The elements of an integer array as i128 (None for non-integer arrays).
    fn integers(&self) -> Option<Vec<i128>> {
        fn conv<T: Copy + Into<i128>>(v: &[T]) -> Vec<i128> {
            v.iter().map(|&x| x.into()).collect()
        }
        Some(match self {
            MetaArray::U8(v) => conv(v),
            MetaArray::I8(v) => conv(v),
            MetaArray::U16(v) => conv(v),
            MetaArray::I16(v) => conv(v),
            MetaArray::U32(v) => conv(v),
            MetaArray::I32(v) => conv(v),
            MetaArray::U64(v) => conv(v),
            MetaArray::I64(v) => conv(v),
            _ => return None,
        })
    }

    /// Integer array elements as u32, when every element fits.
    pub fn to_u32_vec(&self) -> Option<Vec<u32>> {
        self.integers()?
            .into_iter()
            .map(|x| u32::try_from(x).ok())
            .collect()
    }

    /// Integer array elements as i64, when every element fits.
    pub fn to_i64_vec(&self) -> Option<Vec<i64>> {
        self.integers()?
            .into_iter()
            .map(|x| i64::try_from(x).ok())
            .collect()
    }

    /// Elements of a float (f32 or f64) or integer array as f32 (f64 values are rounded).
    pub fn to_f32_vec(&self) -> Option<Vec<f32>> {
        match self {
            MetaArray::F32(v) => Some(v.clone()),
            MetaArray::F64(v) => Some(v.iter().map(|&x| x as f32).collect()),
            _ => Some(self.integers()?.into_iter().map(|x| x as f32).collect()),
        }
    }
}

impl MetaValue {
    /// The value's GGUF type.
    pub fn meta_type(&self) -> MetaType {
        match self {
            MetaValue::U8(_) => MetaType::U8,
            MetaValue::I8(_) => MetaType::I8,
            MetaValue::U16(_) => MetaType::U16,
            MetaValue::I16(_) => MetaType::I16,
            MetaValue::U32(_) => MetaType::U32,
            MetaValue::I32(_) => MetaType::I32,
            MetaValue::F32(_) => MetaType::F32,
            MetaValue::Bool(_) => MetaType::Bool,
            MetaValue::String(_) => MetaType::String,
            MetaValue::Array(_) => MetaType::Array,
            MetaValue::U64(_) => MetaType::U64,
            MetaValue::I64(_) => MetaType::I64,
            MetaValue::F64(_) => MetaType::F64,
        }
    }

    /// A short type description for error messages, e.g. `UINT32` or `ARRAY[STRING]`.
    pub fn type_description(&self) -> String {
        match self {
            MetaValue::Array(a) => format!("ARRAY[{}]", a.elem_type()),
            v => v.meta_type().name().to_string(),
        }
    }

    /// Any integer value as i128 (every GGUF integer fits).
    pub fn as_i128(&self) -> Option<i128> {
        Some(match *self {
            MetaValue::U8(x) => x.into(),
            MetaValue::I8(x) => x.into(),
            MetaValue::U16(x) => x.into(),
            MetaValue::I16(x) => x.into(),
            MetaValue::U32(x) => x.into(),
            MetaValue::I32(x) => x.into(),
            MetaValue::U64(x) => x.into(),
            MetaValue::I64(x) => x.into(),
            _ => return None,
        })
    }

    /// Any integer type whose value is non-negative, as u64.
    pub fn as_u64_lossless(&self) -> Option<u64> {
        u64::try_from(self.as_i128()?).ok()
    }

    /// Any integer type whose value fits in i64.
    pub fn as_i64_lossless(&self) -> Option<i64> {
        i64::try_from(self.as_i128()?).ok()
    }

    /// Exactly a `UINT32` value.
    pub fn as_u32(&self) -> Option<u32> {
        match *self {
            MetaValue::U32(x) => Some(x),
            _ => None,
        }
    }

    /// A float or integer value as f64.
    pub fn as_f64(&self) -> Option<f64> {
        match *self {
            MetaValue::F32(x) => Some(x.into()),
            MetaValue::F64(x) => Some(x),
            _ => self.as_i128().map(|x| x as f64),
        }
    }

    pub fn as_bool(&self) -> Option<bool> {
        match *self {
            MetaValue::Bool(b) => Some(b),
            _ => None,
        }
    }

    pub fn as_str(&self) -> Option<&str> {
        match self {
            MetaValue::String(s) => Some(s),
            _ => None,
        }
    }

    pub fn as_array(&self) -> Option<&MetaArray> {
        match self {
            MetaValue::Array(a) => Some(a),
            _ => None,
        }
    }

    /// An array of strings.
    pub fn as_string_array(&self) -> Option<&[String]> {
        match self {
            MetaValue::Array(MetaArray::String(v)) => Some(v),
            _ => None,
        }
    }

    /// An array of any integer type whose elements all fit in u32.
    pub fn as_u32_array(&self) -> Option<Vec<u32>> {
        self.as_array()?.to_u32_vec()
    }

    /// An array of any integer type whose elements all fit in i64.
    pub fn as_i64_array(&self) -> Option<Vec<i64>> {
        self.as_array()?.to_i64_vec()
    }

    /// An array of f32, f64 or integers, as f32.
    pub fn as_f32_array(&self) -> Option<Vec<f32>> {
        self.as_array()?.to_f32_vec()
    }

    /// Convenience constructor: an array of strings.
    pub fn string_array<S: Into<String>>(items: impl IntoIterator<Item = S>) -> MetaValue {
        MetaValue::Array(MetaArray::String(
            items.into_iter().map(Into::into).collect(),
        ))
    }
}

impl From<&str> for MetaValue {
    fn from(s: &str) -> Self {
        MetaValue::String(s.to_string())
    }
}

impl From<String> for MetaValue {
    fn from(s: String) -> Self {
        MetaValue::String(s)
    }
}

impl From<MetaArray> for MetaValue {
    fn from(a: MetaArray) -> Self {
        MetaValue::Array(a)
    }
}

macro_rules! from_scalar {
    ($($t:ty => $v:ident),*) => {$(
        impl From<$t> for MetaValue {
            fn from(x: $t) -> Self { MetaValue::$v(x) }
        }
        impl From<Vec<$t>> for MetaValue {
            fn from(x: Vec<$t>) -> Self { MetaValue::Array(MetaArray::$v(x)) }
        }
    )*};
}
from_scalar!(u8 => U8, i8 => I8, u16 => U16, i16 => I16, u32 => U32, i32 => I32, f32 => F32,
             bool => Bool, u64 => U64, i64 => I64, f64 => F64);

impl From<Vec<String>> for MetaValue {
    fn from(x: Vec<String>) -> Self {
        MetaValue::Array(MetaArray::String(x))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn type_ids_round_trip() {
        for (i, t) in MetaType::ALL.into_iter().enumerate() {
            assert_eq!(t.id() as usize, i);
            assert_eq!(MetaType::from_id(t.id()), Some(t));
        }
        assert_eq!(MetaType::from_id(13), None);
    }

    #[test]
    fn lenient_accessors() {
        assert_eq!(MetaValue::I32(-1).as_u64_lossless(), None);
        assert_eq!(MetaValue::I32(7).as_u64_lossless(), Some(7));
        assert_eq!(MetaValue::U64(u64::MAX).as_i64_lossless(), None);
        assert_eq!(MetaValue::U16(3).as_u32(), None);
        assert_eq!(MetaValue::U32(3).as_f64(), Some(3.0));
        assert_eq!(
            MetaValue::from(vec![1i32, 4]).as_u32_array(),
            Some(vec![1, 4])
        );
        assert_eq!(MetaValue::from(vec![1i32, -4]).as_u32_array(), None);
        assert_eq!(
            MetaValue::from(vec![10.0f64]).as_f32_array(),
            Some(vec![10.0])
        );
        assert_eq!(MetaValue::from("x").as_string_array(), None);
        assert_eq!(
            MetaValue::string_array(["a", "b"]).as_string_array(),
            Some(&["a".to_string(), "b".to_string()][..])
        );
    }
}
