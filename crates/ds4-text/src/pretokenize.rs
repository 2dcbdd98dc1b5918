//! DeepSeek V4's pre-tokenizer as a hand-written scanner: the three regex splits of its
//! `tokenizer.json`, applied in turn, each isolating its matches:
//!
//! 1. `\p{N}{1,3}`: digits, at most three per piece;
//! 2. `[\u4E00-\u9FA5\u3040-\u309F\u30A0-\u30FF]+`: CJK ideograph, hiragana and katakana runs;
//! 3. the first alternative that matches, at each position:
//!    - A1 `[ASCII punct][A-Za-z]+`
//!    - A2 `[^\r\n\p{L}\p{P}\p{S}]?[\p{L}\p{M}]+`
//!    - A3 ` ?[\p{P}\p{S}]+[\r\n]*`
//!    - A4 `\s*[\r\n]+` (a whitespace run up to its last CR/LF)
//!    - A5 `\s+(?!\S)` (a whitespace run, less its last char when a non-space follows)
//!    - A6 `\s+`
//!
//! Text no alternative matches is a piece of its own. The scanner gives the same pieces as the
//! regex engines (checked against HF `tokenizers` on the golden corpus and by a differential
//! proptest), without a backtracking regex VM. Unicode categories come from `regex-syntax`, the
//! tables the regex engine itself uses.

/// Character class bits.
const L: u8 = 1;
const M: u8 = 2;
const N: u8 = 4;
const P: u8 = 8;
const S: u8 = 16;
const WS: u8 = 32;

/// Unicode category lookup: a table for the BMP, sorted ranges beyond it.
pub(crate) struct CharClasses {
    bmp: Vec<u8>,
    astral: Vec<(u32, u32, u8)>,
}

impl CharClasses {
    pub(crate) fn new() -> Result<CharClasses, String> {
        let mut bmp = vec![0u8; 0x1_0000];
        let mut astral: Vec<(u32, u32, u8)> = Vec::new();
        for (pattern, bit) in [
            (r"\p{L}", L),
            (r"\p{M}", M),
            (r"\p{N}", N),
            (r"\p{P}", P),
            (r"\p{S}", S),
            (r"\s", WS),
        ] {
            for (start, end) in unicode_ranges(pattern)? {
                let bmp_end = end.min(0xFFFF);
                for c in start..=bmp_end {
                    if c <= 0xFFFF {
                        bmp[c as usize] |= bit;
                    }
                }
                if end > 0xFFFF {
                    astral.push((start.max(0x1_0000), end, bit));
                }
            }
        }
        // Split overlapping ranges into disjoint pieces with combined bits, sorted.
        let mut points: Vec<u32> = astral.iter().flat_map(|&(s, e, _)| [s, e + 1]).collect();
        points.sort_unstable();
        points.dedup();
        let mut disjoint = Vec::new();
        for w in points.windows(2) {
            let (s, e) = (w[0], w[1] - 1);
            let bits = astral
                .iter()
                .filter(|&&(rs, re, _)| rs <= s && e <= re)
                .fold(0, |b, r| b | r.2);
            if bits != 0 {
                disjoint.push((s, e, bits));
            }
        }
        Ok(CharClasses {
            bmp,
            astral: disjoint,
        })
    }

    #[inline]
    fn of(&self, c: char) -> u8 {
        let u = c as u32;
        if u <= 0xFFFF {
            return self.bmp[u as usize];
        }
        match self.astral.binary_search_by(|&(s, e, _)| {
            if e < u {
                std::cmp::Ordering::Less
            } else if s > u {
                std::cmp::Ordering::Greater
            } else {
                std::cmp::Ordering::Equal
            }
        }) {
            Ok(i) => self.astral[i].2,
            Err(_) => 0,
        }
    }
}

/// The code point ranges of a one-class regex, from regex-syntax's Unicode tables.
fn unicode_ranges(pattern: &str) -> Result<Vec<(u32, u32)>, String> {
    use regex_syntax::hir::{Class, HirKind};
    let hir = regex_syntax::parse(pattern).map_err(|e| format!("{pattern}: {e}"))?;
    match hir.kind() {
        HirKind::Class(Class::Unicode(class)) => Ok(class
            .ranges()
            .iter()
            .map(|r| (r.start() as u32, r.end() as u32))
            .collect()),
        _ => Err(format!("{pattern} is not a Unicode class")),
    }
}

fn is_cjk(c: char) -> bool {
    matches!(c, '\u{4E00}'..='\u{9FA5}' | '\u{3040}'..='\u{309F}' | '\u{30A0}'..='\u{30FF}')
}

