"""Structured output through the real server on the default model (random weights, which would otherwise
write noise): JSON Schema / OpenRouter structured_outputs, JSON mode, strict tools on /beta through the openai
SDK, forced and forbidden tool calls, thinking mode, the length cut, and 422s naming unsupported features."""

from __future__ import annotations

import asyncio
import json

import httpx
import jsonschema
import pytest
from openai import AsyncOpenAI, OpenAI

from dsv32.api.schemas import ResponseFormat
from dsv32.api.structured import with_response_format_slot


def obj(props: dict, required: list[str] | None = None) -> dict:
    return {"type": "object", "properties": props, "required": list(props) if required is None else required,
            "additionalProperties": False}  # fmt: skip


S5 = {"type": "string", "maxLength": 5}
INT = {"type": "integer", "minimum": -50, "maximum": 500}
# Every schema bounds its output (short strings, bounded numbers and arrays), so no request can run into
# max_tokens: each one must end with a complete, valid value.
SCHEMAS = [
    obj({"name": S5, "age": {"type": "integer", "minimum": 0, "maximum": 120}}),
    obj({"color": {"enum": ["red", "green", "blue"]}, "shade": {"type": "integer", "minimum": 1, "maximum": 9}}),
    obj({"ok": {"type": "boolean"}}),
    obj({"tags": {"type": "array", "items": S5, "maxItems": 3}}),
    obj({"point": obj({"x": INT, "y": INT})}),
    obj({"a": obj({"b": obj({"c": {"type": "boolean"}})})}),
    obj({"price": {"type": "number", "minimum": 0, "maximum": 100, "multipleOf": 0.25}}),
    obj({"id": {"type": "string", "pattern": "^[A-Z]{2}-[0-9]{3}$"}}),
    obj({"kind": {"const": "event"}, "level": {"enum": [1, 2, 3]}}),
    obj({"x": {"type": ["integer", "null"], "minimum": 0, "maximum": 9}}),
    obj({"name": S5, "nick": S5, "n": INT}, required=["name"]),  # optional fields
    obj({"items": {"type": "array", "items": obj({"k": S5, "v": INT}), "maxItems": 2}}),
    obj({"matrix": {"type": "array", "items": {"type": "array", "items": {"enum": [0, 1]}, "maxItems": 3}, "maxItems": 2}}),
    obj({"choice": {"anyOf": [{"type": "boolean"}, {"enum": ["a", "b"]}, {"type": "null"}]}}),
    obj({"date": {"type": "string", "format": "date"}}),
    obj({"uuid": {"type": "string", "format": "uuid"}}),
    obj({"s": {"type": "string", "minLength": 2, "maxLength": 4}, "flag": {"type": "boolean"}}),
    {"type": "array", "items": {"enum": ["x", "y"]}, "minItems": 1, "maxItems": 4},
    {"enum": ["alpha", "beta", "gamma"]},
    {"$defs": {"leaf": obj({"v": {"type": "integer", "minimum": 0, "maximum": 9}})},
     "type": "object", "properties": {"left": {"$ref": "#/$defs/leaf"}, "right": {"$ref": "#/$defs/leaf"}},
     "required": ["left", "right"], "additionalProperties": False},
    obj({"user": obj({"name": S5, "roles": {"type": "array", "items": {"enum": ["admin", "dev"]}, "maxItems": 2}}),
         "active": {"type": "boolean"}}),
    obj({"t": {"type": "number", "minimum": -1, "maximum": 1, "multipleOf": 0.5}, "u": {"type": "integer", "exclusiveMinimum": 0, "exclusiveMaximum": 10}}),
]  # fmt: skip

MSGS = [{"role": "user", "content": "Describe it as JSON."}]


def _chat(url: str, body: dict) -> dict:
    r = httpx.post(url + "/chat/completions", json=body, timeout=600)
    assert r.status_code == 200, r.text
    return r.json()


async def _many(url: str, bodies: list[dict], path: str = "/chat/completions") -> list[dict]:
    async with httpx.AsyncClient(timeout=900) as client:

        async def one(body):
            r = await client.post(url + path, json=body)
            assert r.status_code == 200, r.text
            return r.json()

        return await asyncio.gather(*(one(b) for b in bodies))


