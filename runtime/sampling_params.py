"""SamplingParams: the per-request decoding settings, validated once at the edge.

Field names and meanings follow vLLM's `SamplingParams` so that users can switch
without edits. Validation raises `ValueError` (pydantic's ValidationError is one)
naming the offending field.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from .structured.params import StructuredOutputsParams

GREEDY_TEMPERATURE = 1e-5
"""Temperatures below this decode greedily (vLLM's threshold)."""


class SamplingParams(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True, use_attribute_docstrings=True)

    n: int = Field(1, ge=1, le=128)
    """Number of completions to return for the prompt."""
    temperature: float = Field(1.0, ge=0.0)
    """Softmax temperature; 0 means greedy decoding."""
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    """Nucleus sampling: keep the smallest set of tokens whose probability sums to at least top_p."""
    top_k: int = Field(0, ge=-1)
    """Keep only the k most likely tokens; 0 or -1 disables the filter."""
    min_p: float = Field(0.0, ge=0.0, le=1.0)
    """Drop tokens whose probability is below min_p times that of the most likely token."""
    seed: int | None = None
    """Seed for this request's random stream; sampling is then reproducible and independent of batching."""
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    """Subtracted once from the logit of every token already generated (OpenAI semantics)."""
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    """Subtracted from a token's logit once per time it was already generated (OpenAI semantics)."""
    repetition_penalty: float = Field(1.0, gt=0.0, le=10.0)
    """Divides positive (multiplies negative) logits of tokens seen in the prompt or output; 1 disables it."""
    stop: list[str] = Field(default_factory=list)
    """Strings that end generation; they are not included in the output text."""
    stop_token_ids: list[int] = Field(default_factory=list)
    """Token ids that end generation (in addition to the model's EOS unless ignore_eos)."""
    ignore_eos: bool = False
    """Keep generating after the EOS token (benchmarks)."""
    max_tokens: int | None = Field(16, ge=1)
    """Maximum number of generated tokens; None means up to the model's context length."""
    min_tokens: int = Field(0, ge=0)
    """EOS and stop tokens are suppressed until this many tokens were generated."""
    logprobs: int | None = Field(None, ge=0)
    """Return this many top log-probabilities per generated token (plus the sampled token's)."""
    prompt_logprobs: int | None = Field(None, ge=0)
    """Return this many top log-probabilities per prompt token (plus the prompt token's own)."""
    skip_special_tokens: bool = True
    """Leave special tokens out of the detokenized text."""
    spaces_between_special_tokens: bool = True
    """Kept for vLLM compatibility; special tokens are decoded the way the tokenizer decodes them."""
    include_stop_str_in_output: bool = False
    """Keep the matched stop string at the end of the output text."""
    logit_bias: dict[int, float] | None = None
    """Added to the logits of the given token ids before sampling (values clamped to [-100, 100])."""
    structured_outputs: StructuredOutputsParams | None = None
    """Constrain the output to a JSON schema, any JSON object, a regex, one of some strings or an EBNF grammar."""

    @field_validator("stop", mode="before")
    @classmethod
    def _stop_list(cls, v: object) -> object:
        if v is None:
            return []
        if isinstance(v, str):
            return [v]
        return v

    @field_validator("stop")
    @classmethod
    def _stop_nonempty(cls, v: list[str]) -> list[str]:
        if any(s == "" for s in v):
            raise ValueError("stop strings must not be empty")
        return v

    @field_validator("stop_token_ids", mode="before")
    @classmethod
    def _stop_ids_list(cls, v: object) -> object:
        return [] if v is None else v

    @field_validator("logit_bias")
    @classmethod
    def _clamp_bias(cls, v: dict[int, float] | None) -> dict[int, float] | None:
        if v is None:
            return None
        return {int(k): max(-100.0, min(100.0, float(b))) for k, b in v.items()}

    @model_validator(mode="after")
    def _consistent(self) -> SamplingParams:
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise ValueError(f"min_tokens ({self.min_tokens}) must be <= max_tokens ({self.max_tokens})")
        return self

    @property
    def greedy(self) -> bool:
        """Decoded by argmax: temperature 0, or one so small that dividing by it overflows (vLLM)."""
        return self.temperature < GREEDY_TEMPERATURE

    @property
    def has_penalties(self) -> bool:
        """Presence/frequency/repetition penalties read the generated tokens themselves."""
        return self.presence_penalty != 0.0 or self.frequency_penalty != 0.0 or self.repetition_penalty != 1.0

    def clone(self, **update: Any) -> SamplingParams:
        return self.model_copy(update=update, deep=True)
