//! The DSML stream parser: round trips through the canonical renderer, ds4's parsing rules, and
//! split-independence of the event stream (proptest).

mod common;

use common::dsml::{check_consistent, run};
use ds4_text::chat::ToolCall;
use ds4_text::dsml::{render_tool_calls, DsmlStreamParser, StreamEvent};
use proptest::prelude::*;
use serde_json::{json, Value};

fn call(name: &str, arguments: Value) -> ToolCall {
    ToolCall {
        id: None,
        name: name.to_string(),
        arguments,
        raw_dsml: None,
    }
}

fn tricky_calls() -> Vec<ToolCall> {
    vec![
        call(
            "bash",
            json!({
                "command": "grep -r \"a&b\" . | head -n 5 && echo '<done>' > /tmp/x",
                "timeout": 10,
                "ratio": -2.5e-3,
                "flags": [true, false, null],
                "env": {"LANG": "it_IT.UTF-8", "nested": {"deep": [1, {"x": "y"}]}},
                "tag": "literal </｜DSML｜parameter> inside",
                "json_tag": {"s": "</｜DSML｜parameter>"},
                "unicode": "città 東京 😀 \u{0}\u{1f}",
                "quote\"key": "\"quoted\"\n\ttabs\r\n",
                "empty": "",
                "zero": 0,
                "big": 18446744073709551615u64,
                "none": null,
            }),
        ),
        call("no_args", json!({})),
        call("list_only", json!({"items": []})),
    ]
}

#[test]
fn round_trip_render_then_parse() {
    let calls = tricky_calls();
    let block = render_tool_calls(&calls);
    let text = format!("Let me check.{block}");
    let (events, msg) = run(&[&text], false, true);
    check_consistent(&events, &msg);
    assert!(!msg.malformed);
    assert_eq!(msg.content, "Let me check.");
    assert_eq!(msg.raw_dsml.as_deref(), Some(block.as_str()));
    assert_eq!(msg.tool_calls.len(), calls.len());
    for (got, want) in msg.tool_calls.iter().zip(&calls) {
        assert_eq!(got.name, want.name);
        assert_eq!(got.arguments, want.arguments);
        assert_eq!(got.raw_dsml.as_deref(), Some(block.as_str()));
    }
    // Byte by byte gives the same events.
    let chars: Vec<String> = text.chars().map(String::from).collect();
    let pieces: Vec<&str> = chars.iter().map(String::as_str).collect();
    assert_eq!(run(&pieces, false, true), (events, msg));
}

#[test]
fn spec_example_output_in_thinking_mode() {
    let out = "Need ls.</think>\n\n<｜DSML｜tool_calls>\n<｜DSML｜invoke name=\"bash\">\n\
<｜DSML｜parameter name=\"command\" string=\"true\">ls -la</｜DSML｜parameter>\n\
<｜DSML｜parameter name=\"timeout\" string=\"false\">10</｜DSML｜parameter>\n\
</｜DSML｜invoke>\n</｜DSML｜tool_calls>";
    let (events, msg) = run(&[out], true, true);
    check_consistent(&events, &msg);
    assert_eq!(msg.reasoning.as_deref(), Some("Need ls."));
    assert_eq!(msg.content, "");
    assert_eq!(msg.tool_calls[0].name, "bash");
    assert_eq!(
        msg.tool_calls[0].arguments,
        json!({"command": "ls -la", "timeout": 10})
    );
    assert_eq!(
        msg.raw_dsml.as_deref(),
        Some(&out["Need ls.</think>".len()..])
    );
    let expected_events = vec![
        StreamEvent::Reasoning("Need ls.".into()),
        StreamEvent::ToolCallStart {
            index: 0,
            name: "bash".into(),
        },
        StreamEvent::ToolCallArgs {
            index: 0,
            fragment: "{\"command\":\"ls -la\",\"timeout\":10}".into(),
        },
        StreamEvent::ToolCallEnd {
            index: 0,
            call: msg.tool_calls[0].clone(),
        },
    ];
    assert_eq!(events, expected_events);
}

#[test]
fn thinking_rules() {
    // No </think>: everything is reasoning, even DSML-looking text.
    let (_, msg) = run(&["<think>hmm <｜DSML｜tool_calls> not a call"], true, true);
    assert_eq!(
        msg.reasoning.as_deref(),
        Some("hmm <｜DSML｜tool_calls> not a call")
    );
    assert_eq!(msg.content, "");
    assert!(msg.tool_calls.is_empty() && !msg.malformed);
    // A partial </think> at the end of the input is reasoning text.
    let (_, msg) = run(&["abc</thi"], true, true);
    assert_eq!(msg.reasoning.as_deref(), Some("abc</thi"));
    // Content after </think>; trailing whitespace kept when no block follows.
    let (events, msg) = run(&["r</think>\n\nHello  \n"], true, true);
    check_consistent(&events, &msg);
    assert_eq!(
        (msg.reasoning.as_deref(), msg.content.as_str()),
        (Some("r"), "\n\nHello  \n")
    );
    // Non-thinking: no reasoning at all; </think> is content.
    let (_, msg) = run(&["a</think>b"], false, false);
    assert_eq!((msg.reasoning, msg.content.as_str()), (None, "a</think>b"));
    // Tools inactive: DSML is just text.
    let (_, msg) = run(&["x<｜DSML｜tool_calls>"], false, false);
    assert_eq!(msg.content, "x<｜DSML｜tool_calls>");
}

