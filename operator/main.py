"""The kopf operator for InferenceService: handlers wiring spec -> children -> status -> scale.

Owns the handlers and nothing else; the logic lives in pure modules:
spec.py (parse/validate), render.py (manifests), apply.py (create-or-patch),
status.py (conditions), metrics.py (scraping), autoscaler.py (decisions).

- `reconcile`: one idempotent handler stacked on create/update/resume renders the
  children, adopts them (owner references, so deletion garbage-collects them) and
  creates or patches them. An invalid spec becomes an InvalidSpec condition and a
  Warning event, then a PermanentError: no retry loop until the spec changes.
- `runtime_pods` / `runtime_deployments` / `runtime_services`: kopf indexes (watches) of the
  children, the operator's in-memory view of them.
- `observe`: a timer per InferenceService that scrapes each ready pod's /metrics, writes
  status from the indexes and the metrics, restores children that were deleted or edited,
  and applies autoscaling decisions through the scale subresource (with an event for each).
- `demand_signalled`: the router's demand annotation changed: scale up from zero at once.

Never imports torch or fleetserve.runtime (checked by import-linter, see .importlinter).
"""

from __future__ import annotations

import asyncio
import datetime
import json
import logging
import os
import time
from typing import Any

import kopf
from kubernetes import client, config
from kubernetes.client.exceptions import ApiException
from pydantic import ValidationError

from fleetserve.operator import autoscaler, render
from fleetserve.operator import status as status_mod
from fleetserve.operator.apply import MERGE_PATCH, Children, apply, is_subset, prune_pdb, prune_router
from fleetserve.operator.memo import OperatorMemo
from fleetserve.operator.metrics import Aggregate, scrape_all
from fleetserve.operator.router.discovery import DEMAND_ANNOTATION
from fleetserve.operator.settings import OperatorSettings
from fleetserve.operator.spec import (
    GROUP,
    PLURAL,
    VERSION,
    InferenceServiceSpec,
    describe_validation_error,
    parse_spec,
)

# kopf's handler Protocols type every keyword as kopf may pass it (memo: Any, namespace: str | None,
# logger: Logger | LoggerAdapter); the handlers here declare what they get for this namespaced resource
# (the typed OperatorMemo, a str namespace), so the decorators carry targeted arg-type ignores.
ISVC = (GROUP, VERSION, PLURAL)
MANAGED: dict[str, Any] = {
    "app.kubernetes.io/managed-by": "fleetserve-operator",
    render.ISVC_LABEL: kopf.PRESENT,
}
# The runtime's pods, Deployment and Service; the router's carry component=router and are indexed apart.
RUNTIME = {**MANAGED, "app.kubernetes.io/component": "runtime"}
ROUTER = {**MANAGED, "app.kubernetes.io/component": "router"}
# Read at import: kopf needs the timer interval when the handler is declared.
SETTINGS = OperatorSettings.from_env()


def _client_configuration() -> client.Configuration:
    """In-cluster service account, else the kubeconfig ($KUBECONFIG read now, not at import)."""
    cfg = client.Configuration()
    try:
        config.load_incluster_config(client_configuration=cfg)
    except config.ConfigException:
        config.load_kube_config(config_file=os.environ.get("KUBECONFIG") or None, client_configuration=cfg)
    return cfg


@kopf.on.login()
def login(settings: kopf.OperatorSettings, **_: Any) -> kopf.ConnectionInfo:
    """kopf's watches and the kubernetes client of the handlers use the same credentials."""
    cfg = _client_configuration()
    header = cfg.get_api_key_with_prefix("BearerToken") or cfg.get_api_key_with_prefix("authorization")
    scheme, _sep, token = (header or "").rpartition(" ")
    return kopf.ConnectionInfo(
        server=cfg.host,
        ca_path=cfg.ssl_ca_cert,
        insecure=not cfg.verify_ssl,
        username=cfg.username or None,
        password=cfg.password or None,
        scheme=scheme or None,
        token=token or None,
        certificate_path=cfg.cert_file,
        private_key_path=cfg.key_file,
        trust_env=settings.networking.trust_env,
    )


