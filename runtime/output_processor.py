"""OutputProcessor: the HTTP process's half of every request's output (vLLM v1's frontend side).

Owns, per request in flight: the detokenizers (text and stop strings), the
generated token ids and logprobs, finish reasons and timings as the frontend
sees them. It turns the engine core's per-step deltas (runtime/engine_core.py
wire format: new token ids, new logprobs, finish reason) into RequestOutputs of
the kind each consumer asked for:
- DELTA: only what is new since the consumer's previous output (SSE streaming);
- CUMULATIVE: everything so far (compatibility; copies the lists per output);
- FINAL: one output, once the request finished (non-streaming responses).
A stop string is found here, with runtime/stop.py's rules (`match_stop_string`,
`resolve`: the same precedence the engine applies when it detokenizes itself; the
min_tokens window is the shared IncrementalDetokenizer's); the completion then ends here and, once every
completion of the request ended, the processor asks the core to abort the request
(its KV blocks are freed; a sibling of n > 1 stopped by a string keeps running in
the core until the whole request is done, and its extra tokens are dropped).
Runs on the event loop only.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from typing import NamedTuple

from .detokenizer import IncrementalDetokenizer
from .outputs import CompletionOutput, Logprob, RequestMetrics, RequestOutput
from .request import SeqStatus
from .sampling_params import SamplingParams
from .stop import StopDecision, match_stop_string, resolve


class OutputKind(enum.Enum):
    DELTA = "delta"
    CUMULATIVE = "cumulative"
    FINAL = "final"


class RequestProgress(NamedTuple):
    """What the metrics observer needs of one request after a step, without copies of its tokens."""

    request_id: str
    num_prompt_tokens: int
    num_output_tokens: int  # all completions, so far
    metrics: RequestMetrics
    finished: bool
    finish_reasons: tuple  # per completion, None while it runs


class _Completion:
    __slots__ = (
        "index",
        "detok",
        "token_ids",
        "logprobs",
        "cumulative_logprob",
        "finish_reason",
        "stop_reason",
        "num_sent",
    )

    def __init__(self, index: int, detok: IncrementalDetokenizer | None, want_logprobs: bool):
        self.index = index
        self.detok = detok
        self.token_ids: list[int] = []
        self.logprobs: list | None = [] if want_logprobs else None
        self.cumulative_logprob: float | None = None
        self.finish_reason: str | None = None
        self.stop_reason = None
        self.num_sent = 0  # DELTA: tokens already handed to the consumer


class _Request:
    __slots__ = (
        "request_id",
        "prompt",
        "prompt_token_ids",
        "params",
        "kind",
        "comps",
        "metrics",
        "prompt_logprobs",
        "num_cached_tokens",
        "num_done",
        "core_finished",
    )

    def __init__(
        self,
        request_id,
        prompt,
        prompt_token_ids,
        params: SamplingParams,
        kind: OutputKind,
        tokenizer,
        arrival: float,
    ):
        self.request_id = request_id
        self.prompt = prompt
        self.prompt_token_ids = prompt_token_ids
        self.params = params
        self.kind = kind
        want_lp = params.logprobs is not None
        self.comps = [
            _Completion(
                i,
                IncrementalDetokenizer(tokenizer, prompt_token_ids, params)
                if tokenizer is not None
                else None,
                want_lp,
            )
            for i in range(params.n)
        ]
        self.metrics = RequestMetrics(arrival_time=arrival)
        self.prompt_logprobs: list | None = [] if params.prompt_logprobs is not None else None
        self.num_cached_tokens = 0
        self.num_done = 0
        self.core_finished = False


class OutputProcessor:
    """`process(batch outputs, now)` -> [(request_id, RequestOutput)] to deliver, plus RequestProgress
    for the observers; `abort_core(request_id)` is called for requests that ended here first."""

    def __init__(self, tokenizer, abort_core: Callable[[str], None]):
        self.tokenizer = tokenizer
        self.abort_core = abort_core
        self.requests: dict[str, _Request] = {}
        self._decoded: dict[
            int, str
        ] = {}  # token id -> its text, for logprobs (small: the tokens that occur)

    def add(
        self,
        request_id: str,
        prompt: str | None,
        prompt_token_ids: list[int],
        params: SamplingParams,
        kind: OutputKind,
        arrival: float,
    ) -> None:
        self.requests[request_id] = _Request(
            request_id, prompt, prompt_token_ids, params, kind, self.tokenizer, arrival
        )

    def discard(self, request_id: str) -> None:
        self.requests.pop(request_id, None)

    # ------------------------------------------------------------ decoding helpers

    def _token_text(self, tid: int) -> str | None:
        if self.tokenizer is None:
            return None
        s = self._decoded.get(tid)
        if s is None:
            s = self.tokenizer.decode([tid], skip_special_tokens=False)
            if len(self._decoded) < 1 << 16:
                self._decoded[tid] = s
        return s

    def _logprob_dicts(self, packed) -> list:
        res: list[dict[int, Logprob] | None] = []
        for pos in packed:
            if pos is None:
                res.append(None)
                continue
            ids, lps, ranks = pos
            res.append({t: Logprob(lp, r, self._token_text(t)) for t, lp, r in zip(ids, lps, ranks)})
        return res

    # ------------------------------------------------------------ one batch

    def process(
        self, outputs: list, now: float
    ) -> tuple[list[tuple[str, RequestOutput]], list[RequestProgress]]:
        deliver, progress = [], []
        for rid, finished, num_cached, metrics, comps, plp in outputs:
            req = self.requests.get(rid)
            if req is None:
                continue  # ended here already (stop string, consumer gone)
            req.num_cached_tokens = num_cached
            if metrics is not None:
                m = req.metrics
                (
                    _,
                    m.first_scheduled_time,
                    m.first_token_time,
                    m.last_token_time,
                    m.finished_time,
                    m.num_preemptions,
                ) = metrics
            if plp is not None and req.prompt_logprobs is not None:
                req.prompt_logprobs.extend(self._logprob_dicts(plp))
            for index, new_ids, new_lps, cum_lp, reason, stop_reason in comps:
                c = req.comps[index]
                if c.finish_reason is not None:
                    continue  # stopped here by a stop string; the core's later tokens are dropped
                self._advance(req, c, new_ids, new_lps, cum_lp, reason, stop_reason, now)
            if finished:
                req.core_finished = True
                for c in req.comps:  # an abort, or the core's last word for each completion
                    if c.finish_reason is None:
                        c.finish_reason = "abort"
                        req.num_done += 1
            done = req.num_done == len(req.comps)
            if done:
                del self.requests[rid]
                if req.metrics.finished_time is None:
                    req.metrics.finished_time = now
                if not req.core_finished:
                    self.abort_core(rid)
            out = self._output(req, done)
            if out is not None:
                deliver.append((rid, out))
            progress.append(
                RequestProgress(
                    rid,
                    len(req.prompt_token_ids),
                    sum(len(c.token_ids) for c in req.comps),
                    req.metrics,
                    done,
                    tuple(c.finish_reason for c in req.comps),
                )
            )
        return deliver, progress

    def _advance(
        self,
        req: _Request,
        c: _Completion,
        new_ids: list[int],
        new_lps,
        cum_lp,
        reason,
        stop_reason,
        now: float,
    ) -> None:
        det = c.detok
        if new_lps is not None and c.logprobs is not None:
            lp_dicts = self._logprob_dicts(new_lps)
        else:
            lp_dicts = None
        if det is None or not new_ids:
            # No text to scan (no tokenizer), or an abort that brings no token: the core's word stands.
            if det is not None and reason is None:
                return
            self._append(c, new_ids, lp_dicts, cum_lp)
            if reason is not None:
                self._finish(req, c, reason, stop_reason)
            return
        if not det.stop and reason is None:
            det.update(new_ids)  # nothing can end the completion here
            self._append(c, new_ids, lp_dicts, cum_lp)
            return
        # Token by token, as the engine's StopChecker does: a stop string ends the completion at the
        # token completing it. The core decided rules 1 and 3 (EOS / stop ids, length) for the last token.
        for j, t in enumerate(new_ids):
            last = j == len(new_ids) - 1
            core_reason = reason if last else None
            # EOS / a stop token id ended it: the token stays in token_ids, its text is left out.
            by_token = (
                StopDecision(SeqStatus.FINISHED_STOPPED, stop_reason)
                if core_reason == "stop" and not isinstance(stop_reason, str)
                else None
            )
            matched = match_stop_string(det, t, by_token is not None, core_reason is not None)
            self._append(c, [t], None if lp_dicts is None else lp_dicts[j : j + 1], cum_lp if last else None)
            if core_reason == "abort":
                self._finish(req, c, "abort", stop_reason)
                return
            decision = resolve(by_token, matched, core_reason == "length")
            if decision is not None:
                self._finish(req, c, decision.status.value, decision.reason)
                return
            if core_reason is not None:  # a reason of the core's this side does not know: it stands
                self._finish(req, c, core_reason, stop_reason)
                return

    def _append(self, c: _Completion, ids: list[int], lp_dicts, cum_lp) -> None:
        c.token_ids.extend(ids)
        if lp_dicts is not None:
            assert c.logprobs is not None  # a completion that gets logprobs was created with a list
            c.logprobs.extend(lp_dicts)
        if cum_lp is not None:
            c.cumulative_logprob = cum_lp

    def _finish(self, req: _Request, c: _Completion, reason: str, stop_reason) -> None:
        c.finish_reason, c.stop_reason = reason, stop_reason
        req.num_done += 1

    # ------------------------------------------------------------ outputs

    def _output(self, req: _Request, done: bool) -> RequestOutput | None:
        kind = req.kind
        if kind is OutputKind.FINAL and not done:
            return None
        comps = []
        for c in req.comps:
            det = c.detok
            finished = c.finish_reason is not None
            if kind is OutputKind.DELTA:
                if c.num_sent < 0:
                    continue  # its finish was already delivered
                new = c.token_ids[c.num_sent :]  # a copy: the consumer may read it after more tokens arrived
                if not new and not finished:
                    continue
                text = det.get_next_output_text(finished=finished, delta=True) if det is not None else ""
                logprobs = None if c.logprobs is None else c.logprobs[c.num_sent :]
                c.num_sent = -1 if finished else len(c.token_ids)
                comps.append(
                    CompletionOutput(
                        c.index, text, new, c.cumulative_logprob, logprobs, c.finish_reason, c.stop_reason
                    )
                )
            else:
                if det is None:
                    text = ""
                else:
                    text = (
                        det.output_text if finished else det.get_next_output_text(finished=False, delta=False)
                    )
                copy = kind is OutputKind.CUMULATIVE and not done
                comps.append(
                    CompletionOutput(
                        c.index,
                        text,
                        list(c.token_ids) if copy else c.token_ids,
                        c.cumulative_logprob,
                        (list(c.logprobs) if copy else c.logprobs) if c.logprobs is not None else None,
                        c.finish_reason,
                        c.stop_reason,
                    )
                )
        if kind is OutputKind.DELTA and not comps and not done:
            return None
        plp = req.prompt_logprobs  # DELTA too: the whole list so far (not copied; streaming sends none)
        if plp is not None and kind is OutputKind.CUMULATIVE and not done:
            plp = list(plp)
        return RequestOutput(
            request_id=req.request_id,
            prompt=req.prompt,
            prompt_token_ids=req.prompt_token_ids,
            outputs=comps,
            finished=done,
            prompt_logprobs=plp,
            num_cached_tokens=req.num_cached_tokens,
            metrics=req.metrics,
        )
