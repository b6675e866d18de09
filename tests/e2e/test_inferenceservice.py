"""End to end on a real cluster: helm install, an InferenceService serving, scaling, failures, rollouts.

The tests run in file order and share one InferenceService (loading a model takes a while on a
small CPU node): examples/cpu-embedded.yaml, then patched for the scenarios that need it.
Requests come from client pods to the Service's cluster IP (see e2e_helpers.load).
"""

from __future__ import annotations

import json
import os
import threading
import time

import pytest
from e2e_helpers import (
    FAKE_HUB_FILE,
    FAKE_HUB_REPO,
    HELM,
    REPO,
    ClientPod,
    apply,
    events,
    kget,
    kubectl,
    load,
    run,
    wait_until,
)

pytestmark = pytest.mark.e2e

EXAMPLE = os.path.join(REPO, "examples", "cpu-embedded.yaml")
NAME = "smollm2"
LOAD_TIMEOUT = float(os.environ.get("FLEETSERVE_E2E_READY_TIMEOUT", "420"))
CRD = "inferenceservices.serving.fleetserve.dev"


def fsvc(ns: str) -> dict:
    return kget("inferenceservice", NAME, ns)


def status(ns: str) -> dict:
    return fsvc(ns).get("status") or {}


def service_ip(ns: str) -> str:
    return kget("service", NAME, ns)["spec"]["clusterIP"]


def patch(ns: str, spec: dict) -> None:
    kubectl("patch", "inferenceservice", NAME, "-n", ns, "--type=merge", "-p", json.dumps({"spec": spec}))


def runtime_pods(ns: str) -> list[dict]:
    # The runtime's pods only: the router's pods carry the same instance label (name fleetserve-router).
    out = kubectl(
        "get",
        "pods",
        "-n",
        ns,
        "-l",
        f"app.kubernetes.io/instance={NAME},app.kubernetes.io/name=fleetserve-runtime",
        "-o",
        "json",
    )
    return json.loads(out)["items"]


def rolled_out(ns: str, replicas: int) -> bool:
    """Deployment fully on its current template with `replicas` ready pods, status caught up."""
    dep = kget("deployment", NAME, ns)
    st, gen = dep.get("status") or {}, dep["metadata"]["generation"]
    s = status(ns)
    return (
        st.get("observedGeneration") == gen
        and st.get("updatedReplicas") == replicas
        and st.get("readyReplicas") == replicas
        and st.get("replicas") == replicas
        and s.get("readyReplicas") == replicas
        and s.get("phase") == "Ready"
    )


def ready_endpoints(ns: str) -> int:
    ep = kget("endpoints", NAME, ns, check=False) or {}
    return sum(len(sub.get("addresses") or []) for sub in ep.get("subsets") or [])


def test_operator_ready(operator_release):
    ns = operator_release["namespace"]
    deps = json.loads(kubectl("get", "deployments", "-n", ns, "-o", "json"))["items"]
    assert len(deps) == 1
    st = deps[0]["status"]
    # Two replicas in a kopf peering (the chart's default replicaCount): one acts, one stands by.
    assert st.get("readyReplicas") == 2 and st.get("availableReplicas") == 2, st
    assert kget("crd", CRD)["spec"]["names"]["shortNames"] == ["fsvc"]


