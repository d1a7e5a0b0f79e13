"""The attention core of MLA in its two forms, dense or restricted to the indexer's top-k.

Shapes: B batch, T queries, S keys, H heads, d_n nope dim, d_r rope dim, d_v value dim,
d_c latent dim (kv_lora_rank), k selected keys per query.

* ``attention_naive``: expand per-head keys/values from the latent (kv_b_proj on every key), then
  ordinary multi-head attention with a boolean mask (causal ∧ selected). Cheapest for prefill.
* ``attention_absorbed``: fold W_UK into the query and W_UV into the output so attention runs on the
  576-dim latent entries directly (MQA with one shared key/value head). With a top-k selection it
  **gathers** the k selected latent entries per query, so its cost grows with k, not with S.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def causal_visible(q_pos: torch.Tensor, n_keys: int) -> torch.Tensor:
    """[T, S] bool: key s is visible to query t iff s <= q_pos[t]."""
    return torch.arange(n_keys, device=q_pos.device)[None, :] <= q_pos[:, None]


def naive_keys_values(
    k_nope: torch.Tensor,  # [B, S, H, d_n]  (kv_b_proj of the latent entries)
    v: torch.Tensor,  # [B, S, H, d_v]
    k_pe: torch.Tensor,  # [B, S, d_r]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-head keys [B, S, H, d_n + d_r] (the shared rope key appended to every head) and the values
    ``attention_naive`` takes. Built once per layer: query chunks use leading slices of them."""
    B, S, H, _ = k_nope.shape
    k = torch.cat((k_nope, k_pe[:, :, None].expand(B, S, H, -1)), dim=-1)
    d_v, d_qk = v.shape[-1], k.shape[-1]
    if k.device.type == "cpu" and d_v < d_qk:
        # PyTorch's CPU flash kernel wants one head dim for q, k and v; otherwise SDPA falls back to its
        # unfused math path (2-3x slower). Zero columns in v give zero output columns: exact.
        v = F.pad(v, (0, d_qk - d_v))
    return k, v


def attention_naive(
    q_nope: torch.Tensor,  # [B, T, H, d_n]
    q_pe: torch.Tensor,  # [B, T, H, d_r]
    k: torch.Tensor,  # [B, S, H, d_n + d_r]  per-head keys (``naive_keys_values``)
    v: torch.Tensor,  # [B, S, H, d_v']  values (``naive_keys_values``: maybe zero-padded past d_v)
    q_pos: torch.Tensor,  # [T]
    scale: float,
    topk_idx: torch.Tensor | None = None,  # [B, T, k] keys selected by the indexer
    d_v: int | None = None,  # the true value dim (default: v's)
) -> torch.Tensor:
    """-> per-head outputs [B, T, H, d_v]."""
    B, T, H, _ = q_nope.shape
    S = k.shape[1]
    q = torch.cat((q_nope, q_pe), dim=-1).transpose(1, 2)  # [B, H, T, d_qk]
    mask = causal_visible(q_pos, S)[None].expand(B, T, S)
    if topk_idx is not None:
        selected = torch.zeros(B, T, S, dtype=torch.bool, device=k.device)
        selected.scatter_(-1, topk_idx, True)
        mask = mask & selected
    out = F.scaled_dot_product_attention(
        q, k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask[:, None], scale=scale
    )
    return out[..., : d_v or v.shape[-1]].transpose(1, 2)  # [B, T, H, d_v]


