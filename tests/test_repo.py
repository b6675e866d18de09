"""Repository-level contracts: CI runs exactly the README's test command."""

from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _readme_commands():
    lines = (ROOT / "README.md").read_text().splitlines()
    return [ln.strip() for ln in lines if ln.strip().startswith("pip install")]


def test_ci_runs_readme_test_command():
    cmds = _readme_commands()
    assert len(cmds) == 2, cmds
    test_cmd = cmds[1]
    assert "pytest" in test_cmd
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    assert test_cmd in [ln.strip() for ln in ci]


def test_ci_runs_the_e2e_suite_on_a_real_cluster_as_documented():
    ci = [ln.strip() for ln in (ROOT / ".ci" / "run").read_text().splitlines()]
    assert "bash tests/e2e/run.sh" in ci
    assert ci.index("bash tests/e2e/run.sh") > max(
        i for i, ln in enumerate(ci) if ln.startswith("pip install")
    )
    assert "bash tests/e2e/run.sh" in (ROOT / "README.md").read_text()


def test_operator_folder_does_not_shadow_stdlib():
    assert not (ROOT / "operator" / "__init__.py").exists()
    import operator

    assert hasattr(operator, "eq")


def test_readme_kind_snippet_builds_every_image_it_loads():
    import re

    text = (ROOT / "README.md").read_text()
    loaded = [
        img
        for line in text.splitlines()
        if line.strip().startswith("kind load docker-image")
        for img in line.split()[3:]
        if not img.startswith("-")
    ]
    built = re.findall(r"^docker build .*-t (\S+)", text, flags=re.M)
    assert loaded and set(loaded) <= set(built), (loaded, built)
    for image in built:  # the Dockerfiles named exist
        line = next(ln for ln in text.splitlines() if ln.startswith("docker build") and f"-t {image}" in ln)
        assert (ROOT / re.search(r"-f (\S+)", line).group(1)).is_file()


def test_e2e_docs_state_what_run_sh_needs():
    doc = (ROOT / "docs" / "e2e.md").read_text()
    for words in ("root", "installs Debian packages", "~4-5 GB of cache", "as of 2026-11-24"):
        assert words in doc, words


def test_ci_runs_lint_format_and_type_checks_before_the_tests():
    ci = [ln.strip() for ln in (ROOT / ".ci" / "run").read_text().splitlines()]
    checks = ["ruff check .", "ruff format --check .", "bash .ci/typecheck"]
    for cmd in checks:
        assert cmd in ci, cmd
    tests = next(i for i, ln in enumerate(ci) if ln.endswith("pytest") and ln.startswith("pip install"))
    first_install = next(i for i, ln in enumerate(ci) if ln.startswith("pip install"))
    assert all(first_install < ci.index(cmd) < tests for cmd in checks)
    typecheck = (ROOT / ".ci" / "typecheck").read_text()
    assert "mypy" in typecheck and "-p fleetserve" in typecheck
    pyproject = (ROOT / "pyproject.toml").read_text()
    assert "[tool.ruff.lint]" in pyproject and "[tool.mypy]" in pyproject
