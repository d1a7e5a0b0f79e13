"""The DeepSeek-compatible routes through the real openai SDK and raw HTTP."""

from __future__ import annotations

import asyncio
import json

import httpx
import openai
import pytest
import torch

D = "｜DSML｜"
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Weather of a city",
        "parameters": {
            "type": "object",
            "properties": {"location": {"type": "string"}, "days": {"type": "integer"}},
            "required": ["location"],
        },
    },
}


def dsml_calls(*calls: tuple[str, dict]) -> str:
    invokes = []
    for name, args in calls:
        params = []
        for k, v in args.items():
            is_str = isinstance(v, str)
            val = v if is_str else json.dumps(v)
            params.append(
                f'<{D}parameter name="{k}" string="{"true" if is_str else "false"}">{val}</{D}parameter>'
            )
        invokes.append(f'<{D}invoke name="{name}">\n' + "\n".join(params) + f"\n</{D}invoke>")
    return f"\n\n<{D}function_calls>\n" + "\n".join(invokes) + f"\n</{D}function_calls>"


def client(srv, **kw) -> openai.OpenAI:
    return openai.OpenAI(base_url=srv.url, api_key="sk-test", max_retries=0, **kw)


def test_seed_curl_sample_with_only_the_base_url_changed(engine_server):
    # seed 000: POST .../chat/completions, Bearer key, model deepseek/deepseek-v3.2, one user message
    r = httpx.post(
        f"{engine_server.url}/v1/chat/completions",
        headers={"Authorization": "Bearer API_KEY", "Content-Type": "application/json"},
        json={
            "model": "deepseek/deepseek-v3.2",
            "messages": [{"role": "user", "content": "你好"}],
            "max_tokens": 8,
        },
        timeout=60,
    )
    assert r.status_code == 200
    body = r.json()
    assert body["object"] == "chat.completion" and body["model"] == "deepseek-chat"
    assert body["choices"][0]["message"]["role"] == "assistant"
    assert body["choices"][0]["finish_reason"] in ("stop", "length")
    u = body["usage"]
    assert u["total_tokens"] == u["prompt_tokens"] + u["completion_tokens"]
    assert u["prompt_cache_hit_tokens"] + u["prompt_cache_miss_tokens"] == u["prompt_tokens"]
    assert u["prompt_tokens_details"]["cached_tokens"] == u["prompt_cache_hit_tokens"]
    assert body["system_fingerprint"]


