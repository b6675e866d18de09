"""fleetserve.runtime: the serving engine (paged KV cache, continuous batching,
sampling), the offline `LLM` API and the OpenAI-compatible HTTP server.

Public names are imported lazily so that `import fleetserve.runtime` stays cheap
(the CLI's --help must not pay for importing torch).
"""

from __future__ import annotations

__version__ = "0.1.0"

__all__ = [
    "LLM",
    "SamplingParams",
    "RequestOutput",
    "CompletionOutput",
    "EngineConfig",
    "LLMEngine",
    "__version__",
]


def __getattr__(name: str):
    if name == "LLM":
        from .llm import LLM

        return LLM
    if name == "SamplingParams":
        from .sampling_params import SamplingParams

        return SamplingParams
    if name in ("RequestOutput", "CompletionOutput"):
        from . import outputs

        return getattr(outputs, name)
    if name == "EngineConfig":
        from .config import EngineConfig

        return EngineConfig
    if name == "LLMEngine":
        from .engine import LLMEngine

        return LLMEngine
    raise AttributeError(name)
