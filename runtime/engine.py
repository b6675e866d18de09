"""LLMEngine: the synchronous engine loop — add_request / step / abort.

One step is schedule -> execute -> update: the Scheduler picks the work (a plain
SchedulerOutput), the ModelRunner computes it on the device and samples, the
Scheduler advances the sequences and finishes those that runtime/stop.py says
are done (EOS, stop ids, stop strings via the detokenizers, length), and the
engine assembles RequestOutputs. The engine owns the per-request state
that outlives a step (prompt, detokenizers, logprobs, timings). It is
single-threaded; fleetserve.runtime.async_engine.AsyncLLM drives it from
asyncio.
"""

from __future__ import annotations

import concurrent.futures as cf
import itertools
import logging
import os
import random
import threading
import time
import weakref
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from .config import EngineConfig
from .detokenizer import IncrementalDetokenizer
from .kv_cache import KVCacheManager
from .model_runner import ModelRunner, _LaunchedStep, kv_bytes_per_block
from .outputs import CompletionOutput, Logprob, RequestMetrics, RequestOutput
from .protocols import PromptInput
from .request import Seq, SeqStatus
from .sampler import completion_seed
from .sampling_params import SamplingParams
from .scheduler import Scheduler
from .stop import StopChecker
from .utils import cdiv
from .validation import InvalidRequestError, RequestLimits, validate

if TYPE_CHECKING:
    from .parallel import ParallelContext
    from .tp_worker import WorkerGroup

logger = logging.getLogger("fleetserve.engine")

CPU_KV_SEQUENCES = 4
"""CPU default KV capacity, in full-length (max_model_len) sequences."""
CPU_KV_MEMORY_FRACTION = 0.125
"""CPU default KV capacity cap, as a fraction of the memory available at start-up."""


def _release_freed_heap() -> None:
    """Give the heap that loading freed (dequantization and metadata temporaries) back to the OS:
    glibc keeps freed small-chunk memory resident otherwise (measured: ~60 MiB after loading the
    embedded GGUF). A no-op where there is no glibc."""
    import ctypes
    import gc

    gc.collect(1)  # the young generations: what loading left (a full collection took 80 ms)
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):
        pass


