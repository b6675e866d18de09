"""AsyncLLM: the single-threaded `LLMEngine` driven from asyncio.

Ownership:
- One background thread ("fleetserve-engine") owns the engine: it alone calls
  add_request / abort_request / step / get_stats. It sleeps on a condition
  variable while there is nothing to do (no busy-spin).
- Callers on the event loop never touch the engine. They append ("add" | "abort")
  operations to a list guarded by that condition; the engine thread applies them
  between steps, in order.
- Outputs go back per request through an asyncio.Queue that lives on the event
  loop; the engine thread hands each step's outputs over with one
  loop.call_soon_threadsafe call.
- `stats` is the latest EngineStats snapshot, replaced (never mutated) by the
  engine thread, so the event loop can read it at any time (metrics, admission).

`generate()` aborts its request when the consumer goes away (cancellation,
GeneratorExit), which frees the request's KV blocks.
"""
from __future__ import annotations

import asyncio
import dataclasses
import logging
import threading
import time
from typing import TYPE_CHECKING, AsyncIterator, Optional, Protocol

from .outputs import RequestOutput
from .protocols import EngineCore
from .sampling_params import SamplingParams
from .validation import RequestLimits

if TYPE_CHECKING:
    from .config import EngineConfig

logger = logging.getLogger("fleetserve.async_engine")


class EngineDeadError(RuntimeError):
    """The engine loop stopped (crashed or shut down); no request can progress."""


class OutputObserver(Protocol):
    """Sees every request the engine accepted and every step's outputs, on the engine thread."""

    def on_request_added(self, request_id: str, arrival_time: float) -> None: ...

    def on_outputs(self, outputs: list[RequestOutput], now: float) -> None: ...


def _snapshot(out: RequestOutput) -> RequestOutput:
    """A copy the event loop can read while the engine keeps appending to its own lists."""
    comps = [dataclasses.replace(c, token_ids=list(c.token_ids),
                                 logprobs=None if c.logprobs is None else list(c.logprobs))
             for c in out.outputs]
    return dataclasses.replace(out, outputs=comps,
                               prompt_logprobs=None if out.prompt_logprobs is None else list(out.prompt_logprobs))


