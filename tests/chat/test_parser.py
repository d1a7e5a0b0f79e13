"""Output parsing: worked example, parse(render(message)) round trips, chunking invariance, malformed output."""

from __future__ import annotations

import json
import random
from typing import Any

import pytest

from dsv32.chat import Delta, StreamParser, parse_completion, render_prompt

EOS = "<｜end▁of▁sentence｜>"
D = "｜DSML｜"


def ids(i: int) -> str:
    return f"call_{i}"


def dsml_call(name: str, *params: tuple[str, str, str]) -> str:
    body = "\n".join(f'<{D}parameter name="{k}" string="{s}">{v}</{D}parameter>' for k, s, v in params)
    return f'<{D}invoke name="{name}">\n{body}\n</{D}invoke>'


def dsml_block(*calls: str) -> str:
    return f"\n\n<{D}function_calls>\n" + "\n".join(calls) + f"\n</{D}function_calls>"


WORKED = (
    "Tomorrow is 2025-12-02.</think>"
    + dsml_block(
        dsml_call(
            "get_weather",
            ("location", "true", "Hangzhou"),
            ("date", "true", "2025-12-02"),
            ("days", "false", "1"),
        ),
        dsml_call(
            "get_weather",
            ("location", "true", "Beijing"),
            ("date", "true", "2025-12-02"),
            ("days", "false", "1"),
        ),
    )
    + EOS
)


def test_worked_example() -> None:
    r = parse_completion(WORKED, thinking=True, call_id=ids)
    assert r["reasoning_content"] == "Tomorrow is 2025-12-02." and r["content"] == "" and r["problems"] == []
    assert r["tool_calls"] == [
        {
            "id": f"call_{i}",
            "type": "function",
            "function": {
                "name": "get_weather",
                "arguments": f'{{"location": "{city}", "date": "2025-12-02", "days": 1}}',
            },
        }
        for i, city in enumerate(["Hangzhou", "Beijing"])
    ]


def test_call_arguments_follow_the_result_while_streaming() -> None:
    """``call_arguments(i)``: call i's arguments so far, as ``result()`` has them, at every cut of the text."""
    p = StreamParser(thinking=True, call_id=ids)
    for i in range(0, len(WORKED), 7):
        p.feed(WORKED[i : i + 7])
        calls = p.result()["tool_calls"]
        assert [p.call_arguments(j) for j in range(p.tool_call_count)] == [
            c["function"]["arguments"] for c in calls
        ]
    assert p.call_arguments(1) == '{"location": "Beijing", "date": "2025-12-02", "days": 1}'


def test_default_ids_are_deepseek_style() -> None:
    r = parse_completion(WORKED, thinking=True)
    a, b = (c["id"] for c in r["tool_calls"])
    assert (
        a.startswith("call_00_")
        and b.startswith("call_01_")
        and len(a) == len("call_00_") + 22
        and a[8:] != b[8:]
    )


# ---- round trip: parse(render(message)) == message ---------------------------------------------------

FRAGMENTS = [
    "hello",
    " ",
    "\n",
    "\n\n",
    "世界",
    "🙂",
    "<",
    ">",
    '"',
    "\\",
    "{",
    "}",
    "`",
    "｜",
    "x=1",
    "&",
    "\t",
    "DS",
]


def rand_text(rng: random.Random, n: int = 12) -> str:
    return "".join(rng.choice(FRAGMENTS) for _ in range(rng.randint(0, n)))


def rand_value(rng: random.Random, depth: int = 0) -> Any:
    kind = rng.choice(["str", "str", "int", "float", "bool", "null", "list", "dict"][: 8 if depth < 2 else 6])
    return {
        "str": lambda: rand_text(rng, 6),
        "int": lambda: rng.randint(-(10**12), 10**12),
        "float": lambda: rng.uniform(-1e6, 1e6),
        "bool": lambda: rng.random() < 0.5,
        "null": lambda: None,
        "list": lambda: [rand_value(rng, depth + 1) for _ in range(rng.randint(0, 3))],
        "dict": lambda: {f"k{j}": rand_value(rng, depth + 1) for j in range(rng.randint(0, 3))},
    }[kind]()


def rand_assistant(rng: random.Random, thinking: bool) -> dict[str, Any]:
    calls = [
        {
            "type": "function",
            "function": {
                "name": rng.choice(["get_weather", "search", "f_1", "工具"]),
                "arguments": json.dumps(
                    {
                        rng.choice(["a", "b_c", "日期", "x-y"]) + str(j): rand_value(rng)
                        for j in range(rng.randint(0, 4))
                    },
                    ensure_ascii=False,
                ),
            },
        }
        for _ in range(rng.choice([0, 0, 1, 2, 3]))
    ]
    m: dict[str, Any] = {"role": "assistant", "content": rand_text(rng)}
    if calls:
        m["tool_calls"] = calls
    if thinking:
        m["reasoning_content"] = rand_text(rng) or "r"
    return m


