"""What a tool-call block parser reports to the streaming parser (one parser per family's call syntax).

A block parser is fed the text after the block's opening tag. Each :meth:`BlockParser.step` consumes
whole elements (a tag, a completed value, or the part of a streamed string value that cannot be a closing
tag) and reports events: ``("open", name)`` when a call's name is known, ``("args", fragment)`` for the
next piece of its JSON arguments. Text it cannot parse is left unconsumed and ``status`` is ``"error"``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

Event = tuple[Literal["open", "args"], str]
Status = Literal["more", "closed", "error"]


@dataclass
class Step:
    consumed: int
    events: list[Event] = field(default_factory=list)
    status: Status = "more"
    problem: str = ""


class BlockParser(Protocol):
    problems: list[str]

    def step(self, text: str, final: bool) -> Step: ...

    def abort(self) -> list[Event]:
        """Events that close a call left open (the block ended early); the parser is then done."""
        ...


def tool_schemas(tools: Any) -> dict[str, dict[str, Any]] | None:
    """Tool name → its ``parameters`` schema, from OpenAI ``tools`` or bare function objects; None if no tools."""
    if not tools:
        return None
    out = {}
    for tool in tools:
        fn = tool.get("function", tool) if isinstance(tool, dict) else {}
        if isinstance(fn, dict) and isinstance(fn.get("name"), str):
            params = fn.get("parameters")
            out[fn["name"]] = params if isinstance(params, dict) else {}
    return out


def is_json_object(text: str) -> bool:
    try:
        return isinstance(json.loads(text), dict)
    except ValueError:
        return False
