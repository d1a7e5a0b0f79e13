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

With ``compile=True`` inductor compiles the step before it is captured (``serve --compile``): its many
small kernels (casts, norms, rotations, routing; ~860 on bench-small's batch-1 step) fuse into ~400, and
an H100 runs the batch-1 step in 1.2 ms of GPU time instead of 2.0 (1.7x decode tok/s; ~30 s to compile a
form there). The slot count is dynamic (and the row count past one row), so one compile serves a form's
buckets: one row or more, all slots visible or past an indexer's top-k. ``warm_up`` compiles the forms
the context length allows before the first request. Logits agree with the plain step within rounding.

With speculative decoding (``draft=True``) a request's draft tokens are rows of their own (its positions
after the known token, the same block table), and each bucket has a second graph: the MTP pass, which
reads the first graph's hidden states and the tokens sampled from its logits (``draft``).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import torch

from dsv32.engine.paged_cache import PagedKVCache, slots_at
from dsv32.engine.scheduler import ScheduledChunk
from dsv32.model.transformer import DeepseekForCausalLM

log = logging.getLogger(__name__)

ROW_BUCKETS = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512)
MIN_SLOTS = 256


class GraphCaptureError(RuntimeError):
    """A step could not be captured (the runner then stays eager)."""


def step_compile_config():
    """The dynamo settings under which an engine's compiled steps run. Every engine's steps share their
    functions' code, whose compiled forms dynamo counts together (hence the higher recompile limit), and a
    process that compiles steps for models of other shapes (the benchmarks, the tests) must not have dynamo
    make the dimensions that differ between the models dynamic ("automatic dynamic shapes": weights with
    symbolic sizes, which inductor's C++ wrapper has failed to compile): each model's step compiles for its
    own shapes, dynamic only where ``mark_dynamic`` says."""
    return torch._dynamo.config.patch(recompile_limit=64, automatic_dynamic_shapes=False)


