"""The batched sampler against a plain per-row float64 reference of each definition."""

from __future__ import annotations

import math

import pytest
import torch

from dsv32.engine.sampler import Sampler, SamplingState, _apply_penalties, _draw, _sample
from dsv32.engine.sampling_params import SamplingParams

SAMPLER = Sampler()


def state(prompt: list[int] | None = None, output: list[int] | None = None, **kw) -> SamplingState:
    s = SamplingState.create(SamplingParams(**kw), prompt or [0])
    s.output_ids.extend(output or [])
    return s


def banned(s: SamplingState, words: list[list[int]]) -> SamplingState:
    s.params.bad_words = ["(tokenized by the engine)"]
    s.bad_words_ids = words
    return s


def processed_ref(row: torch.Tensor, s: SamplingState) -> torch.Tensor:
    """Steps 0-3 of the sampler's definition, one row, float64."""
    x = row.double().clone()
    p = s.params
    if p.allowed_token_ids:
        x[[t for t in range(x.numel()) if t not in p.allowed_token_ids]] = -math.inf
    for w in s.bad_words_ids:
        if len(w) == 1 or (
            len(s.output_ids) >= len(w) - 1 and s.output_ids[len(s.output_ids) - len(w) + 1 :] == w[:-1]
        ):
            x[w[-1]] = -math.inf
    for t, b in (p.logit_bias or {}).items():
        x[t] += b
    for t in set(s.prompt_ids) | set(s.output_ids):
        r = p.repetition_penalty
        x[t] = x[t] / r if x[t] > 0 else x[t] * r
    for t in set(s.output_ids):
        c = s.output_ids.count(t)
        x[t] -= p.frequency_penalty * c + p.presence_penalty
    return x


def filtered_ref(row: torch.Tensor, p: SamplingParams) -> torch.Tensor:
    """Step 5: temperature, then top_k, top_p, min_p, top_a, each on the renormalised survivors. Returns the
    sampling distribution (float64)."""
    x = row.double() / p.temperature
    v = x.numel()
    keep = torch.ones(v, dtype=torch.bool)

    def probs() -> torch.Tensor:
        return torch.softmax(torch.where(keep, x, -math.inf), 0)

    if 0 < p.top_k < v:
        keep &= x >= x.sort(descending=True).values[p.top_k - 1]
    if p.top_p < 1:
        q, order = probs().sort(descending=True, stable=True)
        kept = ((q.cumsum(0) - q) < p.top_p) & (q > 0)  # mass ranked above < top_p
        keep &= x >= x[order[kept]].min()
    if p.min_p > 0:
        q = probs()
        keep &= q >= p.min_p * q.max()
    if p.top_a > 0:
        q = probs()
        keep &= q >= p.top_a * q.max() ** 2
    return probs()


def u_grid_histogram(xs: torch.Tensor, p: SamplingParams, m: int = 20000) -> torch.Tensor:
    """Empirical distribution of _sample over a uniform grid of u (the draw is the only randomness)."""
    u = (torch.arange(m, dtype=torch.float64) + 0.5) / m
    rows = xs.float().expand(m, -1)
    full = lambda v: torch.full((m,), v)  # noqa: E731
    tmp = torch.empty(m, xs.numel())
    tok, _ = _sample(
        rows, full(p.temperature), full(p.top_k), full(p.top_p), full(p.min_p), full(p.top_a), u.float(), tmp
    )
    return torch.bincount(tok, minlength=xs.numel()).double() / m


FILTER_CASES = [
    dict(temperature=1.0),
    dict(temperature=0.6),
    dict(top_k=5),
    dict(top_k=1, temperature=1.7),
    dict(top_p=0.5),
    dict(top_p=0.9, temperature=1.3),
    dict(min_p=0.05),
    dict(min_p=0.3, temperature=0.8),
    dict(top_a=0.2),
    dict(top_a=0.9),
    dict(top_k=12, top_p=0.8, min_p=0.05, top_a=0.1, temperature=0.9),
    dict(top_k=30, top_p=0.95),
    dict(top_p=0.7, top_a=0.5),
]


