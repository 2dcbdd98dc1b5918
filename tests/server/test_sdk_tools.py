"""Tool calls through the official SDKs: the real router over a scripted model whose output is
a recorded DSML tool-call block (crates/ds4-server/examples/scripted_serve.rs; a random-weight
model never writes DSML). Checks each SDK parses the streamed calls with argument types kept,
and that sending the call back with its result reuses the session (cached tokens)."""

import json
import os
import re
import subprocess
import time

import anthropic
import openai
import pytest

from conftest import ROOT

SCRIPTED_BIN = os.environ.get("DS4_SCRIPTED_BIN", str(ROOT / "target" / "debug" / "examples" / "scripted_serve"))

BLOCK = ('\n\n<｜DSML｜tool_calls>\n<｜DSML｜invoke name="get_weather">\n'
         '<｜DSML｜parameter name="city" string="true">Paris & "Rome" <3</｜DSML｜parameter>\n'
         '<｜DSML｜parameter name="days" string="false">3</｜DSML｜parameter>\n'
         '<｜DSML｜parameter name="units" string="false">["C", "F"]</｜DSML｜parameter>\n'
         '</｜DSML｜invoke>\n</｜DSML｜tool_calls>')
REPLIES = ["Need the weather.</think>Checking." + BLOCK, "Done.</think>Sunny."]
ARGS = {"city": 'Paris & "Rome" <3', "days": 3, "units": ["C", "F"]}
SCHEMA = {"type": "object", "properties": {"city": {"type": "string"}, "days": {"type": "integer"},
                                           "units": {"type": "array"}}}


SPECIALS = ["<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", "<｜User｜>", "<｜Assistant｜>", "<think>",
            "</think>", "｜DSML｜"]


def byte_tokens(text):
    """Token count under the scripted server's codec: one per special string, else one per byte."""
    n = 0
    for s in SPECIALS:
        n += text.count(s)
        text = text.replace(s, "")
    return n + len(text.encode())


@pytest.fixture
def scripted(tmp_path):
    if not os.path.exists(SCRIPTED_BIN):
        subprocess.run(["cargo", "build", "-q", "-p", "ds4-server", "--example", "scripted_serve"], cwd=ROOT, check=True)
    replies = tmp_path / "replies.json"
    replies.write_text(json.dumps(REPLIES), encoding="utf-8")
    proc = subprocess.Popen([SCRIPTED_BIN, str(replies)], stderr=subprocess.PIPE, text=True)
    line = proc.stderr.readline()
    m = re.search(r"listening on (http://\S+)", line)
    assert m, line
    yield m.group(1)
    proc.terminate()
    proc.wait(timeout=10)


def test_openai_streamed_tool_call_and_replay(scripted):
    c = openai.OpenAI(base_url=scripted + "/v1", api_key="x", max_retries=0)
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": SCHEMA}}]
    user = {"role": "user", "content": "Weather?"}
    calls = {}
    finish = None
    reasoning = ""
    content = ""
    usage = None
    for chunk in c.chat.completions.create(model="m", messages=[user], tools=tools, stream=True,
                                           stream_options={"include_usage": True}):
        if chunk.usage:
            usage = chunk.usage
        if not chunk.choices:
            continue
        d = chunk.choices[0].delta
        reasoning += getattr(d, "reasoning_content", None) or (d.model_extra or {}).get("reasoning_content") or ""
        content += d.content or ""
        for tc in d.tool_calls or []:
            slot = calls.setdefault(tc.index, {"id": None, "name": None, "arguments": ""})
            if tc.id:
                slot["id"] = tc.id
            if tc.function and tc.function.name:
                slot["name"] = tc.function.name
            if tc.function and tc.function.arguments:
                slot["arguments"] += tc.function.arguments
        finish = chunk.choices[0].finish_reason or finish
    assert finish == "tool_calls"
    assert reasoning == "Need the weather." and content == "Checking."
    assert list(calls) == [0]
    call = calls[0]
    assert call["id"].startswith("call_") and call["name"] == "get_weather"
    assert json.loads(call["arguments"]) == ARGS
    # Send the call back (as the SDK user would) with its result: the session is reused.
    assistant = {"role": "assistant", "content": content, "tool_calls": [
        {"id": call["id"], "type": "function", "function": {"name": call["name"], "arguments": call["arguments"]}}]}
    tool = {"role": "tool", "tool_call_id": call["id"], "content": "sunny"}
    r = c.chat.completions.create(model="m", messages=[user, assistant, tool], tools=tools)
    assert r.choices[0].message.content == "Sunny."
    # The turn ended at the closing tag (no EOS sampled): every generated token is in the session.
    assert r.usage.prompt_tokens_details.cached_tokens == usage.prompt_tokens + usage.completion_tokens
    assert r.usage.prompt_tokens - r.usage.prompt_tokens_details.cached_tokens == byte_tokens(
        "<｜end▁of▁sentence｜><｜User｜><tool_result>sunny</tool_result><｜Assistant｜><think>")


def test_anthropic_tool_use_and_replay(scripted):
    c = anthropic.Anthropic(base_url=scripted, api_key="x", max_retries=0)
    tools = [{"name": "get_weather", "description": "Weather", "input_schema": SCHEMA}]
    user = {"role": "user", "content": "Weather?"}
    with c.messages.stream(model="m", max_tokens=1000, messages=[user], tools=tools) as s:
        final = s.get_final_message()
    assert final.stop_reason == "tool_use"
    kinds = [b.type for b in final.content]
    assert kinds == ["thinking", "text", "tool_use"]
    tool_use = final.content[2]
    assert tool_use.id.startswith("toolu_") and tool_use.name == "get_weather"
    assert tool_use.input == ARGS
    history = [user, {"role": "assistant", "content": [b.model_dump(exclude_none=True) for b in final.content]},
               {"role": "user", "content": [{"type": "tool_result", "tool_use_id": tool_use.id, "content": "sunny"}]}]
    m = c.messages.create(model="m", max_tokens=1000, messages=history, tools=tools)
    assert [b.text for b in m.content if b.type == "text"] == ["Sunny."]
    assert m.usage.cache_read_input_tokens > 0
    # Only the tool result turn is prefilled.
    assert m.usage.input_tokens == byte_tokens(
        "<｜end▁of▁sentence｜><｜User｜><tool_result>sunny</tool_result><｜Assistant｜><think>")


def test_responses_function_call_and_replay(scripted):
    c = openai.OpenAI(base_url=scripted + "/v1", api_key="x", max_retries=0)
    tools = [{"type": "function", "name": "get_weather", "parameters": SCHEMA}]
    user = {"role": "user", "content": "Weather?"}
    completed = None
    deltas = ""
    for ev in c.responses.create(model="m", input=[user], tools=tools, stream=True):
        if ev.type == "response.function_call_arguments.delta":
            deltas += ev.delta
        if ev.type == "response.completed":
            completed = ev.response
    calls = [o for o in completed.output if o.type == "function_call"]
    assert len(calls) == 1 and calls[0].name == "get_weather"
    assert json.loads(calls[0].arguments) == ARGS and deltas == calls[0].arguments
    assert completed.output_text == "Checking."
    replay = [user, {"role": "assistant", "content": "Checking."},
              {"type": "function_call", "call_id": calls[0].call_id, "name": "get_weather", "arguments": calls[0].arguments},
              {"type": "function_call_output", "call_id": calls[0].call_id, "output": "sunny"}]
    r = c.responses.create(model="m", input=replay, tools=tools)
    assert r.output_text == "Sunny."
    assert r.usage.input_tokens_details.cached_tokens == completed.usage.input_tokens + completed.usage.output_tokens
