"""OpenAI / DeepSeek routes: chat completions (+ beta prefix completion), FIM / text completions, models.

One request, end to end: validate the body → render the prompt with the chat encoder (V3.2 DSML, V3.1,
V3) → ``engine.generate(ids, SamplingParams)`` → incremental text → ``StreamParser`` (reasoning |
content | tool calls) → SSE chunks or one JSON body in the DeepSeek shape.
"""

from __future__ import annotations

import codecs
import json
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import replace
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse
from starlette.concurrency import run_in_threadpool

from dsv32.api.errors import APIError, bad_request, invalid_param
from dsv32.api.generation import (
    API_ROLES,
    ChatRun,
    chat_format_error,
    check_tool_messages,
    check_tool_name,
    content_stop_strings,
    max_tokens_for,
    merged_streams,
    opens_reasoning,
    outputs,
    refuse_unsupported_extras,
    reject_lone_surrogates,
    reply_when_done,
    sampling_params_for,
    served_model,
    stream_error,
    submit_all,
    thinking_mode,
    truncated_prompt,
    with_keepalive,
)
from dsv32.api.schemas import ChatCompletionRequest, CompletionRequest
from dsv32.api.service import MODE_LIMITS, ServingContext
from dsv32.api.structured import guided_for_chat, vllm_guided, with_guided, with_response_format_slot
from dsv32.chat import encode_fim, encode_prompt
from dsv32.chat.errors import ChatFormatError
from dsv32.engine.outputs import RequestOutput


def _ctx(request: Request) -> ServingContext:
    return request.app.state.ctx


# ---- request -> (prompt ids, sampling params) ----------------------------------------------------


def _usage(out: RequestOutput, reasoning_tokens: int | None) -> dict[str, Any]:
    u = out.usage
    usage = {
        "prompt_tokens": u.prompt_tokens,
        "completion_tokens": u.completion_tokens,
        "total_tokens": u.prompt_tokens + u.completion_tokens,
        "prompt_tokens_details": {"cached_tokens": u.cached_tokens},
        "prompt_cache_hit_tokens": u.cached_tokens,
        "prompt_cache_miss_tokens": u.miss_tokens,
    }
    if reasoning_tokens is not None:
        usage["completion_tokens_details"] = {"reasoning_tokens": reasoning_tokens}
    return usage


def _token_logprobs(ctx: ServingContext, ids: list[int], lps: list[dict]) -> list[dict[str, Any]]:
    def entry(tid: int, lp: float) -> dict[str, Any]:
        b = (
            ctx.tokenizer.token_bytes(tid)
            if ctx.tokenizer.byte_level
            else ctx.tokenizer.decode([tid]).encode()
        )
        # a token a constraint forbids has probability 0, logprob -inf, which JSON cannot carry (JSONResponse
        # refuses it: a 500; SSE would carry the invalid -Infinity): reported as -9999.0, as vLLM does
        return {"token": b.decode("utf-8", errors="replace"), "logprob": max(lp, -9999.0), "bytes": list(b)}

    out = []
    for tid, lp in zip(ids, lps, strict=False):
        e = entry(tid, lp["logprob"])
        e["top_logprobs"] = [entry(t, v) for t, v in lp["top"]]
        out.append(e)
    return out


def _vllm_prompt_logprobs(
    ctx: ServingContext, ids: list[int], lps: list[dict | None], k: int
) -> list[dict[str, dict[str, Any]] | None]:
    """vLLM's ``prompt_logprobs``: per prompt token (None for the first) {token id: {logprob, rank,
    decoded_token}} for the token itself and its ``k`` most likely alternatives."""

    def entry(tid: int, logprob: float, rank: int) -> dict[str, Any]:
        return {"logprob": max(logprob, -9999.0), "rank": rank, "decoded_token": ctx.tokenizer.decode([tid])}

    out: list[dict[str, dict[str, Any]] | None] = []
    for tid, lp in zip(ids, lps, strict=True):
        if lp is None:
            out.append(None)
            continue
        d = {str(tid): entry(tid, lp["logprob"], lp["rank"])}
        for r, (t, v) in enumerate(lp["top"][:k], start=1):
            d.setdefault(str(t), entry(t, v, r))
        out.append(d)
    return out


