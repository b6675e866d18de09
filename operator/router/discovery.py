"""Ready replicas from the apiserver, by watching; and the demand signal while cold.

Owns the router's only two conversations with Kubernetes:
- `EndpointWatcher`: list + watch of the runtime Service's EndpointSlices
  (`discovery.k8s.io/v1`; `v1beta1` on Kubernetes 1.20, which serves nothing newer; the core
  `v1` Endpoints where neither is served), chosen once from API discovery. Every event
  recomputes the ready set {address: pod} and hands it to a callback. A watch that ends or
  fails is resumed from the last resourceVersion; `410 Gone` (history compacted) relists.
  Endpoints that are not ready (starting, failing readiness, terminating) are left out: the
  kubelet's readiness probe on /health is the readiness the router trusts.
- `DemandSignal`: a merge patch of the annotation `fleetserve.dev/demand` (an RFC 3339
  time) on the InferenceService while requests wait for a first replica; the operator's
  autoscaler reads it to scale up from zero (operator/autoscaler.py).

A small aiohttp client rather than the kubernetes package: the router stays one event loop
with no threads, and needs only GET with streaming and PATCH.
"""

from __future__ import annotations

import asyncio
import datetime
import json
import logging
import os
import ssl
from collections.abc import Callable
from typing import Any

import aiohttp

from fleetserve.operator.router.config import SA_DIR, RouterConfig

log = logging.getLogger("fleetserve.router.discovery")
DEMAND_ANNOTATION = "fleetserve.dev/demand"
"""Not under serving.fleetserve.dev/: kopf leaves annotations of its own storage prefix out of the diffs
it reacts to, and the operator must see this one change (its `demand_signalled` handler)."""
ISVC_API = "/apis/serving.fleetserve.dev/v1alpha1"


class KubeClient:
    """GET / watch / merge-patch against the apiserver, in-cluster or at an explicit URL (tests)."""

    def __init__(
        self, base: str = "", token_file: str = f"{SA_DIR}/token", ca_file: str = f"{SA_DIR}/ca.crt"
    ):
        ssl_ctx: ssl.SSLContext | bool = False
        if not base:
            host, port = (
                os.environ["KUBERNETES_SERVICE_HOST"],
                os.environ.get("KUBERNETES_SERVICE_PORT", "443"),
            )
            base = f"https://{host}:{port}" if ":" not in host else f"https://[{host}]:{port}"
            ssl_ctx = ssl.create_default_context(cafile=ca_file)
        self.base = base.rstrip("/")
        self.token_file = token_file
        self._ssl = ssl_ctx
        self.session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=None, sock_connect=10))

    def _headers(self) -> dict[str, str]:
        try:  # re-read each time: projected service-account tokens are rotated by the kubelet
            with open(self.token_file) as fh:
                return {"Authorization": f"Bearer {fh.read().strip()}"}
        except OSError:
            return {}

    async def get(self, path: str, **params: str) -> tuple[int, Any]:
        async with self.session.get(
            self.base + path,
            params=params,
            headers=self._headers(),
            ssl=self._ssl,
            timeout=aiohttp.ClientTimeout(total=30),
        ) as resp:
            text = await resp.text()
            return resp.status, json.loads(text) if text.startswith(("{", "[")) else text

    def watch(self, path: str, **params: str) -> Any:
        return self.session.get(
            self.base + path,
            params={**params, "watch": "true"},
            headers=self._headers(),
            ssl=self._ssl,
            timeout=aiohttp.ClientTimeout(total=None, sock_read=None),
        )

    async def merge_patch(self, path: str, body: dict[str, Any]) -> int:
        headers = {**self._headers(), "Content-Type": "application/merge-patch+json"}
        async with self.session.patch(
            self.base + path,
            data=json.dumps(body),
            headers=headers,
            ssl=self._ssl,
            timeout=aiohttp.ClientTimeout(total=10),
        ) as resp:
            await resp.read()
            return resp.status

    async def close(self) -> None:
        await self.session.close()