def test_100_schema_requests_mixed_with_free_ones_all_validate(engine_server):
    """100 constrained requests over 22 schemas (json_schema, half with OpenRouter's structured_outputs),
    batched with free requests: every constrained reply parses and validates; the free ones run free."""
    bodies, kinds = [], []
    for i in range(100):
        schema = SCHEMAS[i % len(SCHEMAS)]
        rf = {"type": "json_schema", "json_schema": {"name": f"s{i % len(SCHEMAS)}", "schema": schema}}
        body = {
            "model": "deepseek-chat",
            "messages": MSGS,
            "max_tokens": 96,
            "seed": i,
            "response_format": rf,
        }
        if i % 2:
            body["structured_outputs"] = True
        bodies.append(body)
        kinds.append(schema)
        if i % 10 == 0:  # free requests in the same batches
            bodies.append({"model": "deepseek-chat", "messages": MSGS, "max_tokens": 8, "ignore_eos": True,
                           "seed": i})  # fmt: skip
            kinds.append(None)
    outs = asyncio.run(_many(engine_server.url, bodies))
    for schema, out in zip(kinds, outs, strict=True):
        choice = out["choices"][0]
        if schema is None:
            assert choice["finish_reason"] == "length" and out["usage"]["completion_tokens"] == 8
            continue
        assert choice["finish_reason"] == "stop", choice
        jsonschema.validate(json.loads(choice["message"]["content"]), schema)


def test_json_object_mode(engine_server):
    body = {"model": "deepseek-chat", "messages": [{"role": "user", "content": "Reply in json."}],
            "response_format": {"type": "json_object"}, "max_tokens": 24, "seed": 7}  # fmt: skip
    out = _chat(engine_server.url, body)["choices"][0]
    text = out["message"]["content"]
    if out["finish_reason"] == "stop":
        assert isinstance(json.loads(text), dict)
    else:  # cut by max_tokens: the client sees "length" and a JSON prefix
        assert out["finish_reason"] == "length" and text.startswith("{")


def test_json_mode_without_the_word_json_uses_the_prompt_slot():
    rf = ResponseFormat(type="json_object")
    msgs = with_response_format_slot([{"role": "user", "content": "hi"}], rf, "v3.2")
    assert msgs[0] == {"role": "system", "content": "", "response_format": {"type": "json_object"}}
    sys_first = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}]
    assert with_response_format_slot(sys_first, rf, "v3.2")[0]["response_format"] == {"type": "json_object"}
    said = [{"role": "user", "content": "answer in JSON"}]
    assert with_response_format_slot(said, rf, "v3.2") is said


def test_streamed_schema_output_validates(engine_server):
    schema = SCHEMAS[4]
    client = OpenAI(base_url=engine_server.url, api_key="x")
    stream = client.chat.completions.create(
        model="deepseek-chat", messages=MSGS, max_tokens=64, seed=3, stream=True,
        response_format={"type": "json_schema", "json_schema": {"name": "p", "schema": schema}},
    )  # fmt: skip
    text, finish = "", None
    for chunk in stream:
        if chunk.choices:
            text += chunk.choices[0].delta.content or ""
            finish = chunk.choices[0].finish_reason or finish
    assert finish == "stop"
    jsonschema.validate(json.loads(text), schema)


def test_length_cut_inside_constrained_output(engine_server):
    schema = obj({"text": {"type": "string", "maxLength": 200}})
    body = {"model": "deepseek-chat", "messages": MSGS, "max_tokens": 4, "seed": 1,
            "response_format": {"type": "json_schema", "json_schema": {"name": "t", "schema": schema}}}  # fmt: skip
    out = _chat(engine_server.url, body)
    assert out["choices"][0]["finish_reason"] == "length" and out["usage"]["completion_tokens"] == 4
    assert out["choices"][0]["message"]["content"].startswith('{"text": "')


def test_thinking_mode_reasoning_is_free_then_the_schema_holds(engine_server):
    schema = SCHEMAS[1]
    body = {"model": "deepseek-reasoner", "messages": MSGS, "max_tokens": 64, "seed": 2,
            "reasoning": {"max_tokens": 6},
            "response_format": {"type": "json_schema", "json_schema": {"name": "c", "schema": schema}}}  # fmt: skip
    out = _chat(engine_server.url, body)
    choice, usage = out["choices"][0], out["usage"]
    assert choice["finish_reason"] == "stop"
    assert choice["message"]["reasoning_content"]  # six free reasoning tokens
    assert usage["completion_tokens_details"]["reasoning_tokens"] == 7  # ... and the forced </think>
    jsonschema.validate(json.loads(choice["message"]["content"]), schema)


