"""Model code of the engine: ModelConfig (runtime/models/config.py) and the Llama-family
decoder (runtime/models/llama.py). Weight files are read by runtime/loader."""
from .config import PRESETS, ModelConfig, UnsupportedModelError
from .llama import LlamaForCausalLM, build_model

__all__ = ["PRESETS", "ModelConfig", "UnsupportedModelError", "LlamaForCausalLM", "build_model"]
