"""Core clients: how AsyncLLM reaches an EngineCore — in a thread, or in a spawned process.

Both clients offer the same small surface to AsyncLLM (runtime/async_engine.py):
`info` / `tokenizer` / `stats` (known once the core is up), `start(on_batch,
on_stopped)` (callbacks run on the event loop), `send(op)` (from the event loop),
`shutdown()` (blocking; from a worker thread) and `is_running`.

- ThreadCoreClient: the EngineCore loop in a thread of this process; batches are
  handed to the event loop with call_soon_threadsafe, without encoding. Used by
  tests and by `serve --no-engine-process`.
- ProcessCoreClient: the EngineCore in its own process (multiprocessing spawn
  context, so no CUDA or lock state is inherited). Two one-way pipes carry
  pickled operations in and pickled batches out; the event loop reads the
  output pipe with add_reader, so no thread of this process competes with
  detokenization and SSE. The core ends when the server asks it to, when the
  request pipe closes (the server died), or (Linux, started from the main thread)
  by PR_SET_PDEATHSIG when the server process dies.
"""

from __future__ import annotations

import asyncio
import logging
import multiprocessing
import os
import pickle
import queue
import threading
import time
from collections.abc import Callable

from .engine_core import PICKLE_PROTOCOL, Batch, EngineCore, EngineInfo, core_process_main, stats_dict

logger = logging.getLogger("fleetserve.core_client")

OnBatch = Callable[[Batch], None]
OnStopped = Callable[[str, bool], None]  # (reason, crashed)


class EngineStartError(RuntimeError):
    """The engine core process could not start (the core's own error is in the message)."""


class ThreadCoreClient:
    def __init__(self, engine):
        self.engine = engine
        self.info = EngineInfo.of(engine)
        self.tokenizer = engine.tokenizer
        self.stats = stats_dict(engine.get_stats())
        self._ops: queue.Queue[tuple] = queue.Queue()
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    @property
    def is_running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def start(self, on_batch: OnBatch, on_stopped: OnStopped) -> None:
        self._loop = asyncio.get_running_loop()
        core = EngineCore(self.engine, self._ops, lambda batch: self._post(on_batch, batch))
        if hasattr(self.engine, "on_fatal"):  # a dead tensor-parallel worker ends the loop
            self.engine.on_fatal(lambda message: self._ops.put(("fatal", message)))

        def run():
            try:
                core.run()
            except BaseException as e:  # the engine is broken: fail every request, health turns 503
                logger.exception("engine loop crashed")
                detail = f": {e}" if str(e) else ""
                self._post(on_stopped, f"engine loop crashed: {type(e).__name__}{detail}", True)
                return
            self._post(on_stopped, "engine is shut down", False)

        self._thread = threading.Thread(target=run, name="fleetserve-engine", daemon=True)
        self._thread.start()

    def _post(self, fn, *args) -> None:
        loop = self._loop
        if loop is None or loop.is_closed():
            return
        try:
            loop.call_soon_threadsafe(fn, *args)
        except RuntimeError:  # loop closed between the check and the call
            pass

    def send(self, op: tuple) -> None:
        self._ops.put(op)

    def shutdown(self, timeout: float = 30.0) -> None:
        self._ops.put(("shutdown",))
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout)


