"""Which chat format a checkpoint speaks (chat-format.md §3.9): ``"v3.2"`` (DSML), ``"v3.1"`` or ``"v3"``.

``model_type`` alone does not decide it: V3.2-Exp is ``deepseek_v32`` yet ships a V3.1-style Jinja template.
Rule: an explicit override wins; a ``chat_template`` in ``tokenizer_config.json`` means the Jinja era (V3.1 if
the template has the thinking switch, else V3); otherwise ``deepseek_v32`` → V3.2 and ``deepseek_v3`` → V3.1.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from dsv32.chat.errors import ChatFormatError

FAMILIES = ("v3.2", "v3.1", "v3")
_BY_MODEL_TYPE = {"deepseek_v32": "v3.2", "deepseek_v3": "v3.1"}


def check_family(family: str) -> str:
    """``family`` if it is one of :data:`FAMILIES`, else :class:`ChatFormatError`."""
    if family not in FAMILIES:
        raise ChatFormatError("family", f"unknown chat format {family!r} (allowed: {', '.join(FAMILIES)})")
    return family


def family_for_config(
    config: dict[str, Any] | None = None,
    *,
    chat_template: str | None = None,
    override: str | None = None,
) -> str:
    """The chat format for an HF ``config.json`` dict (and the tokenizer config's ``chat_template``, if any)."""
    if override:
        return check_family(override)
    if chat_template:
        return "v3.1" if "thinking" in chat_template and "</think>" in chat_template else "v3"
    model_type = (config or {}).get("model_type")
    if model_type not in _BY_MODEL_TYPE:
        known = ", ".join(_BY_MODEL_TYPE)
        raise ChatFormatError("model_type", f"no chat format known for {model_type!r} (known: {known})")
    return _BY_MODEL_TYPE[model_type]


def family_for_model_dir(model_dir: str | Path, *, override: str | None = None) -> str:
    """:func:`family_for_config` from a model directory's ``config.json`` and ``tokenizer_config.json``."""
    if override:
        return check_family(override)
    d = Path(model_dir)
    config = _read_json(d / "config.json") or {}
    template = (_read_json(d / "tokenizer_config.json") or {}).get("chat_template")
    if isinstance(template, list):  # several named templates: the default one
        template = next((t.get("template") for t in template if t.get("name") == "default"), None)
    return family_for_config(config, chat_template=template if isinstance(template, str) else None)


def describe_family(model_dir: str | Path, *, override: str | None = None) -> str:
    """The start-up line saying which chat format a model directory gets, and why (chat-format.md §3.9)."""
    family = family_for_model_dir(model_dir, override=override)
    names = {"v3.2": "V3.2 DSML", "v3.1": "V3.1 / V3.2-Exp template", "v3": "V3 template"}
    if override:
        why = "--chat-format"
    elif (_read_json(Path(model_dir) / "tokenizer_config.json") or {}).get("chat_template"):
        why = "the checkpoint ships a chat_template: the Jinja-era format its thinking markers tell"
    else:
        why = "no chat_template in tokenizer_config.json; from config.json's model_type"
    return f"chat format: {family} ({names[family]}; {why}; --chat-format overrides)"


def _read_json(path: Path) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ChatFormatError(str(path), f"not valid JSON ({e})") from None
    return data if isinstance(data, dict) else None
