"""The router's HTTP server: forwards OpenAI requests to the replica the balancer picks.

Owns the request path: read the body once, compute its affinity key, choose a replica,
forward, pass the response back. The response is relayed as it arrives (SSE chunks are
written as soon as they are read, never buffered); JSON responses are read whole first, which
keeps them retryable until the router sends its first byte.

- Retries: a replica that refuses or drops the connection, or answers 503, before the router
  sent any byte to the client (for streams: before the replica's first body chunk, which the
  client's headers wait for), is excluded and the next choice is tried (up to `max_attempts`).
  When every replica answered 503 (all overloaded), the last one's answer is passed on; when
  connections failed on every replica, the request waits for the replica set to change (a dead
  pod leaves it, its replacement joins) within `queue_timeout`.
  Once a byte was sent there is no retry: the client's connection is closed instead, so a
  half-streamed answer never looks complete.
- Client disconnects cancel the handler (aiohttp's handler_cancellation); closing the upstream
  response then drops the replica's connection, and the runtime aborts the request.
- Cold: with no ready replica, POST requests wait in a bounded queue (`queue_size`) up to
  `queue_timeout`, then get 503 with Retry-After; while they wait, DemandSignal marks the
  InferenceService so the operator scales it up from zero. GET requests never wait (a health
  checker must not keep a service awake).
- Own endpoints: `/healthz` (the router's probe) and `/metrics` (the router's Prometheus metrics;
  the replicas' metrics are scraped from the pods). Everything else is proxied.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from typing import Any

import aiohttp
from aiohttp import web
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

from fleetserve.operator.metrics import scrape
from fleetserve.operator.router.balancer import Backend, Balancer, affinity_key
from fleetserve.operator.router.config import RouterConfig
from fleetserve.operator.router.discovery import DemandSignal

log = logging.getLogger("fleetserve.router")
BACKEND_HEADER = "X-Fleetserve-Backend"
# Hop-by-hop headers (RFC 9110 7.6.1) and those aiohttp computes itself.
_DROP_REQUEST = {
    "connection",
    "keep-alive",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
    "host",
    "content-length",
}
_DROP_RESPONSE = _DROP_REQUEST | {"date", "server"}


class _Retry:
    """_forward's answer when nothing reached the client and another replica may be tried; `answer` is the
    replica's own 503 (passed on when every replica answers so), None after a connection failure."""

    def __init__(self, answer: web.Response | None = None):
        self.answer = answer


class RouterMetrics:
    """The router's Prometheus metrics, in a registry of its own (served on /metrics)."""

    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        p = "fleetserve_router"
        self.requests = Counter(
            f"{p}_requests",
            "Requests answered through each replica, by status code.",
            ["backend", "code"],
            registry=r,
        )
        self.errors = Counter(
            f"{p}_backend_errors",
            "Failures talking to a replica: connect (refused, reset, "
            "timeout before a response), unavailable (503), stream_broken (after the first byte).",
            ["backend", "kind"],
            registry=r,
        )
        self.retries = Counter(
            f"{p}_retries",
            "Requests sent to another replica after a failure before the first response byte.",
            registry=r,
        )
        self.decisions = Counter(
            f"{p}_routing_decisions",
            "Routing decisions: affinity_hit (the prefix's own "
            "replica), load_fallback (another one: the own one was full or saturated), "
            "least_loaded (no prompt to hash).",
            ["decision"],
            registry=r,
        )
        self.queued = Gauge(
            f"{p}_queued_requests", "Requests waiting for a ready replica (cold).", registry=r
        )
        self.queue_wait = Histogram(
            f"{p}_queue_wait_seconds",
            "Time requests waited for a ready replica.",
            buckets=(0.1, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600),
            registry=r,
        )
        self.rejected = Counter(
            f"{p}_rejected",
            "Requests answered 503 by the router: queue_full, queue_timeout, "
            "no_replica (GET while cold), exhausted (every attempt failed).",
            ["reason"],
            registry=r,
        )
        self.added = Histogram(
            f"{p}_added_latency_seconds",
            "Time the router spends on a request before "
            "forwarding it (read, hash, choose; queue time excluded).",
            buckets=(0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.1),
            registry=r,
        )
        self.disconnects = Counter(
            f"{p}_client_disconnects",
            "Clients that went away mid-request (the upstream request is aborted).",
            registry=r,
        )
        self.backends = Gauge(
            f"{p}_backends",
            "Ready replicas known to the router, and how many are saturated.",
            ["state"],
            registry=r,
        )
        self._labels: dict[str, set[tuple[Any, tuple[str, ...]]]] = {}

    def _count(self, metric: Counter, backend: str, *labels: str) -> None:
        metric.labels(backend, *labels).inc()
        self._labels.setdefault(backend, set()).add((metric, labels))

    def answered(self, backend: str, status: int) -> None:
        self._count(self.requests, backend, str(status))

    def error(self, backend: str, kind: str) -> None:
        self._count(self.errors, backend, kind)

    def forget(self, keep: set[str]) -> None:
        """Drops the series of replicas that left (pods come and go with every rollout and scale-down)."""
        for backend in [b for b in self._labels if b not in keep]:
            for metric, labels in self._labels.pop(backend):
                metric.remove(backend, *labels)


