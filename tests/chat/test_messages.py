"""Bad input raises ChatFormatError (a ValueError) whose message starts with the offending field."""

from __future__ import annotations

from typing import Any

import pytest

from dsv32.chat import ChatFormatError, encode_prompt, render_prompt

USER = {"role": "user", "content": "hi"}


def call(arguments: Any, name: Any = "f") -> dict[str, Any]:
    return {
        "role": "assistant",
        "content": None,
        "tool_calls": [{"type": "function", "function": {"name": name, "arguments": arguments}}],
    }


BAD: list[tuple[Any, str]] = [
    ("hello", r"^messages: expected a list"),
    ([], r"^messages: at least one"),
    ([USER, "x"], r"^messages\[1\]: expected an object, got string"),
    ([{"content": "x"}], r"^messages\[0\]\.role: missing"),
    ([{"role": "bot", "content": "x"}], r"^messages\[0\]\.role: unknown role 'bot' \(allowed: system, user"),
    ([{"role": "user"}], r"^messages\[0\]\.content: missing"),
    ([{"role": "user", "content": None}], r"^messages\[0\]\.content: expected a string, got null"),
    (
        [{"role": "user", "content": 5}],
        r"^messages\[0\]\.content: expected a string or a list of text parts, got int",
    ),
    (
        [{"role": "user", "content": [{"type": "image_url"}]}],
        r"^messages\[0\]\.content\[0\]: only text parts",
    ),
    ([{"role": "tool", "tool_call_id": "x"}], r"^messages\[0\]\.content: missing"),
    ([USER, call("{bad json")], r"^messages\[1\]\.tool_calls\[0\]\.function\.arguments: not valid JSON"),
    (  # json.loads raises RecursionError, not JSONDecodeError, past ~1000 levels
        [USER, call('{"a": ' + "[" * 5000 + "]" * 5000 + "}")],
        r"^messages\[1\]\.tool_calls\[0\]\.function\.arguments: JSON nested too deeply",
    ),
    (
        [USER, call("[1, 2]")],
        r"^messages\[1\]\.tool_calls\[0\]\.function\.arguments: must be a JSON object, got array",
    ),
    ([USER, call(None)], r"^messages\[1\]\.tool_calls\[0\]\.function\.arguments: missing"),
    (
        [USER, call(7)],
        r"^messages\[1\]\.tool_calls\[0\]\.function\.arguments: expected a JSON string, got int",
    ),
    (
        [USER, call("{}", name="")],
        r"^messages\[1\]\.tool_calls\[0\]\.function\.name: expected a non-empty string",
    ),
    ([USER, call("{}", name=None)], r"^messages\[1\]\.tool_calls\[0\]\.function\.name: missing"),
    (
        [USER, {"role": "assistant", "tool_calls": {"a": 1}}],
        r"^messages\[1\]\.tool_calls: expected a list, got object",
    ),
    (
        [USER, {"role": "assistant", "tool_calls": [{"type": "x"}]}],
        r"^messages\[1\]\.tool_calls\[0\]\.type: only 'function'",
    ),
    (
        [USER, {"role": "assistant", "tool_calls": [{}]}],
        r"^messages\[1\]\.tool_calls\[0\]\.function: missing",
    ),
    ([{**USER, "tool_calls": []}], r"^messages\[0\]\.tool_calls: only assistant messages"),
    (
        [USER, {"role": "assistant", "content": "a", "reasoning_content": 3}],
        r"^messages\[1\]\.reasoning_content: expected",
    ),
    ([{**USER, "prefix": True}], r"^messages\[0\]\.prefix: only an assistant message"),
    (
        [USER, {"role": "assistant", "content": "a", "prefix": "yes"}],
        r"^messages\[1\]\.prefix: expected true or false",
    ),
    ([{**USER, "tools": []}], r"^messages\[0\]\.tools: tools belong on a system message"),
    (
        [{"role": "system", "content": "s", "tools": [{"function": {}}]}],
        r"^messages\[0\]\.tools\[0\]\.function\.name: missing",
    ),
]


@pytest.mark.parametrize(("messages", "pattern"), BAD)
@pytest.mark.parametrize("family", ["v3.2", "v3.1", "v3"])
def test_bad_messages(messages: Any, pattern: str, family: str) -> None:
    with pytest.raises(ChatFormatError, match=pattern) as err:
        render_prompt(messages, family=family)
    assert isinstance(err.value, ValueError) and err.value.field in str(err.value)


def test_bad_tools_and_options() -> None:
    with pytest.raises(ChatFormatError, match=r"^tools: expected a list of tools, got object"):
        render_prompt([USER], tools={"name": "f"})
    with pytest.raises(ChatFormatError, match=r"^tools\[0\]\.type: only 'function' tools"):
        render_prompt([USER], tools=[{"type": "retrieval", "function": {"name": "f"}}])
    with pytest.raises(
        ChatFormatError, match=r"^tools\[0\]\.function\.parameters: expected a JSON schema object"
    ):
        render_prompt([USER], tools=[{"type": "function", "function": {"name": "f", "parameters": "x"}}])
    with pytest.raises(ChatFormatError, match=r"^family: unknown chat format 'v4'"):
        render_prompt([USER], family="v4")
    with pytest.raises(ChatFormatError, match=r"^thinking: the v3 format has no thinking mode"):
        encode_prompt([USER], thinking=True, family="v3")
    with pytest.raises(ChatFormatError, match=r"^thinking: expected true or false"):
        render_prompt([USER], thinking="yes")  # type: ignore[arg-type]


def test_accepted_shapes() -> None:
    parts = [{"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}]
    assert render_prompt(parts) == render_prompt([{"role": "user", "content": "ab"}])
    as_dict = call({"x": 1})
    as_text = call('{"x": 1}')
    assert render_prompt([USER, as_dict]) == render_prompt([USER, as_text])
    bare_fn = [{"name": "f", "parameters": {"type": "object"}}]
    wrapped = [{"type": "function", "function": bare_fn[0]}]
    assert render_prompt([USER], tools=bare_fn) == render_prompt([USER], tools=wrapped)
    reasoning_alias = [USER, {"role": "assistant", "content": "a", "reasoning": "r"}]
    assert render_prompt(reasoning_alias, thinking=True).endswith("<think>r</think>a<｜end▁of▁sentence｜>")
