"""DSML, the V3.2 tool markup: the tools block for the system prompt, rendering calls, parsing them back.

Rendering (chat-format.md §2.2–2.3): each call is an ``invoke`` with one ``parameter`` per top-level argument;
string values are written raw with ``string="true"``, anything else as JSON with ``string="false"``.

Parsing (§3.1–3.3) is incremental and lenient about whitespace between tags; ``<｜DSML｜tool_calls>`` is
accepted as an alias of ``function_calls``. Arguments are emitted as JSON fragments: ``{`` when the invoke tag
is complete, ``"key": value`` per parameter (string values streamed as they arrive, others at their closing
tag), ``}`` at ``</｜DSML｜invoke>``. A ``string="false"`` value that is not JSON is converted by the tool
schema's declared type, else kept as a string, and the problem is recorded.
"""

from __future__ import annotations

import json
import math
import re
from typing import Any

from dsv32.chat.messages import ToolCall
from dsv32.chat.prompt import Prompt
from dsv32.chat.textscan import NEED_MORE, expect, held_suffix
from dsv32.chat.tokens import DSML, THINK_END, THINK_START
from dsv32.chat.toolblock import Event, Step

BLOCK_OPEN = f"<{DSML}function_calls>"
BLOCK_OPEN_ALIAS = f"<{DSML}tool_calls>"
BLOCK_CLOSES = (f"</{DSML}function_calls>", f"</{DSML}tool_calls>")
INVOKE_OPEN = f"<{DSML}invoke"
INVOKE_CLOSE = f"</{DSML}invoke>"
PARAM_OPEN = f"<{DSML}parameter"
PARAM_CLOSE = f"</{DSML}parameter>"

# Written from chat-format.md §2.3; the think tags in it are control tokens.
_TOOLS_INTRO = (
    "## Tools\n"
    "You have access to a set of tools you can use to answer the user's question.\n"
    f'You can invoke functions by writing a "<{DSML}function_calls>" block like the following as part of your reply '
    "to the user:\n"
    f"<{DSML}function_calls>\n"
    f'<{DSML}invoke name="$FUNCTION_NAME">\n'
    f'<{DSML}parameter name="$PARAMETER_NAME" string="true|false">$PARAMETER_VALUE</{DSML}parameter>\n'
    "...\n"
    f"</{DSML}invoke>\n"
    f'<{DSML}invoke name="$FUNCTION_NAME2">\n'
    "...\n"
    f"</{DSML}invoke>\n"
    f"</{DSML}function_calls>\n"
    "String and scalar parameters should be specified as is without any escaping or quotes, while lists and "
    'objects should use JSON format. The "string" attribute should be set to "true" for string type parameters '
    'and "false" for other types (numbers, booleans, arrays, objects).\n'
    "If the thinking_mode is enabled, then after function results you should strongly consider outputting a "
    "thinking block. Here is an example:\n"
    f"<{DSML}function_calls>\n"
    "...\n"
    f"</{DSML}function_calls>\n"
    "<function_results>\n"
    "...\n"
    "</function_results>\n"
    f"{THINK_START}...thinking about results{THINK_END}\n"
    "Here are the functions available in JSONSchema format:\n"
    "<functions>\n"
)


def to_json(value: Any) -> str:
    """JSON as the V3.2 encoder writes it: default separators, non-ASCII kept."""
    return json.dumps(value, ensure_ascii=False)


def render_tools(p: Prompt, functions: tuple[dict[str, Any], ...]) -> None:
    """The tools block (ends with a newline after ``</functions>``); schemas are request data."""
    p.tmpl(_TOOLS_INTRO)
    for fn in functions:
        p.data(to_json(fn)).tmpl("\n")
    p.tmpl("</functions>\n")


def render_calls(p: Prompt, calls: tuple[ToolCall, ...]) -> None:
    """``\\n\\n<｜DSML｜function_calls>\\n`` + invokes joined by newlines + ``\\n</｜DSML｜function_calls>``."""
    p.tmpl(f"\n\n{BLOCK_OPEN}\n")
    for i, call in enumerate(calls):
        if i:
            p.tmpl("\n")
        p.tmpl(f'{INVOKE_OPEN} name="').data(call.name).tmpl('">\n')
        for j, (key, value) in enumerate(call.args.items()):
            if j:
                p.tmpl("\n")
            is_str = isinstance(value, str)
            p.tmpl(f'{PARAM_OPEN} name="').data(key).tmpl(f'" string="{"true" if is_str else "false"}">')
            p.data(value if is_str else to_json(value)).tmpl(PARAM_CLOSE)
        p.tmpl(f"\n{INVOKE_CLOSE}")
    p.tmpl(f"\n{BLOCK_CLOSES[0]}")


_ATTR = re.compile(r'\s+([A-Za-z_][\w-]*)\s*=\s*"([^"]*)"')
_MAX_TAG = 1024


def _attrs(text: str, pos: int) -> tuple[dict[str, str], int] | str | None:
    """Attributes from ``pos`` to the tag's ``>``: ``(attrs, end)``, ``NEED_MORE``, or None if malformed."""
    k = text.find(">", pos)
    if k == -1:
        rest = text[pos:]
        return None if len(rest) > _MAX_TAG or "<" in rest else NEED_MORE
    seg, attrs, i = text[pos:k], {}, 0
    while True:
        m = _ATTR.match(seg, i)
        if not m:
            break
        attrs[m.group(1)] = m.group(2)
        i = m.end()
    return (attrs, k + 1) if not seg[i:].strip() else None


