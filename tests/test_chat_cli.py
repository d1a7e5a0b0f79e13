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


class _CtrlCAfter(io.StringIO):
    """A terminal that gets Ctrl-C (KeyboardInterrupt) during the n-th write of a reply."""

    def __init__(self, n: int):
        super().__init__()
        self.n, self.replying = n, False

    def write(self, text: str) -> int:
        if self.replying and text not in ("> ", "\n") and "[stopped]" not in text:
            self.n -= 1
            if self.n == 0:
                raise KeyboardInterrupt
        return super().write(text)


def test_ctrl_c_stops_the_reply_and_the_chat_goes_on():
    """Ctrl-C during a reply stops that reply (its request aborted: the cache is free again) and the chat
    takes the next message; it used to quit the whole chat. /help and an unknown /command answer with the
    commands instead of going to the model."""
    stdout = _CtrlCAfter(3)
    lines = iter(["/help\n", "/nope\n", "write a long story\n", "and then?\n", "/exit\n"])

    class Stdin:
        def readline(self) -> str:
            line = next(lines)
            stdout.replying = line == "write a long story\n"
            return line

    assert run_chat(None, max_tokens=200, temperature=0.0, stdin=Stdin(), stdout=stdout) == 0
    out = stdout.getvalue()
    assert out.count("commands: /think") == 3 and "unknown command /nope" in out  # (the banner, /help, /nope)
    assert out.count("[stopped]") == 1 and out.count("> ") == 5


def test_piped_reasoning_is_marked_off_from_the_answer():
    stdout = io.StringIO()  # not a terminal: no colours, so the reasoning goes between <think> and </think>
    assert (
        run_chat(
            None,
            thinking=True,
            max_tokens=8,
            temperature=0.0,
            stdin=io.StringIO("why?\n/exit\n"),
            stdout=stdout,
        )
        == 0
    )
    reply = stdout.getvalue().split("> ")[1]
    assert reply.startswith("<think>") and reply.count("<think>") == 1 and reply.count("</think>") == 1, reply
