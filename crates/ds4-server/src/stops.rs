//! Stop strings over streamed text. Text that might be the start of a stop string is held
//! back until the next piece decides it, so a stop string never reaches the client, not even
//! split across two tokens.

/// Streams text through, cutting it at the earliest stop string.
#[derive(Debug, Default)]
pub struct StopMatcher {
    stops: Vec<String>,
    held: String,
    stopped: bool,
}

impl StopMatcher {
    /// Empty stop strings are ignored (they would match everywhere).
    pub fn new(stops: &[String]) -> Self {
        StopMatcher {
            stops: stops.iter().filter(|s| !s.is_empty()).cloned().collect(),
            held: String::new(),
            stopped: false,
        }
    }

    /// Whether a stop string has matched; later pushes return nothing.
    pub fn stopped(&self) -> bool {
        self.stopped
    }

    /// Adds text; returns the part that is safe to emit now.
    pub fn push(&mut self, text: &str) -> String {
        if self.stopped {
            return String::new();
        }
        if self.stops.is_empty() {
            return text.to_string();
        }
        self.held.push_str(text);
        if let Some(pos) = self.earliest_match() {
            self.stopped = true;
            let out = self.held[..pos].to_string();
            self.held.clear();
            return out;
        }
        let keep_from = self.partial_match_start();
        let out = self.held[..keep_from].to_string();
        self.held.drain(..keep_from);
        out
    }

    /// The held-back text at the end of the generation (no stop string completed it).
    pub fn finish(&mut self) -> String {
        std::mem::take(&mut self.held)
    }

    fn earliest_match(&self) -> Option<usize> {
        self.stops
            .iter()
            .filter_map(|s| self.held.find(s.as_str()))
            .min()
    }

    /// The first byte of the longest suffix of `held` that is a proper prefix of a stop string.
    fn partial_match_start(&self) -> usize {
        let held = self.held.as_str();
        for (start, _) in held.char_indices() {
            let tail = &held[start..];
            if self
                .stops
                .iter()
                .any(|s| s.len() > tail.len() && s.starts_with(tail))
            {
                return start;
            }
        }
        held.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(stops: &[&str], pieces: &[&str]) -> (String, bool) {
        let stops: Vec<String> = stops.iter().map(|s| s.to_string()).collect();
        let mut m = StopMatcher::new(&stops);
        let mut out = String::new();
        for p in pieces {
            out += &m.push(p);
        }
        if !m.stopped() {
            out += &m.finish();
        }
        (out, m.stopped())
    }

    #[test]
    fn stop_split_across_pieces_is_never_emitted() {
        assert_eq!(
            run(&["END"], &["hello E", "N", "D tail"]),
            ("hello ".into(), true)
        );
    }

    #[test]
    fn earliest_of_several_stops_wins() {
        assert_eq!(run(&["zz", "b"], &["a b c zz"]), ("a ".into(), true));
    }

    #[test]
    fn held_back_prefix_is_released_when_it_does_not_complete() {
        let stops = vec!["END".to_string()];
        let mut m = StopMatcher::new(&stops);
        assert_eq!(m.push("x E"), "x ");
        assert_eq!(m.push("x"), "Ex");
        assert_eq!(m.push("EN"), "");
        assert_eq!(m.finish(), "EN");
        assert!(!m.stopped());
    }

    #[test]
    fn multibyte_text_is_cut_on_char_boundaries() {
        assert_eq!(run(&["é!"], &["café", "é", "!x"]), ("café".into(), true));
        assert_eq!(run(&["ü"], &["日本", "語"]), ("日本語".into(), false));
    }

    #[test]
    fn no_stops_passes_everything_through() {
        assert_eq!(run(&[], &["a", "b"]), ("ab".into(), false));
        assert_eq!(run(&[""], &["a", "b"]), ("ab".into(), false));
    }
}