class Router:
    """The replica set, the wait for replicas, and the aiohttp handlers."""

    def __init__(self, cfg: RouterConfig, demand: DemandSignal | None = None):
        self.cfg = cfg
        self.balancer = Balancer(
            cfg.load_factor, cfg.virtual_nodes, cfg.max_waiting, cfg.max_kv_usage, cfg.load_slack
        )
        self.metrics = RouterMetrics()
        self.demand = demand or DemandSignal(None, cfg)
        self._change = asyncio.Event()
        self._discovered = False
        """Set by the first set_members: before it, 'no replica' means 'not known yet', not demand."""
        self._waiting = 0
        self.session: aiohttp.ClientSession | None = None

    # --- membership and load ------------------------------------------------------------------
    def set_members(self, members: dict[str, str]) -> None:
        """The ready endpoints {address: pod name} (from discovery.EndpointWatcher)."""
        self._discovered = True
        if self.balancer.set_backends(members.items()):
            log.info("replicas: %s", ", ".join(sorted(members.values())) or "none")
            self.metrics.forget(set(members.values()))
        self._update_backend_gauges()
        # Wake every waiter: a replica appeared (cold queue) or the set changed (retry candidates).
        old, self._change = self._change, asyncio.Event()
        old.set()

    def _update_backend_gauges(self) -> None:
        backends = list(self.balancer.backends.values())
        self.metrics.backends.labels("ready").set(len(backends))
        self.metrics.backends.labels("saturated").set(sum(self.balancer.saturated(b) for b in backends))

    async def scrape_loop(self) -> None:
        """Reads each replica's queue and KV usage every `scrape_interval` (the saturation signal)."""
        while True:
            backends = list(self.balancer.backends.values())
            if backends and self.session is not None:
                samples = await asyncio.gather(
                    *(
                        scrape(self.session, b.address, f"{b.url}/metrics", self.cfg.scrape_timeout)
                        for b in backends
                    )
                )
                for sample in samples:
                    if sample is not None:
                        self.balancer.update_metrics(sample.pod, sample.waiting, sample.kv_usage)
                self._update_backend_gauges()
            await asyncio.sleep(self.cfg.scrape_interval)

    # --- the app ------------------------------------------------------------------------------
    def app(self) -> web.Application:
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_get("/healthz", self.healthz)
        app.router.add_get("/metrics", self.prometheus)
        app.router.add_route("*", "/{tail:.*}", self.handle)
        app.on_startup.append(self._start_session)
        app.on_cleanup.append(self._close_session)
        return app

    async def _start_session(self, _: web.Application) -> None:
        # No total timeout: generations stream for minutes. Connects are bounded, so a dead replica
        # costs `connect_timeout` at most before the retry; reads too, for a peer gone without a word. auto_decompress off: bytes pass as they are.
        self.session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=0, keepalive_timeout=30, ttl_dns_cache=None),
            timeout=aiohttp.ClientTimeout(
                total=None, sock_connect=self.cfg.connect_timeout, sock_read=self.cfg.read_timeout
            ),
            auto_decompress=False,
            skip_auto_headers=("User-Agent",),
        )

    async def _close_session(self, _: web.Application) -> None:
        if self.session is not None:
            await self.session.close()
        await self.demand.close()

    async def healthz(self, _: web.Request) -> web.Response:
        return web.json_response({"replicas": len(self.balancer.backends), "queued": self._waiting})

    async def prometheus(self, _: web.Request) -> web.Response:
        return web.Response(
            body=generate_latest(self.metrics.registry), headers={"Content-Type": CONTENT_TYPE_LATEST}
        )

    def _error(self, status: int, message: str, reason: str, retry_after: bool = True) -> web.Response:
        self.metrics.rejected.labels(reason).inc()
        headers = {"Retry-After": str(self.cfg.retry_after)} if retry_after else {}
        body = {
            "error": {
                "message": message,
                "type": "service_unavailable" if status == 503 else "bad_gateway",
                "param": None,
                "code": reason,
            }
        }
        return web.json_response(body, status=status, headers=headers)

    async def handle(self, request: web.Request) -> web.StreamResponse:
        start = time.perf_counter()
        body = await request.read()
        key = None
        if request.method == "POST" and body:
            try:
                parsed: Any = json.loads(body)
            except ValueError:
                parsed = None  # the replica answers 400 in the OpenAI error shape
            key = affinity_key(request.path, parsed, self.cfg.affinity_block_chars, self.cfg.affinity_blocks)
        tried: list[str] = []
        refused: web.Response | None = None
        waited = 0.0
        deadline: float | None = None
        while True:
            backend, decision = self.balancer.choose(key, tried)
            if backend is None:
                if request.method != "POST" and not self.balancer.backends:
                    return self._error(503, "no ready replica", "no_replica")
                if refused is not None:
                    # Every replica answered 503 (overloaded or shutting down): theirs is the answer.
                    self.metrics.rejected.labels("exhausted").inc()
                    return refused
                if len(tried) >= self.cfg.max_attempts:
                    return self._error(503, f"{len(tried)} replicas failed before answering", "exhausted")
                if deadline is None:
                    deadline = time.monotonic() + self.cfg.queue_timeout
                t0 = time.monotonic()
                refusal = await self._wait_for_replica(deadline)
                waited += time.monotonic() - t0
                if refusal is not None:
                    return refusal
                continue
            if tried:
                self.metrics.retries.inc()
            else:
                self.metrics.decisions.labels(decision).inc()
                self.metrics.added.observe(time.perf_counter() - start - waited)
            backend.outstanding += 1
            try:
                result = await self._forward(request, backend, body)
            finally:
                backend.outstanding -= 1
            if not isinstance(result, _Retry):
                return result
            tried.append(backend.address)
            refused = result.answer or refused
            if len(tried) >= self.cfg.max_attempts:
                if refused is not None:
                    self.metrics.rejected.labels("exhausted").inc()
                    return refused
                return self._error(503, f"{len(tried)} replicas failed before answering", "exhausted")

    async def _wait_for_replica(self, deadline: float) -> web.Response | None:
        """Holds a request until the replica set changes (None: choose again) or the deadline passes."""
        if self._waiting >= self.cfg.queue_size:
            return self._error(503, f"{self._waiting} requests already wait for a replica", "queue_full")
        self._waiting += 1
        self.metrics.queued.set(self._waiting)
        t0 = time.monotonic()
        try:
            while True:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return self._error(
                        503, f"no replica became ready within {self.cfg.queue_timeout:g}s", "queue_timeout"
                    )
                if not self.balancer.backends and self._discovered:
                    # (A router that just started and has not listed the endpoints yet signals nothing: a
                    # spurious signal would keep a running service from scaling to zero for a while.)
                    self.demand.poke(time.monotonic())
                change = self._change
                try:
                    await asyncio.wait_for(change.wait(), min(remaining, self.cfg.demand_interval))
                except asyncio.TimeoutError:
                    continue
                return None
        finally:
            self._waiting -= 1
            self.metrics.queued.set(self._waiting)
            self.metrics.queue_wait.observe(time.monotonic() - t0)

    async def _forward(self, request: web.Request, backend: Backend, body: bytes) -> Any:
        assert self.session is not None
        m = self.metrics
        headers = {k: v for k, v in request.headers.items() if k.lower() not in _DROP_REQUEST}
        try:
            up = await self.session.request(
                request.method,
                backend.url + request.rel_url.path_qs,
                data=body,
                headers=headers,
                allow_redirects=False,
            )
        except asyncio.CancelledError:
            m.disconnects.inc()
            raise
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as exc:
            m.error(backend.name, "connect")
            log.warning(
                "replica %s failed before answering (%s: %s): trying another",
                backend.name,
                type(exc).__name__,
                exc,
            )
            return _Retry()
        complete = False
        try:
            out_headers = {k: v for k, v in up.headers.items() if k.lower() not in _DROP_RESPONSE}
            out_headers[BACKEND_HEADER] = backend.name
            if up.status == 503:
                m.error(backend.name, "unavailable")
                try:
                    return _Retry(web.Response(status=503, body=await up.read(), headers=out_headers))
                except (aiohttp.ClientError, asyncio.TimeoutError, OSError):
                    return _Retry()
            if not up.headers.get("Content-Type", "").startswith("text/event-stream"):
                try:
                    data = await up.read()
                except (aiohttp.ClientError, asyncio.TimeoutError, OSError):
                    m.error(backend.name, "connect")
                    return _Retry()  # nothing was sent to the client yet
                complete = True
                m.answered(backend.name, up.status)
                return web.Response(status=up.status, body=data, headers=out_headers)
            # The client gets the headers together with the first chunk: until the replica sent a body byte
            # (a server may open its stream well before its first token), a failure can still go to another replica.
            try:
                chunk = await up.content.readany()
            except (aiohttp.ClientError, asyncio.TimeoutError, OSError):
                m.error(backend.name, "connect")
                return _Retry()
            resp = web.StreamResponse(status=up.status, headers=out_headers)
            await resp.prepare(request)
            while True:
                if chunk:
                    try:
                        await resp.write(chunk)
                    except (ConnectionResetError, aiohttp.ClientConnectionResetError):
                        m.disconnects.inc()
                        return resp
                try:
                    chunk = await up.content.readany()
                except (aiohttp.ClientError, asyncio.TimeoutError, OSError):
                    # Streaming started: no retry. Drop the client's connection so the answer reads as cut.
                    m.error(backend.name, "stream_broken")
                    if request.transport is not None:
                        request.transport.close()
                    return resp
                if not chunk:
                    break
            complete = True
            m.answered(backend.name, up.status)
            await resp.write_eof()
            return resp
        except asyncio.CancelledError:
            m.disconnects.inc()
            raise
        finally:
            # A finished response returns its connection to the pool; anything else closes it, which
            # is how the replica learns that the client went away (it aborts the generation).
            if complete:
                up.release()
            else:
                up.close()
