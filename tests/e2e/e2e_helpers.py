"""Small helpers for the e2e tests: kubectl/helm subprocesses, polling, in-cluster clients.

Everything goes through the current kube context (KUBECONFIG), so the same tests run on the
local cluster of tests/e2e/cluster/ and on kind. Requests to the runtime are sent from a pod in
the cluster to the Service's cluster IP: that works on any cluster, with no port-forward.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
import uuid
from collections.abc import Callable
from typing import Any

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
KUBECTL = os.environ.get("KUBECTL", "kubectl")
HELM = os.environ.get("HELM", "helm")
RUNTIME_IMAGE = os.environ.get("FLEETSERVE_E2E_RUNTIME_IMAGE", "fleetserve/runtime:e2e-cpu")
OPERATOR_IMAGE = os.environ.get("FLEETSERVE_E2E_OPERATOR_IMAGE", "fleetserve/operator:e2e")
# The stand-in hub (fake_hub.py) serves the GGUF the runtime image ships under this repo name.
FAKE_HUB_REPO = "fleetserve-e2e/smollm2-gguf"
FAKE_HUB_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def run(*args: str, check: bool = True, timeout: float = 120, input: str | None = None) -> str:
    proc = subprocess.run(list(args), capture_output=True, text=True, timeout=timeout, input=input)
    if check and proc.returncode != 0:
        raise RuntimeError(f"{' '.join(args)} -> {proc.returncode}\n{proc.stdout}\n{proc.stderr}")
    return proc.stdout


def kubectl(*args: str, **kw: Any) -> str:
    return run(KUBECTL, *args, **kw)


def kget(kind: str, name: str, ns: str | None = None, check: bool = True) -> dict[str, Any] | None:
    args = ["get", kind, name, "-o", "json"] + (["-n", ns] if ns else [])
    out = kubectl(*args, check=False)
    if not out.strip():
        if check:
            raise RuntimeError(f"{kind}/{name} not found")
        return None
    return json.loads(out)


def apply(manifest: dict[str, Any] | str, ns: str) -> None:
    text = manifest if isinstance(manifest, str) else json.dumps(manifest)
    kubectl("apply", "-n", ns, "-f", "-", input=text)


def wait_until(what: str, fn: Callable[[], Any], timeout: float, interval: float = 2.0) -> Any:
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        try:
            last = fn()
        except Exception as exc:  # transient apiserver/kubectl errors while polling
            last = exc
        if last and not isinstance(last, Exception):
            return last
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what} (last: {last!r})")


def events(ns: str, name: str) -> list[dict[str, Any]]:
    out = kubectl("get", "events", "-n", ns, "--field-selector", f"involvedObject.name={name}", "-o", "json")
    return json.loads(out)["items"]


def pod_spec(
    name: str,
    script: str,
    args: list[str],
    deadline_s: int,
    run_as_root: bool = False,
    volumes: dict[str, str] | None = None,
) -> dict[str, Any]:
    """A client pod; `volumes` maps mount paths to claim names."""
    claims = list((volumes or {}).values())
    vols = [{"name": f"v{i}", "persistentVolumeClaim": {"claimName": c}} for i, c in enumerate(claims)]
    mounts = [{"name": f"v{i}", "mountPath": m} for i, m in enumerate(volumes or {})]
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "labels": {"app.kubernetes.io/name": "fleetserve-e2e-client"}},
        "spec": {
            "restartPolicy": "Never",
            "activeDeadlineSeconds": deadline_s,
            "enableServiceLinks": False,
            "automountServiceAccountToken": False,
            "securityContext": {"runAsUser": 0} if run_as_root else {"runAsNonRoot": True, "runAsUser": 1000},
            "volumes": vols,
            "containers": [
                {
                    "name": "client",
                    "image": RUNTIME_IMAGE,
                    "imagePullPolicy": "IfNotPresent",
                    "command": ["python", "-c", script, *args],
                    "volumeMounts": mounts,
                    # no CPU request: the example asks for the whole of a 2-CPU node
                    "resources": {"requests": {"memory": "64Mi"}, "limits": {"memory": "256Mi"}},
                }
            ],
        },
    }


class ClientPod:
    """A pod running a Python script (stdlib only) against the cluster; its last stdout line is JSON."""

    def __init__(self, ns: str, script: str, args: list[str], deadline_s: int = 300, **pod_kw: Any):
        self.ns = ns
        self.name = f"e2e-client-{uuid.uuid4().hex[:6]}"
        self.deadline_s = deadline_s
        apply(pod_spec(self.name, script, args, deadline_s, **pod_kw), ns)

    def phase(self) -> str:
        pod = kget("pod", self.name, self.ns, check=False) or {}
        return (pod.get("status") or {}).get("phase", "")

    def wait_running(self, timeout: float = 120) -> None:
        wait_until(
            f"client pod {self.name} running", lambda: self.phase() in ("Running", "Succeeded"), timeout, 1
        )

    def result(self, timeout: float | None = None) -> dict[str, Any]:
        wait_until(
            f"client pod {self.name} to finish",
            lambda: self.phase() in ("Succeeded", "Failed"),
            timeout or self.deadline_s + 60,
            1,
        )
        logs = kubectl("logs", "-n", self.ns, self.name)
        phase = self.phase()
        self.delete()  # done: it no longer holds a claim or a node slot
        assert phase == "Succeeded", f"client pod failed:\n{logs}"
        lines = [ln for ln in logs.splitlines() if ln.startswith("{")]
        assert lines, f"no JSON result in the client's output:\n{logs}"
        return json.loads(lines[-1])

    def delete(self) -> None:
        kubectl(
            "delete",
            "pod",
            "-n",
            self.ns,
            self.name,
            "--grace-period=1",
            "--wait=false",
            "--ignore-not-found",
            check=False,
        )


# Sends chat completions from `workers` threads until `seconds` have passed (or `count` requests
# were sent when count > 0), each request with its own timeout; prints a JSON summary: no loop
# is unbounded, and a request the server never answers shows up as "timeouts".
LOAD_SCRIPT = r"""
import json, sys, threading, time, urllib.request, urllib.error
url, model, workers, seconds, count, max_tokens, req_timeout = sys.argv[1:8]
workers, seconds, count = int(workers), float(seconds), int(count)
max_tokens, req_timeout = int(max_tokens), float(req_timeout)
prompt = sys.argv[8] if len(sys.argv) > 8 else "Write a long story about a robot who learns to paint."
lock = threading.Lock()
out = {"ok": 0, "errors": 0, "timeouts": 0, "error_kinds": {}, "answers": [], "latencies": []}
sent = [0]
end = time.monotonic() + seconds
def one():
    body = json.dumps({"model": model, "messages": [{"role": "user", "content": prompt}],
                       "max_tokens": max_tokens, "temperature": 0.0}).encode()
    req = urllib.request.Request(url, body, {"Content-Type": "application/json"})
    t0 = time.monotonic()
    try:
        with urllib.request.urlopen(req, timeout=req_timeout) as r:
            ans = json.loads(r.read())["choices"][0]["message"]["content"]
        with lock:
            out["ok"] += 1; out["latencies"].append(round(time.monotonic() - t0, 2))
            if len(out["answers"]) < 3: out["answers"].append(ans)
    except Exception as e:
        timeout = "timed out" in str(e) or isinstance(e, TimeoutError)
        code = f" {e.code}" if isinstance(e, urllib.error.HTTPError) else ""
        kind = "timeout" if timeout else type(e).__name__ + code
        with lock:
            out["timeouts" if timeout else "errors"] += 1
            out["error_kinds"][kind] = out["error_kinds"].get(kind, 0) + 1
        time.sleep(0.5)
def worker():
    while time.monotonic() < end:
        with lock:
            if count and sent[0] >= count: return
            sent[0] += 1
        one()
ts = [threading.Thread(target=worker) for _ in range(workers)]
[t.start() for t in ts]; [t.join() for t in ts]
out["sent"] = sent[0]
print(json.dumps(out), flush=True)
"""


def load(
    ns: str,
    svc_ip: str,
    model: str,
    *,
    workers: int,
    seconds: float,
    count: int = 0,
    max_tokens: int = 64,
    req_timeout: float = 120,
    prompt: str | None = None,
) -> ClientPod:
    args = [
        f"http://{svc_ip}/v1/chat/completions",
        model,
        str(workers),
        str(seconds),
        str(count),
        str(max_tokens),
        str(req_timeout),
    ] + ([prompt] if prompt else [])
    return ClientPod(ns, LOAD_SCRIPT, args, deadline_s=int(seconds + req_timeout + 120))
