"""Grammar compilation and per-completion matchers, on xgrammar.

Owns:
- `GrammarCompiler`: the tokenizer's xgrammar vocabulary, a small thread pool that
  compiles grammars off the engine thread, and an LRU cache of compiled grammars keyed
  by `StructuredOutputsParams.key()` (hits/misses counted). Compile errors become
  `GrammarError` (a ValueError naming the field); a compile that runs past the time
  limit is answered with GrammarError too (the worker finishes in the background and
  its result is still cached).
- `check_constraint` / `ConstraintChecker`: the tokenizer-free check (parse only) that the
  HTTP side of a split server runs, so that a grammar is compiled once, in the core.
- `GrammarState`: one completion's matcher (n > 1: one each), advanced with every
  token the completion gets, asked for the next token's bitmask each step.

Why xgrammar (measured on SmolLM2's 49152-token vocabulary, one CPU thread, see
docs/server.md): per-token masks of 3-8 us on average against llguidance's 17-165 us,
compile 4-10 ms per schema (llguidance compiles lazily in ~1-2 ms but pays it in the
first masks); it also ships a CUDA/Triton bitmask kernel and a manylinux cp312 wheel.
"""

from __future__ import annotations

import collections
import concurrent.futures as cf
import json
import logging
import re
import threading
from collections.abc import Sequence
from typing import Any

import torch

from ..validation import InvalidRequestError
from .params import StructuredOutputsParams

logger = logging.getLogger("fleetserve.structured")