class DsmlBlockParser:
    """Incremental parser of the inside of one ``<｜DSML｜function_calls>`` block."""

    def __init__(self, schemas: dict[str, dict[str, Any]] | None = None):
        self.schemas = schemas
        self.problems: list[str] = []
        self._state = "block"  # block | params | value
        self._name = ""
        self._first = True
        self._keys: set[str] = set()
        self._key = ""
        self._streaming = False  # current value is a string streamed as it arrives
        self._skip = False  # current parameter is a duplicate and is dropped
        self._declared: str | None = None

    def step(self, text: str, final: bool) -> Step:
        pos, events = 0, []
        while True:
            if self._state == "block":
                r = expect(text, pos, (INVOKE_OPEN, *BLOCK_CLOSES))
                if r is None:
                    return Step(pos, events, "error", "expected an invoke or the end of the tool-call block")
                if r == NEED_MORE:
                    return Step(pos, events)
                tag, end = r
                if tag != INVOKE_OPEN:
                    return Step(end, events, "closed")
                a = _attrs(text, end)
                if a == NEED_MORE:
                    return Step(pos, events)
                if a is None or not a[0].get("name"):
                    return Step(pos, events, "error", "malformed invoke tag")
                self._name = a[0]["name"]
                if self.schemas is not None and self._name not in self.schemas:
                    self.problems.append(f"call of unknown tool {self._name!r}")
                events += [("open", self._name), ("args", "{")]
                self._state, self._first, self._keys, pos = "params", True, set(), a[1]
            elif self._state == "params":
                r = expect(text, pos, (PARAM_OPEN, INVOKE_CLOSE))
                if r is None:
                    return Step(
                        pos, events, "error", f"expected a parameter or the end of invoke {self._name!r}"
                    )
                if r == NEED_MORE:
                    return Step(pos, events)
                tag, end = r
                if tag == INVOKE_CLOSE:
                    events.append(("args", "}"))
                    self._state, pos = "block", end
                    continue
                a = _attrs(text, end)
                if a == NEED_MORE:
                    return Step(pos, events)
                declared = a[0].get("string") if a else None
                if a is None or not a[0].get("name") or declared not in (None, "true", "false"):
                    return Step(pos, events, "error", f"malformed parameter tag in invoke {self._name!r}")
                self._open_param(a[0]["name"], declared, events)
                pos = a[1]
            else:
                k = text.find(PARAM_CLOSE, pos)
                if k == -1:
                    if self._streaming:
                        cut = len(text) - held_suffix(text[pos:], (PARAM_CLOSE,))
                        if cut > pos and not self._skip:
                            events.append(("args", _escape(text[pos:cut])))
                        pos = max(pos, cut)
                    return Step(pos, events)
                raw = text[pos:k]
                if not self._skip:
                    if self._streaming:
                        events.append(("args", _escape(raw) + '"'))
                    else:
                        events.append(("args", self._sep() + to_json(self._key) + ": " + self._value(raw)))
                self._state, pos = "params", k + len(PARAM_CLOSE)

    def abort(self) -> list[Event]:
        events: list[Event] = []
        if self._state == "value" and self._streaming and not self._skip:
            events.append(("args", '"'))
        if self._state in ("params", "value"):
            events.append(("args", "}"))
        self._state = "block"
        return events

    def _open_param(self, key: str, declared: str | None, events: list[Event]) -> None:
        self._key, self._declared, self._state = key, declared, "value"
        self._skip = key in self._keys
        if self._skip:
            self.problems.append(f"duplicate parameter {key!r} in call of {self._name!r} dropped")
        self._keys.add(key)
        self._streaming = declared == "true" or (declared is None and self._schema_type() == "string")
        if self._streaming and not self._skip:
            events.append(("args", self._sep() + to_json(key) + ': "'))

    def _sep(self) -> str:
        sep = "" if self._first else ", "
        self._first = False
        return sep

    def _schema_type(self) -> str | None:
        props = ((self.schemas or {}).get(self._name) or {}).get("properties")
        spec = props.get(self._key) if isinstance(props, dict) else None
        t = spec.get("type") if isinstance(spec, dict) else None
        if isinstance(t, list):
            t = next((x for x in t if x != "null"), None)
        return t if isinstance(t, str) else None

    def _value(self, raw: str) -> str:
        """A non-string value as JSON text: verbatim if it parses, else converted by the schema type."""
        text = raw.strip()
        try:
            json.loads(text, parse_constant=_not_json)  # NaN / Infinity: Python reads them, JSON has none
            return text
        except ValueError:
            pass
        converted = _convert(text, self._schema_type())
        if self._declared == "false":
            kept = "converted by the schema" if converted is not None else "kept as a string"
            self.problems.append(f"parameter {self._key!r} of {self._name!r} is not valid JSON; {kept}")
        return converted if converted is not None else to_json(raw)


def _not_json(name: str) -> None:
    raise ValueError(f"{name} is not JSON")


def _convert(text: str, schema_type: str | None) -> str | None:
    low = text.lower()
    try:
        if schema_type == "integer":
            return str(int(text))
        if schema_type == "number":
            x = float(text)
            return to_json(int(x) if x.is_integer() and "." not in text else x) if math.isfinite(x) else None
    except ValueError:
        return None
    if schema_type == "boolean" and low in ("true", "false"):
        return low
    if schema_type == "null" and low in ("null", "none"):
        return "null"
    return None


def _escape(text: str) -> str:
    """JSON string-body escaping; per-character, so escaped pieces concatenate to the escaped whole."""
    return json.dumps(text, ensure_ascii=False)[1:-1]
