"""The batched sampler: one next token for every running request from logits [N, V], in one vectorised pass.

Per row, in this order (the OpenAI / vLLM definitions; ``x`` are the row's logits, ``c[t]`` how often token
``t`` occurs in the request's output so far, ``seen`` the tokens of its prompt and output):

0. banned tokens:      ``x[t] = -inf`` for ``t`` outside ``allowed_token_ids``, and for the last token of a bad
                        word whose other tokens end the output so far (``bad_words``)
1. logit bias:          ``x[t] += logit_bias[t]``
2. repetition penalty:  for ``t in seen``: ``x[t] /= r`` if ``x[t] > 0`` else ``x[t] *= r``
3. frequency/presence:  ``x[t] -= frequency_penalty * c[t] + presence_penalty * (c[t] > 0)``
4. temperature 0:       the token is ``argmax(x)`` (first index on a tie); otherwise
5. ``x /= temperature`` (at least ``MIN_TEMPERATURE``, 0.01, as vLLM), then each filter keeps a top set of the distribution renormalised over what the
   previous filters kept (``p = softmax(x)`` over the survivors):
   top_k  keeps the k largest logits;
   top_p  keeps the smallest top set whose probability reaches top_p (token kept iff the mass of the tokens
          ranked above it is < top_p);
   min_p  drops ``p < min_p * max(p)``;
   top_a  drops ``p < top_a * max(p) ** 2``;
   every filter keeps all tokens tied with its cut-off value and never drops the most likely token.
6. one uniform draw ``u`` from the request's own generator picks the token by inverse CDF over the
   survivors, so a seeded request's draws do not depend on what else is in the batch. Its logits can: a
   decode row's attention matmuls round differently with the number of rows in the step (~1e-6), which can
   move a draw to a neighbouring token where the distribution is flat (as in vLLM, whose batches are not
   bit-invariant either); the same request in the same company samples the same tokens.

Logprobs describe the distribution after steps 0-3 and before temperature and the filters:
``log_softmax(x)`` of the penalised, biased logits. They are the model's own view of the text (as
OpenAI reports them, independent of the sampling knobs) while still reflecting logit_bias, whose purpose is
to change the model's distribution.

How it stays fast at N=64, V=129280 on a CPU: the filters only ever need a per-row cut-off logit, so they
are computed in logit units (temperature enters only inside the exponentials, never as an [N, V] division);
top_k and top_p look at a sorted head of the row from ``topk`` (k + 1 entries for top_k; 64 for top_p
alone, growing at least eightfold until it holds the nucleus, and shared with top_logprobs), never a full
sort unless the nucleus is most of the row; the draw is a two-level inverse CDF (block sums, then one block), so no [N, V] running sum; and the
[N, V] work buffers are kept between calls.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor

from dsv32.engine.sampling_params import SamplingParams

MIN_TEMPERATURE = 0.01  # a smaller temperature above 0 samples at this one, as vLLM does (float32 keeps it)
_LOGIT_CAP = 1e30  # penalised logits stay below it: finite through the sampler's x / T and 2 x
_TOP_P_FIRST_CANDIDATES = 64
_LN2 = math.log(2.0)
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
    bad_words_ids: list[list[int]] = field(default_factory=list)  # ``bad_words`` tokenized (the engine's)
    _out: Tensor = field(init=False, repr=False)
    _out_len: int = field(init=False, repr=False, default=0)
    _prompt_set: Tensor | None = field(init=False, repr=False, default=None)
    _bias: tuple[Tensor, Tensor] | None = field(init=False, repr=False, default=None)
    _allowed: Tensor | None = field(init=False, repr=False, default=None)

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

    def allowed_tensor(self) -> Tensor:
        """``allowed_token_ids`` as an int64 tensor (computed once)."""
        if self._allowed is None:
            self._allowed = torch.tensor(self.params.allowed_token_ids or [], dtype=torch.long)
        return self._allowed

    def banned_now(self) -> list[int]:
        """The bad words' tokens that cannot come next: each word's last token where the output ends with
        the word's other tokens."""
        out = self.output_ids
        return [w[-1] for w in self.bad_words_ids if len(w) == 1 or out[len(out) - len(w) + 1 :] == w[:-1]]

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

    token_ids: Tensor  # [N] int64; -1 where the row had no token left to sample (``_nothing_left``)
    logprobs: Tensor | None = None  # [N] float32
    top_ids: Tensor | None = None  # [N, K] int64
    top_logprobs: Tensor | None = None  # [N, K] float32


