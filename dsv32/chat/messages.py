"""OpenAI-style message and tool dicts checked and turned into small typed records for the encoders.

Every problem raises :class:`ChatFormatError` naming the field (``messages[3].tool_calls[0].function.name``).
Accepted shapes: ``content`` as a string, ``None`` (assistant, system) or a list of ``{"type": "text"}`` parts;
``tool_calls[].function.arguments`` as a JSON-object string (or an already decoded dict); ``reasoning_content``
(alias ``reasoning``); ``prefix`` (chat prefix completion, last assistant message only).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from dsv32.chat.errors import ChatFormatError

ROLES = ("system", "user", "assistant", "tool", "developer")


@dataclass(frozen=True)
class ToolCall:
    """One assistant tool call: ``arguments`` is the JSON text as sent, ``args`` the decoded object."""

    name: str
    arguments: str
    args: dict[str, Any]
    id: str | None = None


@dataclass(frozen=True)
class Message:
    """One checked message. ``content`` is ``None`` only where the client sent null (assistant, system)."""

    role: str
    content: str | None
    reasoning: str | None = None
    tool_calls: tuple[ToolCall, ...] = ()
    prefix: bool = False
    tools: tuple[dict[str, Any], ...] = ()
    response_format: dict[str, Any] | None = None

    @property
    def text(self) -> str:
        return self.content or ""


@dataclass
class Conversation:
    """Checked messages plus the tools given at the top level of the request."""

    messages: list[Message]
    tools: tuple[dict[str, Any], ...] = field(default_factory=tuple)


def parse_conversation(messages: Any, tools: Any = None, *, roles: tuple[str, ...] = ROLES) -> Conversation:
    """Check ``messages`` (and top-level ``tools``); raise :class:`ChatFormatError` on the first problem."""
    if not isinstance(messages, (list, tuple)):
        raise ChatFormatError("messages", f"expected a list of message objects, got {_type(messages)}")
    if not messages:
        raise ChatFormatError("messages", "at least one message is required")
    out = [_parse_message(m, f"messages[{i}]", roles) for i, m in enumerate(messages)]
    for i, m in enumerate(out):
        if m.prefix and i != len(out) - 1:
            raise ChatFormatError(f"messages[{i}].prefix", "only the last message may set prefix: true")
    return Conversation(out, parse_tools(tools, "tools") if tools is not None else ())


def parse_tools(tools: Any, where: str) -> tuple[dict[str, Any], ...]:
    """OpenAI ``tools`` (``{"type": "function", "function": {...}}``, or bare function objects) → functions."""
    if not isinstance(tools, (list, tuple)):
        raise ChatFormatError(where, f"expected a list of tools, got {_type(tools)}")
    out = []
    for i, tool in enumerate(tools):
        path = f"{where}[{i}]"
        if not isinstance(tool, dict):
            raise ChatFormatError(path, f"expected an object, got {_type(tool)}")
        if "function" in tool:
            if tool.get("type", "function") != "function":
                raise ChatFormatError(
                    f"{path}.type", f"only 'function' tools are supported, got {tool['type']!r}"
                )
            fn, path = tool["function"], f"{path}.function"
            if not isinstance(fn, dict):
                raise ChatFormatError(path, f"expected an object, got {_type(fn)}")
        else:
            fn = tool
        name = fn.get("name")
        if not isinstance(name, str) or not name:
            raise ChatFormatError(
                f"{path}.name", "missing" if name is None else "expected a non-empty string"
            )
        if fn.get("description") is not None and not isinstance(fn["description"], str):
            raise ChatFormatError(f"{path}.description", f"expected a string, got {_type(fn['description'])}")
        if fn.get("parameters") is not None and not isinstance(fn["parameters"], dict):
            raise ChatFormatError(
                f"{path}.parameters", f"expected a JSON schema object, got {_type(fn['parameters'])}"
            )
        out.append(dict(fn))
    return tuple(out)


def _parse_message(m: Any, path: str, roles: tuple[str, ...]) -> Message:
    if not isinstance(m, dict):
        raise ChatFormatError(path, f"expected an object, got {_type(m)}")
    role = m.get("role")
    if role is None:
        raise ChatFormatError(f"{path}.role", "missing")
    if role not in roles:
        raise ChatFormatError(f"{path}.role", f"unknown role {role!r} (allowed: {', '.join(roles)})")
    if "content" not in m and role != "assistant":
        raise ChatFormatError(f"{path}.content", "missing")
    content = _content(m.get("content"), f"{path}.content", nullable=role in ("assistant", "system"))
    reasoning = m.get("reasoning_content", m.get("reasoning"))
    if reasoning is not None and not isinstance(reasoning, str):
        raise ChatFormatError(
            f"{path}.reasoning_content", f"expected a string or null, got {_type(reasoning)}"
        )
    prefix = m.get("prefix", False)
    if not isinstance(prefix, bool):
        raise ChatFormatError(f"{path}.prefix", f"expected true or false, got {_type(prefix)}")
    if prefix and role != "assistant":
        raise ChatFormatError(
            f"{path}.prefix", f"only an assistant message may set prefix: true, not {role!r}"
        )
    calls: tuple[ToolCall, ...] = ()
    if m.get("tool_calls") is not None:
        if role != "assistant":
            raise ChatFormatError(
                f"{path}.tool_calls", f"only assistant messages carry tool calls, not {role!r}"
            )
        calls = _tool_calls(m["tool_calls"], f"{path}.tool_calls")
        if prefix and calls:
            raise ChatFormatError(
                f"{path}.tool_calls", "a prefix (continued) message cannot carry tool calls"
            )
    tools: tuple[dict[str, Any], ...] = ()
    if m.get("tools") is not None:
        if role not in ("system", "developer"):
            raise ChatFormatError(f"{path}.tools", f"tools belong on a system message, not on {role!r}")
        tools = parse_tools(m["tools"], f"{path}.tools")
    response_format = m.get("response_format")
    if response_format is not None and not isinstance(response_format, dict):
        raise ChatFormatError(f"{path}.response_format", f"expected an object, got {_type(response_format)}")
    return Message(role, content, reasoning, calls, prefix, tools, response_format)


def _content(value: Any, path: str, nullable: bool) -> str | None:
    if isinstance(value, str):
        return value
    if value is None:
        if nullable:
            return None
        raise ChatFormatError(path, "expected a string, got null")
    if isinstance(value, (list, tuple)):
        texts = []
        for i, part in enumerate(value):
            if (
                not isinstance(part, dict)
                or part.get("type") != "text"
                or not isinstance(part.get("text"), str)
            ):
                kind = part.get("type") if isinstance(part, dict) else _type(part)
                raise ChatFormatError(f"{path}[{i}]", f"only text parts are supported, got {kind!r}")
            texts.append(part["text"])
        return "".join(texts)
    raise ChatFormatError(path, f"expected a string or a list of text parts, got {_type(value)}")


def _tool_calls(value: Any, path: str) -> tuple[ToolCall, ...]:
    if not isinstance(value, (list, tuple)):
        raise ChatFormatError(path, f"expected a list, got {_type(value)}")
    out = []
    for i, call in enumerate(value):
        p = f"{path}[{i}]"
        if not isinstance(call, dict):
            raise ChatFormatError(p, f"expected an object, got {_type(call)}")
        if call.get("type", "function") != "function":
            raise ChatFormatError(f"{p}.type", f"only 'function' calls are supported, got {call['type']!r}")
        fn = call.get("function")
        if not isinstance(fn, dict):
            raise ChatFormatError(
                f"{p}.function", "missing" if fn is None else f"expected an object, got {_type(fn)}"
            )
        name = fn.get("name")
        if not isinstance(name, str) or not name:
            raise ChatFormatError(
                f"{p}.function.name", "missing" if name is None else "expected a non-empty string"
            )
        raw = fn.get("arguments")
        if isinstance(raw, dict):
            args, raw = raw, json.dumps(raw, ensure_ascii=False)
        elif isinstance(raw, str):
            try:
                args = json.loads(raw)
            except json.JSONDecodeError as e:
                raise ChatFormatError(f"{p}.function.arguments", f"not valid JSON ({e})") from None
            except RecursionError:
                raise ChatFormatError(f"{p}.function.arguments", "JSON nested too deeply") from None
            if not isinstance(args, dict):
                raise ChatFormatError(f"{p}.function.arguments", f"must be a JSON object, got {_type(args)}")
        else:
            raise ChatFormatError(
                f"{p}.function.arguments",
                "missing" if raw is None else f"expected a JSON string, got {_type(raw)}",
            )
        call_id = call.get("id")
        out.append(ToolCall(name, raw, args, call_id if isinstance(call_id, str) else None))
    return tuple(out)


def _type(value: Any) -> str:
    return {
        dict: "object",
        list: "array",
        tuple: "array",
        str: "string",
        bool: "boolean",
        type(None): "null",
    }.get(type(value), type(value).__name__)