@kopf.on.startup()  # type: ignore[arg-type]  # narrower kwargs: see the note above ISVC
def configure(settings: kopf.OperatorSettings, memo: OperatorMemo, logger: logging.Logger, **_: Any) -> None:
    if not isinstance(memo, OperatorMemo):
        raise kopf.PermanentError(
            "start the operator with `python -m fleetserve.operator` (kopf.run(memo=OperatorMemo()))"
        )
    settings.persistence.finalizer = f"{GROUP}/finalizer"
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=GROUP)
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
        prefix=GROUP, key="last-handled-configuration"
    )
    # No cluster-wide scanning of namespaces and CRDs: watched namespaces are exact names, and the CRD is
    # installed before the operator (Helm's crds/). So no cluster-scoped permission is needed at all.
    settings.scanning.disabled = True
    # A deletion waits for the observe timer to finish its tick: let it finish (a tick is short) and
    # re-check soon, instead of kopf's default 60 s polling that holds the finalizer for a minute.
    settings.background.instant_exit_timeout = 5.0
    settings.background.cancellation_polling = 1.0
    # Handler logs stay in the operator's log; the events users see are the explicit ones below.
    settings.posting.level = logging.WARNING
    settings.watching.server_timeout = 300
    settings.peering.lifetime = SETTINGS.peering_lifetime  # used only with peering (several replicas)
    settings.networking.request_timeout = 60
    memo.settings = SETTINGS
    memo.api = client.ApiClient(_client_configuration())
    memo.pdb_api = _pdb_api_version(memo.api, logger)
    logger.info(
        "fleetserve operator: runtime image %s, metrics every %ss",
        SETTINGS.runtime_image,
        SETTINGS.metrics_interval,
    )


def _pdb_api_version(api: client.ApiClient, logger: logging.Logger) -> str | None:
    """policy/v1 where served (1.21+), else policy/v1beta1 (1.20), else None: no PDBs."""
    try:
        # _preload_content=False returns the raw urllib3 response; the client's annotations assume the model
        raw = client.ApisApi(api).get_api_versions(_preload_content=False)
        groups = json.loads(raw.data).get(  # type: ignore[attr-defined]
            "groups", []
        )
    except (ApiException, ValueError) as exc:
        logger.warning("API discovery failed, no PodDisruptionBudgets will be created: %s", exc)
        return None
    versions = {v.get("version") for g in groups if g.get("name") == "policy" for v in g.get("versions", [])}
    chosen = next((f"policy/{v}" for v in ("v1", "v1beta1") if v in versions), None)
    logger.info("PodDisruptionBudget API: %s", chosen or "none served")
    return chosen


@kopf.on.cleanup()
def close_client(memo: OperatorMemo, **_: Any) -> None:
    if memo.api is not None:
        memo.api.close()


@kopf.on.probe(id="watching")
def probe(memo: OperatorMemo, **_: Any) -> str:
    return memo.settings.runtime_image if memo.started else "starting"


# --- indexes: the operator's view of its children, kept current by watches ------------------------


@kopf.index("pods", labels=RUNTIME)  # type: ignore[arg-type]  # narrower kwargs: see the note above ISVC
def runtime_pods(namespace: str, labels: kopf.Labels, body: kopf.Body, **_: Any) -> dict[Any, Any]:
    return {(namespace, labels[render.ISVC_LABEL]): status_mod.pod_view(body)}


def _deployment_view(namespace: str, labels: kopf.Labels, body: kopf.Body) -> dict[Any, Any]:
    annotations = body.get("metadata", {}).get("annotations") or {}
    return {
        (namespace, labels[render.ISVC_LABEL]): {
            "metadata": {
                "name": body.metadata.name,
                "generation": body.metadata.get("generation"),
                "lastApplied": annotations.get(render.LAST_APPLIED),
            },
            "spec": dict(body.get("spec") or {}),
            "status": dict(body.get("status") or {}),
        }
    }


@kopf.index("apps", "v1", "deployments", labels=RUNTIME)  # type: ignore[arg-type]  # narrower kwargs: see the note above ISVC
def runtime_deployments(namespace: str, labels: kopf.Labels, body: kopf.Body, **_: Any) -> dict[Any, Any]:
    return _deployment_view(namespace, labels, body)


@kopf.index("apps", "v1", "deployments", labels=ROUTER)  # type: ignore[arg-type]  # narrower kwargs: see the note above ISVC
def router_deployments(namespace: str, labels: kopf.Labels, body: kopf.Body, **_: Any) -> dict[Any, Any]:
    return _deployment_view(namespace, labels, body)


