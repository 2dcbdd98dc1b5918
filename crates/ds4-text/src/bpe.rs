//! The fast encoder for DeepSeek's tokenizer: added-token matching (leftmost-longest), the
//! hand-written pre-tokenizer ([`crate::pretokenize`]) and byte-level BPE (lowest-rank pair first,
//! leftmost on ties, as HF `tokenizers` merges). It gives HF's ids (tested on the golden corpus
//! and differentially against the HF engine) several times faster.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::hash::{BuildHasherDefault, Hasher};
use std::sync::Mutex;

use crate::pretokenize::{self, CharClasses};

/// Pieces longer than this are not cached (they are rare and would bloat the cache).
const MAX_CACHED_PIECE: usize = 64;
/// The cache is cleared when it grows past this many pieces.
const MAX_CACHE_ENTRIES: usize = 200_000;

/// A fast non-cryptographic hasher for the hot maps (keys are not attacker-chosen in a way
/// that matters here: a collision flood only slows one request's tokenization).
#[derive(Default)]
struct MixHasher(u64);

impl Hasher for MixHasher {
    fn write(&mut self, bytes: &[u8]) {
        let mut chunks = bytes.chunks_exact(8);
        for c in &mut chunks {
            self.mix(u64::from_le_bytes([
                c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7],
            ]));
        }
        for &b in chunks.remainder() {
            self.mix(u64::from(b));
        }
    }
    fn write_u32(&mut self, n: u32) {
        self.mix(u64::from(n));
    }
    fn write_u64(&mut self, n: u64) {
        self.mix(n);
    }
    fn write_usize(&mut self, n: usize) {
        self.mix(n as u64);
    }
    fn finish(&self) -> u64 {
        // Final avalanche so the low bits the table uses depend on every input bit.
        let mut h = self.0;
        h ^= h >> 33;
        h = h.wrapping_mul(0xff51_afd7_ed55_8ccd);
        h ^= h >> 33;
        h
    }
}

impl MixHasher {
    #[inline]
    fn mix(&mut self, word: u64) {
        self.0 = (self.0.rotate_left(5) ^ word).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    }
}

type Mix = BuildHasherDefault<MixHasher>;

/// Ids of recently seen pieces, by their bytes.
type PieceCache = HashMap<Box<[u8]>, Box<[u32]>, Mix>;

pub(crate) struct FastEncoder {
    classes: CharClasses,
    /// Token id of each byte (its byte-level symbol).
    byte_ids: [u32; 256],
    /// (left id << 32 | right id) → (rank, merged id).
    merges: HashMap<u64, (u32, u32), Mix>,
    /// Added tokens by first char, longest first; `first_chars` lists those chars.
    added: HashMap<char, Vec<(String, u32)>>,
    first_chars: Vec<char>,
    cache: Mutex<PieceCache>,
}

impl FastEncoder {
    /// `merges`: (left, right, merged) ids in rank order. `added`: literal strings and ids.
    pub(crate) fn new(
        byte_ids: [u32; 256],
        merges: impl IntoIterator<Item = (u32, u32, u32)>,
        added: impl IntoIterator<Item = (String, u32)>,
    ) -> Result<FastEncoder, String> {
        let merges = merges
            .into_iter()
            .enumerate()
            .map(|(rank, (a, b, ab))| (pair_key(a, b), (rank as u32, ab)))
            .collect();
        let mut by_first: HashMap<char, Vec<(String, u32)>> = HashMap::new();
        for (text, id) in added {
            if let Some(c) = text.chars().next() {
                by_first.entry(c).or_default().push((text, id));
            }
        }
        for list in by_first.values_mut() {
            list.sort_by_key(|(t, _)| Reverse(t.len()));
        }
        let mut first_chars: Vec<char> = by_first.keys().copied().collect();
        first_chars.sort_unstable();
        Ok(FastEncoder {
            classes: CharClasses::new()?,
            byte_ids,
            merges,
            added: by_first,
            first_chars,
            cache: Mutex::new(HashMap::default()),
        })
    }

