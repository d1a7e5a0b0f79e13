"""Generated text → ``reasoning_content``, ``content`` and OpenAI ``tool_calls``, one-shot or as a stream.

:class:`StreamParser` is a state machine over decoded text (chat-format.md §3.3)::

    start → reasoning --"</think>"--> content --block open--> tools --block close--> trailer → done

It works on any chunk boundaries: a suffix that may be the start of a tag is held back until the next
characters decide it, so no tag is ever shown half. :func:`parse_completion` feeds the whole text at once
through the same machine, so a stream's concatenated deltas always equal the one-shot parse.

Malformed output never raises, and DSML markup is never shown as content (§3.3). A tool-call block that
breaks is dropped from the point where it breaks up to its closing tag (the text after that is read as after
a well-formed block); a call it had started is closed (its arguments stay valid JSON: they have been streamed
already). A block cut off by the end of the text keeps its calls likewise. Whitespace before a tool-call block
is not content. A ``</think>`` in content (the reasoning was closed already, or chat mode, whose prompt closes
it) is dropped: the text before it has been streamed as content. Text after the block or after
``<｜end▁of▁sentence｜>`` is dropped. Every such case is recorded in ``problems``.
"""

from __future__ import annotations

import secrets
import string
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from dsv32.chat.dsml import BLOCK_CLOSES, BLOCK_OPEN, BLOCK_OPEN_ALIAS, DsmlBlockParser
from dsv32.chat.errors import ChatFormatError
from dsv32.chat.family import check_family
from dsv32.chat.textscan import find_first, held_suffix
from dsv32.chat.tokens import EOS, THINK_END, THINK_START, TOOL_CALLS_BEGIN, TOOL_CALLS_END
from dsv32.chat.tool_tokens import V3BlockParser, V31BlockParser
from dsv32.chat.toolblock import BlockParser, Event, tool_schemas

_ALNUM = string.ascii_letters + string.digits


def random_call_id(index: int) -> str:
    """A DeepSeek-style tool-call id: ``call_<index, 2 digits>_<22 random letters/digits>``."""
    return f"call_{index:02d}_" + "".join(secrets.choice(_ALNUM) for _ in range(22))


@dataclass(frozen=True)
class _Syntax:
    open_tags: tuple[str, ...]
    close_tags: tuple[str, ...]
    block: Callable[[dict[str, dict[str, Any]] | None], BlockParser]


_SYNTAX = {
    "v3.2": _Syntax((BLOCK_OPEN, BLOCK_OPEN_ALIAS), BLOCK_CLOSES, DsmlBlockParser),
    "v3.1": _Syntax((TOOL_CALLS_BEGIN,), (TOOL_CALLS_END,), V31BlockParser),
    "v3": _Syntax((TOOL_CALLS_BEGIN,), (TOOL_CALLS_END,), V3BlockParser),
}


def tool_block_markers(family: str) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """The opening and closing markers of a tool-call block in ``family``'s output."""
    syntax = _SYNTAX[family]
    return syntax.open_tags, syntax.close_tags


@dataclass(frozen=True)
class Delta:
    """One piece of output: reasoning text, content text, or one tool-call entry (OpenAI stream shape).

    ``tool_call`` is ``{"index", "id", "type", "function": {"name", "arguments": ""}}`` when a call starts and
    ``{"index", "function": {"arguments": fragment}}`` for the following argument fragments.
    """

    reasoning_content: str | None = None
    content: str | None = None
    tool_call: dict[str, Any] | None = None

    def to_openai(self) -> dict[str, Any]:
        """The ``delta`` object of a ``chat.completion.chunk``."""
        if self.tool_call is not None:
            return {"tool_calls": [self.tool_call]}
        if self.reasoning_content is not None:
            return {"reasoning_content": self.reasoning_content}
        return {"content": self.content}


