"""Regressions found by differential fuzzing of the engine (random tiny models, workloads and engine settings
against the plain full-sequence forward and the scheduler's own bookkeeping)."""

from __future__ import annotations

import asyncio
import threading

import pytest

from dsv32.chat.tokenizer import load_tokenizer
from dsv32.engine.async_engine import AsyncEngine
from dsv32.engine.block_pool import BlockPool
from dsv32.engine.core import EngineConfig, EngineCore, EngineError
from dsv32.engine.request import Request
from dsv32.engine.sampling_params import SamplingParams
from dsv32.engine.scheduler import Scheduler


def _step(sched: Scheduler) -> list[tuple[str, int, int]]:
    """One scheduler step with a dummy sampled token; requests finish at max_tokens."""
    chunks = sched.schedule()
    sampled = [c.request for c in chunks if c.samples]
    for r in sampled:
        r.output_ids.append(1)
    sched.after_step(chunks)
    for r in sampled:
        if len(r.output_ids) >= r.max_tokens:
            sched.finish(r, "length")
    return [(c.request.request_id, c.start, c.num_tokens) for c in chunks]


def test_refused_admission_counts_no_prefix_hits():
    """A request refused for lack of blocks gives its prefix hits back, and they may be evicted before it is
    admitted: its cached_tokens and the pool's hit rate count only what its admission reused (they used to
    count every refused lookup, and report the first refused lookup's hits as the request's cached tokens)."""
    pool = BlockPool(6, 4)
    sched = Scheduler(pool, max_num_seqs=4, max_num_batched_tokens=64)
    p = list(range(10, 18))
    sched.add(Request("p", p, 1, 0))
    _step(sched)  # p's two full blocks are now cached (and free)
    a = Request("a", list(range(100, 116)), 2, 1)  # takes the 4 other blocks
    b = Request("b", p + list(range(50, 58)), 1, 2)  # p's 2 blocks hit, but 2 more are needed: refused
    sched.add(a)
    sched.add(b)
    assert _step(sched) == [("a", 0, 16)]
    assert _step(sched) == [("a", 16, 1)]  # a's decode evicts p's second block
    assert _step(sched) == [("b", 4, 12)]  # admitted with one block reused
    assert b.num_cached_prompt == 4
    assert (pool.hits, pool.queries) == (1, 1 + 3 + 3)  # p, a, b: one lookup each
    pool.assert_no_leaks()


def test_cancelled_submit_leaves_no_loop_error_and_no_request(model):
    """A ``submit`` cancelled while the engine thread is taking its request: the thread's answer must not be
    set on the cancelled future (asyncio reported 'InvalidStateError: invalid state' for each), and the
    request it had already added is aborted."""
    core = EngineCore(model, EngineConfig(block_size=4, num_blocks=16, prepack_weights=False), eos_id=None)
    engine = AsyncEngine(core, load_tokenizer())
    gate = threading.Event()
    add = core.add_request

    def held_add(*args, **kw):
        gate.wait(10)
        return add(*args, **kw)

    core.add_request = held_add

    async def main():
        errors = []
        asyncio.get_running_loop().set_exception_handler(lambda loop, ctx: errors.append(ctx))
        task = asyncio.ensure_future(engine.submit([5, 6, 7], SamplingParams(max_tokens=2)))
        await asyncio.sleep(0.05)  # the engine thread is inside add_request
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        gate.set()
        for _ in range(200):
            await asyncio.sleep(0.01)
            if not core.has_work() and engine._commands.empty():
                break
        await asyncio.sleep(0.05)  # the thread's answer reaches the loop
        return errors

    try:
        errors = asyncio.run(main())
    finally:
        gate.set()
        engine.shutdown()
    assert errors == []
    assert not core.live and not core.has_work()
    core.pool.assert_no_leaks()


@pytest.mark.parametrize("max_model_len", [0, -3, 4097])
def test_max_model_len_past_the_models_positions_is_refused(model, max_model_len):
    """The engine took any max_model_len: past max_position_embeddings (4096 here) it generated at positions
    the model is not configured for, and the server advertised that context; 0 silently meant 'the model's'."""
    with pytest.raises(EngineError, match=r"max_model_len must be in \[1, 4096\]"):
        EngineCore(model, EngineConfig(num_blocks=8, max_model_len=max_model_len, prepack_weights=False))
    assert (
        EngineCore(model, EngineConfig(num_blocks=8, max_model_len=4096, prepack_weights=False)).max_model_len
        == 4096
    )


