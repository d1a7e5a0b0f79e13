"""The Anthropic Messages API through the real `anthropic` SDK (and raw HTTP) against the real server."""

from __future__ import annotations

import json

import anthropic
import httpx
import openai
import pytest

from tests.api.test_chat import WEATHER, dsml_calls

WEATHER_TOOL = {
    "name": "get_weather",
    "description": "Weather of a city",
    "input_schema": WEATHER["function"]["parameters"],
}


def client(srv) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=srv.url + "/anthropic", api_key="sk-test", max_retries=0)


def test_non_stream_and_stream_agree(engine_server):
    c = client(engine_server)
    kw = dict(model="deepseek-chat", max_tokens=10, extra_body={"temperature": 0.0}, system="Be brief.",
              messages=[{"role": "user", "content": "Tell me about Hangzhou"}])  # fmt: skip
    r = c.messages.create(**kw)
    assert r.type == "message" and r.role == "assistant" and r.id.startswith("msg_")
    assert r.stop_reason in ("end_turn", "max_tokens") and r.usage.output_tokens >= 1
    with c.messages.stream(**kw) as s:
        events = [e.type for e in s]
        final = s.get_final_message()
    assert events[0] == "message_start" and "message_stop" in events and "content_block_delta" in events
    assert [b.model_dump() for b in final.content] == [b.model_dump() for b in r.content]
    assert (final.stop_reason, final.usage.output_tokens) == (r.stop_reason, r.usage.output_tokens)


def test_stream_usage_splits_the_prompt_into_cache_hits_and_misses_from_message_start(engine_server):
    """A repeated long prompt: message_start's usage already counts the cache hits (input_tokens is the
    uncached part, as on Anthropic's API) and agrees with message_delta's; the SDK's final message too."""
    long = " ".join(f"word{i}" for i in range(400))
    body = {"model": "deepseek-chat", "max_tokens": 2, "stream": True,
            "messages": [{"role": "user", "content": long}]}  # fmt: skip
    usages = []
    for _ in range(2):
        r = httpx.post(engine_server.url + "/anthropic/v1/messages", json=body, timeout=60)
        data = [json.loads(line[6:]) for line in r.text.splitlines() if line.startswith("data: ")]
        assert data[0]["type"] == "message_start"
        start = data[0]["message"]["usage"]
        delta = next(d for d in data if d["type"] == "message_delta")["usage"]
        assert {k: start[k] for k in ("input_tokens", "cache_read_input_tokens")} == {
            k: delta[k] for k in ("input_tokens", "cache_read_input_tokens")
        }
        usages.append(start)
    prompt = usages[0]["input_tokens"] + usages[0]["cache_read_input_tokens"]
    assert usages[0]["cache_read_input_tokens"] == 0 and prompt > 400
    assert usages[1]["cache_read_input_tokens"] >= prompt - 32
    assert usages[1]["input_tokens"] + usages[1]["cache_read_input_tokens"] == prompt
    with client(engine_server).messages.stream(**{k: v for k, v in body.items() if k != "stream"}) as s:
        final = s.get_final_message()
    assert final.usage.cache_read_input_tokens == usages[1]["cache_read_input_tokens"]
    assert final.usage.input_tokens == usages[1]["input_tokens"]


def test_thinking_on_and_off(scripted_server):
    c = client(scripted_server)
    scripted_server.engine.scripts = ["Compare decimals.</think>9.8 is larger.", "9.8"]
    r = c.messages.create(model="deepseek-chat", max_tokens=100, thinking={"type": "enabled", "budget_tokens": 50},
                          messages=[{"role": "user", "content": "9.11 or 9.8?"}])  # fmt: skip
    assert [b.type for b in r.content] == ["thinking", "text"]
    assert r.content[0].thinking == "Compare decimals." and r.content[0].signature
    assert r.content[1].text == "9.8 is larger." and r.stop_reason == "end_turn"
    r = c.messages.create(
        model="deepseek-chat", max_tokens=100, messages=[{"role": "user", "content": "again"}]
    )
    assert [b.type for b in r.content] == ["text"] and r.content[0].text == "9.8"
    scripted_server.engine.scripts = ["Hmm.</think>Yes."]  # newer SDKs' "adaptive": thinking on
    r = httpx.post(scripted_server.url + "/anthropic/v1/messages", json={"model": "deepseek-chat", "max_tokens": 50,
                   "thinking": {"type": "adaptive"}, "messages": [{"role": "user", "content": "ok?"}]})  # fmt: skip
    assert [b["type"] for b in r.json()["content"]] == ["thinking", "text"]


