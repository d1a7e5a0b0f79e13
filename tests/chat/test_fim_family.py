"""FIM prompts and choosing the chat format of a checkpoint."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from dsv32.chat import ChatFormatError, encode_fim, family_for_config, family_for_model_dir, render_fim
from dsv32.chat.family import describe_family
from tests.chat.test_templates import TEMPLATES

BOS = "<｜begin▁of▁sentence｜>"


def test_fim_prompt() -> None:
    assert render_fim("def f(x):\n", "\n    return y") == (
        f"{BOS}<｜fim▁begin｜>def f(x):\n<｜fim▁hole｜>\n    return y<｜fim▁end｜>"
    )
    assert render_fim("Once upon a time, ") == f"{BOS}Once upon a time, "
    assert render_fim("a", "") == f"{BOS}<｜fim▁begin｜>a<｜fim▁hole｜><｜fim▁end｜>"
    ids = encode_fim("a", "b")
    assert ids[:2] == [0, 128801] and ids[-1] == 128802 and 128800 in ids
    with pytest.raises(ChatFormatError, match="^prompt: expected a string"):
        render_fim(None)  # type: ignore[arg-type]
    with pytest.raises(ChatFormatError, match="^suffix: expected a string or null"):
        render_fim("a", 3)  # type: ignore[arg-type]


def test_family_from_config() -> None:
    assert family_for_config({"model_type": "deepseek_v32"}) == "v3.2"
    assert family_for_config({"model_type": "deepseek_v3"}) == "v3.1"
    assert family_for_config({"model_type": "deepseek_v3"}, override="v3") == "v3"
    # V3.2-Exp: deepseek_v32 weights with a Jinja-era template
    assert family_for_config({"model_type": "deepseek_v32"}, chat_template=TEMPLATES["v3.1"]) == "v3.1"
    assert family_for_config({"model_type": "deepseek_v3"}, chat_template=TEMPLATES["v3"]) == "v3"
    with pytest.raises(ChatFormatError, match="^model_type: no chat format known for 'llama'"):
        family_for_config({"model_type": "llama"})
    with pytest.raises(ChatFormatError, match="^family: unknown chat format"):
        family_for_config({"model_type": "deepseek_v3"}, override="v2")


def test_family_from_model_dir(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "deepseek_v32"}))
    assert family_for_model_dir(tmp_path) == "v3.2"
    assert describe_family(tmp_path).startswith("chat format: v3.2 (V3.2 DSML; no chat_template")
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": TEMPLATES["v3.1"]}))
    assert family_for_model_dir(tmp_path) == "v3.1"
    assert describe_family(tmp_path).startswith("chat format: v3.1 (V3.1 / V3.2-Exp template; the checkpoint")
    assert family_for_model_dir(tmp_path, override="v3.2") == "v3.2"
    assert "; --chat-format;" in describe_family(tmp_path, override="v3.2")
    (tmp_path / "config.json").write_text("{oops")
    with pytest.raises(ChatFormatError, match="config.json: not valid JSON"):
        family_for_model_dir(tmp_path)
