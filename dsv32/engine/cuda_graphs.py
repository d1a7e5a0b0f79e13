"""Decode steps replayed from CUDA graphs.

On a GPU a small model's decode step is bound by the host launching kernels, not by the GPU: a batch-1
step of bench-small launches ~935 kernels and keeps an H100 busy 2.4 ms of a 16 ms step
(``benchmarks/results/gpu_profile_cuda.md``). A CUDA graph records a step's launches once and replays them
with one call. The recorded step has fixed shapes and no host syncs:

* rows are padded to a bucket of ``ROW_BUCKETS`` and every row's visible slots to a power of two (at least
  ``MIN_SLOTS``); padding rows read and write only the cache's scratch block;
* slots, visibility and the new entries' slots are computed on the device from the block tables;
* the MoE runs its experts as grouped matmuls (``MoE.stack_experts``), the DSA selection is one stable
  sort (``select_topk_visible_sorted``).

A graph is captured the first time its (rows, slots) bucket is used; all share one memory pool. The
logits a replay returns live in that pool: they are valid until the next replay. With ``capture=False``
the same padded step runs eagerly (any device): what the CPU tests check against the plain runner.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from dsv32.engine.paged_cache import PagedKVCache
from dsv32.engine.scheduler import ScheduledChunk
from dsv32.model.transformer import DeepseekForCausalLM

log = logging.getLogger(__name__)

ROW_BUCKETS = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512)
MIN_SLOTS = 256


class GraphCaptureError(RuntimeError):
    """A decode step could not be captured (the runner then stays eager)."""


@dataclass
class _Step:
    """The fixed-shape inputs of one bucket (rewritten before each replay) and, once captured, its graph."""

    ids: torch.Tensor  # [R] token ids
    positions: torch.Tensor  # [R] each row's position (its context length - 1)
    tables: torch.Tensor  # [R, S / block_size] block ids (padding: the scratch block)
    graph: torch.cuda.CUDAGraph | None = None
    logits: torch.Tensor | None = None  # [R, vocab] fp32: the graph's output


class DecodeGraphs:
    """Runs steps made only of single-token chunks (decodes) as fixed-shape, graph-captured steps."""

    def __init__(
        self,
        model: DeepseekForCausalLM,
        cache: PagedKVCache,
        max_rows: int,
        max_context: int,
        capture: bool = True,
    ):
        self.model, self.cache, self.capture = model, cache, capture
        self.block_size = cache.block_size
        self.row_buckets = [b for b in ROW_BUCKETS if b < max_rows] + [max_rows]
        self.max_slots = -(-max_context // self.block_size) * self.block_size
        self.steps: dict[tuple, _Step] = {}  # (rows, slots, every indexer's topk) -> its step
        layers = model.model.layers[: model.n_main_layers]
        self._indexers = [b.self_attn.indexer for b in layers if b.self_attn.indexer is not None]
        self.pool = torch.cuda.graph_pool_handle() if capture else None

    def fits(self, chunks: list[ScheduledChunk]) -> bool:
        return (
            0 < len(chunks) <= self.row_buckets[-1]
            and all(c.num_rows == 1 for c in chunks)  # no prefill chunks, no drafts
            and max(c.start for c in chunks) < self.max_slots
        )

    def _bucket(self, rows: int, longest: int) -> tuple[int, int]:
        r = next(b for b in self.row_buckets if b >= rows)
        s = max(MIN_SLOTS, 1 << (longest - 1).bit_length())
        s = -(-s // self.block_size) * self.block_size
        return r, min(s, self.max_slots)

    def execute(self, chunks: list[ScheduledChunk]) -> torch.Tensor:
        """fp32 logits [n_sampling_chunks, vocab] of a decode-only step (``fits``), like ``ModelRunner.execute``."""
        rows = len(chunks)
        step = self._step(rows, max(c.start for c in chunks) + 1)
        r, nb = step.tables.shape
        scratch = self.cache.scratch_block
        ids = [c.request.token_at(c.start) for c in chunks] + [0] * (r - rows)
        positions = [c.start for c in chunks] + [0] * (r - rows)
        tables = [(t := c.request.block_table[:nb]) + [scratch] * (nb - len(t)) for c in chunks]
        tables += [[scratch] * nb] * (r - rows)
        step.ids.copy_(torch.tensor(ids))
        step.positions.copy_(torch.tensor(positions))
        step.tables.copy_(torch.tensor(tables))
        if step.graph is not None:
            step.graph.replay()
            logits = step.logits
        else:
            logits = self._forward(step)
        sampling = [i for i, c in enumerate(chunks) if c.samples]
        if len(sampling) == r:
            return logits
        if sampling == list(range(len(sampling))):
            return logits[: len(sampling)]
        return logits.index_select(0, torch.tensor(sampling, device=logits.device))

    def _step(self, rows: int, longest: int) -> _Step:
        """The step of the bucket of ``rows`` rows whose longest context is ``longest`` (made on first use)."""
        # a graph bakes in each indexer's top-k (the bench switches DSA off by raising it): part of the key
        key = (*self._bucket(rows, longest), tuple(ix.topk for ix in self._indexers))
        return self.steps.get(key) or self._new_step(*key)

    def _new_step(self, rows: int, slots: int, topks: tuple[int, ...]) -> _Step:
        dev = self.model.device
        step = _Step(
            ids=torch.zeros(rows, dtype=torch.long, device=dev),
            positions=torch.zeros(rows, dtype=torch.long, device=dev),
            tables=torch.full(
                (rows, slots // self.block_size), self.cache.scratch_block, dtype=torch.long, device=dev
            ),
        )
        if self.capture:  # all rows are padding now: the warm-up and capture touch only the scratch block
            try:
                side = torch.cuda.Stream()
                side.wait_stream(torch.cuda.current_stream())
                with torch.cuda.stream(side):  # first calls set up cuBLAS and the allocator outside the graph
                    for _ in range(2):
                        self._forward(step)
                torch.cuda.current_stream().wait_stream(side)
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=self.pool):
                    step.logits = self._forward(step)
            except RuntimeError as e:
                raise GraphCaptureError(f"capturing a {rows} x {slots} decode step failed: {e}") from e
            step.graph = graph
            log.info("captured a CUDA graph for %d decode rows x %d slots", rows, slots)
        self.steps[(rows, slots, topks)] = step
        return step

    def _forward(self, step: _Step) -> torch.Tensor:
        from dsv32.engine.runner import PagedContext, _Decodes

        model, bs = self.model, self.block_size
        grid = torch.arange(step.tables.shape[1] * bs, device=step.ids.device)  # [S]
        slots = step.tables[:, grid // bs] * bs + grid % bs  # [R, S]
        visible = grid[None, :] <= step.positions[:, None]
        new_slots = slots.gather(1, step.positions[:, None])[:, 0]
        cos, sin = model.rotary(step.positions, model.dtype)
        # every row is one group (``slice(None)``: no Python int of the row count, which torch.compile keeps dynamic)
        ctx = PagedContext(self.cache, [_Decodes(slice(None), slots, visible)], [], new_slots, cos, sin)
        hidden = model.forward_layers(model.model.embed_tokens(step.ids[None]), ctx)
        return model.lm_head(hidden[0]).float()
