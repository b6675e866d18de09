"""AsyncLLM: the engine driven from asyncio, with the engine loop in a thread or in its own process.

Ownership:
- The engine loop (EngineCore around an LLMEngine, runtime/engine_core.py) runs
  either in a background thread ("fleetserve-engine", ThreadCoreClient) or in a
  spawned process (ProcessCoreClient, runtime/core_client.py). Either way it alone
  calls add_request / abort_request / step / get_stats, and it reports per-step
  deltas (new token ids, new logprobs, finish reasons), never cumulative copies.
- This side (the event loop) owns tokenization of text prompts, detokenization,
  stop strings and logprob token strings (OutputProcessor, runtime/output_processor.py),
  one asyncio.Queue per request, the metrics observers, and `stats`: the latest
  EngineStats the core sent (replaced, never mutated).
- Operations ("add" | "abort" | "shutdown") go to the core in order; the core
  applies them between steps.

`generate()` aborts its request when the consumer goes away (cancellation,
GeneratorExit), which frees the request's KV blocks in the core.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncGenerator
from typing import TYPE_CHECKING, Any, Protocol

from .output_processor import OutputKind, OutputProcessor, RequestProgress
from .outputs import CompletionOutput, RequestOutput
from .protocols import CoreClient, EngineCore, PromptInput
from .sampling_params import SamplingParams
from .validation import InvalidRequestError, RequestLimits

if TYPE_CHECKING:
    from .config import EngineConfig

logger = logging.getLogger("fleetserve.async_engine")

__all__ = ["AsyncLLM", "EngineDeadError", "OutputKind", "OutputObserver", "RequestProgress"]


class EngineDeadError(RuntimeError):
    """The engine loop stopped (crashed or shut down); no request can progress."""


class OutputObserver(Protocol):
    """Sees every request the engine accepted and how each progressed, on the event loop."""

    def on_request_added(self, request_id: str, arrival_time: float) -> None: ...

    def on_outputs(self, progress: list[RequestProgress], now: float) -> None: ...


class _Stats:
    """The core's EngineStats as a plain object (attributes num_running, num_waiting, kv_cache_usage, ...)."""

    def __init__(self, d: dict):
        self.__dict__.update(d)

    def __repr__(self) -> str:
        return f"EngineStats({', '.join(f'{k}={v}' for k, v in self.__dict__.items())})"


def merge_deltas(a: RequestOutput, b: RequestOutput) -> RequestOutput:
    """Two consecutive DELTA outputs of one request as one (when the consumer fell behind)."""
    comps = {c.index: c for c in a.outputs}
    for c in b.outputs:
        old = comps.get(c.index)
        if old is None:
            comps[c.index] = c
            continue
        comps[c.index] = CompletionOutput(
            c.index,
            old.text + c.text,
            old.token_ids + c.token_ids,
            c.cumulative_logprob,
            None if c.logprobs is None else (old.logprobs or []) + c.logprobs,
            c.finish_reason,
            c.stop_reason,
        )
    b.outputs = [comps[i] for i in sorted(comps)]
    return b