def available_memory() -> int:
    """Bytes of memory the system can give without swapping: Linux's MemAvailable, else psutil's
    figure, else half the physical memory."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        import psutil  # type: ignore[import-untyped]

        return int(psutil.virtual_memory().available)
    except ImportError:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") // 2


@dataclass
class EngineStats:
    num_running: int
    num_waiting: int
    kv_cache_usage: float
    num_preemptions_total: int
    prefix_cache_queries_total: int
    prefix_cache_hits_total: int
    prompt_tokens_total: int
    generation_tokens_total: int


@dataclass
class _RequestState:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    params: SamplingParams
    seqs: list[Seq]
    detoks: list[IncrementalDetokenizer]
    metrics: RequestMetrics
    logprobs: list[list | None] = field(default_factory=list)
    cumulative_logprob: list[float | None] = field(default_factory=list)
    prompt_logprobs: list | None = None
    final_only: bool = False
    delta: bool = False
    # delta outputs: per completion, output tokens already reported (-1 once its finish was);
    # prompt logprob positions already reported
    num_sent: list[int] = field(default_factory=list)
    num_prompt_lp_sent: int = 0

    @property
    def finished(self) -> bool:
        seqs = self.seqs
        return seqs[0].is_finished if len(seqs) == 1 else all(s.is_finished for s in seqs)


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("device='cuda' was requested but no CUDA device is available")
    return torch.device(device)


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return getattr(torch, dtype)


class LLMEngine:
    def __init__(self, config: EngineConfig):
        self.config = config
        self.workers: WorkerGroup | None = None  # tensor-parallel ranks 1..N-1 (runtime/tp_worker.py)
        try:
            self._start(config)
        except BaseException:
            self.shutdown()
            raise

    def _start_tensor_parallel(self, config: EngineConfig) -> ParallelContext | None:
        """N > 1: check the split on the model's config (no weights read yet), then spawn the
        workers of ranks 1..N-1, which load their shards while rank 0 loads its own."""
        n = config.tensor_parallel_size
        if n == 1:
            return None
        from .loader import peek_model_config
        from .parallel import ParallelContext, TensorParallelError, check_devices, check_tensor_parallel
        from .tp_worker import WorkerGroup

        model_config, source = peek_model_config(config)
        check_tensor_parallel(model_config, n)
        if config.gguf_weights == "packed":
            raise TensorParallelError(
                f"tensor_parallel_size={n} with gguf_weights='packed': packed weights are not split "
                "across ranks yet; use gguf_weights='dequantize' (or 'auto')"
            )
        visible = torch.cuda.device_count() if self.device.type == "cuda" else 0
        check_devices(n, self.device.type, visible)
        # A Hub name is resolved once, here: the workers read the same cached snapshot.
        worker_config = config if source == config.model else config.model_copy(update={"model": source})
        self.workers = WorkerGroup(worker_config, n, self.device.type)
        self._finalizer = weakref.finalize(self, self.workers.close)
        tp = ParallelContext(0, n, self.device)
        tp.store = self.workers.store
        workers = self.workers
        tp.on_error = lambda e: workers.failure_or(cause=e)
        return tp

    def _start(self, config: EngineConfig) -> None:
        from .loader import load_model

        self.device = resolve_device(config.device)
        self.dtype = resolve_dtype(config.dtype, self.device)
        torch.manual_seed(config.seed)
        self._closed = False
        # Device memory this process's tensors held before this engine loaded anything (another
        # engine not closed, a test's leftovers): named in the error when the KV cache does not fit.
        self._held_before = 0
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            self._held_before = torch.cuda.memory_allocated()
        t0 = time.perf_counter()
        tp = self._start_tensor_parallel(config)
        loaded = load_model(config, self.device, self.dtype, tp=tp)
        worker_blocks: list[int | None] = []
        if tp is not None and self.workers is not None:
            worker_blocks = self.workers.wait_loaded()
            tp.connect(self.workers.host, self.workers.port)
        self.model_config = loaded.model_config
        self.tokenizer = loaded.tokenizer
        self.model_name = config.served_model_name or loaded.model_name
        self.generation_defaults = (
            _valid_generation_defaults(loaded.generation_defaults)
            if config.generation_config == "auto"
            else {}
        )
        mc = self.model_config
        self.vocab_size = mc.vocab_size
        # Sliding-window layers attend over their window in the kernels: the whole context is served.
        limit = mc.max_position_embeddings
        if config.max_model_len is not None and config.max_model_len > limit:
            raise ValueError(
                f"max_model_len={config.max_model_len} exceeds what {self.model_name} supports ({limit})"
            )
        self.max_model_len = config.max_model_len or limit
        self.block_size = config.block_size
        # Per rank: each holds its KV heads; the smallest rank's budget sizes the shared block table.
        self.num_kv_blocks = min(
            [self._num_kv_blocks(loaded.model)] + [b for b in worker_blocks if b is not None]
        )
        capacity = self.num_kv_blocks * self.block_size
        if capacity < self.max_model_len:  # one full-length sequence must always fit (vLLM refuses to start)
            if config.max_model_len is not None:
                raise ValueError(
                    f"max_model_len={self.max_model_len} does not fit in the KV cache ({capacity} tokens "
                    f"in {self.num_kv_blocks} blocks): lower it or give the KV cache more memory"
                )
            logger.warning(
                "KV cache holds %d tokens: max_model_len lowered from %d", capacity, self.max_model_len
            )
            self.max_model_len = capacity
        self.limits = RequestLimits(
            max_model_len=self.max_model_len, vocab_size=self.vocab_size, max_logprobs=config.max_logprobs
        )
        self.eos_token_ids = (
            set(self.tokenizer.eos_token_ids) if self.tokenizer is not None else set(mc.eos_token_ids or ())
        )
        # The one owner of stop decisions; it reads stop strings from the sequence's detokenizer.
        self._stop = StopChecker(self.eos_token_ids, self._detokenizer_of)
        if self.workers is not None:
            self.workers.init(self.num_kv_blocks, self.eos_token_ids)
        self.runner = ModelRunner(
            loaded.model,
            mc,
            self.device,
            self.dtype,
            self.num_kv_blocks,
            self.block_size,
            self.eos_token_ids,
            tp=tp,
            workers=self.workers,
        )
        del loaded
        if self.device.type == "cpu":
            _release_freed_heap()
        budget = config.max_num_batched_tokens or (8192 if self.device.type == "cuda" else 2048)
        if self.device.type == "cuda" and not config.enforce_eager:
            max_batch, mixed_tokens = min(config.max_num_seqs, 512), min(config.cuda_graph_max_tokens, budget)
            secs = self.runner.capture_graphs(max_batch, self.max_model_len, mixed_tokens)
            logger.info(
                "captured CUDA graphs for decode batch sizes up to %d and mixed steps up to %d tokens in %.1fs",
                max_batch,
                mixed_tokens,
                secs,
            )
        self.scheduler = Scheduler(
            KVCacheManager(self.num_kv_blocks, self.block_size, config.enable_prefix_caching),
            config.max_num_seqs,
            budget,
        )
        self.max_concurrency = self.num_kv_blocks * self.block_size / self.max_model_len
        self._requests: dict[str, _RequestState] = {}
        self._seq_ids = itertools.count()
        self._rng = random.Random(config.seed)
        self._pending_outputs: list[RequestOutput] = []
        # the launched step whose tokens are not read back yet (async scheduling)
        self._inflight: _LaunchedStep | None = None
        self._num_penalty_requests = 0
        # Structured outputs: requests whose grammar is still compiling (off this thread), and the
        # count of running ones (while any runs, pipelined steps sample only after the previous
        # step was processed: their masks need its tokens; see step()).
        # (state, compile future, monotonic deadline of the compile)
        self._grammar_waiting: list[tuple[_RequestState, cf.Future, float]] = []
        self._num_grammar_requests = 0
        self._structured = None
        self._structured_lock = threading.Lock()
        self.async_scheduling = (
            config.async_scheduling if config.async_scheduling is not None else self.device.type == "cuda"
        )
        self.runner.share_samples = tp is not None and self.async_scheduling
        self.prompt_tokens_total = 0
        self.generation_tokens_total = 0
        # False: no text and no stop strings here (the caller detokenizes, as the server's
        # OutputProcessor does); logprobs then carry no decoded_token.
        self.detokenize = True
        if self.device.type == "cuda":
            self._warmup()
        logger.info(
            "model %s loaded in %.1fs: dtype=%s device=%s, KV cache %d blocks x %d tokens "
            "(max concurrency %.1fx at %d tokens)%s",
            self.model_name,
            time.perf_counter() - t0,
            str(self.dtype).replace("torch.", ""),
            self.device,
            self.num_kv_blocks,
            self.block_size,
            self.max_concurrency,
            self.max_model_len,
            ""
            if tp is None
            else f"; tensor parallel over {tp.world_size} ranks, per rank: {tp.layout.num_heads} of "
            f"{mc.num_heads} query heads, {tp.layout.num_kv_heads} of {mc.num_kv_heads} KV heads, "
            f"{self.num_kv_blocks} KV blocks ({self.num_kv_blocks * kv_bytes_per_block(mc, self.block_size, self.dtype, tp.world_size) / 2**20:.1f} MiB)",
        )

    def shutdown(self) -> None:
        """Stop and join the tensor-parallel workers (a no-op without them); idempotent."""
        workers, self.workers = self.workers, None
        if workers is not None:
            workers.close()

    def on_fatal(self, callback: Callable[[str], None]) -> None:
        """callback(message) runs (on a monitor thread) when a tensor-parallel worker dies."""
        if self.workers is not None:
            self.workers.on_failure.append(callback)

    def _warmup(self) -> None:
        """Run a prefill step, a mixed prefill+decode step, decode steps and a sampled row once,
        so that Triton's JIT (and the sampler's torch.compile) work happens at startup instead
        of inside the first requests. Counters are reset afterwards."""
        t0 = time.perf_counter()
        g = torch.Generator().manual_seed(0)
        n = max(2, min(512, self.max_model_len // 4, self.scheduler.max_num_batched_tokens // 2))
        prompt = lambda: torch.randint(0, self.vocab_size, (n,), generator=g).tolist()  # noqa: E731
        self.add_request(
            "__warmup-0", prompt(), SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True)
        )
        self.step()
        self.add_request(
            "__warmup-1", prompt(), SamplingParams(temperature=1.0, seed=0, max_tokens=4, ignore_eos=True)
        )
        while self.has_unfinished_requests():
            self.step()
        self.prompt_tokens_total = self.generation_tokens_total = 0
        self.scheduler.num_preemptions = 0
        self.scheduler.kv.prefix_cache_queries = self.scheduler.kv.prefix_cache_hits = 0
        logger.info("warm-up steps took %.1fs", time.perf_counter() - t0)

    @classmethod
    def from_config(cls, config: EngineConfig) -> LLMEngine:
        return cls(config)

    # -- sizing -------------------------------------------------------------
    def _num_kv_blocks(self, model) -> int:
        cfg = self.config
        per_block = kv_bytes_per_block(
            self.model_config, self.block_size, self.dtype, cfg.tensor_parallel_size
        )
        if cfg.num_kv_blocks is not None:
            n = cfg.num_kv_blocks
        elif cfg.kv_cache_memory is not None:
            n = cfg.kv_cache_memory // per_block
        elif self.device.type == "cuda":
            n = self._profile_cuda_blocks(model, per_block)
        else:
            n = self._cpu_kv_blocks(per_block)
        min_blocks = cdiv(16, self.block_size)
        if n < min_blocks:
            raise ValueError(
                f"KV cache too small: {n} blocks of {self.block_size} tokens "
                f"({per_block} bytes each); give more memory or num_kv_blocks"
            )
        return int(n)

    def _cpu_kv_blocks(self, per_block: int) -> int:
        """CPU default: room for CPU_KV_SEQUENCES full-length sequences (fewer if max_num_seqs is
        smaller), at most CPU_KV_MEMORY_FRACTION of the memory available now. The pages are
        committed lazily (see model_runner._allocate_kv_caches): unused capacity costs no RAM."""
        seqs = min(self.config.max_num_seqs, CPU_KV_SEQUENCES)
        want = cdiv(seqs * self.max_model_len, self.block_size)
        avail = available_memory()
        cap = int(avail * CPU_KV_MEMORY_FRACTION) // per_block
        n = min(want, cap)
        why = (
            f"{seqs} sequences x max_model_len {self.max_model_len}"
            if n == want
            else f"capped at {CPU_KV_MEMORY_FRACTION:.0%} of {avail / 2**30:.1f} GiB available memory"
        )
        logger.info(
            "KV cache on CPU: %d tokens, %.0f MiB of %s (%s; pages become resident as blocks are first used;"
            " set kv_cache_memory or num_kv_blocks to change it)",
            n * self.block_size,
            n * per_block / 2**20,
            str(self.dtype).replace("torch.", ""),
            why,
        )
        return n

    def _profile_cuda_blocks(self, model, per_block: int) -> int:
        """KV blocks for this engine (see cuda_kv_blocks)."""
        return cuda_kv_blocks(self.config, self.model_config, per_block, held_before=self._held_before)

    # -- lifecycle --------------------------------------------------------------
    def close(self) -> None:
        """Release what the engine holds on the device (weights, KV cache, CUDA graphs and their
        memory pool, staging buffers) and stop the grammar compiler's threads. Requests not
        finished are dropped without outputs. The engine is unusable afterwards; closing twice
        is a no-op. Without close() the memory lives until the garbage collector breaks the
        engine's reference cycles (bound methods it hands out), i.e. at no predictable time."""
        if self._closed:
            return
        self._closed = True
        self._inflight = None
        self._requests.clear()
        self._pending_outputs.clear()
        self._grammar_waiting.clear()
        self.shutdown()
        if self._structured is not None:
            self._structured.shutdown()
        self.runner.close()
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.empty_cache()  # give the blocks back to the driver: the next engine sizes from it

    @property
    def closed(self) -> bool:
        return self._closed

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError("this engine was closed: create a new one")

    # -- requests -------------------------------------------------------------
    def _tokenize(self, prompt: PromptInput) -> tuple[str | None, list[int]]:
        if isinstance(prompt, dict):
            if "prompt_token_ids" in prompt:
                return prompt.get("prompt"), list(prompt["prompt_token_ids"])
            if "prompt" in prompt:
                prompt = prompt["prompt"]
            else:
                raise InvalidRequestError(
                    "a prompt dict needs 'prompt' or 'prompt_token_ids'", param="prompt"
                )
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

    def add_request(
        self,
        request_id: str,
        prompt: PromptInput,
        params: SamplingParams | None = None,
        arrival_time: float | None = None,
        final_only: bool = False,
        delta: bool = False,
    ) -> None:
        """Queue a request; runtime/validation.validate checks it first (InvalidRequestError, a
        ValueError). final_only: step() reports it only once finished (offline batches), which
        saves building an output object for every request in every step. delta: each output
        holds only what is new since the request's previous output (token ids, logprobs, text,
        prompt logprobs), so no cumulative list is copied per step."""
        self._check_open()
        params = params or SamplingParams()
        if request_id in self._requests:
            raise ValueError(f"request id {request_id!r} is already in use")
        text, ids = self._tokenize(prompt)
        validate(ids, params, self.limits)
        grammar_future = None
        if params.structured_outputs is not None:
            # compiled off this thread (usually a cache hit: the server compiled it to check it)
            grammar_future = self.structured.submit(params.structured_outputs)
            if grammar_future.done() and grammar_future.exception() is not None:
                raise grammar_future.exception()
        max_len = self.max_model_len if params.max_tokens is None else len(ids) + params.max_tokens
        base_seed = params.seed if params.seed is not None else self._rng.getrandbits(62)
        arrival = arrival_time if arrival_time is not None else time.time()
        seqs = [
            Seq(
                next(self._seq_ids),
                request_id,
                i,
                ids,
                params,
                completion_seed(base_seed, i),
                max_len,
                arrival,
            )
            for i in range(params.n)
        ]
        seqs[0].pending_forks = seqs[1:]
        state = _RequestState(
            request_id=request_id,
            prompt=text,
            prompt_token_ids=ids,
            params=params,
            seqs=seqs,
            detoks=(
                [IncrementalDetokenizer(self.tokenizer, ids, params) for _ in seqs]
                if self.tokenizer and self.detokenize
                else []
            ),
            metrics=RequestMetrics(arrival_time=arrival),
            logprobs=[[] if params.logprobs is not None else None for _ in seqs],
            cumulative_logprob=[0.0 if params.logprobs is not None else None for _ in seqs],
            prompt_logprobs=[None] if params.prompt_logprobs is not None else None,
            final_only=final_only,
            delta=delta,
            num_sent=[0] * len(seqs),
        )
        self._requests[request_id] = state
        if params.has_penalties:
            self._num_penalty_requests += 1
        self.prompt_tokens_total += len(ids)
        if grammar_future is not None and not grammar_future.done():
            # scheduled once compiled (step()); refused past the compile time limit
            deadline = time.monotonic() + self.config.grammar_compile_timeout
            self._grammar_waiting.append((state, grammar_future, deadline))
            return
        if grammar_future is not None:
            self._attach_grammar(state, grammar_future.result())
        self.scheduler.add(seqs[0])

    # -- structured outputs ----------------------------------------------------
    @property
    def structured(self):
        """The GrammarCompiler (created on first use; thread-safe, the server compiles through it)."""
        if self._structured is None:
            with self._structured_lock:
                if self._structured is None:
                    if self.tokenizer is None:
                        raise ValueError("structured outputs need a tokenizer; this model has none")
                    from .structured.grammar import GrammarCompiler

                    cfg = self.config
                    self._structured = GrammarCompiler(
                        self.tokenizer,
                        self.vocab_size,
                        self.eos_token_ids,
                        cache_size=cfg.grammar_cache_size,
                        max_threads=cfg.grammar_compile_threads,
                        compile_timeout=cfg.grammar_compile_timeout,
                        max_spec_bytes=cfg.max_grammar_bytes,
                    )
        return self._structured

    def _attach_grammar(self, state: _RequestState, compiled) -> None:
        so = state.params.structured_outputs
        for seq in state.seqs:
            seq.grammar = self.structured.new_state(compiled, so)
        self._num_grammar_requests += 1

    def _admit_compiled(self) -> None:
        """Schedule requests whose grammar finished compiling; fail those whose compile failed.
        With nothing else to run, wait a little for one instead of spinning."""
        if not self.scheduler.has_unfinished() and self._inflight is None:
            cf.wait([f for _, f, _ in self._grammar_waiting], timeout=0.05, return_when=cf.FIRST_COMPLETED)
        still = []
        now = time.monotonic()
        for state, fut, deadline in self._grammar_waiting:
            if state.request_id not in self._requests:
                continue  # aborted while compiling
            error = fut.exception() if fut.done() else None
            if not fut.done() and now > deadline:
                # the same limit as the server's check (the compile goes on; its result is cached)
                so = state.params.structured_outputs
                kind = so.kind.replace("_schema", "") if so is not None else "grammar"
                error = GrammarTimeout(
                    f"the {kind} constraint did not compile within {self.config.grammar_compile_timeout:g}s: "
                    "simplify it"
                )
            if not fut.done() and error is None:
                still.append((state, fut, deadline))
            elif error is not None:
                logger.warning("request %s: %s", state.request_id, error)
                self._forget(state.request_id)
                for s in state.seqs:  # never scheduled: nothing to free, but finish() is the one way to end
                    self.scheduler.finish(s, SeqStatus.FINISHED_ABORTED, str(error))
                state.metrics.finished_time = time.time()
                self._pending_outputs.append(self._make_output(state))
            else:
                self._attach_grammar(state, fut.result())
                self.scheduler.add(state.seqs[0])
        self._grammar_waiting = still

    def abort_request(self, request_id: str | Iterable[str]) -> None:
        ids = [request_id] if isinstance(request_id, str) else list(request_id)
        for rid in ids:
            state = self._requests.get(rid)
            if state is None:
                continue
            self._forget(rid)
            self.scheduler.abort([s for s in state.seqs if not s.is_finished])
            state.metrics.finished_time = time.time()
            self._pending_outputs.append(self._make_output(state))

    def has_unfinished_requests(self) -> bool:
        return bool(self._requests) or bool(self._pending_outputs) or self._inflight is not None

    def get_num_unfinished_requests(self) -> int:
        return len(self._requests)

    # -- the loop -------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        if self.workers is not None and self.workers.failure is not None:
            raise self.workers.failure
        return self._step()

    def _step(self) -> list[RequestOutput]:
        """Run one engine step; returns the outputs of requests that progressed.

        With async scheduling (default on CUDA) the step is pipelined: the next step is
        scheduled and queued on the device before the previous one's tokens are read
        back, so host work (scheduling, input preparation, detokenization) overlaps
        device work. Outputs then trail the device by one step. Requests with
        repetition/presence/frequency penalties need every token on the host before
        sampling: while any is running, steps run one at a time.
        """
        self._check_open()
        if self._grammar_waiting:
            self._admit_compiled()
        outputs, self._pending_outputs = self._pending_outputs, []
        pipelined = self.async_scheduling and self._num_penalty_requests == 0
        if self._inflight is not None and not pipelined:
            outputs += self._process(self._inflight)
            self._inflight = None
        sched = self.scheduler.schedule()
        if sched.is_empty:
            if self._inflight is not None:
                outputs += self._process(self._inflight)
                self._inflight = None
            return outputs
        now = time.time()
        for s in sched.scheduled:
            m = self._requests[s.seq.request_id].metrics
            if m.first_scheduled_time is None:
                m.first_scheduled_time = now
        # Grammar masks need the previous step's tokens: queue this step's forward pass, read
        # back and process the previous step while it runs, then fill the masks and sample.
        defer = self._inflight is not None and self._num_grammar_requests > 0
        launched = self.runner.launch(sched, defer_sample=defer, structured=self._num_grammar_requests > 0)
        if self._inflight is not None:
            outputs += self._process(self._inflight)
        if defer:
            self.runner.finish_launch(launched)
        if pipelined:
            self._inflight = launched
        else:
            self._inflight = None
            outputs += self._process(launched)
        return outputs

    def _process(self, launched) -> list[RequestOutput]:
        """Read back one launched step and turn its tokens into request outputs."""
        result = self.runner.collect(launched)
        sched = launched.sched
        progressed = self.scheduler.update(sched, result.sampled, self._stop)
        now = time.time()
        outputs: list[RequestOutput] = []
        touched: dict[str, _RequestState] = {}
        for seq_id, (first, entries) in result.prompt_logprobs.items():
            seq = next(s.seq for s in sched.scheduled if s.seq.seq_id == seq_id)
            state = self._requests.get(seq.request_id)
            if state is None or state.prompt_logprobs is None:
                continue
            # prompt positions already covered (recompute after preemption repeats some)
            have = len(state.prompt_logprobs) - 1
            state.prompt_logprobs.extend(self._logprob_dicts(entries[max(0, have - first) :]))
        for seq in progressed:
            state = self._requests[seq.request_id]
            touched[seq.request_id] = state
            self.generation_tokens_total += 1
            if seq.grammar is not None:
                seq.grammar.accept(seq.token_ids[-1])
            if seq.seq_id in result.logprobs:
                ids, lps, rank = result.logprobs[seq.seq_id]
                lp_entries, cum = state.logprobs[seq.index], state.cumulative_logprob[seq.index]
                assert lp_entries is not None and cum is not None  # the runner sends logprobs only when asked
                lp_entries.append(self._logprob_dict(ids, lps, rank))
                state.cumulative_logprob[seq.index] = cum + lps[0]
        for rid, state in touched.items():
            m = state.metrics
            if m.first_token_time is None:
                m.first_token_time = now
            m.last_token_time = now
            if state.finished:
                m.finished_time = now
                m.num_preemptions = sum(s.num_preemptions for s in state.seqs)
                self._forget(rid)
            elif state.final_only:
                continue
            outputs.append(self._make_output(state))
        return outputs

    def _detokenizer_of(self, seq: Seq) -> IncrementalDetokenizer | None:
        state = self._requests.get(seq.request_id)
        return state.detoks[seq.index] if state is not None and state.detoks else None

    def _forget(self, request_id: str) -> None:
        state = self._requests.pop(request_id, None)
        if state is not None and state.params.has_penalties:
            self._num_penalty_requests -= 1
        if state is not None and state.seqs[0].grammar is not None:
            self._num_grammar_requests -= 1

    # -- outputs --------------------------------------------------------------
    def _decode_token(self, token_id: int) -> str | None:
        if self.tokenizer is None or not self.detokenize:
            return None
        return self.tokenizer.decode([token_id], skip_special_tokens=False)

    def _logprob_dict(self, ids: list[int], lps: list[float], rank: int) -> dict[int, Logprob]:
        d = {ids[0]: Logprob(lps[0], rank, self._decode_token(ids[0]))}
        for j in range(1, len(ids)):
            if ids[j] not in d:
                d[ids[j]] = Logprob(lps[j], j, self._decode_token(ids[j]))
        return d

    def _logprob_dicts(self, entries):
        return [self._logprob_dict(ids, lps, rank) for ids, lps, rank in entries]

    def _make_output(self, state: _RequestState) -> RequestOutput:
        if state.delta:
            return self._make_delta_output(state)
        comps = []
        for i, seq in enumerate(state.seqs):
            text = ""
            if state.detoks:  # while running, hold back text that a stop string could still cut
                det = state.detoks[i]
                text = (
                    det.output_text
                    if seq.is_finished
                    else det.get_next_output_text(finished=False, delta=False)
                )
            comps.append(
                CompletionOutput(
                    index=i,
                    text=text,
                    token_ids=seq.output_token_ids,
                    cumulative_logprob=state.cumulative_logprob[i],
                    logprobs=state.logprobs[i],
                    finish_reason=seq.status.value if seq.is_finished else None,
                    stop_reason=seq.stop_reason,
                )
            )
        return RequestOutput(
            request_id=state.request_id,
            prompt=state.prompt,
            prompt_token_ids=state.prompt_token_ids,
            outputs=comps,
            finished=state.finished,
            prompt_logprobs=state.prompt_logprobs,
            num_cached_tokens=state.seqs[0].num_cached_tokens,
            metrics=state.metrics,
        )

    def _make_delta_output(self, state: _RequestState) -> RequestOutput:
        comps = []
        for i, seq in enumerate(state.seqs):
            sent = state.num_sent[i]
            if sent < 0:
                continue  # its finish was already reported
            start = seq.num_prompt_tokens + sent
            if start >= len(seq.token_ids) and not seq.is_finished:
                continue  # nothing new for this completion (n > 1: a sibling progressed)
            state.num_sent[i] = -1 if seq.is_finished else len(seq.token_ids) - seq.num_prompt_tokens
            lps = state.logprobs[i]
            text = ""
            if state.detoks:
                text = state.detoks[i].get_next_output_text(finished=seq.is_finished, delta=True)
            comps.append(
                CompletionOutput(
                    index=i,
                    text=text,
                    token_ids=seq.token_ids[start:],
                    cumulative_logprob=state.cumulative_logprob[i],
                    logprobs=None if lps is None else lps[sent:],
                    finish_reason=seq.status.value if seq.is_finished else None,
                    stop_reason=seq.stop_reason,
                )
            )
        plp = state.prompt_logprobs
        if plp is not None:
            plp, state.num_prompt_lp_sent = plp[state.num_prompt_lp_sent :], len(plp)
        return RequestOutput(
            request_id=state.request_id,
            prompt=state.prompt,
            prompt_token_ids=state.prompt_token_ids,
            outputs=comps,
            finished=state.finished,
            prompt_logprobs=plp,
            num_cached_tokens=state.seqs[0].num_cached_tokens,
            metrics=state.metrics,
        )

    def get_stats(self) -> EngineStats:
        kv = self.scheduler.kv
        return EngineStats(
            num_running=len(self.scheduler.running),
            num_waiting=len(self.scheduler.waiting),
            kv_cache_usage=kv.usage,
            num_preemptions_total=self.scheduler.num_preemptions,
            prefix_cache_queries_total=kv.prefix_cache_queries,
            prefix_cache_hits_total=kv.prefix_cache_hits,
            prompt_tokens_total=self.prompt_tokens_total,
            generation_tokens_total=self.generation_tokens_total,
        )