@pytest.mark.parametrize("kw", FILTER_CASES, ids=lambda kw: ",".join(f"{k}={v}" for k, v in kw.items()))
def test_filters_keep_exactly_the_reference_distribution(kw: dict) -> None:
    torch.manual_seed(0)
    row = torch.randn(48) * 2
    p = SamplingParams(**kw)
    want = filtered_ref(row, p)
    got = u_grid_histogram(row, p)
    assert not bool((got > 0)[want == 0].any())  # nothing outside the kept set is ever drawn
    assert bool((got > 0)[want > 3e-4].all())  # every kept token likely enough to be hit is drawn
    assert (got - want).abs().max() < 2e-4


def test_top_p_nucleus_larger_than_the_first_candidates() -> None:
    # A nucleus of ~515 tokens: past the first 64-token head and the next 512-token one.
    torch.manual_seed(1)
    row = torch.cat([torch.randn(520) * 0.05 + 10, torch.randn(3480) * 0.05])[torch.randperm(4000)]
    p = SamplingParams(top_p=0.99)
    want = filtered_ref(row, p)
    assert 512 < int((want > 0).sum()) < 520
    got = u_grid_histogram(row, p, m=1500)
    assert torch.equal(got > 0, want > 0)
    assert (got - want).abs().max() < 1.5 / 1500
    # Flat logits: the nucleus holds most of the row, which ends in a full sort.
    for top_p in (0.9, 0.3):
        row = torch.randn(40000) * 0.5
        p = SamplingParams(top_p=top_p)
        want = filtered_ref(row, p)
        assert int((want > 0).sum()) > 4096
        got = u_grid_histogram(row, p, m=64)
        assert not bool((got > 0)[want == 0].any()) and int((got > 0).sum()) > 50


def test_rows_decided_at_different_head_sizes_in_one_batch() -> None:
    torch.manual_seed(11)
    v, m = 1000, 3000
    peaked = torch.randn(v) * 4
    flat = torch.randn(v) * 0.3
    cases = [(peaked, SamplingParams(top_p=0.8)), (flat, SamplingParams(top_p=0.9, temperature=1.5)),
             (peaked, SamplingParams(top_k=40, top_p=0.95, top_a=0.05)), (flat, SamplingParams(min_p=0.5))]  # fmt: skip
    u = ((torch.arange(m, dtype=torch.float64) + 0.5) / m).float().repeat(len(cases))
    rows = torch.cat([row.expand(m, -1) for row, _ in cases])
    col = lambda f: torch.tensor([getattr(p, f) for _, p in cases]).repeat_interleave(m)  # noqa: E731
    tok, _ = _sample(rows, col("temperature"), col("top_k"), col("top_p"), col("min_p"), col("top_a"), u,
                     torch.empty(rows.shape))  # fmt: skip
    for i, (row, p) in enumerate(cases):
        got = torch.bincount(tok[i * m : (i + 1) * m], minlength=v).double() / m
        want = filtered_ref(row, p)
        assert not bool((got > 0)[want == 0].any()), i
        assert (got - want).abs().max() < 2.0 / m, i


def test_ties_at_the_cut_off_are_kept() -> None:
    # bf16-like logits: many exact ties, some running past the top_k head.
    row = torch.tensor([5.0, 4.0, 4.0, 4.0, 4.0, 4.0, 3.0, 3.0] + [0.0] * 40)
    for kw in (dict(top_k=2), dict(top_k=3, min_p=0.01), dict(top_p=0.3), dict(top_k=7, top_a=0.01)):
        p = SamplingParams(**kw)
        want = filtered_ref(row, p)
        got = u_grid_histogram(row, p)
        assert torch.equal(got > 0, want > 0), kw
        assert (got - want).abs().max() < 2e-4


