"""`dsv32 chat` on the embedded default model, driven through its stdin/stdout."""

from __future__ import annotations

import io

from dsv32.chat_cli import run_chat


def test_chat_session_streams_toggles_thinking_and_exits():
    stdin = io.StringIO("hello\n/think\nwhy?\n/reset\n/exit\n")
    stdout = io.StringIO()
    assert run_chat(None, max_tokens=4, temperature=0.0, stdin=stdin, stdout=stdout) == 0
    out = stdout.getvalue()
    assert "thinking off" in out and "thinking on" in out and "new conversation" in out
    assert out.count("> ") >= 5  # a prompt before each input line


def test_chat_ends_on_eof():
    assert run_chat(None, max_tokens=2, stdin=io.StringIO(""), stdout=io.StringIO()) == 0


def test_a_conversation_past_the_cache_is_refused_not_crashed():
    """A cache of one block (16 tokens): a short turn is answered within what is left, a long one is refused
    with a message (the conversation stays as it was), and the session goes on."""
    stdin = io.StringIO("hi\n" + "word " * 40 + "\n/reset\nhi\n/exit\n")
    stdout = io.StringIO()
    assert (
        run_chat(None, max_tokens=50, temperature=0.0, cache_memory_gb=1e-9, stdin=stdin, stdout=stdout) == 0
    )
    out = stdout.getvalue()
    assert out.count("at most 16 fit") == 1, out
    assert "new conversation" in out and out.count("> ") == 5


def test_chat_with_speculative_decoding_says_what_plain_chat_says():
    def session(k: int) -> str:
        stdout = io.StringIO()
        stdin = io.StringIO("hello\nand then?\n/exit\n")
        assert (
            run_chat(
                None, max_tokens=6, temperature=0.0, num_speculative_tokens=k, stdin=stdin, stdout=stdout
            )
            == 0
        )
        return stdout.getvalue()

    assert session(2) == session(0)
