"""``dsv32 bench chat`` runs end to end on a small conversation and writes its two result files."""

from __future__ import annotations

import json
from pathlib import Path

from dsv32.chat.bench import bench_chat, build_conversation


def test_bench_chat_small(tmp_path: Path) -> None:
    r = bench_chat(3000, tmp_path, repeats=1)
    assert set(r["results"]) == {"v3.2 thinking", "v3.2", "v3.1", "v3"}
    v32 = r["results"]["v3.2 thinking"]
    assert v32["tokens"] >= 3000 and v32["same_ids_as_text_encoding"] and v32["tokens_per_s"] > 0
    assert json.loads((tmp_path / "bench_chat.json").read_text())["benchmark"] == "chat"
    assert "| v3.2 thinking |" in (tmp_path / "bench_chat.md").read_text()
    assert build_conversation(3000) == build_conversation(3000)  # deterministic