def test_example_becomes_ready_and_answers(ns):
    kubectl("apply", "-n", ns, "-f", EXAMPLE)
    t0 = time.monotonic()
    st = wait_until(
        "the example InferenceService Ready with a URL",
        lambda: (s := status(ns)).get("phase") == "Ready" and s.get("url") and s,
        LOAD_TIMEOUT,
    )
    print(f"example Ready after {time.monotonic() - t0:.0f}s: {st.get('url')}")
    # maxReplicas 3: the router is on by default and the URL is its Service.
    assert st["url"] == f"http://{NAME}-router.{ns}.svc.cluster.local"
    assert {c["type"]: c["status"] for c in st["conditions"]}["Ready"] == "True"

    res = load(
        ns,
        service_ip(ns),
        NAME,
        workers=1,
        seconds=120,
        count=1,
        max_tokens=24,
        prompt="What is the capital of France? Answer in one word.",
    ).result()
    assert res["ok"] == 1, res
    assert "paris" in res["answers"][0].lower(), res

    table = kubectl("get", "inferenceservices", "-n", ns)
    header = table.splitlines()[0].split()
    assert header[:6] == ["NAME", "MODEL", "REPLICAS", "READY", "QUEUE", "PHASE"], table
    assert NAME in table and "Ready" in table
    wide = kubectl("get", "fsvc", "-n", ns, "-o", "wide")
    assert "URL" in wide.splitlines()[0] and st["url"] in wide, wide


def test_queue_depth_scales_up_then_down(ns):
    # Decisions within a test's time; a smaller CPU request leaves room for client pods beside 3
    # replicas. The template changes, so this also rolls the pods (Recreate: old pod gone first).
    patch(
        ns,
        {
            "resources": {"cpu": "250m"},
            "rollout": {"strategy": "Recreate"},
            "autoscaling": {
                "minReplicas": 1,
                "maxReplicas": 3,
                "targetQueueDepth": 2,
                "scaleUpStabilizationSeconds": 0,
                "scaleDownStabilizationSeconds": 20,
                "cooldownSeconds": 10,
            },
        },
    )
    wait_until("the patched spec rolled out", lambda: rolled_out(ns, 1), LOAD_TIMEOUT)
    # a rollout replaces pods on purpose: not a lost replica
    assert not [e for e in events(ns, NAME) if e["reason"] == "ReplicaLost"], events(ns, NAME)

    client = load(ns, service_ip(ns), NAME, workers=8, seconds=150, max_tokens=48, req_timeout=120)
    try:
        wait_until("replicas > 1", lambda: (fsvc(ns)["spec"].get("replicas") or 1) > 1, 150, 1)
        st = status(ns)
        print(
            "scaled up:",
            {
                k: st.get(k)
                for k in (
                    "desiredReplicas",
                    "replicas",
                    "readyReplicas",
                    "queueDepth",
                    "runningRequests",
                    "lastScaleTime",
                )
            },
        )
        assert st.get("desiredReplicas", 0) > 1
        ups = [e for e in events(ns, NAME) if e["reason"] == "ScaledUp"]
        assert ups, "no ScaledUp event"
        print("ScaledUp:", ups[-1]["message"])
        assert "queue" in ups[-1]["message"].lower() or "load" in ups[-1]["message"].lower()
        # never past max while loaded
        wait_until("status shows the new replicas", lambda: (status(ns).get("replicas") or 0) > 1, 60, 1)
        assert fsvc(ns)["spec"]["replicas"] <= 3
    finally:
        client.delete()

    # load gone: back to minReplicas after the down-window (+ cooldown, + scrape interval)
    seen = []

    def back_to_one():
        r = fsvc(ns)["spec"].get("replicas")
        seen.append(r)
        return r == 1

    wait_until("scaled back to minReplicas", back_to_one, 240, 2)
    assert min(x for x in seen if x is not None) >= 1
    downs = [e for e in events(ns, NAME) if e["reason"] == "ScaledDown"]
    assert downs, "no ScaledDown event"
    print("ScaledDown:", downs[-1]["message"])
    wait_until("one replica, Ready", lambda: rolled_out(ns, 1), LOAD_TIMEOUT)