def _check_books(sched: Scheduler) -> None:
    """Block references, free queue, prefix-cache index and per-request hashes agree with each other."""
    from collections import Counter

    from dsv32.engine.block_pool import hash_block

    pool, bs = sched.pool, sched.block_size
    users = Counter(b for r in sched.running for b in r.block_table)
    for r in sched.running:
        assert len(r.block_table) >= -(-r.num_computed // bs) and r.num_computed < r.num_tokens
        assert len(r.block_hashes) == r.num_computed // bs
        parent, ids = None, r.all_ids
        for b, h in enumerate(r.block_hashes):
            parent = hash_block(parent, ids[b * bs : (b + 1) * bs])
            assert h == parent
    assert all(not r.block_table and not r.num_computed for r in sched.waiting)
    for b in range(pool.num_blocks):
        assert pool.ref_count[b] == users[b] and (users[b] == 0) == (b in pool.free_queue)
    assert all(pool.block_hash[b] == h for h, b in pool.cached.items())


@pytest.mark.parametrize("seed", range(40))
def test_random_workloads_keep_the_books(seed):
    """Scheduler + pool alone on random workloads (shared prefixes, tiny caches that force preemption and
    refused admissions, small token budgets, late arrivals, aborts): after every step the books agree, each
    request's cached_tokens is what its admission reused, the pool's hits are what admissions reused, and
    nothing leaks. (The fuzz campaign's bookkeeping checks, without the model.)"""
    import random

    rng = random.Random(seed)
    bs = rng.choice([1, 2, 3, 4, 7, 16])
    prefix = [rng.randrange(2, 300) for _ in range(60)]
    reqs = []
    for i in range(rng.randint(2, 14)):
        p = prefix[: rng.randint(1, 60)] if rng.random() < 0.6 else []
        p = p + [rng.randrange(2, 300) for _ in range(rng.randint(0 if p else 1, 20))]
        reqs.append(Request(f"r{i}", p, rng.choice([1, 2, 5, 12]), i))
    need = max(-(-(len(r.prompt_ids) + r.max_tokens) // bs) for r in reqs)
    pool = BlockPool(need + rng.randint(0, 4), bs)
    sched = Scheduler(pool, rng.randint(1, 8), rng.randint(1, 40))
    arrive = {r.request_id: rng.choice([0, 0, rng.randint(0, 30)]) for r in reqs}
    abort = {r.request_id: rng.randint(0, 40) for r in reqs if rng.random() < 0.2}
    first_start: dict[str, int] = {}
    reused = 0
    step, pending, added = 0, sorted(reqs, key=lambda r: arrive[r.request_id]), []
    while pending or sched.has_work():
        while pending and (arrive[pending[0].request_id] <= step or not sched.has_work()):
            added.append(pending.pop(0))
            sched.add(added[-1])
        for r in added:
            if abort.get(r.request_id) == step:
                sched.finish(r, "abort")  # a no-op once finished
        before = {r.request_id: r.num_preemptions for r in sched.running}
        chunks = sched.schedule()
        for c in chunks:
            rid = c.request.request_id
            if before.get(rid) != c.request.num_preemptions:  # admitted (or re-admitted) this step
                first_start.setdefault(rid, c.start)
                reused += c.start // bs
        sampled = [c.request for c in chunks if c.samples]
        for r in sampled:
            r.output_ids.append(rng.randrange(2, 300))
        sched.after_step(chunks)
        for r in sampled:
            if len(r.output_ids) >= r.max_tokens:
                sched.finish(r, "length")
        _check_books(sched)
        step += 1
        assert step < 3000, "the scheduler stalled"
    for r in reqs:
        if r.request_id in first_start:
            assert r.num_cached_prompt == min(first_start[r.request_id], len(r.prompt_ids)), r.request_id
    assert pool.hits == reused
    pool.assert_no_leaks()