def test_temperature_zero_is_argmax() -> None:
    torch.manual_seed(2)
    logits = torch.randn(6, 1000)
    logits[3, [10, 20]] = 50.0  # a tie: the first index wins
    out = SAMPLER(logits, [state(temperature=0) for _ in range(6)])
    assert torch.equal(out.token_ids, logits.argmax(-1))
    assert out.token_ids[3] == 10 and out.logprobs is None


def test_top_k_one_is_greedy() -> None:
    torch.manual_seed(3)
    logits = torch.randn(8, 5000) * 3
    for seed in range(5):
        states = [state(top_k=1, temperature=1.5, seed=seed * 8 + i) for i in range(8)]
        assert torch.equal(SAMPLER(logits, states).token_ids, logits.argmax(-1))


def test_logit_bias_forces_and_forbids() -> None:
    torch.manual_seed(4)
    logits = torch.randn(2, 300)
    forced = SAMPLER(logits, [state(logit_bias={123: 100.0}, seed=i) for i in range(2)]).token_ids
    assert forced.tolist() == [123, 123]
    top = int(logits[0].argmax())
    greedy = SAMPLER(logits[:1], [state(temperature=0, logit_bias={top: -100})]).token_ids
    assert int(greedy) == int(logits[0].topk(2).indices[1])
    # -100 on the 5 most likely tokens of a peaked row: never drawn
    peaked = torch.zeros(1, 300)
    peaked[0, :5] = 8.0
    states = [state(logit_bias={t: -100 for t in range(5)}, seed=i) for i in range(300)]
    drawn = SAMPLER(peaked.expand(300, -1), states).token_ids
    assert int(drawn.min()) >= 5


def test_allowed_token_ids_and_bad_words_ban_the_rest() -> None:
    """Step 0: a token outside ``allowed_token_ids``, or a bad word's last token right after its other tokens,
    is never sampled (greedy or drawn) and has logprob -inf; a bad word's partial prefix bans nothing."""
    torch.manual_seed(7)
    v = 400
    logits = torch.randn(6, v) * 3
    allowed = [3, 77, 250, 399]
    order = logits.argsort(-1, descending=True).tolist()  # each row's tokens, most likely first
    states = [
        state(allowed_token_ids=allowed, temperature=0, logprobs=True, top_logprobs=6),
        banned(state(output=[5, 9], temperature=0), [[order[1][0]]]),  # one token: banned anywhere
        banned(state(output=[5, 9], temperature=0), [[8, 9, order[2][0]]]),  # output ends 9, not 8 9
        banned(state(output=[8, 9], temperature=0), [[8, 9, order[3][0]]]),  # ends 8 9: its last is banned
        banned(
            state(output=[], temperature=0), [[8, 9, order[4][0]], [order[4][1], 4]]
        ),  # too short; a prefix
        state(temperature=0),
    ]
    out = SAMPLER(logits, states)
    best_allowed = max(allowed, key=lambda t: float(logits[0, t]))
    assert out.token_ids.tolist() == [
        best_allowed,
        order[1][1],
        order[2][0],
        order[3][1],
        order[4][0],
        order[5][0],
    ]
    assert set(out.top_ids[0, :4].tolist()) == set(allowed)
    assert out.top_logprobs[0, 4:].tolist() == [-math.inf, -math.inf]  # only 4 tokens have any probability
    want = torch.log_softmax(processed_ref(logits[0], states[0]), 0)
    assert out.top_logprobs[0, :4].double() == pytest.approx(want.topk(4).values, abs=2e-6)
    # drawn: every draw among the allowed tokens, and each allowed token drawn; a banned one never
    draws = SAMPLER(
        logits[:1].expand(400, -1), [state(allowed_token_ids=allowed, seed=i) for i in range(400)]
    )
    assert set(draws.token_ids.tolist()) == set(allowed)
    flat = torch.zeros(1, v)
    draws = SAMPLER(
        flat.expand(400, -1),
        [banned(state(output=[1], seed=i), [[t] for t in range(1, v)]) for i in range(400)],
    )
    assert set(draws.token_ids.tolist()) == {0}
    # the logits the caller passed are untouched
    assert torch.isfinite(logits).all()
    # bans that leave nothing (every allowed token a bad word): -1, greedy or drawn, beside rows that go on
    stuck = [
        banned(state(allowed_token_ids=[3, 77], **kw), [[3], [77]])
        for kw in ({"temperature": 0}, {"seed": 1})
    ]
    out = SAMPLER(logits[:3], [*stuck, state(temperature=0)])
    assert out.token_ids.tolist() == [-1, -1, order[2][0]]


