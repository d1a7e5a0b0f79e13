"""Runs one scheduled step — decodes and prefill chunks of many requests — through the model.

All tokens of the step are flattened into one row [1, N] for the per-token work (projections, MoE,
norms); the single-token chunks (decodes) come first, then the prefill chunks. Attention runs against
the paged cache after the step's new latent entries are written to their slots:
* the single-token chunks (decodes) together, in the absorbed form, in groups of similar context length
  (so padding stays small): each row's visible slots padded to the group's longest, the DSA indexer's
  top-k per row once a context exceeds ``index_topk``, and only the selected latent entries gathered;
* each prefill chunk on its own through the model's MLA core (``MLA.attend``: the cheaper form, DSA
  selection inside) over the entries it can see, gathered through its block table.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from dsv32.engine.cuda_graphs import DecodeGraphs, GraphCaptureError
from dsv32.engine.paged_cache import PagedKVCache
from dsv32.engine.scheduler import ScheduledChunk
from dsv32.model.mla import MLA, MLAInputs
from dsv32.model.transformer import DeepseekForCausalLM

log = logging.getLogger(__name__)


@dataclass
class _Segment:
    """A prefill chunk of one request."""

    rows: slice  # this request's tokens in the flattened step
    q_pos: torch.Tensor  # [n] absolute positions
    first_pos: int  # q_pos[0] (the positions are consecutive)
    slots: torch.Tensor  # [S] cache slots of every visible token (0 .. start + n - 1)


@dataclass
class _Decodes:
    """A group of the step's single-token chunks: consecutive rows of the flattened step."""

    rows: slice
    slots: torch.Tensor  # [R, S] each row's visible slots, padded to the group's longest context S
    visible: torch.Tensor  # [R, S] False on padding


# Decodes share a group while the longest context is at most twice the shortest (or all are short), and
# the group's padded slot matrix stays under this many slots: what is gathered per group and layer is
# slots x index_head_dim (DSA) or slots x (kv_lora_rank + qk_rope_head_dim) (dense MLA).
DECODE_GROUP_SLOTS = 1 << 18
SHORT_CONTEXT = 1024


class PagedContext:
    """AttentionContext over the paged cache for one flattened step."""

    def __init__(
        self,
        cache: PagedKVCache,
        decodes: list[_Decodes],
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
        for group in self.decodes:
            outs.append(self._attend_decodes(layer_idx, mla, inp.rows(group.rows), group))
        for seg in self.segments:
            c_kv, k_pe, k_idx = self.cache.gather(layer_idx, seg.slots)
            outs.append(
                mla.attend(
                    inp.rows(seg.rows),
                    c_kv[None],
                    k_pe[None],
                    None if k_idx is None else k_idx[None],
                    seg.q_pos,
                    first_pos=seg.first_pos,
                )
            )
        return outs[0] if len(outs) == 1 else torch.cat(outs, dim=1)

    def _attend_decodes(self, layer_idx: int, mla: MLA, inp: MLAInputs, group: _Decodes) -> torch.Tensor:
        slots, visible = group.slots, group.visible
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
        self.graphs: DecodeGraphs | None = None  # decode-only steps as fixed-shape (CUDA-graph) steps

    def _slots(self, block_table: list[int], start: int, end: int) -> torch.Tensor:
        pos = torch.arange(start, end)
        table = torch.tensor(block_table[: -(-end // self.block_size)], dtype=torch.long)
        return (table[pos // self.block_size] * self.block_size + pos % self.block_size).to(self.device)

    @staticmethod
    def _decode_groups(singles: list[ScheduledChunk]) -> list[list[ScheduledChunk]]:
        """Single-token chunks by ascending context, cut into groups of similar length (``DECODE_GROUP_SLOTS``)."""
        groups: list[list[ScheduledChunk]] = []
        for c in sorted(singles, key=lambda c: c.start):
            n = c.start + 1
            g = groups[-1] if groups else None
            if g and n <= max(2 * (g[0].start + 1), SHORT_CONTEXT) and n * (len(g) + 1) <= DECODE_GROUP_SLOTS:
                g.append(c)
            else:
                groups.append([c])
        return groups

    def _decodes(self, chunks: list[ScheduledChunk], first_row: int) -> tuple[_Decodes, torch.Tensor]:
        """Padded slot matrix of one group of single-token chunks, and the slots their new entries go to."""
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
        rows = slice(first_row, first_row + len(chunks))
        return _Decodes(rows, slots.to(self.device), visible.to(self.device)), new.to(self.device)

    @torch.inference_mode()
    def execute(self, chunks: list[ScheduledChunk]) -> torch.Tensor:
        """Run the step; returns fp32 logits [n_sampling_chunks, vocab], one row per chunk that samples
        (in the order of ``chunks``)."""
        if self.graphs is not None and self.graphs.fits(chunks):
            try:
                return self.graphs.execute(chunks)
            except GraphCaptureError as e:
                log.warning("%s; decode steps stay eager", e)
                self.graphs = None
        multi = [c for c in chunks if c.num_tokens > 1]
        ids, positions, new_slots, segments, decodes = [], [], [], [], []
        row_of: dict[int, int] = {}  # id(chunk) -> its last row in the flattened step
        offset = 0
        for group in self._decode_groups([c for c in chunks if c.num_tokens == 1]):
            dec, new = self._decodes(group, offset)
            decodes.append(dec)
            new_slots.append(new)
            for c in group:
                ids.append(c.request.token_at(c.start))
                row_of[id(c)] = offset
                offset += 1
            positions.append(torch.tensor([c.start for c in group], device=self.device))
        for c in multi:
            req, end = c.request, c.start + c.num_tokens
            ids.extend(req.token_ids(c.start, end))
            positions.append(torch.arange(c.start, end, device=self.device))
            new_slots.append(self._slots(req.block_table, c.start, end))
            segments.append(
                _Segment(
                    slice(offset, offset + c.num_tokens),
                    positions[-1],
                    c.start,
                    self._slots(req.block_table, 0, end),
                )  # fmt: skip
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