@kopf.index("services", labels=RUNTIME)  # type: ignore[arg-type]  # narrower kwargs: see the note above ISVC
def runtime_services(namespace: str, labels: kopf.Labels, name: str, **_: Any) -> dict[Any, Any]:
    return {(namespace, labels[render.ISVC_LABEL]): name}


def _first(index: kopf.Index, key: Any) -> Any:
    return next(iter(index.get(key, ())), None)


# --- reconcile -------------------------------------------------------------------------------------


def _desired(
    name: str,
    namespace: str,
    spec: InferenceServiceSpec,
    body: kopf.Body,
    settings: OperatorSettings,
    pdb_api: str | None,
) -> list[dict[str, Any]]:
    children = render.render_all(name, namespace, spec, settings, pdb_api=pdb_api)
    for child in children:
        if not (child["kind"] == "PersistentVolumeClaim" and spec.modelCache.retainOnDelete):
            kopf.adopt(child, owner=body)
    return children


def _apply_children(
    name: str,
    namespace: str,
    spec: InferenceServiceSpec,
    body: kopf.Body,
    memo: OperatorMemo,
    logger: logging.Logger,
) -> list[str]:
    children = Children(memo.api)
    changed = []
    with memo.apply_lock:
        try:
            for child in _desired(name, namespace, spec, body, memo.settings, memo.pdb_api):
                outcome = apply(children, child)
                if outcome.action != "unchanged":
                    changed.append(f"{outcome.action} {outcome.kind} {outcome.name}")
                    logger.info("%s %s/%s", outcome.action, outcome.kind, outcome.name)
            if _prune_switched_off_pdb(children, name, namespace, spec, body, memo):
                changed.append(f"deleted PodDisruptionBudget {name}")
            changed += _prune_switched_off_router(children, name, namespace, spec, body, memo)
        except ApiException as exc:
            # Kept for status: Degraded=ApplyFailed until an apply succeeds.
            memo.apply_error = f"{exc.status} {exc.reason}: {_api_message(exc)}"
            raise
        memo.apply_error = None
    if changed:
        kopf.event(body, type="Normal", reason="Reconciled", message="; ".join(changed))
    return changed


def _prune_switched_off_pdb(
    children: Children,
    name: str,
    namespace: str,
    spec: InferenceServiceSpec,
    body: kopf.Body,
    memo: OperatorMemo,
) -> bool:
    """Deletes our budget after rollout.podDisruptionBudget is switched off: checked once per switch-off
    (and once after an operator start), not on every timer tick."""
    pdb_api = memo.pdb_api
    if spec.rollout.podDisruptionBudget or not pdb_api:
        memo.pdb_off_checked = False
        return False
    if memo.pdb_off_checked:
        return False
    deleted = prune_pdb(children, pdb_api, namespace, name, body.metadata.uid)
    memo.pdb_off_checked = True
    return deleted


def _prune_switched_off_router(
    children: Children,
    name: str,
    namespace: str,
    spec: InferenceServiceSpec,
    body: kopf.Body,
    memo: OperatorMemo,
) -> list[str]:
    """Deletes the router's Deployment and Service once after spec.router is switched off (and once after an
    operator start while it is off), like the budget above."""
    if spec.router_enabled():
        memo.router_off_checked = False
        return []
    if memo.router_off_checked:
        return []
    deleted = prune_router(children, namespace, name, body.metadata.uid)
    memo.router_off_checked = True
    return deleted


def _parse(body: kopf.Body) -> tuple[InferenceServiceSpec | None, str | None]:
    try:
        return parse_spec(body.get("spec")), None
    except ValidationError as exc:
        return None, describe_validation_error(exc)


def _static_status(
    name: str, namespace: str, spec: InferenceServiceSpec, settings: OperatorSettings
) -> dict[str, Any]:
    return {
        "url": render.service_url(name, namespace, settings, spec),
        "selector": render.selector_string(name),
        "model": render.model_description(spec),
    }