def test_vllm_structured_output_fields(engine_server):
    """vLLM's request fields, both spellings, through the openai SDK's extra_body: the reply is one of
    ``guided_choice``, matches ``guided_regex``, validates under ``guided_json``, parses under a Lark
    ``guided_grammar``; on chat (also in thinking mode, after the reasoning) and /completions, with n > 1."""
    client = OpenAI(base_url=engine_server.url, api_key="x", max_retries=0)
    kw = dict(model="deepseek-chat", messages=MSGS, max_tokens=24, seed=5)
    colours = ["red", "green", "deep blue"]
    for extra in ({"guided_choice": colours}, {"structured_outputs": {"choice": colours}}):
        r = client.chat.completions.create(n=3, extra_body=extra, **kw)
        assert [c.message.content in colours for c in r.choices] == [True] * 3 and r.choices[
            0
        ].finish_reason == "stop"
    for extra in (
        {"guided_regex": r"[0-9]{3}-[a-z]{2}"},
        {"structured_outputs": {"regex": r"[0-9]{3}-[a-z]{2}"}},
    ):
        text = client.chat.completions.create(extra_body=extra, **kw).choices[0].message.content
        assert len(text) == 6 and text[:3].isdigit() and text[3] == "-" and text[4:].isalpha(), text
    schema = SCHEMAS[1]
    for extra in (
        {"guided_json": schema},
        {"guided_json": json.dumps(schema)},
        {"structured_outputs": {"json": schema}},
    ):
        jsonschema.validate(
            json.loads(client.chat.completions.create(extra_body=extra, **kw).choices[0].message.content),
            schema,
        )
    assert isinstance(json.loads(client.chat.completions.create(extra_body={"structured_outputs": {"json_object": True}},
                                                                 **kw).choices[0].message.content), dict)  # fmt: skip
    grammar = 'start: "x=" NUM ";"\nNUM: /[1-9][0-9]?/'
    text = (
        client.chat.completions.create(extra_body={"guided_grammar": grammar}, **kw)
        .choices[0]
        .message.content
    )
    assert text.startswith("x=") and text.endswith(";") and 1 <= int(text[2:-1]) <= 99, text
    thinking = client.chat.completions.create(  # the reasoning is free, the constraint holds after it
        model="deepseek-reasoner", messages=MSGS, max_tokens=24, seed=2,
        extra_body={"guided_choice": colours, "reasoning": {"max_tokens": 4}},
    ).choices[0].message  # fmt: skip
    assert thinking.reasoning_content and thinking.content in colours
    done = client.completions.create(model="deepseek-chat", prompt="Pick one:", max_tokens=8, n=2,
                                     extra_body={"guided_choice": colours})  # fmt: skip
    assert [c.text in colours for c in done.choices] == [True, True]


@pytest.mark.parametrize(
    "body, status, words",
    [
        ({"guided_choice": ["a"], "guided_regex": "a"}, 400, "guided_regex and guided_choice"),
        ({"guided_choice": ["a"], "response_format": {"type": "json_object"}}, 400, "response_format"),
        ({"guided_regex": "a(", "max_tokens": 2}, 422, "guided_regex"),
        ({"guided_choice": []}, 422, "guided_choice"),
        ({"guided_json": "{not json"}, 422, "guided_json"),
        ({"guided_json": {"type": "array", "uniqueItems": True}}, 422, "uniqueItems"),
        ({"structured_outputs": {"structural_tag": "x"}}, 422, "structural_tag"),
        ({"guided_grammar": "start: nope"}, 422, "guided_grammar"),
    ],
)  # fmt: skip
def test_vllm_structured_output_refusals(engine_server, body, status, words):
    for path, base in (("/chat/completions", {"messages": MSGS}), ("/completions", {"prompt": "x"})):
        r = httpx.post(engine_server.url + path, json={"model": "deepseek-chat", "max_tokens": 2, **base, **body},
                       timeout=60)  # fmt: skip
        if path == "/completions" and "response_format" in body:
            continue  # (no response_format there: an extra field)
        assert r.status_code == status, r.text
        assert words.lower() in r.json()["error"]["message"].lower(), r.text


# ---- tools -------------------------------------------------------------------------------------------------

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Weather of a city on a day", "strict": True,
    "parameters": obj({"city": {"type": "string", "maxLength": 10}, "unit": {"enum": ["celsius", "fahrenheit"]},
                       "days": {"type": "integer", "minimum": 1, "maximum": 7},
                       "options": obj({"hourly": {"type": "boolean"}})})}}  # fmt: skip