class GrammarError(InvalidRequestError):
    """A constraint that cannot be compiled; `param` names the request field (an
    InvalidRequestError: the engine refuses the request, the server answers 400)."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message, param=param)


def _xgr():
    try:
        import xgrammar
    except ImportError as e:  # pragma: no cover - the runtime extra installs it
        raise GrammarError(
            f"structured outputs need the xgrammar package ({e}): pip install 'fleetserve[runtime]'"
        ) from None
    return xgrammar


def _ebnf_literal(s: str) -> str:
    # JSON's escapes for quotes, backslashes and control characters are EBNF's too; other
    # characters stay raw UTF-8 (a \uXXXX surrogate pair would not be one character there).
    return json.dumps(s, ensure_ascii=False)


# xgrammar prefixes its messages with "[hh:mm:ss] /path/file.cc:123: ".
_XGR_PREFIX = re.compile(r"^\[\d\d:\d\d:\d\d\] \S+:\d+: ")


def bitmask_width(vocab_size: int) -> int:
    return (vocab_size + 31) // 32


class GrammarCompiler:
    """Thread-safe; one per engine. `vocab_size` is the model's (logits width), which may
    exceed the tokenizer's: ids past the tokenizer's vocabulary are never allowed."""

    def __init__(
        self,
        tokenizer,
        vocab_size: int,
        eos_token_ids: Sequence[int],
        *,
        cache_size: int = 256,
        max_threads: int = 2,
        compile_timeout: float = 10.0,
        max_spec_bytes: int = 256 * 1024,
    ):
        xgr = _xgr()
        self.vocab_size = vocab_size
        self.compile_timeout = compile_timeout
        self.max_spec_bytes = max_spec_bytes
        self.eos_token_ids = sorted(eos_token_ids)
        backend = tokenizer.backend
        vocab = [""] * max(vocab_size, backend.get_vocab_size(with_added_tokens=True))
        for tok, i in backend.get_vocab(with_added_tokens=True).items():
            if i < len(vocab):
                vocab[i] = tok
        meta = _vocab_metadata(xgr, backend, vocab)
        self.tokenizer_info = xgr.TokenizerInfo(
            vocab,
            meta["vocab_type"],
            vocab_size=len(vocab),
            stop_token_ids=self.eos_token_ids,
            add_prefix_space=meta["add_prefix_space"],
        )
        # Our own cache (below) decides hits; xgrammar's would hide them from the counters.
        self._compiler = xgr.GrammarCompiler(self.tokenizer_info, max_threads=1, cache_enabled=False)
        self._pool = cf.ThreadPoolExecutor(max_workers=max_threads, thread_name_prefix="fleetserve-grammar")
        self._lock = threading.Lock()
        self._cache: collections.OrderedDict = collections.OrderedDict()  # key -> compiled grammar
        # key -> Future (one compile per key even when requests race)
        self._inflight: dict[Any, cf.Future[Any]] = {}
        self._cache_size = cache_size
        self.hits = 0
        self.misses = 0

    # -- compilation -----------------------------------------------------------
    def _compile(self, so: StructuredOutputsParams):
        kind = so.kind
        c = self._compiler
        try:
            if kind == "json_schema":
                schema = so.json_schema if isinstance(so.json_schema, str) else json.dumps(so.json_schema)
                return c.compile_json_schema(
                    schema, any_whitespace=not so.disable_any_whitespace, strict_mode=True
                )
            if kind == "json_object":
                if so.disable_any_whitespace:
                    return c.compile_json_schema(
                        '{"type": "object"}', any_whitespace=False, strict_mode=False
                    )
                return c.compile_builtin_json_grammar()
            if kind == "regex":
                return c.compile_regex(so.regex)
            if kind == "choice":
                return c.compile_grammar("root ::= " + " | ".join(_ebnf_literal(x) for x in so.choice or ()))
            return c.compile_grammar(so.grammar)
        except Exception as e:  # xgrammar raises RuntimeError / ValueError subclasses with a message
            raise _grammar_error(kind, e) from None

    def _finish(self, key, fut: cf.Future) -> None:
        with self._lock:
            self._inflight.pop(key, None)
            if fut.exception() is None:
                self._cache[key] = fut.result()
                while len(self._cache) > self._cache_size:
                    self._cache.popitem(last=False)

    def submit(self, so: StructuredOutputsParams) -> cf.Future:
        """A future of the compiled grammar (done at once on a cache hit); never blocks."""
        too_big = _size_error(so, self.max_spec_bytes)
        if too_big is not None:
            fut: cf.Future = cf.Future()
            fut.set_exception(too_big)
            return fut
        key = so.key()
        with self._lock:
            hit = self._cache.get(key)
            if hit is not None:
                self._cache.move_to_end(key)
                self.hits += 1
                fut = cf.Future()
                fut.set_result(hit)
                return fut
            pending = self._inflight.get(key)
            if pending is not None:
                self.hits += 1  # a second request for a grammar being compiled shares that compile
                return pending
            self.misses += 1
            fut = self._pool.submit(self._compile, so)
            self._inflight[key] = fut
        fut.add_done_callback(lambda f: self._finish(key, f))
        return fut

    def compile(self, so: StructuredOutputsParams, timeout: float | None = None):
        """Compile (or fetch) within the time limit; GrammarError on failure or timeout."""
        timeout = self.compile_timeout if timeout is None else timeout
        try:
            return self.submit(so).result(timeout)
        except cf.TimeoutError:
            raise GrammarError(
                f"the {so.kind.replace('_schema', '')} constraint did not compile within "
                f"{timeout:g}s: simplify it",
                param=so.kind,
            ) from None

    def new_state(self, compiled, so: StructuredOutputsParams) -> GrammarState:
        return GrammarState(
            _xgr().GrammarMatcher(compiled),
            so.start_after_token_ids,
            self.tokenizer_info.vocab_size,
            self.eos_token_ids,
        )

    def shutdown(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


_WHAT = {
    "json_schema": "invalid JSON schema",
    "json_object": "JSON grammar",
    "regex": "invalid regex",
    "choice": "invalid choice",
    "grammar": "invalid grammar",
}


def _grammar_error(kind: str, e: Exception) -> GrammarError:
    msg = str(e).strip().splitlines()
    text = _XGR_PREFIX.sub("", msg[0]) if msg else type(e).__name__
    return GrammarError(f"{_WHAT[kind]}: {text}", param=kind)


def _size_error(so: StructuredOutputsParams, max_spec_bytes: int) -> GrammarError | None:
    n = len(so.spec_text().encode())
    if n <= max_spec_bytes:
        return None
    return GrammarError(
        f"the {so.kind.replace('_schema', '')} constraint is {n} bytes; at most {max_spec_bytes} are accepted",
        param=so.kind,
    )


def check_constraint(so: StructuredOutputsParams, max_spec_bytes: int) -> None:
    """Refuse a constraint that cannot compile, without a tokenizer: xgrammar parses it into
    its grammar (the JSON schema / regex / EBNF conversion, where every error of a compile is
    found) but does not build the token-mask tables. Measured on a 1 KB JSON schema with
    SmolLM2's vocabulary: 0.3 ms against 110 ms for the compile (benchmarks/results, #10).
    The HTTP side of a server whose engine core runs in its own process checks requests with
    this (no vocabulary tables there at all); the core compiles each grammar once, cached."""
    too_big = _size_error(so, max_spec_bytes)
    if too_big is not None:
        raise too_big
    xgr, kind = _xgr(), so.kind
    try:
        if kind == "json_schema":
            schema = so.json_schema if isinstance(so.json_schema, str) else json.dumps(so.json_schema)
            xgr.Grammar.from_json_schema(
                schema, any_whitespace=not so.disable_any_whitespace, strict_mode=True
            )
        elif kind == "regex":
            xgr.Grammar.from_regex(so.regex)
        elif kind == "choice":
            xgr.Grammar.from_ebnf("root ::= " + " | ".join(_ebnf_literal(x) for x in so.choice or ()))
        elif kind == "grammar":
            xgr.Grammar.from_ebnf(so.grammar)
    except Exception as e:
        raise _grammar_error(kind, e) from None


class ConstraintChecker:
    """The HTTP side's stand-in for GrammarCompiler when the engine core runs in another process:
    `submit(so)` checks the constraint with `check_constraint` in a small thread pool (a future of
    None), remembering the keys that passed (LRU), so that the grammar is compiled only in the core."""

    def __init__(
        self,
        *,
        cache_size: int = 256,
        max_threads: int = 2,
        compile_timeout: float = 10.0,
        max_spec_bytes: int,
    ):
        self.compile_timeout = compile_timeout
        self.max_spec_bytes = max_spec_bytes
        self._pool = cf.ThreadPoolExecutor(
            max_workers=max_threads, thread_name_prefix="fleetserve-grammar-check"
        )
        self._lock = threading.Lock()
        self._ok: collections.OrderedDict = collections.OrderedDict()
        self._cache_size = cache_size

    def submit(self, so: StructuredOutputsParams) -> cf.Future:
        key = so.key()
        with self._lock:
            if key in self._ok:
                self._ok.move_to_end(key)
                fut: cf.Future = cf.Future()
                fut.set_result(None)
                return fut
        fut = self._pool.submit(check_constraint, so, self.max_spec_bytes)
        fut.add_done_callback(lambda f: self._passed(key, f))
        return fut

    def _passed(self, key, fut: cf.Future) -> None:
        if fut.cancelled() or fut.exception() is not None:
            return
        with self._lock:
            self._ok[key] = True
            while len(self._ok) > self._cache_size:
                self._ok.popitem(last=False)

    def shutdown(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


def _vocab_metadata(xgr, backend, vocab: list[str]) -> dict:
    """How token strings map to bytes: xgrammar's own detection from tokenizer.json (a private
    helper), else by the tokens' spelling (GPT-2 byte-level 'Ġ', SentencePiece '▁' + <0x..>)."""
    try:
        return xgr.TokenizerInfo._detect_metadata_from_hf(backend.to_str())
    except Exception as e:  # a renamed helper in another xgrammar version
        logger.warning("xgrammar vocabulary detection failed (%s); guessing from the tokens", e)
    if any(t.startswith("\u2581") for t in vocab) and "<0x0A>" in vocab:
        return {"vocab_type": xgr.VocabType.BYTE_FALLBACK, "add_prefix_space": True}
    if any(t.startswith("\u0120") for t in vocab):
        return {"vocab_type": xgr.VocabType.BYTE_LEVEL, "add_prefix_space": False}
    return {"vocab_type": xgr.VocabType.RAW, "add_prefix_space": False}


