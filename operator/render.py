"""Renders an InferenceService spec into the child manifests the operator owns.

Pure functions, no API calls: (name, namespace, spec, settings) -> plain dicts for
a Deployment, a Service and (for hf:// models) the model-cache PVC, and, when spec.router is
on, the router's ServiceAccount, Role, RoleBinding, Service `<name>-router` and Deployment. Everything
here uses APIs that exist from Kubernetes 1.20 to current releases (apps/v1, v1).

The defaults answer the pains users of KServe / vLLM production-stack report:
- long model loads: a startupProbe with a budget of rollout.startupTimeoutSeconds,
  so slow loads are not killed by liveness and get no traffic before /health is 200;
- dropped requests on rollout: preStop sleep (endpoints drop the pod first), then
  the server drains on SIGTERM within engine.shutdownTimeoutSeconds, and the grace
  period covers both;
- GPU rollout deadlock: pods with GPUs roll with maxSurge 0 (no extra GPU needed);
- re-downloads on every restart: weights go to a PVC once; a marker file makes
  the download init container a no-op afterwards.
"""

from __future__ import annotations

import hashlib
import json
import math
from typing import Any

from fleetserve.operator.settings import OperatorSettings
from fleetserve.operator.spec import GROUP, TP_FLAG, InferenceServiceSpec

PORT = 8000
CACHE_MOUNT = "/models"
SOURCE_MOUNT = "/mnt/model-source"
MARKER_FILE = ".fleetserve-complete"
ISVC_LABEL = f"{GROUP}/inferenceservice"
LAST_APPLIED = f"{GROUP}/last-applied"
TEMPLATE_HASH = f"{GROUP}/template-hash"
"""Pod-template annotation: a digest of the rest of the template. A pod whose value differs from the
Deployment's is from an older rollout; status.py tells a lost replica from a replaced one with it."""
RUNTIME_CONTAINER = "runtime"
DOWNLOAD_CONTAINER = "model-download"
GPU_RESOURCE = "nvidia.com/gpu"

# Runs in the runtime image (python + huggingface_hub) as the download init container.
# argv: repo revision dest allow_pattern. Idempotent: a marker file written after a
# complete download makes later runs exit at once; a file lock serialises replicas
# that start together on a shared (RWX) cache.
DOWNLOAD_SCRIPT = """\
import fcntl, os, sys
repo, revision, dest, pattern = sys.argv[1:5]
marker = os.path.join(dest, ".fleetserve-complete")
if os.path.exists(marker):
    print(f"model cache hit: {repo}@{revision} in {dest}, nothing to download", flush=True)
    sys.exit(0)
os.makedirs(dest, exist_ok=True)
with open(dest.rstrip("/") + ".lock", "w") as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)
    if os.path.exists(marker):
        print(f"model cache filled by another pod: {dest}", flush=True)
        sys.exit(0)
    print(f"downloading {repo}@{revision} into {dest}", flush=True)
    from huggingface_hub import snapshot_download
    snapshot_download(repo_id=repo, revision=revision, local_dir=dest,
                      allow_patterns=[pattern] if pattern else None)
    with open(marker, "w") as fh:
        fh.write(f"{repo}@{revision}\\n")
print("download complete", flush=True)
"""


def selector_labels(name: str) -> dict[str, str]:
    return {"app.kubernetes.io/name": "fleetserve-runtime", "app.kubernetes.io/instance": name}


def labels(name: str, component: str) -> dict[str, str]:
    return {
        **selector_labels(name),
        "app.kubernetes.io/component": component,
        "app.kubernetes.io/managed-by": "fleetserve-operator",
        ISVC_LABEL: name,
    }


def selector_string(name: str) -> str:
    return ",".join(f"{k}={v}" for k, v in selector_labels(name).items())


def cache_claim_name(name: str, spec: InferenceServiceSpec) -> str | None:
    """The PVC holding downloaded weights, or None when the model needs no download."""
    if spec.model.scheme != "hf" or not spec.modelCache.enabled:
        return None
    return spec.modelCache.existingClaim or f"{name}-model-cache"


