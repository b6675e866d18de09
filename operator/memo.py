"""OperatorMemo: the typed state kopf hands every handler as `memo`.

`python -m fleetserve.operator` passes one to `kopf.run(memo=...)`. kopf gives each
InferenceService a shallow copy (`copy.copy`) of that root memo: the operator-wide
fields (set by the startup handler) are shared by reference, and `__copy__` starts
every object's own state fresh, so one service's lock, scrape rates or scaling
history never leak into another's. Never imports torch or fleetserve.runtime.
"""

from __future__ import annotations

import dataclasses
import threading
from typing import Any

from fleetserve.operator.autoscaler import History
from fleetserve.operator.metrics import RateTracker
from fleetserve.operator.settings import OperatorSettings


@dataclasses.dataclass
class OperatorMemo:
    # -- operator-wide: set once by the startup handler -----------------------------------------
    settings: OperatorSettings = dataclasses.field(default_factory=OperatorSettings)
    """Operator settings from the environment."""
    api: Any = None
    """kubernetes.client.ApiClient for the handlers; None until startup ran."""
    pdb_api: str | None = None
    """PodDisruptionBudget apiVersion the cluster serves (policy/v1 or v1beta1); None: no PDBs."""

    # -- per InferenceService: fresh in every copy ------------------------------------------------
    apply_lock: threading.Lock = dataclasses.field(default_factory=threading.Lock)
    """The reconcile handler and the timer both apply children (each in a worker thread): one at a time."""
    apply_error: str | None = None
    """The last failed apply's error, for status (Degraded=ApplyFailed) until an apply succeeds."""
    pdb_off_checked: bool = False
    """A switched-off PodDisruptionBudget was already looked for (and deleted)."""
    ready_pods: dict[str, str] = dataclasses.field(default_factory=dict)
    """Ready pods at the last status computation: name -> pod-template hash (to tell a lost replica)."""
    rates: RateTracker = dataclasses.field(default_factory=RateTracker)
    """Counter samples per pod, to turn scraped counters into rates."""
    history: History = dataclasses.field(default_factory=History)
    """The autoscaler's recommendation history."""
    router_off_checked: bool = False
    """A switched-off router's Deployment and Service were already looked for (and deleted)."""
    woken_from_generation: int | None = None
    """The spec generation at which this service was last scaled up from zero (so that the timer and the
    demand handler do not both wake, and announce, the same scale-up)."""

    @property
    def started(self) -> bool:
        return self.api is not None

    def __copy__(self) -> OperatorMemo:
        return OperatorMemo(settings=self.settings, api=self.api, pdb_api=self.pdb_api)


__all__ = ["OperatorMemo"]
