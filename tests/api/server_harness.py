"""The real server in a thread (``BackgroundServer``) and a scripted token source for it."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from dsv32.api.server import BackgroundServer
from dsv32.chat.detokenizer import IncrementalDetokenizer
from dsv32.engine.outputs import RequestOutput, Usage
from dsv32.engine.sampling_params import SamplingParams

RunningServer = BackgroundServer


class ScriptedEngine:
    """A test-only token source behind the engine interface: it answers every request with the next
    scripted completion text (tokenized with the real tokenizer, streamed token by token), so tool calls
    and thinking can be exercised with a random-weight model. It records each prompt it was given."""

    def __init__(self, tokenizer, eos_id: int):
        self.tokenizer, self.eos_id = tokenizer, eos_id
        self.scripts: list[str] = []
        self.prompts: list[list[int]] = []
        self.params: list[SamplingParams] = []  # what each request asked of the engine
        self.first_delay = 0.0  # seconds before the first token (as if queued)
        self.fail_after: int | None = None  # outputs before the stream fails as a stopped engine's does

    async def submit(self, prompt_ids: list[int], params: SamplingParams, request_id: str | None = None):
        self.prompts.append(list(prompt_ids))
        self.params.append(params)
        text = self.scripts.pop(0) if self.scripts else "ok"
        ids = self.tokenizer.encode(text, allow_special=True) + [self.eos_id]
        ids = ids[: params.max_tokens]
        return self._stream(request_id or "scripted", prompt_ids, ids, params)

    async def _stream(self, rid, prompt_ids, ids, params) -> AsyncIterator[RequestOutput]:
        detok = IncrementalDetokenizer(self.tokenizer, skip_special_tokens=params.skip_special_tokens)
        await asyncio.sleep(self.first_delay)
        for i, tid in enumerate(ids):
            await asyncio.sleep(0)
            if self.fail_after is not None and i == self.fail_after:
                raise RuntimeError("the engine stopped: scripted failure")
            last = i == len(ids) - 1
            text = detok.add([tid]) + (detok.flush() if last else "")
            reason = ("stop" if tid == self.eos_id else "length") if last else None
            usage = Usage(len(prompt_ids), i + 1, 0)
            yield RequestOutput(rid, [tid], text, None, last, reason, usage)

    def stats(self) -> dict:
        return {}

    def metrics_text(self) -> bytes:
        return b""

    def num_waiting(self) -> int:
        return 0
