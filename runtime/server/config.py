"""ServerConfig: the HTTP server's own settings (everything that is not the engine's).

Engine settings live in `EngineConfig` (runtime/config.py); `fleetserve serve`
generates its flags from both models, field by field, with these docstrings as
help text. Nothing else holds a second list of them.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


class ServerConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)

    host: str = "127.0.0.1"
    """Address to listen on; 0.0.0.0 (or ::) listens on every interface (containers, Kubernetes pods)."""
    port: int = Field(8000, ge=0, le=65535)
    """TCP port to listen on (0 picks a free one)."""
    api_key: str | None = Field(None, repr=False)
    """Require `Authorization: Bearer <key>` on the API routes (/health, /metrics and /version stay open)."""
    max_waiting_requests: int = Field(1024, ge=0)
    """Sequences (prompts x n) allowed beyond the engine's max_num_seqs batch slots, i.e. waiting for a slot;
    beyond that new requests get 503 with Retry-After."""
    max_request_body_bytes: int = Field(16 * 1024 * 1024, ge=1024)
    """Largest accepted request body; larger bodies get 413."""
    shutdown_timeout: float = Field(30.0, ge=0.0)
    """Seconds SIGTERM waits for in-flight requests to finish; the rest are cut (streams get an error event and
    [DONE], other requests 503) and the server exits."""
    retry_after_seconds: int = Field(1, ge=0)
    """Value of the Retry-After header sent with 503 responses."""
    max_n: int = Field(16, ge=1)
    """Largest n (completions per prompt) a request may ask for."""
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    """Logging level of the fleetserve loggers."""
    disable_log_requests: bool = True
    """Do not log one line per finished request."""
    engine_process: bool | None = None
    """Run the engine loop (scheduler, KV cache, model) in its own process, so per-token HTTP work (detokenization, SSE) does not compete with it for the GIL; --no-engine-process runs it in a thread of the server. Default: its own process on CUDA, a thread on CPU (where both share the same cores and a second process costs a second copy of torch's memory: the embedded model's 2 GiB pod was OOM-killed)."""
    enable_auto_tool_choice: bool = False
    """Let the model decide to call tools (tool_choice "auto", the default with tools); needs tool_call_parser."""
    tool_call_parser: Literal["hermes", "llama3_json", "mistral"] | None = None
    """How tool calls are read from the model's text: hermes (Hermes, Qwen2.5, Qwen3 <tool_call>), llama3_json, mistral ([TOOL_CALLS])."""
    reasoning_parser: Literal["deepseek_r1", "qwen3"] | None = None
    """Split <think>...</think> reasoning into message.reasoning_content; structured output and tool calls apply after it."""

    @model_validator(mode="after")
    def _tools(self) -> ServerConfig:
        if self.enable_auto_tool_choice and self.tool_call_parser is None:
            raise ValueError("enable_auto_tool_choice needs tool_call_parser")
        return self
