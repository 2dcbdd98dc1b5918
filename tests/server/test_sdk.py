"""The real server on a tiny real-vocabulary model, driven by the official openai and
anthropic SDKs. The model's weights are random, so its text is meaningless: the tests check
shapes, usage, prefix reuse, rendering (through --trace) and errors, not wording."""

import json
import socket
import subprocess

import anthropic
import openai
import pytest

NOTHINK = {"think": False}


def oa(server, key="none"):
    return openai.OpenAI(base_url=server.url + "/v1", api_key=key, max_retries=0)


def an(server, key="none"):
    return anthropic.Anthropic(base_url=server.url, api_key=key, max_retries=0)


TOOLS = [{
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Weather of a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}]


def test_models(server):
    models = oa(server).models.list()
    ids = [m.id for m in models.data]
    assert ids == ["deepseek-v4-flash"]
    assert oa(server).models.retrieve("deepseek-v4-flash").id == "deepseek-v4-flash"
    with pytest.raises(openai.NotFoundError):
        oa(server).models.retrieve("gpt-nope")


def test_chat_non_streaming(server):
    r = oa(server).chat.completions.create(
        model="deepseek-v4-flash", messages=[{"role": "user", "content": "Hello"}],
        max_tokens=7, temperature=0, extra_body=NOTHINK)
    assert r.object == "chat.completion"
    assert r.choices[0].message.role == "assistant"
    assert isinstance(r.choices[0].message.content, str)
    assert r.choices[0].finish_reason in ("length", "stop")
    u = r.usage
    assert u.prompt_tokens > 0 and u.completion_tokens <= 7
    assert u.total_tokens == u.prompt_tokens + u.completion_tokens
    assert u.prompt_tokens_details.cached_tokens >= 0


def test_chat_streaming_with_usage(server):
    stream = oa(server).chat.completions.create(
        model="deepseek-v4-flash", messages=[{"role": "user", "content": "Stream please"}],
        max_tokens=6, temperature=0, stream=True, stream_options={"include_usage": True}, extra_body=NOTHINK)
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == ["length"] or finishes == ["stop"]
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens <= 6
    assert len({c.id for c in chunks}) == 1


def test_thinking_on_by_default_streams_reasoning(server):
    r = oa(server).chat.completions.create(
        model="deepseek-v4-flash", messages=[{"role": "user", "content": "Think"}], max_tokens=5)
    # Random weights rarely close </think> within 5 tokens: the text is reasoning.
    msg = r.choices[0].message.model_dump()
    assert "reasoning_content" in msg or msg["content"] is not None
    trace = server.trace_text()
    assert "Think<｜Assistant｜><think>" in trace


def test_stream_matches_non_stream_at_temperature_zero(server):
    args = dict(model="deepseek-v4-flash", messages=[{"role": "user", "content": "Same"}],
                max_tokens=8, temperature=0, extra_body=NOTHINK)
    full = oa(server).chat.completions.create(**args).choices[0].message.content
    streamed = "".join(c.choices[0].delta.content or "" for c in oa(server).chat.completions.create(stream=True, **args)
                       if c.choices)
    assert streamed == full


def test_completions(server):
    r = oa(server).completions.create(model="deepseek-v4-flash", prompt="Once upon", max_tokens=5,
                                      temperature=0, extra_body=NOTHINK)
    assert r.object == "text_completion" and isinstance(r.choices[0].text, str)
    assert r.usage.completion_tokens <= 5
    parts = list(oa(server).completions.create(model="deepseek-v4-flash", prompt="Once upon", max_tokens=5,
                                               temperature=0, stream=True, extra_body=NOTHINK))
    assert "".join(p.choices[0].text for p in parts if p.choices) == r.choices[0].text
    assert "You are a helpful assistant<｜User｜>Once upon<｜Assistant｜></think>" in server.trace_text()


def test_server_and_cli_answer_alike_at_temperature_0(server, model):
    # Same rendering (ds4's single-turn prompt), same default numerics, same greedy pick: the
    # completions endpoint and `ds4 -p` give one text.
    from conftest import DS4_BIN
    cli = subprocess.run([DS4_BIN, "-m", str(model), "--backend", "cpu", "-p", "Once upon", "-n", "12",
                          "--temp", "0", "--nothink"], capture_output=True, text=True, check=True)
    r = oa(server).completions.create(model="deepseek-v4-flash", prompt="Once upon", max_tokens=12,
                                      temperature=0, extra_body=NOTHINK)
    assert r.usage.completion_tokens == 12
    assert cli.stdout.rstrip("\n") == r.choices[0].text


