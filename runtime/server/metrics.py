"""Prometheus metrics with vLLM's names and types (label `model_name`).

Dashboards and the operator's autoscaler (KEDA on vllm:num_requests_waiting)
read these, so names, types and units follow vLLM exactly:
- gauges and engine-wide counters are read from the latest `EngineStats`
  snapshot at scrape time (EngineCollector), so they can never drift from the
  engine's own bookkeeping;
- latency histograms and request_success are observed per request on the
  event loop from the per-step progress the OutputProcessor reports
  (`RequestMetricsObserver`, an AsyncLLM OutputObserver), with the engine core's
  step timestamps, so they read the same whether the core is a thread or a process.
Each app owns its own CollectorRegistry so several servers can share a process.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from ..protocols import StatsSnapshot

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

# vLLM's buckets, so that existing dashboards' histogram_quantile queries read the same.
TTFT_BUCKETS = [
    0.001,
    0.005,
    0.01,
    0.02,
    0.04,
    0.06,
    0.08,
    0.1,
    0.25,
    0.5,
    0.75,
    1.0,
    2.5,
    5.0,
    7.5,
    10.0,
    20.0,
    40.0,
    80.0,
    160.0,
    640.0,
    2560.0,
]
ITL_BUCKETS = [
    0.01,
    0.025,
    0.05,
    0.075,
    0.1,
    0.15,
    0.2,
    0.3,
    0.4,
    0.5,
    0.75,
    1.0,
    2.5,
    5.0,
    7.5,
    10.0,
    20.0,
    40.0,
    80.0,
]
REQUEST_BUCKETS = [
    0.3,
    0.5,
    0.8,
    1.0,
    1.5,
    2.0,
    2.5,
    5.0,
    10.0,
    15.0,
    20.0,
    30.0,
    40.0,
    50.0,
    60.0,
    120.0,
    240.0,
    480.0,
    960.0,
    1920.0,
    7680.0,
]


class EngineCollector:
    """Gauges and counters straight from the engine's stats, read at scrape time."""

    def __init__(self, model_name: str, stats: Callable[[], StatsSnapshot], num_waiting: Callable[[], int]):
        self.model_name = model_name
        self._stats = stats
        self._num_waiting = num_waiting  # the engine's queue plus requests not handed to it yet

    def describe(self):
        return []

    def collect(self):
        s = self._stats()
        labels = ["model_name"]
        value = [self.model_name]

        def gauge(name, doc, v):
            g = GaugeMetricFamily(name, doc, labels=labels)
            g.add_metric(value, float(v))
            return g

        def counter(name, doc, v):
            c = CounterMetricFamily(name, doc, labels=labels)
            c.add_metric(value, float(v))
            return c

        yield gauge(
            "vllm:num_requests_running", "Number of requests in model execution batches.", s.num_running
        )
        yield gauge(
            "vllm:num_requests_waiting", "Number of requests waiting to be processed.", self._num_waiting()
        )
        yield gauge(
            "vllm:kv_cache_usage_perc", "KV-cache usage. 1 means 100 percent usage.", s.kv_cache_usage
        )
        # The pre-v1 name, still used by many dashboards.
        yield gauge(
            "vllm:gpu_cache_usage_perc",
            "KV-cache usage. 1 means 100 percent usage (deprecated name).",
            s.kv_cache_usage,
        )
        yield counter("vllm:prompt_tokens", "Number of prefill tokens processed.", s.prompt_tokens_total)
        yield counter(
            "vllm:generation_tokens", "Number of generation tokens processed.", s.generation_tokens_total
        )
        yield counter(
            "vllm:num_preemptions",
            "Cumulative number of preemption from the engine.",
            s.num_preemptions_total,
        )
        yield counter(
            "vllm:prefix_cache_queries",
            "Prefix cache queries, in terms of number of queried tokens.",
            s.prefix_cache_queries_total,
        )
        yield counter(
            "vllm:prefix_cache_hits",
            "Prefix cache hits, in terms of number of cached tokens.",
            s.prefix_cache_hits_total,
        )


def build_1_2_5_buckets(max_value: int) -> list[int]:
    """1, 2, 5, 10, 20, 50, ... up to max_value (vLLM's token-count buckets)."""
    out: list[int] = []
    exp = 0
    while True:
        for m in (1, 2, 5):
            v = m * 10**exp
            if v > max_value:
                return out
            out.append(v)
        exp += 1


class _RequestTiming:
    """What the observer remembers of one running request, to time its tokens."""

    __slots__ = ("arrival", "num_tokens", "last_token_time", "queued_observed")

    def __init__(self, arrival: float):
        self.arrival = arrival
        self.num_tokens = 0
        self.last_token_time: float | None = None
        self.queued_observed = False


