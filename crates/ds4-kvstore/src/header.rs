//! The 48-byte fixed header of a `.kv` file (ds4-spec.md §3), little-endian:
//!
//! | offset | size | field |
//! |---|---|---|
//! | 0 | 3 | magic "KVC" |
//! | 3 | 1 | version (1) |
//! | 4 | 1 | routed-expert quant bits (2 or 4) |
//! | 5 | 1 | save reason ([`SaveReason`]) |
//! | 6 | 1 | extension flags ([`ExtFlags`]) |
//! | 7 | 1 | zero |
//! | 8 | 4 | tokens in the checkpoint |
//! | 12 | 4 | hits (disk loads so far) |
//! | 16 | 4 | context size of the session that wrote it |
//! | 20 | 4 | zero |
//! | 24 | 8 | created (Unix seconds) |
//! | 32 | 8 | last used (Unix seconds) |
//! | 40 | 8 | payload bytes |

use crate::error::FormatError;

pub const HEADER_BYTES: usize = 48;
pub const MAGIC: [u8; 3] = *b"KVC";
pub const VERSION: u8 = 1;

/// Why a checkpoint was written (header byte 5).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum SaveReason {
    Unknown = 0,
    /// A new long prompt's stable prefix, on a total cache miss.
    Cold = 1,
    /// Every `continued` interval of a growing live session.
    Continued = 2,
    /// The live session, before a disk load replaces it.
    Evict = 3,
    /// The live session at a clean shutdown.
    Shutdown = 4,
    AgentSystem = 5,
    AgentSession = 6,
}

impl SaveReason {
    pub const ALL: [SaveReason; 7] = [
        SaveReason::Unknown,
        SaveReason::Cold,
        SaveReason::Continued,
        SaveReason::Evict,
        SaveReason::Shutdown,
        SaveReason::AgentSystem,
        SaveReason::AgentSession,
    ];

    pub fn code(self) -> u8 {
        self as u8
    }

    pub fn from_code(code: u8) -> Option<SaveReason> {
        SaveReason::ALL.get(code as usize).copied()
    }

    /// ds4's name ("cold", "continued", ...), as in its logs.
    pub fn name(self) -> &'static str {
        match self {
            SaveReason::Unknown => "unknown",
            SaveReason::Cold => "cold",
            SaveReason::Continued => "continued",
            SaveReason::Evict => "evict",
            SaveReason::Shutdown => "shutdown",
            SaveReason::AgentSystem => "agent-system",
            SaveReason::AgentSession => "agent-session",
        }
    }
}

/// Header byte 6.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct ExtFlags(pub u8);

impl ExtFlags {
    /// A "KTM" tool-id map follows the payload.
    pub const TOOL_MAP: u8 = 1;
    /// The key text is the Responses-API visible transcript, not detokenized tokens.
    pub const RESPONSES_VISIBLE: u8 = 2;
    /// The key text is the thinking-visible transcript.
    pub const THINKING_VISIBLE: u8 = 4;
    const KNOWN: u8 = Self::TOOL_MAP | Self::RESPONSES_VISIBLE | Self::THINKING_VISIBLE;

    pub fn has(self, bit: u8) -> bool {
        self.0 & bit != 0
    }

    /// ds4's name of the key kind ("token-text" unless a visible-transcript bit is set).
    pub fn key_kind(self) -> &'static str {
        if self.has(Self::RESPONSES_VISIBLE) {
            "responses-visible"
        } else if self.has(Self::THINKING_VISIBLE) {
            "thinking-visible"
        } else {
            "token-text"
        }
    }
}

/// The decoded fixed header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KvFileHeader {
    pub quant_bits: u8,
    pub reason: SaveReason,
    pub ext_flags: ExtFlags,
    pub tokens: u32,
    pub hits: u32,
    pub ctx: u32,
    pub created: u64,
    pub last_used: u64,
    pub payload_bytes: u64,
}

impl KvFileHeader {
    pub fn encode(&self) -> [u8; HEADER_BYTES] {
        let mut h = [0u8; HEADER_BYTES];
        h[0..3].copy_from_slice(&MAGIC);
        h[3] = VERSION;
        h[4] = self.quant_bits;
        h[5] = self.reason.code();
        h[6] = self.ext_flags.0;
        h[8..12].copy_from_slice(&self.tokens.to_le_bytes());
        h[12..16].copy_from_slice(&self.hits.to_le_bytes());
        h[16..20].copy_from_slice(&self.ctx.to_le_bytes());
        h[24..32].copy_from_slice(&self.created.to_le_bytes());
        h[32..40].copy_from_slice(&self.last_used.to_le_bytes());
        h[40..48].copy_from_slice(&self.payload_bytes.to_le_bytes());
        h
    }

    /// Decodes and validates the first 48 bytes of `bytes`.
    pub fn decode(bytes: &[u8]) -> Result<KvFileHeader, FormatError> {
        if bytes.len() < HEADER_BYTES {
            return Err(FormatError::new(
                "header",
                0,
                format!("needs {HEADER_BYTES} bytes, the file has {}", bytes.len()),
            ));
        }
        let h = &bytes[..HEADER_BYTES];
        let u32_at = |o: usize| u32::from_le_bytes([h[o], h[o + 1], h[o + 2], h[o + 3]]);
        let u64_at = |o: usize| {
            let mut b = [0u8; 8];
            b.copy_from_slice(&h[o..o + 8]);
            u64::from_le_bytes(b)
        };
        if h[0..3] != MAGIC {
            return Err(FormatError::new(
                "header.magic",
                0,
                format!("{:02x?} is not \"KVC\"", &h[0..3]),
            ));
        }
        if h[3] != VERSION {
            return Err(FormatError::new(
                "header.version",
                3,
                format!("version {} (only {VERSION} is known)", h[3]),
            ));
        }
        if h[4] != 2 && h[4] != 4 {
            return Err(FormatError::new(
                "header.quant_bits",
                4,
                format!("{} (must be 2 or 4)", h[4]),
            ));
        }
        let reason = SaveReason::from_code(h[5]).ok_or_else(|| {
            FormatError::new("header.reason", 5, format!("unknown reason code {}", h[5]))
        })?;
        if h[6] & !ExtFlags::KNOWN != 0 {
            return Err(FormatError::new(
                "header.ext_flags",
                6,
                format!("unknown flag bits {:#04x}", h[6] & !ExtFlags::KNOWN),
            ));
        }
        if h[7] != 0 {
            return Err(FormatError::new("header.pad", 7, "must be zero"));
        }
        if h[20..24] != [0; 4] {
            return Err(FormatError::new("header.reserved", 20, "must be zero"));
        }
        let header = KvFileHeader {
            quant_bits: h[4],
            reason,
            ext_flags: ExtFlags(h[6]),
            tokens: u32_at(8),
            hits: u32_at(12),
            ctx: u32_at(16),
            created: u64_at(24),
            last_used: u64_at(32),
            payload_bytes: u64_at(40),
        };
        if header.tokens == 0 {
            return Err(FormatError::new(
                "header.tokens",
                8,
                "a checkpoint holds at least one token",
            ));
        }
        if header.tokens >= header.ctx {
            return Err(FormatError::new(
                "header.tokens",
                8,
                format!(
                    "{} tokens do not fit the context of {}",
                    header.tokens, header.ctx
                ),
            ));
        }
        Ok(header)
    }
}
