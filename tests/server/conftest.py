"""One real server for the whole session: the embedded SmolLM2 on CPU, real HTTP on 127.0.0.1.

The engine is loaded once (AsyncLLM) and shared by several apps on random
ports, each with its own ServerConfig:
- "main": API key required, 1 MiB body limit (most tests);
- "tight": max_waiting_requests=2, no key (overload tests).
The event loop runs in its own thread, so tests can use blocking clients (the
sync openai SDK) as well as their own event loops (async SDK, aiohttp).
"""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

API_KEY = "test-key"
ENGINE_KW = dict(max_model_len=512, num_kv_blocks=512, max_num_seqs=64, seed=0)


class ServerThread:
    def __init__(self, engine_config, server_configs: dict, engine_process: bool = False):
        self.engine_config = engine_config
        self.engine_process = engine_process
        self.server_configs = server_configs
        self.urls: dict[str, str] = {}
        self.apps: dict = {}
        self.llm = None
        self.loop: asyncio.AbstractEventLoop | None = None
        self._ready = threading.Event()
        self._stop: asyncio.Event | None = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._main, name="test-server", daemon=True)

    def start(self, timeout: float = 300):
        self._thread.start()
        if not self._ready.wait(timeout) or self._error:
            raise RuntimeError(f"server did not start: {self._error!r}")
        return self

    def stop(self):
        if self.loop and self._stop:
            self.loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(60)
        # The engine (through llm and the apps' handlers) must not outlive the server: a GPU test
        # after this one sizes its KV cache from the memory left.
        self.llm = None
        self.apps = {}

    def _main(self):
        try:
            asyncio.run(self._serve())
        except BaseException as e:  # surfaced by start()
            self._error = e
            self._ready.set()

    async def _serve(self):
        from aiohttp import web

        from fleetserve.runtime.async_engine import AsyncLLM
        from fleetserve.runtime.server.app import create_app

        self.loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        self.llm = await asyncio.to_thread(
            AsyncLLM.from_config, self.engine_config, engine_process=self.engine_process
        )
        self.llm.start()
        runners = []
        for name, cfg in self.server_configs.items():
            app = create_app(self.engine_config, cfg, llm=self.llm)
            runner = web.AppRunner(app, handler_cancellation=True, shutdown_timeout=5, access_log=None)
            await runner.setup()
            await web.TCPSite(runner, "127.0.0.1", 0).start()
            self.urls[name] = f"http://127.0.0.1:{runner.addresses[0][1]}"
            self.apps[name] = app
            runners.append(runner)
        self._ready.set()
        await self._stop.wait()
        for r in runners:
            await r.cleanup()
        await asyncio.to_thread(self.llm.shutdown)

    def serving(self, name: str = "main"):
        from fleetserve.runtime.server.app import SERVING

        return self.apps[name][SERVING]


@pytest.fixture(scope="session")
def server():
    from fleetserve.runtime.config import EngineConfig
    from fleetserve.runtime.server.config import ServerConfig

    srv = ServerThread(
        EngineConfig(**ENGINE_KW),
        {
            "main": ServerConfig(api_key=API_KEY, max_request_body_bytes=1 << 20),
            "tight": ServerConfig(max_waiting_requests=2),
        },
    ).start()
    yield srv
    srv.stop()


@pytest.fixture(scope="session")
def base_url(server) -> str:
    return server.urls["main"]


@pytest.fixture(scope="session")
def model_name(server) -> str:
    return server.serving().served_model_name


@pytest.fixture(scope="session")
def tokenizer(server):
    return server.llm.tokenizer


@pytest.fixture(scope="session")
def client(base_url):
    import openai

    return openai.OpenAI(base_url=base_url + "/v1", api_key=API_KEY, max_retries=0, timeout=120)


@pytest.fixture
def auth() -> dict:
    return {"Authorization": f"Bearer {API_KEY}"}


def metric_values(base_url: str) -> dict[str, float]:
    """Sample name (with sorted labels except model_name) -> value, parsed by prometheus-client's parser."""
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(base_url + "/metrics", timeout=30) as r:
        text = r.read().decode()
    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(s.labels.items()) if k != "model_name")
            out[s.name + (f"{{{labels}}}" if labels else "")] = s.value
    return out


def wait_for_idle(server, timeout: float = 60.0) -> None:
    """Until the engine holds no request and no KV block (aborts are applied between steps)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        s = server.llm.stats
        if (
            s.num_running == 0
            and s.num_waiting == 0
            and s.kv_cache_usage == 0
            and not server.llm.num_in_flight
        ):
            return
        time.sleep(0.05)
    raise AssertionError(f"engine not idle after {timeout}s: {server.llm.stats}")
