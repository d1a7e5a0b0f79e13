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

import torch
import torch.nn.functional as F
from torch import nn

from dsv32.config import ModelConfig
from dsv32.model.layers import MLP


class Gate(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_experts = cfg.n_routed_experts
        self.top_k = cfg.num_experts_per_tok
        self.n_group, self.topk_group = cfg.n_group, cfg.topk_group
        self.norm_topk_prob = cfg.norm_topk_prob
        self.scaling = cfg.routed_scaling_factor
        self.weight = nn.Parameter(torch.empty(cfg.n_routed_experts, cfg.hidden_size, dtype=torch.float32))
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

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        idx, w = self.gate(x)  # [N, k]
        # group the (token, expert) pairs by expert: one gather of the inputs, each expert runs once on a
        # contiguous slice, one weighting and one scatter-add of all routed outputs
        flat = idx.flatten()
        order = flat.argsort()
        counts = torch.bincount(flat, minlength=len(self.experts)).tolist()
        token_of = order // idx.shape[1]  # [N·k] the token of each pair, in expert order
        xs = x.index_select(0, token_of)
        outs, start = [], 0
        for e, n in enumerate(counts):
            if n:
                outs.append(self.experts[e](xs[start : start + n]))
                start += n
        routed = (torch.cat(outs) if len(outs) > 1 else outs[0]).float()
        routed.mul_(w.flatten()[order, None])
        # routed sum first, shared expert last: the order of the additions of transformers and the reference
        y = torch.zeros(x.shape, dtype=torch.float32, device=x.device).index_add_(0, token_of, routed)
        if self.shared_experts is not None:
            y += self.shared_experts(x).float()
        return y.to(x.dtype).view(shape)
