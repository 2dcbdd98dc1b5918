//! Minimal `.npy` (NumPy format 1.0) reading and writing: little-endian f32 and i32/i64
//! arrays in C order, which is what `ds4 logits` writes and the fixtures hold.

use std::fmt::Write as _;

/// A decoded array: shape and values converted to f64 (exact for f32, i32 and |i64| < 2^53).
#[derive(Clone, Debug, PartialEq)]
pub struct NpyArray {
    pub shape: Vec<usize>,
    pub dtype: String,
    pub data: Vec<f64>,
}

impl NpyArray {
    pub fn as_f32(&self) -> Vec<f32> {
        self.data.iter().map(|&v| v as f32).collect()
    }
}

/// Encodes a little-endian f32 array of the given shape.
pub fn write_f32(shape: &[usize], data: &[f32]) -> Vec<u8> {
    debug_assert_eq!(shape.iter().product::<usize>(), data.len());
    let mut dims = String::new();
    for d in shape {
        let _ = write!(dims, "{d}, ");
    }
    if shape.len() > 1 {
        dims.truncate(dims.len() - 2);
    } else if shape.len() == 1 {
        dims.truncate(dims.len() - 1);
    }
    let mut header = format!("{{'descr': '<f4', 'fortran_order': False, 'shape': ({dims}), }}");
    // Magic (6) + version (2) + header length (2) + header + '\n' is a multiple of 64.
    let total = 10 + header.len() + 1;
    header.push_str(&" ".repeat((64 - total % 64) % 64));
    header.push('\n');
    let mut out = Vec::with_capacity(10 + header.len() + data.len() * 4);
    out.extend_from_slice(b"\x93NUMPY\x01\x00");
    out.extend_from_slice(&(header.len() as u16).to_le_bytes());
    out.extend_from_slice(header.as_bytes());
    for v in data {
        out.extend_from_slice(&v.to_le_bytes());
    }
    out
}

/// Decodes a version 1/2/3 `.npy` of dtype <f4, <f8, <i4 or <i8 in C order.
pub fn read(bytes: &[u8]) -> Result<NpyArray, String> {
    if bytes.len() < 10 || &bytes[..6] != b"\x93NUMPY" {
        return Err("not a .npy file (bad magic)".into());
    }
    let (hlen, hstart) = match bytes[6] {
        1 => (u16::from_le_bytes([bytes[8], bytes[9]]) as usize, 10),
        2 | 3 if bytes.len() >= 12 => (
            u32::from_le_bytes([bytes[8], bytes[9], bytes[10], bytes[11]]) as usize,
            12,
        ),
        v => return Err(format!("unsupported .npy version {v}")),
    };
    let header = bytes
        .get(hstart..hstart + hlen)
        .and_then(|h| std::str::from_utf8(h).ok())
        .ok_or("truncated or non-UTF-8 .npy header")?;
    let field = |name: &str| -> Result<&str, String> {
        let i = header
            .find(&format!("'{name}'"))
            .ok_or(format!(".npy header lacks '{name}'"))?;
        Ok(header[i + name.len() + 2..]
            .trim_start()
            .trim_start_matches(':')
            .trim_start())
    };
    let descr = field("descr")?;
    let dtype = descr
        .trim_start_matches('\'')
        .split('\'')
        .next()
        .unwrap_or("")
        .to_string();
    if field("fortran_order")?.starts_with("True") {
        return Err("Fortran-order .npy arrays are not supported".into());
    }
    let shape_text = field("shape")?;
    let inner = shape_text
        .strip_prefix('(')
        .and_then(|t| t.split(')').next().filter(|_| t.contains(')')))
        .ok_or("bad .npy shape (expected a tuple)")?;
    let shape: Vec<usize> = inner
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|s| {
            s.parse::<usize>()
                .map_err(|_| format!("bad .npy dimension `{s}`"))
        })
        .collect::<Result<_, _>>()?;
    let n = shape
        .iter()
        .try_fold(1usize, |a, &d| a.checked_mul(d))
        .ok_or("the .npy shape overflows")?;
    let body = &bytes[hstart + hlen..];
    let width = match dtype.as_str() {
        "<f4" | "<i4" => 4,
        "<f8" | "<i8" => 8,
        other => {
            return Err(format!(
                "unsupported .npy dtype `{other}` (need <f4, <f8, <i4 or <i8)"
            ))
        }
    };
    if n.checked_mul(width) != Some(body.len()) {
        return Err(format!(
            ".npy body has {} bytes, shape {shape:?} of {dtype} needs {}",
            body.len(),
            n * width
        ));
    }
    let data = body
        .chunks_exact(width)
        .map(|c| match dtype.as_str() {
            "<f4" => f32::from_le_bytes(c.try_into().unwrap_or([0; 4])) as f64,
            "<i4" => i32::from_le_bytes(c.try_into().unwrap_or([0; 4])) as f64,
            "<f8" => f64::from_le_bytes(c.try_into().unwrap_or([0; 8])),
            _ => i64::from_le_bytes(c.try_into().unwrap_or([0; 8])) as f64,
        })
        .collect();
    Ok(NpyArray { shape, dtype, data })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_aligns_the_header() {
        let data: Vec<f32> = (0..6).map(|i| i as f32 * 0.5).collect();
        let bytes = write_f32(&[2, 3], &data);
        assert_eq!((bytes.len() - 24) % 64, 0);
        let a = read(&bytes).unwrap();
        assert_eq!(a.shape, vec![2, 3]);
        assert_eq!(a.as_f32(), data);
        let one = read(&write_f32(&[3], &data[..3])).unwrap();
        assert_eq!(one.shape, vec![3]);
        assert!(read(b"nonsense").is_err());
        assert!(read(&bytes[..bytes.len() - 1]).is_err());
        // Damaged headers are errors, not panics.
        for header in [
            "{'descr': '<f4', 'fortran_order': False, 'shape': ), }",
            "{'descr': '<f4', 'fortran_order': False, 'shape': (99999999999, 99999999999), }",
            "{'descr': '<u2', 'fortran_order': False, 'shape': (1,), }",
            "{'descr'",
        ] {
            let mut b = b"\x93NUMPY\x01\x00".to_vec();
            b.extend_from_slice(&(header.len() as u16).to_le_bytes());
            b.extend_from_slice(header.as_bytes());
            assert!(read(&b).is_err(), "{header}");
        }
    }
}
