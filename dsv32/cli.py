"""The ``dsv32`` command line: one subcommand per job; heavy imports happen inside the commands.

Add a command by writing ``_add_<name>(subparsers)`` (which sets ``func``) and listing it in ``COMMANDS``.
User errors (bad config, bad checkpoint, missing files) print one ``error: ...`` line and exit 2.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

EXIT_USAGE = 2
DTYPES = {"bf16": "bfloat16", "fp32": "float32"}


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (ValueError, OSError) as e:  # ConfigError and CheckpointError are ValueErrors
        print(f"error: {_one_line(e)}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        return 130


def _positive_int(text: str) -> int:
    v = int(text)
    if v < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {v}")
    return v


def _non_negative_int(text: str) -> int:
    v = int(text)
    if v < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {v}")
    return v


def _positive_float(text: str) -> float:
    v = float(text)
    if not (math.isfinite(v) and v > 0):
        raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {text}")
    return v


def _temperature(text: str) -> float:
    v = float(text)
    if not (math.isfinite(v) and 0 <= v <= 2):
        raise argparse.ArgumentTypeError(f"must be in [0, 2] (0: greedy), got {text}")
    return v


def _top_p(text: str) -> float:
    v = float(text)
    if not (math.isfinite(v) and 0 < v <= 1):
        raise argparse.ArgumentTypeError(f"must be in (0, 1], got {text}")
    return v


def _port(text: str) -> int:
    v = int(text)
    if not 0 <= v <= 65535:
        raise argparse.ArgumentTypeError(f"must be a port number in [0, 65535], got {v}")
    return v


def _device(text: str) -> str:
    """A torch device this machine has (checked before any model is loaded)."""
    import torch

    try:
        device = torch.device(text)
    except RuntimeError as e:
        raise argparse.ArgumentTypeError(f"not a torch device: {text!r} ({e})") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise argparse.ArgumentTypeError(f"{text!r}: this machine has no CUDA device (torch sees none)")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise argparse.ArgumentTypeError(f"{text!r}: torch sees {torch.cuda.device_count()} CUDA device(s)")
    if device.type not in ("cpu", "cuda"):
        raise argparse.ArgumentTypeError(f"{text!r}: dsv32 runs on cpu or cuda")
    return text


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dsv32", description="DeepSeek-V3.2 on PyTorch.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in COMMANDS:
        add(sub)
    return parser


# ---- make-checkpoint --------------------------------------------------------------------------


def _add_make_checkpoint(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "make-checkpoint",
        help="write a checkpoint with random weights in the exact HF layout",
        description="Write config.json and random (normal, std 0.02) weights in the HF DeepSeek layout. "
        "The DeepSeek tokenizer files are added when the config uses its 129,280-token vocabulary.",
    )
    p.add_argument("out_dir", metavar="OUT_DIR", type=Path)
    src = p.add_mutually_exclusive_group()
    src.add_argument("--config", type=Path, help="an HF config.json (or a directory holding one)")
    src.add_argument(
        "--preset", choices=("default", "bench-small", "tiny"), help="a built-in config (default: default)"
    )
    p.add_argument(
        "--fp8",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="FP8 128x128 block-quantized projections (default: as the config's quantization_config says)",
    )
    p.add_argument("--dtype", choices=tuple(DTYPES), default="bf16", help="dtype of unquantized tensors")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--shard-size", type=float, default=4096, metavar="MB", help="max shard size in MB")
    p.set_defaults(func=_make_checkpoint)


def _make_checkpoint(args: argparse.Namespace) -> int:
    import torch

    from dsv32.config import ModelConfig
    from dsv32.weights.default_model import copy_default_tokenizer, preset_config
    from dsv32.weights.synthetic import write_synthetic_checkpoint

    cfg = ModelConfig.from_file(args.config) if args.config else preset_config(args.preset or "default")
    if not (math.isfinite(args.shard_size) and args.shard_size > 0):
        raise ValueError(f"--shard-size must be a finite number > 0 (MB), got {args.shard_size}")
    fp8 = args.fp8 if args.fp8 is not None else cfg.fp8_block_size is not None
    out = write_synthetic_checkpoint(
        cfg,
        args.out_dir,
        seed=args.seed,
        dtype=getattr(torch, DTYPES[args.dtype]),
        fp8=fp8,
        max_shard_bytes=int(args.shard_size * 2**20),
    )
    if cfg.vocab_size == 129280:
        copy_default_tokenizer(out)
    files = sorted(out.glob("*.safetensors"))
    size = sum(f.stat().st_size for f in files)
    print(
        f"wrote {out} ({len(files)} safetensors file(s), {size / 2**20:.1f} MB, fp8={fp8})", file=sys.stderr
    )
    return 0


# ---- generate ---------------------------------------------------------------------------------


def _add_generate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("generate", help="complete a raw prompt and stream the text to stdout")
    p.add_argument("--prompt", required=True, help="prompt text (BOS is prepended)")
    p.add_argument(
        "--model", type=Path, help="HF model directory (default: the embedded random-weight model)"
    )
    p.add_argument("--max-tokens", type=_positive_int, default=64)
    p.add_argument("--temperature", type=_temperature, default=0.0, help="0 = greedy")
    p.add_argument("--top-p", type=_top_p, default=1.0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--dtype", choices=tuple(DTYPES), default="bf16")
    p.add_argument("--device", type=_device, default="cpu")
    p.set_defaults(func=_generate)


def _generate(args: argparse.Namespace) -> int:
    import torch

    from dsv32.chat.tokenizer import load_tokenizer
    from dsv32.generate import generate
    from dsv32.weights.default_model import model_dir_or_default
    from dsv32.weights.loader import load_model

    if args.max_tokens < 0:
        raise ValueError(f"--max-tokens must be >= 0, got {args.max_tokens}")
    model_dir = model_dir_or_default(args.model)
    model = load_model(
        model_dir, dtype=getattr(torch, DTYPES[args.dtype]), device=args.device, progress=False
    )
    tok = load_tokenizer(model_dir)
    prompt_ids = tok.encode(args.prompt, add_bos=True)
    out_ids: list[int] = []
    shown = ""
    for tid in generate(
        model,
        prompt_ids,
        args.max_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        seed=args.seed,
        eos_id=tok.eos_id,
    ):
        out_ids.append(tid)
        text = tok.decode(out_ids, skip_special_tokens=True)
        if text.endswith("\ufffd"):  # an incomplete UTF-8 sequence: wait for its remaining bytes
            continue
        sys.stdout.write(text[len(shown) :] if text.startswith(shown) else text)
        sys.stdout.flush()
        shown = text
    sys.stdout.write("\n")
    sys.stdout.flush()
    return 0


# ---- serve ------------------------------------------------------------------------------------


def _add_serve(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="serve the DeepSeek-compatible HTTP API (OpenAI-style routes)")
    p.add_argument(
        "--model", type=Path, help="HF model directory (default: the embedded random-weight model)"
    )
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=_port, default=8000)
    p.add_argument("--api-key", action="append", default=[], dest="api_keys", metavar="KEY",
                   help="accepted API key (repeatable); none given: no authentication")  # fmt: skip
    p.add_argument("--served-model-name", help="extra model id to answer to (default: the directory name)")
    p.add_argument("--dtype", choices=tuple(DTYPES), default="fp32")
    p.add_argument("--device", type=_device, default="cpu")
    p.add_argument(
        "--cache-memory-gb", type=_positive_float, default=1.0, help="memory for the paged latent cache"
    )
    p.add_argument("--max-num-seqs", type=int, default=64, help="requests decoded together")
    p.add_argument("--max-num-batched-tokens", type=int, default=2048, help="token budget of one step")
    p.add_argument("--max-model-len", type=int, help="context limit (default: the model's)")
    p.add_argument(
        "--max-waiting", type=_non_negative_int, default=256, help="queued requests before answering 503"
    )
    p.add_argument(
        "--max-concurrent-per-key", type=_positive_int, help="in-flight requests per API key before 429"
    )
    p.add_argument("--chat-format", choices=("v3.2", "v3.1", "v3"), help="override the prompt format")
    p.add_argument("--scheduling-policy", choices=("fcfs", "priority"), default="fcfs",
                   help="fcfs: arrival order; priority: requests' priority field first (lower first), as vLLM")  # fmt: skip
    p.add_argument(
        "--enforce-eager", action="store_true",
        help="run every step eagerly: no compiled steps and no CUDA graphs (vLLM's --enforce-eager); the "
        "fastest start, the slowest decode",
    )  # fmt: skip
    p.add_argument(
        "--compile", action=argparse.BooleanOptionalAction, default=None,
        help="compile the decode step with torch.compile at start (default: on, as vLLM; off with "
        "--enforce-eager or --speculative-config). CPU: the single-request step (~25 s at the first start on "
        "the default model, ~70 s on bench-small; ~8-10 s once inductor's disk cache has it; needs a C++ "
        "compiler, else a warning and eager steps; ~1.3-1.5x batch-1 decode). GPU: every CUDA-graph step (~30 s "
        "a form; ~1.7x batch-1 decode on an H100), and the steps with prefill chunks around their attention. "
        "--no-compile: eager steps (GPU: still CUDA graphs)",
    )  # fmt: skip
    p.add_argument(
        "--speculative-config", metavar="JSON", type=_speculative_config,
        help='speculative decoding with the MTP layer, as in vLLM: \'{"method": "mtp", "num_speculative_tokens": 1}\'',
    )  # fmt: skip
    p.set_defaults(func=_serve)


def use_persistent_compile_cache() -> None:
    """Keep inductor's compiled artifacts under dsv32's cache directory (``$DSV32_CACHE`` or
    ``~/.cache/dsv32``) rather than the temp directory a reboot clears, as vLLM keeps its compile cache
    under ``~/.cache/vllm``: a restarted server then loads its compiled steps instead of compiling them.
    An explicit ``TORCHINDUCTOR_CACHE_DIR`` wins."""
    from dsv32.weights.default_model import cache_root

    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(cache_root() / "inductor"))


def _speculative_config(text: str) -> int:
    from dsv32.engine.speculative import num_speculative_tokens

    try:
        return num_speculative_tokens(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def compile_at_start(args: argparse.Namespace) -> bool:
    """Whether ``serve`` compiles its steps: by default yes, as vLLM does, except with ``--enforce-eager`` (no
    compiling, no CUDA graphs) or speculative decoding (whose drafted steps are never compiled).

    Raises ValueError for ``--compile`` beside ``--enforce-eager``."""
    if args.compile and args.enforce_eager:
        raise ValueError("--compile and --enforce-eager contradict each other: give one")
    if args.compile is None:
        return not args.enforce_eager and not args.speculative_config
    return args.compile  # (an explicit --compile with drafts: the engine warns that it is ignored)


def _serve(args: argparse.Namespace) -> int:
    compile_steps = compile_at_start(args)
    if compile_steps:  # before torch's inductor is imported: it fixes its cache directory then
        use_persistent_compile_cache()
    from dsv32.api.server import ServeOptions, serve

    serve(
        ServeOptions(
            model=args.model, host=args.host, port=args.port, api_keys=args.api_keys,
            served_model_name=args.served_model_name, dtype=DTYPES[args.dtype], device=args.device,
            cache_memory_gb=args.cache_memory_gb, max_num_seqs=args.max_num_seqs,
            max_num_batched_tokens=args.max_num_batched_tokens, max_model_len=args.max_model_len,
            max_waiting=args.max_waiting, max_concurrent_per_key=args.max_concurrent_per_key,
            chat_format=args.chat_format, cuda_graphs=not args.enforce_eager, compile_decode=compile_steps,
            num_speculative_tokens=args.speculative_config or 0, scheduling_policy=args.scheduling_policy,
        )
    )  # fmt: skip
    return 0


# ---- chat -------------------------------------------------------------------------------------


def _add_chat(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("chat", help="interactive terminal chat (streams; /think toggles thinking)")
    p.add_argument(
        "--model", type=Path, help="HF model directory (default: the embedded random-weight model)"
    )
    p.add_argument("--think", action="store_true", help="start in thinking mode")
    p.add_argument("--max-tokens", type=_positive_int, default=512)
    p.add_argument("--temperature", type=_temperature, default=0.7)
    p.add_argument(
        "--cache-memory-gb", type=_positive_float, default=1.0, help="memory for the paged latent cache"
    )
    p.add_argument(
        "--speculative-config", metavar="JSON", type=_speculative_config,
        help='speculative decoding with the MTP layer, as for serve: \'{"method": "mtp", "num_speculative_tokens": 1}\'',
    )  # fmt: skip
    p.set_defaults(func=_chat)


def _chat(args: argparse.Namespace) -> int:
    from dsv32.chat_cli import run_chat

    return run_chat(
        args.model, thinking=args.think, max_tokens=args.max_tokens, temperature=args.temperature,
        cache_memory_gb=args.cache_memory_gb, num_speculative_tokens=args.speculative_config or 0,
    )  # fmt: skip


# ---- bench (implemented in dsv32.bench) -------------------------------------------------------


def _add_bench(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench", help="benchmarks")
    bsub = p.add_subparsers(dest="what", required=True, metavar="BENCHMARK")
    m = bsub.add_parser("model", help="prefill / decode speed of the model on synthetic weights")
    m.add_argument(
        "--config", default=None, help="a preset name or an HF config.json path (default: bench-small)"
    )
    m.add_argument("--prefill", type=_positive_int, default=1024, metavar="N", help="prompt tokens")
    m.add_argument("--decode", type=_positive_int, default=64, metavar="N", help="decoded tokens")
    m.add_argument(
        "--out", type=Path, default=Path("benchmarks/results"), metavar="DIR", help="where to write results"
    )
    m.set_defaults(func=_bench)
    sv = bsub.add_parser(
        "server", help="HTTP + SSE + parsing overhead per streamed token vs the engine alone"
    )
    sv.add_argument("--streams", type=_positive_int, default=8, help="concurrent streams")
    sv.add_argument("--tokens", type=_positive_int, default=64, help="tokens per stream")
    sv.add_argument("--out", type=Path, default=Path("benchmarks/results"), metavar="DIR")
    sv.set_defaults(func=_bench)
    c = bsub.add_parser("chat", help="time to encode a ~100K-token conversation, per chat format")
    c.add_argument(
        "--tokens", type=_positive_int, default=100_000, metavar="N", help="conversation size in tokens"
    )
    c.add_argument(
        "--out", type=Path, default=Path("benchmarks/results"), metavar="DIR", help="where to write results"
    )
    c.set_defaults(func=_bench)
    e = bsub.add_parser("engine", help="the engine vs transformers: decode, prefill, concurrency, cache, DSA")
    e.add_argument("--config", default=None, help="a preset or an HF config.json path (default: bench-small)")
    e.add_argument("--quick", action="store_true", help="a smoke run: tiny sizes, one round")
    e.add_argument("--parts", default=None, help="a subset of: decode,prefill,concurrency,prefix,dsa")
    e.add_argument("--repeats", type=_positive_int, default=None, metavar="N", help="rounds (default 3)")
    e.add_argument("--decode", type=_positive_int, default=None, metavar="N", help="batch-1 decode tokens")
    e.add_argument("--concurrency", default=None, metavar="LIST", help="default 1,4,16,64")
    e.add_argument("--ttft-prompt", type=_positive_int, default=None, metavar="N", help="prefix-cache prompt")
    e.add_argument("--contexts", default=None, metavar="LIST", help="default 4096,16384,32768")
    e.add_argument(
        "--device", type=_device, default=None, help="cpu (default) or cuda: where both models run"
    )
    e.add_argument("--dtype", default=None, choices=["float32", "bfloat16"], help="default float32")
    e.add_argument("--enforce-eager", action="store_true", help="GPU: no CUDA graphs for decode steps")
    e.add_argument(
        "--compile", action="store_true",
        help="also measure batch-1 decode with the compiled decode step and the prefill compiled around its "
        "attention (as serve runs them)",
    )  # fmt: skip
    e.add_argument(
        "--quiet-wait", type=float, default=None, metavar="S",
        help="wait up to S seconds for idle CPUs before each part, S/2 inside one (default 60; 0: never)",
    )  # fmt: skip
    e.add_argument(
        "--llama-cpp", default=None, metavar="DIR",
        help="a built llama.cpp source tree: measure llama.cpp on the same weights in the same run",
    )  # fmt: skip
    e.add_argument("--out", type=Path, default=Path("benchmarks/results"), metavar="DIR")
    e.set_defaults(func=_bench)
    g = bsub.add_parser(
        "grammar", help="decode tok/s with and without a JSON Schema constraint; schema compile time"
    )
    g.add_argument(
        "--model", type=Path, default=None, metavar="DIR", help="model directory (default: built-in)"
    )
    g.add_argument("--tokens", type=_positive_int, default=32, metavar="N", help="decode tokens per request")
    g.add_argument("--batches", default="1,16", metavar="LIST", help="batch sizes (default 1,16)")
    g.add_argument(
        "--repeats", type=_positive_int, default=3, metavar="N", help="alternating rounds (default 3)"
    )
    g.add_argument("--out", type=Path, default=Path("benchmarks/results"), metavar="DIR")
    g.set_defaults(func=_bench)
    sp = bsub.add_parser(
        "spec",
        help="speculative decoding with the MTP layer: step cost vs plain decoding, break-even acceptance",
    )
    sp.add_argument(
        "--config", default=None, help="a preset or an HF config.json path (default: bench-small)"
    )
    sp.add_argument("--tokens", type=_positive_int, default=32, metavar="N", help="decode tokens per request")
    sp.add_argument("--batches", default="1,16", metavar="LIST", help="batch sizes (default 1,16)")
    sp.add_argument(
        "--repeats", type=_positive_int, default=3, metavar="N", help="alternating rounds (default 3)"
    )
    sp.add_argument(
        "--num-speculative-tokens", type=_positive_int, default=1, metavar="K", help="drafts per step (1-4)"
    )
    sp.add_argument("--device", type=_device, default="cpu", help="cpu (default) or cuda")
    sp.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="default float32")
    sp.add_argument("--out", type=Path, default=Path("benchmarks/results"), metavar="DIR")
    sp.set_defaults(func=_bench)


def _bench(args: argparse.Namespace) -> int:
    try:
        from dsv32.bench import main_bench
    except ImportError as e:
        raise OSError(f"the bench command is not available: {e}") from None
    return main_bench(args)


COMMANDS: list[Callable[[argparse._SubParsersAction], None]] = [
    _add_serve,
    _add_chat,
    _add_make_checkpoint,
    _add_generate,
    _add_bench,
]


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split()) or type(e).__name__


if __name__ == "__main__":
    raise SystemExit(main())
