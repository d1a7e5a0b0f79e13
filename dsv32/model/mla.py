"""Multi-head Latent Attention (MLA), with the DSA indexer for V3.2.

Per token (x = attention input after input_layernorm):
    c_q  = RMSNorm(q_a_proj x)                 (q_lora_rank; also the indexer's query input)
    q    = q_b_proj c_q -> (H, d_n + d_r);  q_pe = RoPE(q[:, d_n:])
    kv   = kv_a_proj_with_mqa x -> c_kv = RMSNorm(kv[:d_c]) (d_c) ‖ k_pe = RoPE(kv[d_c:]) (d_r, shared)
    [k_nope | v]_h = kv_b_proj c_kv            (per head; computed only in the naive form)
Only c_kv and k_pe are cached. The DSA indexer picks, per query, the top ``index_topk`` keys; when
more keys are visible than that, attention reads only those (see ``sparse_attn``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Protocol

import torch
from torch import nn

from dsv32.config import ModelConfig
from dsv32.model.indexer import Indexer
from dsv32.model.kv_cache import KVCache
from dsv32.model.layers import Linear, PackedMatmul, RMSNorm, matmul_split, packed
from dsv32.model.rope import apply_rope_half, apply_rope_interleaved
from dsv32.model.sparse_attn import (
    absorb_query,
    attention_absorbed,
    attention_absorbed_selected,
    attention_naive,
    naive_keys_values,
)

AttnForm = Literal["auto", "naive", "absorbed"]


@dataclass
class MLAInputs:
    """Projections of T tokens: queries, the new latent entries (what a cache stores) and the indexer
    inputs. Shapes [B, T, ...]; ``rows`` takes a slice of the tokens."""

    x: torch.Tensor  # [B, T, D] attention input (the indexer reads it)
    c_q: torch.Tensor | None  # [B, T, q_lora_rank]
    q_nope: torch.Tensor  # [B, T, H, d_n]
    q_pe: torch.Tensor  # [B, T, H, d_r]
    c_kv: torch.Tensor  # [B, T, d_c]
    k_pe: torch.Tensor  # [B, T, d_r]
    k_index: torch.Tensor | None  # [B, T, d_I]
    cos: torch.Tensor  # [T, d_r/2]
    sin: torch.Tensor

    def rows(self, sl: slice) -> MLAInputs:
        def cut(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t[:, sl]

        return MLAInputs(
            self.x[:, sl], cut(self.c_q), self.q_nope[:, sl], self.q_pe[:, sl], self.c_kv[:, sl],
            self.k_pe[:, sl], cut(self.k_index), self.cos[sl], self.sin[sl],
        )  # fmt: skip


QUERY_CHUNK_ELEMENTS = 1 << 25  # queries x keys x heads per attention / indexer chunk
# At most this many queries per chunk on a CPU: causal chunks then skip the keys they cannot see (naive), and
# the absorbed form's per-query gathers (rows x selected keys x (d_c + d_r)) stay small enough to be cheap to
# allocate.
QUERY_CHUNK_ROWS = {"naive": 256, "absorbed": 64}
# ... and fewer where the absorbed form's gathers would pass this many bytes: they are written and read back
# at once, so a chunk whose gathers fit in part of the last-level cache (32 MiB on the machines we measure)
# never takes them through DRAM. bench-small, an 8K-token prompt (3 of its 4 chunks absorbed): TTFT 17.7-18.3 s
# with 32-row chunks (18.9 MiB gathered each) against 22.7-22.9 s with 64 (37.7 MiB), alternating in one run.
ABSORBED_GATHER_BYTES = 1 << 24
# Relative cost of one multiply-add of absorbed (gathered, per-query) attention vs the naive form's fused
# attention kernel. Measured on CPU (bench-small shapes, 2 threads, 2K-8K keys): 2-2.6x.
ABSORBED_MAC_COST = 2.5


class MLA(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads = cfg.num_attention_heads
        self.d_nope, self.d_rope, self.d_v = cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim
        self.d_latent = cfg.kv_lora_rank
        self.q_lora_rank = cfg.q_lora_rank
        self.scale = cfg.softmax_scale
        self.rope = apply_rope_interleaved if cfg.rope_interleave else apply_rope_half
        d_qk = cfg.qk_head_dim
        if cfg.q_lora_rank is None:
            self.q_proj = Linear(cfg.hidden_size, self.n_heads * d_qk)
        else:
            self.q_a_proj = Linear(cfg.hidden_size, cfg.q_lora_rank)
            self.q_a_layernorm = RMSNorm(cfg.q_lora_rank, cfg.rms_norm_eps)
            self.q_b_proj = Linear(cfg.q_lora_rank, self.n_heads * d_qk)
        self.kv_a_proj_with_mqa = Linear(cfg.hidden_size, cfg.kv_lora_rank + cfg.qk_rope_head_dim)
        self.kv_a_layernorm = RMSNorm(cfg.kv_lora_rank, cfg.rms_norm_eps)
        self.kv_b_proj = Linear(cfg.kv_lora_rank, self.n_heads * (cfg.qk_nope_head_dim + cfg.v_head_dim))
        self.o_proj = Linear(self.n_heads * cfg.v_head_dim, cfg.hidden_size)
        self.indexer = Indexer(cfg) if cfg.has_indexer else None
        self._in_proj: PackedMatmul | None = None  # the projections of x in one matmul; see ``prepack``

    def _input_linears(self) -> list[Linear]:
        """The Linears applied to the attention input x: q (or q_a), kv_a and, for DSA, the indexer key."""
        q = self.q_proj if self.q_lora_rank is None else self.q_a_proj
        return [q, self.kv_a_proj_with_mqa] + ([self.indexer.wk] if self.indexer is not None else [])

    def prepack(self, cache: dict | None = None) -> list[Linear]:
        """Pack the projections of x as one CPU matmul; returns the Linears covered (see ``PackedMatmul``)."""
        linears = self._input_linears()
        self._in_proj = packed(linears, cache)
        return linears if self._in_proj is not None else []

    def project(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> MLAInputs:
        """Per-token projections of x [B, T, D]; cos/sin [T, d_r/2] at each token's position."""
        B, T, _ = x.shape
        q, kv, *k_index = matmul_split(self._in_proj, self._input_linears(), x)
        if self.q_lora_rank is None:
            c_q = None
        else:
            c_q = self.q_a_layernorm(q)
            q = self.q_b_proj(c_q)
        q_nope, q_pe = q.view(B, T, self.n_heads, -1).split([self.d_nope, self.d_rope], dim=-1)
        q_pe = self.rope(q_pe, cos[:, None], sin[:, None])
        c_kv, k_pe = kv.split([self.d_latent, self.d_rope], dim=-1)
        c_kv = self.kv_a_layernorm(c_kv)
        k_pe = self.rope(k_pe, cos, sin)
        k_index = self.indexer.key_from_projection(k_index[0], cos, sin) if self.indexer is not None else None
        return MLAInputs(x, c_q, q_nope, q_pe, c_kv, k_pe, k_index, cos, sin)

    def attend(
        self,
        inp: MLAInputs,  # the T query tokens of ONE sequence (batch B shares positions)
        c_kv: torch.Tensor,  # [B, S, d_c] every visible latent entry (cache + these tokens)
        k_pe: torch.Tensor,  # [B, S, d_r]
        k_index: torch.Tensor | None,  # [B, S, d_I]
        q_pos: torch.Tensor,  # [T] absolute positions of the queries
        form: AttnForm = "auto",
        first_pos: int | None = None,  # q_pos[0] when q_pos is consecutive: no read-back from a GPU
    ) -> torch.Tensor:
        """The attention core over the latent entries -> per-head outputs [B, T, H, d_v]."""
        T, H, S = q_pos.shape[0], self.n_heads, c_kv.shape[1]
        if form == "auto":
            form = self.cheaper_form(T, S)
        if form not in ("naive", "absorbed"):
            raise ValueError(f"unknown attention form {form!r}")
        if form == "naive":  # per-head keys and values: kv_b_proj on every key, once for all query chunks
            kv = self.kv_b_proj(c_kv).view(c_kv.shape[0], S, H, self.d_nope + self.d_v)
            k_heads, v_heads = naive_keys_values(*kv.split([self.d_nope, self.d_v], dim=-1), k_pe)
        else:
            w_kv_b = self._w_kv_b(c_kv.dtype)
        # Queries go in chunks so score matrices stay bounded (~QUERY_CHUNK_ELEMENTS) for long prompts.
        # A chunk reads only the keys up to its last query's position (causal): later chunks see more.
        index_heads = self.indexer.n_heads if self.indexer is not None else 0
        rows = max(1, QUERY_CHUNK_ELEMENTS // (S * max(H, index_heads)))
        if c_kv.device.type == "cpu":  # on a GPU more, smaller chunks cost launches and gain little
            rows = min(rows, QUERY_CHUNK_ROWS[form])
            if form == "absorbed" and self.indexer is not None and S > self.indexer.topk:  # (gathers)
                entry = (self.d_latent + self.d_rope) * c_kv.element_size()
                rows = min(rows, max(8, ABSORBED_GATHER_BYTES // (self.indexer.topk * entry)))
        outs = []
        for t0 in range(0, T, rows):
            t = slice(t0, min(T, t0 + rows))
            last = first_pos + t.stop - 1 if first_pos is not None else int(q_pos[t].max())
            s_vis = min(S, last + 1)
            topk_idx = topk_valid = None
            # DSA selects keys only when more are visible than index_topk (otherwise attention is dense).
            if self.indexer is not None and s_vis > self.indexer.topk:
                topk_idx, topk_valid = self.indexer(
                    inp.x[:, t], inp.c_q[:, t], inp.cos[t], inp.sin[t], k_index[:, :s_vis], q_pos[t]
                )
            if form == "naive":
                o = attention_naive(
                    inp.q_nope[:, t],
                    inp.q_pe[:, t],
                    k_heads[:, :s_vis],
                    v_heads[:, :s_vis],
                    q_pos[t],
                    self.scale,
                    topk_idx,
                    self.d_v,
                )
            else:
                o = attention_absorbed(
                    inp.q_nope[:, t],
                    inp.q_pe[:, t],
                    c_kv[:, :s_vis],
                    k_pe[:, :s_vis],
                    w_kv_b,
                    q_pos[t],
                    self.scale,
                    topk_idx,
                    topk_valid,
                )
            outs.append(o)
        return outs[0] if len(outs) == 1 else torch.cat(outs, dim=1)

    def attend_gathered(
        self,
        inp: MLAInputs,  # T queries [1, T, ...], each of its own sequence
        c_kv: torch.Tensor,  # [T, k, d_c] the entries each query attends to (its DSA selection, or all)
        k_pe: torch.Tensor,  # [T, k, d_r]
        valid: torch.Tensor,  # [T, k] False: padding
    ) -> torch.Tensor:
        """Absorbed attention of single-query rows of different sequences (a batch of decodes), each over
        its own gathered latent entries -> [1, T, H, d_v]. The caller selects (``Indexer.select_per_query``)
        and gathers, so only the selected entries are ever read."""
        q_lat, w_uv = absorb_query(inp.q_nope, self._w_kv_b(c_kv.dtype))
        return attention_absorbed_selected(
            q_lat, inp.q_pe, c_kv[None], k_pe[None], w_uv, self.scale, valid[None]
        )

    def _w_kv_b(self, dtype: torch.dtype) -> torch.Tensor:
        """kv_b_proj's weight as [H, d_n + d_v, d_c] (what the absorbed form folds into q and the output)."""
        return self.kv_b_proj.dense_weight(dtype).view(self.n_heads, self.d_nope + self.d_v, self.d_latent)

    def cheaper_form(self, T: int, S: int) -> AttnForm:
        """The form with fewer multiply-adds for the last T positions of S keys as queries (both forms give
        the same result).

        Naive expands every key through kv_b_proj (S·H·d_c·(d_n+d_v)) and then attends densely over the
        keys each query can see (S − (T−1)/2 on average; a top-k selection is only a mask); absorbed pays per
        query (W_UK into q, W_UV on the output) and attends over min(S, topk) gathered 2·d_c+d_r-wide
        entries. Prefill (T ≈ S) favours naive; decode and short chunks against a long cache, absorbed.
        The absorbed attention's multiply-adds are weighted by ``ABSORBED_MAC_COST``: its per-query gathers
        and small matmuls cost more per multiply-add than the fused attention kernel of the naive form."""
        H, dc, dn, dv, dr = self.n_heads, self.d_latent, self.d_nope, self.d_v, self.d_rope
        s_sel = min(S, self.indexer.topk) if self.indexer is not None else S
        naive = S * H * dc * (dn + dv) + T * (S - (T - 1) / 2) * H * (dn + dr + dv)
        absorbed = T * H * dc * (dn + dv) + ABSORBED_MAC_COST * T * s_sel * H * (2 * dc + dr)
        return "absorbed" if absorbed < naive else "naive"

    def forward(self, x: torch.Tensor, ctx: AttentionContext, layer_idx: int) -> torch.Tensor:
        """x [B, T, D] -> [B, T, D]. ``ctx`` stores the new latent entries and runs ``attend``."""
        inp = self.project(x, ctx.cos, ctx.sin)
        o = ctx.attend(layer_idx, self, inp)
        return self.o_proj(o.flatten(-2))


class AttentionContext(Protocol):
    """Where a forward's tokens sit and where their latent entries go: the model's contiguous cache
    (``ContiguousContext``) or the engine's paged cache. q_pos [T] the position and cos/sin [T, d_r/2] of
    every token."""

    q_pos: torch.Tensor
    cos: torch.Tensor
    sin: torch.Tensor

    def attend(self, layer_idx: int, mla: MLA, inp: MLAInputs) -> torch.Tensor: ...


class ContiguousContext:
    """All B sequences at the same positions [start_pos, start_pos + T), optionally with a KVCache."""

    def __init__(
        self,
        q_pos: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        cache: KVCache | None = None,
        start_pos: int = 0,
        form: AttnForm = "auto",
    ):
        self.q_pos, self.cos, self.sin = q_pos, cos, sin
        self.cache, self.start_pos, self.form = cache, start_pos, form

    def attend(self, layer_idx: int, mla: MLA, inp: MLAInputs) -> torch.Tensor:
        c_kv, k_pe, k_index = inp.c_kv, inp.k_pe, inp.k_index
        if self.cache is not None:
            c_kv, k_pe, k_index = self.cache[layer_idx].write(self.start_pos, c_kv, k_pe, k_index)
        return mla.attend(inp, c_kv, k_pe, k_index, self.q_pos, self.form, first_pos=self.start_pos)
