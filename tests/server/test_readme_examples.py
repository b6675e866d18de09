"""The README's Python examples, run as written against the embedded SmolLM2: they must answer "Paris".

The SDK example sets neither temperature nor max_tokens: the embedded model's defaults (greedy, at most
256 tokens for a chat without max_tokens; docs/server.md says why not the card's temperature 0.2) make it
answer briefly and sensibly, the same every time. Only the base URL is pointed at the test server (the README's 127.0.0.1:8000)."""

from __future__ import annotations

import contextlib
import io
import re
from pathlib import Path

README = Path(__file__).resolve().parents[2] / "README.md"


def _python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def _run(code: str) -> str:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(code, "README.md", "exec"), {})
    return out.getvalue()


def test_readme_sdk_example_answers_paris(server):
    block = next(b for b in _python_blocks() if "from openai import OpenAI" in b)
    assert "temperature" not in block and "max_tokens" not in block  # as a new user writes it
    assert 'base_url="http://127.0.0.1:8000/v1"' in block
    printed = _run(block.replace("http://127.0.0.1:8000", server.urls["tight"]))  # "tight" needs no key
    assert "Paris" in printed, printed
    assert len(printed) < 2000  # an answer, not a ramble to the context limit
    assert _run(block.replace("http://127.0.0.1:8000", server.urls["tight"])) == printed  # and the same again


def test_readme_offline_example_answers_paris():
    block = next(b for b in _python_blocks() if "from fleetserve.runtime import LLM" in b)
    printed = _run(block)
    assert "Paris" in printed, printed


def test_embedded_model_defaults_are_documented(server):
    from fleetserve.runtime.loader.loader import EMBEDDED_GENERATION_DEFAULTS

    assert server.serving().generation_defaults == EMBEDDED_GENERATION_DEFAULTS
    doc = (README.parent / "docs" / "server.md").read_text()
    for k, v in EMBEDDED_GENERATION_DEFAULTS.items():
        assert f"{k}={v}" in doc, k
