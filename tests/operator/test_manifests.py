"""Offline checks of everything the operator renders, the CRD and the examples.

- every manifest rendered for the examples and a spread of specs validates with
  kubernetes-validate --strict for Kubernetes 1.25 and the newest schema it ships,
  and uses only API versions a 1.20 apiserver serves;
- the CRD in crds/ is exactly what spec.py generates, is structural, and validates
  as apiextensions.k8s.io/v1;
- example CRs validate against the CRD's own schema; bad specs are rejected by it.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml

from fleetserve.operator import crd, render
from fleetserve.operator.settings import OperatorSettings
from fleetserve.operator.spec import parse_spec

ROOT = Path(__file__).resolve().parents[2]
K8S_VERSIONS = ["1.25", kubernetes_validate.latest_version()]
# APIs served by Kubernetes 1.20 and still by current releases.
APIS_ON_1_20 = {"v1", "apps/v1", "policy/v1beta1", "rbac.authorization.k8s.io/v1", "apiextensions.k8s.io/v1"}

SPECS: dict[str, dict[str, Any]] = {
    "defaults": {},
    "hf-gpu-everything": {
        "model": {"uri": "hf://org/model@v1.0", "servedModelName": "m"},
        "image": "registry.local/fleetserve-runtime:1",
        "imagePullPolicy": "Always",
        "imagePullSecrets": ["regcred"],
        "engine": {
            "dtype": "bfloat16",
            "maxModelLen": 8192,
            "maxNumSeqs": 64,
            "maxNumBatchedTokens": 4096,
            "blockSize": 16,
            "enablePrefixCaching": False,
            "gpuMemoryUtilization": 0.85,
            "extraArgs": ["--seed", "0"],
        },
        "resources": {"gpus": 2, "cpu": "8", "memory": "64Gi", "shmSize": "4Gi"},
        "scheduling": {
            "nodeSelector": {"gpu": "h100"},
            "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
            "affinity": {
                "nodeAffinity": {
                    "requiredDuringSchedulingIgnoredDuringExecution": {
                        "nodeSelectorTerms": [
                            {"matchExpressions": [{"key": "zone", "operator": "In", "values": ["a"]}]}
                        ]
                    }
                }
            },
            "priorityClassName": "high",
            "runtimeClassName": "nvidia",
        },
        "modelCache": {"size": "100Gi", "storageClassName": "fast", "accessMode": "ReadWriteMany"},
        "secrets": {"hfToken": {"name": "hf", "key": "token"}, "apiKey": {"name": "api", "key": "key"}},
        "replicas": 2,
        "autoscaling": {"minReplicas": 1, "maxReplicas": 8},
        "rollout": {"strategy": "RollingUpdate", "maxSurge": "25%", "maxUnavailable": "1"},
    },
    "hf-gguf-recreate": {
        "model": {"uri": "hf://org/model-GGUF", "ggufFile": "model.Q4_K_M.gguf"},
        "rollout": {"strategy": "Recreate", "preStopSleepSeconds": 0},
    },
    "hf-no-cache": {"model": {"uri": "hf://org/model"}, "modelCache": {"enabled": False}},
    "pvc-source": {"model": {"uri": "pvc://weights/llama/8b"}},
    # Tensor parallelism: ranks from the GPU count, or fewer by override; /dev/shm sized per rank.
    "gpu-tensor-parallel": {"resources": {"gpus": 4, "memory": "64Gi"}},
    "gpu-tensor-parallel-override": {
        "resources": {"gpus": 4, "memory": "64Gi"},
        "engine": {"tensorParallelSize": 2},
    },
    "file-gguf": {"model": {"uri": "file:///opt/models/tiny.gguf"}},
    "scale-to-zero-router": {
        "replicas": 0,
        "autoscaling": {"minReplicas": 0, "maxReplicas": 4, "scaleToZero": True},
        "router": {
            "replicas": 2,
            "queueTimeoutSeconds": 60,
            "maxQueuedRequests": 10,
            "resources": {"cpu": "200m", "memory": "128Mi"},
        },
    },
}


def _examples() -> list[dict[str, Any]]:
    docs = []
    for path in sorted((ROOT / "examples").glob("*.yaml")):
        docs += [d for d in yaml.safe_load_all(path.read_text()) if d]
    return docs


def _example_crs() -> list[dict[str, Any]]:
    return [d for d in _examples() if d["kind"] == "InferenceService"]


def _rendered(pdb_api: str = "policy/v1") -> list[tuple[str, dict[str, Any]]]:
    settings = OperatorSettings()
    out = []
    for label, raw in SPECS.items():
        out += [
            (f"{label}:{o['kind']}", o)
            for o in render.render_all("svc", "ns", parse_spec(raw), settings, pdb_api=pdb_api)
        ]
    for cr in _example_crs():
        name = cr["metadata"]["name"]
        out += [
            (f"{name}:{o['kind']}", o)
            for o in render.render_all(name, "default", parse_spec(cr["spec"]), settings, pdb_api=pdb_api)
        ]
    return out


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_rendered_manifests_validate_strict(version):
    rendered = _rendered()
    assert len(rendered) > 20
    for label, obj in rendered:
        try:
            kubernetes_validate.validate(obj, version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            raise AssertionError(f"{label} invalid for {version}: {exc.message} at {list(exc.path)}") from exc


def test_rendered_manifests_use_apis_served_by_1_20():
    """On 1.20 discovery finds policy/v1beta1 only; the PDB is otherwise the same object."""
    old, new = _rendered(pdb_api="policy/v1beta1"), _rendered()
    assert {obj["apiVersion"] for _, obj in old} <= APIS_ON_1_20
    for (_, a), (_, b) in zip(old, new):
        assert {**a, "apiVersion": None} == {**b, "apiVersion": None}
    assert "PodDisruptionBudget" in {obj["kind"] for _, obj in new}


def test_example_native_objects_validate_strict():
    for version in K8S_VERSIONS:
        for obj in _examples():
            if obj["kind"] != "InferenceService":
                kubernetes_validate.validate(obj, version, strict=True)


# --- the CRD -------------------------------------------------------------------------------------------


def _crd() -> dict[str, Any]:
    return yaml.safe_load((ROOT / crd.CRD_FILE).read_text())


def test_crd_file_is_generated_from_spec_models():
    assert (ROOT / crd.CRD_FILE).read_text() == crd.render_yaml(), (
        "crds/ is stale: run `python -m fleetserve.operator.crd crds/serving.fleetserve.dev_inferenceservices.yaml`"
    )


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_crd_validates_as_apiextensions_v1(version):
    kubernetes_validate.validate(_crd(), version, strict=True)


def _walk(node: dict[str, Any], path: str):
    yield path, node
    for name, sub in (node.get("properties") or {}).items():
        yield from _walk(sub, f"{path}.{name}")
    if isinstance(node.get("items"), dict):
        yield from _walk(node["items"], f"{path}[]")
    if isinstance(node.get("additionalProperties"), dict):
        yield from _walk(node["additionalProperties"], f"{path}{{}}")


def test_crd_schema_is_structural():
    schema = _crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    for path, node in _walk(schema, ""):
        assert "type" in node or node.get("x-kubernetes-int-or-string"), f"{path} has no type"
        assert not {"$ref", "anyOf", "oneOf", "allOf", "title", "$defs"} & set(node), path
        if node.get("type") == "object" and "properties" in node:
            assert "additionalProperties" not in node, path
        if node.get("default") is not None and "type" in node:
            jsonschema.Draft4Validator(node).validate(node["default"])


def test_crd_subresources_columns_and_names():
    crd_obj = _crd()
    version = crd_obj["spec"]["versions"][0]
    assert crd_obj["spec"]["group"] == "serving.fleetserve.dev" and version["name"] == "v1alpha1"
    assert crd_obj["spec"]["scope"] == "Namespaced"
    assert version["subresources"]["scale"] == {
        "specReplicasPath": ".spec.replicas",
        "statusReplicasPath": ".status.replicas",
        "labelSelectorPath": ".status.selector",
    }
    assert "status" in version["subresources"]
    assert {c["name"] for c in version["additionalPrinterColumns"]} >= {
        "Model",
        "Replicas",
        "Ready",
        "Queue",
        "URL",
        "Age",
    }
    assert crd_obj["spec"]["names"]["shortNames"]
    status = version["schema"]["openAPIV3Schema"]["properties"]["status"]["properties"]
    assert {"conditions", "phase", "queueDepth", "kvCacheUsage", "observedGeneration", "url"} <= set(status)


def _spec_validator() -> jsonschema.Draft4Validator:
    # OpenAPI v3.0 schemas use draft-4 style booleans for exclusiveMinimum.
    schema = _crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    return jsonschema.Draft4Validator(schema)


def test_example_crs_validate_against_crd_schema_and_models():
    validator = _spec_validator()
    crs = _example_crs()
    assert len(crs) >= 4
    for cr in crs:
        errors = [e.message for e in validator.iter_errors(cr)]
        assert not errors, (cr["metadata"]["name"], errors)
        parse_spec(cr["spec"])  # and the operator accepts them


@pytest.mark.parametrize(
    "bad",
    [
        {"resources": {"gpus": -1}},
        {"model": {"uri": "s3://bucket/model"}},
        {"model": {"uri": "hf://just-a-name"}},
        {"model": {"uri": "pvc://Bad_Claim/x"}},
        {"engine": {"dtype": "int8"}},
        {"engine": {"gpuMemoryUtilization": 1.5}},
        {"engine": {"tensorParallelSize": 0}},
        {"engine": {"tensorParallelSize": 65}},
        {"autoscaling": {"targetQueueDepth": 0}},
        {"autoscaling": {"minReplicas": -1}},
        {"resources": {"memory": "lots"}},
        {"modelCache": {"accessMode": "ReadOnlyMany"}},
    ],
)
def test_crd_schema_rejects_bad_specs(bad):
    cr = {
        "apiVersion": "serving.fleetserve.dev/v1alpha1",
        "kind": "InferenceService",
        "metadata": {"name": "x"},
        "spec": bad,
    }
    assert list(_spec_validator().iter_errors(cr)), bad
    with pytest.raises(ValueError):
        parse_spec(bad)


def test_min_above_max_passes_the_schema_but_not_the_operator():
    spec = {"autoscaling": {"minReplicas": 3, "maxReplicas": 1}}
    cr = {
        "apiVersion": "serving.fleetserve.dev/v1alpha1",
        "kind": "InferenceService",
        "metadata": {"name": "x"},
        "spec": spec,
    }
    assert not list(_spec_validator().iter_errors(cr))
    with pytest.raises(ValueError, match="greater than maxReplicas"):
        parse_spec(spec)


def test_schema_defaults_match_model_defaults():
    """What the apiserver fills in (CRD defaults) is what the operator assumes when a field is absent."""
    schema = _crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]

    def apply_defaults(node: dict[str, Any], value: Any) -> Any:
        if node.get("type") != "object" or not isinstance(value, dict):
            return value
        value = copy.deepcopy(value)
        for name, sub in (node.get("properties") or {}).items():
            if name not in value and "default" in sub:
                value[name] = copy.deepcopy(sub["default"])
            if name in value:
                value[name] = apply_defaults(sub, value[name])
        return value

    defaulted = apply_defaults(schema, {})
    assert parse_spec(defaulted) == parse_spec({})
    assert defaulted["model"]["uri"] == "embedded" and defaulted["autoscaling"]["targetQueueDepth"] == 5


def test_keda_example_targets_the_scale_subresource_of_a_cr_with_autoscaling_off():
    docs = [
        d for d in yaml.safe_load_all((ROOT / "examples" / "keda" / "llama-1b-keda.yaml").read_text()) if d
    ]
    cr = next(d for d in docs if d["kind"] == "InferenceService")
    scaled = next(d for d in docs if d["kind"] == "ScaledObject")
    assert not list(_spec_validator().iter_errors(cr))
    assert parse_spec(cr["spec"]).autoscaling.enabled is False  # one autoscaler at a time
    ref = scaled["spec"]["scaleTargetRef"]
    assert (ref["apiVersion"], ref["kind"], ref["name"]) == (
        cr["apiVersion"],
        cr["kind"],
        cr["metadata"]["name"],
    )
    query = scaled["spec"]["triggers"][0]["metadata"]["query"]
    assert "vllm:num_requests_waiting" in query and f'model_name="{cr["metadata"]["name"]}"' in query
    assert "scale" in _crd()["spec"]["versions"][0]["subresources"]
