"""What both front doors (OpenAI and Anthropic routes) share: limits, sampling parameters from a request,
keep-alive streaming, engine errors, and ``ChatRun`` (engine outputs -> parser deltas)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

from fastapi import Request, Response
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel

from dsv32.api.errors import APIError, bad_request, invalid_param
from dsv32.api.service import ServingContext
from dsv32.chat import StreamParser
from dsv32.chat.errors import ChatFormatError
from dsv32.chat.parser import tool_block_markers
from dsv32.chat.tokens import THINK_END, THINK_START
from dsv32.engine.async_engine import QueueFullError
from dsv32.engine.core import EngineError
from dsv32.engine.outputs import RequestOutput
from dsv32.engine.sampling_params import SamplingParams, SamplingParamsError

# the roles DeepSeek's API accepts: the V3.2 encoder's ``developer`` (search-agent turns) is not one of them
API_ROLES = ("system", "user", "assistant", "tool")
T = TypeVar("T")
_MESSAGE_INDEX = re.compile(r"messages\[(\d+)\]")
_TOOL_NAME = re.compile(r"[a-zA-Z0-9_-]+")


def max_tokens_for(
    ctx: ServingContext,
    requested: int | None,
    n_prompt: int,
    limits: tuple[int, int],
    clamp: bool = False,
    field: str = "max_tokens",
) -> int:
    """The request's token budget: ``limits`` = (default, ceiling) of the mode; the context bounds it too.

    Above the ceiling is DeepSeek's 400; with ``clamp`` (the Anthropic route, whose clients, Claude Code
    among them, ask for the output limits of Claude models) the request gets what the model allows, and a
    prompt that leaves no room is Anthropic's "prompt is too long" 400 whatever ``max_tokens`` says.
    ``field``: the request field ``requested`` came from, as errors name it."""
    default, ceiling = limits
    room = ctx.max_model_len - n_prompt
    if clamp and room < 1:  # Anthropic's words for it, which Claude Code reads to compact the conversation
        raise bad_request(
            f"prompt is too long: {n_prompt} tokens > {ctx.max_model_len - 1} maximum", "messages"
        )
    if clamp and requested is not None:
        requested = min(requested, ceiling, room)
    if requested is not None and requested > ceiling:
        raise bad_request(
            f"Invalid {field} value, the valid range of {field} is [1, {ceiling}] (got {requested})",
            field,
        )
    if requested is None:
        if room < 1:
            raise bad_request(
                f"the prompt has {n_prompt} tokens, which leaves no room in the model's context of "
                f"{ctx.max_model_len} tokens"
            )
        return min(default, room)
    if n_prompt + requested > ctx.max_model_len:
        raise bad_request(
            f"this model's maximum context length is {ctx.max_model_len} tokens; the prompt has {n_prompt} "
            f"tokens and {field} asks for {requested} more ({n_prompt + requested} in total)",
            field,
        )
    return requested


def truncated_prompt(ctx: ServingContext, ids: list[int], keep: int | None) -> list[int]:
    """vLLM's ``truncate_prompt_tokens``: the prompt's last ``keep`` tokens (-1: as many as the model's context
    holds); None keeps it whole."""
    field = "truncate_prompt_tokens"
    if keep is None:
        return ids
    if keep == 0:
        raise invalid_param(f"{field} must be -1 or an integer >= 1, got 0", field)
    if keep > ctx.max_model_len:
        raise invalid_param(
            f"{field} ({keep}) is greater than the model's maximum context length ({ctx.max_model_len})",
            field,
        )
    keep = ctx.max_model_len if keep == -1 else keep
    return ids[-keep:]


def check_tool_messages(messages: list[Any]) -> None:
    """api.md §3.2: a ``tool`` message names the call it answers (``tool_call_id``, a string). The encoder
    pairs results with calls by order, as DeepSeek's template does, but a request without the id is refused
    as on DeepSeek's API."""
    for i, m in enumerate(messages):
        if isinstance(m, dict) and m.get("role") == "tool" and not isinstance(m.get("tool_call_id"), str):
            raise bad_request(
                f"messages[{i}].tool_call_id: required (a string) on a tool message", f"messages[{i}]"
            )


