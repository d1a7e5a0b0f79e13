"""Seeded random traffic against the real server and engine under a tiny cache: chat (thinking or not, tools,
JSON modes, sampling options, logprobs), FIM, chat prefix completion and Anthropic messages, streamed or not,
with clients that hang up and bodies that are malformed. Nothing may answer a 5xx or hang, preemption must
happen, every block must come back, and ``/metrics`` must agree with what the clients saw."""

from __future__ import annotations

import asyncio
import json
import random

import httpx
import pytest
import torch

from dsv32.api.service import ServingContext
from dsv32.engine.async_engine import AsyncEngine
from dsv32.engine.core import EngineConfig, EngineCore
from dsv32.weights.loader import load_model
from tests.api.server_harness import RunningServer
from tests.engine.test_metrics import samples
from tests.engine.test_spec_decode import oracle_mtp_model

WORDS = "the cache block token model stream abort json tool think 你好 😀 <｜end▁of▁sentence｜> </think> \n".split(
    " "
)
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "w", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]  # fmt: skip
SCHEMA = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}


def _text(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n))


def _chat(rng: random.Random) -> tuple[str, dict]:
    msgs = [{"role": "user", "content": _text(rng, rng.randint(1, 200))}]
    if rng.random() < 0.2:
        msgs += [{"role": "assistant", "content": "", "tool_calls": [{"id": "c1", "type": "function", "function": {
                     "name": "get_weather", "arguments": '{"city": "x"}'}}]},
                 {"role": "tool", "tool_call_id": "c1", "content": _text(rng, 3)}]  # fmt: skip
    thinking = rng.random() < 0.4
    body = {"model": "deepseek-reasoner" if thinking else "deepseek-chat", "messages": msgs,
            "max_tokens": rng.randint(1, 24), "stream": rng.random() < 0.5}  # fmt: skip
    r = rng.random()
    if r < 0.1:
        body["response_format"] = {"type": "json_object"}
    elif r < 0.15:
        body["response_format"] = {"type": "json_schema", "json_schema": {"name": "x", "schema": SCHEMA}}
    elif r < 0.3:
        body["tools"], body["tool_choice"] = TOOLS, rng.choice(["auto", "required", "none"])
    if rng.random() < 0.3:
        body["temperature"] = rng.choice([0, 0.7, 1.5])
    if rng.random() < 0.2:
        body["stop"] = [_text(rng, 1)]
    if rng.random() < 0.2 and not thinking:
        body["logprobs"], body["top_logprobs"] = True, rng.randint(0, 5)
    if rng.random() < 0.1:
        body["seed"] = rng.randint(0, 9)
    return "/chat/completions", body


def _other(rng: random.Random) -> tuple[str, dict | str]:
    stream = rng.random() < 0.5
    return rng.choice([
        ("/beta/completions", {"model": "deepseek-chat", "prompt": _text(rng, 20), "suffix": _text(rng, 5),
                               "max_tokens": rng.randint(1, 16), "stream": stream}),
        ("/beta/chat/completions", {"model": "deepseek-chat", "max_tokens": rng.randint(1, 16), "stream": stream,
                                    "messages": [{"role": "user", "content": _text(rng, 10)},
                                                 {"role": "assistant", "content": _text(rng, 3), "prefix": True}]}),
        ("/v1/messages", {"model": "deepseek-chat", "max_tokens": rng.randint(1, 24), "stream": stream,
                          "messages": [{"role": "user", "content": _text(rng, rng.randint(1, 150))}],
                          **({"thinking": {"type": "enabled", "budget_tokens": 1024}} if rng.random() < 0.3 else {})}),
        ("/chat/completions", rng.choice(["{", "null", "[]", '{"model": 5}', '{"messages": "hi", "model": "x"}'])),
    ])  # fmt: skip


async def _one(
    client: httpx.AsyncClient, base: str, path: str, body, hang_up: int | None, seen: dict
) -> None:
    kw = (
        {"content": body, "headers": {"content-type": "application/json"}}
        if isinstance(body, str)
        else {"json": body}
    )
    if isinstance(body, dict) and body.get("stream"):
        async with client.stream("POST", base + path, **kw) as r:
            seen["status"].append(r.status_code)
            lines = []
            async for line in r.aiter_lines():
                lines.append(line)
                if hang_up is not None and len(lines) >= hang_up:
                    seen["hung_up"] += 1
                    return
            if r.status_code == 200:
                done = (
                    "data: [DONE]" in lines
                    if path != "/v1/messages"
                    else any("message_stop" in x for x in lines)
                )
                assert done, (path, body, lines[-3:])
    else:
        r = await client.post(base + path, **kw)
        seen["status"].append(r.status_code)
        if r.status_code == 200 and path != "/v1/messages":
            usage = r.json()["usage"]
            assert usage["completion_tokens"] <= body["max_tokens"]
            assert (
                usage["prompt_cache_hit_tokens"] + usage["prompt_cache_miss_tokens"] == usage["prompt_tokens"]
            )


