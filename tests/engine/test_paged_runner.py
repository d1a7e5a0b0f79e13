"""Scheduler + paged cache + runner against the plain full-sequence forward (greedy, fp32).

Many concurrent requests of mixed lengths, chunked prefill (small token budget), prefix-cache hits
(shared prefixes) and preemption (a tiny cache) must give, token for token, what each request gives
alone; and the paged logits must equal the full-forward logits at every step, including contexts
longer than index_topk (sparse path).
"""

from __future__ import annotations

import pytest
import torch

from dsv32.engine.block_pool import BlockPool
from dsv32.engine.paged_cache import PagedKVCache
from dsv32.engine.request import Request, Status
from dsv32.engine.runner import ModelRunner
from dsv32.engine.scheduler import Scheduler
from dsv32.model.transformer import DeepseekForCausalLM
from tests.model.oracle import randomize_
from tests.model.test_forms import tiny_config


def alone(model, prompt: list[int], n: int) -> list[int]:
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
    return ids[len(prompt) :]


class RecordingCache(PagedKVCache):
    """The real paged cache, recording the shape of every latent gather (what attention reads)."""

    def __init__(self, *args, **kw):
        super().__init__(*args, **kw)
        self.latent_gathers: list[tuple[int, ...]] = []

    def gather_latent(self, layer, slots):
        self.latent_gathers.append(tuple(slots.shape))
        return super().gather_latent(layer, slots)


def drive(
    model,
    prompts,
    n_new,
    num_blocks,
    block_size,
    budget,
    max_seqs=8,
    check_logits=False,
    cache=None,
    graphs=None,
    compiled=None,
    prefill_graphs=None,
):
    pool = BlockPool(num_blocks, block_size)
    cache = cache or PagedKVCache(
        model.config, num_blocks, block_size, model.config.num_hidden_layers, model.dtype, model.device
    )
    sched = Scheduler(pool, max_num_seqs=max_seqs, max_num_batched_tokens=budget)
    runner = ModelRunner(model, cache)
    runner.graphs = graphs  # DecodeGraphs: decode-only steps as fixed-shape steps (test_cuda_graphs.py)
    runner.prefill_graphs = prefill_graphs  # PrefillGraphs: one-chunk prefills (test_prefill_graphs.py)
    runner.compiled = compiled  # CompiledLayers: compiled around attention (test_compiled_layers.py)
    reqs = [Request(f"r{i}", p, n_new, i) for i, p in enumerate(prompts)]
    for r in reqs:
        sched.add(r)
    worst, steps = 0.0, 0
    while sched.has_work():
        chunks = sched.schedule()
        assert chunks, "scheduler stalled with work left"
        logits = runner.execute(chunks)
        sampling = [c for c in chunks if c.samples]
        for row, c in enumerate(sampling):
            req = c.request
            if check_logits:
                with torch.no_grad():
                    ref = model(torch.tensor([req.all_ids], device=model.device))[0, -1]
                worst = max(worst, (logits[row] - ref.float()).abs().max().item() / ref.abs().max().item())
            req.output_ids.append(int(logits[row].argmax()))
        sched.after_step(chunks)
        for c in sampling:
            if len(c.request.output_ids) >= n_new and c.request.status == Status.RUNNING:
                sched.finish(c.request, "length")
        steps += 1
    return reqs, pool, worst, steps


def test_concurrent_mixed_requests_match_running_alone(model):
    g = torch.Generator().manual_seed(0)
    shared = torch.randint(0, 300, (9,), generator=g).tolist()  # a common prefix: prefix-cache hits
    prompts = [torch.randint(0, 300, (n,), generator=g).tolist() for n in (3, 17, 30, 5, 11)]
    prompts += [shared + [7, 8], shared + [9], shared + list(range(20, 40))]
    reqs, pool, _, _ = drive(model, prompts, n_new=8, num_blocks=64, block_size=4, budget=13)
    for r, p in zip(reqs, prompts, strict=True):
        assert r.output_ids == alone(model, p, 8), r.request_id
    pool.assert_no_leaks()
    assert pool.hits > 0  # the shared prefix was reused


def test_preemption_under_a_tiny_cache_keeps_outputs_exact(model):
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, 300, (n,), generator=g).tolist() for n in (10, 14, 6, 9)]
    # 12 blocks of 4 = 48 slots for 4 requests needing up to 14 + 10 tokens each: preemption is forced
    reqs, pool, _, _ = drive(model, prompts, n_new=10, num_blocks=12, block_size=4, budget=32)
    assert sum(r.num_preemptions for r in reqs) > 0
    for r, p in zip(reqs, prompts, strict=True):
        assert r.output_ids == alone(model, p, 10), r.request_id
    pool.assert_no_leaks()