def test_killed_pod_is_replaced_and_requests_end(ns):
    (old,) = [p["metadata"]["name"] for p in runtime_pods(ns) if not p["metadata"].get("deletionTimestamp")]
    client = load(ns, service_ip(ns), NAME, workers=4, seconds=100, max_tokens=32, req_timeout=90)
    client.wait_running()
    wait_until("requests in flight", lambda: (status(ns).get("runningRequests") or 0) > 0, 60, 1)
    phases: list[str] = []
    kubectl("delete", "pod", "-n", ns, old, "--grace-period=0", "--force", "--wait=false")

    def recovered():
        phases.append(status(ns).get("phase"))
        pods = [p for p in runtime_pods(ns) if not p["metadata"].get("deletionTimestamp")]
        return (
            phases[-1] == "Ready"
            and any(p != "Ready" for p in phases)
            and pods
            and all(p["metadata"]["name"] != old for p in pods)
        )

    wait_until("the replacement pod Ready", recovered, LOAD_TIMEOUT, 1)
    seen = [p for i, p in enumerate(phases) if i == 0 or p != phases[i - 1]]
    print("phases after the kill:", seen)
    assert "Degraded" in seen and seen[-1] == "Ready", (
        seen
    )  # Degraded (ReplicaLost) until the replacement serves
    lost = [e for e in events(ns, NAME) if e["reason"] == "ReplicaLost"]
    assert lost and old in lost[-1]["message"], lost
    assert any(e["reason"] == "ReplicasRestored" for e in events(ns, NAME))
    res = client.result()
    print("load result:", {k: v for k, v in res.items() if k not in ("latencies", "answers")})
    assert res["timeouts"] == 0, f"requests left hanging: {res}"
    assert res["ok"] > 0 and res["ok"] + res["errors"] == res["sent"], res


def test_spec_update_rolls_without_losing_endpoints(ns):
    # back to the default strategy (surge 1 without GPUs); the pod template does not change
    patch(ns, {"autoscaling": {"minReplicas": 2, "maxReplicas": 2}, "rollout": {"strategy": "Auto"}})
    wait_until("two replicas Ready", lambda: rolled_out(ns, 2), LOAD_TIMEOUT)
    before = {p["metadata"]["name"] for p in runtime_pods(ns)}

    counts: list[int] = []
    stop = threading.Event()

    def watch():
        while not stop.is_set():
            try:
                counts.append(ready_endpoints(ns))
            except Exception:
                pass
            time.sleep(0.3)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    client = load(ns, service_ip(ns), NAME, workers=2, seconds=400, max_tokens=16, req_timeout=90)
    try:
        client.wait_running()
        patch(ns, {"engine": {"maxNumSeqs": 8}})

        def done():
            pods = runtime_pods(ns)

            def seqs(pod):
                args = pod["spec"]["containers"][0]["args"]
                return args[args.index("--max-num-seqs") + 1] if "--max-num-seqs" in args else None

            return (
                rolled_out(ns, 2)
                and not ({p["metadata"]["name"] for p in pods} & before)
                and all(seqs(p) == "8" for p in pods)
            )

        wait_until("the rollout to finish", done, 2 * LOAD_TIMEOUT, 2)
    finally:
        stop.set()
        watcher.join()
        client.delete()
    print(f"ready endpoints during the rollout: min {min(counts)}, samples {len(counts)}")
    assert counts and min(counts) >= 1, counts


HUB_COUNTS = r"""
import json, sys, urllib.request
print(json.dumps(json.loads(urllib.request.urlopen(sys.argv[1] + "/downloads", timeout=30).read())))
"""


