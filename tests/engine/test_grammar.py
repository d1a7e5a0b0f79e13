"""Grammar-constrained decoding: spec checks, masks in a mixed batch, the per-request state (thinking start,
forced end of reasoning, rollback, completion), the DSML tool grammar against our parser, and the engine
end to end on the default model (random weights): every constrained output parses and validates."""

from __future__ import annotations

import json

import jsonschema
import pytest
import torch

from dsv32.chat import load_tokenizer, parse_completion
from dsv32.engine.grammar import (
    GrammarCompiler,
    GrammarMasker,
    GuidedDecodingError,
    check_guided,
    dsml_tool_grammar,
    tokenizer_json_text,
)
from dsv32.engine.sampling_params import SamplingParams, SamplingParamsError
from dsv32.weights.default_model import ensure_default_model

ROWS = 129280  # the default model's vocabulary rows (the tokenizer has 128,815 ids)
THINK_END = 128799


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(ensure_default_model())


@pytest.fixture(scope="module")
def compiler(tokenizer):
    return GrammarCompiler.for_tokenizer(tokenizer, ROWS)


def walk(compiler, guided, seed: int, steps: int = 200, logits_fn=None) -> tuple[list[int], bool]:
    """Sample under the constraint from random logits: (tokens, finished)."""
    g = torch.Generator().manual_seed(seed)
    state = compiler.new_state(guided)
    masker = GrammarMasker(compiler)
    out = []
    for _ in range(steps):
        logits = torch.randn(1, ROWS, generator=g) * 4 if logits_fn is None else logits_fn(g)
        if state.needs_mask:
            masker.apply(logits, [0], [state])
        tok = int(torch.multinomial(torch.softmax(logits[0], -1), 1, generator=g))
        out.append(tok)
        if state.advance(tok):
            return out, True
    return out, False


# ---- spec checks ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "guided, words",
    [
        ("json", "object"),
        ({"json_schema": {}, "lark": "start: /a/"}, "not json_schema and lark"),
        ({"jsn": {}}, "unknown"),
        ({"json_object": False}, "json_object"),
        ({"json_schema": {"type": "array", "uniqueItems": True}}, "uniqueItems"),
        ({"json_schema": {"type": "object", "if": {}, "then": {}}}, "if"),
        ({"lark": "start: foo"}, "lark"),
        ({"regex": "("}, "regex"),
        ({"start_within": 3}, "start_token"),
        ({"start_token": -1}, "start_token"),
        ({}, "one of"),
    ],
)
def test_bad_specs_are_refused_naming_the_problem(guided, words):
    with pytest.raises(GuidedDecodingError) as e:
        check_guided(guided)
    assert words.lower() in str(e.value).lower()
    with pytest.raises(SamplingParamsError):  # the same through SamplingParams (a 422 at the API)
        SamplingParams(guided=guided)


def test_compiled_grammars_are_cached(compiler):
    spec = {"json_schema": {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}}
    compiler.matcher(spec)
    n = len(compiler._templates)
    compiler.matcher(json.loads(json.dumps(spec)))  # same schema, another dict: no new compile
    assert len(compiler._templates) == n


# ---- masks ---------------------------------------------------------------------------------------------


def test_mask_applies_to_constrained_rows_only(compiler, tokenizer):
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(4, ROWS, generator=g)
    before = logits.clone()
    schema = {"type": "object", "properties": {"k": {"enum": ["yes", "no"]}}, "required": ["k"]}
    s1, s3 = compiler.new_state({"json_schema": schema}), compiler.new_state({"regex": "[0-9]+"})
    for t in tokenizer.encode('{"k": '):
        assert not s1.advance(t)
    GrammarMasker(compiler).apply(logits, [1, 3], [s1, s3])
    assert torch.equal(logits[0], before[0]) and torch.equal(logits[2], before[2])
    allowed1 = torch.isfinite(logits[1]).nonzero().squeeze(1).tolist()
    texts = {tokenizer.decode([t]) for t in allowed1}
    assert texts and all('"yes"'.startswith(x) or '"no"'.startswith(x) for x in texts), texts
    assert torch.equal(logits[1][torch.isfinite(logits[1])], before[1][torch.isfinite(logits[1])])
    allowed3 = torch.isfinite(logits[3]).nonzero().squeeze(1).tolist()
    assert allowed3 and all(tokenizer.decode([t]).isdigit() for t in allowed3)
    # control tokens and the padding rows past the tokenizer are never allowed
    assert not torch.isfinite(logits[[1, 3]][:, 128000:]).any()


