"""llama.cpp on the same weights, in the same run: the C++ bar of ``dsv32 bench engine --llama-cpp DIR``.

The bench README gives llama.cpp's figures on bench-small as ratios to an HF baseline measured elsewhere; this
module measures llama.cpp itself beside the engine, so the comparison needs no second machine's numbers.

``DIR`` is a llama.cpp source tree with ``llama-bench`` and ``llama-server`` built (``build/bin``), e.g. the
sources the ``llama-cpp-python`` sdist vendors::

    pip download --no-deps --no-binary :all: llama-cpp-python && tar xzf llama_cpp_python-*.tar.gz
    cd llama_cpp_python-*/vendor/llama.cpp
    cmake -B build -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=ON -DLLAMA_CURL=OFF
    cmake --build build -j --target llama-bench llama-server

The bench's HF checkpoint is converted with the tree's own ``convert_hf_to_gguf.py`` (``--outtype`` f32 or
bf16, as the run's dtype). Two things the converter needs that a synthetic checkpoint lacks: a tokenizer (the
embedded default model's, the real V3.2 vocabulary) and ``add_bos_token`` — which transformers 5 drops from
``tokenizer_config.json`` whenever a ``tokenizer.json`` exists, so the converter runs under a shim that passes
it to ``AutoTokenizer.from_pretrained``. Tokenization does not affect any timing here: every prompt is ids.

Measurements (threads = torch's):
* ``llama-bench -p N -n 0`` — prefill of N tokens (its defaults otherwise: batch 2048, micro-batch 512);
* ``llama-bench -p 0 -n M -d P`` — M decode tokens after P tokens of context;
* ``llama-server -np C`` (``LlamaCpp.server``) and up to C concurrent ``/completion`` requests of id prompts
  (greedy, ``ignore_eos``) — aggregate decode = Σ predicted tokens / the longest request's decode time (they
  decode together).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

_CONVERT_SHIM = """\
import runpy, sys, transformers
_orig = transformers.AutoTokenizer.from_pretrained.__func__
transformers.AutoTokenizer.from_pretrained = classmethod(
    lambda cls, *a, **k: _orig(cls, *a, **{"add_bos_token": True, **k}))
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


class LlamaCppError(OSError):
    """llama.cpp could not be prepared or run; the message says which step and shows its output's tail (an
    OSError: the CLI reports it as one ``error:`` line, like a missing file)."""


class LlamaCpp:
    """A built llama.cpp source tree: its converter, ``llama-bench`` and ``llama-server``."""

    def __init__(self, root: str | Path):
        self.root = Path(root).expanduser().resolve()
        self.convert_script = self.root / "convert_hf_to_gguf.py"
        if not self.convert_script.is_file():
            raise LlamaCppError(f"{self.root}: no convert_hf_to_gguf.py (expected a llama.cpp source tree)")
        self.llama_bench = self._binary("llama-bench")
        self.llama_server = self._binary("llama-server")

    def _binary(self, name: str) -> Path:
        for d in ("build/bin", "build/bin/Release", "bin"):
            p = self.root / d / name
            if p.is_file() and os.access(p, os.X_OK):
                return p
        raise LlamaCppError(
            f"{self.root}: {name} is not built (cmake --build build --target llama-bench llama-server)"
        )

    def version(self) -> str:
        out = _run([str(self.llama_bench), "--version"], "llama-bench --version", timeout=60, check=False)
        lines = [ln for ln in out.splitlines() if "version" in ln.lower()]
        return lines[0].strip() if lines else "unknown"

    # ---- conversion ------------------------------------------------------------------------------------

    def convert(self, hf_dir: Path, tokenizer_dir: Path, out: Path, outtype: str = "f32") -> Path:
        """Convert the HF checkpoint ``hf_dir`` (weights + config) to GGUF ``out``, with the tokenizer files of
        ``tokenizer_dir``. Returns ``out``."""
        stage = out.parent / f"{out.stem}-hf"
        stage.mkdir(parents=True, exist_ok=True)
        for f in hf_dir.iterdir():  # weights by link: no second copy of the checkpoint
            if f.is_file() and not (stage / f.name).exists():
                (stage / f.name).symlink_to(f.resolve())
        shutil.copy(tokenizer_dir / "tokenizer.json", stage / "tokenizer.json")
        tok_cfg = json.loads((tokenizer_dir / "tokenizer_config.json").read_text())
        for key in ("bos_token", "eos_token", "pad_token"):  # "__type": "AddedToken" dicts -> plain strings
            if isinstance(tok_cfg.get(key), dict):
                tok_cfg[key] = tok_cfg[key]["content"]
        tok_cfg["add_bos_token"] = True
        (stage / "tokenizer_config.json").write_text(json.dumps(tok_cfg, indent=1))
        shim = stage / "convert_shim.py"
        shim.write_text(_CONVERT_SHIM)
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(self.root / "gguf-py"), str(self.root)])}
        cmd = [sys.executable, str(shim), str(self.convert_script), str(stage), "--outtype", outtype,
               "--outfile", str(out)]  # fmt: skip
        _run(cmd, "convert_hf_to_gguf.py", timeout=1800, env=env, cwd=self.root)
        if not out.is_file():
            raise LlamaCppError(f"convert_hf_to_gguf.py wrote no {out}")
        return out

    # ---- llama-bench -----------------------------------------------------------------------------------

    def bench(self, gguf: Path, threads: int, prompt: int, gen: int, depth: int, repeats: int) -> dict:
        """One ``llama-bench`` test (prefill when ``prompt``, decode when ``gen``): mean tok/s and the command."""
        cmd = [str(self.llama_bench), "-m", str(gguf), "-t", str(threads), "-p", str(prompt), "-n", str(gen),
               "-d", str(depth), "-r", str(repeats), "-o", "json"]  # fmt: skip
        out = _run(cmd, "llama-bench", timeout=1800)
        try:
            rows = json.loads(out[out.index("[") :])
        except ValueError as e:
            raise LlamaCppError(f"llama-bench printed no JSON: {_tail(out)}") from e
        row = rows[-1]
        return {"tok_s": float(row["avg_ts"]), "stddev_tok_s": float(row.get("stddev_ts", 0.0)),
                "samples_tok_s": row.get("samples_ts"), "command": " ".join(cmd)}  # fmt: skip

    # ---- llama-server ----------------------------------------------------------------------------------

    @contextlib.contextmanager
    def server(self, gguf: Path, threads: int, slots: int, ctx: int) -> Iterator[LlamaServer]:
        """A ``llama-server -np slots -c ctx`` on ``gguf`` while inside; it idles between measurements."""
        import httpx

        port = _free_port()
        cmd = [str(self.llama_server), "-m", str(gguf), "-t", str(threads), "-np", str(slots), "-c", str(ctx),
               "--host", "127.0.0.1", "--port", str(port), "--no-webui"]  # fmt: skip
        log = (Path(gguf).parent / "llama-server.log").open("w")
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
        try:
            base = f"http://127.0.0.1:{port}"
            _wait_ready(base, proc, Path(log.name))
            with httpx.Client(timeout=600, limits=httpx.Limits(max_connections=slots)) as client:
                yield LlamaServer(client, base, slots)
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
            log.close()


