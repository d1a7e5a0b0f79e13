"""``dsv32 bench spec``: what a speculative decoding step with the MTP layer costs, against a plain decode
step measured in the same run on the same weights, and the acceptance rate at which it pays.

The model is the benchmark config with one MTP layer added (``num_nextn_predict_layers`` 1), random
weights, so the drafts are noise and nearly all rejected: a step's cost does not depend on whether its draft
is accepted (the verified positions are computed either way), so what is measured is the cost, and the
tokens per second at an acceptance rate ``a`` follow as ``batch * (1 + a + ... + a^k) / step time`` for k
drafts a step (exactly for k = 1). The benchmark prints that at the acceptance DeepSeek reports for its MTP
module (85-90 %), and the break-even rate (where those tokens pay for the step's cost against a plain
step). Plain and speculative rounds alternate (so drift hits both);
each round admits the batch, runs the prefill, then times the decode steps only; both engines must produce
the same greedy tokens. Results go to ``benchmarks/results/bench_spec.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch

REPORTED_ACCEPTANCE = (
    0.85,
    0.90,
)  # DeepSeek-V3 report: acceptance of the second token (spec/architecture.md)


def _round(core, batch: int, tokens: int, prompts: list[list[int]], tag: str) -> dict:
    """Admit ``batch`` greedy requests, step through their prefill, then time the decode steps."""
    from dsv32.engine.bench import step_to_first_tokens, timed_steps
    from dsv32.engine.sampling_params import SamplingParams

    ids = [f"{tag}-{i}" for i in range(batch)]
    for rid, prompt in zip(ids, prompts, strict=True):
        core.add_request(rid, prompt, SamplingParams(temperature=0.0, max_tokens=tokens + 1, ignore_eos=True))
    out = step_to_first_tokens(core, ids)
    drafted, accepted = core.num_draft_tokens, core.num_accepted_tokens
    spent = _time_drafts(core)
    before = sum(map(len, out.values()))
    steps, total = timed_steps(core, out)
    n = sum(map(len, out.values())) - before  # the tokens of the timed steps
    spent.pop("restore")()
    return {
        "tokens": n, "seconds": total, "tok_s": n / total, "steps": len(steps),
        "ms_per_step": 1000 * statistics.median(steps), "mtp_pass_ms": 1000 * spent["s"] / max(1, len(steps)),
        "drafted": core.num_draft_tokens - drafted, "accepted": core.num_accepted_tokens - accepted,
        "outputs": [out[rid] for rid in ids],
    }  # fmt: skip


def _time_drafts(core) -> dict:
    """Time the runner's MTP passes (``ModelRunner.draft`` and ``draft_chain``) while a round runs;
    ``restore`` undoes it."""
    runner, spent = core.runner, {"s": 0.0}

    def wrap(name: str) -> None:
        orig = getattr(runner, name)

        def timed(*a, **k):
            t = time.perf_counter()
            res = orig(*a, **k)
            if res[1].is_cuda:  # the pass is queued work until the device is done with it
                torch.cuda.synchronize(res[1].device)
            spent["s"] += time.perf_counter() - t
            return res

        setattr(runner, name, timed)

    wrap("draft")
    wrap("draft_chain")
    spent["restore"] = lambda: [vars(runner).pop(n, None) for n in ("draft", "draft_chain")]
    return spent


def bench_spec(
    config: dict,
    out_dir: Path,
    batches=(1, 16),
    tokens: int = 32,
    repeats: int = 3,
    prompt_tokens: int = 32,
    device: str = "cpu",
    dtype: str = "float32",
    num_speculative_tokens: int = 1,
) -> dict:
    """Plain and speculative rounds on ``config`` + one MTP layer (on a GPU: both through CUDA graphs)."""
    import dsv32
    from dsv32.config import ModelConfig
    from dsv32.engine.core import EngineConfig, EngineCore
    from dsv32.weights.synthetic import write_synthetic_checkpoint

    config = {**config, "num_nextn_predict_layers": 1}
    cfg = ModelConfig.from_dict(config)
    with tempfile.TemporaryDirectory(prefix="dsv32-bench-spec-") as tmp:
        print(f"writing a synthetic checkpoint ({cfg.model_type}, hidden {cfg.hidden_size}, "
              f"{cfg.num_hidden_layers} layers + 1 MTP layer) ...", flush=True)  # fmt: skip
        write_synthetic_checkpoint(cfg, Path(tmp), seed=0, dtype=torch.bfloat16)
        model = dsv32.load_model(Path(tmp), dtype=getattr(torch, dtype), device=device, progress=False)
    blocks = max(batches) * (-(-(prompt_tokens + tokens + 2) // 16) + 1) + 4
    cores = {
        k: EngineCore(
            model,
            EngineConfig(
                block_size=16, num_blocks=blocks, max_num_seqs=max(batches), num_speculative_tokens=k
            ),
            eos_id=None,
        )  # fmt: skip
        for k in (0, num_speculative_tokens)
    }
    gen = torch.Generator().manual_seed(0)
    prompts = [
        torch.randint(2, cfg.vocab_size, (prompt_tokens,), generator=gen).tolist()
        for _ in range(max(batches))
    ]
    for k, core in cores.items():  # warm-up
        _round(core, 1, 2, prompts[:1], f"warm{k}")
    rounds: dict[str, list[dict]] = {}
    for r in range(repeats):
        for batch in batches:
            for k, core in cores.items():
                res = _round(core, batch, tokens, prompts[:batch], f"r{r}-{batch}-{k}")
                rounds.setdefault(f"{batch}/{k}", []).append(res)
                print(f"  round {r} batch {batch} {'spec' if k else 'plain'}: {res['tok_s']:.1f} tok/s, "
                      f"{res['ms_per_step']:.1f} ms/step", flush=True)  # fmt: skip
    rows = []
    for batch in batches:
        plain = max(rounds[f"{batch}/0"], key=lambda x: x["tok_s"])
        spec = max(rounds[f"{batch}/{num_speculative_tokens}"], key=lambda x: x["tok_s"])
        ratio = spec["ms_per_step"] / plain["ms_per_step"]
        rows.append({
            "batch": batch, "plain_tok_s": plain["tok_s"], "plain_ms_per_step": plain["ms_per_step"],
            "spec_tok_s": spec["tok_s"], "spec_ms_per_step": spec["ms_per_step"],
            "mtp_pass_ms_per_step": spec["mtp_pass_ms"], "step_cost_ratio": ratio,
            "acceptance": spec["accepted"] / max(1, spec["drafted"]),
            "break_even_acceptance": _break_even(ratio, num_speculative_tokens),
            "projected": [{"acceptance": a, "tok_s": batch * _tokens_per_step(a, num_speculative_tokens)
                           / (spec["ms_per_step"] / 1000),
                           "speedup": _tokens_per_step(a, num_speculative_tokens) / ratio}
                          for a in REPORTED_ACCEPTANCE],
            "same_greedy_tokens": all(
                x["outputs"] == y["outputs"]
                for x, y in zip(rounds[f"{batch}/0"], rounds[f"{batch}/{num_speculative_tokens}"], strict=True)
            ),
        })  # fmt: skip
    for core in cores.values():
        core.pool.assert_no_leaks()
    head = model.lm_head.weight
    result = {
        "benchmark": "spec",
        "date": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "machine": {"cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
                    "torch": torch.__version__},
        "device": device if device == "cpu" else f"{device} ({torch.cuda.get_device_name(device)}, CUDA graphs)",
        "dtype": dtype,
        "config": {"model_type": cfg.model_type, "hidden_size": cfg.hidden_size, "layers": cfg.num_hidden_layers,
                   "mtp_layers": 1, "vocab_size": cfg.vocab_size, "routed_experts": cfg.n_routed_experts,
                   "experts_per_token": cfg.num_experts_per_tok},
        "lm_head_mib": head.numel() * head.element_size() / 2**20,
        "num_speculative_tokens": num_speculative_tokens,
        "decode_tokens": tokens, "prompt_tokens": prompt_tokens, "repeats": repeats,
        "load_average": list(os.getloadavg()),
        "rows": rows,
    }  # fmt: skip
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "bench_spec.json").write_text(json.dumps(result, indent=1))
    (out_dir / "bench_spec.md").write_text(_markdown(result))
    return result


def _tokens_per_step(a: float, k: int) -> float:
    """Expected tokens a request gets from a step with k drafts when each is accepted with probability a
    (given the ones before it): 1 + a + ... + a^k."""
    return sum(a**j for j in range(k + 1))


def _break_even(cost_ratio: float, k: int) -> float | None:
    """The acceptance at which a speculative step's tokens pay for its cost (None: not even at 100 %)."""
    if _tokens_per_step(1.0, k) < cost_ratio:
        return None
    lo, hi = 0.0, 1.0
    for _ in range(50):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if _tokens_per_step(mid, k) < cost_ratio else (lo, mid)
    return hi


