"""The batched sampler: one next token for every running request from logits [N, V], in one vectorised pass.

Per row, in this order (the OpenAI / vLLM definitions; ``x`` are the row's logits, ``c[t]`` how often token
``t`` occurs in the request's output so far, ``seen`` the tokens of its prompt and output):

1. logit bias:          ``x[t] += logit_bias[t]``
2. repetition penalty:  for ``t in seen``: ``x[t] /= r`` if ``x[t] > 0`` else ``x[t] *= r``
3. frequency/presence:  ``x[t] -= frequency_penalty * c[t] + presence_penalty * (c[t] > 0)``
4. temperature 0:       the token is ``argmax(x)`` (first index on a tie); otherwise
5. ``x /= temperature``, then each filter keeps a top set of the distribution renormalised over what the
   previous filters kept (``p = softmax(x)`` over the survivors):
   top_k  keeps the k largest logits;
   top_p  keeps the smallest top set whose probability reaches top_p (token kept iff the mass of the tokens
          ranked above it is < top_p);
   min_p  drops ``p < min_p * max(p)``;
   top_a  drops ``p < top_a * max(p) ** 2``;
   every filter keeps all tokens tied with its cut-off value and never drops the most likely token.
6. one uniform draw ``u`` from the request's own generator picks the token by inverse CDF over the
   survivors, so a seeded request samples the same tokens whatever else is in the batch.

Logprobs describe the distribution after steps 1-3 and before temperature and the filters:
``log_softmax(x)`` of the penalised, biased logits. They are the model's own view of the text (as
OpenAI reports them, independent of the sampling knobs) while still reflecting logit_bias, whose purpose is
to change the model's distribution.

Filters need the sorted head of a row, never a full sort when it can be avoided: top_k takes
``topk(k + 1)``; top_p rows without top_k start from the 512 most likely tokens and grow the candidate set
eightfold until it holds the nucleus.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor

from dsv32.engine.sampling_params import SamplingParams

_TOP_P_FIRST_CANDIDATES = 512
_CANDIDATE_GROWTH = 8


def make_generator(seed: int | None) -> torch.Generator:
    """A CPU generator for one request: seeded when ``seed`` is given, otherwise from OS entropy."""
    g = torch.Generator()
    if seed is None:
        g.seed()
    else:
        g.manual_seed(seed)
    return g


@dataclass(eq=False)
class SamplingState:
    """What the sampler needs to know about one request; the engine keeps one per request.

    The engine appends each sampled token to ``output_ids`` (append-only: the cached tensor of outputs
    follows it by length). The generator lives on the CPU whatever device the logits are on; one uniform
    number is drawn from it per non-greedy step.
    """

    params: SamplingParams
    prompt_ids: list[int]
    output_ids: list[int] = field(default_factory=list)
    generator: torch.Generator | None = None
    _out: Tensor = field(init=False, repr=False)
    _out_len: int = field(init=False, repr=False, default=0)
    _prompt_set: Tensor | None = field(init=False, repr=False, default=None)
    _bias: tuple[Tensor, Tensor] | None = field(init=False, repr=False, default=None)

    def __post_init__(self) -> None:
        if self.generator is None:
            self.generator = make_generator(self.params.seed)
        self._out = torch.empty(0, dtype=torch.long)

    @classmethod
    def create(cls, params: SamplingParams, prompt_ids: list[int]) -> SamplingState:
        """A fresh state with its generator made from ``params.seed``."""
        return cls(params, list(prompt_ids))

    def output_tensor(self) -> Tensor:
        """``output_ids`` as an int64 tensor, grown incrementally (amortised O(new tokens) per step)."""
        n = len(self.output_ids)
        if n < self._out_len:  # the list was replaced or truncated: start over
            self._out_len = 0
        if n > self._out_len:
            if n > self._out.numel():
                grown = torch.empty(max(n, 2 * self._out.numel(), 64), dtype=torch.long)
                grown[: self._out_len] = self._out[: self._out_len]
                self._out = grown
            self._out[self._out_len : n] = torch.tensor(self.output_ids[self._out_len : n], dtype=torch.long)
            self._out_len = n
        return self._out[:n]

    def prompt_token_set(self) -> Tensor:
        """The distinct prompt token ids, sorted (computed once)."""
        if self._prompt_set is None:
            self._prompt_set = torch.unique(torch.tensor(self.prompt_ids, dtype=torch.long))
        return self._prompt_set

    def bias_tensors(self) -> tuple[Tensor, Tensor]:
        """``logit_bias`` as (token ids int64, biases float32) (computed once)."""
        if self._bias is None:
            bias = self.params.logit_bias or {}
            self._bias = (
                torch.tensor(list(bias.keys()), dtype=torch.long),
                torch.tensor(list(bias.values()), dtype=torch.float32),
            )
        return self._bias


@dataclass
class SamplerOutput:
    """One step's result for N rows.

    ``logprobs`` is None unless some row asked for logprobs; rows that did not ask hold NaN. ``top_ids`` /
    ``top_logprobs`` [N, K] (K = the largest ``top_logprobs`` asked for, most likely first) are None when
    K is 0; a row that asked for fewer than K reads its first ``top_logprobs`` columns; rows that did not
    ask hold -1 / NaN.
    """

    token_ids: Tensor  # [N] int64
    logprobs: Tensor | None = None  # [N] float32
    top_ids: Tensor | None = None  # [N, K] int64
    top_logprobs: Tensor | None = None  # [N, K] float32


class Sampler:
    """Samples the next token of each row; see the module docstring for the exact definitions."""

    def __call__(self, logits: Tensor, states: list[SamplingState]) -> SamplerOutput:
        n, vocab = logits.shape
        if len(states) != n:
            raise ValueError(f"{n} rows of logits but {len(states)} sampling states")
        device = logits.device
        params = [s.params for s in states]

        x = logits.float().contiguous()
        if x.data_ptr() == logits.data_ptr() and (
            any(p.logit_bias for p in params) or any(_has_penalty(p) for p in params)
        ):
            x = x.clone()  # the bias and penalties below write into x
        _apply_logit_bias(x, states)
        _apply_penalties(x, states)

        token_ids = torch.empty(n, dtype=torch.long, device=device)
        greedy = [i for i, p in enumerate(params) if p.greedy]
        rand = [i for i, p in enumerate(params) if not p.greedy]
        if len(greedy) == n:
            token_ids = x.argmax(-1)
        elif greedy:
            gi = torch.tensor(greedy, device=device)
            token_ids[gi] = x.index_select(0, gi).argmax(-1)
        if rand:
            ri = torch.tensor(rand, device=device)
            rp = [params[i] for i in rand]
            # The one per-row loop: each request draws from its own generator.
            u = torch.cat([torch.rand(1, generator=states[i].generator) for i in rand]).to(device)
            temp = torch.tensor([p.temperature for p in rp], device=device)
            xs = (x if len(rand) == n else x.index_select(0, ri)) / temp[:, None]
            sampled = _sample(
                xs,
                top_k=torch.tensor([p.top_k for p in rp], device=device),
                top_p=torch.tensor([p.top_p for p in rp], device=device),
                min_p=torch.tensor([p.min_p for p in rp], device=device),
                top_a=torch.tensor([p.top_a for p in rp], device=device),
                u=u,
            )
            if len(rand) == n:
                token_ids = sampled
            else:
                token_ids[ri] = sampled
        return _logprobs(x, token_ids, params)


def _has_penalty(p: SamplingParams) -> bool:
    return p.repetition_penalty != 1.0 or p.frequency_penalty != 0.0 or p.presence_penalty != 0.0


def _flat_keys(pieces: list[Tensor], rows: list[int], vocab: int, device: torch.device) -> Tensor:
    """Token ids of several rows as indices into the flattened [N * V] logits."""
    lengths = torch.tensor([t.numel() for t in pieces])
    offsets = torch.repeat_interleave(torch.tensor(rows, dtype=torch.long) * vocab, lengths)
    return (torch.cat(pieces) + offsets).to(device)


def _apply_logit_bias(x: Tensor, states: list[SamplingState]) -> None:
    rows = [i for i, s in enumerate(states) if s.params.logit_bias]
    if not rows:
        return
    vocab = x.shape[1]
    ids, vals = zip(*(states[i].bias_tensors() for i in rows), strict=True)
    keys = _flat_keys(list(ids), rows, vocab, x.device)
    x.view(-1).index_add_(0, keys, torch.cat(vals).to(x.device))


def _apply_penalties(x: Tensor, states: list[SamplingState]) -> None:
    """Repetition, frequency and presence penalties, touching only the tokens each row has seen."""
    rows = [i for i, s in enumerate(states) if _has_penalty(s.params)]
    if not rows:
        return
    n, vocab = x.shape
    device = x.device
    flat = x.view(-1)
    rep = torch.tensor([s.params.repetition_penalty for s in states], device=device)
    freq = torch.tensor([s.params.frequency_penalty for s in states], device=device)
    pres = torch.tensor([s.params.presence_penalty for s in states], device=device)

    out_keys, counts = torch.unique(
        _flat_keys([states[i].output_tensor() for i in rows], rows, vocab, device), return_counts=True
    )
    rep_rows = [i for i in rows if states[i].params.repetition_penalty != 1.0]
    if rep_rows:
        prompt_keys = _flat_keys([states[i].prompt_token_set() for i in rep_rows], rep_rows, vocab, device)
        seen = torch.unique(torch.cat([prompt_keys, out_keys]))
        r = rep[seen // vocab]
        v = flat[seen]
        flat[seen] = torch.where(v > 0, v / r, v * r)
    if out_keys.numel():
        row = out_keys // vocab
        flat.index_add_(0, out_keys, -(freq[row] * counts.to(x.dtype) + pres[row]))


def _sample(xs: Tensor, top_k: Tensor, top_p: Tensor, min_p: Tensor, top_a: Tensor, u: Tensor) -> Tensor:
    """Filter and draw one token per row of temperature-scaled logits xs [R, V]; u [R] uniform in [0, 1)."""
    r, vocab = xs.shape
    device = xs.device
    top_k = torch.where((top_k > 0) & (top_k < vocab), top_k, 0)  # 0: off
    needs_head = (top_k > 0) | (top_p < 1)
    out = torch.empty(r, dtype=torch.long, device=device)
    no_t = torch.full((r,), float("-inf"), device=device)

    if not bool(needs_head.any()):
        return _draw_full(xs, no_t, min_p, top_a, u)
    plain = (~needs_head).nonzero().squeeze(1)
    if plain.numel():
        out[plain] = _draw_full(xs[plain], no_t[plain], min_p[plain], top_a[plain], u[plain])

    pending = needs_head.nonzero().squeeze(1)
    if not pending.numel():
        return out
    k_pending = top_k[pending]
    size = int(k_pending.max()) + 1
    if bool((k_pending == 0).any()):
        size = max(size, _TOP_P_FIRST_CANDIDATES)
    while pending.numel():
        size = min(size, vocab)
        rows = xs[pending]
        vals, idx = rows.topk(size)  # [m, size], most likely first
        k, p = top_k[pending], top_p[pending]
        whole = size == vocab
        # top_k: keep logits >= the k-th largest.
        kth = vals.gather(1, (k - 1).clamp(min=0)[:, None]).squeeze(1)
        kth = torch.where(k > 0, kth, float("-inf"))
        # Normaliser of the top_k survivors: from the head when it holds them all (no ties at the cut-off
        # running past it), from the whole row otherwise (rows without top_k, or such ties).
        head_holds = (k > 0) & (whole | (vals[:, -1] < kth))
        lse = _masked_lse(vals, kth)
        if not bool(head_holds.all()):
            need = (~head_holds).nonzero().squeeze(1)
            lse[need] = _masked_lse(rows[need], kth[need])
        # top_p over the renormalised top_k survivors, from the head.
        probs = torch.exp(torch.where(vals >= kth[:, None], vals, float("-inf")) - lse[:, None])
        cum = probs.cumsum(-1)
        n_keep = ((cum - probs) < p[:, None]).sum(-1).clamp(min=1)
        cut = vals.gather(1, (n_keep - 1)[:, None]).squeeze(1)
        t = torch.maximum(kth, torch.where(p < 1, cut, float("-inf")))
        # A top_p row without top_k is decided once the head's mass reaches top_p (or the head is the row).
        decided = (k > 0) | (cum[:, -1] >= p) | whole
        done = decided.nonzero().squeeze(1)
        if done.numel():
            sel = pending[done]
            out[sel] = _draw_head(
                rows[done], vals[done], idx[done], t[done], whole, min_p[sel], top_a[sel], u[sel]
            )
        pending = pending[~decided]
        size *= _CANDIDATE_GROWTH
    return out


def _masked_lse(x: Tensor, t: Tensor) -> Tensor:
    """logsumexp over the entries of each row of x [m, n] that are >= t [m] (t never exceeds the row max)."""
    m = x.amax(-1, keepdim=True)
    return ((x - m).exp_().mul_(x >= t[:, None]).sum(-1)).log_() + m.squeeze(1)


def _top_a(t: Tensor, xmax: Tensor, top_a: Tensor, lse_above: Callable[[Tensor], Tensor]) -> Tensor:
    """Raise the cut-off t by top_a; ``lse_above(t)`` is the normaliser of the tokens still kept."""
    if not bool((top_a > 0).any()):
        return t
    # p < a * p_max^2  <=>  x - lse < log(a) + 2 (x_max - lse)  <=>  x < log(a) + 2 x_max - lse
    return torch.maximum(t, torch.log(top_a) + 2 * xmax - lse_above(t))


def _draw_full(xs: Tensor, t: Tensor, min_p: Tensor, top_a: Tensor, u: Tensor) -> Tensor:
    """Apply min_p and top_a above the cut-off t [m] and draw, over whole rows xs [m, V]."""
    xmax = xs.amax(-1)
    t = torch.maximum(t, xmax + torch.log(min_p))  # p < min_p * p_max  <=>  x < x_max + log(min_p)
    t = _top_a(t, xmax, top_a, lambda tt: _masked_lse(xs, tt))
    w = (xs - xmax[:, None]).exp_().mul_(xs >= t[:, None])
    return _inverse_cdf(w.cumsum_(-1), u)


def _draw_head(
    rows: Tensor, vals: Tensor, idx: Tensor, t: Tensor, whole: bool, min_p: Tensor, top_a: Tensor, u: Tensor
) -> Tensor:
    """Apply min_p and top_a above the cut-off t [m] and draw from the sorted head (vals, idx) [m, size] of
    rows [m, V]; rows with survivors past the head (ties at the cut-off) are drawn over the whole row."""
    xmax = vals[:, 0]
    t = torch.maximum(t, xmax + torch.log(min_p))
    fits = vals[:, -1] < t
    if whole or bool(fits.all()):
        return _draw_in_head(vals, idx, t, xmax, top_a, u)
    out = torch.empty(vals.shape[0], dtype=torch.long, device=vals.device)
    spill, keep = (~fits).nonzero().squeeze(1), fits.nonzero().squeeze(1)
    out[spill] = _draw_full(rows[spill], t[spill], min_p[spill], top_a[spill], u[spill])
    if keep.numel():
        out[keep] = _draw_in_head(vals[keep], idx[keep], t[keep], xmax[keep], top_a[keep], u[keep])
    return out


def _draw_in_head(vals: Tensor, idx: Tensor, t: Tensor, xmax: Tensor, top_a: Tensor, u: Tensor) -> Tensor:
    t = _top_a(t, xmax, top_a, lambda tt: _masked_lse(vals, tt))
    w = torch.exp(vals - xmax[:, None]) * (vals >= t[:, None])
    return idx.gather(1, _inverse_cdf(w.cumsum(-1), u)[:, None]).squeeze(1)


def _inverse_cdf(cdf: Tensor, u: Tensor) -> Tensor:
    """Index of the first entry of each cdf row [m, n] above u * total; never a zero-weight entry."""
    total = cdf[:, -1:]
    target = torch.minimum(u[:, None] * total, torch.nextafter(total, torch.zeros_like(total)))
    return torch.searchsorted(cdf, target, right=True).squeeze(1)


def _logprobs(x: Tensor, token_ids: Tensor, params: list[SamplingParams]) -> SamplerOutput:
    rows = [i for i, p in enumerate(params) if p.logprobs]
    if not rows:
        return SamplerOutput(token_ids)
    n = x.shape[0]
    device = x.device
    k = max(p.top_logprobs for p in params)
    logprobs = torch.full((n,), float("nan"), device=device)
    top_ids = torch.full((n, k), -1, dtype=torch.long, device=device) if k else None
    top_lp = torch.full((n, k), float("nan"), device=device) if k else None
    ri = torch.tensor(rows, device=device)
    lp = (x if len(rows) == n else x.index_select(0, ri)).log_softmax(-1)
    logprobs[ri] = lp.gather(1, token_ids[ri][:, None]).squeeze(1)
    if k:
        v, i = lp.topk(k)
        top_lp[ri], top_ids[ri] = v, i
    return SamplerOutput(token_ids, logprobs, top_ids, top_lp)
