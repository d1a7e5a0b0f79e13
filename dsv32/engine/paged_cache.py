"""Paged latent + indexer cache: per layer, flat slot arrays addressed by block_id·block_size + offset.

A slot holds exactly what MLA and DSA need for one token: c_kv (kv_lora_rank, after kv_a_layernorm),
k_pe (qk_rope_head_dim, after RoPE) and, for V3.2, the indexer key (index_head_dim). Nothing is
expanded per head. All layers share the block ids (one block table per sequence).
"""

from __future__ import annotations

import torch

from dsv32.config import ModelConfig


def slots_at(table: torch.Tensor, positions: torch.Tensor, block_size: int) -> torch.Tensor:
    """The cache slots of token ``positions`` through block table(s) ``table`` [..., n_blocks] -> [..., P]:
    block ``table[..., p // block_size]``, offset ``p % block_size`` within it."""
    return table[..., positions // block_size] * block_size + positions % block_size


class PagedKVCache:
    def __init__(
        self,
        cfg: ModelConfig,
        num_blocks: int,
        block_size: int,
        n_layers: int,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ):
        self.num_blocks, self.block_size = num_blocks, block_size
        # one extra block that no sequence owns: padding rows of a fixed-shape step (``DecodeGraphs``) write
        # and read there
        self.scratch_block = num_blocks
        slots = (num_blocks + 1) * block_size

        def alloc(dim: int) -> list[torch.Tensor]:
            return [torch.zeros(slots, dim, dtype=dtype, device=device) for _ in range(n_layers)]

        self.c_kv = alloc(cfg.kv_lora_rank)
        self.k_pe = alloc(cfg.qk_rope_head_dim)
        self.k_index = alloc(cfg.index_head_dim) if cfg.has_indexer else None

    @staticmethod
    def bytes_per_token(cfg: ModelConfig, n_layers: int, dtype: torch.dtype) -> int:
        per_layer = cfg.kv_lora_rank + cfg.qk_rope_head_dim + (cfg.index_head_dim if cfg.has_indexer else 0)
        return per_layer * n_layers * torch.empty((), dtype=dtype).element_size()

    def write(
        self,
        layer: int,
        slots: torch.Tensor,  # [N] long
        c_kv: torch.Tensor,  # [N, d_c]
        k_pe: torch.Tensor,  # [N, d_r]
        k_index: torch.Tensor | None,  # [N, d_I]
    ) -> None:
        self.c_kv[layer].index_copy_(0, slots, c_kv)
        self.k_pe[layer].index_copy_(0, slots, k_pe)
        if self.k_index is not None and k_index is not None:
            self.k_index[layer].index_copy_(0, slots, k_index)

    def gather(
        self, layer: int, slots: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Entries at ``slots`` [...] -> c_kv [..., d_c], k_pe [..., d_r], k_index [..., d_I] (copies)."""
        k_index = self.gather_index_keys(layer, slots) if self.k_index is not None else None
        return self._take(self.c_kv[layer], slots), self._take(self.k_pe[layer], slots), k_index

    def gather_latent(self, layer: int, slots: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """c_kv [..., d_c] and k_pe [..., d_r] at ``slots`` [...] (what attention reads)."""
        return self._take(self.c_kv[layer], slots), self._take(self.k_pe[layer], slots)

    def gather_index_keys(self, layer: int, slots: torch.Tensor) -> torch.Tensor:
        """Indexer keys [..., d_I] at ``slots`` [...] (what the DSA indexer scores)."""
        if self.k_index is None:
            raise ValueError("this cache holds no indexer keys (the model has no DSA indexer)")
        return self._take(self.k_index[layer], slots)

    @staticmethod
    def _take(table: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
        return table.index_select(0, slots.reshape(-1)).view(*slots.shape, table.shape[-1])
