"""Tensor-parallel workers: one spawned process per rank 1..N-1, driven by rank 0.

Process layout (docs/ARCHITECTURE.md): HTTP process -> engine core process (scheduler, KV
block manager, and rank 0: the driver's ModelRunner with its own shard) -> one worker
process per other rank. Rank 0 runs in the engine's own process so that sampling, the
readback of sampled tokens and the scheduler stay exactly as with one device; workers
only run the forward pass of their shard.

`WorkerGroup` (driver side) owns the worker processes and one duplex pipe to each:
  start-up  worker -> ("loaded", kv_blocks_estimate | None) once its shard is in memory,
            driver -> ("init", num_kv_blocks, eos_ids), worker -> ("ready",)
  per step  driver -> ("step", StepPlan) pickled once and written to every pipe (the host
            arrays of the step's inputs: a few KB); nothing comes back, the sampled
            tokens stay on rank 0 (with async scheduling rank 0 broadcasts them on the
            device so that every rank can fill the next step's placeholders)
  graphs    driver -> ("capture", max_batch, max_model_len, max_mixed_tokens): every rank captures together
  stop      driver -> ("shutdown",); a worker also stops when its pipe closes
  failure   worker -> ("error", type, message) before it exits on an exception
All tensors cross through the process group (ParallelContext, runtime/parallel.py).

Faults: a monitor thread waits on the workers' process sentinels. When one dies outside
a shutdown it logs the rank, pid and cause, kills the other workers (so that no
collective waits for a dead peer), sets `failure` (WorkerDiedError, raised by the next
step or by the collective that failed) and calls the `on_failure` callbacks (the engine
core turns that into its "dead" message: the server answers 503). Workers die with
their parent (PR_SET_PDEATHSIG, plus the pipe's EOF) and ignore SIGINT/SIGTERM: the
driver owns their lifecycle and stops and joins them in `close()`.
"""

from __future__ import annotations

import logging
import multiprocessing
import multiprocessing.connection
import os
import pickle
import signal
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

logger = logging.getLogger("fleetserve.tp")

PICKLE_PROTOCOL = pickle.HIGHEST_PROTOCOL


class WorkerDiedError(RuntimeError):
    """A tensor-parallel worker process died; the engine cannot continue."""


def describe_exit(code: int | None) -> str:
    if code is None:
        return "still running"
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit code {code}"