def test_responses(server):
    r = oa(server).responses.create(model="deepseek-v4-flash", input="Hi there", instructions="Be brief.",
                                    max_output_tokens=5, reasoning={"effort": "none"})
    assert r.object == "response" and r.status in ("completed", "incomplete")
    assert isinstance(r.output_text, str)
    assert r.usage.input_tokens > 0 and r.usage.output_tokens <= 5
    assert r.usage.input_tokens_details.cached_tokens >= 0
    events = list(oa(server).responses.create(model="deepseek-v4-flash", input="Hi there", max_output_tokens=5,
                                              reasoning={"effort": "none"}, stream=True))
    types = [e.type for e in events]
    assert types[0] == "response.created" and types[1] == "response.in_progress"
    assert types[-1] in ("response.completed", "response.incomplete")
    assert [e.sequence_number for e in events] == list(range(len(events)))
    assert "Be brief.<｜User｜>Hi there<｜Assistant｜></think>" in server.trace_text()


def test_messages(server):
    c = an(server)
    m = c.messages.create(model="deepseek-v4-flash", max_tokens=5, system="Sys prompt.",
                          messages=[{"role": "user", "content": "Hello"}], thinking={"type": "disabled"})
    assert m.type == "message" and m.role == "assistant"
    assert m.stop_reason in ("end_turn", "max_tokens")
    assert m.usage.output_tokens <= 5 and m.usage.input_tokens > 0
    with c.messages.stream(model="deepseek-v4-flash", max_tokens=5, messages=[{"role": "user", "content": "Hello"}],
                           thinking={"type": "disabled"}) as s:
        text = "".join(s.text_stream)
        final = s.get_final_message()
    assert final.stop_reason in ("end_turn", "max_tokens")
    assert text == "".join(b.text for b in final.content if b.type == "text")
    assert "Sys prompt.<｜User｜>Hello<｜Assistant｜></think>" in server.trace_text()


def test_messages_count_tokens(server):
    c = an(server)
    msgs = [{"role": "user", "content": "Count me"}]
    n = c.messages.count_tokens(model="deepseek-v4-flash", messages=msgs, thinking={"type": "disabled"}).input_tokens
    m = c.messages.create(model="deepseek-v4-flash", max_tokens=1, messages=msgs, thinking={"type": "disabled"})
    assert n == m.usage.input_tokens + m.usage.cache_read_input_tokens


def test_messages_thinking_stream_has_thinking_block(server):
    with an(server).messages.stream(model="deepseek-v4-flash", max_tokens=4,
                                    messages=[{"role": "user", "content": "Ponder"}]) as s:
        final = s.get_final_message()
    kinds = [b.type for b in final.content]
    assert kinds and kinds[0] in ("thinking", "text")


