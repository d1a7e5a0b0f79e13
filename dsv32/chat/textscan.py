"""Small text-scanning helpers shared by the streaming parsers: markers, hold-back, tag expectations."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Literal

NEED_MORE: Literal["more"] = "more"


def find_first(text: str, markers: Iterable[str], start: int = 0) -> tuple[int, str]:
    """Earliest occurrence of any marker (longest wins on a tie): ``(index, marker)``, or ``(-1, "")``."""
    best, found = -1, ""
    for m in markers:
        i = text.find(m, start)
        if i != -1 and (best == -1 or i < best or (i == best and len(m) > len(found))):
            best, found = i, m
    return best, found


def held_suffix(text: str, markers: Iterable[str]) -> int:
    """Length of the longest suffix of ``text`` that is a proper prefix of some marker.

    That much must be held back: the next characters may complete the marker.
    """
    longest = 0
    for m in markers:
        for n in range(min(len(m) - 1, len(text)), longest, -1):
            if text.endswith(m[:n]):
                longest = n
                break
    return longest


def expect(text: str, pos: int, options: Iterable[str], skip_ws: bool = True) -> tuple[str, int] | str | None:
    """Which option starts at ``pos`` (after whitespace): ``(option, end)``; ``NEED_MORE`` if undecidable yet;
    ``None`` if none can."""
    j = pos
    if skip_ws:
        while j < len(text) and text[j].isspace():
            j += 1
    rest = text[j:]
    if not rest:
        return NEED_MORE
    waiting = False
    for opt in options:
        if rest.startswith(opt):
            return opt, j + len(opt)
        if opt.startswith(rest):
            waiting = True
    return NEED_MORE if waiting else None