def test_paged_logits_equal_full_forward_past_index_topk(model):
    g = torch.Generator().manual_seed(2)
    prompts = [torch.randint(0, 300, (n,), generator=g).tolist() for n in (20, 7, 26)]  # topk is 12
    _, pool, worst, _ = drive(
        model, prompts, n_new=10, num_blocks=40, block_size=4, budget=9, check_logits=True
    )
    assert worst < 1e-5
    pool.assert_no_leaks()


def test_paged_logits_equal_full_forward_when_index_scores_tie():
    """With one index head about half the keys score exactly 0 (the ReLU), so the top-k cut falls among
    tied keys: the paged prefill chunks, the padded decode rows and the full forward must still pick the
    same ones (before ties were broken by position, the logits differed by 0.98)."""
    torch.manual_seed(0)
    tie_model = DeepseekForCausalLM(tiny_config(index_topk=12, index_n_heads=1)).eval()
    randomize_(tie_model, seed=3)
    g = torch.Generator().manual_seed(2)
    prompts = [torch.randint(0, 300, (n,), generator=g).tolist() for n in (20, 7, 26)]
    _, pool, worst, _ = drive(
        tie_model, prompts, n_new=10, num_blocks=40, block_size=4, budget=9, check_logits=True
    )
    assert worst < 1e-5
    pool.assert_no_leaks()


def test_batched_decodes_read_only_the_selected_entries(model):
    """Decodes of requests with short and long contexts share one step; once the longest context passes
    index_topk (12), each decode row reads exactly 12 latent entries, not its whole context."""
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(0, 300, (n,), generator=g).tolist() for n in (5, 30, 9)]
    cache = RecordingCache(model.config, 40, 4, model.config.num_hidden_layers)
    reqs, pool, worst, _ = drive(
        model, prompts, n_new=6, num_blocks=40, block_size=4, budget=64, check_logits=True, cache=cache
    )
    assert worst < 1e-5
    batched = [s for s in cache.latent_gathers if len(s) == 2]  # [rows, entries]: the decode path
    assert batched and all(s == (3, 12) for s in batched), sorted(set(batched))
    for r, p in zip(reqs, prompts, strict=True):
        assert r.output_ids == alone(model, p, 6), r.request_id
    pool.assert_no_leaks()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_paged_runner_on_cuda_matches_full_forward(model):
    """The same step code on a GPU (fp32): batched decodes, DSA past index_topk, chunked prefill."""
    import copy

    gpu = copy.deepcopy(model).to("cuda")
    g = torch.Generator().manual_seed(5)
    prompts = [torch.randint(0, 300, (n,), generator=g).tolist() for n in (20, 7, 26)]
    cache = PagedKVCache(gpu.config, 40, 4, gpu.config.num_hidden_layers, device="cuda")
    _, pool, worst, _ = drive(
        gpu, prompts, n_new=8, num_blocks=40, block_size=4, budget=9, check_logits=True, cache=cache
    )
    assert worst < 1e-4
    pool.assert_no_leaks()


def test_decodes_of_very_different_lengths_run_in_groups(model, monkeypatch):
    """Short and long contexts decode in separate groups (padding to the longest stays bounded), with the
    same results as running alone."""
    import dsv32.engine.runner as runner_mod

    monkeypatch.setattr(runner_mod, "SHORT_CONTEXT", 4)
    g = torch.Generator().manual_seed(6)
    prompts = [torch.randint(0, 300, (n,), generator=g).tolist() for n in (3, 5, 26, 30)]
    cache = RecordingCache(model.config, 60, 4, model.config.num_hidden_layers)
    reqs, pool, worst, _ = drive(
        model, prompts, n_new=6, num_blocks=60, block_size=4, budget=64, check_logits=True, cache=cache
    )
    assert worst < 1e-5
    rows_per_gather = {s[0] for s in cache.latent_gathers if len(s) == 2}
    assert rows_per_gather == {2}, rows_per_gather  # two groups of two rows each step, never one of four
    for r, p in zip(reqs, prompts, strict=True):
        assert r.output_ids == alone(model, p, 6), r.request_id
    pool.assert_no_leaks()


def test_decode_groups_bound_the_padding():
    from dsv32.engine.request import Request
    from dsv32.engine.runner import ModelRunner, _Row
    from dsv32.engine.scheduler import ScheduledChunk

    def row(context: int) -> _Row:
        return _Row(
            ScheduledChunk(Request(f"c{context}", [0] * context, 1, 0), context - 1, 1), context - 1, 0
        )

    lens = [100000, 10, 3000, 20, 2000, 5000]
    groups = ModelRunner._decode_groups([row(n) for n in lens])
    assert [[r.pos + 1 for r in g] for g in groups] == [[10, 20], [2000, 3000], [5000], [100000]]
