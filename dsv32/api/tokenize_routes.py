"""vLLM's ``/tokenize`` and ``/detokenize``: the token ids the server would feed the model for a text prompt
or for chat messages (rendered by the same encoder as ``/chat/completions``), and text back from ids.

``POST /tokenize`` {"prompt": text, "add_special_tokens": true} or {"messages": [...], "tools": [...],
"thinking" / "chat_template_kwargs": {"thinking": ...}} → {"count", "max_model_len", "tokens", "token_strs"}
(``token_strs`` with ``"return_token_strs": true``). ``POST /detokenize`` {"tokens": [...]} → {"prompt"}.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from pydantic import BaseModel, ConfigDict, Field
from starlette.concurrency import run_in_threadpool

from dsv32.api.errors import bad_request, invalid_param
from dsv32.api.generation import (
    API_ROLES,
    chat_format_error,
    check_tool_messages,
    served_model,
    thinking_mode,
)
from dsv32.api.schemas import Reasoning, Thinking
from dsv32.api.service import ServingContext
from dsv32.chat import encode_prompt
from dsv32.chat.errors import ChatFormatError


class TokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)
    model: str | None = None
    prompt: str | None = None  # a text prompt, or:
    messages: list[dict[str, Any]] | None = None  # a conversation, rendered as /chat/completions renders it
    tools: list[dict[str, Any]] | None = None
    thinking: Thinking | None = None
    reasoning: Reasoning | None = None
    chat_template_kwargs: dict[str, Any] | None = None
    add_special_tokens: bool | None = None  # text: BOS first (default true); the chat format places its own
    add_generation_prompt: bool = True  # (the chat format always opens the assistant's turn)
    return_token_strs: bool = False


class DetokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)
    model: str | None = None
    tokens: list[int] = Field(min_length=0)


def register(router: APIRouter) -> None:
    for prefix in ("", "/v1"):
        router.add_api_route(prefix + "/tokenize", tokenize, methods=["POST"])
        router.add_api_route(prefix + "/detokenize", detokenize, methods=["POST"])


def _model_thinking(ctx: ServingContext, model: str | None) -> bool:
    """The model name's default thinking mode (optional here; one the server does not serve is a 400)."""
    return False if model is None else served_model(ctx, model)[1]


async def tokenize(body: TokenizeRequest, request: Request) -> dict[str, Any]:
    ctx: ServingContext = request.app.state.ctx
    if (body.prompt is None) == (body.messages is None):
        raise bad_request("give either prompt (text) or messages (a conversation)", "prompt")
    default_thinking = _model_thinking(ctx, body.model)
    if body.prompt is not None:
        add_bos = True if body.add_special_tokens is None else body.add_special_tokens
        ids = await run_in_threadpool(ctx.tokenizer.encode, body.prompt, add_bos=add_bos)
    else:
        if not body.add_generation_prompt:
            raise invalid_param("add_generation_prompt false is not supported: the chat format opens the "
                                "assistant's turn", "add_generation_prompt")  # fmt: skip
        thinking = thinking_mode(body, default_thinking)
        if thinking and ctx.family == "v3":
            raise bad_request("this model has no thinking mode", "thinking")
        check_tool_messages(body.messages)
        try:
            ids = await run_in_threadpool(
                encode_prompt, body.messages, tools=body.tools, thinking=thinking, family=ctx.family,
                tokenizer=ctx.tokenizer, roles=API_ROLES,
            )  # fmt: skip
        except (ChatFormatError, RecursionError) as e:
            raise chat_format_error(e, [f"messages[{i}]" for i in range(len(body.messages))]) from None
    return {
        "count": len(ids),
        "max_model_len": ctx.max_model_len,
        "tokens": ids,
        "token_strs": ctx.tokenizer.token_strs(ids) if body.return_token_strs else None,
    }


async def detokenize(body: DetokenizeRequest, request: Request) -> dict[str, Any]:
    ctx: ServingContext = request.app.state.ctx
    _model_thinking(ctx, body.model)
    bad = [t for t in body.tokens if not 0 <= t < ctx.tokenizer.vocab_size]
    if bad:
        raise invalid_param(
            f"token id {bad[0]} is outside the vocabulary [0, {ctx.tokenizer.vocab_size})", "tokens"
        )
    return {"prompt": await run_in_threadpool(ctx.tokenizer.decode, body.tokens)}
