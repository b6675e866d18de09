"""Typed seams between runtime layers: what one side needs of the other, as Protocols.

- `EngineCore`: the synchronous engine the core loop drives (runtime/engine_core.py's EngineCore
  loop, in a thread via `AsyncLLM(engine)` or in the engine-core process): LLMEngine, or a test stand-in.
- `CoreClient`: how AsyncLLM reaches that loop (runtime/core_client.py: ThreadCoreClient, ProcessCoreClient).
- `LoadSettings`: the EngineConfig fields that `load_model` reads.
- `StatsSnapshot`: the engine statistics the metrics collector exports (EngineStats).
- `CausalLM`: the model surface the ModelRunner drives (runtime/models/layers.py's CausalLM, which
  every registered family subclasses, docs/ARCHITECTURE.md "Models").

Structural types only: nothing here is imported at run time by the classes that
satisfy them, and nothing here touches the device.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any, Protocol

from .validation import RequestLimits

if TYPE_CHECKING:
    import torch

    from .attention import AttentionMetadata
    from .models import ModelConfig
    from .outputs import RequestOutput
    from .sampling_params import SamplingParams
    from .tokenizer import Tokenizer

PromptInput = str | list[int] | dict[str, Any]
"""A prompt as the engine accepts it: text, token ids, or {"prompt": ...} / {"prompt_token_ids": ...}."""


class StatsSnapshot(Protocol):
    """Engine-wide gauges and counters at one moment (runtime/engine.py's EngineStats)."""

    @property
    def num_running(self) -> int: ...
    @property
    def num_waiting(self) -> int: ...
    @property
    def kv_cache_usage(self) -> float: ...
    @property
    def num_preemptions_total(self) -> int: ...
    @property
    def prefix_cache_queries_total(self) -> int: ...
    @property
    def prefix_cache_hits_total(self) -> int: ...
    @property
    def prompt_tokens_total(self) -> int: ...
    @property
    def generation_tokens_total(self) -> int: ...


class EngineCore(Protocol):
    """The synchronous engine the core loop runs (runtime/engine.py's LLMEngine). The loop sets
    `detokenize = False` and adds requests with delta=True: per-step deltas of token ids and
    logprobs, no text and no stop strings (the HTTP side's OutputProcessor owns those)."""

    @property
    def tokenizer(self) -> Tokenizer | None: ...
    @property
    def model_name(self) -> str: ...
    @property
    def max_model_len(self) -> int: ...
    @property
    def limits(self) -> RequestLimits: ...

    detokenize: bool

    def add_request(
        self,
        request_id: str,
        prompt: PromptInput,
        params: SamplingParams,
        arrival_time: float | None = None,
        final_only: bool = False,
        delta: bool = False,
    ) -> None: ...

    def abort_request(self, request_id: str | Iterable[str]) -> None: ...

    def step(self) -> list[RequestOutput]: ...

    def has_unfinished_requests(self) -> bool: ...

    def get_stats(self) -> StatsSnapshot: ...


class CoreInfo(Protocol):
    """What the HTTP side knows of an engine it may not hold (runtime/engine_core.py's EngineInfo)."""

    @property
    def model_name(self) -> str: ...
    @property
    def max_model_len(self) -> int: ...
    @property
    def limits(self) -> RequestLimits | None: ...
    @property
    def generation_defaults(self) -> dict[str, Any]: ...
    @property
    def config(self) -> Any: ...


class CoreClient(Protocol):
    """How AsyncLLM reaches the engine core loop (runtime/core_client.py). `info`, `tokenizer` and
    `stats` are known once the core is up; `start` registers callbacks run on the event loop;
    `send` takes ("add" | "abort" | "shutdown", ...) operations (engine_core.py's wire format)."""

    @property
    def info(self) -> CoreInfo: ...
    @property
    def tokenizer(self) -> Tokenizer | None: ...
    @property
    def stats(self) -> dict[str, Any]: ...
    @property
    def is_running(self) -> bool: ...

    def start(
        self, on_batch: Callable[[tuple[Any, ...]], None], on_stopped: Callable[[str, bool], None]
    ) -> None: ...

    def send(self, op: tuple[Any, ...]) -> None: ...

    def shutdown(self, timeout: float = 30.0) -> None: ...


class LoadSettings(Protocol):
    """What `load_model` reads from an EngineConfig (field meanings: runtime/config.py)."""

    @property
    def model(self) -> str | None: ...
    @property
    def tokenizer(self) -> str | None: ...
    @property
    def served_model_name(self) -> str | None: ...
    @property
    def dtype(self) -> str: ...
    @property
    def device(self) -> str: ...
    @property
    def load_format(self) -> str: ...
    @property
    def gguf_weights(self) -> str: ...
    @property
    def attention_backend(self) -> str: ...
    @property
    def seed(self) -> int: ...
    @property
    def revision(self) -> str | None: ...
    @property
    def download_dir(self) -> str | None: ...
    @property
    def gguf_file(self) -> str | None: ...
    @property
    def chat_template(self) -> str | None: ...


class CausalLM(Protocol):
    """A decoder the ModelRunner can run: forward over the step's tokens (writing their K/V into the
    paged caches), then logits for the rows to sample. CUDA-graph capturable (no host syncs)."""

    @property
    def config(self) -> ModelConfig: ...

    def __call__(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        attn: AttentionMetadata,
        kv_caches: list[torch.Tensor],
    ) -> torch.Tensor: ...

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor: ...