def reject_lone_surrogates(body: BaseModel) -> None:
    """400 naming the field when a request string holds a lone UTF-16 surrogate.

    JSON's ``"\\ud800"`` escape decodes to one, and it is not Unicode text: the tokenizer (and UTF-8) cannot
    take it. Tool-call ``arguments`` are JSON inside a string, so their decoded strings are checked too."""
    todo: list[tuple[str, Any]] = [(name, getattr(body, name)) for name in type(body).model_fields]
    todo += list((body.model_extra or {}).items())
    while todo:
        path, value = todo.pop()
        if isinstance(value, str):
            if not value.isascii():
                try:
                    value.encode("utf-8")
                except UnicodeEncodeError as e:
                    raise bad_request(
                        f"{path}: contains a lone UTF-16 surrogate (\\u{ord(value[e.start]):04x}) at character "
                        f"{e.start}, which is not valid Unicode text",
                        path,
                    ) from None
            if path.endswith(".arguments") and "\\u" in value:
                try:
                    todo.append((path, json.loads(value)))
                except (ValueError, RecursionError):
                    pass  # not JSON: the encoder says so
        elif isinstance(value, BaseModel):
            todo += [(f"{path}.{name}", getattr(value, name)) for name in type(value).model_fields]
        elif isinstance(value, dict):
            for k, v in value.items():
                todo += [(f"{path} (key)", k), (f"{path}.{k}", v)]
        elif isinstance(value, list):
            todo += [(f"{path}[{i}]", v) for i, v in enumerate(value)]


def chat_format_error(e: ChatFormatError | RecursionError, origin: list[str] | None = None) -> APIError:
    """The encoder's refusal as a 400. ``origin[i]`` names the request field that rendered message ``i`` came
    from, where the route added or converted messages (so the error names the client's own index)."""
    if isinstance(e, RecursionError):  # json.loads of a tool call's arguments string, ~1000 levels deep
        return bad_request(
            "messages: nested too deeply to render (JSON of more than ~900 levels)", "messages"
        )

    def named(m: re.Match) -> str:
        i = int(m.group(1))
        return origin[i] if origin is not None and i < len(origin) else m.group(0)

    return bad_request(_MESSAGE_INDEX.sub(named, str(e)), _MESSAGE_INDEX.sub(named, e.field))


def check_tool_name(name: Any, field: str, max_len: int) -> None:
    """Tool names as DeepSeek documents them (api.md §3.5; OpenAI and Anthropic check the same): letters,
    digits, ``_`` and ``-``. A name holding ``"`` or ``>`` would break the DSML markup it is written into, so
    the model's call of it could not be parsed back (the markup came back as content)."""
    if isinstance(name, str) and not (_TOOL_NAME.fullmatch(name) and len(name) <= max_len):
        raise bad_request(
            f"{field}: {name[:80]!r} is not a valid tool name (letters, digits, '_' and '-', at most {max_len})",
            field,
        )


def logit_bias_ids(raw: dict[str, float] | None) -> dict[int, float] | None:
    if not raw:
        return None
    out = {}
    for k, v in raw.items():
        try:
            out[int(k)] = v
        except ValueError:
            raise invalid_param(f"logit_bias keys must be token ids, got {k!r}", "logit_bias") from None
    return out


def served_model(ctx: ServingContext, name: str) -> tuple[str, bool]:
    """``ctx.resolve_model``: (the id echoed in responses, thinking by default); a name the server does not
    serve is a 400 listing the ones it does."""
    model, thinking = ctx.resolve_model(name)
    if not model:
        raise bad_request(f"Model Not Exist: {name!r} (available: {', '.join(ctx.model_names())})", "model")
    return model, thinking


_TEMPLATE_THINKING = ("thinking", "enable_thinking")  # vLLM's chat_template_kwargs spellings of the switch


def thinking_mode(req, default: bool) -> bool:
    """Thinking mode of a chat request (or a chat /tokenize): DeepSeek's ``thinking``, else OpenRouter's
    ``reasoning.enabled``, else vLLM's ``chat_template_kwargs``, else the model name's default."""
    kwargs = req.chat_template_kwargs or {}
    unknown = sorted(set(kwargs) - set(_TEMPLATE_THINKING))
    if unknown:
        raise invalid_param(f"chat_template_kwargs: only thinking is known, got {', '.join(unknown)}",
                            "chat_template_kwargs")  # fmt: skip
    switch = [kwargs[k] for k in _TEMPLATE_THINKING if kwargs.get(k) is not None]
    if any(not isinstance(v, bool) for v in switch):
        raise invalid_param("chat_template_kwargs.thinking must be true or false", "chat_template_kwargs")
    if getattr(req, "thinking", None) is not None:
        return req.thinking.type == "enabled"
    reasoning = getattr(req, "reasoning", None)
    if reasoning is not None and reasoning.enabled is not None:
        return reasoning.enabled
    return switch[0] if switch else default