# Device memory kept free beside the KV cache when the card is shared (CUDA graphs' pool, cuBLAS
# workspaces, the allocator's fragmentation): the budget of gpu_memory_utilization leaves more than
# this whenever the engine is alone on the card.
_FREE_MARGIN_BYTES = 1 << 30


def cuda_kv_blocks(config: EngineConfig, model_config, per_block: int, held_before: int = 0) -> int:
    """KV blocks for this engine on this process's card (each tensor-parallel rank sizes its own
    card; the engine takes the minimum): gpu_memory_utilization is this engine's share of the card
    (as in vLLM: two engines on one card can take 0.45 each), less its weights and a peak-activation
    estimate; and no more than is free now, less the activations and a margin.

    held_before: device memory this process's tensors held before the engine loaded anything.
    Memory the caching allocator keeps but no tensor uses (an engine closed earlier in this
    process) is given back to the driver first, so that it counts as free."""
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    free, total = torch.cuda.mem_get_info()
    weights = torch.cuda.memory_allocated() - held_before
    # Peak activations of the largest step: logits of up to max_num_seqs rows dominate besides the MLP.
    budget_tokens = config.max_num_batched_tokens or 8192
    act = budget_tokens * (model_config.hidden_size * 12 + model_config.intermediate_size * 6) * 2
    act += config.max_num_seqs * model_config.vocab_size * 4 * 4
    share = total * config.gpu_memory_utilization - weights - act
    room = free - act - _FREE_MARGIN_BYTES
    n = max(int(min(share, room) // per_block), 0)
    if room < share:
        gib = 1 << 30
        others = total - free - torch.cuda.memory_reserved()
        msg = (
            f"{free / gib:.1f} GiB of {total / gib:.1f} GiB free after loading the weights "
            f"({weights / gib:.1f} GiB): {held_before / gib:.1f} GiB held by something else in this "
            f"process (an engine not closed? LLM.close() frees one), {max(others, 0) / gib:.1f} GiB "
            f"by the CUDA context and other processes; {act / gib:.1f} GiB kept for activations"
        )
        if n < cdiv(16, config.block_size):
            raise ValueError(f"KV cache too small: {n} blocks of {config.block_size} tokens fit: {msg}")
        logger.warning(
            "KV cache limited to %d blocks by free memory (gpu_memory_utilization=%s allows %d): %s",
            n,
            config.gpu_memory_utilization,
            int(share // per_block),
            msg,
        )
    return n


class GrammarTimeout(InvalidRequestError):
    """A request's grammar did not compile within grammar_compile_timeout."""


def _valid_generation_defaults(raw: dict) -> dict:
    """The model's sampling defaults that SamplingParams accepts; a bad value is logged and dropped
    (a broken generation_config.json should not stop the server)."""
    out = {}
    for name, value in raw.items():
        try:
            SamplingParams(**{name: value})
        except ValueError as e:
            logger.warning("ignoring the model's default %s=%r: %s", name, value, e)
            continue
        out[name] = value
    return out
