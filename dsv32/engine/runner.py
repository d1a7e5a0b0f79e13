"""Runs one scheduled step — decodes and prefill chunks of many requests — through the model.

All tokens of the step are flattened into one row [1, N] for the per-token work (projections, MoE,
norms); the single-token chunks (decodes) come first, then the prefill chunks. Attention runs against
the paged cache after the step's new latent entries are written to their slots:
* all single-token chunks together, in the absorbed form: each row's visible slots (padded to the
  longest), the DSA indexer's top-k per row once a context exceeds ``index_topk``, and only the selected
  latent entries gathered;
* each prefill chunk on its own through the model's MLA core (``MLA.attend``: the cheaper form, DSA
  selection inside) over the entries it can see, gathered through its block table.
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
    """A prefill chunk of one request."""

    rows: slice  # this request's tokens in the flattened step
    q_pos: torch.Tensor  # [n] absolute positions
    slots: torch.Tensor  # [S] cache slots of every visible token (0 .. start + n - 1)


@dataclass
class _Decodes:
    """The step's single-token chunks, rows 0 .. R-1 of the flattened step."""

    slots: torch.Tensor  # [R, S] each row's visible slots, padded to the longest context S
    visible: torch.Tensor  # [R, S] False on padding


class PagedContext:
    """AttentionContext over the paged cache for one flattened step."""

    def __init__(
        self,
        cache: PagedKVCache,
        decodes: _Decodes | None,
        segments: list[_Segment],
        new_slots: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
    ):
        self.cache, self.decodes, self.segments, self.new_slots = cache, decodes, segments, new_slots
        self.cos, self.sin = cos, sin

    def attend(self, layer_idx: int, mla: MLA, inp: MLAInputs) -> torch.Tensor:
        k_index = inp.k_index[0] if inp.k_index is not None else None
        self.cache.write(layer_idx, self.new_slots, inp.c_kv[0], inp.k_pe[0], k_index)
        outs = []
        if self.decodes is not None:
            outs.append(self._attend_decodes(layer_idx, mla, inp.rows(slice(0, self.decodes.slots.shape[0]))))
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
        return outs[0] if len(outs) == 1 else torch.cat(outs, dim=1)

    def _attend_decodes(self, layer_idx: int, mla: MLA, inp: MLAInputs) -> torch.Tensor:
        slots, visible = self.decodes.slots, self.decodes.visible
        if mla.indexer is not None and slots.shape[1] > mla.indexer.topk:
            keys = self.cache.gather_index_keys(layer_idx, slots)  # [R, S, d_I]
            idx, visible = mla.indexer.select_per_query(inp.x, inp.c_q, inp.cos, inp.sin, keys, visible)
            slots = slots.gather(1, idx)  # [R, topk]: only these latent entries are read
        c_kv, k_pe = self.cache.gather_latent(layer_idx, slots)
        return mla.attend_gathered(inp, c_kv, k_pe, visible)


class ModelRunner:
    def __init__(self, model: DeepseekForCausalLM, cache: PagedKVCache):
        self.model, self.cache = model, cache
        self.block_size = cache.block_size
        self.device = model.device

    def _slots(self, block_table: list[int], start: int, end: int) -> torch.Tensor:
        pos = torch.arange(start, end)
        table = torch.tensor(block_table[: -(-end // self.block_size)], dtype=torch.long)
        return (table[pos // self.block_size] * self.block_size + pos % self.block_size).to(self.device)

    def _decodes(self, chunks: list[ScheduledChunk]) -> tuple[_Decodes, torch.Tensor]:
        """Padded slot matrix of the single-token chunks, and the slots their new entries go to."""
        bs = self.block_size
        lens = [c.start + 1 for c in chunks]
        n_blocks = -(-max(lens) // bs)
        tables = [c.request.block_table[:n_blocks] for c in chunks]
        table = torch.tensor([t + [0] * (n_blocks - len(t)) for t in tables], dtype=torch.long)
        pos = torch.arange(n_blocks * bs)
        slots = (table[:, pos // bs] * bs + pos % bs)[:, : max(lens)]  # [R, S]
        lens_t = torch.tensor(lens)
        visible = pos[None, : max(lens)] < lens_t[:, None]
        new = slots[torch.arange(len(chunks)), lens_t - 1]
        return _Decodes(slots.to(self.device), visible.to(self.device)), new.to(self.device)

    @torch.inference_mode()
    def execute(self, chunks: list[ScheduledChunk]) -> torch.Tensor:
        """Run the step; returns fp32 logits [n_sampling_chunks, vocab], one row per chunk that samples
        (in the order of ``chunks``)."""
        singles = [c for c in chunks if c.num_tokens == 1]
        multi = [c for c in chunks if c.num_tokens > 1]
        ids, positions, new_slots, segments = [], [], [], []
        row_of: dict[int, int] = {}  # id(chunk) -> its last row in the flattened step
        decodes = None
        if singles:
            decodes, new = self._decodes(singles)
            new_slots.append(new)
            for i, c in enumerate(singles):
                ids.append(c.request.token_at(c.start))
                row_of[id(c)] = i
            positions.append(torch.tensor([c.start for c in singles], device=self.device))
        offset = len(singles)
        for c in multi:
            req, end = c.request, c.start + c.num_tokens
            ids.extend(req.token_ids(c.start, end))
            positions.append(torch.arange(c.start, end, device=self.device))
            new_slots.append(self._slots(req.block_table, c.start, end))
            segments.append(
                _Segment(
                    slice(offset, end - c.start + offset), positions[-1], self._slots(req.block_table, 0, end)
                )
            )
            offset += c.num_tokens
            row_of[id(c)] = offset - 1
        q_pos = torch.cat(positions)
        cos, sin = self.model.rotary(q_pos, self.model.dtype)
        ctx = PagedContext(self.cache, decodes, segments, torch.cat(new_slots), cos, sin)
        input_ids = torch.tensor([ids], device=self.device)
        hidden = self.model.forward_layers(self.model.model.embed_tokens(input_ids), ctx)
        rows = torch.tensor(
            [row_of[id(c)] for c in chunks if c.samples], device=self.device, dtype=torch.long
        )
        return self.model.lm_head(hidden[0, rows]).float()
