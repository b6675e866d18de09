"""Model code of the engine: ModelConfig (config.py), the architecture registry (registry.py),
shared building blocks (layers.py; moe.py for the mixture-of-experts families) and one small
file per family. Weight files are read by runtime/loader. A new family registers itself with
`@register` and is imported below."""

from . import gemma2, gemma3, llama, mixtral, phi3, qwen3, qwen3_moe  # noqa: F401  (each registers its families)
from .config import PRESETS, ModelConfig, UnsupportedModelError, hf_config_dict
from .layers import CausalLM, build_model
from .llama import LlamaForCausalLM
from .mixtral import MixtralForCausalLM
from .qwen3_moe import Qwen2MoeForCausalLM, Qwen3MoeForCausalLM
from .registry import FAMILIES, register, supported_architectures

__all__ = [
    "PRESETS",
    "ModelConfig",
    "UnsupportedModelError",
    "CausalLM",
    "LlamaForCausalLM",
    "MixtralForCausalLM",
    "Qwen3MoeForCausalLM",
    "Qwen2MoeForCausalLM",
    "build_model",
    "FAMILIES",
    "register",
    "supported_architectures",
    "hf_config_dict",
]