class StreamParser:
    """Feed generated text chunk by chunk; get :class:`Delta` lists back; call :meth:`finish` at the end.

    ``thinking``: the reply has a ``reasoning_content`` (``""`` if none). ``in_reasoning`` (default:
    ``thinking``): the text starts inside the reasoning, as after a prompt that ends with ``<think>``; a
    thinking-mode prefix completion whose prompt closed the reasoning starts in content.
    """

    def __init__(
        self,
        *,
        tools: list[dict[str, Any]] | None = None,
        thinking: bool = False,
        family: str = "v3.2",
        call_id: Callable[[int], str] = random_call_id,
        in_reasoning: bool | None = None,
    ):
        self.family = check_family(family)
        if thinking and self.family == "v3":
            raise ChatFormatError("thinking", "the v3 format has no thinking mode")
        self.thinking = thinking
        self.in_reasoning = thinking if in_reasoning is None else in_reasoning
        self.problems: list[str] = []
        self._syntax = _SYNTAX[self.family]
        self._schemas = tool_schemas(tools)
        self._call_id = call_id
        self._state = "start"
        self._buf = ""
        self._out: list[Delta] = []
        self._reasoning: list[str] = []
        self._saw_reasoning = thinking
        self._content: list[str] = []
        self._calls: list[dict[str, Any]] = []
        self._block: BlockParser | None = None
        self._dropped = False
        self._finished = False

    # ---- public -----------------------------------------------------------------------------------

    def feed(self, text: str) -> list[Delta]:
        """Deltas that ``text`` makes certain (held-back text comes with a later call)."""
        if self._finished:
            raise RuntimeError("StreamParser.feed() after finish()")
        self._buf += text
        self._run(final=False)
        return self._take()

    def finish(self) -> list[Delta]:
        """Deltas for everything still held back; the end of the text decides every open question."""
        if not self._finished:
            self._run(final=True)
            if self._state == "reasoning":
                self.problems.append("reasoning was not closed with </think>")
            self._finished = True
        return self._take()

    @property
    def tool_call_count(self) -> int:
        return len(self._calls)

    def call_arguments(self, index: int) -> str:
        """The arguments so far of tool call ``index`` (JSON text, maybe incomplete)."""
        return "".join(self._calls[index]["args"])

    def result(self) -> dict[str, Any]:
        """The message so far: ``role``, ``reasoning_content`` (None without reasoning), ``content``,
        ``tool_calls`` (OpenAI shape, possibly empty) and ``problems`` (strings; empty when well-formed)."""
        return {
            "role": "assistant",
            "reasoning_content": "".join(self._reasoning) if self._saw_reasoning else None,
            "content": "".join(self._content),
            "tool_calls": [
                {
                    "id": c["id"],
                    "type": "function",
                    "function": {"name": c["name"], "arguments": "".join(c["args"])},
                }
                for c in self._calls
            ],
            "problems": list(self.problems),
        }

    # ---- state machine ----------------------------------------------------------------------------

    def _run(self, final: bool) -> None:
        steps = {
            "start": self._start,
            "reasoning": self._in_reasoning,
            "content": self._in_content,
            "tools": self._in_tools,
            "broken": self._in_broken_block,
            "trailer": self._in_trailer,
            "done": self._done,
        }
        while steps[self._state](final):
            pass

    def _start(self, final: bool) -> bool:
        head = self._buf.lstrip()
        if head.startswith(THINK_START):  # a stray (thinking) or unprompted (chat) opening tag
            self._buf = head[len(THINK_START) :]
            self._saw_reasoning = True
            self._state = "reasoning"
            return True
        if THINK_START.startswith(head) and not final:
            return False
        self._state = "reasoning" if self.in_reasoning else "content"
        return True

    def _in_reasoning(self, final: bool) -> bool:
        i, marker = find_first(self._buf, (THINK_END, EOS))
        if i >= 0:
            self._emit_reasoning(self._buf[:i])
            self._buf = self._buf[i + len(marker) :]
            self._state = "content" if marker == THINK_END else "done"
            if marker == EOS:
                self.problems.append("reasoning was not closed with </think>")
            return True
        cut = len(self._buf) - (0 if final else held_suffix(self._buf, (THINK_END, EOS)))
        self._emit_reasoning(self._buf[:cut])
        self._buf = self._buf[cut:]
        return False

    def _in_content(self, final: bool) -> bool:
        tags = self._syntax.open_tags
        i, marker = find_first(self._buf, (*tags, THINK_END, EOS))
        if i >= 0:
            before = self._buf[:i]
            self._buf = self._buf[i + len(marker) :]
            if marker == EOS:
                self._emit_content(before)
                self._state = "done"
            elif marker == THINK_END:
                self.problems.append("</think> in content dropped")
                self._emit_content(before)
            else:  # whitespace before the block (the "\n\n" of the delimiter, or more) is not content
                self._emit_content(before.rstrip())
                self._block = self._syntax.block(self._schemas)
                self._state = "tools"
            return True
        if final:
            # the text ends inside a tool block's opening tag ("<｜DSML｜func", cut off by max_tokens): markup,
            # never content, dropped with the whitespace before it. A lone "<" stays text: it may be one.
            partial_tag = held_suffix(self._buf, tags)
            if partial_tag >= len("<｜"):
                self._buf = self._buf[:-partial_tag].rstrip()
                self.problems.append("the text ended inside a tool-call block's opening tag; dropped")
            cut = len(self._buf)
        else:  # hold back a possible tag start, and trailing whitespace (dropped if a block follows)
            cut = len(self._buf) - held_suffix(self._buf, (*tags, THINK_END, EOS))
            cut = len(self._buf[:cut].rstrip())
        self._emit_content(self._buf[:cut])
        self._buf = self._buf[cut:]
        return False

    def _in_tools(self, final: bool) -> bool:
        assert self._block is not None
        step = self._block.step(self._buf, final)
        self._buf = self._buf[step.consumed :]
        self._apply(step.events)
        self._collect_block_problems()
        if step.status == "closed":
            self._state = "trailer"
            return True
        if step.status == "error":
            self.problems.append(
                f"malformed tool-call block: {step.problem}; the rest of the block is dropped"
            )
            self._apply(self._block.abort())
            self._state = "broken"
            return True
        if final:
            self.problems.append("tool-call block cut off before its end")
            self._apply(self._block.abort())
            self._collect_block_problems()
            self._buf = ""
            self._state = "done"
        return False

    def _in_broken_block(self, final: bool) -> bool:
        """Drop the rest of a malformed block: up to its closing tag (then as after a block) or the end."""
        i, marker = find_first(self._buf, (*self._syntax.close_tags, EOS))
        if i >= 0:
            self._buf = self._buf[i + len(marker) :]
            self._state = "trailer" if marker != EOS else "done"
            return True
        keep = 0 if final else held_suffix(self._buf, (*self._syntax.close_tags, EOS))
        self._buf = self._buf[len(self._buf) - keep :]
        return False

    def _in_trailer(self, final: bool) -> bool:
        rest = self._buf.lstrip()
        if not rest:
            self._buf = ""
            return False
        for tag in self._syntax.open_tags:  # a second block right after the first
            if rest.startswith(tag):
                self._buf = rest[len(tag) :]
                self._block = self._syntax.block(self._schemas)
                self._state = "tools"
                return True
        if rest.startswith(EOS):
            self._buf = rest[len(EOS) :]
            self._state = "done"
            return True
        if not final and any(t.startswith(rest) for t in (*self._syntax.open_tags, EOS)):
            return False
        self._buf = rest
        self._state = "done"
        return True

    def _done(self, final: bool) -> bool:
        if self._buf.strip() and not self._dropped:
            self._dropped = True
            self.problems.append("text after the end of the message dropped")
        self._buf = ""
        return False

    # ---- output -----------------------------------------------------------------------------------

    def _apply(self, events: list[Event]) -> None:
        for kind, value in events:
            if kind == "open":
                index = len(self._calls)
                call = {"id": self._call_id(index), "name": value, "args": []}
                self._calls.append(call)
                head = {"index": index, "id": call["id"], "type": "function"}
                self._out.append(Delta(tool_call={**head, "function": {"name": value, "arguments": ""}}))
            elif value:
                index = len(self._calls) - 1
                self._calls[index]["args"].append(value)
                last = self._out[-1] if self._out else None
                if (
                    last
                    and last.tool_call
                    and last.tool_call["index"] == index
                    and "id" not in last.tool_call
                ):
                    value = last.tool_call["function"]["arguments"] + value
                    self._out.pop()
                self._out.append(Delta(tool_call={"index": index, "function": {"arguments": value}}))

    def _collect_block_problems(self) -> None:
        if self._block is not None and self._block.problems:
            self.problems.extend(self._block.problems)
            self._block.problems.clear()

    def _emit_reasoning(self, text: str) -> None:
        if text:
            self._reasoning.append(text)
            last = self._out[-1] if self._out else None
            if last and last.reasoning_content is not None:
                text = last.reasoning_content + text
                self._out.pop()
            self._out.append(Delta(reasoning_content=text))

    def _emit_content(self, text: str) -> None:
        if text:
            self._content.append(text)
            last = self._out[-1] if self._out else None
            if last and last.content is not None:
                text = last.content + text
                self._out.pop()
            self._out.append(Delta(content=text))

    def _take(self) -> list[Delta]:
        out, self._out = self._out, []
        return out


def parse_completion(
    text: str,
    *,
    tools: list[dict[str, Any]] | None = None,
    thinking: bool = False,
    family: str = "v3.2",
    call_id: Callable[[int], str] = random_call_id,
    in_reasoning: bool | None = None,
) -> dict[str, Any]:
    """Parse one whole completion (the text after the prompt, with or without the final EOS).

    Returns ``{"role": "assistant", "reasoning_content", "content", "tool_calls", "problems"}``; see
    :meth:`StreamParser.result`. ``problems`` is for the caller's logs, not for the client.
    """
    parser = StreamParser(
        tools=tools, thinking=thinking, family=family, call_id=call_id, in_reasoning=in_reasoning
    )
    parser.feed(text)
    parser.finish()
    return parser.result()
