"""The InferenceService API: typed spec and status, the single source of the CRD schema.

This module owns the shape of `serving.fleetserve.dev/v1alpha1` InferenceService
objects. The CRD's OpenAPI schema in crds/ is generated from these models
(`python -m fleetserve.operator.crd`), so the schema the apiserver enforces and
the objects the operator parses cannot drift apart. Checks a structural schema
cannot express (minReplicas > maxReplicas, scale to zero without opting in)
live in the model validators here; the operator turns their failures into an
`InvalidSpec` condition and event instead of a crash loop.

Every field's docstring becomes its `description` in the CRD (and so in
`kubectl explain`).
"""

from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

GROUP = "serving.fleetserve.dev"
VERSION = "v1alpha1"
KIND = "InferenceService"
PLURAL = "inferenceservices"
SINGULAR = "inferenceservice"
SHORT_NAMES = ["fsvc"]

# hf://org/name[@revision] | pvc://claim/path | file:///abs/path | embedded
# The claim name follows DNS-1123 label rules; paths may not contain "..".
MODEL_URI_PATTERN = (
    r"^(embedded"
    r"|hf://[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*(@[A-Za-z0-9_./-]+)?"
    r"|pvc://[a-z0-9]([-a-z0-9]*[a-z0-9])?(/[^/\s]+)+"
    r"|file:///[^\s]+)$"
)
QUANTITY_PATTERN = r"^[0-9]+(\.[0-9]+)?(m|k|Ki|M|Mi|G|Gi|T|Ti|P|Pi|E|Ei)?$"
DNS_LABEL_PATTERN = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"
DNS_SUBDOMAIN_PATTERN = r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$"
TP_FLAG = "--tensor-parallel-size"


class _Model(BaseModel):
    """Base for API objects: camelCase as written by users, attribute docstrings as descriptions."""

    model_config = ConfigDict(
        use_attribute_docstrings=True, extra="forbid", populate_by_name=True, frozen=True
    )


class ModelSource(_Model):
    uri: str = Field("embedded", pattern=MODEL_URI_PATTERN)
    """Where the weights come from: `hf://org/name[@revision]` (downloaded once into the model cache),
    `pvc://claim/path` (a directory or .gguf file on an existing PersistentVolumeClaim, mounted read-only),
    `file:///path` (a directory or .gguf file already inside the image) or `embedded` (the runtime's
    built-in SmolLM2-135M-Instruct, nothing to download)."""

    ggufFile: str | None = Field(None, pattern=r"^[^/\s][^\s]*\.gguf$")
    """For hf:// sources holding GGUF files: the file inside the repository to serve (only it is downloaded)."""

    servedModelName: str | None = Field(None, min_length=1, max_length=253)
    """The model name clients send in requests and that labels the metrics; defaults to the resource name."""

    @property
    def scheme(self) -> str:
        return self.uri.split("://", 1)[0] if "://" in self.uri else self.uri


class EngineSettings(_Model):
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = "auto"
    """Weight and activation dtype (`--dtype`)."""

    device: Literal["auto", "cpu", "cuda"] = "auto"
    """Device the runtime uses (`--device`); auto picks cuda when a GPU is visible."""

    maxModelLen: int | None = Field(None, ge=16)
    """Longest sequence (prompt + output) in tokens (`--max-model-len`); default: the model's own."""

    maxNumSeqs: int | None = Field(None, ge=1)
    """Most sequences batched in one step (`--max-num-seqs`)."""

    maxNumBatchedTokens: int | None = Field(None, ge=1)
    """Token budget of one engine step (`--max-num-batched-tokens`)."""

    blockSize: int | None = Field(None, ge=1, le=1024)
    """Tokens per KV-cache block (`--block-size`)."""

    enablePrefixCaching: bool = True
    """Reuse KV blocks of shared prompt prefixes (`--enable-prefix-caching`)."""

    gpuMemoryUtilization: float | None = Field(None, gt=0.0, le=1.0)
    """Fraction of GPU memory the runtime may use (`--gpu-memory-utilization`)."""

    tensorParallelSize: int | None = Field(None, ge=1, le=64)
    """Ranks one model is split across (`--tensor-parallel-size`, one per GPU); default: resources.gpus
    (1 without GPUs). At most resources.gpus on GPU pods; on CPU pods (gpus 0) the ranks are processes.
    Whether the model's heads divide by it is checked by the runtime at start-up (its error then shows
    in the Degraded condition)."""

    shutdownTimeoutSeconds: int = Field(30, ge=0, le=3600)
    """How long the server drains in-flight requests after SIGTERM (`--shutdown-timeout`);
    the pod's termination grace period is derived from it."""

    extraArgs: list[str] = Field(default_factory=list)
    """Further `fleetserve serve` flags, appended verbatim."""


