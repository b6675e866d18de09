"""The operator's side of the router: spec.router, rendering, status.url, RBAC handed to the router,
and scale from zero on the router's demand signal (the real kopf operator against kmock)."""

from __future__ import annotations

import asyncio
import datetime
import logging
import time

import pytest

from fleetserve.operator import autoscaler, render
from fleetserve.operator.router.discovery import DEMAND_ANNOTATION
from fleetserve.operator.settings import OperatorSettings
from fleetserve.operator.spec import Autoscaling, parse_spec

from .conftest import (
    DEPLOYMENTS,
    ISVC_RES,
    ROLEBINDINGS,
    ROLES,
    SERVICEACCOUNTS,
    SERVICES,
    create,
    events,
    eventually,
    fake_pod,
    get,
    isvc,
    isvc_path,
    metrics_endpoint,
    patch,
)

SETTINGS = OperatorSettings(router_image="reg/operator:7")
ZERO = {
    "replicas": 0,
    "autoscaling": {
        "minReplicas": 0,
        "maxReplicas": 3,
        "scaleToZero": True,
        "cooldownSeconds": 600,
        "scaleUpStabilizationSeconds": 600,
    },
}


def _now(offset: float = 0.0) -> str:
    t = datetime.datetime.now(datetime.timezone.utc) + datetime.timedelta(seconds=offset)
    return t.strftime("%Y-%m-%dT%H:%M:%SZ")


@pytest.mark.parametrize(
    "raw, on",
    [
        ({}, False),
        ({"autoscaling": {"maxReplicas": 3}}, True),
        ({"replicas": 2, "autoscaling": {"enabled": False}}, True),
        ({"autoscaling": {"minReplicas": 0, "scaleToZero": True}}, True),
        ({"autoscaling": {"maxReplicas": 3}, "router": {"enabled": False}}, False),
        ({"router": {"enabled": True}}, True),
    ],
)
def test_router_is_on_by_default_where_it_helps(raw, on):
    spec = parse_spec(raw)
    assert spec.router_enabled() is on
    kinds = [
        o["kind"]
        for o in render.render_all("llm", "ns", spec, SETTINGS)
        if o["metadata"]["name"] == "llm-router"
    ]
    assert kinds == (["ServiceAccount", "Role", "RoleBinding", "Service", "Deployment"] if on else [])
    assert render.service_url("llm", "ns", SETTINGS, spec) == (
        "http://llm-router.ns.svc.cluster.local" if on else "http://llm.ns.svc.cluster.local"
    )


def test_router_rendering():
    spec = parse_spec(
        {
            **ZERO,
            "router": {
                "replicas": 2,
                "queueTimeoutSeconds": 60,
                "maxQueuedRequests": 10,
                "loadFactor": 1.5,
                "saturationQueueDepth": 3,
                "resources": {"cpu": "200m", "memory": "128Mi"},
            },
        }
    )
    objs = {(o["kind"], o["metadata"]["name"]): o for o in render.render_all("llm", "ns", spec, SETTINGS)}
    dep, svc = objs[("Deployment", "llm-router")], objs[("Service", "llm-router")]
    runtime_dep = objs[("Deployment", "llm")]
    pod = dep["spec"]["template"]["spec"]
    c = pod["containers"][0]
    assert c["image"] == "reg/operator:7" and c["command"] == ["python", "-m", "fleetserve.operator.router"]
    env = {e["name"]: e.get("value") for e in c["env"]}
    assert env["FLEETSERVE_ROUTER_SERVICE"] == "llm" and env["FLEETSERVE_ROUTER_INFERENCE_SERVICE"] == "llm"
    assert (env["FLEETSERVE_ROUTER_QUEUE_TIMEOUT"], env["FLEETSERVE_ROUTER_QUEUE_SIZE"]) == ("60", "10")
    assert (env["FLEETSERVE_ROUTER_LOAD_FACTOR"], env["FLEETSERVE_ROUTER_MAX_WAITING"]) == ("1.5", "3")
    assert env["FLEETSERVE_ROUTER_LOAD_SLACK"] == "4"  # the default
    assert c["resources"] == {"requests": {"cpu": "200m", "memory": "128Mi"}, "limits": {"memory": "128Mi"}}
    assert (
        c["readinessProbe"]["httpGet"]["path"] == "/healthz"
        and c["securityContext"]["readOnlyRootFilesystem"]
    )
    assert pod["serviceAccountName"] == "llm-router" and dep["spec"]["replicas"] == 2
    # The router's pods are not the runtime's: neither Service nor the operator's indexes mix them up.
    router_pod_labels = dep["spec"]["template"]["metadata"]["labels"]
    runtime_sel = runtime_dep["spec"]["selector"]["matchLabels"]
    assert not all(router_pod_labels.get(k) == v for k, v in runtime_sel.items())
    assert svc["spec"]["selector"] == dep["spec"]["selector"]["matchLabels"]
    assert router_pod_labels["app.kubernetes.io/component"] == "router"
    # RBAC: watch endpoints of the namespace, patch only its own InferenceService.
    role = objs[("Role", "llm-router")]
    assert {
        "apiGroups": ["serving.fleetserve.dev"],
        "resources": ["inferenceservices"],
        "resourceNames": ["llm"],
        "verbs": ["patch"],
    } in role["rules"]
    assert objs[("RoleBinding", "llm-router")]["subjects"] == [
        {"kind": "ServiceAccount", "name": "llm-router", "namespace": "ns"}
    ]


