//! DSML structure forcing (ds4's dsml_decode_tracker): while the model writes a tool block, its
//! tags, attributes, whitespace and JSON punctuation are sampled greedily; only the payload
//! (bodies of `string="true"` parameters and JSON string literals) is sampled normally.
//!
//! The tracker follows the generated text (all of it, reasoning included, as ds4 does) and says
//! where the next token falls. It is a forgiving recogniser, not a validator: malformed DSML
//! is left to the parser. One deliberate difference from ds4: a lone `<` at the end of a value
//! is not stepped over, so a closing tag sampled as `<` + `/…` is still recognised.

/// Where the next sampled token falls.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DsmlDecodeState {
    /// Not inside a tool block.
    Outside,
    /// Tags, attributes, whitespace between them, or a possible partial closing tag.
    Structural,
    /// The body of a `string="true"` parameter.
    StringBody,
    /// A JSON value outside its string literals.
    JsonStructural,
    /// Inside a JSON string literal.
    JsonString,
}

impl DsmlDecodeState {
    /// Inside a tool block (any state but Outside).
    pub fn in_tool_call(self) -> bool {
        self != DsmlDecodeState::Outside
    }

    /// Whether the next token must be the argmax (temperature 0).
    pub fn forces_greedy(self) -> bool {
        matches!(
            self,
            DsmlDecodeState::Structural | DsmlDecodeState::JsonStructural
        )
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Mode {
    Search,
    Structural,
    StringBody,
    JsonParam,
    Done,
}

/// Tag spellings: `<｜DSML｜…>`, `<DSML｜…>` (first bar missing), plain `<tool_calls>` XML.
struct Syntax {
    calls_start: &'static [u8],
    calls_end: &'static [u8],
    invoke_start: &'static [u8],
    invoke_end: &'static [u8],
    param_start: &'static [u8],
    param_end: &'static [u8],
}

const SYNTAXES: [Syntax; 3] = [
    Syntax {
        calls_start: "<｜DSML｜tool_calls>".as_bytes(),
        calls_end: "</｜DSML｜tool_calls>".as_bytes(),
        invoke_start: "<｜DSML｜invoke".as_bytes(),
        invoke_end: "</｜DSML｜invoke>".as_bytes(),
        param_start: "<｜DSML｜parameter".as_bytes(),
        param_end: "</｜DSML｜parameter>".as_bytes(),
    },
    Syntax {
        calls_start: "<DSML｜tool_calls>".as_bytes(),
        calls_end: "</DSML｜tool_calls>".as_bytes(),
        invoke_start: "<DSML｜invoke".as_bytes(),
        invoke_end: "</DSML｜invoke>".as_bytes(),
        param_start: "<DSML｜parameter".as_bytes(),
        param_end: "</DSML｜parameter>".as_bytes(),
    },
    Syntax {
        calls_start: b"<tool_calls>",
        calls_end: b"</tool_calls>",
        invoke_start: b"<invoke",
        invoke_end: b"</invoke>",
        param_start: b"<parameter",
        param_end: b"</parameter>",
    },
];

/// Follows generated text and classifies the position of the next token.
#[derive(Clone, Debug)]
pub struct DsmlDecodeTracker {
    text: Vec<u8>,
    mode: Mode,
    syntax: usize,
    pos: usize,
    json_in_string: bool,
    json_escaped: bool,
    state: DsmlDecodeState,
}

impl Default for DsmlDecodeTracker {
    fn default() -> Self {
        DsmlDecodeTracker::new()
    }
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    if needle.is_empty() || hay.len() < needle.len() {
        return None;
    }
    hay.windows(needle.len()).position(|w| w == needle)
}

fn is_space(b: u8) -> bool {
    matches!(b, b' ' | b'\t' | b'\n' | 0x0b | 0x0c | b'\r')
}

/// `attr="true"` for the `string` attribute of the tag `tag`.
fn string_attr_is_true(tag: &[u8]) -> bool {
    let pat = b"string=\"";
    let Some(at) = find(tag, pat) else {
        return false;
    };
    let value = &tag[at + pat.len()..];
    let Some(end) = value.iter().position(|&b| b == b'"') else {
        return false;
    };
    // Entity-decoded comparison: "true" has no entities, so only the literal matches.
    &value[..end] == b"true"
}

impl DsmlDecodeTracker {
    pub fn new() -> DsmlDecodeTracker {
        DsmlDecodeTracker {
            text: Vec::new(),
            mode: Mode::Search,
            syntax: 0,
            pos: 0,
            json_in_string: false,
            json_escaped: false,
            state: DsmlDecodeState::Outside,
        }
    }

    /// The state for the next token.
    pub fn state(&self) -> DsmlDecodeState {
        self.state
    }

    /// Appends the text of a sampled token and returns the state for the next one.
    pub fn push(&mut self, piece: &str) -> DsmlDecodeState {
        self.text.extend_from_slice(piece.as_bytes());
        self.update();
        self.state
    }

    fn full_at(&self, lit: &[u8]) -> bool {
        self.text[self.pos..].starts_with(lit)
    }

    /// The rest of the text is a proper prefix of `lit`, at least `min` bytes long.
    fn partial_at(&self, lit: &[u8], min: usize) -> bool {
        let rest = &self.text[self.pos..];
        rest.len() >= min && rest.len() < lit.len() && lit.starts_with(rest)
    }

    fn update(&mut self) {
        loop {
            match self.mode {
                Mode::Done => {
                    self.state = DsmlDecodeState::Outside;
                    return;
                }
                Mode::Search => {
                    let rest = &self.text[self.pos..];
                    let found = SYNTAXES
                        .iter()
                        .enumerate()
                        .filter_map(|(i, s)| find(rest, s.calls_start).map(|at| (at, i)))
                        .min();
                    let Some((at, syntax)) = found else {
                        // Keep enough bytes to find a start tag split across tokens.
                        let hold = SYNTAXES
                            .iter()
                            .map(|s| s.calls_start.len())
                            .max()
                            .unwrap_or(0);
                        self.pos = self.text.len().saturating_sub(hold);
                        self.state = DsmlDecodeState::Outside;
                        return;
                    };
                    self.syntax = syntax;
                    self.pos += at + SYNTAXES[syntax].calls_start.len();
                    self.mode = Mode::Structural;
                    self.state = DsmlDecodeState::Structural;
                }
                Mode::StringBody => {
                    let end = SYNTAXES[self.syntax].param_end;
                    loop {
                        if self.pos >= self.text.len() {
                            self.state = DsmlDecodeState::StringBody;
                            return;
                        }
                        if self.full_at(end) {
                            self.pos += end.len();
                            self.mode = Mode::Structural;
                            break;
                        }
                        if self.partial_at(end, 1) {
                            // Two or more bytes of the closing tag: force it. A lone `<` is still
                            // payload, but the position stays on it so the tag is recognised once
                            // complete (ds4 steps past it and then misses the tag).
                            self.state = if self.partial_at(end, 2) {
                                DsmlDecodeState::Structural
                            } else {
                                DsmlDecodeState::StringBody
                            };
                            return;
                        }
                        self.pos += 1;
                    }
                }
                Mode::JsonParam => {
                    let end = SYNTAXES[self.syntax].param_end;
                    loop {
                        if self.pos >= self.text.len() {
                            self.state = if self.json_in_string {
                                DsmlDecodeState::JsonString
                            } else {
                                DsmlDecodeState::JsonStructural
                            };
                            return;
                        }
                        if !self.json_in_string {
                            if self.full_at(end) {
                                self.pos += end.len();
                                self.mode = Mode::Structural;
                                break;
                            }
                            if self.partial_at(end, 1) {
                                // As for string bodies: a lone `<` keeps the JSON state.
                                self.state = if self.partial_at(end, 2) {
                                    DsmlDecodeState::Structural
                                } else {
                                    DsmlDecodeState::JsonStructural
                                };
                                return;
                            }
                        }
                        let c = self.text[self.pos];
                        self.pos += 1;
                        if self.json_in_string {
                            if self.json_escaped {
                                self.json_escaped = false;
                            } else if c == b'\\' {
                                self.json_escaped = true;
                            } else if c == b'"' {
                                self.json_in_string = false;
                            }
                        } else if c == b'"' {
                            self.json_in_string = true;
                        }
                    }
                }
                Mode::Structural => {
                    if !self.structural_step() {
                        return;
                    }
                }
            }
        }
    }

    /// Walks tags; returns true when it entered a value mode (to continue there), false when
    /// it needs more text or the block closed.
    fn structural_step(&mut self) -> bool {
        let syn = &SYNTAXES[self.syntax];
        loop {
            while self.pos < self.text.len() && is_space(self.text[self.pos]) {
                self.pos += 1;
            }
            self.state = DsmlDecodeState::Structural;
            if self.pos >= self.text.len() {
                return false;
            }
            if self.full_at(syn.calls_end) {
                self.pos += syn.calls_end.len();
                self.mode = Mode::Done;
                self.state = DsmlDecodeState::Outside;
                return false;
            }
            if self.full_at(syn.invoke_end) {
                self.pos += syn.invoke_end.len();
                continue;
            }
            let tag_end = self.text[self.pos..].iter().position(|&b| b == b'>');
            if self.full_at(syn.invoke_start) {
                let Some(gt) = tag_end else { return false };
                self.pos += gt + 1;
                continue;
            }
            if self.full_at(syn.param_start) {
                let Some(gt) = tag_end else { return false };
                let is_string = string_attr_is_true(&self.text[self.pos..self.pos + gt + 1]);
                self.pos += gt + 1;
                if is_string {
                    self.mode = Mode::StringBody;
                    self.state = DsmlDecodeState::StringBody;
                } else {
                    self.mode = Mode::JsonParam;
                    self.json_in_string = false;
                    self.json_escaped = false;
                    self.state = DsmlDecodeState::JsonStructural;
                }
                return true;
            }
            // A partial tag or unexpected text: structural until more arrives.
            return false;
        }
    }
}
