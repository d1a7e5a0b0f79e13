"""Per-request sampling and stopping options: plain data, checked against the API's ranges.

The fields and ranges follow the DeepSeek / OpenAI chat API (``shared/spec/api.md`` §3.1, §11) plus the
vLLM-style extras the engine supports (top_k, min_p, top_a, repetition_penalty, stop_token_ids, ...).
A ``SamplingParams`` holds only builtins, so it crosses thread and process boundaries as is.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, replace
from typing import Any

MAX_STOP_STRINGS = 16  # api.md §3.1: stop takes at most 16 sequences
MAX_TOP_LOGPROBS = 20
MAX_N = 128  # samples of one prompt (OpenAI's limit for n)
MAX_LOGIT_BIAS = 100.0
_SEED_RANGE = (-(2**63), 2**64 - 1)  # what torch.Generator.manual_seed accepts


class SamplingParamsError(ValueError):
    """A sampling option out of range; the message names the field, the value and what is allowed."""

    def __init__(self, field: str, value: Any, allowed: str):
        self.field = field
        self.value = value
        self.allowed = allowed
        super().__init__(f"{field} must be {allowed}, got {value!r}")


@dataclass
class SamplingParams:
    """How to pick each next token and when to stop.

    ``temperature == 0`` is greedy (argmax after logit_bias and penalties); one below 0.01 samples at 0.01, as
    vLLM does. ``top_k`` of -1 or 0 is off.
    ``max_tokens`` defaults to 16, as in vLLM; ``None`` generates until the context is full. ``stop`` strings end generation before the
    string (it is not part of the returned text); ``stop_token_ids`` end it on those tokens even with
    ``ignore_eos``. ``logprobs`` returns the sampled token's log-probability and, with ``top_logprobs`` > 0,
    that many most likely alternatives (see ``Sampler`` for which distribution they describe).
    ``stop_strings_after`` (a token id): stop strings are matched only on the text after that token (the API
    sets ``</think>`` in thinking mode, so they apply to the content, not the reasoning).
    ``stop_skip`` (strings): text that is not content, taken out of the text before stop strings see it (and
    so out of the returned text; the API gives ``</think>``, which its chat parser drops from the content
    anyway, so a stray one cannot hide a stop string from the matcher).
    ``stop_exempt`` (opening markers, closing markers): stop strings are not matched from an opening marker
    (and the whitespace before it) through a closing marker (the API gives the chat format's tool-call block,
    so they apply to the content, not to a tool call's markup; ``dsv32.engine.stop``).
    ``prompt_logprobs`` (0-20, as vLLM): each prompt token's log-probability given the tokens before it (and
    its rank, 1 for the most likely), with that many most likely alternatives, from the model's raw distribution (no temperature, penalties or
    bias); the first token has none. The request's prompt is then computed in full, not read from the
    prefix cache.
    ``min_tokens`` (as vLLM): until that many tokens are out, EOS and ``stop_token_ids`` cannot be sampled
    (their logits are -inf, which logprobs show) and stop strings are not matched (text from the tokens after
    it is); not with ``guided``, whose grammar decides where the output may end.
    ``priority`` (as vLLM): with the engine's ``scheduling_policy="priority"``, a lower value is admitted
    first and preempted last (ties: arrival order); 0 under the default first-come-first-served policy.
    ``n`` (as vLLM): that many samples of the prompt, each its own engine request (``samples``); the
    engine's scheduler computes their shared prompt once.
    ``allowed_token_ids`` (as vLLM): only these tokens can be sampled (the others' logits are -inf, which
    logprobs show). ``bad_words`` (as vLLM): words the output never contains as tokenized on their own (each
    word with and without a leading space): the last token of a word cannot be sampled where the output so far
    ends with its other tokens (a one-token word never). The engine tokenizes them, so it needs its tokenizer.
    ``include_stop_str_in_output`` (as vLLM): the stop string that ends the request is returned as the end of
    the text instead of being cut off.
    ``guided`` constrains the output to a grammar (JSON mode, a JSON Schema, a Lark grammar, a regex; see
    ``dsv32.engine.grammar``): only tokens the grammar allows are sampled, and the request ends when it is
    complete.
    """

    max_tokens: int | None = 16  # vLLM's default; None: until the context is full
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    min_p: float = 0.0
    top_a: float = 0.0
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logit_bias: dict[int, float] | None = None
    seed: int | None = None
    stop: list[str] | None = None
    stop_token_ids: list[int] | None = None
    stop_strings_after: int | None = None
    stop_exempt: tuple[tuple[str, ...], tuple[str, ...]] | None = None
    stop_skip: tuple[str, ...] | None = None
    include_stop_str_in_output: bool = False
    allowed_token_ids: list[int] | None = None
    bad_words: list[str] | None = None
    ignore_eos: bool = False
    logprobs: bool = False
    top_logprobs: int = 0
    skip_special_tokens: bool = True
    guided: dict[str, Any] | None = None
    prompt_logprobs: int | None = None
    n: int = 1
    min_tokens: int = 0
    priority: int = 0

    def __post_init__(self) -> None:
        # Accept the API's spellings: one stop string, and JSON object keys ("123") for logit_bias.
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        elif isinstance(self.stop, tuple):
            self.stop = list(self.stop)
        for name in ("stop_token_ids", "allowed_token_ids", "bad_words"):
            if isinstance(getattr(self, name), tuple):
                setattr(self, name, list(getattr(self, name)))
        if isinstance(self.logit_bias, dict):
            self.logit_bias = {_int_key(k): v for k, v in self.logit_bias.items()}
        self.validate()

    def samples(self) -> list[SamplingParams]:
        """The ``n`` requests that sample a prompt with these params, each with ``n`` 1; with a seed, sample i
        gets seed + i (as vLLM: its own reproducible stream).

        Raises SamplingParamsError where ``n`` is not an integer in [1, MAX_N] (set after construction)."""
        self._check_n()
        out = []
        for i in range(self.n):
            seed = self.seed
            if seed is not None and i:
                seed = seed + i if seed + i <= _SEED_RANGE[1] else seed + i - 2**64  # (torch: the same seed)
            out.append(replace(self, n=1, seed=seed))
        return out

    def _check_n(self) -> None:
        if not (_is_int(self.n) and 1 <= self.n <= MAX_N):
            raise SamplingParamsError("n", self.n, f"an integer in [1, {MAX_N}]")

    @property
    def greedy(self) -> bool:
        """True when the token is the argmax (temperature 0)."""
        return self.temperature == 0

    def validate(self, vocab_size: int | None = None) -> None:
        """Raise ``SamplingParamsError`` for the first field out of range.

        With ``vocab_size`` the token ids in ``logit_bias`` and ``stop_token_ids`` are checked too.
        """
        if self.max_tokens is not None and not (_is_int(self.max_tokens) and self.max_tokens >= 1):
            raise SamplingParamsError("max_tokens", self.max_tokens, "an integer >= 1 or None")
        _check_range("temperature", self.temperature, 0.0, 2.0)
        if not (_is_number(self.top_p) and 0.0 < self.top_p <= 1.0):
            raise SamplingParamsError("top_p", self.top_p, "a number in (0, 1]")
        if not (_is_int(self.top_k) and self.top_k >= -1):
            raise SamplingParamsError("top_k", self.top_k, "an integer >= 1, or -1 or 0 for off")
        _check_range("min_p", self.min_p, 0.0, 1.0)
        _check_range("top_a", self.top_a, 0.0, 1.0)
        _check_range("frequency_penalty", self.frequency_penalty, -2.0, 2.0)
        _check_range("presence_penalty", self.presence_penalty, -2.0, 2.0)
        if not (_is_number(self.repetition_penalty) and 0.0 < self.repetition_penalty <= 2.0):
            raise SamplingParamsError("repetition_penalty", self.repetition_penalty, "a number in (0, 2]")
        if self.logit_bias is not None:
            if not isinstance(self.logit_bias, dict):
                raise SamplingParamsError("logit_bias", self.logit_bias, "an object {token_id: bias}")
            for tok, bias in self.logit_bias.items():
                _check_token(f"logit_bias[{tok!r}]", tok, vocab_size, "logit_bias key")
                _check_range(f"logit_bias[{tok}]", bias, -MAX_LOGIT_BIAS, MAX_LOGIT_BIAS)
        if self.seed is not None and not (
            _is_int(self.seed) and _SEED_RANGE[0] <= self.seed <= _SEED_RANGE[1]
        ):
            raise SamplingParamsError(
                "seed", self.seed, f"an integer in [{_SEED_RANGE[0]}, {_SEED_RANGE[1]}]"
            )
        if self.stop is not None:
            if not isinstance(self.stop, list) or len(self.stop) > MAX_STOP_STRINGS:
                raise SamplingParamsError(
                    "stop", self.stop, f"a string or a list of at most {MAX_STOP_STRINGS}"
                )
            for i, s in enumerate(self.stop):
                if not isinstance(s, str) or not s:
                    raise SamplingParamsError(f"stop[{i}]", s, "a non-empty string")
        if self.stop_token_ids is not None:
            if not isinstance(self.stop_token_ids, list):
                raise SamplingParamsError("stop_token_ids", self.stop_token_ids, "a list of token ids")
            for i, tok in enumerate(self.stop_token_ids):
                _check_token(f"stop_token_ids[{i}]", tok, vocab_size, "a token id")
        if self.allowed_token_ids is not None:
            if not isinstance(self.allowed_token_ids, list) or not self.allowed_token_ids:
                raise SamplingParamsError(
                    "allowed_token_ids", self.allowed_token_ids, "a non-empty list of token ids"
                )
            for i, tok in enumerate(self.allowed_token_ids):
                _check_token(f"allowed_token_ids[{i}]", tok, vocab_size, "a token id")
        if self.bad_words is not None:
            if not isinstance(self.bad_words, list):
                raise SamplingParamsError("bad_words", self.bad_words, "a list of strings")
            for i, w in enumerate(self.bad_words):
                if not isinstance(w, str) or not w.strip():
                    raise SamplingParamsError(f"bad_words[{i}]", w, "a string with a non-space character")
        if self.stop_strings_after is not None:
            _check_token("stop_strings_after", self.stop_strings_after, vocab_size, "a token id")
        if self.stop_skip is not None and not (
            isinstance(self.stop_skip, (tuple, list))
            and all(isinstance(m, str) and m for m in self.stop_skip)
        ):
            raise SamplingParamsError("stop_skip", self.stop_skip, "non-empty strings")
        if self.stop_exempt is not None and not (
            isinstance(self.stop_exempt, (tuple, list))
            and len(self.stop_exempt) == 2
            and all(isinstance(markers, (tuple, list)) for markers in self.stop_exempt)
            and all(isinstance(m, str) and m for markers in self.stop_exempt for m in markers)
        ):
            raise SamplingParamsError(
                "stop_exempt", self.stop_exempt, "(opening markers, closing markers), non-empty strings"
            )
        for name in ("ignore_eos", "logprobs", "skip_special_tokens", "include_stop_str_in_output"):
            if not isinstance(getattr(self, name), bool):
                raise SamplingParamsError(name, getattr(self, name), "true or false")
        if not (_is_int(self.top_logprobs) and 0 <= self.top_logprobs <= MAX_TOP_LOGPROBS):
            raise SamplingParamsError(
                "top_logprobs", self.top_logprobs, f"an integer in [0, {MAX_TOP_LOGPROBS}]"
            )
        if self.prompt_logprobs is not None and not (
            _is_int(self.prompt_logprobs) and 0 <= self.prompt_logprobs <= MAX_TOP_LOGPROBS
        ):
            raise SamplingParamsError(
                "prompt_logprobs", self.prompt_logprobs, f"an integer in [0, {MAX_TOP_LOGPROBS}] or None"
            )
        if not (_is_int(self.min_tokens) and self.min_tokens >= 0):
            raise SamplingParamsError("min_tokens", self.min_tokens, "an integer >= 0")
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise SamplingParamsError(
                "min_tokens", self.min_tokens, f"at most max_tokens ({self.max_tokens})"
            )
        if self.min_tokens and self.guided is not None:
            raise SamplingParamsError(
                "min_tokens",
                self.min_tokens,
                "0 with a structured output constraint (its grammar decides the end)",
            )
        if not _is_int(self.priority):
            raise SamplingParamsError("priority", self.priority, "an integer")
        self._check_n()
        if self.top_logprobs > 0 and not self.logprobs:
            raise SamplingParamsError("top_logprobs", self.top_logprobs, "0 unless logprobs is true")
        if isinstance(self.guided, dict) and self.guided.get("start_token") is not None:
            _check_token("guided.start_token", self.guided["start_token"], vocab_size, "a token id")
        if self.guided is not None:
            from dsv32.engine.grammar import check_guided  # llguidance only when a constraint is asked for

            check_guided(self.guided)


def token_id_list(ids: Any, error: type[ValueError] = ValueError) -> list[int]:
    """``ids`` (a list, a tuple, a 1-D numpy array or tensor of integers) as a list of ints; ``error`` names the
    first that is not an integer (a float or a string would pass a range check and fail inside the model)."""
    ids = list(ids.tolist() if hasattr(ids, "tolist") else ids)
    not_ids = [t for t in ids if not isinstance(t, numbers.Integral) or isinstance(t, bool)]
    if not_ids:
        raise error(f"prompt token ids must be integers, got {not_ids[0]!r}")
    return [int(t) for t in ids]


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return (isinstance(v, (int, float)) and not isinstance(v, bool)) and math.isfinite(v)


def _check_range(field: str, v: Any, lo: float, hi: float) -> None:
    if not (_is_number(v) and lo <= v <= hi):
        raise SamplingParamsError(field, v, f"a number in [{lo:g}, {hi:g}]")


def _check_token(field: str, tok: Any, vocab_size: int | None, what: str) -> None:
    if not _is_int(tok) or tok < 0:
        raise SamplingParamsError(field, tok, f"{what} (an integer >= 0)")
    if vocab_size is not None and tok >= vocab_size:
        raise SamplingParamsError(field, tok, f"{what} in [0, {vocab_size - 1}]")


def _int_key(k: Any) -> Any:
    """JSON object keys arrive as strings; "123" means token 123. Anything else is left for validate()."""
    if isinstance(k, str) and k.strip().lstrip("-").isdigit():
        return int(k)
    return k