# vLLM request extensions this server does not implement, with the value that asks for nothing (any other
# value is a 422 saying so, not silently ignored)
UNSUPPORTED_EXTRAS: dict[str, Any] = {"best_of": 1, "use_beam_search": False, "logits_processors": None}


def refuse_unsupported_extras(body: BaseModel) -> None:
    """A 422 for a vLLM extension this server does not implement, unless it has its no-op value (``best_of``
    equal to ``n`` is one too)."""
    extra = body.model_extra or {}
    for name, noop in UNSUPPORTED_EXTRAS.items():
        value = extra.get(name)
        if value is None or value == noop or (name == "best_of" and value == (getattr(body, "n", None) or 1)):
            continue
        raise invalid_param(f"{name} is not supported by this server (got {json.dumps(value)[:60]})", name)


def sampling_params_for(
    req, max_tokens: int, thinking: bool, *, logprobs: bool, top_logprobs: int
) -> SamplingParams:
    """SamplingParams from a request; in thinking mode temperature, top_p and penalties are ignored."""
    kw: dict[str, Any] = dict(
        max_tokens=max_tokens,
        n=getattr(req, "n", None) or 1,  # (the Anthropic route has no n)
        seed=req.seed,
        stop=req.stop,
        logit_bias=logit_bias_ids(req.logit_bias),
        stop_token_ids=getattr(req, "stop_token_ids", None),
        logprobs=logprobs,
        top_logprobs=top_logprobs,
    )
    if not thinking:
        for name in ("temperature", "top_p", "frequency_penalty", "presence_penalty"):
            if getattr(req, name) is not None:
                kw[name] = getattr(req, name)
    vllm_only = ("min_tokens", "priority", "include_stop_str_in_output", "allowed_token_ids", "bad_words")
    for name in ("top_k", "min_p", "top_a", "repetition_penalty", "ignore_eos", *vllm_only):
        if getattr(req, name, None) is not None:  # (the Anthropic route has none of vLLM's)
            kw[name] = getattr(req, name)
    try:
        return SamplingParams(**kw)
    except SamplingParamsError as e:
        raise invalid_param(str(e), e.field) from None


# ---- shared response pieces --------------------------------------------------------------------


class StartTimeout(Exception):
    """A request that has not started generating within the server's start timeout (api.md §5.1)."""


def stream_error(e: BaseException) -> APIError:
    """What a request that fails after its response has started tells the client (in-band)."""
    if isinstance(e, APIError):
        return e
    if isinstance(e, StartTimeout):
        return APIError(503, f"Server overloaded: {e}; the request is closed")
    return APIError(500, f"generation failed: {e}")


async def with_keepalive(
    agen: AsyncIterator, interval: float, start_timeout: float | None = None
) -> AsyncIterator:
    """Items of ``agen``; ``None`` whenever ``interval`` seconds pass without one (SSE keep-alive). With
    ``start_timeout``, :class:`StartTimeout` if no item comes that soon (``agen`` is closed: the request is
    aborted)."""
    it = agen.__aiter__()
    pending: asyncio.Task | None = None
    loop = asyncio.get_running_loop()
    deadline = None if start_timeout is None else loop.time() + start_timeout
    try:
        while True:
            if pending is None:
                pending = asyncio.ensure_future(it.__anext__())
            wait = interval if deadline is None else max(0.0, min(interval, deadline - loop.time()))
            done, _ = await asyncio.wait({pending}, timeout=wait)
            if not done:
                if deadline is not None and loop.time() >= deadline:
                    raise StartTimeout(f"the request did not start within {start_timeout:g} s")
                yield None
                continue
            deadline = None  # started
            task, pending = pending, None
            try:
                yield task.result()
            except StopAsyncIteration:
                return
    finally:
        if pending is not None:
            pending.cancel()
            await asyncio.wait({pending})  # let the cancelled step finish before closing the generator
        await agen.aclose()


