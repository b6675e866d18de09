"""`kubectl explain inferenceservice.spec` (and every level below, and .status) has a description for every
field: checked on the generated CRD in crds/ and on the chart's copy, by walking their OpenAPI schemas the
way kubectl explain does (properties, list items, map values)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
CRD_FILES = [
    ROOT / "crds" / "serving.fleetserve.dev_inferenceservices.yaml",
    ROOT / "charts" / "fleetserve" / "crds" / "serving.fleetserve.dev_inferenceservices.yaml",
]


def _walk(node: dict, path: str):
    yield path, node
    for name, sub in (node.get("properties") or {}).items():
        yield from _walk(sub, f"{path}.{name}")
    if isinstance(node.get("items"), dict):
        yield from _walk(node["items"], f"{path}[]")
    if isinstance(node.get("additionalProperties"), dict):
        yield from _walk(node["additionalProperties"], f"{path}{{}}")


def explain(schema: dict, path: str) -> list[tuple[str, str]]:
    """(field, first description line) as `kubectl explain <path>` lists FIELDS."""
    node = schema
    for part in path.split(".")[1:]:
        node = node["properties"][part]
        node = node.get("items", node) if node.get("type") == "array" else node
    return [
        (name, (sub.get("description") or "").splitlines()[0] if sub.get("description") else "")
        for name, sub in (node.get("properties") or {}).items()
    ]


@pytest.mark.parametrize("path", CRD_FILES, ids=["crds", "chart"])
def test_every_field_has_a_description(path):
    crd = yaml.safe_load(path.read_text())
    schema = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    nodes = list(_walk(schema, "inferenceservice"))
    assert len(nodes) > 80  # the whole tree was walked
    # metadata is the one exception: the apiserver refuses any key but `type` on it ("must not specify anything
    # other than name and generateName", seen on Kubernetes 1.20), and kubectl explain shows ObjectMeta's docs.
    assert schema["properties"]["metadata"] == {"type": "object"}
    missing = [
        p for p, n in nodes if p != "inferenceservice.metadata" and not (n.get("description") or "").strip()
    ]
    assert not missing, missing
    fields = explain(schema, "inferenceservice.spec")
    assert {"model", "engine", "autoscaling", "resources", "scheduling"} <= {f for f, _ in fields}
    assert all(d for _, d in fields), fields
    for nested in (
        "inferenceservice.spec.engine",
        "inferenceservice.spec.scheduling.tolerations",
        "inferenceservice.status.conditions",
    ):
        assert all(d for _, d in explain(schema, nested)), nested