def completion_of(history: list[dict[str, Any]], message: dict[str, Any], **kw: Any) -> str:
    """The text the model generates for ``message``: the prompt with it minus the prompt without it."""
    before, after = render_prompt(history, **kw), render_prompt([*history, message], **kw)
    assert after.startswith(before)
    return after[len(before) :]


ROUND_TRIP = [("v3.2", False), ("v3.2", True), ("v3.1", False), ("v3", False)]


@pytest.mark.parametrize(("family", "thinking"), ROUND_TRIP)
def test_round_trip_random_messages(family: str, thinking: bool) -> None:
    rng = random.Random(f"{family}{thinking}")
    history = [{"role": "system", "content": "S"}, {"role": "user", "content": "q"}]
    for _ in range(300):
        msg = rand_assistant(rng, thinking)
        msg["content"] = msg["content"].replace("</think>", "")  # dropped from content (and cut by V3.1)
        text = completion_of(history, msg, thinking=thinking, family=family)
        text = text.removesuffix("<｜Assistant｜>")  # V3's template adds its generation prompt after any turn
        r = parse_completion(text, thinking=thinking, family=family, call_id=ids)
        assert r["problems"] == [], (text, r)
        # whitespace before a tool-call block is not content (§3.2)
        assert r["content"] == (msg["content"].rstrip() if "tool_calls" in msg else msg["content"]), text
        assert r["reasoning_content"] == (msg["reasoning_content"] if thinking else None)
        calls = msg.get("tool_calls", [])
        assert [c["function"]["name"] for c in r["tool_calls"]] == [c["function"]["name"] for c in calls]
        for got, sent in zip(r["tool_calls"], calls, strict=True):
            assert json.loads(got["function"]["arguments"]) == json.loads(sent["function"]["arguments"])
            if family == "v3.2":  # rebuilt from DSML with the encoder's own JSON style
                assert got["function"]["arguments"] == sent["function"]["arguments"]


# ---- streaming: any chunking gives the one-shot parse ----------------------------------------------


def accumulate(deltas: list[Delta]) -> dict[str, Any]:
    reasoning, content, calls = [], [], {}
    for d in deltas:
        assert [d.reasoning_content, d.content, d.tool_call].count(None) == 2, d
        if d.reasoning_content is not None:
            assert d.reasoning_content
            reasoning.append(d.reasoning_content)
        elif d.content is not None:
            assert d.content
            content.append(d.content)
        else:
            tc = d.tool_call
            if "id" in tc:
                assert tc["index"] == len(calls) and tc["function"]["arguments"] == ""
                calls[tc["index"]] = {"id": tc["id"], "name": tc["function"]["name"], "args": ""}
            else:
                assert tc["index"] == len(calls) - 1 and set(tc) == {"index", "function"}
                calls[tc["index"]]["args"] += tc["function"]["arguments"]
    return {
        "reasoning_content": "".join(reasoning),
        "content": "".join(content),
        "tool_calls": [
            {"id": c["id"], "type": "function", "function": {"name": c["name"], "arguments": c["args"]}}
            for c in calls.values()
        ],
    }


def stream(text: str, rng: random.Random, **kw: Any) -> tuple[dict[str, Any], StreamParser]:
    parser = StreamParser(call_id=ids, **kw)
    deltas: list[Delta] = []
    i = 0
    while i < len(text):
        n = rng.choice([1, 1, 2, 3, 5, 8, 13, 40])
        deltas += parser.feed(text[i : i + n])
        i += n
    deltas += parser.finish()
    return accumulate(deltas), parser


