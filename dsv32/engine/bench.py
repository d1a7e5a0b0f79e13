"""``dsv32 bench engine``: the serving engine against HF transformers on one synthetic checkpoint.

Five measurements, each ratio taken against HF transformers measured in the same run on the same
weights (fp32, the threads torch has), as issue 5's "Benchmarks" acceptance asks:

1. ``decode`` — batch-1 decode tok/s: ``EngineCore`` vs HF ``generate`` (greedy, ``min_new_tokens`` so
   random weights cannot stop early). HF's rate is ``n / (t(generate n+1) - t(generate 1))``, so the
   prompt's prefill is not in it; the engine's counts the steps after its first token.
2. ``prefill`` — time to first token of a 1024-token prompt: engine vs HF ``generate(max_new_tokens=1)``.
3. ``concurrency`` — aggregate decode tok/s at 1, 4, 16, 64 concurrent requests (short prompts, all
   prefilled first, then the steps while all of them decode), as ratios to HF batch-1 decode. With
   ``--compile``, on the engine ``serve`` runs by default (its one-request decode step compiled).
4. ``prefix`` — TTFT of an 8K-token prompt cold, and again with the whole prompt in the prefix cache; and
   the time until 4 copies of a fresh 1024-token prompt submitted together all have a first token, against
   one alone (the shared prefill runs once).
5. ``dsa`` — decode step time at 4K / 16K / 32K context with DSA vs the same model with the indexer
   disabled (``indexer.topk`` set past any context: dense MLA), on an attention-dominated variant of the
   config (2 layers, the same attention dims, 4 small experts, a 2048-token vocabulary: the 129K-entry
   ``lm_head`` alone would read more bytes than the whole cache at 32K). Beside the achieved ratio it
   prints the one the bytes read per step predict. The context is prefilled once (dense: cheaper, and
   cache contents do not change a step's cost), longer contexts reuse shorter ones through the prefix
   cache, then DSA and dense decode steps alternate on the same cache.

Best of ``repeats`` rounds (HF and engine interleaved, so drift hits both; round 0 doubles as warm-up).
With ``--compile`` each decode round also runs an engine with the compiled decode step (CPU: the compiled
single-request step; GPU: CUDA graphs of the inductor-compiled step) and each prefill round one whose
prefill is compiled around its attention (``compiled_layers``; ``serve --compile`` uses it on a GPU); with
``--llama-cpp DIR`` llama.cpp runs once in each round too, right after the engine: ``llama-bench`` for batch-1
decode and prefill, a ``llama-server`` (started once, idle in between) for aggregate decode.
Results go to ``benchmarks/results/bench_engine.{json,md,png}`` (the PNG needs matplotlib: the ``bench``
extra; without it the plot is skipped with a note).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import gc
import json
import os
import platform
import tempfile
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

PARTS = ("decode", "prefill", "concurrency", "prefix", "dsa")
BURST_COPIES = 4  # the prefix part's burst of one prompt
BLOCK_SIZE = 16
DENSE_TOPK = 1 << 40  # an index_topk no context reaches: the indexer never selects, attention is dense

TARGETS = {  # issue 5, "Benchmarks"
    "decode": 9.0,  # batch-1 decode / HF generate
    "prefill": 3.6,  # 1024-token prefill / HF
    "concurrency_16": 60.0,  # 16-stream aggregate / HF batch-1 decode
    "prefix": 10.0,  # TTFT 8K cold / fully cached
    "dsa_fraction": 0.70,  # achieved DSA-vs-dense speed-up / the bytes-predicted one
}
# llama.cpp on this machine kind as ratios to HF (shared/bench/README.md: HF 3.8 tok/s decode, 96 tok/s
# prefill; llama.cpp 34.2 tok/s batch-1, 349 tok/s prefill, 77.5 / 155 tok/s aggregate at 4 / 16 slots)
README_HF = {"decode_tok_s": 3.8, "prefill_tok_s": 96.0}  # the HF figures the targets were set against
README_BANDWIDTH = 35e9  # bytes/s, "~35 GB/s" for this machine kind
LLAMA_CPP_TOK_S = {1: 34.2, 4: 77.5, 16: 155.0}  # README: aggregate decode tok/s by concurrent slots
LLAMA_CPP_RATIO = {
    "decode": LLAMA_CPP_TOK_S[1] / README_HF["decode_tok_s"],
    "prefill": 349 / README_HF["prefill_tok_s"],
    "concurrency": {c: tok_s / README_HF["decode_tok_s"] for c, tok_s in LLAMA_CPP_TOK_S.items()},
}


@dataclass
class Settings:
    parts: tuple[str, ...] = PARTS
    repeats: int = 3
    prompt_tokens: int = 32  # the short prompt of the decode and concurrency measurements
    decode_tokens: int = 32  # batch-1 decode tokens timed (engine and HF)
    prefill_tokens: int = 1024
    concurrency: tuple[int, ...] = (1, 4, 16, 64)
    concurrent_decode_tokens: int = 16  # decode steps timed at each concurrency
    ttft_prompt_tokens: int = 8192
    long_contexts: tuple[int, ...] | None = (4096, 16384, 32768)  # None: 2x and 4x index_topk
    long_decode_steps: int = 12  # timed decode steps per context and mode
    long_prefill_chunk: int = 4096  # max_num_batched_tokens while filling the long contexts
    max_num_batched_tokens: int = 2048  # the engine's step budget (its default) for parts 1-4
    quiet_wait_s: float = 60.0  # before each part, wait up to this long for other processes to go idle
    quiet_wait_step_s: float = 30.0  # the same before each round / concurrency / context inside a part
    quick: bool = False
    device: str = "cpu"  # where both models run ("cuda" on a GPU machine)
    dtype: str = "float32"  # both models' weights and activations ("bfloat16" on a GPU)
    llama_cpp: str | None = None  # a built llama.cpp tree: also measure it (see ``bench_llama_cpp``)
    cuda_graphs: bool = True  # on a GPU: decode and one-chunk prefill steps from CUDA graphs (False: eager)
    compile_decode: bool = False  # batch-1 decode and prefill also measured compiled (``serve --compile``)

    @property
    def torch_dtype(self) -> torch.dtype:
        return getattr(torch, self.dtype)

    @classmethod
    def quick_run(cls) -> Settings:
        """A smoke run: every part, tiny sizes, one round (figures mean little)."""
        return cls(
            repeats=1, decode_tokens=4, prefill_tokens=64, concurrency=(1, 4, 16), concurrent_decode_tokens=3,
            ttft_prompt_tokens=256, long_contexts=None, long_decode_steps=2, long_prefill_chunk=512,
            max_num_batched_tokens=256, quiet_wait_s=0.0, quiet_wait_step_s=0.0, quick=True,
        )  # fmt: skip


# ---- helpers ----------------------------------------------------------------------------------


def _now() -> float:
    return time.perf_counter()


def _sync(device: torch.device | str) -> None:
    """Wait for queued GPU work before reading the clock (CPU work is synchronous)."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def _greedy(n: int):
    from dsv32.engine.sampling_params import SamplingParams

    return SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True)


def _prompt(gen: torch.Generator, vocab: int, n: int) -> list[int]:
    return torch.randint(2, vocab, (n,), generator=gen).tolist()