@pytest.mark.slow
@pytest.mark.parametrize("speculative", [False, True], ids=["plain", "speculative"])
def test_random_mixed_traffic_under_a_tiny_cache(default_model_dir, tokenizer, speculative):
    if (
        speculative
    ):  # a model whose MTP drafts are mostly right: up to 4 tokens a step, under the same traffic
        model = oracle_mtp_model(vocab_size=tokenizer.vocab_size)
    else:
        model = load_model(default_model_dir, dtype=torch.float32, progress=False)
    # 32 blocks of 16 = 512 token slots for 6 requests of up to ~450 tokens each: preemption is forced
    config = EngineConfig(
        block_size=16, num_blocks=32, max_num_seqs=6, num_speculative_tokens=3 if speculative else 0
    )
    core = EngineCore(model, config, eos_id=tokenizer.eos_id)
    engine = AsyncEngine(core, tokenizer, max_waiting=64)
    ctx = ServingContext(engine=engine, tokenizer=tokenizer, family="v3.2", max_model_len=4096, keepalive_s=0.5,
                         eos_id=tokenizer.eos_id)  # fmt: skip
    rng = random.Random(7)
    jobs = []
    for _ in range(72):
        if (
            rng.random() < 0.1
        ):  # a client that hangs up after a few lines of a long stream: only an abort ends it
            body = {"model": "deepseek-chat", "messages": [{"role": "user", "content": _text(rng, 5)}],
                    "max_tokens": 300, "stream": True}  # fmt: skip
            jobs.append(("/chat/completions", body, rng.randint(1, 4)))
        else:
            jobs.append((*(_chat(rng) if rng.random() < 0.6 else _other(rng)), None))
    # prompts scored for their logprobs (echo + logprobs; max_tokens 0: the prompt alone), text or token ids,
    # as evaluation harnesses send them: computed in full beside the rest, under preemption
    for _ in range(8):
        prompt = (
            _text(rng, rng.randint(1, 60))
            if rng.random() < 0.5
            else [0] + [rng.randint(2, 5000) for _ in range(rng.randint(1, 40))]
        )  # (one prompt a request: /metrics counts engine requests, the test HTTP ones)
        body = {"model": "deepseek-chat", "prompt": prompt, "echo": True, "logprobs": rng.randint(0, 3),
                "max_tokens": rng.choice([0, 1, 8]), "temperature": 0, "stream": rng.random() < 0.5}  # fmt: skip
        jobs.append(("/v1/completions", body, None))
    # two long streams that the workers take first (the queue is popped from the end): together they outgrow
    # the 512 slots, so preemption happens however the random traffic's timing turns out
    for _ in range(2):
        body = {"model": "deepseek-chat", "messages": [{"role": "user", "content": _text(rng, 60)}],
                "max_tokens": 250, "ignore_eos": True, "stream": True}  # fmt: skip
        jobs.append(("/chat/completions", body, None))
    seen: dict = {"status": [], "hung_up": 0}

    async def main(base: str) -> None:
        queue = list(jobs)
        async with httpx.AsyncClient(timeout=120) as client:

            async def worker() -> None:
                while queue:
                    path, body, hang_up = queue.pop()
                    await _one(client, base, path, body, hang_up, seen)

            await asyncio.gather(*(worker() for _ in range(8)))
            for _ in range(200):  # hung-up requests are aborted by the server as it notices
                stats = (await client.get(base + "/stats")).json()
                if stats["running"] == 0 and stats["waiting"] == 0:
                    break
                await asyncio.sleep(0.1)

    try:
        with RunningServer(ctx) as srv:
            asyncio.run(main(srv.url))
            stats = httpx.get(srv.url + "/stats").json()
            metrics = samples(httpx.get(srv.url + "/metrics").content)
    finally:
        engine.shutdown()
    status = seen["status"]
    assert len(status) == len(jobs) and not [s for s in status if s >= 500], status
    assert status.count(200) >= len(jobs) // 2 and any(400 <= s < 500 for s in status)
    assert stats["running"] == 0 and stats["waiting"] == 0
    assert stats["free_blocks"] == stats["total_blocks"], json.dumps(stats)  # every block free or cached
    assert stats["preemptions"] > 0, "the tiny cache forced no preemption"
    finished = {labels: v for (name, labels), v in metrics.items() if name == "dsv32:request_success_total"}
    # each accepted request (a 200) ended once: as stop / length, or as an abort (a client that hung up)
    assert sum(finished.values()) == status.count(200)
    assert 1 <= finished.get((("finished_reason", "abort"),), 0) <= seen["hung_up"]
    assert metrics[("dsv32:num_preemptions_total", ())] == stats["preemptions"]
    if speculative:
        assert metrics[("dsv32:spec_decode_num_accepted_tokens_total", ())] > 0
