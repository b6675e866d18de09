"""EngineCore: the engine loop (LLMEngine: scheduler, KV manager, model runner) on its own,
and the wire format of what crosses between it and the HTTP process.

The core owns the LLMEngine and nothing else: it takes operations (add / abort /
shutdown) from a queue between steps, steps the engine, and emits one batch per
loop iteration. The engine runs with `detokenize = False` and delta outputs: text,
stop strings and logprob token strings are the frontend's job
(runtime/output_processor.py), so per-token work for hundreds of streams does not
compete with the scheduling loop.

The same loop runs either in a thread of the server (ThreadCoreClient) or as the
main loop of a spawned process (`core_process_main`, ProcessCoreClient in
runtime/core_client.py). In both cases a batch is built from plain tuples, so the
process path only adds one pickle per step.

Wire format (pickle, highest protocol, of plain tuples; no classes of ours but
SamplingParams on the way in):
  in:  ("add", request_id, prompt_token_ids, SamplingParams, arrival_time)
       ("abort", [request_id, ...])
       ("shutdown",)
  out: ("ready", EngineInfo, stats, tokenizer)  once, after the model loaded (EngineInfo.limits: the
                                                 RequestLimits the HTTP side validates requests with)
       ("error", exception type name, message)  the engine could not start
       ("batch", Batch)                          one per loop iteration with news
       ("dead", message)                         the loop crashed; the core exits
Batch = (now, stats dict, num_adds_applied, outputs, errors) with
  outputs: (request_id, finished, num_cached_tokens, metrics | None, completions, prompt_logprobs | None)
  metrics: (arrival, first_scheduled, first_token, last_token, finished_time, num_preemptions), sent with
           a request's first output and with its last one
  completions: (index, new_token_ids, new_logprobs | None, cumulative_logprob, finish_reason, stop_reason)
  logprobs: one (token_ids, logprobs, ranks) triple of tuples per position (the engine's dict, in order)
  errors: (request_id, kind, message, param, code) for adds the engine refused; kind "invalid" is a
          runtime/validation InvalidRequestError (param, code: its fields), "value" another ValueError
          (bad input), "error" anything else
"""

from __future__ import annotations

import dataclasses
import logging
import os
import pickle
import queue
import signal
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from .validation import InvalidRequestError, RequestLimits

logger = logging.getLogger("fleetserve.engine_core")

PICKLE_PROTOCOL = pickle.HIGHEST_PROTOCOL
Batch = tuple  # (now, stats dict, num_adds_applied, outputs, errors), see the module docstring


@dataclass
class EngineInfo:
    """What the HTTP process needs to know about an engine it does not hold (sent once at start-up)."""

    model_name: str
    max_model_len: int
    vocab_size: int | None
    config: Any  # the EngineConfig
    dtype: str
    device: str
    num_kv_blocks: int | None
    block_size: int | None
    max_concurrency: float | None
    pid: int
    limits: RequestLimits | None = None
    """What runtime/validation.validate checks requests against (the engine's RequestLimits)."""
    eos_token_ids: tuple[int, ...] = ()
    """The engine's end-of-sequence ids (the HTTP side's grammar compiler lets a grammar end on them)."""
    generation_defaults: dict[str, Any] = field(default_factory=dict)
    """The model's sampling defaults (generation_config.json; empty with --generation-config vllm)."""

    @classmethod
    def of(cls, engine, config=None) -> EngineInfo:
        cfg = config if config is not None else getattr(engine, "config", None)
        mc = getattr(engine, "max_concurrency", None)
        return cls(
            model_name=engine.model_name,
            max_model_len=engine.max_model_len,
            vocab_size=getattr(engine, "vocab_size", None),
            config=cfg,
            dtype=str(getattr(engine, "dtype", getattr(cfg, "dtype", "?"))).replace("torch.", ""),
            device=str(getattr(engine, "device", getattr(cfg, "device", "?"))),
            num_kv_blocks=getattr(engine, "num_kv_blocks", None),
            block_size=getattr(engine, "block_size", getattr(cfg, "block_size", None)),
            max_concurrency=None if mc is None else float(mc),
            pid=os.getpid(),
            limits=getattr(engine, "limits", None),
            eos_token_ids=tuple(sorted(getattr(engine, "eos_token_ids", ()) or ())),
            generation_defaults=dict(getattr(engine, "generation_defaults", None) or {}),
        )


def stats_dict(stats) -> dict:
    return (
        dataclasses.asdict(stats)
        if dataclasses.is_dataclass(stats) and not isinstance(stats, type)
        else dict(vars(stats))
    )


