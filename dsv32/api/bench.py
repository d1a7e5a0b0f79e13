"""``dsv32 bench server``: what HTTP + SSE + output parsing add per streamed token, vs the engine alone.

Same model (the embedded default), same requests (N concurrent greedy streams of M tokens, EOS ignored),
run once straight through ``AsyncEngine`` and once through the real server with the ``openai`` SDK
streaming; best of R rounds each, interleaved. Writes ``bench_server.{json,md}``.
"""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

import torch


def bench_server(out_dir: Path, streams: int = 8, tokens: int = 64, rounds: int = 2) -> dict:
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

    t_engine, t_http = [], []
    try:
        with BackgroundServer(ctx) as srv:
            for r in range(rounds):
                t_engine.append(asyncio.run(engine_only(2 * r)))
                t_http.append(asyncio.run(over_http(srv.url, 2 * r + 1)))
    finally:
        engine.shutdown()
    n = streams * tokens
    te, th = min(t_engine), min(t_http)
    result = {
        "benchmark": "server",
        "date": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "model": "embedded default (random weights), fp32",
        "streams": streams, "tokens_per_stream": tokens, "rounds": rounds,
        "engine_only_s": te, "http_s": th,
        "engine_only_ms_per_token": 1000 * te / n, "http_ms_per_token": 1000 * th / n,
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
        f"| HTTP + SSE + parsing (openai SDK) | {th:.2f} | {result['http_ms_per_token']:.2f} |\n"
        f"| **overhead** | {th - te:+.2f} | **{result['overhead_ms_per_token']:+.2f}** "
        f"({100 * result['overhead_fraction']:+.1f}%) |\n"
    )
    return result