def test_repetition_penalty_exact() -> None:
    logits = torch.tensor([[0.5, 2.0, -1.5, 1.7, 0.0, -0.2]])
    s = state(prompt=[1], output=[2, 2, 5], repetition_penalty=1.25, temperature=0)
    x = logits.clone()
    _apply_penalties(x, [s])
    # seen = {1 (prompt), 2, 5 (output)}: positive logits divided, negative multiplied, others untouched
    r = torch.tensor(1.25)
    want = logits[0].clone()
    want[1], want[2], want[5] = want[1] / r, want[2] * r, want[5] * r
    assert torch.equal(x[0], want)
    assert x[0].tolist() == pytest.approx([0.5, 1.6, -1.875, 1.7, 0.0, -0.25], rel=1e-7)
    # token 1 was the argmax (2.0); penalised to 1.6 it loses to token 3 (1.7)
    assert int(SAMPLER(logits, [s]).token_ids) == 3
    assert int(SAMPLER(logits, [state(prompt=[1], temperature=0)]).token_ids) == 1
    # its probability drops exactly as defined
    out = SAMPLER(logits, [state(prompt=[1], repetition_penalty=1.25, logprobs=True, top_logprobs=6)])
    want = torch.log_softmax(processed_ref(logits[0], state(prompt=[1], repetition_penalty=1.25)), 0)
    lp = dict(zip(out.top_ids[0].tolist(), out.top_logprobs[0].tolist(), strict=True))
    assert lp[1] == pytest.approx(float(want[1]), abs=1e-6)
    assert lp[1] < float(torch.log_softmax(logits[0].double(), 0)[1])


def test_frequency_and_presence_penalties_exact() -> None:
    logits = torch.tensor([[1.0, 1.0, 1.0, 1.0, 1.0]])
    s = state(prompt=[0, 4], output=[1, 1, 1, 3], frequency_penalty=0.5, presence_penalty=0.25)
    x = logits.clone()
    _apply_penalties(x, [s])
    # output counts only (the prompt's tokens 0 and 4 are untouched)
    assert x[0].tolist() == [1.0, 1.0 - 3 * 0.5 - 0.25, 1.0, 1.0 - 0.5 - 0.25, 1.0]
    neg = state(output=[2], frequency_penalty=-2.0, presence_penalty=-2.0)
    x = logits.clone()
    _apply_penalties(x, [neg])
    assert x[0].tolist() == [1.0, 1.0, 5.0, 1.0, 1.0]


def test_penalties_in_a_mixed_batch_match_the_reference() -> None:
    torch.manual_seed(5)
    v = 700
    logits = torch.randn(7, v) * 2
    states = [
        state(prompt=[1, 2, 3, 3], output=[4, 4, 9, 1], repetition_penalty=1.3, frequency_penalty=0.4),
        state(prompt=[5, 6], output=[], presence_penalty=1.0, logit_bias={5: 3.0, 699: -2.5}),
        state(prompt=[7], output=[7, 8, 8, 8], repetition_penalty=0.8, presence_penalty=-0.5),
        state(prompt=list(range(100)), output=list(range(50, 150)) * 3, frequency_penalty=0.1),
        state(prompt=[1], output=[1]),
        state(prompt=[2], output=[3, 3], allowed_token_ids=list(range(0, v, 3)), repetition_penalty=1.5),
        banned(state(prompt=[2], output=[3, 4], logit_bias={10: 5.0}), [[4, 10], [11], [3, 5, 12]]),
    ]
    for s in states:
        s.params.logprobs, s.params.top_logprobs = True, 20
    out = SAMPLER(logits, states)
    for i, s in enumerate(states):
        want = torch.log_softmax(processed_ref(logits[i], s), 0)
        assert out.logprobs[i] == pytest.approx(float(want[out.token_ids[i]]), abs=2e-5)
        assert out.top_logprobs[i].double() == pytest.approx(want.topk(20).values, abs=2e-5)
        assert torch.equal(out.top_ids[i], want.topk(20).indices)


