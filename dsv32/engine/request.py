"""A request's life in the engine: its tokens, its block table, and how far the cache has caught up.

Lifecycle: WAITING (queued; prefix-cache lookup on first schedule) → RUNNING (each step computes a chunk
of the tokens not yet in the cache: prompt chunks, then one sampled token at a time) → FINISHED (blocks
freed, full blocks stay in the prefix cache). A preempted request goes back to WAITING with its blocks
freed and is recomputed later (its own blocks often survive in the prefix cache).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from dsv32.engine.block_pool import hash_block


class Status(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass
class Request:
    request_id: str
    prompt_ids: list[int]
    max_tokens: int  # resolved: never past the model's context
    arrival: int  # monotonically increasing submission number (FIFO order, "newest" for preemption)
    priority: int = 0  # lower first (the scheduler's "priority" policy; 0 under "fcfs")
    output_ids: list[int] = field(default_factory=list)
    status: Status = Status.WAITING
    block_table: list[int] = field(default_factory=list)
    block_hashes: list[bytes] = field(default_factory=list)  # of the full blocks computed so far
    num_computed: int = 0  # tokens whose latent entries are in the cache
    num_cached_prompt: int | None = None  # prompt tokens served by the prefix cache (first schedule)
    num_preemptions: int = 0
    draft_ids: list[int] = field(default_factory=list)  # speculative tokens proposed for the next step
    finish_reason: str | None = None
    # prompt logprobs (``SamplingParams.prompt_logprobs``): per prompt position its entry once computed (None
    # before, and always at position 0), how many alternatives each holds, and how many are still missing
    prompt_logprobs: list[dict | None] | None = None
    prompt_top: int = 0
    prompt_logprobs_left: int = 0
    # ((block size, lookahead), chained hashes of the prompt's full blocks), once computed (``prompt_block_hashes``)
    _prompt_hashes: tuple[tuple[int, int], list[bytes]] | None = field(default=None, repr=False)

    @property
    def all_ids(self) -> list[int]:
        return self.prompt_ids + self.output_ids

    def token_at(self, pos: int) -> int:
        n = len(self.prompt_ids)
        return self.prompt_ids[pos] if pos < n else self.output_ids[pos - n]

    def token_ids(self, start: int, end: int) -> list[int]:
        """Tokens [start, end) without building ``all_ids``."""
        n = len(self.prompt_ids)
        if end <= n:
            return self.prompt_ids[start:end]
        return self.prompt_ids[start:] + self.output_ids[max(0, start - n) : end - n]

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    @property
    def is_finished(self) -> bool:
        return self.status == Status.FINISHED

    def prompt_block_hashes(self, block_size: int, lookahead: int = 0) -> list[bytes]:
        """Chained hashes of the prompt's full blocks (each with its ``lookahead`` tokens inside the prompt), as
        ``full_block_hashes`` gives them; computed once (the prompt never changes)."""
        key = (block_size, lookahead)
        if self._prompt_hashes is None or self._prompt_hashes[0] != key:
            ids, hashes = self.prompt_ids, []
            for b in range((len(ids) - lookahead) // block_size):
                chunk = ids[b * block_size : (b + 1) * block_size + lookahead]
                hashes.append(hash_block(hashes[-1] if hashes else None, chunk))
            self._prompt_hashes = (key, hashes)
        return self._prompt_hashes[1]

    def full_block_hashes(self, block_size: int, upto: int, lookahead: int = 0) -> list[bytes]:
        """Chained hashes of the full blocks among the first ``upto`` tokens (extends ``block_hashes``).

        With ``lookahead`` each hash also covers that many tokens after its block (those the block's cache
        entries were computed with: the MTP layer's entry at a block's last position reads the next token);
        a block whose lookahead tokens are not known yet gets no hash yet. The prompt's blocks come from
        ``prompt_block_hashes`` (a request looked up step after step, waiting or refused, is hashed once)."""
        hashes = list(self.block_hashes)
        prompt = self.prompt_block_hashes(block_size, lookahead)
        if len(hashes) < len(prompt):
            hashes = prompt[: max(len(hashes), min(len(prompt), upto // block_size))]
        ids = self.all_ids
        for b in range(len(hashes), upto // block_size):
            end = (b + 1) * block_size
            if end + lookahead > len(ids):
                break
            parent = hashes[-1] if hashes else None
            hashes.append(hash_block(parent, ids[b * block_size : end + lookahead]))
        return hashes