class RequestMetricsObserver:
    """Per-request latency histograms and finish counters; runs on the event loop."""

    def __init__(self, registry: CollectorRegistry, model_name: str, max_model_len: int = 1 << 20):
        self.model_name = model_name
        ln = ["model_name"]

        def hist(name, doc, buckets):
            return Histogram(name, doc, ln, buckets=buckets, registry=registry).labels(model_name)

        # Older vLLM name of the inter-token latency; many dashboards still query it.
        self.tpot = hist(
            "vllm:time_per_output_token_seconds",
            "Histogram of time per output token in seconds.",
            ITL_BUCKETS,
        )
        token_buckets = build_1_2_5_buckets(max_model_len)
        self.prompt_tokens = hist(
            "vllm:request_prompt_tokens", "Number of prefill tokens processed.", token_buckets
        )
        self.generation_tokens = hist(
            "vllm:request_generation_tokens", "Number of generation tokens processed.", token_buckets
        )
        self.prefill_time = hist(
            "vllm:request_prefill_time_seconds",
            "Histogram of time spent in PREFILL phase for request.",
            REQUEST_BUCKETS,
        )
        self.decode_time = hist(
            "vllm:request_decode_time_seconds",
            "Histogram of time spent in DECODE phase for request.",
            REQUEST_BUCKETS,
        )
        self.inference_time = hist(
            "vllm:request_inference_time_seconds",
            "Histogram of time spent in RUNNING phase for request.",
            REQUEST_BUCKETS,
        )
        self.ttft = hist(
            "vllm:time_to_first_token_seconds",
            "Histogram of time to first token in seconds.",
            TTFT_BUCKETS,
        )
        self.itl = hist(
            "vllm:inter_token_latency_seconds",
            "Histogram of inter-token latency in seconds.",
            ITL_BUCKETS,
        )
        self.e2e = hist(
            "vllm:e2e_request_latency_seconds",
            "Histogram of e2e request latency in seconds.",
            REQUEST_BUCKETS,
        )
        self.queue = hist(
            "vllm:request_queue_time_seconds",
            "Histogram of time spent in WAITING phase for request.",
            REQUEST_BUCKETS,
        )
        self.success = Counter(
            "vllm:request_success",
            "Count of successfully processed requests.",
            ["model_name", "finished_reason"],
            registry=registry,
        )
        for reason in ("stop", "length", "abort"):
            self.success.labels(model_name, reason)  # exported at 0 from the start
        self._requests: dict[str, _RequestTiming] = {}
        self._lock = threading.Lock()

    def on_request_added(self, request_id: str, arrival_time: float) -> None:
        with self._lock:
            self._requests[request_id] = _RequestTiming(arrival_time)

    def on_outputs(self, progress, now: float) -> None:
        """progress: RequestProgress items (runtime/output_processor.py) of one engine step."""
        for p in progress:
            st = self._requests.get(p.request_id)
            if st is None:
                continue
            m = p.metrics
            if not st.queued_observed and m is not None and m.first_scheduled_time is not None:
                self.queue.observe(max(0.0, m.first_scheduled_time - st.arrival))
                st.queued_observed = True
            num_tokens = p.num_output_tokens
            if num_tokens > st.num_tokens:
                if st.last_token_time is None:
                    self.ttft.observe(max(0.0, now - st.arrival))
                else:
                    gap = max(0.0, now - st.last_token_time)
                    self.itl.observe(gap)
                    self.tpot.observe(gap)
                st.last_token_time = now
                st.num_tokens = num_tokens
            if p.finished:
                self.e2e.observe(max(0.0, now - st.arrival))
                self.prompt_tokens.observe(p.num_prompt_tokens)
                self.generation_tokens.observe(num_tokens)
                if m is not None and m.first_scheduled_time is not None:
                    end = m.finished_time or now
                    self.inference_time.observe(max(0.0, end - m.first_scheduled_time))
                    if m.first_token_time is not None:
                        self.prefill_time.observe(max(0.0, m.first_token_time - m.first_scheduled_time))
                        self.decode_time.observe(max(0.0, (m.last_token_time or end) - m.first_token_time))
                for reason in p.finish_reasons:
                    self.success.labels(self.model_name, reason or "abort").inc()
                with self._lock:
                    self._requests.pop(p.request_id, None)


class ServerMetrics:
    """The registry of one app: engine collector plus request observer."""

    def __init__(
        self,
        model_name: str,
        stats: Callable[[], StatsSnapshot],
        num_waiting: Callable[[], int],
        max_model_len: int = 1 << 20,
    ):
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(EngineCollector(model_name, stats, num_waiting))
        self.observer = RequestMetricsObserver(self.registry, model_name, max_model_len)

    def render(self) -> bytes:
        return generate_latest(self.registry)