async def detect_api(kube: KubeClient) -> str:
    """v1 where discovery.k8s.io/v1 is served (1.21+), v1beta1 where only it is (1.17-1.20), else endpoints."""
    status, groups = await kube.get("/apis")
    if status != 200 or not isinstance(groups, dict):
        raise RuntimeError(f"API discovery failed: {status} {str(groups)[:200]}")
    versions = {
        v.get("version")
        for g in groups.get("groups", [])
        if g.get("name") == "discovery.k8s.io"
        for v in g.get("versions", [])
    }
    return next((v for v in ("v1", "v1beta1") if v in versions), "endpoints")


def _slice_members(obj: dict[str, Any], port_name: str) -> dict[str, str]:
    ports = obj.get("ports") or []
    port = next((p.get("port") for p in ports if p.get("name") == port_name), None)
    if port is None and ports:
        port = ports[0].get("port")
    if port is None:
        return {}
    out = {}
    for ep in obj.get("endpoints") or []:
        cond = ep.get("conditions") or {}
        # v1: ready unset means ready; a terminating endpoint is never ready for new requests.
        if cond.get("ready") is False or cond.get("terminating") is True:
            continue
        name = (ep.get("targetRef") or {}).get("name", "")
        for ip in (ep.get("addresses") or [])[:1]:  # addresses of one endpoint are one pod
            address = f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}"
            out[address] = name or address
    return out


def _endpoints_members(obj: dict[str, Any], port_name: str) -> dict[str, str]:
    out = {}
    for subset in obj.get("subsets") or []:
        ports = subset.get("ports") or []
        port = next((p.get("port") for p in ports if p.get("name") == port_name), None)
        if port is None and ports:
            port = ports[0].get("port")
        if port is None:
            continue
        for addr in subset.get("addresses") or []:  # notReadyAddresses are left out
            ip = addr.get("ip", "")
            address = f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}"
            out[address] = (addr.get("targetRef") or {}).get("name", "") or address
    return out


