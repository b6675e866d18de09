"""Derives an InferenceService's status from what the operator observes.

Owns the mapping observed pods + Deployment + scraped metrics -> phase and
conditions (ModelCached, Ready, Available, Progressing, Degraded). Pure functions:
main.py feeds them kopf index entries and writes the result to the status
subresource. Pod failures users hit most (image pull errors, crash loops, no GPU
to schedule on, a failed download, a missing secret) become Degraded with a
reason a human and a machine can act on. So does a replica that stopped serving outside a rollout
(ReplicaLost: killed, evicted, crashed or failing its readiness probe) until its replacement is
ready; pods replaced by a rollout or a scale-down are not "lost" (told apart by the pod-template
digest render.TEMPLATE_HASH).
"""

from __future__ import annotations

import dataclasses
import datetime
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from fleetserve.operator.metrics import Aggregate
from fleetserve.operator.render import (
    DOWNLOAD_CONTAINER,
    GPU_RESOURCE,
    PORT,
    RUNTIME_CONTAINER,
    TEMPLATE_HASH,
)
from fleetserve.operator.spec import InferenceServiceSpec, InferenceServiceStatus

_PULL_ERRORS = {"ErrImagePull", "ImagePullBackOff", "InvalidImageName", "ErrImageNeverPull"}
_CONFIG_ERRORS = {"CreateContainerConfigError", "CreateContainerError", "RunContainerError"}


def status_fields(fields: Mapping[str, Any]) -> dict[str, Any]:
    """Status fields as the CRD schema holds them: every write goes through InferenceServiceStatus
    (the model the CRD's status schema is generated from), so a misspelt or mistyped field fails
    here instead of being pruned by the apiserver. Returns only the fields given."""
    unknown = set(fields) - set(InferenceServiceStatus.model_fields)
    if unknown:
        raise ValueError(f"not InferenceServiceStatus fields: {sorted(unknown)}")
    return InferenceServiceStatus.model_validate(dict(fields)).model_dump(mode="json", exclude_unset=True)


def now_iso() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass(frozen=True)
class PodView:
    """What the operator keeps of one runtime pod (built from a watch event, held in a kopf index)."""

    name: str
    ip: str | None
    port: int
    ready: bool
    phase: str
    deleting: bool
    download: str | None
    """State of the download init container: running, done, failed, waiting, or None without one."""
    problems: tuple[tuple[str, str], ...]
    """(reason, message) of waiting/failing containers and scheduling failures."""
    template_hash: str | None = None
    """The pod template digest it was created from (render.TEMPLATE_HASH), None if unstamped."""

    @property
    def metrics_url(self) -> str:
        host = f"[{self.ip}]" if self.ip and ":" in self.ip else self.ip  # IPv6 pod addresses
        return f"http://{host}:{self.port}/metrics"


def _ready(status: Mapping[str, Any]) -> bool:
    return any(c.get("type") == "Ready" and c.get("status") == "True" for c in status.get("conditions") or [])


def pod_view(body: Mapping[str, Any]) -> PodView:
    meta, spec, status = body.get("metadata", {}), body.get("spec", {}), body.get("status", {}) or {}
    port = PORT
    for c in spec.get("containers") or []:
        if c.get("name") == RUNTIME_CONTAINER:
            for p in c.get("ports") or []:
                if p.get("name") == "http":
                    port = int(p.get("containerPort", PORT))
    problems: list[tuple[str, str]] = []
    download = None
    for cs in status.get("initContainerStatuses") or []:
        if cs.get("name") != DOWNLOAD_CONTAINER:
            continue
        state = cs.get("state") or {}
        if "running" in state:
            download = "running"
        elif "terminated" in state:
            download = "done" if state["terminated"].get("exitCode") == 0 else "failed"
        else:
            download = "waiting"
        last = (cs.get("lastState") or {}).get("terminated") or {}
        if download != "done" and (last.get("exitCode") not in (None, 0) or download == "failed"):
            term = state.get("terminated") or last
            problems.append(
                (
                    "ModelDownloadFailed",
                    f"pod {meta.get('name')}: model download exited with {term.get('exitCode')}: "
                    f"{(term.get('message') or term.get('reason') or '').strip()[:300]}",
                )
            )
    for cs in (status.get("initContainerStatuses") or []) + (status.get("containerStatuses") or []):
        waiting = (cs.get("state") or {}).get("waiting") or {}
        reason = waiting.get("reason")
        if reason in _PULL_ERRORS:
            problems.append(
                ("ImagePullError", f"pod {meta.get('name')}: {reason}: {waiting.get('message', '')}"[:400])
            )
        elif reason == "CrashLoopBackOff":
            said = _termination_message(cs)
            problems.append(
                (
                    "CrashLoopBackOff",
                    f"pod {meta.get('name')}: container {cs.get('name')} keeps "
                    f"crashing (restarts: {cs.get('restartCount', 0)})" + (f": {said}" if said else ""),
                )
            )
        elif reason in _CONFIG_ERRORS:
            problems.append(
                (
                    "ContainerConfigError",
                    f"pod {meta.get('name')}: {reason}: {waiting.get('message', '')}"[:400],
                )
            )
        elif cs.get("name") == RUNTIME_CONTAINER and not reason:
            term = (cs.get("state") or {}).get("terminated") or {}
            if term.get("exitCode") not in (None, 0):  # failed, not yet restarted
                said = _termination_message(cs)
                problems.append(
                    (
                        "RuntimeFailed",
                        f"pod {meta.get('name')}: the runtime exited with "
                        f"{term.get('exitCode')}" + (f": {said}" if said else ""),
                    )
                )
    for cond in status.get("conditions") or []:
        if (cond.get("type"), cond.get("status"), cond.get("reason")) == (
            "PodScheduled",
            "False",
            "Unschedulable",
        ):
            msg = cond.get("message", "")
            reason = "InsufficientGPU" if GPU_RESOURCE in msg else "Unschedulable"
            problems.append((reason, f"pod {meta.get('name')}: {msg}"[:400]))
    return PodView(
        name=meta.get("name", ""),
        ip=status.get("podIP"),
        port=port,
        ready=_ready(status),
        phase=status.get("phase", "Pending"),
        deleting=bool(meta.get("deletionTimestamp")),
        download=download,
        problems=tuple(problems),
        template_hash=(meta.get("annotations") or {}).get(TEMPLATE_HASH),
    )