#[test]
fn loose_forms_ds4_accepts() {
    // Missing `string` → string; untyped parameter holding parameters → object; short and
    // plain tag spellings; entities decoded in strings and attribute values.
    let text = "ok\n<DSML｜tool_calls><DSML｜invoke name=\"a&amp;b\">\
<DSML｜parameter name=\"p\">x &lt;y&gt; &amp;amp; &bogus; &</DSML｜parameter>\
<DSML｜parameter name=\"obj\">\n  <DSML｜parameter name=\"k\" string=\"false\"> [1, 2] </DSML｜parameter>\
<DSML｜parameter name=\"s\">v</DSML｜parameter>\n</DSML｜parameter>\
<DSML｜parameter name=\"e\" string=\"false\">  </DSML｜parameter>\
<DSML｜parameter name=\"bad\" string=\"false\">/not/json</DSML｜parameter>\
</DSML｜invoke></DSML｜tool_calls> trailing ignored";
    let (events, msg) = run(&[text], false, true);
    check_consistent(&events, &msg);
    assert_eq!(msg.content, "ok");
    assert_eq!(msg.tool_calls[0].name, "a&b");
    assert_eq!(
        msg.tool_calls[0].arguments,
        json!({"p": "x <y> &amp; &bogus; &", "obj": {"k": [1, 2], "s": "v"}, "e": null, "bad": "/not/json"})
    );
    let plain = "<tool_calls>\n<invoke name=\"f\">\n<parameter name=\"x\" string=\"true\">1</parameter>\n</invoke>\n</tool_calls>";
    let (_, msg) = run(&[plain], false, true);
    assert_eq!(msg.tool_calls[0].arguments, json!({"x": "1"}));
    assert_eq!(msg.raw_dsml.as_deref(), Some(plain));
}

#[test]
fn malformed_blocks_become_text() {
    let cases = [
        "before\n\n<｜DSML｜tool_calls>\n<｜DSML｜oops name=\"x\">",
        "before\n\n<｜DSML｜tool_calls>\n<｜DSML｜invoke nam=\"x\">\n</｜DSML｜invoke>\n</｜DSML｜tool_calls>",
        "before <｜DSML｜tool_calls><｜DSML｜invoke name=\"x\"><｜DSML｜parameter name=\"a\">1</｜DSML｜parameter>\
<｜DSML｜parameter name=\"a\">2</｜DSML｜parameter></｜DSML｜invoke></｜DSML｜tool_calls>",
        // Unterminated: the input ends inside the block.
        "before\n\n<｜DSML｜tool_calls>\n<｜DSML｜invoke name=\"x\">\n<｜DSML｜parameter name=\"a\" string=\"true\">abc",
    ];
    for text in cases {
        let (events, msg) = run(&[text], false, true);
        check_consistent(&events, &msg);
        assert!(msg.malformed, "{text:?}");
        assert!(msg.tool_calls.is_empty());
        assert_eq!(msg.content, text, "no text lost");
    }
    // Malformed blocks inside thinking output keep the reasoning separate.
    let (_, msg) = run(&["r</think>c <tool_calls> not xml"], true, true);
    assert_eq!(
        (msg.reasoning.as_deref(), msg.content.as_str()),
        (Some("r"), "c <tool_calls> not xml")
    );
    assert!(msg.malformed);
}

#[test]
fn streaming_is_incremental() {
    let mut p = DsmlStreamParser::new(true, true);
    assert_eq!(
        p.push("Thinking hard</th"),
        vec![StreamEvent::Reasoning("Thinking hard".into())]
    );
    assert_eq!(
        p.push("ink>Answer"),
        vec![StreamEvent::Content("Answer".into())]
    );
    // Trailing whitespace and a possible tag start are held back.
    assert_eq!(
        p.push(" is\n\n<｜DS"),
        vec![StreamEvent::Content(" is".into())]
    );
    assert_eq!(
        p.push("ML｜tool_calls>\n<｜DSML｜invoke name=\"f\">"),
        vec![
            StreamEvent::ToolCallStart {
                index: 0,
                name: "f".into()
            },
            StreamEvent::ToolCallArgs {
                index: 0,
                fragment: "{".into()
            },
        ]
    );
    assert_eq!(
        p.push("<｜DSML｜parameter name=\"s\" string=\"true\">a&am"),
        vec![
            StreamEvent::ToolCallArgs {
                index: 0,
                fragment: "\"s\":\"".into()
            },
            StreamEvent::ToolCallArgs {
                index: 0,
                fragment: "a".into()
            }
        ]
    );
    assert_eq!(
        p.push("p;b</｜DSML｜para"),
        vec![StreamEvent::ToolCallArgs {
            index: 0,
            fragment: "&b".into()
        }]
    );
    assert!(p.in_tool_block());
    let events = p.push("meter>\n</｜DSML｜invoke>\n</｜DSML｜tool_calls>");
    assert!(p.tool_block_closed());
    assert_eq!(events.len(), 3, "{events:?}");
    let msg = p.finish();
    assert_eq!(msg.content, "Answer is");
    assert_eq!(msg.tool_calls[0].arguments, json!({"s": "a&b"}));
}