class Resources(_Model):
    gpus: int = Field(0, ge=0, le=64)
    """NVIDIA GPUs per pod (`nvidia.com/gpu` request and limit). With GPUs, rollouts never surge."""

    cpu: str = Field("1", pattern=QUANTITY_PATTERN)
    """CPU request per pod (no CPU limit is set: throttling hurts latency)."""

    memory: str = Field("4Gi", pattern=QUANTITY_PATTERN)
    """Memory request and limit per pod."""

    shmSize: str | None = Field(None, pattern=QUANTITY_PATTERN)
    """Size limit of the memory-backed /dev/shm volume (its pages count against `memory`). Default: 1Gi per
    tensor-parallel rank when the runtime runs more than one rank (NCCL and the rank processes exchange
    data through /dev/shm, and the container runtime's own 64Mi is too small); none with one rank."""


class Toleration(_Model):
    """A toleration of the runtime pods for a node taint (as in a pod spec)."""

    key: str | None = None
    """The taint key the toleration applies to."""
    operator: Literal["Exists", "Equal"] | None = None
    """Exists or Equal."""
    value: str | None = None
    """The taint value for Equal."""
    effect: Literal["NoSchedule", "PreferNoSchedule", "NoExecute"] | None = None
    """The taint effect to tolerate; empty means all."""
    tolerationSeconds: int | None = None
    """For NoExecute: how long the pod stays bound after the taint appears."""


class Scheduling(_Model):
    nodeSelector: dict[str, str] = Field(default_factory=dict)
    """Node labels the pods must match."""

    tolerations: list[Toleration] = Field(default_factory=list)
    """Taints the pods tolerate (e.g. nvidia.com/gpu:NoSchedule on GPU pools)."""

    affinity: dict[str, Any] | None = Field(
        None, json_schema_extra={"x-kubernetes-preserve-unknown-fields": True}
    )
    """A core/v1 Affinity, copied into the pod spec."""

    priorityClassName: str | None = None
    """PriorityClass of the pods."""

    runtimeClassName: str | None = None
    """RuntimeClass of the pods (e.g. `nvidia` where the GPU runtime is not the default)."""


class ModelCache(_Model):
    enabled: bool = True
    """Keep downloaded weights on a PersistentVolumeClaim so restarts and new replicas skip the download.
    Only hf:// models are downloaded; other sources never need a cache."""

    existingClaim: str | None = Field(None, pattern=DNS_LABEL_PATTERN, max_length=63)
    """Use this existing PersistentVolumeClaim instead of creating `<name>-model-cache`; it is never deleted."""

    size: str = Field("20Gi", pattern=QUANTITY_PATTERN)
    """Size of the claim the operator creates."""

    storageClassName: str | None = None
    """StorageClass of the claim the operator creates; the cluster default when empty."""

    accessMode: Literal["ReadWriteOnce", "ReadWriteMany"] = "ReadWriteOnce"
    """Access mode of the created claim. Replicas on several nodes need ReadWriteMany."""

    retainOnDelete: bool = False
    """Keep the created claim (no owner reference) when the InferenceService is deleted."""


class SecretKeyRef(_Model):
    name: str = Field(pattern=DNS_SUBDOMAIN_PATTERN, max_length=253)
    """Secret name in the InferenceService's namespace."""

    key: str = Field(min_length=1)
    """Key inside the Secret."""


class Secrets(_Model):
    hfToken: SecretKeyRef | None = None
    """Hugging Face token for gated or private hf:// models (env HF_TOKEN of the download step)."""

    apiKey: SecretKeyRef | None = None
    """API key clients must send as a Bearer token (env FLEETSERVE_API_KEY of the server)."""


