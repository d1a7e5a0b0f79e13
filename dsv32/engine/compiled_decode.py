"""Batch-1 decode steps on the CPU as one ``torch.compile``d step.

A CPU decode step of one request is bound by memory for its matmuls and by the host for the rest: on
bench-small about 1300 small aten ops and their Python cost ~8 ms next to ~20 ms of weight streaming
(``dsv32 bench engine``). Inductor fuses the small ops into a few C++ kernels. It compiles the same
fixed-shape, sync-free step that CUDA graphs record (``cuda_graphs.DecodeGraphs`` with ``capture=False``),
with these differences:

* the weights are the step's inputs, and each oneDNN-packed matmul (``PackedMatmul``) is one opaque op,
  ``dsv32::packed_linear``, called by a handle numbered in creation order (a traced graph cannot take a
  oneDNN-layout tensor as an input; the op takes the plain product if a weight changed since packing).
  So a process that builds the same model traces the same graph, and inductor's on-disk cache serves the
  compiled step to the next start: bench-small's three forms compile in ~70 s the first time and load in
  ~10 s after (the embedded default model: 25 s, then 8 s; ``dsv32 serve`` alone starts in ~4 s). The step
  runs as fast as with the weights frozen in as constants (17.1 against 17.5 ms median, alternating in one
  process), which no cache can serve again;
* the routed experts are traced as reductions over the chosen experts' stacked weights
  (``MoE._experts_gathered``): a step's one token reads only its top-k experts, with no host sync and no
  per-expert call (FP8 experts, never compiled here anyway, would fall back to the eager loop as one
  opaque op);
* the visible-slot dimension is dynamic: one compiled step serves every slot bucket up to ``index_topk``
  and one more every bucket past it (the dense and the DSA form), up to 32766 slots: inductor lowers the
  DSA form's stable sort differently from ``LONG_SORT_SLOTS`` on, a third compile. ``warm_up`` compiles all
  that the context length allows up front, so no request meets a compile.

Only single-request decode steps use it. With the row count dynamic too, one more compile (~40 s per form)
served all row buckets, but gained little on bench-small: 37.2 against 39.6 ms eager at 4 rows, 57.8 against
56.7 ms at 16, where the matmuls dominate. Results equal the eager step within float rounding
(fused kernels sum in another order), not bit for bit. Needs a C++ compiler at run time; if compiling fails
the engine logs a warning and stays eager.
"""

from __future__ import annotations

import logging
import time

import torch
import torch._inductor.config

from dsv32.engine.cuda_graphs import DecodeGraphs, GraphCaptureError, _Step, step_compile_config
from dsv32.engine.paged_cache import PagedKVCache
from dsv32.model.layers import Linear, PackedMatmul, keep_packed_matmuls
from dsv32.model.moe import register_for_compile
from dsv32.model.transformer import DeepseekForCausalLM

log = logging.getLogger(__name__)

LONG_SORT_SLOTS = 32767  # from this many slots inductor's stable sort compiles to another kernel (a guard)


def compile_unsupported_reason(model: DeepseekForCausalLM) -> str | None:
    """Why the decode step of ``model`` is not compiled (None: it can be)."""
    if model.device.type != "cpu":
        return f"the compiled decode step is for the CPU; this model is on {model.device}"
    if any(m.is_fp8 for m in model.modules() if isinstance(m, Linear)):
        # (a compiled step would still dequantise every FP8 weight in full each step, as the eager one does)
        return "FP8 weights kept in FP8 are dequantised per call; not compiled"
    return None


class CompiledDecode(DecodeGraphs):
    """Single-request decode steps through one ``torch.compile``d fixed-shape step."""

    def __init__(self, model: DeepseekForCausalLM, cache: PagedKVCache, max_context: int):
        reason = compile_unsupported_reason(model)
        if reason:
            raise ValueError(reason)
        super().__init__(model, cache, max_rows=1, max_context=max_context, capture=False)
        model.rotary.inv_freq(model.device)  # made on first use, eagerly: not inside the compiled step
        register_for_compile(model, gathered=True)  # one row: each pair reads its expert once
        self._packed: dict[int, PackedMatmul] = {}  # what the compiled forms call by handle: kept alive
        self._compiled = torch.compile(super()._forward, fullgraph=True, dynamic=None)
        self._forms_compiled: set[tuple] = set()  # ``_form``s compiled so far

    @property
    def compiled(self) -> bool:
        return True

    def _new_step(self, rows: int, slots: int, topks: tuple[int, ...]) -> _Step:
        # inference tensors whoever asks (warm-up or a step): dynamo guards on it, and a step made outside
        # inference mode would compile again when the engine's steps (inside it) come
        with torch.inference_mode():
            step = super()._new_step(rows, slots, topks)
        torch._dynamo.mark_dynamic(step.tables, 1)  # the slot buckets share one compiled step per form
        return step

    def _form(self, step: _Step) -> tuple:
        """What decides which compiled step runs: past some indexer's top-k or not, the top-ks, and whether
        the slots reach ``LONG_SORT_SLOTS``."""
        slots = step.tables.shape[1] * self.block_size
        topks = tuple(ix.topk for ix in self._indexers)
        past_topk = any(slots > k for k in topks)
        return past_topk, topks, past_topk and slots >= LONG_SORT_SLOTS

    def _run(self, step: _Step, compiled_before: bool = False) -> torch.Tensor:
        # The options are read where the compiled graph is lowered. A C++ wrapper instead of inductor's
        # Python one around the kernels: 26.5 against 27.4 ms a step on bench-small (alternating in one
        # process), for ~5 s more compile. An engine over another model compiles its own step (its packed
        # matmuls' handles differ): more than dynamo's default of 8 entries per function where a process
        # builds engines over several models (the tests).
        # Once a step's form has compiled, dynamo checks only the guards that tell its compiled forms apart
        # (``skip_guard_eval_unsafe``): a full guard check costs ~0.5 ms a step, and what else it guards
        # (the model, its weights' shapes, the mode flags) does not change under an engine that owns the model.
        inductor = torch._inductor.config.patch(cpp_wrapper=True)
        stance = torch.compiler.set_stance("default", skip_guard_eval_unsafe=compiled_before)
        with inductor, step_compile_config(), stance:
            return self._compiled(step)

    def _forward(self, step: _Step) -> torch.Tensor:
        form = self._form(step)
        if form in self._forms_compiled:
            return self._run(step, compiled_before=True)
        t0 = time.perf_counter()
        keep_packed_matmuls(self.model, self._packed)
        try:
            out = self._run(step)
        except Exception as e:  # noqa: BLE001 - any compiler failure (no C++ compiler, an inductor bug)
            raise GraphCaptureError(f"compiling the CPU decode step failed: {type(e).__name__}: {e}") from e
        self._forms_compiled.add(form)
        past_topk, _, long_sort = form
        what = (
            f"DSA selection{f', {LONG_SORT_SLOTS}+ slots' if long_sort else ''}" if past_topk else "all slots"
        )
        log.info("compiled the CPU decode step (%s) in %.1f s", what, time.perf_counter() - t0)
        return out

    def _warm_up_contexts(self) -> set[int]:
        """``DecodeGraphs``' forms, and past ``LONG_SORT_SLOTS`` (where the context reaches it) a third."""
        longest = super()._warm_up_contexts()
        if self._indexers and self.max_slots >= LONG_SORT_SLOTS:
            longest.add(LONG_SORT_SLOTS // 2 + 2)  # its bucket: the first power of two past LONG_SORT_SLOTS
        return longest
