//! The streaming DSML parser on arbitrary model output: never panics, its events agree with
//! its final message, and any split of the text into chunks (as tokens arrive) gives the same
//! events and message. The decode tracker that forces greedy sampling inside tool blocks
//! follows the same text without panicking.
//!
//! Input: byte 0 = flags (thinking, tools), byte 1 = number of cut points n (mod 16), the next
//! n bytes the cut points (scaled onto the text's char boundaries), the rest the text (UTF-8,
//! lossy).
#![no_main]
use ds4_text::sampler::DsmlDecodeTracker;
use libfuzzer_sys::fuzz_target;

// The integration tests' run / merge / check_consistent.
#[path = "../../crates/ds4-text/tests/common/dsml.rs"]
mod dsml_check;
use dsml_check::{check_consistent, run};

fuzz_target!(|data: &[u8]| {
    if data.len() < 2 {
        return;
    }
    let (thinking, tools) = (data[0] & 1 != 0, data[0] & 2 != 0);
    let rest = &data[2..];
    let (cuts, text) = rest.split_at(((data[1] % 16) as usize).min(rest.len()));
    let text = String::from_utf8_lossy(text);

    let whole = run(&[&text], thinking, tools);
    check_consistent(&whole.0, &whole.1);

    let bounds: Vec<usize> = (0..=text.len())
        .filter(|&i| text.is_char_boundary(i))
        .collect();
    let mut points: Vec<usize> = cuts
        .iter()
        .map(|&c| bounds[c as usize * (bounds.len() - 1) / 255])
        .chain([0, text.len()])
        .collect();
    points.sort_unstable();
    points.dedup();
    let chunks: Vec<&str> = points.windows(2).map(|w| &text[w[0]..w[1]]).collect();
    assert_eq!(run(&chunks, thinking, tools), whole, "chunks {chunks:?}");

    let mut tracker = DsmlDecodeTracker::new();
    for c in &chunks {
        tracker.push(c);
    }
});
