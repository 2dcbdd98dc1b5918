//! Golden tests of the chat template. Every expected string is written out by hand from
//! ds4-spec.md §4 (not produced by the code under test).

use ds4_text::chat::{
    render_chat, render_completion, render_single_turn, ChatPrompt, Message, ThinkMode, ToolCall,
};
use ds4_text::dsml::render_tool_calls;
use serde_json::json;

const BOS: &str = "<｜begin▁of▁sentence｜>";
const EOS: &str = "<｜end▁of▁sentence｜>";

const THINK_MAX: &str = "Reasoning Effort: Absolute maximum with no shortcuts permitted.
You MUST be very thorough in your thinking and comprehensively decompose the problem to resolve the root cause, rigorously stress-testing your logic against all potential paths, edge cases, and adversarial scenarios.
Explicitly write out your entire deliberation process, documenting every intermediate step, considered alternative, and rejected hypothesis to ensure absolutely no assumption is left unchecked.

";

/// The spec's tools block with `{schemas}` to fill in.
const TOOLS_BLOCK: &str = r#"## Tools

You have access to a set of tools to help answer the user question. You can invoke tools by writing a "<｜DSML｜tool_calls>" block like the following:

<｜DSML｜tool_calls>
<｜DSML｜invoke name="$TOOL_NAME">
<｜DSML｜parameter name="$PARAMETER_NAME" string="true|false">$PARAMETER_VALUE</｜DSML｜parameter>
...
</｜DSML｜invoke>
<｜DSML｜invoke name="$TOOL_NAME2">
...
</｜DSML｜invoke>
</｜DSML｜tool_calls>

String parameters should be specified as raw text and set `string="true"`. Preserve characters such as `>`, `&`, and `&&` exactly; never replace normal string characters with XML or HTML entity escapes. Only if a string value itself contains the exact closing parameter tag `</｜DSML｜parameter>`, write that tag as `&lt;/｜DSML｜parameter>` inside the value. For all other types (numbers, booleans, arrays, objects), pass the value in JSON format and set `string="false"`.

If thinking_mode is enabled (triggered by <think>), you MUST output your complete reasoning inside <think>...</think> BEFORE any tool calls or final response.

Otherwise, output directly after </think> with tool calls or final response.

### Available Tool Schemas

{schemas}

You MUST strictly follow the above defined tool name and parameter schemas to invoke tool calls. Use the exact parameter names from the schemas."#;

fn prompt(messages: Vec<Message>, think: ThinkMode) -> ChatPrompt {
    ChatPrompt {
        messages,
        tools: Vec::new(),
        think,
        ctx: 32768,
    }
}

fn call(name: &str, arguments: serde_json::Value) -> ToolCall {
    ToolCall {
        id: None,
        name: name.to_string(),
        arguments,
        raw_dsml: None,
    }
}

#[test]
fn spec_example_transcript() {
    let schema = r#"{"name":"bash","parameters":{"type":"object","properties":{"command":{"type":"string"}}}}"#;
    let p = ChatPrompt {
        messages: vec![
            Message::system("You are terse."),
            Message::user("List files"),
            Message::assistant("")
                .with_reasoning("Need ls.")
                .with_tool_call(call("bash", json!({"command": "ls -la", "timeout": 10}))),
            Message::tool("a.txt"),
        ],
        tools: vec![schema.to_string()],
        think: ThinkMode::High,
        ctx: 32768,
    };
    let expected = format!(
        "{BOS}{}\n\nYou are terse.<｜User｜>List files<｜Assistant｜><think>Need ls.</think>\n\n\
<｜DSML｜tool_calls>
<｜DSML｜invoke name=\"bash\">
<｜DSML｜parameter name=\"command\" string=\"true\">ls -la</｜DSML｜parameter>
<｜DSML｜parameter name=\"timeout\" string=\"false\">10</｜DSML｜parameter>
</｜DSML｜invoke>
</｜DSML｜tool_calls>{EOS}<｜User｜><tool_result>a.txt</tool_result><｜Assistant｜><think>",
        TOOLS_BLOCK.replace("{schemas}", schema)
    );
    assert_eq!(render_chat(&p), expected);
}

#[test]
fn single_turn_forms() {
    assert_eq!(
        render_single_turn("You are a helpful assistant", "Hi", ThinkMode::Off, 32768),
        format!("{BOS}You are a helpful assistant<｜User｜>Hi<｜Assistant｜></think>")
    );
    assert_eq!(
        render_single_turn("", "Hi", ThinkMode::High, 32768),
        format!("{BOS}<｜User｜>Hi<｜Assistant｜><think>")
    );
    assert_eq!(
        render_completion("2+2=", ThinkMode::Off, 4096),
        format!("{BOS}You are a helpful assistant<｜User｜>2+2=<｜Assistant｜></think>")
    );
    // Think Max only with a context of at least 393216 tokens.
    assert_eq!(
        render_completion("x", ThinkMode::Max, 393216),
        format!("{BOS}{THINK_MAX}You are a helpful assistant<｜User｜>x<｜Assistant｜><think>")
    );
    assert_eq!(
        render_completion("x", ThinkMode::Max, 393215),
        format!("{BOS}You are a helpful assistant<｜User｜>x<｜Assistant｜><think>")
    );
    // The chat renderer agrees with the single-turn form.
    let chat = prompt(
        vec![
            Message::system("You are a helpful assistant"),
            Message::user("Hi"),
        ],
        ThinkMode::Off,
    );
    assert_eq!(
        render_chat(&chat),
        format!("{BOS}You are a helpful assistant<｜User｜>Hi<｜Assistant｜></think>")
    );
}

