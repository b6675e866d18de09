"""The aiohttp application: app factory, middlewares, engine lifecycle, server runner.

Lifecycle (owned here):
- startup (cleanup context): start the engine core (its own process by default,
  ServerConfig.engine_process; else a thread) and wait for its model off the event
  loop, attach the metrics observer, log what is served;
- the engine core dies (crash, killed): /health and new requests answer 503,
  streams in flight end with an error, the server shuts down and `run_server`
  returns exit code 1;
- SIGTERM / SIGINT: stop listening (new connections are refused), answer 503 to
  new requests on open connections, let in-flight requests finish within
  ServerConfig.shutdown_timeout, then cut the rest (aborted in the engine; a stream
  gets a final error event and [DONE], any other request a 503 body; the log says
  how many), stop the engine, exit 0.

Middlewares: errors (outermost: every failure becomes an OpenAI error body),
then auth + draining. /health, /metrics and /version need no API key.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import signal
from collections.abc import Awaitable, Callable

from aiohttp import web

from .. import __version__
from ..async_engine import AsyncLLM
from ..config import EngineConfig
from .config import ServerConfig
from .errors import (
    APIError,
    Unauthorized,
    error_response,
    from_api_error,
    from_http_exception,
    internal_error,
)
from .metrics import ServerMetrics
from .routes import OpenAIServing

logger = logging.getLogger("fleetserve.server")

SERVING = web.AppKey("serving", OpenAIServing)
SERVER_CONFIG = web.AppKey("server_config", ServerConfig)
_OPEN_PATHS = frozenset({"/health", "/metrics", "/version", "/ping"})


@web.middleware
async def error_middleware(request: web.Request, handler):
    try:
        return await handler(request)
    except APIError as e:
        return from_api_error(e)
    except web.HTTPException as e:
        if e.status < 400:
            raise
        return from_http_exception(e)
    except (asyncio.CancelledError, ConnectionError):
        raise
    except Exception:
        logger.exception("unhandled error on %s %s", request.method, request.path)
        return internal_error()


@web.middleware
async def gate_middleware(request: web.Request, handler):
    if request.path in _OPEN_PATHS:
        return await handler(request)
    key = request.app[SERVER_CONFIG].api_key
    if key:
        header = request.headers.get("Authorization", "")
        scheme, _, token = header.partition(" ")
        # compare_digest takes the same time wherever the strings differ: no timing oracle on the key.
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), key.encode()):
            raise Unauthorized(
                "Incorrect or missing API key."
                if header
                else "Missing API key: send 'Authorization: Bearer <key>'.",
                code="invalid_api_key",
            )
    serving = request.app.get(SERVING)
    if serving is not None and serving.draining:
        cfg = request.app[SERVER_CONFIG]
        return error_response(
            503,
            "Server is shutting down.",
            "service_unavailable",
            headers={"Retry-After": str(cfg.retry_after_seconds)},
        )
    return await handler(request)


def _route(name: str):
    async def handler(request: web.Request):
        return await getattr(request.app[SERVING], name)(request)

    handler.__name__ = name
    return handler


async def _version(request: web.Request) -> web.Response:
    return web.json_response({"version": __version__})


async def _ping(request: web.Request) -> web.Response:
    return web.Response(status=200)


def describe_engine(llm: AsyncLLM) -> dict:
    engine = llm.engine
    cfg = getattr(engine, "config", None)
    return {
        "model": llm.model_name,
        "dtype": str(getattr(engine, "dtype", getattr(cfg, "dtype", "?"))).replace("torch.", ""),
        "device": str(getattr(engine, "device", getattr(cfg, "device", "?"))),
        "max_model_len": llm.max_model_len,
        "kv_blocks": getattr(engine, "num_kv_blocks", None),
        "block_size": getattr(engine, "block_size", getattr(cfg, "block_size", None)),
        "max_concurrency": getattr(engine, "max_concurrency", None),
    }


def _engine_in_own_process(server_config: ServerConfig, engine_config: EngineConfig) -> bool:
    """ServerConfig.engine_process, or when unset: its own process on CUDA, a thread on CPU."""
    if server_config.engine_process is not None:
        return server_config.engine_process
    if engine_config.device != "auto":
        return engine_config.device == "cuda"
    import torch

    return torch.cuda.is_available()


def create_app(
    engine_config: EngineConfig | None = None,
    server_config: ServerConfig | None = None,
    *,
    llm: AsyncLLM | None = None,
) -> web.Application:
    """The app; it loads the engine from engine_config on startup unless a running `llm` is given
    (then the caller owns that engine's lifecycle, e.g. tests sharing one engine across apps)."""
    engine_config = engine_config or EngineConfig()
    server_config = server_config or ServerConfig()
    app = web.Application(
        client_max_size=server_config.max_request_body_bytes, middlewares=[error_middleware, gate_middleware]
    )
    app[SERVER_CONFIG] = server_config

    async def engine_ctx(app: web.Application):
        owned = llm is None
        if llm is not None:
            engine = llm
        elif _engine_in_own_process(server_config, engine_config):
            # Spawned from the loop's thread (it outlives start-up); the model loads in the core meanwhile.
            client = AsyncLLM.spawn_core(engine_config, server_config.log_level)
            try:
                await asyncio.to_thread(client.wait_ready)
            except BaseException:
                await asyncio.to_thread(client.shutdown, 5.0)
                raise
            engine = AsyncLLM(client=client)
        else:
            engine = await asyncio.to_thread(AsyncLLM.from_config, engine_config)
        engine.start()
        served = engine_config.served_model_name or engine.model_name
        metrics = ServerMetrics(
            served, lambda: engine.stats, lambda: engine.num_waiting, engine.max_model_len
        )
        engine.add_observer(metrics.observer)
        app[SERVING] = OpenAIServing(engine, server_config, metrics, served, engine_config.model)
        info = describe_engine(engine)
        logger.info(
            "engine ready: model=%s served as %r, dtype=%s, device=%s, max_model_len=%s, KV blocks=%s x %s "
            "tokens, max concurrency %.1fx (requests of max_model_len tokens)",
            info["model"],
            served,
            info["dtype"],
            info["device"],
            info["max_model_len"],
            info["kv_blocks"],
            info["block_size"],
            float(info["max_concurrency"] or 0),
        )
        if engine.core_pid is not None:
            logger.info("engine loop runs in its own process (pid %d)", engine.core_pid)
        defaults = app[SERVING].generation_defaults
        if defaults:
            logger.info(
                "sampling defaults for requests that omit them (the model's; --generation-config vllm "
                "ignores them): %s",
                ", ".join(f"{k}={v}" + (" (chat)" if k == "max_tokens" else "") for k, v in defaults.items()),
            )
        else:
            logger.info(
                "sampling defaults: none from the model (%s): temperature=1.0, top_p=1.0, top_k=0, "
                "repetition_penalty=1.0 unless a request sets them",
                engine_config.generation_config,
            )
        try:
            yield
        finally:
            engine.remove_observer(metrics.observer)
            if owned:
                await asyncio.to_thread(engine.shutdown)

    async def on_shutdown(app: web.Application):
        # aiohttp calls this after the listeners closed and before it waits for (then cancels) the
        # handlers: draining and cutting here lets every cut request still answer properly.
        serving = app.get(SERVING)
        if serving is None:
            return
        serving.draining = True
        loop = asyncio.get_running_loop()
        deadline = loop.time() + server_config.shutdown_timeout
        while serving.num_in_flight and loop.time() < deadline:
            await asyncio.sleep(0.05)
        if serving.num_in_flight:
            streams, others = serving.cut_in_flight()
            logger.warning(
                "shutdown timeout (%.0fs) reached: cut %d in-flight requests (%d streams ended with an "
                "error event and [DONE], %d answered 503)",
                server_config.shutdown_timeout,
                streams + others,
                streams,
                others,
            )
            while serving.num_in_flight and loop.time() < deadline + 5:  # let them write their last bytes
                await asyncio.sleep(0.01)

    app.cleanup_ctx.append(engine_ctx)
    app.on_shutdown.append(on_shutdown)
    r = app.router
    r.add_post("/v1/completions", _route("completions"))
    r.add_post("/v1/chat/completions", _route("chat_completions"))
    r.add_get("/v1/models", _route("list_models"))
    r.add_get("/v1/models/{model:.+}", _route("get_model"))
    r.add_post("/tokenize", _route("tokenize"))
    r.add_post("/detokenize", _route("detokenize"))
    r.add_get("/health", _route("health"))
    r.add_get("/metrics", _route("metrics_endpoint"))
    r.add_get("/version", _version)
    r.add_get("/ping", _ping)
    return app


_EVERY_INTERFACE = frozenset({"", "0.0.0.0", "::", "[::]", "*"})


def exposure_warning(server_config: ServerConfig) -> str | None:
    """The start-up warning for a server that every host on the network may call without a key."""
    if server_config.host.strip() in _EVERY_INTERFACE and not server_config.api_key:
        return (
            f"listening on every interface ({server_config.host or '*'}) without an API key: anyone who can "
            "reach this port can use the model; set --api-key (or FLEETSERVE_API_KEY), or --host 127.0.0.1"
        )
    return None


async def run_server(
    engine_config: EngineConfig | None = None,
    server_config: ServerConfig | None = None,
    *,
    llm: AsyncLLM | None = None,
    stop: asyncio.Event | None = None,
    on_ready: Callable[[str], Awaitable[None] | None] | None = None,
    handle_signals: bool = True,
) -> int:
    """Serves until SIGTERM/SIGINT (or `stop` is set), then drains and returns 0; returns 1 after
    shutting down because the engine core died."""
    server_config = server_config or ServerConfig()
    exit_code = 0
    app = create_app(engine_config, server_config, llm=llm)
    runner = web.AppRunner(
        app, handler_cancellation=True, shutdown_timeout=server_config.shutdown_timeout, access_log=None
    )
    await runner.setup()  # runs the startup half of engine_ctx: the model is loaded before we listen
    try:
        site = web.TCPSite(runner, server_config.host, server_config.port)
        await site.start()
        port = runner.addresses[0][1]
        url = f"http://{server_config.host}:{port}"
        stop = stop or asyncio.Event()
        loop = asyncio.get_running_loop()
        if handle_signals:
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.add_signal_handler(sig, stop.set)
        logger.info(
            "serving %s on %s (API key %s)",
            app[SERVING].served_model_name,
            url,
            "required" if server_config.api_key else "not required",
        )
        warning = exposure_warning(server_config)
        if warning:
            logger.warning(warning)
        if on_ready is not None:
            res = on_ready(url)
            if asyncio.iscoroutine(res):
                await res
        llm_running = app[SERVING].llm
        waits = [asyncio.ensure_future(stop.wait())]
        if llm_running.died is not None:
            waits.append(asyncio.ensure_future(llm_running.died.wait()))
        await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        for w in waits:
            w.cancel()
        if llm_running.died is not None and llm_running.died.is_set() and not stop.is_set():
            exit_code = 1
            app[SERVING].draining = True
            logger.error("engine core died: shutting down with exit code 1")
        logger.info(
            "shutting down: refusing new requests, draining %d in flight (up to %.0fs)",
            app[SERVING].llm.num_in_flight,
            server_config.shutdown_timeout,
        )
        if handle_signals:
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.remove_signal_handler(sig)
    finally:
        await runner.cleanup()
    logger.info("server stopped")
    return exit_code
