"""Fixed-shape decode steps (what ``DecodeGraphs`` captures as CUDA graphs).

On the CPU the padded step runs eagerly (``capture=False``): the tests check its padding (rows to a bucket,
slots to a power of two, the scratch block), the grouped-matmul MoE and the sort-based DSA selection against
the plain runner and the full forward, and that the step asks the host nothing (no sync a graph would
break on). The capture itself is checked on a GPU.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from dsv32.engine.cuda_graphs import DecodeGraphs
from dsv32.engine.paged_cache import PagedKVCache
from dsv32.model.moe import MoE, grouped_matmul_available
from dsv32.model.transformer import DeepseekForCausalLM
from tests.engine.test_engine import run_all
from tests.engine.test_paged_runner import alone, drive
from tests.model.oracle import randomize_
from tests.model.test_forms import tiny_config


def stacked(model, dtype: torch.dtype = torch.float32):
    """A copy of ``model`` with its MoE experts stacked for grouped matmuls (skips where torch has none)."""
    if not grouped_matmul_available("cpu", dtype):  # torch._grouped_mm: PyTorch 2.8 and later
        pytest.skip(f"this PyTorch has no grouped {dtype} matmul on the CPU")
    m = copy.deepcopy(model)
    for layer in m.model.layers:
        if isinstance(layer.mlp, MoE):
            layer.mlp.stack_experts()
    return m


def stacked_tiny_model(
    index_topk: int,
    seed: int,
    dtype: torch.dtype = torch.float32,
    device: str = "cpu",
    model_type: str = "deepseek_v32",
) -> DeepseekForCausalLM:
    """A random tiny model on ``device`` in ``dtype``, its experts stacked for grouped matmuls as the engine
    stacks them on a GPU (after the move: the stacks are made where the model is; in bf16 inductor can trace
    them)."""
    torch.manual_seed(0)
    model = DeepseekForCausalLM(tiny_config(model_type=model_type, index_topk=index_topk)).eval()
    randomize_(model, seed=seed)
    model = model.to(device, dtype)
    for m in model.modules():
        if isinstance(m, MoE):
            m.stack_experts()
    return model


def with_graphs(model, num_blocks, block_size, max_rows=8, max_context=256, capture=False):
    """A paged cache and a hook for ``drive``: its runner gets ``DecodeGraphs``."""
    cache = PagedKVCache(
        model.config, num_blocks, block_size, model.config.num_hidden_layers, device=model.device
    )
    graphs = DecodeGraphs(model, cache, max_rows, max_context, capture=capture)
    return cache, graphs


def test_grouped_moe_equals_the_expert_loop(model):
    m = stacked(model)
    x = torch.randn(1, 23, model.config.hidden_size, generator=torch.Generator().manual_seed(0))
    for a, b in zip(model.model.layers, m.model.layers, strict=True):
        if isinstance(a.mlp, MoE):
            with torch.no_grad():
                torch.testing.assert_close(b.mlp(x), a.mlp(x), rtol=1e-5, atol=1e-6)
            # the experts' Linears are views of the stacks: one copy of the weights
            assert b.mlp.experts[3].up_proj.weight.untyped_storage().data_ptr() == (
                b.mlp._w13.untyped_storage().data_ptr()
            )


def test_moving_a_stacked_model_falls_back_to_the_expert_loop(model):
    m = stacked(model).double()  # new storage for every parameter: the stacks are stale now
    x = torch.randn(1, 5, model.config.hidden_size, dtype=torch.float64)
    moe = next(layer.mlp for layer in m.model.layers if isinstance(layer.mlp, MoE))
    with torch.no_grad():
        y = moe(x)
    assert moe._w13 is None and y.dtype == torch.float64


def test_padded_decode_steps_equal_the_full_forward(model):
    """Three requests (one past index_topk = 12) decode through the padded step: 3 rows in a bucket of 4,
    slots padded to 256; prefill chunks still take the plain path."""
    m = stacked(model)
    g = torch.Generator().manual_seed(2)
    prompts = [torch.randint(0, 300, (n,), generator=g).tolist() for n in (20, 7, 26)]
    cache, graphs = with_graphs(m, 40, 4)
    calls = []
    real = graphs.execute
    graphs.execute = lambda chunks: calls.append(len(chunks)) or real(chunks)
    reqs, pool, worst, _ = drive(
        m, prompts, n_new=10, num_blocks=40, block_size=4, budget=9, check_logits=True, cache=cache,
        graphs=graphs,
    )  # fmt: skip
    assert calls and max(calls) == 3
    assert {k[:2] for k in graphs.steps} <= {(1, 256), (2, 256), (4, 256)}, graphs.steps.keys()
    assert worst < 1e-5
    for r, p in zip(reqs, prompts, strict=True):
        assert r.output_ids == alone(model, p, 10), r.request_id
    pool.assert_no_leaks()


def test_padding_rows_touch_only_the_scratch_block(model):
    m = stacked(model)
    cache, graphs = with_graphs(m, 10, 4)
    before = [t.clone() for t in cache.c_kv]
    prompts = [[5, 6, 7, 8, 9], [1, 2, 3], [4, 4, 4, 4]]  # 3 decode rows: a bucket of 4, 1 padding row
    drive(m, prompts, n_new=3, num_blocks=10, block_size=4, budget=64, cache=cache, graphs=graphs)
    assert {k[:2] for k in graphs.steps} == {(4, 256)}
    scratch = cache.scratch_block * 4
    for layer, t in enumerate(cache.c_kv):
        changed = set((t != before[layer]).any(-1).nonzero().flatten().tolist())
        # the requests' entries in their own blocks, and slot 0 of the scratch block (the padding row)
        assert scratch in changed
        assert all(s < 10 * 4 or s == scratch for s in changed), sorted(changed)


class NoHostSync(TorchDispatchMode):
    """Fails on ops whose result the host must read (a CUDA graph cannot contain them)."""

    SYNCING = {"_local_scalar_dense", "is_nonzero", "item", "nonzero", "bincount", "unique", "_unique2",
               "masked_select"}  # fmt: skip

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if name in self.SYNCING:
            raise AssertionError(f"host sync inside the fixed-shape step: {func}")
        if name == "index" and any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in args[1]):
            raise AssertionError(f"boolean-mask indexing (a host sync) inside the fixed-shape step: {func}")
        return func(*args, **(kwargs or {}))


def forward_without_host_sync(graphs: DecodeGraphs, monkeypatch) -> torch.Tensor:
    """The fixed-shape step's logits for two rows (one past index_topk 12) and two padding rows, run where a
    read of a device value on the host raises. (The DSA selection takes its sort form on any device but the
    CPU: forced here.)"""
    import dsv32.model.indexer as indexer

    monkeypatch.setattr(indexer, "select_topk_visible", indexer.select_topk_visible_sorted)
    step = graphs._new_step(4, 256, (12,))
    step.positions.copy_(torch.tensor([30, 3, 0, 0]))
    step.tables[0, :8] = torch.arange(8)
    step.tables[1, :1] = 8
    with torch.inference_mode(), NoHostSync():
        return graphs._forward(step)


def test_the_fixed_shape_step_needs_no_host_sync(model, monkeypatch):
    """Everything _forward runs, past index_topk (the DSA selection) and through the MoE, never reads a
    device value on the host."""
    cache, graphs = with_graphs(stacked(model), 40, 4)
    logits = forward_without_host_sync(graphs, monkeypatch)
    assert logits.shape == (4, model.config.vocab_size) and torch.isfinite(logits).all()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_graph_decode_matches_eager_on_gpu(model):
    """The engine on a GPU (bf16) with captured decode steps against the same engine kept eager."""
    from dsv32.engine.core import EngineConfig, EngineCore
    from dsv32.engine.sampling_params import SamplingParams

    gpu = copy.deepcopy(model).to("cuda", torch.bfloat16)
    g = torch.Generator().manual_seed(7)
    prompts = [torch.randint(0, 300, (n,), generator=g).tolist() for n in (20, 7, 26, 3, 40)]
    outs = {}
    for graphs in (False, True):
        core = EngineCore(gpu, EngineConfig(block_size=4, num_blocks=100, max_num_seqs=8, cuda_graphs=graphs))
        assert (core.runner.graphs is not None) == graphs
        for i, p in enumerate(prompts):
            core.add_request(f"r{i}", p, SamplingParams(max_tokens=12, temperature=0, logprobs=True))
        got: dict[str, list] = {}
        while core.has_work():
            for o in core.step():
                got.setdefault(o.request_id, []).append((o.new_token_ids[0], o.logprobs[0]["logprob"]))
        core.pool.assert_no_leaks()
        outs[graphs] = got
        if graphs:
            assert any(s.graph is not None for s in core.runner.graphs.steps.values())
    for rid, eager in outs[False].items():
        graphed = outs[True][rid]
        # bf16: the first tokens agree and the chosen tokens' logprobs stay close while the paths do
        assert graphed[0][0] == eager[0][0], rid
        for (t1, lp1), (t2, lp2) in zip(eager, graphed, strict=True):
            if t1 != t2:
                break
            assert abs(lp1 - lp2) < 0.1, (rid, lp1, lp2)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_speculative_decoding_with_cuda_graphs_on_gpu():
    """Speculative decoding on a GPU (bf16): drafted steps and the MTP pass replay from captured graphs and
    give the tokens of the same engine kept eager; a model whose drafts are right keeps accepting them."""
    from dsv32.engine.core import EngineConfig, EngineCore
    from dsv32.engine.sampling_params import SamplingParams
    from tests.engine.test_spec_decode import oracle_mtp_model

    gpu = oracle_mtp_model().to("cuda", torch.bfloat16)
    g = torch.Generator().manual_seed(8)
    prompts = [torch.randint(2, 300, (n,), generator=g).tolist() for n in (20, 7, 3)]
    outs = {}
    for graphs in (False, True):
        core = EngineCore(gpu, EngineConfig(block_size=4, num_blocks=100, max_num_seqs=4, cuda_graphs=graphs,
                                            num_speculative_tokens=1), eos_id=None)  # fmt: skip
        for i, p in enumerate(prompts):
            core.add_request(f"r{i}", p, SamplingParams(max_tokens=12, temperature=0, ignore_eos=True))
        outs[graphs] = run_all(core)
        core.pool.assert_no_leaks()
        stats = core.stats()
        assert stats["spec_accepted_tokens"] >= 0.5 * stats["spec_draft_tokens"] > 0
        if graphs:
            steps = core.runner.graphs.steps.values()
            assert any(s.graph is not None and s.draft_graph is not None for s in steps)
    for rid, eager in outs[False].items():
        assert outs[True][rid][:4] == eager[:4], rid  # bf16: the first tokens agree


def test_engine_with_padded_decode_steps_matches_running_alone(model):
    """The whole engine with fixed-shape decode steps (eager here): mixed lengths past index_topk, a shared
    prefix, preemption forced by a tiny cache, seeded sampling beside greedy; greedy outputs equal running
    each request alone, the seeded one equals itself on the plain engine, and no block leaks."""
    from dsv32.engine.core import EngineConfig, EngineCore
    from dsv32.engine.sampling_params import SamplingParams

    m = stacked(model)
    g = torch.Generator().manual_seed(11)
    shared = torch.randint(2, 300, (9,), generator=g).tolist()
    prompts = [torch.randint(2, 300, (n,), generator=g).tolist() for n in (3, 17, 30, 5)]
    prompts += [shared + [7, 8], shared + list(range(20, 40))]

    def run(graphs: bool) -> dict[str, list[int]]:
        core = EngineCore(
            m, EngineConfig(block_size=4, num_blocks=24, max_num_batched_tokens=13), eos_id=None
        )
        preempted = []
        real_preempt = core.scheduler._preempt
        core.scheduler._preempt = lambda req: preempted.append(req.request_id) or real_preempt(req)
        if graphs:
            core.runner.graphs = DecodeGraphs(m, core.cache, core.config.max_num_seqs, 256, capture=False)
        for i, p in enumerate(prompts):
            core.add_request(f"g{i}", p, SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True))
        core.add_request("s", prompts[1], SamplingParams(temperature=0.9, top_p=0.9, seed=3, max_tokens=8))
        got = run_all(core)
        core.pool.assert_no_leaks()
        if graphs:
            assert core.runner.graphs.steps, "no decode step took the fixed-shape path"
            assert preempted, "the tiny cache forced no preemption"
        return got

    padded, plain = run(True), run(False)
    for i, p in enumerate(prompts):
        assert padded[f"g{i}"] == alone(model, p, 8), i
    assert padded["s"] == plain["s"]


@pytest.mark.parametrize("seed", range(6))
def test_random_workloads_with_padded_decode_steps_match_running_alone(seed, monkeypatch):
    """Random models (V3.2 / V3, top-k 4-64, 1-8 index heads) and workloads (block sizes 1-16, 1-8 sequences,
    shared prefixes, tight caches, small budgets, slot buckets from 1): greedy outputs equal running alone.
    (A 150-case run of the same generator found no mismatch.)"""
    import random

    import dsv32.engine.cuda_graphs as cuda_graphs
    from dsv32.engine.core import EngineConfig, EngineCore
    from dsv32.engine.sampling_params import SamplingParams
    from dsv32.model.transformer import DeepseekForCausalLM
    from tests.model.oracle import randomize_
    from tests.model.test_forms import tiny_config

    rng = random.Random(seed)
    cfg = tiny_config(
        model_type=rng.choice(["deepseek_v32", "deepseek_v3"]),
        index_topk=rng.choice([4, 8, 12, 64]),
        index_n_heads=rng.choice([1, 4, 8]),
    )
    torch.manual_seed(seed)
    model = DeepseekForCausalLM(cfg).eval()
    randomize_(model, seed=seed)
    m = stacked(model)
    bs, max_seqs = rng.choice([1, 2, 3, 4, 16]), rng.choice([1, 2, 3, 5, 8])
    monkeypatch.setattr(cuda_graphs, "MIN_SLOTS", rng.choice([1, 8, 256]))
    prompts = [[rng.randrange(2, 300) for _ in range(rng.randint(1, 40))] for _ in range(rng.randint(2, 7))]
    prompts[1] = prompts[0][: rng.randint(1, len(prompts[0]))] + prompts[1]  # a shared prefix
    n_new = rng.randint(2, 12)
    need = sum(len(p) + n_new for p in prompts)
    longest = max(len(p) + n_new for p in prompts)
    num_blocks = max(-(-longest // bs) + 1, rng.randint(need // (2 * bs) + 1, need // bs + 4))
    budget = rng.randint(max(bs, 4), 40)
    core = EngineCore(
        m,
        EngineConfig(
            block_size=bs, num_blocks=num_blocks, max_num_seqs=max_seqs, max_num_batched_tokens=budget
        ),
    )
    core.runner.graphs = DecodeGraphs(m, core.cache, max_seqs, 4096, capture=False)
    for i, p in enumerate(prompts):
        core.add_request(f"r{i}", p, SamplingParams(temperature=0.0, max_tokens=n_new, ignore_eos=True))
    got = run_all(core)
    core.pool.assert_no_leaks()
    assert core.runner.graphs.steps
    for i, p in enumerate(prompts):
        assert got[f"r{i}"] == alone(model, p, n_new), (seed, i)


@pytest.mark.parametrize("k", [1, 2])
@pytest.mark.parametrize("which", ["random", "oracle"])
def test_speculative_decoding_through_padded_steps(model, which, k):
    """Drafts as rows of the fixed-shape step and the MTP pass as a second one (eager here): greedy outputs
    equal running alone, every draft equals the full-sequence MTP forward, and the steps after the prefill
    all took the fixed-shape path with their drafts."""
    from dsv32.engine.core import EngineConfig, EngineCore
    from dsv32.engine.sampling_params import SamplingParams
    from tests.engine.test_spec_decode import chained_reference, oracle_mtp_model

    m = stacked(model if which == "random" else oracle_mtp_model())
    core = EngineCore(
        m, EngineConfig(block_size=4, num_blocks=60, max_num_batched_tokens=10, num_speculative_tokens=k),
        eos_id=None,
    )  # fmt: skip
    graphs = DecodeGraphs(m, core.cache, (1 + k) * core.config.max_num_seqs, 256, capture=False, draft=True)
    core.runner.graphs = graphs
    fixed_rows = []  # the most drafts of a request in each fixed-shape step
    real = graphs.execute
    graphs.execute = lambda chunks: fixed_rows.append(max(len(c.draft) for c in chunks)) or real(chunks)
    g = torch.Generator().manual_seed(4)
    prompts = {f"r{i}": torch.randint(2, 300, (n,), generator=g).tolist() for i, n in enumerate((3, 17, 9))}
    for rid, p in prompts.items():
        core.add_request(rid, p, SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True))
    got: dict[str, list[int]] = {rid: [] for rid in prompts}
    checked = 0
    while core.has_work():
        for o in core.step():
            got[o.request_id] += o.new_token_ids
        for live in core.live.values():
            drafts = live.request.draft_ids
            if drafts:
                assert drafts == chained_reference(m, live.request.all_ids, len(drafts))
                checked += 1
    for rid, p in prompts.items():
        assert got[rid] == alone(m, p, 10), rid
    assert checked > 5 and fixed_rows and max(fixed_rows) == k  # steps with all k drafts took the fixed path
    stats = core.stats()
    if which == "oracle":
        assert stats["spec_accepted_tokens"] >= 0.9 * stats["spec_draft_tokens"] > 0
    core.pool.assert_no_leaks()


def test_the_fixed_shape_mtp_pass_needs_no_host_sync(model, monkeypatch):
    import dsv32.model.indexer as indexer

    monkeypatch.setattr(indexer, "select_topk_visible", indexer.select_topk_visible_sorted)
    m = stacked(model)
    cache = PagedKVCache(m.config, 40, 4, m.config.num_hidden_layers + 1)
    graphs = DecodeGraphs(m, cache, 8, 256, capture=False, draft=True)
    step = graphs._new_step(4, 256, (12, 12))
    step.positions.copy_(torch.tensor([30, 31, 3, 0]))
    step.tables[0, :8] = torch.arange(8)
    step.tables[1, :8] = torch.arange(8)
    step.tables[2, :1] = 8
    with torch.inference_mode(), NoHostSync():
        graphs._forward(step)
        logits = graphs._draft_forward(step)
    assert logits.shape == (4, model.config.vocab_size) and torch.isfinite(logits).all()