def test_tools_accepted_and_results_rendered(server):
    c = oa(server)
    call_id = "call_0123456789abcdef0123456789abcdef"
    r = c.chat.completions.create(
        model="deepseek-v4-flash", tools=TOOLS, max_tokens=4, extra_body=NOTHINK,
        messages=[
            {"role": "user", "content": "Weather in Paris?"},
            {"role": "assistant", "content": None, "tool_calls": [
                {"id": call_id, "type": "function", "function": {"name": "get_weather", "arguments": "{\"city\":\"Paris\"}"}}]},
            {"role": "tool", "tool_call_id": call_id, "content": "sunny, 21C"},
        ])
    assert r.choices[0].finish_reason in ("stop", "length", "tool_calls", "error")
    trace = server.trace_text()
    assert "## Tools" in trace
    assert json.dumps(TOOLS[0]["function"], separators=(",", ":")) in trace
    assert '<｜DSML｜invoke name="get_weather">\n<｜DSML｜parameter name="city" string="true">Paris</｜DSML｜parameter>' in trace
    assert "<｜User｜><tool_result>sunny, 21C</tool_result><｜Assistant｜></think>" in trace
    # Anthropic shapes of the same.
    m = an(server).messages.create(
        model="deepseek-v4-flash", max_tokens=4, thinking={"type": "disabled"},
        tools=[{"name": "get_weather", "description": "Weather of a city",
                "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}}}],
        messages=[
            {"role": "user", "content": "Weather in Rome?"},
            {"role": "assistant", "content": [{"type": "tool_use", "id": "toolu_01", "name": "get_weather", "input": {"city": "Rome"}}]},
            {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_01", "content": "rainy"}]},
        ])
    assert m.stop_reason in ("end_turn", "max_tokens", "tool_use")
    assert "<tool_result>rainy</tool_result><｜Assistant｜></think>" in server.trace_text()
    # Responses function_call items.
    r = oa(server).responses.create(
        model="deepseek-v4-flash", max_output_tokens=4, reasoning={"effort": "none"},
        tools=[{"type": "function", "name": "get_weather", "parameters": {"type": "object", "properties": {}}}],
        input=[{"role": "user", "content": "Weather in Oslo?"},
               {"type": "function_call", "call_id": "call_x", "name": "get_weather", "arguments": "{\"city\":\"Oslo\"}"},
               {"type": "function_call_output", "call_id": "call_x", "output": "snow"}])
    assert r.status in ("completed", "incomplete")
    assert "<tool_result>snow</tool_result>" in server.trace_text()


def test_prefix_reuse_prefills_only_the_new_turn(server):
    c = oa(server)
    first_msgs = [{"role": "user", "content": "Tell me something about prefix caches."}]
    r1 = c.chat.completions.create(model="deepseek-v4-flash", messages=first_msgs, max_tokens=6, temperature=0,
                                   seed=7, extra_body=NOTHINK)
    answer = r1.choices[0].message.content
    msgs = first_msgs + [{"role": "assistant", "content": answer}, {"role": "user", "content": "And more?"}]
    r2 = c.chat.completions.create(model="deepseek-v4-flash", messages=msgs, max_tokens=3, temperature=0,
                                   extra_body=NOTHINK)
    cached = r2.usage.prompt_tokens_details.cached_tokens
    # The whole first exchange is reused: prompt + the generated tokens (EOS is never evaluated).
    assert cached == r1.usage.prompt_tokens + r1.usage.completion_tokens - (1 if r1.choices[0].finish_reason == "stop" else 0)
    # Only the new turn is prefilled: EOS, <｜User｜>, the text, <｜Assistant｜>, </think>.
    assert 0 < r2.usage.prompt_tokens - cached <= 12


def test_errors(server):
    c = oa(server)
    with pytest.raises(openai.BadRequestError) as e:
        c.chat.completions.create(model="deepseek-v4-flash", messages=[{"role": "user", "content": "word " * 5000}])
    assert e.value.code == "context_length_exceeded"
    assert e.value.body["n_ctx"] == 4096
    with pytest.raises(openai.BadRequestError) as e:
        c.chat.completions.create(model="deepseek-v4-flash", messages=[{"role": "wizard", "content": "x"}])
    assert "unknown role" in e.value.message
    with pytest.raises(openai.BadRequestError):
        c.chat.completions.create(model="deepseek-v4-flash", messages=[{"role": "user", "content": "x"}], temperature="hot")
    with pytest.raises(openai.BadRequestError):
        c.responses.create(model="deepseek-v4-flash", input="x", previous_response_id="resp_abc")
    with pytest.raises(anthropic.BadRequestError) as e:
        an(server).messages.create(model="deepseek-v4-flash", max_tokens=5,
                                   messages=[{"role": "user", "content": [{"type": "hologram"}]}])
    assert e.value.body["type"] == "error" and e.value.body["error"]["type"] == "invalid_request_error"
    # A raw malformed body, then the server still answers.
    host, port = server.url.split("//")[1].rsplit(":", 1)
    with socket.create_connection((host, int(port))) as s:
        body = b"{not json"
        s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Length: "
                  + str(len(body)).encode() + b"\r\n\r\n" + body)
        resp = b""
        while chunk := s.recv(65536):
            resp += chunk
    assert resp.startswith(b"HTTP/1.1 400")
    assert c.models.list().data


def test_api_key(keyed_server):
    with pytest.raises(openai.AuthenticationError):
        oa(keyed_server, "wrong").models.list()
    assert oa(keyed_server, "sekret-key").models.list().data
    with pytest.raises(anthropic.AuthenticationError):
        an(keyed_server, "wrong").messages.create(model="m", max_tokens=1, messages=[{"role": "user", "content": "x"}])
    m = an(keyed_server, "sekret-key").messages.create(model="m", max_tokens=1, thinking={"type": "disabled"},
                                                       messages=[{"role": "user", "content": "x"}])
    assert m.usage.output_tokens <= 1


def test_concurrent_streaming_clients(server):
    """32 streaming clients at once, same prompt at temperature 0: every stream is complete and
    identical to the non-streaming answer (no chunk lost, duplicated or mixed across clients)."""
    from concurrent.futures import ThreadPoolExecutor

    args = dict(model="deepseek-v4-flash", messages=[{"role": "user", "content": "Load test"}], max_tokens=12,
                temperature=0, extra_body=NOTHINK)
    want = oa(server).chat.completions.create(**args).choices[0].message.content

    def one(_):
        chunks = list(oa(server).chat.completions.create(stream=True, **args))
        assert len({c.id for c in chunks}) == 1
        return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)

    with ThreadPoolExecutor(32) as pool:
        results = list(pool.map(one, range(32)))
    assert results == [want] * 32


def test_disconnect_cancels_the_generation(server):
    import time

    stream = oa(server).chat.completions.create(
        model="deepseek-v4-flash", messages=[{"role": "user", "content": "Go on forever"}],
        max_tokens=100000, stream=True, extra_body=NOTHINK)
    got = 0
    for chunk in stream:
        got += 1
        if got == 5:
            break
    stream.close()
    deadline = time.time() + 5
    while time.time() < deadline and not any("client gone" in line for line in server.log):
        time.sleep(0.01)
    assert any("client gone, generation cancelled" in line for line in server.log)
    # The worker is free: a short request is answered at once.
    t0 = time.time()
    r = oa(server).chat.completions.create(model="deepseek-v4-flash", messages=[{"role": "user", "content": "x"}],
                                           max_tokens=2, extra_body=NOTHINK)
    assert r.usage.completion_tokens <= 2
    assert time.time() - t0 < 5
