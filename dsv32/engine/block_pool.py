"""Fixed-size cache blocks with reference counts and prefix caching by chained block hashes.

A block holds ``block_size`` token slots of the paged latent cache. A *full* block is identified by a
hash chained over its tokens and its parent block's hash, so equal hashes mean equal token prefixes.
Freed blocks keep their hash and stay reusable until memory is needed: free blocks form one LRU queue
(evict from the front, append freed blocks at the back), and a prefix hit takes a block out of it.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Sequence

import numpy as np


def hash_block(parent: bytes | None, token_ids: Sequence[int]) -> bytes:
    """Chained hash of one full block: sha256(parent hash ‖ token ids)."""
    h = hashlib.sha256(parent or b"\0")
    h.update(np.asarray(token_ids, dtype=np.int64).tobytes())
    return h.digest()


class BlockPool:
    def __init__(self, num_blocks: int, block_size: int):
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"need num_blocks >= 1 and block_size >= 1, got {num_blocks}, {block_size}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.ref_count = [0] * num_blocks
        self.block_hash: list[bytes | None] = [None] * num_blocks
        self.cached: dict[bytes, int] = {}  # hash -> block id (full blocks whose content is known)
        self.free_queue: OrderedDict[int, None] = OrderedDict((b, None) for b in range(num_blocks))
        self.hits = 0  # prefix-cache hits, in blocks
        self.queries = 0  # prefix-cache lookups, in blocks

    @property
    def num_free(self) -> int:
        """Blocks with no user (including cached ones that may be evicted)."""
        return len(self.free_queue)

    @property
    def num_cached(self) -> int:
        return len(self.cached)

    def allocate(self) -> int:
        """Take the least recently freed block; its cached content (if any) is evicted."""
        if not self.free_queue:
            raise RuntimeError("no free cache blocks")
        block, _ = self.free_queue.popitem(last=False)
        old = self.block_hash[block]
        if old is not None:
            if self.cached.get(old) == block:
                del self.cached[old]
            self.block_hash[block] = None
        self.ref_count[block] = 1
        return block

    def lookup_prefix(self, hashes: Sequence[bytes]) -> list[int]:
        """Leading blocks whose hashes are cached, each taken (ref count + 1) for the caller (not counted in the
        hit rate: see ``record_lookup``)."""
        found = []
        for h in hashes:
            block = self.cached.get(h)
            if block is None:
                break
            found.append(block)
        for block in found:
            if self.ref_count[block] == 0:
                del self.free_queue[block]
            self.ref_count[block] += 1
        return found

    def record_lookup(self, queried: int, hit: int) -> None:
        """Count one admitted request's prefix lookup: ``queried`` full blocks looked up, ``hit`` of them reused
        (``lookup_prefix`` does not count: a request refused for lack of blocks gives its hits back)."""
        self.queries += queried
        self.hits += hit

    def mark_full(self, block: int, block_hash: bytes) -> None:
        """Record that ``block`` now holds the full block ``block_hash`` (reusable by later requests)."""
        if self.block_hash[block] is not None:
            return
        self.block_hash[block] = block_hash
        self.cached.setdefault(block_hash, block)

    def free(self, blocks: Sequence[int]) -> None:
        """Drop one reference to each block; unreferenced blocks join the back of the LRU queue.

        Freed in reverse so a sequence's tail blocks are evicted before its head blocks (the head is
        the part most likely to be shared by a later request)."""
        for block in reversed(blocks):
            if self.ref_count[block] <= 0:
                raise RuntimeError(f"block {block} freed more often than taken")
            self.ref_count[block] -= 1
            if self.ref_count[block] == 0:
                self.free_queue[block] = None

    def assert_no_leaks(self) -> None:
        """Every block is free (possibly cached): call when no request is alive."""
        used = [b for b, r in enumerate(self.ref_count) if r != 0]
        if used or len(self.free_queue) != self.num_blocks:
            raise AssertionError(f"{len(used)} cache blocks still referenced: {used[:8]}")

    def hit_rate(self) -> float:
        return self.hits / self.queries if self.queries else 0.0
