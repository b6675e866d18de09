"""A runtime that fails at start-up says why in its termination message (what Kubernetes shows in the pod's
status and the operator copies into the InferenceService's conditions): the file named by
$FLEETSERVE_TERMINATION_LOG here, /dev/termination-log in a pod."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest


def _serve(tmp_path, *args):
    log = tmp_path / "termination-log"
    env = dict(os.environ, FLEETSERVE_TERMINATION_LOG=str(log))
    proc = subprocess.run(
        [sys.executable, "-m", "fleetserve.runtime.cli", "serve", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    return proc, (log.read_text() if log.exists() else None)


@pytest.mark.parametrize("mode", ["--engine-process", "--no-engine-process"])
def test_bad_model_path_is_the_termination_message(tmp_path, mode):
    """The spawned engine core fails to start (EngineStartError), or the in-thread load fails: same message."""
    proc, message = _serve(tmp_path, "/models/nope", "--port", "0", mode)
    assert proc.returncode == 1
    assert message.startswith(
        "fleetserve serve failed to start: ModelLoadError: model '/models/nope' not found"
    )
    assert "model '/models/nope' not found" in proc.stderr  # and in the log, with the traceback


def test_invalid_arguments_are_the_termination_message(tmp_path):
    proc, message = _serve(tmp_path, "--max-model-len", "1")
    assert proc.returncode == 2
    assert message.startswith("fleetserve serve: invalid arguments:") and "max_model_len" in message


def test_message_is_cut_to_the_kubelet_limit(tmp_path, monkeypatch):
    from fleetserve.runtime.cli import write_termination_message

    path = tmp_path / "t"
    monkeypatch.setenv("FLEETSERVE_TERMINATION_LOG", str(path))
    assert write_termination_message("é" * 5000) == str(path)
    assert len(path.read_bytes()) <= 4096
    monkeypatch.delenv("FLEETSERVE_TERMINATION_LOG")
    if not os.path.exists("/dev/termination-log"):  # outside a pod nothing is written
        assert write_termination_message("x") is None