class Autoscaling(_Model):
    enabled: bool = True
    """Let the operator scale on queue depth. Disable it when KEDA or an HPA drives the scale subresource."""

    minReplicas: int = Field(1, ge=0)
    """Fewest replicas; 0 needs scaleToZero."""

    maxReplicas: int | None = Field(None, ge=1)
    """Most replicas; defaults to max(minReplicas, 1)."""

    targetQueueDepth: float = Field(5.0, gt=0)
    """Requests (waiting + running) one replica should carry: desired = ceil(total / target)."""

    scaleUpStabilizationSeconds: int = Field(0, ge=0, le=3600)
    """A higher replica count must be recommended for this long before scaling up."""

    scaleDownStabilizationSeconds: int = Field(300, ge=0, le=86400)
    """Scale down only to the highest count recommended over this window."""

    cooldownSeconds: int = Field(60, ge=0, le=86400)
    """No scale decision within this long after the previous one."""

    scaleToZero: bool = False
    """Allow minReplicas 0: idle services release their GPUs. The router (spec.router) holds requests that
    arrive meanwhile and signals demand, and the operator scales up from zero; without the router it needs
    an external trigger (kubectl scale, KEDA)."""

    @property
    def effective_max(self) -> int:
        return self.maxReplicas if self.maxReplicas is not None else max(self.minReplicas, 1)


class Rollout(_Model):
    strategy: Literal["Auto", "RollingUpdate", "Recreate"] = "Auto"
    """Auto = RollingUpdate with maxSurge 0 when pods need GPUs (no spare GPU deadlock), else surge 1, unavailable 0."""

    maxSurge: str | None = Field(None, pattern=r"^[0-9]+%?$")
    """Override for RollingUpdate maxSurge (a count or a percentage)."""

    maxUnavailable: str | None = Field(None, pattern=r"^[0-9]+%?$")
    """Override for RollingUpdate maxUnavailable (a count or a percentage)."""

    startupTimeoutSeconds: int = Field(1800, ge=30, le=86400)
    """How long a pod may take to load the model before it is restarted (startupProbe budget)."""

    preStopSleepSeconds: int = Field(10, ge=0, le=300)
    """Pause before SIGTERM so endpoints drop the pod before it stops accepting requests."""

    podDisruptionBudget: bool = True
    """Create a PodDisruptionBudget (maxUnavailable 1) so node drains evict one replica at a time.
    Its API version (policy/v1, else policy/v1beta1) is chosen from what the cluster serves;
    switching it off deletes the budget."""


class RouterResources(_Model):
    cpu: str = Field("100m", pattern=QUANTITY_PATTERN)
    """CPU request per router pod (no CPU limit)."""

    memory: str = Field("256Mi", pattern=QUANTITY_PATTERN)
    """Memory request and limit per router pod."""


class Router(_Model):
    enabled: bool | None = None
    """Put a model-aware router in front of the replicas (status.url then points at it). Default: on when
    autoscaling.maxReplicas > 1, spec.replicas > 1 or scaleToZero is allowed; off for a single replica."""

    replicas: int = Field(1, ge=1, le=20)
    """Router pods (each routes on its own view of the replicas; 2 for a router that survives a node)."""

    resources: RouterResources = Field(default_factory=RouterResources)
    """Per-pod resources of the router."""

    queueTimeoutSeconds: int = Field(300, ge=1, le=3600)
    """How long a request waits for a ready replica (e.g. during a scale up from zero) before 503 + Retry-After."""

    maxQueuedRequests: int = Field(256, ge=0, le=100000)
    """Requests a router pod holds while no replica is ready; more get 503 at once."""

    loadFactor: float = Field(1.25, ge=1.0, le=10.0)
    """Bounded-load factor: a replica takes requests for its prefixes while it carries fewer than
    loadFactor x the mean outstanding requests (or fewer than loadSlack more than the least loaded replica);
    above that they spill to the next replica on the ring."""

    loadSlack: int = Field(4, ge=0, le=100000)
    """Bounded load spills only from a replica that also carries at least this many more outstanding
    requests than the least loaded one: at low concurrency a conversation stays on the replica holding its
    history (moving it recomputes the history; one more sequence in a batch is cheap). 0: the relative
    rule alone."""

    saturationQueueDepth: int = Field(8, ge=1)
    """A replica with this many waiting requests (vllm:num_requests_waiting) gets no new ones while another
    replica has room (as does one with KV-cache usage of 95% or more)."""


