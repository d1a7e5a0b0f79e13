"""The Anthropic Messages API (``/anthropic/v1/messages``, ``/v1/messages``, ``.../count_tokens``), so the
``anthropic`` SDK and coding agents run on dsv32.

The second front door: an Anthropic request is converted to the same OpenAI-style messages and tools,
rendered by the same encoder and run by the same engine; only the request/response shapes differ
(content blocks, ``stop_reason``, and Anthropic's SSE event sequence).
"""

from __future__ import annotations

import json
import secrets
import string
import uuid
from collections.abc import AsyncIterator
from types import SimpleNamespace
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.concurrency import run_in_threadpool

from dsv32.api.errors import bad_request
from dsv32.api.generation import (
    ChatRun,
    chat_format_error,
    check_tool_name,
    content_stop_strings,
    max_tokens_for,
    opens_reasoning,
    reject_lone_surrogates,
    reply_when_done,
    sampling_params_for,
    stream_error,
    submit,
    with_keepalive,
)
from dsv32.api.service import MODE_LIMITS, REASONER_MODEL, ServingContext
from dsv32.api.structured import guided_for_chat, with_guided
from dsv32.chat import encode_prompt
from dsv32.chat.errors import ChatFormatError
from dsv32.engine.outputs import RequestOutput

UNSUPPORTED_BLOCKS = {
    "image", "document", "search_result", "server_tool_use", "web_search_tool_result",
    "code_execution_tool_result", "mcp_tool_use", "mcp_tool_result", "container_upload",
}  # fmt: skip
STOP_REASONS = {"length": "max_tokens", "abort": "end_turn"}
SIGNATURE = "dsv32"  # thinking blocks carry an opaque signature; ignored on input


class MessagesRequest(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)
    model: str
    max_tokens: int = Field(ge=1)
    messages: list[dict[str, Any]] = Field(min_length=1)
    system: str | list[dict[str, Any]] | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: dict[str, Any] | None = None
    thinking: dict[str, Any] | None = None
    stop_sequences: list[str] | None = None
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, gt=0, le=1)
    top_k: int | None = None  # accepted and ignored, as DeepSeek's compatibility table says
    metadata: dict[str, Any] | None = None
    stream: bool = False


class CountTokensRequest(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)
    model: str
    messages: list[dict[str, Any]] = Field(min_length=1)
    system: str | list[dict[str, Any]] | None = None
    tools: list[dict[str, Any]] | None = None
    thinking: dict[str, Any] | None = None


def register(router: APIRouter) -> None:
    for prefix in ("/anthropic/v1", "/v1"):
        router.add_api_route(prefix + "/messages", messages, methods=["POST"], response_model=None)
        router.add_api_route(prefix + "/messages/count_tokens", count_tokens, methods=["POST"])


def is_anthropic_path(path: str) -> bool:
    return path.startswith("/anthropic/") or path.startswith("/v1/messages")


# ---- request conversion -------------------------------------------------------------------------------


def _text_of(content: Any, where: str) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for i, b in enumerate(content):
            if not isinstance(b, dict) or b.get("type") != "text" or not isinstance(b.get("text"), str):
                kind = b.get("type") if isinstance(b, dict) else type(b).__name__
                raise bad_request(f"{where}[{i}]: only text blocks are supported here, got {kind!r}", where)
            parts.append(b["text"])
        return "\n".join(parts)
    if content is None:
        return ""
    raise bad_request(f"{where}: expected a string or a list of text blocks", where)


