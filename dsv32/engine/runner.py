"""Runs one scheduled step — decodes and prefill chunks of many requests — through the model.

All tokens of the step are flattened into one row [1, N] for the per-token work (projections, MoE,
norms); the decode rows come first (each single-token chunk's token and, with speculative decoding, its
draft tokens: one row per position), then the prefill chunks. Attention runs against the paged cache after
the step's new latent entries are written to their slots:
* the decode rows together, in the absorbed form, in groups of similar context length (so padding stays
  small): each row's visible slots (those up to its own position) padded to the group's longest, the DSA
  indexer's top-k per row once a context exceeds ``index_topk``, and only the selected latent entries
  gathered;
* each prefill chunk on its own through the model's MLA core (``MLA.attend``: the cheaper form, DSA
  selection inside) over the entries it can see, gathered through its block table.
``draft`` then runs the MTP layer over the same rows (speculative decoding).

On a GPU, decode-only steps (``cuda_graphs.DecodeGraphs``) and one-chunk prefill steps
(``prefill_graphs.PrefillGraphs``) replay from CUDA graphs instead; with ``compile_steps`` the flattened
step's forward runs compiled around its attention (``compiled_layers.CompiledLayers``).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from dsv32.engine.compiled_layers import CompiledLayers
from dsv32.engine.cuda_graphs import DecodeGraphs, GraphCaptureError
from dsv32.engine.paged_cache import PagedKVCache, slots_at
from dsv32.engine.prefill_graphs import PrefillGraphs
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
class _Row:
    """One position of a decode chunk (its known token, or a draft token after it)."""

    chunk: ScheduledChunk
    pos: int
    token: int


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
PROMPT_SCORE_ROWS = 128  # prompt positions scored at a time (each a full-vocabulary fp32 row)


def next_token_ids(chunks: list[ScheduledChunk], rows_of: dict[int, list[int]], n_rows: int) -> list[int]:
    """The MTP pass's tokens: for each row of a step (``rows_of``: id(chunk) -> its rows by position) the token
    after its position, now that the step's tokens are sampled; 0 where none is known (padding rows, a
    rejected draft's row)."""
    next_ids = [0] * n_rows
    for c in chunks:
        req = c.request
        for j, row in enumerate(rows_of[id(c)]):
            if c.start + j + 1 < req.num_tokens:
                next_ids[row] = req.token_at(c.start + j + 1)
    return next_ids


def last_computed_rows(
    drafting: list[ScheduledChunk], rows_of: dict[int, list[int]], device: torch.device
) -> torch.Tensor:
    """For each chunk in ``drafting``, the step's row of its request's last computed position (after
    ``Scheduler.after_step``): where its first draft is read."""
    rows = [rows_of[id(c)][c.request.num_computed - 1 - c.start] for c in drafting]
    return torch.tensor(rows, device=device, dtype=torch.long)


