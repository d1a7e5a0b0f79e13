"""The DeepSeek-V3.2 prompt (chat-format.md §2): DSML tool calls, thinking rules, tool results.

Reasoning is rendered only for assistant messages after the last user message (the current tool loop);
earlier turns keep just content and tool calls. A user message ends with the generation prompt ``<think>``
(thinking, last user turn) or ``</think>``; so does the last tool result of a round.
Chat prefix completion (§2.4, our design): a final ``prefix: true`` assistant message is left open — no EOS;
in thinking mode its reasoning follows the ``<think>`` and is closed with ``</think>`` only if content follows.
"""

from __future__ import annotations

import dataclasses

from dsv32.chat.dsml import render_calls, render_tools, to_json
from dsv32.chat.errors import ChatFormatError
from dsv32.chat.messages import Conversation, Message
from dsv32.chat.prompt import Prompt
from dsv32.chat.tokens import ASSISTANT, BOS, EOS, THINK_END, THINK_START, USER

_RESPONSE_FORMAT = "\n\n## Response Format:\n\nYou MUST strictly adhere to the following schema to reply:\n"


def build_v32(conv: Conversation, *, thinking: bool) -> Prompt:
    """The V3.2 prompt of a checked conversation."""
    msgs, paths = _with_tools(conv)
    last_user = max((i for i, m in enumerate(msgs) if m.role in ("user", "developer")), default=-1)
    p = Prompt().tmpl(BOS)
    for i, m in enumerate(msgs):
        path = paths[i]
        think = THINK_START if thinking and i >= last_user else THINK_END
        if m.role == "system":
            p.data(m.text)
            _system_extras(p, m)
        elif m.role in ("user", "developer"):
            p.tmpl(USER)
            if m.role == "developer":
                if not m.content:
                    raise ChatFormatError(f"{path}.content", "a developer message needs content")
                _system_extras(p, m)
                p.tmpl("\n\n# The user's message is: ")
            p.data(m.text).tmpl(ASSISTANT).tmpl(think if i == last_user else THINK_END)
        elif m.role == "assistant":
            _assistant(p, m, path, reasoning=thinking and i > last_user)
        else:
            _tool_result(p, msgs, i, paths, think)
    return p


def _with_tools(conv: Conversation) -> tuple[list[Message], list[str]]:
    """Top-level tools go on the first message if it is a system message, else on a new empty one."""
    msgs = list(conv.messages)
    paths = [f"messages[{i}]" for i in range(len(msgs))]
    if conv.tools:
        if msgs[0].role == "system":
            if msgs[0].tools:
                raise ChatFormatError("tools", "tools are given both at the top level and on messages[0]")
            msgs[0] = dataclasses.replace(msgs[0], tools=conv.tools)
        else:
            msgs.insert(0, Message("system", "", tools=conv.tools))
            paths.insert(0, "tools")
    return msgs, paths


def _system_extras(p: Prompt, m: Message) -> None:
    if m.tools:
        p.tmpl("\n\n")
        render_tools(p, m.tools)
    if m.response_format is not None:
        p.tmpl(_RESPONSE_FORMAT).data(to_json(m.response_format))


def _assistant(p: Prompt, m: Message, path: str, reasoning: bool) -> None:
    if reasoning:
        if not (m.reasoning or m.tool_calls or m.prefix):
            raise ChatFormatError(
                f"{path}.reasoning_content",
                "required in thinking mode on an assistant message after the last user message "
                "(unless it has tool_calls)",
            )
        p.data(m.reasoning or "")
        if not m.prefix or m.text:
            p.tmpl(THINK_END)
    p.data(m.text)
    if m.tool_calls:
        render_calls(p, m.tool_calls)
    if not m.prefix:
        p.tmpl(EOS)


def _tool_result(p: Prompt, msgs: list[Message], i: int, paths: list[str], think: str) -> None:
    owner = i - 1
    while owner >= 0 and msgs[owner].role == "tool":
        owner -= 1
    if owner < 0 or msgs[owner].role != "assistant" or not msgs[owner].tool_calls:
        raise ChatFormatError(paths[i], "a tool message must follow an assistant message with tool_calls")
    k, n = i - owner, len(msgs[owner].tool_calls)
    if k > n:
        raise ChatFormatError(paths[i], f"more tool results than the {n} tool call(s) of {paths[owner]}")
    if k == 1:
        p.tmpl("\n\n<function_results>")
    p.tmpl("\n<result>").data(msgs[i].text).tmpl("</result>")
    if k == n:
        p.tmpl("\n</function_results>\n\n").tmpl(think)
