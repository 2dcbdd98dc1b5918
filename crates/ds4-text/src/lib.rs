//! DeepSeek V4 text in and out: the tokenizer, the chat template, DSML tool calls and the
//! sampler. Everything here is exact with ds4 (see `ds4-spec.md` §4 and §8).

pub mod tokenizer;

pub use tokenizer::{Detokenizer, SpecialIds, Tokenizer, TokenizerError};
