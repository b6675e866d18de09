"""The router's configuration: one typed object, read once from the environment at start.

The operator renders these variables from the InferenceService's `spec.router`
(operator/render.py); defaults here are what a bare `python -m fleetserve.operator.router` uses.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from typing import Any

SA_DIR = "/var/run/secrets/kubernetes.io/serviceaccount"


@dataclasses.dataclass(frozen=True)
class RouterConfig:
    namespace: str = "default"
    """Namespace of the InferenceService and its runtime Service (env FLEETSERVE_ROUTER_NAMESPACE)."""

    service: str = ""
    """Name of the runtime Service whose ready endpoints are the replicas (env FLEETSERVE_ROUTER_SERVICE)."""

    inference_service: str = ""
    """InferenceService to annotate with demand while cold; empty: no demand signal
    (env FLEETSERVE_ROUTER_INFERENCE_SERVICE)."""

    host: str = "0.0.0.0"
    """Listen address (env FLEETSERVE_ROUTER_HOST)."""

    port: int = 8080
    """Listen port (env FLEETSERVE_ROUTER_PORT)."""

    backend_port_name: str = "http"
    """Endpoint port name of the runtime's API; the first port when no port has this name."""

    apiserver: str = ""
    """Kubernetes API base URL; empty: in-cluster (KUBERNETES_SERVICE_HOST/PORT with the service account
    token and CA) (env FLEETSERVE_ROUTER_APISERVER)."""

    discovery: str = "auto"
    """auto (EndpointSlice discovery.k8s.io/v1, else v1beta1, else Endpoints), v1, v1beta1 or endpoints
    (env FLEETSERVE_ROUTER_DISCOVERY)."""

    affinity_block_chars: int = 128
    """Characters per prompt block hashed for the affinity key of /v1/completions (env
    FLEETSERVE_ROUTER_AFFINITY_BLOCK_CHARS)."""

    affinity_blocks: int = 4
    """Leading prompt blocks in the affinity key: prompts sharing them go to the same replica (env
    FLEETSERVE_ROUTER_AFFINITY_BLOCKS)."""

    load_factor: float = 1.25
    """Bounded load: a replica takes an affine request only while its outstanding requests are below
    ceil(load_factor * (total + 1) / replicas) (env FLEETSERVE_ROUTER_LOAD_FACTOR)."""

    load_slack: int = 4
    """Bounded load spills a replica's requests only while it also carries at least this many more
    outstanding requests than the least loaded replica, so conversations stay put at low concurrency
    (env FLEETSERVE_ROUTER_LOAD_SLACK)."""

    virtual_nodes: int = 100
    """Points per replica on the consistent-hash ring (env FLEETSERVE_ROUTER_VIRTUAL_NODES)."""

    max_waiting: float = 8
    """A replica reporting at least this many waiting requests (vllm:num_requests_waiting) is saturated:
    new requests avoid it while another replica is not (env FLEETSERVE_ROUTER_MAX_WAITING)."""

    max_kv_usage: float = 0.95
    """A replica at or above this KV-cache usage (vllm:kv_cache_usage_perc) is saturated
    (env FLEETSERVE_ROUTER_MAX_KV_USAGE)."""

    scrape_interval: float = 2.0
    """Seconds between scrapes of each replica's /metrics (env FLEETSERVE_ROUTER_SCRAPE_INTERVAL)."""

    scrape_timeout: float = 1.0
    """Per-replica scrape timeout in seconds."""

    max_attempts: int = 4
    """Replicas tried for one request when connections fail before any response byte (env
    FLEETSERVE_ROUTER_MAX_ATTEMPTS)."""

    connect_timeout: float = 3.0
    """Seconds to connect to a replica before trying another (env FLEETSERVE_ROUTER_CONNECT_TIMEOUT)."""

    read_timeout: float = 600.0
    """Seconds without a byte from a replica before its connection counts as dead (a node lost without a
    FIN); long enough for a whole non-streamed generation (env FLEETSERVE_ROUTER_READ_TIMEOUT)."""

    queue_size: int = 256
    """Requests held while no replica is ready; more get 503 at once (env FLEETSERVE_ROUTER_QUEUE_SIZE)."""

    queue_timeout: float = 300.0
    """Seconds a request waits for a ready replica before 503 + Retry-After (env FLEETSERVE_ROUTER_QUEUE_TIMEOUT)."""

    retry_after: int = 30
    """Retry-After seconds sent with 503s (env FLEETSERVE_ROUTER_RETRY_AFTER)."""

    demand_interval: float = 5.0
    """While requests wait, the demand annotation is refreshed this often (env FLEETSERVE_ROUTER_DEMAND_INTERVAL)."""

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> RouterConfig:
        env = os.environ if env is None else env
        values = {}
        for f in dataclasses.fields(cls):
            raw = env.get(f"FLEETSERVE_ROUTER_{f.name.upper()}")
            if raw is None or raw == "":
                continue
            kind: type[Any] = type(f.default)
            values[f.name] = kind(float(raw)) if kind is int else kind(raw)
        if "namespace" not in values:
            try:
                with open(f"{SA_DIR}/namespace") as fh:
                    values["namespace"] = fh.read().strip()
            except OSError:
                pass
        cfg = cls(**values)
        if cfg.discovery not in ("auto", "v1", "v1beta1", "endpoints"):
            raise ValueError(
                f"FLEETSERVE_ROUTER_DISCOVERY must be auto, v1, v1beta1 or endpoints, not {cfg.discovery!r}"
            )
        return cfg