TOOLS = [
    {
        "type": "function",
        "function": {"name": "get_weather", "parameters": {"properties": {"days": {"type": "integer"}}}},
    }
]
OUTPUTS = [
    ("v3.2-think", {"thinking": True}, WORKED),
    (
        "v3.2-text-and-calls",
        {"thinking": True},
        "Let me think about <b> and </th.</think>Sure — checking 杭州 🙂\n"
        + dsml_block(
            dsml_call(
                "get_weather",
                ("location", "true", 'He said "hi"\n<tag></｜DSML｜param'),
                ("days", "false", "[1, 2]"),
            ),
            dsml_call("search", ("q", "true", "</｜DSML｜parameter")),
            dsml_call("now"),
        )
        + EOS,
    ),
    ("v3.2-chat", {}, "Plain answer with \n\n newlines and <｜DSML｜ text\n\n" + EOS),
    ("v3.2-malformed", {"tools": TOOLS}, "Hi" + dsml_block(f'<{D}invoke nam="x">') + " tail"),
    (
        "v3.2-broken-mid-call",
        {"tools": TOOLS},
        "Hi"
        + dsml_block(dsml_call("get_weather", ("days", "false", "three")), f'<{D}invoke name="a">\noops'),
    ),
    ("v3.2-cut-off", {"thinking": True}, "r</think>c" + dsml_block(dsml_call("f", ("a", "true", "x")))[:-30]),
    ("v3.2-no-think-end", {"thinking": True}, "still thinking <" + EOS),
    ("v3.2-chat-think-end", {}, "a </think> b \n\n" + dsml_block(dsml_call("f"))[2:] + EOS),
    ("v3.2-prefix-content", {"thinking": True, "in_reasoning": False}, " more</think>  \n" + EOS),
    ("v3.2-trailing", {}, "c" + dsml_block(dsml_call("f")) + "\nafter" + EOS + "more"),
    (
        "v3.1",
        {"family": "v3.1"},
        "ok<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>get_weather<｜tool▁sep｜>"
        '{"city": "杭州"}<｜tool▁call▁end｜><｜tool▁call▁begin｜>now<｜tool▁sep｜>{}<｜tool▁call▁end｜>'
        "<｜tool▁calls▁end｜>" + EOS,
    ),
    (
        "v3.1-think-bad-json",
        {"family": "v3.1", "thinking": True},
        "hmm</think><｜tool▁calls▁begin｜><｜tool▁call▁begin｜>f<｜tool▁sep｜>{oops<｜tool▁call▁end｜><｜tool▁calls▁end｜>",
    ),
    (
        "v3",
        {"family": "v3"},
        '<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>get_weather\n```json\n{"city": "x"}\n```'
        "<｜tool▁call▁end｜>\n<｜tool▁call▁begin｜>function<｜tool▁sep｜>now\n```json\n{}\n```<｜tool▁call▁end｜>"
        "<｜tool▁calls▁end｜>" + EOS,
    ),
]


@pytest.mark.parametrize(("kw", "text"), [pytest.param(kw, t, id=name) for name, kw, t in OUTPUTS])
def test_any_chunking_equals_one_shot(kw: dict[str, Any], text: str) -> None:
    one_shot = parse_completion(text, call_id=ids, **kw)
    rng = random.Random(text)
    for _ in range(200):
        got, parser = stream(text, rng, **kw)
        if kw.get("thinking") or one_shot["reasoning_content"] is not None:
            assert got["reasoning_content"] == one_shot["reasoning_content"]
        else:
            assert got["reasoning_content"] == ""
        assert got["content"] == one_shot["content"]
        assert got["tool_calls"] == one_shot["tool_calls"]
        assert parser.problems == one_shot["problems"]
        for call in got["tool_calls"]:
            json.loads(call["function"]["arguments"]) if not one_shot["problems"] else None


def test_tags_are_never_shown_half() -> None:
    text = (
        "a</think>b\n\n<｜DSML｜function_calls>\n"
        + dsml_call("f", ("k", "true", "v"))
        + f"\n</{D}function_calls>"
    )
    parser = StreamParser(thinking=True, call_id=ids)
    shown = []
    for ch in text:
        for d in parser.feed(ch):
            shown.append(d.reasoning_content or d.content or "")
    shown += [d.content or "" for d in parser.finish()]
    assert "".join(shown) == "ab" and all("<" not in s and "\n" not in s for s in shown)


# ---- specific behaviour ---------------------------------------------------------------------------


def parse(text: str, **kw: Any) -> dict[str, Any]:
    return parse_completion(text, call_id=ids, **kw)


def args_of(r: dict[str, Any]) -> list[Any]:
    return [json.loads(c["function"]["arguments"]) for c in r["tool_calls"]]


def test_reasoning_edge_cases() -> None:
    assert parse("<think>r</think>c", thinking=True)["reasoning_content"] == "r"  # stray opening tag dropped
    r = parse("only reasoning", thinking=True)
    assert (r["reasoning_content"], r["content"]) == ("only reasoning", "")
    assert r["problems"] == ["reasoning was not closed with </think>"]
    assert parse("r" + EOS, thinking=True)["problems"] == r["problems"]
    chat = parse("<think>unprompted</think>answer")
    assert (chat["reasoning_content"], chat["content"]) == ("unprompted", "answer")
    assert parse("answer")["reasoning_content"] is None