def test_logprobs_are_before_temperature_and_truncation() -> None:
    torch.manual_seed(6)
    logits = torch.randn(4, 1000) * 2
    states = [
        state(temperature=0.3, top_k=3, logprobs=True, top_logprobs=5, seed=1),
        state(temperature=0, logprobs=True),
        state(temperature=1.9, top_p=0.2, seed=2),  # did not ask
        state(min_p=0.2, logprobs=True, top_logprobs=2, seed=3),
    ]
    out = SAMPLER(logits, states)
    lsm = torch.log_softmax(logits, -1)
    assert out.top_ids.shape == (4, 5) and out.top_logprobs.shape == (4, 5)
    for i in (0, 1, 3):
        assert float(out.logprobs[i]) == pytest.approx(float(lsm[i, out.token_ids[i]]), abs=1e-6)
    assert torch.equal(out.top_ids[0], lsm[0].topk(5).indices)
    assert torch.allclose(out.top_logprobs[0], lsm[0].topk(5).values, atol=1e-6)
    assert torch.equal(out.top_ids[3, :2], lsm[3].topk(2).indices)
    assert math.isnan(float(out.logprobs[2])) and out.top_ids[2].tolist() == [-1] * 5
    assert out.top_ids[1].tolist() == [-1] * 5 or torch.equal(out.top_ids[1], lsm[1].topk(5).indices)
    no_top = SAMPLER(logits[:1], [state(logprobs=True, seed=0)])
    assert no_top.logprobs is not None and no_top.top_ids is None and no_top.top_logprobs is None


def test_top_logprobs_from_the_sampling_head() -> None:
    # Every row asking top_logprobs samples with top_k / top_p: the sampler reuses that sorted head.
    torch.manual_seed(12)
    logits = torch.randn(4, 3000) * 2
    states = [
        state(top_k=3, logprobs=True, top_logprobs=20, seed=1, logit_bias={7: 4.0}),
        state(top_p=0.5, logprobs=True, top_logprobs=4, seed=2, temperature=0.5),
        state(seed=3),  # plain temperature, no logprobs
        state(top_p=0.9, top_k=50, logprobs=True, seed=4),
    ]
    out = SAMPLER(logits, states)
    for i in (0, 1):
        want = torch.log_softmax(processed_ref(logits[i], states[i]), 0)
        k = states[i].params.top_logprobs
        assert torch.equal(out.top_ids[i, :k], want.topk(k).indices)
        assert torch.allclose(out.top_logprobs[i, :k].double(), want.topk(k).values, atol=1e-5)
    assert out.top_ids[2].tolist() == [-1] * 20
    assert float(out.logprobs[3]) == pytest.approx(
        float(torch.log_softmax(logits[3], 0)[out.token_ids[3]]), abs=1e-5
    )


def run_steps(row_logits: list[torch.Tensor], states: list[SamplingState], target: int) -> list[int]:
    """Sample len(row_logits) steps; row `target` gets row_logits[step], the others random logits."""
    gen = torch.Generator().manual_seed(99)
    got = []
    for step_logits in row_logits:
        batch = torch.randn(len(states), step_logits.numel(), generator=gen) * 2
        batch[target] = step_logits
        out = SAMPLER(batch, states)
        for s, t in zip(states, out.token_ids.tolist(), strict=True):
            s.output_ids.append(t)
        got.append(out.token_ids[target].item())
    return got


