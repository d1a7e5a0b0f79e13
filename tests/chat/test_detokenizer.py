"""The incremental detokenizer never shows half a character and adds up to a full decode."""

from __future__ import annotations

import random
from pathlib import Path

from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers

from dsv32.chat import IncrementalDetokenizer, StreamParser, load_tokenizer
from dsv32.chat.tokenizer import Tokenizer

TOK = load_tokenizer()
TEXTS = [
    "杭州明天多云，气温7~13°C。生僻字：龘靐齉爩",
    "emoji 🙂👍🏽👨‍👩‍👧 and flags 🇨🇳🇫🇷",
    "mixed: naïve café ∑ 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 — 日本語のテキスト",
]


def test_pieces_are_whole_characters() -> None:
    for text in TEXTS:
        ids = TOK.encode(text)
        assert any(
            len(TOK.decode([i])) and "\ufffd" in TOK.decode([i]) for i in ids
        )  # tokens split characters
        detok = IncrementalDetokenizer(TOK)
        pieces = [detok.add(i) for i in ids] + [detok.flush()]
        assert "".join(pieces) == text and not any("\ufffd" in p for p in pieces)


def test_random_batches_and_control_tokens() -> None:
    rng = random.Random(0)
    ids = [0, *TOK.encode(TEXTS[1]), 129000, 128798, *TOK.encode("思考"), 128799, *TOK.encode(TEXTS[0]), 1]
    for skip in (True, False):
        full = TOK.decode(ids, skip_special_tokens=skip)
        for _ in range(50):
            detok, out, i = IncrementalDetokenizer(TOK, skip_special_tokens=skip), [], 0
            while i < len(ids):
                n = rng.randint(1, 4)
                out.append(detok.add(ids[i : i + n]))
                i += n
            assert "".join(out) + detok.flush() == full
    assert "<think>" in TOK.decode(ids, skip_special_tokens=True)  # think tags are not "special"


def test_invalid_bytes_at_the_end_become_replacement() -> None:
    half = [i for i in TOK.encode("🙂") if "\ufffd" in TOK.decode([i])][:1]
    detok = IncrementalDetokenizer(TOK)
    assert detok.add(half) == "" and detok.flush() == "\ufffd"


def test_detokenizer_feeds_the_stream_parser() -> None:
    text = "想一想🙂</think>答案是 42。"
    ids = TOK.encode(text, allow_special=True)
    detok, parser, deltas = IncrementalDetokenizer(TOK), StreamParser(thinking=True), []
    for i in ids:
        deltas += parser.feed(detok.add(i))
    deltas += parser.feed(detok.flush()) + parser.finish()
    assert "".join(d.reasoning_content or "" for d in deltas) == "想一想🙂"
    assert "".join(d.content or "" for d in deltas) == "答案是 42。"


def test_fallback_for_non_byte_level_tokenizers(tmp_path: Path) -> None:
    vocab = {"[UNK]": 0, "<s>": 1, "</s>": 2, "hello": 3, "world": 4, "中": 5}
    t = HFTokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    t.pre_tokenizer = pre_tokenizers.Whitespace()
    t.decoder = decoders.WordPiece()
    t.add_special_tokens(["<s>", "</s>"])
    t.save(str(tmp_path / "tokenizer.json"))
    tok = Tokenizer(tmp_path / "tokenizer.json", bos_token="<s>", eos_token="</s>")
    assert not tok.byte_level
    ids = [1, 3, 4, 5, 3] * 4 + [2]
    detok = IncrementalDetokenizer(tok)
    assert "".join(detok.add(i) for i in ids) + detok.flush() == tok.decode(ids, skip_special_tokens=True)