class InferenceServiceSpec(_Model):
    model: ModelSource = Field(default_factory=ModelSource)
    """What to serve."""

    image: str | None = Field(None, min_length=1)
    """Runtime image; defaults to the operator's configured runtime image."""

    imagePullPolicy: Literal["Always", "IfNotPresent", "Never"] | None = None
    """Pull policy of the runtime image."""

    imagePullSecrets: list[str] = Field(default_factory=list)
    """Names of Secrets used to pull the image."""

    engine: EngineSettings = Field(default_factory=EngineSettings)
    """Runtime engine settings, mapped onto `fleetserve serve` flags."""

    resources: Resources = Field(default_factory=Resources)
    """Per-pod compute resources."""

    scheduling: Scheduling = Field(default_factory=Scheduling)
    """Where pods may run."""

    modelCache: ModelCache = Field(default_factory=ModelCache)
    """Persistent cache for downloaded weights."""

    secrets: Secrets = Field(default_factory=Secrets)
    """Secrets the pods read."""

    replicas: int = Field(1, ge=0)
    """Current replica count: the scale subresource (kubectl scale, the built-in autoscaler, KEDA) writes it.
    With autoscaling enabled the pods run clamped to [minReplicas, maxReplicas]."""

    autoscaling: Autoscaling = Field(default_factory=Autoscaling)
    """Queue-depth autoscaling bounds and windows."""

    rollout: Rollout = Field(default_factory=Rollout)
    """How new versions replace running pods."""

    router: Router = Field(default_factory=Router)
    """The model-aware router: prefix-cache affinity, retries, holding requests while scaled to zero."""

    @model_validator(mode="after")
    def _cross_field_checks(self) -> InferenceServiceSpec:
        a = self.autoscaling
        if a.maxReplicas is not None and a.minReplicas > a.maxReplicas:
            raise ValueError(
                f"autoscaling.minReplicas ({a.minReplicas}) is greater than maxReplicas ({a.maxReplicas})"
            )
        if a.minReplicas == 0 and not a.scaleToZero:
            raise ValueError("autoscaling.minReplicas is 0 but autoscaling.scaleToZero is false")
        if self.model.ggufFile and self.model.scheme != "hf":
            raise ValueError("model.ggufFile applies to hf:// sources only (give the .gguf path in the uri)")
        if ".." in self.model.uri.split("/"):
            raise ValueError("model.uri may not contain '..'")
        r = self.rollout
        if r.strategy != "Recreate" and r.maxSurge in ("0", "0%") and r.maxUnavailable in ("0", "0%"):
            raise ValueError("rollout.maxSurge and rollout.maxUnavailable cannot both be 0")
        if self.resources.gpus == 0 and self.engine.device == "cuda":
            raise ValueError("engine.device is cuda but resources.gpus is 0")
        tp, gpus = self.engine.tensorParallelSize, self.resources.gpus
        if tp is not None and gpus and tp > gpus:
            raise ValueError(
                f"engine.tensorParallelSize ({tp}) is greater than resources.gpus ({gpus}): "
                "each rank needs its own GPU"
            )
        if any(a == TP_FLAG or a.startswith(TP_FLAG + "=") for a in self.engine.extraArgs):
            raise ValueError(f"engine.extraArgs may not set {TP_FLAG}: use engine.tensorParallelSize")
        return self

    def tensor_parallel_size(self) -> int:
        """Ranks of the runtime: engine.tensorParallelSize, else one per GPU (at least 1)."""
        return self.engine.tensorParallelSize or max(self.resources.gpus, 1)

    def shm_size(self) -> str | None:
        """The /dev/shm size limit: resources.shmSize, else 1Gi per rank with more than one rank."""
        if self.resources.shmSize:
            return self.resources.shmSize
        tp = self.tensor_parallel_size()
        return f"{tp}Gi" if tp > 1 else None

    def router_enabled(self) -> bool:
        """spec.router.enabled, or by default: whenever there can be more than one replica or none."""
        if self.router.enabled is not None:
            return self.router.enabled
        a = self.autoscaling
        return a.effective_max > 1 or a.scaleToZero or self.replicas > 1

    def target_replicas(self) -> int:
        """Pods to run: spec.replicas, clamped to the autoscaling bounds while autoscaling is enabled."""
        if not self.autoscaling.enabled:
            return self.replicas
        return min(max(self.replicas, self.autoscaling.minReplicas), self.autoscaling.effective_max)


