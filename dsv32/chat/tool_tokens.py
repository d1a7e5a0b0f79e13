"""Parsers of the V3.1 and V3 tool-call blocks, which use the vocabulary's tool tokens (chat-format.md §4).

V3.1: ``<｜tool▁call▁begin｜>NAME<｜tool▁sep｜>ARGS<｜tool▁call▁end｜>``, calls chained, the block closed by
``<｜tool▁calls▁end｜>``. V3: ``<｜tool▁call▁begin｜>function<｜tool▁sep｜>NAME\\n```json\\nARGS\\n```<｜tool▁call▁end｜>``,
calls separated by newlines. ``ARGS`` is the arguments JSON, streamed as it arrives; arguments that turn out not
to be a JSON object are kept (they were already streamed) and the problem is recorded.
"""

from __future__ import annotations

import re
from typing import Any

from dsv32.chat.textscan import NEED_MORE, expect, find_first, held_suffix
from dsv32.chat.tokens import TOOL_CALL_BEGIN, TOOL_CALL_END, TOOL_CALLS_END, TOOL_SEP
from dsv32.chat.toolblock import Event, Step, is_json_object

_MAX_HEADER = 512
_V31_HEADER = re.compile(r"\s*([^\s<>]+)\s*")
_V3_HEADER = re.compile(r"\s*(\w+)\s*" + re.escape(TOOL_SEP) + r"\s*([^\s<>`]+)\s*")


class V31BlockParser:
    """Inside of one ``<｜tool▁calls▁begin｜>`` block in the V3.1 syntax."""

    header_end = TOOL_SEP
    arg_closers: tuple[str, ...] = (TOOL_CALL_END,)

    def __init__(self, schemas: dict[str, dict[str, Any]] | None = None):
        self.schemas = schemas
        self.problems: list[str] = []
        self._in_args = False
        self._name = ""
        self._args: list[str] = []

    def _header_name(self, head: str) -> str | None:
        m = _V31_HEADER.fullmatch(head)
        return m.group(1) if m else None

    def _strip_close(self, args: str) -> str:
        return args

    def step(self, text: str, final: bool) -> Step:
        pos, events = 0, []
        while True:
            if not self._in_args:
                r = expect(text, pos, (TOOL_CALL_BEGIN, TOOL_CALLS_END))
                if r is None:
                    return Step(
                        pos, events, "error", "expected a tool call or the end of the tool-call block"
                    )
                if r == NEED_MORE:
                    return Step(pos, events)
                tag, end = r
                if tag == TOOL_CALLS_END:
                    return Step(end, events, "closed")
                k = text.find(self.header_end, end)
                if k == -1:
                    head = text[end : len(text) - held_suffix(text[end:], (self.header_end,))]
                    if len(head) > _MAX_HEADER or "\n\n" in head or TOOL_CALL_END in head:
                        return Step(pos, events, "error", "malformed tool call header")
                    return Step(pos, events)
                name = self._header_name(text[end:k])
                if not name:
                    return Step(pos, events, "error", "malformed tool call header")
                if self.schemas is not None and name not in self.schemas:
                    self.problems.append(f"call of unknown tool {name!r}")
                events.append(("open", name))
                self._in_args, self._name, self._args, pos = True, name, [], k + len(self.header_end)
            else:
                k, _ = find_first(text, (TOOL_CALL_END,), pos)
                if k == -1:
                    cut = len(text) - held_suffix(text[pos:], self.arg_closers)
                    if cut > pos:
                        events.append(("args", text[pos:cut]))
                        self._args.append(text[pos:cut])
                    return Step(max(pos, cut), events)
                piece = self._strip_close(text[pos:k])
                self._args.append(piece)
                events += [("args", piece)] if piece else []
                events += self._close_call()
                self._in_args, pos = False, k + len(TOOL_CALL_END)

    def _close_call(self) -> list[Event]:
        args = "".join(self._args)
        if not args.strip():
            return [("args", "{}")]
        if not is_json_object(args):
            self.problems.append(f"arguments of the call of {self._name!r} are not a JSON object")
        return []

    def abort(self) -> list[Event]:
        events = self._close_call() if self._in_args else []
        self._in_args = False
        return events


class V3BlockParser(V31BlockParser):
    """Inside of one ``<｜tool▁calls▁begin｜>`` block in the V3 syntax (type, name, fenced JSON)."""

    header_end = "```json\n"
    arg_closers = ("\n```" + TOOL_CALL_END, "```" + TOOL_CALL_END, TOOL_CALL_END)

    def _header_name(self, head: str) -> str | None:
        m = _V3_HEADER.fullmatch(head)
        return m.group(2) if m else None

    def _strip_close(self, args: str) -> str:
        if args.endswith("```"):
            args = args[:-3]
        return args[:-1] if args.endswith("\n") else args