def served_model_name(name: str, spec: InferenceServiceSpec) -> str:
    return spec.model.servedModelName or name


def _hf_parts(uri: str) -> tuple[str, str]:
    ref = uri[len("hf://") :]
    repo, _, revision = ref.partition("@")
    return repo, revision or "main"


def model_path(spec: InferenceServiceSpec) -> str | None:
    """The MODEL argument of `fleetserve serve` inside the pod; None for the embedded default."""
    scheme = spec.model.scheme
    if scheme == "hf":
        repo, revision = _hf_parts(spec.model.uri)
        path = f"{CACHE_MOUNT}/hf/{repo}/{revision}"
        return f"{path}/{spec.model.ggufFile}" if spec.model.ggufFile else path
    if scheme == "pvc":
        _, _, path = spec.model.uri[len("pvc://") :].partition("/")
        return f"{SOURCE_MOUNT}/{path}"
    if scheme == "file":
        return spec.model.uri[len("file://") :]
    return None


def model_description(spec: InferenceServiceSpec) -> str:
    return "embedded:SmolLM2-135M-Instruct" if spec.model.scheme == "embedded" else spec.model.uri


def serve_args(name: str, spec: InferenceServiceSpec) -> list[str]:
    e = spec.engine
    path = model_path(spec)
    args = [path] if path else []
    args += [
        "--host",
        "0.0.0.0",
        "--port",
        str(PORT),
        "--served-model-name",
        served_model_name(name, spec),
        "--dtype",
        e.dtype,
        "--device",
        e.device,
        "--shutdown-timeout",
        str(e.shutdownTimeoutSeconds),
    ]
    for flag, value in (
        ("--max-model-len", e.maxModelLen),
        ("--max-num-seqs", e.maxNumSeqs),
        ("--max-num-batched-tokens", e.maxNumBatchedTokens),
        ("--block-size", e.blockSize),
        ("--gpu-memory-utilization", e.gpuMemoryUtilization),
    ):
        if value is not None:
            args += [flag, str(value)]
    # One rank is the runtime's default: left out so single-GPU pods keep their arguments (and template).
    if spec.tensor_parallel_size() > 1:
        args += [TP_FLAG, str(spec.tensor_parallel_size())]
    args.append("--enable-prefix-caching" if e.enablePrefixCaching else "--no-enable-prefix-caching")
    return args + list(e.extraArgs)


def _int_or_percent(value: str) -> int | str:
    return value if value.endswith("%") else int(value)


def _strategy(spec: InferenceServiceSpec) -> dict[str, Any]:
    r = spec.rollout
    if r.strategy == "Recreate":
        return {"type": "Recreate"}
    # Auto with GPUs: never ask for a GPU beyond the replicas' own (a surge pod would wait forever
    # on a full node while the old pod holds the GPU).
    surge, unavailable = ("0", "1") if spec.resources.gpus > 0 and r.strategy == "Auto" else ("1", "0")
    return {
        "type": "RollingUpdate",
        "rollingUpdate": {
            "maxSurge": _int_or_percent(r.maxSurge or surge),
            "maxUnavailable": _int_or_percent(r.maxUnavailable or unavailable),
        },
    }


def _health_probe(period: int, failures: int, timeout: int) -> dict[str, Any]:
    return {
        "httpGet": {"path": "/health", "port": "http"},
        "periodSeconds": period,
        "failureThreshold": failures,
        "timeoutSeconds": timeout,
        "successThreshold": 1,
    }


def _secret_env(env_name: str, ref: Any) -> dict[str, Any]:
    return {"name": env_name, "valueFrom": {"secretKeyRef": {"name": ref.name, "key": ref.key}}}


def _security_context() -> dict[str, Any]:
    return {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}, "runAsNonRoot": True}