class AsyncLLM:
    def __init__(self, engine: EngineCore, *, observers: tuple[OutputObserver, ...] = ()):
        self.engine = engine
        self.tokenizer = engine.tokenizer
        self.model_name: str = engine.model_name
        self.max_model_len: int = engine.max_model_len
        self.limits: RequestLimits = engine.limits  # for runtime/validation.validate on the event loop
        self.stats = engine.get_stats()
        self.max_num_seqs: Optional[int] = getattr(getattr(engine, "config", None), "max_num_seqs", None)
        self._observers: list[OutputObserver] = list(observers)
        self._cv = threading.Condition()
        self._ops: list[tuple] = []  # guarded by _cv
        self._pending_adds = 0  # guarded by _cv; adds not yet handed to the engine
        self._stopping = False
        self._error: Optional[BaseException] = None
        self._thread: Optional[threading.Thread] = None
        self._loop: Optional[asyncio.AbstractEventLoop] = None
        self._streams: dict[str, asyncio.Queue] = {}  # event loop only

    @classmethod
    def from_config(cls, config: "EngineConfig", **kw) -> "AsyncLLM":
        """Loads the model (slow): call it from a worker thread when an event loop is running."""
        from .engine import LLMEngine

        return cls(LLMEngine.from_config(config), **kw)

    # ------------------------------------------------------------ lifecycle

    def start(self) -> None:
        """Starts the engine thread; outputs are delivered to the running event loop."""
        if self._thread is not None:
            return
        self._loop = asyncio.get_running_loop()
        self._thread = threading.Thread(target=self._run, name="fleetserve-engine", daemon=True)
        self._thread.start()

    def shutdown(self, timeout: float = 30.0) -> None:
        """Stops the engine thread; requests still in it are aborted."""
        with self._cv:
            self._stopping = True
            self._cv.notify()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout)

    @property
    def is_alive(self) -> bool:
        return (self._thread is not None and self._thread.is_alive() and self._error is None
                and not self._stopping)

    @property
    def num_waiting(self) -> int:
        """Requests not running yet: the engine's waiting queue plus adds not handed over."""
        return self.stats.num_waiting + self._pending_adds

    def num_unschedulable(self, extra: int = 0) -> int:
        """Sequences that would find no batch slot at the next step if `extra` more arrived now:
        what is running, waiting or not handed over yet, beyond max_num_seqs. (KV blocks may still
        hold some of the rest back; this counts slots only.)"""
        s = self.stats
        total = s.num_running + s.num_waiting + self._pending_adds + extra
        return max(0, total - self.max_num_seqs) if self.max_num_seqs else s.num_waiting + self._pending_adds + extra

    @property
    def num_in_flight(self) -> int:
        return len(self._streams)

    def add_observer(self, observer: OutputObserver) -> None:
        with self._cv:
            self._observers = self._observers + [observer]

    def remove_observer(self, observer: OutputObserver) -> None:
        with self._cv:
            self._observers = [o for o in self._observers if o is not observer]

    # ------------------------------------------------------------ requests

    async def generate(self, prompt, params: SamplingParams, request_id: str,
                       arrival_time: Optional[float] = None) -> AsyncIterator[RequestOutput]:
        """Yields cumulative outputs until the request finishes.

        Invalid input raises ValueError from the first iteration. If the consumer
        stops early (break, cancellation, disconnect) the request is aborted.
        """
        if not self.is_alive:
            raise EngineDeadError("engine is not running")
        if request_id in self._streams:
            raise ValueError(f"request id {request_id!r} is already in use")
        queue: asyncio.Queue = asyncio.Queue()
        self._streams[request_id] = queue
        arrival = time.time() if arrival_time is None else arrival_time
        with self._cv:
            self._ops.append(("add", request_id, prompt, params, arrival))
            self._pending_adds += 1
            self._cv.notify()
        finished = False
        try:
            while True:
                item = await queue.get()
                # Outputs are cumulative: when the consumer fell behind, only the newest matters.
                while not isinstance(item, BaseException) and not queue.empty():
                    item = queue.get_nowait()
                if isinstance(item, BaseException):
                    finished = True
                    raise item
                if item.finished:
                    finished = True
                yield item
                if finished:
                    return
        finally:
            self._streams.pop(request_id, None)
            if not finished:
                self.abort(request_id)

    def fail_request(self, request_id: str, exc: BaseException) -> None:
        """Ends a request with `exc` (raised from its generate() iterator) and aborts it in the engine."""
        q = self._streams.get(request_id)
        if q is not None:
            q.put_nowait(exc)
        self.abort(request_id)

    def abort(self, request_id: str) -> None:
        """Aborts a request (no-op if it already finished); its KV blocks are freed by the engine thread."""
        with self._cv:
            self._ops.append(("abort", request_id))
            self._cv.notify()

    # ------------------------------------------------------------ engine thread

    def _run(self) -> None:
        engine = self.engine
        busy = False
        try:
            while True:
                with self._cv:
                    while not self._ops and not busy and not self._stopping:
                        self._cv.wait()
                    if self._stopping:
                        break
                    ops, self._ops = self._ops, []
                    observers = self._observers
                errors, aborted = self._apply(ops, observers)
                outputs = []
                if aborted or engine.has_unfinished_requests():
                    t0 = time.perf_counter()
                    outputs = engine.step()
                    if not outputs and time.perf_counter() - t0 < 5e-4:
                        # Nothing could be scheduled (e.g. waiting for KV blocks): don't spin a core on it.
                        with self._cv:
                            if not self._ops and not self._stopping:
                                self._cv.wait(0.002)
                busy = engine.has_unfinished_requests()
                self.stats = engine.get_stats()
                now = time.time()
                for obs in observers:
                    obs.on_outputs(outputs, now)
                if outputs or errors:
                    self._post(self._deliver, [_snapshot(o) for o in outputs], errors)
        except BaseException as e:  # the engine is broken: fail every request, health turns 503
            logger.exception("engine loop crashed")
            self._error = e
            self._post(self._fail_all, EngineDeadError(f"engine loop crashed: {type(e).__name__}"))
            return
        # Shutdown: abort whatever is left so that the engine frees its blocks.
        try:
            rids = list(self._streams)
            if rids:
                engine.abort_request(rids)
                engine.step()
            self.stats = engine.get_stats()
        except Exception:
            logger.exception("aborting requests at shutdown failed")
        self._post(self._fail_all, EngineDeadError("engine is shut down"))

    def _apply(self, ops, observers) -> tuple[list, bool]:
        errors, aborted, added, handed = [], False, False, 0
        for op in ops:
            if op[0] == "add":
                _, rid, prompt, params, arrival = op
                try:
                    self.engine.add_request(rid, prompt, params, arrival_time=arrival)
                    added = True
                    for obs in observers:
                        obs.on_request_added(rid, arrival)
                except Exception as e:  # bad input: ValueError; anything else fails only this request
                    if not isinstance(e, ValueError):
                        logger.exception("add_request(%s) failed", rid)
                    errors.append((rid, e))
                handed += 1
            else:
                try:
                    self.engine.abort_request(op[1])
                    aborted = True
                except (KeyError, ValueError):
                    pass  # already finished
        if added:
            self.stats = self.engine.get_stats()  # admission control reads num_waiting during the next step
        if handed:
            # Only now: until the stats above show them, these requests must still count as pending.
            with self._cv:
                self._pending_adds -= handed
        return errors, aborted

    def _post(self, fn, *args) -> None:
        loop = self._loop
        if loop is None or loop.is_closed():
            return
        try:
            loop.call_soon_threadsafe(fn, *args)
        except RuntimeError:  # loop closed between the check and the call
            pass

    # ------------------------------------------------------------ event loop side

    def _deliver(self, outputs: list[RequestOutput], errors: list) -> None:
        for rid, exc in errors:
            q = self._streams.get(rid)
            if q is not None:
                q.put_nowait(exc)
        for out in outputs:
            q = self._streams.get(out.request_id)
            if q is not None:  # None: the consumer left and the request was aborted
                q.put_nowait(out)

    def _fail_all(self, exc: BaseException) -> None:
        for q in self._streams.values():
            q.put_nowait(exc)
