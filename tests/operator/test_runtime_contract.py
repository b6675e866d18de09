"""The operator's side of the runtime contract, checked against the runtime's real CLI parser.

Tests may import the runtime (the operator itself may not): every `fleetserve serve` argument
list the operator renders must parse, and the metric names the operator scrapes must be the
ones the runtime's server exports.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from fleetserve.operator import metrics, render
from fleetserve.operator.spec import parse_spec

from .test_manifests import SPECS, _example_crs

ROOT = Path(__file__).resolve().parents[2]


def _all_specs():
    return [pytest.param(raw, id=label) for label, raw in SPECS.items()] + [
        pytest.param(cr["spec"], id=cr["metadata"]["name"]) for cr in _example_crs()
    ]


@pytest.mark.parametrize("raw", _all_specs())
def test_rendered_serve_args_parse_with_the_runtime_cli(raw):
    cli = pytest.importorskip("fleetserve.runtime.cli")
    spec = parse_spec(raw)
    args = render.serve_args("svc", spec)
    ns = cli.build_parser().parse_args(["serve", *args])
    # Left out for one rank (the runtime's default; absent flags are absent from the namespace).
    assert getattr(ns, "tensor_parallel_size", 1) == spec.tensor_parallel_size()
    assert ns.command == "serve"
    assert ns.port == render.PORT and ns.served_model_name == render.served_model_name("svc", spec)
    assert float(ns.shutdown_timeout) == spec.engine.shutdownTimeoutSeconds
    assert ns.model_tag == render.model_path(spec)


def test_scraped_metric_names_are_exported_by_the_runtime():
    source = (ROOT / "runtime" / "server" / "metrics.py").read_text()
    for name in (metrics.WAITING, metrics.RUNNING, metrics.KV_USAGE):
        assert f'"{name}"' in source, name
    for counter in (metrics.PROMPT_TOKENS, metrics.GENERATION_TOKENS):
        # prometheus_client appends _total to counters in the exposition.
        assert f'"{counter.removesuffix("_total")}"' in source or f'"{counter}"' in source, counter


# --- one list of engine settings: the operator's EngineSettings mirror the runtime's config -----------

# Operator field -> (runtime model, runtime field). The operator never imports the runtime; this test does.
_ENGINE_FIELDS = {
    "dtype": ("engine", "dtype"),
    "device": ("engine", "device"),
    "maxModelLen": ("engine", "max_model_len"),
    "maxNumSeqs": ("engine", "max_num_seqs"),
    "maxNumBatchedTokens": ("engine", "max_num_batched_tokens"),
    "blockSize": ("engine", "block_size"),
    "enablePrefixCaching": ("engine", "enable_prefix_caching"),
    "gpuMemoryUtilization": ("engine", "gpu_memory_utilization"),
    "shutdownTimeoutSeconds": ("server", "shutdown_timeout"),
    "tensorParallelSize": ("engine", "tensor_parallel_size"),
}
# Operator-only fields, and where the operator is deliberately stricter than the runtime.
_OPERATOR_ONLY = {"extraArgs"}
_STRICTER = {
    "shutdownTimeoutSeconds": {"type": "integer", "maximum": 3600},  # the pod's termination grace period
    "tensorParallelSize": {"type": "integer", "maximum": 64},  # resources.gpus' bound
}
# Runtime settings the CR does not expose as fields (reachable through extraArgs, or set by the operator).
_NOT_EXPOSED = {
    "model",
    "tokenizer",
    "served_model_name",
    "load_format",
    "num_kv_blocks",
    "kv_cache_memory",
    "enforce_eager",
    "cuda_graph_max_tokens",
    "async_scheduling",
    "attention_backend",
    "seed",
    "max_logprobs",
    "trust_remote_code",
    # Hub fetching is the operator's model cache's job (the runtime gets a local path); chat template
    # and sampling defaults go through extraArgs.
    "revision",
    "download_dir",
    "gguf_file",
    "chat_template",
    "generation_config",
    # Structured-output limits: server-side tuning, through extraArgs.
    "grammar_compile_timeout",
    "grammar_compile_threads",
    "grammar_cache_size",
    "max_grammar_bytes",
    # How a GGUF's quantized matrices are held (packed is CPU-only and opt-in, #19): through extraArgs.
    "gguf_weights",
}
_CONSTRAINTS = ("type", "enum", "minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum")


def _field_schema(schema: dict, name: str) -> dict:
    prop = dict(schema["properties"][name])
    variants = [v for v in prop.pop("anyOf", [prop]) if v.get("type") != "null"]
    assert len(variants) == 1, (name, prop)
    return {k: v for k, v in variants[0].items() if k in _CONSTRAINTS}


def test_engine_settings_have_the_runtime_config_bounds_and_choices():
    config = pytest.importorskip("fleetserve.runtime.config")
    server_config = pytest.importorskip("fleetserve.runtime.server.config")
    from fleetserve.operator.spec import EngineSettings

    ours = EngineSettings.model_json_schema()
    theirs = {
        "engine": config.EngineConfig.model_json_schema(),
        "server": server_config.ServerConfig.model_json_schema(),
    }
    assert set(ours["properties"]) == set(_ENGINE_FIELDS) | _OPERATOR_ONLY
    for op_name, (which, rt_name) in _ENGINE_FIELDS.items():
        want = {**_field_schema(theirs[which], rt_name), **_STRICTER.get(op_name, {})}
        assert _field_schema(ours, op_name) == want, op_name
    exposed = {rt for op, (which, rt) in _ENGINE_FIELDS.items() if which == "engine"}
    assert set(config.EngineConfig.model_fields) == exposed | _NOT_EXPOSED, (
        "a new EngineConfig field: expose it in operator/spec.py EngineSettings or list it in _NOT_EXPOSED"
    )


def test_every_engine_setting_reaches_its_runtime_flag():
    """Each mapped setting, set to a non-default value, arrives in the parsed runtime config."""
    cli = pytest.importorskip("fleetserve.runtime.cli")
    values = {
        "dtype": "float16",
        "device": "cpu",
        "maxModelLen": 1024,
        "maxNumSeqs": 7,
        "maxNumBatchedTokens": 512,
        "blockSize": 32,
        "enablePrefixCaching": False,
        "gpuMemoryUtilization": 0.5,
        "shutdownTimeoutSeconds": 12,
        "tensorParallelSize": 2,
    }
    spec = parse_spec({"engine": values})
    args = render.serve_args("svc", spec)
    assert args[args.index(render.TP_FLAG) + 1] == "2"
    ns = cli.build_parser().parse_args(["serve", *args])
    for op_name, (_, rt_name) in _ENGINE_FIELDS.items():
        assert getattr(ns, rt_name) == values[op_name], op_name