class Sampler:
    """Samples the next token of each row; see the module docstring for the exact definitions.

    Keeps two [N, V] fp32 work buffers between calls (the biased / penalised logits, and the exponentials):
    allocating and faulting in tens of MB per step would cost more than the math. One sampler per engine
    thread.
    """

    def __init__(self) -> None:
        self._buffers: dict[str, Tensor] = {}

    def _buffer(self, name: str, rows: int, vocab: int, device: torch.device) -> Tensor:
        buf = self._buffers.get(name)
        if buf is None or buf.device != device or buf.numel() < rows * vocab:
            buf = self._buffers[name] = torch.empty(rows * vocab, dtype=torch.float32, device=device)
        return buf[: rows * vocab].view(rows, vocab)

    def __call__(self, logits: Tensor, states: list[SamplingState]) -> SamplerOutput:
        n, vocab = logits.shape
        if len(states) != n:
            raise ValueError(f"{n} rows of logits but {len(states)} sampling states")
        device = logits.device
        params = [s.params for s in states]

        dead = None
        if any(adjusts_logits(p) for p in params):
            x = self._buffer("x", n, vocab, device).copy_(logits)  # written below; the caller's stay intact
            apply_bias_and_penalties(x, states)
            dead = _nothing_left(x, params)
        else:
            x = logits.float().contiguous()
        tmp = self._buffer("tmp", n, vocab, device)

        token_ids = torch.empty(n, dtype=torch.long, device=device)
        greedy = [i for i, p in enumerate(params) if p.greedy]
        rand = [i for i, p in enumerate(params) if not p.greedy]
        if len(greedy) == n:
            token_ids = x.argmax(-1)
        elif greedy:
            gi = torch.tensor(greedy, device=device)
            token_ids[gi] = x.index_select(0, gi).argmax(-1)
        head = None
        if rand:
            ri = torch.tensor(rand, device=device)
            rp = [params[i] for i in rand]
            # The one per-row loop: each request draws from its own generator.
            u = torch.cat([torch.rand(1, generator=states[i].generator) for i in rand]).to(device)
            # top_logprobs can reuse the sorted head that top_k / top_p sampling takes of the same rows.
            k_lp = max((p.top_logprobs for p in params), default=0)
            shared = k_lp > 0 and all(
                not p.greedy and (0 < p.top_k < vocab or p.top_p < 1) for p in params if p.top_logprobs
            )
            sampled, head = _sample(
                x if len(rand) == n else x.index_select(0, ri),
                temp=torch.tensor([max(p.temperature, MIN_TEMPERATURE) for p in rp], device=device),
                top_k=torch.tensor([p.top_k for p in rp], device=device),
                top_p=torch.tensor([p.top_p for p in rp], device=device),
                min_p=torch.tensor([p.min_p for p in rp], device=device),
                top_a=torch.tensor([p.top_a for p in rp], device=device),
                u=u,
                tmp=tmp,
                head_size=k_lp if shared else 0,
            )
            if len(rand) == n:
                token_ids = sampled
            else:
                token_ids[ri] = sampled
            if head is not None and shared:
                head = (ri[head[0]], head[1], head[2])  # rows as batch indices
            else:
                head = None
        out = _logprobs(x, token_ids, params, tmp, head)
        if dead is not None:
            out.token_ids[dead] = -1
        return out


def apply_bias_and_penalties(x: Tensor, states: list[SamplingState]) -> None:
    """Steps 0-3 of the module docstring on logits ``x`` [N, V], in place: banned tokens, logit bias, then the
    repetition, frequency and presence penalties of each row's request (rows that ask for none are untouched)."""
    _apply_bans(x, states)
    _apply_logit_bias(x, states)
    _apply_penalties(x, states)


def adjusts_logits(p: SamplingParams) -> bool:
    """Whether ``apply_bias_and_penalties`` changes a row of a request with these params."""
    return bool(p.logit_bias or p.allowed_token_ids or p.bad_words) or _has_penalty(p)


def _nothing_left(x: Tensor, params: list[SamplingParams]) -> Tensor | None:
    """Rows whose bans (with the masks applied before the sampler: a grammar's, ``min_tokens``') leave no token
    at all, e.g. ``allowed_token_ids`` that are all bad words: they get 0 logits here, so the draw stays in
    range, and token -1 in the output (the engine ends those requests). None when there are none."""
    rows = [i for i, p in enumerate(params) if p.allowed_token_ids or p.bad_words]
    if not rows:
        return None
    index = torch.tensor(rows, device=x.device)
    dead = index[x.index_select(0, index).amax(-1) == float("-inf")]
    if not dead.numel():
        return None
    x[dead] = 0.0
    return dead


