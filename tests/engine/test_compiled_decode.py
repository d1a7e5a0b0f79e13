"""The compiled CPU decode step (``CompiledDecode``): torch.compile of the fixed-shape step, the weights its
inputs and the packed matmuls called by handle.

Each compile of the tiny model takes ~10-20 s on two cores, so these tests are few and marked slow.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch._dynamo.utils import counters

from dsv32.engine.compiled_decode import CompiledDecode, compile_unsupported_reason
from dsv32.engine.core import EngineConfig, EngineCore
from dsv32.engine.cuda_graphs import DecodeGraphs
from dsv32.engine.paged_cache import PagedKVCache
from dsv32.engine.sampling_params import SamplingParams
from dsv32.model.moe import MoE
from dsv32.model.transformer import DeepseekForCausalLM
from tests.engine.test_cuda_graphs import stacked_tiny_model
from tests.engine.test_engine import run_all
from tests.engine.test_paged_runner import alone, drive
from tests.model.oracle import randomize_
from tests.model.test_forms import tiny_config

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("model_type", ["deepseek_v32", "deepseek_v3"])
def test_compiled_decode_steps_equal_the_full_forward(model_type):
    """One request at a time (every decode step single-row, so compiled), contexts from 5 to 30 with
    index_topk 12: each step's logits equal the full forward's to float rounding, greedy equals alone."""
    torch.manual_seed(0)
    model = DeepseekForCausalLM(tiny_config(model_type=model_type, index_topk=12)).eval()
    randomize_(model, seed=4)
    model.prepack_cpu_weights()  # what the engine does: the packed weights are frozen into the step
    g = torch.Generator().manual_seed(5)
    prompts = [torch.randint(2, 300, (n,), generator=g).tolist() for n in (5, 20)]
    cache = PagedKVCache(model.config, 24, 4, model.config.num_hidden_layers)
    compiled = CompiledDecode(model, cache, max_context=256)
    graphs_before = counters["stats"]["unique_graphs"]
    calls = []
    real = compiled.execute
    compiled.execute = lambda chunks: calls.append(len(chunks)) or real(chunks)
    reqs, pool, worst, _ = drive(
        model, prompts, n_new=10, num_blocks=24, block_size=4, budget=8, max_seqs=1, check_logits=True,
        cache=cache, graphs=compiled,
    )  # fmt: skip
    assert len(calls) >= 18 and set(calls) == {1}
    assert compiled._forms_compiled and counters["stats"]["unique_graphs"] > graphs_before, "nothing compiled"
    # the routed experts were traced into the step (gathered), not run as the opaque eager loop
    assert {m._compiled_experts for m in model.modules() if isinstance(m, MoE)} == {"gathered"}
    assert worst < 1e-4
    for r, p in zip(reqs, prompts, strict=True):
        assert r.output_ids == alone(model, p, 10)
    pool.assert_no_leaks()


def test_engine_compiles_at_start_and_matches_running_alone(model):
    """``compile_decode``: compiled when the engine starts; single-request decode steps take it, steps
    of several rows and prefill chunks stay eager; greedy outputs equal running each request alone."""
    graphs_before = counters["stats"]["unique_graphs"]
    core = EngineCore(
        model,
        EngineConfig(
            block_size=4, num_blocks=90, max_num_seqs=3, max_num_batched_tokens=9, compile_decode=True
        ),
        eos_id=None,
    )
    compiled = core.runner.graphs
    graphs_after_start = counters["stats"]["unique_graphs"]
    assert isinstance(compiled, CompiledDecode) and graphs_after_start > graphs_before
    calls = []
    real = compiled.execute
    compiled.execute = lambda chunks: calls.append(len(chunks)) or real(chunks)
    g = torch.Generator().manual_seed(7)
    prompts = [torch.randint(2, 300, (n,), generator=g).tolist() for n in (3, 250, 9)]
    n_new = [4, 14, 6]  # the longest runs on alone at the end: single-row steps, past 256 slots
    for i, (p, n) in enumerate(zip(prompts, n_new, strict=True)):
        core.add_request(f"r{i}", p, SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True))
    got = run_all(core)
    core.pool.assert_no_leaks()
    assert calls.count(1) >= 6, calls  # the longest request's last steps, alone
    # a bucket first used by a request (512 slots) runs what the start compiled: no compile while serving
    assert 512 in {key[1] for key in compiled.steps}
    assert counters["stats"]["unique_graphs"] == graphs_after_start
    for i, (p, n) in enumerate(zip(prompts, n_new, strict=True)):
        assert got[f"r{i}"] == alone(model, p, n), i


def test_weights_changed_after_compiling_are_read_not_a_stale_copy():
    """The compiled step reads the weights as they are now: after every weight is scaled in place (which
    leaves each packed copy stale: ``dsv32::packed_linear`` then takes the plain product), a new request
    decodes as running alone on the changed model. (A step with the weights frozen in at compile time
    decoded with the old ones.)"""
    torch.manual_seed(0)
    model = DeepseekForCausalLM(tiny_config(index_topk=12)).eval()
    randomize_(model, seed=6)
    core = EngineCore(model, EngineConfig(block_size=4, num_blocks=40, compile_decode=True), eos_id=None)
    assert isinstance(core.runner.graphs, CompiledDecode)
    greedy = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
    before = list(range(2, 9))
    core.add_request("before", before, greedy)
    assert run_all(core)["before"] == alone(model, before, 8)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(1.25)
    after = list(range(40, 51))  # no block shared with the first prompt: nothing read from the cache
    core.add_request("after", after, greedy)
    got = run_all(core)["after"]
    assert core.runner.graphs is not None and core.runner.graphs.compiled
    assert got == alone(model, after, 8)
    core.pool.assert_no_leaks()


_START_ENGINE = """
import json, time, torch
from torch._dynamo.utils import counters
from dsv32.engine.core import EngineConfig, EngineCore
from dsv32.model.transformer import DeepseekForCausalLM
from tests.model.oracle import randomize_
from tests.model.test_forms import tiny_config
torch.manual_seed(0)
model = DeepseekForCausalLM(tiny_config(index_topk=12)).eval()
randomize_(model, seed=3)
t0 = time.perf_counter()
core = EngineCore(model, EngineConfig(block_size=4, num_blocks=16, max_model_len=12, compile_decode=True),
                  eos_id=None)