def test_claude_codes_max_tokens_is_clamped_to_what_the_model_allows(scripted_server):
    """Claude Code asks for Claude's output limits (32000 and more); the request gets the mode's ceiling and
    what the context leaves, instead of a 400 (the OpenAI route keeps DeepSeek's 400)."""
    c = client(scripted_server)
    for model, thinking in (
        ("deepseek-chat", None),
        ("claude-sonnet-x", {"type": "enabled", "budget_tokens": 1024}),
    ):
        kw = {"thinking": thinking} if thinking else {}
        msgs = [{"role": "user", "content": "hi"}]
        with c.messages.stream(model=model, max_tokens=32000, messages=msgs, **kw) as s:  # as Claude Code
            assert s.get_final_message().type == "message"
        room = 4096 - len(scripted_server.engine.prompts[-1])  # the scripted server's context is 4096 tokens
        assert scripted_server.engine.params[-1].max_tokens == room
    # a prompt that leaves no room: Anthropic's "prompt is too long" (which Claude Code reads to compact), not
    # a complaint about its max_tokens of 32000 (what it used to get)
    long = [{"role": "user", "content": "word " * 5000}]
    for max_tokens in (32000, 100):
        with pytest.raises(anthropic.BadRequestError, match=r"prompt is too long: \d+ tokens > 4095 maximum"):
            with c.messages.stream(model="deepseek-chat", max_tokens=max_tokens, messages=long) as s:
                s.get_final_message()


def test_a_final_assistant_message_is_a_prefill(scripted_server, tokenizer):
    """As on Anthropic's API, a final assistant message is continued (no end of sentence after it) and the
    reply holds only the continuation; in thinking mode, a prefill with text continues the text. Trailing
    whitespace in it is a 400, as there."""
    c = client(scripted_server)
    scripted_server.engine.scripts = [' "sunny"}', ' "rain"}']
    msgs = [{"role": "user", "content": "Weather as JSON"}, {"role": "assistant", "content": '{"sky":'}]
    r = c.messages.create(model="deepseek-chat", max_tokens=20, messages=msgs)
    assert tokenizer.decode(scripted_server.engine.prompts[-1]).endswith('</think>{"sky":')
    assert [b.text for b in r.content] == [' "sunny"}'] and r.stop_reason == "end_turn"
    r = c.messages.create(model="deepseek-chat", max_tokens=20, messages=msgs, thinking={"type": "enabled", "budget_tokens": 10})  # fmt: skip
    assert tokenizer.decode(scripted_server.engine.prompts[-1]).endswith('<think></think>{"sky":')
    assert [(b.type, getattr(b, "text", None)) for b in r.content] == [("text", ' "rain"}')]
    with pytest.raises(anthropic.BadRequestError, match="trailing whitespace"):
        c.messages.create(model="deepseek-chat", max_tokens=20, messages=[msgs[0], {"role": "assistant", "content": "Sure "}])  # fmt: skip