def to_openai_messages(
    req: MessagesRequest | CountTokensRequest, origin: list[str] | None = None
) -> list[dict[str, Any]]:
    """Anthropic system + messages -> OpenAI-style messages for the shared encoder; ``origin`` (if given)
    gets, for each of them, the Anthropic field it came from (``messages[2].content[0]``)."""
    out: list[dict[str, Any]] = []
    origin = [] if origin is None else origin
    if req.system:
        out.append({"role": "system", "content": _text_of(req.system, "system")})
        origin.append("system")
    uses: list[str] = []  # the tool_use ids of the previous assistant message, which the next must answer
    for i, m in enumerate(req.messages):
        where = f"messages[{i}]"
        role, content = m.get("role"), m.get("content")
        if role not in ("user", "assistant"):
            raise bad_request(f"{where}.role: must be 'user' or 'assistant', got {role!r}", f"{where}.role")
        blocks = [{"type": "text", "text": content}] if isinstance(content, str) else content
        if not isinstance(blocks, list):
            raise bad_request(
                f"{where}.content: expected a string or a list of content blocks", f"{where}.content"
            )
        if (not blocks or content == "") and not (role == "assistant" and i == len(req.messages) - 1):
            raise bad_request(  # as Anthropic's API: only the final assistant message (a prefill) may be empty
                f"{where}.content: must not be empty (only a final assistant message may be)",
                f"{where}.content",
            )
        texts, reasoning, calls, results = [], [], [], {}
        for j, b in enumerate(blocks):
            bw = f"{where}.content[{j}]"
            kind = b.get("type") if isinstance(b, dict) else None
            if kind in UNSUPPORTED_BLOCKS:
                raise bad_request(f"{bw}: content blocks of type {kind!r} are not supported", bw)
            if kind == "text":
                texts.append(_text_of([b], bw))
            elif kind == "tool_result" and role == "user":
                if "tool_use_id" not in b:
                    raise bad_request(f"{bw}.tool_use_id: required", bw)
                uid = str(b["tool_use_id"])
                if uid in results:
                    raise bad_request(f"{bw}.tool_use_id: {uid!r} is answered twice", f"{bw}.tool_use_id")
                if uses and uid not in uses:
                    raise bad_request(
                        f"{bw}.tool_use_id: {uid!r} answers no tool_use block of messages[{i - 1}] (its ids: "
                        f"{', '.join(uses)})", f"{bw}.tool_use_id",
                    )  # fmt: skip
                text = _text_of(b.get("content"), f"{bw}.content")
                results[uid] = ({"role": "tool", "tool_call_id": uid, "content": text}, bw)
            elif kind == "tool_use" and role == "assistant":
                if not isinstance(b.get("name"), str) or not isinstance(b.get("input", {}), dict):
                    raise bad_request(f"{bw}: tool_use needs a name and an object input", bw)
                calls.append({"id": str(b.get("id", f"toolu_{j}")), "type": "function",
                              "function": {"name": b["name"], "arguments": json.dumps(b.get("input", {}), ensure_ascii=False)}})  # fmt: skip
            elif kind == "thinking" and role == "assistant":
                reasoning.append(str(b.get("thinking", "")))
            elif kind == "redacted_thinking" and role == "assistant":
                continue  # opaque, nothing to render
            else:
                raise bad_request(
                    f"{bw}: unknown or misplaced content block {kind!r} in a {role} message", bw
                )
        if role == "user":
            missing = [u for u in uses if u not in results]
            if missing:
                raise bad_request(
                    f"{where}: no tool_result block for the tool_use id(s) {', '.join(missing)} of "
                    f"messages[{i - 1}] (each tool_use needs a tool_result in the next message)", where,
                )  # fmt: skip
            # the encoder pairs calls and results by order: results go in the order of their tool_use blocks
            for uid in sorted(results, key=lambda u: uses.index(u) if u in uses else len(uses)):
                out.append(results[uid][0])
                origin.append(results[uid][1])
            uses = []
            if texts or not blocks:
                out.append({"role": "user", "content": "\n".join(texts)})
                origin.append(where)
        else:
            msg: dict[str, Any] = {"role": "assistant", "content": "\n".join(texts) if texts else None}
            if reasoning:
                msg["reasoning_content"] = "\n".join(reasoning)
            if calls:
                msg["tool_calls"] = calls
            out.append(msg)
            origin.append(where)
            uses = [c["id"] for c in calls]
    if uses:  # the conversation ends with tool calls: a prompt must not end there (as Anthropic's API: 400)
        where = f"messages[{len(req.messages) - 1}]"
        raise bad_request(
            f"{where}: tool_use id(s) {', '.join(uses)} have no tool_result (each tool_use needs a tool_result "
            "in the next message)", where,
        )  # fmt: skip
    last = out[-1] if out and req.messages else None
    if last is not None and last["role"] == "assistant" and "tool_calls" not in last:
        # a final assistant message is a prefill: the reply continues it (as on Anthropic's API)
        where = f"messages[{len(req.messages) - 1}]"
        if (last["content"] or "") != (last["content"] or "").rstrip():
            raise bad_request(f"{where}: final assistant content cannot end with trailing whitespace", where)
        last["prefix"] = True
    return out


