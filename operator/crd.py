"""Generates the InferenceService CustomResourceDefinition from the pydantic models in spec.py.

Owns the translation from pydantic's JSON Schema to a Kubernetes *structural*
OpenAPI v3 schema: `$ref`s inlined, `Optional[X]` collapsed to X, no titles,
no `additionalProperties: false` (the apiserver prunes unknown fields instead),
numeric `exclusiveMinimum` turned into OpenAPI 3.0's boolean form, and `default: {}`
on nested objects so the apiserver fills in every nested default.

`python -m fleetserve.operator.crd [PATH]` writes the YAML (default: print it);
tests check that crds/ holds exactly what this produces.
"""

from __future__ import annotations

import copy
import sys
from typing import Any

import yaml
from pydantic import BaseModel

from fleetserve.operator import spec as api

CRD_FILE = "crds/serving.fleetserve.dev_inferenceservices.yaml"
_DROP = {"title", "additionalProperties", "$defs"}


def _structural(node: dict[str, Any], defs: dict[str, Any]) -> dict[str, Any]:
    node = copy.deepcopy(node)
    if "$ref" in node:
        target = defs[node.pop("$ref").split("/")[-1]]
        merged = {**_structural(target, defs), **{k: v for k, v in node.items() if k != "description"}}
        if "description" in node:
            merged["description"] = node["description"]
        return _structural_after_ref(merged, defs)
    if "anyOf" in node:
        variants = [v for v in node.pop("anyOf") if v.get("type") != "null"]
        if len(variants) != 1:
            raise ValueError(f"cannot express a union in a structural schema: {variants}")
        inner = _structural(variants[0], defs)
        inner.update({k: v for k, v in node.items() if k not in _DROP})
        node = inner
    return _structural_after_ref(node, defs)


def _structural_after_ref(node: dict[str, Any], defs: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in node.items():
        if key in _DROP and not (key == "additionalProperties" and isinstance(value, dict)):
            continue
        if key == "default" and value is None:
            continue
        if key == "exclusiveMinimum" and not isinstance(value, bool):
            out["minimum"], out["exclusiveMinimum"] = value, True
        elif key == "properties":
            out["properties"] = {name: _structural(sub, defs) for name, sub in value.items()}
        elif key in ("items", "additionalProperties"):
            out[key] = _structural(value, defs)
        elif key == "description":
            out[key] = " ".join(value.split())
        else:
            out[key] = value
    if out.get("x-kubernetes-preserve-unknown-fields"):
        out["type"] = "object"
        out.pop("additionalProperties", None)
    if out.get("type") == "object" and "properties" in out:
        # Nested objects default to {} so the apiserver applies the defaults inside them.
        for sub in out["properties"].values():
            if (
                sub.get("type") == "object"
                and "properties" in sub
                and "default" not in sub
                and _has_defaults(sub)
            ):
                sub["default"] = {}
    # type and description first: easier to read in the generated YAML.
    return {k: out[k] for k in sorted(out, key=lambda k: (k != "type", k != "description"))}


def _has_defaults(node: dict[str, Any]) -> bool:
    return any("default" in sub or _has_defaults(sub) for sub in node.get("properties", {}).values())


def _describe_elements(node: dict[str, Any]) -> None:
    # `kubectl explain` shows list items and map values too: give plain ones a description from their field.
    for name, sub in node.get("properties", {}).items():
        items = sub.get("items")
        if isinstance(items, dict) and not items.get("description"):
            items["description"] = f"One entry of {name}."
        values = sub.get("additionalProperties")
        if isinstance(values, dict) and not values.get("description"):
            values["description"] = f"The value of one key of {name}."
        for child in (sub, items, values):
            if isinstance(child, dict):
                _describe_elements(child)


def openapi_schema(model: type[BaseModel]) -> dict[str, Any]:
    raw = model.model_json_schema()
    schema = _structural(raw, raw.get("$defs", {}))
    schema.pop("description", None)
    _describe_elements(schema)
    return schema


def build_crd() -> dict[str, Any]:
    spec_schema = openapi_schema(api.InferenceServiceSpec)
    spec_schema["description"] = "Desired state: the model to serve and how to run it."
    spec_schema["default"] = {}
    status_schema = openapi_schema(api.InferenceServiceStatus)
    status_schema["description"] = "Observed state, written by the operator."
    root = {
        "type": "object",
        "description": "An LLM served by fleetserve runtime pods, scaled on queue depth.",
        "properties": {
            "apiVersion": {
                "type": "string",
                "description": f"The versioned schema of this object: {api.GROUP}/{api.VERSION}.",
            },
            "kind": {
                "type": "string",
                "description": f"The REST resource this object represents: {api.KIND}.",
            },
            # The apiserver allows nothing but the type here (no description): kubectl explain shows ObjectMeta's own.
            "metadata": {"type": "object"},
            "spec": spec_schema,
            "status": status_schema,
        },
    }
    columns = [
        {"name": "Model", "type": "string", "jsonPath": ".status.model"},
        {"name": "Replicas", "type": "integer", "jsonPath": ".status.replicas"},
        {"name": "Ready", "type": "integer", "jsonPath": ".status.readyReplicas"},
        {"name": "Queue", "type": "integer", "jsonPath": ".status.queueDepth"},
        {"name": "Phase", "type": "string", "jsonPath": ".status.phase"},
        {"name": "URL", "type": "string", "jsonPath": ".status.url", "priority": 1},
        {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
    ]
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {
            "name": f"{api.PLURAL}.{api.GROUP}",
            "labels": {"app.kubernetes.io/name": "fleetserve", "app.kubernetes.io/component": "crd"},
        },
        "spec": {
            "group": api.GROUP,
            "scope": "Namespaced",
            "names": {
                "kind": api.KIND,
                "listKind": f"{api.KIND}List",
                "plural": api.PLURAL,
                "singular": api.SINGULAR,
                "shortNames": list(api.SHORT_NAMES),
                "categories": ["fleetserve"],
            },
            "versions": [
                {
                    "name": api.VERSION,
                    "served": True,
                    "storage": True,
                    "schema": {"openAPIV3Schema": root},
                    "subresources": {
                        "status": {},
                        "scale": {
                            "specReplicasPath": ".spec.replicas",
                            "statusReplicasPath": ".status.replicas",
                            "labelSelectorPath": ".status.selector",
                        },
                    },
                    "additionalPrinterColumns": columns,
                }
            ],
        },
    }


def render_yaml() -> str:
    header = (
        "# Generated by `python -m fleetserve.operator.crd` from operator/spec.py: do not edit by hand.\n"
    )
    return header + yaml.safe_dump(build_crd(), sort_keys=False, width=120)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    text = render_yaml()
    if argv:
        with open(argv[0], "w") as fh:
            fh.write(text)
    else:
        sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
