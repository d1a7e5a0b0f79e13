"""DSA lightning indexer: scores every visible key cheaply and picks the top-k for MLA to attend to.

Per token t (x_t = attention input after input_layernorm, c_q(t) = the MLA q latent):
    qI  = wq_b(c_q) -> (H_I, d_I);  rope (non-interleaved) on qI[:, :d_r]   # rope slice FIRST
    kI  = LayerNorm(wk(x_t)) -> (d_I); rope on kI[:d_r]                      # one key shared by all heads
    w   = weights_proj(x_t) · H_I^-0.5                                       # fp32
    I(t, s) = Σ_j w_j · d_I^-0.5 · ReLU(qI_j · kI_s)
    K_t = top-k_s I(t, s) over the causal keys s <= t
The selection is shared by all MLA heads of the layer.

DeepSeek's reference also applies a Hadamard rotation and FP8-quantises qI/kI: both are precision
tricks (the rotation preserves dot products), off here so fp32 results are exact, as in transformers.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from dsv32.config import ModelConfig
from dsv32.model.layers import LayerNorm, Linear
from dsv32.model.rope import apply_rope_half


class Indexer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads = cfg.index_n_heads
        self.head_dim = cfg.index_head_dim
        self.rope_dim = cfg.qk_rope_head_dim
        self.topk = cfg.index_topk
        self.wq_b = Linear(cfg.q_lora_rank, self.n_heads * self.head_dim)
        self.wk = Linear(cfg.hidden_size, self.head_dim)
        self.k_norm = LayerNorm(self.head_dim, eps=1e-6)
        self.weights_proj = Linear(cfg.hidden_size, self.n_heads, fp32=True)  # computed in fp32

    def _rope(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        rot, rest = x.split([self.rope_dim, self.head_dim - self.rope_dim], dim=-1)
        return torch.cat((apply_rope_half(rot, cos, sin), rest), dim=-1)

    def key(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """x [B, T, D] -> index keys kI [B, T, d_I] (what the indexer cache stores)."""
        return self.key_from_projection(self.wk(x), cos, sin)

    def key_from_projection(self, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """wk(x) [B, T, d_I] -> index keys kI (LayerNorm, then rope on the first d_r dims)."""
        return self._rope(self.k_norm(k), cos, sin)

    def query(
        self, x: torch.Tensor, c_q: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """cos/sin [T, d_r/2] -> index queries qI [B, T, H_I, d_I] and fp32 head weights w [B, T, H_I] (scales folded in)."""
        B, T, _ = x.shape
        q = self.wq_b(c_q).view(B, T, self.n_heads, self.head_dim)
        q = self._rope(q, cos[:, None], sin[:, None])
        w = F.linear(x.float(), self.weights_proj.dense_weight(torch.float32))
        w = w * (self.n_heads**-0.5 * self.head_dim**-0.5)
        return q, w

    def forward(
        self,
        x: torch.Tensor,  # [B, T, D]
        c_q: torch.Tensor,  # [B, T, q_lora_rank]
        cos: torch.Tensor,  # [T, d_r/2]
        sin: torch.Tensor,
        k_index: torch.Tensor,  # [B, S, d_I] keys of every visible position (cache + this step)
        q_pos: torch.Tensor,  # [T]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Top-k selection: idx [B, T, k'] and valid [B, T, k'] (see ``select_topk``)."""
        q, w = self.query(x, c_q, cos, sin)
        return select_topk(index_scores(q, w, k_index), q_pos, self.topk)

    def select_per_query(
        self,
        x: torch.Tensor,  # [1, T, D] T queries, each of its own sequence
        c_q: torch.Tensor,  # [1, T, q_lora_rank]
        cos: torch.Tensor,  # [T, d_r/2]
        sin: torch.Tensor,
        k_index: torch.Tensor,  # [T, S, d_I] each query's visible keys (padded to S)
        visible: torch.Tensor,  # [T, S] False: padding
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Top-k for queries of different sequences (a batch of decodes) -> idx [T, k'], valid [T, k']."""
        q, w = self.query(x, c_q, cos, sin)  # [1, T, H_I, d_I], [1, T, H_I]
        scores = index_scores(q[0, :, None], w[0, :, None], k_index)[:, 0]  # each query its own batch: [T, S]
        return select_topk_visible(scores, visible, self.topk)


def index_scores(q: torch.Tensor, w: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """I(t, s) = Σ_j w[t, j] · ReLU(q[t, j] · k[s]) in fp32.

    q [B, T, H_I, d_I], w [B, T, H_I], k [B, S, d_I] -> [B, T, S]. Cost O(T · S · H_I · d_I).
    """
    qk = torch.einsum("bthd,bsd->bths", q.float(), k.float()).relu_()  # [B, T, H_I, S]
    return torch.einsum("bth,bths->bts", w, qk)


def select_topk(scores: torch.Tensor, q_pos: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Causal top-k over keys at positions 0..S-1.

    scores [B, T, S]; q_pos [T] absolute position of each query (key s is visible iff s <= q_pos[t]).
    Returns idx [B, T, k'] (k' = min(k, S)) and valid [B, T, k'] (False where a row has fewer than k'
    visible keys and top-k had to fill with masked slots). Invisible keys are set to -inf before top-k,
    so a query never trades one of its own visible keys for a future one.
    """
    S = scores.shape[-1]
    visible = torch.arange(S, device=scores.device)[None, :] <= q_pos[:, None]  # [T, S]
    return select_topk_visible(scores, visible, k)


def select_topk_visible(
    scores: torch.Tensor, visible: torch.Tensor, k: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k among the visible keys: scores [..., S], visible broadcastable to it -> idx [..., k'] and
    valid [..., k'] (k' = min(k, S); False where fewer than k' keys are visible).

    Keys tied with the k-th largest score are taken earliest position first. The ReLU makes exact ties
    common (a key every index head scores negative scores exactly 0), and ``torch.topk`` alone picks among
    tied keys by the row's length and layout: a prefill chunk (keys trimmed to what it can see), a padded
    decode row and the full forward would each select different keys, and attend differently.
    """
    if scores.device.type != "cpu" or torch.compiler.is_compiling():  # (the tie fix-up syncs with the host)
        return select_topk_visible_sorted(scores, visible, k)
    scores = scores.masked_fill(~visible, float("-inf"))  # our own copy: changed in place below
    k = min(k, scores.shape[-1])
    vals, idx = scores.topk(k, dim=-1, sorted=False)  # a set: order is irrelevant
    cut = vals.amin(dim=-1, keepdim=True)  # the k-th largest score of each row
    # rows that left out a key scoring exactly the cut (rows short of visible keys fill with -inf: not those);
    # found with one pass over the keys not taken (counting the ties would cost 5x more on a long prefill)
    scores.scatter_(-1, idx, float("-inf"))
    redo = (scores == cut).any(-1) & (cut[..., 0] > float("-inf"))
    if bool(redo.any()):
        scores.scatter_(-1, idx, vals)  # restored
        rows = redo.nonzero(as_tuple=True)
        s, c = scores[rows], cut[rows]  # [n, S], [n, 1]
        above, tied = s > c, s == c
        keep = above | (tied & (tied.cumsum(-1) <= k - above.sum(-1, keepdim=True)))  # exactly k per row
        idx = idx.clone()
        idx[rows] = keep.nonzero()[:, 1].view(-1, k)
    return idx, vals > float("-inf")


def select_topk_visible_sorted(
    scores: torch.Tensor, visible: torch.Tensor, k: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """``select_topk_visible`` by one stable descending sort: tied keys keep their order, so the earliest
    are taken. No host sync (the top-k-then-fix-ties form asks the host whether any row has a tie), so a
    CUDA graph can capture it; on a GPU the sort is cheap. Same selected sets, in another order."""
    scores = scores.masked_fill(~visible, float("-inf"))
    k = min(k, scores.shape[-1])
    vals, idx = scores.sort(dim=-1, descending=True, stable=True)
    return idx[..., :k], vals[..., :k] > float("-inf")