def test_demand_wakes_from_zero_past_windows_and_cooldown():
    cfg = Autoscaling(
        minReplicas=0, maxReplicas=3, scaleToZero=True, cooldownSeconds=600, scaleUpStabilizationSeconds=600
    )
    history = autoscaler.History(last_scale=99.0)  # just scaled down to zero
    d = autoscaler.decide(100.0, 0, 0, 0, cfg, history, load_known=False, demand=True)
    assert d.desired == 1 and "router" in d.reason
    assert autoscaler.decide(100.0, 0, 0, 0, cfg, history, load_known=False, demand=False).desired == 0
    # While demand lasts an idle service does not go back to zero (the down window would allow it).
    cfg0 = Autoscaling(
        minReplicas=0, maxReplicas=3, scaleToZero=True, cooldownSeconds=0, scaleDownStabilizationSeconds=0
    )
    assert autoscaler.decide(200.0, 1, 0, 0, cfg0, autoscaler.History(), demand=True).desired == 1
    assert autoscaler.decide(200.0, 1, 0, 0, cfg0, autoscaler.History(), demand=False).desired == 0
    now = time.time()
    assert autoscaler.demand_is_current(_now(), now, 60)
    assert not autoscaler.demand_is_current(_now(-120), now, 60)
    assert not autoscaler.demand_is_current(_now(3600), now, 60)  # a bogus future stamp
    assert not autoscaler.demand_is_current("yesterday", now, 60)


async def test_router_children_status_url_and_router_pods_are_not_replicas(operator):
    await create(operator, isvc("llm", {"autoscaling": {"maxReplicas": 3}}))
    dep = await eventually(lambda: get(operator, DEPLOYMENTS, "llm-router"))
    for res in (SERVICES, SERVICEACCOUNTS, ROLES, ROLEBINDINGS):
        child = await eventually(lambda res=res: get(operator, res, "llm-router"))
        assert child["metadata"]["ownerReferences"][0]["kind"] == "InferenceService"
    st = await eventually(lambda: (s := get(operator, ISVC_RES, "llm").get("status") or {}).get("url") and s)
    assert st["url"] == "http://llm-router.default.svc.cluster.local"
    await patch(
        operator,
        "/apis/apps/v1/namespaces/default/deployments/llm-router/status",
        {"status": {"replicas": 1, "readyReplicas": 1}},
    )
    await eventually(lambda: get(operator, ISVC_RES, "llm")["status"].get("routerReadyReplicas") == 1)
    # A router pod (labels of the router's template) is not a runtime replica.
    async with metrics_endpoint({"vllm:num_requests_waiting": 0}) as (port, _):
        router_pod = fake_pod("llm-router", 0, port)
        router_pod["metadata"]["labels"] = dict(dep["spec"]["template"]["metadata"]["labels"])
        await create(operator, router_pod)
        await asyncio.sleep(1.0)
        assert not get(operator, ISVC_RES, "llm")["status"].get("readyReplicas")
    # Self-healing covers the router as well.
    from .conftest import delete

    await delete(operator, "/apis/apps/v1/namespaces/default/deployments/llm-router")
    await eventually(lambda: get(operator, DEPLOYMENTS, "llm-router"))


