"""The DeepSeek-V3 (Dec 2024) prompt: the Jinja template that checkpoint ships (chat-format.md §4.1).

Systems are joined after BOS; ``<｜Assistant｜>`` opens each assistant turn and is the generation prompt;
tool calls carry the type, the name and the arguments in a json fence; tool outputs are wrapped in
``<｜tool▁outputs▁begin｜>…<｜tool▁outputs▁end｜>`` and the answer follows them directly. V3 has no thinking mode.

The shipped template keeps two flags for the whole conversation, and so do we, to render the same text:
only the first tool-calling turn gets ``<｜Assistant｜><｜tool▁calls▁begin｜>`` (later ones start with a newline
and ``<｜tool▁call▁begin｜>``), and only the first round of outputs gets ``<｜tool▁outputs▁begin｜>``.
Tools are described as for V3.1 but with this call syntax (our design; the template renders none).
"""

from __future__ import annotations

from dsv32.chat.encoding_v31 import system_prompt
from dsv32.chat.messages import Conversation
from dsv32.chat.prompt import Prompt
from dsv32.chat.tokens import (
    ASSISTANT,
    EOS,
    THINK_END,
    TOOL_CALL_BEGIN,
    TOOL_CALL_END,
    TOOL_CALLS_BEGIN,
    TOOL_CALLS_END,
    TOOL_OUTPUT_BEGIN,
    TOOL_OUTPUT_END,
    TOOL_OUTPUTS_BEGIN,
    TOOL_OUTPUTS_END,
    TOOL_SEP,
    USER,
)

V3_CALL_FORMAT = (
    f"{TOOL_CALLS_BEGIN}{TOOL_CALL_BEGIN}function{TOOL_SEP}tool_call_name\n```json\ntool_call_arguments\n```"
    f"{TOOL_CALL_END}{{additional_tool_calls}}{TOOL_CALLS_END}"
)
V3_CHAINING = "put each on a new line"


def build_v3(conv: Conversation, *, thinking: bool = False) -> Prompt:
    """The V3 prompt of a checked conversation (generation prompt unless the last message is continued)."""
    p = system_prompt(conv, V3_CALL_FORMAT, V3_CHAINING)
    first_call_done = outputs_started = is_tool = False
    continued = False
    for m in conv.messages:
        if m.role == "user":
            p.tmpl(USER).data(m.text)
            is_tool = False
        elif m.role == "assistant" and m.tool_calls:
            for call in m.tool_calls:
                if not first_call_done:
                    p.tmpl(ASSISTANT)
                    if m.content is not None:
                        p.data(m.content)
                    p.tmpl(TOOL_CALLS_BEGIN + TOOL_CALL_BEGIN)
                    first_call_done = True
                else:
                    p.tmpl("\n" + TOOL_CALL_BEGIN)
                p.tmpl("function" + TOOL_SEP).data(call.name).tmpl("\n```json\n").data(call.arguments)
                p.tmpl("\n```" + TOOL_CALL_END)
            p.tmpl(TOOL_CALLS_END + EOS)
            is_tool = False
        elif m.role == "assistant":
            if is_tool:
                p.tmpl(TOOL_OUTPUTS_END).data(m.text)
            else:
                p.tmpl(ASSISTANT).data(m.text.split(THINK_END)[-1])
            p.tmpl("" if m.prefix else EOS)
            is_tool, continued = False, m.prefix
        elif m.role == "tool":
            p.tmpl(TOOL_OUTPUT_BEGIN if outputs_started else TOOL_OUTPUTS_BEGIN + TOOL_OUTPUT_BEGIN)
            p.data(m.text).tmpl(TOOL_OUTPUT_END)
            outputs_started = is_tool = True
    if is_tool:
        p.tmpl(TOOL_OUTPUTS_END)
    elif not continued:
        p.tmpl(ASSISTANT)
    return p
