//! Request bodies are untrusted: the OpenAI and Anthropic request parsers (the JSON object,
//! messages, tools, thinking mode, sampling and stop fields, as `ds4 serve`'s handlers call
//! them) answer any body with either a prompt or a client error (4xx), never a panic or a
//! server error, and every accepted request renders to a prompt.
//!
//! Input: byte 0's low bit picks the API (0 OpenAI chat completions, 1 Anthropic messages),
//! the rest is the body.
#![no_main]
use ds4_server::api::common::{parse_json_object, raw_tools, resolve_think};
use ds4_server::api::errors::{ApiError, Flavor};
use ds4_server::api::fields::Fields;
use ds4_server::api::{anthropic, openai};
use ds4_text::chat::{render_chat, ChatPrompt};
use libfuzzer_sys::fuzz_target;

fn prompt_of(bytes: &[u8], flavor: Flavor) -> Result<ChatPrompt, ApiError> {
    let obj = parse_json_object(bytes, flavor)?;
    let f = Fields::new(&obj, flavor);
    let (messages, tools) = match flavor {
        Flavor::OpenAi => (openai::parse_messages(&f)?, openai::parse_tools(bytes, &f)?),
        Flavor::Anthropic => (
            anthropic::parse_messages(&f)?,
            raw_tools(bytes, flavor)?
                .into_iter()
                .map(|r| r.get().to_string())
                .collect(),
        ),
    };
    let think = resolve_think(&f, None)?;
    f.sampling()?;
    f.stop("stop")?;
    Ok(ChatPrompt {
        messages,
        tools,
        think,
        ctx: 65536,
    })
}

fuzz_target!(|data: &[u8]| {
    let Some((&api, body)) = data.split_first() else {
        return;
    };
    let flavor = if api & 1 == 0 {
        Flavor::OpenAi
    } else {
        Flavor::Anthropic
    };
    match prompt_of(body, flavor) {
        Ok(prompt) => assert!(!render_chat(&prompt).is_empty()),
        Err(e) => assert!(e.status.is_client_error(), "{e:?}"),
    }
});
