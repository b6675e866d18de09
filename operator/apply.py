"""Create-or-patch of the operator's child objects through the kubernetes client.

Owns the rule for changing a child: create it when missing; otherwise patch it
with a JSON merge patch only when the rendered manifest differs from what was last
applied (kept in an annotation, as `kubectl apply` does) or when someone changed
an owned field in the cluster. Keys dropped from the rendered manifest are sent as
null, so they are removed. Objects are never deleted and recreated, so an update
of engine arguments rolls the Deployment instead of replacing it.

Objects are handled as plain dicts (`_preload_content=False`): the operator does
not depend on the client's model classes matching the server's version.
"""

from __future__ import annotations

import copy
import json
import re
from dataclasses import dataclass
from typing import Any

from kubernetes import client
from kubernetes.client.exceptions import ApiException

from fleetserve.operator.render import LAST_APPLIED

MERGE_PATCH = "application/merge-patch+json"
PDBS = "poddisruptionbudgets"


@dataclass(frozen=True)
class Outcome:
    kind: str
    name: str
    action: str
    """created, patched or unchanged."""


def _json(resp: Any) -> dict[str, Any]:
    return json.loads(resp.data)


class Children:
    """get / create / merge-patch of the operator's children, as dicts.

    Deployments, Services and PVCs go through the typed clients; PodDisruptionBudgets through the
    generic group/version client, because the cluster may serve policy/v1 or (before 1.21) only
    policy/v1beta1, whatever model classes this client version ships.
    """

    def __init__(self, api_client: client.ApiClient):
        self.core = client.CoreV1Api(api_client)
        self.apps = client.AppsV1Api(api_client)
        self.generic = client.CustomObjectsApi(api_client)
        self.rbac = client.RbacAuthorizationV1Api(api_client)

    def _ops(self, kind: str, api_version: str) -> tuple[Any, Any, Any]:
        # get, create, patch: the verbs the chart's RBAC grants on children. Children are not deleted by the
        # operator (owner references let the garbage collector do it), except a PDB or router switched off.
        if kind == "PodDisruptionBudget":
            group, version = api_version.split("/")
            g = self.generic
            return (
                lambda name, ns, **kw: g.get_namespaced_custom_object(group, version, ns, PDBS, name, **kw),
                lambda ns, body, **kw: g.create_namespaced_custom_object(
                    group, version, ns, PDBS, body, **kw
                ),
                lambda name, ns, body, **kw: g.patch_namespaced_custom_object(
                    group, version, ns, PDBS, name, body, **kw
                ),
            )
        ops = {
            "Deployment": (
                self.apps.read_namespaced_deployment,
                self.apps.create_namespaced_deployment,
                self.apps.patch_namespaced_deployment,
            ),
            "Service": (
                self.core.read_namespaced_service,
                self.core.create_namespaced_service,
                self.core.patch_namespaced_service,
            ),
            "PersistentVolumeClaim": (
                self.core.read_namespaced_persistent_volume_claim,
                self.core.create_namespaced_persistent_volume_claim,
                self.core.patch_namespaced_persistent_volume_claim,
            ),
            # The router's identity (render.render_router_rbac).
            "ServiceAccount": (
                self.core.read_namespaced_service_account,
                self.core.create_namespaced_service_account,
                self.core.patch_namespaced_service_account,
            ),
            "Role": (
                self.rbac.read_namespaced_role,
                self.rbac.create_namespaced_role,
                self.rbac.patch_namespaced_role,
            ),
            "RoleBinding": (
                self.rbac.read_namespaced_role_binding,
                self.rbac.create_namespaced_role_binding,
                self.rbac.patch_namespaced_role_binding,
            ),
        }
        return ops[kind]

    def read(self, obj: dict[str, Any]) -> dict[str, Any] | None:
        meta = obj["metadata"]
        try:
            return _json(
                self._ops(obj["kind"], obj["apiVersion"])[0](
                    meta["name"], meta["namespace"], _preload_content=False
                )
            )
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise

    def create(self, obj: dict[str, Any]) -> dict[str, Any]:
        return _json(
            self._ops(obj["kind"], obj["apiVersion"])[1](
                obj["metadata"]["namespace"], obj, _preload_content=False
            )
        )

    def delete_pdb(self, api_version: str, namespace: str, name: str) -> None:
        """The one child the operator deletes itself: a budget switched off (the others live as long as the owner)."""
        group, version = api_version.split("/")
        try:
            self.generic.delete_namespaced_custom_object(
                group, version, namespace, PDBS, name, _preload_content=False
            )
        except ApiException as exc:
            if exc.status != 404:
                raise

    def delete(self, kind: str, namespace: str, name: str) -> None:
        """Deletes a router Deployment or Service after spec.router was switched off (404 is fine)."""
        op = {
            "Deployment": self.apps.delete_namespaced_deployment,
            "Service": self.core.delete_namespaced_service,
        }[kind]
        try:
            op(name, namespace, _preload_content=False)
        except ApiException as exc:
            if exc.status != 404:
                raise

    def patch(self, obj: dict[str, Any], patch: dict[str, Any]) -> dict[str, Any]:
        meta = obj["metadata"]
        return _json(
            self._ops(obj["kind"], obj["apiVersion"])[2](
                meta["name"], meta["namespace"], patch, _preload_content=False, _content_type=MERGE_PATCH
            )
        )