CONVERT = {"type": "function", "function": {
    "name": "convert", "strict": True,
    "parameters": obj({"amount": {"type": "number", "minimum": 0, "maximum": 1000, "multipleOf": 0.5},
                       "to": {"enum": ["EUR", "USD", "JPY"]}, "tags": {"type": "array", "items": {"enum": ["a", "b"]}, "maxItems": 2}})}}  # fmt: skip
PING = {"type": "function", "function": {"name": "ping", "parameters": {"type": "object", "properties": {}}}}
SCHEMA_OF = {t["function"]["name"]: t["function"]["parameters"] for t in (WEATHER, CONVERT, PING)}
TOOL_MSGS = [{"role": "user", "content": "What is the weather in Paris?"}]


def _check_calls(calls, names: set[str]) -> None:
    assert calls
    for c in calls:
        assert c.function.name in names
        jsonschema.validate(json.loads(c.function.arguments), SCHEMA_OF[c.function.name])


def test_strict_tools_through_the_openai_sdk(engine_server):
    client = AsyncOpenAI(base_url=engine_server.url + "/beta", api_key="x")

    async def run():
        reqs = [client.chat.completions.create(model="deepseek-chat", messages=TOOL_MSGS, tools=[WEATHER, CONVERT, PING],
                                               tool_choice="required", max_tokens=160, seed=s) for s in range(8)]  # fmt: skip
        reqs += [client.chat.completions.create(model="deepseek-chat", messages=TOOL_MSGS, tools=[WEATHER, CONVERT],
                                                max_tokens=12, seed=s) for s in range(2)]  # fmt: skip
        return await asyncio.gather(*reqs)

    outs = asyncio.run(run())
    for out in outs[:8]:
        choice = out.choices[0]
        assert choice.finish_reason == "tool_calls", choice
        _check_calls(choice.message.tool_calls, {"get_weather", "convert", "ping"})
    for out in outs[
        8:
    ]:  # auto: free text (this model never opens a block by itself); any call would be valid
        if out.choices[0].message.tool_calls:
            _check_calls(out.choices[0].message.tool_calls, {"get_weather", "convert"})


def test_forced_function_always_called_with_valid_arguments(engine_server):
    """Named tool_choice on the plain URL (strict not required): one call of that function, valid arguments;
    in thinking mode too, after free reasoning."""
    tools = [WEATHER, CONVERT]
    bodies = [{"model": "deepseek-chat", "messages": TOOL_MSGS, "tools": tools, "max_tokens": 160, "seed": s,
               "tool_choice": {"type": "function", "function": {"name": ["get_weather", "convert"][s % 2]}}}
              for s in range(8)]  # fmt: skip
    bodies.append({**bodies[0], "model": "deepseek-reasoner", "reasoning": {"max_tokens": 4}})
    outs = asyncio.run(_many(engine_server.url, bodies))
    for body, out in zip(bodies, outs, strict=True):
        choice = out["choices"][0]
        want = body["tool_choice"]["function"]["name"]
        assert choice["finish_reason"] == "tool_calls", choice
        calls = choice["message"]["tool_calls"]
        assert [c["function"]["name"] for c in calls] == [want]
        jsonschema.validate(json.loads(calls[0]["function"]["arguments"]), SCHEMA_OF[want])
    assert outs[-1]["choices"][0]["message"]["reasoning_content"]


def test_tool_choice_none_and_parallel_false(engine_server):
    out = _chat(engine_server.url, {"model": "deepseek-chat", "messages": TOOL_MSGS, "tools": [WEATHER],
                                    "tool_choice": "none", "max_tokens": 12, "seed": 4})  # fmt: skip
    assert "tool_calls" not in out["choices"][0]["message"]
    assert "｜DSML｜" not in out["choices"][0]["message"]["content"]
    out = _chat(engine_server.url, {"model": "deepseek-chat", "messages": TOOL_MSGS, "tools": [PING, WEATHER],
                                    "tool_choice": "required", "parallel_tool_calls": False, "max_tokens": 160,
                                    "seed": 5})  # fmt: skip
    assert out["choices"][0]["finish_reason"] == "tool_calls"
    assert len(out["choices"][0]["message"]["tool_calls"]) == 1
    # generation stopped at the end of the call (the request aborted there): nothing is left running or held
    from tests.api.test_robustness import wait_idle

    for stream in (False, True):
        body = {"model": "deepseek-chat", "messages": TOOL_MSGS, "tools": [WEATHER], "tool_choice": "required",
                "parallel_tool_calls": False, "max_tokens": 160, "seed": 6, "stream": stream}  # fmt: skip
        assert httpx.post(engine_server.url + "/chat/completions", json=body, timeout=120).status_code == 200
        stats = wait_idle(engine_server.url, 5)
        assert stats["running"] == 0 and stats["free_blocks"] == stats["total_blocks"], stats