@kopf.on.resume(*ISVC)
@kopf.on.create(*ISVC)
@kopf.on.update(*ISVC)  # type: ignore[arg-type]  # narrower kwargs: see the note above ISVC
def reconcile(
    name: str,
    namespace: str,
    body: kopf.Body,
    meta: kopf.Meta,
    status: kopf.Status,
    memo: OperatorMemo,
    patch: kopf.Patch,
    logger: logging.Logger,
    runtime_pods: kopf.Index,
    runtime_deployments: kopf.Index,
    **_: Any,
) -> None:
    spec, error = _parse(body)
    if spec is None:
        kopf.event(body, type="Warning", reason="InvalidSpec", message=error or "invalid spec")
        _write_status(
            patch,
            status,
            _compute_status(
                name, namespace, None, error, body, memo, runtime_pods, runtime_deployments, None
            ),
            meta,
            reconciled=True,
        )
        # Children keep the last valid configuration; nothing to retry until the spec changes.
        raise kopf.PermanentError(f"invalid spec: {error}")
    try:
        _apply_children(name, namespace, spec, body, memo, logger)
    except ApiException as exc:
        message = f"applying children failed: {exc.status} {exc.reason}: {_api_message(exc)}"
        _write_status(
            patch,
            status,
            _compute_status(name, namespace, spec, None, body, memo, runtime_pods, runtime_deployments, None),
            meta,
        )
        if exc.status in (400, 422):
            # The apiserver rejects what we rendered (e.g. a field this Kubernetes version lacks): retrying
            # the same rendering cannot help; a spec change or an operator upgrade will.
            kopf.event(body, type="Warning", reason="ApplyFailed", message=message)
            raise kopf.PermanentError(message) from exc
        # Conflicts, throttling, RBAC being rolled out, an apiserver restart: try again soon.
        raise kopf.TemporaryError(message, delay=10) from exc
    patch.status.update(
        status_mod.status_fields(
            {
                **_static_status(name, namespace, spec, memo.settings),
                "desiredReplicas": spec.target_replicas(),
            }
        )
    )
    _write_status(
        patch,
        status,
        _compute_status(name, namespace, spec, None, body, memo, runtime_pods, runtime_deployments, None),
        meta,
        reconciled=True,
    )


def _api_message(exc: ApiException) -> str:
    try:
        return str(json.loads(exc.body or "{}").get("message", ""))[:300]
    except ValueError:
        return str(exc.body or "")[:300]


@kopf.on.delete(*ISVC, optional=True)  # type: ignore[arg-type]  # narrower kwargs: see the note above ISVC
def deleted(name: str, namespace: str, logger: logging.Logger, **_: Any) -> None:
    # Children carry owner references: the garbage collector removes them. Nothing to do here.
    logger.info("InferenceService %s/%s deleted; children are garbage-collected", namespace, name)


# --- observe: status, metrics, self-healing, autoscaling --------------------------------------------


def _compute_status(
    name: str,
    namespace: str,
    spec: InferenceServiceSpec | None,
    error: str | None,
    body: kopf.Body,
    memo: OperatorMemo,
    pods_index: kopf.Index,
    deployments_index: kopf.Index,
    metrics: Aggregate | None,
) -> dict[str, Any]:
    """Status fields for what the indexes and the scrape show now (a status.Observation through
    status.compute); posts the ReplicaLost / ReplicasRestored events on a transition."""
    key = (namespace, name)
    pods = tuple(pods_index.get(key, ()))
    cached_before = any(
        c.get("type") == "ModelCached" and c.get("status") == "True"
        for c in (body.get("status") or {}).get("conditions") or []
    ) and (body.get("status") or {}).get("model") == (render.model_description(spec) if spec else None)
    target = spec.target_replicas() if spec else int((body.get("spec") or {}).get("replicas") or 0)
    old_degraded = _degraded_reason((body.get("status") or {}).get("conditions"))
    obs = status_mod.Observation(
        spec=spec,
        spec_error=error,
        target_replicas=target,
        deployment=_first(deployments_index, key),
        pods=pods,
        metrics=metrics,
        model_cached_before=bool(cached_before),
        apply_error=memo.apply_error,
        previous_ready=memo.ready_pods,
        previous_degraded_reason=old_degraded,
    )
    new = status_mod.compute(obs)
    memo.ready_pods = {p.name: p.template_hash for p in pods if p.ready and not p.deleting}
    new_degraded = _degraded_reason(new["conditions"])
    if new_degraded == "ReplicaLost" and old_degraded != "ReplicaLost":
        message = next(c["message"] for c in new["conditions"] if c["type"] == "Degraded")
        kopf.event(body, type="Warning", reason="ReplicaLost", message=message)
    elif old_degraded == "ReplicaLost" and new_degraded is None:
        kopf.event(
            body,
            type="Normal",
            reason="ReplicasRestored",
            message=f"{new['readyReplicas']}/{target} replicas ready",
        )
    return new