class Condition(_Model):
    """One status condition (Kubernetes conventions: type, status, reason, message, times)."""

    model_config = ConfigDict(use_attribute_docstrings=True, extra="ignore", frozen=True)

    type: str
    """ModelCached, Ready, Available, Progressing, Degraded or InvalidSpec."""
    status: Literal["True", "False", "Unknown"]
    """Whether the condition holds."""
    reason: str = ""
    """One CamelCase word for machines."""
    message: str = ""
    """Details for humans."""
    lastTransitionTime: str | None = None
    """When status last changed (RFC 3339)."""
    observedGeneration: int | None = None
    """The generation the condition was computed for."""


class InferenceServiceStatus(_Model):
    model_config = ConfigDict(use_attribute_docstrings=True, extra="ignore", frozen=True)

    observedGeneration: int | None = None
    """The spec generation the operator last reconciled."""
    phase: (
        Literal["Pending", "Downloading", "Loading", "Ready", "Degraded", "Failed", "ScaledToZero"] | None
    ) = None
    """Summary of the conditions for humans."""
    conditions: list[Condition] = Field(default_factory=list)
    """Latest observations of the service's state."""
    model: str | None = None
    """The model being served (resolved source)."""
    url: str | None = None
    """In-cluster base URL of the OpenAI-compatible API: the router's Service when the router is on,
    else the replicas' Service."""
    routerReadyReplicas: int | None = None
    """Router pods passing readiness (absent without a router)."""
    lastDemandTime: str | None = None
    """When the router last reported requests waiting for a replica (RFC 3339)."""
    selector: str | None = None
    """Label selector of the pods (for the scale subresource)."""
    replicas: int | None = None
    """Pods that exist (the Deployment's replicas)."""
    readyReplicas: int | None = None
    """Pods passing readiness (/health)."""
    desiredReplicas: int | None = None
    """What the autoscaler currently wants."""
    queueDepth: int | None = None
    """Requests waiting, summed over ready pods (vllm:num_requests_waiting)."""
    runningRequests: int | None = None
    """Requests running, summed over ready pods (vllm:num_requests_running)."""
    kvCacheUsage: float | None = None
    """Mean KV-cache usage of ready pods, 0 to 1 (vllm:kv_cache_usage_perc)."""
    promptTokensPerSecond: float | None = None
    """Prompt tokens processed per second, summed over ready pods."""
    generationTokensPerSecond: float | None = None
    """Output tokens generated per second, summed over ready pods."""
    lastScaleTime: str | None = None
    """When the autoscaler last changed the replica count (RFC 3339)."""
    lastMetricsTime: str | None = None
    """When pod metrics were last scraped (RFC 3339)."""


def parse_spec(raw: Any) -> InferenceServiceSpec:
    """Validate a raw spec dict (as read from the apiserver); raises pydantic.ValidationError."""
    return InferenceServiceSpec.model_validate(dict(raw or {}))


def describe_validation_error(exc: Exception) -> str:
    """One line per problem, with the field path, for conditions and events."""
    errors = getattr(exc, "errors", None)
    if not callable(errors):
        return str(exc)
    parts = []
    for err in errors():
        loc = ".".join(str(p) for p in err.get("loc", ()))
        msg = re.sub(r"^Value error, ", "", err.get("msg", ""))
        parts.append(f"spec.{loc}: {msg}" if loc else msg)
    return "; ".join(parts)
