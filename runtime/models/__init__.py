"""Model code of the engine: ModelConfig (runtime/models/config.py), the Llama-family
decoder (runtime/models/llama.py) and the mixture-of-experts families (moe.py, mixtral.py,
qwen3_moe.py). Weight files are read by runtime/loader."""
from .config import PRESETS, ModelConfig, UnsupportedModelError
from .llama import LlamaForCausalLM
from .llama import build_model as _build_llama
from .mixtral import MixtralForCausalLM
from .qwen3_moe import Qwen2MoeForCausalLM, Qwen3MoeForCausalLM

# -- model class per ModelConfig.arch (families not listed are LlamaForCausalLM) --
MODEL_CLASSES = {"mixtral": MixtralForCausalLM, "qwen3_moe": Qwen3MoeForCausalLM, "qwen2_moe": Qwen2MoeForCausalLM}


def build_model(model_config, ops, dtype=None, device="cpu"):
    """runtime/models/llama.py's build_model with the family's class (see there)."""
    import torch

    cls = MODEL_CLASSES.get(model_config.arch, LlamaForCausalLM)
    return _build_llama(model_config, ops, dtype or torch.float32, device, cls=cls)


__all__ = ["PRESETS", "ModelConfig", "UnsupportedModelError", "LlamaForCausalLM", "MixtralForCausalLM",
           "Qwen3MoeForCausalLM", "Qwen2MoeForCausalLM", "MODEL_CLASSES", "build_model"]
