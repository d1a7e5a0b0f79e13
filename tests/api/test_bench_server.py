"""Smoke run of `dsv32 bench server` (no timing asserts: it must run and write its results)."""

from __future__ import annotations

import json

from dsv32.api.bench import bench_server


def test_bench_server_writes_results(tmp_path):
    r = bench_server(tmp_path, streams=2, tokens=4, rounds=1)
    saved = json.loads((tmp_path / "bench_server.json").read_text())
    assert saved["streams"] == 2 and saved["tokens_per_stream"] == 4
    assert r["engine_only_s"] > 0 and r["raw_http_s"] > 0 and r["http_s"] > 0
    assert "overhead" in (tmp_path / "bench_server.md").read_text()
