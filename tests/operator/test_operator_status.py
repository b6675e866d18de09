"""The real kopf operator scraping fake runtime pods: status fields, conditions, scale decisions."""

from __future__ import annotations

import asyncio

from .conftest import (
    DEPLOYMENTS,
    ISVC_RES,
    condition,
    create,
    delete,
    events,
    eventually,
    fake_pod,
    get,
    isvc,
    isvc_path,
    metrics_endpoint,
    patch,
)


async def _deployment_ready(server, name: str, replicas: int) -> None:
    await eventually(lambda: get(server, DEPLOYMENTS, name))
    await patch(
        server,
        f"/apis/apps/v1/namespaces/default/deployments/{name}/status",
        {
            "status": {
                "replicas": replicas,
                "readyReplicas": replicas,
                "updatedReplicas": replicas,
                "conditions": [
                    {
                        "type": "Progressing",
                        "status": "True",
                        "reason": "NewReplicaSetAvailable",
                        "message": "rolled out",
                    }
                ],
            }
        },
    )


async def test_metrics_from_pods_become_status(operator):
    await create(operator, isvc("llm"))
    await _deployment_ready(operator, "llm", 2)
    a = {
        "vllm:num_requests_waiting": 3,
        "vllm:num_requests_running": 4,
        "vllm:kv_cache_usage_perc": 0.5,
        "vllm:prompt_tokens_total": 1000,
        "vllm:generation_tokens_total": 100,
    }
    b = {
        "vllm:num_requests_waiting": 1,
        "vllm:num_requests_running": 2,
        "vllm:kv_cache_usage_perc": 0.25,
        "vllm:prompt_tokens_total": 0,
        "vllm:generation_tokens_total": 0,
    }
    async with metrics_endpoint(a) as (port_a, values_a), metrics_endpoint(b) as (port_b, values_b):
        await create(operator, fake_pod("llm", 0, port_a))
        await create(operator, fake_pod("llm", 1, port_b))
        await create(operator, fake_pod("other", 0, port_b))  # another service's pod: not counted

        def scraped():
            st = get(operator, ISVC_RES, "llm").get("status") or {}
            return st.get("queueDepth") == 4 and st.get("runningRequests") == 6 and st

        st = await eventually(scraped)
        assert st["kvCacheUsage"] == 0.375
        assert st["readyReplicas"] == 2 and st["replicas"] == 2 and st["phase"] == "Ready"
        assert st["lastMetricsTime"]
        obj = get(operator, ISVC_RES, "llm")
        assert condition(obj, "Ready")["status"] == "True"
        assert condition(obj, "Available")["status"] == "True"
        assert condition(obj, "Progressing")["reason"] == "NewReplicaSetAvailable"
        assert condition(obj, "Degraded")["status"] == "False"
        assert condition(obj, "ModelCached")["reason"] == "NoDownloadNeeded"

        # Counters grow: token throughput appears in status.
        values_a["vllm:generation_tokens_total"] = 100000
        values_a["vllm:prompt_tokens_total"] = 500000
        st = await eventually(
            lambda: (
                (get(operator, ISVC_RES, "llm")["status"].get("generationTokensPerSecond") or 0) > 0
                and get(operator, ISVC_RES, "llm")["status"]
            )
        )
        assert st["promptTokensPerSecond"] > st["generationTokensPerSecond"] > 0


async def test_pod_failures_become_degraded(operator):
    await create(operator, isvc("llm", {"resources": {"gpus": 1}}))
    await eventually(lambda: get(operator, DEPLOYMENTS, "llm"))
    await create(
        operator,
        fake_pod(
            "llm",
            0,
            1,
            ready=False,
            containerStatuses=[
                {
                    "name": "runtime",
                    "ready": False,
                    "restartCount": 0,
                    "state": {"waiting": {"reason": "ImagePullBackOff", "message": "Back-off pulling image"}},
                }
            ],
        ),
    )
    cond = await eventually(
        lambda: (c := condition(get(operator, ISVC_RES, "llm"), "Degraded")) and c["status"] == "True" and c
    )
    assert cond["reason"] == "ImagePullError" and "Back-off pulling image" in cond["message"]
    assert get(operator, ISVC_RES, "llm")["status"]["phase"] == "Degraded"
    assert condition(get(operator, ISVC_RES, "llm"), "Ready")["status"] == "False"

    await patch(
        operator,
        "/api/v1/namespaces/default/pods/llm-0/status",
        {
            "status": {
                "containerStatuses": None,
                "phase": "Pending",
                "conditions": [
                    {
                        "type": "PodScheduled",
                        "status": "False",
                        "reason": "Unschedulable",
                        "message": "0/3 nodes are available: 3 Insufficient nvidia.com/gpu.",
                    }
                ],
            }
        },
    )
    cond = await eventually(
        lambda: (
            (c := condition(get(operator, ISVC_RES, "llm"), "Degraded"))
            and c["reason"] == "InsufficientGPU"
            and c
        )
    )
    assert "Insufficient nvidia.com/gpu" in cond["message"]