def _pack_logprobs(positions) -> list:
    # dict[int, Logprob] -> (ids, logprobs, ranks); insertion order (sampled token first) is kept.
    return [
        None
        if d is None
        else (tuple(d), tuple(x.logprob for x in d.values()), tuple(x.rank for x in d.values()))
        for d in positions
    ]


def _metrics_tuple(m) -> tuple | None:
    if m is None:
        return None
    return (
        m.arrival_time,
        m.first_scheduled_time,
        m.first_token_time,
        m.last_token_time,
        m.finished_time,
        m.num_preemptions,
    )


class EngineFatalError(RuntimeError):
    """Something outside the loop (a tensor-parallel worker's death) ended the engine."""


class EngineCore:
    """Drives one engine: applies queued operations between steps and emits batches.

    `emit(batch)` is called on the core's thread; `run()` returns after a shutdown
    operation (having aborted what was left) and raises if the engine crashed.
    """

    def __init__(self, engine, ops: queue.Queue[tuple], emit: Callable[[Batch], None]):
        self.engine = engine
        if hasattr(engine, "detokenize"):
            engine.detokenize = False
        self.ops = ops
        self.emit = emit
        self.num_adds_applied = 0
        self._live: set[str] = set()  # requests the engine holds
        self._metrics_sent: set[str] = set()
        self._last_stats: dict | None = None
        self._carry: list[tuple] = []  # an operation taken while waiting, applied first next time

    # ------------------------------------------------------------ operations

    def _take_ops(self, block: bool) -> list[tuple]:
        ops, self._carry = self._carry, []
        try:
            ops.append(self.ops.get() if block and not ops else self.ops.get_nowait())
            while True:
                ops.append(self.ops.get_nowait())
        except queue.Empty:
            pass
        return ops

    def _apply(self, ops: list[tuple]) -> tuple[list, bool, bool]:
        errors, aborted, stop = [], False, False
        for op in ops:
            kind = op[0]
            if kind == "add":
                _, rid, ids, params, arrival = op
                try:
                    self.engine.add_request(
                        rid, {"prompt_token_ids": ids}, params, arrival_time=arrival, delta=True
                    )
                    self._live.add(rid)
                except Exception as e:  # bad input: ValueError; anything else fails only this request
                    if isinstance(e, InvalidRequestError):
                        errors.append((rid, "invalid", e.message, e.param, e.code))
                    elif isinstance(e, ValueError):
                        errors.append((rid, "value", str(e) or type(e).__name__, None, None))
                    else:
                        logger.exception("add_request(%s) failed", rid)
                        errors.append((rid, "error", str(e) or type(e).__name__, None, None))
                self.num_adds_applied += 1
            elif kind == "abort":
                rids = [r for r in op[1] if r in self._live]
                if rids:
                    try:
                        self.engine.abort_request(rids)
                        aborted = True
                    except (KeyError, ValueError):
                        pass  # already finished
            elif kind == "shutdown":
                stop = True
            elif kind == "fatal":  # ("fatal", message): posted by the engine's worker monitor
                raise EngineFatalError(op[1])
        return errors, aborted, stop

    # ------------------------------------------------------------ outputs

    def _wire(self, outputs) -> list[tuple]:
        res = []
        for out in outputs:
            rid = out.request_id
            metrics = None
            if out.finished:
                self._live.discard(rid)
                self._metrics_sent.discard(rid)
                metrics = _metrics_tuple(out.metrics)
            elif rid not in self._metrics_sent:
                self._metrics_sent.add(rid)
                metrics = _metrics_tuple(out.metrics)
            comps = [
                (
                    c.index,
                    c.token_ids,
                    None if c.logprobs is None else _pack_logprobs(c.logprobs),
                    c.cumulative_logprob,
                    c.finish_reason,
                    c.stop_reason,
                )
                for c in out.outputs
            ]
            plp = out.prompt_logprobs
            res.append(
                (
                    rid,
                    out.finished,
                    out.num_cached_tokens,
                    metrics,
                    comps,
                    None if plp is None else _pack_logprobs(plp),
                )
            )
        return res

    def _emit(self, outputs, errors, force: bool) -> None:
        stats = stats_dict(self.engine.get_stats())
        if outputs or errors or force or stats != self._last_stats:
            self._last_stats = stats
            self.emit((time.time(), stats, self.num_adds_applied, self._wire(outputs), errors))

    # ------------------------------------------------------------ the loop

    def run(self) -> None:
        engine = self.engine
        busy = False
        while True:
            ops = self._take_ops(block=not busy)
            errors, aborted, stop = self._apply(ops)
            if stop:
                break
            outputs = []
            if aborted or engine.has_unfinished_requests():
                t0 = time.perf_counter()
                outputs = engine.step()
                if not outputs and time.perf_counter() - t0 < 5e-4:
                    # Nothing could be scheduled (e.g. waiting for KV blocks): don't spin a core on it.
                    try:
                        self._carry.append(self.ops.get(timeout=0.002))
                    except queue.Empty:
                        pass
            busy = engine.has_unfinished_requests()
            self._emit(outputs, errors, force=bool(ops))
        # Shutdown: abort whatever is left so that the engine frees its blocks.
        try:
            if self._live:
                engine.abort_request(list(self._live))
                outs = engine.step()
                self._emit(outs, [], force=True)
        except Exception:
            logger.exception("aborting requests at shutdown failed")


