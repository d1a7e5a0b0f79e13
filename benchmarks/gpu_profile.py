"""Part of the prepared GPU check (gpu_check.sh): where the engine's time goes on a GPU.

Loads the benchmark model (bench-small, random weights) in bf16 on CUDA, then profiles with torch.profiler:
a batch-1 decode step, a 16-request decode step and a 1024-token prefill: from a CUDA graph (``PrefillGraphs``,
the default), eager, and compiled around its attention (``EngineConfig.compile_prefill``; ``prefill`` as the
second argument: only those). Prints, per
case, the wall time,
how many CUDA kernels were launched and how long the GPU was busy, and the ops that cost the most CPU time
(on a small model the engine is bound by the host's launches, not by the GPU).
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

import dsv32
from dsv32.config import ModelConfig
from dsv32.engine.bench import _drain, _engine, _first_token, _greedy
from dsv32.presets import PRESETS
from dsv32.weights.synthetic import write_synthetic_checkpoint


def _report(name: str, prof, wall_s: float, reps: int) -> None:
    events = prof.key_averages()
    kernels = [e for e in events if e.device_type == torch.autograd.DeviceType.CUDA]
    gpu_us = sum(e.self_device_time_total for e in kernels)
    launches = sum(
        e.count for e in events if e.key in ("cudaLaunchKernel", "cuLaunchKernel", "cudaLaunchKernelExC")
    )
    syncs = sum(e.count for e in events if "Synchronize" in e.key or e.key == "cudaMemcpyAsync")
    print(
        f"\n## {name}: {1000 * wall_s / reps:.2f} ms wall, GPU busy {gpu_us / 1000 / reps:.2f} ms, "
        f"{launches // reps} kernel launches, {sum(e.count for e in kernels) // reps} kernels ran, "
        f"{syncs // reps} syncs/copies per run"
    )
    top = sorted(events, key=lambda e: -e.self_cpu_time_total)[:18]
    for e in top:
        print(f"  {e.self_cpu_time_total / 1000 / reps:8.3f} ms cpu {e.count // reps:6d}x  {e.key}")
    print("  -- top GPU kernels")
    for e in sorted(kernels, key=lambda e: -e.self_device_time_total)[:8]:
        print(f"  {e.self_device_time_total / 1000 / reps:8.3f} ms gpu {e.count // reps:6d}x  {e.key[:90]}")


def main(device: str = "cuda", only: str = "") -> int:
    tmp = Path(tempfile.mkdtemp())
    cfg = ModelConfig.from_dict(PRESETS["bench-small"])
    write_synthetic_checkpoint(cfg, tmp, seed=0, dtype=torch.bfloat16)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    model = dsv32.load_model(tmp, dtype=dtype, device=device, progress=False)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    reps = 10
    for n in () if only == "prefill" else (1, 16):
        core = _engine(model, 16 * 400 + 4096, n, 2048)
        for i in range(n):
            core.add_request(f"r{i}", list(range(2 + i, 34 + i)), _greedy(300))
        for _ in range(10):
            core.step()
        sync()
        with profile(activities=acts) as prof:
            t0 = time.perf_counter()
            for _ in range(reps):
                core.step()
            sync()
            wall = time.perf_counter() - t0
        _report(f"decode step, {n} request(s)", prof, wall, reps)
        for i in range(n):
            core.abort(f"r{i}")
    g = torch.Generator().manual_seed(0)
    for how, kw in (
        ("from a CUDA graph", {}),
        ("eager", {"prefill_graphs": False}),
        ("compiled around attention", {"prefill_graphs": False, "compiled_prefill": True}),
    ):
        core = _engine(model, 8192, 1, 2048, **kw)
        for r in range(3):  # warm-up
            _first_token(core, f"w{r}", torch.randint(2, cfg.vocab_size, (1024,), generator=g).tolist(), 1)
            _drain(core)
        sync()
        with profile(activities=acts) as prof:
            t0 = time.perf_counter()
            for r in range(3):
                _first_token(
                    core, f"p{r}", torch.randint(2, cfg.vocab_size, (1024,), generator=g).tolist(), 1
                )
                _drain(core)
            sync()
            wall = time.perf_counter() - t0
        _report(f"prefill of 1024 tokens (first token), {how}", prof, wall, 3)
    if only != "prefill":
        _long_context_steps(tmp, device, acts, sync)
    return 0


def _long_context_steps(tmp: Path, device: str, acts, sync, ctx: int = 16384) -> None:
    """The DSA part's decode step (attention-dominated variant) at ``ctx`` tokens of context, DSA and dense."""
    from dsv32.engine.bench import DENSE_TOPK, _set_topk, attention_variant

    cfg = ModelConfig.from_dict(attention_variant(PRESETS["bench-small"]))
    write_synthetic_checkpoint(cfg, tmp / "attn", seed=0, dtype=torch.bfloat16)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    model = dsv32.load_model(tmp / "attn", dtype=dtype, device=device, progress=False)
    attns = [layer.self_attn for layer in model.model.layers]
    core = _engine(model, ctx + 4096, 1, 4096, prefill_graphs=False)  # (the prefill only sets the context up)
    g = torch.Generator().manual_seed(1)
    _set_topk(attns, DENSE_TOPK)
    _first_token(core, "long", torch.randint(2, cfg.vocab_size, (ctx,), generator=g).tolist(), 400)
    for mode, k in (("DSA", cfg.index_topk), ("dense", DENSE_TOPK)):
        _set_topk(attns, k)
        for _ in range(5):
            core.step()
        sync()
        with profile(activities=acts) as prof:
            t0 = time.perf_counter()
            for _ in range(10):
                core.step()
            sync()
            wall = time.perf_counter() - t0
        _report(f"decode step at {ctx} context, {mode} ({cfg.num_hidden_layers} layers)", prof, wall, 10)
    _set_topk(attns, cfg.index_topk)
    core.abort("long")


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:3]))
