"""Concurrency, aborts, keep-alives, API keys and per-key limits against the real server."""

from __future__ import annotations

import asyncio
import json
import time

import anthropic
import httpx
import openai
import pytest
import torch

from dsv32.api.service import ServingContext
from dsv32.engine.async_engine import AsyncEngine
from dsv32.engine.core import EngineConfig, EngineCore
from dsv32.weights.loader import load_model
from tests.api.server_harness import RunningServer


def test_64_concurrent_streams_and_10_aborted_mid_stream(engine_server):
    async def run():
        ac = openai.AsyncOpenAI(base_url=engine_server.url, api_key="k", max_retries=0, timeout=300)

        async def one(i: int) -> int:
            stream = await ac.chat.completions.create(
                model="deepseek-chat", messages=[{"role": "user", "content": f"client {i}"}],
                max_tokens=12 if i >= 10 else 400, temperature=0.8, stream=True,
            )  # fmt: skip
            n = 0
            async for _chunk in stream:
                n += 1
                if i < 10 and n == 3:  # these clients hang up mid-stream
                    await stream.close()
                    return -1
            return n

        return await asyncio.gather(*(one(i) for i in range(64)), return_exceptions=True)

    results = asyncio.run(run())
    errors = [r for r in results if isinstance(r, BaseException)]
    assert not errors, errors[:3]
    assert all(r > 2 for r in results[10:])
    deadline = time.time() + 30
    while time.time() < deadline:  # the aborted requests' blocks come back at once (next engine step)
        stats = httpx.get(engine_server.url + "/stats").json()
        if stats["running"] == 0 and stats["waiting"] == 0:
            break
        time.sleep(0.1)
    assert stats["running"] == 0 and stats["waiting"] == 0
    assert stats["free_blocks"] == stats["total_blocks"]


def test_keepalive_comments_while_waiting(scripted_server):
    scripted_server.engine.first_delay = 1.2
    scripted_server.ctx.keepalive_s = 0.3
    with httpx.stream("POST", scripted_server.url + "/chat/completions", timeout=30, json={
        "model": "deepseek-chat", "messages": [{"role": "user", "content": "x"}], "stream": True}) as r:  # fmt: skip
        raw = "".join(r.iter_text())
    assert ": keep-alive\n\n" in raw and raw.rstrip().endswith("data: [DONE]")


def test_blank_lines_keep_a_waiting_non_streamed_request_alive(scripted_server):
    """api.md §5.1: while a non-streamed request waits, blank lines go out before the JSON body (the SDKs
    skip them); a quick one is a plain response; a failure after the blank lines is an in-band error."""
    scripted_server.ctx.keepalive_s = 0.3
    body = {"model": "deepseek-chat", "messages": [{"role": "user", "content": "x"}]}
    scripted_server.engine.scripts = ["quick"]
    r = httpx.post(scripted_server.url + "/chat/completions", json=body, timeout=30)
    assert r.content.startswith(b"{") and r.json()["choices"][0]["message"]["content"] == "quick"
    scripted_server.engine.first_delay = 1.2
    scripted_server.engine.scripts = ["slow", "slow again"]
    r = httpx.post(scripted_server.url + "/chat/completions", json=body, timeout=30)
    assert (
        r.status_code == 200
        and r.content.startswith(b"\n\n")
        and r.json()["choices"][0]["message"]["content"] == "slow"
    )
    c = openai.OpenAI(base_url=scripted_server.url, api_key="k", max_retries=0)
    assert c.chat.completions.create(**body).choices[0].message.content == "slow again"
    scripted_server.engine.fail_after = 0
    r = httpx.post(scripted_server.url + "/anthropic/v1/messages", json={**body, "max_tokens": 5}, timeout=30)
    assert r.status_code == 200 and r.content.startswith(b"\n")
    assert r.json()["type"] == "error" and "generation failed" in r.json()["error"]["message"]


@pytest.mark.parametrize("route", ["openai", "anthropic"])
def test_a_failure_mid_stream_is_an_error_event_not_a_cut(scripted_server, route):
    """api.md §5.3: once a stream has started, an engine failure is sent in-band (the SDKs raise it as an
    API error), then the stream closes; it is not a dropped connection."""
    scripted_server.engine.scripts = ["one two three four five six"]
    scripted_server.engine.fail_after = 3
    msgs = [{"role": "user", "content": "x"}]
    if route == "openai":
        c = openai.OpenAI(base_url=scripted_server.url, api_key="k", max_retries=0)
        seen = []
        with pytest.raises(openai.APIError, match="generation failed: the engine stopped") as e:
            for ch in c.chat.completions.create(model="deepseek-chat", messages=msgs, stream=True):
                seen += [ch.choices[0].delta.content or ""] if ch.choices else []
        assert not isinstance(e.value, openai.APIConnectionError) and "".join(seen) == "one two three"
    else:
        c = anthropic.Anthropic(base_url=scripted_server.url + "/anthropic", api_key="k", max_retries=0)
        with pytest.raises(anthropic.APIStatusError, match="generation failed") as e:
            with c.messages.stream(model="deepseek-chat", max_tokens=50, messages=msgs) as s:
                list(s)
        assert e.value.body["error"]["type"] == "api_error"