def bad_words_token_ids(tokenizer, words: list[str], vocab: int) -> list[list[int]]:
    """The token sequences of ``bad_words`` (as vLLM: each word stripped of leading spaces, alone and after a
    space, as plain text), without repeats; a sequence holding an id past the model's ``vocab`` rows is left
    out (such a word can never be written)."""
    seqs: list[list[int]] = []
    for word in words:
        for text in (word.lstrip(), " " + word.lstrip()):
            ids = tokenizer.encode(text)
            if ids and max(ids) < vocab and ids not in seqs:
                seqs.append(ids)
    return seqs


def _apply_bans(x: Tensor, states: list[SamplingState]) -> None:
    """Step 0: -inf outside each row's ``allowed_token_ids`` and at its bad words' next tokens."""
    rows = [i for i, s in enumerate(states) if s.params.allowed_token_ids]
    if rows:
        keys = _flat_keys([states[i].allowed_tensor() for i in rows], rows, x.shape[1], x.device)
        flat = x.view(-1)
        allowed = flat[keys]
        x[torch.tensor(rows, device=x.device)] = float("-inf")
        flat[keys] = allowed
    banned = [(i, t) for i, s in enumerate(states) if s.bad_words_ids for t in s.banned_now()]
    if banned:
        r, t = zip(*banned, strict=True)
        x[torch.tensor(r, device=x.device), torch.tensor(t, device=x.device)] = float("-inf")


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
        flat[seen] = torch.where(v > 0, v / r, v * r).clamp_(max=_LOGIT_CAP)  # (a tiny r: not +inf)
    if out_keys.numel():
        row = out_keys // vocab
        flat.index_add_(0, out_keys, -(freq[row] * counts.to(x.dtype) + pres[row]))


def _sample(
    x: Tensor,
    temp: Tensor,
    top_k: Tensor,
    top_p: Tensor,
    min_p: Tensor,
    top_a: Tensor,
    u: Tensor,
    tmp: Tensor,
    head_size: int = 0,
) -> tuple[Tensor, tuple[Tensor, Tensor, Tensor] | None]:
    """One token per row of logits x [R, V] at temperatures temp [R] > 0; u [R] uniform in [0, 1).

    Every cut-off ``t`` below is a logit: a row keeps the tokens with ``x >= t``. ``tmp`` is a work
    buffer of at least [R, V]. Also returns the first sorted head it took, (rows, values, ids), at least
    ``head_size`` wide, or None if no row needed one.
    """
    r, vocab = x.shape
    device = x.device
    top_k = torch.where((top_k > 0) & (top_k < vocab), top_k, 0)  # 0: off
    needs_head = (top_k > 0) | (top_p < 1)
    no_cut = torch.full((r,), float("-inf"), device=device)
    if not bool(needs_head.any()):
        return _draw_full(x, temp, no_cut, min_p, top_a, u, tmp), None
    out = torch.empty(r, dtype=torch.long, device=device)
    plain = (~needs_head).nonzero().squeeze(1)
    if plain.numel():
        out[plain] = _draw_full(
            x[plain], temp[plain], no_cut[plain], min_p[plain], top_a[plain], u[plain], tmp
        )

    pending = needs_head.nonzero().squeeze(1)
    size = int(top_k[pending].max()) + 1
    if bool((top_k[pending] == 0).any()):
        size = max(size, _TOP_P_FIRST_CANDIDATES)
    size = max(size, head_size)
    head, lse = None, None
    while pending.numel():
        size = min(size, vocab)
        whole = size == vocab
        rows = x if pending.numel() == r else x[pending]
        vals, idx = rows.topk(size)  # [m, size], most likely first
        if head is None:
            head = (pending, vals, idx)
        k, p, tp = top_k[pending], top_p[pending], temp[pending]
        # top_k: keep logits >= the k-th largest.
        kth = vals.gather(1, (k - 1).clamp(min=0)[:, None]).squeeze(1)
        kth = torch.where(k > 0, kth, float("-inf"))
        if lse is None:  # later rounds only hold top_p rows without top_k: their normaliser is known
            # Normaliser of the top_k survivors: from the head when it holds them all (no ties at the
            # cut-off running past it), from the whole row otherwise (rows without top_k, or such ties).
            head_holds = (k > 0) & ((vals[:, -1] < kth) | whole)
            lse = _lse(vals, tp, kth)
            if not bool(head_holds.all()):
                need = (~head_holds).nonzero().squeeze(1)
                full = rows if need.numel() == rows.shape[0] else rows[need]
                lse[need] = _lse(full, tp[need], kth[need], tmp)
        # top_p over the renormalised top_k survivors, from the head: keep a token iff the mass ranked
        # above it is < top_p.
        probs = torch.exp(torch.where(vals >= kth[:, None], vals / tp[:, None], float("-inf")) - lse[:, None])
        cum = probs.cumsum(-1)
        n_keep = ((cum - probs) < p[:, None]).sum(-1).clamp(min=1)
        cut = vals.gather(1, (n_keep - 1)[:, None]).squeeze(1)
        t = torch.maximum(kth, torch.where(p < 1, cut, float("-inf")))
        # A top_p row without top_k is decided once the head's mass reaches top_p (or the head is the row).
        decided = (k > 0) | (cum[:, -1] >= p) | whole
        if bool(decided.all()):
            out[pending] = _draw_head(
                rows, None, vals, idx, tp, t, min_p[pending], top_a[pending], u[pending], tmp
            )
            break
        done, rest = decided.nonzero().squeeze(1), (~decided).nonzero().squeeze(1)
        if done.numel():
            sel = pending[done]
            out[sel] = _draw_head(
                rows, done, vals[done], idx[done], tp[done], t[done], min_p[sel], top_a[sel], u[sel], tmp
            )
        # Grow the head: the tokens past it are each at most as likely as its last one.
        short = ((p[rest] - cum[rest, -1]) / probs[rest, -1]).max()
        size = max(size * _CANDIDATE_GROWTH, size + int(min(float(short), vocab)) + 1)
        if size > vocab // 2:
            size = vocab
        pending, lse = pending[rest], lse[rest]
    return out, head


