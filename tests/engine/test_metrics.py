"""Prometheus metrics of the engine (``dsv32.engine.metrics``): what the real ``AsyncEngine`` records for
finished, cached and aborted requests, the preemption count, and the arithmetic of the latency histograms."""

from __future__ import annotations

import asyncio

import torch
from prometheus_client.parser import text_string_to_metric_families

from dsv32.chat import load_tokenizer
from dsv32.engine.async_engine import AsyncEngine
from dsv32.engine.core import EngineConfig, EngineCore
from dsv32.engine.metrics import RequestMetrics
from dsv32.engine.outputs import RequestOutput, Usage
from dsv32.engine.sampling_params import SamplingParams
from tests.engine.test_engine import run_all


def samples(text: bytes) -> dict[tuple[str, tuple], float]:
    """{(sample name, sorted labels): value} of a Prometheus exposition."""
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for fam in text_string_to_metric_families(text.decode())
        for s in fam.samples
    }


def test_async_engine_records_tokens_latencies_cache_hits_and_aborts(model):
    core = EngineCore(model, EngineConfig(block_size=4, num_blocks=60), eos_id=None)
    engine = AsyncEngine(core, load_tokenizer(), max_waiting=64)
    prompt = list(range(20, 37))  # 17 tokens: 4 full blocks can be cached

    async def main():
        async def run(n):
            async for out in engine.generate(prompt, SamplingParams(temperature=0.0, max_tokens=n)):
                last = out
            return last

        first = await run(5)
        second = await run(3)  # the same prompt: its full blocks come from the prefix cache
        agen = engine.generate([50, 51], SamplingParams(temperature=0.0, max_tokens=40))
        await agen.__anext__()
        await agen.aclose()  # aborts
        for _ in range(200):
            if not core.has_work():
                break
            await asyncio.sleep(0.01)
        return first, second

    try:
        before = samples(engine.metrics_text())
        first, second = asyncio.run(main())
        after = samples(engine.metrics_text())
    finally:
        engine.shutdown()
    assert before[("dsv32:generation_tokens_total", ())] == 0
    assert before[("dsv32:kv_cache_usage_perc", ())] == 0
    assert first.usage.cached_tokens == 0 and second.usage.cached_tokens == 16
    assert after[("dsv32:prompt_tokens_total", ())] == 17 + 17 + 2
    assert after[("dsv32:prompt_tokens_cached_total", ())] == 16
    # the aborted request made k >= 1 tokens (its client read one; the engine may have made more meanwhile)
    k = after[("dsv32:generation_tokens_total", ())] - (5 + 3)
    assert 1 <= k < 40
    assert after[("dsv32:request_success_total", (("finished_reason", "length"),))] == 2
    assert after[("dsv32:request_success_total", (("finished_reason", "abort"),))] == 1
    assert after[("dsv32:time_to_first_token_seconds_count", ())] == 3
    assert after[("dsv32:inter_token_latency_seconds_count", ())] == 4 + 2 + (
        k - 1
    )  # tokens after each first
    assert after[("dsv32:e2e_request_latency_seconds_count", ())] == 2  # finished ones
    assert after[("dsv32:request_prompt_tokens_sum", ())] == 34
    assert after[("dsv32:request_generation_tokens_sum", ())] == 8
    assert after[("dsv32:num_requests_running", ())] == 0 and after[("dsv32:num_requests_waiting", ())] == 0
    assert after[("dsv32:kv_cache_usage_perc", ())] == 0  # all blocks free or cached
    assert after[("dsv32:prefix_cache_hit_rate", ())] > 0


def test_preemptions_are_counted(model):
    core = EngineCore(
        model, EngineConfig(block_size=4, num_blocks=12, max_num_batched_tokens=32), eos_id=None
    )
    g = torch.Generator().manual_seed(1)
    reqs = {}
    for i, n in enumerate((10, 14, 6, 9)):  # up to 24 tokens each in 48 slots: preemption is forced
        core.add_request(f"r{i}", torch.randint(0, 300, (n,), generator=g).tolist(), SamplingParams(
            temperature=0.0, max_tokens=10, ignore_eos=True))  # fmt: skip
        reqs[f"r{i}"] = core.live[f"r{i}"].request
    run_all(core)
    preempted = sum(r.num_preemptions for r in reqs.values())
    assert preempted > 0 and core.stats()["preemptions"] == preempted
    text = RequestMetrics(core.stats).render()
    assert samples(text)[("dsv32:num_preemptions_total", ())] == preempted


def test_histograms_from_a_clock():
    now = [100.0]
    m = RequestMetrics(
        lambda: {"running": 1, "waiting": 2, "free_blocks": 3, "total_blocks": 4, "prefix_cache_hit_rate": 0.5,
                 "preemptions": 0, "spec_drafts": 0, "spec_draft_tokens": 0, "spec_accepted_tokens": 0,
                 "spec_accepted_per_pos": []},
        clock=lambda: now[0],
    )  # fmt: skip
    usage = Usage(prompt_tokens=10, completion_tokens=1, cached_tokens=4)
    m.added("a")
    now[0] = 100.5
    m.output(RequestOutput("a", [7], "x", None, False, None, usage))  # first token after 0.5 s
    now[0] = 101.5
    usage = Usage(10, 3, 4)
    m.output(RequestOutput("a", [8, 9], "yz", None, True, "stop", usage))  # two more, 1 s later
    m.output(RequestOutput("unknown", [1], "", None, True, "stop", usage))  # not added: ignored
    m.aborted("a")  # already finished: not an abort
    m.added("b", arrival=100.0)  # submitted at 100.0, accepted (after a step) at 101.5
    m.output(RequestOutput("b", [7], "x", None, True, "stop", Usage(10, 1, 0)))
    s = samples(m.render())
    assert s[("dsv32:time_to_first_token_seconds_sum", ())] == 0.5 + 1.5
    assert s[("dsv32:inter_token_latency_seconds_count", ())] == 2
    assert s[("dsv32:inter_token_latency_seconds_sum", ())] == 1.0  # 0.5 s each
    assert s[("dsv32:e2e_request_latency_seconds_sum", ())] == 1.5 + 1.5
    assert s[("dsv32:generation_tokens_total", ())] == 3 + 1
    assert s[("dsv32:prompt_tokens_total", ())] == 20 and s[("dsv32:prompt_tokens_cached_total", ())] == 4
    assert s[("dsv32:request_success_total", (("finished_reason", "stop"),))] == 2
    assert ("dsv32:request_success_total", (("finished_reason", "abort"),)) not in s
    assert s[("dsv32:num_requests_waiting", ())] == 2 and s[("dsv32:kv_cache_usage_perc", ())] == 0.25
