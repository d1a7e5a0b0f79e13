"""The tokenizer wrapper: DeepSeek ids, plain-text encoding of control strings, model-dir precedence."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import models, pre_tokenizers

from dsv32.chat.tokenizer import Tokenizer, default_tokenizer_dir, default_tokenizer_json, load_tokenizer
from tests.chat.corpus import MODEL_CARD_IDS, MODEL_CARD_TEXT

BOS, EOS = "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>"


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return load_tokenizer()


def test_default_tokenizer_ids(tok: Tokenizer) -> None:
    assert tok.path == default_tokenizer_dir() / "tokenizer.json"
    assert tok.vocab_size == 128815  # ids 0-128814 (V3.2); the model pads its embedding to 129,280 rows
    assert (tok.bos_id, tok.eos_id) == (0, 1)
    assert tok.token_id(BOS) == 0 and tok.token_id(EOS) == 1
    assert tok.token_id("<｜User｜>") == 128803 and tok.token_id("<｜Assistant｜>") == 128804
    assert tok.token_id("<think>") == 128798 and tok.token_id("</think>") == 128799
    assert tok.token_id("<｜tool▁sep｜>") == 128814 and tok.token_id("<｜fim▁hole｜>") == 128800
    with pytest.raises(KeyError, match="not in the vocabulary"):
        tok.token_id("<｜no▁such▁token｜>")


def test_encode_decode_round_trip(tok: Tokenizer) -> None:
    for text in ["Hello world", "  spaces\tand\nnewlines\n\n", "中文 和 日本語 ✓ 🙂", "x=1+2; print(x)"]:
        ids = tok.encode(text)
        assert ids and all(0 <= i < tok.vocab_size for i in ids)
        assert tok.decode(ids) == text
    assert tok.encode("Hello", add_bos=True) == [0, *tok.encode("Hello")]
    assert tok.encode("") == [] and tok.encode("", add_bos=True) == [0]


def test_user_text_never_becomes_control_tokens(tok: Tokenizer) -> None:
    text = f"hi {EOS} {BOS} <｜User｜>x<｜Assistant｜> <think>y</think> <|EOT|>"
    ids = tok.encode(text)
    control = {0, 1, 2, *range(128000, tok.vocab_size)}
    assert not control & set(ids)
    assert 1 not in tok.encode(EOS)
    assert tok.decode(ids) == text
    # trusted template text may opt in to matching control tokens
    assert tok.encode(f"{BOS}<｜User｜>hi", allow_special=True)[:2] == [0, 128803]
    assert 1 in tok.encode(f"x{EOS}", allow_special=True)


def test_lone_surrogates_are_a_clear_value_error(tok: Tokenizer) -> None:
    # JSON's "\\ud800" escape decodes to a lone surrogate, which no UTF-8 text holds
    with pytest.raises(
        ValueError, match=r"text 0 is not valid Unicode: lone surrogate U\+D800 at character 1"
    ):
        tok.encode("a\ud800b")
    with pytest.raises(
        ValueError, match=r"text 1 is not valid Unicode: lone surrogate U\+DC00 at character 0"
    ):
        tok.encode_plain_batch(["fine", "\udc00"])
    assert tok.decode(tok.encode("a\U0001f600b")) == "a\U0001f600b"  # a real pair (one astral char) is fine


def test_encode_lets_other_threads_run(tok: Tokenizer) -> None:
    """A long encode must not hold the GIL (a server's event loop would stall for its whole duration)."""
    import threading
    import time

    text = "The quick brown fox jumps over the lazy dog. " * 100_000  # 4.5 MB
    t = threading.Thread(target=tok.encode, args=(text,))
    ticks, t0 = 0, time.perf_counter()
    t.start()
    while t.is_alive():
        ticks += 1
        time.sleep(0.005)
    took = time.perf_counter() - t0
    assert took > 0.2, took  # long enough for the check to mean something
    assert ticks >= 10, (ticks, took)  # the main thread kept running (holding the GIL: 1-2 ticks)


def test_v32_model_card_token_ids(tok: Tokenizer) -> None:
    # chat-format.md §6: the V3.2 README example, encoded with control-token matching
    assert tok.encode(MODEL_CARD_TEXT, allow_special=True) == MODEL_CARD_IDS
    assert tok.encode("<｜DSML｜function_calls>") == [30, 28217, 10525, 7398, 28217, 8701, 4941, 12548, 32]


def test_packaged_file_brought_to_v32_layout(tok: Tokenizer) -> None:
    layout = json.loads(default_tokenizer_json())
    added = {t["id"]: t for t in layout["added_tokens"]}
    assert max(added) == 128814 and len(added) == 818  # ids 0-2 and 128000-128814
    assert (added[128798]["content"], added[128799]["content"]) == ("<think>", "</think>")
    assert added[128805]["special"] and added[0]["special"] and not added[128803]["special"]
    assert tok.special_ids == {t["id"] for t in layout["added_tokens"] if t["special"]}
    assert tok.added_tokens["<｜tool▁outputs▁end｜>"] == 128811


def test_split_special_and_token_bytes(tok: Tokenizer) -> None:
    assert tok.split_special("a<think>b</think><｜User｜>") == ["a", 128798, "b", 128799, 128803]
    assert tok.split_special("plain <｜DSML｜ text") == ["plain <｜DSML｜ text"]
    ids = tok.encode("中文 🙂")
    assert b"".join(tok.token_bytes(i) for i in ids) == "中文 🙂".encode()
    assert tok.token_bytes(1) == EOS.encode()
    assert tok.encode_plain_batch(["a b", "", "<think>"]) == [tok.encode("a b"), [], tok.encode("<think>")]


def test_decode_skip_special_tokens(tok: Tokenizer) -> None:
    ids = [0, *tok.encode("Hello"), 1]
    assert tok.decode(ids) == f"{BOS}Hello{EOS}"
    assert tok.decode(ids, skip_special_tokens=True) == "Hello"


def _write_word_tokenizer(d: Path, bos: str = "<s>", eos: str = "</s>") -> None:
    vocab = {"[UNK]": 0, bos: 1, eos: 2, "hello": 3, "world": 4}
    t = HFTokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    t.pre_tokenizer = pre_tokenizers.Whitespace()
    t.add_special_tokens([bos, eos])
    t.save(str(d / "tokenizer.json"))


def test_model_dir_tokenizer_takes_precedence(tmp_path: Path) -> None:
    _write_word_tokenizer(tmp_path, bos="<s>", eos="</s>")
    (tmp_path / "tokenizer_config.json").write_text(
        json.dumps({"bos_token": {"content": "<s>"}, "eos_token": "</s>"})
    )
    tok = load_tokenizer(tmp_path)
    assert tok.path == tmp_path / "tokenizer.json"
    assert (tok.bos_id, tok.eos_id, tok.vocab_size) == (1, 2, 5)
    assert tok.encode("hello world", add_bos=True) == [1, 3, 4]
    assert tok.encode("hello </s>") == [3, 0, 0, 0]  # "</s>" is plain text: unknown word pieces


def test_model_dir_without_tokenizer_uses_packaged_one(tmp_path: Path) -> None:
    assert load_tokenizer(tmp_path).path == default_tokenizer_dir() / "tokenizer.json"


def test_bad_tokenizer_files(tmp_path: Path) -> None:
    (tmp_path / "tokenizer.json").write_text("{broken")
    with pytest.raises(ValueError, match="cannot load tokenizer"):
        load_tokenizer(tmp_path)
    _write_word_tokenizer(tmp_path)
    with pytest.raises(ValueError, match="not in the vocabulary"):  # default BOS name is not in it
        load_tokenizer(tmp_path)


def test_no_torch_import() -> None:
    code = "import sys, dsv32.chat; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).resolve().parents[2])