/// Splits `text` into pre-tokens; calls `piece` with each (non-empty, in order).
pub(crate) fn split(classes: &CharClasses, text: &str, piece: &mut impl FnMut(&str)) {
    // Split 1: runs of up to three numeric chars.
    let mut gap_start = 0;
    let mut chars = text.char_indices().peekable();
    while let Some((i, c)) = chars.next() {
        if classes.of(c) & N == 0 {
            continue;
        }
        split_cjk(classes, &text[gap_start..i], piece);
        let mut end = i + c.len_utf8();
        for _ in 0..2 {
            match chars.peek() {
                Some(&(j, d)) if classes.of(d) & N != 0 => {
                    end = j + d.len_utf8();
                    chars.next();
                }
                _ => break,
            }
        }
        split_cjk(classes, &text[i..end], piece);
        gap_start = end;
    }
    split_cjk(classes, &text[gap_start..], piece);
}

/// Split 2: CJK runs, then split 3 on every piece.
fn split_cjk(classes: &CharClasses, text: &str, piece: &mut impl FnMut(&str)) {
    if text.is_empty() {
        return;
    }
    let mut start = 0;
    let mut run: Option<usize> = None;
    for (i, c) in text.char_indices() {
        match (is_cjk(c), run) {
            (true, None) => {
                split_main(classes, &text[start..i], piece);
                run = Some(i);
            }
            (false, Some(r)) => {
                split_main(classes, &text[r..i], piece);
                run = None;
                start = i;
            }
            _ => {}
        }
    }
    match run {
        Some(r) => split_main(classes, &text[r..], piece),
        None => split_main(classes, &text[start..], piece),
    }
}

/// Split 3: the main pattern. Unmatched stretches are pieces too.
fn split_main(classes: &CharClasses, text: &str, piece: &mut impl FnMut(&str)) {
    let bytes = text.as_bytes();
    let mut pos = 0;
    let mut gap_start = 0;
    while pos < text.len() {
        match match_at(classes, text, pos) {
            Some(end) => {
                if gap_start < pos {
                    piece(&text[gap_start..pos]);
                }
                piece(&text[pos..end]);
                pos = end;
                gap_start = end;
            }
            None => {
                // Not matched here: one char of a gap piece.
                pos += utf8_len(bytes[pos]);
            }
        }
    }
    if gap_start < text.len() {
        piece(&text[gap_start..]);
    }
}

fn utf8_len(first: u8) -> usize {
    match first {
        0x00..=0x7F => 1,
        0xC0..=0xDF => 2,
        0xE0..=0xEF => 3,
        _ => 4,
    }
}

/// End of the main pattern's match at `pos`, if any.
fn match_at(classes: &CharClasses, text: &str, pos: usize) -> Option<usize> {
    let rest = &text[pos..];
    let mut it = rest.chars();
    let c = it.next()?;
    let c_len = c.len_utf8();
    let next = it.next();
    let class = classes.of(c);
    // Scans a run of chars satisfying `f` from byte offset `from` (relative to pos).
    let run = |from: usize, f: &dyn Fn(char) -> bool| -> usize {
        let mut end = from;
        for d in rest[from..].chars() {
            if !f(d) {
                break;
            }
            end += d.len_utf8();
        }
        end
    };
    let letter_or_mark = |d: char| classes.of(d) & (L | M) != 0;
    let punct_or_symbol = |d: char| classes.of(d) & (P | S) != 0;

    // A1: one ASCII punctuation char and ASCII letters.
    if c.is_ascii_punctuation() && next.is_some_and(|d| d.is_ascii_alphabetic()) {
        return Some(pos + run(c_len, &|d: char| d.is_ascii_alphabetic()));
    }
    // A2: an optional non-letter, non-punct, non-newline char, then letters/marks.
    let x_class = c != '\r' && c != '\n' && class & (L | P | S) == 0;
    if x_class && next.is_some_and(letter_or_mark) {
        return Some(pos + run(c_len, &letter_or_mark));
    }
    if class & (L | M) != 0 {
        return Some(pos + run(0, &letter_or_mark));
    }
    // A3: an optional space, punctuation/symbols, then newlines.
    let punct_start = if c == ' ' && next.is_some_and(punct_or_symbol) {
        Some(1)
    } else if class & (P | S) != 0 {
        Some(0)
    } else {
        None
    };
    if let Some(start) = punct_start {
        let end = run(start, &punct_or_symbol);
        return Some(pos + run(end, &|d: char| d == '\r' || d == '\n'));
    }
    if class & WS == 0 {
        return None;
    }
    // A4..A6: a whitespace run.
    let mut end = 0;
    let mut last_newline_end = None;
    let mut last_char_start = 0;
    for d in rest.chars() {
        if classes.of(d) & WS == 0 {
            break;
        }
        last_char_start = end;
        end += d.len_utf8();
        if d == '\r' || d == '\n' {
            last_newline_end = Some(end);
        }
    }
    if let Some(nl_end) = last_newline_end {
        return Some(pos + nl_end); // A4
    }
    if end == rest.len() || last_char_start == 0 {
        return Some(pos + end); // A5 at the end of the text, or A6 for a single char
    }
    Some(pos + last_char_start) // A5: leave the last space to the next piece
}