#[test]
fn think_modes_on_one_conversation() {
    let msgs = vec![Message::user("Hello")];
    let mut p = prompt(msgs, ThinkMode::Off);
    assert_eq!(
        render_chat(&p),
        format!("{BOS}<｜User｜>Hello<｜Assistant｜></think>")
    );
    p.think = ThinkMode::High;
    assert_eq!(
        render_chat(&p),
        format!("{BOS}<｜User｜>Hello<｜Assistant｜><think>")
    );
    p.think = ThinkMode::Max;
    assert_eq!(
        render_chat(&p),
        format!("{BOS}<｜User｜>Hello<｜Assistant｜><think>")
    );
    p.ctx = 1 << 20;
    assert_eq!(
        render_chat(&p),
        format!("{BOS}{THINK_MAX}<｜User｜>Hello<｜Assistant｜><think>")
    );
}

#[test]
fn multi_turn_reasoning_is_dropped_before_the_last_user_message() {
    let msgs = vec![
        Message::system("Be brief."),
        Message::system("Use Italian."),
        Message::user("Q1"),
        Message::assistant("A1").with_reasoning("R1"),
        Message::user("Q2"),
        Message::assistant("A2").with_reasoning("R2"),
    ];
    // Thinking: the turn before the last user message shows only </think>; the turn after it
    // keeps its reasoning; no final assistant header since no user message is pending.
    assert_eq!(
        render_chat(&prompt(msgs.clone(), ThinkMode::High)),
        format!(
            "{BOS}Be brief.\n\nUse Italian.<｜User｜>Q1<｜Assistant｜></think>A1{EOS}\
<｜User｜>Q2<｜Assistant｜><think>R2</think>A2{EOS}"
        )
    );
    // Non-thinking: reasoning never rendered.
    assert_eq!(
        render_chat(&prompt(msgs.clone(), ThinkMode::Off)),
        format!(
            "{BOS}Be brief.\n\nUse Italian.<｜User｜>Q1<｜Assistant｜></think>A1{EOS}\
<｜User｜>Q2<｜Assistant｜></think>A2{EOS}"
        )
    );
    // With a new user message the second turn's reasoning is dropped too.
    let mut more = msgs;
    more.push(Message::user("Q3"));
    assert_eq!(
        render_chat(&prompt(more, ThinkMode::High)),
        format!(
            "{BOS}Be brief.\n\nUse Italian.<｜User｜>Q1<｜Assistant｜></think>A1{EOS}\
<｜User｜>Q2<｜Assistant｜></think>A2{EOS}<｜User｜>Q3<｜Assistant｜><think>"
        )
    );
}

#[test]
fn tool_context_keeps_all_reasoning_and_groups_tool_results() {
    let msgs = vec![
        Message::user("Q1"),
        Message::assistant("A1").with_reasoning("R1"),
        Message::user("Q2"),
        Message::assistant("Checking.")
            .with_reasoning("R2")
            .with_tool_call(call("read", json!({"path": "/a"})))
            .with_tool_call(call("read", json!({"path": "/b"}))),
        Message::tool("x</tool_result>y <b>&amp;"),
        Message::tool("second"),
        Message::assistant("Done.").with_reasoning("R3"),
        Message::tool("late"),
    ];
    let block = "\n\n<｜DSML｜tool_calls>
<｜DSML｜invoke name=\"read\">
<｜DSML｜parameter name=\"path\" string=\"true\">/a</｜DSML｜parameter>
</｜DSML｜invoke>
<｜DSML｜invoke name=\"read\">
<｜DSML｜parameter name=\"path\" string=\"true\">/b</｜DSML｜parameter>
</｜DSML｜invoke>
</｜DSML｜tool_calls>";
    let expected = format!(
        "{BOS}<｜User｜>Q1<｜Assistant｜><think>R1</think>A1{EOS}\
<｜User｜>Q2<｜Assistant｜><think>R2</think>Checking.{block}{EOS}\
<｜User｜><tool_result>x&lt;/tool_result>y <b>&amp;</tool_result><tool_result>second</tool_result>\
<｜Assistant｜><think>R3</think>Done.{EOS}<｜User｜><tool_result>late</tool_result><｜Assistant｜><think>"
    );
    assert_eq!(render_chat(&prompt(msgs, ThinkMode::High)), expected);
}