def test_model_cache_filled_once(ns, operator_release):
    """hf:// model → the download init container fills the cache PVC once; new pods skip it."""
    name, claim, pv = "cached", "e2e-model-cache", f"{ns}-model-cache"
    hub = operator_release["hub"]
    # A hostPath-backed claim, bound statically (no provisioner needed); on the node under /tmp.
    apply(
        {
            "apiVersion": "v1",
            "kind": "PersistentVolume",
            "metadata": {"name": pv},
            "spec": {
                "capacity": {"storage": "1Gi"},
                "accessModes": ["ReadWriteOnce"],
                "storageClassName": "",
                "persistentVolumeReclaimPolicy": "Retain",
                "hostPath": {"path": f"/tmp/fleetserve-e2e/pv/{ns}", "type": "DirectoryOrCreate"},
            },
        },
        ns,
    )
    apply(
        {
            "apiVersion": "v1",
            "kind": "PersistentVolumeClaim",
            "metadata": {"name": claim},
            "spec": {
                "accessModes": ["ReadWriteOnce"],
                "storageClassName": "",
                "volumeName": pv,
                "resources": {"requests": {"storage": "1Gi"}},
            },
        },
        ns,
    )
    # hostPath volumes ignore fsGroup: hand the directory to the runtime's UID once, as root.
    prep = ClientPod(
        ns,
        "import os; os.chown('/models', 1000, 1000); print('{}')",
        [],
        deadline_s=120,
        run_as_root=True,
        volumes={"/models": claim},
    )
    prep.result()
    count = lambda: ClientPod(ns, HUB_COUNTS, [hub], deadline_s=60).result().get(FAKE_HUB_FILE, 0)  # noqa: E731
    assert count() == 0

    apply(
        {
            "apiVersion": "serving.fleetserve.dev/v1alpha1",
            "kind": "InferenceService",
            "metadata": {"name": name},
            "spec": {
                "model": {"uri": f"hf://{FAKE_HUB_REPO}@main", "ggufFile": FAKE_HUB_FILE},
                "modelCache": {"existingClaim": claim},
                "engine": {"device": "cpu", "dtype": "float32", "maxModelLen": 2048},
                "resources": {"cpu": "250m", "memory": "2Gi"},
                "autoscaling": {"minReplicas": 1, "maxReplicas": 1},
            },
        },
        ns,
    )
    get = lambda: kget("inferenceservice", name, ns).get("status") or {}  # noqa: E731
    st = wait_until(
        "the hf:// service Ready", lambda: (s := get()).get("phase") == "Ready" and s, LOAD_TIMEOUT
    )
    cached = {c["type"]: c for c in st["conditions"]}["ModelCached"]
    assert cached["status"] == "True" and cached["reason"] == "Downloaded", cached
    assert count() == 1
    (pod,) = [
        p
        for p in json.loads(
            kubectl("get", "pods", "-n", ns, "-l", f"app.kubernetes.io/instance={name}", "-o", "json")
        )["items"]
    ]
    first = kubectl("logs", "-n", ns, pod["metadata"]["name"], "-c", "model-download")
    assert "downloading" in first and "download complete" in first, first
    ip = kget("service", name, ns)["spec"]["clusterIP"]
    res = load(
        ns,
        ip,
        name,
        workers=1,
        seconds=60,
        count=1,
        max_tokens=24,
        prompt="What is the capital of France? Answer in one word.",
    ).result()
    assert res["ok"] == 1 and "paris" in res["answers"][0].lower(), res

    # delete the pods: the replacement finds the marker and downloads nothing
    kubectl("delete", "pods", "-n", ns, "-l", f"app.kubernetes.io/instance={name}", "--wait=false")

    def replaced_and_ready():
        pods = json.loads(
            kubectl("get", "pods", "-n", ns, "-l", f"app.kubernetes.io/instance={name}", "-o", "json")
        )["items"]
        fresh = [
            p
            for p in pods
            if p["metadata"]["name"] != pod["metadata"]["name"] and not p["metadata"].get("deletionTimestamp")
        ]
        ok = fresh and all(
            c.get("ready") for c in (fresh[0].get("status") or {}).get("containerStatuses") or [{}]
        )
        return ok and fresh[0]

    new = wait_until("a replacement pod ready", replaced_and_ready, LOAD_TIMEOUT, 2)
    second = kubectl("logs", "-n", ns, new["metadata"]["name"], "-c", "model-download")
    assert "model cache hit" in second, second
    assert count() == 1, "the replacement pod downloaded again"
    kubectl("delete", "inferenceservice", name, "-n", ns, "--wait=true", timeout=120)
    # the claim goes once the pods are gone (pvc-protection); the PV (Retain) is removed by hand
    kubectl("delete", "pvc", claim, "-n", ns, "--wait=false")
    kubectl("delete", "pv", pv, "--wait=false")