def test_seed_gives_the_same_tokens_alone_or_in_any_batch() -> None:
    torch.manual_seed(7)
    v = 2000
    steps = [torch.randn(v) * 1.5 for _ in range(40)]
    kw = dict(seed=1234, temperature=0.9, top_p=0.95, frequency_penalty=0.3)
    alone = run_steps(steps, [state(**kw)], 0)
    others = [
        dict(),
        dict(seed=5, top_k=20),
        dict(temperature=0),
        dict(min_p=0.1, top_a=0.2, seed=6),
        dict(top_p=0.5, repetition_penalty=1.2, logprobs=True, top_logprobs=4),
    ]
    for pos in (0, 2, 5):
        batch = [state(**o) for o in others]
        batch.insert(pos, state(**kw))
        assert run_steps(steps, batch, pos) == alone
    assert run_steps(steps, [state(**{**kw, "seed": 1235})], 0) != alone
    # unseeded requests draw from fresh entropy
    assert run_steps(steps, [state(temperature=0.9)], 0) != run_steps(steps, [state(temperature=0.9)], 0)


def test_sampling_frequencies_follow_the_distribution() -> None:
    torch.manual_seed(8)
    row = torch.randn(10) * 1.5
    n = 20000
    states = [state(temperature=0.7, seed=i) for i in range(n)]
    toks = SAMPLER(row.expand(n, -1), states).token_ids
    freq = torch.bincount(toks, minlength=10).double() / n
    want = torch.softmax(row.double() / 0.7, 0)
    assert ((freq - want).abs() <= 5 * (want * (1 - want) / n).sqrt() + 1e-9).all()


def test_inputs_untouched_bf16_and_output_cache() -> None:
    torch.manual_seed(9)
    logits = torch.randn(3, 400)
    before = logits.clone()
    states = [
        state(output=[1, 2], repetition_penalty=1.5, logit_bias={3: 5.0}, temperature=0) for _ in range(3)
    ]
    out = SAMPLER(logits, states)
    assert torch.equal(logits, before)
    plain = [
        state(top_p=0.5, min_p=0.1, seed=1),
        state(top_a=0.3, seed=2),
        state(logprobs=True, top_logprobs=3),
    ]
    SAMPLER(logits, plain)
    assert torch.equal(logits, before)
    out16 = SAMPLER(logits.bfloat16(), states)
    assert out16.token_ids.dtype == torch.long and out.token_ids.shape == (3,)
    # the output-id tensor follows the list as the engine appends, and survives a replaced list
    s = states[0]
    for t in range(200):
        s.output_ids.append(t % 7)
        if t % 37 == 0:
            assert s.output_tensor().tolist() == s.output_ids
    s.output_ids = [4, 4]
    assert s.output_tensor().tolist() == [4, 4]


def test_rejects_mismatched_batch() -> None:
    with pytest.raises(ValueError, match="2 rows"):
        SAMPLER(torch.zeros(2, 10), [state()])


def test_two_level_draw_is_the_exact_inverse_cdf() -> None:
    torch.manual_seed(10)
    n = 1000  # not a multiple of the 256-wide blocks
    w = torch.rand(n) * (torch.rand(n) < 0.3)
    w[-1] = 0.0
    m = 50000
    u = (torch.arange(m, dtype=torch.float64) + 0.5) / m
    idx = _draw(w.expand(m, -1), u.float())
    want = w.double() / w.double().sum()
    got = torch.bincount(idx, minlength=n).double() / m
    assert bool((w[idx] > 0).all())
    assert (got - want).abs().max() < 2.0 / m
    # the extreme draws land on the first and the last positive weight
    ends = _draw(w.expand(2, -1), torch.tensor([0.0, 1.0 - 2**-24]))
    positive = (w > 0).nonzero().squeeze(1)
    assert ends.tolist() == [int(positive[0]), int(positive[-1])]
