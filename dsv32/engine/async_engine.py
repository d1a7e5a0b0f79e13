"""AsyncEngine: the engine API the server uses — submit, stream, abort, stats — with the model off the
event loop.

A background thread owns the EngineCore: it takes submissions and aborts from a queue between steps,
runs steps while there is work, turns each step's tokens into ``RequestOutput``s (text deltas through
the incremental detokenizer, stop strings) and hands them to each request's asyncio queue with
``call_soon_threadsafe``. Requests cross this boundary as plain data.
"""

from __future__ import annotations

import asyncio
import itertools
import queue
import threading
from collections.abc import AsyncIterator

from dsv32.engine.core import EngineCore, EngineError
from dsv32.engine.metrics import RequestMetrics
from dsv32.engine.outputs import OutputProcessor, RequestOutput
from dsv32.engine.sampling_params import SamplingParams

_CLOSED = object()  # put in a stream's queue when it is closed: wakes a task waiting on it


class RequestStream:
    """The outputs of one accepted request, as an async iterator; ``aclose`` aborts it if unfinished."""

    def __init__(self, engine: AsyncEngine, request_id: str, q: asyncio.Queue):
        self.engine, self.request_id, self._q = engine, request_id, q
        self.finished = False
        self._closed = False

    def __aiter__(self) -> RequestStream:
        return self

    async def __anext__(self) -> RequestOutput:
        if self.finished or self._closed:
            raise StopAsyncIteration
        item = await self._q.get()
        if item is _CLOSED:
            raise StopAsyncIteration
        if isinstance(item, BaseException):
            self.finished = True
            await self.aclose()
            raise item
        if item.finished:
            self.finished = True
            self._closed = True
            self.engine._close(self.request_id, finished=True)
        return item

    async def aclose(self) -> None:
        """Abort the request if unfinished; a pending ``__anext__`` (another task's) ends the iteration."""
        if not self._closed:
            self._closed = True
            self.engine._close(self.request_id, self.finished)
            self._q.put_nowait(_CLOSED)

    def __del__(self) -> None:  # a stream dropped without aclose must not keep its blocks
        if not self._closed:
            self._closed = True
            self.engine._close(self.request_id, self.finished)


def _resolve(future: asyncio.Future, value) -> None:
    """Answer a submitter (on its loop) unless it was cancelled while the engine thread took its request: a
    cancelled future's ``set_result`` raises InvalidStateError into the loop's exception handler. (The
    cancelled ``submit`` queued an abort behind the add, so the request is still dropped.)"""
    if not future.done():
        future.set_result(value)


class QueueFullError(EngineError):
    """Too many requests are waiting; the server answers 503."""


class AsyncEngine:
    def __init__(self, core: EngineCore, tokenizer, max_waiting: int = 256):
        self.core = core
        self.tokenizer = tokenizer
        core.attach_tokenizer(tokenizer)  # constrained decoding (response_format, strict tools)
        self.max_waiting = max_waiting
        self._commands: queue.Queue = queue.Queue()
        self._streams: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._processor = OutputProcessor(tokenizer)
        self.metrics = RequestMetrics(core.stats)
        self._ids = itertools.count()
        self._stopped = False
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._loop, name="dsv32-engine", daemon=True)
        self._thread.start()

    # ---- public API -------------------------------------------------------------------------
    async def submit(
        self, prompt_ids: list[int], params: SamplingParams, request_id: str | None = None
    ) -> RequestStream:
        """Queue a request; returns its output stream once the engine has accepted it.

        Rejections (bad prompt, too long, queue full) raise here, before any output exists. Closing the
        stream (``aclose``) before it finished aborts the request and frees its blocks.
        """
        if self._error is not None:
            raise RuntimeError(f"the engine stopped: {self._error}")
        request_id = request_id or f"req-{next(self._ids)}"
        if request_id in self._streams:
            raise EngineError(f"request id {request_id!r} is already in use")
        loop = asyncio.get_running_loop()
        q: asyncio.Queue = asyncio.Queue()
        self._streams[request_id] = (loop, q)
        accepted: asyncio.Future = loop.create_future()  # resolved by the engine thread: None or the error
        arrival = self.metrics.clock()  # (the engine thread may be in a step now: the wait counts)
        self._commands.put(("add", request_id, list(prompt_ids), params, loop, accepted, arrival))
        try:
            error = await accepted
        except asyncio.CancelledError:
            self._streams.pop(request_id, None)
            self._commands.put(("abort", request_id))
            raise
        if error is not None:
            self._streams.pop(request_id, None)
            raise error
        return RequestStream(self, request_id, q)

    async def generate(
        self, prompt_ids: list[int], params: SamplingParams, request_id: str | None = None
    ) -> AsyncIterator[RequestOutput]:
        """Submit and stream in one call; leaving the iteration early aborts the request."""
        stream = await self.submit(prompt_ids, params, request_id)
        try:
            async for out in stream:
                yield out
        finally:
            await stream.aclose()

    def _close(self, request_id: str, finished: bool) -> None:
        self._streams.pop(request_id, None)
        if not finished:
            self._commands.put(("abort", request_id))

    def abort(self, request_id: str) -> None:
        self._commands.put(("abort", request_id))

    def stats(self) -> dict:
        return self.core.stats()

    def num_waiting(self) -> int:
        return len(self.core.scheduler.waiting)

    def metrics_text(self) -> bytes:
        """The Prometheus exposition of this engine's metrics (``dsv32.engine.metrics``)."""
        return self.metrics.render()

    def shutdown(self) -> None:
        self._stopped = True
        self._commands.put(("stop",))
        self._thread.join(timeout=10)

    # ---- engine thread ---------------------------------------------------------------------
    def _handle(self, cmd: tuple) -> None:
        if cmd[0] == "add":
            _, rid, prompt_ids, params, loop, accepted, arrival = cmd
            error = None
            try:
                if len(self.core.scheduler.waiting) >= self.max_waiting:
                    raise QueueFullError(f"the waiting queue is full ({self.max_waiting} requests)")
                self.core.add_request(rid, prompt_ids, params)
                self._processor.add(rid, params)
                self.metrics.added(rid, arrival)
            except Exception as e:  # noqa: BLE001 - handed to the caller
                error = e
            loop.call_soon_threadsafe(_resolve, accepted, error)
        elif cmd[0] == "abort":
            if self.core.abort(cmd[1]):
                self._processor.remove(cmd[1])
                self.metrics.aborted(cmd[1])

    def _emit(self, out: RequestOutput) -> None:
        stream = self._streams.get(out.request_id)
        if stream is not None:
            loop, q = stream
            loop.call_soon_threadsafe(q.put_nowait, out)

    def _loop(self) -> None:
        try:
            while not self._stopped:
                block = not self.core.has_work()
                try:
                    cmd = self._commands.get(block=block, timeout=None if block else 0)
                    if cmd[0] == "stop":
                        return
                    self._handle(cmd)
                    while True:  # drain everything queued before stepping
                        cmd = self._commands.get_nowait()
                        if cmd[0] == "stop":
                            return
                        self._handle(cmd)
                except queue.Empty:
                    pass
                if self.core.has_work():
                    for out in self._processor.process(self.core, self.core.step()):
                        self.metrics.output(out)
                        self._emit(out)
        except BaseException as e:  # noqa: BLE001 - a crashed engine must not hang its clients
            self._error = e
            for loop, q in list(self._streams.values()):
                loop.call_soon_threadsafe(q.put_nowait, RuntimeError(f"the engine stopped: {e}"))
            raise