class PagedContext:
    """AttentionContext over the paged cache for one flattened step."""

    def __init__(
        self,
        cache: PagedKVCache,
        decodes: list[_Decodes],
        segments: list[_Segment],
        new_slots: torch.Tensor,
        q_pos: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
    ):
        self.cache, self.decodes, self.segments, self.new_slots = cache, decodes, segments, new_slots
        self.q_pos, self.cos, self.sin = q_pos, cos, sin

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
        self.prefill_graphs: PrefillGraphs | None = None  # one-chunk prefill steps as fixed-shape steps
        self.token_limit: int | None = None  # rows from here on are never scored (``EngineCore.token_limit``)
        # the other steps' forward compiled around their attention (``compile_steps``)
        self.compiled: CompiledLayers | None = None
        self.keep_hidden = False  # speculative decoding: keep the step's hidden states for ``draft``
        self._last: tuple[PagedContext, torch.Tensor, dict[int, list[int]]] | None = None

    def _slots(self, block_table: list[int], start: int, end: int) -> torch.Tensor:
        pos = torch.arange(start, end)
        table = torch.tensor(block_table[: -(-end // self.block_size)], dtype=torch.long)
        return slots_at(table, pos, self.block_size).to(self.device)

    @staticmethod
    def _decode_groups(rows: list[_Row]) -> list[list[_Row]]:
        """Decode rows by ascending context, cut into groups of similar length (``DECODE_GROUP_SLOTS``)."""
        groups: list[list[_Row]] = []
        for r in sorted(rows, key=lambda r: r.pos):
            n = r.pos + 1
            g = groups[-1] if groups else None
            if g and n <= max(2 * (g[0].pos + 1), SHORT_CONTEXT) and n * (len(g) + 1) <= DECODE_GROUP_SLOTS:
                g.append(r)
            else:
                groups.append([r])
        return groups

    def _decodes(self, rows: list[_Row], first_row: int) -> tuple[_Decodes, torch.Tensor]:
        """Padded slot matrix of one group of decode rows, and the slots their new entries go to."""
        bs = self.block_size
        lens = [r.pos + 1 for r in rows]
        n_blocks = -(-max(lens) // bs)
        tables = [r.chunk.request.block_table[:n_blocks] for r in rows]
        table = torch.tensor([t + [0] * (n_blocks - len(t)) for t in tables], dtype=torch.long)
        pos = torch.arange(max(lens))
        slots = slots_at(table, pos, bs)  # [R, S]
        lens_t = torch.tensor(lens)
        visible = pos[None, :] < lens_t[:, None]
        new = slots[torch.arange(len(rows)), lens_t - 1]
        span = slice(first_row, first_row + len(rows))
        return _Decodes(span, slots.to(self.device), visible.to(self.device)), new.to(self.device)

    @torch.inference_mode()
    def execute(self, chunks: list[ScheduledChunk]) -> torch.Tensor:
        """Run the step; returns fp32 logits [n_sampling_rows, vocab]: for each chunk that samples (in the
        order of ``chunks``) the row of its last known token, then one row per draft token.

        With ``keep_hidden`` the step's final hidden states stay for ``draft`` (the MTP pass)."""
        self._last = None
        # chunks whose prompt positions are scored (prompt logprobs): every row's logits are needed, which
        # the fixed-shape steps do not return
        scoring = [
            c for c in chunks if c.request.prompt_logprobs_left and c.start < len(c.request.prompt_ids) - 1
        ]
        if not scoring and self.graphs is not None and self.graphs.fits(chunks):
            try:
                return self.graphs.execute(chunks)
            except GraphCaptureError as e:
                log.warning("%s; decode steps stay eager", e)
                self.graphs = None
        if (
            not scoring
            and self.prefill_graphs is not None
            and not self.keep_hidden
            and self.prefill_graphs.fits(chunks)
        ):
            try:
                return self.prefill_graphs.execute(chunks)
            except GraphCaptureError as e:
                log.warning("%s; prefill steps stay eager", e)
                self.prefill_graphs = None
        ids, positions, new_slots, segments, decodes = [], [], [], [], []
        # id(chunk) -> the flattened row of each of its positions
        rows_of: dict[int, list[int]] = {id(c): [0] * c.num_rows for c in chunks}
        offset = 0
        # decodes: one known token, maybe drafts after it; each position is a row of its own
        singles = [
            _Row(c, c.start + j, c.request.token_at(c.start) if j == 0 else c.draft[j - 1])
            for c in chunks
            if c.num_tokens == 1
            for j in range(c.num_rows)
        ]
        for group in self._decode_groups(singles):
            dec, new = self._decodes(group, offset)
            decodes.append(dec)
            new_slots.append(new)
            for r in group:
                ids.append(r.token)
                rows_of[id(r.chunk)][r.pos - r.chunk.start] = offset
                offset += 1
            positions.append(torch.tensor([r.pos for r in group], device=self.device))
        for c in chunks:
            if c.num_tokens == 1:
                continue
            req, end = c.request, c.start + c.num_tokens  # prefill chunks carry no drafts
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
            rows_of[id(c)] = list(range(offset, offset + c.num_tokens))
            offset += c.num_tokens
        q_pos = torch.cat(positions)
        cos, sin = self.model.rotary(q_pos)
        ctx = PagedContext(self.cache, decodes, segments, torch.cat(new_slots), q_pos, cos, sin)
        input_ids = torch.tensor([ids], device=self.device)
        hidden = self._forward_layers(input_ids, ctx)
        if self.keep_hidden:
            self._last = (ctx, hidden, rows_of)
        if scoring:
            self._score_prompts(scoring, hidden[0], rows_of)
        rows = torch.tensor(
            [r for c in chunks if c.samples for r in rows_of[id(c)][c.num_tokens - 1 :]],
            device=self.device,
            dtype=torch.long,
        )
        return self.model.logits(hidden[0, rows])

    def _score_prompts(
        self, chunks: list[ScheduledChunk], hidden: torch.Tensor, rows_of: dict[int, list[int]]
    ) -> None:
        """Prompt logprobs of the positions these chunks computed (``Request.prompt_logprobs``): the row of
        position p scores prompt token p + 1 under the model's raw distribution (fp32 log-softmax of the
        logits over the ids the engine can emit, ``token_limit``), with the request's number of most likely
        alternatives. ``hidden`` [N, D]: the step's rows.
        A position computed again (after a preemption) gets the same entry again."""
        for c in chunks:
            req, k = c.request, c.request.prompt_top
            end = min(c.start + c.num_tokens, len(req.prompt_ids) - 1)  # positions [start, end) score a token
            rows, targets = rows_of[id(c)][: end - c.start], req.prompt_ids[c.start + 1 : end + 1]
            for s in range(0, len(rows), PROMPT_SCORE_ROWS):  # (full-vocabulary rows: a few at a time)
                r = torch.tensor(rows[s : s + PROMPT_SCORE_ROWS], device=self.device)
                logits = self.model.logits(hidden.index_select(0, r))[:, : self.token_limit]  # fp32
                lp = torch.log_softmax(logits, dim=-1)
                t = torch.tensor(targets[s : s + PROMPT_SCORE_ROWS], device=self.device)
                chosen = lp.gather(1, t[:, None])  # [n, 1]
                rank = ((lp > chosen).sum(-1) + 1).tolist()  # 1: the most likely token
                top_v, top_i = lp.topk(k, dim=-1) if k else (lp[:, :0], lp[:, :0].long())
                chosen, top_v, top_i = chosen[:, 0].tolist(), top_v.tolist(), top_i.tolist()
                for j, value in enumerate(chosen):
                    pos = c.start + s + j + 1
                    if req.prompt_logprobs[pos] is None:
                        req.prompt_logprobs_left -= 1
                    top = list(zip(top_i[j], top_v[j], strict=True))
                    req.prompt_logprobs[pos] = {"logprob": value, "rank": rank[j], "top": top}

    @torch.inference_mode()  # its inputs too: dynamo guards on inference tensors, as the steps make them
    def compile_steps(self) -> bool:
        """Compile the forward of the steps the decode graphs do not take (``CompiledLayers``) now, on a
        two-token prefill in the cache's scratch block; False (logged: why) where that fails."""
        self.compiled = CompiledLayers(self.model)
        bs, scratch = self.block_size, self.cache.scratch_block
        slots = scratch * bs + torch.arange(2, device=self.device) % bs
        q_pos = torch.arange(2, device=self.device)
        cos, sin = self.model.rotary(q_pos)
        ctx = PagedContext(self.cache, [], [_Segment(slice(0, 2), q_pos, 0, slots)], slots, q_pos, cos, sin)
        self._forward_layers(torch.zeros(1, 2, dtype=torch.long, device=self.device), ctx)
        return self.compiled is not None

    def _forward_layers(self, input_ids: torch.Tensor, ctx: PagedContext) -> torch.Tensor:
        """The step's final hidden states: compiled around the attention (``compiled``) where it fits."""
        if self.compiled is not None and self.compiled.fits(input_ids.shape[1]):
            try:
                return self.compiled.forward(input_ids, ctx)
            except Exception as e:  # noqa: BLE001 - any compiler failure (no C++ compiler, an inductor bug)
                # (the attention ops that ran wrote the same entries the eager forward writes again)
                log.warning("the compiled step forward failed, steps stay eager: %s: %s", type(e).__name__, e)
                self.compiled = None
        return self.model.forward_layers(self.model.model.embed_tokens(input_ids), ctx)

    @torch.inference_mode()
    def draft(
        self, chunks: list[ScheduledChunk], drafting: list[ScheduledChunk]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The MTP pass over the step ``execute`` just ran (``keep_hidden``), after its tokens were sampled.

        The MTP layer reads each row's hidden state h_i with the token at i+1 (a placeholder where that is
        not known: a rejected draft's row, rewritten next step) and writes its own cache entry at every
        row, so later drafts attend over the whole context. Returns, for each of ``drafting``, from the row
        of its request's last computed position: the MTP layer's output v [len(drafting), D] (for
        ``draft_chain``) and the fp32 logits [len(drafting), vocab] of the token after next."""
        if self._last is None:  # the step ran as a fixed-shape step
            return self.graphs.draft(chunks, drafting)
        ctx, hidden, rows_of = self._last
        self._last = None
        next_ids = next_token_ids(chunks, rows_of, hidden.shape[1])
        mtp = self.model.mtp_layers[0]
        h = mtp.draft_hidden(hidden, torch.tensor([next_ids], device=self.device), ctx)
        v = h[0, last_computed_rows(drafting, rows_of, self.device)]
        return v, mtp.draft_logits(v).float()

    @torch.inference_mode()
    def draft_chain(
        self, chunks: list[ScheduledChunk], positions: list[int], v: torch.Tensor, tokens: list[int]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One more draft per chunk's request: the MTP layer at ``positions`` (one row each, after the
        request's computed tokens) reads the previous draft's output ``v`` [n, D] and that draft's token,
        writes its cache entry there (rewritten when the position is computed) and returns (v, logits) as
        ``draft`` does."""
        rows = [_Row(c, pos, tok) for c, pos, tok in zip(chunks, positions, tokens, strict=True)]
        dec, new = self._decodes(rows, 0)
        q_pos = torch.tensor(positions, device=self.device)
        cos, sin = self.model.rotary(q_pos)
        ctx = PagedContext(self.cache, [dec], [], new, q_pos, cos, sin)
        mtp = self.model.mtp_layers[0]
        h = mtp.draft_hidden(v[None], torch.tensor([tokens], device=self.device), ctx)[0]
        return h, mtp.draft_logits(h).float()
