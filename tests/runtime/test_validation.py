"""runtime/validation.py: the one check of a request against the engine's limits; each refusal
is an InvalidRequestError naming the field (the server's 400 `param`)."""

from __future__ import annotations

import pytest

from fleetserve.runtime.sampling_params import SamplingParams as SP
from fleetserve.runtime.validation import InvalidRequestError, RequestLimits, validate

LIMITS = RequestLimits(max_model_len=32, vocab_size=100, max_logprobs=5)


@pytest.mark.parametrize(
    "ids, params, param, message",
    [
        ([], SP(), "prompt", "empty"),
        ([1, 100], SP(), "prompt", "outside the vocabulary"),
        ([-1, 2], SP(), "prompt", "outside the vocabulary"),
        ([1] * 32, SP(max_tokens=None), "prompt", "maximum context length"),
        ([1] * 20, SP(max_tokens=13), "max_tokens", "maximum context length"),
        ([1], SP(logprobs=6), "logprobs", "logprobs=6"),
        ([1], SP(prompt_logprobs=6), "prompt_logprobs", "prompt_logprobs=6"),
        ([1], SP(logit_bias={100: 1.0}), "logit_bias", "outside the vocabulary"),
        ([1], SP(stop_token_ids=[3, -1]), "stop_token_ids", "outside the vocabulary"),
    ],
)
def test_each_refusal_names_its_field(ids, params, param, message):
    with pytest.raises(InvalidRequestError, match=message) as e:
        validate(ids, params, LIMITS)
    assert e.value.param == param and isinstance(e.value, ValueError)
    if "context" in message:
        assert e.value.code == "context_length_exceeded"


def test_accepts_what_fits_exactly():
    validate(
        [1] * 20,
        SP(max_tokens=12, logprobs=5, prompt_logprobs=5, logit_bias={99: 1.0}, stop_token_ids=[0]),
        LIMITS,
    )
    validate([1] * 31, SP(max_tokens=None), LIMITS)  # up to the context length, stopped by "length"
