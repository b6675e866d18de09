"""Reading a Hugging Face model directory: config.json, *.safetensors (sharded or not), eos ids."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from typing import Any

from tqdm.auto import tqdm

from .errors import ModelLoadError

INDEX_FILE = "model.safetensors.index.json"


def read_json(path: str) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise ModelLoadError(f"cannot read {path}: {e}") from e


def safetensors_files(model_dir: str) -> list[str]:
    """The shard files of a directory, from its index when there is one."""
    index = os.path.join(model_dir, INDEX_FILE)
    if os.path.isfile(index):
        weight_map = read_json(index).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise ModelLoadError(f"{index} has no weight_map")
        files = [os.path.join(model_dir, f) for f in sorted(set(weight_map.values()))]
        missing = [f for f in files if not os.path.isfile(f)]
        if missing:
            raise ModelLoadError(f"shard(s) listed in {index} are missing: {', '.join(missing)}")
        return files
    files = sorted(os.path.join(model_dir, f) for f in os.listdir(model_dir) if f.endswith(".safetensors"))
    if not files:
        raise ModelLoadError(
            f"no *.safetensors files in {model_dir} (only safetensors weights are supported)"
        )
    return files


def iter_safetensors(
    files: list[str], desc: str = "Loading weights", lazy: bool = False
) -> Iterator[tuple[str, Any]]:
    """Yields (name, CPU tensor) of every tensor, file by file, with a progress bar over tensors.
    lazy: yield runtime.parallel.LazySlice objects instead (nothing read until indexed; valid
    until the next item), so that a tensor-parallel rank reads only its slice."""
    from safetensors import safe_open

    from ..parallel import LazySlice

    def opened(path):
        try:
            return safe_open(path, framework="pt", device="cpu")
        except Exception as e:  # SafetensorError, OSError: the header is broken, say which file
            raise ModelLoadError(f"corrupt or unreadable safetensors file {path}: {e}") from e

    total = 0
    for path in files:
        with opened(path) as f:
            total += len(f.keys())
    with tqdm(total=total, desc=desc, unit="tensor") as bar:
        for path in files:
            with opened(path) as f:
                for name in f.keys():
                    try:
                        tensor = LazySlice(f.get_slice(name), name, path) if lazy else f.get_tensor(name)
                    except Exception as e:  # truncated data section
                        raise ModelLoadError(f"corrupt safetensors file {path}: tensor {name!r}: {e}") from e
                    yield name, tensor
                    bar.update()


def eos_ids_of_dir(model_dir: str) -> list[int]:
    """EOS ids from generation_config.json (Llama 3 lists several there)."""
    path = os.path.join(model_dir, "generation_config.json")
    if not os.path.isfile(path):
        return []
    eos = read_json(path).get("eos_token_id")
    return list(eos) if isinstance(eos, list) else ([] if eos is None else [eos])


# generation_config.json key -> SamplingParams field (what vLLM's --generation-config auto takes from it).
_GENERATION_KEYS = {
    "temperature": "temperature",
    "top_p": "top_p",
    "top_k": "top_k",
    "min_p": "min_p",
    "repetition_penalty": "repetition_penalty",
    "max_new_tokens": "max_tokens",
}


def generation_defaults_of_dir(model_dir: str) -> dict:
    """The sampling defaults a model's generation_config.json sets, as SamplingParams field names."""
    path = os.path.join(model_dir, "generation_config.json")
    if not os.path.isfile(path):
        return {}
    raw = read_json(path)
    return {ours: raw[key] for key, ours in _GENERATION_KEYS.items() if raw.get(key) is not None}