def _volumes(name: str, spec: InferenceServiceSpec) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Pod volumes and the runtime container's mounts: model cache, read-only model claim, /dev/shm."""
    volumes: list[dict[str, Any]] = []
    mounts: list[dict[str, Any]] = []
    if spec.model.scheme == "hf":
        claim = cache_claim_name(name, spec)
        cache_volume = {"persistentVolumeClaim": {"claimName": claim}} if claim else {"emptyDir": {}}
        volumes.append({"name": "model-cache", **cache_volume})
        mounts.append({"name": "model-cache", "mountPath": CACHE_MOUNT})
    if spec.model.scheme == "pvc":
        source_claim = spec.model.uri[len("pvc://") :].split("/", 1)[0]
        volumes.append(
            {"name": "model-source", "persistentVolumeClaim": {"claimName": source_claim, "readOnly": True}}
        )
        mounts.append({"name": "model-source", "mountPath": SOURCE_MOUNT, "readOnly": True})
    shm = spec.shm_size()
    if shm:  # NCCL between ranks needs more than the container runtime's 64Mi /dev/shm
        volumes.append({"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": shm}})
        mounts.append({"name": "dshm", "mountPath": "/dev/shm"})
    return volumes, mounts


def _runtime_container(
    name: str, spec: InferenceServiceSpec, image: str, pull_policy: str, mounts: list[dict[str, Any]]
) -> dict[str, Any]:
    res, rollout = spec.resources, spec.rollout
    requests: dict[str, Any] = {"cpu": res.cpu, "memory": res.memory}
    limits: dict[str, Any] = {"memory": res.memory}
    if res.gpus:
        requests[GPU_RESOURCE] = limits[GPU_RESOURCE] = str(res.gpus)
    env = [
        {"name": "FLEETSERVE_CACHE_DIR", "value": CACHE_MOUNT},
        {"name": "HF_HOME", "value": f"{CACHE_MOUNT}/.hf-home"},
        # The server never downloads: weights are fetched by the init container or shipped.
        {"name": "HF_HUB_OFFLINE", "value": "1"},
    ]
    if spec.secrets.apiKey:
        env.append(_secret_env("FLEETSERVE_API_KEY", spec.secrets.apiKey))
    startup_period = 10
    container: dict[str, Any] = {
        "name": RUNTIME_CONTAINER,
        "image": image,
        "imagePullPolicy": pull_policy,
        "command": ["fleetserve", "serve"],
        "args": serve_args(name, spec),
        "env": env,
        "ports": [{"name": "http", "containerPort": PORT, "protocol": "TCP"}],
        "resources": {"requests": requests, "limits": limits},
        "volumeMounts": mounts,
        # Liveness only starts once /health answered: a load may use the whole startup budget.
        "startupProbe": _health_probe(
            startup_period, math.ceil(rollout.startupTimeoutSeconds / startup_period), 5
        ),
        "readinessProbe": _health_probe(5, 2, 3),
        "livenessProbe": _health_probe(15, 4, 5),
        "securityContext": _security_context(),
        "terminationMessagePolicy": "FallbackToLogsOnError",
    }
    if rollout.preStopSleepSeconds:
        container["lifecycle"] = {
            "preStop": {"exec": {"command": ["sleep", str(rollout.preStopSleepSeconds)]}}
        }
    return container


def _download_container(
    spec: InferenceServiceSpec, image: str, pull_policy: str, hf_endpoint: str = ""
) -> dict[str, Any]:
    """The init container that fills the cache once; a no-op when the marker file is there."""
    repo, revision = _hf_parts(spec.model.uri)
    env = [
        {"name": "HF_HOME", "value": f"{CACHE_MOUNT}/.hf-home"},
        {"name": "HF_HUB_DISABLE_TELEMETRY", "value": "1"},
    ]
    if hf_endpoint:
        env.append({"name": "HF_ENDPOINT", "value": hf_endpoint})
    if spec.secrets.hfToken:
        env.append(_secret_env("HF_TOKEN", spec.secrets.hfToken))
    return {
        "name": DOWNLOAD_CONTAINER,
        "image": image,
        "imagePullPolicy": pull_policy,
        "command": [
            "python",
            "-c",
            DOWNLOAD_SCRIPT,
            repo,
            revision,
            f"{CACHE_MOUNT}/hf/{repo}/{revision}",
            spec.model.ggufFile or "",
        ],
        "env": env,
        "resources": {"requests": {"cpu": "500m", "memory": "1Gi"}, "limits": {"memory": "2Gi"}},
        "volumeMounts": [{"name": "model-cache", "mountPath": CACHE_MOUNT}],
        "securityContext": _security_context(),
        "terminationMessagePolicy": "FallbackToLogsOnError",
    }


