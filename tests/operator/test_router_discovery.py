"""The router's view of the cluster, against kmock's HTTP Kubernetes API: replicas from watched
EndpointSlices (v1; v1beta1 as on Kubernetes 1.20) or Endpoints, and the demand annotation.
The last test runs `python -m fleetserve.operator.router` for real against kmock and fake replicas.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import sys

import aiohttp
import kmock
import pytest
import yaml

from fleetserve.operator.router.config import RouterConfig
from fleetserve.operator.router.discovery import DEMAND_ANNOTATION, DemandSignal, EndpointWatcher, KubeClient

from .conftest import ISVC_RES, create, delete, eventually, get, isvc, patch
from .fake_replica import FakeReplica

SLICE_KINDS = {"v1": "EndpointSlice", "v1beta1": "EndpointSlice"}


def _serve(server, api: str) -> None:
    if api == "endpoints":
        path, kind = "v1/endpoints", "Endpoints"
    else:
        path, kind = f"discovery.k8s.io/{api}/endpointslices", "EndpointSlice"
    server.resources[path] = kmock.ResourceInfo(
        kind=kind, namespaced=True, verbs={"get", "list", "watch", "create", "patch", "delete"}
    )


def _base_url() -> str:
    with open(os.environ["KUBECONFIG"]) as fh:
        return yaml.safe_load(fh)["clusters"][0]["cluster"]["server"]


def endpoint_slice(
    api: str,
    name: str,
    service: str,
    endpoints: list[tuple[str, bool, str]],
    port: int = 8000,
    terminating: tuple[str, ...] = (),
) -> dict:
    return {
        "apiVersion": f"discovery.k8s.io/{api}",
        "kind": "EndpointSlice",
        "addressType": "IPv4",
        "metadata": {"name": name, "namespace": "default", "labels": {"kubernetes.io/service-name": service}},
        "ports": [{"name": "http", "port": port, "protocol": "TCP"}],
        "endpoints": [
            {
                "addresses": [ip],
                "conditions": {"ready": ready, "terminating": ip in terminating},
                "targetRef": {"kind": "Pod", "name": pod, "namespace": "default"},
            }
            for ip, ready, pod in endpoints
        ],
    }


def endpoints_object(
    service: str, ready: list[tuple[str, str]], not_ready: list[str], port: int = 8000
) -> dict:
    return {
        "apiVersion": "v1",
        "kind": "Endpoints",
        "metadata": {"name": service, "namespace": "default"},
        "subsets": [
            {
                "addresses": [{"ip": ip, "targetRef": {"kind": "Pod", "name": pod}} for ip, pod in ready],
                "notReadyAddresses": [{"ip": ip} for ip in not_ready],
                "ports": [{"name": "http", "port": port}],
            }
        ],
    }


async def _post(server, path: str, obj: dict) -> None:
    async with server.clients[0].post(path, json=obj) as resp:
        assert resp.status < 300, await resp.text()


async def _watching(server, api: str):
    cfg = RouterConfig(namespace="default", service="llm", apiserver=_base_url())
    kube = KubeClient(cfg.apiserver, token_file="/nonexistent")
    seen: list[dict[str, str]] = []
    watcher = EndpointWatcher(kube, cfg, lambda members: seen.append(dict(members)))
    task = asyncio.create_task(watcher.run())
    await asyncio.wait_for(watcher.synced.wait(), 10)
    return kube, watcher, task, seen


@pytest.mark.parametrize("api", ["v1", "v1beta1"])
async def test_endpoint_slices_are_watched(apiserver, api):
    """v1 where served; v1beta1 on a 1.20 cluster (which serves only it): found through API discovery."""
    _serve(apiserver, api)
    kube, watcher, task, seen = await _watching(apiserver, api)
    try:
        assert watcher.api == api and seen[-1] == {}
        base = f"/apis/discovery.k8s.io/{api}/namespaces/default/endpointslices"
        await _post(
            apiserver,
            base,
            endpoint_slice(
                api, "llm-abc", "llm", [("10.0.0.1", True, "llm-0"), ("10.0.0.2", False, "llm-1")]
            ),
        )
        await _post(apiserver, base, endpoint_slice(api, "other-x", "other", [("10.9.9.9", True, "other-0")]))
        await eventually(lambda: seen[-1] == {"10.0.0.1:8000": "llm-0"}, timeout=5)
        # readiness flips, a second slice appears, a terminating endpoint is left out
        await patch(
            apiserver,
            f"{base}/llm-abc",
            {
                "endpoints": endpoint_slice(
                    api,
                    "llm-abc",
                    "llm",
                    [("10.0.0.1", True, "llm-0"), ("10.0.0.2", True, "llm-1")],
                    terminating=("10.0.0.1",),
                )["endpoints"]
            },
        )
        await _post(apiserver, base, endpoint_slice(api, "llm-def", "llm", [("10.0.0.3", True, "llm-2")]))
        await eventually(lambda: seen[-1] == {"10.0.0.2:8000": "llm-1", "10.0.0.3:8000": "llm-2"}, timeout=5)
        await delete(apiserver, f"{base}/llm-def")
        await eventually(lambda: seen[-1] == {"10.0.0.2:8000": "llm-1"}, timeout=5)
        watches = [
            r
            for r in list(apiserver)
            if r.action == kmock.action.WATCH and r.resource and r.resource.plural == "endpointslices"
        ]
        assert watches and all(
            r.params.get("labelSelector") == "kubernetes.io/service-name=llm" for r in watches
        )
        lists = [
            r
            for r in list(apiserver)
            if r.action == kmock.action.LIST and r.resource and r.resource.plural == "endpointslices"
        ]
        assert len(lists) == 1  # a watch, not polling
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await kube.close()


async def test_endpoints_when_no_endpoint_slice_api_is_served(apiserver):
    _serve(apiserver, "endpoints")
    kube, watcher, task, seen = await _watching(apiserver, "endpoints")
    try:
        assert watcher.api == "endpoints"
        await _post(
            apiserver,
            "/api/v1/namespaces/default/endpoints",
            endpoints_object("llm", [("10.0.0.5", "llm-0")], ["10.0.0.6"]),
        )
        await eventually(lambda: seen[-1] == {"10.0.0.5:8000": "llm-0"}, timeout=5)
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await kube.close()


async def test_demand_signal_annotates_the_inference_service(apiserver):
    await create(apiserver, isvc("llm", {"autoscaling": {"minReplicas": 0, "scaleToZero": True}}))
    cfg = RouterConfig(
        namespace="default", service="llm", inference_service="llm", apiserver=_base_url(), demand_interval=60
    )
    kube = KubeClient(cfg.apiserver, token_file="/nonexistent")
    demand = DemandSignal(kube, cfg)
    try:
        demand.poke(100.0)
        demand.poke(101.0)  # within demand_interval: not sent again
        await eventually(
            lambda: (get(apiserver, ISVC_RES, "llm")["metadata"].get("annotations") or {}).get(
                DEMAND_ANNOTATION
            ),
            timeout=5,
        )
        await demand.close()
        assert demand.sent == 1
        stamp = get(apiserver, ISVC_RES, "llm")["metadata"]["annotations"][DEMAND_ANNOTATION]
        assert len(stamp) == 20 and stamp.endswith("Z")
    finally:
        await kube.close()


async def test_python_m_router_discovers_replicas_and_routes(apiserver):
    """The entry point in its own process: cold (503 after the queue timeout, demand annotated), then a
    replica's EndpointSlice appears and requests are answered by it."""
    _serve(apiserver, "v1")
    await create(apiserver, isvc("llm", {"autoscaling": {"minReplicas": 0, "scaleToZero": True}}))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {
        **os.environ,
        "FLEETSERVE_ROUTER_APISERVER": _base_url(),
        "FLEETSERVE_ROUTER_NAMESPACE": "default",
        "FLEETSERVE_ROUTER_SERVICE": "llm",
        "FLEETSERVE_ROUTER_INFERENCE_SERVICE": "llm",
        "FLEETSERVE_ROUTER_PORT": str(port),
        "FLEETSERVE_ROUTER_HOST": "127.0.0.1",
        "FLEETSERVE_ROUTER_QUEUE_TIMEOUT": "1",
        "FLEETSERVE_ROUTER_RETRY_AFTER": "3",
        "FLEETSERVE_LOG_LEVEL": "warning",
    }
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "fleetserve.operator.router",
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    replica = await FakeReplica("r0").start()
    url = f"http://127.0.0.1:{port}"
    try:
        async with aiohttp.ClientSession() as http:

            async def up():
                try:
                    async with http.get(f"{url}/healthz") as resp:
                        return resp.status == 200
                except aiohttp.ClientError:
                    return False

            await eventually(up, timeout=20)
            async with http.post(f"{url}/v1/completions", json={"model": "llm", "prompt": "x"}) as resp:
                assert resp.status == 503 and resp.headers["Retry-After"] == "3"
            assert (get(apiserver, ISVC_RES, "llm")["metadata"].get("annotations") or {}).get(
                DEMAND_ANNOTATION
            )
            await _post(
                apiserver,
                "/apis/discovery.k8s.io/v1/namespaces/default/endpointslices",
                endpoint_slice("v1", "llm-1", "llm", [("127.0.0.1", True, "llm-0")], port=replica.port),
            )

            async def answered():
                async with http.post(f"{url}/v1/completions", json={"model": "llm", "prompt": "x"}) as resp:
                    return resp.status == 200 and (await resp.json())["choices"][0]["text"].startswith("r0-")

            await eventually(answered, timeout=10)
    finally:
        await replica.stop()
        proc.send_signal(signal.SIGTERM)
        out, _ = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode == 0, out.decode()[-2000:]
