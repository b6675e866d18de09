"""`python -m fleetserve.operator`: runs the kopf operator with the settings from the environment.

Like `kopf run --standalone -m fleetserve.operator.main [--namespace=...|--all-namespaces]`, plus
the typed memo (operator/memo.py) that the handlers need; the Helm chart uses this entry point.
Env: FLEETSERVE_NAMESPACES (comma-separated, empty = all), FLEETSERVE_LOG_LEVEL
(debug|info|warning), FLEETSERVE_LIVENESS (kopf liveness endpoint URL).
"""
from __future__ import annotations

import os

import kopf

from fleetserve.operator import main as handlers  # noqa: F401  (registers the handlers)
from fleetserve.operator.memo import OperatorMemo


def run() -> None:
    level = os.environ.get("FLEETSERVE_LOG_LEVEL", "info").lower()
    kopf.configure(debug=level == "debug", verbose=level in ("debug", "info"), quiet=level in ("warning", "error"))
    namespaces = handlers.SETTINGS.namespaces
    # Standalone: one operator replica (the chart runs one with a Recreate strategy), no peering CRDs needed.
    kopf.run(standalone=True, clusterwide=not namespaces, namespaces=namespaces, memo=OperatorMemo(),
             liveness_endpoint=os.environ.get("FLEETSERVE_LIVENESS", "http://0.0.0.0:8080/healthz"))


if __name__ == "__main__":
    run()
