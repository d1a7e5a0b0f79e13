"""From sampled tokens to what a client sees: text deltas, stop strings, logprobs, usage."""

from __future__ import annotations

from dataclasses import dataclass

from dsv32.chat.detokenizer import IncrementalDetokenizer
from dsv32.engine.core import EngineCore, TokenOutput
from dsv32.engine.sampling_params import SamplingParams
from dsv32.engine.stop import StopChecker


@dataclass
class Usage:
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int  # prompt tokens served by the prefix cache (prompt_cache_hit_tokens)

    @property
    def miss_tokens(self) -> int:
        return self.prompt_tokens - self.cached_tokens


@dataclass
class RequestOutput:
    """One increment of a request's stream (``text`` is the delta since the previous one)."""

    request_id: str
    new_token_ids: list[int]
    text: str
    logprobs: list[dict] | None
    finished: bool
    finish_reason: str | None  # "stop" | "length" | "abort"
    usage: Usage
    stop_sequence: str | None = None  # the stop string that ended the request, if one did
    # in the first output, when asked for (``SamplingParams.prompt_logprobs``): one entry per prompt token
    prompt_logprobs: list[dict | None] | None = None


@dataclass
class _TextState:
    detok: IncrementalDetokenizer
    stop: StopChecker | None = None
    stop_armed_by: int | None = None  # stop strings see only the text after this token
    stop_after: int = 0  # ... and after this many output tokens (``min_tokens``)
    keep_stop: bool = False  # a matched stop string ends the text (``include_stop_str_in_output``)
    skip: tuple[str, ...] = ()  # text taken out before the stop strings see it (``stop_skip``)

    def kept_stop(self) -> str:
        """The matched stop string where it ends the text (``include_stop_str_in_output``), else nothing."""
        return self.stop.matched if self.keep_stop and self.stop.matched else ""

    def content(self, piece: str) -> str:
        for s in self.skip:
            piece = piece.replace(s, "")
        return piece


class OutputProcessor:
    """Per request: incremental detokenization (never a broken UTF-8 character) and stop strings."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.states: dict[str, _TextState] = {}

    def add(self, request_id: str, params: SamplingParams) -> None:
        detok = IncrementalDetokenizer(self.tokenizer, skip_special_tokens=params.skip_special_tokens)
        stop = StopChecker(params.stop, params.stop_exempt) if params.stop else None
        self.states[request_id] = _TextState(
            detok, stop, params.stop_strings_after if stop else None, params.min_tokens,
            params.include_stop_str_in_output, tuple(params.stop_skip or ()),
        )  # fmt: skip

    def remove(self, request_id: str) -> None:
        self.states.pop(request_id, None)

    def process(self, core: EngineCore, outs: list[TokenOutput]) -> list[RequestOutput]:
        results = []
        for o in outs:
            st = self.states.get(o.request_id)
            if st is None:
                continue
            finished, reason = o.finished, o.finish_reason
            ids, logprobs, completion = o.new_token_ids, o.logprobs, o.completion_tokens
            if st.stop is None:
                delta = st.detok.add(ids) + (st.detok.flush() if finished else "")
            else:
                # token by token: a step may bring two tokens (speculative decoding), and a stop string the
                # first one completes ends the output there, as it would without the second
                delta = ""
                before = completion - len(ids)  # output tokens before this step's
                if finished and not ids:  # ended without a new token (nothing was left to sample)
                    match = st.stop_armed_by is None and before >= st.stop_after
                    delta = st.stop.feed(st.content(st.detok.flush()), match=match).text
                    delta += st.stop.flush(match=match)
                    if st.stop.matched is not None:
                        reason = "stop"
                        delta += st.kept_stop()
                for j in range(len(ids)):
                    last = j == len(ids) - 1
                    piece = st.detok.add(ids[j : j + 1]) + (st.detok.flush() if finished and last else "")
                    if st.stop_armed_by is not None:
                        delta += piece  # not yet: the text before the arming token is passed
                        if ids[j] == st.stop_armed_by:
                            st.stop_armed_by = None
                        continue
                    if before + j < st.stop_after:  # before min_tokens: passed (a tool-call block tracked)
                        delta += st.stop.feed(st.content(piece), match=False).text
                        if finished and last:
                            delta += st.stop.flush(match=False)
                        continue
                    text, matched = st.stop.feed(st.content(piece))
                    delta += text + (st.kept_stop() if matched else "")
                    if matched:
                        if not (finished and last):
                            core.finish(o.request_id, "stop")
                        finished, reason = True, "stop"
                        completion -= len(ids) - j - 1
                        ids, logprobs = ids[: j + 1], None if logprobs is None else logprobs[: j + 1]
                        break
                    if finished and last:
                        delta += st.stop.flush()
                        if st.stop.matched is not None:  # in text held as a possible tool-call opening
                            reason = "stop"
                            delta += st.kept_stop()
            usage = Usage(o.prompt_tokens, completion, o.cached_tokens)
            stop_str = st.stop.matched if st.stop is not None else None
            results.append(
                RequestOutput(
                    o.request_id, ids, delta, logprobs, finished, reason, usage, stop_str, o.prompt_logprobs
                )
            )
            if finished:
                del self.states[o.request_id]
        return results
