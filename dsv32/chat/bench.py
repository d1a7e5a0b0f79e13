"""``dsv32 bench chat``: time to turn a ~100K-token conversation into prompt ids, per chat format.

The conversation is a long agent session (English and Chinese turns, tool calls with JSON arguments, tool
results, a final tool loop with reasoning). Two things are timed on the same prompt: ``encode_prompt``
(checking, rendering, injection-safe encoding) and, for scale, the tokenizer encoding the rendered text in one
call. Results go to ``benchmarks/results/bench_chat.{json,md}``; best of several repeats.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from dsv32.chat.render import encode_prompt, render_prompt
from dsv32.chat.tokenizer import Tokenizer, load_tokenizer

WORDS = (
    "the model reads a long prompt and answers with care while tools return data about weather cities dates "
    "prices files code tests results errors logs users requests tokens cache latency throughput memory"
).split()
HANZI = "杭州明天多云气温下降请检查日志文件并给出结论模型推理缓存命中率用户请求工具调用结果"
TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "search",
            "description": "Search the web",
            "parameters": {
                "type": "object",
                "properties": {"query": {"type": "string"}, "k": {"type": "integer"}},
            },
        },
    },
    {
        "type": "function",
        "function": {
            "name": "read_file",
            "description": "读取文件",
            "parameters": {"type": "object", "properties": {"path": {"type": "string"}}},
        },
    },
]


def _text(rng: random.Random, n_words: int) -> str:
    parts = []
    for _ in range(n_words):
        if rng.random() < 0.2:
            parts.append("".join(rng.choice(HANZI) for _ in range(rng.randint(2, 6))))
        else:
            parts.append(rng.choice(WORDS))
    return " ".join(parts) + "."


def _turn(rng: random.Random, k: int) -> list[dict[str, Any]]:
    args = json.dumps({"query": _text(rng, 8), "k": rng.randint(1, 9)}, ensure_ascii=False)
    call = {"id": f"call_{k}", "type": "function", "function": {"name": "search", "arguments": args}}
    return [
        {"role": "user", "content": _text(rng, 120)},
        {
            "role": "assistant",
            "content": _text(rng, 20),
            "reasoning_content": _text(rng, 60),
            "tool_calls": [call],
        },
        {
            "role": "tool",
            "tool_call_id": f"call_{k}",
            "content": json.dumps({"hits": [_text(rng, 30) for _ in range(4)]}),
        },
        {"role": "assistant", "content": _text(rng, 150), "reasoning_content": _text(rng, 60)},
    ]


def build_conversation(target_tokens: int, seed: int = 0) -> list[dict[str, Any]]:
    """A deterministic conversation whose V3.2 prompt has at least ``target_tokens`` tokens."""
    rng = random.Random(seed)
    tok = load_tokenizer()
    messages: list[dict[str, Any]] = [{"role": "system", "content": "You are a careful research assistant."}]
    per_turn = len(encode_prompt([*messages, *_turn(random.Random(seed), 0)], tools=TOOLS, tokenizer=tok))
    while True:
        for _ in range(max(1, (target_tokens - _count(messages, tok)) // per_turn)):
            messages += _turn(rng, len(messages))
        messages.append({"role": "user", "content": _text(rng, 40)})
        if _count(messages, tok) >= target_tokens:
            return messages
        messages.pop()


def _count(messages: list[dict[str, Any]], tok: Tokenizer) -> int:
    if messages[-1]["role"] != "user":
        messages = [*messages, {"role": "user", "content": "?"}]
    return len(encode_prompt(messages, tools=TOOLS, tokenizer=tok))


def _best(fn: Callable[[], Any], repeats: int) -> tuple[Any, float]:
    times, out = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return out, min(times)


def bench_chat(target_tokens: int, out_dir: Path, repeats: int = 5) -> dict[str, Any]:
    tok = load_tokenizer()
    messages = build_conversation(target_tokens)
    rows = {}
    for family, thinking in (("v3.2", True), ("v3.2", False), ("v3.1", False), ("v3", False)):
        kw = {"tools": TOOLS, "thinking": thinking, "family": family}
        ids, t_encode = _best(lambda kw=kw: encode_prompt(messages, tokenizer=tok, **kw), repeats)
        text, t_render = _best(lambda kw=kw: render_prompt(messages, **kw), repeats)
        plain, t_text = _best(lambda text=text: tok.encode(text, allow_special=True), repeats)
        rows[f"{family}{' thinking' if thinking else ''}"] = {
            "tokens": len(ids),
            "chars": len(text),
            "encode_prompt_s": t_encode,
            "tokens_per_s": len(ids) / t_encode,
            "render_prompt_s": t_render,
            "tokenizer_encode_text_s": t_text,
            "same_ids_as_text_encoding": ids == plain,
        }
        print(
            f"  {family:5} thinking={thinking!s:5}: {len(ids)} tokens, encode_prompt {t_encode * 1000:.1f} ms"
        )
    result = {
        "benchmark": "chat",
        "date": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "machine": {"cpu": platform.processor() or platform.machine(), "cpus": os.cpu_count()},
        "messages": len(messages),
        "repeats": repeats,
        "results": rows,
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "bench_chat.json").write_text(json.dumps(result, indent=1))
    (out_dir / "bench_chat.md").write_text(_markdown(result))
    return result


def _markdown(r: dict[str, Any]) -> str:
    lines = [
        f"# dsv32 bench chat — {r['date']}",
        "",
        f"One {r['messages']}-message agent conversation (tools, tool results, Chinese and English), "
        f"best of {r['repeats']}; {r['machine']['cpus']} CPUs.",
        "`encode_prompt` = check + render + injection-safe encoding; the last columns encode the rendered text",
        "in one tokenizer call (control-token matching on), for scale.",
        "",
        "| format | tokens | encode_prompt ms | tokens/s | render_prompt ms | tokenizer on text ms | same ids |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, x in r["results"].items():
        lines.append(
            f"| {name} | {x['tokens']} | {x['encode_prompt_s'] * 1000:.1f} | {x['tokens_per_s']:,.0f} | "
            f"{x['render_prompt_s'] * 1000:.1f} | {x['tokenizer_encode_text_s'] * 1000:.1f} | "
            f"{x['same_ids_as_text_encoding']} |"
        )
    return "\n".join(lines) + "\n"


def main_bench_chat(args: argparse.Namespace) -> int:
    """Entry point of ``dsv32 bench chat``."""
    r = bench_chat(getattr(args, "tokens", 100_000), Path(getattr(args, "out", "benchmarks/results")))
    print(_markdown(r))
    return 0