def _engine(
    model,
    tokens: int,
    max_seqs: int,
    max_batched: int,
    cuda_graphs: bool = True,
    compiled: bool = False,
    max_model_len: int | None = None,
    compiled_prefill: bool = False,
    prefill_graphs: bool = True,
):
    from dsv32.engine.core import EngineConfig, EngineCore

    blocks = -(-tokens // BLOCK_SIZE) + 2 * max_seqs + 4
    cfg = EngineConfig(
        block_size=BLOCK_SIZE, num_blocks=blocks, max_num_seqs=max_seqs, max_num_batched_tokens=max_batched,
        cuda_graphs=cuda_graphs, compile_decode=compiled, max_model_len=max_model_len,
        compile_prefill=compiled_prefill, prefill_graphs=prefill_graphs,
    )  # fmt: skip
    return EngineCore(model, cfg, eos_id=None)


def _drain(core) -> None:
    while core.has_work():
        core.step()


def step_to_first_tokens(core, request_ids: list[str]) -> dict[str, list[int]]:
    """Step until each of ``request_ids`` has its first token (its prefill): the tokens so far, by id."""
    out: dict[str, list[int]] = {rid: [] for rid in request_ids}
    while any(not toks for toks in out.values()):
        for o in core.step():
            if o.request_id in out:
                out[o.request_id] += o.new_token_ids
    return out


def timed_steps(core, out: dict[str, list[int]]) -> tuple[list[float], float]:
    """Step to the end, adding each request's new tokens to ``out``: (seconds of each step, seconds in all)."""
    steps = []
    t0 = _now()
    while core.has_work():
        t = _now()
        outs = core.step()
        steps.append(_now() - t)
        for o in outs:
            out.setdefault(o.request_id, []).extend(o.new_token_ids)
    return steps, _now() - t0


def _first_token(core, rid: str, prompt: list[int], max_tokens: int) -> tuple[float, Any]:
    """Submit a request and step until its first token: (TTFT in seconds, that TokenOutput)."""
    t0 = _now()
    core.add_request(rid, prompt, _greedy(max_tokens))
    while True:
        for o in core.step():
            if o.request_id == rid:
                return _now() - t0, o


def _load_avg() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:  # pragma: no cover - not on every platform
        return None


def _cpu_busy(interval: float = 1.0) -> float | None:
    """Fraction of all CPUs busy over ``interval`` seconds (from /proc/stat; None where it is absent)."""

    def read() -> tuple[int, int] | None:
        try:
            with open("/proc/stat") as f:
                vals = [int(x) for x in f.readline().split()[1:]]
        except (OSError, ValueError):
            return None
        return vals[3] + (vals[4] if len(vals) > 4 else 0), sum(vals)  # idle + iowait, total

    a = read()
    time.sleep(interval)
    b = read()
    if a is None or b is None or b[1] == a[1]:
        return None
    return 1.0 - (b[0] - a[0]) / (b[1] - a[1])


def _wait_quiet(max_wait_s: float, busy_below: float = 0.15) -> dict:
    """Wait (up to ``max_wait_s``) until other processes leave the CPUs nearly idle; says how it went."""
    t0 = _now()
    busy = None
    while max_wait_s > 0:
        busy = _cpu_busy()
        if busy is None or busy < busy_below or _now() - t0 >= max_wait_s:
            break
    return {"waited_s": round(_now() - t0, 1), "cpu_busy_before": None if busy is None else round(busy, 2)}


def _settle(s: Settings, waits: list[float]) -> None:
    """Inside a part: wait (up to ``quiet_wait_step_s``) for idle CPUs before the next timed stretch."""
    if s.quiet_wait_step_s > 0:
        waits.append(_wait_quiet(s.quiet_wait_step_s)["waited_s"])


@contextlib.contextmanager
def _part(result: dict, name: str, s: Settings):
    """Wait for a quiet machine, then record the part's wall time and the load average around it: on 2 cores,
    other processes' work skews timings badly."""
    quiet = _wait_quiet(s.quiet_wait_s)
    t0, load0 = _now(), _load_avg()
    yield
    result.setdefault("part_timing", {})[name] = {
        "wall_s": _now() - t0,
        "load_avg_start": load0,
        "load_avg_end": _load_avg(),
        **quiet,
    }


# ---- HF transformers --------------------------------------------------------------------------


def _hf_generate(hf, ids: list[int], n: int) -> tuple[float, list[int]]:
    """Wall time of greedy ``generate`` of exactly n new tokens, and those tokens."""
    x = torch.tensor([ids], device=hf.device)
    _sync(hf.device)
    t0 = _now()
    with torch.inference_mode():
        out = hf.generate(
            x, attention_mask=torch.ones_like(x), max_new_tokens=n, min_new_tokens=n, do_sample=False,
            pad_token_id=0, temperature=None, top_p=None, top_k=None,
        )  # fmt: skip
    _sync(hf.device)
    return _now() - t0, out[0, len(ids) :].tolist()


# ---- parts 1 and 2: batch-1 decode, prefill -----------------------------------------------------


def _engine_decode(core, rid: str, prompt: list[int], n: int) -> tuple[float, list[int]]:
    """Seconds for n decode tokens after the first one, and all n + 1 greedy tokens."""
    _, first = _first_token(core, rid, prompt, n + 1)
    toks = list(first.new_token_ids)
    t0 = _now()
    while core.has_work():
        for o in core.step():
            toks += o.new_token_ids
    return _now() - t0, toks


def _record_decode_matmuls(core, prompt: list[int]) -> list:
    """The packed matmuls of one batch-1 decode step of ``core``, each with its input (CPU; empty where the
    weights are not packed)."""
    from dsv32.model.layers import recording_packed_matmuls

    _first_token(core, "record", prompt, 4)
    with recording_packed_matmuls() as recorded:
        core.step()
    core.abort("record")
    return list(recorded)


def _replay_s(recorded: list) -> float:
    """Seconds to run the recorded matmuls alone, back to back."""
    t0 = _now()
    for pm, x in recorded:
        pm(x)
    return _now() - t0


def _step_breakdown(recorded: list, step_s: float, compiled_step_s: float | None, replay_s: float) -> dict:
    """Where a batch-1 decode step's time goes: its packed matmuls alone, and the rest (every other op, the
    Python around them, sampling)."""
    nbytes = sum(pm.weight_bytes for pm, _ in recorded)
    out = {"step_ms": 1000 * step_s, "packed_matmuls": len(recorded), "matmul_weight_bytes": nbytes,
           "matmuls_alone_ms": 1000 * replay_s, "matmul_GB_s": nbytes / replay_s / 1e9,
           "rest_ms": 1000 * (step_s - replay_s)}  # fmt: skip
    if compiled_step_s is not None:
        out.update(
            compiled_step_ms=1000 * compiled_step_s, compiled_rest_ms=1000 * (compiled_step_s - replay_s)
        )
    return out


def _decode_and_prefill(
    ours, hf, cfg, s: Settings, gen: torch.Generator, llama: _LlamaRun | None = None
) -> dict:
    parts = set(s.parts)
    prompt = _prompt(gen, cfg.vocab_size, s.prompt_tokens)
    need = s.prompt_tokens + s.decode_tokens + 2 + s.prefill_tokens + 2
    core = _engine(ours, need, 1, s.max_num_batched_tokens, s.cuda_graphs)
    names = "hf_1 hf_n eng_dec eng_dec_compiled replay hf_pre eng_pre eng_pre_compiled eng_pre_eager".split()
    t: dict[str, list[float]] = {k: [] for k in names}
    toks: dict[str, list[int]] = {}
    compiled, compile_s = None, None
    if s.compile_decode and "decode" in parts:
        t0 = _now()
        # context no longer than the part needs: only the forms it meets are compiled at start
        cneed = s.prompt_tokens + s.decode_tokens + 2
        compiled = _engine(
            ours, cneed, 1, s.max_num_batched_tokens, s.cuda_graphs, compiled=True, max_model_len=cneed
        )
        compile_s = _now() - t0
        if not compiled.decode_step_compiled:
            raise RuntimeError("--compile: the decode step could not be compiled (see the warning above)")
        _engine_decode(compiled, "warmup", prompt, 2)
    cpre, cpre_start_s = None, None
    if s.compile_decode and "prefill" in parts:
        # the prefill compiled around its attention (what ``serve --compile`` adds on a GPU; measured here on
        # the CPU too, where it is not used: see ``EngineConfig.compile_prefill``): an engine of its own
        t0 = _now()
        pneed = s.prefill_tokens + 2
        cpre = _engine(
            ours,
            pneed,
            1,
            s.max_num_batched_tokens,
            s.cuda_graphs,
            compiled_prefill=True,
            prefill_graphs=False,
        )
        cpre_start_s = _now() - t0
        if not cpre.prefill_compiled:
            raise RuntimeError("--compile: the prefill could not be compiled (see the warning above)")
    epre = None  # on a GPU, prefills replay from CUDA graphs: the eager prefill is timed beside them
    if "prefill" in parts and core.runner.prefill_graphs is not None:
        epre = _engine(
            ours, s.prefill_tokens + 2, 1, s.max_num_batched_tokens, s.cuda_graphs, prefill_graphs=False
        )
    _hf_generate(hf, prompt, 3)  # warm-up (first calls pay one-off setup costs)
    _engine_decode(core, "warmup", prompt, 2)
    if torch.device(s.device).type == "cuda" and "prefill" in parts:
        # on a GPU the first call of each shape also pays for kernel selection and the allocator's growth
        long = _prompt(gen, cfg.vocab_size, s.prefill_tokens)
        _hf_generate(hf, long, 1)
        _first_token(core, "warmup-prefill", long, 1)
        _drain(core)
        for other in (cpre, epre):
            if other is not None:
                _first_token(other, "warmup-prefill", long, 1)
                _drain(other)
    recorded = []  # one decode step's packed matmuls, replayed alone in each round
    if "decode" in parts and torch.device(s.device).type == "cpu":
        recorded = _record_decode_matmuls(core, prompt)
    waits: list[float] = []
    for r in range(s.repeats):
        _settle(s, waits)
        if "decode" in parts or "concurrency" in parts:  # HF batch-1 decode is concurrency's baseline too
            dt, _ = _hf_generate(hf, prompt, 1)
            t["hf_1"].append(dt)
            dt, toks["hf"] = _hf_generate(hf, prompt, s.decode_tokens + 1)
            t["hf_n"].append(dt)
        if "decode" in parts:
            dt, toks["engine"] = _engine_decode(core, f"dec{r}", prompt, s.decode_tokens)
            t["eng_dec"].append(dt)
            if compiled is not None:
                dt, toks["compiled"] = _engine_decode(compiled, f"cdec{r}", prompt, s.decode_tokens)
                t["eng_dec_compiled"].append(dt)
            if recorded:
                t["replay"].append(min(_replay_s(recorded) for _ in range(3)))
            if llama is not None:  # in the same window as the engine's (bandwidth drifts between parts)
                llama.measure("decode", 0, s.decode_tokens, s.prompt_tokens)
        if "prefill" in parts:
            long = _prompt(gen, cfg.vocab_size, s.prefill_tokens)  # fresh each round: no prefix hits
            dt, _ = _hf_generate(hf, long, 1)
            t["hf_pre"].append(dt)
            # the same prompt in each engine (no prefix hits: each has a cache of its own)
            for name, eng, key in (("graphs", core, "eng_pre"), ("compiled", cpre, "eng_pre_compiled"),
                                   ("eager", epre, "eng_pre_eager")):  # fmt: skip
                if eng is not None:
                    dt, o = _first_token(eng, f"pre{r}", long, 1)
                    _drain(eng)
                    t[key].append(dt)
                    toks.setdefault(f"prefill_first_{name}", []).extend(o.new_token_ids)
            if llama is not None:
                llama.measure("prefill", s.prefill_tokens, 0, 0)
        print(f"  round {r}: " + ", ".join(f"{k} {v[-1]:.2f}s" for k, v in t.items() if v), flush=True)
    out: dict[str, Any] = {"waited_s_between_rounds": sum(waits)}
    n = s.decode_tokens
    if t["hf_n"]:
        hf_dec = n / max(min(t["hf_n"]) - min(t["hf_1"]), 1e-9)
        out["hf_batch1_decode_tok_s"] = hf_dec
    wb = decode_weight_bytes(ours)
    bw = measured_read_bandwidth(device=ours.device)
    out["bandwidth"] = {  # what the weights alone make a step cost at this machine's memory bandwidth
        "readme_bytes_per_s": README_BANDWIDTH,
        "measured_bytes_per_s": bw,
        "batch1_weight_bytes": wb,
        "lm_head_bytes": ours.lm_head.weight.numel() * ours.lm_head.weight.element_size(),
        "batch1_limit_tok_s": bw / wb,
        "all_experts_weight_bytes": decode_weight_bytes(ours, all_experts=True),
        "limit_16_streams_tok_s": 16 * bw / decode_weight_bytes(ours, all_experts=True),
    }
    if "decode" in parts:
        eng = n / min(t["eng_dec"])
        out["decode"] = {
            "prompt_tokens": s.prompt_tokens, "decode_tokens": n,
            "engine_tok_s": eng, "engine_ms_per_token": 1000 * min(t["eng_dec"]) / n,
            "hf_tok_s": out["hf_batch1_decode_tok_s"],
            "hf_generate_s": {"1_token": min(t["hf_1"]), f"{n + 1}_tokens": min(t["hf_n"])},
            "ratio": eng / out["hf_batch1_decode_tok_s"], "target": TARGETS["decode"],
            "llama_cpp_ratio": LLAMA_CPP_RATIO["decode"],
            "same_greedy_tokens": toks.get("engine") == toks.get("hf"),
            "engine_weight_GB_s": wb * eng / 1e9, "ratio_to_readme_hf": eng / README_HF["decode_tok_s"],
        }  # fmt: skip
        if compiled is not None:
            ceng = n / min(t["eng_dec_compiled"])
            out["decode"]["compiled"] = {
                "engine_tok_s": ceng, "engine_ms_per_token": 1000 * min(t["eng_dec_compiled"]) / n,
                "ratio": ceng / out["hf_batch1_decode_tok_s"], "vs_eager": ceng / eng,
                "engine_start_s": compile_s, "same_greedy_tokens": toks.get("compiled") == toks.get("hf"),
            }  # fmt: skip
            compiled.pool.assert_no_leaks()
        if recorded:
            cstep = min(t["eng_dec_compiled"]) / n if compiled is not None else None
            out["decode"]["step_breakdown"] = _step_breakdown(
                recorded, min(t["eng_dec"]) / n, cstep, min(t["replay"])
            )
    if "prefill" in parts:
        p = s.prefill_tokens
        out["prefill"] = {
            "prompt_tokens": p,
            "engine_ttft_s": min(t["eng_pre"]), "hf_ttft_s": min(t["hf_pre"]),
            "engine_tok_s": p / min(t["eng_pre"]), "hf_tok_s": p / min(t["hf_pre"]),
            "ratio": min(t["hf_pre"]) / min(t["eng_pre"]), "target": TARGETS["prefill"],
            "llama_cpp_ratio": LLAMA_CPP_RATIO["prefill"],
            "ratio_to_readme_hf": p / min(t["eng_pre"]) / README_HF["prefill_tok_s"],
        }  # fmt: skip
        # the eager prefill: the first row's, or on a GPU (whose first row replays graphs) the eager engine's
        eager_s, eager_first = min(t["eng_pre"]), toks["prefill_first_graphs"]
        if epre is not None:
            eager_s, eager_first = min(t["eng_pre_eager"]), toks["prefill_first_eager"]
        if cpre is not None:
            ct = min(t["eng_pre_compiled"])
            out["prefill"]["compiled"] = {
                "engine_ttft_s": ct, "engine_tok_s": p / ct, "ratio": min(t["hf_pre"]) / ct,
                "vs_eager": eager_s / ct, "engine_start_s": cpre_start_s,
                "same_first_token_as_eager": toks["prefill_first_compiled"] == eager_first,
            }  # fmt: skip
            cpre.pool.assert_no_leaks()
        if epre is not None:
            et = min(t["eng_pre_eager"])
            out["prefill"]["eager"] = {
                "engine_ttft_s": et, "engine_tok_s": p / et, "ratio": min(t["hf_pre"]) / et,
                "graphs_vs_eager": et / min(t["eng_pre"]),
                "same_first_token_as_graphs": toks["prefill_first_eager"] == toks["prefill_first_graphs"],
            }  # fmt: skip
            epre.pool.assert_no_leaks()
    core.pool.assert_no_leaks()
    return out


# ---- part 3: aggregate decode at several concurrencies ----------------------------------------


def _concurrency(
    ours, cfg, s: Settings, gen: torch.Generator, hf_dec: float | None, llama: _LlamaRun | None = None
) -> dict:
    n = s.concurrent_decode_tokens
    cmax = max(s.concurrency)
    # with --compile, the engine ``serve`` runs by default: its one-request steps compiled, the others eager
    core = _engine(
        ours, cmax * (s.prompt_tokens + n + 8), cmax, s.max_num_batched_tokens, s.cuda_graphs,
        compiled=s.compile_decode,
    )  # fmt: skip
    rows = []
    waits: list[float] = []
    with contextlib.ExitStack() as stack:
        # llama.cpp's server idles between its rounds, each right after the engine's round at that concurrency
        server = llama.start_server(stack, cmax, cmax * (s.prompt_tokens + n + 16)) if llama else None
        for c in s.concurrency:
            _settle(s, waits)
            best = None
            for r in range(s.repeats):
                ids = [f"c{c}-{r}-{i}" for i in range(c)]
                for rid in ids:
                    core.add_request(rid, _prompt(gen, cfg.vocab_size, s.prompt_tokens), _greedy(n + 8))
                started: set[str] = set()
                while len(started) < c:  # prefill every prompt (each reports its first token)
                    started.update(o.request_id for o in core.step())
                produced, steps = 0, []
                for _ in range(n):
                    t0 = _now()
                    outs = core.step()
                    steps.append(_now() - t0)
                    produced += sum(len(o.new_token_ids) for o in outs)
                for rid in ids:
                    core.abort(rid)
                rate = produced / sum(steps)
                if best is None or rate > best["engine_tok_s"]:
                    best = {"concurrency": c, "engine_tok_s": rate, "tokens": produced,
                            "step_ms_median": 1000 * sorted(steps)[len(steps) // 2]}  # fmt: skip
                if llama is not None:
                    prompts = [_prompt(gen, cfg.vocab_size, s.prompt_tokens) for _ in range(c)]
                    llama.measure_aggregate(server, prompts, n)
            if hf_dec:
                best["ratio_to_hf_batch1"] = best["engine_tok_s"] / hf_dec
                if c in LLAMA_CPP_RATIO["concurrency"]:
                    best["llama_cpp_ratio"] = LLAMA_CPP_RATIO["concurrency"][c]
            theirs = llama.aggregate.get(c) if llama is not None else None
            print(f"  {c} concurrent: {best['engine_tok_s']:.1f} tok/s"
                  + (f" (llama.cpp {max(x['tok_s'] for x in theirs):.1f})" if theirs else ""), flush=True)  # fmt: skip
            rows.append(best)
    core.pool.assert_no_leaks()
    return {"prompt_tokens": s.prompt_tokens, "decode_steps_timed": n, "hf_batch1_tok_s": hf_dec,
            "decode_step_compiled": core.decode_step_compiled,
            "waited_s_between_runs": sum(waits),
            "rows": rows, "target_16": TARGETS["concurrency_16"]}  # fmt: skip


# ---- optional: llama.cpp on the same weights ------------------------------------------------------


@dataclass
class _LlamaRun:
    """llama.cpp with this run's checkpoint converted (``_llama_prepare``), measured inside the engine's own
    rounds: its batch-1 decode and prefill once per round of those parts (``rounds``: one ``llama-bench``
    result each), its aggregate decode once per round of each concurrency (``aggregate``), each right after the
    engine's own measurement, so both see the same moment of this machine's drifting memory bandwidth."""

    llama: Any  # bench_llama_cpp.LlamaCpp
    gguf: Path
    info: dict
    rounds: dict[str, list[dict]] = field(default_factory=lambda: {"decode": [], "prefill": []})
    aggregate: dict[int, list[dict]] = field(default_factory=dict)  # concurrency -> one result per round

    error: str | None = None  # the first failure: llama.cpp is not run again, the engine's figures stand

    def _fail(self, e: Exception) -> None:
        print(f"  llama.cpp failed: {e}", flush=True)
        self.error = str(e)

    def measure(self, what: str, prompt: int, gen: int, depth: int) -> None:
        """One ``llama-bench`` repetition into ``rounds[what]``: prefill of ``prompt`` tokens, or ``gen``
        decodes after ``depth``."""
        from dsv32.engine.bench_llama_cpp import LlamaCppError

        if self.error is None:
            try:
                self.rounds[what].append(
                    self.llama.bench(self.gguf, self.info["threads"], prompt, gen, depth, repeats=1)
                )
            except LlamaCppError as e:
                self._fail(e)

    def start_server(self, stack: contextlib.ExitStack, slots: int, ctx: int) -> Any:
        """A ``llama-server`` of ``slots`` slots kept running until ``stack`` closes (None if it failed)."""
        from dsv32.engine.bench_llama_cpp import LlamaCppError

        if self.error is not None:
            return None
        try:
            return stack.enter_context(self.llama.server(self.gguf, self.info["threads"], slots, ctx))
        except LlamaCppError as e:
            self._fail(e)
            return None

    def measure_aggregate(self, server: Any, prompts: list[list[int]], decode: int) -> None:
        """One round of aggregate decode of ``len(prompts)`` concurrent requests into ``aggregate``."""
        from dsv32.engine.bench_llama_cpp import LlamaCppError

        if self.error is None and server is not None:
            try:
                self.aggregate.setdefault(len(prompts), []).append(server.aggregate(prompts, decode))
            except LlamaCppError as e:
                self._fail(e)

    @staticmethod
    def _best(rounds: list[dict]) -> dict:
        """The fastest round (as the engine's figures: best of the rounds), with every round's."""
        return {**max(rounds, key=lambda x: x["tok_s"]), "rounds_tok_s": [x["tok_s"] for x in rounds],
                "interleaved": True}  # fmt: skip

    def best(self, what: str) -> dict:
        """The fastest round of ``what`` ("decode", "prefill")."""
        return self._best(self.rounds[what])

    def best_aggregate(self) -> list[dict]:
        """The fastest round at each concurrency measured."""
        return [{"concurrency": c, **self._best(rs)} for c, rs in sorted(self.aggregate.items())]


def _llama_prepare(tmp: Path, s: Settings) -> _LlamaRun:
    from dsv32.engine.bench_llama_cpp import LlamaCpp
    from dsv32.weights.default_model import ensure_default_model

    llama = LlamaCpp(s.llama_cpp)
    info: dict[str, Any] = {
        "root": str(llama.root),
        "version": llama.version(),
        "threads": torch.get_num_threads(),
    }
    outtype = {"float32": "f32", "bfloat16": "bf16"}[s.dtype]
    t0 = _now()
    gguf = llama.convert(tmp / "main", ensure_default_model(), tmp / f"llama-cpp-{outtype}.gguf", outtype)
    info.update(gguf_outtype=outtype, convert_s=_now() - t0)
    return _LlamaRun(llama, gguf, info)


def _llama_cpp(run: _LlamaRun, s: Settings) -> dict:
    """llama.cpp's prefill, batch-1 decode and aggregate decode on this run's checkpoint, all measured in the
    engine's rounds (sized as the engine's parts; see ``bench_llama_cpp``)."""
    out, parts = dict(run.info), set(s.parts)
    if "prefill" in parts and run.rounds["prefill"]:
        out["prefill"] = {**run.best("prefill"), "prompt_tokens": s.prefill_tokens}
    if "decode" in parts and run.rounds["decode"]:
        out["decode"] = {
            **run.best("decode"),
            "decode_tokens": s.decode_tokens,
            "context_tokens": s.prompt_tokens,
        }
    if "concurrency" in parts and run.aggregate:
        out["concurrency"] = run.best_aggregate()
    return out


def _vs_llama_cpp(r: dict) -> None:
    """Add the engine / llama.cpp ratios (same run) to ``r['llama_cpp']``."""
    lc = r.get("llama_cpp")
    if not lc or "error" in lc:
        return
    if "decode" in lc and "decode" in r:
        lc["decode"]["engine_ratio"] = r["decode"]["engine_tok_s"] / lc["decode"]["tok_s"]
        if "compiled" in r["decode"]:
            lc["decode"]["compiled_engine_ratio"] = (
                r["decode"]["compiled"]["engine_tok_s"] / lc["decode"]["tok_s"]
            )
    if "prefill" in lc and "prefill" in r:
        lc["prefill"]["engine_ratio"] = r["prefill"]["engine_tok_s"] / lc["prefill"]["tok_s"]
    ours = {x["concurrency"]: x for x in r.get("concurrency", {}).get("rows", [])}
    for row in lc.get("concurrency", []):
        if row["concurrency"] in ours:
            row["engine_ratio"] = ours[row["concurrency"]]["engine_tok_s"] / row["tok_s"]


# ---- part 4: TTFT with the prefix cache -----------------------------------------------------------


def _prefix(ours, cfg, s: Settings, gen: torch.Generator) -> dict:
    n = s.ttft_prompt_tokens
    core = _engine(ours, 2 * (n + BLOCK_SIZE), 1, s.max_num_batched_tokens, s.cuda_graphs)
    prompt = _prompt(gen, cfg.vocab_size, n)
    graphs_warmed = core.runner.prefill_graphs is not None
    if graphs_warmed:  # another prompt of the length first: the cold TTFT is not the graphs' capture
        _first_token(core, "capture", _prompt(gen, cfg.vocab_size, n), 1)
        _drain(core)
    waits: list[float] = []
    _settle(s, waits)
    cold, o = _first_token(core, "cold", prompt, 1)
    _drain(core)
    cold_cached = o.cached_tokens
    print(f"  cold TTFT {cold:.2f}s", flush=True)
    warm, cached = [], None
    _settle(s, waits)
    for r in range(max(2, 2 * s.repeats)):
        dt, o = _first_token(core, f"warm{r}", prompt, 1)
        _drain(core)
        warm.append(dt)
        cached = o.cached_tokens
    print(f"  cached TTFT {min(warm):.3f}s ({cached} cached tokens)", flush=True)
    core.pool.assert_no_leaks()
    return {
        "prompt_tokens": n, "cold_ttft_s": cold, "cold_cached_tokens": cold_cached,
        "cached_ttft_s": min(warm), "cached_tokens": cached, "ratio": cold / min(warm),
        "target": TARGETS["prefix"], "cold_runs": 1, "cached_runs": len(warm), "waited_s_between_runs": sum(waits),
        "prefill_graphs_captured_first": graphs_warmed, "burst": _burst(ours, cfg, s, gen),
    }  # fmt: skip


def _burst(ours, cfg, s: Settings, gen: torch.Generator, copies: int = BURST_COPIES) -> dict:
    """``copies`` requests with one fresh prompt submitted together (n samples of a prompt, a burst with one
    system prompt) against that prompt's length alone: the time until all have their first token, and the
    prompt tokens computed (the scheduler runs a shared prefill once; the others wait and read the cache)."""
    n = s.prefill_tokens
    core = _engine(ours, copies * (n + 2 * BLOCK_SIZE), copies, s.max_num_batched_tokens, s.cuda_graphs)
    _first_token(core, "warmup", _prompt(gen, cfg.vocab_size, n), 1)  # GPU: the prefill graph's capture
    _drain(core)
    alone, together, computed, waits = [], [], 0, []
    for r in range(s.repeats):
        _settle(s, waits)
        alone.append(_first_token(core, f"alone{r}", _prompt(gen, cfg.vocab_size, n), 1)[0])
        _drain(core)
        prompt = _prompt(gen, cfg.vocab_size, n)  # fresh: nothing of it cached
        t0 = _now()
        for i in range(copies):
            core.add_request(f"burst{r}-{i}", list(prompt), _greedy(1))
        firsts = {}
        while len(firsts) < copies:
            for o in core.step():
                firsts.setdefault(o.request_id, o)
        together.append(_now() - t0)
        _drain(core)
        computed = sum(o.prompt_tokens - o.cached_tokens for o in firsts.values())
    core.pool.assert_no_leaks()
    print(f"  {copies} copies of a {n}-token prompt together: {min(together):.2f}s, alone {min(alone):.2f}s",
          flush=True)  # fmt: skip
    return {
        "copies": copies, "prompt_tokens": n, "alone_ttft_s": min(alone), "all_first_tokens_s": min(together),
        "ratio_to_alone": min(together) / min(alone), "prompt_tokens_computed": computed, "rounds": len(alone),
    }  # fmt: skip


# ---- part 5: DSA vs dense MLA at long context -------------------------------------------------


def attention_variant(config: dict) -> dict:
    """The config with 2 layers (1 dense + 1 MoE), the same attention dims, 4 small experts and a 2048-token
    vocabulary, so that a long-context decode step is dominated by attention, not weights."""
    v = copy.deepcopy(config)
    hidden = v["hidden_size"]
    v.update(
        num_hidden_layers=2, first_k_dense_replace=1, intermediate_size=hidden, n_routed_experts=4,
        num_experts_per_tok=2, n_group=1, topk_group=1, moe_intermediate_size=max(16, hidden // 4),
        n_shared_experts=1, vocab_size=min(2048, v["vocab_size"]), num_nextn_predict_layers=0,
    )  # fmt: skip
    return v


def measured_read_bandwidth(gib: float = 1.0, rounds: int = 7, device: torch.device | str = "cpu") -> float:
    """Bytes/s at which this machine streams memory into the cores (or a GPU its own memory): the median
    of ``rounds`` sums over a ``gib`` GiB fp32 tensor (far larger than the caches) with the torch threads
    the benchmark uses. The median, because single readings on a shared VM range from ~42 to ~78 GB/s."""
    x = torch.rand(int(gib * 2**30) // 4, device=device)
    times = []
    for _ in range(rounds):
        _sync(device)
        t0 = _now()
        x.sum()
        _sync(device)
        times.append(_now() - t0)
    return x.numel() * 4 / sorted(times)[len(times) // 2]


def decode_weight_bytes(model, all_experts: bool = False) -> int:
    """Bytes of weights one batch-1 decode step reads: everything but the embedding table (one row) and the
    routed experts a token does not use (num_experts_per_tok of n_routed_experts; all of them with
    ``all_experts``, as when many streams decode together), MTP layers excluded."""
    cfg = model.config
    n_main = cfg.num_hidden_layers
    total = 0.0
    for name, p in model.named_parameters():
        if name.startswith("model.embed_tokens"):
            continue
        if name.startswith("model.layers."):
            if int(name.split(".")[2]) >= n_main:
                continue
            if ".mlp.experts." in name:
                share = 1.0 if all_experts else cfg.num_experts_per_tok / cfg.n_routed_experts
                total += p.numel() * p.element_size() * share
                continue
        total += p.numel() * p.element_size()
    return int(total)


def predicted_bytes(cfg, n_layers: int, context: int, topk: int, elt: int, weights: int) -> dict:
    """Bytes one decode step reads, per the issue: per layer per token dense reads S·(d_c + d_r) latent values;
    DSA reads S·d_I indexer keys + min(S, topk)·(d_c + d_r) latent values; weights the same for both."""
    lat = cfg.kv_lora_rank + cfg.qk_rope_head_dim
    dense = weights + n_layers * context * lat * elt
    dsa = weights + n_layers * (context * cfg.index_head_dim + min(context, topk) * lat) * elt
    return {"dense_bytes": dense, "dsa_bytes": dsa, "ratio": dense / dsa}


def _set_topk(attns, k: int) -> None:
    for a in attns:
        a.indexer.topk = k


def _dsa(config: dict, tmp: Path, s: Settings, gen: torch.Generator) -> dict:
    import dsv32
    from dsv32.config import ModelConfig
    from dsv32.weights.synthetic import write_synthetic_checkpoint

    vconf = attention_variant(config)
    cfg = ModelConfig.from_dict(vconf)
    if not cfg.has_indexer:
        return {"skipped": f"{cfg.model_type} has no DSA indexer"}
    write_synthetic_checkpoint(cfg, tmp / "attn", seed=0, dtype=torch.bfloat16)
    model = dsv32.load_model(tmp / "attn", dtype=s.torch_dtype, device=s.device, progress=False)
    topk = cfg.index_topk
    K = s.long_decode_steps
    wanted = s.long_contexts or (2 * topk, 4 * topk)
    room = cfg.max_position_embeddings - (2 * K + 2)
    contexts = sorted({min(c, room) for c in wanted})
    attns = [model.model.layers[i].self_attn for i in range(cfg.num_hidden_layers)]
    weights = decode_weight_bytes(model)
    elt = torch.empty((), dtype=model.dtype).element_size()
    # (the long prefills only set the contexts up: eager, not captured as graphs for each length)
    cap = sum(contexts) + len(contexts) * (2 * K + 2)
    core = _engine(model, cap, 1, s.long_prefill_chunk, s.cuda_graphs, prefill_graphs=False)
    prompt = _prompt(gen, cfg.vocab_size, max(contexts))
    waits: list[float] = []
    try:
        rows = _dsa_rows(core, attns, cfg, contexts, prompt, s, waits, weights, elt, "")
        core.pool.assert_no_leaks()
        del core
        rows_compiled, compile_s = [], None
        # the same steps compiled (``serve --compile``): fewer, fused kernels on both sides
        if s.compile_decode:
            t0 = _now()
            compiled = _engine(
                model, cap, 1, s.long_prefill_chunk, s.cuda_graphs, compiled=True, prefill_graphs=False,
                max_model_len=max(contexts) + 2 * K + 2,
            )  # fmt: skip
            compile_s = _now() - t0
            if not compiled.decode_step_compiled:
                raise RuntimeError("--compile: the decode step could not be compiled (see the warning above)")
            rows_compiled = _dsa_rows(
                compiled, attns, cfg, contexts, prompt, s, waits, weights, elt, "compiled "
            )
            compiled.pool.assert_no_leaks()
    finally:
        _set_topk(attns, topk)
    return {
        "variant": {k: vconf[k] for k in ("num_hidden_layers", "hidden_size", "num_attention_heads",
                                          "kv_lora_rank", "qk_rope_head_dim", "index_head_dim",
                                          "index_n_heads", "index_topk", "n_routed_experts",
                                          "num_experts_per_tok", "moe_intermediate_size", "vocab_size")},
        "weight_bytes_per_step": weights, "decode_steps_timed": K, "prefill_chunk": s.long_prefill_chunk,
        "rows": rows, "target_fraction": TARGETS["dsa_fraction"], "waited_s_between_contexts": sum(waits),
        **({"rows_compiled": rows_compiled, "compiled_engine_start_s": compile_s} if rows_compiled else {}),
    }  # fmt: skip


def _dsa_rows(
    core, attns, cfg, contexts, prompt, s: Settings, waits, weights: int, elt: int, tag: str
) -> list[dict]:
    """Each context prefilled (dense), then DSA and dense decode steps alternating: one row per context."""
    topk, K = cfg.index_topk, s.long_decode_steps
    rows = []
    for ctx in contexts:
        _set_topk(attns, DENSE_TOPK)
        prefill_s, o = _first_token(core, f"ctx{ctx}", prompt[:ctx], 2 * K + 1)
        _settle(s, waits)
        times: dict[str, list[float]] = {"dsa": [], "dense": []}
        for i in range(K):  # alternate, and alternate which goes first
            order = ("dsa", "dense") if i % 2 == 0 else ("dense", "dsa")
            for mode in order:
                _set_topk(attns, topk if mode == "dsa" else DENSE_TOPK)
                t0 = _now()
                core.step()
                times[mode].append(_now() - t0)
        _drain(core)
        pred = predicted_bytes(cfg, cfg.num_hidden_layers, ctx, topk, elt, weights)
        dsa_ms, dense_ms = 1000 * min(times["dsa"]), 1000 * min(times["dense"])
        achieved = dense_ms / dsa_ms
        row = {
            "context": ctx, "prefill_s": prefill_s, "prefill_cached_tokens": o.cached_tokens,
            "dsa_step_ms": dsa_ms, "dense_step_ms": dense_ms,
            "dsa_step_ms_all": [1000 * x for x in times["dsa"]],
            "dense_step_ms_all": [1000 * x for x in times["dense"]],
            "achieved_ratio": achieved, "predicted_ratio": pred["ratio"],
            "fraction_of_predicted": achieved / pred["ratio"],
            "dense_bytes_per_step": pred["dense_bytes"], "dsa_bytes_per_step": pred["dsa_bytes"],
        }  # fmt: skip
        print(
            f"  {tag}context {ctx}: prefill {prefill_s:.1f}s ({o.cached_tokens} cached); step DSA {dsa_ms:.1f} ms, "
            f"dense {dense_ms:.1f} ms: {achieved:.2f}x vs {pred['ratio']:.2f}x predicted "
            f"({100 * row['fraction_of_predicted']:.0f}%)",
            flush=True,
        )
        rows.append(row)
    return rows


# ---- the whole benchmark ------------------------------------------------------------------------


def bench_engine(config: dict, out_dir: Path, settings: Settings | None = None) -> dict:
    """Run the selected parts on ``config`` (an HF config dict) and write bench_engine.{json,md,png}."""
    import dsv32
    from dsv32.config import ModelConfig
    from dsv32.presets import PRESETS
    from dsv32.weights.synthetic import write_synthetic_checkpoint

    s = settings or Settings()
    unknown = set(s.parts) - set(PARTS)
    if unknown:
        raise ValueError(f"unknown benchmark part(s) {sorted(unknown)}; available: {', '.join(PARTS)}")
    cfg = ModelConfig.from_dict(config)
    gen = torch.Generator().manual_seed(0)
    t_start = _now()
    result: dict[str, Any] = {
        "benchmark": "engine",
        "date": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "machine": {"cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
                    "torch": torch.__version__, "load_avg_start": _load_avg()},
        "config": {"model_type": cfg.model_type, "hidden_size": cfg.hidden_size, "layers": cfg.num_hidden_layers,
                   "index_topk": cfg.index_topk, "vocab_size": cfg.vocab_size},
        "dtype": s.dtype,
        "device": s.device if s.device == "cpu" else f"{s.device} ({torch.cuda.get_device_name(s.device)})",
        # the bench README's HF / llama.cpp figures are for this model in fp32 on the 2-core CPU machine kind
        "readme_peers_apply": config == PRESETS["bench-small"] and s.device == "cpu" and s.dtype == "float32",
        "settings": asdict(s),
    }  # fmt: skip
    main_parts = {"decode", "prefill", "concurrency", "prefix"} & set(s.parts)
    with tempfile.TemporaryDirectory(prefix="dsv32-bench-engine-") as tmp:
        tmp = Path(tmp)
        if main_parts:
            print(f"writing a synthetic checkpoint ({cfg.model_type}, hidden {cfg.hidden_size}, "
                  f"{cfg.num_hidden_layers} layers) ...", flush=True)  # fmt: skip
            write_synthetic_checkpoint(cfg, tmp / "main", seed=0, dtype=torch.bfloat16)
            ours = dsv32.load_model(tmp / "main", dtype=s.torch_dtype, device=s.device, progress=False)
            hf, llama = None, None
            if s.llama_cpp and {"decode", "prefill", "concurrency"} & set(s.parts):
                from dsv32.engine.bench_llama_cpp import LlamaCppError

                print(
                    f"llama.cpp on the same weights ({s.llama_cpp}): converting the checkpoint ...",
                    flush=True,
                )
                try:
                    llama = _llama_prepare(tmp, s)
                except LlamaCppError as e:  # the engine's figures are still written, with the reason
                    print(f"  llama.cpp failed: {e}", flush=True)
                    result["llama_cpp"] = {"error": str(e)}
            if main_parts & {"decode", "prefill", "concurrency"}:
                from transformers import AutoModelForCausalLM

                hf = (
                    AutoModelForCausalLM.from_pretrained(tmp / "main", dtype=s.torch_dtype)
                    .to(s.device)
                    .eval()
                )
                print("batch-1 decode and prefill (engine vs HF generate) ...", flush=True)
                with _part(result, "decode+prefill", s):
                    result.update(_decode_and_prefill(ours, hf, cfg, s, gen, llama))
                del hf
                gc.collect()
            if "concurrency" in s.parts:
                print("aggregate decode at each concurrency ...", flush=True)
                with _part(result, "concurrency", s):
                    hf_dec = result.get("hf_batch1_decode_tok_s")
                    result["concurrency"] = _concurrency(ours, cfg, s, gen, hf_dec, llama)
            if llama is not None:  # a failure in a round stopped it there: its reason is the result
                result["llama_cpp"] = {"error": llama.error} if llama.error else _llama_cpp(llama, s)
                llama.gguf.unlink(missing_ok=True)  # the size of the weights again: not kept
            if "prefix" in s.parts:
                print(f"TTFT of a {s.ttft_prompt_tokens}-token prompt, cold and cached ...", flush=True)
                with _part(result, "prefix", s):
                    result["prefix"] = _prefix(ours, cfg, s, gen)
            del ours
            gc.collect()
        if "dsa" in s.parts:
            print("decode step at long context, DSA vs dense (attention-dominated variant) ...", flush=True)
            with _part(result, "dsa", s):
                result["dsa"] = _dsa(config, tmp, s, gen)
    result["machine"]["load_avg_end"] = _load_avg()
    result["wall_s"] = _now() - t_start
    _vs_llama_cpp(result)
    result["targets"] = _targets(result)
    out_dir.mkdir(parents=True, exist_ok=True)
    result["plot"] = _plot(result, out_dir / "bench_engine.png")
    (out_dir / "bench_engine.json").write_text(json.dumps(result, indent=1))
    (out_dir / "bench_engine.md").write_text(markdown(result))
    return result


def _targets(r: dict) -> list[dict]:
    """One row per issue target: name, value, target, met (None when the part did not run)."""
    rows = []

    def add(name: str, value: float | None, target: float, unit: str = "x") -> None:
        rows.append({"name": name, "value": value, "target": target, "unit": unit,
                     "met": None if value is None else bool(value >= target)})  # fmt: skip

    add("batch-1 decode vs HF generate", r.get("decode", {}).get("ratio"), TARGETS["decode"])
    if "compiled" in r.get("decode", {}):
        add("batch-1 decode vs HF generate, compiled decode step (`--compile`)", r["decode"]["compiled"]["ratio"],
            TARGETS["decode"])  # fmt: skip
    n_pre = r.get("prefill", {}).get("prompt_tokens", r["settings"]["prefill_tokens"])
    add(f"prefill {n_pre} tokens vs HF", r.get("prefill", {}).get("ratio"), TARGETS["prefill"])
    if "compiled" in r.get("prefill", {}):
        add(f"prefill {n_pre} tokens vs HF, compiled around attention (`--compile`)",
            r["prefill"]["compiled"]["ratio"], TARGETS["prefill"])  # fmt: skip
    c16 = [x for x in r.get("concurrency", {}).get("rows", []) if x["concurrency"] == 16]
    add("16-stream aggregate decode vs HF batch-1", c16[0].get("ratio_to_hf_batch1") if c16 else None,
        TARGETS["concurrency_16"])  # fmt: skip
    n_ttft = r.get("prefix", {}).get("prompt_tokens", r["settings"]["ttft_prompt_tokens"])
    add(f"TTFT {n_ttft}-token prompt, cold / cached", r.get("prefix", {}).get("ratio"), TARGETS["prefix"])
    for row in r.get("dsa", {}).get("rows", []):
        add(f"DSA vs dense decode step at {row['context']} context, fraction of predicted",
            row["fraction_of_predicted"], TARGETS["dsa_fraction"], "fraction")  # fmt: skip
    for row in r.get("dsa", {}).get("rows_compiled", []):
        add(f"DSA vs dense decode step at {row['context']} context, fraction of predicted, compiled (`--compile`)",
            row["fraction_of_predicted"], TARGETS["dsa_fraction"], "fraction")  # fmt: skip
    return rows


# ---- outputs -------------------------------------------------------------------------------------


def _plot(r: dict, path: Path) -> str:
    """Aggregate decode tok/s vs concurrency (and DSA vs dense step time); returns what happened."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        note = "matplotlib is not installed (pip install 'dsv32[bench]'): PNG skipped"
        print(f"note: {note}")
        return note
    conc = r.get("concurrency", {}).get("rows", [])
    dsa = r.get("dsa", {}).get("rows", [])
    if not conc and not dsa:
        return "no concurrency or DSA results: PNG skipped"
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    ax = axes[0]
    if conc:
        xs = [x["concurrency"] for x in conc]
        ax.plot(xs, [x["engine_tok_s"] for x in conc], "o-", label="dsv32 engine (aggregate)")
        hf = r.get("hf_batch1_decode_tok_s")
        if hf:
            ax.axhline(hf, color="gray", ls="--", label=f"HF generate batch-1 ({hf:.1f} tok/s)")
            ax.plot(
                [16], [TARGETS["concurrency_16"] * hf], "r*", ms=12, label="target at 16 (60x this run's HF)"
            )
        if r.get("readme_peers_apply"):
            lx = sorted(LLAMA_CPP_TOK_S)
            ax.plot(lx, [LLAMA_CPP_TOK_S[c] for c in lx], "s:", color="tab:green",
                    label="llama.cpp (README, same machine kind, tok/s)")  # fmt: skip
        b = r.get("bandwidth")
        if b:
            ax.plot([1, 16], [b["batch1_limit_tok_s"], b["limit_16_streams_tok_s"]], "kv", ms=7,
                    label=f"weights at {b['measured_bytes_per_s'] / 1e9:.0f} GB/s (limit)")  # fmt: skip
        ax.set_xscale("log", base=2)
        ticks = sorted(set(xs) | {1, 16})
        ax.set_xticks(ticks, [str(x) for x in ticks])
        ax.set_yscale("log")
        ax.set_xlabel("concurrent requests")
        ax.set_ylabel("decode tok/s")
        ax.set_title("Aggregate decode throughput")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    ax = axes[1]
    if dsa:
        xs = [x["context"] for x in dsa]
        ax.plot(xs, [x["dsa_step_ms"] for x in dsa], "o-", label="DSA (indexer top-k)")
        ax.plot(xs, [x["dense_step_ms"] for x in dsa], "s-", label="dense MLA (indexer off)")
        ax.set_xscale("log", base=2)
        ax.set_xticks(xs, [f"{round(x / 1024)}K" if x >= 1024 else str(x) for x in xs])
        ax.set_xlabel("context tokens")
        ax.set_ylabel("decode step ms")
        ax.set_title("Long-context decode step (attention variant)")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"dsv32 bench engine — {r['date']} ({r['dtype']}, {r['machine']['threads']} threads)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return f"wrote {path.name}"


def _reference_lines(r: dict) -> list[str]:
    """What bounds the ratios: the HF figures the targets assumed, and the weights' memory-bandwidth limit."""
    b, hf = r.get("bandwidth"), r.get("hf_batch1_decode_tok_s")
    peers = r.get("readme_peers_apply", True)  # the README's figures are for the 2-core CPU kind, fp32
    out = ["", "Context for the ratios (not the targets' basis, which is HF in this run):"]
    if "decode" in r and peers:
        d = r["decode"]
        out.append(
            f"- The targets were set against HF at {README_HF['decode_tok_s']} tok/s decode and "
            f"{README_HF['prefill_tok_s']:g} tok/s prefill (shared/bench/README.md); this run's HF decodes at "
            f"{d['hf_tok_s']:.1f} tok/s. Against the README figures the engine is {d['ratio_to_readme_hf']:.1f}× "
            "(decode)"
            + (f" and {r['prefill']['ratio_to_readme_hf']:.1f}× (prefill)." if "prefill" in r else ".")
        )
    if b and hf:
        out.append(
            f"- A batch-1 decode step reads {b['batch1_weight_bytes'] / 2**20:.0f} MiB of weights (lm_head "
            f"{b['lm_head_bytes'] / 2**20:.0f} MiB of it): at the {b['measured_bytes_per_s'] / 1e9:.0f} GB/s this "
            f"machine streams memory in this run (median sum over 1 GiB"
            + (f"; the bench README says ~{b['readme_bytes_per_s'] / 1e9:.0f} GB/s" if peers else "")
            + ") that caps "
            f"batch-1 decode at {b['batch1_limit_tok_s']:.1f} tok/s = {b['batch1_limit_tok_s'] / hf:.1f}× this "
            f"run's HF; 16 streams touch all experts ({b['all_experts_weight_bytes'] / 2**20:.0f} MiB per step): "
            f"{b['limit_16_streams_tok_s']:.0f} tok/s = {b['limit_16_streams_tok_s'] / hf:.1f}× this run's HF."
        )
        if "decode" in r:
            out.append(
                f"- The engine's batch-1 decode streams weights at {r['decode']['engine_weight_GB_s']:.1f} GB/s."
            )
    if "step_breakdown" in r.get("decode", {}):
        out.append(_breakdown_line(r))
    return out if len(out) > 2 else []


def _breakdown_line(r: dict) -> str:
    sb = r["decode"]["step_breakdown"]
    line = (
        f"- Where a batch-1 decode step's time goes: {sb['step_ms']:.1f} ms = its {sb['packed_matmuls']} packed "
        f"matmuls replayed alone, {sb['matmuls_alone_ms']:.1f} ms ({sb['matmul_weight_bytes'] / 2**20:.0f} MiB at "
        f"{sb['matmul_GB_s']:.1f} GB/s), + the rest of the step, {sb['rest_ms']:.1f} ms (the other ops, the Python "
        "around them, sampling)"
    )
    if "compiled_step_ms" in sb:
        line += f"; the compiled step: {sb['compiled_step_ms']:.1f} ms, of which the rest {sb['compiled_rest_ms']:.1f} ms"
    lc = (r.get("llama_cpp") or {}).get("decode")
    if lc:
        line += f"; llama.cpp's whole step in this run: {1000 / lc['tok_s']:.1f} ms"
    return line + "."


def _timing_lines(r: dict) -> list[str]:
    pt = r.get("part_timing")
    if not pt:
        return []

    def one(k: str, v: dict) -> str:
        la0, la1 = (v[x][0] if v[x] else "?" for x in ("load_avg_start", "load_avg_end"))
        busy = "?" if v.get("cpu_busy_before") is None else f"{100 * v['cpu_busy_before']:.0f}%"
        return f"{k} {v['wall_s']:.0f} s (waited {v['waited_s']:.0f} s, CPUs then {busy} busy; load {la0} → {la1})"

    return [
        f"Parts: {'; '.join(one(k, v) for k, v in pt.items())}. On a 2-core machine with 2 torch threads any "
        "other runnable process stalls every parallel op, so a part run under load can read several times "
        "slower than on a quiet machine: each part first waits (up to a limit) for the CPUs to go idle, and "
        "each ratio compares figures from one window.",
        "",
    ]


def _met(x: bool | None) -> str:
    return "not run" if x is None else ("**met**" if x else "not met")


def markdown(r: dict) -> str:
    s = r["settings"]
    peers = r.get("readme_peers_apply", True)  # the README's llama.cpp ratios: bench-small, fp32, 2-core CPU
    lines = [
        f"# dsv32 bench engine — {r['date']}",
        "",
        f"Config: {r['config']}; {r['dtype']} on {r.get('device', 'cpu')}"
        + (
            ""
            if r.get("device", "cpu") == "cpu"
            else f" (decode and one-chunk prefill steps {'from CUDA graphs' if s.get('cuda_graphs', False) else 'eager'})"
        )
        + f"; {r['machine']['threads']} threads; "
        f"torch {r['machine']['torch']}; "
        f"load average {r['machine']['load_avg_start']} at start, {r['machine']['load_avg_end']} at end; "
        f"{r['wall_s'] / 60:.1f} min in all. Best of {s['repeats']} rounds unless said otherwise"
        + (" (**--quick smoke run: figures mean little**)." if s["quick"] else "."),
        "",
        *_timing_lines(r),
        "## Targets (issue 5)",
        "",
        "| measurement | value | target | |",
        "|---|---|---|---|",
    ]
    for t in r["targets"]:
        v = (
            "–"
            if t["value"] is None
            else (f"{t['value']:.2f}×" if t["unit"] == "x" else f"{100 * t['value']:.0f}%")
        )
        tgt = f"≥ {t['target']:g}×" if t["unit"] == "x" else f"≥ {100 * t['target']:.0f}%"
        lines.append(f"| {t['name']} | {v} | {tgt} | {_met(t['met'])} |")
    if "decode" in r or "prefill" in r:
        lines += ["", "## Batch-1 decode and prefill, engine vs HF transformers (same run, same weights)", "",
                  "| measurement | dsv32 engine | HF transformers | ratio |" + (" llama.cpp (README) |" if peers else ""),
                  "|---|---|---|---|" + ("---|" if peers else "")]  # fmt: skip
        if "decode" in r:
            d = r["decode"]
            runs = [
                (
                    f"batch-1 decode tok/s ({d['decode_tokens']} tokens after a {d['prompt_tokens']}-token prompt)",
                    d,
                )
            ]
            if "compiled" in d:
                c = d["compiled"]
                runs.append(
                    (
                        f"the same, compiled decode step (`--compile`; engine start {c['engine_start_s']:.0f} s)",
                        c,
                    )
                )
            for name, x in runs:
                lines.append(
                    f"| {name} | {x['engine_tok_s']:.2f} | {d['hf_tok_s']:.2f} | **{x['ratio']:.2f}×** |"
                    + (f" {d['llama_cpp_ratio']:.1f}× |" if peers else "")
                )
        if "prefill" in r:
            p = r["prefill"]
            lines.append(
                f"| prefill {p['prompt_tokens']} tokens: TTFT s (tok/s) | {p['engine_ttft_s']:.3f} "
                f"({p['engine_tok_s']:.0f}) | {p['hf_ttft_s']:.3f} ({p['hf_tok_s']:.0f}) | **{p['ratio']:.2f}×** |"
                + (f" {p['llama_cpp_ratio']:.1f}× |" if peers else "")
            )
            if "eager" in p:
                e = p["eager"]
                lines.append(
                    f"| the same, eager (no prefill graphs) | {e['engine_ttft_s']:.3f} ({e['engine_tok_s']:.0f}) "
                    f"| {p['hf_ttft_s']:.3f} ({p['hf_tok_s']:.0f}) | **{e['ratio']:.2f}×** |"
                    + (" – |" if peers else "")
                )
            if "compiled" in p:
                c = p["compiled"]
                lines.append(
                    f"| the same, compiled around attention (`--compile`; engine start {c['engine_start_s']:.0f} s) "
                    f"| {c['engine_ttft_s']:.3f} ({c['engine_tok_s']:.0f}) | {p['hf_ttft_s']:.3f} "
                    f"({p['hf_tok_s']:.0f}) | **{c['ratio']:.2f}×** |" + (" – |" if peers else "")
                )
        if "decode" in r:
            same = f"Same greedy tokens from engine and HF: {r['decode']['same_greedy_tokens']}"
            if "compiled" in r["decode"]:
                c = r["decode"]["compiled"]
                same += (f"; from the compiled step and HF: {c['same_greedy_tokens']}. The compiled step is "
                         f"{c['vs_eager']:.2f}× the uncompiled one (decodes alternate in each round)")  # fmt: skip
            lines += ["", same + "."]
        if "eager" in r.get("prefill", {}):
            e = r["prefill"]["eager"]
            lines += ["", f"The first row's prefill replays a CUDA graph (one-chunk prefills, `PrefillGraphs`): "
                      f"{e['graphs_vs_eager']:.2f}× the eager prefill (alternating in each round); same first token "
                      f"in every round: {e['same_first_token_as_graphs']}."]  # fmt: skip
        if "compiled" in r.get("prefill", {}):
            c = r["prefill"]["compiled"]
            lines += ["", f"The compiled prefill is {c['vs_eager']:.2f}× the eager one (alternating in each round); "
                      f"same first token as the eager engine in every round: {c['same_first_token_as_eager']}."]  # fmt: skip
        lines += _reference_lines(r)
    if "concurrency" in r:
        c = r["concurrency"]
        lines += ["", "## Aggregate decode vs concurrency", "",
                  f"Each request: a {c['prompt_tokens']}-token prompt; all prompts prefilled first, then "
                  f"{c['decode_steps_timed']} decode steps timed (the issue fixes no N; chosen to fit the time budget). "
                  "Ratio to HF `generate` batch-1 decode of this run. "
                  + ("The engine `serve` runs by default: its compiled decode step where one request decodes "
                     "(`--compile`), eager steps for several." if c.get("decode_step_compiled") else
                     "Eager steps (`--enforce-eager`; `bench engine --compile` measures the compiled one-request "
                     "step that `serve` runs by default)."), "",
                  "| concurrent requests | engine tok/s | median step ms | × HF batch-1 |"
                  + (" llama.cpp (README) |" if peers else ""),
                  "|---|---|---|---|" + ("---|" if peers else "")]  # fmt: skip
        for x in c["rows"]:
            ratio = f"{x['ratio_to_hf_batch1']:.1f}×" if "ratio_to_hf_batch1" in x else "–"
            llama = f" {x['llama_cpp_ratio']:.1f}× |" if "llama_cpp_ratio" in x else " – |"
            lines.append(
                f"| {x['concurrency']} | {x['engine_tok_s']:.1f} | {x['step_ms_median']:.0f} | {ratio} |"
                + (llama if peers else "")
            )
    if "prefix" in r:
        p = r["prefix"]
        lines += ["", "## Prefix cache: TTFT of the same prompt cold and fully cached", "",
                  f"{p['prompt_tokens']}-token prompt; cold once ({p['cold_cached_tokens']} cached tokens), then "
                  f"resubmitted {p['cached_runs']}× (best shown; {p['cached_tokens']} prompt tokens reported "
                  "cached — the engine always recomputes at least the last partial block)."
                  + (" Another prompt of the same length ran first, so the cold TTFT does not include capturing "
                     "the prefill's CUDA graphs." if p.get("prefill_graphs_captured_first") else ""), "",
                  "| cold TTFT s | cached TTFT s | ratio |", "|---|---|---|",
                  f"| {p['cold_ttft_s']:.2f} | {p['cached_ttft_s']:.3f} | **{p['ratio']:.1f}×** |"]  # fmt: skip
        if "burst" in p:
            b = p["burst"]
            lines += ["", f"{b['copies']} requests with one fresh {b['prompt_tokens']}-token prompt submitted together "
                      "(as `n` samples of a prompt, or a burst with one system prompt) against the same length "
                      "alone: the shared prefill runs once, the other copies wait for its blocks and read them "
                      f"from the cache (best of {b['rounds']}).", "",
                      "| alone: TTFT s | together: all first tokens s | ratio | prompt tokens computed |",
                      "|---|---|---|---|",
                      f"| {b['alone_ttft_s']:.2f} | {b['all_first_tokens_s']:.2f} | {b['ratio_to_alone']:.2f}× | "
                      f"{b['prompt_tokens_computed']} of {b['copies'] * b['prompt_tokens']} |"]  # fmt: skip
    if "dsa" in r:
        d = r["dsa"]
        if "skipped" in d:
            lines += ["", f"## DSA vs dense: skipped ({d['skipped']})"]
        else:
            lines += ["", "## Decode step at long context: DSA vs dense MLA", "",
                      f"Attention-dominated variant: {d['variant']}; weights read per step "
                      f"{d['weight_bytes_per_step'] / 2**20:.1f} MiB. Dense = every layer's `indexer.topk` set past "
                      "the context. Each context is prefilled once (dense, chunks of "
                      f"{d['prefill_chunk']}; longer ones reuse shorter ones via the prefix cache), then "
                      f"{d['decode_steps_timed']} DSA and {d['decode_steps_timed']} dense decode steps alternate "
                      "(best shown). Predicted ratio = bytes read per step, dense / DSA: per layer per token, dense "
                      "S·(kv_lora_rank + qk_rope_head_dim), DSA S·index_head_dim + min(S, topk)·(kv_lora_rank + "
                      "qk_rope_head_dim), plus the weights.", "",
                      "| context | DSA step ms | dense step ms | achieved dense/DSA | predicted by bytes | fraction | prefill s |",
                      "|---|---|---|---|---|---|---|"]  # fmt: skip
            for x in d["rows"]:
                lines.append(
                    f"| {x['context']} | {x['dsa_step_ms']:.1f} | {x['dense_step_ms']:.1f} | {x['achieved_ratio']:.2f}× "
                    f"| {x['predicted_ratio']:.2f}× | **{100 * x['fraction_of_predicted']:.0f}%** | {x['prefill_s']:.1f} |"
                )
            if d.get("rows_compiled"):
                lines += ["", f"The same with the compiled decode step (`--compile`; engine start "
                          f"{d['compiled_engine_start_s']:.0f} s; both sides compiled):", "",
                          "| context | DSA step ms | dense step ms | achieved dense/DSA | predicted by bytes | fraction |",
                          "|---|---|---|---|---|---|"]  # fmt: skip
                for x in d["rows_compiled"]:
                    lines.append(
                        f"| {x['context']} | {x['dsa_step_ms']:.1f} | {x['dense_step_ms']:.1f} | "
                        f"{x['achieved_ratio']:.2f}× | {x['predicted_ratio']:.2f}× | "
                        f"**{100 * x['fraction_of_predicted']:.0f}%** |"
                    )
    lines += _llama_cpp_lines(r)
    lines += ["", f"Plot: {r.get('plot', '–')}.", ""]
    return "\n".join(lines)


# What the ratio targets stand for, in llama.cpp's terms (its text): batch-1 decode 9x HF and prefill
# 3.6x HF are "llama.cpp parity"; 16 streams 60x HF batch-1 is "1.5x llama.cpp's 16 slots".
LLAMA_CPP_INTENT = {"decode": 1.0, "prefill": 1.0, 16: 1.5}


def _llama_cpp_lines(r: dict) -> list[str]:
    lc = r.get("llama_cpp")
    if not lc:
        return []
    if "error" in lc:
        return ["", "## llama.cpp on the same weights, this run", "", f"Failed: {lc['error']}"]
    lines = ["", "## llama.cpp on the same weights, this run", "",
             f"{lc['version']}; GGUF {lc['gguf_outtype']} converted from this run's checkpoint by the tree's own "
             f"converter ({lc['convert_s']:.0f} s); {lc['threads']} threads. Each measurement runs once in each of the "
             "engine's rounds, right after the engine's own, and the best round is shown, as the engine's. Batch-1 "
             "decode and prefill: `llama-bench -r 1`; aggregate decode: one `llama-server -np "
             f"{max(r['settings']['concurrency'])}` (idle between its rounds) with as many concurrent `/completion` "
             "requests of id prompts as the engine serves in that round (Σ predicted tokens / the longest decode "
             "time). The issue's ratio targets stand for "
             "llama.cpp parity (decode, prefill) and 1.5× llama.cpp (16 streams): measured here directly.", "",
             "| measurement | dsv32 engine | llama.cpp | engine / llama.cpp | the targets' intent |",
             "|---|---|---|---|---|"]  # fmt: skip

    def row(name: str, ours: float | None, theirs: dict, intent: float | None) -> None:
        ratio = theirs.get("engine_ratio")
        met = "" if intent is None or ratio is None else f"≥ {intent:g}×: {_met(ratio >= intent)}"
        lines.append(
            f"| {name} | {'–' if ours is None else f'{ours:.1f}'} | {theirs['tok_s']:.1f} "
            f"| {'–' if ratio is None else f'**{ratio:.2f}×**'} | {met} |"
        )

    if "decode" in lc:
        d = lc["decode"]
        row(f"batch-1 decode tok/s ({d['decode_tokens']} tokens at {d['context_tokens']} context)",
            r.get("decode", {}).get("engine_tok_s"), d, LLAMA_CPP_INTENT["decode"])  # fmt: skip
        if "compiled" in r.get("decode", {}):
            row("the same, compiled decode step (`--compile`)", r["decode"]["compiled"]["engine_tok_s"],
                {**d, "engine_ratio": d.get("compiled_engine_ratio")}, LLAMA_CPP_INTENT["decode"])  # fmt: skip
    if "prefill" in lc:
        row(f"prefill {lc['prefill']['prompt_tokens']} tokens tok/s", r.get("prefill", {}).get("engine_tok_s"),
            lc["prefill"], LLAMA_CPP_INTENT["prefill"])  # fmt: skip
    ours = {x["concurrency"]: x["engine_tok_s"] for x in r.get("concurrency", {}).get("rows", [])}
    for x in lc.get("concurrency", []):
        row(f"{x['concurrency']} concurrent: aggregate decode tok/s", ours.get(x["concurrency"]), x,
            LLAMA_CPP_INTENT.get(x["concurrency"]))  # fmt: skip
    return lines


# ---- CLI -------------------------------------------------------------------------------------------


def positive_ints(text: str | None) -> tuple[int, ...] | None:
    """A CLI list such as "1,4,16" -> (1, 4, 16); ValueError naming the text otherwise (None passes)."""
    if text is None:
        return None
    try:
        vals = tuple(int(x) for x in text.replace(" ", "").split(",") if x)
    except ValueError:
        raise ValueError(f"expected comma-separated integers, got {text!r}") from None
    if not vals or min(vals) < 1:
        raise ValueError(f"expected positive integers, got {text!r}")
    return vals


def main_bench_engine(args: argparse.Namespace) -> int:
    """``dsv32 bench engine`` (the CLI parses the arguments; missing ones take the defaults)."""
    from dsv32.presets import resolve_preset

    config = resolve_preset(getattr(args, "config", None) or "bench-small")
    s = Settings.quick_run() if getattr(args, "quick", False) else Settings()
    over: dict[str, Any] = {}
    if getattr(args, "parts", None):
        over["parts"] = tuple(p.strip() for p in args.parts.split(",") if p.strip())
    if getattr(args, "repeats", None):
        over["repeats"] = args.repeats
    if getattr(args, "decode", None):
        over["decode_tokens"] = args.decode
    if getattr(args, "concurrency", None):
        over["concurrency"] = positive_ints(args.concurrency)
    if getattr(args, "ttft_prompt", None):
        over["ttft_prompt_tokens"] = args.ttft_prompt
    if getattr(args, "contexts", None):
        over["long_contexts"] = positive_ints(args.contexts)
    if getattr(args, "device", None):
        if args.device.startswith("cuda") and not torch.cuda.is_available():
            raise ValueError(f"--device {args.device}: this machine has no CUDA device")
        over["device"] = args.device
    if getattr(args, "dtype", None):
        over["dtype"] = args.dtype
    if getattr(args, "enforce_eager", False):
        over["cuda_graphs"] = False
    if getattr(args, "compile", False):
        if getattr(args, "enforce_eager", False) and torch.device(over.get("device", s.device)).type != "cpu":
            raise ValueError("--compile on a GPU compiles the CUDA-graph step: not with --enforce-eager")
        over["compile_decode"] = True
    if getattr(args, "quiet_wait", None) is not None:
        if args.quiet_wait < 0:
            raise ValueError(f"--quiet-wait must be >= 0 seconds, got {args.quiet_wait}")
        over["quiet_wait_s"], over["quiet_wait_step_s"] = args.quiet_wait, args.quiet_wait / 2
    if getattr(args, "llama_cpp", None):
        from dsv32.engine.bench_llama_cpp import LlamaCpp

        LlamaCpp(args.llama_cpp)  # fails now, not after the engine's parts, if the tree is not usable
        over["llama_cpp"] = args.llama_cpp
    s = replace(s, **over)
    r = bench_engine(config, Path(getattr(args, "out", None) or "benchmarks/results"), s)
    print(markdown(r))
    return 0


__all__ = ["PARTS", "Settings", "attention_variant", "bench_engine", "main_bench_engine", "markdown"]
