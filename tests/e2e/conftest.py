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
from e2e_helpers import HELM, OPERATOR_IMAGE, REPO, RUNTIME_IMAGE, kubectl, run  # noqa: E402

RELEASE = "fleetserve-e2e"
OPERATOR_NS = os.environ.get("FLEETSERVE_E2E_OPERATOR_NAMESPACE", "fleetserve-e2e-system")


def _split(image: str) -> tuple[str, str]:
    repo, _, tag = image.rpartition(":")
    return (repo, tag) if repo and "/" not in tag else (image, "latest")


def helm_install() -> str:
    op_repo, op_tag = _split(OPERATOR_IMAGE)
    rt_repo, rt_tag = _split(RUNTIME_IMAGE)
    return run(HELM, "install", RELEASE, os.path.join(REPO, "charts", "fleetserve"), "-n", OPERATOR_NS,
               "--create-namespace", "--wait", "--timeout", "180s",
               "--set", f"image.repository={op_repo}", "--set", f"image.tag={op_tag}",
               "--set", "image.pullPolicy=IfNotPresent",
               "--set", f"runtimeImage.repository={rt_repo}", "--set", f"runtimeImage.tag={rt_tag}",
               "--set", "runtimeImage.pullPolicy=IfNotPresent",
               # examples/cpu-embedded.yaml requests 2 CPUs: all of a 2-CPU node, so nothing else may ask for CPU
               "--set", "resources.requests.cpu=0",
               # faster status and scaling decisions than the default 10 s
               "--set", "metricsInterval=3", "--set", "logLevel=debug", timeout=240)


@pytest.fixture(scope="session")
def operator_release():
    """The chart, installed once per session; uninstalled at the end unless a test already did."""
    run(HELM, "uninstall", RELEASE, "-n", OPERATOR_NS, check=False, timeout=120)
    out = helm_install()
    yield {"release": RELEASE, "namespace": OPERATOR_NS, "install_output": out}
    run(HELM, "uninstall", RELEASE, "-n", OPERATOR_NS, "--wait", check=False, timeout=180)
    kubectl("delete", "namespace", OPERATOR_NS, "--ignore-not-found", "--wait=false", check=False)


@pytest.fixture(scope="session")
def ns(operator_release):
    name = f"fleetserve-e2e-{uuid.uuid4().hex[:6]}"
    kubectl("create", "namespace", name)
    yield name
    if os.environ.get("FLEETSERVE_E2E_KEEP") != "1":
        kubectl("delete", "namespace", name, "--wait=false", check=False)