def to_openai_tools(tools: list[dict[str, Any]] | None) -> list[dict[str, Any]] | None:
    if not tools:
        return None
    out = []
    for i, t in enumerate(tools):
        if not isinstance(t, dict) or not isinstance(t.get("name"), str):
            raise bad_request(f"tools[{i}].name: required", f"tools[{i}]")
        check_tool_name(t["name"], f"tools[{i}].name", 128)  # Anthropic's limit
        fn: dict[str, Any] = {"name": t["name"]}  # OpenAI's key order, so both doors render the same JSON
        if t.get("description"):
            fn["description"] = t["description"]
        fn["parameters"] = t.get("input_schema") or {"type": "object", "properties": {}}
        if t.get("strict") is True:  # Anthropic's strict tool use: input guaranteed valid
            fn["strict"] = True
        out.append({"type": "function", "function": fn})
    return out


def _thinking(req, ctx: ServingContext) -> bool:
    t = req.thinking
    # "adaptive" (newer SDKs and Claude Code: the model decides when to think) turns thinking on
    if isinstance(t, dict) and t.get("type") in ("enabled", "adaptive", "disabled"):
        return t["type"] != "disabled"
    if t is not None:
        raise bad_request("thinking.type must be 'enabled', 'adaptive' or 'disabled'", "thinking")
    return ctx.resolve_model(req.model)[0] == REASONER_MODEL


def _prompt(req, ctx: ServingContext) -> tuple[list[int], list[dict[str, Any]] | None, bool]:
    reject_lone_surrogates(req)
    thinking = _thinking(req, ctx)
    tools = to_openai_tools(req.tools)
    choice = getattr(req, "tool_choice", None) or {}
    kind = choice.get("type", "auto") if isinstance(choice, dict) else None
    if kind not in ("auto", "any", "tool", "none"):
        raise bad_request("tool_choice.type must be auto, any, tool or none", "tool_choice")
    if kind == "none":
        tools = None
    origin: list[str] = []
    messages = to_openai_messages(req, origin)
    try:
        ids = encode_prompt(
            messages, tools=tools, thinking=thinking, family=ctx.family, tokenizer=ctx.tokenizer
        )
    except (ChatFormatError, RecursionError) as e:
        raise chat_format_error(e, origin) from None
    return ids, tools, thinking


def _forced_tool_use(req, ctx: ServingContext, tools, thinking: bool) -> dict[str, Any] | None:
    """tool_choice any / tool -> the grammar that forces a tool_use (of that tool) with valid input; with
    ``strict: true`` tools and auto, a tool_use the model chooses to write has valid input."""
    choice = req.tool_choice if isinstance(req.tool_choice, dict) else {}
    kind = choice.get("type", "auto")
    strict = any(t["function"].get("strict") for t in tools or [])
    if kind in ("any", "tool"):  # (checked here, so that the errors speak this route's terms)
        if not tools:
            raise bad_request(f"tool_choice {{'type': '{kind}'}} needs tools", "tool_choice")
        names = [t["function"]["name"] for t in tools]
        if kind == "tool" and choice.get("name") not in names:
            raise bad_request(
                f"tool_choice.name: {choice.get('name')!r} is not among the tools ({', '.join(names)})",
                "tool_choice.name",
            )
        if ctx.family != "v3.2":
            raise bad_request(
                f"tool_choice {{'type': '{kind}'}} needs the V3.2 (DSML) chat format; this model speaks "
                f"{ctx.family}", "tool_choice",
            )  # fmt: skip
        forced: Any = (
            "required" if kind == "any" else {"type": "function", "function": {"name": choice.get("name")}}
        )
    elif kind == "auto" and strict:
        forced = "auto"
    else:
        return None
    # Anthropic has no /beta base URL: strict flags are honoured on this route as given
    return guided_for_chat(
        family=ctx.family, tokenizer=ctx.tokenizer, response_format=None, tools=tools, tool_choice=forced,
        beta=True, thinking=thinking, parallel=not choice.get("disable_parallel_tool_use", False),
    )  # fmt: skip


