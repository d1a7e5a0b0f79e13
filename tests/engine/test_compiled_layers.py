"""Steps compiled around their attention (``CompiledLayers``, ``EngineConfig.compile_prefill``).

Each compile of the tiny model takes ~10-20 s on two cores, so these tests are few and marked slow.
"""

from __future__ import annotations

import pytest
import torch
from torch._dynamo.utils import counters

from dsv32.engine.compiled_layers import CompiledLayers
from dsv32.engine.core import EngineConfig, EngineCore
from dsv32.engine.sampling_params import SamplingParams
from dsv32.model.transformer import DeepseekForCausalLM
from tests.engine.test_cuda_graphs import stacked_tiny_model
from tests.engine.test_engine import run_all
from tests.engine.test_paged_runner import alone, drive
from tests.model.oracle import randomize_
from tests.model.test_forms import tiny_config

pytestmark = pytest.mark.slow


def _counting(compiled: CompiledLayers) -> list[int]:
    """The token count of each step that ``compiled`` runs."""
    calls: list[int] = []
    real = compiled.forward
    compiled.forward = lambda ids, ctx: calls.append(ids.shape[1]) or real(ids, ctx)
    return calls


@pytest.mark.parametrize("model_type", ["deepseek_v32", "deepseek_v3"])
def test_compiled_steps_equal_the_full_forward(model_type):
    """Concurrent requests of mixed lengths in chunked prefills beside decodes, past index_topk (DSA) and
    with prefix hits: every step of two rows or more runs compiled, one compile serves every token count,
    each step's logits equal the full forward's to float rounding and greedy outputs equal running alone.
    (The routed experts run as the eager loop, one opaque op, as on the CPU.)"""
    torch.manual_seed(0)
    model = DeepseekForCausalLM(tiny_config(model_type=model_type, index_topk=12)).eval()
    randomize_(model, seed=4)
    g = torch.Generator().manual_seed(5)
    shared = torch.randint(2, 300, (9,), generator=g).tolist()
    prompts = [torch.randint(2, 300, (n,), generator=g).tolist() for n in (3, 30, 17)]
    prompts += [shared + [7, 8], shared + list(range(20, 40))]
    compiled = CompiledLayers(model)
    calls = _counting(compiled)
    before = counters["stats"]["unique_graphs"]
    reqs, pool, worst, _ = drive(
        model, prompts, n_new=8, num_blocks=64, block_size=4, budget=13, check_logits=True, compiled=compiled
    )
    assert len(set(calls)) >= 5, calls  # steps of many token counts, all compiled ...
    assert counters["stats"]["unique_graphs"] - before == 1  # ... by one compile
    pool.assert_no_leaks()
    assert pool.hits > 0
    assert worst < 1e-4
    for r, p in zip(reqs, prompts, strict=True):
        assert r.output_ids == alone(model, p, 8), r.request_id


def test_engine_compiles_at_start_and_matches_running_alone(model):
    """``compile_prefill``: compiled when the engine starts (nothing later), prefill and mixed steps take
    it, greedy outputs equal running each request alone and no block leaks."""
    before = counters["stats"]["unique_graphs"]
    core = EngineCore(
        model,
        EngineConfig(
            block_size=4, num_blocks=90, max_num_seqs=3, max_num_batched_tokens=9, compile_prefill=True
        ),
        eos_id=None,
    )
    assert core.prefill_compiled
    started = counters["stats"]["unique_graphs"]
    assert started > before
    calls = _counting(core.runner.compiled)
    g = torch.Generator().manual_seed(7)
    prompts = [torch.randint(2, 300, (n,), generator=g).tolist() for n in (3, 40, 9)]
    n_new = [4, 6, 5]
    for i, (p, n) in enumerate(zip(prompts, n_new, strict=True)):
        core.add_request(f"r{i}", p, SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True))
    got = run_all(core)
    core.pool.assert_no_leaks()
    assert len(calls) >= 5 and max(calls) == 9, calls
    assert counters["stats"]["unique_graphs"] == started
    for i, (p, n) in enumerate(zip(prompts, n_new, strict=True)):
        assert got[f"r{i}"] == alone(model, p, n), i


def _bf16_grouped_model(device: str) -> DeepseekForCausalLM:
    return stacked_tiny_model(40, seed=8, dtype=torch.bfloat16, device=device)


@pytest.mark.parametrize(
    "device",
    [
        "cpu",
        pytest.param(
            "cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
        ),
    ],
)
def test_grouped_experts_compiled_in_bf16_match_the_eager_forward(device):
    """What a GPU runs: bf16, the routed experts as grouped matmuls traced into the compiled forward. Its
    logits equal the eager forward's to bf16 rounding for prompts past index_topk (a few rows past the top-k
    part more: a DSA near-tie selects another key) and one compile serves every length."""
    model = _bf16_grouped_model(device)
    compiled = CompiledLayers(model)
    before = None
    for n in (90, 57, 3):
        ids = torch.arange(2, 2 + n, device=device)[None]
        with torch.inference_mode():
            want = model(ids)[0]
            got = model.logits(compiled.forward(ids, model.contiguous_context(n)))[0]
        before = before or counters["stats"]["unique_graphs"]
        row_err = (got - want).abs().amax(-1) / want.abs().amax(-1)
        assert row_err.median() < 0.02 and (row_err < 0.03).float().mean() >= 0.9, row_err
        assert (got.argmax(-1) == want.argmax(-1)).float().mean() >= 0.9
    assert counters["stats"]["unique_graphs"] == before


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_engine_with_compiled_prefill_on_cuda_gives_the_eager_engines_first_tokens():
    """On a GPU, an engine with ``compile_prefill`` (beside CUDA graphs) gives the eager engine's first
    tokens for prompts past index_topk and leaks nothing."""
    model = _bf16_grouped_model("cuda")
    prompts = [list(range(2 + i, 2 + i + n)) for i, n in enumerate((6, 90, 57))]
    firsts = {}
    for flag in (False, True):
        core = EngineCore(model, EngineConfig(16, 64, max_num_seqs=4, compile_prefill=flag), eos_id=None)
        assert core.prefill_compiled == flag
        for i, p in enumerate(prompts):
            core.add_request(f"r{i}", p, SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True))
        out = run_all(core)
        firsts[flag] = {k: t[0] for k, t in out.items()}
        core.pool.assert_no_leaks()
    assert firsts[True] == firsts[False]
