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
    return [pytest.param(raw, id=label) for label, raw in SPECS.items()] + \
        [pytest.param(cr["spec"], id=cr["metadata"]["name"]) for cr in _example_crs()]


@pytest.mark.parametrize("raw", _all_specs())
def test_rendered_serve_args_parse_with_the_runtime_cli(raw):
    cli = pytest.importorskip("fleetserve.runtime.cli")
    spec = parse_spec(raw)
    args = render.serve_args("svc", spec)
    ns = cli.build_parser().parse_args(["serve", *args])
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
