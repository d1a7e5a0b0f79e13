"""When a request stops: stop strings over streamed text, and the token-level checks (EOS, stop ids, length).

Stop strings are matched on text, not tokens, so one may span any number of tokens. ``StopChecker`` is fed
each text delta and returns only text that can no longer turn out to be the start of a stop string;
the rest is held back until the next delta decides it, so a stream never shows part of a stop string.
On a match the text is cut before the stop string, which is not returned (as OpenAI does).

Which stop string matches does not depend on how the text was split into deltas: the match is the one
that is complete first as the text grows (the earliest end; on a tie the earliest start, i.e. the longest).

Exempt blocks (``SamplingParams.stop_exempt``: opening and closing markers; the API gives a chat format's
tool-call block) are passed through unmatched, from the whitespace right before an opening marker through the
closing marker: stop strings apply to the content, never to the markup of a tool call (chat-format.md §3.3).
Outside a block, text that may be the start of an opening marker (with the whitespace before it) is held back
too, until the next delta decides it.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable
from typing import NamedTuple

from dsv32.chat.textscan import held_suffix
from dsv32.engine.sampling_params import SamplingParams


class StopUpdate(NamedTuple):
    """What ``StopChecker.feed`` returns: the text safe to emit now, and the stop string if one matched."""

    text: str
    matched: str | None


class StopChecker:
    """Incremental stop-string matcher for one request's output text."""

    def __init__(
        self, stop: Iterable[str] | str | None, exempt: tuple[Iterable[str], Iterable[str]] | None = None
    ):
        if isinstance(stop, str):
            stop = [stop]
        self.stop = [s for s in (stop or []) if s]
        opens, closes = exempt or ((), ())
        self._opens, self._closes = [m for m in opens if m], [m for m in closes if m]
        self.matched: str | None = None
        self._held = ""
        self._in_block = False  # inside an exempt block: looking for its closing marker

    @property
    def stopped(self) -> bool:
        return self.matched is not None

    @property
    def held(self) -> str:
        """Text received but not yet emitted (a possible start of a stop string)."""
        return self._held

    def feed(self, delta: str, match: bool = True) -> StopUpdate:
        """Take the next text delta; return the text now safe to emit and the stop string if one matched.
        With ``match`` off (text before ``min_tokens``) no stop string matches, but exempt blocks are tracked.

        After a match everything further is dropped and ``feed`` returns ``("", None)``.
        """
        if self.matched is not None:
            return StopUpdate("", None)
        text = self._held + delta
        if not self.stop or not (match or self._opens):
            self._held = ""
            return StopUpdate(text, None)
        out = ""
        while True:
            if self._in_block:  # passed through up to and including a closing marker
                end, closer = _earliest(text, self._closes)
                if closer is None:
                    keep = held_suffix(text, self._closes)
                    self._held = text[len(text) - keep :]
                    return StopUpdate(out + text[: len(text) - keep], None)
                end += len(closer)
                out, text, self._in_block = out + text[:end], text[end:], False
                continue
            # the content: the text before a block's opening marker and the whitespace before it (without a
            # marker yet: before whatever may still become one)
            start, opener = _earliest(text, self._opens)
            tail = len(text) - len(text[:start].rstrip()) if opener else self._held_opening(text)
            content = text[: len(text) - tail]
            pos, found = _first_completed(content, self.stop) if match else (0, None)
            if found is not None:
                self.matched = found
                self._held = ""
                return StopUpdate(out + content[:pos], found)
            if opener is None:
                keep = tail + (held_suffix(content, self.stop) if match else 0)
                self._held = text[len(text) - keep :]
                return StopUpdate(out + text[: len(text) - keep], None)
            end = start + len(opener)
            out, text, self._in_block = out + text[:end], text[end:], True

    def _held_opening(self, text: str) -> int:
        """Length of the tail of ``text`` that may become whitespace + an opening marker."""
        if not self._opens:
            return 0
        partial = held_suffix(text, self._opens)
        head = text[: len(text) - partial]
        return partial + len(head) - len(head.rstrip())

    def flush(self, match: bool = True) -> str:
        """Generation ended for another reason: emit what was held back (nothing after a match). Text held as
        a possible start of an exempt block is content after all: a stop string in it matches (``matched``)
        unless ``match`` is off."""
        text, self._held = self._held, ""
        if self.matched is not None:
            return ""
        if match and not self._in_block:
            pos, found = _first_completed(text, self.stop)
            if found is not None:
                self.matched = found
                return text[:pos]
        return text


def _earliest(text: str, markers: list[str]) -> tuple[int, str | None]:
    """The marker that occurs first in ``text`` (ties: the longest): (start, marker), or (-1, None)."""
    best, best_start = None, -1
    for m in markers:
        i = text.find(m)
        if i >= 0 and (best is None or i < best_start or (i == best_start and len(m) > len(best))):
            best, best_start = m, i
    return best_start, best


def _first_completed(text: str, stops: list[str]) -> tuple[int, str | None]:
    """The stop string whose first occurrence ends earliest (ties: starts earliest): (start, string)."""
    best_end, best_start, best = len(text) + 1, 0, None
    for s in stops:
        i = text.find(s)
        if i < 0:
            continue
        end = i + len(s)
        if end < best_end or (end == best_end and i < best_start):
            best_end, best_start, best = end, i, s
    return best_start, best


def check_token_stop(
    params: SamplingParams,
    token_id: int,
    num_output_tokens: int,
    eos_token_ids: Collection[int] = (),
    max_output_tokens: int | None = None,
) -> str | None:
    """Finish reason after sampling ``token_id`` (already counted in ``num_output_tokens``), or None.

    "stop": an EOS id (unless ``ignore_eos``) or one of ``stop_token_ids`` (even with ``ignore_eos``).
    "length": ``max_tokens`` reached, or ``max_output_tokens`` (the engine's room left in the context).
    A stop token wins over length when both apply to the same token.
    """
    if (not params.ignore_eos and token_id in eos_token_ids) or (
        params.stop_token_ids and token_id in params.stop_token_ids
    ):
        return "stop"
    limits = [n for n in (params.max_tokens, max_output_tokens) if n is not None]
    if limits and num_output_tokens >= min(limits):
        return "length"
    return None