/// Text that mixes prose, think tags, partial and complete DSML pieces and entities.
fn fragment() -> impl Strategy<Value = String> {
    prop_oneof![
        "[a-z &;<>\"\n\t=]{0,12}",
        Just("<think>".to_string()),
        Just("</think>".to_string()),
        Just("\n\n".to_string()),
        Just("<｜DSML｜tool_calls>".to_string()),
        Just("</｜DSML｜tool_calls>".to_string()),
        Just("<｜DSML｜invoke name=\"f\">".to_string()),
        Just("</｜DSML｜invoke>".to_string()),
        Just("<｜DSML｜parameter name=\"a\" string=\"true\">".to_string()),
        Just("<｜DSML｜parameter name=\"b\" string=\"false\">".to_string()),
        Just("<｜DSML｜parameter name=\"c\">".to_string()),
        Just("</｜DSML｜parameter>".to_string()),
        Just("<tool_calls>".to_string()),
        Just("&amp;&lt;&gt;&quot;&apos;&".to_string()),
        Just("[1,{\"x\":2}]".to_string()),
        Just("città 😀".to_string()),
        Just("｜DSML｜".to_string()),
    ]
}

fn json_value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(|n| json!(n)),
        (-1e9f64..1e9).prop_map(|f| json!(f)),
        "[a-zA-Z0-9 &<>\"'\\\\\n\tàé東😀/]{0,16}".prop_map(Value::String),
        Just(Value::String("x </｜DSML｜parameter> y".into())),
    ];
    leaf.prop_recursive(3, 24, 4, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
            prop::collection::btree_map("[a-z]{1,6}", inner, 0..4)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

fn split_at_chars(text: &str, cuts: &[usize]) -> Vec<String> {
    let bounds: Vec<usize> = (0..=text.len())
        .filter(|&i| text.is_char_boundary(i))
        .collect();
    let mut points: Vec<usize> = cuts.iter().map(|c| bounds[c % bounds.len()]).collect();
    points.push(0);
    points.push(text.len());
    points.sort_unstable();
    points.dedup();
    points
        .windows(2)
        .map(|w| text[w[0]..w[1]].to_string())
        .collect()
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 500, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn any_text_any_split_same_result(
        parts in prop::collection::vec(fragment(), 0..24),
        cuts in prop::collection::vec(any::<usize>(), 0..12),
        thinking in any::<bool>(),
        tools in any::<bool>(),
    ) {
        let text: String = parts.concat();
        let whole = run(&[&text], thinking, tools);
        check_consistent(&whole.0, &whole.1);
        let chunks = split_at_chars(&text, &cuts);
        let refs: Vec<&str> = chunks.iter().map(String::as_str).collect();
        prop_assert_eq!(run(&refs, thinking, tools), whole);
    }

    #[test]
    fn rendered_calls_round_trip_under_any_split(
        args in prop::collection::vec(
            (
                "[a-z_]{1,8}",
                prop::collection::btree_map("[a-zA-Z_&<>\"]{1,8}", json_value(), 0..5),
            ),
            1..4,
        ),
        content in "[a-zA-Z .,\n]{0,20}",
        cuts in prop::collection::vec(any::<usize>(), 0..16),
    ) {
        let calls: Vec<ToolCall> = args
            .into_iter()
            .map(|(name, map)| call(&name, Value::Object(map.into_iter().collect())))
            .collect();
        let block = render_tool_calls(&calls);
        let text = format!("{content}{block}");
        let chunks = split_at_chars(&text, &cuts);
        let refs: Vec<&str> = chunks.iter().map(String::as_str).collect();
        let (events, msg) = run(&refs, false, true);
        check_consistent(&events, &msg);
        prop_assert!(!msg.malformed);
        prop_assert_eq!(&msg.content, content.trim_end_matches([' ', '\n']));
        prop_assert_eq!(msg.tool_calls.len(), calls.len());
        for (got, want) in msg.tool_calls.iter().zip(&calls) {
            prop_assert_eq!(&got.name, &want.name);
            prop_assert_eq!(&got.arguments, &want.arguments);
        }
        prop_assert_eq!(run(&[&text], false, true), (events, msg));
    }
}
