"""V3 / V3.1: our encoders render exactly what the chat templates render (fixtures written from the spec).

The templates run through transformers' ``render_jinja_template`` (what ``apply_chat_template`` uses), with
``continue_final_message`` for prefix messages. The shipped templates ignore ``tools``; the model card's tool
block is appended to the system prompt, so the expected side adds it as the last system message, built here
from the spec's text independently of the encoder.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from transformers.utils.chat_template_utils import render_jinja_template

from dsv32.chat import render_prompt
from tests.chat.corpus import CORPUS

FIXTURES = Path(__file__).parent / "fixtures"
BOS = "<｜begin▁of▁sentence｜>"
TEMPLATES = {
    "v3.1": (FIXTURES / "deepseek_v31.jinja").read_text(encoding="utf-8"),
    "v3": (FIXTURES / "deepseek_v3.jinja").read_text(encoding="utf-8"),
}
CALL_FORMATS = {
    "v3.1": "<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>tool_call_name<｜tool▁sep｜>tool_call_arguments"
    "<｜tool▁call▁end｜>{additional_tool_calls}<｜tool▁calls▁end｜>",
    "v3": "<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>tool_call_name\n```json\n"
    "tool_call_arguments\n```<｜tool▁call▁end｜>{additional_tool_calls}<｜tool▁calls▁end｜>",
}
CHAINING = {"v3.1": "chain them directly without separators or spaces", "v3": "put each on a new line"}


def tool_block(tools: list[dict[str, Any]], family: str) -> str:
    """chat-format.md §4: the V3.1 model card's tool description."""
    text = "## Tools\nYou have access to the following tools:\n\n"
    for t in tools:
        fn = t["function"]
        text += f"### {fn['name']}\nDescription: {fn.get('description', '')}\n\n"
        text += f"Parameters: {json.dumps(fn.get('parameters', {}))}\n\n"
    return text + (
        "IMPORTANT: ALWAYS adhere to this exact format for tool use:\n"
        f"{CALL_FORMATS[family]}\n\n"
        "Where:\n"
        "- `tool_call_name` must be an exact match to one of the available tools\n"
        "- `tool_call_arguments` must be valid JSON that strictly follows the tool's Parameters Schema\n"
        f"- For multiple tool calls, {CHAINING[family]}"
    )


def template_render(messages: list[dict[str, Any]], tools: list | None, family: str, thinking: bool) -> str:
    msgs = list(messages)
    # after every other system message (systems are hoisted), before the possibly continued last one
    if tools:
        msgs.insert(len(msgs) - 1, {"role": "system", "content": tool_block(tools, family)})
    prefix = bool(messages[-1].get("prefix"))
    rendered, _ = render_jinja_template(
        [msgs],
        chat_template=TEMPLATES[family],
        add_generation_prompt=not prefix,
        continue_final_message=prefix,
        bos_token=BOS,
        thinking=thinking,
    )
    return rendered[0]


CASES = [
    pytest.param(msgs, tools, fam, th, id=f"{name}-{fam}{'-think' if th else ''}")
    for name, msgs, tools in CORPUS
    for fam, th in (("v3.1", False), ("v3.1", True), ("v3", False))
]


def test_corpus_is_large_enough() -> None:
    assert len(CORPUS) >= 30
    kinds = {"tool": 0, "prefix": 0, "system": 0, "chinese": 0}
    for _, msgs, tools in CORPUS:
        kinds["tool"] += bool(tools) and any(m["role"] == "tool" for m in msgs)
        kinds["prefix"] += bool(msgs[-1].get("prefix"))
        kinds["system"] += sum(m["role"] == "system" for m in msgs) > 1
        kinds["chinese"] += any("\u4e00" <= c <= "\u9fff" for m in msgs for c in m.get("content") or "")
    assert all(v >= 2 for v in kinds.values()), kinds


@pytest.mark.parametrize(("messages", "tools", "family", "thinking"), CASES)
def test_matches_template(messages: list, tools: list | None, family: str, thinking: bool) -> None:
    expected = template_render(messages, tools, family, thinking)
    assert render_prompt(messages, tools=tools, thinking=thinking, family=family) == expected


def test_v31_shapes_from_the_model_card() -> None:
    s, q1, a1, q2 = "SYS", "Q1", "A1", "Q2"
    one = [{"role": "system", "content": s}, {"role": "user", "content": q1}]
    two = one + [{"role": "assistant", "content": a1}, {"role": "user", "content": q2}]
    assert render_prompt(one, family="v3.1") == f"{BOS}{s}<｜User｜>{q1}<｜Assistant｜></think>"
    assert render_prompt(one, family="v3.1", thinking=True) == f"{BOS}{s}<｜User｜>{q1}<｜Assistant｜><think>"
    history = (
        f"{BOS}{s}<｜User｜>{q1}<｜Assistant｜></think>{a1}<｜end▁of▁sentence｜><｜User｜>{q2}<｜Assistant｜>"
    )
    assert render_prompt(two, family="v3.1") == history + "</think>"
    assert render_prompt(two, family="v3.1", thinking=True) == history + "<think>"


def test_v31_prefix_with_reasoning_content() -> None:
    msgs = [
        {"role": "user", "content": "Q"},
        {"role": "assistant", "content": "", "reasoning_content": "Let", "prefix": True},
    ]
    assert render_prompt(msgs, family="v3.1", thinking=True).endswith("<｜Assistant｜><think>Let")
    msgs[-1]["content"] = "Ans"
    assert render_prompt(msgs, family="v3.1", thinking=True).endswith("<｜Assistant｜><think>Let</think>Ans")
    assert render_prompt(msgs, family="v3.1").endswith("<｜Assistant｜></think>Ans")