def _weights(x: Tensor, xmax: Tensor, temp: Tensor, t: Tensor, out: Tensor | None = None) -> Tensor:
    """exp((x - xmax) / temp) where x >= t, else 0; rows of x [m, n]; written into ``out`` if given.

    Computed as 2 ** ((x - xmax) / (temp ln 2)): torch's exp2 is ~2.5x faster than exp on a CPU, and ~10x on
    the -inf entries of grammar-masked rows (relative error < 2e-6, far below what a draw can notice)."""
    if out is not None:
        out = out[: x.shape[0], : x.shape[1]]
    w = torch.sub(x, xmax[:, None], out=out).div_(temp[:, None] * _LN2).exp2_()
    if bool(torch.isfinite(t).any()):
        w.mul_(x >= t[:, None])
    return w


def _lse(x: Tensor, temp: Tensor, t: Tensor, tmp: Tensor | None = None) -> Tensor:
    """log sum exp(x / temp) over the entries x >= t of each row of x [m, n] (t never above the row max)."""
    xmax = x.amax(-1)
    return _weights(x, xmax, temp, t, tmp).sum(-1).log_() + xmax / temp


def _min_p_top_a(
    xmax: Tensor, temp: Tensor, t: Tensor, min_p: Tensor, top_a: Tensor, lse_above: Callable[[Tensor], Tensor]
) -> Tensor:
    """Raise the cut-off t [m] by min_p, then by top_a; ``lse_above(t)`` is the normaliser of x >= t."""
    # p < min_p * p_max  <=>  (x - x_max) / T < log(min_p)
    t = torch.maximum(t, xmax + temp * torch.log(min_p))
    if bool((top_a > 0).any()):
        # p < a * p_max^2  <=>  x / T - lse < log(a) + 2 (x_max / T - lse)  <=>  x < T (log(a) - lse) + 2 x_max
        t = torch.maximum(t, temp * (torch.log(top_a) - lse_above(t)) + 2 * xmax)
    return t


def _draw_full(
    x: Tensor, temp: Tensor, t: Tensor, min_p: Tensor, top_a: Tensor, u: Tensor, tmp: Tensor
) -> Tensor:
    """Apply min_p and top_a above the cut-off t [m] and draw, over whole rows x [m, V]."""
    xmax = x.amax(-1)
    t = _min_p_top_a(xmax, temp, t, min_p, top_a, lambda tt: _lse(x, temp, tt, tmp))
    return _draw(_weights(x, xmax, temp, t, tmp), u)