def _degraded_reason(conditions: Any) -> str | None:
    return next(
        (
            c.get("reason")
            for c in conditions or []
            if c.get("type") == "Degraded" and c.get("status") == "True"
        ),
        None,
    )


def _write_status(
    patch: kopf.Patch, status: kopf.Status, new: dict[str, Any], meta: kopf.Meta, reconciled: bool = False
) -> None:
    """Patches only the status fields that changed: an idle service costs the apiserver no writes."""
    generation = meta.get("generation")
    new = dict(new)
    new["conditions"] = status_mod.merge_conditions(
        status.get("conditions") or [], new["conditions"], generation
    )
    if reconciled:
        new["observedGeneration"] = generation
    new = status_mod.status_fields(new)
    changed = {k: v for k, v in new.items() if k != "lastMetricsTime" and status.get(k) != v}
    if changed or _stale(status.get("lastMetricsTime")):
        patch.status.update(changed)
        if "lastMetricsTime" in new:
            patch.status["lastMetricsTime"] = new["lastMetricsTime"]


def _stale(timestamp: str | None, seconds: float = 60.0) -> bool:
    if not timestamp:
        return True
    try:
        then = datetime.datetime.strptime(timestamp, "%Y-%m-%dT%H:%M:%SZ").replace(
            tzinfo=datetime.timezone.utc
        )
    except ValueError:
        return True
    return (datetime.datetime.now(datetime.timezone.utc) - then).total_seconds() >= seconds


def _needs_apply(
    name: str,
    namespace: str,
    spec: InferenceServiceSpec,
    body: kopf.Body,
    memo: OperatorMemo,
    deployments_index: kopf.Index,
    services_index: kopf.Index,
    router_index: kopf.Index | None = None,
) -> bool:
    key = (namespace, name)
    dep = _first(deployments_index, key)
    if dep is None or _first(services_index, key) is None:
        return True
    children = _desired(name, namespace, spec, body, memo.settings, memo.pdb_api)
    wanted = [(dep, next(c for c in children if c["kind"] == "Deployment"))]
    router = next((c for c in children if c["kind"] == "Deployment" and c["metadata"]["name"] != name), None)
    if router is not None and router_index is not None:
        have = _first(router_index, key)
        if have is None:
            return True
        wanted.append((have, router))
    # Changed by us (a new rendering) or by someone else (an owned field edited in the cluster).
    return any(
        have["metadata"]["lastApplied"] != json.dumps(desired, sort_keys=True)
        or not is_subset(desired["spec"], have["spec"])
        for have, desired in wanted
    )


def _router_status(
    spec: InferenceServiceSpec | None, body: kopf.Body, key: Any, router_index: kopf.Index
) -> dict[str, Any]:
    out: dict[str, Any] = {
        "lastDemandTime": (body.get("metadata", {}).get("annotations") or {}).get(DEMAND_ANNOTATION)
    }
    router = _first(router_index, key) if spec is not None and spec.router_enabled() else None
    out["routerReadyReplicas"] = int(router["status"].get("readyReplicas") or 0) if router else None
    return {k: v for k, v in out.items() if v is not None}


def _demand(body: kopf.Body, settings: OperatorSettings) -> bool:
    stamp = (body.get("metadata", {}).get("annotations") or {}).get(DEMAND_ANNOTATION)
    return autoscaler.demand_is_current(stamp, time.time(), settings.demand_ttl)


async def _scale(
    name: str,
    namespace: str,
    body: kopf.Body,
    memo: OperatorMemo,
    decision: autoscaler.Decision,
    logger: logging.Logger,
) -> None:
    api = client.CustomObjectsApi(memo.api)
    await asyncio.to_thread(
        api.patch_namespaced_custom_object_scale,
        GROUP,
        VERSION,
        namespace,
        PLURAL,
        name,
        {"spec": {"replicas": decision.desired}},
        _content_type=MERGE_PATCH,
        _preload_content=False,
    )
    direction = "ScaledUp" if decision.desired > decision.current else "ScaledDown"
    message = f"replicas {decision.current} -> {decision.desired}: {decision.reason}"
    logger.info("%s: %s", direction, message)
    kopf.event(body, type="Normal", reason=direction, message=message)


