"""A contiguous per-sequence latent cache for the model's own incremental decoding.

Per layer and token it holds only what MLA and DSA need — nothing expanded per head:
c_kv (kv_lora_rank, after kv_a_layernorm), k_pe (qk_rope_head_dim, after RoPE, interleaved layout)
and, for V3.2, the indexer key (index_head_dim, after LayerNorm and RoPE).
The serving engine uses its own paged cache; this one backs ``model(ids, start_pos, cache)``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from dsv32.config import ModelConfig


@dataclass
class LayerCache:
    c_kv: torch.Tensor  # [B, max_len, kv_lora_rank]
    k_pe: torch.Tensor  # [B, max_len, qk_rope_head_dim]
    k_index: torch.Tensor | None  # [B, max_len, index_head_dim] (V3.2 only)

    def write(
        self, start: int, c_kv: torch.Tensor, k_pe: torch.Tensor, k_index: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Store T new tokens at [start, start+T); return views of everything cached so far."""
        end = start + c_kv.shape[1]
        if end > self.c_kv.shape[1]:
            raise ValueError(f"cache holds {self.c_kv.shape[1]} tokens, asked to write up to {end}")
        self.c_kv[:, start:end] = c_kv
        self.k_pe[:, start:end] = k_pe
        if self.k_index is not None and k_index is not None:
            self.k_index[:, start:end] = k_index
            return self.c_kv[:, :end], self.k_pe[:, :end], self.k_index[:, :end]
        return self.c_kv[:, :end], self.k_pe[:, :end], None


class KVCache:
    """One LayerCache per decoder layer (main layers first, then MTP layers)."""

    def __init__(
        self,
        cfg: ModelConfig,
        batch: int,
        max_len: int,
        n_layers: int,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ):
        self.max_len = max_len
        self.layers = [
            LayerCache(
                c_kv=torch.zeros(batch, max_len, cfg.kv_lora_rank, dtype=dtype, device=device),
                k_pe=torch.zeros(batch, max_len, cfg.qk_rope_head_dim, dtype=dtype, device=device),
                k_index=torch.zeros(batch, max_len, cfg.index_head_dim, dtype=dtype, device=device)
                if cfg.has_indexer
                else None,
            )
            for _ in range(n_layers)
        ]

    def __getitem__(self, i: int) -> LayerCache:
        return self.layers[i]