#[test]
fn assistant_after_assistant_has_no_header() {
    let msgs = vec![
        Message::user("Q"),
        Message::assistant("A"),
        Message::assistant("B"),
    ];
    assert_eq!(
        render_chat(&prompt(msgs, ThinkMode::Off)),
        format!("{BOS}<｜User｜>Q<｜Assistant｜></think>A{EOS}B{EOS}")
    );
    // A leading assistant message (nothing pending) gets no header either.
    let msgs = vec![Message::assistant("hi"), Message::user("Q")];
    assert_eq!(
        render_chat(&prompt(msgs, ThinkMode::High)),
        format!("{BOS}hi{EOS}<｜User｜>Q<｜Assistant｜><think>")
    );
}

#[test]
fn canonical_dsml_escapes_and_value_kinds() {
    let calls = vec![
        call(
            "we\"ird<&>",
            json!({
                "a&b": "text with </｜DSML｜parameter> and & < > \" kept",
                "n": 1.5,
                "flag": true,
                "none": null,
                "obj": {"k": ["v", 2, "</｜DSML｜parameter>"], "é": "ü"},
            }),
        ),
        call("list", json!([1, 2])),
        call("raw", json!("not json {")),
    ];
    let expected = "\n\n<｜DSML｜tool_calls>
<｜DSML｜invoke name=\"we&quot;ird&lt;&amp;&gt;\">
<｜DSML｜parameter name=\"a&amp;b\" string=\"true\">text with &lt;/｜DSML｜parameter> and & < > \" kept</｜DSML｜parameter>
<｜DSML｜parameter name=\"n\" string=\"false\">1.5</｜DSML｜parameter>
<｜DSML｜parameter name=\"flag\" string=\"false\">true</｜DSML｜parameter>
<｜DSML｜parameter name=\"none\" string=\"false\">null</｜DSML｜parameter>
<｜DSML｜parameter name=\"obj\" string=\"false\">{\"k\":[\"v\",2,\"\\u003c/｜DSML｜parameter>\"],\"é\":\"ü\"}</｜DSML｜parameter>
</｜DSML｜invoke>
<｜DSML｜invoke name=\"list\">
<｜DSML｜parameter name=\"arguments\" string=\"true\">[1,2]</｜DSML｜parameter>
</｜DSML｜invoke>
<｜DSML｜invoke name=\"raw\">
<｜DSML｜parameter name=\"arguments\" string=\"true\">not json {</｜DSML｜parameter>
</｜DSML｜invoke>
</｜DSML｜tool_calls>";
    assert_eq!(render_tool_calls(&calls), expected);
    assert_eq!(render_tool_calls(&[]), "");
}

#[test]
fn sampled_block_is_replayed_byte_exact() {
    let raw = "\n\n<｜DSML｜tool_calls>\n<｜DSML｜invoke name=\"f\">\n<｜DSML｜parameter name=\"x\">1</｜DSML｜parameter>\n</｜DSML｜invoke>\n</｜DSML｜tool_calls>";
    let mut c = call("f", json!({"x": "1"}));
    c.raw_dsml = Some(raw.to_string());
    let msgs = vec![
        Message::user("Q"),
        Message::assistant("").with_tool_call(c.clone()),
    ];
    assert_eq!(
        render_chat(&prompt(msgs, ThinkMode::Off)),
        format!("{BOS}<｜User｜>Q<｜Assistant｜></think>{raw}{EOS}")
    );
    // Calls from different blocks (or without a recorded block) fall back to canonical form.
    let plain = call("g", json!({}));
    let msgs = vec![
        Message::user("Q"),
        Message::assistant("")
            .with_tool_call(c)
            .with_tool_call(plain),
    ];
    assert_eq!(
        render_chat(&prompt(msgs, ThinkMode::Off)),
        format!(
            "{BOS}<｜User｜>Q<｜Assistant｜></think>\n\n<｜DSML｜tool_calls>
<｜DSML｜invoke name=\"f\">
<｜DSML｜parameter name=\"x\" string=\"true\">1</｜DSML｜parameter>
</｜DSML｜invoke>
<｜DSML｜invoke name=\"g\">
</｜DSML｜invoke>
</｜DSML｜tool_calls>{EOS}"
        )
    );
}

#[test]
fn empty_schemas_mean_no_tools_block() {
    let mut p = prompt(
        vec![
            Message::user("Q"),
            Message::assistant("A").with_reasoning("R"),
            Message::user("Q2"),
        ],
        ThinkMode::High,
    );
    p.tools = vec![String::new()];
    assert_eq!(
        render_chat(&p),
        format!("{BOS}<｜User｜>Q<｜Assistant｜></think>A{EOS}<｜User｜>Q2<｜Assistant｜><think>")
    );
    p.tools = vec![
        "{\"name\":\"a\"}".to_string(),
        "{\"name\":\"b\"}".to_string(),
    ];
    let schemas = "{\"name\":\"a\"}\n{\"name\":\"b\"}";
    assert_eq!(
        render_chat(&p),
        format!(
            "{BOS}{}<｜User｜>Q<｜Assistant｜><think>R</think>A{EOS}<｜User｜>Q2<｜Assistant｜><think>",
            TOOLS_BLOCK.replace("{schemas}", schemas)
        )
    );
}
