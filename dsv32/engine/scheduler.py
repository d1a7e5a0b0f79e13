"""Continuous batching with one token budget per step.

The scheduler only decides; the runner executes. Each step every running request asks for the tokens
it has that the cache lacks (a prompt chunk, or the one token sampled last step), and waiting requests
are admitted in arrival order while budget, sequence slots and blocks last — so decodes and chunked
prefills share a step, and prefix hits simply start a request with some tokens already computed.
When blocks run out, the newest running request is preempted (blocks freed, recomputed later). Under the
"priority" policy (vLLM's) the order is (priority, arrival) instead of arrival: a lower priority value is
admitted first and preempted last; a request already running is not preempted to admit a waiting one.
A waiting request that does not fit blocks the ones behind it, so none starves.

Requests that share a prompt prefix and arrive together (``n`` samples of one prompt, a burst of requests
with one system prompt) compute it once: a waiting request whose next uncached block is one that a
running request's prefill is computing waits (holding nothing, not counted against ``max_num_seqs``) and
is admitted once that block is in the prefix cache; requests behind it are admitted meanwhile. The one it
waits for is running, so it never waits long: as long as that prefill's chunk, or until it is preempted.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from dsv32.engine.block_pool import BlockPool
from dsv32.engine.request import Request, Status

POLICIES = ("fcfs", "priority")


@dataclass
class ScheduledChunk:
    request: Request
    start: int  # first position computed this step (== request.num_computed)
    num_tokens: int  # known tokens computed this step
    # speculative decoding: draft tokens after the known ones, computed in the same step and verified by
    # sampling (the engine sets ``num_accepted`` before ``after_step``)
    draft: list[int] = field(default_factory=list)
    num_accepted: int = 0

    @property
    def samples(self) -> bool:
        """Whether this chunk reaches the end of the known tokens, so the step samples a token."""
        return self.start + self.num_tokens == self.request.num_tokens

    @property
    def num_rows(self) -> int:
        """Positions computed this step: the known tokens and the drafts."""
        return self.num_tokens + len(self.draft)


class Scheduler:
    def __init__(
        self,
        pool: BlockPool,
        max_num_seqs: int = 64,
        max_num_batched_tokens: int = 2048,
        hash_lookahead: int = 0,
        policy: str = "fcfs",
    ):
        """``hash_lookahead``: tokens after a full block that its prefix-cache identity covers (1 when the MTP
        layer keeps a cache: its entry at a block's last position is computed with the next token).
        ``policy``: "fcfs" (arrival order) or "priority" (``Request.priority`` first, lower first; then arrival
        order): the order waiting requests are admitted in, and the reverse of the order running ones are
        preempted in."""
        if policy not in POLICIES:
            raise ValueError(f"scheduling policy must be one of {', '.join(POLICIES)}, got {policy!r}")
        self.policy = policy
        if max_num_seqs < 1 or max_num_batched_tokens < 1:
            raise ValueError("max_num_seqs and max_num_batched_tokens must be >= 1")
        self.pool = pool
        self.hash_lookahead = hash_lookahead
        self.block_size = pool.block_size
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.num_preemptions = 0  # since start

    # ---- queue ----------------------------------------------------------------------------
    def add(self, req: Request) -> None:
        self._enqueue(req)

    def _rank(self, req: Request) -> tuple[int, int]:
        """Admission order (smaller first); preemption takes the largest."""
        return (req.priority if self.policy == "priority" else 0), req.arrival

    def _enqueue(self, req: Request) -> None:
        """Into the waiting queue at its rank (a preempted request goes back before later arrivals)."""
        rank = self._rank(req)
        i = len(self.waiting)
        while i and self._rank(self.waiting[i - 1]) > rank:
            i -= 1
        self.waiting.insert(i, req)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def finish(self, req: Request, reason: str) -> None:
        """Finish (or abort) a request: its blocks are freed at once."""
        if req.status == Status.FINISHED:
            return
        if req.status == Status.RUNNING:
            self.running.remove(req)
        else:
            self.waiting.remove(req)
        self._release(req)
        req.status = Status.FINISHED
        req.finish_reason = reason

    # ---- one step -------------------------------------------------------------------------
    def schedule(self) -> list[ScheduledChunk]:
        budget = self.max_num_batched_tokens
        chunks: list[ScheduledChunk] = []
        scheduled: set[int] = set()
        # running requests in rank order (priority, then arrival; a re-admitted request keeps its arrival):
        # each takes blocks before any it ranks above, so a victim (the largest rank not yet in this step) is
        # never a request that outranks one already scheduled
        self.running.sort(key=self._rank)
        i = 0
        while i < len(self.running) and budget > 0:
            req = self.running[i]
            n = min(req.num_tokens - req.num_computed, budget)
            if n <= 0:  # nothing to compute (should not happen: every running request has a token)
                i += 1
                continue
            # a draft rides along with the one sampled token if budget and free blocks allow; it never
            # preempts anyone
            draft = req.draft_ids if n == 1 and 1 + len(req.draft_ids) <= budget else []
            if draft and not self._ensure_blocks(req, req.num_computed + 1 + len(draft)):
                draft = []
            if not self._ensure_blocks(req, req.num_computed + n):
                # preempt the newest running request that is not already in this step, then retry
                victim = max((r for r in self.running if id(r) not in scheduled), key=self._rank)
                self._preempt(victim)
                continue  # self.running shrank; re-check index i (it may have been the victim)
            chunks.append(ScheduledChunk(req, req.num_computed, n, list(draft)))
            scheduled.add(id(req))
            budget -= n + len(draft)
            i += 1
        in_flight: set[bytes] | None = None  # prompt blocks that running requests are computing (when needed)
        w = 0  # waiting requests before this one wait for a shared prefill
        while w < len(self.waiting) and budget > 0 and len(self.running) < self.max_num_seqs:
            req = self.waiting[w]
            # a waiting request holds no blocks (new, preempted or refused)
            looked_up = self._take_prefix_hits(req)
            if looked_up > len(req.block_table):  # (a scored request looks nothing up: it never waits)
                if in_flight is None:
                    in_flight = self._in_flight_blocks(self.running)
                k, prompt_hashes = len(req.block_table), self._prompt_hashes(req)
                if k < len(prompt_hashes) and prompt_hashes[k] in in_flight:
                    self._release(req)  # its next block is being computed: wait and read it from the cache
                    w += 1
                    continue
            n = min(req.num_tokens - req.num_computed, budget)
            if not self._ensure_blocks(req, req.num_computed + n):
                self._release(req)  # give back prefix hits; try again next step
                break
            # Hits count once admitted: a refused request's hits are given back (and may be evicted
            # before it is admitted), so neither the pool's hit rate nor its cached tokens may count them.
            self.pool.record_lookup(looked_up, req.num_computed // self.block_size)
            if req.num_cached_prompt is None:  # reported once, from the first admission
                req.num_cached_prompt = min(req.num_computed, len(req.prompt_ids))
            del self.waiting[w]
            req.status = Status.RUNNING
            self.running.append(req)
            if in_flight is not None:
                in_flight |= self._in_flight_blocks([req])
            chunks.append(ScheduledChunk(req, req.num_computed, n))
            budget -= n
        return chunks

    def after_step(self, chunks: list[ScheduledChunk]) -> None:
        """Advance each chunk's request and publish its newly completed full blocks to the prefix cache.

        Call after the sampled tokens (accepted drafts among them) have been appended to ``output_ids``."""
        for c in chunks:
            req = c.request
            if req.status != Status.RUNNING:
                continue
            # a rejected draft's entries are not counted: the next step rewrites them
            req.num_computed = c.start + c.num_tokens + c.num_accepted
            hashes = req.full_block_hashes(self.block_size, req.num_computed, self.hash_lookahead)
            for b in range(len(req.block_hashes), len(hashes)):
                self.pool.mark_full(req.block_table[b], hashes[b])
            req.block_hashes = hashes

    def reserve(self, req: Request, n_tokens: int) -> bool:
        """Give a running request blocks for its first ``n_tokens`` positions if they are free (chained
        drafts write the MTP layer's entries ahead); False, taking nothing more, if not."""
        return self._ensure_blocks(req, n_tokens)

    # ---- helpers ----------------------------------------------------------------------------
    def _take_prefix_hits(self, req: Request) -> int:
        """Take the cached blocks of the request's leading full blocks; returns how many blocks were looked up."""
        if req.prompt_logprobs_left:  # every prompt position's logits are wanted: nothing read from the cache
            req.block_table, req.block_hashes, req.num_computed = [], [], 0
            return 0
        # at least one token must be computed, to have logits to sample from
        hashes = req.full_block_hashes(self.block_size, req.num_tokens - 1, self.hash_lookahead)
        blocks = self.pool.lookup_prefix(hashes)
        req.block_table = blocks
        req.block_hashes = hashes[: len(blocks)]
        req.num_computed = len(blocks) * self.block_size
        return len(hashes)

    def _prompt_hashes(self, req: Request) -> list[bytes]:
        return req.prompt_block_hashes(self.block_size, self.hash_lookahead)

    def _in_flight_blocks(self, requests: list[Request]) -> set[bytes]:
        """Hashes of the prompt blocks these requests have yet to compute (and will publish when they have)."""
        blocks: set[bytes] = set()
        for r in requests:
            if r.num_computed < len(r.prompt_ids):
                blocks.update(self._prompt_hashes(r)[r.num_computed // self.block_size :])
        return blocks

    def _ensure_blocks(self, req: Request, n_tokens: int) -> bool:
        need = -(-n_tokens // self.block_size) - len(req.block_table)
        if need > self.pool.num_free:
            return False
        for _ in range(need):
            req.block_table.append(self.pool.allocate())
        return True

    def _release(self, req: Request) -> None:
        self.pool.free(req.block_table)
        req.block_table = []
        req.block_hashes = []
        req.num_computed = 0
        req.draft_ids = []

    def _preempt(self, req: Request) -> None:
        self.running.remove(req)
        self._release(req)
        req.status = Status.WAITING
        req.num_preemptions += 1
        self.num_preemptions += 1
        self._enqueue(req)
