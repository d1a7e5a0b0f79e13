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


@dataclass
class _TextState:
    detok: IncrementalDetokenizer
    stop: StopChecker | None = None


class OutputProcessor:
    """Per request: incremental detokenization (never a broken UTF-8 character) and stop strings."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.states: dict[str, _TextState] = {}

    def add(self, request_id: str, params: SamplingParams) -> None:
        detok = IncrementalDetokenizer(self.tokenizer, skip_special_tokens=params.skip_special_tokens)
        self.states[request_id] = _TextState(detok, StopChecker(params.stop) if params.stop else None)

    def remove(self, request_id: str) -> None:
        self.states.pop(request_id, None)

    def process(self, core: EngineCore, outs: list[TokenOutput]) -> list[RequestOutput]:
        results = []
        for o in outs:
            st = self.states.get(o.request_id)
            if st is None:
                continue
            delta = st.detok.add(o.new_token_ids)
            finished, reason = o.finished, o.finish_reason
            if finished:
                delta += st.detok.flush()
            if st.stop is not None:
                delta, matched = st.stop.feed(delta)
                if matched:
                    if not finished:
                        core.finish(o.request_id, "stop")
                    finished, reason = True, "stop"
                elif finished:
                    delta += st.stop.flush()
            usage = Usage(o.prompt_tokens, o.completion_tokens, o.cached_tokens)
            stop_str = st.stop.matched if st.stop is not None else None
            results.append(
                RequestOutput(
                    o.request_id, o.new_token_ids, delta, o.logprobs, finished, reason, usage, stop_str
                )
            )
            if finished:
                del self.states[o.request_id]
        return results