def apply(children: Children, desired: dict[str, Any]) -> Outcome:
    kind, meta = desired["kind"], desired["metadata"]
    target = {"kind": kind, "apiVersion": desired["apiVersion"], "metadata": meta}
    desired = copy.deepcopy(desired)
    desired_core = copy.deepcopy(desired)  # without the annotation that records it
    desired["metadata"].setdefault("annotations", {})[LAST_APPLIED] = json.dumps(desired_core, sort_keys=True)

    existing = children.read(desired)
    if existing is None:
        try:
            children.create(desired)
            return Outcome(kind, meta["name"], "created")
        except ApiException as exc:
            if exc.status != 409:
                raise
            # Created meanwhile (e.g. a previous operator's request completed late): patch it instead.
            existing = children.read(desired) or {}

    last = _last_applied(existing)
    if kind == "PersistentVolumeClaim":
        # A claim's spec is immutable once bound: only labels and owner references are kept in line.
        desired_core = {"metadata": desired_core["metadata"]}
        desired = {"metadata": desired["metadata"]}
        last = {"metadata": last.get("metadata")} if last else None
    if last == desired_core and is_subset(desired_core, existing):
        return Outcome(kind, meta["name"], "unchanged")
    patch = merge(desired, removals(last or {}, desired_core))
    patch.pop("apiVersion", None), patch.pop("kind", None)
    patch["metadata"].pop("name", None), patch["metadata"].pop("namespace", None)
    children.patch(target, patch)
    return Outcome(kind, meta["name"], "patched")


def prune_pdb(children: Children, api_version: str, namespace: str, name: str, owner_uid: str) -> bool:
    """Deletes the service's PodDisruptionBudget if it exists and is ours; True when one was deleted."""
    existing = children.read(
        {
            "kind": "PodDisruptionBudget",
            "apiVersion": api_version,
            "metadata": {"name": name, "namespace": namespace},
        }
    )
    refs = (existing or {}).get("metadata", {}).get("ownerReferences") or []
    if not any(r.get("uid") == owner_uid for r in refs):
        return False
    children.delete_pdb(api_version, namespace, name)
    return True


def prune_router(children: Children, namespace: str, name: str, owner_uid: str) -> list[str]:
    """Deletes the router's Deployment and Service where they exist and are ours (spec.router switched off).
    Its ServiceAccount, Role and RoleBinding stay, inert, until the InferenceService is deleted."""
    deleted = []
    for kind, api_version in (("Deployment", "apps/v1"), ("Service", "v1")):
        router = f"{name}-router"
        existing = children.read(
            {"kind": kind, "apiVersion": api_version, "metadata": {"name": router, "namespace": namespace}}
        )
        refs = (existing or {}).get("metadata", {}).get("ownerReferences") or []
        if any(r.get("uid") == owner_uid for r in refs):
            children.delete(kind, namespace, router)
            deleted.append(f"deleted {kind} {router}")
    return deleted


def _last_applied(obj: dict[str, Any]) -> dict[str, Any] | None:
    raw = (obj.get("metadata", {}).get("annotations") or {}).get(LAST_APPLIED)
    try:
        return json.loads(raw) if raw else None
    except ValueError:
        return None


def removals(old: Any, new: Any) -> dict[str, Any]:
    """A merge patch fragment that nulls the keys `old` had and `new` dropped (lists are replaced whole)."""
    if not isinstance(old, dict) or not isinstance(new, dict):
        return {}
    out: dict[str, Any] = {}
    for key, value in old.items():
        if key not in new:
            out[key] = None
        elif isinstance(value, dict) and isinstance(new[key], dict):
            sub = removals(value, new[key])
            if sub:
                out[key] = sub
    return out


def merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = value
    return out


_QUANTITY = re.compile(r"^([0-9.]+)([a-zA-Z]*)$")
_SUFFIX = {
    "": 1,
    "m": 1e-3,
    "k": 1e3,
    "M": 1e6,
    "G": 1e9,
    "T": 1e12,
    "P": 1e15,
    "E": 1e18,
    "Ki": 2**10,
    "Mi": 2**20,
    "Gi": 2**30,
    "Ti": 2**40,
    "Pi": 2**50,
    "Ei": 2**60,
}


def _quantity(value: str) -> float | None:
    m = _QUANTITY.match(value)
    if not m or m.group(2) not in _SUFFIX:
        return None
    try:
        return float(m.group(1)) * _SUFFIX[m.group(2)]
    except ValueError:
        return None


def is_subset(want: Any, have: Any) -> bool:
    """Whether every field of `want` is present and equal in `have` (server-side defaults are ignored).

    Quantities compare by value: the apiserver rewrites "1000m" as "1".
    """
    if isinstance(want, dict):
        return isinstance(have, dict) and all(k in have and is_subset(v, have[k]) for k, v in want.items())
    if isinstance(want, list):
        return isinstance(have, list) and len(want) == len(have) and all(map(is_subset, want, have))
    if want == have:
        return True
    if isinstance(want, str) and isinstance(have, str):
        a, b = _quantity(want), _quantity(have)
        return a is not None and a == b
    return str(want) == str(have) if isinstance(want, (int, str)) and isinstance(have, (int, str)) else False
