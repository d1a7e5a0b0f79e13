"""One-chunk prefill steps as fixed-shape (CUDA-graph) steps: ``PrefillGraphs``.

On the CPU the padded step runs uncaptured (``capture=False``): the same tensors and ops a graph records.
"""

from __future__ import annotations

import pytest
import torch

from dsv32.engine.core import EngineConfig, EngineCore
from dsv32.engine.paged_cache import PagedKVCache
from dsv32.engine.prefill_graphs import PrefillGraphs
from dsv32.engine.sampling_params import SamplingParams
from tests.engine.test_cuda_graphs import stacked_tiny_model
from tests.engine.test_engine import run_all
from tests.engine.test_paged_runner import alone, drive


def _stacked_model(model_type: str = "deepseek_v32", dtype=torch.float32, device="cpu", topk: int = 12):
    return stacked_tiny_model(topk, seed=3, dtype=dtype, device=device, model_type=model_type)


@pytest.mark.parametrize("model_type", ["deepseek_v32", "deepseek_v3"])
def test_padded_prefill_steps_equal_the_full_forward(model_type):
    """One request at a time, prompts chunked by a 13-token budget (chunks that start past position 0, a
    prefix hit, contexts past index_topk 12): every prefill step runs padded to its bucket, each step's
    logits equal the full forward's to float rounding and greedy outputs equal running alone."""
    model = _stacked_model(model_type)
    g = torch.Generator().manual_seed(5)
    shared = torch.randint(2, 300, (20,), generator=g).tolist()
    prompts = [torch.randint(2, 300, (n,), generator=g).tolist() for n in (2, 30, 17)]
    prompts += [shared + [7, 8], shared + list(range(20, 40))]
    cache = PagedKVCache(model.config, 64, 4, model.config.num_hidden_layers)
    # small buckets, so that the steps meet several, dense (8 slots) and past the top-k
    graphs = PrefillGraphs(model, cache, 13, max_context=256, capture=False, min_tokens=4, min_slots=8)
    calls = []
    real = graphs.execute
    graphs.execute = lambda chunks: calls.append((chunks[0].start, chunks[0].num_tokens)) or real(chunks)
    reqs, pool, worst, _ = drive(
        model, prompts, n_new=6, num_blocks=64, block_size=4, budget=13, max_seqs=1, check_logits=True,
        cache=cache, prefill_graphs=graphs,
    )  # fmt: skip
    assert any(start > 0 for start, _ in calls) and any(start == 0 for start, _ in calls)
    assert len(calls) >= 8 and len(graphs.steps) >= 4, (calls, list(graphs.steps))
    assert min(key[1] for key in graphs.steps) <= 12 < max(key[1] for key in graphs.steps)
    assert worst < 1e-4
    for r, p in zip(reqs, prompts, strict=True):
        assert r.output_ids == alone(model, p, 6), r.request_id
    pool.assert_no_leaks()
    assert pool.hits > 0


def test_buckets_and_what_fits():
    model = _stacked_model()
    cache = PagedKVCache(model.config, 64, 16, model.config.num_hidden_layers)
    graphs = PrefillGraphs(model, cache, max_tokens=100, max_context=1000, capture=False)
    assert graphs._bucket(0, 2) == (16, 256)
    assert graphs._bucket(0, 100) == (128, 256)
    assert graphs._bucket(200, 100) == (128, 512)  # slots cover the padded tokens' positions
    assert graphs._bucket(0, 129) is None  # past the token budget's bucket
    assert graphs._bucket(990, 30) == (32, 1024)
    assert graphs._bucket(1000, 30) is None  # padded past the context's bucket (1024 slots)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_prefill_graphs_on_cuda_give_the_eager_engines_first_tokens():
    """On a GPU (bf16): an engine whose one-chunk prefills replay from CUDA graphs (the default) gives the
    first tokens of an engine without them, for prompts past index_topk, chunked and alone, and leaks nothing."""
    model = _stacked_model(dtype=torch.bfloat16, device="cuda", topk=40)
    prompts = [list(range(2 + i, 2 + i + n)) for i, n in enumerate((6, 90, 57, 200))]
    firsts = {}
    for flag in (False, True):
        core = EngineCore(
            model,
            EngineConfig(16, 64, max_num_seqs=1, max_num_batched_tokens=64, prefill_graphs=flag),
            eos_id=None,
        )
        assert (core.runner.prefill_graphs is not None) == flag
        for i, p in enumerate(prompts):
            core.add_request(f"r{i}", p, SamplingParams(temperature=0.0, max_tokens=3, ignore_eos=True))
        out = run_all(core)
        firsts[flag] = {k: t[0] for k, t in out.items()}
        core.pool.assert_no_leaks()
        if flag:
            assert core.runner.prefill_graphs is not None and core.runner.prefill_graphs.steps
            assert all(s.graph is not None for s in core.runner.prefill_graphs.steps.values())
    assert firsts[True] == firsts[False]
