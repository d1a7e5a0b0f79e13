"""Prefill (and mixed) steps through a ``torch.compile``d forward with the attention left eager.

What the decode graphs do not take — steps with prefill chunks, and decode steps that fit no graph — runs
the flattened step eagerly (``ModelRunner.execute``). On a GPU such a step of a small model is bound by the
host: a 1024-token prefill of bench-small launches ~945 kernels for ~5.5 ms of GPU work, and eagerly takes
~23 ms (``benchmarks/results/gpu_profile_cuda.md``). Here the per-token work of every layer (norms,
projections, rotations, the router, the experts, the residual sums) is compiled by inductor, which fuses
its small ops, while each layer's attention over the paged cache — block tables, a Python loop over the
step's chunks, the DSA selection — runs as one opaque op (``dsv32::paged_attend``), as vLLM compiles
"piecewise" around its attention. The token count is dynamic: one compile serves every step of two rows or
more, whatever its mix of prefill chunks and decodes (a one-row step stays eager).

Results equal the eager forward's within float rounding (fused kernels sum in another order). If compiling
fails the runner logs why and stays eager.
"""

from __future__ import annotations

import logging
import time

import torch

from dsv32.engine.cuda_graphs import step_compile_config
from dsv32.model.layers import PackedMatmul, keep_packed_matmuls
from dsv32.model.mla import MLA, AttentionContext, MLAInputs
from dsv32.model.moe import register_for_compile
from dsv32.model.transformer import DeepseekForCausalLM

log = logging.getLogger(__name__)

MIN_ROWS = 2  # dynamo specialises a dimension of size 1: one-row steps stay eager

# (model, the step's attention context) while a compiled forward runs: what ``paged_attend`` reads
_CURRENT: tuple[DeepseekForCausalLM, AttentionContext] | None = None


@torch.library.custom_op("dsv32::paged_attend", mutates_args=())
def _paged_attend(
    x: torch.Tensor,
    c_q: torch.Tensor | None,
    q_nope: torch.Tensor,
    q_pe: torch.Tensor,
    c_kv: torch.Tensor,
    k_pe: torch.Tensor,
    k_index: torch.Tensor | None,
    cos: torch.Tensor,
    sin: torch.Tensor,
    layer_idx: int,
    d_v: int,
) -> torch.Tensor:
    """Layer ``layer_idx``'s attention of the running step (``_CURRENT``): writes the step's new latent
    entries to the cache and returns the per-head outputs [1, N, H, d_v]. Opaque to the compiler; the cache
    it writes is read only by later calls of this op, which the compiled graph orders by their data flow."""
    if _CURRENT is None:
        raise RuntimeError("dsv32::paged_attend runs only inside CompiledLayers.forward")
    model, ctx = _CURRENT
    mla = model.model.layers[layer_idx].self_attn
    out = ctx.attend(layer_idx, mla, MLAInputs(x, c_q, q_nope, q_pe, c_kv, k_pe, k_index, cos, sin))
    # a custom op's output is a fresh tensor of the fake's (contiguous) layout
    if not out.is_contiguous():
        return out.contiguous()
    return out.clone() if _aliases(out, (x, c_q, q_nope, q_pe, c_kv, k_pe, k_index)) else out


@_paged_attend.register_fake
def _(x, c_q, q_nope, q_pe, c_kv, k_pe, k_index, cos, sin, layer_idx, d_v):  # noqa: ANN001, ANN202
    return q_nope.new_empty((*q_nope.shape[:-1], d_v))


def _aliases(out: torch.Tensor, inputs: tuple[torch.Tensor | None, ...]) -> bool:
    """Whether ``out`` shares storage with an input (a custom op's output may not)."""
    ptr = out.untyped_storage().data_ptr()
    return any(t is not None and t.untyped_storage().data_ptr() == ptr for t in inputs)


class _OpaqueAttention:
    """The ``AttentionContext`` the compiled forward sees: each layer's attention is one ``paged_attend``."""

    def __init__(self, q_pos: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        self.q_pos, self.cos, self.sin = q_pos, cos, sin

    def attend(self, layer_idx: int, mla: MLA, inp: MLAInputs) -> torch.Tensor:
        return torch.ops.dsv32.paged_attend(
            inp.x, inp.c_q, inp.q_nope, inp.q_pe, inp.c_kv, inp.k_pe, inp.k_index, inp.cos, inp.sin,
            layer_idx, mla.d_v,
        )  # fmt: skip


class CompiledLayers:
    """``model.forward_layers`` of a flattened step, compiled around its attention (see the module doc)."""

    def __init__(self, model: DeepseekForCausalLM):
        self.model = model
        model.rotary.inv_freq(model.device)  # made on first use, eagerly: not inside the compiled forward
        register_for_compile(model)  # experts not stacked for grouped matmuls: the loop as one opaque op
        self._compiled = torch.compile(self._forward, fullgraph=True, dynamic=None)
        self.ready = False  # compiled (``warm_up`` or a first step) without error
        self._packed: dict[int, PackedMatmul] = {}  # what the compiled forward calls by handle: kept alive

    @staticmethod
    def fits(rows: int) -> bool:
        return rows >= MIN_ROWS

    def forward(self, input_ids: torch.Tensor, ctx: AttentionContext) -> torch.Tensor:
        """Final hidden states [1, N, D] of the step's tokens ``input_ids`` [1, N] (N >= ``MIN_ROWS``) under
        ``ctx`` (whose q_pos, cos and sin cover the N tokens)."""
        global _CURRENT
        torch._dynamo.mark_dynamic(input_ids, 1)
        for t in (ctx.q_pos, ctx.cos, ctx.sin):
            torch._dynamo.mark_dynamic(t, 0)
        t0 = None if self.ready else time.perf_counter()
        if t0 is not None:
            keep_packed_matmuls(self.model, self._packed)
        _CURRENT = (self.model, ctx)
        try:
            with step_compile_config():
                hidden = self._compiled(input_ids, ctx.q_pos, ctx.cos, ctx.sin)
        finally:
            _CURRENT = None
        if t0 is not None:
            self.ready = True
            log.info("compiled the step forward around its attention in %.1f s", time.perf_counter() - t0)
        return hidden

    def _forward(
        self, input_ids: torch.Tensor, q_pos: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
    ) -> torch.Tensor:
        model = self.model
        return model.forward_layers(model.model.embed_tokens(input_ids), _OpaqueAttention(q_pos, cos, sin))