def test_dsml_leniency() -> None:
    loose = f'c\n<{D}tool_calls>  \n <{D}invoke  name="f" >\n\n<{D}parameter string="true" name="a">1</{D}parameter></{D}invoke>\n</{D}tool_calls>'
    r = parse(loose)
    assert r["content"] == "c" and args_of(r) == [{"a": "1"}] and r["problems"] == []
    no_newlines = parse(f"c<{D}function_calls>" + dsml_call("f") + f"</{D}function_calls>")
    assert no_newlines["content"] == "c" and args_of(no_newlines) == [{}]
    extra = parse("c  \n\n\n\n" + dsml_block(dsml_call("f"))[2:])  # §3.2: trailing whitespace is stripped
    assert extra["content"] == "c" and args_of(extra) == [{}]
    assert parse(" \n c \n" + EOS)["content"] == " \n c \n"  # whitespace with no block after it stays


def strict_json(text: str) -> Any:
    def refuse(name: str) -> None:
        raise ValueError(f"{name} is not JSON")

    return json.loads(text, parse_constant=refuse)


def test_parameter_types() -> None:
    schema = [
        {
            "type": "function",
            "function": {
                "name": "f",
                "parameters": {
                    "properties": {
                        "n": {"type": "integer"},
                        "x": {"type": "number"},
                        "b": {"type": "boolean"},
                        "s": {"type": "string"},
                        "o": {"type": ["object", "null"]},
                    }
                },
            },
        }
    ]
    call = dsml_call(
        "f",
        ("n", "false", " 007 "),
        ("x", "false", "+1.5"),
        ("b", "false", "True"),
        ("o", "false", "{bad"),
        ("q", "false", "[1,2]"),
    )
    call += dsml_call("f").replace(
        "\n\n",
        '\n<｜DSML｜parameter name="s">{"a": 1}</｜DSML｜parameter>\n<｜DSML｜parameter name="n">12</｜DSML｜parameter>\n',
    )
    r = parse("c" + dsml_block(call), tools=schema)
    assert args_of(r) == [{"n": 7, "x": 1.5, "b": True, "o": "{bad", "q": [1, 2]}, {"s": '{"a": 1}', "n": 12}]
    assert r["tool_calls"][0]["function"]["arguments"].endswith('"q": [1,2]}')  # valid JSON kept verbatim
    assert len(r["problems"]) == 4 and "'o' of 'f' is not valid JSON; kept as a string" in r["problems"][3]
    # Python's json reads NaN and Infinity; JSON has neither: the arguments stay valid JSON
    odd = parse(
        "c" + dsml_block(dsml_call("f", ("x", "false", "NaN"), ("q", "false", "-Infinity"))), tools=schema
    )
    assert strict_json(odd["tool_calls"][0]["function"]["arguments"]) == {"x": "NaN", "q": "-Infinity"}
    assert len(odd["problems"]) == 2


def test_duplicate_and_unknown() -> None:
    r = parse("c" + dsml_block(dsml_call("g", ("a", "true", "1"), ("a", "true", "2"))), tools=TOOLS)
    assert args_of(r) == [{"a": "1"}]
    assert r["problems"] == ["call of unknown tool 'g'", "duplicate parameter 'a' in call of 'g' dropped"]


def test_malformed_block_is_never_content() -> None:
    """§3.3: DSML markup is never shown as content. A block that breaks is dropped up to its closing tag; the
    calls before the break are kept (a started one is closed)."""
    r = parse("Hi" + dsml_block(f'<{D}invoke nam="x">') + EOS)
    assert r["tool_calls"] == [] and r["content"] == "Hi"
    assert r["problems"] == [
        "malformed tool-call block: malformed invoke tag; the rest of the block is dropped"
    ]
    mid = parse("Hi" + dsml_block(dsml_call("f", ("a", "true", "1")), "garbage") + EOS)
    assert args_of(mid) == [{"a": "1"}] and mid["content"] == "Hi"
    open_call = parse(
        "Hi"
        + dsml_block(f'<{D}invoke name="f">\n<{D}parameter name="a" string="true">1</{D}parameter>\njunk')
    )
    assert args_of(open_call) == [{"a": "1"}] and open_call["content"] == "Hi"
    # after the broken block's end, as after a good one: another block is read, other text dropped
    again = parse("Hi" + dsml_block("junk") + dsml_block(dsml_call("g")) + EOS)
    assert again["content"] == "Hi" and [c["function"]["name"] for c in again["tool_calls"]] == ["g"]
    unclosed = parse("Hi" + dsml_block("junk")[: -len(f"</{D}function_calls>")] + " more text")
    assert unclosed["content"] == "Hi" and unclosed["tool_calls"] == []
    for text in (f"Hi{dsml_block('junk')}", f"Hi{dsml_block(dsml_call('f'), 'junk')}"):
        assert D not in stream(text, random.Random(0))[0]["content"]


