"""Prometheus metrics of a serving engine, named as vLLM names them (``dsv32:`` where vLLM has ``vllm:``).

Two sources:
* the engine's state, read when scraped (``EngineCore.stats()``): requests running and waiting, KV cache
  usage, preemptions, speculative draft tokens verified and accepted;
* each request's life, recorded by ``AsyncEngine``'s thread (``RequestMetrics``): arrival, every output,
  the end. From them: prompt / generated / prefix-cached token counters, finished requests by reason, and
  histograms of time to first token, time between tokens, end-to-end latency and request sizes.

``render()`` is the text exposition format that ``GET /metrics`` serves.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import prometheus_client
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from dsv32.engine.outputs import RequestOutput

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
prometheus_client.disable_created_metrics()  # no ``*_created`` timestamp series beside each counter (as vLLM)

# seconds: from a fast GPU token (5 ms) to a long CPU request (10 min)
_LATENCY_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                    20.0, 40.0, 80.0, 160.0, 320.0, 640.0)  # fmt: skip
_TOKEN_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000, 20000, 50000, 100000, 200000)


# counters read from ``stats()`` at scrape time: (name after ``dsv32:``, help, stats key)
_COUNTERS = (
    ("num_preemptions", "Requests preempted (blocks freed, recomputed later).", "preemptions"),
    (
        "spec_decode_num_drafts",
        "Requests' drafted steps verified (each with 1..k draft tokens).",
        "spec_drafts",
    ),
    ("spec_decode_num_draft_tokens", "Speculative draft tokens verified.", "spec_draft_tokens"),
    ("spec_decode_num_accepted_tokens", "Speculative draft tokens accepted.", "spec_accepted_tokens"),
)


class _EngineState(Collector):
    """Gauges (and the preemption counter) from the engine's ``stats()`` at scrape time."""

    def __init__(self, stats: Callable[[], dict]):
        self.stats = stats

    def collect(self) -> Iterator[Metric]:
        s = self.stats()
        yield GaugeMetricFamily("dsv32:num_requests_running", "Requests in the running batch.", s["running"])
        yield GaugeMetricFamily(
            "dsv32:num_requests_waiting", "Requests waiting to be scheduled.", s["waiting"]
        )
        used = 1.0 - s["free_blocks"] / s["total_blocks"]  # cached blocks nobody uses count as free
        yield GaugeMetricFamily("dsv32:kv_cache_usage_perc", "KV cache usage (1 = full).", used)
        yield GaugeMetricFamily(
            "dsv32:prefix_cache_hit_rate", "Prefix-cache hits / lookups, in blocks, since start.",
            s["prefix_cache_hit_rate"],
        )  # fmt: skip
        for name, help_text, key in _COUNTERS:
            yield CounterMetricFamily(f"dsv32:{name}", help_text, s[key])
        per_pos = CounterMetricFamily(
            "dsv32:spec_decode_num_accepted_tokens_per_pos", "Accepted drafts by position in the step (0: first).",
            labels=["position"],
        )  # fmt: skip
        for j, n in enumerate(s["spec_accepted_per_pos"]):
            per_pos.add_metric([str(j)], n)
        yield per_pos


@dataclass
class _Live:
    arrival: float
    last: float | None = None  # time of the latest output (None: no token yet)
    counted_prompt: bool = False


class RequestMetrics:
    """The Prometheus registry of one engine; ``added`` / ``output`` / ``aborted`` are called from the
    engine's thread, ``render`` from any."""

    def __init__(self, stats: Callable[[], dict], clock: Callable[[], float] = time.monotonic):
        self.clock = clock
        self.registry = CollectorRegistry()
        self.registry.register(_EngineState(stats))
        r = self.registry
        self.prompt_tokens = Counter("dsv32:prompt_tokens", "Prompt tokens processed.", registry=r)
        self.cached_tokens = Counter(
            "dsv32:prompt_tokens_cached", "Prompt tokens served by the prefix cache.", registry=r
        )
        self.generation_tokens = Counter("dsv32:generation_tokens", "Tokens generated.", registry=r)
        self.finished = Counter(
            "dsv32:request_success", "Finished requests, by reason (stop, length, abort).", ["finished_reason"],
            registry=r,
        )  # fmt: skip
        self.ttft = Histogram(
            "dsv32:time_to_first_token_seconds", "From submission to the engine to the first token.",
            buckets=_LATENCY_BUCKETS, registry=r,
        )  # fmt: skip
        self.itl = Histogram(
            "dsv32:inter_token_latency_seconds", "Time between consecutive tokens of a request.",
            buckets=_LATENCY_BUCKETS, registry=r,
        )  # fmt: skip
        self.e2e = Histogram(
            "dsv32:e2e_request_latency_seconds", "From submission to the engine to the last token.",
            buckets=_LATENCY_BUCKETS, registry=r,
        )  # fmt: skip
        self.request_prompt = Histogram(
            "dsv32:request_prompt_tokens",
            "Prompt tokens per finished request.",
            buckets=_TOKEN_BUCKETS,
            registry=r,
        )
        self.request_generation = Histogram(
            "dsv32:request_generation_tokens", "Generated tokens per finished request.", buckets=_TOKEN_BUCKETS,
            registry=r,
        )  # fmt: skip
        self._live: dict[str, _Live] = {}

    def added(self, request_id: str, arrival: float | None = None) -> None:
        """``request_id`` was accepted; ``arrival``: when it was submitted (this metrics' clock; default now).
        Latencies count from there, so time queued behind a running step is in the TTFT."""
        self._live[request_id] = _Live(self.clock() if arrival is None else arrival)

    def output(self, out: RequestOutput) -> None:
        live = self._live.get(out.request_id)
        if live is None:
            return
        now = self.clock()
        n = len(out.new_token_ids)
        if not live.counted_prompt:  # the prompt has been processed once its first output exists
            live.counted_prompt = True
            self.prompt_tokens.inc(out.usage.prompt_tokens)
            self.cached_tokens.inc(out.usage.cached_tokens)
        if n:
            if live.last is None:
                self.ttft.observe(now - live.arrival)
            else:
                for _ in range(n):  # tokens that came in one output share the interval
                    self.itl.observe((now - live.last) / n)
            live.last = now
            self.generation_tokens.inc(n)
        if out.finished:
            del self._live[out.request_id]
            self.finished.labels(out.finish_reason or "stop").inc()
            self.e2e.observe(now - live.arrival)
            self.request_prompt.observe(out.usage.prompt_tokens)
            self.request_generation.observe(out.usage.completion_tokens)

    def aborted(self, request_id: str) -> None:
        """A request ended before finishing (client gone, stream closed)."""
        if self._live.pop(request_id, None) is not None:
            self.finished.labels("abort").inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)