def _no_streamed_prompt_logprobs(body) -> None:
    if body.prompt_logprobs is not None and body.stream:
        raise bad_request(
            "prompt_logprobs is not available with stream: true (as in vLLM)", "prompt_logprobs"
        )


def _sse(obj: Any) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


# ---- chat completions ----------------------------------------------------------------------------


def register(router: APIRouter) -> None:
    for path in ("/chat/completions", "/v1/chat/completions", "/beta/chat/completions"):
        router.add_api_route(path, chat_completions, methods=["POST"], response_model=None)
    for path in ("/completions", "/v1/completions", "/beta/completions"):
        router.add_api_route(path, completions, methods=["POST"], response_model=None)
    for path in ("/models", "/v1/models"):
        router.add_api_route(path, list_models, methods=["GET"])
        router.add_api_route(path + "/{model_id:path}", retrieve_model, methods=["GET"])


async def list_models(request: Request) -> dict[str, Any]:
    ctx = _ctx(request)
    return {"object": "list", "data": [_model_object(n) for n in ctx.model_names()]}


async def retrieve_model(model_id: str, request: Request) -> dict[str, Any]:
    """OpenAI's ``GET /models/{id}`` (``client.models.retrieve``): one entry of the list, or a 404."""
    names = _ctx(request).model_names()
    if model_id not in names:
        raise APIError(404, f"Model Not Exist: {model_id!r} (available: {', '.join(names)})", "model")
    return _model_object(model_id)


def _model_object(name: str) -> dict[str, Any]:
    return {"id": name, "object": "model", "owned_by": "deepseek"}