def test_bad_model_path_shows_its_error_in_the_status(ns):
    """A runtime that cannot load its model writes the error to its termination message; the operator puts
    it into the InferenceService's conditions, so `kubectl get fsvc -o yaml` says why, not only that the
    pod crash-loops."""
    import yaml

    name = "bad-model"
    apply(
        {
            "apiVersion": "serving.fleetserve.dev/v1alpha1",
            "kind": "InferenceService",
            "metadata": {"name": name},
            "spec": {
                "model": {"uri": "file:///models/nope"},
                "engine": {"device": "cpu", "dtype": "float32"},
                "resources": {"cpu": "100m", "memory": "1Gi"},
                "autoscaling": {"minReplicas": 1, "maxReplicas": 1},
            },
        },
        ns,
    )
    error = "model '/models/nope' not found"

    def degraded_with_the_error():
        doc = yaml.safe_load(kubectl("get", "fsvc", name, "-n", ns, "-o", "yaml"))
        conds = {c["type"]: c for c in (doc.get("status") or {}).get("conditions") or []}
        d = conds.get("Degraded") or {}
        return doc if d.get("status") == "True" and error in d.get("message", "") else None

    try:
        doc = wait_until(
            "the runtime's start-up error in the InferenceService status",
            degraded_with_the_error,
            LOAD_TIMEOUT,
        )
        conds = {c["type"]: c for c in doc["status"]["conditions"]}
        assert doc["status"]["phase"] == "Degraded"
        assert conds["Degraded"]["reason"] in ("CrashLoopBackOff", "RuntimeFailed"), conds["Degraded"]
        assert error in conds["Ready"]["message"] and conds["Ready"]["status"] == "False"
        pods = json.loads(
            kubectl("get", "pods", "-n", ns, "-l", f"app.kubernetes.io/instance={name}", "-o", "json")
        )["items"]
        said = [
            ((cs.get(k) or {}).get("terminated") or {}).get("message", "")
            for p in pods
            for cs in p["status"].get("containerStatuses") or []
            for k in ("state", "lastState")
        ]
        assert any(
            m.startswith("fleetserve serve failed to start: ModelLoadError") and error in m for m in said
        ), said
    finally:
        kubectl("delete", "inferenceservice", name, "-n", ns, "--wait=true", timeout=120, check=False)


def test_delete_removes_every_child(ns):
    kubectl("delete", "inferenceservice", NAME, "-n", ns, "--wait=true", timeout=120)
    sel = f"app.kubernetes.io/instance={NAME}"

    def gone():
        out = kubectl(
            "get",
            "deployments,services,pods,pdb,pvc,replicasets",
            "-n",
            ns,
            "-l",
            sel,
            "-o",
            "name",
            check=False,
        )
        return not out.strip()

    wait_until("every child deleted", gone, 180, 2)


def test_helm_uninstall_leaves_only_the_crd(operator_release):
    ns, rel = operator_release["namespace"], operator_release["release"]
    run(HELM, "uninstall", rel, "-n", ns, "--wait", timeout=180)
    sel = f"app.kubernetes.io/instance={rel}"

    def nothing_left():
        ns_out = kubectl(
            "get",
            "all,serviceaccounts,roles,rolebindings,configmaps,secrets",
            "-n",
            ns,
            "-l",
            sel,
            "-o",
            "name",
            check=False,
        )
        cl_out = kubectl("get", "clusterroles,clusterrolebindings", "-l", sel, "-o", "name", check=False)
        return not ns_out.strip() and not cl_out.strip()

    wait_until("the release's objects deleted", nothing_left, 120, 2)
    assert kget("crd", CRD, check=False) is not None, "helm keeps CRDs from crds/"