_MESSAGE_CHARS = 600


def _termination_message(cs: Mapping[str, Any]) -> str:
    """What a failed container said about its exit: the runtime writes its start-up error to
    /dev/termination-log, and with terminationMessagePolicy FallbackToLogsOnError the kubelet uses the
    log's tail otherwise. The most recent failed termination wins (current state, then lastState)."""
    for state in (cs.get("state") or {}, cs.get("lastState") or {}):
        term = state.get("terminated") or {}
        if term.get("exitCode") not in (None, 0):
            text = " ".join((term.get("message") or "").split())
            if len(text) > _MESSAGE_CHARS:  # the end of a log tail holds the error
                text = "..." + text[-_MESSAGE_CHARS:]
            return text or str(term.get("reason") or "")
    return ""


def _condition(type_: str, ok: bool | None, reason: str, message: str = "") -> dict[str, Any]:
    return {
        "type": type_,
        "status": "Unknown" if ok is None else ("True" if ok else "False"),
        "reason": reason,
        "message": message,
    }


def merge_conditions(
    old: Iterable[Mapping[str, Any]],
    new: list[dict[str, Any]],
    generation: int | None,
    now: str | None = None,
) -> list[dict[str, Any]]:
    """Keeps lastTransitionTime of conditions whose status did not change."""
    now = now or now_iso()
    previous = {c.get("type"): c for c in old or []}
    out = []
    for cond in new:
        prev = previous.get(cond["type"])
        same = prev is not None and prev.get("status") == cond["status"]
        out.append(
            {
                **cond,
                "lastTransitionTime": prev.get("lastTransitionTime") if same and prev else now,
                "observedGeneration": generation,
            }
        )
    return out


@dataclass(frozen=True)
class Observation:
    spec: InferenceServiceSpec | None
    spec_error: str | None
    target_replicas: int
    deployment: Mapping[str, Any] | None
    pods: tuple[PodView, ...]
    metrics: Aggregate | None
    model_cached_before: bool
    apply_error: str | None = None
    """Why the last create/patch of a child failed, if it did."""
    previous_ready: Mapping[str, str | None] = dataclasses.field(default_factory=dict)
    """Pods that were ready at the previous observation: name -> template digest."""
    previous_degraded_reason: str | None = None
    """The Degraded condition's reason as last written, when it was True."""


def _template_hash(deployment: Mapping[str, Any] | None) -> str | None:
    template = ((deployment or {}).get("spec") or {}).get("template") or {}
    return ((template.get("metadata") or {}).get("annotations") or {}).get(TEMPLATE_HASH)


def _replica_lost(obs: Observation, ready_names: set[str]) -> str | None:
    """Why ready replicas fell short of the target outside a rollout, or None if they did not."""
    current = _template_hash(obs.deployment)
    if current is None or len(ready_names) >= obs.target_replicas:
        return None
    if any(p.template_hash != current for p in obs.pods):
        return None  # a rollout replaces pods on purpose: Progressing tells that story
    lost = sorted(n for n, h in obs.previous_ready.items() if n not in ready_names and h == current)
    have = f"{len(ready_names)}/{obs.target_replicas} replicas ready"
    if lost:
        return (
            f"replica(s) stopped serving outside a rollout: {', '.join(lost)}; {have}, replacements starting"
        )
    if obs.previous_degraded_reason == "ReplicaLost":
        return f"a replica stopped serving; {have}, waiting for its replacement"
    return None


