"""Structured output for the chat routes: ``response_format`` (JSON mode, JSON Schema), strict tools and
``tool_choice`` → one ``SamplingParams.guided`` constraint (see ``dsv32.engine.grammar``).

What each request field guarantees (V3.2 / DSML chat format):

- ``response_format: {"type": "json_object"}`` → the content is one JSON object.
- ``response_format: {"type": "json_schema", "json_schema": {"schema": ...}}`` (OpenAI; OpenRouter adds
  ``structured_outputs: true``) → the content validates against the schema. A keyword the grammar library
  cannot enforce → 422 naming it.
- ``tools[i].function.strict: true`` on the ``/beta`` base URL (api.md §3.5) → every call of that function has
  arguments valid under its ``parameters``; the DSML block around the calls is constrained too, so it always
  parses. Elsewhere ``strict`` is accepted and not enforced, as on the hosted API.
- ``tool_choice: "required"`` → the reply is a DSML block of one or more calls; a named function → exactly
  one call of it. Arguments follow each function's schema (strict or not, where the schema can be enforced).
- ``tool_choice: "none"`` with tools → the tools are left out of the prompt and no DSML block can be written.
- Thinking mode: the reasoning is free; the constraint starts after ``</think>``. OpenRouter's
  ``reasoning.max_tokens`` forces ``</think>`` after that many reasoning tokens.

vLLM's structured-output request fields, on chat and ``/completions`` (``vllm_guided``): ``guided_json`` (a schema,
or one as a JSON string), ``guided_regex``, ``guided_choice`` (the reply is exactly one of the strings),
``guided_grammar`` (a Lark grammar, as llguidance reads it), and their newer spelling ``structured_outputs:
{"json" | "regex" | "choice" | "grammar" | "json_object": ...}`` (``structured_outputs: true`` stays
OpenRouter's flag beside ``response_format``). One constraint a request: with ``response_format`` or a tool
grammar a 400.

DeepSeek asks clients to mention "json" in the prompt when they use JSON mode (api.md §3.6); nothing is
refused when they do not: the output is constrained anyway, and the response format is shown to the model
through the V3.2 encoder's response-format slot of the system prompt.
"""

from __future__ import annotations

import json
from typing import Any

from dsv32.api.errors import APIError, bad_request, invalid_param
from dsv32.chat.tokens import THINK_END
from dsv32.engine.grammar import GuidedDecodingError, check_guided, dsml_tool_grammar
from dsv32.engine.sampling_params import SamplingParams, SamplingParamsError


def parse_tool_choice(tool_choice: Any, tools: list[dict[str, Any]] | None) -> tuple[str, str | None]:
    """``(mode, function name)`` with mode one of auto / none / required / function (422 if malformed)."""
    if tool_choice is None:
        return ("auto" if tools else "none"), None
    if isinstance(tool_choice, str):
        if tool_choice not in ("none", "auto", "required"):
            raise invalid_param(
                f"tool_choice must be none, auto, required or a function, got {tool_choice!r}", "tool_choice"
            )
        mode, name = tool_choice, None
    else:
        fn = tool_choice.get("function") if isinstance(tool_choice, dict) else None
        name = fn.get("name") if isinstance(fn, dict) else None
        if tool_choice.get("type") != "function" or not isinstance(name, str) or not name:
            raise invalid_param(
                'tool_choice must be none, auto, required or {"type": "function", "function": {"name": ...}}',
                "tool_choice",
            )
        mode = "function"
    if mode in ("required", "function") and not tools:
        raise bad_request(f"tool_choice {mode!r} needs tools", "tool_choice")
    if mode == "function" and name not in {f["name"] for f in _functions(tools)}:
        raise invalid_param(f"tool_choice names the function {name!r}, which is not in tools", "tool_choice")
    return mode, name


def content_schema(response_format) -> dict[str, Any] | None:
    """The JSON Schema the content must follow, from a ``response_format`` (None for text)."""
    if response_format is None or response_format.type == "text":
        return None
    if response_format.type == "json_object":
        return {"type": "object"}
    spec = (response_format.model_extra or {}).get("json_schema")
    schema = spec.get("schema") if isinstance(spec, dict) else None
    if not isinstance(schema, (dict, bool)):
        raise invalid_param(
            'response_format type json_schema needs "json_schema": {"name": ..., "schema": {...}}',
            "response_format.json_schema",
        )
    return schema


