"""`python -m fleetserve.operator`: runs the kopf operator with the settings from the environment.

Like `kopf run --standalone -m fleetserve.operator.main [--namespace=...|--all-namespaces]`, plus the
typed memo (operator/memo.py) that the handlers need; or, with FLEETSERVE_PEERING set,
`kopf run --peering=NAME --priority=RANDOM ...`: several replicas, of which the one with the highest
priority acts (kopf pauses the others, and *all* of them when two share a priority, hence a random one
per process). The Helm chart uses this entry point. Env: FLEETSERVE_NAMESPACES (comma-separated,
empty = all), FLEETSERVE_LOG_LEVEL (debug|info|warning), FLEETSERVE_LIVENESS (kopf liveness endpoint
URL), FLEETSERVE_PEERING, FLEETSERVE_PEERING_LIFETIME.
"""

from __future__ import annotations

import os
import random

import kopf

from fleetserve.operator import main as handlers  # noqa: F401  (registers the handlers)
from fleetserve.operator.memo import OperatorMemo


def run() -> None:
    level = os.environ.get("FLEETSERVE_LOG_LEVEL", "info").lower()
    kopf.configure(
        debug=level == "debug", verbose=level in ("debug", "info"), quiet=level in ("warning", "error")
    )
    namespaces = handlers.SETTINGS.namespaces
    liveness = os.environ.get("FLEETSERVE_LIVENESS", "http://0.0.0.0:8080/healthz")
    if not handlers.SETTINGS.peering:
        # Standalone: one operator replica (the chart then runs one with a Recreate strategy).
        kopf.run(
            standalone=True,
            clusterwide=not namespaces,
            namespaces=namespaces,
            memo=OperatorMemo(),
            liveness_endpoint=liveness,
        )
        return
    # Peering is mandatory once named: a missing peering object stops the operator instead of letting
    # two replicas act at once.
    kopf.run(
        standalone=False,
        peering_name=handlers.SETTINGS.peering,
        priority=random.SystemRandom().randint(1, 2**31 - 1),
        clusterwide=not namespaces,
        namespaces=namespaces,
        memo=OperatorMemo(),
        liveness_endpoint=liveness,
    )


if __name__ == "__main__":
    run()
