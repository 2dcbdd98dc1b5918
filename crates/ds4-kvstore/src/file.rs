//! A whole `.kv` file: the fixed header, `u32` text length + rendered text, the session
//! payload, and the optional "KTM" tool-id map (ds4-spec.md §3).
//!
//! The text is kept as bytes: it is the detokenized checkpoint (or a visible transcript), and a
//! checkpoint boundary may fall inside a multi-byte character.

use std::io::Write;

use crate::error::FormatError;
use crate::header::{ExtFlags, KvFileHeader, HEADER_BYTES};

/// Bytes before the text: the header and the text length.
pub const TEXT_OFFSET: usize = HEADER_BYTES + 4;
pub const TOOL_MAP_MAGIC: [u8; 3] = *b"KTM";
pub const TOOL_MAP_VERSION: u8 = 1;

/// One tool-call id and the exact DSML block the model produced for it, so a later request
/// that refers to the id can be replayed byte-exactly.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ToolMapEntry {
    pub id: String,
    pub dsml: String,
}

/// A decoded cache file.
#[derive(Clone, Debug, PartialEq)]
pub struct KvFile {
    pub header: KvFileHeader,
    pub text: Vec<u8>,
    pub payload: Vec<u8>,
    pub tool_map: Vec<ToolMapEntry>,
}

/// Size of the serialized tool map ("KTM", version, count, entries); 0 when empty (no trailer).
pub fn tool_map_bytes(entries: &[ToolMapEntry]) -> u64 {
    if entries.is_empty() {
        return 0;
    }
    8 + entries
        .iter()
        .map(|e| 8 + e.id.len() as u64 + e.dsml.len() as u64)
        .sum::<u64>()
}

/// Total file size for the given parts.
pub fn file_bytes(text_len: u64, payload_len: u64, tool_map: &[ToolMapEntry]) -> u64 {
    TEXT_OFFSET as u64 + text_len + payload_len + tool_map_bytes(tool_map)
}

/// Writes a complete file. `header.payload_bytes` and the tool-map flag are taken from the
/// parts given, so the header always describes what follows it.
pub fn write_file(
    w: &mut impl Write,
    header: &KvFileHeader,
    text: &[u8],
    payload: &[u8],
    tool_map: &[ToolMapEntry],
) -> std::io::Result<()> {
    let text_len = u32::try_from(text.len()).map_err(|_| {
        std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            format!("text of {} bytes exceeds the u32 length field", text.len()),
        )
    })?;
    let count = u32::try_from(tool_map.len())
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::InvalidInput, "too many tool ids"))?;
    let mut h = *header;
    h.payload_bytes = payload.len() as u64;
    h.ext_flags = ExtFlags(if tool_map.is_empty() {
        h.ext_flags.0 & !ExtFlags::TOOL_MAP
    } else {
        h.ext_flags.0 | ExtFlags::TOOL_MAP
    });
    w.write_all(&h.encode())?;
    w.write_all(&text_len.to_le_bytes())?;
    w.write_all(text)?;
    w.write_all(payload)?;
    if !tool_map.is_empty() {
        w.write_all(&TOOL_MAP_MAGIC)?;
        w.write_all(&[TOOL_MAP_VERSION])?;
        w.write_all(&count.to_le_bytes())?;
        for e in tool_map {
            for s in [&e.id, &e.dsml] {
                let n = u32::try_from(s.len()).map_err(|_| {
                    std::io::Error::new(
                        std::io::ErrorKind::InvalidInput,
                        "tool map string too long",
                    )
                })?;
                w.write_all(&n.to_le_bytes())?;
            }
            w.write_all(e.id.as_bytes())?;
            w.write_all(e.dsml.as_bytes())?;
        }
    }
    Ok(())
}

/// Where the parts of a file lie, from its header and text length, checked against the file
/// size: everything must fit, and only a tool map (when flagged) may follow the payload.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FileLayout {
    pub header: KvFileHeader,
    pub text_len: u32,
    pub payload_offset: u64,
    /// Where the payload ends (the tool map, if any, starts here).
    pub payload_end: u64,
}