class WorkerGroup:
    """Driver-side handle on the worker processes of ranks 1..world_size-1."""

    def __init__(self, config, world_size: int, device_type: str, host: str = "127.0.0.1"):
        import torch.distributed as dist

        self.world_size = world_size
        self.failure: WorkerDiedError | None = None
        self.on_failure: list[Callable[[str], None]] = []
        self._stopping = False
        # Rank 0's store on a free port of the loopback: parallel engines (and test runs) never collide.
        self.store = dist.TCPStore(host, 0, None, True, wait_for_workers=False)
        self.host, self.port = host, self.store.port
        me = multiprocessing.current_process()
        if me.daemon:
            # The engine core runs as a daemon process, which multiprocessing forbids to have children
            # (they could be orphaned). Ours die with it (PR_SET_PDEATHSIG, pipe EOF) and are joined.
            me.daemon = False
        ctx = multiprocessing.get_context("spawn")
        parent_pid = os.getpid() if threading.current_thread() is threading.main_thread() else None
        self.procs: list[Any] = []
        self.conns: list[Any] = []
        for rank in range(1, world_size):
            mine, theirs = ctx.Pipe(duplex=True)
            p = ctx.Process(
                target=worker_main,
                name=f"fleetserve-tp-worker-{rank}",
                daemon=True,
                args=(config, rank, world_size, device_type, host, self.port, theirs, parent_pid),
            )
            p.start()
            theirs.close()
            self.procs.append(p)
            self.conns.append(mine)
        logger.info(
            "tensor parallel: %d ranks, worker pids %s (store port %d)",
            world_size,
            [p.pid for p in self.procs],
            self.port,
        )
        self._monitor = threading.Thread(target=self._watch, name="tp-worker-monitor", daemon=True)
        self._monitor.start()

    # ------------------------------------------------------------------ start-up
    def _recv(self, i: int, timeout: float) -> tuple:
        """The next message of worker i; raises WorkerDiedError if it exits (or sent an error) first."""
        conn, proc = self.conns[i], self.procs[i]
        deadline = time.monotonic() + timeout
        while True:
            if self.failure is not None:
                raise self.failure
            try:
                if conn.poll(0.1):
                    msg = conn.recv()
                    if msg[0] == "error":
                        raise WorkerDiedError(
                            f"tensor-parallel worker rank {i + 1} failed: {msg[1]}: {msg[2]}"
                        )
                    return msg
            except (EOFError, OSError):
                proc.join(2.0)
                raise self._died(i) from None
            if not proc.is_alive() and not conn.poll():
                raise self._died(i)
            if time.monotonic() > deadline:
                raise WorkerDiedError(
                    f"tensor-parallel worker rank {i + 1} did not answer within {timeout:.0f}s"
                )

    def wait_loaded(self, timeout: float = 3600.0) -> list[int | None]:
        """Each worker's KV-block estimate (CUDA: what fits in its GPU) once its shard is loaded."""
        return [self._recv(i, timeout)[1] for i in range(len(self.procs))]

    def init(self, num_kv_blocks: int, eos_token_ids, timeout: float = 600.0) -> None:
        for c in self.conns:
            c.send(("init", num_kv_blocks, tuple(eos_token_ids)))
        for i in range(len(self.procs)):
            self._recv(i, timeout)

    # ------------------------------------------------------------------ steps
    def send(self, msg: tuple) -> None:
        """One message to every worker: pickled once, written to each pipe."""
        if self.failure is not None:
            raise self.failure
        data = pickle.dumps(msg, protocol=PICKLE_PROTOCOL)
        for i, c in enumerate(self.conns):
            try:
                c.send_bytes(data)
            except OSError:
                raise self.failure_or(i) from None

    def failure_or(self, i: int | None = None, cause: BaseException | None = None) -> BaseException:
        """The error to raise after a collective or a pipe failed: the monitor's, once it knows
        which worker died (it notices within milliseconds), else a generic one."""
        deadline = time.monotonic() + 3.0
        while self.failure is None and time.monotonic() < deadline:
            time.sleep(0.01)
        if self.failure is not None:
            return self.failure
        if i is not None:
            return self._died(i)
        return WorkerDiedError(f"tensor-parallel collective failed: {cause}")

    # ------------------------------------------------------------------ faults
    def _died(self, i: int) -> WorkerDiedError:
        p = self.procs[i]
        return WorkerDiedError(
            f"tensor-parallel worker rank {i + 1} (pid {p.pid}) died: {describe_exit(p.exitcode)}"
        )

    def _watch(self) -> None:
        pending = {p.sentinel: i for i, p in enumerate(self.procs)}
        while pending:
            ready = multiprocessing.connection.wait(list(pending))
            for s in ready:
                i = pending.pop(s)
                if self._stopping:
                    continue
                self.procs[i].join(1.0)
                err = self._died(i)
                # a worker that failed on an exception said why before exiting
                try:
                    if self.conns[i].poll():
                        msg = self.conns[i].recv()
                        if msg and msg[0] == "error":
                            err = WorkerDiedError(f"{err} ({msg[1]}: {msg[2]})")
                except (EOFError, OSError):
                    pass
                self._fail(err)

    def _fail(self, err: WorkerDiedError) -> None:
        if self.failure is not None:
            return
        logger.error("%s: the engine cannot continue", err)
        self.failure = err
        self._stopping = True
        for p in self.procs:  # no surviving rank may wait in a collective for the dead one
            if p.is_alive():
                p.kill()
        for cb in list(self.on_failure):
            try:
                cb(str(err))
            except Exception:
                logger.exception("tensor-parallel failure callback failed")

    # ------------------------------------------------------------------ stop
    def close(self, timeout: float = 10.0) -> None:
        """Stop every worker and join it (killed if it does not stop within timeout)."""
        if not self._stopping:
            self._stopping = True
            for c in self.conns:
                try:
                    c.send_bytes(pickle.dumps(("shutdown",), protocol=PICKLE_PROTOCOL))
                except OSError:
                    pass
        deadline = time.monotonic() + timeout
        for p in self.procs:
            p.join(max(0.0, deadline - time.monotonic()))
            if p.is_alive():
                logger.warning("tensor-parallel worker pid %d did not stop: killing it", p.pid)
                p.kill()
                p.join(5.0)
        for c in self.conns:
            c.close()
        self.conns = []


