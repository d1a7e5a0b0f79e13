"""``dsv32 bench server``: what HTTP + SSE + output parsing add per streamed token, vs the engine alone.

Same model (the embedded default), same requests (N concurrent greedy streams of M tokens, EOS ignored),
run straight through ``AsyncEngine``, through the real server with a raw HTTP client (``httpx``, SSE lines
counted, nothing parsed), and through the real server with the ``openai`` SDK streaming; best of R rounds
each, interleaved. The clients run in the benchmark's process, on the same cores as the server: the raw
client's row is closest to the server's own cost, the SDK's row adds what a Python SDK client spends per
chunk. Writes ``bench_server.{json,md}``.
"""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

import torch


def bench_server(out_dir: Path, streams: int = 8, tokens: int = 64, rounds: int = 2) -> dict:
    import httpx
    import openai

    from dsv32.api.server import BackgroundServer
    from dsv32.api.service import ServingContext
    from dsv32.chat import encode_prompt, load_tokenizer
    from dsv32.engine.async_engine import AsyncEngine
    from dsv32.engine.core import EngineConfig, EngineCore
    from dsv32.engine.sampling_params import SamplingParams
    from dsv32.weights.default_model import ensure_default_model
    from dsv32.weights.loader import load_model

    model_dir = ensure_default_model()
    model = load_model(model_dir, dtype=torch.float32, progress=False)
    tokenizer = load_tokenizer(model_dir)
    engine = AsyncEngine(EngineCore(model, EngineConfig(num_blocks=4096), eos_id=tokenizer.eos_id), tokenizer)
    ctx = ServingContext(engine=engine, tokenizer=tokenizer, family="v3.2", max_model_len=4096)
    prompts = [f"Stream number {i}: tell me a story." for i in range(streams)]

    async def engine_only(r: int) -> float:
        async def one(i: int) -> int:
            ids = encode_prompt(
                [{"role": "user", "content": f"round {r} " + prompts[i]}], tokenizer=tokenizer
            )
            params = SamplingParams(temperature=0.0, max_tokens=tokens, ignore_eos=True)
            return sum([len(o.new_token_ids) async for o in engine.generate(ids, params)])

        t0 = time.perf_counter()
        counts = await asyncio.gather(*(one(i) for i in range(streams)))
        assert sum(counts) == streams * tokens
        return time.perf_counter() - t0

    async def over_http(url: str, r: int) -> float:
        client = openai.AsyncOpenAI(base_url=url, api_key="bench", max_retries=0, timeout=600)

        async def one(i: int) -> int:
            stream = await client.chat.completions.create(
                model="deepseek-chat", messages=[{"role": "user", "content": f"round {r} " + prompts[i]}],
                max_tokens=tokens, temperature=0.0, stream=True, extra_body={"ignore_eos": True},
            )  # fmt: skip
            return sum([1 async for _ in stream])

        t0 = time.perf_counter()
        await asyncio.gather(*(one(i) for i in range(streams)))
        return time.perf_counter() - t0

    async def raw_http(url: str, r: int) -> float:
        async with httpx.AsyncClient(base_url=url, timeout=600) as client:

            async def one(i: int) -> int:
                body = {
                    "model": "deepseek-chat", "messages": [{"role": "user", "content": f"round {r} " + prompts[i]}],
                    "max_tokens": tokens, "temperature": 0.0, "stream": True, "ignore_eos": True,
                }  # fmt: skip
                n = 0
                async with client.stream("POST", "/chat/completions", json=body) as resp:
                    resp.raise_for_status()
                    async for line in resp.aiter_lines():
                        n += line.startswith("data: {")
                return n

            t0 = time.perf_counter()
            chunks = await asyncio.gather(*(one(i) for i in range(streams)))
            assert min(chunks) > tokens  # the role chunk, one per token, the finish chunk
            return time.perf_counter() - t0

    t_engine, t_raw, t_http = [], [], []
    try:
        with BackgroundServer(ctx) as srv:
            for r in range(rounds):
                t_engine.append(asyncio.run(engine_only(3 * r)))
                t_raw.append(asyncio.run(raw_http(srv.url, 3 * r + 1)))
                t_http.append(asyncio.run(over_http(srv.url, 3 * r + 2)))
    finally:
        engine.shutdown()
    n = streams * tokens
    te, tr, th = min(t_engine), min(t_raw), min(t_http)
    result = {
        "benchmark": "server",
        "date": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "model": "embedded default (random weights), fp32",
        "streams": streams, "tokens_per_stream": tokens, "rounds": rounds,
        "engine_only_s": te, "raw_http_s": tr, "http_s": th,
        "engine_only_ms_per_token": 1000 * te / n, "raw_http_ms_per_token": 1000 * tr / n,
        "http_ms_per_token": 1000 * th / n,
        "raw_overhead_ms_per_token": 1000 * (tr - te) / n, "raw_overhead_fraction": (tr - te) / te,
        "overhead_ms_per_token": 1000 * (th - te) / n,
        "overhead_fraction": (th - te) / te,
    }  # fmt: skip
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "bench_server.json").write_text(json.dumps(result, indent=1))
    (out_dir / "bench_server.md").write_text(
        f"# dsv32 bench server — {result['date']}\n\n"
        f"{streams} concurrent greedy streams x {tokens} tokens on the embedded default model (fp32), best of "
        f"{rounds}.\n\n| path | wall s | ms per streamed token |\n|---|---|---|\n"
        f"| engine only (AsyncEngine) | {te:.2f} | {result['engine_only_ms_per_token']:.2f} |\n"
        f"| HTTP + SSE + our output parsing, raw client (httpx, lines counted) | {tr:.2f} | "
        f"{result['raw_http_ms_per_token']:.2f} |\n"
        f"| the same with the openai SDK client (parses every chunk) | {th:.2f} | "
        f"{result['http_ms_per_token']:.2f} |\n"
        f"| **server overhead** (raw client − engine) | {tr - te:+.2f} | "
        f"**{result['raw_overhead_ms_per_token']:+.2f}** ({100 * result['raw_overhead_fraction']:+.1f}%) |\n"
        f"| **overhead with the SDK client** | {th - te:+.2f} | **{result['overhead_ms_per_token']:+.2f}** "
        f"({100 * result['overhead_fraction']:+.1f}%) |\n\n"
        "The clients share the benchmark's process and cores with the server and the engine, so both "
        "overheads include the client's own work; the raw client's is a few line splits per chunk.\n"
    )
    return result
