"""SamplingParams: defaults, accepted spellings, and range errors that name the field, the value and the range."""

from __future__ import annotations

import dataclasses
import pickle

import pytest

from dsv32.engine.sampling_params import SamplingParams, SamplingParamsError


def test_defaults_are_the_api_defaults() -> None:
    p = SamplingParams()
    assert (p.temperature, p.top_p, p.top_k, p.min_p, p.top_a) == (1.0, 1.0, -1, 0.0, 0.0)
    assert (p.frequency_penalty, p.presence_penalty, p.repetition_penalty) == (0.0, 0.0, 1.0)
    assert p.max_tokens == 16  # (vLLM's default; None: until the context is full)
    assert p.stop is None and p.seed is None and p.logit_bias is None
    assert not p.logprobs and p.top_logprobs == 0 and p.skip_special_tokens and not p.ignore_eos
    assert not p.greedy and SamplingParams(temperature=0).greedy


def test_accepted_spellings() -> None:
    assert SamplingParams(stop="###").stop == ["###"]
    assert SamplingParams(stop=("a", "b")).stop == ["a", "b"]
    assert SamplingParams(logit_bias={"42": -100, 7: 1.5}).logit_bias == {42: -100, 7: 1.5}
    assert SamplingParams(stop_token_ids=(1, 2)).stop_token_ids == [1, 2]
    SamplingParams(top_k=0)
    SamplingParams(top_k=-1)
    SamplingParams(temperature=0, top_p=1e-9, seed=2**64 - 1, max_tokens=1)
    SamplingParams(stop=[f"s{i}" for i in range(16)])
    SamplingParams(logprobs=True, top_logprobs=20)


def test_plain_data() -> None:
    p = SamplingParams(
        temperature=0.7, stop=["x"], logit_bias={3: 2.0}, seed=5, logprobs=True, top_logprobs=3
    )
    assert pickle.loads(pickle.dumps(p)) == p
    assert dataclasses.replace(p, seed=6).seed == 6
    assert all(
        isinstance(v, (type(None), bool, int, float, list, dict)) for v in dataclasses.asdict(p).values()
    )


BAD = [
    ("max_tokens", 0, "max_tokens"),
    ("max_tokens", 1.5, "max_tokens"),
    ("temperature", -0.1, "[0, 2]"),
    ("temperature", 2.01, "[0, 2]"),
    ("temperature", float("nan"), "[0, 2]"),
    ("temperature", "hot", "[0, 2]"),
    ("top_p", 0.0, "(0, 1]"),
    ("top_p", 1.1, "(0, 1]"),
    ("top_k", -2, ">= 1"),
    ("top_k", 2.5, ">= 1"),
    ("top_k", True, ">= 1"),
    ("min_p", 1.5, "[0, 1]"),
    ("min_p", -0.1, "[0, 1]"),
    ("top_a", 2.0, "[0, 1]"),
    ("frequency_penalty", 2.5, "[-2, 2]"),
    ("frequency_penalty", -2.5, "[-2, 2]"),
    ("presence_penalty", 3, "[-2, 2]"),
    ("repetition_penalty", 0.0, "(0, 2]"),
    ("repetition_penalty", -1.0, "(0, 2]"),
    ("repetition_penalty", 2.5, "(0, 2]"),
    ("seed", 2**64, "seed"),
    ("seed", 1.0, "seed"),
    ("seed", "7", "seed"),
    ("stop", [f"s{i}" for i in range(17)], "at most 16"),
    ("stop", 5, "at most 16"),
    ("ignore_eos", 1, "true or false"),
    ("logprobs", "yes", "true or false"),
    ("skip_special_tokens", None, "true or false"),
    ("top_logprobs", 21, "[0, 20]"),
    ("top_logprobs", -1, "[0, 20]"),
    ("logit_bias", [1, 2], "token_id"),
    ("min_tokens", -1, ">= 0"),
    ("min_tokens", 1.5, ">= 0"),
    ("n", 0, "[1, 128]"),
    ("n", 129, "[1, 128]"),
    ("n", 2.0, "[1, 128]"),
]