def test_our_mask_slices_give_the_same_masks_as_llguidances_general_ones(compiler, tokenizer):
    """The finer string-length slices (``MASK_SLICES``) only change how a mask is computed: along sampled
    paths through bounded and unbounded strings, numbers and enums, every mask equals the one computed with
    llguidance's general slices."""
    general = GrammarCompiler(tokenizer_json_text(tokenizer), ROWS, tokenizer.eos_id, slices=None)
    schema = {
        "type": "array",
        "items": {
            "type": "object",
            "properties": {
                "short": {"type": "string", "maxLength": 12},
                "tiny": {"type": "string", "minLength": 2, "maxLength": 3},
                "free": {"type": "string"},
                "n": {"type": "integer"},
                "kind": {"enum": ["alpha", "beta"]},
            },
            "required": ["short", "tiny", "free", "n", "kind"],
            "additionalProperties": False,
        },
        "minItems": 3,
    }
    ours_masker, general_masker = GrammarMasker(compiler), GrammarMasker(general)
    g = torch.Generator().manual_seed(0)
    steps = 0
    for _ in range(2):
        ours, ref = compiler.new_state({"json_schema": schema}), general.new_state({"json_schema": schema})
        for _ in range(120):
            a, b = ours_masker.fill([ours]).clone(), general_masker.fill([ref])
            assert torch.equal(a, b), f"masks differ after {steps} tokens"
            logits = torch.randn(1, ROWS, generator=g) * 3
            ours_masker.apply_filled(logits, [0], a)
            tok = int(torch.multinomial(torch.softmax(logits[0], -1), 1, generator=g))
            steps += 1
            if ours.advance(tok) | ref.advance(tok):
                break
    assert steps > 100


def test_json_object_mode(compiler, tokenizer):
    state = compiler.new_state({"json_object": True})
    ids = tokenizer.encode('{"a": [1, {"b": null}], "c": "x"}')
    assert [state.advance(t) for t in ids] == [False] * (len(ids) - 1) + [True]  # done at the closing brace
    ids, _ = walk(compiler, {"json_object": True}, seed=0, steps=40)
    text = tokenizer.decode(ids, skip_special_tokens=True)
    assert text.startswith("{") and all(t < 128000 or t == tokenizer.eos_id for t in ids)


# ---- per-request state ----------------------------------------------------------------------------------


def test_thinking_is_free_until_think_end_then_constrained(compiler, tokenizer):
    state = compiler.new_state({"regex": "ok", "start_token": THINK_END})
    for t in tokenizer.encode("anything {at all"):
        assert not state.needs_mask and not state.advance(t)
    assert not state.advance(THINK_END) and state.needs_mask
    ids = tokenizer.encode("ok")
    assert [state.advance(t) for t in ids] == [False] * (len(ids) - 1) + [True]


def test_reasoning_budget_forces_think_end(compiler):
    ids, finished = walk(compiler, {"regex": "[ab]{1,3}", "start_token": THINK_END, "start_within": 5}, 1)
    assert finished and ids[5] == THINK_END and THINK_END not in ids[:5]


def test_rollback_restores_the_matcher(compiler, tokenizer):
    state = compiler.new_state({"json_schema": {"enum": ["alpha", "beta"]}, "start_token": THINK_END})
    state.advance(5)
    state.advance(THINK_END)
    first = tokenizer.encode('"al')
    for t in first:
        state.advance(t)
    state.rollback(len(first))
    for t in tokenizer.encode('"beta"'):
        done = state.advance(t)
    assert state.error is None and (done or state.matcher.is_accepting())
    state.rollback(100)  # past the start: free again
    assert state.phase == "free"


