"""Conversations for the template-equality tests: multi-turn, systems, tools, tool results, Chinese, prefixes."""

from __future__ import annotations

import json
from typing import Any

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Get the weather of a city on a date",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string"},
                "date": {"type": "string"},
                "days": {"type": "integer"},
            },
            "required": ["city"],
        },
    },
}
SEARCH = {
    "type": "function",
    "function": {
        "name": "search",
        "description": "搜索网页并返回摘要",
        "parameters": {
            "type": "object",
            "properties": {"query": {"type": "string", "description": "关键词"}},
        },
    },
}
CLOCK = {"type": "function", "function": {"name": "now", "parameters": {"type": "object", "properties": {}}}}


def call(name: str, args: dict[str, Any], i: int = 0) -> dict[str, Any]:
    return {
        "id": f"call_{i:02d}_x",
        "type": "function",
        "function": {"name": name, "arguments": json.dumps(args)},
    }


def sys(text: str) -> dict[str, Any]:
    return {"role": "system", "content": text}


def user(text: str) -> dict[str, Any]:
    return {"role": "user", "content": text}


def bot(text: str | None, *calls: dict[str, Any], **extra: Any) -> dict[str, Any]:
    m: dict[str, Any] = {"role": "assistant", "content": text, **extra}
    if calls:
        m["tool_calls"] = list(calls)
    return m


def tool(text: str, i: int = 0) -> dict[str, Any]:
    return {"role": "tool", "tool_call_id": f"call_{i:02d}_x", "content": text}


HZ = call("get_weather", {"city": "Hangzhou", "date": "2025-12-02"})
BJ = call("get_weather", {"city": "Beijing", "days": 2}, 1)
CN = call("search", {"query": "杭州 明天 天气"})

# (name, messages, tools); tools=None means no tool block
CORPUS: list[tuple[str, list[dict[str, Any]], list[dict[str, Any]] | None]] = [
    ("single_user", [user("Hi")], None),
    ("system_user", [sys("You are a helpful assistant."), user("Hi")], None),
    ("two_systems", [sys("Be brief."), sys("Answer in English."), user("Why is the sky blue?")], None),
    ("multi_turn", [sys("S"), user("1+1?"), bot("2"), user("2+2?"), bot("4"), user("3+3?")], None),
    (
        "chinese_multi_turn",
        [sys("你是一个乐于助人的助手。"), user("你好"), bot("你好！有什么可以帮你？"), user("讲个笑话")],
        None,
    ),
    ("old_reasoning_in_content", [user("q"), bot("<think>hmm</think>Answer."), user("again")], None),
    ("two_think_ends_in_content", [user("q"), bot("a</think>b</think>c"), user("more")], None),
    ("ends_with_assistant", [user("Hi"), bot("Hello!")], None),
    ("system_in_middle", [user("first"), sys("late system"), bot("ok"), user("second")], None),
    ("empty_system", [sys(""), user("Hi")], None),
    ("empty_user", [sys("S"), user("")], None),
    (
        "markdown_code",
        [user("Fix:\n```python\nprint( 'x' )\n```\n\nThanks!"), bot("```python\nprint('x')\n```")],
        None,
    ),
    ("emoji", [user("🙂👍🏽 ok? 👨‍👩‍👧"), bot("🎉"), user("✓")], None),
    ("empty_assistant", [user("say nothing"), bot(""), user("ok")], None),
    ("user_after_user", [user("part one"), user("part two")], None),
    (
        "long_chat",
        [sys("S")]
        + [m for k in range(6) for m in (user(f"question {k}"), bot(f"answer {k}"))]
        + [user("last")],
        None,
    ),
    (
        "tools_no_call",
        [sys("You are a helpful assistant."), user("Weather in Hangzhou tomorrow?")],
        [WEATHER],
    ),
    ("tools_without_system", [user("Weather?")], [WEATHER, CLOCK]),
    ("tools_two_systems", [sys("A"), sys("B"), user("Weather?")], [WEATHER, SEARCH]),
    (
        "call_then_result",
        [sys("S"), user("Weather in Hangzhou?"), bot(None, HZ), tool("Cloudy 7~13°C")],
        [WEATHER],
    ),
    (
        "call_with_text",
        [user("Weather?"), bot("Let me check.", HZ), tool("Sunny"), bot("It is sunny.")],
        [WEATHER],
    ),
    ("call_with_empty_text", [user("Weather?"), bot("", HZ), tool("Sunny"), bot("Sunny.")], [WEATHER]),
    (
        "parallel_calls",
        [user("HZ and BJ?"), bot(None, HZ, BJ), tool("Cloudy"), tool("Sunny", 1), bot("Both fine.")],
        [WEATHER],
    ),
    (
        "two_rounds_one_turn",
        [
            user("Plan"),
            bot(None, call("now", {})),
            tool("2025-12-01"),
            bot(None, HZ),
            tool("Rain"),
            bot("Take an umbrella."),
        ],
        [WEATHER, CLOCK],
    ),
    (
        "loop_then_new_question",
        [user("Weather?"), bot(None, HZ), tool("Cloudy"), bot("Cloudy."), user("And Beijing?")],
        [WEATHER],
    ),
    (
        "chinese_tool",
        [
            sys("用中文回答"),
            user("查一下杭州明天的天气"),
            bot(None, CN),
            tool("多云，7~13°C"),
            bot("明天多云。"),
        ],
        [SEARCH],
    ),
    (
        "json_tool_result",
        [user("now?"), bot(None, call("now", {})), tool('{"iso": "2025-12-01T08:00:00Z", "tz": "UTC"}')],
        [CLOCK],
    ),
    (
        "nested_arguments",
        [user("x"), bot(None, call("search", {"query": "a", "opts": {"n": 3, "langs": ["en", "zh"]}}))],
        [SEARCH],
    ),
    ("tool_then_user", [user("w?"), bot(None, HZ), tool("Cloudy"), user("never mind")], [WEATHER]),
    ("prefix_after_user", [user("Write a haiku about rain."), bot("Soft rain on", prefix=True)], None),
    ("prefix_empty", [sys("S"), user("Hi"), bot("", prefix=True)], None),
    (
        "prefix_after_tool",
        [user("w?"), bot(None, HZ), tool("Cloudy"), bot("The weather is", prefix=True)],
        [WEATHER],
    ),
    ("prefix_chinese", [user("写一首诗"), bot("春眠不觉晓，", prefix=True)], None),
]


# The V3.2 model card's example (chat-format.md §6): its prompt text and token ids.
MODEL_CARD_TEXT = (
    "<｜begin▁of▁sentence｜><｜User｜>hello<｜Assistant｜></think>Hello! I am DeepSeek.<｜end▁of▁sentence｜>"
    "<｜User｜>1+1=?<｜Assistant｜><think>"
)
MODEL_CARD_IDS = [0, 128803, 33310, 128804, 128799, 19923, 3, 342, 1030, 22651, 4374, 1465, 16, 1, 128803,
                  19, 13, 19, 127252, 128804, 128798]  # fmt: skip