def _markdown(r: dict) -> str:
    c = r["config"]
    a_lo, a_hi = REPORTED_ACCEPTANCE
    lines = [
        f"# dsv32 bench spec — {r['date']}",
        "",
        f"Speculative decoding with the MTP layer vs plain decoding, same weights, same run: {c['model_type']}, "
        f"hidden {c['hidden_size']}, {c['layers']} layers + {c['mtp_layers']} MTP layer, {c['routed_experts']} "
        f"routed experts ({c['experts_per_token']} per token), vocabulary {c['vocab_size']} (lm_head "
        f"{r['lm_head_mib']:.0f} MiB, read again by the MTP layer's shared head), random weights, {r['dtype']}, "
        f"{r['device']}, {r['machine']['threads']} threads, torch {r['machine']['torch']}. Decode {r['decode_tokens']} tokens per "
        f"request after a {r['prompt_tokens']}-token prompt; best of {r['repeats']} alternating rounds; load "
        f"average at the end {', '.join(f'{x:.1f}' for x in r['load_average'])}.",
        "",
        f"{r['num_speculative_tokens']} draft token(s) per step. Random weights make random drafts, so the "
        "measured acceptance is ~0 and the measured speculative tok/s is a floor. A step costs the same whether "
        "its drafts are accepted or not, so the tok/s at acceptance a is batch x (1 + a + ... + a^k) / step "
        f"time: shown at {a_lo:.0%} and {a_hi:.0%}, the acceptance DeepSeek reports for its MTP module on the real "
        "weights (for the first draft; chained drafts are assumed to keep it).",
        "",
        "| batch | plain tok/s (ms/step) | spec tok/s measured (ms/step, of which MTP pass) | step cost | "
        f"acceptance measured | break-even acceptance | projected at {a_lo:.0%} / {a_hi:.0%} | same tokens |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for x in r["rows"]:
        p = x["projected"]
        lines.append(
            f"| {x['batch']} | {x['plain_tok_s']:.1f} ({x['plain_ms_per_step']:.1f}) | {x['spec_tok_s']:.1f} "
            f"({x['spec_ms_per_step']:.1f}, {x['mtp_pass_ms_per_step']:.1f}) | {x['step_cost_ratio']:.2f}x | "
            f"{x['acceptance']:.1%} | {_pct(x['break_even_acceptance'])} | {p[0]['tok_s']:.1f} / {p[1]['tok_s']:.1f} "
            f"tok/s ({p[0]['speedup']:.2f}x / {p[1]['speedup']:.2f}x) | {'yes' if x['same_greedy_tokens'] else 'NO'} |"
        )
    lines.append("")
    return "\n".join(lines)


def _pct(x: float | None) -> str:
    return "never" if x is None else f"{x:.0%}"


def main_bench_spec(args: argparse.Namespace) -> int:
    from dsv32.engine.bench import positive_ints
    from dsv32.presets import resolve_preset

    config = resolve_preset(args.config or "bench-small")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"--device {args.device}: this machine has no CUDA device")
    bench_spec(
        config, Path(args.out), batches=positive_ints(args.batches), tokens=args.tokens, repeats=args.repeats,
        device=args.device, dtype=args.dtype, num_speculative_tokens=args.num_speculative_tokens,
    )  # fmt: skip
    print((Path(args.out) / "bench_spec.md").read_text())
    return 0