def _phase(server, name: str = "llm"):
    return ((get(server, ISVC_RES, name) or {}).get("status") or {}).get(
        "phase"
    )  # no status before the first write


async def test_killed_pod_is_degraded_then_ready_with_events(operator):
    await create(operator, isvc("llm"))
    await _deployment_ready(operator, "llm", 1)
    template = get(operator, DEPLOYMENTS, "llm")["spec"]["template"]
    async with metrics_endpoint({"vllm:num_requests_waiting": 0}) as (port, _):
        await create(operator, fake_pod("llm", 0, port, template=template))
        await eventually(lambda: _phase(operator) == "Ready")

        await delete(operator, "/api/v1/namespaces/default/pods/llm-0")  # killed
        await create(operator, fake_pod("llm", 1, port, ready=False, template=template))  # its replacement
        cond = await eventually(
            lambda: (
                (c := condition(get(operator, ISVC_RES, "llm"), "Degraded")) and c["status"] == "True" and c
            )
        )
        assert cond["reason"] == "ReplicaLost" and "llm-0" in cond["message"]
        assert get(operator, ISVC_RES, "llm")["status"]["phase"] == "Degraded"
        lost = await eventually(
            lambda: events(operator, "ReplicaLost")
        )  # kopf posts events in the background
        assert lost and all(e["type"] == "Warning" and "llm-0" in e["message"] for e in lost)

        await patch(
            operator,
            "/api/v1/namespaces/default/pods/llm-1/status",
            {"status": {"phase": "Running", "conditions": [{"type": "Ready", "status": "True"}]}},
        )
        await eventually(lambda: _phase(operator) == "Ready")
        assert condition(get(operator, ISVC_RES, "llm"), "Degraded")["status"] == "False"
        await eventually(lambda: events(operator, "ReplicasRestored"))  # kopf posts events in the background


def _scale_requests(server):
    return [r for r in list(server) if r.subresource == "scale" and r.method.value == "PATCH"]


async def test_queue_depth_scales_up_and_down_within_bounds(operator):
    spec = {
        "autoscaling": {
            "minReplicas": 1,
            "maxReplicas": 3,
            "targetQueueDepth": 2,
            "scaleUpStabilizationSeconds": 0,
            "scaleDownStabilizationSeconds": 1,
            "cooldownSeconds": 0,
        }
    }
    await create(operator, isvc("llm", spec))
    await _deployment_ready(operator, "llm", 1)
    values = {"vllm:num_requests_waiting": 20, "vllm:num_requests_running": 4}
    async with metrics_endpoint(values) as (port, values):
        await create(operator, fake_pod("llm", 0, port))
        # 24 requests / 2 per replica = 12 -> clamped to maxReplicas 3, through the scale subresource.
        await eventually(lambda: get(operator, ISVC_RES, "llm")["spec"].get("replicas") == 3)
        assert _scale_requests(operator)
        await eventually(lambda: get(operator, DEPLOYMENTS, "llm")["spec"]["replicas"] == 3)
        up = await eventually(lambda: events(operator, "ScaledUp"))
        assert "1 -> 3" in up[0]["message"] and "target 2" in up[0]["message"]
        await asyncio.sleep(0.8)
        assert get(operator, ISVC_RES, "llm")["spec"]["replicas"] == 3  # never above max

        # Idle: after the 1 s down window, back to minReplicas (not below).
        values.update({"vllm:num_requests_waiting": 0, "vllm:num_requests_running": 0})
        await eventually(lambda: get(operator, ISVC_RES, "llm")["spec"]["replicas"] == 1)
        down = await eventually(lambda: events(operator, "ScaledDown"))
        assert "3 -> 1" in down[0]["message"]
        await eventually(lambda: get(operator, DEPLOYMENTS, "llm")["spec"]["replicas"] == 1)
        await asyncio.sleep(0.8)
        assert get(operator, ISVC_RES, "llm")["spec"]["replicas"] == 1
        assert get(operator, ISVC_RES, "llm")["status"]["desiredReplicas"] == 1


