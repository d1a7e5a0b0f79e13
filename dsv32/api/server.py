"""``dsv32 serve``: load a model (or the embedded default), start the engine, serve the API with uvicorn."""

from __future__ import annotations

import socket
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from dsv32.api.app import create_app
from dsv32.api.service import ServingContext


@dataclass
class ServeOptions:
    model: Path | None = None
    host: str = "127.0.0.1"
    port: int = 8000
    api_keys: list[str] = field(default_factory=list)
    served_model_name: str | None = None
    dtype: str = "float32"
    device: str = "cpu"
    cache_memory_gb: float = 1.0
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 2048
    max_model_len: int | None = None
    max_waiting: int = 256
    max_concurrent_per_key: int | None = None
    chat_format: str | None = None  # override the family picked from config.json
    cuda_graphs: bool = (
        True  # GPU: decode and one-chunk prefill steps from CUDA graphs (``--enforce-eager``: off)
    )
    compile_decode: bool = False  # the decode step (GPU: and the prefill) compiled at start (``--compile``)
    num_speculative_tokens: int = 0  # MTP drafts per step (``--speculative-config``)
    scheduling_policy: str = "fcfs"  # or "priority": requests' ``priority`` field orders them
    keepalive_s: float = 5.0


def build_context(opts: ServeOptions) -> ServingContext:
    """Model + engine + tokenizer + settings: everything the app needs."""
    from dsv32.chat import family_for_model_dir, load_tokenizer
    from dsv32.chat.family import describe_family
    from dsv32.engine.async_engine import AsyncEngine
    from dsv32.engine.core import EngineConfig, EngineCore
    from dsv32.weights.default_model import model_dir_or_default
    from dsv32.weights.loader import load_model

    model_dir = model_dir_or_default(opts.model)
    model = load_model(model_dir, dtype=getattr(torch, opts.dtype), device=opts.device, progress=True)
    tokenizer = load_tokenizer(model_dir)
    if model.config.vocab_size < tokenizer.vocab_size:  # every chat prompt holds ids past the model's rows
        raise ValueError(
            f"{model_dir}: the model has {model.config.vocab_size} vocabulary rows but its tokenizer has "
            f"{tokenizer.vocab_size} ids (the chat format's special tokens among those past the rows): give "
            "the model directory its own tokenizer files"
        )
    config = EngineConfig(
        cache_memory_gb=opts.cache_memory_gb, max_num_seqs=opts.max_num_seqs,
        max_num_batched_tokens=opts.max_num_batched_tokens, max_model_len=opts.max_model_len,
        cuda_graphs=opts.cuda_graphs, compile_decode=opts.compile_decode,
        # on a GPU the prefill too (on the CPU the compiled prefill measured slower: EngineConfig)
        compile_prefill=opts.compile_decode and torch.device(opts.device).type == "cuda",
        num_speculative_tokens=opts.num_speculative_tokens, scheduling_policy=opts.scheduling_policy,
    )  # fmt: skip
    core = EngineCore(model, config, eos_id=tokenizer.eos_id)
    engine = AsyncEngine(core, tokenizer, max_waiting=opts.max_waiting)
    print(describe_family(model_dir, override=opts.chat_format), file=sys.stderr)
    return ServingContext(
        engine=engine,
        tokenizer=tokenizer,
        family=family_for_model_dir(model_dir, override=opts.chat_format),
        max_model_len=min(core.max_model_len, core.capacity_tokens),
        served_model_name=opts.served_model_name or Path(model_dir).name,
        api_keys=list(opts.api_keys),
        max_concurrent_per_key=opts.max_concurrent_per_key,
        keepalive_s=opts.keepalive_s,
        eos_id=tokenizer.eos_id,
    )


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class BackgroundServer:
    """The app under uvicorn on a free loopback port, in a thread (tests and benchmarks)."""

    def __init__(self, ctx: ServingContext, host: str = "127.0.0.1"):
        import uvicorn

        self.ctx = ctx
        self.port = free_port()
        self.url = f"http://{host}:{self.port}"
        config = uvicorn.Config(create_app(ctx), host=host, port=self.port, log_level="warning")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> BackgroundServer:
        self.thread.start()
        deadline = time.time() + 30
        while not self.server.started:
            if time.time() > deadline or not self.thread.is_alive():
                raise RuntimeError("the server did not start")
            time.sleep(0.05)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)


def listen_socket(host: str, port: int) -> socket.socket:
    """The server's socket, bound before anything loads (as vLLM binds its port first): a port in use or a host
    that does not resolve is an ``OSError`` at once, not after minutes of loading and compiling. Port 0: the
    system picks a free one (``getsockname`` tells which)."""
    try:
        family, kind, proto, _, addr = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )[0]
    except socket.gaierror as e:
        raise OSError(f"--host {host!r} is not an address of this machine: {e.strerror}") from None
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn: a restart need not wait
    try:
        sock.bind(addr)
    except OSError as e:
        sock.close()
        raise OSError(f"cannot listen on {host}:{port}: {e.strerror}") from None
    return sock


def serve(opts: ServeOptions) -> None:
    import uvicorn

    with listen_socket(opts.host, opts.port) as sock:
        port = sock.getsockname()[1]
        if opts.compile_decode:
            print(
                "compiling the decode step first (up to ~2 min at a first start, seconds once inductor's disk "
                "cache has it; --enforce-eager skips it)",
                file=sys.stderr,
                flush=True,
            )
        ctx = build_context(opts)
        if opts.compile_decode:
            compiled = ctx.engine.core.decode_step_compiled
            print(
                f"compiled decode step: {'yes' if compiled else 'no (see the warning above)'}",
                file=sys.stderr,
            )
            if ctx.engine.core.config.compile_prefill:
                compiled = ctx.engine.core.prefill_compiled
                print(
                    f"compiled prefill: {'yes' if compiled else 'no (see the warning above)'}",
                    file=sys.stderr,
                )
        if opts.num_speculative_tokens:
            print(
                f"speculative decoding: the MTP layer drafts {opts.num_speculative_tokens} token per step",
                file=sys.stderr,
            )
        app = create_app(ctx)
        print(
            f"dsv32 serving {ctx.served_model_name} on http://{_url_host(opts.host)}:{port}",
            file=sys.stderr,
            flush=True,
        )
        try:
            uvicorn.Server(uvicorn.Config(app, host=opts.host, port=port, log_level="warning")).run(
                sockets=[sock]
            )
        finally:
            ctx.engine.shutdown()


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host
