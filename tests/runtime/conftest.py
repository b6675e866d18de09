"""Shared runtime fixtures: the embedded SmolLM2 GGUF, loaded once per session by us and
(slowly, ~30 s on CPU) by transformers as the reference."""

from __future__ import annotations

import os

import pytest


@pytest.fixture(scope="session")
def smollm2_path() -> str:
    from fleetserve.runtime.loader import ModelLoadError, embedded_model_path

    try:
        return embedded_model_path()
    except ModelLoadError as e:
        pytest.skip(str(e))


@pytest.fixture(scope="session")
def smollm2_model(smollm2_path):
    """Our LoadedModel of the embedded SmolLM2 (float32, CPU, torch kernels, weights dequantized at
    load: the reference the packed CPU path is compared with)."""
    import torch

    from fleetserve.runtime.config import EngineConfig
    from fleetserve.runtime.loader import load_model

    return load_model(
        EngineConfig(device="cpu", dtype="float32", attention_backend="torch", gguf_weights="dequantize"),
        "cpu",
        torch.float32,
    )


@pytest.fixture(scope="session")
def smollm2_tokenizer(smollm2_model):
    return smollm2_model.tokenizer


@pytest.fixture(scope="session")
def hf_smollm2(smollm2_path):
    """transformers' own GGUF loading of the same file (LlamaForCausalLM, float32)."""
    transformers = pytest.importorskip("transformers")
    import torch

    folder, name = os.path.split(smollm2_path)
    return transformers.AutoModelForCausalLM.from_pretrained(
        folder, gguf_file=name, dtype=torch.float32
    ).eval()