async def merged_streams(streams: list[AsyncIterator[T]]) -> AsyncIterator[tuple[int, T]]:
    """The items of several engine streams as they come, each with its stream's index (a batch of prompts).
    Closing this (or an error in one stream) closes them all: their requests are aborted."""
    its = [s.__aiter__() for s in streams]
    pending = {asyncio.ensure_future(it.__anext__()): i for i, it in enumerate(its)}
    try:
        while pending:
            done, _ = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            for task in sorted(done, key=pending.__getitem__):
                i = pending.pop(task)
                try:
                    item = task.result()
                except StopAsyncIteration:
                    continue
                pending[asyncio.ensure_future(its[i].__anext__())] = i
                yield i, item
    finally:
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        for s in streams:
            await s.aclose()


async def outputs(stream: AsyncIterator[RequestOutput], ctx: ServingContext) -> AsyncIterator[RequestOutput]:
    """A non-streamed request's engine outputs, under the start timeout (a 503 when it passes). Closing this
    closes ``stream`` (the request is aborted if unfinished)."""
    items = with_keepalive(stream, ctx.keepalive_s, ctx.start_timeout_s)
    try:
        async for out in items:
            if out is not None:
                yield out
    except StartTimeout as e:
        raise stream_error(e) from None
    finally:
        await items.aclose()