async def chat_completions(body: ChatCompletionRequest, request: Request):
    ctx = _ctx(request)
    reject_lone_surrogates(body)
    refuse_unsupported_extras(body)
    beta = request.url.path.startswith("/beta/")
    model, default_thinking = served_model(ctx, body.model)
    thinking = thinking_mode(body, default_thinking)
    if thinking and ctx.family == "v3":
        raise bad_request("this model has no thinking mode", "thinking")
    if any(isinstance(m, dict) and m.get("prefix") for m in body.messages) and not beta:
        raise bad_request("chat prefix completion (prefix: true) needs the /beta base URL", "messages")
    if body.top_logprobs is not None and not body.logprobs:
        raise bad_request("top_logprobs requires logprobs: true", "top_logprobs")
    if thinking and (body.logprobs or body.top_logprobs):
        raise bad_request("logprobs and top_logprobs are not supported in thinking mode", "logprobs")
    for i, t in enumerate(body.tools or []):
        fn = t.get("function")
        if isinstance(fn, dict):
            check_tool_name(fn.get("name"), f"tools[{i}].function.name", 64)
    parallel = body.parallel_tool_calls is not False
    check_tool_messages(body.messages)
    tools = body.tools if body.tool_choice != "none" else None
    messages = with_response_format_slot(body.messages, body.response_format, ctx.family)
    try:
        # off the event loop: a megabytes-long prompt takes seconds to tokenize, and would stall every stream
        prompt_ids = await run_in_threadpool(
            encode_prompt,
            messages,
            tools=tools,
            thinking=thinking,
            family=ctx.family,
            tokenizer=ctx.tokenizer,
            roles=API_ROLES,
        )
    except (ChatFormatError, RecursionError) as e:
        added = len(messages) - len(body.messages)  # the response-format slot's system message, if any
        origin = ["the response_format system message"] * added + [
            f"messages[{i}]" for i in range(len(body.messages))
        ]
        raise chat_format_error(e, origin) from None
    prompt_ids = truncated_prompt(ctx, prompt_ids, body.truncate_prompt_tokens)
    # a thinking-mode prefix completion whose content closed the reasoning continues the content
    in_reasoning = thinking and opens_reasoning(prompt_ids, ctx.tokenizer)
    guided = guided_for_chat(
        family=ctx.family, tokenizer=ctx.tokenizer, response_format=body.response_format, tools=body.tools,
        tool_choice=body.tool_choice, beta=beta, thinking=in_reasoning, parallel=parallel,
        reasoning_max_tokens=body.reasoning.max_tokens if body.reasoning else None, vllm=vllm_guided(body),
    )  # fmt: skip
    field = "max_tokens" if body.max_completion_tokens is None else "max_completion_tokens"
    max_tokens = max_tokens_for(
        ctx, getattr(body, field), len(prompt_ids), MODE_LIMITS[thinking], field=field
    )
    _no_streamed_prompt_logprobs(body)
    params = sampling_params_for(
        body, max_tokens, thinking, logprobs=bool(body.logprobs), top_logprobs=body.top_logprobs or 0
    )
    params = replace(params, prompt_logprobs=body.prompt_logprobs)
    params = with_guided(
        content_stop_strings(params, ctx.tokenizer, in_reasoning, ctx.family if tools else None), guided
    )
    hide = bool(body.reasoning and body.reasoning.exclude)
    n = body.n or 1  # choice j: sample j of the prompt (its prompt computed once: the scheduler shares it)
    runs = [
        ChatRun(ctx, tools, thinking, hide, parallel=parallel, in_reasoning=in_reasoning) for _ in range(n)
    ]
    rid = f"{uuid.uuid4()}"
    created = int(time.time())
    # vLLM's prompt_logprobs are the request's, not a choice's: the first sample scores the prompt
    samples = [s if j == 0 else replace(s, prompt_logprobs=None) for j, s in enumerate(params.samples())]
    streams = await submit_all(
        ctx, [(prompt_ids, sample, rid if n == 1 else f"{rid}-{j}") for j, sample in enumerate(samples)]
    )
    head = {"id": rid, "created": created, "model": model, "system_fingerprint": ctx.system_fingerprint}

    def usage_of(j: int, last: RequestOutput) -> dict[str, Any]:
        return _usage(last, runs[j].reasoning_tokens if thinking else None)

    def chat_reply(done: tuple[list[RequestOutput], list | None]) -> dict[str, Any]:
        lasts, prompt_logprobs = done
        choices = []
        for j, (run, last) in enumerate(zip(runs, lasts, strict=True)):
            msg = run.parser.result()
            message: dict[str, Any] = {"role": "assistant", "content": msg["content"]}
            if thinking and not hide:
                message["reasoning_content"] = msg["reasoning_content"] or ""
            if run.tool_calls():
                message["tool_calls"] = run.tool_calls()
            lp = {"content": _token_logprobs(ctx, run.ids, run.logprobs)} if body.logprobs else None
            choices.append({"index": j, "message": message, "logprobs": lp,
                            "finish_reason": run.finish_reason(last.finish_reason)})  # fmt: skip
            if body.return_token_ids:  # (vLLM)
                choices[-1]["token_ids"] = list(run.ids)
        usage = _summed_usage([usage_of(j, last) for j, last in enumerate(lasts)], n)
        reply = {**head, "object": "chat.completion", "choices": choices, "usage": usage}
        if body.return_token_ids:
            reply["prompt_token_ids"] = prompt_ids
        if prompt_logprobs is not None:  # (vLLM: at the top level)
            reply["prompt_logprobs"] = prompt_logprobs
        return reply

    async def ended(j: int, out: RequestOutput) -> bool:
        """Whether sample j is done with ``out``: finished, or its reply complete early (its request is then
        aborted)."""
        if runs[j].done_early:
            await streams[j].aclose()
            return True
        return out.finished

    async def run_to_end() -> tuple[list[RequestOutput], list | None]:
        """Each sample's last output, and vLLM's prompt_logprobs when asked for (an entry per token: off the
        loop)."""
        lasts: list[RequestOutput | None] = [None] * n
        done: set[int] = set()
        outs = outputs(merged_streams(streams), ctx)
        try:
            async for j, out in outs:
                if j not in done:
                    runs[j].feed(out)
                    lasts[j] = out
                    if await ended(j, out):
                        done.add(j)
        finally:  # (a client that left cancels this: every sample is aborted)
            await outs.aclose()
        if body.prompt_logprobs is None or runs[0].prompt_logprobs is None:
            return lasts, None
        scored = await run_in_threadpool(
            _vllm_prompt_logprobs, ctx, prompt_ids, runs[0].prompt_logprobs, body.prompt_logprobs
        )
        return lasts, scored

    if not body.stream:
        return await reply_when_done(request, run_to_end(), chat_reply, ctx.keepalive_s)

    include_usage = bool(body.stream_options and body.stream_options.include_usage)

    def chunk(j: int, delta: dict[str, Any], logprobs=None, token_ids: list[int] | None = None, **top) -> str:
        c = {**head, "object": "chat.completion.chunk", **top,
             "choices": [{"index": j, "delta": delta, "logprobs": logprobs, "finish_reason": None}]}  # fmt: skip
        if body.return_token_ids:  # (vLLM: each chunk's new token ids; the prompt's in the stream's first)
            c["choices"][0]["token_ids"] = token_ids or []
        if include_usage:
            c["usage"] = None
        return _sse(c)

    async def events() -> AsyncIterator[str]:
        first = {"role": "assistant", "content": None if thinking else ""}
        if thinking and not hide:
            first["reasoning_content"] = ""
        for j in range(n):
            top = {"prompt_token_ids": prompt_ids} if j == 0 and body.return_token_ids else {}
            yield chunk(j, dict(first), **top)
        usages: dict[int, dict[str, Any]] = {}  # each sample's, once it is done
        items = with_keepalive(merged_streams(streams), ctx.keepalive_s, ctx.start_timeout_s)
        try:
            async for item in items:
                if item is None:
                    yield ": keep-alive\n\n"
                    continue
                j, out = item
                if j in usages:  # (an output queued before its sample ended early)
                    continue
                for piece in chat_events(j, out):
                    yield piece
                if await ended(j, out):
                    usages[j] = usage_of(j, out)
                    for piece in final_events(j, out, usages):
                        yield piece
        except Exception as e:  # the response has started: the error goes in-band, then the stream closes
            yield _sse(stream_error(e).body())
            return
        finally:
            await items.aclose()  # closes the engine streams: a client that left aborts every sample
        yield "data: [DONE]\n\n"

    def chat_events(j: int, out: RequestOutput) -> Iterator[str]:
        lp = None
        if body.logprobs and out.logprobs:
            lp = {"content": _token_logprobs(ctx, out.new_token_ids, out.logprobs)}
        deltas = runs[j].feed(out)
        for i, d in enumerate(deltas):
            # §5.2: in thinking mode the other field is null, as DeepSeek sends it
            if thinking and not hide and "tool_calls" not in d:
                d = {"content": d.get("content"), "reasoning_content": d.get("reasoning_content")}
            yield chunk(
                j, d, logprobs=lp if i == 0 else None, token_ids=out.new_token_ids if i == 0 else None
            )
        if (lp is not None or body.return_token_ids) and not deltas:  # (tokens whose text is held back)
            yield chunk(j, {"content": ""}, logprobs=lp, token_ids=out.new_token_ids)

    def final_events(j: int, out: RequestOutput, usages: dict[int, dict[str, Any]]) -> Iterator[str]:
        """Sample j's last chunk (its finish_reason); the request's usage with the last sample's."""
        total = _summed_usage([usages[k] for k in sorted(usages)], n) if len(usages) == n else None
        final = {**head, "object": "chat.completion.chunk",
                 "choices": [{"index": j, "delta": {"content": ""}, "logprobs": None,
                              "finish_reason": runs[j].finish_reason(out.finish_reason)}]}  # fmt: skip
        if body.return_token_ids:
            final["choices"][0]["token_ids"] = []
        final["usage"] = None if include_usage else total
        yield _sse(final)
        if include_usage and total is not None:
            yield _sse({**head, "object": "chat.completion.chunk", "choices": [], "usage": total})

    return StreamingResponse(events(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


# ---- text / FIM completions ------------------------------------------------------------------------


def _prompt_list(prompt: str | list[int] | list[str | list[int]]) -> tuple[list[str | list[int]], bool]:
    """The request's prompts and whether they are a batch: one prompt (a string or token ids), or OpenAI's
    batch (a list of strings or of id lists; choice ``i`` answers prompt ``i``)."""
    if isinstance(prompt, str) or all(isinstance(t, int) for t in prompt):
        return [prompt], False
    if all(isinstance(t, str) for t in prompt) or all(isinstance(t, list) for t in prompt):
        return list(prompt), True
    raise bad_request("'prompt': expected a string, a list of token ids, or a list of either", "prompt")


async def _prompt_ids(
    ctx: ServingContext, prompt: str | list[int], suffix: str | None, field: str
) -> list[int]:
    if isinstance(prompt, list):
        if suffix is not None:
            raise bad_request("suffix needs a text prompt", "suffix")
        bad = [t for t in prompt if not 0 <= t < ctx.tokenizer.vocab_size]
        if bad:
            raise invalid_param(f"{field} token id {bad[0]} is outside the vocabulary", field)
        ids = list(prompt)
    elif suffix is not None:
        ids = await run_in_threadpool(encode_fim, prompt, suffix, tokenizer=ctx.tokenizer)
    else:
        ids = await run_in_threadpool(ctx.tokenizer.encode, prompt, add_bos=True)
    if not ids:
        raise bad_request(f"the {field} is empty", field)
    return ids


def _summed_usage(usages: list[dict[str, Any]], n: int = 1) -> dict[str, Any]:
    """One usage for a request's choices, ``n`` samples a prompt (consecutive): each prompt's tokens and cache
    hits counted once (from its first sample, as OpenAI counts a prompt once whatever ``n``), every sample's
    completion tokens; then summed over the prompts of a batch."""

    def add(a: Any, b: Any) -> Any:
        return {k: add(v, b[k]) for k, v in a.items()} if isinstance(a, dict) else a + b

    def zero(v: Any) -> Any:
        return {k: zero(x) for k, x in v.items()} if isinstance(v, dict) else 0

    def completion_part(u: dict[str, Any]) -> dict[str, Any]:
        """``u`` with its prompt counts 0."""
        part = zero(u) | {k: v for k, v in u.items() if k.startswith("completion_")}
        part["total_tokens"] = u["completion_tokens"]
        return part

    total = None
    for first in range(0, len(usages), n):
        u = usages[first]
        for other in usages[first + 1 : first + n]:
            u = add(u, completion_part(other))
        total = u if total is None else add(total, u)
    return total


def _echo(ctx: ServingContext, prompt: str | list[int]) -> str:
    """What echo repeats: the prompt's text (token ids decoded)."""
    return prompt if isinstance(prompt, str) else ctx.tokenizer.decode(prompt)


class _TextOffsets:
    """Legacy logprobs' ``text_offset``: where each token starts in the choice's text, walking the tokens over
    the text they spell. A control token counts only where the text spells it (an echoed token-id prompt's BOS
    does; a text prompt's BOS and a special token the output skips do not); the byte tokens of one character
    all start where it starts; no offset lies past the text (a FIM prompt's suffix is not echoed, a stop
    string cuts the text inside a token). So ``text[off:]`` starts with each token that the text shows."""

    def __init__(self, ctx: ServingContext, start: int = 0):
        self.tokenizer = ctx.tokenizer
        self.pos = start
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def starts(self, ids: list[int], text: str) -> list[int]:
        """The offsets of the next tokens ``ids`` in ``text`` (the choice's text up to and including theirs)."""
        tok, out = self.tokenizer, []
        for tid in ids:
            if tid in tok.added_ids:
                out.append(min(self.pos, len(text)))
                spelled = tok.decode([tid])
                self.pos += len(spelled) if text.startswith(spelled, self.pos) else 0
                continue
            raw = tok.token_bytes(tid) if tok.byte_level else tok.decode([tid]).encode()
            # bytes of an unfinished character that this token does not continue: the text shows them as one
            # U+FFFD before this token's own text
            stray = bool(self._utf8.getstate()[0]) and not (raw and 0x80 <= raw[0] <= 0xBF)
            out.append(min(self.pos + stray, len(text)))
            self.pos += len(self._utf8.decode(raw))
        return out


class _TextChoice:
    """One prompt's choice of a text completion: its echo and the legacy logprobs' text offsets.

    With echo and logprobs the prompt's tokens come first in the logprobs (their logprobs from the engine's
    ``prompt_logprobs``; the first token has none), as vLLM and the legacy OpenAI API give them. With
    ``max_tokens`` 0 (echo only) the one token the engine generated is left out."""

    def __init__(
        self,
        ctx: ServingContext,
        index: int,
        echo: str,
        logprobs: int | None,
        prompt_ids: list[int],
        prompt_only: bool = False,
        echo_scored: bool = False,
        vllm_prompt_logprobs: int | None = None,
        token_ids: bool = False,
    ):
        self.ctx, self.index, self.logprobs = ctx, index, logprobs
        self.echo = echo
        self.prompt_ids = prompt_ids
        self.prompt_only = prompt_only
        self.echo_scored = echo_scored  # the prompt tokens lead the legacy logprobs
        self.vllm_k = vllm_prompt_logprobs  # vLLM's prompt_logprobs field, with this many alternatives
        self.token_ids = token_ids  # vLLM's return_token_ids: the prompt's and the completion's ids too
        self.raw_prompt_logprobs: list[dict | None] | None = None
        self.prompt_lp: dict[str, Any] | None = None  # the prompt tokens' legacy logprobs (first output)
        self.offsets = _TextOffsets(ctx, len(echo))  # the completion's tokens' text_offset (after the echo)
        self.text, self.ids, self.lps = echo, [], []
        self.last: RequestOutput | None = None

    def set_prompt_logprobs(self, raw: list[dict | None]) -> dict[str, Any] | None:
        """Keep the engine's prompt logprobs (the request's first output); with echo + logprobs return, once,
        their legacy form, whose text offsets count from the start of the echo. An entry per prompt token and
        alternative: for a long prompt, call it off the event loop."""
        self.raw_prompt_logprobs = raw
        if not self.echo_scored or self.prompt_lp is not None:
            return None
        # (the engine may hold more alternatives, for vLLM's prompt_logprobs: legacy logprobs show `logprobs`)
        lps = [lp and {**lp, "top": lp["top"][: self.logprobs]} for lp in raw]
        # the first token has no logprob: its entry gives only its text
        entries = _token_logprobs(
            self.ctx, self.prompt_ids, [lp or {"logprob": 0.0, "top": []} for lp in lps]
        )
        tokens = [e["token"] for e in entries]
        self.prompt_lp = {
            "tokens": tokens,
            "token_logprobs": [e["logprob"] if lp else None for e, lp in zip(entries, lps, strict=True)],
            "top_logprobs": [
                {t["token"]: t["logprob"] for t in e["top_logprobs"]} if lp else None
                for e, lp in zip(entries, lps, strict=True)
            ],
            "text_offset": _TextOffsets(self.ctx).starts(self.prompt_ids, self.echo),
        }
        return self.prompt_lp

    def legacy_logprobs(self, ids: list[int], lps: list[dict]) -> dict[str, Any] | None:
        """The legacy logprobs of the next completion tokens ``ids``, whose text ``self.text`` already ends with."""
        if self.logprobs is None:
            return None
        entries = _token_logprobs(self.ctx, ids, lps)
        starts = self.offsets.starts(ids, self.text)
        return {
            "tokens": [e["token"] for e in entries],
            "token_logprobs": [e["logprob"] for e in entries],
            "top_logprobs": [{t["token"]: t["logprob"] for t in e["top_logprobs"]} for e in entries],
            "text_offset": starts,
        }

    def add(self, out: RequestOutput) -> None:
        if out.prompt_logprobs is not None:  # (converted in ``reply``, off the event loop)
            self.raw_prompt_logprobs = out.prompt_logprobs
        if not self.prompt_only:
            self.text += out.text
            self.ids += out.new_token_ids
            self.lps += out.logprobs or []
        self.last = out

    def usage(self) -> dict[str, Any]:
        usage = _usage(self.last, 0)
        if self.prompt_only:  # the token the engine made is not returned, nor counted
            usage["completion_tokens"], usage["total_tokens"] = 0, usage["prompt_tokens"]
        return usage

    def reply(self) -> dict[str, Any]:
        """The choice (with a long prompt's logprobs, thousands of entries: call it off the event loop)."""
        if self.raw_prompt_logprobs is not None:
            self.set_prompt_logprobs(self.raw_prompt_logprobs)
        lp = self.legacy_logprobs(self.ids, self.lps)
        if lp is not None and self.prompt_lp is not None:
            lp = {k: self.prompt_lp[k] + lp[k] for k in lp}
        reply = {
            "index": self.index,
            "text": self.text,
            "logprobs": lp,
            "finish_reason": self.last.finish_reason,
        }
        if self.token_ids:
            reply["prompt_token_ids"], reply["token_ids"] = self.prompt_ids, list(self.ids)
        if self.vllm_k is not None and self.raw_prompt_logprobs is not None:
            reply["prompt_logprobs"] = _vllm_prompt_logprobs(
                self.ctx, self.prompt_ids, self.raw_prompt_logprobs, self.vllm_k
            )
        return reply


async def completions(body: CompletionRequest, request: Request):
    ctx = _ctx(request)
    reject_lone_surrogates(body)
    refuse_unsupported_extras(body)
    model, thinking = served_model(ctx, body.model)
    if thinking:
        raise bad_request(
            "FIM / text completion is not supported in thinking mode (use deepseek-chat)", "model"
        )
    prompts, batch = _prompt_list(body.prompt)
    fields = [f"prompt[{i}]" if batch else "prompt" for i in range(len(prompts))]
    ids_list = [await _prompt_ids(ctx, p, body.suffix, f) for p, f in zip(prompts, fields, strict=True)]
    if body.truncate_prompt_tokens is not None:  # what runs, and so what echo repeats: the kept tokens
        kept = [truncated_prompt(ctx, ids, body.truncate_prompt_tokens) for ids in ids_list]
        prompts = [p if len(k) == len(ids) else k for p, k, ids in zip(prompts, kept, ids_list, strict=True)]
        ids_list = kept
    n_lp = body.logprobs or 0
    prompt_only = body.max_tokens == 0
    if prompt_only and not body.echo:
        raise invalid_param(
            "max_tokens 0 returns only the prompt: it needs echo (got max_tokens 0)", "max_tokens"
        )
    too_long = [len(ids) for ids in ids_list if len(ids) >= ctx.max_model_len]
    if prompt_only and too_long:  # (the engine scores a prompt in the step that samples one token after it)
        raise bad_request(
            f"this model's maximum context length is {ctx.max_model_len} tokens; scoring a prompt (echo with "
            f"max_tokens 0) needs room for one token after it, and the prompt has {too_long[0]} tokens",
            "prompt",
        )
    # echo + logprobs: the prompt tokens' logprobs too (the prompt is then computed, not read from the cache);
    # vLLM's prompt_logprobs asks for them in its own shape
    _no_streamed_prompt_logprobs(body)
    scored = body.echo and body.logprobs is not None
    wanted = [k for k in (n_lp if scored else None, body.prompt_logprobs) if k is not None]
    k_prompt = max(wanted) if wanted else None
    params = [
        replace(
            sampling_params_for(
                body, max_tokens_for(ctx, 1 if prompt_only else body.max_tokens, len(ids), (4096, 4096)), False,
                logprobs=body.logprobs is not None, top_logprobs=n_lp,
            ),
            prompt_logprobs=k_prompt,
        )
        for ids in ids_list
    ]  # fmt: skip
    guided = vllm_guided(body)
    if guided is not None:
        params = [with_guided(p, guided) for p in params]
    rid = f"{uuid.uuid4()}"
    n = body.n or 1  # choice i * n + j: sample j of prompt i (its shared prompt computed once)
    requests = [(ids, sample) for ids, p in zip(ids_list, params, strict=True) for sample in p.samples()]
    streams = await submit_all(  # (a batch the engine takes only in part: the part taken is aborted)
        ctx,
        [(ids, sample, f"{rid}-{k}" if batch or n > 1 else rid) for k, (ids, sample) in enumerate(requests)],
    )
    head = {"id": rid, "object": "text_completion", "created": int(time.time()), "model": model,
            "system_fingerprint": ctx.system_fingerprint}  # fmt: skip
    choices = [
        _TextChoice(
            ctx,
            k,
            _echo(ctx, prompts[k // n]) if body.echo else "",
            body.logprobs,
            ids_list[k // n],
            prompt_only,
            scored,
            body.prompt_logprobs,
            bool(body.return_token_ids),
        )  # fmt: skip
        for k in range(len(streams))
    ]

    if not body.stream:

        async def run_to_end() -> list[dict[str, Any]]:
            outs = outputs(merged_streams(streams), ctx)
            try:
                async for i, out in outs:
                    choices[i].add(out)
            finally:  # (a client that left cancels this: every prompt is aborted)
                await outs.aclose()
            # (prompt logprobs: an entry per prompt token and alternative, off the event loop)
            return await run_in_threadpool(lambda: [c.reply() for c in choices])

        def completion_reply(replies: list[dict[str, Any]]) -> dict[str, Any]:
            return {**head, "choices": replies, "usage": _summed_usage([c.usage() for c in choices], n)}

        return await reply_when_done(request, run_to_end(), completion_reply, ctx.keepalive_s)

    include_usage = bool(body.stream_options and body.stream_options.include_usage)

    prompt_ids_sent: set[int] = set()

    def with_ids(choice: dict[str, Any], token_ids: list[int]) -> dict[str, Any]:
        """vLLM's return_token_ids: a chunk's new token ids, and the prompt's in a choice's first chunk."""
        if body.return_token_ids:
            choice["token_ids"] = token_ids
            if choice["index"] not in prompt_ids_sent:
                prompt_ids_sent.add(choice["index"])
                choice["prompt_token_ids"] = choices[choice["index"]].prompt_ids
        return choice

    def echo_chunk(c: _TextChoice, lp: dict[str, Any] | None) -> str:
        choice = {"index": c.index, "text": c.echo, "logprobs": lp, "finish_reason": None}
        return _sse({**head, "choices": [with_ids(choice, [])]})

    async def events() -> AsyncIterator[str]:
        for c in choices:
            if c.echo and not c.echo_scored:  # (with the prompt's logprobs: once they are known)
                yield echo_chunk(c, None)
        usages = {}
        items = with_keepalive(merged_streams(streams), ctx.keepalive_s, ctx.start_timeout_s)
        try:
            async for item in items:
                if item is None:
                    yield ": keep-alive\n\n"
                    continue
                i, out = item
                choice = choices[i]
                prompt_lp = None
                if out.prompt_logprobs is not None:  # (an entry per prompt token: off the event loop)
                    prompt_lp = await run_in_threadpool(choice.set_prompt_logprobs, out.prompt_logprobs)
                if prompt_lp is not None:
                    yield echo_chunk(choice, prompt_lp)
                choice.last = out
                if choice.prompt_only:
                    text, lp = "", None
                else:
                    choice.text += out.text
                    text, lp = out.text, choice.legacy_logprobs(out.new_token_ids, out.logprobs or [])
                ids = [] if choice.prompt_only else out.new_token_ids
                c = {**head, "choices": [with_ids({"index": i, "text": text, "logprobs": lp,
                                          "finish_reason": out.finish_reason if out.finished else None}, ids)]}  # fmt: skip
                if out.finished:
                    usages[i] = choice.usage()
                last = len(usages) == len(choices) and out.finished
                total = _summed_usage([usages[k] for k in sorted(usages)], n) if last else None
                if last:  # the usage of the whole request: on the last chunk, or a chunk of its own
                    c["usage"] = None if include_usage else total
                yield _sse(c)
                if last and include_usage:
                    yield _sse({**head, "choices": [], "usage": total})
        except Exception as e:  # in-band, then the stream closes (as for chat)
            yield _sse(stream_error(e).body())
            return
        finally:
            await items.aclose()  # closes the engine streams: a client that left aborts every prompt
        yield "data: [DONE]\n\n"

    return StreamingResponse(events(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
