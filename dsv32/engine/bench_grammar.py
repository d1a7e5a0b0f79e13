"""``dsv32 bench grammar``: what grammar-constrained decoding costs — decode tokens/s at batch 1 and 16 with
and without a JSON Schema constraint, in the same run on the same engine, and the compile time of large
schemas.

Free and constrained rounds alternate (so drift hits both); each round admits the batch, runs the prefill,
then times the decode steps only. The constrained requests follow a schema that cannot be complete within
the measured tokens (an array of at least 100 records of strings, integers, enums, booleans and a nested
object), so every step of every row is masked, across all kinds of grammar states. Results go to
``benchmarks/results/bench_grammar.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path
from typing import Any

import torch

RECORD = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 12},
        "count": {"type": "integer", "minimum": 0, "maximum": 100000},
        "kind": {"enum": ["alpha", "beta", "gamma", "delta"]},
        "ok": {"type": "boolean"},
        "where": {
            "type": "object",
            "properties": {
                "x": {"type": "number", "minimum": -1000, "maximum": 1000, "multipleOf": 0.01},
                "tags": {"type": "array", "items": {"type": "string", "maxLength": 8}, "maxItems": 3},
            },
            "required": ["x", "tags"],
            "additionalProperties": False,
        },
    },
    "required": ["name", "count", "kind", "ok", "where"],
    "additionalProperties": False,
}
BENCH_SCHEMA = {"type": "array", "items": RECORD, "minItems": 100}


def large_schema(n_props: int) -> dict[str, Any]:
    """An object of ``n_props`` properties cycling through strings, numbers, enums, arrays, nested objects."""
    kinds = [
        {"type": "string", "maxLength": 32},
        {"type": "integer", "minimum": 0, "maximum": 1000},
        {"type": "number"},
        {"type": "boolean"},
        {"enum": [f"v{j}" for j in range(12)]},
        {"type": "array", "items": {"type": "integer"}, "maxItems": 8},
        {"type": "string", "pattern": "^[a-z]{2,8}-[0-9]{1,4}$"},
        {"type": "object", "properties": {"a": {"type": "string"}, "b": {"type": ["number", "null"]}},
         "required": ["a"], "additionalProperties": False},
    ]  # fmt: skip
    props = {f"field_{i}": kinds[i % len(kinds)] for i in range(n_props)}
    return {
        "type": "object",
        "properties": props,
        "required": list(props)[::2],
        "additionalProperties": False,
    }


def _decode_round(core, batch: int, tokens: int, guided: dict | None, tag: str) -> dict[str, float]:
    from dsv32.engine.bench import step_to_first_tokens, timed_steps
    from dsv32.engine.sampling_params import SamplingParams

    prompt = list(range(1000, 1024))
    ids = [f"{tag}-{i}" for i in range(batch)]
    for i, rid in enumerate(ids):
        params = SamplingParams(max_tokens=tokens + 1, ignore_eos=True, seed=i, guided=guided)
        core.add_request(rid, [*prompt, 2000 + i], params)
    out = step_to_first_tokens(core, ids)
    before = sum(map(len, out.values()))
    steps, total = timed_steps(core, out)
    n = sum(map(len, out.values())) - before  # the tokens of the timed steps
    return {"tokens": n, "seconds": total, "tok_s": n / total, "ms_per_step": 1000 * statistics.median(steps)}


def _grammar_time(core) -> dict[str, float]:
    """Wrap the masker so a round also reports the time spent filling masks (llguidance) and applying them
    to the logits."""
    masker = core._masker
    spent = {"fill": 0.0, "apply": 0.0}

    def wrap(name: str, key: str) -> None:
        orig = getattr(type(masker), name)

        def timed(self, *a, **k):
            t = time.perf_counter()
            out = orig(self, *a, **k)
            spent[key] += time.perf_counter() - t
            return out

        setattr(masker, name, timed.__get__(masker))

    wrap("fill", "fill")
    wrap("apply_filled", "apply")
    return spent


def bench_grammar(
    out_dir: Path, model_dir: Path | None = None, tokens: int = 32, batches=(1, 16), repeats: int = 3
) -> dict:
    from dsv32.chat.tokenizer import load_tokenizer
    from dsv32.engine.core import EngineConfig, EngineCore
    from dsv32.engine.grammar import _grammar, check_guided, spec_key
    from dsv32.weights.default_model import ensure_default_model
    from dsv32.weights.loader import load_model

    model_dir = Path(model_dir) if model_dir is not None else ensure_default_model()
    model = load_model(model_dir, dtype=torch.float32, progress=False)
    tokenizer = load_tokenizer(model_dir)
    core = EngineCore(
        model, EngineConfig(num_blocks=2048, max_num_seqs=max(batches)), eos_id=tokenizer.eos_id
    )
    t = time.perf_counter()
    core.attach_tokenizer(tokenizer)
    tokenizer_s = time.perf_counter() - t
    spent = _grammar_time(core)

    # compile times of large schemas (cold: the grammar and the matcher caches do not hold them yet)
    vocab = core.model.config.vocab_size
    core._masker.apply(torch.zeros(1, vocab), [0], [core.grammar.new_state({"regex": "a"})])  # buffers
    compile_rows = []
    for n_props in (200, 1000):
        spec = {"json_schema": large_schema(n_props)}
        _grammar.cache_clear()
        t = time.perf_counter()
        check_guided(spec)
        t_grammar = time.perf_counter() - t
        core.grammar._templates.pop(spec_key(spec), None)
        t = time.perf_counter()
        state = core.grammar.new_state(spec)
        t_matcher = time.perf_counter() - t
        mask = torch.zeros(1, vocab)
        t = time.perf_counter()
        core._masker.apply(mask, [0], [state])
        t_first = time.perf_counter() - t
        t = time.perf_counter()
        core.grammar.new_state(spec)
        t_cached = time.perf_counter() - t
        compile_rows.append({
            "properties": n_props, "schema_bytes": len(json.dumps(spec["json_schema"])),
            "grammar_ms": 1000 * t_grammar, "matcher_ms": 1000 * t_matcher, "first_mask_ms": 1000 * t_first,
            "total_ms": 1000 * (t_grammar + t_matcher + t_first), "cached_request_ms": 1000 * t_cached,
        })  # fmt: skip
        print(f"  compile {n_props} properties: {compile_rows[-1]['total_ms']:.1f} ms", flush=True)
    guided = {"json_schema": BENCH_SCHEMA}
    _decode_round(core, 1, 2, None, "warm")  # warm-up
    _decode_round(core, 1, 2, guided, "warmg")
    rounds: dict[str, list[dict]] = {}
    for r in range(repeats):
        for batch in batches:
            for name, g in (("free", None), ("json_schema", guided)):
                spent.update(fill=0.0, apply=0.0)
                res = _decode_round(core, batch, tokens, g, f"r{r}-{batch}-{name}")
                res["fill_s"], res["apply_s"] = spent["fill"], spent["apply"]
                rounds.setdefault(f"{batch}/{name}", []).append(res)
                print(f"  round {r} batch {batch} {name}: {res['tok_s']:.1f} tok/s", flush=True)
    results = []
    for batch in batches:
        free = max(rounds[f"{batch}/free"], key=lambda x: x["tok_s"])
        cons = max(rounds[f"{batch}/json_schema"], key=lambda x: x["tok_s"])
        results.append({
            "batch": batch, "free_tok_s": free["tok_s"], "constrained_tok_s": cons["tok_s"],
            "free_ms_per_step": free["ms_per_step"], "constrained_ms_per_step": cons["ms_per_step"],
            "overhead_pct": 100 * (free["tok_s"] / cons["tok_s"] - 1),
            "fill_ms_per_step": 1000 * cons["fill_s"] / (steps := max(1, cons["tokens"] // batch)),
            "apply_ms_per_step": 1000 * cons["apply_s"] / steps,
            "mask_share_pct": 100 * 1000 * (cons["fill_s"] + cons["apply_s"]) / steps / free["ms_per_step"],
        })  # fmt: skip
    core.pool.assert_no_leaks()
    result = {
        "benchmark": "grammar",
        "date": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "machine": {"cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
                    "torch": torch.__version__},
        "library": _library_version(),
        "model": str(model_dir), "vocab_rows": core.model.config.vocab_size, "tokenizer_ids": tokenizer.vocab_size,
        "decode_tokens": tokens, "repeats": repeats, "tokenizer_setup_s": tokenizer_s,
        "load_average": list(os.getloadavg()),
        "decode": results, "compile": compile_rows,
        "constraint": "JSON Schema: array (minItems 100) of records (string, integer, enum, boolean, nested object)",
    }  # fmt: skip
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "bench_grammar.json").write_text(json.dumps(result, indent=1))
    (out_dir / "bench_grammar.md").write_text(_markdown(result))
    return result


def _library_version() -> str:
    import llguidance

    return llguidance.get_version() if hasattr(llguidance, "get_version") else "llguidance"


def _markdown(r: dict) -> str:
    lines = [
        f"# dsv32 bench grammar — {r['date']}",
        "",
        f"{r['library']}; model {Path(r['model']).name} ({r['vocab_rows']} vocabulary rows, tokenizer "
        f"{r['tokenizer_ids']} ids); {r['machine']['threads']} threads; torch {r['machine']['torch']}.",
        f"Decode {r['decode_tokens']} tokens per request after the prefill, best of {r['repeats']} "
        f"alternating rounds. Constraint: {r['constraint']}. Load average at the end: "
        f"{', '.join(f'{x:.1f}' for x in r['load_average'])} (the overhead in tok/s moves with the machine's load; "
        "the mask times per step are the grammar's own cost).",
        "",
        "| batch | free tok/s | constrained tok/s | overhead | step free / constrained (ms, median) | "
        "mask fill + apply per step (share of a free step) |",
        "|---|---|---|---|---|---|",
    ]
    for x in r["decode"]:
        lines.append(
            f"| {x['batch']} | {x['free_tok_s']:.1f} | {x['constrained_tok_s']:.1f} | {x['overhead_pct']:+.1f}% "
            f"| {x['free_ms_per_step']:.1f} / {x['constrained_ms_per_step']:.1f} "
            f"| {x['fill_ms_per_step']:.2f} + {x['apply_ms_per_step']:.2f} ms ({x['mask_share_pct']:.1f}%) |"
        )
    lines += [
        "",
        f"Tokenizer set-up (once per tokenizer, at engine start): {r['tokenizer_setup_s']:.2f} s.",
        "",
        "| large schema | size | grammar | matcher | first mask | total | next request (cached) |",
        "|---|---|---|---|---|---|",
    ]
    for c in r["compile"]:
        lines.append(
            f"| {c['properties']} properties | {c['schema_bytes'] / 1024:.1f} KiB | {c['grammar_ms']:.1f} ms | "
            f"{c['matcher_ms']:.1f} ms | {c['first_mask_ms']:.1f} ms | **{c['total_ms']:.1f} ms** | "
            f"{c['cached_request_ms']:.2f} ms |"
        )
    lines.append("")
    return "\n".join(lines)


def main_bench_grammar(args: argparse.Namespace) -> int:
    from dsv32.engine.bench import positive_ints

    batches = positive_ints(str(args.batches))
    bench_grammar(Path(args.out), args.model, tokens=args.tokens, batches=batches, repeats=args.repeats)
    print((Path(args.out) / "bench_grammar.md").read_text())
    return 0
