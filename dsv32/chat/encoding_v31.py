"""The DeepSeek-V3.1 / V3.1-Terminus / V3.2-Exp prompt: the Jinja template those checkpoints ship (§4).

All system messages are joined with a blank line right after BOS; tools (not rendered by the shipped
template) are described in a block appended to that system prompt, as the V3.1 model card shows. Reasoning is
never rendered: past assistant turns open with ``</think>``, and content up to a first ``</think>`` is cut.
Tool calls are rendered in non-thinking form; tool outputs follow the calls with no generation prompt.
A final ``prefix: true`` message is continued: ``<think>`` opens it in thinking mode (Terminus), followed by
its ``reasoning_content`` when given (and ``</think>`` + content if there is content), and it gets no EOS.
Deviation from the template: content ``None`` renders as empty text, an empty ``tool_calls`` list as none.
"""

from __future__ import annotations

import json
from typing import Any

from dsv32.chat.messages import Conversation, Message
from dsv32.chat.prompt import Prompt
from dsv32.chat.tokens import (
    ASSISTANT,
    BOS,
    EOS,
    THINK_END,
    THINK_START,
    TOOL_CALL_BEGIN,
    TOOL_CALL_END,
    TOOL_CALLS_BEGIN,
    TOOL_CALLS_END,
    TOOL_OUTPUT_BEGIN,
    TOOL_OUTPUT_END,
    TOOL_SEP,
    USER,
)

V31_CALL_FORMAT = (
    f"{TOOL_CALLS_BEGIN}{TOOL_CALL_BEGIN}tool_call_name{TOOL_SEP}tool_call_arguments{TOOL_CALL_END}"
    f"{{additional_tool_calls}}{TOOL_CALLS_END}"
)
V31_CHAINING = "chain them directly without separators or spaces"


def build_v31(conv: Conversation, *, thinking: bool) -> Prompt:
    """The V3.1 prompt of a checked conversation (always with the generation prompt after a user turn)."""
    p = system_prompt(conv, V31_CALL_FORMAT, V31_CHAINING)
    last_user = is_tool = False
    for m in conv.messages:
        if m.role == "user":
            p.tmpl(USER).data(m.text)
            last_user, is_tool = True, False
        elif m.role == "assistant" and m.tool_calls:
            if last_user:
                p.tmpl(ASSISTANT + THINK_END)
            if m.content is not None:
                p.data(m.content)
            p.tmpl(TOOL_CALLS_BEGIN)
            for call in m.tool_calls:
                p.tmpl(TOOL_CALL_BEGIN).data(call.name).tmpl(TOOL_SEP).data(call.arguments).tmpl(
                    TOOL_CALL_END
                )
            p.tmpl(TOOL_CALLS_END + EOS)
            last_user = is_tool = False
        elif m.role == "assistant":
            _assistant(p, m, thinking, after_user=last_user, after_tool=is_tool)
            last_user = is_tool = False
        elif m.role == "tool":
            p.tmpl(TOOL_OUTPUT_BEGIN).data(m.text).tmpl(TOOL_OUTPUT_END)
            last_user, is_tool = False, True
    if last_user:
        p.tmpl(ASSISTANT + (THINK_START if thinking else THINK_END))
    return p


def _assistant(p: Prompt, m: Message, thinking: bool, after_user: bool, after_tool: bool) -> None:
    opened_thinking = after_user and m.prefix and thinking
    if after_user:
        p.tmpl(ASSISTANT + (THINK_START if opened_thinking else THINK_END))
    if opened_thinking and m.reasoning is not None:
        p.data(m.reasoning)
        if m.text:
            p.tmpl(THINK_END).data(m.text)
    elif after_tool:
        p.data(m.text)
    else:
        p.data(m.text.split(THINK_END, 1)[1] if THINK_END in m.text else m.text)
    if not m.prefix:
        p.tmpl(EOS)


def system_prompt(conv: Conversation, call_format: str, chaining: str) -> Prompt:
    """BOS, the system messages joined by blank lines, then the tools block (after a blank line)."""
    p = Prompt().tmpl(BOS)
    texts = [m.text for m in conv.messages if m.role == "system"]
    for i, text in enumerate(texts):
        p.tmpl("\n\n" if i else "").data(text)
    tools = list(conv.tools) + [t for m in conv.messages if m.role == "system" for t in m.tools]
    if tools:
        p.tmpl("\n\n" if "".join(texts) else "")
        render_tool_list(p, tools, call_format, chaining)
    return p


def render_tool_list(p: Prompt, tools: list[dict[str, Any]], call_format: str, chaining: str) -> None:
    """The model card's tool description: one ``### name`` section per tool, then the call format."""
    p.tmpl("## Tools\nYou have access to the following tools:\n\n")
    for fn in tools:
        p.tmpl("### ").data(fn["name"]).tmpl("\nDescription: ").data(fn.get("description") or "")
        p.tmpl("\n\nParameters: ").data(json.dumps(fn.get("parameters") or {})).tmpl("\n\n")
    p.tmpl(
        "IMPORTANT: ALWAYS adhere to this exact format for tool use:\n"
        f"{call_format}\n\n"
        "Where:\n"
        "- `tool_call_name` must be an exact match to one of the available tools\n"
        "- `tool_call_arguments` must be valid JSON that strictly follows the tool's Parameters Schema\n"
        f"- For multiple tool calls, {chaining}"
    )