@pytest.mark.parametrize("stream", [False, True])
def test_a_request_that_does_not_start_in_time_is_closed(scripted_server, stream):
    """api.md §5.1: a request that has not started generating within the start timeout (10 minutes by
    default) is closed with a 503, in-band (after the keep-alives: a stream's comments, a non-streamed
    reply's blank lines)."""
    scripted_server.engine.first_delay = 3.0
    scripted_server.ctx.start_timeout_s = 0.5
    scripted_server.ctx.keepalive_s = 0.2
    body = {"model": "deepseek-chat", "messages": [{"role": "user", "content": "x"}], "stream": stream}
    t0 = time.monotonic()
    r = httpx.post(scripted_server.url + "/chat/completions", json=body, timeout=30)
    assert time.monotonic() - t0 < 2.5
    if stream:
        assert r.status_code == 200 and ": keep-alive" in r.text and "[DONE]" not in r.text
        err = json.loads(r.text.strip().splitlines()[-1].removeprefix("data: "))["error"]
    else:
        assert r.status_code == 200 and r.content.startswith(b"\n")
        err = r.json()["error"]
    assert "did not start within 0.5 s" in err["message"] and err["code"] == "server_overloaded"


def test_api_keys_and_per_key_limit(default_model_dir, tokenizer):
    model = load_model(default_model_dir, dtype=torch.float32, progress=False)
    core = EngineCore(model, EngineConfig(num_blocks=256), eos_id=tokenizer.eos_id)
    engine = AsyncEngine(core, tokenizer)
    ctx = ServingContext(engine=engine, tokenizer=tokenizer, family="v3.2", max_model_len=4096,
                         api_keys=["sk-good", "sk-other"], max_concurrent_per_key=2)  # fmt: skip
    body = {"model": "deepseek-chat", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 200}
    try:
        with RunningServer(ctx) as srv:
            r = httpx.post(
                srv.url + "/chat/completions", json=body, headers={"Authorization": "Bearer sk-bad!"}
            )
            assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
            assert "sk-bad!" not in r.json()["error"]["message"]  # the key is masked
            assert httpx.post(srv.url + "/chat/completions", json=body).status_code == 401
            assert httpx.get(srv.url + "/health").status_code == 200  # open
            metrics = httpx.get(srv.url + "/metrics")  # open too: Prometheus scrapes without a key
            assert metrics.status_code == 200 and "dsv32:num_requests_running" in metrics.text
            ok = httpx.post(srv.url + "/chat/completions", json={**body, "max_tokens": 2},
                            headers={"x-api-key": "sk-other"})  # fmt: skip
            assert ok.status_code == 200

            async def burst():
                async with httpx.AsyncClient(timeout=120) as c:
                    h = {"Authorization": "Bearer sk-good"}
                    return await asyncio.gather(
                        *(c.post(srv.url + "/chat/completions", json=body, headers=h) for _ in range(5))
                    )

            codes = sorted(r.status_code for r in asyncio.run(burst()))
            assert codes.count(429) >= 1 and codes.count(200) >= 2
            r429 = next(r for r in asyncio.run(burst()) if r.status_code == 429)
            assert r429.json()["error"]["type"] == "rate_limit_error"
    finally:
        engine.shutdown()


def test_full_queue_is_503_and_anthropic_errors_keep_their_shape(default_model_dir, tokenizer):
    model = load_model(default_model_dir, dtype=torch.float32, progress=False)
    core = EngineCore(model, EngineConfig(num_blocks=256), eos_id=tokenizer.eos_id)
    engine = AsyncEngine(core, tokenizer, max_waiting=0)  # every request finds the queue full
    ctx = ServingContext(engine=engine, tokenizer=tokenizer, family="v3.2", max_model_len=4096,
                         api_keys=["sk-good"], max_concurrent_per_key=0)  # fmt: skip
    body = {"model": "deepseek-chat", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    try:
        with RunningServer(ctx) as srv:
            r = httpx.post(
                srv.url + "/v1/messages", json={**body, "max_tokens": 2}, headers={"x-api-key": "nope"}
            )
            assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
            assert r.json()["type"] == "error"
            r = httpx.post(srv.url + "/v1/messages", json=body, headers={"x-api-key": "sk-good"})
            assert r.status_code == 429 and r.json()["error"]["type"] == "rate_limit_error"
            ctx.max_concurrent_per_key = None
            r = httpx.post(
                srv.url + "/chat/completions", json=body, headers={"Authorization": "Bearer sk-good"}
            )
            assert r.status_code == 503 and "queue is full" in r.json()["error"]["message"]
    finally:
        engine.shutdown()


def test_samples_the_engine_takes_only_in_part_are_all_aborted(default_model_dir, tokenizer):
    """n samples reach the engine together; when it refuses one (its waiting queue holds one request here),
    the reply is the refusal and the samples it took are aborted: nothing runs on, no block is held."""
    model = load_model(default_model_dir, dtype=torch.float32, progress=False)
    core = EngineCore(model, EngineConfig(num_blocks=256), eos_id=tokenizer.eos_id)
    engine = AsyncEngine(core, tokenizer, max_waiting=1)
    ctx = ServingContext(engine=engine, tokenizer=tokenizer, family="v3.2", max_model_len=2048)
    body = {"model": "deepseek-chat", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 200}
    try:
        with RunningServer(ctx) as srv:
            for path, extra in (("/chat/completions", {}), ("/completions", {"prompt": ["a", "b"]})):
                r = httpx.post(srv.url + path, json={**body, **extra, "n": 3}, timeout=60)
                assert r.status_code == 503 and "queue is full" in r.json()["error"]["message"], r.text
                for _ in range(100):
                    if not core.has_work():
                        break
                    time.sleep(0.01)
                assert not core.has_work()
                core.pool.assert_no_leaks()
            assert (
                httpx.post(srv.url + "/chat/completions", json={**body, "max_tokens": 2}).status_code == 200
            )
    finally:
        engine.shutdown()
