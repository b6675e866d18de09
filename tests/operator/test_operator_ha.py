"""Operator HA: two real kopf operators in one peering against kmock; only the higher-priority one acts,
and the other takes over when it goes (the chart's default replicaCount: 2)."""

from __future__ import annotations

import asyncio
import datetime
import time

from kmock import action as _action

from .conftest import (
    DEPLOYMENTS,
    ISVC_RES,
    create,
    eventually,
    get,
    isvc,
    isvc_path,
    operator_running,
    patch,
    peering_object,
)

PEERING = "fleetserve"


def _seqs(server) -> str | None:
    dep = get(server, DEPLOYMENTS, "llm")
    args = dep["spec"]["template"]["spec"]["containers"][0]["args"] if dep else []
    return args[args.index("--max-num-seqs") + 1] if "--max-num-seqs" in args else None


def _peers(server) -> dict:
    obj = next(
        (
            o.raw
            for (res, _, name), o in list(server.objects.items())
            if res.plural == "clusterkopfpeerings" and name == PEERING and not o.deleted
        ),
        {},
    )
    return obj.get("status") or {}


async def test_standby_takes_over_when_the_acting_operator_stops(apiserver):
    await create(apiserver, peering_object(PEERING))
    acting = operator_running(peering=PEERING, priority=100)
    standby = operator_running(peering=PEERING, priority=50)
    await acting.__aenter__()
    try:
        await eventually(lambda: len(_peers(apiserver)) == 1)
        await standby.__aenter__()
        try:
            await eventually(lambda: len(_peers(apiserver)) == 2)
            await create(apiserver, isvc("llm", {"engine": {"maxNumSeqs": 4}}))
            await eventually(lambda: _seqs(apiserver) == "4")
            await asyncio.sleep(1.0)
            # One acting operator: the Deployment was created once, no conflicting second writer.
            creates = [r for r in list(apiserver) if r.resource == DEPLOYMENTS and r.action == _action.CREATE]
            assert len(creates) == 1
        except BaseException:
            await standby.__aexit__(None, None, None)
            raise
    finally:
        # The acting operator goes away as a deleted pod does (SIGTERM: it withdraws from the peering).
        await acting.__aexit__(None, None, None)
    try:
        await eventually(lambda: len(_peers(apiserver)) == 1)
        t0 = time.monotonic()
        await patch(apiserver, isvc_path("llm"), {"spec": {"engine": {"maxNumSeqs": 9}}})
        await eventually(lambda: _seqs(apiserver) == "9", timeout=20)
        print(f"\nstandby reconciled the spec change {time.monotonic() - t0:.1f}s after it was made")
    finally:
        await standby.__aexit__(None, None, None)


async def test_higher_priority_peer_pauses_the_other_until_its_keepalive_expires(apiserver):
    """An acting operator that died without withdrawing (node lost, SIGKILL): its keep-alive blocks the
    standby until the lifetime it announced runs out; then the standby reconciles."""
    await create(apiserver, peering_object(PEERING))
    lifetime = 4
    now = datetime.datetime.now(datetime.timezone.utc)
    ghost = {"priority": 10**9, "lastseen": now.isoformat(), "lifetime": lifetime}
    await patch(
        apiserver, "/apis/kopf.dev/v1/clusterkopfpeerings/" + PEERING, {"status": {"ghost@dead-node": ghost}}
    )
    async with operator_running(peering=PEERING, priority=50):
        await create(apiserver, isvc("llm", {"engine": {"maxNumSeqs": 4}}))
        t0 = time.monotonic()
        await asyncio.sleep(1.5)
        assert get(apiserver, DEPLOYMENTS, "llm") is None  # paused in favour of the (dead) higher priority
        await eventually(lambda: _seqs(apiserver) == "4", timeout=20)
        took = time.monotonic() - t0
        print(f"\nstandby acted {took:.1f}s after the silent peer's last keep-alive (lifetime {lifetime}s)")
        assert took >= lifetime - 1.6
        await eventually(
            lambda: (get(apiserver, ISVC_RES, "llm").get("status") or {}).get("observedGeneration")
        )