def test_forbidden_token_ends_the_request(compiler, tokenizer):
    state = compiler.new_state({"regex": "[0-9]+"})
    assert state.advance(tokenizer.encode("x")[0]) and state.error


# ---- DSML tool calls ----------------------------------------------------------------------------------------

WEATHER = {
    "name": "get_weather",
    "parameters": {
        "type": "object",
        "properties": {
            "city": {"type": "string", "maxLength": 12},
            "unit": {"enum": ["celsius", "fahrenheit"]},
            "days": {"type": "integer", "minimum": 1, "maximum": 14},
            "code": {"type": "string", "pattern": "^[A-Z]{3}$"},
            "opts": {
                "type": "object",
                "properties": {"hourly": {"type": "boolean"}, "tags": {"type": "array", "items": {"enum": [1, 2]}, "maxItems": 2}},
                "required": ["hourly", "tags"],
                "additionalProperties": False,
            },
            "note": {"type": ["string", "null"], "maxLength": 4},
        },
        "required": ["city", "unit", "days", "code"],
        "additionalProperties": False,
    },
}  # fmt: skip
NOARGS = {"name": "ping", "parameters": {"type": "object", "properties": {}}}
FREE = {"name": "search", "parameters": {"type": "object", "properties": {"q": {"type": "string"}}}}


def _calls(tokenizer, ids: list[int], tools) -> dict:
    text = tokenizer.decode([t for t in ids if t != tokenizer.eos_id])
    return parse_completion(text, tools=[{"type": "function", "function": f} for f in tools])


@pytest.mark.parametrize("seed", range(4))
def test_forced_call_parses_and_arguments_validate(compiler, tokenizer, seed):
    lark = dsml_tool_grammar([FREE, WEATHER, NOARGS], choice="function", name="get_weather")
    ids, finished = walk(compiler, {"lark": lark}, seed, steps=300)
    assert finished
    msg = _calls(tokenizer, ids, [FREE, WEATHER, NOARGS])
    assert msg["content"] in ("", None) and len(msg["tool_calls"]) == 1
    call = msg["tool_calls"][0]["function"]
    assert call["name"] == "get_weather"
    jsonschema.validate(json.loads(call["arguments"]), WEATHER["parameters"])


@pytest.mark.parametrize("seed", range(3))
def test_required_calls_any_tool_with_valid_arguments(compiler, tokenizer, seed):
    lark = dsml_tool_grammar([WEATHER, NOARGS], choice="required")
    ids, finished = walk(compiler, {"lark": lark}, seed, steps=400)
    assert finished
    calls = _calls(tokenizer, ids, [WEATHER, NOARGS])["tool_calls"]
    assert calls
    for c in calls:
        schema = {"get_weather": WEATHER, "ping": NOARGS}[c["function"]["name"]]["parameters"]
        jsonschema.validate(json.loads(c["function"]["arguments"]), schema)


def test_none_forbids_the_block_and_auto_allows_content(compiler, tokenizer):
    lark = dsml_tool_grammar([WEATHER], choice="none")
    state = compiler.new_state({"lark": lark})
    ok = [state.advance(t) for t in tokenizer.encode("Sure: no tools here.")]
    assert not any(ok) and state.error is None
    state = compiler.new_state({"lark": lark})
    for t in tokenizer.encode("text <｜DSML｜"):
        if state.advance(t):
            break
    assert state.error  # DSML markup cannot be written at all
    auto = dsml_tool_grammar([WEATHER], choice="auto", constrained={"get_weather"})
    state = compiler.new_state({"lark": auto})
    call = (
        'Checking.\n\n<｜DSML｜function_calls>\n<｜DSML｜invoke name="get_weather">\n'
        '<｜DSML｜parameter name="city" string="true">Oslo</｜DSML｜parameter>\n'
        '<｜DSML｜parameter name="unit" string="true">celsius</｜DSML｜parameter>\n'
        '<｜DSML｜parameter name="days" string="false">3</｜DSML｜parameter>\n'
        '<｜DSML｜parameter name="code" string="true">OSL</｜DSML｜parameter>\n'
        "</｜DSML｜invoke>\n</｜DSML｜function_calls>"
    )
    results = [state.advance(t) for t in tokenizer.encode(call)]
    assert state.error is None and results[-1] is True


