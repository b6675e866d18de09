"""Request validation: the one place that decides whether the engine accepts a request.

`validate(prompt_token_ids, params, limits)` checks everything that depends on the
loaded model and the engine's settings (`RequestLimits`): an empty prompt, token
ids outside the vocabulary, the context length (prompt alone, and prompt +
max_tokens: there is no silent clamp), logprob counts, and the token ids named
by logit_bias / stop_token_ids. What depends on nothing but the request
(ranges, types, min_tokens <= max_tokens) is SamplingParams' own pydantic
validation. `LLMEngine.add_request` calls `validate` for every request; the
OpenAI server calls it too before admitting a request, so a bad one is answered
with 400 (param = `InvalidRequestError.param`) before anything is streamed.
Nothing here touches the device.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from .sampling_params import SamplingParams


class InvalidRequestError(ValueError):
    """A request the engine refuses. `param` names the offending field (OpenAI's
    error `param`); `code` is an OpenAI error code when there is one."""

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code


@dataclass(frozen=True)
class RequestLimits:
    """What a request is checked against; fixed once the engine has started (plain data,
    so it can be read from any thread or sent to another process)."""

    max_model_len: int
    """Context length: prompt + generated tokens of one completion."""
    vocab_size: int
    """The model's vocabulary; token ids must lie in [0, vocab_size)."""
    max_logprobs: int
    """Most top logprobs one position may ask for (logprobs and prompt_logprobs)."""


def _outside(ids: Sequence[int], vocab_size: int) -> list[int]:
    if not ids or (0 <= min(ids) and max(ids) < vocab_size):  # C-speed scan for the common case
        return []
    return [t for t in ids if not 0 <= t < vocab_size]


def validate(prompt_token_ids: Sequence[int], params: SamplingParams, limits: RequestLimits) -> None:
    """Raise InvalidRequestError if the engine cannot serve this request as asked."""
    n = len(prompt_token_ids)
    if n == 0:
        raise InvalidRequestError("prompt must not be empty", param="prompt")
    bad = _outside(prompt_token_ids, limits.vocab_size)
    if bad:
        raise InvalidRequestError(
            f"prompt token ids {bad[:5]} are outside the vocabulary [0, {limits.vocab_size})", param="prompt"
        )
    limit = limits.max_model_len
    if n >= limit:
        raise InvalidRequestError(
            f"This model's maximum context length is {limit} tokens. However, your request has {n} input "
            f"tokens (no room for any output). Please reduce the length of the prompt.",
            param="prompt",
            code="context_length_exceeded",
        )
    if params.max_tokens is not None and n + params.max_tokens > limit:
        raise InvalidRequestError(
            f"This model's maximum context length is {limit} tokens. However, you requested "
            f"{n + params.max_tokens} tokens ({n} in the prompt, {params.max_tokens} in the completion). "
            f"Please reduce the length of the prompt or max_tokens.",
            param="max_tokens",
            code="context_length_exceeded",
        )
    for name in ("logprobs", "prompt_logprobs"):
        k = getattr(params, name)
        if k is not None and k > limits.max_logprobs:
            raise InvalidRequestError(
                f"{name}={k} exceeds the maximum allowed ({limits.max_logprobs})", param=name
            )
    for name, ids in (
        ("logit_bias", list(params.logit_bias or ())),
        ("stop_token_ids", params.stop_token_ids),
    ):
        bad = _outside(ids, limits.vocab_size)
        if bad:
            raise InvalidRequestError(
                f"{name}: token ids {bad[:5]} are outside the vocabulary [0, {limits.vocab_size})", param=name
            )
