"""The server listens on 127.0.0.1 by default (as the README says) and warns, in its start-up log, when it
listens on every interface without an API key."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import threading

from fleetserve.runtime.server.app import exposure_warning
from fleetserve.runtime.server.config import ServerConfig


def test_default_host_is_loopback_as_the_readme_says():
    from pathlib import Path

    assert ServerConfig().host == "127.0.0.1"
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    assert "http://127.0.0.1:8000" in readme


def test_warning_only_for_every_interface_without_a_key():
    for host in ("0.0.0.0", "::", ""):
        assert "without an API key" in exposure_warning(ServerConfig(host=host))
        assert exposure_warning(ServerConfig(host=host, api_key="k")) is None
    for host in ("127.0.0.1", "10.1.2.3", "localhost"):
        assert exposure_warning(ServerConfig(host=host)) is None


def test_startup_log_warns_when_exposed_without_a_key():
    env = {k: v for k, v in os.environ.items() if k != "FLEETSERVE_API_KEY"}
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "fleetserve.runtime.cli",
            "serve",
            "--host",
            "0.0.0.0",
            "--port",
            "0",
            "--max-model-len",
            "128",
            "--num-kv-blocks",
            "16",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        env=env,
    )
    lines: list[str] = []
    done = threading.Event()

    def drain():
        for raw in proc.stderr:
            lines.append(raw.decode(errors="replace"))
            if "without an API key" in lines[-1]:
                done.set()
        done.set()

    threading.Thread(target=drain, daemon=True).start()
    try:
        done.wait(240)
    finally:
        proc.kill()
        proc.wait(30)
    log = "".join(lines)
    assert re.search(r"serving .* on http://0\.0\.0\.0:\d+ \(API key not required\)", log), log[-3000:]
    assert re.search(r"WARNING .*listening on every interface \(0\.0\.0\.0\) without an API key", log), log[
        -3000:
    ]
