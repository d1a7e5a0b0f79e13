"""What the HTTP layer knows of the engine: one narrow interface, plus the serving settings.

``EngineClient`` is all the routes use — ``AsyncEngine`` implements it; so can a test's scripted
token source. Requests cross it as plain data (prompt ids + ``SamplingParams``).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Protocol

from dsv32.chat.tokenizer import Tokenizer
from dsv32.engine.outputs import RequestOutput
from dsv32.engine.sampling_params import SamplingParams


class OutputStream(Protocol):
    def __aiter__(self) -> AsyncIterator[RequestOutput]: ...

    async def aclose(self) -> None: ...


class EngineClient(Protocol):
    async def submit(
        self, prompt_ids: list[int], params: SamplingParams, request_id: str | None = None
    ) -> OutputStream:
        """Accept the request (or raise EngineError / QueueFullError) and return its output stream."""
        ...

    def stats(self) -> dict: ...

    def metrics_text(self) -> bytes:
        """Prometheus text exposition of the engine's metrics (``GET /metrics``)."""
        ...

    def num_waiting(self) -> int: ...


CHAT_MODEL = "deepseek-chat"
REASONER_MODEL = "deepseek-reasoner"
# (default max_tokens, max max_tokens) per mode, from the hosted API (api.md §2)
MODE_LIMITS = {False: (4096, 8192), True: (32768, 65536)}
ALIASES = {
    "deepseek-chat": CHAT_MODEL,
    "deepseek-reasoner": REASONER_MODEL,
    "deepseek-v3.2": CHAT_MODEL,
    "deepseek/deepseek-v3.2": CHAT_MODEL,
    "deepseek/deepseek-chat-v3.1": CHAT_MODEL,
    "deepseek/deepseek-chat": CHAT_MODEL,
    "deepseek/deepseek-reasoner": REASONER_MODEL,
}


@dataclass
class ServingContext:
    engine: EngineClient
    tokenizer: Tokenizer
    family: str  # chat format: "v3.2" | "v3.1" | "v3"
    max_model_len: int
    served_model_name: str = "dsv32"
    system_fingerprint: str = "fp_dsv32"
    keepalive_s: float = 5.0  # SSE ": keep-alive" comment interval while a request produces nothing
    start_timeout_s: float = 600.0  # api.md §5.1: a request not started within 10 minutes is closed
    api_keys: list[str] = field(default_factory=list)
    max_concurrent_per_key: int | None = None  # None: no per-key limit
    eos_id: int | None = None

    def model_names(self) -> list[str]:
        names = [CHAT_MODEL, REASONER_MODEL]
        if self.served_model_name not in names:
            names.append(self.served_model_name)
        return names

    def resolve_model(self, name: str) -> tuple[str, bool]:
        """Requested model id -> (id echoed in responses, thinking by default)."""
        canonical = ALIASES.get(name)
        if canonical is not None:
            return canonical, canonical == REASONER_MODEL
        if name == self.served_model_name:
            return name, False
        return "", False