# ---- routes --------------------------------------------------------------------------------------------


async def count_tokens(body: CountTokensRequest, request: Request) -> dict[str, int]:
    ids, _, _ = await run_in_threadpool(_prompt, body, request.app.state.ctx)
    return {"input_tokens": len(ids)}


def _tool_id() -> str:
    return "toolu_" + "".join(secrets.choice(string.ascii_letters + string.digits) for _ in range(24))


def _stop_reason(run: ChatRun, out: RequestOutput) -> tuple[str, str | None]:
    if out.stop_sequence is not None:
        return "stop_sequence", out.stop_sequence
    if run.finish_reason(out.finish_reason) == "tool_calls":
        return "tool_use", None
    return STOP_REASONS.get(out.finish_reason or "", "end_turn"), None


def _usage(out: RequestOutput) -> dict[str, int]:
    u = out.usage
    return {"input_tokens": u.miss_tokens, "output_tokens": u.completion_tokens,
            "cache_read_input_tokens": u.cached_tokens, "cache_creation_input_tokens": 0}  # fmt: skip


async def messages(body: MessagesRequest, request: Request):
    ctx: ServingContext = request.app.state.ctx
    ids, tools, thinking = await run_in_threadpool(_prompt, body, ctx)  # tokenizing: off the event loop
    max_tokens = max_tokens_for(
        ctx, body.max_tokens, len(ids), (body.max_tokens, MODE_LIMITS[thinking][1]), clamp=True
    )
    # only what the compatibility table supports: temperature, top_p, stop_sequences (top_k is ignored)
    fields = SimpleNamespace(
        temperature=body.temperature,
        top_p=body.top_p,
        stop=body.stop_sequences,
        seed=None,
        logit_bias=None,
        frequency_penalty=None,
        presence_penalty=None,
        top_k=None,
        min_p=None,
        top_a=None,
        repetition_penalty=None,
        ignore_eos=None,
    )
    in_reasoning = thinking and opens_reasoning(ids, ctx.tokenizer)  # not after a prefill that closed it
    params = sampling_params_for(fields, max_tokens, thinking, logprobs=False, top_logprobs=0)
    params = content_stop_strings(params, ctx.tokenizer, in_reasoning, ctx.family if tools else None)
    params = with_guided(params, _forced_tool_use(body, ctx, tools, in_reasoning))
    run = ChatRun(ctx, tools, thinking, hide_reasoning=False, in_reasoning=in_reasoning)
    msg_id = f"msg_{uuid.uuid4().hex[:24]}"
    stream = await submit(ctx, ids, params, msg_id)
    model = body.model

    def message_reply(last: RequestOutput) -> dict[str, Any]:
        res = run.parser.result()
        content: list[dict[str, Any]] = []
        if res["reasoning_content"]:
            content.append({"type": "thinking", "thinking": res["reasoning_content"], "signature": SIGNATURE})
        if res["content"] or not res["tool_calls"]:
            content.append({"type": "text", "text": res["content"]})
        for call in run.tool_calls():
            content.append({"type": "tool_use", "id": _tool_id(), "name": call["function"]["name"],
                            "input": json.loads(call["function"]["arguments"] or "{}")})  # fmt: skip
        reason, seq = _stop_reason(run, last)
        return {"id": msg_id, "type": "message", "role": "assistant", "model": model, "content": content,
                "stop_reason": reason, "stop_sequence": seq, "usage": _usage(last)}  # fmt: skip

    if not body.stream:
        return await reply_when_done(
            request, run.run_to_end(stream), message_reply, ctx.keepalive_s,
            error_body=lambda e: anthropic_error_body(e.status, e.message),
        )  # fmt: skip

    def event(kind: str, data: dict[str, Any]) -> str:
        return f"event: {kind}\ndata: {json.dumps({'type': kind, **data}, ensure_ascii=False)}\n\n"

    def message_start(first: RequestOutput) -> str:
        return event("message_start", {"message": {
            "id": msg_id, "type": "message", "role": "assistant", "model": model, "content": [],
            "stop_reason": None, "stop_sequence": None, "usage": _usage(first)}})  # fmt: skip

    async def events() -> AsyncIterator[str]:
        # message_start waits for the engine's first output: its usage then splits the prompt into cache
        # hits and misses as message_delta's does (Anthropic's input_tokens counts the uncached part). Until
        # then keep-alives are SSE comments, which clients skip: no event may come before message_start.
        started = False
        index, open_kind, seen_text = -1, None, False

        def close() -> list[str]:
            out = []
            if open_kind == "thinking":
                out.append(event("content_block_delta", {"index": index,
                                                          "delta": {"type": "signature_delta", "signature": SIGNATURE}}))  # fmt: skip
            if open_kind is not None:
                out.append(event("content_block_stop", {"index": index}))
            return out

        try:
            async for out in with_keepalive(stream, ctx.keepalive_s, ctx.start_timeout_s):
                if out is None:
                    yield event("ping", {}) if started else ": keep-alive\n\n"
                    continue
                if not started:
                    yield message_start(out)
                    yield event("ping", {})
                    started = True
                for d in run.feed(out):
                    if "reasoning_content" in d:
                        kind = "thinking"
                        delta = {"type": "thinking_delta", "thinking": d["reasoning_content"]}
                        start = {"type": "thinking", "thinking": "", "signature": ""}
                    elif "tool_calls" in d:
                        tc = d["tool_calls"][0]
                        kind = f"tool_use:{tc['index']}"
                        delta = {
                            "type": "input_json_delta",
                            "partial_json": tc.get("function", {}).get("arguments", ""),
                        }
                        start = {
                            "type": "tool_use",
                            "id": _tool_id(),
                            "name": tc.get("function", {}).get("name", ""),
                            "input": {},
                        }
                    else:
                        if not d.get("content"):
                            continue
                        kind, delta = "text", {"type": "text_delta", "text": d["content"]}
                        start = {"type": "text", "text": ""}
                    seen_text |= kind == "text"
                    if kind != open_kind:
                        for e in close():
                            yield e
                        index, open_kind = index + 1, kind
                        yield event("content_block_start", {"index": index, "content_block": start})
                    if delta.get("partial_json") == "" and delta["type"] == "input_json_delta":
                        continue
                    yield event("content_block_delta", {"index": index, "delta": delta})
                if out.finished:
                    for e in close():
                        yield e
                    # like the JSON answer: a text block, maybe empty
                    if not seen_text and not run.tool_calls():
                        index += 1
                        start = {"type": "text", "text": ""}
                        yield event("content_block_start", {"index": index, "content_block": start})
                        yield event("content_block_stop", {"index": index})
                    reason, seq = _stop_reason(run, out)
                    yield event(
                        "message_delta",
                        {"delta": {"stop_reason": reason, "stop_sequence": seq}, "usage": _usage(out)},
                    )
                    yield event("message_stop", {})
        except Exception as e:  # the response has started: Anthropic's error event, then the stream closes
            err = stream_error(e)
            payload = anthropic_error_body(err.status, err.message)
            yield f"event: error\ndata: {json.dumps(payload, ensure_ascii=False)}\n\n"

    return StreamingResponse(events(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


def anthropic_error_body(status: int, message: str) -> dict[str, Any]:
    kinds = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
             404: "not_found_error", 405: "invalid_request_error", 413: "request_too_large",
             429: "rate_limit_error", 500: "api_error", 503: "overloaded_error", 529: "overloaded_error"}  # fmt: skip
    return {"type": "error", "error": {"type": kinds.get(status, "api_error"), "message": message}}
