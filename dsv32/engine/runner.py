"""Runs one scheduled step — decodes and prefill chunks of many requests — through the model.

All tokens of the step are flattened into one row [1, N] for the per-token work (projections, MoE,
norms). Attention is per request, against the paged cache: the step's new latent entries are written
to their slots, each request gathers its visible entries through its block table, and the model's own
MLA core runs on them — the naive form for prefill chunks, the absorbed form for single-token decodes,
with DSA top-k gathering once a request's context exceeds ``index_topk``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from dsv32.engine.paged_cache import PagedKVCache
from dsv32.engine.scheduler import ScheduledChunk
from dsv32.model.mla import MLA, MLAInputs
from dsv32.model.transformer import DeepseekForCausalLM


@dataclass
class _Segment:
    rows: slice  # this request's tokens in the flattened step
    q_pos: torch.Tensor  # [n] absolute positions
    slots: torch.Tensor  # [S] cache slots of every visible token (0 .. start + n - 1)


class PagedContext:
    """AttentionContext over the paged cache for one flattened step."""

    def __init__(self, cache: PagedKVCache, segments: list[_Segment], new_slots: torch.Tensor, cos, sin):
        self.cache, self.segments, self.new_slots = cache, segments, new_slots
        self.cos, self.sin = cos, sin

    def attend(self, layer_idx: int, mla: MLA, inp: MLAInputs) -> torch.Tensor:
        k_index = inp.k_index[0] if inp.k_index is not None else None
        self.cache.write(layer_idx, self.new_slots, inp.c_kv[0], inp.k_pe[0], k_index)
        outs = []
        for seg in self.segments:
            c_kv, k_pe, k_idx = self.cache.gather(layer_idx, seg.slots)
            outs.append(
                mla.attend(
                    inp.rows(seg.rows),
                    c_kv[None],
                    k_pe[None],
                    None if k_idx is None else k_idx[None],
                    seg.q_pos,
                )
            )
        return torch.cat(outs, dim=1)


class ModelRunner:
    def __init__(self, model: DeepseekForCausalLM, cache: PagedKVCache):
        self.model, self.cache = model, cache
        self.block_size = cache.block_size
        self.device = model.device

    def _slots(self, block_table: list[int], start: int, end: int) -> torch.Tensor:
        pos = torch.arange(start, end)
        table = torch.tensor(block_table, dtype=torch.long)
        return (table[pos // self.block_size] * self.block_size + pos % self.block_size).to(self.device)

    @torch.inference_mode()
    def execute(self, chunks: list[ScheduledChunk]) -> torch.Tensor:
        """Run the step; returns fp32 logits [n_sampling_chunks, vocab], one row per chunk that samples
        (in the order of ``chunks``)."""
        ids, segments, new_slots, positions, sample_rows = [], [], [], [], []
        offset = 0
        for c in chunks:
            req, end = c.request, c.start + c.num_tokens
            ids.extend(req.all_ids[c.start : end])
            positions.append(torch.arange(c.start, end, device=self.device))
            new_slots.append(self._slots(req.block_table, c.start, end))
            segments.append(
                _Segment(
                    slice(offset, offset + c.num_tokens), positions[-1], self._slots(req.block_table, 0, end)
                )
            )
            offset += c.num_tokens
            if c.samples:
                sample_rows.append(offset - 1)
        q_pos = torch.cat(positions)
        cos, sin = self.model.rotary(q_pos, self.model.dtype)
        ctx = PagedContext(self.cache, segments, torch.cat(new_slots), cos, sin)
        input_ids = torch.tensor([ids], device=self.device)
        hidden = self.model.forward_layers(self.model.model.embed_tokens(input_ids), ctx)
        rows = torch.tensor(sample_rows, device=self.device, dtype=torch.long)
        return self.model.lm_head(hidden[0, rows]).float()
