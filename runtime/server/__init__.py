"""fleetserve.runtime.server: the OpenAI-compatible aiohttp server.

config.py (ServerConfig) -> app.py (app factory, middlewares, lifecycle, runner)
-> routes.py (handlers) -> intake.py (body -> validated model off the event loop, cheap bounds)
-> protocol.py (pydantic request/response models),
sse.py (streaming), errors.py (OpenAI error bodies), metrics.py (Prometheus, vLLM names).
"""

from __future__ import annotations

__all__ = ["create_app", "run_server", "ServerConfig"]


def __getattr__(name: str):
    if name in ("create_app", "run_server"):
        from . import app

        return getattr(app, name)
    if name == "ServerConfig":
        from .config import ServerConfig

        return ServerConfig
    raise AttributeError(name)
