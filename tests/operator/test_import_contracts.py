"""The operator stays light: it never imports torch, triton, numpy, the runtime or the kernels.

Checked two ways: import-linter's static contract (.importlinter), shown to catch a
violation, and a real import of the operator in a fresh interpreter.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _lint_imports(tmp_path: Path, operator_dir: Path) -> subprocess.CompletedProcess:
    tree = tmp_path / "tree" / "fleetserve"
    tree.mkdir(parents=True)
    (tree / "operator").symlink_to(operator_dir)
    for name in ("runtime", "kernels"):
        (tree / name).symlink_to(ROOT / name)
    exe = Path(sys.executable).with_name("lint-imports")
    cmd = [
        str(exe) if exe.exists() else shutil.which("lint-imports") or "lint-imports",
        "--config",
        str(ROOT / ".importlinter"),
        "--no-cache",
    ]
    return subprocess.run(
        cmd,
        cwd=tmp_path,
        env={"PYTHONPATH": str(tmp_path / "tree"), "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_import_linter_contract_is_kept(tmp_path):
    proc = _lint_imports(tmp_path, ROOT / "operator")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "1 kept, 0 broken" in proc.stdout


def test_import_linter_catches_a_runtime_import(tmp_path):
    bad = tmp_path / "bad-operator"
    shutil.copytree(ROOT / "operator", bad, ignore=shutil.ignore_patterns("__pycache__"))
    (bad / "sneaky.py").write_text("from fleetserve.runtime import config\n")
    proc = _lint_imports(tmp_path, bad)
    assert proc.returncode != 0 and "BROKEN" in proc.stdout, proc.stdout


def test_importing_the_operator_loads_no_heavy_modules():
    code = (
        "import sys, fleetserve.operator.main, fleetserve.operator.crd\n"
        "import fleetserve.operator.router.__main__, fleetserve.operator.router.proxy\n"
        "heavy = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'triton', 'numpy', 'transformers')"
        " or m.startswith(('fleetserve.runtime', 'fleetserve.kernels')))\n"
        "assert not heavy, heavy\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120, cwd="/")