    /// Empties the piece cache.
    pub(crate) fn clear_cache(&self) {
        if let Ok(mut cache) = self.cache.lock() {
            cache.clear();
        }
    }

    pub(crate) fn encode(&self, text: &str, out: &mut Vec<u32>) {
        let mut span_start = 0;
        let mut i = 0;
        while i < text.len() {
            let c = text[i..].chars().next().unwrap_or('\0');
            if self.first_chars.binary_search(&c).is_err() {
                i += c.len_utf8();
                continue;
            }
            if let Some(list) = self.added.get(&c) {
                if let Some((t, id)) = list.iter().find(|(t, _)| text[i..].starts_with(t.as_str()))
                {
                    self.encode_span(&text[span_start..i], out);
                    out.push(*id);
                    i += t.len();
                    span_start = i;
                    continue;
                }
            }
            i += c.len_utf8();
        }
        self.encode_span(&text[span_start..], out);
    }

    fn encode_span(&self, span: &str, out: &mut Vec<u32>) {
        if span.is_empty() {
            return;
        }
        let mut cache = self.cache.try_lock().ok();
        pretokenize::split(&self.classes, span, &mut |piece: &str| {
            let bytes = piece.as_bytes();
            if let Some(cache) = cache.as_mut() {
                if let Some(ids) = cache.get(bytes) {
                    out.extend_from_slice(ids);
                    return;
                }
            }
            let start = out.len();
            self.merge_piece(bytes, out);
            if bytes.len() <= MAX_CACHED_PIECE {
                if let Some(cache) = cache.as_mut() {
                    if cache.len() >= MAX_CACHE_ENTRIES {
                        cache.clear();
                    }
                    cache.insert(bytes.into(), out[start..].into());
                }
            }
        });
    }

    /// Byte-level BPE of one piece: merge the lowest-rank adjacent pair (leftmost on ties)
    /// until none is left.
    fn merge_piece(&self, bytes: &[u8], out: &mut Vec<u32>) {
        match bytes {
            [] => return,
            [b] => {
                out.push(self.byte_ids[*b as usize]);
                return;
            }
            _ => {}
        }
        // A doubly linked list of symbols; removed ones have `alive == false`.
        let mut ids: Vec<u32> = bytes.iter().map(|&b| self.byte_ids[b as usize]).collect();
        let n = ids.len();
        let mut prev: Vec<usize> = (0..n).map(|i| i.wrapping_sub(1)).collect();
        let mut next: Vec<usize> = (1..=n).collect();
        let mut alive = vec![true; n];
        // Heap of (rank, position, merged id), smallest first.
        let mut heap = BinaryHeap::new();
        for i in 0..n - 1 {
            if let Some(&(rank, merged)) = self.merges.get(&pair_key(ids[i], ids[i + 1])) {
                heap.push(Reverse((rank, i, merged)));
            }
        }
        while let Some(Reverse((_, i, merged))) = heap.pop() {
            if !alive[i] || next[i] >= n {
                continue;
            }
            let j = next[i];
            // Skip entries made stale by an earlier merge.
            if self.merges.get(&pair_key(ids[i], ids[j])).map(|m| m.1) != Some(merged) {
                continue;
            }
            ids[i] = merged;
            alive[j] = false;
            next[i] = next[j];
            if next[j] < n {
                prev[next[j]] = i;
            }
            if prev[i] < n {
                let p = prev[i];
                if let Some(&(rank, m)) = self.merges.get(&pair_key(ids[p], ids[i])) {
                    heap.push(Reverse((rank, p, m)));
                }
            }
            if next[i] < n {
                if let Some(&(rank, m)) = self.merges.get(&pair_key(ids[i], ids[next[i]])) {
                    heap.push(Reverse((rank, i, m)));
                }
            }
        }
        out.extend((0..n).filter(|&i| alive[i]).map(|i| ids[i]));
    }
}

fn pair_key(left: u32, right: u32) -> u64 {
    (u64::from(left) << 32) | u64::from(right)
}