def _scheduling(spec: InferenceServiceSpec) -> dict[str, Any]:
    sched = spec.scheduling
    out: dict[str, Any] = {}
    if sched.nodeSelector:
        out["nodeSelector"] = dict(sched.nodeSelector)
    if sched.tolerations:
        out["tolerations"] = [t.model_dump(exclude_none=True) for t in sched.tolerations]
    if sched.affinity:
        out["affinity"] = dict(sched.affinity)
    if sched.priorityClassName:
        out["priorityClassName"] = sched.priorityClassName
    if sched.runtimeClassName:
        out["runtimeClassName"] = sched.runtimeClassName
    if spec.imagePullSecrets:
        out["imagePullSecrets"] = [{"name": s} for s in spec.imagePullSecrets]
    return out


def render_deployment(
    name: str, namespace: str, spec: InferenceServiceSpec, settings: OperatorSettings
) -> dict[str, Any]:
    image = spec.image or settings.runtime_image
    pull_policy = spec.imagePullPolicy or settings.runtime_image_pull_policy
    volumes, mounts = _volumes(name, spec)
    rollout = spec.rollout
    pod_spec: dict[str, Any] = {
        "containers": [_runtime_container(name, spec, image, pull_policy, mounts)],
        # preStop sleep + server drain + margin for the process to exit.
        "terminationGracePeriodSeconds": rollout.preStopSleepSeconds
        + spec.engine.shutdownTimeoutSeconds
        + 15,
        # fsGroup: the cache volume is writable by the image's non-root user.
        "securityContext": {
            "runAsNonRoot": True,
            "runAsUser": settings.runtime_uid,
            "runAsGroup": settings.runtime_uid,
            "fsGroup": settings.runtime_uid,
        },
        "enableServiceLinks": False,
        "automountServiceAccountToken": False,
        "volumes": volumes,
        **_scheduling(spec),
    }
    if spec.model.scheme == "hf":
        pod_spec["initContainers"] = [_download_container(spec, image, pull_policy, settings.hf_endpoint)]

    template: dict[str, Any] = {
        "metadata": {
            "labels": labels(name, "runtime"),
            "annotations": {
                "prometheus.io/scrape": "true",
                "prometheus.io/port": str(PORT),
                "prometheus.io/path": "/metrics",
            },
        },
        "spec": pod_spec,
    }
    digest = hashlib.sha256(json.dumps(template, sort_keys=True).encode()).hexdigest()[:16]
    template["metadata"]["annotations"][TEMPLATE_HASH] = digest
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": name, "namespace": namespace, "labels": labels(name, "runtime")},
        "spec": {
            "replicas": spec.target_replicas(),
            "selector": {"matchLabels": selector_labels(name)},
            "strategy": _strategy(spec),
            "revisionHistoryLimit": 3,
            # Progressing=False (ProgressDeadlineExceeded) only after a pod had its full load budget.
            "progressDeadlineSeconds": rollout.startupTimeoutSeconds + 600,
            "template": template,
        },
    }


def render_service(name: str, namespace: str, spec: InferenceServiceSpec) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": name, "namespace": namespace, "labels": labels(name, "runtime")},
        "spec": {
            "type": "ClusterIP",
            "selector": selector_labels(name),
            "ports": [{"name": "http", "port": 80, "targetPort": "http", "protocol": "TCP"}],
        },
    }


ROUTER_PORT = 8080
ROUTER_CONTAINER = "router"


def router_name(name: str) -> str:
    return f"{name}-router"


def router_selector_labels(name: str) -> dict[str, str]:
    return {"app.kubernetes.io/name": "fleetserve-router", "app.kubernetes.io/instance": name}


