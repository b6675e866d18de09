"""The Helm chart, checked with a real helm binary: lint, template, strict schema validation, RBAC.

The RBAC test runs the operator through a full scenario against kmock and checks that
every (resource, verb) it used is granted by the chart and that nothing else is.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml
from kmock import action as _action

from fleetserve.operator import crd

from .conftest import (
    DEPLOYMENTS,
    ISVC_RES,
    PDBS,
    PVCS,
    SERVICES,
    create,
    delete,
    eventually,
    fake_pod,
    get,
    isvc,
    isvc_path,
    metrics_endpoint,
    operator_running,
    patch,
    peering_object,
)

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "charts" / "fleetserve"
VERSIONS = ["1.25", kubernetes_validate.latest_version()]


def _template(helm, *args: str) -> list[dict[str, Any]]:
    out = helm("template", "fs", str(CHART), "--namespace", "fleetserve-system", "--include-crds", *args)
    return [d for d in yaml.safe_load_all(out) if d]


def test_helm_lint(helm):
    helm("lint", "--strict", str(CHART))
    helm("lint", "--strict", str(CHART), "--set", "watchNamespaces={a,b}", "--set", "example.enabled=true")


def test_chart_crd_is_the_generated_one():
    assert (CHART / "crds" / Path(crd.CRD_FILE).name).read_text() == (ROOT / crd.CRD_FILE).read_text()


@pytest.mark.parametrize(
    "values",
    [
        [],
        ["--set", "watchNamespaces={team-a,team-b}", "--set", "logLevel=debug"],
        ["--set", "example.enabled=true", "--set", "serviceAccount.name=op"],
    ],
)
def test_template_objects_validate_strict(helm, values):
    docs = _template(helm, *values)
    kinds = {d["kind"] for d in docs}
    assert {"CustomResourceDefinition", "Deployment", "ServiceAccount"} <= kinds
    assert {"ClusterRole", "ClusterRoleBinding"} <= kinds or {"Role", "RoleBinding"} <= kinds
    crd_schema = next(d for d in docs if d["kind"] == "CustomResourceDefinition")["spec"]["versions"][0][
        "schema"
    ]["openAPIV3Schema"]
    for doc in docs:
        if doc["kind"] == "InferenceService":
            assert not [e.message for e in jsonschema.Draft4Validator(crd_schema).iter_errors(doc)]
            continue
        if doc["apiVersion"] == "kopf.dev/v1":  # a peering object: its CRD is in crds/ (no schema to check)
            assert doc["kind"] in ("ClusterKopfPeering", "KopfPeering") and set(doc) == {
                "apiVersion",
                "kind",
                "metadata",
            }
            continue
        for version in VERSIONS:
            kubernetes_validate.validate(doc, version, strict=True)


def test_operator_deployment_settings(helm):
    docs = _template(
        helm,
        "--set",
        "watchNamespaces={team-a,team-b}",
        "--set",
        "image.tag=9.9",
        "--set",
        "runtimeImage.repository=reg/rt",
    )
    dep = next(d for d in docs if d["kind"] == "Deployment")
    pod = dep["spec"]["template"]["spec"]
    c = pod["containers"][0]
    env = {e["name"]: e.get("value") for e in c["env"]}
    assert c["image"] == "fleetserve/operator:9.9" and c["command"] == ["python", "-m", "fleetserve.operator"]
    assert (
        env["FLEETSERVE_NAMESPACES"] == "team-a,team-b" and env["FLEETSERVE_RUNTIME_IMAGE"] == "reg/rt:0.1.0"
    )
    # HA by default: two replicas in one kopf peering (a KopfPeering per watched namespace), rolled one by one.
    assert dep["spec"]["strategy"]["type"] == "RollingUpdate" and dep["spec"]["replicas"] == 2
    assert env["FLEETSERVE_PEERING"] == "fs-fleetserve" and env["FLEETSERVE_PEERING_LIFETIME"] == "20"
    assert env["FLEETSERVE_ROUTER_IMAGE"] == "fleetserve/operator:9.9"
    assert sorted(
        (d["kind"], d["metadata"]["namespace"]) for d in docs if d["apiVersion"] == "kopf.dev/v1"
    ) == [("KopfPeering", "team-a"), ("KopfPeering", "team-b")]
    assert pod["affinity"]["podAntiAffinity"]
    single = _template(helm, "--set", "replicaCount=1")
    one = next(d for d in single if d["kind"] == "Deployment")
    one_env = {e["name"] for e in one["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert one["spec"]["strategy"]["type"] == "Recreate" and one["spec"]["replicas"] == 1
    assert "FLEETSERVE_PEERING" not in one_env and not [d for d in single if d["apiVersion"] == "kopf.dev/v1"]
    assert not [
        r for d in single if d["kind"] == "ClusterRole" for r in d["rules"] if "kopf.dev" in r["apiGroups"]
    ]
    assert "FLEETSERVE_HF_ENDPOINT" not in env
    mirror = next(
        d for d in _template(helm, "--set", "hfEndpoint=http://hub.mirror:8080") if d["kind"] == "Deployment"
    )
    assert {"name": "FLEETSERVE_HF_ENDPOINT", "value": "http://hub.mirror:8080"} in mirror["spec"][
        "template"
    ]["spec"]["containers"][0]["env"]
    assert c["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert pod["securityContext"]["runAsNonRoot"] is True
    roles = [d for d in docs if d["kind"] == "Role"]
    assert sorted(r["metadata"]["namespace"] for r in roles) == ["team-a", "team-b"]
    assert not [
        d for d in docs if d["kind"] in ("ClusterRole", "ClusterRoleBinding")
    ]  # nothing cluster-scoped


def _granted(docs: list[dict[str, Any]]) -> set[tuple[str, str, str]]:
    out = set()
    for d in docs:
        if d["kind"] in ("ClusterRole", "Role"):
            for rule in d["rules"]:
                assert "*" not in rule["verbs"] and "*" not in rule["resources"], rule
                out |= {
                    (g, r, v) for g in rule["apiGroups"] for r in rule["resources"] for v in rule["verbs"]
                }
    return out


_VERBS = {
    _action.LIST: "list",
    _action.WATCH: "watch",
    _action.FETCH: "get",
    _action.CREATE: "create",
    _action.UPDATE: "patch",
    _action.DELETE: "delete",
}


async def test_rbac_grants_exactly_what_the_operator_uses(helm, apiserver):
    """As the chart runs it by default: in a kopf peering (replicaCount 2; one replica here)."""
    granted = _granted(_template(helm))
    await create(apiserver, peering_object("fs-fleetserve"))
    async with operator_running(peering="fs-fleetserve", priority=10):
        spec = {
            "model": {"uri": "hf://o/m"},
            "autoscaling": {"maxReplicas": 3, "targetQueueDepth": 1, "cooldownSeconds": 0},
        }
        await create(apiserver, isvc("llm", spec))
        await create(apiserver, isvc("bad", {"autoscaling": {"minReplicas": 3, "maxReplicas": 1}}))
        await eventually(lambda: get(apiserver, DEPLOYMENTS, "llm"))
        async with metrics_endpoint({"vllm:num_requests_waiting": 5}) as (port, _):
            await create(apiserver, fake_pod("llm", 0, port))
            await eventually(lambda: get(apiserver, ISVC_RES, "llm")["spec"].get("replicas") == 3)
        await delete(apiserver, "/apis/apps/v1/namespaces/default/deployments/llm")  # self-healing path
        await eventually(lambda: get(apiserver, DEPLOYMENTS, "llm"))
        await patch(apiserver, isvc_path("llm"), {"spec": {"engine": {"maxNumSeqs": 3}}})
        # Owner labels propagate to the children: the Service and the claim get patched too.
        await patch(apiserver, isvc_path("llm"), {"metadata": {"labels": {"team": "a"}}})
        await eventually(
            lambda: (
                get(apiserver, SERVICES, "llm")["metadata"]["labels"].get("team") == "a"
                and get(apiserver, PVCS, "llm-model-cache")["metadata"]["labels"].get("team")
            )
        )
        await patch(apiserver, isvc_path("llm"), {"spec": {"rollout": {"podDisruptionBudget": False}}})
        await eventually(lambda: get(apiserver, PDBS, "llm") is None)
        # maxReplicas 3: the router is on by default; switching it off deletes its Deployment and Service.
        assert get(apiserver, DEPLOYMENTS, "llm-router") and get(apiserver, SERVICES, "llm-router")
        await patch(apiserver, isvc_path("llm"), {"spec": {"router": {"enabled": False}}})
        await eventually(
            lambda: (
                get(apiserver, DEPLOYMENTS, "llm-router") is None
                and get(apiserver, SERVICES, "llm-router") is None
            )
        )
        await delete(apiserver, isvc_path("llm"))
        await eventually(lambda: get(apiserver, ISVC_RES, "llm") is None)

    used = set()
    for r in list(apiserver):
        if (
            r.resource is None
            or not r.resource.plural
            or r.action not in _VERBS
            or r.headers.get("User-Agent", "").startswith("kmock")
        ):
            continue
        plural = r.resource.plural + (f"/{r.subresource}" if r.subresource else "")
        used.add((r.resource.group, plural, _VERBS[r.action]))
    # The test's own requests (kmock client, python-aiohttp) are excluded above; the operator's remain.
    assert used, "no operator requests recorded"
    assert used <= granted, f"used but not granted: {used - granted}"
    # Checked by an admission plugin (OwnerReferencesPermissionEnforcement) rather than called; and held only to
    # be granted to the routers (a Role may grant only what its creator holds).
    admission_only = {
        ("serving.fleetserve.dev", "inferenceservices/finalizers", "update"),
        ("discovery.k8s.io", "endpointslices", "list"),
        ("discovery.k8s.io", "endpointslices", "watch"),
        ("", "endpoints", "list"),
        ("", "endpoints", "watch"),
    }
    assert granted == used | admission_only, f"granted but unused: {granted - used - admission_only}"


async def test_namespaced_mode_serves_only_its_namespaces_within_its_roles(helm, apiserver):
    """watchNamespaces: the operator ignores other namespaces and stays within the Roles the chart makes."""
    granted = _granted(_template(helm, "--set", "watchNamespaces={team-a}"))
    await create(apiserver, peering_object("fs-fleetserve", "team-a"))
    async with operator_running(namespaces=("team-a",), peering="fs-fleetserve", priority=10):
        await create(apiserver, isvc("llm", namespace="team-a"))
        await create(apiserver, isvc("llm", namespace="team-b"))
        await eventually(lambda: get(apiserver, DEPLOYMENTS, "llm", "team-a"))
        await asyncio.sleep(1.0)
        assert get(apiserver, DEPLOYMENTS, "llm", "team-b") is None
        assert not (get(apiserver, ISVC_RES, "llm", "team-b").get("status"))
    for r in list(apiserver):
        if (
            r.resource is None
            or not r.resource.plural
            or r.action not in _VERBS
            or r.headers.get("User-Agent", "").startswith("kmock")
        ):
            continue
        plural = r.resource.plural + (f"/{r.subresource}" if r.subresource else "")
        assert (r.resource.group, plural, _VERBS[r.action]) in granted, (r.method, r.url)
        assert r.namespace == "team-a", (r.method, r.url)  # every request stays in the served namespace


@pytest.mark.parametrize(
    "bad",
    [
        "logLevel=verbose",
        "metricsInterval=0",
        "watchNamespaces={Bad_NS}",
        "imageTag=1",
        "runtimeImage.pullPolicy=Sometimes",
        "replicaCount=0",
        "peering.lifetimeSeconds=1",
    ],
)
def test_values_schema_rejects_typos_and_bad_values(helm, bad):
    with pytest.raises(AssertionError, match="values don't meet the specifications|schema"):
        helm("template", "fs", str(CHART), "--set", bad)


@pytest.mark.parametrize("values", [[], ["--set", "watchNamespaces={team-a}"]])
def test_router_role_grants_only_what_the_operator_holds(helm, values):
    """Kubernetes refuses a Role granting more than its creator holds (RBAC escalation prevention)."""
    from fleetserve.operator import render

    held = _granted(_template(helm, *values))
    for rule in next(o for o in render.render_router_rbac("llm", "ns") if o["kind"] == "Role")["rules"]:
        for g in rule["apiGroups"]:
            for r in rule["resources"]:
                for v in rule["verbs"]:
                    assert (g, r, v) in held, (g, r, v)