def attention_absorbed(
    q_nope: torch.Tensor,  # [B, T, H, d_n]
    q_pe: torch.Tensor,  # [B, T, H, d_r]
    c_kv: torch.Tensor,  # [B, S, d_c]
    k_pe: torch.Tensor,  # [B, S, d_r]
    w_kv_b: torch.Tensor,  # [H, d_n + d_v, d_c]
    q_pos: torch.Tensor,  # [T]
    scale: float,
    topk_idx: torch.Tensor | None = None,  # [B, T, k]
    topk_valid: torch.Tensor | None = None,  # [B, T, k]
) -> torch.Tensor:
    """-> per-head outputs [B, T, H, d_v], attending in latent space."""
    q_lat, w_uv = absorb_query(q_nope, w_kv_b)
    if topk_idx is None:
        # dense: every causal key
        scores = torch.einsum("bthc,bsc->bths", q_lat, c_kv) + torch.einsum("bthr,bsr->bths", q_pe, k_pe)
        visible = causal_visible(q_pos, c_kv.shape[1])[None, :, None, :]  # [1, T, 1, S]
        values = c_kv  # [B, S, d_c]
        scores = (scores * scale).masked_fill(~visible, float("-inf"))
        p = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q_lat.dtype)
        o_lat = torch.einsum("bths,bsc->bthc", p, values)
    else:
        # sparse: gather only the k selected latent entries of each query
        c_sel, pe_sel = gather_rows(c_kv, topk_idx), gather_rows(k_pe, topk_idx)
        return attention_absorbed_selected(q_lat, q_pe, c_sel, pe_sel, w_uv, scale, topk_valid)
    return torch.einsum("bthc,hvc->bthv", o_lat, w_uv)


def absorb_query(q_nope: torch.Tensor, w_kv_b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Fold W_UK into the query: q_nope [B, T, H, d_n] -> absorbed query [B, T, H, d_c], and W_UV
    [H, d_v, d_c] (what maps the latent output back to per-head values)."""
    d_n = q_nope.shape[-1]
    w_uk, w_uv = w_kv_b[:, :d_n], w_kv_b[:, d_n:]  # [H, d_n, d_c], [H, d_v, d_c]
    return torch.einsum("bthn,hnc->bthc", q_nope, w_uk), w_uv


def gather_rows(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """x [B, S, C], idx [B, T, k] -> x[b, idx[b, t, j]] as [B, T, k, C]: whole rows via index_select
    (``torch.gather`` would read one int64 index per element)."""
    B, S, C = x.shape
    if B > 1:
        idx = idx + torch.arange(B, device=idx.device).view(B, 1, 1) * S
    return x.reshape(B * S, C).index_select(0, idx.reshape(-1)).view(*idx.shape, C)


def attention_absorbed_selected(
    q_lat: torch.Tensor,  # [B, T, H, d_c] absorbed queries (q_nope · W_UK)
    q_pe: torch.Tensor,  # [B, T, H, d_r]
    c_sel: torch.Tensor,  # [B, T, k, d_c] the latent entries each query attends to
    pe_sel: torch.Tensor,  # [B, T, k, d_r]
    w_uv: torch.Tensor,  # [H, d_v, d_c]
    scale: float,
    valid: torch.Tensor | None = None,  # [B, T, k] False: padding, never attended
) -> torch.Tensor:
    """Absorbed attention of each query over its own k gathered entries -> [B, T, H, d_v]."""
    B, T, H, d_c = q_lat.shape
    k = c_sel.shape[2]
    # one batched matmul per (sequence, query): [H, d_c] x [d_c, k]
    c_sel_bt = c_sel.reshape(B * T, k, d_c)
    scores = torch.bmm(q_lat.reshape(B * T, H, d_c), c_sel_bt.transpose(1, 2))
    scores = scores.baddbmm_(q_pe.reshape(B * T, H, -1), pe_sel.reshape(B * T, k, -1).transpose(1, 2))
    scores = scores.mul_(scale)
    if valid is not None:
        scores = scores.masked_fill_(~valid.reshape(B * T, 1, k), float("-inf"))
    p = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q_lat.dtype)  # as the reference: fp32 inside
    o_lat = torch.bmm(p, c_sel_bt).view(B, T, H, d_c)
    return torch.einsum("bthc,hvc->bthv", o_lat, w_uv)
