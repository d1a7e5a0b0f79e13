"""Prefill steps of one chunk replayed from CUDA graphs.

On a GPU a small model's prefill is bound by the host too: a 1024-token prefill of bench-small launches
~945 kernels for ~5 ms of GPU work and takes ~20 ms eagerly (``benchmarks/results/gpu_profile_cuda.md``).
The commonest prefill step — one request's chunk alone in its step (a prompt arriving at an idle or
decode-free engine) — is recorded here as a graph per bucket, in the way ``cuda_graphs.DecodeGraphs`` records
decode steps:

* the chunk's tokens are padded to a power of two (at least ``MIN_TOKENS``), its visible keys (every position
  before the chunk's end) to a power of two of slots (at least ``MIN_SLOTS``); padding tokens come after
  the chunk's, at the following positions, so causal attention hides them from every real token, and they
  write their cache entries to the cache's scratch block;
* the cache slots are computed on the device from the block table, the chunk's first position and its length
  (the step's only inputs besides the token ids), so a replay needs three small host-to-device copies;
* attention runs as the eager prefill does (``MLA.attend``, the naive form with the DSA selection inside),
  over all the bucket's slots, masked causally: a bucket past ``index_topk`` slots takes the DSA form (a
  chunk that sees fewer keys selects all of them, the same attention); the experts run as grouped matmuls
  and the DSA selection as one stable sort, so nothing syncs with the host.

The step returns the logits of the chunk's last token (fp32 [1, vocab], in the graph's memory pool: valid
until the next replay). Steps with several chunks, decodes beside a prefill or drafts stay with the runner.
With ``capture=False`` the same padded step runs eagerly (any device): what the CPU tests compare.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from dsv32.engine.cuda_graphs import GraphCaptureError, capture_graph
from dsv32.engine.paged_cache import PagedKVCache, slots_at
from dsv32.engine.scheduler import ScheduledChunk
from dsv32.model.transformer import DeepseekForCausalLM

log = logging.getLogger(__name__)

MIN_TOKENS = 16
MIN_SLOTS = 256


def _pow2(n: int, least: int) -> int:
    return max(least, 1 << (n - 1).bit_length())


@dataclass
class _Prefill:
    """The fixed-shape inputs of one bucket (rewritten before each replay) and, once captured, its graph."""

    ids: torch.Tensor  # [T] token ids (padding: 0)
    span: torch.Tensor  # [2] the chunk's first position and its token count
    table: torch.Tensor  # [S / block_size] block ids of the visible slots (padding: the scratch block)
    graph: torch.cuda.CUDAGraph | None = None
    logits: torch.Tensor | None = None  # [1, vocab] fp32: the graph's output


class PrefillGraphs:
    """Runs steps made of one prefill chunk as fixed-shape, graph-captured steps."""

    def __init__(
        self,
        model: DeepseekForCausalLM,
        cache: PagedKVCache,
        max_tokens: int,
        max_context: int,
        capture: bool = True,
        min_tokens: int = MIN_TOKENS,
        min_slots: int = MIN_SLOTS,
    ):
        self.model, self.cache, self.capture = model, cache, capture
        self.block_size = cache.block_size
        self.min_tokens, self.min_slots = min_tokens, min_slots  # the smallest buckets
        self.max_tokens = _pow2(max_tokens, min_tokens)  # the largest token bucket
        self.max_slots = _pow2(-(-max_context // self.block_size) * self.block_size, min_slots)
        layers = model.model.layers[: model.n_main_layers]
        self._indexers = [b.self_attn.indexer for b in layers if b.self_attn.indexer is not None]
        self.steps: dict[tuple, _Prefill] = {}  # (tokens, slots, every indexer's topk) -> its step
        self.pool = torch.cuda.graph_pool_handle() if capture else None

    def fits(self, chunks: list[ScheduledChunk]) -> bool:
        if len(chunks) != 1:
            return False
        c = chunks[0]
        return c.num_tokens > 1 and not c.draft and self._bucket(c.start, c.num_tokens) is not None

    def _bucket(self, start: int, n: int) -> tuple[int, int] | None:
        tokens = _pow2(n, self.min_tokens)
        slots = -(-_pow2(start + tokens, self.min_slots) // self.block_size) * self.block_size
        if tokens > self.max_tokens or slots > self.max_slots:
            return None
        return tokens, slots

    def execute(self, chunks: list[ScheduledChunk]) -> torch.Tensor:
        """fp32 logits [1, vocab] of the chunk's last token if it samples (``ScheduledChunk.samples``), else
        [0, vocab]; as ``ModelRunner.execute``."""
        (c,) = chunks
        req, n = c.request, c.num_tokens
        step = self._step(c.start, n)
        t, nb = step.ids.shape[0], step.table.shape[0]
        table = req.block_table[:nb]
        step.ids.copy_(torch.tensor(req.token_ids(c.start, c.start + n) + [0] * (t - n)))
        step.span.copy_(torch.tensor([c.start, n]))
        step.table.copy_(torch.tensor(table + [self.cache.scratch_block] * (nb - len(table))))
        if step.graph is not None:
            step.graph.replay()
            logits = step.logits
        else:
            logits = self._step_forward(step)
        return logits if c.samples else logits[:0]

    def _step(self, start: int, n: int) -> _Prefill:
        key = (*self._bucket(start, n), tuple(ix.topk for ix in self._indexers))
        return self.steps.get(key) or self._new_step(*key)

    def _new_step(self, tokens: int, slots: int, topks: tuple[int, ...]) -> _Prefill:
        dev = self.model.device
        scratch = self.cache.scratch_block
        step = _Prefill(
            ids=torch.zeros(tokens, dtype=torch.long, device=dev),
            span=torch.tensor([0, 1], dtype=torch.long, device=dev),  # all padding but the first token
            table=torch.full((slots // self.block_size,), scratch, dtype=torch.long, device=dev),
        )
        if self.capture:  # the warm-up and capture touch only the scratch block (and the first slot of it)
            try:
                step.graph, step.logits = capture_graph(lambda: self._step_forward(step), self.pool)
            except Exception as e:  # noqa: BLE001 - a capture's RuntimeError
                raise GraphCaptureError(
                    f"capturing a {tokens}-token x {slots}-slot prefill failed: {e}"
                ) from e
            log.info("captured a CUDA graph for %d-token prefills over %d slots", tokens, slots)
        self.steps[(tokens, slots, topks)] = step
        return step

    def _step_forward(self, step: _Prefill) -> torch.Tensor:
        from dsv32.engine.runner import PagedContext, _Segment

        with torch.inference_mode():
            model, bs = self.model, self.block_size
            tokens, slots = step.ids.shape[0], step.table.shape[0] * bs
            dev = step.ids.device
            start, n = step.span[0], step.span[1]
            grid = torch.arange(slots, device=dev)
            seg_slots = slots_at(step.table, grid, bs)  # [S] the slot of every position
            rows = torch.arange(tokens, device=dev)
            q_pos = start + rows  # padding continues the positions: causally after every real token
            scratch = self.cache.scratch_block * bs + rows % bs
            new_slots = torch.where(rows < n, seg_slots.gather(0, q_pos.clamp(max=slots - 1)), scratch)
            cos, sin = model.rotary(q_pos)
            # ``first_pos`` as if the chunk ended at the last slot: every query chunk reads all the slots
            # (the causal mask, from q_pos, hides what a token may not see)
            segment = _Segment(slice(None), q_pos, slots - tokens, seg_slots)
            ctx = PagedContext(self.cache, [], [segment], new_slots, q_pos, cos, sin)
            hidden = model.forward_layers(model.model.embed_tokens(step.ids[None]), ctx)  # [1, T, D]
            return model.logits(hidden[0].index_select(0, (n - 1).view(1)))