def router_labels(name: str) -> dict[str, str]:
    return {
        **router_selector_labels(name),
        "app.kubernetes.io/component": "router",
        "app.kubernetes.io/managed-by": "fleetserve-operator",
        ISVC_LABEL: name,
    }


def router_env(name: str, spec: InferenceServiceSpec) -> list[dict[str, Any]]:
    """The router's configuration (operator/router/config.py reads FLEETSERVE_ROUTER_*)."""
    r = spec.router
    values = {
        "SERVICE": name,
        "INFERENCE_SERVICE": name,
        "PORT": ROUTER_PORT,
        "QUEUE_TIMEOUT": r.queueTimeoutSeconds,
        "QUEUE_SIZE": r.maxQueuedRequests,
        "LOAD_FACTOR": r.loadFactor,
        "LOAD_SLACK": r.loadSlack,
        "MAX_WAITING": r.saturationQueueDepth,
    }
    env = [
        {
            "name": "FLEETSERVE_ROUTER_NAMESPACE",
            "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}},
        }
    ]
    return env + [{"name": f"FLEETSERVE_ROUTER_{k}", "value": str(v)} for k, v in values.items()]


def render_router_rbac(name: str, namespace: str) -> list[dict[str, Any]]:
    """The router's identity: watch its Service's endpoints, annotate its own InferenceService (demand)."""
    meta = {"name": router_name(name), "namespace": namespace, "labels": router_labels(name)}
    rules = [
        {"apiGroups": ["discovery.k8s.io"], "resources": ["endpointslices"], "verbs": ["list", "watch"]},
        {"apiGroups": [""], "resources": ["endpoints"], "verbs": ["list", "watch"]},
        {
            "apiGroups": [GROUP],
            "resources": ["inferenceservices"],
            "resourceNames": [name],
            "verbs": ["patch"],
        },
    ]
    return [
        {
            "apiVersion": "v1",
            "kind": "ServiceAccount",
            "metadata": dict(meta),
            "automountServiceAccountToken": True,
        },
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "Role",
            "metadata": dict(meta),
            "rules": rules,
        },
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "RoleBinding",
            "metadata": dict(meta),
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": router_name(name)},
            "subjects": [{"kind": "ServiceAccount", "name": router_name(name), "namespace": namespace}],
        },
    ]


def render_router_deployment(
    name: str, namespace: str, spec: InferenceServiceSpec, settings: OperatorSettings
) -> dict[str, Any]:
    r = spec.router
    probe = {
        "httpGet": {"path": "/healthz", "port": "http"},
        "periodSeconds": 5,
        "timeoutSeconds": 2,
        "failureThreshold": 3,
    }
    container = {
        "name": ROUTER_CONTAINER,
        "image": settings.router_image,
        "imagePullPolicy": settings.router_image_pull_policy,
        "command": ["python", "-m", "fleetserve.operator.router"],
        "env": router_env(name, spec),
        "ports": [{"name": "http", "containerPort": ROUTER_PORT, "protocol": "TCP"}],
        "resources": {
            "requests": {"cpu": r.resources.cpu, "memory": r.resources.memory},
            "limits": {"memory": r.resources.memory},
        },
        "readinessProbe": probe,
        "livenessProbe": {**probe, "periodSeconds": 15, "failureThreshold": 4},
        # The Service drops a stopping router before it stops accepting; requests in flight then finish.
        "lifecycle": {"preStop": {"exec": {"command": ["sleep", "5"]}}},
        "securityContext": {**_security_context(), "readOnlyRootFilesystem": True},
        "terminationMessagePolicy": "FallbackToLogsOnError",
    }
    pod_spec: dict[str, Any] = {
        "serviceAccountName": router_name(name),
        "containers": [container],
        "terminationGracePeriodSeconds": 45,
        "securityContext": {
            "runAsNonRoot": True,
            "runAsUser": settings.runtime_uid,
            "runAsGroup": settings.runtime_uid,
        },
        "enableServiceLinks": False,
    }
    if spec.imagePullSecrets:
        pod_spec["imagePullSecrets"] = [{"name": s} for s in spec.imagePullSecrets]
    if spec.scheduling.tolerations:  # routers go where the service's pods may go (not to GPU-only taints)
        pod_spec["tolerations"] = [t.model_dump(exclude_none=True) for t in spec.scheduling.tolerations]
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": router_name(name), "namespace": namespace, "labels": router_labels(name)},
        "spec": {
            "replicas": r.replicas,
            "selector": {"matchLabels": router_selector_labels(name)},
            "strategy": {"type": "RollingUpdate", "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0}},
            "revisionHistoryLimit": 3,
            "template": {
                "metadata": {
                    "labels": router_labels(name),
                    "annotations": {
                        "prometheus.io/scrape": "true",
                        "prometheus.io/port": str(ROUTER_PORT),
                        "prometheus.io/path": "/metrics",
                    },
                },
                "spec": pod_spec,
            },
        },
    }


