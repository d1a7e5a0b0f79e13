"""Speculative decoding with the checkpoint's MTP layer: which drafts each request proposes (``Drafter``),
and vLLM's ``speculative_config`` spelling for turning it on.

``{"method": "mtp", "num_speculative_tokens": 1}`` (``"deepseek_mtp"`` is accepted too, as vLLM names it)
becomes ``EngineConfig.num_speculative_tokens``. After a step, the MTP layer drafts the token after next from
each request's last hidden state (``ModelRunner.draft``) and, for more than one draft, again from its own
output (``ModelRunner.draft_chain``); the next step computes the drafts beside the sampled token, and
sampling verifies them (``EngineCore.step``).
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

import torch

from dsv32.engine.sampler import adjusts_logits, apply_bias_and_penalties

if TYPE_CHECKING:
    from dsv32.engine.grammar import GrammarMasker
    from dsv32.engine.request import Request
    from dsv32.engine.runner import ModelRunner
    from dsv32.engine.scheduler import ScheduledChunk, Scheduler

MAX_SPECULATIVE_TOKENS = 4  # drafts per step: the MTP layer once, then chained on its own output

METHODS = ("mtp", "deepseek_mtp")


def num_speculative_tokens(config: dict[str, Any] | str | None) -> int:
    """Draft tokens per step asked for by a ``speculative_config`` (a dict or its JSON text; None: 0).

    Raises ValueError, saying why, for anything but the MTP method with 1 to 4 draft tokens."""
    if config is None:
        return 0
    if isinstance(config, str):
        try:
            config = json.loads(config)
        except json.JSONDecodeError as e:
            raise ValueError(f"speculative_config is not valid JSON: {e}") from None
    if not isinstance(config, dict):
        raise ValueError("speculative_config must be a JSON object")
    unknown = set(config) - {"method", "num_speculative_tokens"}
    if unknown:
        raise ValueError(f"speculative_config: unsupported keys {sorted(unknown)}")
    method = config.get("method", "mtp")
    if method not in METHODS:
        raise ValueError(f"speculative_config: method {method!r} is not supported; use one of {METHODS}")
    k = config.get("num_speculative_tokens", 1)
    if not isinstance(k, int) or isinstance(k, bool) or not 1 <= k <= MAX_SPECULATIVE_TOKENS:
        raise ValueError(
            f"speculative_config: num_speculative_tokens must be an integer in [1, {MAX_SPECULATIVE_TOKENS}] "
            f"(past the first, drafts chain the one MTP layer on its own output), got {k!r}"
        )
    return k


class Drafter:
    """Proposes each going-on request's drafts for the next step, once a step's tokens are sampled.

    The first draft is the MTP layer's most likely token after the request's own logit bias and penalties,
    among those its grammar allows next (the sampling and grammar states have taken this step's tokens):
    what the sampler will do to the verifying row, so those settings do not waste drafts. Further drafts
    chain the MTP layer on its own output, one position further each, with the logit bias and the
    penalties of the tokens known so far. A constrained request drafts one token, and a request drafts no
    further than its max_tokens, the free blocks or a stop token allow.

    ``lives`` below are the engine's per-request records: ``request``, ``params``, ``state`` (sampling),
    ``stop_ids`` and ``guided`` (grammar state or None).
    """

    def __init__(self, runner: ModelRunner, scheduler: Scheduler, num_tokens: int):
        self.runner, self.scheduler, self.num_tokens = runner, scheduler, num_tokens

    def propose(
        self,
        chunks: list[ScheduledChunk],
        going_on: list[tuple[ScheduledChunk, Any]],
        masker: GrammarMasker | None,
    ) -> None:
        """The MTP pass over the step's ``chunks``, and the next step's drafts (``Request.draft_ids``) for
        each (chunk, live) in ``going_on`` with room for a draft and the token after it."""
        drafting, lives = [], []
        for c, lv in going_on:
            c.request.draft_ids = []
            if len(c.request.output_ids) + 2 <= c.request.max_tokens:
                drafting.append(c)
                lives.append(lv)
        v, logits = self.runner.draft(chunks, drafting)
        if not drafting:
            return
        for c, tok in zip(drafting, self._tokens(logits, lives, masker), strict=True):
            c.request.draft_ids = [tok]
        # chained drafts: the j-th sits at position q + j - 1 (q: the last computed position), on the slot
        # of the token the next step computes there; v's rows follow ``active``
        active = list(range(len(drafting)))
        for j in range(2, self.num_tokens + 1):
            keep = [n for n, i in enumerate(active) if self._chains(drafting[i].request, lives[i], j)]
            if not keep:
                break
            if len(keep) < len(active):
                v = v[torch.tensor(keep, device=v.device)]
            active = [active[n] for n in keep]
            reqs = [drafting[i].request for i in active]
            v, logits = self.runner.draft_chain(
                [drafting[i] for i in active],
                [r.num_computed + j - 2 for r in reqs],
                v,
                [r.draft_ids[-1] for r in reqs],
            )
            for r, tok in zip(reqs, self._tokens(logits, [lives[i] for i in active]), strict=True):
                r.draft_ids.append(tok)

    def _chains(self, req: Request, lv: Any, j: int) -> bool:
        """Whether ``req`` drafts a j-th token: not constrained, room for it and the token after it, its
        last draft no stop token, and a block for the slot the chain writes (reserved now if free)."""
        return (
            lv.guided is None
            and len(req.output_ids) + j + 1 <= req.max_tokens
            and req.draft_ids[-1] not in lv.stop_ids
            and self.scheduler.reserve(req, req.num_computed + j - 1)
        )

    @staticmethod
    def _tokens(logits: torch.Tensor, lives: list[Any], masker: GrammarMasker | None = None) -> list[int]:
        """The most likely token of each row after the request's logit bias and penalties (and, given the
        ``masker``, among those its grammar allows next)."""
        guided = []
        if masker is not None:
            guided = [
                (i, lv.guided) for i, lv in enumerate(lives) if lv.guided is not None and lv.guided.needs_mask
            ]
        if guided or any(adjusts_logits(lv.params) for lv in lives):
            # a normal tensor (the runner's is an inference tensor) changed in place outside inference
            # mode, where the sampling states' cached tensors must stay normal ones
            logits = logits.clone()
            apply_bias_and_penalties(logits, [lv.state for lv in lives])
            if guided:
                masker.apply(logits, [i for i, _ in guided], [g for _, g in guided])
        return logits.argmax(-1).tolist()