# ---- refusals ----------------------------------------------------------------------------------------------


def _schema_body(schema) -> dict:
    return {"model": "deepseek-chat", "messages": MSGS, "max_tokens": 4,
            "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": schema}}}  # fmt: skip


@pytest.mark.parametrize(
    "path, body, status, words",
    [
        ("/chat/completions", _schema_body({"type": "array", "uniqueItems": True}), 422, "uniqueItems"),
        ("/chat/completions", _schema_body({"type": "object", "if": {}, "then": {}}), 422, "if"),
        ("/chat/completions", {**_schema_body({}), "response_format": {"type": "json_schema"}}, 422, "json_schema"),
        ("/beta/chat/completions",
         {"model": "deepseek-chat", "messages": TOOL_MSGS, "max_tokens": 4, "tools": [{"type": "function", "function": {
             "name": "f", "strict": True, "parameters": obj({"xs": {"type": "array", "contains": {"const": 1}}})}}]},
         422, "contains"),
        ("/chat/completions", {"model": "deepseek-chat", "messages": TOOL_MSGS, "max_tokens": 4, "tools": [WEATHER],
                               "tool_choice": {"type": "function", "function": {"name": "nope"}}}, 422, "nope"),
        ("/chat/completions", {"model": "deepseek-chat", "messages": TOOL_MSGS, "max_tokens": 4,
                               "tool_choice": "required"}, 400, "tools"),
        ("/chat/completions", {"model": "deepseek-chat", "messages": TOOL_MSGS, "max_tokens": 4, "tools": [WEATHER],
                               "tool_choice": {"type": "function"}}, 422, "tool_choice"),
    ],
)  # fmt: skip
def test_unenforceable_requests_are_refused_naming_the_feature(engine_server, path, body, status, words):
    r = httpx.post(engine_server.url + path, json=body, timeout=60)
    assert r.status_code == status, r.text
    assert words.lower() in r.json()["error"]["message"].lower(), r.text


def test_a_strict_schema_error_names_the_schema_not_the_grammar(engine_server):
    """A strict tool's dangling $ref: the 422 quotes the schema's problem, not the DSML grammar built from it."""
    bad = {"type": "function", "function": {"name": "f", "strict": True,
           "parameters": obj({"a": {"$ref": "#/$defs/missing"}})}}  # fmt: skip
    body = {"model": "deepseek-chat", "messages": TOOL_MSGS, "max_tokens": 2, "tools": [bad]}
    r = httpx.post(engine_server.url + "/beta/chat/completions", json=body, timeout=60)
    msg = r.json()["error"]["message"]
    assert (
        r.status_code == 422 and msg.startswith("tools[0].function.parameters: ") and "/$defs/missing" in msg
    )
    assert "DSML" not in msg and "start:" not in msg, msg


def test_strict_is_only_enforced_on_beta(engine_server):
    bad_strict = {"type": "function", "function": {"name": "f", "strict": True,
                  "parameters": obj({"xs": {"type": "array", "uniqueItems": True}})}}  # fmt: skip
    body = {"model": "deepseek-chat", "messages": TOOL_MSGS, "max_tokens": 2, "tools": [bad_strict]}
    assert httpx.post(engine_server.url + "/chat/completions", json=body, timeout=60).status_code == 200
    assert httpx.post(engine_server.url + "/beta/chat/completions", json=body, timeout=60).status_code == 422


def test_anthropic_forced_tool_use_has_valid_input(engine_server):
    import anthropic

    client = anthropic.AsyncAnthropic(base_url=engine_server.url + "/anthropic", api_key="x")
    tools = [{"name": t["function"]["name"], "description": "a tool", "input_schema": t["function"]["parameters"]}
             for t in (WEATHER, CONVERT)]  # fmt: skip

    async def run():
        reqs = [client.messages.create(model="deepseek-chat", max_tokens=160, messages=TOOL_MSGS, tools=tools,
                                       tool_choice={"type": "tool", "name": "convert"}) for _ in range(3)]  # fmt: skip
        reqs += [client.messages.create(model="deepseek-chat", max_tokens=160, messages=TOOL_MSGS, tools=tools,
                                        tool_choice={"type": "any", "disable_parallel_tool_use": True})]  # fmt: skip
        return await asyncio.gather(*reqs)

    outs = asyncio.run(run())
    for i, msg in enumerate(outs):
        assert msg.stop_reason == "tool_use"
        uses = [b for b in msg.content if b.type == "tool_use"]
        assert len(uses) == 1 and (i == 3 or uses[0].name == "convert")
        jsonschema.validate(uses[0].input, SCHEMA_OF[uses[0].name])


