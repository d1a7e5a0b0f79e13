"""``render_prompt`` / ``encode_prompt``: OpenAI-style messages → the prompt of the chosen chat format."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from dsv32.chat.encoding_v3 import build_v3
from dsv32.chat.encoding_v31 import build_v31
from dsv32.chat.encoding_v32 import build_v32
from dsv32.chat.errors import ChatFormatError
from dsv32.chat.family import check_family
from dsv32.chat.messages import ROLES, Conversation, parse_conversation
from dsv32.chat.prompt import Prompt
from dsv32.chat.tokenizer import Tokenizer, load_tokenizer

_BUILDERS: dict[str, Callable[..., Prompt]] = {"v3.2": build_v32, "v3.1": build_v31, "v3": build_v3}


def build_prompt(
    messages: list[dict[str, Any]],
    *,
    tools: list[dict[str, Any]] | None = None,
    thinking: bool = False,
    family: str = "v3.2",
    roles: tuple[str, ...] | None = None,
) -> Prompt:
    """The prompt as template/data pieces (see :class:`dsv32.chat.prompt.Prompt`). ``roles`` narrows the
    roles the family accepts (the API refuses ``developer``, which only the V3.2 encoder knows)."""
    family = check_family(family)
    if not isinstance(thinking, bool):
        raise ChatFormatError("thinking", f"expected true or false, got {type(thinking).__name__}")
    if thinking and family == "v3":
        raise ChatFormatError("thinking", "the v3 format has no thinking mode (use v3.1 or v3.2)")
    known = ROLES if family == "v3.2" else tuple(r for r in ROLES if r != "developer")
    roles = known if roles is None else tuple(r for r in known if r in roles)
    conv: Conversation = parse_conversation(messages, tools, roles=roles)
    return _BUILDERS[family](conv, thinking=thinking)


def render_prompt(
    messages: list[dict[str, Any]],
    *,
    tools: list[dict[str, Any]] | None = None,
    thinking: bool = False,
    family: str = "v3.2",
) -> str:
    """The prompt text, control tokens spelled out, ending where the model's reply starts.

    ``family``: ``"v3.2"`` (DSML), ``"v3.1"`` or ``"v3"``. ``tools``: OpenAI tools. A final assistant message
    with ``prefix: true`` is continued instead of closed. Bad input raises :class:`ChatFormatError`.
    """
    return str(build_prompt(messages, tools=tools, thinking=thinking, family=family))


def encode_prompt(
    messages: list[dict[str, Any]],
    *,
    tools: list[dict[str, Any]] | None = None,
    thinking: bool = False,
    family: str = "v3.2",
    tokenizer: Tokenizer | None = None,
    roles: tuple[str, ...] | None = None,
) -> list[int]:
    """The same prompt as token ids. Only the template inserts control tokens: request text that spells one
    (``<｜end▁of▁sentence｜>``, ``</think>``, ``<｜User｜>``, …) is encoded as ordinary text."""
    prompt = build_prompt(messages, tools=tools, thinking=thinking, family=family, roles=roles)
    return prompt.ids(tokenizer or load_tokenizer())