def render_router_service(name: str, namespace: str) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": router_name(name), "namespace": namespace, "labels": router_labels(name)},
        "spec": {
            "type": "ClusterIP",
            "selector": router_selector_labels(name),
            "ports": [{"name": "http", "port": 80, "targetPort": "http", "protocol": "TCP"}],
        },
    }


def render_router(
    name: str, namespace: str, spec: InferenceServiceSpec, settings: OperatorSettings
) -> list[dict[str, Any]]:
    """The router's children (RBAC first: the pods need their service account), or none when it is off."""
    if not spec.router_enabled():
        return []
    return render_router_rbac(name, namespace) + [
        render_router_service(name, namespace),
        render_router_deployment(name, namespace, spec, settings),
    ]


def render_cache_pvc(name: str, namespace: str, spec: InferenceServiceSpec) -> dict[str, Any] | None:
    """The claim the operator creates for downloads; None when an existing claim (or none) is used."""
    if cache_claim_name(name, spec) is None or spec.modelCache.existingClaim:
        return None
    cache = spec.modelCache
    pvc: dict[str, Any] = {
        "apiVersion": "v1",
        "kind": "PersistentVolumeClaim",
        "metadata": {
            "name": f"{name}-model-cache",
            "namespace": namespace,
            "labels": labels(name, "model-cache"),
        },
        "spec": {"accessModes": [cache.accessMode], "resources": {"requests": {"storage": cache.size}}},
    }
    if cache.storageClassName:
        pvc["spec"]["storageClassName"] = cache.storageClassName
    return pvc


def render_pdb(
    name: str, namespace: str, spec: InferenceServiceSpec, api_version: str | None
) -> dict[str, Any] | None:
    """maxUnavailable 1: drains take replicas one at a time, and a single replica can still be drained
    (minAvailable would block it forever). None when disabled or the cluster serves no PDB API."""
    if not spec.rollout.podDisruptionBudget or api_version is None:
        return None
    return {
        "apiVersion": api_version,
        "kind": "PodDisruptionBudget",
        "metadata": {"name": name, "namespace": namespace, "labels": labels(name, "runtime")},
        "spec": {"maxUnavailable": 1, "selector": {"matchLabels": selector_labels(name)}},
    }


def render_all(
    name: str,
    namespace: str,
    spec: InferenceServiceSpec,
    settings: OperatorSettings,
    pdb_api: str | None = "policy/v1",
) -> list[dict[str, Any]]:
    """All children, in the order they must be applied (the claim before the pods that mount it).

    `pdb_api` is the PodDisruptionBudget API version the cluster serves (discovered at startup).
    """
    pvc = render_cache_pvc(name, namespace, spec)
    pdb = render_pdb(name, namespace, spec, pdb_api)
    return (
        ([pvc] if pvc else [])
        + [render_service(name, namespace, spec), render_deployment(name, namespace, spec, settings)]
        + ([pdb] if pdb else [])
        + render_router(name, namespace, spec, settings)
    )


def service_url(
    name: str, namespace: str, settings: OperatorSettings, spec: InferenceServiceSpec | None = None
) -> str:
    """status.url: the router's Service when the router is on, else the replicas' Service."""
    host = router_name(name) if spec is not None and spec.router_enabled() else name
    return f"http://{host}.{namespace}.svc.{settings.cluster_domain}"