def compute(obs: Observation) -> dict[str, Any]:
    """Status fields and conditions (without transition times) for one observation."""
    dep_status = (obs.deployment or {}).get("status") or {}
    live = [p for p in obs.pods if not p.deleting]
    ready = sum(1 for p in live if p.ready)
    replicas = int(dep_status.get("replicas", len(live)) or 0)
    conditions: list[dict[str, Any]] = []

    # ModelCached
    spec = obs.spec
    scheme = spec.model.scheme if spec else None
    downloads = [p.download for p in live if p.download]
    if spec is None:
        cached = _condition("ModelCached", obs.model_cached_before or None, "Unknown", "spec is invalid")
    elif scheme in ("embedded", "file"):
        cached = _condition("ModelCached", True, "NoDownloadNeeded", "the model ships in the image")
    elif scheme == "pvc":
        cached = _condition("ModelCached", True, "ModelOnClaim", f"weights read from {spec.model.uri}")
    elif obs.model_cached_before or "done" in downloads or ready:
        cached = _condition(
            "ModelCached",
            True,
            "Downloaded" if spec.modelCache.enabled else "DownloadedPerPod",
            f"{spec.model.uri} is in the model cache",
        )
    elif "running" in downloads:
        cached = _condition("ModelCached", False, "Downloading", f"downloading {spec.model.uri}")
    elif "failed" in downloads:
        cached = _condition("ModelCached", False, "DownloadFailed", f"downloading {spec.model.uri} failed")
    else:
        cached = _condition("ModelCached", False, "Pending", "waiting for a pod to download the model")
    conditions.append(cached)

    # Degraded
    problems = [pr for p in live for pr in p.problems]
    for cond in dep_status.get("conditions") or []:
        if cond.get("type") == "Progressing" and cond.get("reason") == "ProgressDeadlineExceeded":
            problems.append(("ProgressDeadlineExceeded", cond.get("message", "rollout is stuck")))
        if cond.get("type") == "ReplicaFailure" and cond.get("status") == "True":
            problems.append((cond.get("reason") or "ReplicaFailure", cond.get("message", "")))
    lost = _replica_lost(obs, {p.name for p in live if p.ready})
    if lost:
        problems.append(("ReplicaLost", lost))
    if obs.spec_error:
        degraded = _condition("Degraded", True, "InvalidSpec", obs.spec_error)
    elif obs.apply_error:
        degraded = _condition("Degraded", True, "ApplyFailed", obs.apply_error)
    elif problems:
        degraded = _condition("Degraded", True, problems[0][0], "; ".join(m for _, m in problems[:3]))
    else:
        degraded = _condition("Degraded", False, "AsExpected")
    conditions.append(degraded)

    # Progressing: mirror the Deployment's own view of its rollout.
    dep_prog = next((c for c in dep_status.get("conditions") or [] if c.get("type") == "Progressing"), None)
    if obs.deployment is None:
        conditions.append(_condition("Progressing", True, "Creating", "creating the Deployment"))
    elif dep_prog:
        conditions.append(
            _condition(
                "Progressing",
                dep_prog.get("status") == "True",
                dep_prog.get("reason", ""),
                dep_prog.get("message", ""),
            )
        )
    else:
        conditions.append(_condition("Progressing", None, "Unknown"))

    available = ready >= obs.target_replicas and obs.target_replicas > 0
    conditions.append(
        _condition(
            "Available",
            available,
            "AllReplicasReady" if available else "ReplicasNotReady",
            f"{ready}/{obs.target_replicas} replicas ready",
        )
    )

    if obs.spec_error:
        ready_cond = _condition("Ready", False, "InvalidSpec", obs.spec_error)
    elif ready:
        ready_cond = _condition("Ready", True, "Serving", f"{ready} replica(s) serving")
    elif obs.target_replicas == 0:
        ready_cond = _condition("Ready", False, "ScaledToZero", "no replicas: scale up to serve")
    else:
        ready_cond = _condition(
            "Ready",
            False,
            cached["reason"] if cached["status"] == "False" else "Loading",
            "no replica is ready yet" + (f": {degraded['message']}" if degraded["status"] == "True" else ""),
        )
    conditions.append(ready_cond)

    if obs.spec_error:
        phase = "Failed"
    elif degraded["status"] == "True":
        phase = "Degraded"
    elif obs.target_replicas == 0 and not live:
        phase = "ScaledToZero"
    elif ready:
        phase = "Ready"
    elif cached["reason"] == "Downloading":
        phase = "Downloading"
    elif live:
        phase = "Loading"
    else:
        phase = "Pending"

    status: dict[str, Any] = {
        "phase": phase,
        "conditions": conditions,
        "replicas": replicas,
        "readyReplicas": ready,
    }
    m = obs.metrics
    if m is not None:
        status.update({"queueDepth": int(round(m.waiting)), "runningRequests": int(round(m.running))})
        if m.kv_usage is not None:
            status["kvCacheUsage"] = round(m.kv_usage, 4)
        if m.prompt_tps is not None:
            status["promptTokensPerSecond"] = round(m.prompt_tps, 2)
        if m.generation_tps is not None:
            status["generationTokensPerSecond"] = round(m.generation_tps, 2)
    elif not ready:
        status.update({"queueDepth": 0, "runningRequests": 0})
    return status_fields(status)