def test_openai_sdk_sync_stream_and_async(engine_server):
    c = client(engine_server)
    r = c.chat.completions.create(
        model="deepseek-chat", messages=[{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
        max_tokens=6, temperature=0,
    )  # fmt: skip
    assert r.choices[0].message.content is not None and r.usage.completion_tokens <= 6
    # greedy is deterministic: streaming gives the same text, and the first delta carries the role
    chunks = list(
        c.chat.completions.create(
            model="deepseek-chat", messages=[{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
            max_tokens=6, temperature=0, stream=True, stream_options={"include_usage": True},
        )
    )  # fmt: skip
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert text == r.choices[0].message.content
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == r.usage.completion_tokens
    assert [ch for ch in chunks if ch.choices][-1].choices[0].finish_reason == r.choices[0].finish_reason

    async def run():
        ac = openai.AsyncOpenAI(base_url=engine_server.url, api_key="sk", max_retries=0)
        rs = await asyncio.gather(*(
            ac.chat.completions.create(model="deepseek-chat", messages=[{"role": "user", "content": f"n{i}"}], max_tokens=4)
            for i in range(4)
        ))  # fmt: skip
        return [x.usage.completion_tokens for x in rs]

    assert all(n >= 1 for n in asyncio.run(run()))


def test_thinking_mode_returns_reasoning_separately(engine_server):
    c = client(engine_server)
    r = c.chat.completions.create(
        model="deepseek-reasoner", messages=[{"role": "user", "content": "9.11 vs 9.8?"}], max_tokens=6
    )
    msg = r.model_dump()["choices"][0]["message"]
    assert isinstance(msg["reasoning_content"], str)
    assert r.usage.completion_tokens_details.reasoning_tokens >= 1
    # thinking switched on for deepseek-chat with the thinking field, streamed
    chunks = list(c.chat.completions.create(
        model="deepseek-chat", messages=[{"role": "user", "content": "hi"}], max_tokens=5, stream=True,
        extra_body={"thinking": {"type": "enabled"}},
    ))  # fmt: skip
    first = chunks[0].choices[0].delta.model_dump()
    assert first["role"] == "assistant" and first["reasoning_content"] == ""
    # logprobs are refused in thinking mode
    with pytest.raises(openai.BadRequestError):
        c.chat.completions.create(
            model="deepseek-reasoner", messages=[{"role": "user", "content": "x"}], logprobs=True
        )


def test_scripted_thinking_answer_and_dropped_history(scripted_server, tokenizer):
    c = client(scripted_server)
    scripted_server.engine.scripts = ["Let me think.</think>The answer is 9.8."]
    r = c.chat.completions.create(
        model="deepseek-reasoner", messages=[{"role": "user", "content": "9.11 or 9.8?"}]
    )
    msg = r.model_dump()["choices"][0]["message"]
    assert msg["reasoning_content"] == "Let me think." and msg["content"] == "The answer is 9.8."
    assert r.choices[0].finish_reason == "stop"
    # next turn sends the reasoning back: accepted, and dropped from the prompt (earlier user turn)
    scripted_server.engine.scripts = ["Fine.</think>Yes."]
    c.chat.completions.create(model="deepseek-reasoner", messages=[
        {"role": "user", "content": "9.11 or 9.8?"},
        {"role": "assistant", "content": "The answer is 9.8.", "reasoning_content": "SECRET-REASONING"},
        {"role": "user", "content": "Sure?"},
    ])  # fmt: skip
    assert "SECRET-REASONING" not in tokenizer.decode(scripted_server.engine.prompts[-1])


@pytest.mark.parametrize("model", ["deepseek-chat", "deepseek-reasoner"])
def test_full_tool_loop_with_parallel_calls(scripted_server, tokenizer, model):
    c = client(scripted_server)
    think = "I need the weather.</think>" if model == "deepseek-reasoner" else ""
    scripted_server.engine.scripts = [
        think
        + dsml_calls(
            ("get_weather", {"location": "Hangzhou"}), ("get_weather", {"location": "Paris", "days": 2})
        ),
        ("Done thinking.</think>" if think else "") + "Sunny in both.",
    ]
    messages = [{"role": "user", "content": "Weather in Hangzhou and Paris?"}]
    r = c.chat.completions.create(model=model, messages=messages, tools=[WEATHER])
    calls = r.choices[0].message.tool_calls
    assert r.choices[0].finish_reason == "tool_calls"
    assert [tc.function.name for tc in calls] == ["get_weather", "get_weather"]
    assert json.loads(calls[0].function.arguments) == {"location": "Hangzhou"}
    assert json.loads(calls[1].function.arguments) == {"location": "Paris", "days": 2}
    assert all(tc.id.startswith("call_") for tc in calls)
    assistant = r.choices[0].message.model_dump(exclude_none=True)
    messages.append(assistant)
    for tc, result in zip(calls, ["22C sunny", "18C sunny"], strict=True):
        messages.append({"role": "tool", "tool_call_id": tc.id, "content": result})
    final = c.chat.completions.create(model=model, messages=messages, tools=[WEATHER])
    assert final.choices[0].message.content == "Sunny in both." and final.choices[0].finish_reason == "stop"
    prompt = tokenizer.decode(scripted_server.engine.prompts[-1])
    assert "22C sunny" in prompt and "18C sunny" in prompt
    if think:  # reasoning inside the current tool loop is kept in the prompt
        assert "I need the weather." in prompt


def test_streamed_tool_call_arguments_concatenate(scripted_server):
    c = client(scripted_server)
    scripted_server.engine.scripts = [dsml_calls(("get_weather", {"location": "Hangzhou", "days": 3}))]
    chunks = list(c.chat.completions.create(
        model="deepseek-chat", messages=[{"role": "user", "content": "w?"}], tools=[WEATHER], stream=True))  # fmt: skip
    parts = [tc for ch in chunks if ch.choices for tc in (ch.choices[0].delta.tool_calls or [])]
    assert parts[0].id.startswith("call_") and parts[0].function.name == "get_weather"
    args = "".join(p.function.arguments or "" for p in parts)
    assert json.loads(args) == {"location": "Hangzhou", "days": 3}
    assert [ch for ch in chunks if ch.choices][-1].choices[0].finish_reason == "tool_calls"


def test_chat_prefix_completion_continues_the_prefix(scripted_server, tokenizer):
    c = client(scripted_server)
    scripted_server.engine.scripts = ["print('hi')\n```"]
    r = openai.OpenAI(base_url=scripted_server.url + "/beta", api_key="k", max_retries=0).chat.completions.create(
        model="deepseek-chat",
        messages=[{"role": "user", "content": "Write hello world"}, {"role": "assistant", "content": "```python\n", "prefix": True}],
        stop=["```"],
    )  # fmt: skip
    assert r.choices[0].message.content.startswith("print('hi')")
    prompt = tokenizer.decode(scripted_server.engine.prompts[-1])
    assert prompt.endswith("```python\n")  # continued, not closed
    with pytest.raises(openai.BadRequestError, match="beta"):
        c.chat.completions.create(
            model="deepseek-chat", messages=[{"role": "user", "content": "x"}, {"role": "assistant", "content": "y", "prefix": True}])  # fmt: skip


def test_thinking_stream_deltas_carry_both_fields_as_deepseek_sends_them(scripted_server):
    """api.md §5.2: in thinking mode a reasoning delta is ``{"content": null, "reasoning_content": "…"}`` and
    an answer delta ``{"content": "…", "reasoning_content": null}``; chat mode sends ``content`` alone."""
    scripted_server.engine.scripts = ["Think.</think>Answer.", "Plain."]

    def stream_deltas(model: str) -> list[dict]:
        body = {"model": model, "messages": [{"role": "user", "content": "x"}], "stream": True}
        with httpx.stream("POST", scripted_server.url + "/chat/completions", json=body) as r:
            lines = [line for line in r.iter_lines() if line.startswith("data: {")]
        return [json.loads(line.removeprefix("data: "))["choices"][0]["delta"] for line in lines]

    deltas = stream_deltas("deepseek-reasoner")
    texts = [d for d in deltas if d.get("content") or d.get("reasoning_content")]
    assert texts and all(set(d) == {"content", "reasoning_content"} for d in texts)
    assert "".join(d["reasoning_content"] or "" for d in texts) == "Think."
    assert "".join(d["content"] or "" for d in texts) == "Answer."
    texts = [d for d in stream_deltas("deepseek-chat") if d.get("content")]
    assert all(set(d) == {"content"} for d in texts) and "".join(d["content"] for d in texts) == "Plain."


def test_thinking_prefix_completion_with_content_continues_the_content(scripted_server, tokenizer):
    """§2.4: in thinking mode a prefix with content closes the reasoning (``</think>`` + content), so the
    reply continues the content: no reasoning, no reasoning tokens, a JSON constraint from the first token,
    and stop strings armed from the start. With no content the reasoning stays open and is continued."""
    beta = openai.OpenAI(base_url=scripted_server.url + "/beta", api_key="k", max_retries=0)
    think_end = tokenizer.token_id("</think>")
    scripted_server.engine.scripts = [" are red.", " more thought.</think>Roses"]
    base = [{"role": "user", "content": "Finish the line"}]
    r = beta.chat.completions.create(
        model="deepseek-reasoner", stop=["\n"], response_format={"type": "json_object"},
        messages=[*base, {"role": "assistant", "reasoning_content": "ok", "content": "Roses", "prefix": True}],
    )  # fmt: skip
    assert tokenizer.decode(scripted_server.engine.prompts[-1]).endswith("<think>ok</think>Roses")
    m = r.choices[0].message
    assert (m.content, m.reasoning_content) == (" are red.", "")
    assert r.usage.completion_tokens_details.reasoning_tokens == 0
    params = scripted_server.engine.params[-1]
    assert "start_token" not in params.guided and params.stop_strings_after is None
    r = beta.chat.completions.create(
        model="deepseek-reasoner", stop=["\n"], response_format={"type": "json_object"},
        messages=[*base, {"role": "assistant", "reasoning_content": "thinking", "content": "", "prefix": True}],
    )  # fmt: skip
    m = r.choices[0].message
    assert (m.reasoning_content, m.content) == (" more thought.", "Roses")
    params = scripted_server.engine.params[-1]
    assert params.guided["start_token"] == think_end and params.stop_strings_after == think_end


def test_stop_strings_apply_to_the_content_in_thinking_mode(scripted_server, tokenizer):
    """chat-format.md §3.3: stop strings are matched on the content, not the reasoning (the engine arms them
    with ``</think>``; its matching is tested in tests/engine). Chat mode matches from the start."""
    c = client(scripted_server)
    msgs = [{"role": "user", "content": "x"}]
    c.chat.completions.create(model="deepseek-reasoner", messages=msgs, stop=["."])
    assert scripted_server.engine.params[-1].stop_strings_after == tokenizer.token_id("</think>")
    c.chat.completions.create(model="deepseek-chat", messages=msgs, stop=["."])
    assert scripted_server.engine.params[-1].stop_strings_after is None


def test_developer_messages_are_refused_as_by_deepseek(scripted_server):
    """The V3.2 template knows a ``developer`` role (search-agent turns); DeepSeek's API does not accept it
    (chat-format.md §2), and rendering it would make a fake user turn of it."""
    c = client(scripted_server)
    with pytest.raises(openai.BadRequestError, match=r"messages\[0\]\.role: unknown role 'developer'"):
        c.chat.completions.create(
            model="deepseek-chat", messages=[{"role": "developer", "content": "Be terse."}, {"role": "user", "content": "x"}]
        )  # fmt: skip
    assert scripted_server.engine.prompts == []


@pytest.mark.parametrize("stream", [False, True])
def test_malformed_tool_markup_is_never_content(scripted_server, stream):
    """§3.3: a tool-call block that breaks is dropped (its complete calls kept), never shown as content."""
    c = client(scripted_server)
    broken = dsml_calls(("get_weather", {"location": "Paris"})).replace(f"</{D}function_calls>", "")
    scripted_server.engine.scripts = [f'Checking.  {broken}\n<{D}invoke nam="x">junk</{D}function_calls>']
    kw = dict(model="deepseek-chat", messages=[{"role": "user", "content": "Paris?"}], tools=[WEATHER])
    if stream:
        chunks = list(c.chat.completions.create(**kw, stream=True))
        content = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
        names = [
            tc.function.name
            for ch in chunks
            if ch.choices
            for tc in ch.choices[0].delta.tool_calls or []
            if tc.function.name
        ]
    else:
        m = c.chat.completions.create(**kw).choices[0].message
        content, names = m.content, [tc.function.name for tc in m.tool_calls]
    assert content == "Checking." and names == ["get_weather"]


def test_fim_completion(scripted_server, tokenizer):
    scripted_server.engine.scripts = ["    return a + b"]
    c = openai.OpenAI(base_url=scripted_server.url + "/beta", api_key="k", max_retries=0)
    r = c.completions.create(
        model="deepseek-chat", prompt="def add(a, b):\n", suffix="\n\nprint(add(1, 2))", max_tokens=64
    )
    assert r.choices[0].text == "    return a + b" and r.object == "text_completion"
    prompt = tokenizer.decode(scripted_server.engine.prompts[-1])
    assert "<｜fim▁hole｜>" in prompt and prompt.index("def add") < prompt.index("print(add")


def _check_offsets(text: str, lp, tokenizer, hidden: range = range(0)) -> None:
    """``text_offset`` indexes the choice's text: never decreasing, within it, and each token the text shows
    starts at its offset (a control token the text leaves out, like a text prompt's BOS, has no width)."""
    offs = lp.text_offset
    assert offs == sorted(offs) and all(0 <= o <= len(text) for o in offs), (offs, len(text))
    shown = [
        (o, t)
        for i, (o, t) in enumerate(zip(offs, lp.tokens, strict=True))
        if t not in tokenizer.added_tokens and "\ufffd" not in t and i not in hidden
    ]
    assert all(text.startswith(t, o) for o, t in shown), [
        (o, t, text[o - 3 : o + len(t)]) for o, t in shown if not text.startswith(t, o)
    ]
    covered = sum(len(t) for o, t in zip(offs, lp.tokens, strict=True) if text.startswith(t, o))
    assert covered >= len(text) - 8  # (all of the text is covered but for split characters)


def test_completion_logprobs_have_text_offsets_streamed_or_not(engine_server, tokenizer):
    """api.md §6: legacy logprobs carry ``text_offset`` (where each token starts in the choice's text, after an
    echoed prompt), and usage has ``completion_tokens_details``. With echo the prompt's tokens come first
    (the first without a logprob), as the legacy OpenAI API and vLLM give them; streamed, they come with the
    echo. (Offsets used to count the text prompt's BOS, which the echo does not show, and FIM's suffix: they
    ran past the text and went backwards.)"""
    c = openai.OpenAI(base_url=engine_server.url + "/beta", api_key="k", max_retries=0)
    kw = dict(model="deepseek-chat", prompt="def f(x):", max_tokens=6, temperature=0, logprobs=2, echo=True)
    r = c.completions.create(**kw)
    lp, n = r.choices[0].logprobs, r.usage.prompt_tokens
    assert r.choices[0].text.startswith("def f(x):") and len(lp.text_offset) == len(lp.tokens) == n + 6
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    assert all(v <= 0 for v in lp.token_logprobs[1:]) and all(len(t) <= 2 for t in lp.top_logprobs[1:])
    assert lp.tokens[0] == "<｜begin▁of▁sentence｜>" and lp.text_offset[:2] == [0, 0]  # the BOS is not echoed
    assert lp.text_offset[n] == len("def f(x):")  # the completion starts after the echo
    _check_offsets(r.choices[0].text, lp, tokenizer)
    assert r.usage.completion_tokens_details.reasoning_tokens == 0
    chunks = list(c.completions.create(**kw, stream=True))
    assert chunks[0].choices[0].text == "def f(x):" and chunks[0].choices[0].logprobs.tokens == lp.tokens[:n]
    streamed = [
        off
        for ch in chunks
        if ch.choices and ch.choices[0].logprobs
        for off in ch.choices[0].logprobs.text_offset
    ]
    assert streamed == lp.text_offset
    # FIM: the suffix is in the prompt's tokens but not in the echo; an echoed token-id prompt shows its BOS
    fim = c.completions.create(**{**kw, "suffix": "    return x\n"})
    toks = fim.choices[0].logprobs.tokens
    suffix = range(toks.index("<｜fim▁hole｜>") + 1, toks.index("<｜fim▁end｜>"))
    assert {fim.choices[0].logprobs.text_offset[i] for i in suffix} == {len("def f(x):")}
    _check_offsets(fim.choices[0].text, fim.choices[0].logprobs, tokenizer, hidden=suffix)
    ids = c.completions.create(**{**kw, "prompt": tokenizer.encode("def f(x):", add_bos=True)})
    assert ids.choices[0].text.startswith("<｜begin▁of▁sentence｜>def f(x):")
    assert ids.choices[0].logprobs.text_offset[:2] == [0, len("<｜begin▁of▁sentence｜>")]
    _check_offsets(ids.choices[0].text, ids.choices[0].logprobs, tokenizer)
    # sampled at a high temperature, outputs hold tokens the text skips (control tokens) and split characters
    for seed in range(12):
        s = c.completions.create(
            model="deepseek-chat", prompt="Once", max_tokens=40, logprobs=0, seed=seed, temperature=1.5
        )
        _check_offsets(s.choices[0].text, s.choices[0].logprobs, tokenizer)


def test_prompt_logprobs_score_token_id_prompts_as_evaluation_harnesses_ask(engine_server, tokenizer):
    """What lm-eval's loglikelihood requests send (a batch of token-id prompts, echo, logprobs 1,
    max_tokens 1, temperature 0): token_logprobs[1:n] are each prompt token's logprob under the model (the
    full forward's log-softmax), top_logprobs hold the most likely token, and the same prompt sent again is
    scored the same (computed, not read from the prefix cache). max_tokens 0 with echo returns the prompt
    alone; without echo it is refused."""
    c = openai.OpenAI(base_url=engine_server.url + "/v1", api_key="k", max_retries=0)
    prompts = [tokenizer.encode(t, add_bos=True) for t in ("The capital of France is Paris", "1 2 3 4 5")]
    kw = dict(model="deepseek-chat", prompt=prompts, temperature=0, logprobs=1, echo=True)
    r = c.completions.create(max_tokens=1, **kw)
    model = engine_server.ctx.engine.core.model
    for choice, ids in zip(r.choices, prompts, strict=True):
        lp, n = choice.logprobs, len(ids)
        assert len(lp.token_logprobs) == n + 1 and lp.token_logprobs[0] is None
        assert choice.text.startswith(tokenizer.decode(ids))
        with torch.no_grad():
            ref = torch.log_softmax(model(torch.tensor([ids]))[0, :, : tokenizer.vocab_size].float(), dim=-1)
        want = [ref[p - 1, ids[p]].item() for p in range(1, n)]
        assert lp.token_logprobs[1:n] == pytest.approx(want, abs=1e-4)
        for p in range(
            1, n
        ):  # the one alternative is the argmax: "is greedy" iff the token's logprob equals it
            assert max(lp.top_logprobs[p].values()) == pytest.approx(ref[p - 1].max().item(), abs=1e-4)
    again = c.completions.create(max_tokens=1, **kw)  # (rows batched with other traffic: float rounding)
    for a, b in zip(again.choices, r.choices, strict=True):
        assert a.logprobs.token_logprobs[0] is None
        assert a.logprobs.token_logprobs[1:] == pytest.approx(b.logprobs.token_logprobs[1:], abs=1e-4)
    assert again.usage.prompt_cache_hit_tokens == 0
    only = c.completions.create(max_tokens=0, **kw)
    for choice, ids in zip(only.choices, prompts, strict=True):
        assert choice.text == tokenizer.decode(ids) and len(choice.logprobs.tokens) == len(ids)
        assert choice.logprobs.token_logprobs[1:] == pytest.approx(
            r.choices[choice.index].logprobs.token_logprobs[1 : len(ids)], abs=1e-4
        )
    assert only.usage.completion_tokens == 0 and only.usage.total_tokens == only.usage.prompt_tokens
    streamed = list(
        c.completions.create(max_tokens=0, stream=True, stream_options={"include_usage": True}, **kw)
    )
    texts, lps = ["", ""], [[], []]
    for ch in streamed:
        for choice in ch.choices:
            texts[choice.index] += choice.text
            lps[choice.index] += choice.logprobs.token_logprobs if choice.logprobs else []
    assert texts == [ch.text for ch in only.choices]
    assert [lp[1:] for lp in lps] == [
        pytest.approx(ch.logprobs.token_logprobs[1:], abs=1e-4) for ch in only.choices
    ]
    assert streamed[-1].usage.completion_tokens == 0
    with pytest.raises(openai.UnprocessableEntityError, match="needs echo"):
        c.completions.create(model="deepseek-chat", prompt="hi", max_tokens=0)
    # a prompt of the whole context: scoring needs one token of room, which the error says (it used to blame
    # a max_tokens of 1 that the request never sent)
    for n in (4095, 4096):
        full = {**kw, "prompt": [[0] + [5] * (n - 1)]}
        if n == 4095:
            assert c.completions.create(max_tokens=0, **full).usage.prompt_tokens == 4095
        else:
            with pytest.raises(openai.BadRequestError, match="needs room for one token after it"):
                c.completions.create(max_tokens=0, **full)
    stats = httpx.get(engine_server.url + "/stats").json()
    assert stats["running"] == 0 and stats["free_blocks"] == stats["total_blocks"]


def test_vllm_prompt_logprobs_on_completions_and_chat(engine_server, tokenizer):
    """vLLM's ``prompt_logprobs`` extension: per prompt token (None first) {token id: {logprob, rank,
    decoded_token}} holding the token itself and its k most likely alternatives (ranks 1..k); on
    /completions per choice, on chat at the top level; the same numbers as the legacy echo logprobs; not
    with stream (400, as vLLM)."""
    c = openai.OpenAI(base_url=engine_server.url + "/v1", api_key="k", max_retries=0)
    ids = tokenizer.encode("one two three four", add_bos=True)
    r = c.completions.create(
        model="deepseek-chat", prompt=ids, max_tokens=1, temperature=0, echo=True, logprobs=1,
        extra_body={"prompt_logprobs": 3},
    ).model_dump()  # fmt: skip
    plp, legacy = r["choices"][0]["prompt_logprobs"], r["choices"][0]["logprobs"]
    assert len(plp) == len(ids) and plp[0] is None
    for p in range(1, len(ids)):
        entry = plp[p]
        own = entry[str(ids[p])]
        assert own["logprob"] == pytest.approx(legacy["token_logprobs"][p], abs=1e-6)
        assert own["decoded_token"] == tokenizer.decode([ids[p]])
        ranked = sorted((v["rank"], v["logprob"]) for v in entry.values())
        assert [rk for rk, _ in ranked][:3] == [1, 2, 3] and len(entry) in (3, 4)
        assert own["rank"] >= 1 and (own["rank"] <= 3) == (len(entry) == 3)
        assert [lp for _, lp in ranked] == sorted((lp for _, lp in ranked), reverse=True)
        assert len(legacy["top_logprobs"][p]) == 1  # the legacy field keeps its own count
    chat = c.chat.completions.create(
        model="deepseek-chat", messages=[{"role": "user", "content": "hi there"}], max_tokens=1,
        extra_body={"prompt_logprobs": 0},
    ).model_dump()  # fmt: skip
    assert (
        len(chat["prompt_logprobs"]) == chat["usage"]["prompt_tokens"] and chat["prompt_logprobs"][0] is None
    )
    assert all(len(e) == 1 for e in chat["prompt_logprobs"][1:])  # the token itself only
    for call in (
        lambda: c.chat.completions.create(model="deepseek-chat", messages=[{"role": "user", "content": "x"}],
                                          stream=True, extra_body={"prompt_logprobs": 1}),
        lambda: c.completions.create(model="deepseek-chat", prompt="x", stream=True, extra_body={"prompt_logprobs": 1}),
    ):  # fmt: skip
        with pytest.raises(openai.BadRequestError, match="not available with stream"):
            call()
    with pytest.raises(openai.UnprocessableEntityError):
        c.completions.create(model="deepseek-chat", prompt="x", extra_body={"prompt_logprobs": 21})


def test_usage_reports_cache_hits_on_a_repeated_long_prompt(engine_server):
    c = client(engine_server)
    long = " ".join(f"word{i}" for i in range(400))
    kw = dict(model="deepseek-chat", messages=[{"role": "user", "content": long}], max_tokens=2)
    first = c.chat.completions.create(**kw).model_dump()["usage"]
    second = c.chat.completions.create(**kw).model_dump()["usage"]
    assert first["prompt_cache_hit_tokens"] == 0
    assert second["prompt_cache_hit_tokens"] >= second["prompt_tokens"] - 32
    assert second["prompt_cache_miss_tokens"] == second["prompt_tokens"] - second["prompt_cache_hit_tokens"]


def test_max_completion_tokens_caps_the_reply_and_wins_over_max_tokens(engine_server):
    """OpenAI's newer name for max_tokens (what newer clients send; vLLM takes it): it caps the reply, and
    wins when both are given. Ignored, the reply would run to the mode's default of 4096 tokens."""
    c = client(engine_server)
    kw = dict(model="deepseek-chat", messages=[{"role": "user", "content": "Count"}],
              extra_body={"ignore_eos": True})  # fmt: skip
    r = c.chat.completions.create(max_completion_tokens=3, **kw)
    assert (r.usage.completion_tokens, r.choices[0].finish_reason) == (3, "length")
    r = c.chat.completions.create(max_completion_tokens=2, max_tokens=6, **kw)
    assert r.usage.completion_tokens == 2


def test_models_route(engine_server):
    ids = [m.id for m in client(engine_server).models.list()]
    assert {"deepseek-chat", "deepseek-reasoner"} <= set(ids)
    assert httpx.get(engine_server.url + "/openapi.json").json()["paths"]["/chat/completions"]
    # client.models.retrieve: one entry of the list; an unknown id is a 404 in the error shape
    for name in ids:
        m = client(engine_server).models.retrieve(name)
        assert (m.id, m.object, m.owned_by) == (name, "model", "deepseek")
    with pytest.raises(openai.NotFoundError, match="Model Not Exist"):
        client(engine_server).models.retrieve("gpt-4o")


def test_parallel_tool_calls_false_keeps_the_first_call(scripted_server, tokenizer):
    c = client(scripted_server)
    two = dsml_calls(("get_weather", {"location": "A"}), ("get_weather", {"location": "B"}))
    scripted_server.engine.scripts = [two, two]
    r = c.chat.completions.create(model="deepseek-chat", messages=[{"role": "user", "content": "w?"}],
                                  tools=[WEATHER], parallel_tool_calls=False)  # fmt: skip
    assert [json.loads(t.function.arguments)["location"] for t in r.choices[0].message.tool_calls] == ["A"]
    chunks = list(c.chat.completions.create(model="deepseek-chat", messages=[{"role": "user", "content": "w?"}],
                                            tools=[WEATHER], parallel_tool_calls=False, stream=True))  # fmt: skip
    assert {tc.index for ch in chunks if ch.choices for tc in (ch.choices[0].delta.tool_calls or [])} == {0}
    # generation stops once the first call is complete (api.md §11): the second call's tokens are not made
    n_first = len(tokenizer.encode(dsml_calls(("get_weather", {"location": "A"}))))
    assert r.choices[0].finish_reason == "tool_calls" and r.usage.completion_tokens <= n_first + 2
    final = [ch for ch in chunks if ch.choices and ch.choices[0].finish_reason][-1]
    assert (
        final.choices[0].finish_reason == "tool_calls"
        and final.usage.completion_tokens == r.usage.completion_tokens
    )


def test_logprobs_objects(engine_server):
    r = client(engine_server).chat.completions.create(
        model="deepseek-chat", messages=[{"role": "user", "content": "hi"}], max_tokens=3, temperature=0,
        logprobs=True, top_logprobs=3,
    )  # fmt: skip
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens
    for entry in content:
        assert entry.logprob <= 0 and len(entry.top_logprobs) == 3
        assert entry.top_logprobs[0].logprob >= entry.top_logprobs[-1].logprob
        assert entry.logprob == pytest.approx(entry.top_logprobs[0].logprob)  # greedy picks the top token


def test_a_batch_of_prompts_answers_each_as_alone(engine_server, tokenizer):
    """OpenAI's batch form (as vLLM takes it): choice i answers prompt i exactly as a request of its own
    (greedy), texts or token ids, streamed or not; usage sums the prompts; nothing is left in the engine."""
    c = openai.OpenAI(base_url=engine_server.url + "/beta", api_key="k", max_retries=0)
    kw = dict(model="deepseek-chat", max_tokens=5, temperature=0)
    texts = ["def f(x):", "The quick brown fox", "1, 2, 3,"]
    alone = [c.completions.create(prompt=t, **kw) for t in texts]
    r = c.completions.create(prompt=texts, **kw)
    assert [ch.index for ch in r.choices] == [0, 1, 2]
    assert [ch.text for ch in r.choices] == [a.choices[0].text for a in alone]
    assert r.usage.prompt_tokens == sum(a.usage.prompt_tokens for a in alone)
    assert r.usage.completion_tokens == 15 and r.usage.total_tokens == r.usage.prompt_tokens + 15
    assert r.usage.prompt_cache_hit_tokens + r.usage.prompt_cache_miss_tokens == r.usage.prompt_tokens
    ids = [tokenizer.encode(t, add_bos=True) for t in texts]
    assert [ch.text for ch in c.completions.create(prompt=ids, **kw).choices] == [ch.text for ch in r.choices]
    # streamed, with the echo, logprobs and a usage chunk: each choice's pieces add up to the same text
    chunks = list(c.completions.create(prompt=texts, **kw, stream=True, echo=True, logprobs=1,
                                       stream_options={"include_usage": True}))  # fmt: skip
    got = ["", "", ""]
    finished = []
    for ch in chunks:
        for choice in ch.choices:
            got[choice.index] += choice.text
            if choice.finish_reason:
                finished.append(choice.index)
    assert got == [t + a.choices[0].text for t, a in zip(texts, alone, strict=True)]
    assert sorted(finished) == [0, 1, 2]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 15
    stats = httpx.get(engine_server.url + "/stats").json()
    assert stats["running"] == 0 and stats["waiting"] == 0 and stats["free_blocks"] == stats["total_blocks"]


def _metric(srv, name: str) -> float:
    for line in httpx.get(srv.url + "/metrics").text.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{name} not in /metrics")


def test_n_choices_are_n_samples_of_one_prompt(engine_server):
    """``n`` (OpenAI, vLLM): choice j of a seeded request is what seed + j gives alone, streamed or not;
    the prompt is counted once in usage and computed once (the other samples read its blocks from the prefix
    cache); on /completions choice i * n + j is sample j of prompt i; nothing is left in the engine."""
    c = client(engine_server)
    msgs = [{"role": "user", "content": "Name three colours. " * 12}]  # ~100 tokens: whole blocks to share
    kw = dict(model="deepseek-chat", messages=msgs, max_tokens=6, temperature=1.0)
    before = _metric(engine_server, "dsv32:prompt_tokens_cached_total")
    r = c.chat.completions.create(n=3, seed=11, **kw)
    shared = _metric(engine_server, "dsv32:prompt_tokens_cached_total") - before
    alone = [c.chat.completions.create(seed=11 + j, **kw) for j in range(3)]
    assert [ch.index for ch in r.choices] == [0, 1, 2]
    assert [ch.message.content for ch in r.choices] == [a.choices[0].message.content for a in alone]
    assert len({ch.message.content for ch in r.choices}) > 1
    p = alone[0].usage.prompt_tokens
    assert shared >= 2 * ((p - 1) // 16 * 16)  # samples 1 and 2 read every full block of the prompt
    assert (
        r.usage.prompt_tokens == p and r.usage.prompt_cache_hit_tokens + r.usage.prompt_cache_miss_tokens == p
    )
    assert r.usage.completion_tokens == sum(a.usage.completion_tokens for a in alone)
    assert r.usage.total_tokens == p + r.usage.completion_tokens
    chunks = list(c.chat.completions.create(n=3, seed=11, stream=True, stream_options={"include_usage": True},
                                            **kw))  # fmt: skip
    text, finish = ["", "", ""], [None, None, None]
    for ch in chunks:
        for choice in ch.choices:
            text[choice.index] += choice.delta.content or ""
            finish[choice.index] = choice.finish_reason or finish[choice.index]
    assert text == [ch.message.content for ch in r.choices] and finish == ["length"] * 3
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == r.usage.completion_tokens
    # /completions: a batch of two prompts, two samples each
    b = openai.OpenAI(base_url=engine_server.url + "/beta", api_key="k", max_retries=0)
    ckw = dict(model="deepseek-chat", max_tokens=4, temperature=1.0)
    prompts = ["def f(x):", "The quick brown fox"]
    rb = b.completions.create(prompt=prompts, n=2, seed=3, **ckw)
    assert [ch.index for ch in rb.choices] == [0, 1, 2, 3]
    for i, prompt in enumerate(prompts):
        solo = [b.completions.create(prompt=prompt, seed=3 + j, **ckw) for j in range(2)]
        assert [rb.choices[2 * i + j].text for j in range(2)] == [s.choices[0].text for s in solo]
        if i == 0:
            prompt_tokens = solo[0].usage.prompt_tokens
    assert (
        rb.usage.prompt_tokens == prompt_tokens + solo[0].usage.prompt_tokens
        and rb.usage.completion_tokens == 16
    )
    stats = httpx.get(engine_server.url + "/stats").json()
    assert stats["running"] == 0 and stats["waiting"] == 0 and stats["free_blocks"] == stats["total_blocks"]


def test_n_choices_each_parse_their_own_reply(scripted_server, tokenizer):
    """Each choice is parsed on its own: one sample calls a tool (with parallel_tool_calls false its request
    ends once the call is complete) while the other answers in text, streamed or not."""
    c = client(scripted_server)
    two = dsml_calls(("get_weather", {"location": "A"}), ("get_weather", {"location": "B"}))
    kw = dict(model="deepseek-chat", messages=[{"role": "user", "content": "w?"}], tools=[WEATHER], n=2,
              parallel_tool_calls=False)  # fmt: skip
    scripted_server.engine.scripts = [two, "It is sunny."]
    r = c.chat.completions.create(**kw)
    assert r.choices[0].finish_reason == "tool_calls" and r.choices[1].finish_reason == "stop"
    assert [json.loads(t.function.arguments)["location"] for t in r.choices[0].message.tool_calls] == ["A"]
    assert r.choices[1].message.content == "It is sunny." and not r.choices[1].message.tool_calls
    n_first = len(tokenizer.encode(dsml_calls(("get_weather", {"location": "A"}))))
    n_text = len(tokenizer.encode("It is sunny.")) + 1  # and the EOS
    assert n_text < r.usage.completion_tokens <= n_first + 2 + n_text
    scripted_server.engine.scripts = [two, "It is sunny."]
    chunks = list(c.chat.completions.create(stream=True, **kw))
    calls, text, finish = [], "", {}
    for ch in chunks:
        for choice in ch.choices:
            if choice.delta.tool_calls:
                assert choice.index == 0
                calls += [tc.function.arguments or "" for tc in choice.delta.tool_calls]
            if choice.index == 1:
                text += choice.delta.content or ""
            if choice.finish_reason:
                assert choice.index not in finish  # one last chunk per choice
                finish[choice.index] = choice.finish_reason
    assert json.loads("".join(calls)) == {"location": "A"} and text == "It is sunny."
    assert finish == {0: "tool_calls", 1: "stop"}
    assert chunks[-1].usage.completion_tokens == r.usage.completion_tokens


def test_vllm_request_extensions_reach_the_engine(scripted_server, tokenizer):
    """vLLM's ``chat_template_kwargs: {"thinking": ...}`` switches thinking mode (the prompt ends in <think>
    or </think>; DeepSeek's own ``thinking`` field wins over it), ``stop_token_ids``, ``min_tokens`` and
    ``priority`` reach the engine, and
    extensions asked for with their no-op value pass."""
    c = client(scripted_server)
    eng = scripted_server.engine
    kw = dict(model="deepseek-chat", messages=[{"role": "user", "content": "hi"}], max_tokens=4)
    last = []
    for extra in ({"chat_template_kwargs": {"thinking": True}}, {"chat_template_kwargs": {"enable_thinking": True}},
                  {"chat_template_kwargs": {"thinking": True}, "thinking": {"type": "disabled"}}, {}):  # fmt: skip
        c.chat.completions.create(extra_body=extra, **kw)
        last.append(tokenizer.decode(eng.prompts[-1][-1:], skip_special_tokens=False))
    assert last == ["<think>", "<think>", "</think>", "</think>"]
    c.chat.completions.create(extra_body={"stop_token_ids": [5, 6], "min_tokens": 2, "best_of": 1,
                                          "use_beam_search": False, "priority": -3}, **kw)  # fmt: skip
    assert eng.params[-1].stop_token_ids == [5, 6] and eng.params[-1].min_tokens == 2
    assert eng.params[-1].priority == -3
    b = openai.OpenAI(base_url=scripted_server.url, api_key="k", max_retries=0)
    b.completions.create(model="deepseek-chat", prompt="x", max_tokens=2, n=2, extra_body={"best_of": 2,
                         "stop_token_ids": [7]})  # fmt: skip
    assert [p.stop_token_ids for p in eng.params[-2:]] == [[7], [7]]


def test_vllm_token_controls_act_on_the_output(engine_server, tokenizer):
    """vLLM's ``allowed_token_ids``, ``bad_words``, ``include_stop_str_in_output`` and
    ``truncate_prompt_tokens`` on /completions and chat (through the openai SDK's extra_body)."""
    c = client(engine_server)
    base = dict(model="deepseek-chat", prompt="The capital of France is", max_tokens=16, temperature=0)
    ids = {"return_token_ids": True, "ignore_eos": True}

    def run(**extra):
        return c.completions.create(**base, extra_body={**ids, **extra}).model_dump()["choices"][0]

    free = run()
    allowed = sorted(set(free["token_ids"][1::2]))[:3]
    assert set(run(allowed_token_ids=allowed)["token_ids"]) <= set(allowed)
    stop = free["text"][5:9]
    at = free["text"].index(stop)
    kept = run(stop=[stop], include_stop_str_in_output=True)
    assert kept["text"] == free["text"][: at + len(stop)] and kept["finish_reason"] == "stop"
    assert run(stop=[stop])["text"] == free["text"][:at]
    word = tokenizer.decode(free["token_ids"][3:5])
    banned = run(bad_words=[word])["token_ids"]
    for seq in (tokenizer.encode(word.lstrip()), tokenizer.encode(" " + word.lstrip())):
        assert not any(banned[i : i + len(seq)] == seq for i in range(len(banned))), (word, banned)
    r = c.completions.create(**base, extra_body={"truncate_prompt_tokens": 3})
    assert r.usage.prompt_tokens == 3
    chat = c.chat.completions.create(model="deepseek-chat", max_tokens=2, messages=[{"role": "user", "content": "Hello there"}],
                                     extra_body={"truncate_prompt_tokens": 4, "return_token_ids": True})  # fmt: skip
    full = httpx.post(
        engine_server.url + "/tokenize", json={"messages": [{"role": "user", "content": "Hello there"}]}
    )
    assert (
        chat.usage.prompt_tokens == 4 and chat.model_dump()["prompt_token_ids"] == full.json()["tokens"][-4:]
    )


def test_return_token_ids_as_vllm_gives_them(engine_server, tokenizer):
    """vLLM's ``return_token_ids``: the prompt's ids (what /tokenize gives for the same messages) and each
    choice's generated ids, whose text is the reply; streamed, each chunk's new ids add up to the same."""
    c = client(engine_server)
    msgs = [{"role": "user", "content": "Count to three."}]
    kw = dict(
        model="deepseek-chat",
        messages=msgs,
        max_tokens=6,
        temperature=0,
        extra_body={"return_token_ids": True},
    )
    r = c.chat.completions.create(**kw).model_dump()
    prompt = httpx.post(engine_server.url + "/tokenize", json={"messages": msgs}).json()["tokens"]
    assert (
        r["prompt_token_ids"] == prompt
        and len(r["choices"][0]["token_ids"]) == r["usage"]["completion_tokens"]
    )
    assert (
        tokenizer.decode(r["choices"][0]["token_ids"], skip_special_tokens=True)
        == r["choices"][0]["message"]["content"]
    )
    chunks = [ch.model_dump() for ch in c.chat.completions.create(stream=True, **kw)]
    assert chunks[0]["prompt_token_ids"] == prompt
    assert [t for ch in chunks for choice in ch["choices"] for t in choice["token_ids"]] == r["choices"][0][
        "token_ids"
    ]
    b = openai.OpenAI(base_url=engine_server.url, api_key="k", max_retries=0)
    ckw = dict(
        model="deepseek-chat",
        prompt=["1, 2,", "a b"],
        max_tokens=4,
        temperature=0,
        extra_body={"return_token_ids": True},
    )
    rc = b.completions.create(**ckw).model_dump()
    for choice, text in zip(rc["choices"], ["1, 2,", "a b"], strict=True):
        assert (
            choice["prompt_token_ids"] == tokenizer.encode(text, add_bos=True)
            and len(choice["token_ids"]) == 4
        )
    got: dict[int, list[int]] = {0: [], 1: []}
    firsts = set()
    for ch in b.completions.create(stream=True, **ckw):
        for choice in ch.model_dump()["choices"]:
            got[choice["index"]] += choice["token_ids"]
            if choice.get("prompt_token_ids"):
                firsts.add(choice["index"])
    assert got == {i: rc["choices"][i]["token_ids"] for i in (0, 1)} and firsts == {0, 1}
    assert "token_ids" not in c.chat.completions.create(**{**kw, "extra_body": {}}).model_dump()["choices"][0]
