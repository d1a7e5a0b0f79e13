"""Regressions found by differential fuzzing of the engine (random tiny models, workloads and engine settings
against the plain full-sequence forward and the scheduler's own bookkeeping)."""

from __future__ import annotations

from dsv32.engine.block_pool import BlockPool
from dsv32.engine.request import Request
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
