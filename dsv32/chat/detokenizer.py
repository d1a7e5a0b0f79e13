"""Generated ids → text, piece by piece, never splitting a character.

Byte-level BPE tokens are byte sequences: a Chinese character or an emoji often spans two tokens, and
decoding each token alone would show a broken sequence. :class:`IncrementalDetokenizer` keeps the bytes of
an unfinished UTF-8 character until the next token completes it (invalid bytes become U+FFFD, as in a full
decode). Tokenizers that are not byte-level fall back to decoding a sliding window of ids (the previous piece
gives context, so joining spaces come out right) and holding back a trailing U+FFFD.
"""

from __future__ import annotations

import codecs
from collections.abc import Iterable

from dsv32.chat.tokenizer import Tokenizer


class IncrementalDetokenizer:
    """``add(ids)`` returns the text those ids complete; ``flush()`` returns what is left at the end."""

    def __init__(self, tokenizer: Tokenizer, *, skip_special_tokens: bool = True):
        self.tokenizer = tokenizer
        self.skip = tokenizer.special_ids if skip_special_tokens else frozenset()
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace") if tokenizer.byte_level else None
        self._ids: list[int] = []  # fallback path: all ids; text is shown up to self._read
        self._prefix = self._read = 0

    def add(self, ids: int | Iterable[int]) -> str:
        """Text made complete by ``ids`` (possibly empty)."""
        ids = [ids] if isinstance(ids, int) else [i for i in ids]
        kept = [i for i in ids if i not in self.skip]
        if self._utf8 is not None:
            return self._utf8.decode(b"".join(self.tokenizer.token_bytes(i) for i in kept))
        self._ids.extend(kept)
        shown = self.tokenizer.decode(self._ids[self._prefix : self._read])
        text = self.tokenizer.decode(self._ids[self._prefix :])
        if len(text) <= len(shown) or text.endswith("\ufffd"):
            return ""
        self._prefix, self._read = self._read, len(self._ids)
        return text[len(shown) :]

    def flush(self) -> str:
        """Whatever is still held (an incomplete character becomes U+FFFD)."""
        if self._utf8 is not None:
            return self._utf8.decode(b"", final=True)
        shown = self.tokenizer.decode(self._ids[self._prefix : self._read])
        text = self.tokenizer.decode(self._ids[self._prefix :])
        self._prefix = self._read = len(self._ids)
        return text[len(shown) :]
