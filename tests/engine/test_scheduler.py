"""The scheduler alone (no model): a prefix shared by requests that arrive together is computed once."""

from __future__ import annotations

from dsv32.engine.block_pool import BlockPool
from dsv32.engine.request import Request
from dsv32.engine.scheduler import Scheduler
from tests.engine.test_fuzz_regressions import _step


def test_a_shared_prompt_prefix_is_computed_once_and_others_go_ahead():
    """Two requests with one 14-token prompt and a third with another, added together (budget 8 a step): the
    second waits (holding no blocks and no sequence slot) while the first computes the shared blocks, the
    third is admitted past it, and the second then reads every full block from the cache."""
    pool = BlockPool(32, 4)
    sched = Scheduler(pool, max_num_seqs=2, max_num_batched_tokens=8)
    shared = list(range(10, 24))
    a, b, c = Request("a", shared, 2, 0), Request("b", list(shared), 2, 1), Request("c", [5, 6, 7], 1, 2)
    for r in (a, b, c):
        sched.add(r)
    assert _step(sched) == [("a", 0, 8)]  # b waits for a's blocks; c does not fit the budget (8 tokens)
    assert list(sched.waiting) == [b, c] and not b.block_table
    assert _step(sched) == [("a", 8, 6), ("c", 0, 2)]  # c goes ahead of b; max_num_seqs 2 reached
    assert _step(sched) == [("a", 14, 1), ("c", 2, 1)]  # c finishes (max_tokens 1) after its last chunk
    assert _step(sched) == [("b", 12, 2)]  # a finished; b: 3 full blocks from the cache, 2 tokens computed
    assert b.num_cached_prompt == 12 and pool.hits == 3
    assert _step(sched) == [("b", 14, 1)]
    assert not sched.has_work()
    pool.assert_no_leaks()


def test_a_shared_prefill_preempted_and_resumed_still_serves_the_waiting_request():
    """A tiny cache: the older request's decodes preempt the one computing the shared prefix (the newest),
    repeatedly; the request waiting for that prefix neither deadlocks nor computes it: it is admitted once
    the prefix is in the cache, reading all of it."""
    pool = BlockPool(5, 4)
    sched = Scheduler(pool, max_num_seqs=4, max_num_batched_tokens=4)
    shared = list(range(10, 22))  # 3 blocks
    x = Request("x", [7, 8, 9], 12, 0)
    a, b = Request("a", shared + [1], 2, 1), Request("b", shared + [3], 2, 2)
    for r in (x, a, b):
        sched.add(r)
    b_chunks = []
    for _ in range(100):
        if not sched.has_work():
            break
        b_chunks += [(start, n) for rid, start, n in _step(sched) if rid == "b"]
    assert not sched.has_work() and a.num_preemptions >= 1
    assert b_chunks == [(12, 1), (13, 1)] and b.num_cached_prompt == 12
    pool.assert_no_leaks()


def test_priority_policy_admits_lower_values_first_and_preempts_the_highest():
    """vLLM's "priority" policy: waiting requests are admitted by (priority, arrival), and when blocks run out
    the running request with the largest (priority, arrival) is preempted; "fcfs" keeps arrival order."""
    for policy, admitted in (("fcfs", ["a", "b", "c"]), ("priority", ["c", "a", "b"])):
        pool = BlockPool(32, 4)
        sched = Scheduler(pool, max_num_seqs=1, max_num_batched_tokens=64, policy=policy)
        for i, (rid, prio) in enumerate((("a", 5), ("b", 5), ("c", -1))):
            sched.add(Request(rid, [10 + i, 11, 12], 1, i, prio if policy == "priority" else 0))
        order = [rid for _ in range(3) for rid, _, _ in _step(sched)]
        assert order == admitted and not sched.has_work()
        pool.assert_no_leaks()
    # two running in three blocks: when the newer needs a block, the older (priority 3) is preempted
    pool = BlockPool(3, 4)
    sched = Scheduler(pool, max_num_seqs=2, max_num_batched_tokens=64, policy="priority")
    old, new = Request("old", [1, 2, 3, 4], 6, 0, 3), Request("new", [5, 6, 7], 6, 1, 0)
    sched.add(old)
    sched.add(new)
    for _ in range(3):  # both prefill, then decode until new needs a block none has free
        _step(sched)
    assert old.num_preemptions == 1 and new.num_preemptions == 0 and list(sched.waiting) == [old]
    while sched.has_work():
        _step(sched)
    pool.assert_no_leaks()


def test_an_unknown_policy_is_refused():
    import pytest

    with pytest.raises(ValueError, match="fcfs, priority"):
        Scheduler(BlockPool(4, 4), policy="lifo")


def test_preemption_takes_the_lowest_ranked_whatever_the_admission_order():
    """A low-priority request admitted first, then a high-priority one: when blocks run out, the low one is
    preempted, not the high one (before, running requests took blocks in admission order, so the high one,
    needing a block after the low one had taken the last, preempted itself). Under fcfs the same holds for
    arrival: a preempted and re-admitted request keeps its age and outranks newer ones."""
    for policy in ("priority", "fcfs"):
        pool = BlockPool(3, 4)
        sched = Scheduler(pool, max_num_seqs=2, max_num_batched_tokens=64, policy=policy)
        first = Request("first", [1, 2, 3, 4], 8, 1, 5 if policy == "priority" else 0)
        second = Request("second", [6, 7, 8, 9], 8, 0 if policy == "fcfs" else 2, 0)
        sched.add(first)
        _step(sched)  # first alone: its prompt fills one block
        sched.add(second)  # (fcfs: arrived earlier, e.g. a request preempted before and now re-admitted)
        _step(sched)  # first's decode takes a second block, second's prompt the last one
        assert pool.num_free == 0
        while not (first.num_preemptions or second.num_preemptions):
            _step(sched)
        assert first.num_preemptions == 1 and second.num_preemptions == 0, policy
        while sched.has_work():
            _step(sched)
        assert second.num_preemptions == 0
        pool.assert_no_leaks()
