"""DeepSeekMoE: sigmoid router with bias-corrected, group-limited top-k; routed + shared SwiGLU experts.

Routing ("noaux_tc") for one token, all in fp32:
    s      = sigmoid(x · W_gᵀ)                         affinities            [E]
    s_sel  = s + e_score_correction_bias              used ONLY to choose experts
    group score = sum of the top-2 s_sel in each of n_group groups; keep the top ``topk_group`` groups
    E_t    = top ``num_experts_per_tok`` experts of s_sel inside the kept groups
    w_e    = s[e] / Σ_{E_t} s · routed_scaling_factor   (weights from the UNbiased s)
    y      = Σ_{e∈E_t} w_e · Expert_e(x) + SharedExperts(x)
"""

from __future__ import annotations

import weakref

import torch
import torch.nn.functional as F
from torch import nn

from dsv32.config import ModelConfig
from dsv32.model.layers import MLP, swiglu


class Gate(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_experts = cfg.n_routed_experts
        self.top_k = cfg.num_experts_per_tok
        self.n_group, self.topk_group = cfg.n_group, cfg.topk_group
        self.norm_topk_prob = cfg.norm_topk_prob
        self.scaling = cfg.routed_scaling_factor
        self.weight = nn.Parameter(torch.empty(cfg.n_routed_experts, cfg.hidden_size, dtype=torch.float32))
        self.FP32_PARAMS = ("weight", "e_score_correction_bias")  # the router runs in fp32
        self.register_buffer(
            "e_score_correction_bias", torch.zeros(cfg.n_routed_experts, dtype=torch.float32)
        )

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [N, D] -> expert ids [N, k] and fp32 weights [N, k]."""
        s = F.linear(x.float(), self.weight.float()).sigmoid()  # [N, E]
        s_sel = s + self.e_score_correction_bias.float()
        if self.n_group > 1:
            grouped = s_sel.view(-1, self.n_group, self.n_experts // self.n_group)
            group_score = grouped.topk(2, dim=-1).values.sum(-1)  # [N, G]
            keep = group_score.topk(self.topk_group, dim=-1).indices
            group_mask = torch.zeros_like(group_score, dtype=torch.bool).scatter_(1, keep, True)
            s_sel = grouped.masked_fill(~group_mask[..., None], float("-inf")).flatten(1)
        idx = s_sel.topk(self.top_k, dim=-1).indices
        w = s.gather(1, idx)
        if self.norm_topk_prob:
            w = w / (w.sum(-1, keepdim=True) + 1e-20)
        return idx, w * self.scaling


class MoE(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gate = Gate(cfg)
        self.experts = nn.ModuleList(
            MLP(cfg.hidden_size, cfg.moe_intermediate_size) for _ in range(cfg.n_routed_experts)
        )
        self.shared_experts = (
            MLP(cfg.hidden_size, cfg.moe_intermediate_size * cfg.n_shared_experts)
            if cfg.n_shared_experts > 0
            else None
        )
        # Every routed expert's weights in one tensor each (``stack_experts``): [E, 2I, D] gate‖up, [E, D, I] down.
        self._w13: torch.Tensor | None = None
        self._w2: torch.Tensor | None = None
        self._grouped = False  # the stacks serve grouped matmuls (``stack_experts(grouped=True)``)
        self._compiled_experts: str | None = None  # "looped" or "gathered": see ``register_for_compile``

    def stack_experts(self, grouped: bool = True) -> None:
        """Move the routed experts' weights into two stacked tensors; each expert's Linears keep views of
        them (no second copy; packed copies are packed again from the views). With ``grouped``, ``forward``
        then runs all experts as two grouped matmuls with no host sync, which a CUDA graph can capture,
        instead of a loop over the experts that reads the token counts on the host; without, the stacks
        serve only a compiled forward's gathered experts (``register_for_compile``). Not for FP8 experts
        (their weights are dequantised per call)."""
        self._grouped = self._grouped or grouped
        if self._w13 is not None:
            return
        if any(lin.is_fp8 for e in self.experts for lin in (e.gate_proj, e.up_proj, e.down_proj)):
            raise ValueError("stack_experts: FP8 expert weights are dequantised per call; not stacked")
        inter = self.experts[0].gate_proj.out_features
        with torch.no_grad():
            w13 = torch.stack([torch.cat((e.gate_proj.weight, e.up_proj.weight)) for e in self.experts])
            w2 = torch.stack([e.down_proj.weight for e in self.experts])
        for i, e in enumerate(self.experts):
            e.gate_proj.weight = nn.Parameter(w13[i, :inter], requires_grad=False)
            e.up_proj.weight = nn.Parameter(w13[i, inter:], requires_grad=False)
            e.down_proj.weight = nn.Parameter(w2[i], requires_grad=False)
            if e._gate_up is not None:  # packed from the weights just replaced: stale, packed again
                e.prepack()
            if e.down_proj._packed is not None:
                e.down_proj.prepack()
        self._w13, self._w2 = w13, w2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        idx, w = self.gate(x)  # [N, k]
        # (a compiled forward cannot compare data pointers: it trusts the stacks, as the engine owning the model)
        stacked = self._w13 is not None and (torch.compiler.is_compiling() or self._still_stacked())
        grouped = stacked and self._grouped
        compiled_experts = self._compiled_experts if torch.compiler.is_compiling() else None
        # group the (token, expert) pairs by expert: one gather of the inputs, the experts' matmuls on
        # contiguous slices, one weighting and one scatter-add of all routed outputs. (The grouped path sorts
        # stably, the same order on any device; the loop keeps the default sort, so CPU results stay bit for bit.)
        flat = idx.flatten()
        order = flat.argsort(stable=grouped)
        token_of = order // idx.shape[1]  # [N·k] the token of each pair, in expert order
        xs = x.index_select(0, token_of)
        if grouped:
            routed = self._experts_grouped(xs, flat)
        elif compiled_experts == "gathered" and stacked and isinstance(x.shape[0], int):
            # (a static row count: a compiled decode step; a dynamic one may be a long prefill: the loop)
            routed = self._experts_gathered(xs, flat[order])
        elif compiled_experts is not None:  # sizes read on the host: one opaque op
            routed = torch.ops.dsv32.moe_experts_looped(xs, flat, id(self))  # see ``register_for_compile``
        else:
            routed = self._experts_looped(xs, flat)
        routed = routed.float()
        routed.mul_(w.flatten()[order, None])
        # routed sum first, shared expert last: the order of the additions of transformers and the reference
        y = torch.zeros(x.shape, dtype=torch.float32, device=x.device).index_add_(0, token_of, routed)
        if self.shared_experts is not None:
            y += self.shared_experts(x).float()
        return y.to(x.dtype).view(shape)

    def _experts_looped(self, xs: torch.Tensor, flat: torch.Tensor) -> torch.Tensor:
        """Each expert once on its slice of ``xs`` (the pairs in expert order); the slice sizes are read on
        the host."""
        counts = torch.bincount(flat, minlength=len(self.experts)).tolist()
        outs, start = [], 0
        for e, n in enumerate(counts):
            if n:
                outs.append(self.experts[e](xs[start : start + n]))
                start += n
        return torch.cat(outs) if len(outs) > 1 else outs[0]

    def _experts_grouped(self, xs: torch.Tensor, flat: torch.Tensor) -> torch.Tensor:
        """All experts as two grouped matmuls over ``xs`` (the pairs in expert order); the group sizes stay on
        the device (no ``.tolist()``), so the shapes never depend on the routing."""
        n_experts, inter = self._w13.shape[0], self._w13.shape[1] // 2
        counts = torch.zeros(n_experts, dtype=torch.int32, device=xs.device)
        counts.index_add_(0, flat, torch.ones_like(flat, dtype=torch.int32))
        offs = counts.cumsum(0, dtype=torch.int32)  # end row of each expert's group
        gate_up = torch._grouped_mm(xs, self._w13.transpose(1, 2), offs=offs)  # [N·k, 2I]
        act = swiglu(gate_up[:, :inter], gate_up[:, inter:])
        return torch._grouped_mm(act, self._w2.transpose(1, 2), offs=offs)  # [N·k, D]

    def _experts_gathered(self, xs: torch.Tensor, experts: torch.Tensor) -> torch.Tensor:
        """Each pair through its own expert (``experts`` [P]: the pairs' experts), with x·Wᵀ written as the
        reduction (W[e] ⊙ x).sum(-1): a compiler fuses the gather into one pass over the chosen experts'
        weight rows, no copy, no host sync, no per-expert call. For a compiled step of few tokens (each pair
        reads its expert's weights once); run eagerly it would copy every gathered weight."""
        inter = self._w13.shape[1] // 2
        gate_up = (self._w13[experts] * xs[:, None, :]).sum(-1)  # [P, 2I]
        act = swiglu(gate_up[:, :inter], gate_up[:, inter:])
        return (self._w2[experts] * act[:, None, :]).sum(-1)  # [P, D]

    def _still_stacked(self) -> bool:
        """Whether the experts still hold views of the stacks (``module.to(...)`` gives parameters new
        storage and leaves the stacks behind: then the loop is used and the stacks dropped)."""
        first, last = self.experts[0].gate_proj.weight, self.experts[-1].down_proj.weight
        ok = first.data_ptr() == self._w13.data_ptr() and last.data_ptr() == self._w2[-1].data_ptr()
        if not ok:
            self._w13 = self._w2 = None
        return ok


# ``torch.compile`` cannot trace ``MoE._experts_looped`` (its slice sizes come from the routing, read on the
# host), so a compiled step runs it as one custom op that the compiler treats as opaque. The op finds its
# MoE by its id (custom ops take tensors and plain values, not modules).
_LOOPED: weakref.WeakValueDictionary[int, MoE] = weakref.WeakValueDictionary()


def register_for_compile(model: nn.Module, gathered: bool = False) -> None:
    """Let a ``torch.compile``d forward of ``model`` run its MoEs' routed experts (call before compiling):
    as the expert loop in one opaque op, or with ``gathered`` as traced reductions over the chosen experts'
    stacked weights (``MoE._experts_gathered``; stacks them, with no grouped matmuls in eager forwards).
    Gathered suits steps of one or a few tokens: each (token, expert) pair reads its expert's weights; a
    compiled forward whose token count is dynamic always loops. Registering again never drops ``gathered``."""
    for m in model.modules():
        if isinstance(m, MoE):
            _LOOPED[id(m)] = m
            if m._compiled_experts != "gathered":  # gathered steps (static, few rows) keep it
                m._compiled_experts = "looped"
            if gathered:
                try:
                    m.stack_experts(grouped=False)
                except ValueError:  # FP8 experts: the loop
                    continue
                m._compiled_experts = "gathered"


@torch.library.custom_op("dsv32::moe_experts_looped", mutates_args=())
def _moe_experts_looped(xs: torch.Tensor, flat: torch.Tensor, moe_id: int) -> torch.Tensor:
    """MoE._experts_looped of the registered MoE ``moe_id``: [N·k, D] outputs of the pairs in expert order."""
    moe = _LOOPED.get(moe_id)
    if moe is None:
        raise RuntimeError("a compiled MoE forward needs moe.register_for_compile(model) first")
    return moe._experts_looped(xs, flat)


@_moe_experts_looped.register_fake
def _(xs: torch.Tensor, flat: torch.Tensor, moe_id: int) -> torch.Tensor:
    return xs.new_empty(xs.shape)


def grouped_matmul_available(device: torch.device | str, dtype: torch.dtype) -> bool:
    """Whether ``torch._grouped_mm`` (what ``MoE.stack_experts`` relies on) runs for this device and dtype."""
    if not hasattr(torch, "_grouped_mm"):
        return False
    try:
        a = torch.ones(4, 16, device=device, dtype=dtype)
        b = torch.ones(2, 16, 16, device=device, dtype=dtype)
        torch._grouped_mm(a, b.transpose(1, 2), offs=torch.tensor([2, 4], device=device, dtype=torch.int32))
        return True
    except (RuntimeError, NotImplementedError):
        return False
