"""Operator-wide configuration, read once from the environment (the Helm chart sets it).

Owns the knobs that are the same for every InferenceService: the default runtime
image, the cluster DNS domain, how often pods are scraped, which namespaces are
watched. Per-service settings live in the CR spec (spec.py).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping


@dataclasses.dataclass(frozen=True)
class OperatorSettings:
    runtime_image: str = "fleetserve/runtime:0.1.0"
    """Runtime image for InferenceServices that do not set spec.image (env FLEETSERVE_RUNTIME_IMAGE)."""

    runtime_image_pull_policy: str = "IfNotPresent"
    """Pull policy when spec.imagePullPolicy is not set (env FLEETSERVE_RUNTIME_IMAGE_PULL_POLICY)."""

    cluster_domain: str = "cluster.local"
    """DNS suffix used to build status.url (env FLEETSERVE_CLUSTER_DOMAIN)."""

    metrics_interval: float = 10.0
    """Seconds between scrapes of each ready pod's /metrics and status refreshes (env FLEETSERVE_METRICS_INTERVAL)."""

    metrics_timeout: float = 3.0
    """Per-pod scrape timeout in seconds (env FLEETSERVE_METRICS_TIMEOUT)."""

    namespaces: tuple[str, ...] = ()
    """Namespaces to watch; empty means all (env FLEETSERVE_NAMESPACES, comma-separated)."""

    hf_endpoint: str = ""
    """Hugging Face Hub endpoint for the model-download step, e.g. a mirror (env FLEETSERVE_HF_ENDPOINT);
    empty: huggingface_hub's default."""

    router_image: str = "fleetserve/operator:0.1.0"
    """Image of the per-service router pods: the operator's own image, which carries
    `python -m fleetserve.operator.router` (env FLEETSERVE_ROUTER_IMAGE)."""

    router_image_pull_policy: str = "IfNotPresent"
    """Pull policy of the router image (env FLEETSERVE_ROUTER_IMAGE_PULL_POLICY)."""

    demand_ttl: float = 60.0
    """Seconds a router's demand annotation counts as current: a scaled-to-zero service with demand this
    recent is scaled up, and is not scaled back to zero while it lasts (env FLEETSERVE_DEMAND_TTL)."""

    peering: str = ""
    """kopf peering object to coordinate several operator replicas through (env FLEETSERVE_PEERING): only the
    replica of highest priority acts. Empty: standalone, one replica."""

    peering_lifetime: int = 20
    """Seconds a peer's keep-alive stays valid (env FLEETSERVE_PEERING_LIFETIME): the longest an acting
    operator that died without a word blocks the standby (one that stops cleanly withdraws at once)."""

    runtime_uid: int = 1000
    """UID/GID the runtime image runs as; the pod's fsGroup, so the cache volume is writable."""

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> OperatorSettings:
        env = os.environ if env is None else env
        d = cls()
        return cls(
            runtime_image=env.get("FLEETSERVE_RUNTIME_IMAGE") or d.runtime_image,
            runtime_image_pull_policy=env.get("FLEETSERVE_RUNTIME_IMAGE_PULL_POLICY")
            or d.runtime_image_pull_policy,
            cluster_domain=env.get("FLEETSERVE_CLUSTER_DOMAIN") or d.cluster_domain,
            metrics_interval=float(env.get("FLEETSERVE_METRICS_INTERVAL") or d.metrics_interval),
            metrics_timeout=float(env.get("FLEETSERVE_METRICS_TIMEOUT") or d.metrics_timeout),
            hf_endpoint=env.get("FLEETSERVE_HF_ENDPOINT") or d.hf_endpoint,
            router_image=env.get("FLEETSERVE_ROUTER_IMAGE") or d.router_image,
            router_image_pull_policy=env.get("FLEETSERVE_ROUTER_IMAGE_PULL_POLICY")
            or d.router_image_pull_policy,
            demand_ttl=float(env.get("FLEETSERVE_DEMAND_TTL") or d.demand_ttl),
            peering=env.get("FLEETSERVE_PEERING") or d.peering,
            peering_lifetime=int(env.get("FLEETSERVE_PEERING_LIFETIME") or d.peering_lifetime),
            namespaces=tuple(
                ns.strip() for ns in (env.get("FLEETSERVE_NAMESPACES") or "").split(",") if ns.strip()
            ),
        )