async def test_router_demand_scales_up_from_zero(operator, caplog):
    caplog.set_level(logging.INFO, logger="kopf")
    await create(operator, isvc("llm", ZERO))
    await eventually(
        lambda: (
            get(operator, DEPLOYMENTS, "llm-router")
            and (get(operator, ISVC_RES, "llm").get("status") or {}).get("phase") == "ScaledToZero"
        )
    )
    assert get(operator, DEPLOYMENTS, "llm")["spec"]["replicas"] == 0
    # Stale demand (an old annotation) does not wake it.
    await patch(operator, isvc_path("llm"), {"metadata": {"annotations": {DEMAND_ANNOTATION: _now(-600)}}})
    await asyncio.sleep(1.5)
    assert get(operator, ISVC_RES, "llm")["spec"]["replicas"] == 0
    # The router reports requests waiting (what DemandSignal writes): up at once, despite window and cool-down.
    await patch(operator, isvc_path("llm"), {"metadata": {"annotations": {DEMAND_ANNOTATION: _now()}}})
    await eventually(lambda: get(operator, ISVC_RES, "llm")["spec"]["replicas"] == 1, timeout=10)
    await eventually(lambda: get(operator, DEPLOYMENTS, "llm")["spec"]["replicas"] == 1)
    up = await eventually(lambda: events(operator, "ScaledUp"))
    assert "scale from zero" in up[0]["message"] and "0 -> 1" in up[0]["message"]
    # The annotation's change itself triggered the scale (not only the next timer tick).
    assert any("demand_signalled" in r.getMessage() and "succeeded" in r.getMessage() for r in caplog.records)
    # The status follows the annotation at the next status write (it may still show the stale one first).
    demand = get(operator, ISVC_RES, "llm")["metadata"]["annotations"][DEMAND_ANNOTATION]
    await eventually(lambda: get(operator, ISVC_RES, "llm")["status"].get("lastDemandTime") == demand)
    await asyncio.sleep(1.0)
    assert len(events(operator, "ScaledUp")) == 1 and get(operator, ISVC_RES, "llm")["spec"]["replicas"] == 1


async def test_demand_while_the_scale_patch_is_in_flight_wakes_it_once(operator, monkeypatch):
    """The demand handler and the metrics timer (0.3 s here) run concurrently: with the scale patch slow,
    the timer ticks while it is in flight, and the other path must not scale (and announce) it again.
    CI saw two ScaledUp events when the two raced (2026-12-02)."""
    from kubernetes import client

    original = client.CustomObjectsApi.patch_namespaced_custom_object_scale

    def slow(self, *args, **kwargs):
        time.sleep(1.2)  # in the operator's worker thread
        return original(self, *args, **kwargs)

    monkeypatch.setattr(client.CustomObjectsApi, "patch_namespaced_custom_object_scale", slow)
    await create(operator, isvc("llm", ZERO))
    await eventually(
        lambda: (get(operator, ISVC_RES, "llm").get("status") or {}).get("phase") == "ScaledToZero"
    )
    await patch(operator, isvc_path("llm"), {"metadata": {"annotations": {DEMAND_ANNOTATION: _now()}}})
    await eventually(lambda: get(operator, ISVC_RES, "llm")["spec"]["replicas"] == 1, timeout=10)
    await asyncio.sleep(2.0)
    assert [e["message"] for e in events(operator, "ScaledUp")] == [
        "replicas 0 -> 1: requests are waiting at the router (scale from zero)"
    ]
