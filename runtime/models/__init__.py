"""Model code of the engine: ModelConfig (config.py), the architecture registry (registry.py),
shared building blocks (layers.py) and one small file per family. Weight files are read by
runtime/loader. A new family registers itself with `@register` and is imported below."""
from . import gemma2, gemma3, llama, phi3, qwen3  # noqa: F401  (each registers its families)
from .config import PRESETS, ModelConfig, UnsupportedModelError, hf_config_dict
from .layers import CausalLM, build_model
from .llama import LlamaForCausalLM
from .registry import FAMILIES, register, supported_architectures

__all__ = ["PRESETS", "ModelConfig", "UnsupportedModelError", "CausalLM", "LlamaForCausalLM", "build_model",
           "FAMILIES", "register", "supported_architectures", "hf_config_dict"]