async def test_scale_down_waits_for_its_window(operator):
    spec = {
        "autoscaling": {
            "minReplicas": 1,
            "maxReplicas": 4,
            "targetQueueDepth": 5,
            "scaleDownStabilizationSeconds": 300,
            "cooldownSeconds": 0,
        }
    }
    await create(operator, isvc("llm", {**spec, "replicas": 3}))
    await _deployment_ready(operator, "llm", 3)
    async with metrics_endpoint({"vllm:num_requests_waiting": 0, "vllm:num_requests_running": 0}) as (
        port,
        _,
    ):
        await create(operator, fake_pod("llm", 0, port))
        await eventually(
            lambda: (
                (get(operator, ISVC_RES, "llm").get("status") or {}).get("queueDepth") == 0
                and get(operator, ISVC_RES, "llm")["status"].get("lastMetricsTime")
            )
        )
        await asyncio.sleep(1.0)
    assert get(operator, ISVC_RES, "llm")["spec"]["replicas"] == 3
    assert not events(operator, "ScaledDown")


async def test_kubectl_scale_beyond_max_is_clamped(operator):
    await create(operator, isvc("llm", {"autoscaling": {"minReplicas": 1, "maxReplicas": 2}}))
    await eventually(lambda: get(operator, DEPLOYMENTS, "llm"))
    await patch(operator, isvc_path("llm", sub="scale"), {"spec": {"replicas": 7}})
    # The Deployment never runs more than maxReplicas, and the scale subresource is corrected.
    await eventually(lambda: get(operator, ISVC_RES, "llm")["spec"]["replicas"] == 2)
    assert get(operator, DEPLOYMENTS, "llm")["spec"]["replicas"] <= 2


async def test_autoscaling_disabled_leaves_replicas_to_others(operator):
    await create(operator, isvc("llm", {"autoscaling": {"enabled": False}, "replicas": 1}))
    await _deployment_ready(operator, "llm", 1)
    async with metrics_endpoint({"vllm:num_requests_waiting": 50}) as (port, _):
        await create(operator, fake_pod("llm", 0, port))
        await eventually(lambda: (get(operator, ISVC_RES, "llm").get("status") or {}).get("queueDepth") == 50)
        await patch(operator, isvc_path("llm", sub="scale"), {"spec": {"replicas": 5}})  # e.g. KEDA
        await eventually(lambda: get(operator, DEPLOYMENTS, "llm")["spec"]["replicas"] == 5)
        await asyncio.sleep(0.8)
    assert not _scale_requests(operator)[1:]  # only the test's own request
    assert not events(operator, "ScaledUp")


async def test_scale_to_zero_when_idle_and_allowed(operator):
    spec = {
        "autoscaling": {
            "minReplicas": 0,
            "maxReplicas": 2,
            "scaleToZero": True,
            "scaleDownStabilizationSeconds": 1,
            "cooldownSeconds": 0,
        }
    }
    await create(operator, isvc("llm", spec))
    await _deployment_ready(operator, "llm", 1)
    async with metrics_endpoint({"vllm:num_requests_waiting": 0, "vllm:num_requests_running": 0}) as (
        port,
        _,
    ):
        await create(operator, fake_pod("llm", 0, port))
        await eventually(lambda: get(operator, ISVC_RES, "llm")["spec"].get("replicas") == 0)
    await eventually(lambda: get(operator, DEPLOYMENTS, "llm")["spec"]["replicas"] == 0)
    # The Deployment controller removes the pod; with no pod there is nothing to scale up from.
    await delete(operator, "/api/v1/namespaces/default/pods/llm-0")
    await patch(
        operator,
        "/apis/apps/v1/namespaces/default/deployments/llm/status",
        {"status": {"replicas": 0, "readyReplicas": 0}},
    )
    # The pod's deletion and the Deployment's status reach the operator by separate watches, in either
    # order: the phase may say ScaledToZero one tick before status.replicas does.
    await eventually(
        lambda: (
            (s := get(operator, ISVC_RES, "llm")["status"]).get("phase") == "ScaledToZero"
            and s.get("replicas") == 0
        )
    )
    assert condition(get(operator, ISVC_RES, "llm"), "Ready")["reason"] == "ScaledToZero"
    assert not events(operator, "ScaledUp")
    assert "1 -> 0" in events(operator, "ScaledDown")[0]["message"]