def test_json_content_or_call_and_unsupported_tool_schema(compiler):
    lark = dsml_tool_grammar([WEATHER], choice="auto", content_schema={"type": "object"})
    check_guided({"lark": lark})
    bad = {
        "name": "f",
        "parameters": {"type": "object", "properties": {"x": {"type": "array", "uniqueItems": True}}},
    }
    with pytest.raises(GuidedDecodingError, match="uniqueItems"):
        check_guided({"lark": dsml_tool_grammar([bad], choice="required")})
    with pytest.raises(GuidedDecodingError, match="anyOf"):
        dsml_tool_grammar([{"name": "g", "parameters": {"anyOf": [{"type": "object"}]}}], choice="required")
    with pytest.raises(GuidedDecodingError, match="not in tools"):
        dsml_tool_grammar([WEATHER], choice="function", name="nope")


# ---- the engine -------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def llm():
    from dsv32.engine.llm import LLM

    return LLM()


SMALL = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 6},
        "n": {"type": "integer", "minimum": 0, "maximum": 99},
        "ok": {"type": "boolean"},
    },
    "required": ["name", "n", "ok"],
    "additionalProperties": False,
}


def test_engine_mixed_batch_length_cut_and_thinking(llm, tokenizer):
    free = SamplingParams(max_tokens=12, ignore_eos=True, seed=1)
    params = [
        SamplingParams(max_tokens=80, seed=2, guided={"json_schema": SMALL}),
        free,
        SamplingParams(max_tokens=80, seed=3, guided={"regex": "(yes|no)!"}),
        SamplingParams(max_tokens=3, seed=4, guided={"json_schema": SMALL}),  # cut inside the object
        SamplingParams(
            max_tokens=80, seed=5, guided={"json_schema": SMALL, "start_token": THINK_END, "start_within": 4}
        ),  # fmt: skip
    ]
    outs = llm.generate(["Answer:"] * len(params), params)
    assert outs[0].finish_reason == "stop"
    jsonschema.validate(json.loads(outs[0].text), SMALL)
    assert outs[1].finish_reason == "length" and len(outs[1].token_ids) == 12  # the free row is free
    assert outs[2].finish_reason == "stop" and outs[2].text in ("yes!", "no!")
    assert outs[3].finish_reason == "length" and len(outs[3].token_ids) == 3
    assert outs[3].text.startswith("{")
    think = outs[4]
    assert think.finish_reason == "stop" and think.token_ids[4] == THINK_END
    jsonschema.validate(json.loads(tokenizer.decode(think.token_ids[5:], skip_special_tokens=True)), SMALL)
    llm.engine.pool.assert_no_leaks()


def test_engine_without_tokenizer_refuses_constraints():
    from dsv32.engine.core import EngineCore, EngineError
    from dsv32.model.transformer import DeepseekForCausalLM
    from tests.model.test_forms import tiny_config

    core = EngineCore(DeepseekForCausalLM(tiny_config()).eval(), eos_id=None)
    with pytest.raises(EngineError, match="tokenizer"):
        core.add_request("a", [1, 2], SamplingParams(max_tokens=2, guided={"json_object": True}))


def test_bench_grammar_smoke(tmp_path):
    from dsv32.engine.bench_grammar import bench_grammar

    r = bench_grammar(tmp_path, tokens=2, batches=(1, 2), repeats=1)
    assert [x["batch"] for x in r["decode"]] == [1, 2]
    assert all(x["free_tok_s"] > 0 and x["constrained_tok_s"] > 0 for x in r["decode"])
    assert [c["properties"] for c in r["compile"]] == [200, 1000]
    assert (tmp_path / "bench_grammar.json").is_file() and "overhead" in (
        tmp_path / "bench_grammar.md"
    ).read_text()