class AsyncLLM:
    def __init__(
        self,
        engine: EngineCore | None = None,
        *,
        observers: tuple[OutputObserver, ...] = (),
        client: CoreClient | None = None,
        owns_engine: bool = False,
    ):
        """engine: an LLMEngine (or any EngineCore) to run in a thread of this process; or client: a
        started core client (ProcessCoreClient.wait_ready() done). `engine` then is the core's EngineInfo.
        owns_engine: shutdown() also closes the engine (frees its device memory); from_config sets it."""
        if client is None:
            from .core_client import ThreadCoreClient

            client = ThreadCoreClient(engine)
        self._client = client
        self._owns_engine = owns_engine and engine is not None
        info = client.info
        self.engine: Any = engine if engine is not None else info
        self.tokenizer = client.tokenizer
        self.model_name: str = info.model_name
        self.max_model_len: int = info.max_model_len
        # For runtime/validation.validate on the event loop; in process mode the core sent it at start-up.
        if info.limits is None:
            raise TypeError("the engine core sent no RequestLimits (the engine has no `limits`)")
        self.limits: RequestLimits = info.limits
        # The model's sampling defaults: the HTTP side applies them into SamplingParams before sending.
        self.generation_defaults: dict[str, Any] = dict(info.generation_defaults)
        self.max_num_seqs: int | None = getattr(info.config, "max_num_seqs", None)
        self.stats: Any = _Stats(client.stats)
        self._observers: list[OutputObserver] = list(observers)
        self._processor = OutputProcessor(self.tokenizer, self._abort_core)
        self._num_adds_sent = 0
        self._num_adds_applied = 0
        self._started = False
        self._stopping = False
        self._error: str | None = None
        self._stopped_reason: str | None = None
        self._streams: dict[str, asyncio.Queue] = {}  # event loop only
        self.died: asyncio.Event | None = None  # set when the core stopped without being asked to

    @classmethod
    def from_config(
        cls, config: EngineConfig, *, engine_process: bool = False, log_level: str = "info", **kw
    ) -> AsyncLLM:
        """Loads the model (slow): call it from a worker thread when an event loop is running.
        engine_process: run the engine loop in its own (spawned) process."""
        if engine_process:
            client = cls.spawn_core(config, log_level)
            client.wait_ready()
            return cls(client=client, **kw)
        from .engine import LLMEngine

        return cls(LLMEngine.from_config(config), owns_engine=True, **kw)

    @staticmethod
    def spawn_core(config, log_level: str = "info"):
        """Starts the engine-core process (returns at once; call wait_ready() on the result, off the loop)."""
        from .core_client import ProcessCoreClient

        return ProcessCoreClient(config, log_level)

    # ------------------------------------------------------------ lifecycle

    def start(self) -> None:
        """Starts the engine loop (thread) or listens to the core process; outputs go to the running loop."""
        if self._started:
            return
        self._started = True
        self.died = asyncio.Event()
        self._client.start(self._on_batch, self._on_stopped)

    def shutdown(self, timeout: float = 30.0) -> None:
        """Stops the engine loop; requests still in it are aborted. Blocking: call it off the event loop."""
        self._stopping = True
        self._client.shutdown(timeout)
        close = getattr(self.engine, "close", None)
        if self._owns_engine and close is not None and not self._client.is_running:
            close()  # the engine loop has ended: nothing else touches the engine now

    @property
    def is_alive(self) -> bool:
        return self._started and self._client.is_running and self._error is None and not self._stopping

    @property
    def core_pid(self) -> int | None:
        proc = getattr(self._client, "process", None)
        return None if proc is None else proc.pid

    @property
    def num_waiting(self) -> int:
        """Requests not running yet: the engine's waiting queue plus adds not applied by the core yet."""
        return self.stats.num_waiting + self._num_pending_adds

    @property
    def _num_pending_adds(self) -> int:
        # Adds the core has not applied yet. The core reports how many it applied in the same batch
        # as the stats taken after applying them, so a request counts here until the stats show it.
        return self._num_adds_sent - self._num_adds_applied

    def num_unschedulable(self, extra: int = 0) -> int:
        """Sequences that would find no batch slot at the next step if `extra` more arrived now:
        what is running, waiting or not applied by the core yet, beyond max_num_seqs. (KV blocks may
        still hold some of the rest back; this counts slots only.)"""
        s = self.stats
        pending = self._num_pending_adds
        total = s.num_running + s.num_waiting + pending + extra
        return max(0, total - self.max_num_seqs) if self.max_num_seqs else s.num_waiting + pending + extra

    @property
    def num_in_flight(self) -> int:
        return len(self._streams)

    def add_observer(self, observer: OutputObserver) -> None:
        self._observers = self._observers + [observer]

    def remove_observer(self, observer: OutputObserver) -> None:
        self._observers = [o for o in self._observers if o is not observer]

    # ------------------------------------------------------------ requests

    def _prompt(self, prompt) -> tuple[str | None, list[int]]:
        if isinstance(prompt, dict):
            if "prompt_token_ids" in prompt:
                return prompt.get("prompt"), list(prompt["prompt_token_ids"])
            if "prompt" not in prompt:
                raise InvalidRequestError(
                    "a prompt dict needs 'prompt' or 'prompt_token_ids'", param="prompt"
                )
            prompt = prompt["prompt"]
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise InvalidRequestError(
                    "this model has no tokenizer: pass prompt_token_ids", param="prompt"
                )
            return prompt, self.tokenizer.encode(prompt)
        if isinstance(prompt, (list, tuple)) and all(isinstance(t, int) for t in prompt):
            return None, list(prompt)
        raise InvalidRequestError(
            f"unsupported prompt type {type(prompt).__name__}: expected str, list[int] or dict",
            param="prompt",
        )

    async def generate(
        self,
        prompt: PromptInput,
        params: SamplingParams,
        request_id: str,
        arrival_time: float | None = None,
        output_kind: OutputKind = OutputKind.CUMULATIVE,
    ) -> AsyncGenerator[RequestOutput, None]:
        """Yields outputs until the request finished: cumulative ones by default, only what is new
        with OutputKind.DELTA, or just the finished one with OutputKind.FINAL.

        Invalid input raises ValueError from the first iteration. If the consumer
        stops early (break, cancellation, disconnect) the request is aborted.
        """
        if not self.is_alive:
            raise EngineDeadError("engine is not running")
        if request_id in self._streams:
            raise ValueError(f"request id {request_id!r} is already in use")
        text, ids = self._prompt(prompt)
        queue: asyncio.Queue = asyncio.Queue()
        self._streams[request_id] = queue
        arrival = time.time() if arrival_time is None else arrival_time
        self._processor.add(request_id, text, ids, params, output_kind, arrival)
        self._num_adds_sent += 1
        self._client.send(("add", request_id, ids, params, arrival))
        finished = False
        delta = output_kind is OutputKind.DELTA
        try:
            while True:
                item = await queue.get()
                # When the consumer fell behind: cumulative outputs, only the newest matters; deltas are merged.
                while not isinstance(item, BaseException) and not queue.empty():
                    nxt = queue.get_nowait()
                    item = nxt if isinstance(nxt, BaseException) or not delta else merge_deltas(item, nxt)
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
        """Ends a request with `exc` (raised from its generate() iterator) and aborts it in the core."""
        q = self._streams.get(request_id)
        if q is not None:
            q.put_nowait(exc)
        self.abort(request_id)

    def abort(self, request_id: str) -> None:
        """Aborts a request (no-op if it already finished); its KV blocks are freed by the engine loop.
        Its state here stays until the core's abort output arrives, so the metrics count the abort."""
        self._abort_core(request_id)

    def _abort_core(self, request_id: str) -> None:
        if self._client.is_running:
            self._client.send(("abort", [request_id]))

    # ------------------------------------------------------------ from the core (event loop)

    def _on_batch(self, batch) -> None:
        now, stats, num_applied, outputs, errors = batch
        self.stats = _Stats(stats)
        self._num_adds_applied = num_applied
        for rid, kind, message, param, code in errors:
            self._processor.discard(rid)
            q = self._streams.get(rid)
            if q is not None:  # the core's InvalidRequestError keeps its param and code (the 400's)
                q.put_nowait(
                    InvalidRequestError(message, param=param, code=code)
                    if kind == "invalid"
                    else ValueError(message)
                    if kind == "value"
                    else RuntimeError(message)
                )
        if not outputs:
            return
        observers = self._observers
        if observers:
            for rid, *_ in outputs:
                st = self._processor.requests.get(rid)
                if st is not None and st.metrics.first_scheduled_time is None:
                    for obs in observers:
                        obs.on_request_added(rid, st.metrics.arrival_time)
        deliver, progress = self._processor.process(outputs, now)
        for obs in observers:
            obs.on_outputs(progress, now)
        for rid, out in deliver:
            q = self._streams.get(rid)
            if q is None:  # the consumer left and the request was aborted
                continue
            if self._stopping and out.finished and all(c.finish_reason == "abort" for c in out.outputs):
                # Aborted by the shutdown, not by its consumer: that is an engine failure to the consumer,
                # whichever of this output and the stop notice it happens to read first.
                q.put_nowait(EngineDeadError("engine is shut down"))
                continue
            q.put_nowait(out)

    def _on_stopped(self, reason: str, crashed: bool) -> None:
        if crashed:
            logger.error("%s", reason)  # the whole reason (a dead rank, its signal) goes to the log...
            self._error = reason
            if self.died is not None:
                self.died.set()
        self._stopped_reason = reason
        # ...and clients see only its kind ("engine loop crashed: RuntimeError"): an exception's message
        # may carry paths, tensor shapes or a worker's pid that are none of a client's business.
        exc = EngineDeadError(": ".join(reason.split(": ")[:2]) if crashed else reason)
        for q in self._streams.values():
            q.put_nowait(exc)
        self._processor.requests.clear()