print(json.dumps({"compiled": core.decode_step_compiled, "s": time.perf_counter() - t0,
                  **{k: v for k, v in counters["inductor"].items() if k.startswith("fxgraph_cache")}}))
"""


def test_a_restarted_engine_takes_its_compiled_step_from_inductors_disk_cache(tmp_path):
    """The same model in a new process compiles the same graph (the packed matmuls are called by handles
    numbered in creation order, not frozen in as constants), so the second start loads it from inductor's
    cache instead of compiling it again."""
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "inductor")}
    root = Path(__file__).resolve().parents[2]

    def start() -> dict:
        out = subprocess.run(
            [sys.executable, "-c", _START_ENGINE],
            cwd=root,
            env=env,
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert out.returncode == 0, out.stderr[-3000:]
        return json.loads(out.stdout.strip().splitlines()[-1])

    first, second = start(), start()
    assert first["compiled"] and second["compiled"]
    assert first.get("fxgraph_cache_miss", 0) >= 1 and first.get("fxgraph_cache_hit", 0) == 0, first
    assert second.get("fxgraph_cache_hit", 0) >= 1 and second.get("fxgraph_cache_miss", 0) == 0, second


def test_a_failed_compile_leaves_the_engine_eager(model, caplog):
    """No working C++ compiler: the engine logs why and runs every step eagerly, with the same outputs."""
    prompt = list(range(2, 12))
    with torch._inductor.config.patch({"cpp.cxx": ("/nonexistent/c++",)}), caplog.at_level(logging.WARNING):
        core = EngineCore(
            model,
            EngineConfig(block_size=4, num_blocks=16, compile_decode=True),
            eos_id=None,
        )
    assert core.runner.graphs is None
    assert "compiling the CPU decode step failed" in caplog.text
    core.add_request("a", prompt, SamplingParams(temperature=0.0, max_tokens=5, ignore_eos=True))
    got = [t for _ in range(8) for o in core.step() for t in o.new_token_ids]
    assert got == alone(model, prompt, 5)


def test_fp8_weights_are_not_compiled(model):
    fp8 = DeepseekForCausalLM(tiny_config()).eval()
    lin = fp8.model.layers[0].self_attn.o_proj
    lin.load_fp8(lin.weight.detach(), torch.ones(-(-lin.out_features // 128), -(-lin.in_features // 128)))
    assert "FP8" in compile_unsupported_reason(fp8)
    assert compile_unsupported_reason(model) is None
    with pytest.raises(ValueError, match="FP8"):
        CompiledDecode(fp8, PagedKVCache(fp8.config, 4, 4, fp8.config.num_hidden_layers), 64)


def test_long_contexts_are_compiled_at_start_and_match_the_eager_step():
    """A context length past 32767 slots: inductor lowers the DSA sort differently from there on, so
    ``warm_up`` compiles that form too, and a step at 20000 tokens of context (a 32768-slot bucket) compiles
    nothing more and equals the same padded step run eagerly. The cache holds random entries (no prefill)."""
    torch.manual_seed(0)
    model = DeepseekForCausalLM(tiny_config(index_topk=12, max_position_embeddings=32768)).eval()
    randomize_(model, seed=6)
    model.prepack_cpu_weights()
    cache = PagedKVCache(model.config, 2048, 16, model.config.num_hidden_layers)
    g = torch.Generator().manual_seed(1)
    for table in (*cache.c_kv, *cache.k_pe, *cache.k_index):
        table.copy_(torch.randn(table.shape, generator=g))
    compiled = CompiledDecode(model, cache, max_context=32768)
    graphs_before = counters["stats"]["unique_graphs"]
    compiled.warm_up()
    assert {f[2] for f in compiled._forms_compiled} == {False, True}
    graphs_after_warm_up = counters["stats"]["unique_graphs"]
    assert graphs_after_warm_up > graphs_before
    for position in (600, 20000):
        key = (*compiled._bucket(1, position + 1), (12, 12))
        step = compiled._new_step(*key)
        with torch.inference_mode():  # as the engine's steps run
            step.tables[0] = torch.arange(step.tables.shape[1])
            step.positions[0], step.ids[0] = position, 7
            got = compiled._forward(step)
            want = DecodeGraphs._forward(compiled, step)
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4 * want.abs().max().item())
    assert counters["stats"]["unique_graphs"] == graphs_after_warm_up  # nothing compiled after the start


# ---- the compiled CUDA-graph step (``DecodeGraphs(compile=True)``), checked uncaptured on the CPU ----------


def _bf16_graph_model(device: str = "cpu"):
    """index_topk 300: the 256-slot bucket attends densely, larger ones select (two forms)."""
    return stacked_tiny_model(300, seed=8, dtype=torch.bfloat16, device=device)


def test_compiled_graph_step_matches_the_plain_step_in_every_bucket():
    """``warm_up`` compiles each form (one row or more; all slots visible or past the top-k) and later
    buckets of a form (more rows, more slots) compile nothing more, whatever the caller's grad mode; every
    bucket's logits equal the plain padded step's to bf16 rounding. The cache holds random entries."""
    model = _bf16_graph_model()
    cache = PagedKVCache(model.config, 64, 16, model.config.num_hidden_layers, dtype=torch.bfloat16)
    g = torch.Generator().manual_seed(2)
    for table in (*cache.c_kv, *cache.k_pe, *cache.k_index):
        table.copy_(torch.randn(table.shape, generator=g))
    graphs = DecodeGraphs(model, cache, max_rows=8, max_context=1024, capture=False, compile=True)
    plain = DecodeGraphs(model, cache, max_rows=8, max_context=1024, capture=False)
    before = counters["stats"]["unique_graphs"]
    graphs.warm_up()
    warmed = counters["stats"]["unique_graphs"]
    assert warmed - before == 4  # (1 row, 2+ rows) x (dense, DSA)
    for rows, longest in ((1, 5), (1, 700), (3, 40), (8, 300), (5, 1000)):
        step, ref = graphs._step(rows, longest), plain._step(rows, longest)
        with torch.inference_mode():
            for s in (step, ref):
                s.tables.copy_(torch.arange(s.tables.numel()).view_as(s.tables) % 60)
                s.positions.copy_(longest - 1 - torch.arange(s.positions.shape[0]) % 3)
                s.ids.copy_(torch.arange(s.ids.shape[0]) * 7 + 2)
        # (called outside inference mode: a step runs in it anyway, or it would compile again for autograd)
        got, want = graphs._step_forward(step), plain._step_forward(ref)
        torch.testing.assert_close(got, want, rtol=0.05, atol=0.05 * want.abs().max().item())
        assert (got.argmax(-1) == want.argmax(-1)).float().mean() >= 0.75
    assert counters["stats"]["unique_graphs"] == warmed  # nothing compiled after the warm-up


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_compiled_cuda_graphs_match_plain_graphs_on_gpu():
    """On a GPU: the compiled step's captured graphs give the plain graphs' logits (bf16 rounding) in each
    form; an engine with ``compile_decode`` serves concurrent requests (its first tokens, from the eager
    prefill, equal the plain engine's) and leaks nothing."""
    model = _bf16_graph_model("cuda")
    cache = PagedKVCache(model.config, 64, 16, model.config.num_hidden_layers, torch.bfloat16, "cuda")
    g = torch.Generator(device="cuda").manual_seed(2)
    for table in (*cache.c_kv, *cache.k_pe, *cache.k_index):
        table.copy_(torch.randn(table.shape, generator=g, device="cuda"))
    compiled = DecodeGraphs(model, cache, max_rows=8, max_context=1024, compile=True)
    plain = DecodeGraphs(model, cache, max_rows=8, max_context=1024)
    compiled.warm_up()
    for rows, longest in ((1, 5), (1, 700), (3, 40), (8, 300)):
        logits = []
        for graphs in (compiled, plain):
            step = graphs._step(rows, longest)
            with torch.inference_mode():
                step.tables.copy_(torch.arange(step.tables.numel()).view_as(step.tables) % 60)
                step.positions.copy_(longest - 1 - torch.arange(step.positions.shape[0]) % 3)
                step.ids.copy_(torch.arange(step.ids.shape[0]) * 7 + 2)
            step.graph.replay()
            logits.append(step.logits.clone())
        got, want = logits
        torch.testing.assert_close(got, want, rtol=0.05, atol=0.05 * want.abs().max().item())
    prompts = [list(range(2 + i, 2 + i + n)) for i, n in enumerate((6, 30, 17))]
    firsts = {}
    for flag in (False, True):
        core = EngineCore(model, EngineConfig(16, 64, max_num_seqs=4, compile_decode=flag), eos_id=None)
        assert core.decode_step_compiled == flag
        for i, p in enumerate(prompts):
            core.add_request(f"r{i}", p, SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True))
        out = run_all(core)
        assert all(len(t) == 8 for t in out.values())
        firsts[flag] = {k: t[0] for k, t in out.items()}
        core.pool.assert_no_leaks()
    assert firsts[True] == firsts[False]
