"""The real kopf operator against kmock: create, update, restart, delete, invalid specs."""

from __future__ import annotations

import asyncio

import pytest
from kmock import action as _action

from .conftest import (
    DEPLOYMENTS,
    ISVC_RES,
    PDBS,
    PDBS_V1BETA1,
    PVCS,
    SERVICES,
    condition,
    create,
    delete,
    events,
    eventually,
    get,
    isvc,
    isvc_path,
    live,
    operator_running,
    patch,
)

HF_SPEC = {
    "model": {"uri": "hf://meta-llama/Llama-3.2-1B-Instruct@abc123"},
    "resources": {"gpus": 1, "cpu": "4", "memory": "24Gi"},
    "engine": {"dtype": "bfloat16", "maxModelLen": 4096},
    "secrets": {"hfToken": {"name": "hf", "key": "token"}},
}


def _writes(server, resource, action):
    return [r for r in list(server) if r.resource == resource and r.action == action]


async def test_create_renders_children(operator):
    await create(operator, isvc("llm", HF_SPEC))
    dep = await eventually(lambda: get(operator, DEPLOYMENTS, "llm"))
    svc = await eventually(lambda: get(operator, SERVICES, "llm"))
    pvc = await eventually(lambda: get(operator, PVCS, "llm-model-cache"))
    owner = get(operator, ISVC_RES, "llm")
    for child in (dep, svc, pvc):
        refs = child["metadata"]["ownerReferences"]
        assert refs[0]["uid"] == owner["metadata"]["uid"] and refs[0]["controller"] is True

    pod = dep["spec"]["template"]["spec"]
    runtime = pod["containers"][0]
    assert runtime["command"] == ["fleetserve", "serve"]
    assert runtime["args"][0] == "/models/hf/meta-llama/Llama-3.2-1B-Instruct/abc123"
    assert runtime["args"][runtime["args"].index("--dtype") + 1] == "bfloat16"
    assert runtime["args"][runtime["args"].index("--max-model-len") + 1] == "4096"
    assert runtime["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert runtime["startupProbe"]["httpGet"]["path"] == "/health"
    assert runtime["startupProbe"]["failureThreshold"] * runtime["startupProbe"]["periodSeconds"] >= 1800
    assert runtime["readinessProbe"]["httpGet"]["path"] == "/health"
    assert runtime["lifecycle"]["preStop"]["exec"]["command"] == ["sleep", "10"]
    assert pod["terminationGracePeriodSeconds"] >= 10 + 30
    assert dep["spec"]["strategy"]["rollingUpdate"]["maxSurge"] == 0  # GPUs: never surge
    assert {v["name"]: v for v in pod["volumes"]}["model-cache"]["persistentVolumeClaim"][
        "claimName"
    ] == "llm-model-cache"
    init = pod["initContainers"][0]
    assert init["name"] == "model-download"
    assert {"name": "HF_TOKEN", "valueFrom": {"secretKeyRef": {"name": "hf", "key": "token"}}} in init["env"]
    assert svc["spec"]["ports"][0]["targetPort"] == "http"
    assert pvc["spec"]["resources"]["requests"]["storage"] == "20Gi"

    done = await eventually(
        lambda: (get(operator, ISVC_RES, "llm").get("status") or {}).get("observedGeneration")
    )
    status = get(operator, ISVC_RES, "llm")["status"]
    assert done == 1
    assert status["url"] == "http://llm.default.svc.cluster.local"
    assert status["selector"] == "app.kubernetes.io/name=fleetserve-runtime,app.kubernetes.io/instance=llm"
    assert condition(get(operator, ISVC_RES, "llm"), "ModelCached")["reason"] == "Pending"
    assert events(operator, "Reconciled")


async def test_update_patches_without_recreating(operator):
    await create(operator, isvc("llm", {"engine": {"maxNumSeqs": 8}}))
    dep = await eventually(lambda: get(operator, DEPLOYMENTS, "llm"))
    uid = dep["metadata"]["uid"]
    await patch(
        operator,
        isvc_path("llm"),
        {
            "spec": {
                "engine": {"maxNumSeqs": 32, "extraArgs": ["--seed", "1"]},
                "autoscaling": {"minReplicas": 2, "maxReplicas": 4},
            }
        },
    )

    def updated():
        d = get(operator, DEPLOYMENTS, "llm")
        args = d["spec"]["template"]["spec"]["containers"][0]["args"]
        return (
            args[args.index("--max-num-seqs") + 1] == "32"
            and args[-2:] == ["--seed", "1"]
            and d["spec"]["replicas"] == 2
            and d
        )

    dep = await eventually(updated)
    assert dep["metadata"]["uid"] == uid
    # One create of the runtime Deployment (maxReplicas 4 also brings the router's own Deployment, which
    # may or may not exist yet at this point: count only "llm").
    creates = _writes(operator, DEPLOYMENTS, _action.CREATE)
    assert len([r for r in creates if ((r.data or {}).get("metadata") or {}).get("name") == "llm"]) == 1
    assert not [r for r in list(operator) if r.action == _action.DELETE]
    await eventually(lambda: get(operator, ISVC_RES, "llm")["status"].get("observedGeneration") == 2)

    # An update that changes nothing the children depend on does not patch them.
    patches_before = len(_writes(operator, DEPLOYMENTS, _action.UPDATE))
    await patch(operator, isvc_path("llm"), {"metadata": {"annotations": {"note": "hello"}}})
    await eventually(lambda: get(operator, ISVC_RES, "llm")["metadata"]["annotations"].get("note"))
    await eventually(lambda: get(operator, ISVC_RES, "llm")["status"].get("desiredReplicas") == 2)
    await asyncio.sleep(1.0)
    assert len(_writes(operator, DEPLOYMENTS, _action.UPDATE)) == patches_before


async def test_restart_creates_no_duplicates(apiserver):
    async with operator_running():
        await create(apiserver, isvc("llm", HF_SPEC))
        await eventually(lambda: get(apiserver, DEPLOYMENTS, "llm"))
        await eventually(
            lambda: (get(apiserver, ISVC_RES, "llm").get("status") or {}).get("observedGeneration")
        )
    creates = len([r for r in list(apiserver) if r.action == _action.CREATE and r.resource != ISVC_RES])
    n_events = len(events(apiserver))
    async with operator_running():
        await asyncio.sleep(2.0)  # resume handlers and several timer ticks
    assert len(live(apiserver, DEPLOYMENTS)) == 1 and len(live(apiserver, SERVICES)) == 1
    assert len(live(apiserver, PVCS)) == 1
    creates_after = [r for r in list(apiserver) if r.action == _action.CREATE and r.resource != ISVC_RES]
    assert not [r for r in creates_after[creates:] if r.resource.plural != "events"]
    assert len(events(apiserver)) == n_events, [(e["reason"], e["message"]) for e in events(apiserver)]


async def test_deleted_child_is_recreated(operator):
    await create(operator, isvc("llm"))
    await eventually(lambda: get(operator, SERVICES, "llm"))
    await delete(operator, "/api/v1/namespaces/default/services/llm")
    assert get(operator, SERVICES, "llm") is None
    await eventually(lambda: get(operator, SERVICES, "llm"))


async def test_delete_leaves_nothing_behind(operator):
    await create(operator, isvc("llm", HF_SPEC))
    await eventually(lambda: get(operator, PVCS, "llm-model-cache") and get(operator, DEPLOYMENTS, "llm"))
    await eventually(lambda: get(operator, ISVC_RES, "llm")["metadata"].get("finalizers"))
    owner_uid = get(operator, ISVC_RES, "llm")["metadata"]["uid"]
    await delete(operator, isvc_path("llm"))
    # The operator releases its finalizer: the object really goes away.
    await eventually(lambda: get(operator, ISVC_RES, "llm") is None, timeout=10)  # not kopf's 60 s polling
    # What remains is exactly what the garbage collector deletes through owner references.
    leftovers = [o for res in (DEPLOYMENTS, SERVICES, PVCS, PDBS) for o in live(operator, res)]
    assert {o["kind"] for o in leftovers} == {
        "Deployment",
        "Service",
        "PersistentVolumeClaim",
        "PodDisruptionBudget",
    }
    assert leftovers and all(
        any(
            r["uid"] == owner_uid and r.get("blockOwnerDeletion")
            for r in o["metadata"].get("ownerReferences", [])
        )
        for o in leftovers
    )


async def test_retained_cache_claim_has_no_owner(operator):
    spec = {**HF_SPEC, "modelCache": {"retainOnDelete": True, "size": "50Gi", "storageClassName": "fast"}}
    await create(operator, isvc("llm", spec))
    pvc = await eventually(lambda: get(operator, PVCS, "llm-model-cache"))
    assert not pvc["metadata"].get("ownerReferences")
    assert pvc["spec"]["storageClassName"] == "fast"


async def test_invalid_spec_condition_and_event_without_retry_loop(operator):
    await create(operator, isvc("bad", {"autoscaling": {"minReplicas": 5, "maxReplicas": 2}}))
    obj = await eventually(lambda: condition(get(operator, ISVC_RES, "bad"), "Ready"))
    ready = condition(get(operator, ISVC_RES, "bad"), "Ready")
    assert ready["status"] == "False" and ready["reason"] == "InvalidSpec"
    assert "minReplicas (5) is greater than maxReplicas (2)" in ready["message"]
    assert get(operator, ISVC_RES, "bad")["status"]["phase"] == "Failed"
    assert get(operator, DEPLOYMENTS, "bad") is None
    warning = await eventually(lambda: events(operator, "InvalidSpec"))
    assert warning[0]["type"] == "Warning"
    await asyncio.sleep(1.5)
    assert len(events(operator, "InvalidSpec")) == 1  # a permanent error: not retried
    assert obj

    # Fixing the spec recovers.
    await patch(operator, isvc_path("bad"), {"spec": {"autoscaling": {"maxReplicas": 6}}})
    await eventually(lambda: get(operator, DEPLOYMENTS, "bad"))
    await eventually(lambda: condition(get(operator, ISVC_RES, "bad"), "Degraded")["status"] == "False")


async def test_edited_child_is_restored(operator):
    await create(operator, isvc("llm", {"engine": {"maxNumSeqs": 8}}))
    await eventually(lambda: get(operator, DEPLOYMENTS, "llm"))
    # Someone edits an owned field in the cluster (kmock merges dicts and replaces lists, like a merge patch).
    await patch(operator, "/apis/apps/v1/namespaces/default/deployments/llm", {"spec": {"replicas": 5}})
    await eventually(lambda: get(operator, DEPLOYMENTS, "llm")["spec"]["replicas"] == 1)


async def test_idle_service_causes_no_status_writes(operator):
    await create(operator, isvc("llm"))
    await eventually(lambda: (get(operator, ISVC_RES, "llm").get("status") or {}).get("observedGeneration"))

    def status_writes():
        return len([r for r in list(operator) if r.resource == ISVC_RES and r.action == _action.UPDATE])

    async def quiet_for(seconds: float) -> bool:
        before = status_writes()
        await asyncio.sleep(seconds)
        return status_writes() == before

    await eventually(lambda: quiet_for(1.0))  # settled: creation-time writes are done
    assert await quiet_for(1.5)  # ~5 timer ticks of an idle service: no writes


async def test_rejected_child_is_a_permanent_error_with_condition_and_event(operator):
    operator.reject[("deployments", "create")] = (
        422,
        'Deployment.apps "llm" is invalid: spec.template: bad field',
    )
    await create(operator, isvc("llm"))
    cond = await eventually(
        lambda: (
            (c := condition(get(operator, ISVC_RES, "llm"), "Degraded"))
            and c["reason"] == "ApplyFailed"
            and c
        )
    )
    assert "bad field" in cond["message"]
    warning = await eventually(lambda: events(operator, "ApplyFailed"))
    assert warning[0]["type"] == "Warning"
    # The apiserver accepts it again (e.g. after an upgrade): the timer's self-healing creates it.
    del operator.reject[("deployments", "create")]
    await eventually(lambda: get(operator, DEPLOYMENTS, "llm"))
    await eventually(lambda: condition(get(operator, ISVC_RES, "llm"), "Degraded")["status"] == "False")


async def test_transient_api_errors_are_retried(operator):
    operator.reject[("services", "create")] = (500, "etcd leader changed")
    await create(operator, isvc("llm"))
    await eventually(
        lambda: (
            condition(get(operator, ISVC_RES, "llm"), "Degraded")
            and condition(get(operator, ISVC_RES, "llm"), "Degraded")["reason"] == "ApplyFailed"
        )
    )
    assert not events(operator, "ApplyFailed")  # transient: no warning, a TemporaryError and a retry
    del operator.reject[("services", "create")]
    await eventually(lambda: get(operator, SERVICES, "llm") and get(operator, DEPLOYMENTS, "llm"))


async def test_pdb_uses_policy_v1_where_served(operator):
    await create(operator, isvc("llm"))
    pdb = await eventually(lambda: get(operator, PDBS, "llm"))
    assert pdb["apiVersion"] == "policy/v1" and pdb["spec"]["maxUnavailable"] == 1
    assert (
        pdb["spec"]["selector"]["matchLabels"]
        == get(operator, DEPLOYMENTS, "llm")["spec"]["selector"]["matchLabels"]
    )
    assert pdb["metadata"]["ownerReferences"][0]["kind"] == "InferenceService"


@pytest.mark.parametrize("pdb_version", ["v1beta1"])
async def test_pdb_falls_back_to_v1beta1_on_kubernetes_1_20(operator, pdb_version):
    await create(operator, isvc("llm"))
    pdb = await eventually(lambda: get(operator, PDBS_V1BETA1, "llm"))
    assert pdb["apiVersion"] == "policy/v1beta1"
    assert get(operator, PDBS, "llm") is None


async def test_pdb_can_be_disabled(operator):
    await create(operator, isvc("llm", {"rollout": {"podDisruptionBudget": False}}))
    await eventually(lambda: get(operator, DEPLOYMENTS, "llm"))
    assert get(operator, PDBS, "llm") is None
    await patch(operator, isvc_path("llm"), {"spec": {"rollout": {"podDisruptionBudget": True}}})
    await eventually(lambda: get(operator, PDBS, "llm"))
    await patch(operator, isvc_path("llm"), {"spec": {"rollout": {"podDisruptionBudget": False}}})
    await eventually(lambda: get(operator, PDBS, "llm") is None)
    assert get(operator, DEPLOYMENTS, "llm")  # only the budget goes


async def test_python_m_entry_point_serves_and_stops_on_sigterm(apiserver, tmp_path):
    """The image's entry point for real: `python -m fleetserve.operator` in its own process."""
    import os
    import signal
    import socket
    import sys

    import aiohttp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {
        **os.environ,
        "FLEETSERVE_LIVENESS": f"http://127.0.0.1:{port}/healthz",
        "FLEETSERVE_LOG_LEVEL": "warning",
        "FLEETSERVE_RUNTIME_IMAGE": "registry.local/rt:7",
    }
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "fleetserve.operator",
        env=env,
        cwd=str(tmp_path),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    try:
        await create(apiserver, isvc("llm"))
        dep = await eventually(lambda: get(apiserver, DEPLOYMENTS, "llm"))
        assert dep["spec"]["template"]["spec"]["containers"][0]["image"] == "registry.local/rt:7"

        async def healthy():
            try:
                async with (
                    aiohttp.ClientSession() as http,
                    http.get(f"http://127.0.0.1:{port}/healthz") as resp,
                ):
                    return resp.status == 200 and "watching" in await resp.json()
            except aiohttp.ClientError:
                return False

        await eventually(healthy)
    finally:
        proc.send_signal(signal.SIGTERM)
        out, _ = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode == 0, out.decode()[-2000:]
