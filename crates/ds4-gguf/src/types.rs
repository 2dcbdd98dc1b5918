//! The table of ggml tensor types ds4 files use: id, block size in elements and bytes.
//!
//! One table, as in ggml: every other part of the crate (tensor sizes in the reader, the
//! quant kernels) derives its numbers from here.

/// A ggml tensor element type. Only the types that ds4 GGUF files (and our own
/// `convert`/`synth` output) contain are known; any other id is rejected by the reader with
/// an error instead of being guessed at.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum GgmlType {
    F32,
    F16,
    Q8_0,
    Q2K,
    Q4K,
    Q8K,
    IQ2XXS,
    I32,
    BF16,
}

impl GgmlType {
    pub const ALL: [GgmlType; 9] = [
        GgmlType::F32,
        GgmlType::F16,
        GgmlType::Q8_0,
        GgmlType::Q2K,
        GgmlType::Q4K,
        GgmlType::Q8K,
        GgmlType::IQ2XXS,
        GgmlType::I32,
        GgmlType::BF16,
    ];

    /// The ggml type id stored in GGUF tensor infos.
    pub const fn id(self) -> u32 {
        match self {
            GgmlType::F32 => 0,
            GgmlType::F16 => 1,
            GgmlType::Q8_0 => 8,
            GgmlType::Q2K => 10,
            GgmlType::Q4K => 12,
            GgmlType::Q8K => 15,
            GgmlType::IQ2XXS => 16,
            GgmlType::I32 => 26,
            GgmlType::BF16 => 30,
        }
    }

    pub fn from_id(id: u32) -> Option<GgmlType> {
        GgmlType::ALL.into_iter().find(|t| t.id() == id)
    }

    pub const fn name(self) -> &'static str {
        match self {
            GgmlType::F32 => "F32",
            GgmlType::F16 => "F16",
            GgmlType::Q8_0 => "Q8_0",
            GgmlType::Q2K => "Q2_K",
            GgmlType::Q4K => "Q4_K",
            GgmlType::Q8K => "Q8_K",
            GgmlType::IQ2XXS => "IQ2_XXS",
            GgmlType::I32 => "I32",
            GgmlType::BF16 => "BF16",
        }
    }

    pub fn from_name(name: &str) -> Option<GgmlType> {
        GgmlType::ALL
            .into_iter()
            .find(|t| t.name().eq_ignore_ascii_case(name))
    }

    /// Elements per block (1 for plain types).
    pub const fn block_elems(self) -> usize {
        match self {
            GgmlType::F32 | GgmlType::F16 | GgmlType::I32 | GgmlType::BF16 => 1,
            GgmlType::Q8_0 => 32,
            GgmlType::Q2K | GgmlType::Q4K | GgmlType::Q8K | GgmlType::IQ2XXS => 256,
        }
    }

    /// Bytes per block.
    pub const fn block_bytes(self) -> usize {
        match self {
            GgmlType::F32 | GgmlType::I32 => 4,
            GgmlType::F16 | GgmlType::BF16 => 2,
            GgmlType::Q8_0 => 34,
            GgmlType::Q2K => 84,
            GgmlType::Q4K => 144,
            GgmlType::Q8K => 292,
            GgmlType::IQ2XXS => 66,
        }
    }

    pub const fn is_quantized(self) -> bool {
        self.block_elems() > 1
    }

    /// Bytes of a row of `n` elements, or `None` when `n` is not a whole number of blocks
    /// or the size overflows.
    pub fn row_bytes(self, n: u64) -> Option<u64> {
        let be = self.block_elems() as u64;
        if !n.is_multiple_of(be) {
            return None;
        }
        (n / be).checked_mul(self.block_bytes() as u64)
    }
}

impl std::fmt::Display for GgmlType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_round_trip_and_sizes_match_ggml() {
        for t in GgmlType::ALL {
            assert_eq!(GgmlType::from_id(t.id()), Some(t));
            assert_eq!(GgmlType::from_name(t.name()), Some(t));
        }
        assert_eq!(GgmlType::from_id(39), None);
        // Bits per weight as ggml documents them.
        assert_eq!(GgmlType::Q8_0.row_bytes(4096), Some(4096 / 32 * 34));
        assert_eq!(GgmlType::IQ2XXS.row_bytes(4096), Some(16 * 66));
        assert_eq!(GgmlType::Q2K.row_bytes(2048), Some(8 * 84));
        assert_eq!(GgmlType::Q4K.row_bytes(100), None);
    }
}