# ---------------------------------------------------------------------- the worker process
def worker_main(config, rank, world_size, device_type, host, port, conn, parent_pid) -> None:
    """Entry point of the worker process of one rank."""
    from .engine_core import _die_with_parent

    _die_with_parent()
    if parent_pid is not None and os.getppid() != parent_pid:
        os._exit(1)  # the driver died before prctl took effect
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    logging.basicConfig(
        level=logging.INFO,
        stream=sys.stderr,
        format=f"%(asctime)s %(levelname)s tp-rank{rank} %(name)s: %(message)s",
    )
    # tqdm's default lock is a multiprocessing semaphore, which os._exit below would leak
    from tqdm.auto import tqdm

    tqdm.set_lock(threading.RLock())
    code = 0
    try:
        _serve(config, rank, world_size, device_type, host, port, conn)
    except (EOFError, BrokenPipeError, ConnectionResetError):
        pass  # the driver went away: nothing to report to
    except BaseException as e:
        logger.exception("tensor-parallel worker rank %d failed", rank)
        try:
            conn.send(("error", type(e).__name__, str(e)))
        except OSError:
            pass
        code = 1
    logging.shutdown()
    # Without interpreter teardown (torch's and the process group's take seconds): nothing is left to flush.
    os._exit(code)


def _serve(config, rank, world_size, device_type, host, port, conn) -> None:
    import torch

    from .engine import cuda_kv_blocks, resolve_dtype
    from .loader import load_model
    from .model_runner import ModelRunner, kv_bytes_per_block
    from .parallel import ParallelContext

    if device_type == "cuda":
        torch.cuda.set_device(rank)
        device = torch.device("cuda", rank)
    else:
        torch.set_num_threads(max(1, torch.get_num_threads() // world_size))
        device = torch.device("cpu")
    dtype = resolve_dtype(config.dtype, device)
    torch.manual_seed(config.seed)
    tp = ParallelContext(rank, world_size, device)
    loaded = load_model(config, device, dtype, tp=tp)
    estimate = None
    if device_type == "cuda" and config.num_kv_blocks is None and config.kv_cache_memory is None:
        per_block = kv_bytes_per_block(loaded.model_config, config.block_size, dtype, world_size)
        estimate = cuda_kv_blocks(config, loaded.model_config, per_block)
    conn.send(("loaded", estimate))
    tp.connect(host, port)
    _, num_blocks, eos = conn.recv()
    runner = ModelRunner(
        loaded.model, loaded.model_config, device, dtype, num_blocks, config.block_size, set(eos), tp=tp
    )
    logger.info(
        "rank %d/%d: %d query heads, %d KV heads, KV cache %d blocks x %d tokens on %s",
        rank,
        world_size,
        tp.layout.num_heads,
        tp.layout.num_kv_heads,
        num_blocks,
        config.block_size,
        device,
    )
    conn.send(("ready",))
    while True:
        msg = pickle.loads(conn.recv_bytes())
        kind = msg[0]
        if kind == "step":
            runner.execute_plan(msg[1])
        elif kind == "capture":
            runner.capture_graphs(msg[1], msg[2], msg[3])
        elif kind == "shutdown":
            return
