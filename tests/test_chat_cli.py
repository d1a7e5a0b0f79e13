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