_VLLM_KINDS = {  # structured_outputs key: the older field of the same constraint
    "json": "guided_json",
    "regex": "guided_regex",
    "choice": "guided_choice",
    "grammar": "guided_grammar",
}
# structured_outputs options that hold here anyway: no fallback to another backend, compact JSON
_VLLM_HELD_OPTIONS = ("disable_fallback", "disable_any_whitespace")


def vllm_guided(body) -> dict[str, Any] | None:
    """The ``guided`` spec of vLLM's structured-output fields (``guided_*`` or ``structured_outputs: {...}``),
    or None when none is given. Raises APIError: 400 for more than one, 422 for a malformed one (naming it)."""
    # where each constraint was given: (its kind, by the older field's name; its value)
    given = {f: (f, getattr(body, f)) for f in _VLLM_KINDS.values() if getattr(body, f, None) is not None}
    so = getattr(body, "structured_outputs", None)
    if isinstance(so, dict):
        unknown = sorted(set(so) - set(_VLLM_KINDS) - {"json_object"} - set(_VLLM_HELD_OPTIONS))
        if unknown:
            raise invalid_param(
                f"structured_outputs: not supported: {', '.join(unknown)}", "structured_outputs"
            )
        for key, field in _VLLM_KINDS.items():
            if so.get(key) is not None:
                given[f"structured_outputs.{key}"] = (field, so[key])
        if so.get("json_object"):
            given["structured_outputs.json_object"] = ("json_object", True)
    if not given:
        return None
    if len(given) > 1:
        raise bad_request(
            f"give one structured output constraint, not {' and '.join(given)}", next(iter(given))
        )
    name, (kind, value) = next(iter(given.items()))
    if kind == "json_object":
        guided = {"json_object": True}
    elif kind == "guided_json":
        if isinstance(value, str):
            try:
                value = json.loads(value)
            except ValueError:
                raise invalid_param(
                    f"{name} must be a JSON Schema (an object, or one as a JSON string)", name
                ) from None
        guided = {"json_schema": value}
    elif kind == "guided_choice":
        if not (isinstance(value, list) and value and all(isinstance(c, str) and c for c in value)):
            raise invalid_param(f"{name} must be a non-empty list of non-empty strings", name)
        guided = {"lark": "start: " + " | ".join(json.dumps(c) for c in value)}
    else:  # guided_regex, guided_grammar
        if not (isinstance(value, str) and value):
            raise invalid_param(f"{name} must be a non-empty string", name)
        guided = {"regex" if kind == "guided_regex" else "lark": value}
    try:
        check_guided(guided)
    except GuidedDecodingError as e:
        raise invalid_param(f"{name}: {e}", name) from None
    return guided


def with_response_format_slot(messages: list[dict[str, Any]], response_format, family: str) -> list[dict]:
    """When no message mentions JSON, the V3.2 prompt shows the response format in the system prompt."""
    if family != "v3.2" or response_format is None or response_format.type == "text":
        return messages
    texts = json.dumps([m.get("content") for m in messages if isinstance(m, dict)], ensure_ascii=False)
    if "json" in texts.lower():
        return messages
    rf = response_format.model_dump(exclude_none=True)
    first = messages[0] if messages else None
    if isinstance(first, dict) and first.get("role") == "system":
        if first.get("response_format") is not None:
            return messages
        return [{**first, "response_format": rf}, *messages[1:]]
    return [{"role": "system", "content": "", "response_format": rf}, *messages]


def _functions(tools: list[dict[str, Any]] | None) -> list[dict[str, Any]]:
    out = []
    for t in tools or []:
        fn = t.get("function") if isinstance(t, dict) else None
        if isinstance(fn, dict) and isinstance(fn.get("name"), str):
            out.append(fn)
    return out