class LlamaServer:
    """A running ``llama-server`` (``LlamaCpp.server``)."""

    def __init__(self, client: Any, base: str, slots: int):
        self.client, self.base, self.slots = client, base, slots

    def aggregate(self, prompts: list[list[int]], decode: int) -> dict:
        """Aggregate decode of ``len(prompts)`` concurrent ``/completion`` requests (greedy, ``ignore_eos``,
        ``decode`` tokens each, no prompt cache reuse): Σ predicted tokens / the longest decode time."""
        if len(prompts) > self.slots:
            raise ValueError(f"{len(prompts)} concurrent requests for a server of {self.slots} slots")
        return _concurrent_completions(self.client, self.base, prompts, decode)


def _concurrent_completions(client, base: str, prompts: list[list[int]], decode: int) -> dict:
    results: list[dict | BaseException] = [None] * len(prompts)  # type: ignore[list-item]

    def one(i: int) -> None:
        body = {"prompt": prompts[i], "n_predict": decode, "ignore_eos": True, "temperature": 0.0,
                "cache_prompt": False, "stream": False}  # fmt: skip
        try:
            resp = client.post(f"{base}/completion", json=body)
            resp.raise_for_status()
            results[i] = resp.json()["timings"]
        except BaseException as e:  # noqa: BLE001 - reported below
            results[i] = e

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    errors = [r for r in results if isinstance(r, BaseException)]
    if errors:
        raise LlamaCppError(f"llama-server /completion failed: {errors[0]!r}")
    tokens = sum(int(r["predicted_n"]) for r in results)
    span = max(float(r["predicted_ms"]) for r in results) / 1000
    return {"tok_s": tokens / span, "tokens": tokens, "decode_s": span}


def _wait_ready(base: str, proc: subprocess.Popen, log: Path, timeout: float = 300) -> None:
    import httpx

    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if proc.poll() is not None:
            raise LlamaCppError(f"llama-server exited with {proc.returncode}: {_tail(log.read_text())}")
        try:
            if httpx.get(f"{base}/health", timeout=5).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise LlamaCppError(f"llama-server not ready after {timeout:.0f} s: {_tail(log.read_text())}")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _tail(text: str, n: int = 1500) -> str:
    return text[-n:].strip()


def _run(cmd: list[str], what: str, timeout: float, check: bool = True, **kw: Any) -> str:
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, **kw)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise LlamaCppError(f"{what}: {e}") from e
    out = p.stdout + p.stderr
    if check and p.returncode != 0:
        raise LlamaCppError(f"{what} exited with {p.returncode} ({' '.join(cmd)}): {_tail(out)}")
    return p.stdout if p.stdout.strip() else out