def test_think_tags_out_of_place() -> None:
    """A ``</think>`` in content is dropped (chat mode's prompt closed the reasoning; so did a thinking reply's
    first one); a stray leading ``<think>`` is dropped after leading whitespace too."""
    chat = parse("abc</think>def" + EOS)
    assert chat["content"] == "abcdef" and chat["problems"] == ["</think> in content dropped"]
    twice = parse("r</think>a</think>b", thinking=True)
    assert twice["reasoning_content"] == "r" and twice["content"] == "ab"
    stray = parse(" \n<think>r</think>c", thinking=True)
    assert stray["reasoning_content"] == "r" and stray["content"] == "c"
    prefixed = parse("more content" + EOS, thinking=True, in_reasoning=False)
    assert prefixed["reasoning_content"] == "" and prefixed["content"] == "more content"


def test_cut_off_and_trailing_text() -> None:
    full = "c" + dsml_block(dsml_call("f", ("a", "true", "long value")))
    cut = parse(full[: full.index("long value") + 6])
    assert args_of(cut) == [{"a": "long v"}] and cut["content"] == "c"
    assert cut["problems"] == ["tool-call block cut off before its end"]
    trailing = parse("c" + dsml_block(dsml_call("f")) + "\n\nafter" + EOS)
    assert trailing["content"] == "c" and trailing["problems"] == [
        "text after the end of the message dropped"
    ]
    two_blocks = parse("c" + dsml_block(dsml_call("f")) + dsml_block(dsml_call("g")) + EOS)
    assert [c["function"]["name"] for c in two_blocks["tool_calls"]] == ["f", "g"] and two_blocks[
        "problems"
    ] == []
    bad_second = parse("c" + dsml_block(dsml_call("f")) + dsml_block("junk"))
    assert bad_second["content"] == "c" and len(bad_second["tool_calls"]) == 1
    assert parse("a" + EOS + "b")["content"] == "a"


def test_text_cut_off_inside_a_block_opening_tag_is_not_content() -> None:
    """max_tokens can end the text inside a tool block's opening tag ("\n\n<｜DSML｜func"): that markup, and
    the whitespace before it, is dropped, streamed or not. A lone "<" at the end stays: it may be text."""
    block = dsml_block(dsml_call("f"))
    for n in (2, 5, len(f"<{D}function_calls>") - 1):
        cut = "Hi" + block[: block.index("<") + n]
        for r in (parse(cut), stream(cut, random.Random(n))[0]):
            assert r["content"] == "Hi" and r["tool_calls"] == [], (n, r)
        assert parse(cut)["problems"] == ["the text ended inside a tool-call block's opening tag; dropped"]
    assert parse("a <")["content"] == "a <" and parse("a <")["problems"] == []
    assert parse("<｜tool▁calls▁be", family="v3.1")["content"] == ""


def test_v31_and_v3_problems() -> None:
    r = parse(
        "<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>f<｜tool▁sep｜>{oops<｜tool▁call▁end｜><｜tool▁calls▁end｜>",
        family="v3.1",
    )
    assert r["tool_calls"][0]["function"]["arguments"] == "{oops"
    assert r["problems"] == ["arguments of the call of 'f' are not a JSON object"]
    empty = parse(
        "<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>f<｜tool▁sep｜><｜tool▁call▁end｜><｜tool▁calls▁end｜>",
        family="v3.1",
    )
    assert args_of(empty) == [{}]
    assert parse("x<｜tool▁calls▁begin｜>nonsense", family="v3")["content"] == "x"
    with pytest.raises(ValueError, match="^thinking: the v3 format has no thinking mode"):
        StreamParser(family="v3", thinking=True)


def test_feed_after_finish_and_openai_shape() -> None:
    p = StreamParser(thinking=True, call_id=ids)
    deltas = p.feed("r</think>c") + p.finish()
    assert [d.to_openai() for d in deltas] == [{"reasoning_content": "r"}, {"content": "c"}]
    assert p.finish() == []
    with pytest.raises(RuntimeError):
        p.feed("x")
    r = parse("c" + dsml_block(dsml_call("f")))
    head = Delta(
        tool_call={"index": 0, "id": "call_0", "type": "function", "function": {"name": "f", "arguments": ""}}
    )
    assert (
        head.to_openai()["tool_calls"][0]["function"]["name"] == "f" and r["tool_calls"][0]["id"] == "call_0"
    )