def guided_for_chat(
    *,
    family: str,
    tokenizer,
    response_format,
    tools: list[dict[str, Any]] | None,
    tool_choice: Any,
    beta: bool,
    thinking: bool,
    parallel: bool = True,
    reasoning_max_tokens: int | None = None,
    vllm: dict[str, Any] | None = None,
) -> dict[str, Any] | None:
    """The ``guided`` constraint of a chat request, or None when the output is free. ``vllm``: the request's
    vLLM structured-output constraint (``vllm_guided``), which takes the place of ``response_format``.

    Raises APIError: 422 naming a schema feature that cannot be enforced, or a malformed tool_choice; 400 for
    a vLLM constraint beside ``response_format`` or a tool grammar."""
    mode, name = parse_tool_choice(tool_choice, tools)
    schema = content_schema(response_format)
    functions = _functions(tools)
    strict = {f["name"] for f in functions if f.get("strict") is True} if beta else set()
    guided: dict[str, Any] | None = None
    tool_grammar = bool(functions) and (
        mode in ("required", "function", "none") or (mode == "auto" and strict)
    )
    if vllm is not None and (schema is not None or tool_grammar):
        what = "response_format" if schema is not None else "tool_choice / strict tools"
        raise bad_request(
            f"give one structured output constraint: vLLM's structured outputs or {what}",
            "response_format" if schema is not None else "tools",
        )
    if tool_grammar and family != "v3.2":
        if mode in ("required", "function"):
            raise invalid_param(f"tool_choice {mode!r} needs the V3.2 (DSML) chat format", "tool_choice")
        tool_grammar = False  # other formats: only the content constraint below
    if tool_grammar and not (mode == "none" and schema is not None):
        constrained = set() if mode == "none" else _enforceable(functions, strict, mode)
        try:
            lark = dsml_tool_grammar(
                functions, choice=mode, name=name, constrained=constrained, parallel=parallel,
                content_schema=schema,
            )  # fmt: skip
            guided = {"lark": lark}
            check_guided(guided)
        except GuidedDecodingError as e:
            raise invalid_param(str(e), "response_format" if schema is not None else "tools") from None
    elif schema is not None:
        guided = {"json_object": True} if response_format.type == "json_object" else {"json_schema": schema}
        try:
            check_guided(guided)
        except GuidedDecodingError as e:
            raise invalid_param(f"response_format.json_schema: {e}", "response_format") from None
    elif vllm is not None:
        guided = dict(vllm)
    if thinking and (guided is not None or reasoning_max_tokens is not None):
        guided = dict(guided or {})
        guided["start_token"] = tokenizer.token_id(THINK_END)
        if reasoning_max_tokens is not None:
            guided["start_within"] = reasoning_max_tokens
    return guided


def _enforceable(functions: list[dict[str, Any]], strict: set[str], mode: str) -> set[str]:
    """Functions whose arguments get constrained: strict ones (an unsupported schema is a 422) and, when a
    call is forced, every other one whose schema can be enforced."""
    out = set()
    for i, fn in enumerate(functions):
        if fn["name"] not in strict and mode not in ("required", "function"):
            continue
        try:
            check_guided({"lark": dsml_tool_grammar([fn], choice="function", name=fn["name"])})
        except GuidedDecodingError as e:
            e = _schema_error(fn) or e  # the schema's own error, where it has one: it quotes no grammar
            if fn["name"] in strict:
                msg = str(e) if str(e).startswith("tools[") else f"tools[{i}].function.parameters: {e}"
                raise invalid_param(msg.replace("tools[0]", f"tools[{i}]"), "tools") from None
            continue
        out.add(fn["name"])
    return out


def _schema_error(fn: dict[str, Any]) -> GuidedDecodingError | None:
    """What is wrong with a function's parameters schema read as a JSON Schema alone, if anything."""
    if not isinstance(fn.get("parameters"), dict):
        return None
    try:
        check_guided({"json_schema": fn["parameters"]})
    except GuidedDecodingError as e:
        return e
    return None


def with_guided(params: SamplingParams, guided: dict[str, Any] | None) -> SamplingParams:
    if guided is None:
        return params
    params.guided = guided
    try:
        params.validate()
    except GuidedDecodingError as e:  # checked above; kept as a safety net
        raise APIError(422, str(e), "response_format") from None
    except SamplingParamsError as e:  # another field that cannot go with a constraint (min_tokens)
        raise invalid_param(str(e), e.field) from None
    return params