def capture_graph(forward, pool) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
    """Record ``forward()`` (after two warm-up calls on a side stream) as a CUDA graph in memory pool
    ``pool``: (the graph, the output it writes on each replay)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # first calls set up cuBLAS and the allocator outside the graph
        for _ in range(2):
            forward()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, pool=pool):
        out = forward()
    return graph, out


@dataclass
class _Step:
    """The fixed-shape inputs of one bucket (rewritten before each replay) and, once captured, its graph."""

    ids: torch.Tensor  # [R] token ids
    positions: torch.Tensor  # [R] each row's position (its context length - 1)
    tables: torch.Tensor  # [R, S / block_size] block ids (padding: the scratch block)
    graph: torch.cuda.CUDAGraph | None = None
    logits: torch.Tensor | None = None  # [R, vocab] fp32: the graph's output
    # speculative decoding: the final hidden states [R, D] (an output of the step), the token after each
    # row [R] (an input of the MTP pass), and the MTP pass's graph and output [R, vocab]
    hidden: torch.Tensor | None = None
    next_ids: torch.Tensor | None = None
    draft_graph: torch.cuda.CUDAGraph | None = None
    draft_logits: torch.Tensor | None = None
    draft_v: torch.Tensor | None = None  # [1, R, D] the MTP layer's output (chained drafts read it)


class DecodeGraphs:
    """Runs steps made only of single-token chunks (decodes, with their drafts when ``draft``) as
    fixed-shape, graph-captured steps."""

    def __init__(
        self,
        model: DeepseekForCausalLM,
        cache: PagedKVCache,
        max_rows: int,
        max_context: int,
        capture: bool = True,
        draft: bool = False,
        compile: bool = False,
    ):
        if compile and draft:
            raise ValueError("compiled decode steps are not used with speculative decoding")
        self.model, self.cache, self.capture = model, cache, capture
        self.block_size = cache.block_size
        self.row_buckets = [b for b in ROW_BUCKETS if b < max_rows] + [max_rows]
        self.max_slots = -(-max_context // self.block_size) * self.block_size
        self.steps: dict[tuple, _Step] = {}  # (rows, slots, every indexer's topk) -> its step
        self.mtp = model.mtp_layers[0] if draft else None  # speculative decoding: the MTP pass too
        layers = model.model.layers[: model.n_main_layers + (1 if draft else 0)]
        self._indexers = [b.self_attn.indexer for b in layers if b.self_attn.indexer is not None]
        self.pool = torch.cuda.graph_pool_handle() if capture else None
        self._last: tuple[_Step, dict[int, list[int]]] | None = None  # for ``draft``
        self._compiled_step = None  # ``compile``: the inductor-compiled ``_forward``
        if compile:
            model.rotary.inv_freq(model.device)  # made on first use, eagerly: not inside the compiled step
            self._compiled_step = torch.compile(self._forward, fullgraph=True)

    @property
    def compiled(self) -> bool:
        """Whether the steps run compiled."""
        return self._compiled_step is not None

    def fits(self, chunks: list[ScheduledChunk]) -> bool:
        return (
            0 < sum(c.num_rows for c in chunks) <= self.row_buckets[-1]
            and all(c.num_tokens == 1 for c in chunks)  # no prefill chunks
            and (self.mtp is not None or not any(c.draft for c in chunks))
            and max(c.start + c.num_rows - 1 for c in chunks) < self.max_slots
        )

    def _bucket(self, rows: int, longest: int) -> tuple[int, int]:
        r = next(b for b in self.row_buckets if b >= rows)
        s = max(MIN_SLOTS, 1 << (longest - 1).bit_length())
        s = -(-s // self.block_size) * self.block_size
        return r, min(s, self.max_slots)

    def execute(self, chunks: list[ScheduledChunk]) -> torch.Tensor:
        """fp32 logits of a decode-only step (``fits``), like ``ModelRunner.execute``: for each chunk that
        samples, its row and its draft rows."""
        rows = sum(c.num_rows for c in chunks)
        step = self._step(rows, max(c.start + c.num_rows for c in chunks))
        r, nb = step.tables.shape
        scratch = self.cache.scratch_block
        ids, positions, tables, rows_of = [], [], [], {}
        for c in chunks:
            table = (t := c.request.block_table[:nb]) + [scratch] * (nb - len(t))
            rows_of[id(c)] = list(range(len(ids), len(ids) + c.num_rows))
            ids += [c.request.token_at(c.start), *c.draft]
            positions += range(c.start, c.start + c.num_rows)
            tables += [table] * c.num_rows
        step.ids.copy_(torch.tensor(ids + [0] * (r - rows)))
        step.positions.copy_(torch.tensor(positions + [0] * (r - rows)))
        step.tables.copy_(torch.tensor(tables + [[scratch] * nb] * (r - rows)))
        if step.graph is not None:
            step.graph.replay()
            logits = step.logits
        else:
            logits = self._step_forward(step)
        if self.mtp is not None:
            self._last = (step, rows_of)
        sampling = [i for c in chunks if c.samples for i in rows_of[id(c)]]
        if len(sampling) == r:
            return logits
        if sampling == list(range(len(sampling))):
            return logits[: len(sampling)]
        return logits.index_select(0, torch.tensor(sampling, device=logits.device))

    def draft(
        self, chunks: list[ScheduledChunk], drafting: list[ScheduledChunk]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The MTP pass over the step ``execute`` just ran, as ``ModelRunner.draft`` (whose contract this
        follows): (v [len(drafting), D], fp32 logits [len(drafting), vocab])."""
        from dsv32.engine.runner import last_computed_rows, next_token_ids

        step, rows_of = self._last
        self._last = None
        step.next_ids.copy_(torch.tensor(next_token_ids(chunks, rows_of, step.ids.shape[0])))
        if step.draft_graph is not None:
            step.draft_graph.replay()
            logits = step.draft_logits
        else:
            logits = self._draft_forward(step)
        rows = last_computed_rows(drafting, rows_of, logits.device)
        return step.draft_v[0].index_select(0, rows), logits.index_select(0, rows)

    def _step(self, rows: int, longest: int) -> _Step:
        """The step of the bucket of ``rows`` rows whose longest context is ``longest`` (made on first use)."""
        # a graph bakes in each indexer's top-k (the bench switches DSA off by raising it): part of the key
        key = (*self._bucket(rows, longest), tuple(ix.topk for ix in self._indexers))
        return self.steps.get(key) or self._new_step(*key)

    def _new_step(self, rows: int, slots: int, topks: tuple[int, ...]) -> _Step:
        dev = self.model.device
        # compiled: inference tensors whoever asks (warm-up or a step), as the engine's steps run in
        # inference mode; dynamo guards on it (a step made outside would compile again)
        with torch.inference_mode(self._compiled_step is not None):
            step = self._new_step_tensors(rows, slots, dev)
        if self._compiled_step is not None:  # one compiled step per form, whatever the bucket
            torch._dynamo.mark_dynamic(step.tables, 1)
            if rows > 1:
                for t in (step.ids, step.positions, step.tables):
                    torch._dynamo.mark_dynamic(t, 0)
        if self.capture:  # all rows are padding now: the warm-up and capture touch only the scratch block
            try:
                step.graph, step.logits = self._capture(lambda: self._step_forward(step))
                if self.mtp is not None:  # reads the hidden states the step's graph leaves in the pool
                    step.draft_graph, step.draft_logits = self._capture(lambda: self._draft_forward(step))
            except Exception as e:  # noqa: BLE001 - a capture's RuntimeError, or any compiler failure
                raise GraphCaptureError(f"capturing a {rows} x {slots} decode step failed: {e}") from e
            log.info("captured a CUDA graph for %d decode rows x %d slots", rows, slots)
        self.steps[(rows, slots, topks)] = step
        return step

    def _new_step_tensors(self, rows: int, slots: int, dev: torch.device) -> _Step:
        return _Step(
            ids=torch.zeros(rows, dtype=torch.long, device=dev),
            positions=torch.zeros(rows, dtype=torch.long, device=dev),
            tables=torch.full(
                (rows, slots // self.block_size), self.cache.scratch_block, dtype=torch.long, device=dev
            ),
            next_ids=torch.zeros(rows, dtype=torch.long, device=dev) if self.mtp is not None else None,
        )

    def _step_forward(self, step: _Step) -> torch.Tensor:
        """The step's forward: compiled (``compile``) or as written. In inference mode whoever calls (the
        engine's steps run in it): with autograd on, writing the new entries would mark the shared cache
        as requiring grad, and dynamo (which guards on the grad mode) would compile a training graph."""
        with torch.inference_mode():
            if self._compiled_step is None:
                return self._forward(step)
            with step_compile_config():
                return self._compiled_step(step)

    def _warm_up_contexts(self) -> set[int]:
        """A context length of each form ``warm_up`` compiles: all slots visible, and past each indexer's top-k
        (where the context allows)."""
        return {1} | {ix.topk + 1 for ix in self._indexers if ix.topk < self.max_slots}

    def warm_up(self) -> None:
        """Compile (``compile``) and capture, before the first request, a step of each form the engine can
        meet: one row and more rows (where ``max_rows`` allows), all slots visible and past each indexer's
        top-k (where the context allows); each on padding rows, which touch only the scratch block."""
        rows = [1] + ([2] if self.row_buckets[-1] > 1 else [])
        for r in rows:
            for n in sorted(self._warm_up_contexts()):
                t0 = time.perf_counter()
                with torch.inference_mode():
                    step = self._step(r, n)
                    if step.graph is None:
                        self._step_forward(step)
                log.info(
                    "decode step form (%d rows, %d slots) ready in %.1f s", r, n, time.perf_counter() - t0
                )

    def _capture(self, forward) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
        return capture_graph(forward, self.pool)

    def _context(self, step: _Step):
        """The paged attention context of the step's rows (one decode group)."""
        from dsv32.engine.runner import PagedContext, _Decodes

        model, bs = self.model, self.block_size
        grid = torch.arange(step.tables.shape[1] * bs, device=step.ids.device)  # [S]
        slots = slots_at(step.tables, grid, bs)  # [R, S]
        visible = grid[None, :] <= step.positions[:, None]
        new_slots = slots.gather(1, step.positions[:, None])[:, 0]
        cos, sin = model.rotary(step.positions)
        # every row is one group (``slice(None)``: no Python int of the row count, which torch.compile keeps dynamic)
        decodes = [_Decodes(slice(None), slots, visible)]
        return PagedContext(self.cache, decodes, [], new_slots, step.positions, cos, sin)

    def _forward(self, step: _Step) -> torch.Tensor:
        model = self.model
        hidden = model.forward_layers(model.model.embed_tokens(step.ids[None]), self._context(step))
        if self.mtp is not None:
            step.hidden = hidden  # the MTP pass reads it (in a captured step: the graph's output buffer)
        return model.logits(hidden[0])

    def _draft_forward(self, step: _Step) -> torch.Tensor:
        """The MTP layer over the step's rows: its cache entries, and its logits [R, vocab] (fp32)."""
        step.draft_v = self.mtp.draft_hidden(step.hidden, step.next_ids[None], self._context(step))
        return self.mtp.draft_logits(step.draft_v[0]).float()
