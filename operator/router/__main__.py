"""`python -m fleetserve.operator.router`: the router of one InferenceService.

Configuration from FLEETSERVE_ROUTER_* (router/config.py); the operator renders them. Runs the
endpoint watch, the replica scrape loop and the HTTP server in one event loop until SIGTERM,
then stops accepting and lets requests in flight finish (up to FLEETSERVE_ROUTER_DRAIN_SECONDS).
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal

from aiohttp import web

from fleetserve.operator.router.config import RouterConfig
from fleetserve.operator.router.discovery import DemandSignal, EndpointWatcher, KubeClient
from fleetserve.operator.router.proxy import Router


async def serve(cfg: RouterConfig, drain_seconds: float = 30.0) -> None:
    kube = KubeClient(cfg.apiserver)
    router = Router(cfg, DemandSignal(kube, cfg))
    watcher = EndpointWatcher(kube, cfg, router.set_members)
    runner = web.AppRunner(
        router.app(), handler_cancellation=True, access_log=None, shutdown_timeout=drain_seconds
    )
    await runner.setup()
    await web.TCPSite(runner, cfg.host, cfg.port).start()
    logging.getLogger("fleetserve.router").info(
        "router for %s/%s listening on %s:%s", cfg.namespace, cfg.service, cfg.host, cfg.port
    )
    tasks = [asyncio.create_task(watcher.run()), asyncio.create_task(router.scrape_loop())]
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    try:
        await runner.cleanup()  # stops accepting, waits for in-flight requests
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await kube.close()


def main() -> None:
    level = os.environ.get("FLEETSERVE_LOG_LEVEL", "info").upper()
    logging.basicConfig(
        level=getattr(logging, level, logging.INFO), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    cfg = RouterConfig.from_env()
    if not cfg.service:
        raise SystemExit("FLEETSERVE_ROUTER_SERVICE (the runtime Service to route to) is required")
    asyncio.run(serve(cfg, float(os.environ.get("FLEETSERVE_ROUTER_DRAIN_SECONDS") or 30)))


if __name__ == "__main__":
    main()
