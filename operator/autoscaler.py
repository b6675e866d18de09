"""Queue-depth autoscaling decisions: a pure function of observations, windows and time.

Owns the rule desired = clamp(ceil((waiting + running) / targetQueueDepth), min, max),
stabilised the way the HPA does it: a scale up applies the *lowest* recommendation
seen over the up window (a spike must last), a scale down the *highest* over the
down window (a lull must last), and nothing changes within the cool-down after the
previous change. The recommendation history is kept in the operator's memory; after
an operator restart the windows simply fill again, which can only delay a change.

Scale from zero: with no pod there is no queue to observe, so the router (operator/router/)
reports requests waiting for a replica as *demand* (an annotation with a time). Current
demand scales a service at zero replicas up at once, past windows and cool-down (a request is
waiting), and keeps an idle service from going back to zero while it lasts.

The decision is applied by the caller through the InferenceService's scale
subresource, the same door `kubectl scale`, an HPA or KEDA use.
"""

from __future__ import annotations

import datetime
import math
from dataclasses import dataclass, field

from fleetserve.operator.spec import Autoscaling


@dataclass(frozen=True)
class Decision:
    current: int
    recommended: int
    """The raw, clamped recommendation from this observation."""
    desired: int
    """After stabilization and cool-down: what the replica count should be now."""
    reason: str

    @property
    def changes(self) -> bool:
        return self.desired != self.current


@dataclass
class History:
    """Recommendations (time, replicas) within the longest window, and the time of the last change."""

    samples: list[tuple[float, int]] = field(default_factory=list)
    first_seen: float | None = None
    last_scale: float | None = None


def recommend(load: float, cfg: Autoscaling, demand: bool = False) -> int:
    raw = math.ceil(load / cfg.targetQueueDepth) if load > 0 else 0
    floor = cfg.minReplicas if cfg.scaleToZero and not demand else max(cfg.minReplicas, 1)
    return min(max(raw, floor), cfg.effective_max)


def wake_from_zero(current: int, cfg: Autoscaling, demand: bool) -> Decision | None:
    """The scale up from zero when requests wait at the router; None when it does not apply."""
    if current != 0 or not demand:
        return None
    desired = min(max(cfg.minReplicas, 1), cfg.effective_max)
    return Decision(current, desired, desired, "requests are waiting at the router (scale from zero)")


def demand_is_current(stamp: str | None, now_wall: float, ttl: float) -> bool:
    """Whether a demand annotation (RFC 3339, from the router) is at most `ttl` seconds old."""
    if not stamp:
        return False
    try:
        then = datetime.datetime.strptime(stamp, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=datetime.timezone.utc)
    except ValueError:
        return False
    # A router clock slightly ahead still counts; one far ahead (bogus) does not keep a service up forever.
    return -ttl <= now_wall - then.timestamp() <= ttl


def decide(
    now: float,
    current: int,
    waiting: float,
    running: float,
    cfg: Autoscaling,
    history: History,
    load_known: bool = True,
    demand: bool = False,
) -> Decision:
    """The replica count to run now. Without a load reading (no ready pod answered) only bounds are enforced.

    `demand`: the router reported requests waiting for a replica recently (see wake_from_zero)."""
    load = waiting + running
    rec = recommend(load, cfg, demand)
    # Out-of-bounds replica counts (e.g. kubectl scale past maxReplicas) are corrected at once.
    bounded = min(max(current, cfg.minReplicas), cfg.effective_max)
    if bounded != current:
        return Decision(
            current, rec, bounded, f"replicas {current} outside [{cfg.minReplicas}, {cfg.effective_max}]"
        )
    wake = wake_from_zero(current, cfg, demand)
    if wake is not None:
        return wake
    if not load_known:
        return Decision(current, current, current, "no ready pod reported metrics")

    if history.first_seen is None:
        history.first_seen = now
    history.samples.append((now, rec))
    horizon = max(cfg.scaleUpStabilizationSeconds, cfg.scaleDownStabilizationSeconds)
    history.samples = [(t, r) for t, r in history.samples if t >= now - horizon]

    if history.last_scale is not None and now - history.last_scale < cfg.cooldownSeconds:
        return Decision(current, rec, current, "cooling down after the last scale change")

    def window(seconds: int) -> list[int]:
        return [r for t, r in history.samples if t >= now - seconds]

    desc = f"load {load:g} (waiting {waiting:g} + running {running:g}), target {cfg.targetQueueDepth:g} per replica"
    if rec > current:
        # A window only counts once it has been fully observed: after a restart we wait.
        if now - history.first_seen < cfg.scaleUpStabilizationSeconds:
            return Decision(current, rec, current, "scale-up window not yet observed")
        desired = max(min(window(cfg.scaleUpStabilizationSeconds)), current)
        return Decision(current, rec, desired, desc)
    if rec < current:
        if now - history.first_seen < cfg.scaleDownStabilizationSeconds:
            return Decision(current, rec, current, "scale-down window not yet observed")
        desired = min(max(window(cfg.scaleDownStabilizationSeconds)), current)
        return Decision(current, rec, desired, desc)
    return Decision(current, rec, current, desc)


def record_change(history: History, now: float) -> None:
    history.last_scale = now
