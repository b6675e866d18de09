"""Typed seams between runtime layers: what one side needs of the other, as Protocols.

- `EngineCore`: what AsyncLLM drives (LLMEngine, or a test stand-in).
- `LoadSettings`: the EngineConfig fields that `load_model` reads.
- `StatsSnapshot`: the engine statistics the metrics collector exports (EngineStats).
- `CausalLM`: the model surface the ModelRunner drives (runtime/models/layers.py's CausalLM, which
  every registered family subclasses, docs/ARCHITECTURE.md "Models").

Structural types only: nothing here is imported at run time by the classes that
satisfy them, and nothing here touches the device.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Iterable, Optional, Protocol, Union

from .validation import RequestLimits

if TYPE_CHECKING:
    import torch

    from .attention import AttentionMetadata
    from .models import ModelConfig
    from .outputs import RequestOutput
    from .sampling_params import SamplingParams
    from .tokenizer import Tokenizer

PromptInput = Union[str, list[int], dict[str, Any]]
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
    """The synchronous engine AsyncLLM runs on its engine thread (runtime/engine.py's LLMEngine)."""

    @property
    def tokenizer(self) -> Optional["Tokenizer"]: ...
    @property
    def model_name(self) -> str: ...
    @property
    def max_model_len(self) -> int: ...
    @property
    def limits(self) -> RequestLimits: ...

    def add_request(self, request_id: str, prompt: PromptInput, params: "SamplingParams",
                    arrival_time: Optional[float] = None) -> None: ...

    def abort_request(self, request_id: Union[str, Iterable[str]]) -> None: ...

    def step(self) -> list["RequestOutput"]: ...

    def has_unfinished_requests(self) -> bool: ...

    def get_stats(self) -> StatsSnapshot: ...


class LoadSettings(Protocol):
    """What `load_model` reads from an EngineConfig (field meanings: runtime/config.py)."""

    @property
    def model(self) -> Optional[str]: ...
    @property
    def tokenizer(self) -> Optional[str]: ...
    @property
    def served_model_name(self) -> Optional[str]: ...
    @property
    def dtype(self) -> str: ...
    @property
    def device(self) -> str: ...
    @property
    def load_format(self) -> str: ...
    @property
    def attention_backend(self) -> str: ...
    @property
    def seed(self) -> int: ...


class CausalLM(Protocol):
    """A decoder the ModelRunner can run: forward over the step's tokens (writing their K/V into the
    paged caches), then logits for the rows to sample. CUDA-graph capturable (no host syncs)."""

    @property
    def config(self) -> "ModelConfig": ...

    def __call__(self, input_ids: "torch.Tensor", positions: "torch.Tensor", attn: "AttentionMetadata",
                 kv_caches: list["torch.Tensor"]) -> "torch.Tensor": ...

    def compute_logits(self, hidden: "torch.Tensor") -> "torch.Tensor": ...