# ---------------------------------------------------------------- the core process


def _die_with_parent() -> None:
    """Linux: the kernel sends SIGKILL to this process when the server process dies, however it dies."""
    if not sys.platform.startswith("linux"):
        return
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        PR_SET_PDEATHSIG = 1
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    except Exception:  # best effort: the closed request pipe ends the core too
        pass


def core_process_main(
    config, req_conn, out_conn, log_level: str = "info", parent_pid: int | None = None
) -> None:
    """Entry point of the spawned engine-core process."""
    _die_with_parent()
    if parent_pid is not None and os.getppid() != parent_pid:
        os._exit(1)  # the parent died before prctl took effect
    # The server owns the lifecycle: Ctrl-C / SIGTERM sent to the process group must not kill the core
    # before the server drained its streams; the server tells the core to stop.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    logging.basicConfig(
        level=getattr(logging, log_level.upper(), logging.INFO),
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    out_q: queue.Queue[bytes | None] = queue.Queue()

    def send(msg: tuple) -> None:
        out_q.put(pickle.dumps(msg, protocol=PICKLE_PROTOCOL))

    def writer() -> None:
        # Sends happen here so the engine loop never blocks on a full pipe.
        while True:
            data = out_q.get()
            if data is None:
                return
            try:
                out_conn.send_bytes(data)
            except OSError:
                os._exit(1)  # the server is gone

    wt = threading.Thread(target=writer, name="core-writer", daemon=True)
    wt.start()

    def finish(code: int) -> None:
        out_q.put(None)
        wt.join(10)
        out_conn.close()
        # SystemExit lets multiprocessing run its finalizers (tqdm's semaphore) and report the exit code.
        sys.exit(code)

    try:
        from .engine import LLMEngine

        engine = LLMEngine.from_config(config)
    except BaseException as e:
        logger.error("engine core failed to start: %s: %s", type(e).__name__, e)
        send(("error", type(e).__name__, str(e)))
        finish(1)
        return
    ops: queue.Queue[tuple] = queue.Queue()

    def reader() -> None:
        while True:
            try:
                data = req_conn.recv_bytes()
            except (EOFError, OSError):
                logger.error("engine core: the server process closed the request pipe; shutting down")
                ops.put(("shutdown",))
                return
            op = pickle.loads(data)
            ops.put(op)
            if op[0] == "shutdown":
                return

    def fatal(message: str) -> None:
        # A tensor-parallel worker died: the loop raises on this op at once if it is idle or between
        # steps; if it is stuck in a collective (NCCL does not notice a dead peer), exit from here.
        ops.put(("fatal", message))

        def hard_exit() -> None:
            send(("dead", message))
            out_q.put(None)
            wt.join(2)
            os._exit(1)

        timer = threading.Timer(5.0, hard_exit)
        timer.daemon = True
        timer.start()

    if hasattr(engine, "on_fatal"):
        engine.on_fatal(fatal)
    core = EngineCore(engine, ops, lambda batch: send(("batch", batch)))
    send(("ready", EngineInfo.of(engine), stats_dict(engine.get_stats()), engine.tokenizer))
    threading.Thread(target=reader, name="core-reader", daemon=True).start()
    logger.info("engine core process %d running", os.getpid())
    try:
        core.run()
    except BaseException as e:
        logger.exception("engine core loop crashed")
        send(("dead", f"engine loop crashed: {type(e).__name__}" + (f": {e}" if str(e) else "")))
        _shutdown_engine(engine)
        finish(1)
        return
    logger.info("engine core process %d stopped", os.getpid())
    _shutdown_engine(engine)
    finish(0)


def _shutdown_engine(engine) -> None:
    try:
        if hasattr(engine, "shutdown"):
            engine.shutdown()  # stops and joins the tensor-parallel workers
    except Exception:
        logger.exception("engine shutdown failed")
