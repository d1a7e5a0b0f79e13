"""Prompt logprobs (``SamplingParams.prompt_logprobs``): each prompt token scored under the model's raw
distribution given the tokens before it, however the prompt is chunked, batched, preempted or cached."""

from __future__ import annotations

import pytest
import torch

from dsv32.engine.core import EngineConfig, EngineCore
from dsv32.engine.sampling_params import SamplingParams, SamplingParamsError
from tests.engine.test_paged_runner import alone


def _reference(model, prompt: list[int]) -> torch.Tensor:
    """log-softmax of the full forward's fp32 logits: row p scores token p + 1."""
    with torch.no_grad():
        return torch.log_softmax(model(torch.tensor([prompt]))[0].float(), dim=-1)


def _run(core: EngineCore, requests: dict[str, tuple[list[int], SamplingParams]]) -> dict[str, dict]:
    """Submit all, step to the end: per request its prompt logprobs, tokens and cached-token count."""
    for rid, (prompt, params) in requests.items():
        core.add_request(rid, prompt, params)
    got: dict[str, dict] = {rid: {"tokens": [], "prompt_logprobs": None} for rid in requests}
    while core.has_work():
        for o in core.step():
            g = got[o.request_id]
            g["tokens"] += o.new_token_ids
            g["cached"] = o.cached_tokens
            if o.prompt_logprobs is not None:
                assert g["prompt_logprobs"] is None, "prompt logprobs came twice"
                g["prompt_logprobs"] = o.prompt_logprobs
    core.pool.assert_no_leaks()
    return got


def _check(model, prompt: list[int], lps: list, k: int) -> None:
    ref = _reference(model, prompt)
    assert len(lps) == len(prompt) and lps[0] is None
    for p in range(1, len(prompt)):
        assert lps[p]["logprob"] == pytest.approx(ref[p - 1, prompt[p]].item(), abs=1e-4), p
        top_v, top_i = ref[p - 1].topk(k)
        assert [t for t, _ in lps[p]["top"]] == top_i.tolist(), p
        assert [v for _, v in lps[p]["top"]] == pytest.approx(top_v.tolist(), abs=1e-4)


def test_prompt_logprobs_equal_the_full_forward_under_chunking_batching_and_the_cache(model):
    """Prompts past index_topk, chunked by a 7-token budget, beside requests that do not ask: every prompt
    token's logprob and top-3 equal the full forward's. The same prompt again is computed in full (0 cached
    tokens) and scored the same; a plain request with that prompt still reads the cache. Greedy outputs are
    unchanged by scoring."""
    g = torch.Generator().manual_seed(0)
    a, b = (torch.randint(2, 300, (n,), generator=g).tolist() for n in (30, 19))
    core = EngineCore(model, EngineConfig(block_size=4, num_blocks=80, max_num_batched_tokens=7), eos_id=None)
    scored = SamplingParams(temperature=0.0, max_tokens=3, ignore_eos=True, prompt_logprobs=3)
    plain = SamplingParams(temperature=0.0, max_tokens=3, ignore_eos=True)
    got = _run(core, {"a": (a, scored), "b": (b, scored), "c": (list(range(40, 60)), plain)})
    _check(model, a, got["a"]["prompt_logprobs"], 3)
    _check(model, b, got["b"]["prompt_logprobs"], 3)
    assert got["c"]["prompt_logprobs"] is None
    assert got["a"]["tokens"] == alone(model, a, 3)
    again = _run(core, {"a2": (a, scored), "a3": (a, plain)})
    assert again["a2"]["cached"] == 0 and again["a2"]["prompt_logprobs"] == got["a"]["prompt_logprobs"]
    assert again["a3"]["cached"] > 0


def test_prompt_logprobs_survive_preemption(model):
    """A cache too small for all: requests are preempted and recomputed; each prompt's logprobs still come
    once, complete and equal to the full forward's."""
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(2, 300, (n,), generator=g).tolist() for n in (10, 14, 6, 9)]
    core = EngineCore(
        model, EngineConfig(block_size=4, num_blocks=12, max_num_batched_tokens=32), eos_id=None
    )
    params = SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True, prompt_logprobs=0)
    got = _run(core, {f"r{i}": (p, params) for i, p in enumerate(prompts)})
    assert core.stats()["preemptions"] > 0
    for i, p in enumerate(prompts):
        _check(model, p, got[f"r{i}"]["prompt_logprobs"], 0)
        assert got[f"r{i}"]["tokens"] == alone(model, p, 10)


def test_prompt_logprobs_range():
    assert SamplingParams(prompt_logprobs=20).prompt_logprobs == 20
    for bad in (-1, 21, 1.5, True):
        with pytest.raises(SamplingParamsError, match="prompt_logprobs"):
            SamplingParams(prompt_logprobs=bad)


def test_a_one_token_prompt_has_only_the_empty_first_entry(model):
    core = EngineCore(model, EngineConfig(block_size=4, num_blocks=8), eos_id=None)
    got = _run(core, {"x": ([7], SamplingParams(max_tokens=2, ignore_eos=True, prompt_logprobs=2))})
    assert got["x"]["prompt_logprobs"] == [None]