class ProcessCoreClient:
    # Batches handled per wake-up of the event loop, so that one busy pipe cannot starve the handlers.
    _MAX_BATCHES_PER_WAKEUP = 8

    def __init__(self, config, log_level: str = "info"):
        ctx = multiprocessing.get_context("spawn")
        req_r, self._req_w = ctx.Pipe(duplex=False)
        self._out_r, out_w = ctx.Pipe(duplex=False)
        # PR_SET_PDEATHSIG fires when the *thread* that started the child ends: only ask for it from the main thread.
        parent_pid = os.getpid() if threading.current_thread() is threading.main_thread() else None
        self.process = ctx.Process(
            target=core_process_main,
            name="fleetserve-engine-core",
            daemon=True,
            args=(config, req_r, out_w, log_level, parent_pid),
        )
        self.process.start()
        req_r.close()  # the child holds its own copies; ours would hide the other side's death
        out_w.close()
        logger.info("engine core process started (pid %d)", self.process.pid)
        self.info: EngineInfo | None = None
        self.tokenizer = None
        self.stats: dict = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._on_batch: OnBatch | None = None
        self._on_stopped: OnStopped | None = None
        self._stopping = False
        self._ended = False
        # Writes happen on a thread of their own: a burst of large prompts fills the pipe faster than
        # the core reads it between steps, and the event loop must not wait for that.
        self._send_q: queue.Queue[bytes | None] = queue.Queue()
        self._writer = threading.Thread(target=self._write_loop, name="core-client-writer", daemon=True)
        self._writer.start()

    def _write_loop(self) -> None:
        while True:
            data = self._send_q.get()
            if data is None:
                return
            try:
                self._req_w.send_bytes(data)
            except OSError:
                return  # the core is gone: the output pipe's EOF reports it

    def wait_ready(self, timeout: float = 3600.0) -> None:
        """Blocks until the core loaded the model (or raises EngineStartError)."""
        deadline = time.monotonic() + timeout
        while True:
            if self._out_r.poll(0.2):
                try:
                    msg = pickle.loads(self._out_r.recv_bytes())
                except EOFError:
                    msg = ("error", "EOFError", "the engine core process exited during start-up")
                break
            if not self.process.is_alive():
                code = self.process.exitcode
                msg = ("error", "exit", f"the engine core process exited during start-up (exit code {code})")
                break
            if time.monotonic() > deadline:
                self._kill()
                raise EngineStartError(f"the engine core did not start within {timeout:.0f}s")
        if msg[0] == "error":
            self._kill()
            raise EngineStartError(f"{msg[1]}: {msg[2]}")
        _, self.info, self.stats, self.tokenizer = msg

    @property
    def is_running(self) -> bool:
        return not self._ended and self.process.is_alive()

    def start(self, on_batch: OnBatch, on_stopped: OnStopped) -> None:
        self._loop = asyncio.get_running_loop()
        self._on_batch, self._on_stopped = on_batch, on_stopped
        self._loop.add_reader(self._out_r.fileno(), self._readable)

    def _readable(self) -> None:
        for _ in range(self._MAX_BATCHES_PER_WAKEUP):
            try:
                if not self._out_r.poll():
                    return
                data = self._out_r.recv_bytes()
            except (EOFError, OSError):
                self._end(None)
                return
            msg = pickle.loads(data)
            if msg[0] == "batch":
                assert self._on_batch is not None  # start() registers it before the reader
                self._on_batch(msg[1])
            elif msg[0] == "dead":
                self._end(msg[1])
                return

    def _end(self, reason: str | None) -> None:
        if self._ended:
            return
        self._ended = True
        with_reason = reason is not None
        assert self._loop is not None and self._on_stopped is not None  # set by start()
        try:
            self._loop.remove_reader(self._out_r.fileno())
        except Exception:
            pass
        crashed = not self._stopping or with_reason
        if crashed:
            self.process.join(1.0)
            code = self.process.exitcode
            logger.error(
                "engine core process (pid %d) died%s%s: no request can progress",
                self.process.pid,
                "" if code is None else f" with exit code {code}",
                f" ({reason})" if reason else "",
            )
        self._on_stopped(
            reason or ("engine core process died" if crashed else "engine is shut down"), crashed
        )

    def send(self, op: tuple) -> None:
        self._send_q.put(pickle.dumps(op, protocol=PICKLE_PROTOCOL))

    def shutdown(self, timeout: float = 30.0) -> None:
        """Asks the core to abort what is left and exit; kills it if it does not within timeout."""
        self._stopping = True
        self.send(("shutdown",))
        self._send_q.put(None)
        self._writer.join(timeout)
        self.process.join(timeout)
        if self.process.is_alive():
            logger.warning(
                "engine core process (pid %d) did not stop in %.0fs: killing it", self.process.pid, timeout
            )
            self._kill()
        self._req_w.close()

    def _kill(self) -> None:
        if self.process.is_alive():
            self.process.kill()
        self.process.join(10)
        self._send_q.put(None)