def test_anthropic_strict_tools_are_enforced(engine_server):
    import anthropic

    client = anthropic.Anthropic(base_url=engine_server.url + "/anthropic", api_key="x", max_retries=0)
    bad = {"name": "f", "strict": True, "input_schema": obj({"xs": {"type": "array", "uniqueItems": True}})}
    with pytest.raises(anthropic.BadRequestError, match="uniqueItems"):
        client.messages.create(model="deepseek-chat", max_tokens=4, messages=TOOL_MSGS, tools=[bad])
    tool = {"name": "convert", "strict": True, "input_schema": CONVERT["function"]["parameters"]}
    msg = client.messages.create(model="deepseek-chat", max_tokens=160, messages=TOOL_MSGS, tools=[tool],
                                 tool_choice={"type": "any"})  # fmt: skip
    uses = [b for b in msg.content if b.type == "tool_use"]
    assert msg.stop_reason == "tool_use" and uses
    for u in uses:
        jsonschema.validate(u.input, CONVERT["function"]["parameters"])
    # auto with a strict tool: a free answer is allowed, any tool_use it writes is valid
    msg = client.messages.create(model="deepseek-chat", max_tokens=12, messages=TOOL_MSGS, tools=[tool])
    for u in (b for b in msg.content if b.type == "tool_use"):
        jsonschema.validate(u.input, CONVERT["function"]["parameters"])


def test_stop_strings_never_cut_a_forced_tool_call(engine_server):
    """Stop strings apply to the content, not to a tool call's markup (chat-format.md §3.3): forced calls with
    stop strings that occur in every DSML block ("\\n", "<", the letter "e") come out whole and valid, through
    the OpenAI route (plain and streamed, thinking too) and the Anthropic one. (Before, the first newline of
    the block ended the request: no call, finish_reason "stop".)"""
    import anthropic

    stops = ["\n", "<", "e"]
    base = {"model": "deepseek-chat", "messages": TOOL_MSGS, "tools": [WEATHER, CONVERT], "max_tokens": 160,
            "tool_choice": "required", "stop": stops}  # fmt: skip
    bodies = [{**base, "seed": s} for s in range(3)]
    bodies.append({**base, "model": "deepseek-reasoner", "reasoning": {"max_tokens": 4}, "seed": 5})
    for out in asyncio.run(_many(engine_server.url, bodies)):
        choice = out["choices"][0]
        assert choice["finish_reason"] == "tool_calls", choice
        for c in choice["message"]["tool_calls"]:
            jsonschema.validate(json.loads(c["function"]["arguments"]), SCHEMA_OF[c["function"]["name"]])
    client = OpenAI(base_url=engine_server.url, api_key="x")
    chunks = list(client.chat.completions.create(**{**base, "seed": 7}, stream=True))
    args = "".join(
        tc.function.arguments or ""
        for ch in chunks
        if ch.choices
        for tc in ch.choices[0].delta.tool_calls or []
    )
    assert chunks[-1].choices[0].finish_reason == "tool_calls" and json.loads(args)
    msg = anthropic.Anthropic(base_url=engine_server.url + "/anthropic", api_key="x", max_retries=0).messages.create(
        model="deepseek-chat", max_tokens=160, messages=TOOL_MSGS, stop_sequences=stops, tool_choice={"type": "any"},
        tools=[{"name": "convert", "input_schema": CONVERT["function"]["parameters"]}],
    )  # fmt: skip
    uses = [b for b in msg.content if b.type == "tool_use"]
    assert msg.stop_reason == "tool_use" and uses
    jsonschema.validate(uses[0].input, CONVERT["function"]["parameters"])
    # in the content the stop strings still stop: the free text (tool_choice none) is cut at the first one
    free = {**base, "tool_choice": "none", "max_tokens": 64, "seed": 1}
    whole = _chat(engine_server.url, {**free, "stop": None})["choices"][0]["message"]["content"]
    first = min(whole.find(s) for s in stops if s in whole)
    r = _chat(engine_server.url, free)["choices"][0]
    assert r["finish_reason"] == "stop" and r["message"]["content"] == whole[:first]
