"""V3.2 prompts: the worked examples of chat-format.md §2.5 byte for byte, the drop rule, prefixes, errors."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest

from dsv32.chat import ChatFormatError, encode_prompt, load_tokenizer, render_prompt
from tests.chat.corpus import CORPUS, MODEL_CARD_IDS, MODEL_CARD_TEXT

FIXTURES = Path(__file__).parent / "fixtures"
BOS, EOS = "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>"

GET_DATE = {
    "type": "function",
    "function": {
        "name": "get_date",
        "description": "Get the current date",
        "parameters": {"type": "object", "properties": {}},
    },
}
GET_WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Get weather of a location on a date",
        "parameters": {
            "type": "object",
            "properties": {
                "location": {"type": "string"},
                "date": {"type": "string"},
                "days": {"type": "integer"},
            },
            "required": ["location", "date"],
        },
    },
}


def weather_args(city: str) -> str:
    return f'{{"location": "{city}", "date": "2025-12-02", "days": 1}}'


TOOL_LOOP = [
    {"role": "system", "content": "You are a helpful assistant.", "tools": [GET_DATE, GET_WEATHER]},
    {"role": "user", "content": "Weather in Hangzhou tomorrow?"},
    {
        "role": "assistant",
        "content": "",
        "reasoning_content": "Need the date first.",
        "tool_calls": [
            {"id": "call_00_a", "type": "function", "function": {"name": "get_date", "arguments": "{}"}}
        ],
    },
    {"role": "tool", "tool_call_id": "call_00_a", "content": "2025-12-01"},
    {
        "role": "assistant",
        "content": "",
        "reasoning_content": "Tomorrow is 2025-12-02.",
        "tool_calls": [
            {
                "id": "call_00_b",
                "type": "function",
                "function": {"name": "get_weather", "arguments": weather_args("Hangzhou")},
            },
            {
                "id": "call_01_c",
                "type": "function",
                "function": {"name": "get_weather", "arguments": weather_args("Beijing")},
            },
        ],
    },
    {"role": "tool", "tool_call_id": "call_00_b", "content": "Cloudy 7~13°C"},
    {"role": "tool", "tool_call_id": "call_01_c", "content": "Sunny 0~8°C"},
]
NEXT_TURN = TOOL_LOOP + [
    {"role": "assistant", "content": "Hangzhou: cloudy, 7-13°C.", "reasoning_content": "Answer now."},
    {"role": "user", "content": "And Shanghai?"},
]


def fixture(name: str) -> str:
    return (FIXTURES / name).read_text(encoding="utf-8")


def test_worked_example_tool_loop() -> None:
    assert render_prompt(TOOL_LOOP, thinking=True) == fixture("v32_tool_loop.txt")


def test_worked_example_next_turn_drops_reasoning() -> None:
    prompt = render_prompt(NEXT_TURN, thinking=True)
    head, tail = prompt.split("</functions>\n", 1)
    assert fixture("v32_tool_loop.txt").startswith(head + "</functions>\n")
    assert tail == fixture("v32_next_turn_tail.txt")
    assert render_prompt(NEXT_TURN) == prompt[: -len("<think>")] + "</think>"  # chat mode: only the last tag


def test_top_level_tools_go_on_the_system_message() -> None:
    msgs = copy.deepcopy(TOOL_LOOP)
    tools = msgs[0].pop("tools")
    assert render_prompt(msgs, tools=tools, thinking=True) == fixture("v32_tool_loop.txt")
    no_system = render_prompt(msgs[1:], tools=tools, thinking=True)
    assert no_system.startswith(BOS + "\n\n## Tools\n")  # an empty system message is put first
    with pytest.raises(ChatFormatError, match="tools: .*both"):
        render_prompt(TOOL_LOOP, tools=tools)


def test_minimal_cases() -> None:
    msgs = [{"role": "system", "content": "You are a helpful assistant."}, {"role": "user", "content": "Hi"}]
    assert render_prompt(msgs) == f"{BOS}You are a helpful assistant.<｜User｜>Hi<｜Assistant｜></think>"
    assert (
        render_prompt(msgs, thinking=True)
        == f"{BOS}You are a helpful assistant.<｜User｜>Hi<｜Assistant｜><think>"
    )
    rf = [
        {"role": "system", "content": "Reply in JSON.", "response_format": {"type": "json_object"}},
        msgs[1],
    ]
    assert render_prompt(rf) == (
        f"{BOS}Reply in JSON.\n\n## Response Format:\n\nYou MUST strictly adhere to the following schema to reply:\n"
        '{"type": "json_object"}<｜User｜>Hi<｜Assistant｜></think>'
    )


def test_model_card_example_ids() -> None:
    msgs = [
        {"role": "user", "content": "hello"},
        {"role": "assistant", "content": "Hello! I am DeepSeek.", "reasoning_content": "thinking..."},
        {"role": "user", "content": "1+1=?"},
    ]
    assert render_prompt(msgs, thinking=True) == MODEL_CARD_TEXT
    assert encode_prompt(msgs, thinking=True) == MODEL_CARD_IDS


@pytest.mark.parametrize("family", ["v3.2", "v3.1", "v3"])
def test_ids_equal_encoding_the_rendered_text(family: str) -> None:
    """Without control-token strings in the data, ids = the rendered text encoded with control matching."""
    tok = load_tokenizer()
    convs = [(m, t) for _, m, t in CORPUS] + [(TOOL_LOOP, None), (NEXT_TURN, None)]
    for messages, tools in convs:
        if family != "v3.2" and any("tools" in m for m in messages):
            continue
        if any("think>" in (m.get("content") or "") for m in messages):
            continue  # data spelling a control token: encoded as text on purpose (see test_injection)
        for thinking in (False, True) if family != "v3" else (False,):
            if (
                family == "v3.2"
                and thinking
                and messages[-1]["role"] == "assistant"
                and not messages[-1].get("prefix")
            ):
                continue  # needs reasoning_content in thinking mode
            kw = {"tools": tools, "thinking": thinking, "family": family}
            text = render_prompt(messages, **kw)
            assert encode_prompt(messages, **kw) == tok.encode(text, allow_special=True), (family, messages)


def test_thinking_mode_tool_loop_keeps_reasoning_and_reopens_thinking() -> None:
    prompt = render_prompt(TOOL_LOOP, thinking=True)
    assert "<think>Need the date first.</think>" in prompt
    assert prompt.count("<think>") == 4  # user turn, two tool-result rounds, and the tools block example


def test_assistant_after_last_user_needs_reasoning_in_thinking_mode() -> None:
    msgs = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]
    with pytest.raises(ChatFormatError, match=r"messages\[1\]\.reasoning_content: required"):
        render_prompt(msgs, thinking=True)
    assert render_prompt(msgs).endswith(f"<｜Assistant｜></think>a{EOS}")
    msgs[1]["reasoning_content"] = "r"
    assert render_prompt(msgs, thinking=True).endswith(f"<｜Assistant｜><think>r</think>a{EOS}")


def test_prefix_completion() -> None:
    base = [{"role": "user", "content": "Write a poem"}]
    cont = {"role": "assistant", "content": "Roses are", "prefix": True}
    assert render_prompt([*base, cont]) == f"{BOS}<｜User｜>Write a poem<｜Assistant｜></think>Roses are"
    think = {**cont, "reasoning_content": "A classic opening."}
    assert render_prompt([*base, think], thinking=True).endswith("<think>A classic opening.</think>Roses are")
    open_reasoning = {**think, "content": ""}
    assert render_prompt([*base, open_reasoning], thinking=True).endswith("<think>A classic opening.")
    assert render_prompt([*base, {**cont, "content": None}], thinking=True).endswith("<｜Assistant｜><think>")
    with pytest.raises(ChatFormatError, match=r"messages\[0\]\.prefix: only the last"):
        render_prompt([{**cont}, *base])


def test_developer_role() -> None:
    msgs = [{"role": "developer", "content": "find it", "tools": [GET_DATE]}]
    prompt = render_prompt(msgs, thinking=True)
    assert prompt.startswith(f"{BOS}<｜User｜>\n\n## Tools\n")
    assert prompt.endswith("</functions>\n\n\n# The user's message is: find it<｜Assistant｜><think>")
    with pytest.raises(ChatFormatError, match=r"messages\[0\]\.role: unknown role 'developer'"):
        render_prompt(msgs, family="v3.1")


def test_tool_result_pairing_errors() -> None:
    call = {"type": "function", "function": {"name": "f", "arguments": "{}"}}
    loop = [{"role": "user", "content": "q"}, {"role": "assistant", "content": None, "tool_calls": [call]}]
    tool = {"role": "tool", "tool_call_id": "x", "content": "r"}
    assert render_prompt([*loop, tool]).endswith(
        "\n\n<function_results>\n<result>r</result>\n</function_results>\n\n</think>"
    )
    with pytest.raises(ChatFormatError, match=r"messages\[3\]: more tool results than the 1 tool call"):
        render_prompt([*loop, tool, tool])
    with pytest.raises(ChatFormatError, match=r"messages\[1\]: a tool message must follow"):
        render_prompt([loop[0], tool])


def test_dsml_parameter_encoding() -> None:
    args = (
        '{"s": "a \\"quoted\\" <b>\\nline", "n": 1.5, "b": true, "z": null, "l": [1, "中"], "o": {"k": "v"}}'
    )
    msgs = [
        {"role": "user", "content": "q"},
        {
            "role": "assistant",
            "content": "c",
            "tool_calls": [{"type": "function", "function": {"name": "f", "arguments": args}}],
        },
    ]
    assert render_prompt(msgs).endswith(
        'c\n\n<｜DSML｜function_calls>\n<｜DSML｜invoke name="f">\n'
        '<｜DSML｜parameter name="s" string="true">a "quoted" <b>\nline</｜DSML｜parameter>\n'
        '<｜DSML｜parameter name="n" string="false">1.5</｜DSML｜parameter>\n'
        '<｜DSML｜parameter name="b" string="false">true</｜DSML｜parameter>\n'
        '<｜DSML｜parameter name="z" string="false">null</｜DSML｜parameter>\n'
        '<｜DSML｜parameter name="l" string="false">[1, "中"]</｜DSML｜parameter>\n'
        '<｜DSML｜parameter name="o" string="false">{"k": "v"}</｜DSML｜parameter>\n'
        f"</｜DSML｜invoke>\n</｜DSML｜function_calls>{EOS}"
    )
