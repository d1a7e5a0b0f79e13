"""``dsv32 chat``: an interactive terminal chat on a local model, streamed.

Reasoning is shown dimmed (between ``<think>`` and ``</think>`` where the output is not a terminal), tool
calls in cyan; ``/think`` toggles thinking mode, ``/reset`` starts a new conversation, ``/help`` lists the
commands, ``/exit`` (or Ctrl-D) quits. Ctrl-C stops a reply (what came of it stays in the conversation); at the
prompt it quits. The conversation is rendered with the model's chat format and run through the same engine as
the server.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path
from typing import TextIO

DIM, CYAN, RESET = "\033[2m", "\033[36m", "\033[0m"
HELP = "commands: /think (toggle thinking), /reset (new conversation), /help, /exit; Ctrl-C stops a reply"
COMMAND = re.compile(r"/\w+")  # a line that is one word after a slash is a command, not a message


def run_chat(
    model_dir: Path | None,
    *,
    thinking: bool = False,
    max_tokens: int = 512,
    temperature: float = 0.7,
    cache_memory_gb: float = 1.0,
    num_speculative_tokens: int = 0,
    stdin: TextIO = sys.stdin,
    stdout: TextIO = sys.stdout,
) -> int:
    import torch

    from dsv32.chat import StreamParser, encode_prompt, family_for_model_dir, load_tokenizer
    from dsv32.engine.core import EngineConfig, EngineCore
    from dsv32.engine.outputs import OutputProcessor
    from dsv32.engine.sampling_params import SamplingParams
    from dsv32.weights.default_model import model_dir_or_default
    from dsv32.weights.loader import load_model

    model_dir = model_dir_or_default(model_dir)
    model = load_model(model_dir, dtype=torch.float32, progress=False)
    tokenizer = load_tokenizer(model_dir)
    family = family_for_model_dir(model_dir)
    config = EngineConfig(cache_memory_gb=cache_memory_gb, num_speculative_tokens=num_speculative_tokens)
    engine = EngineCore(model, config, eos_id=tokenizer.eos_id)
    limit = min(engine.max_model_len, engine.capacity_tokens)  # prompt + reply, in tokens
    color = stdout.isatty()

    def paint(text: str, code: str) -> str:
        return f"{code}{text}{RESET}" if color else text

    messages: list[dict] = []
    stdout.write(f"dsv32 chat ({family}, thinking {'on' if thinking else 'off'}). {HELP}\n")
    turn = 0
    while True:
        stdout.write("> ")
        stdout.flush()
        line = stdin.readline()
        if not line:
            stdout.write("\n")
            return 0
        text = line.strip()
        if not text:
            continue
        if text in ("/exit", "/quit"):
            return 0
        if text == "/think":
            thinking = not thinking
            stdout.write(f"thinking {'on' if thinking else 'off'}\n")
            continue
        if text == "/reset":
            messages = []
            stdout.write("new conversation\n")
            continue
        if COMMAND.fullmatch(text):
            stdout.write(("" if text == "/help" else f"unknown command {text}; ") + HELP + "\n")
            continue
        messages.append({"role": "user", "content": text})
        ids = encode_prompt(messages, thinking=thinking, family=family, tokenizer=tokenizer)
        if len(ids) >= limit:
            messages.pop()
            stdout.write(
                f"[the conversation would be {len(ids)} tokens, and at most {limit} fit in the context and "
                "cache with room for a reply: /reset starts a new one]\n"
            )
            continue
        params = SamplingParams(max_tokens=min(max_tokens, limit - len(ids)), temperature=temperature)
        rid = f"chat-{turn}"
        turn += 1
        engine.add_request(rid, ids, params)
        processor = OutputProcessor(tokenizer)
        processor.add(rid, params)
        parser = StreamParser(thinking=thinking, family=family)
        thinking_shown = False  # inside a <think> block written to a stream that is not a terminal
        try:
            while engine.has_work():
                for out in processor.process(engine, engine.step()):
                    deltas = parser.feed(out.text) + (parser.finish() if out.finished else [])
                    for d in deltas:
                        if (
                            not color
                            and bool(d.reasoning_content) != thinking_shown
                            and (d.reasoning_content or d.content or d.tool_call)
                        ):
                            stdout.write("</think>\n" if thinking_shown else "<think>")
                            thinking_shown = not thinking_shown
                        if d.reasoning_content:
                            stdout.write(paint(d.reasoning_content, DIM))
                        elif d.content:
                            stdout.write(d.content)
                        elif d.tool_call and "id" in d.tool_call:
                            stdout.write(paint(f"\n[tool call {d.tool_call['function']['name']}] ", CYAN))
                        elif d.tool_call:
                            stdout.write(paint(d.tool_call["function"].get("arguments", ""), CYAN))
                    stdout.flush()
        except KeyboardInterrupt:  # Ctrl-C: this reply stops, the chat goes on
            engine.abort(rid)
            processor.remove(rid)
            parser.finish()
            stopped = True
        else:
            stopped = False
        stdout.write(("</think>" if thinking_shown else "") + ("\n[stopped]" if stopped else "") + "\n")
        msg = parser.result()
        if not (msg["content"] or msg["tool_calls"]):  # nothing came of it (stopped early, or only reasoning)
            messages.pop()
            continue
        reply = {"role": "assistant", "content": msg["content"]}
        if msg["tool_calls"]:
            reply["tool_calls"] = msg["tool_calls"]
        messages.append(reply)
