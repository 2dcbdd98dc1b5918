//! DeepSeek V4 text in and out: the tokenizer, the chat template, DSML tool calls and the
//! sampler. Everything here is exact with ds4 (see `ds4-spec.md` §4 and §8).

mod bpe;
pub mod chat;
pub mod dsml;
mod dsml_forcing;
pub mod logprobs;
mod pretokenize;
pub mod sampler;
pub mod tokenizer;

pub use chat::{render_chat, ChatPrompt, Message, Role, ThinkMode, ToolCall};
pub use dsml::{DsmlStreamParser, ParsedMessage, StreamEvent};
pub use sampler::{Sampler, SamplerParams};
pub use tokenizer::{Detokenizer, SpecialIds, Tokenizer, TokenizerError};
