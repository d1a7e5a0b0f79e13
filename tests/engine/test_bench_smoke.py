"""``dsv32 bench engine`` in its quickest mode on the tiny preset: every part runs and the files appear.

No timing asserts: this checks the plumbing (engine, HF baseline, prefix cache, DSA toggle, outputs).
"""

from __future__ import annotations

import importlib.util
import json

import pytest

pytest.importorskip("transformers")


def test_bench_engine_quick_writes_results(tmp_path):
    from dsv32.engine.bench import PARTS, Settings, bench_engine
    from dsv32.presets import resolve_preset

    r = bench_engine(resolve_preset("tiny"), tmp_path, Settings.quick_run())
    data = json.loads((tmp_path / "bench_engine.json").read_text())
    md = (tmp_path / "bench_engine.md").read_text()
    assert data["benchmark"] == "engine"
    for key in ("decode", "prefill", "concurrency", "prefix", "dsa", "targets", "machine", "settings"):
        assert key in data, key
    assert set(data["settings"]["parts"]) == set(PARTS)
    assert {"engine_tok_s", "hf_tok_s", "ratio", "same_greedy_tokens"} <= set(data["decode"])
    assert data["decode"]["same_greedy_tokens"] is True  # fp32 greedy: engine and HF agree
    # the step's packed matmuls, replayed alone: lm_head and more, never more than the step's weights
    sb, b = data["decode"]["step_breakdown"], data["bandwidth"]
    assert b["lm_head_bytes"] < sb["matmul_weight_bytes"] <= b["batch1_weight_bytes"]
    assert sb["packed_matmuls"] > 1 and sb["rest_ms"] == pytest.approx(sb["step_ms"] - sb["matmuls_alone_ms"])
    assert "Where a batch-1 decode step's time goes" in md
    assert {"engine_ttft_s", "hf_ttft_s", "ratio"} <= set(data["prefill"])
    assert [x["concurrency"] for x in data["concurrency"]["rows"]] == [1, 4, 16]
    assert all("ratio_to_hf_batch1" in x for x in data["concurrency"]["rows"])
    assert data["concurrency"]["decode_step_compiled"] is False and "Eager steps (`--enforce-eager`" in md
    p = data["prefix"]
    assert p["cold_cached_tokens"] == 0 and p["cached_tokens"] >= p["prompt_tokens"] - 16
    b = p["burst"]  # the copies' shared prefill ran once: each other copy computed under a block
    assert b["prompt_tokens"] <= b["prompt_tokens_computed"] < b["prompt_tokens"] + b["copies"] * 16
    assert "submitted together" in md
    rows = data["dsa"]["rows"]
    assert len(rows) == 2 and all(x["context"] > data["dsa"]["variant"]["index_topk"] for x in rows)
    assert rows[1]["prefill_cached_tokens"] > 0  # the longer context reused the shorter one
    for x in rows:
        assert {"dsa_step_ms", "dense_step_ms", "predicted_ratio", "fraction_of_predicted"} <= set(x)
    assert len(data["targets"]) == 4 + len(rows)
    assert all(t["met"] in (True, False) for t in data["targets"])
    assert "Targets (issue 5)" in md and "≥ 60×" in md
    if importlib.util.find_spec("matplotlib") is not None:
        assert (tmp_path / "bench_engine.png").stat().st_size > 0
    else:
        assert "PNG skipped" in r["plot"]


def test_bench_spec_writes_results(tmp_path):
    from dsv32.engine.bench_spec import bench_spec
    from dsv32.presets import resolve_preset

    r = bench_spec(resolve_preset("tiny"), tmp_path, batches=(1, 4), tokens=4, repeats=1)
    data = json.loads((tmp_path / "bench_spec.json").read_text())
    assert data["benchmark"] == "spec" and [x["batch"] for x in data["rows"]] == [1, 4]
    for x in data["rows"]:
        assert x["same_greedy_tokens"] is True  # the drafts never change the greedy tokens
        assert (
            x["mtp_pass_ms_per_step"] > 0 and x["spec_ms_per_step"] > 0
        )  # (no timing order: a loaded machine)
        b = x["break_even_acceptance"]  # one draft: the tokens a step gives (1 + a) pay for its cost
        assert b is None or b == pytest.approx(x["step_cost_ratio"] - 1, abs=1e-9)
        assert [p["acceptance"] for p in x["projected"]] == [0.85, 0.9]
    assert "break-even acceptance" in (tmp_path / "bench_spec.md").read_text() and r["rows"] == data["rows"]


@pytest.mark.slow
def test_bench_engine_compile_measures_the_compiled_prefill_and_dsa_steps(tmp_path):
    """``--compile`` with the prefill, concurrency and DSA parts: an engine whose prefill is compiled around
    its attention is timed beside the eager one, with the same first token; aggregate decode runs on the
    compiled engine; the DSA part measures its contexts again with the compiled decode step; each gets its own
    target rows."""
    from dataclasses import replace

    from dsv32.engine.bench import Settings, bench_engine
    from dsv32.presets import resolve_preset

    s = replace(Settings.quick_run(), parts=("prefill", "concurrency", "dsa"), compile_decode=True, repeats=2)
    bench_engine(resolve_preset("tiny"), tmp_path, s)
    data = json.loads((tmp_path / "bench_engine.json").read_text())
    c = data["prefill"]["compiled"]
    assert c["same_first_token_as_eager"] is True and c["engine_start_s"] > 0
    assert c["ratio"] == pytest.approx(data["prefill"]["hf_ttft_s"] / c["engine_ttft_s"])
    assert c["vs_eager"] == pytest.approx(data["prefill"]["engine_ttft_s"] / c["engine_ttft_s"])
    md = (tmp_path / "bench_engine.md").read_text()
    assert "compiled around attention (`--compile`)" in md and "The compiled prefill is" in md
    d = data["dsa"]
    assert [x["context"] for x in d["rows_compiled"]] == [x["context"] for x in d["rows"]]
    assert all(x["dsa_step_ms"] > 0 and x["fraction_of_predicted"] > 0 for x in d["rows_compiled"])
    names = [t["name"] for t in data["targets"]]
    assert sum("compiled (`--compile`)" in n for n in names) == len(d["rows"])
    assert "The same with the compiled decode step" in md
    # aggregate decode on the engine serve runs by default: its one-request step compiled
    assert data["concurrency"]["decode_step_compiled"] is True and "`serve` runs by default" in md