@pytest.mark.parametrize("stream", [False, True])
def test_multi_turn_tool_use_loop(scripted_server, tokenizer, stream):
    c = client(scripted_server)
    scripted_server.engine.scripts = [
        "Let me check." + dsml_calls(("get_weather", {"location": "Hangzhou"}), ("get_weather", {"location": "Paris", "days": 2})),
        "Both sunny.",
    ]  # fmt: skip
    messages = [{"role": "user", "content": "Weather in Hangzhou and Paris?"}]
    kw = dict(model="deepseek-chat", max_tokens=200, tools=[WEATHER_TOOL])
    if stream:
        with c.messages.stream(messages=messages, **kw) as s:
            r = s.get_final_message()
    else:
        r = c.messages.create(messages=messages, **kw)
    assert r.stop_reason == "tool_use"
    uses = [b for b in r.content if b.type == "tool_use"]
    assert [u.input for u in uses] == [{"location": "Hangzhou"}, {"location": "Paris", "days": 2}]
    assert all(u.id.startswith("toolu_") and u.name == "get_weather" for u in uses)
    messages.append({"role": "assistant", "content": [b.model_dump(exclude_none=True) for b in r.content]})
    messages.append({"role": "user", "content": [
        {"type": "tool_result", "tool_use_id": uses[0].id, "content": "22C sunny"},
        {"type": "tool_result", "tool_use_id": uses[1].id, "content": [{"type": "text", "text": "18C sunny"}], "is_error": False},
    ]})  # fmt: skip
    final = c.messages.create(messages=messages, **kw)
    assert final.content[0].text == "Both sunny." and final.stop_reason == "end_turn"
    prompt = tokenizer.decode(scripted_server.engine.prompts[-1])
    assert "22C sunny" in prompt and "18C sunny" in prompt and "Let me check." in prompt


def test_count_tokens_equals_the_prompt_the_engine_got(scripted_server):
    c = client(scripted_server)
    kw = dict(model="deepseek-chat", system=[{"type": "text", "text": "You are terse."}],
              messages=[{"role": "user", "content": "Hello there"}], tools=[WEATHER_TOOL])  # fmt: skip
    n = c.messages.count_tokens(**kw).input_tokens
    c.messages.create(max_tokens=5, **kw)
    assert n == len(scripted_server.engine.prompts[-1])


def test_one_encoder_two_front_doors(scripted_server):
    """The same conversation through the OpenAI route and the Anthropic route renders the same prompt."""
    oa = openai.OpenAI(base_url=scripted_server.url, api_key="k", max_retries=0)
    call = {
        "id": "call_1",
        "type": "function",
        "function": {"name": "get_weather", "arguments": '{"location": "Oslo"}'},
    }
    oa.chat.completions.create(model="deepseek-reasoner", tools=[WEATHER], messages=[
        {"role": "system", "content": "Sys."},
        {"role": "user", "content": "Weather in Oslo?"},
        {"role": "assistant", "content": "", "reasoning_content": "Need a tool.", "tool_calls": [call]},
        {"role": "tool", "tool_call_id": "call_1", "content": "-3C snow"},
    ])  # fmt: skip
    client(scripted_server).messages.create(
        model="deepseek-reasoner", max_tokens=100, system="Sys.", tools=[WEATHER_TOOL], messages=[
            {"role": "user", "content": "Weather in Oslo?"},
            {"role": "assistant", "content": [
                {"type": "thinking", "thinking": "Need a tool.", "signature": "x"},
                {"type": "tool_use", "id": "toolu_1", "name": "get_weather", "input": {"location": "Oslo"}}]},
            {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_1", "content": "-3C snow"}]},
        ])  # fmt: skip
    openai_prompt, anthropic_prompt = scripted_server.engine.prompts[-2:]
    assert openai_prompt == anthropic_prompt


ERRORS = [
    ({"model": "m", "messages": [{"role": "user", "content": "x"}]}, 400, "max_tokens"),
    ({"model": "m", "max_tokens": 5, "messages": []}, 400, "messages"),
    ({"model": "m", "max_tokens": 0, "messages": [{"role": "user", "content": "x"}]}, 400, "max_tokens"),
    ({"model": "m", "max_tokens": 5, "messages": [{"role": "system", "content": "x"}]}, 400, "role"),
    ({"model": "m", "max_tokens": 5, "messages": [{"role": "user", "content": [{"type": "image", "source": {}}]}]}, 400, "not supported"),
    ({"model": "m", "max_tokens": 5, "temperature": 3, "messages": [{"role": "user", "content": "x"}]}, 400, "temperature"),
    ({"model": "m", "max_tokens": 5, "thinking": {"type": "sometimes"}, "messages": [{"role": "user", "content": "x"}]}, 400, "thinking"),
    ({"model": "m", "max_tokens": 5, "tool_choice": {"type": "maybe"}, "messages": [{"role": "user", "content": "x"}]}, 400, "tool_choice"),
    ({"model": "m", "max_tokens": "5", "messages": [{"role": "user", "content": "x"}]}, 400, "max_tokens"),
    ({"model": "m", "max_tokens": 5, "stream": "yes", "messages": [{"role": "user", "content": "x"}]}, 400, "stream"),
    # forced tool_choice errors in this route's terms (before: OpenAI's "tool_choice 'required' needs tools")
    ({"model": "m", "max_tokens": 5, "tool_choice": {"type": "any"}, "messages": [{"role": "user", "content": "x"}]},
     400, "tool_choice {'type': 'any'} needs tools"),
    ({"model": "m", "max_tokens": 5, "tool_choice": {"type": "tool"}, "messages": [{"role": "user", "content": "x"}],
      "tools": [{"name": "Read", "input_schema": {"type": "object", "properties": {}}}]}, 400, "tool_choice.name: None is not among"),
    # a conversation may not end with an unanswered tool_use (before: 200, the prompt ending after the calls)
    ({"model": "m", "max_tokens": 5, "tools": [{"name": "Read", "input_schema": {"type": "object", "properties": {}}}],
      "messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": [
          {"type": "tool_use", "id": "t1", "name": "Read", "input": {}}]}]}, 400, "t1 have no tool_result"),
    # only a final assistant message (a prefill) may be empty, as on Anthropic's API
    ({"model": "m", "max_tokens": 5, "messages": [{"role": "user", "content": []}]}, 400, "messages[0].content: must not be empty"),
    ({"model": "m", "max_tokens": 5, "messages": [{"role": "user", "content": ""}]}, 400, "must not be empty"),
    ({"model": "m", "max_tokens": 5, "messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": []},
                                                  {"role": "user", "content": "y"}]}, 400, "messages[1].content"),
]  # fmt: skip