class GrammarState:
    """One completion's position in its grammar. Mutated only by the engine thread."""

    __slots__ = (
        "matcher",
        "start_after",
        "active",
        "num_tokens",
        "terminated",
        "vocab_size",
        "_eos",
        "_tail",
    )

    def __init__(
        self, matcher, start_after: Sequence[int] | None, vocab_size: int, eos_token_ids: Sequence[int]
    ):
        self.matcher = matcher
        self.start_after = tuple(start_after) if start_after else ()
        self.active = not self.start_after  # free text (reasoning) until start_after appeared
        self.num_tokens = 0  # output tokens seen (accepted or, before activation, skipped)
        self.terminated = False
        self.vocab_size = vocab_size
        self._eos = frozenset(eos_token_ids)
        self._tail: list[int] = []

    def accept(self, token: int) -> bool:
        """Advance by one sampled token; False if the grammar rejects it (then the state stops
        constraining: the completion is not valid any more, whatever comes next)."""
        self.num_tokens += 1
        if not self.active:
            self._tail = (self._tail + [token])[-len(self.start_after) :]
            if tuple(self._tail) == self.start_after:
                self.active = True
            return True
        if self.terminated:
            return token in self._eos  # after the end only EOS is offered (ignore_eos runs keep going)
        ok = self.matcher.accept_token(token)
        if not ok:
            logger.warning("grammar rejected token %d; constraint dropped for this completion", token)
            self.active = False
            self.start_after = (-1,)  # never re-activates
            return False
        if token in self._eos and self.matcher.is_terminated():  # only a stop token ends a grammar
            self.terminated = True
        return True

    @property
    def constrains(self) -> bool:
        return self.active

    def fill(self, bitmask: torch.Tensor, row: int) -> None:
        """Write the allowed next tokens into bitmask[row] (int32, one bit per token id)."""
        if self.terminated:
            bitmask[row].zero_()
            for t in sorted(self._eos):
                bitmask[row, t // 32] |= _bit(t % 32)
            return
        self.matcher.fill_next_token_bitmask(bitmask, row)


def _bit(i: int) -> int:
    # Bit i of an int32 word, as a Python int that fits int32 (bit 31 is the sign bit).
    return -(1 << 31) if i == 31 else 1 << i