@kopf.on.field(*ISVC, field=("metadata", "annotations", DEMAND_ANNOTATION))  # type: ignore[arg-type]  # narrower kwargs: see the note above ISVC
async def demand_signalled(
    name: str, namespace: str, body: kopf.Body, memo: OperatorMemo, logger: logging.Logger, **_: Any
) -> None:
    """The router holds requests while there is no replica and says so in an annotation: scale up from zero
    now instead of at the next timer tick (the timer checks the same, should this event be missed)."""
    spec, _error = _parse(body)
    if spec is None or not spec.autoscaling.enabled or not _demand(body, memo.settings):
        return
    decision = autoscaler.wake_from_zero(spec.replicas, spec.autoscaling, demand=True)
    generation = body.metadata.get("generation")
    if decision is None or memo.woken_from_generation == generation:
        return
    # Claimed before the patch, with no await in between: the timer runs concurrently (it may tick while
    # the patch is in flight, or later with the body of before the scale) and must not wake (and
    # announce) it again.
    before, memo.woken_from_generation = memo.woken_from_generation, generation
    try:
        await _scale(name, namespace, body, memo, decision, logger)
    except BaseException:
        memo.woken_from_generation = before
        raise
    autoscaler.record_change(memo.history, time.monotonic())


@kopf.timer(*ISVC, interval=SETTINGS.metrics_interval, initial_delay=min(SETTINGS.metrics_interval, 5.0))  # type: ignore[arg-type]  # narrower kwargs: see the note above ISVC
async def observe(
    name: str,
    namespace: str,
    body: kopf.Body,
    meta: kopf.Meta,
    status: kopf.Status,
    memo: OperatorMemo,
    patch: kopf.Patch,
    logger: logging.Logger,
    runtime_pods: kopf.Index,
    runtime_deployments: kopf.Index,
    runtime_services: kopf.Index,
    router_deployments: kopf.Index,
    **_: Any,
) -> None:
    settings = memo.settings
    spec, error = _parse(body)
    if spec is not None and await asyncio.to_thread(
        _needs_apply,
        name,
        namespace,
        spec,
        body,
        memo,
        runtime_deployments,
        runtime_services,
        router_deployments,
    ):
        # A child was deleted or edited behind our back: put it back.
        try:
            await asyncio.to_thread(_apply_children, name, namespace, spec, body, memo, logger)
        except ApiException as exc:
            logger.warning(
                "restoring children failed (next tick retries): %s %s", exc.status, _api_message(exc)
            )

    pods = tuple(runtime_pods.get((namespace, name), ()))
    targets = {p.name: p.metrics_url for p in pods if p.ready and p.ip and not p.deleting}
    metrics = await scrape_all(targets, memo.rates, settings.metrics_timeout)
    new = _compute_status(
        name, namespace, spec, error, body, memo, runtime_pods, runtime_deployments, metrics
    )
    if metrics is not None:
        new["lastMetricsTime"] = status_mod.now_iso()

    new.update(_router_status(spec, body, (namespace, name), router_deployments))
    if spec is not None:
        new.update(_static_status(name, namespace, spec, settings))
        new["desiredReplicas"] = spec.target_replicas()
        if spec.autoscaling.enabled:
            history = memo.history
            now = time.monotonic()
            decision = autoscaler.decide(
                now,
                spec.replicas,
                metrics.waiting if metrics else 0.0,
                metrics.running if metrics else 0.0,
                spec.autoscaling,
                history,
                load_known=metrics is not None,
                demand=_demand(body, settings),
            )
            new["desiredReplicas"] = decision.desired
            if decision.current == 0 and memo.woken_from_generation == meta.get("generation"):
                decision = autoscaler.Decision(0, decision.recommended, 0, "already scaling up from zero")
            if decision.changes:
                before = memo.woken_from_generation
                if decision.current == 0:  # claimed before the patch, as demand_signalled does
                    memo.woken_from_generation = meta.get("generation")
                try:
                    await _scale(name, namespace, body, memo, decision, logger)
                except ApiException as exc:  # e.g. a conflicting writer: decide again next tick
                    memo.woken_from_generation = before
                    logger.warning(
                        "scaling to %d failed: %s %s", decision.desired, exc.status, _api_message(exc)
                    )
                else:
                    autoscaler.record_change(history, now)
                    new["lastScaleTime"] = status_mod.now_iso()
    _write_status(patch, status, new, meta)