@pytest.mark.parametrize("body, status, words", ERRORS)
def test_errors_in_anthropic_shape(engine_server, body, status, words):
    r = httpx.post(engine_server.url + "/v1/messages", json=body, headers={"anthropic-version": "2023-06-01"})
    assert r.status_code == status, r.text
    err = r.json()
    assert err["type"] == "error" and err["error"]["type"] == "invalid_request_error"
    assert words.lower() in err["error"]["message"].lower()


def test_sdk_raises_typed_errors(engine_server):
    with pytest.raises(anthropic.BadRequestError):
        client(engine_server).messages.create(model="m", max_tokens=5, messages=[
            {"role": "user", "content": [{"type": "document", "source": {}}]}])  # fmt: skip


def test_forced_tool_use_on_an_older_chat_format_is_refused_in_anthropic_terms(tokenizer):
    """A V3.1-format model has no tool grammar: tool_choice any is a 400 that names the format, worded for this
    route (before: OpenAI's "tool_choice 'required' ...")."""
    from dsv32.api.service import ServingContext
    from tests.api.server_harness import RunningServer, ScriptedEngine

    engine = ScriptedEngine(tokenizer, tokenizer.eos_id)
    ctx = ServingContext(engine=engine, tokenizer=tokenizer, family="v3.1", max_model_len=4096,
                         served_model_name="scripted", eos_id=tokenizer.eos_id)  # fmt: skip
    body = {"model": "m", "max_tokens": 5, "tool_choice": {"type": "any"}, "messages": [{"role": "user", "content": "x"}],
            "tools": [{"name": "Read", "input_schema": {"type": "object", "properties": {}}}]}  # fmt: skip
    with RunningServer(ctx) as srv:
        r = httpx.post(srv.url + "/v1/messages", json=body)
    assert r.status_code == 400, r.text
    msg = r.json()["error"]["message"]
    assert "tool_choice {'type': 'any'} needs the V3.2 (DSML) chat format" in msg and "v3.1" in msg
