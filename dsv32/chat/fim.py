"""Fill-in-the-middle prompts (chat-format.md §5): prefix–suffix–middle order with the FIM tokens.

``<｜begin▁of▁sentence｜><｜fim▁begin｜>{prompt}<｜fim▁hole｜>{suffix}<｜fim▁end｜>``; the model writes the middle.
Without a suffix (``None``) the prompt is a plain continuation: ``<｜begin▁of▁sentence｜>{prompt}``.
"""

from __future__ import annotations

from dsv32.chat.errors import ChatFormatError
from dsv32.chat.prompt import Prompt
from dsv32.chat.tokenizer import Tokenizer, load_tokenizer
from dsv32.chat.tokens import BOS, FIM_BEGIN, FIM_END, FIM_HOLE


def build_fim(prompt: str, suffix: str | None = None) -> Prompt:
    if not isinstance(prompt, str):
        raise ChatFormatError("prompt", f"expected a string, got {type(prompt).__name__}")
    if suffix is not None and not isinstance(suffix, str):
        raise ChatFormatError("suffix", f"expected a string or null, got {type(suffix).__name__}")
    p = Prompt().tmpl(BOS)
    if suffix is None:
        return p.data(prompt)
    return p.tmpl(FIM_BEGIN).data(prompt).tmpl(FIM_HOLE).data(suffix).tmpl(FIM_END)


def render_fim(prompt: str, suffix: str | None = None) -> str:
    """The FIM prompt text (control tokens spelled out)."""
    return str(build_fim(prompt, suffix))


def encode_fim(prompt: str, suffix: str | None = None, *, tokenizer: Tokenizer | None = None) -> list[int]:
    """The FIM prompt as ids; FIM/EOS strings inside ``prompt`` or ``suffix`` stay plain text."""
    return build_fim(prompt, suffix).ids(tokenizer or load_tokenizer())