async def _disconnected(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def reply_when_done(
    request: Request,
    work: Awaitable[T],
    build: Callable[[T], dict[str, Any]],
    interval: float,
    error_body: Callable[[APIError], dict[str, Any]] = APIError.body,
) -> Response:
    """A non-streamed request's JSON reply: ``build(await work)``.

    Done within ``interval``: a plain JSON response (its errors get their own status codes). Not done: the
    200 and headers are sent, and a blank line every ``interval`` keeps the connection alive until the body
    follows (api.md §5.1: JSON parsers skip the leading whitespace); an error after that is in-band
    (``error_body``). A client that hangs up meanwhile cancels the work, which closes its engine stream, so
    the request is aborted and its blocks freed (499 if it had not been answered yet)."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait({task, watcher}, timeout=interval, return_when=asyncio.FIRST_COMPLETED)
    except BaseException:  # this handler cancelled (server shutdown): the work goes with it
        task.cancel()
        watcher.cancel()
        raise
    if not task.done() and watcher.done():
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        return client_gone()
    watcher.cancel()  # from here the StreamingResponse watches for the client leaving
    if task.done():
        return JSONResponse(build(task.result()))

    async def body() -> AsyncIterator[bytes]:
        try:
            while not (await asyncio.wait({task}, timeout=interval))[0]:
                yield b"\n"
            try:
                payload = build(task.result())
            except Exception as e:
                payload = error_body(stream_error(e))
            yield JSONResponse(payload).body
        finally:
            if not task.done():
                task.cancel()

    return StreamingResponse(body(), media_type="application/json")


def client_gone() -> Response:
    """What a non-streamed request answers once its client hung up (nobody reads it; 499 as nginx logs)."""
    return Response(status_code=499)


async def submit(ctx: ServingContext, prompt_ids: list[int], params: SamplingParams, request_id: str):
    """Hand a request to the engine; its refusals become API errors (400/422/503)."""
    try:
        return await ctx.engine.submit(prompt_ids, params, request_id)
    except (EngineError, SamplingParamsError) as e:
        raise engine_error(e) from None


async def submit_all(ctx: ServingContext, requests: list[tuple[list[int], SamplingParams, str]]) -> list:
    """Hand several requests (n samples, a batch of prompts) to the engine together: their commands reach the
    engine thread at once (one after another, each waiting for the one before to be taken, would wait a step
    each on a busy engine), in order. If the engine refuses one, or the caller is cancelled, the ones it took
    are aborted and the refusal (or the cancellation) raised."""
    tasks = [asyncio.ensure_future(submit(ctx, ids, p, rid)) for ids, p, rid in requests]
    try:
        await asyncio.wait(tasks)
    except asyncio.CancelledError:
        for t in tasks:
            t.cancel()
        await asyncio.wait(tasks)
        await _close_accepted(tasks)
        raise
    refused = [t.exception() for t in tasks if t.exception() is not None]
    if refused:
        await _close_accepted(tasks)
        raise refused[0]
    return [t.result() for t in tasks]


async def _close_accepted(tasks: list[asyncio.Task]) -> None:
    for t in tasks:
        if not t.cancelled() and t.exception() is None:
            await t.result().aclose()


def engine_error(e: Exception) -> APIError:
    if isinstance(e, QueueFullError):
        return APIError(503, f"Server overloaded: {e}")
    if isinstance(e, SamplingParamsError):
        return invalid_param(str(e), e.field)
    return bad_request(str(e))


def _complete_json(text: str) -> bool:
    """Whether a call's streamed arguments are complete: they parse only once its invoke has closed."""
    try:
        json.loads(text)
    except ValueError:
        return False
    return True


def opens_reasoning(prompt_ids: list[int], tokenizer) -> bool:
    """Whether the reply starts inside the reasoning: the prompt's last think tag is ``<think>``. Only the
    template writes control tokens (request text that spells one is plain text), so this reads the template:
    a thinking-mode prompt ends with ``<think>`` except for a prefix completion whose content closed it."""
    start, end = tokenizer.token_id(THINK_START), tokenizer.token_id(THINK_END)
    for tid in reversed(prompt_ids):
        if tid in (start, end):
            return tid == start
    return False


def content_stop_strings(
    params: SamplingParams, tokenizer, in_reasoning: bool, family: str | None = None
) -> SamplingParams:
    """Stop strings apply to the content (chat-format.md §3.3): not the reasoning (armed by ``</think>``), not
    a stray ``</think>`` in the content (which the parser drops), and, with ``family`` (a request with tools),
    not a tool-call block of that chat format."""
    if params.stop:
        params.stop_skip = (THINK_END,)
    if in_reasoning and params.stop:
        params.stop_strings_after = tokenizer.token_id(THINK_END)
    if family is not None and params.stop:
        params.stop_exempt = tool_block_markers(family)
    return params


class ChatRun:
    """Turns engine outputs into parser deltas, counting reasoning tokens.

    ``in_reasoning``: the reply starts inside the reasoning (default: ``thinking``; see
    :func:`opens_reasoning`)."""

    def __init__(
        self,
        ctx: ServingContext,
        tools,
        thinking: bool,
        hide_reasoning: bool,
        parallel: bool = True,
        in_reasoning: bool | None = None,
    ):
        in_reasoning = thinking if in_reasoning is None else in_reasoning
        self.parser = StreamParser(
            tools=tools, thinking=thinking, family=ctx.family, in_reasoning=in_reasoning
        )
        self.parallel = parallel  # False (OpenRouter's parallel_tool_calls): only the first call is kept
        self.thinking = thinking
        self.hide_reasoning = hide_reasoning
        self.think_end_id = ctx.tokenizer.token_id(THINK_END) if thinking else None
        self.reasoning_tokens = 0
        self._in_reasoning = in_reasoning
        self.ids: list[int] = []
        self.logprobs: list[dict] = []
        self.prompt_logprobs: list[dict | None] | None = None  # the prompt's, when asked for (first output)
        self.ctx = ctx
        # with ``parallel`` off: the first call is complete, so generation can stop (api.md §11: truncate
        # after the first invoke); set by ``feed``
        self.done_early = False

    def feed(self, out: RequestOutput) -> list[dict[str, Any]]:
        for tid in out.new_token_ids:
            if self._in_reasoning:
                self.reasoning_tokens += 1
                if tid == self.think_end_id:
                    self._in_reasoning = False
        self.ids += out.new_token_ids
        if out.logprobs:
            self.logprobs += out.logprobs
        if out.prompt_logprobs is not None:
            self.prompt_logprobs = out.prompt_logprobs
        deltas = self.parser.feed(out.text)
        if out.finished:
            deltas += self.parser.finish()
        if not self.parallel and not self.done_early and self.parser.tool_call_count:
            self.done_early = _complete_json(self.parser.call_arguments(0))
        return [d.to_openai() for d in deltas if self._keep(d)]

    def _keep(self, d) -> bool:
        if self.hide_reasoning and d.reasoning_content is not None:
            return False
        return self.parallel or d.tool_call is None or d.tool_call["index"] == 0

    def tool_calls(self) -> list[dict[str, Any]]:
        calls = self.parser.result()["tool_calls"]
        return calls if self.parallel else calls[:1]

    async def run_to_end(self, stream) -> RequestOutput:
        """Feed a whole (non-streamed) request through; returns its last output."""
        last = None
        outs = outputs(stream, self.ctx)
        try:
            async for out in outs:
                self.feed(out)
                last = out
                if self.done_early:
                    break  # closing the stream aborts the request
        finally:
            await outs.aclose()
            await stream.aclose()
        return last

    def finish_reason(self, engine_reason: str | None) -> str:
        if (engine_reason == "stop" or self.done_early) and self.parser.tool_call_count:
            return "tool_calls"
        return engine_reason or "stop"
