"""`fleetserve` command line: `serve`, `bench serve`, `bench throughput`.

The `serve` flags are generated from EngineConfig and ServerConfig, field by
field (name -> --kebab-case flag, type and choices from the annotation, help from
the field docstring), so a new config field is a new flag with no second list to
keep in sync. Flag names match `vllm serve` where the meaning is the same.
Heavy modules (torch, the engine, aiohttp) are imported only once a command runs:
`fleetserve --help` stays fast.
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import sys
import types
import typing
from typing import Any, Literal, Union

from pydantic import BaseModel, ValidationError

from .config import EngineConfig
from .server.config import ServerConfig

API_KEY_ENV = "FLEETSERVE_API_KEY"
# Kubernetes shows this file's content as the container's termination message (pod status, and the
# operator copies it into the InferenceService's Degraded condition); the kubelet keeps 4096 bytes.
TERMINATION_LOG_ENV = "FLEETSERVE_TERMINATION_LOG"
_TERMINATION_LOG = "/dev/termination-log"
_TERMINATION_LIMIT = 4096


def write_termination_message(message: str) -> str | None:
    """Write a start-up failure where Kubernetes reads it: $FLEETSERVE_TERMINATION_LOG, else
    /dev/termination-log if the kubelet mounted it. Returns the path written, None if none."""
    path = os.environ.get(TERMINATION_LOG_ENV) or (
        _TERMINATION_LOG if os.path.exists(_TERMINATION_LOG) else None
    )
    if not path:
        return None
    data = message.encode("utf-8", errors="replace")[:_TERMINATION_LIMIT]
    try:
        with open(path, "wb") as f:
            f.write(data)
    except OSError:
        return None
    return path


_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(i?b?)\s*$", re.IGNORECASE)


def parse_bytes(text: str) -> int:
    """'4GiB', '512M', '1e9' or a plain integer -> bytes (K/M/G/T are powers of 1024)."""
    m = _SIZE.match(text)
    if not m:
        try:
            return int(float(text))
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a size: {text!r} (try 4GiB, 512MiB or bytes)") from None
    value, unit = float(m.group(1)), m.group(2).lower()
    return int(value * 1024 ** " kmgt".index(unit or " "))


# Short spellings vLLM users type (the long flag is generated from the field name).
FLAG_ALIASES = {"tensor_parallel_size": ("-tp",)}


def _unwrap_optional(ann):
    origin = typing.get_origin(ann)
    if origin in (Union, getattr(types, "UnionType", Union)):
        args = [a for a in typing.get_args(ann) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return ann


def add_model_flags(
    parser: argparse.ArgumentParser,
    model: type[BaseModel],
    *,
    skip: tuple[str, ...] = (),
    env: dict[str, str] | None = None,
) -> None:
    """One flag per pydantic field; absent flags are left out of the namespace (defaults stay the model's)."""
    group = parser.add_argument_group(model.__name__)
    for name, field in model.model_fields.items():
        if name in skip:
            continue
        flag = "--" + name.replace("_", "-")
        ann = _unwrap_optional(field.annotation)
        default = field.get_default(call_default_factory=True)
        help_text = (field.description or "").replace("%", "%%")
        if env and name in env:
            help_text += f" Also read from ${env[name]}."
        elif name != "api_key" and default is not None:
            help_text += f" (default: {default})"
        kw: dict[str, Any] = dict(dest=name, default=argparse.SUPPRESS, help=help_text)
        if ann is bool:
            kw["action"] = argparse.BooleanOptionalAction
        elif typing.get_origin(ann) is Literal:
            kw["choices"] = list(typing.get_args(ann))
        elif ann is int and name.endswith(("memory", "_bytes")):
            kw["type"], kw["metavar"] = parse_bytes, "BYTES"
        elif ann in (int, float, str):
            kw["type"] = ann
        else:
            raise TypeError(f"no CLI mapping for {model.__name__}.{name}: {field.annotation}")
        group.add_argument(flag, *FLAG_ALIASES.get(name, ()), **kw)


def _fields(ns: argparse.Namespace, model: type[BaseModel]) -> dict:
    return {k: v for k, v in vars(ns).items() if k in model.model_fields}


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = argparse.ArgumentParser(prog="fleetserve", description="fleetserve: LLM serving runtime.")
    parser.add_argument("--version", action="version", version=f"fleetserve {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser(
        "serve",
        help="Serve a model over an OpenAI-compatible HTTP API.",
        description="Serve a model over an OpenAI-compatible HTTP API (/v1/completions, "
        "/v1/chat/completions, /v1/models, /health, /metrics, ...).",
    )
    serve.add_argument(
        "model_tag",
        nargs="?",
        default=None,
        metavar="MODEL",
        help="Model to serve (same as --model); omit it to serve the embedded SmolLM2-135M-Instruct.",
    )
    add_model_flags(serve, EngineConfig)
    add_model_flags(serve, ServerConfig, env={"api_key": API_KEY_ENV})

    bench = sub.add_parser("bench", help="Benchmarks.")
    bench_sub = bench.add_subparsers(dest="bench_command", required=True)
    from .bench import serve as bench_serve

    bs = bench_sub.add_parser(
        "serve",
        help="Load-test an OpenAI-compatible server (TTFT, TPOT, ITL, throughput).",
        description=bench_serve.__doc__.splitlines()[0],
    )
    bench_serve.add_cli_args(bs)
    bench_sub.add_parser(
        "throughput", add_help=False, help="Offline engine throughput (fleetserve.runtime.bench.throughput)."
    ).add_argument("rest", nargs=argparse.REMAINDER)
    return parser


def _setup_logging(level: str) -> None:
    logging.basicConfig(
        level=getattr(logging, level.upper()),
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )


def _serve(ns: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    engine_kw = _fields(ns, EngineConfig)
    if ns.model_tag is not None:
        engine_kw["model"] = ns.model_tag
    server_kw = _fields(ns, ServerConfig)
    if "api_key" not in server_kw and os.environ.get(API_KEY_ENV):
        server_kw["api_key"] = os.environ[API_KEY_ENV]
    try:
        engine_config = EngineConfig(**engine_kw)
        server_config = ServerConfig(**server_kw)
    except ValidationError as e:
        write_termination_message(f"fleetserve serve: invalid arguments: {e}")
        parser.error(str(e))
    _setup_logging(server_config.log_level)
    import asyncio

    from .core_client import EngineStartError
    from .server.app import run_server

    try:
        return asyncio.run(run_server(engine_config, server_config)) or 0
    # Start-up failed: say why, in the log and where Kubernetes looks (the termination message).
    except EngineStartError as e:  # the core process logged the details (and traceback) already
        logging.getLogger("fleetserve.server").error("the engine did not start: %s", e)
        write_termination_message(f"fleetserve serve failed to start: {e}")  # e names the cause's type
        return 1
    except Exception as e:  # model load in thread mode, port in use, ...
        logging.getLogger("fleetserve").error("fleetserve serve failed to start", exc_info=True)
        write_termination_message(f"fleetserve serve failed to start: {type(e).__name__}: {e}")
        return 1


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:2] == ["bench", "throughput"]:
        # Every argument (--help included) belongs to that module's own parser.
        from .bench.throughput import main as throughput_main

        return throughput_main(argv[2:]) or 0
    parser = build_parser()
    ns = parser.parse_args(argv)
    if ns.command == "serve":
        return _serve(ns, parser)
    if ns.bench_command == "serve":
        from .bench.serve import run

        _setup_logging("info")
        return run(ns)
    parser.error("unknown command")
    return 2


if __name__ == "__main__":
    sys.exit(main())
