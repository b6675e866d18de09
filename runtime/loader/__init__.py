"""Weight loading: turns EngineConfig.model (None, a HF directory, a .gguf file or a preset name)
into a built model on its device, its ModelConfig and its Tokenizer.

runtime/loader/loader.py resolves the source and owns the dummy initialiser;
safetensors_loader.py and gguf_loader.py read the two file formats.
"""

from .loader import (
    LoadedModel,
    ModelLoadError,
    embedded_model_path,
    init_dummy_weights,
    load_model,
    peek_model_config,
)

__all__ = [
    "LoadedModel",
    "ModelLoadError",
    "embedded_model_path",
    "init_dummy_weights",
    "load_model",
    "peek_model_config",
]