def _draw_head(
    rows: Tensor,
    sel: Tensor | None,
    vals: Tensor,
    idx: Tensor,
    temp: Tensor,
    t: Tensor,
    min_p: Tensor,
    top_a: Tensor,
    u: Tensor,
    tmp: Tensor,
) -> Tensor:
    """Apply min_p and top_a above the cut-off t [m] and draw from the sorted head (vals, idx) [m, size] of
    rows[sel] (all rows when sel is None); rows whose survivors run past the head (ties at the cut-off) are
    drawn over the whole row."""
    xmax = vals[:, 0]
    t = torch.maximum(t, xmax + temp * torch.log(min_p))
    fits = (vals[:, -1] < t) | (vals.shape[1] == rows.shape[1])
    if bool(fits.all()):
        return _draw_in_head(vals, idx, xmax, temp, t, top_a, u)
    out = torch.empty(vals.shape[0], dtype=torch.long, device=vals.device)
    spill, keep = (~fits).nonzero().squeeze(1), fits.nonzero().squeeze(1)
    full = rows[spill if sel is None else sel[spill]]
    out[spill] = _draw_full(full, temp[spill], t[spill], min_p[spill], top_a[spill], u[spill], tmp)
    if keep.numel():
        out[keep] = _draw_in_head(
            vals[keep], idx[keep], xmax[keep], temp[keep], t[keep], top_a[keep], u[keep]
        )
    return out


def _draw_in_head(
    vals: Tensor, idx: Tensor, xmax: Tensor, temp: Tensor, t: Tensor, top_a: Tensor, u: Tensor
) -> Tensor:
    t = _min_p_top_a(xmax, temp, t, torch.zeros_like(t), top_a, lambda tt: _lse(vals, temp, tt))
    return idx.gather(1, _draw(_weights(vals, xmax, temp, t), u)[:, None]).squeeze(1)


_BLOCK = 256


def _draw(w: Tensor, u: Tensor) -> Tensor:
    """Inverse CDF: per row of weights w [m, n] >= 0, the first index whose running sum exceeds u * total.

    Two levels: the block of 256 holding the target from the block sums' running sum, then the index within
    that block, so no [m, n] running sum is formed. Never returns a zero-weight index.
    """
    m, n = w.shape
    nfull = n // _BLOCK
    sums = w[:, : nfull * _BLOCK].unflatten(1, (nfull, _BLOCK)).sum(-1)  # [m, nfull]
    if nfull * _BLOCK < n:
        sums = torch.cat([sums, w[:, nfull * _BLOCK :].sum(-1, keepdim=True)], 1)
    cdf = sums.cumsum(-1)
    target = torch.minimum(u * cdf[:, -1], torch.nextafter(cdf[:, -1], torch.zeros_like(u)))
    b = torch.searchsorted(cdf, target[:, None], right=True).squeeze(1)  # first block with cdf > target
    before = torch.where(b > 0, cdf.gather(1, (b - 1).clamp(min=0)[:, None]).squeeze(1), 0.0)
    cols = b[:, None] * _BLOCK + torch.arange(_BLOCK, device=w.device)
    block = torch.where(cols < n, w.gather(1, cols.clamp(max=n - 1)), 0.0).cumsum(-1)
    rest = torch.minimum(target - before, torch.nextafter(block[:, -1], torch.zeros_like(u)))
    return b * _BLOCK + torch.searchsorted(block, rest[:, None], right=True).squeeze(1)


def _logprobs(
    x: Tensor,
    token_ids: Tensor,
    params: list[SamplingParams],
    tmp: Tensor,
    head: tuple[Tensor, Tensor, Tensor] | None,
) -> SamplerOutput:
    """log_softmax(x) = x - logsumexp(x) of the biased, penalised logits, for the rows that asked: at the
    sampled token and the top ``top_logprobs`` (from ``head`` = (rows, sorted values, ids) when it covers
    those rows)."""
    rows = [i for i, p in enumerate(params) if p.logprobs]
    if not rows:
        return SamplerOutput(token_ids)
    n, device = x.shape[0], x.device
    k = max(params[i].top_logprobs for i in rows)
    index = torch.tensor(rows, device=device)
    xr = x if len(rows) == n else x.index_select(0, index)
    m = xr.amax(-1)
    lse = torch.sub(xr, m[:, None], out=tmp[: len(rows)]).exp_().sum(-1).log_().add_(m)
    logprobs = torch.full((n,), float("nan"), device=device)
    logprobs[index] = x[index, token_ids[index]] - lse
    if not k:
        return SamplerOutput(token_ids, logprobs)
    if head is not None:
        pos = torch.full((n,), -1, dtype=torch.long, device=device)
        pos[head[0]] = torch.arange(head[0].numel(), device=device)
        at = pos[index]
        vals, ids = head[1][at, :k], head[2][at, :k]
    else:
        vals, ids = xr.topk(k)
    top_ids = torch.full((n, k), -1, dtype=torch.long, device=device)
    top_lp = torch.full((n, k), float("nan"), device=device)
    top_ids[index], top_lp[index] = ids, vals - lse[:, None]
    return SamplerOutput(token_ids, logprobs, top_ids, top_lp)
