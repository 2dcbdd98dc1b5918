//! The text side of generation: sampled token bytes in, API-neutral [`GenEvent`]s out.
//! UTF-8 assembly, the DSML stream parser (reasoning / content / tool calls), stop strings
//! with hold-back, tool-call ids, and the finish decision all live here, so the engine's
//! token loop and the tests on recorded model outputs share one path.

use ds4_text::dsml::{DsmlStreamParser, StreamEvent};

use crate::ids::tool_call_id;
use crate::job::{FinishReason, GenEvent, ToolCallOut, ToolIdStyle};
use crate::runner::Utf8Stream;
use crate::stops::StopMatcher;

/// The finished output of one generation.
#[derive(Debug)]
pub struct OutputSummary {
    pub finish: FinishReason,
    /// Everything sampled, as text (what `--trace` records).
    pub raw_text: String,
    /// Ids of the emitted tool calls with the exact DSML block they came from.
    pub tool_blocks: Vec<(String, String)>,
    /// The reasoning and content as sent to the client.
    pub reasoning: String,
    pub content: String,
}

/// Sampled output → events.
pub struct OutputStream {
    utf8: Utf8Stream,
    parser: DsmlStreamParser,
    stops: StopMatcher,
    tools_active: bool,
    id_style: ToolIdStyle,
    raw: String,
    /// Id of each tool call, by parser index.
    ids: Vec<String>,
    reasoning: String,
    content: String,
}

impl OutputStream {
    pub fn new(
        thinking: bool,
        tools_active: bool,
        stops: &[String],
        id_style: ToolIdStyle,
    ) -> Self {
        OutputStream {
            utf8: Utf8Stream::default(),
            parser: DsmlStreamParser::new(thinking, tools_active),
            stops: StopMatcher::new(stops),
            tools_active,
            id_style,
            raw: String::new(),
            ids: Vec::new(),
            reasoning: String::new(),
            content: String::new(),
        }
    }

    /// Adds the bytes of one sampled token.
    pub fn push_bytes(&mut self, bytes: &[u8]) -> Vec<GenEvent> {
        let text = self.utf8.push(bytes);
        self.push_text(&text)
    }

    /// Adds sampled text.
    pub fn push_text(&mut self, text: &str) -> Vec<GenEvent> {
        if text.is_empty() || self.stops.stopped() {
            return Vec::new();
        }
        self.raw.push_str(text);
        let parsed = self.parser.push(text);
        self.convert(parsed)
    }

    /// Why generation must end now, if the output decides it: a stop string matched, or
    /// (tools active) a tool-call block closed after the reasoning.
    pub fn finish_now(&self) -> Option<FinishReason> {
        if self.stops.stopped() {
            Some(FinishReason::Stop)
        } else if self.tools_active && self.parser.tool_block_closed() {
            Some(FinishReason::ToolCalls)
        } else {
            None
        }
    }

    /// Ends the stream. `ended` says why the token loop stopped when the output did not decide
    /// it (EOS → Stop, budget → Length). Returns the last events and the summary.
    pub fn finish(mut self, ended: FinishReason) -> (Vec<GenEvent>, OutputSummary) {
        let mut events = Vec::new();
        let tail = self.utf8.finish();
        if !tail.is_empty() {
            events.extend(self.push_text(&tail));
        }
        let finish = match self.finish_now() {
            Some(f) => f,
            // The model ended its turn inside a tool block: ds4 reports an error.
            None if ended == FinishReason::Stop && self.parser.in_tool_block() => {
                FinishReason::Error
            }
            None => ended,
        };
        if !self.stops.stopped() {
            // Text the parser held back (a possible tag start) is decided now.
            let last = self.parser.flush();
            events.extend(self.convert(last));
            let rest = self.stops.finish();
            if !rest.is_empty() {
                self.content.push_str(&rest);
                events.push(GenEvent::Content(rest));
            }
        }
        let parsed = self.parser.finish();
        let mut tool_blocks = Vec::new();
        if let Some(block) = parsed.raw_dsml.as_ref() {
            for id in self.ids.iter().filter(|id| !id.is_empty()) {
                tool_blocks.push((id.clone(), block.clone()));
            }
        }
        (
            events,
            OutputSummary {
                finish,
                raw_text: self.raw,
                tool_blocks,
                reasoning: self.reasoning,
                content: self.content,
            },
        )
    }

    fn convert(&mut self, parsed: Vec<StreamEvent>) -> Vec<GenEvent> {
        let mut out = Vec::new();
        for ev in parsed {
            match ev {
                StreamEvent::Reasoning(t) => {
                    self.reasoning.push_str(&t);
                    out.push(GenEvent::Reasoning(t));
                }
                StreamEvent::Content(t) => {
                    if self.stops.stopped() {
                        continue;
                    }
                    let t = self.stops.push(&t);
                    if !t.is_empty() {
                        self.content.push_str(&t);
                        out.push(GenEvent::Content(t));
                    }
                }
                StreamEvent::ToolCallStart { index, name } => {
                    let id = tool_call_id(self.id_style);
                    while self.ids.len() <= index {
                        self.ids.push(String::new());
                    }
                    self.ids[index] = id.clone();
                    out.push(GenEvent::ToolCallStart { index, id, name });
                }
                StreamEvent::ToolCallArgs { index, fragment } => {
                    out.push(GenEvent::ToolCallArgs { index, fragment });
                }
                StreamEvent::ToolCallEnd { index, call } => {
                    let id = self.ids.get(index).cloned().unwrap_or_default();
                    out.push(GenEvent::ToolCallEnd {
                        index,
                        call: ToolCallOut {
                            id,
                            name: call.name,
                            arguments: call.arguments,
                        },
                    });
                }
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(
        text: &str,
        tools: bool,
        stops: &[&str],
        ended: FinishReason,
    ) -> (Vec<GenEvent>, OutputSummary) {
        let stops: Vec<String> = stops.iter().map(|s| s.to_string()).collect();
        let mut out = OutputStream::new(false, tools, &stops, ToolIdStyle::Call);
        let mut events = Vec::new();
        for ch in text.chars() {
            events.extend(out.push_text(&ch.to_string()));
            if out.finish_now().is_some() {
                break;
            }
        }
        let (tail, summary) = out.finish(ended);
        events.extend(tail);
        (events, summary)
    }

    fn content(events: &[GenEvent]) -> String {
        events
            .iter()
            .filter_map(|e| match e {
                GenEvent::Content(t) => Some(t.as_str()),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn turn_ending_inside_a_tool_block_finishes_with_error() {
        let text = "Sure.\n\n<｜DSML｜tool_calls>\n<｜DSML｜invoke name=\"f\">\n";
        let (_, s) = run(text, true, &[], FinishReason::Stop);
        assert_eq!(s.finish, FinishReason::Error);
        // Out of budget inside the block is still `length`.
        let (_, s) = run(text, true, &[], FinishReason::Length);
        assert_eq!(s.finish, FinishReason::Length);
    }

    #[test]
    fn without_tools_dsml_is_plain_content() {
        let text = "a <｜DSML｜tool_calls> b";
        let (events, s) = run(text, false, &[], FinishReason::Stop);
        assert_eq!(s.finish, FinishReason::Stop);
        assert_eq!(content(&events), text);
        assert!(s.tool_blocks.is_empty());
    }

    #[test]
    fn stop_string_ends_the_output_and_is_not_sent() {
        let (events, s) = run("one two STOP three", false, &["STOP"], FinishReason::Length);
        assert_eq!(s.finish, FinishReason::Stop);
        assert_eq!(content(&events), "one two ");
        assert_eq!(s.content, "one two ");
    }
}