@pytest.mark.parametrize(("name", "value", "allowed"), BAD, ids=[f"{n}={v!r}"[:40] for n, v, _ in BAD])
def test_out_of_range_names_field_value_and_range(name: str, value: object, allowed: str) -> None:
    kw = {name: value}
    if name == "top_logprobs":
        kw["logprobs"] = True
    with pytest.raises(SamplingParamsError) as e:
        SamplingParams(**kw)
    msg = str(e.value)
    assert e.value.field == name and msg.startswith(name)
    assert repr(value) in msg and allowed in msg
    assert isinstance(e.value, ValueError)


@pytest.mark.parametrize(
    ("kw", "field", "fragment"),
    [
        ({"stop": ["ok", ""]}, "stop[1]", "non-empty"),
        ({"stop": ["ok", 3]}, "stop[1]", "non-empty"),
        ({"top_logprobs": 5}, "top_logprobs", "logprobs is true"),
        ({"logit_bias": {5: 100.5}}, "logit_bias[5]", "[-100, 100]"),
        ({"logit_bias": {5: -101}}, "logit_bias[5]", "[-100, 100]"),
        ({"logit_bias": {-3: 1.0}}, "logit_bias[-3]", ">= 0"),
        ({"logit_bias": {"x": 1.0}}, "logit_bias['x']", ">= 0"),
        ({"stop_token_ids": [1, -5]}, "stop_token_ids[1]", ">= 0"),
        ({"stop_token_ids": 3}, "stop_token_ids", "list"),
    ],
)
def test_structured_fields(kw: dict, field: str, fragment: str) -> None:
    with pytest.raises(SamplingParamsError) as e:
        SamplingParams(**kw)
    assert e.value.field == field and str(e.value).startswith(field) and fragment in str(e.value)


def test_token_ids_checked_against_the_vocabulary() -> None:
    p = SamplingParams(logit_bias={99: 1.0}, stop_token_ids=[0, 99])
    p.validate(100)
    with pytest.raises(SamplingParamsError, match=r"logit_bias\[100\].*\[0, 99\].*100"):
        SamplingParams(logit_bias={100: 1.0}).validate(100)
    with pytest.raises(SamplingParamsError, match=r"stop_token_ids\[0\].*\[0, 99\]"):
        SamplingParams(stop_token_ids=[100]).validate(100)


def test_validate_sees_later_mutation() -> None:
    p = SamplingParams()
    p.temperature = 3.0
    with pytest.raises(SamplingParamsError, match="temperature"):
        p.validate()


def test_n_samples_are_single_requests_with_seeds_of_their_own() -> None:
    p = SamplingParams(n=3, seed=5, temperature=0.7, stop=["x"])
    assert [(q.n, q.seed, q.temperature, q.stop) for q in p.samples()] == [
        (1, s, 0.7, ["x"]) for s in (5, 6, 7)
    ]
    assert [q.seed for q in SamplingParams(n=2).samples()] == [None, None]  # unseeded: each draws its own
    top = 2**64 - 1  # the largest seed: the next one wraps to the seed torch takes as the same
    assert [q.seed for q in SamplingParams(n=2, seed=top).samples()] == [top, 0]
    assert SamplingParams().samples() == [SamplingParams()]


def test_min_tokens_is_bounded_by_max_tokens_and_not_for_constrained_output() -> None:
    with pytest.raises(SamplingParamsError, match=r"at most max_tokens \(3\)"):
        SamplingParams(max_tokens=3, min_tokens=4)
    with pytest.raises(SamplingParamsError, match="structured output"):
        SamplingParams(min_tokens=1, guided={"json_object": True})
    assert SamplingParams(max_tokens=3, min_tokens=3).min_tokens == 3