impl FileLayout {
    /// Reads the header and text length from the first 52 bytes (`prefix`) of a file of
    /// `file_len` bytes.
    pub fn read(prefix: &[u8], file_len: u64) -> Result<FileLayout, FormatError> {
        let header = KvFileHeader::decode(prefix)?;
        if prefix.len() < TEXT_OFFSET {
            return Err(FormatError::new(
                "text_len",
                HEADER_BYTES as u64,
                format!("truncated: the file ends at {}", prefix.len()),
            ));
        }
        let text_len = u32::from_le_bytes([prefix[48], prefix[49], prefix[50], prefix[51]]);
        let payload_offset = TEXT_OFFSET as u64 + text_len as u64;
        if payload_offset > file_len {
            return Err(FormatError::new(
                "text_len",
                HEADER_BYTES as u64,
                format!("{text_len} bytes of text run past the end of the {file_len}-byte file"),
            ));
        }
        let payload_end = payload_offset
            .checked_add(header.payload_bytes)
            .filter(|&e| e <= file_len)
            .ok_or_else(|| {
                FormatError::new(
                    "header.payload_bytes",
                    40,
                    format!(
                        "{} payload bytes from offset {payload_offset} run past the end of the {file_len}-byte file",
                        header.payload_bytes
                    ),
                )
            })?;
        if payload_end < file_len && !header.ext_flags.has(ExtFlags::TOOL_MAP) {
            return Err(FormatError::new(
                "trailer",
                payload_end,
                format!(
                    "{} trailing bytes after the payload",
                    file_len - payload_end
                ),
            ));
        }
        if payload_end == file_len && header.ext_flags.has(ExtFlags::TOOL_MAP) {
            return Err(FormatError::new(
                "ktm",
                payload_end,
                "the header announces a tool map but the file ends after the payload",
            ));
        }
        Ok(FileLayout {
            header,
            text_len,
            payload_offset,
            payload_end,
        })
    }
}

impl KvFile {
    /// Serializes the file (see [`write_file`]).
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(file_bytes(
            self.text.len() as u64,
            self.payload.len() as u64,
            &self.tool_map,
        ) as usize);
        write_file(
            &mut out,
            &self.header,
            &self.text,
            &self.payload,
            &self.tool_map,
        )
        .expect("writing to a Vec cannot fail for in-range lengths");
        out
    }

    /// Decodes a whole file, strictly: every length must fit, nothing may follow the last part.
    pub fn decode(bytes: &[u8]) -> Result<KvFile, FormatError> {
        let layout = FileLayout::read(bytes, bytes.len() as u64)?;
        let text = bytes[TEXT_OFFSET..layout.payload_offset as usize].to_vec();
        let payload = bytes[layout.payload_offset as usize..layout.payload_end as usize].to_vec();
        let tool_map = if layout.header.ext_flags.has(ExtFlags::TOOL_MAP) {
            decode_tool_map(&bytes[layout.payload_end as usize..])
                .map_err(|e| e.shifted("", layout.payload_end))?
        } else {
            Vec::new()
        };
        Ok(KvFile {
            header: layout.header,
            text,
            payload,
            tool_map,
        })
    }
}

/// Decodes a "KTM" trailer that must span all of `bytes` (offsets relative to its start).
pub fn decode_tool_map(bytes: &[u8]) -> Result<Vec<ToolMapEntry>, FormatError> {
    let mut pos = 0usize;
    let take = |pos: &mut usize, n: usize, field: &str| -> Result<&[u8], FormatError> {
        let end = pos
            .checked_add(n)
            .filter(|&e| e <= bytes.len())
            .ok_or_else(|| {
                FormatError::new(
                    field,
                    *pos as u64,
                    format!("needs {n} bytes, {} remain", bytes.len() - *pos),
                )
            })?;
        let s = &bytes[*pos..end];
        *pos = end;
        Ok(s)
    };
    let u32_of = |b: &[u8]| u32::from_le_bytes([b[0], b[1], b[2], b[3]]);
    if take(&mut pos, 3, "ktm.magic")? != TOOL_MAP_MAGIC {
        return Err(FormatError::new("ktm.magic", 0, "not \"KTM\""));
    }
    let version = take(&mut pos, 1, "ktm.version")?[0];
    if version != TOOL_MAP_VERSION {
        return Err(FormatError::new(
            "ktm.version",
            3,
            format!("version {version} (only {TOOL_MAP_VERSION} is known)"),
        ));
    }
    let count = u32_of(take(&mut pos, 4, "ktm.count")?) as usize;
    // Each entry needs at least 8 bytes: bound the count before allocating.
    if count > (bytes.len() - pos) / 8 {
        return Err(FormatError::new(
            "ktm.count",
            4,
            format!("{count} entries cannot fit in {} bytes", bytes.len() - pos),
        ));
    }
    let mut entries = Vec::with_capacity(count);
    for i in 0..count {
        let id_len = u32_of(take(&mut pos, 4, &format!("ktm.entry[{i}].id_len"))?) as usize;
        let dsml_len = u32_of(take(&mut pos, 4, &format!("ktm.entry[{i}].dsml_len"))?) as usize;
        let mut string = |n: usize, field: String| -> Result<String, FormatError> {
            let at = pos as u64;
            let b = take(&mut pos, n, &field)?;
            String::from_utf8(b.to_vec())
                .map_err(|e| FormatError::new(field, at, format!("not UTF-8: {e}")))
        };
        let id = string(id_len, format!("ktm.entry[{i}].id"))?;
        let dsml = string(dsml_len, format!("ktm.entry[{i}].dsml"))?;
        entries.push(ToolMapEntry { id, dsml });
    }
    if pos != bytes.len() {
        return Err(FormatError::new(
            "trailer",
            pos as u64,
            format!("{} trailing bytes after the tool map", bytes.len() - pos),
        ));
    }
    Ok(entries)
}