class EndpointWatcher:
    """Keeps {address: pod name} of the Service's ready endpoints current and reports each change."""

    def __init__(self, kube: KubeClient, cfg: RouterConfig, on_change: Callable[[dict[str, str]], None]):
        self.kube, self.cfg, self.on_change = kube, cfg, on_change
        self.api: str | None = None
        self._objects: dict[str, dict[str, str]] = {}
        self.synced = asyncio.Event()
        """Set after the first complete list: until then 'no replica' only means 'not known yet'."""

    def _path_and_params(self) -> tuple[str, dict[str, str]]:
        ns, svc = self.cfg.namespace, self.cfg.service
        if self.api == "endpoints":
            return f"/api/v1/namespaces/{ns}/endpoints", {"fieldSelector": f"metadata.name={svc}"}
        return (
            f"/apis/discovery.k8s.io/{self.api}/namespaces/{ns}/endpointslices",
            {"labelSelector": f"kubernetes.io/service-name={svc}"},
        )

    def _members(self, obj: dict[str, Any]) -> dict[str, str]:
        # The selectors above already narrow it; checked again so a broad answer can never route elsewhere.
        meta = obj.get("metadata") or {}
        if self.api == "endpoints":
            if meta.get("name") != self.cfg.service:
                return {}
        elif (meta.get("labels") or {}).get("kubernetes.io/service-name") != self.cfg.service:
            return {}
        port = self.cfg.backend_port_name
        return _endpoints_members(obj, port) if self.api == "endpoints" else _slice_members(obj, port)

    def _publish(self) -> None:
        merged: dict[str, str] = {}
        for members in self._objects.values():
            merged.update(members)
        self.on_change(merged)

    async def run(self) -> None:
        """Forever: list, then watch from the list's resourceVersion; relist on 410 or after errors."""
        self.api = self.cfg.discovery if self.cfg.discovery != "auto" else None
        backoff = 0.5
        while True:
            try:
                if self.api is None:
                    self.api = await detect_api(self.kube)
                    log.info(
                        "discovering replicas of Service %s/%s through %s",
                        self.cfg.namespace,
                        self.cfg.service,
                        "Endpoints" if self.api == "endpoints" else f"EndpointSlice {self.api}",
                    )
                version: str | None = await self._list()
                backoff = 0.5
                while version is not None:
                    version = await self._watch(version)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # apiserver restart, network, RBAC being rolled out: retry
                log.warning(
                    "endpoint watch failed (%s: %s); retrying in %.1fs", type(exc).__name__, exc, backoff
                )
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 10.0)

    async def _list(self) -> str:
        path, params = self._path_and_params()
        status, body = await self.kube.get(path, **params)
        if status != 200:
            raise RuntimeError(f"list {path}: {status} {str(body)[:200]}")
        self._objects = {item["metadata"]["name"]: self._members(item) for item in body.get("items") or []}
        self._publish()
        self.synced.set()
        return str((body.get("metadata") or {}).get("resourceVersion") or "")

    async def _watch(self, version: str) -> str | None:
        """One watch request; returns the version to resume from, or None to relist."""
        path, params = self._path_and_params()
        params = {**params, "allowWatchBookmarks": "true", "timeoutSeconds": "300"}
        if version:
            params["resourceVersion"] = version
        async with self.kube.watch(path, **params) as resp:
            if resp.status == 410:
                return None
            if resp.status != 200:
                raise RuntimeError(f"watch {path}: {resp.status} {(await resp.text())[:200]}")
            async for line in resp.content:
                if not line.strip():
                    continue
                event = json.loads(line)
                kind, obj = event.get("type"), event.get("object") or {}
                if kind == "ERROR":
                    if obj.get("code") == 410:
                        return None
                    raise RuntimeError(f"watch error: {obj.get('message')}")
                version = str((obj.get("metadata") or {}).get("resourceVersion") or version)
                if kind == "BOOKMARK":
                    continue
                name = (obj.get("metadata") or {}).get("name", "")
                if kind == "DELETED":
                    self._objects.pop(name, None)
                else:
                    self._objects[name] = self._members(obj)
                self._publish()
        return version


class DemandSignal:
    """Marks the InferenceService as wanted while requests wait for a replica (rate-limited)."""

    def __init__(self, kube: KubeClient | None, cfg: RouterConfig):
        self.kube, self.cfg = kube, cfg
        self._last: float | None = None
        self._task: asyncio.Task[None] | None = None
        self.sent = 0

    def poke(self, now: float) -> None:
        """Called whenever a request starts waiting and periodically while some wait: patches at most
        every `demand_interval` seconds, in the background (a slow apiserver never delays requests)."""
        if self.kube is None or not self.cfg.inference_service:
            return
        if self._last is not None and now - self._last < self.cfg.demand_interval:
            return
        if self._task is not None and not self._task.done():
            return
        self._last = now
        self._task = asyncio.create_task(self._patch())

    async def _patch(self) -> None:
        if self.kube is None:  # poke() schedules no patch without a client
            return
        stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
        path = f"{ISVC_API}/namespaces/{self.cfg.namespace}/inferenceservices/{self.cfg.inference_service}"
        try:
            status = await self.kube.merge_patch(
                path, {"metadata": {"annotations": {DEMAND_ANNOTATION: stamp}}}
            )
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as exc:
            log.warning("demand signal failed: %s", exc)
            self._last = None
            return
        if status >= 300:
            log.warning("demand signal refused: HTTP %s", status)
            self._last = None
        else:
            self.sent += 1
            log.info("demand signalled on %s (%s)", self.cfg.inference_service, stamp)

    async def close(self) -> None:
        if self._task is not None:
            await asyncio.gather(self._task, return_exceptions=True)
