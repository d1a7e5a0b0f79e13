"""A prompt as an ordered list of trusted template text and untrusted data, rendered to text or ids.

The encoders append template text (which may spell control tokens such as ``<｜User｜>`` or ``<think>``) with
:meth:`Prompt.tmpl` and everything that came from the request (message content, reasoning, tool names,
arguments, tool schemas, tool results) with :meth:`Prompt.data`. :meth:`Prompt.ids` turns only the template's
control-token strings into control ids; data is always encoded as ordinary text. Adjacent template and data
text is encoded as one run, so for data that spells no control token the ids equal encoding the rendered
string with control-token matching on (the reference encoders' behaviour).
"""

from __future__ import annotations

from dsv32.chat.tokenizer import Tokenizer


class Prompt:
    """Pieces of a prompt; ``str(prompt)`` is the text with control tokens spelled out."""

    __slots__ = ("_parts",)

    def __init__(self) -> None:
        self._parts: list[tuple[bool, str]] = []  # (trusted, text)

    def tmpl(self, text: str) -> Prompt:
        """Append template text; control-token strings in it become control tokens."""
        if text:
            self._parts.append((True, text))
        return self

    def data(self, text: str) -> Prompt:
        """Append request data; it is encoded as plain text whatever it spells."""
        if text:
            self._parts.append((False, text))
        return self

    def __str__(self) -> str:
        return "".join(text for _, text in self._parts)

    def ids(self, tokenizer: Tokenizer) -> list[int]:
        """Token ids: control tokens only where the template put them, plain runs encoded in one batch."""
        layout: list[int | None] = []  # a control id, or None for "the next plain run"
        runs: list[str] = []
        run: list[str] = []
        for trusted, text in self._parts:
            pieces = tokenizer.split_special(text) if trusted else [text]
            for piece in pieces:
                if isinstance(piece, int):
                    if run:
                        runs.append("".join(run))
                        layout.append(None)
                        run = []
                    layout.append(piece)
                else:
                    run.append(piece)
        if run:
            runs.append("".join(run))
            layout.append(None)
        encoded = iter(tokenizer.encode_plain_batch(runs))
        out: list[int] = []
        for item in layout:
            if item is None:
                out.extend(next(encoded))
            else:
                out.append(item)
        return out
