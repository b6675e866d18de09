"""Route handlers: OpenAI completions / chat completions, models, tokenize, health, metrics.

A request reads in one direction: JSON body -> protocol model (validated) ->
prompt token ids + SamplingParams -> AsyncLLM.generate -> RequestOutputs
(deltas for streams, the finished output for JSON) -> JSON response or SSE chunks. The server tokenizes prompts
itself (so it can check lengths and count usage before the engine sees them)
and hands the engine token ids only.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import time
from collections.abc import AsyncGenerator

from aiohttp import web
from pydantic import BaseModel

from ..async_engine import AsyncLLM, EngineDeadError, OutputKind
from ..outputs import CompletionOutput, RequestOutput
from ..sampling_params import SamplingParams
from ..structured.grammar import GrammarError
from ..tokenizer import Tokenizer
from ..validation import InvalidRequestError, validate
from . import sse
from .config import ServerConfig
from .errors import APIError, BadRequest, NotFound, Overloaded, RequestCut, error_body, to_bad_request
from .intake import Intake
from .metrics import CONTENT_TYPE, ServerMetrics
from .protocol import (
    ChatChoice,
    ChatChoiceLogprobs,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatResponseMessage,
    ChatStreamChoice,
    ChatTokenLogprob,
    CompletionChoice,
    CompletionChunk,
    CompletionLogprobs,
    CompletionRequest,
    CompletionResponse,
    DeltaFunctionCall,
    DeltaMessage,
    DeltaToolCall,
    DetokenizeRequest,
    FunctionCallOut,
    ModelCard,
    ModelList,
    NamedToolChoice,
    TemplateControlError,
    TokenizeRequest,
    ToolCallOut,
    TopLogprob,
    UsageInfo,
    _FieldError,
    chat_template_args,
    random_id,
)
from .reasoning import ReasoningParser, ReasoningStream
from .tools import RequiredParser, ToolCallStream, call_id, forced_constraint, get_parser

logger = logging.getLogger("fleetserve.server")

# Prompts longer than this (characters) are tokenized off the event loop; chats with more
# messages or characters are rendered off it (the template is Python: a worker thread lets the
# loop in every few ms; the tokenizer releases the GIL).
_INLINE_TOKENIZE_CHARS = 4096
_INLINE_CHAT_MESSAGES = 32
# Names an engine refusal may start with ("logprobs=25 exceeds ...") when it carries no param.
_ENGINE_PARAMS = frozenset(SamplingParams.model_fields) | {"prompt"}


async def merge(
    gens: list[AsyncGenerator[RequestOutput, None]],
) -> AsyncGenerator[tuple[int, RequestOutput], None]:
    """Interleaves several generate() streams; closing the merge aborts every one still running."""
    if len(gens) == 1:
        async with contextlib.aclosing(gens[0]) as g:
            async for out in g:
                yield 0, out
        return
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(i, gen):
        try:
            async with contextlib.aclosing(gen) as g:
                async for out in g:
                    queue.put_nowait((i, out))
            queue.put_nowait((i, None))
        except asyncio.CancelledError:
            raise
        except BaseException as e:
            queue.put_nowait((i, e))

    tasks = [asyncio.ensure_future(pump(i, g)) for i, g in enumerate(gens)]
    try:
        remaining = len(tasks)
        while remaining:
            i, item = await queue.get()
            if item is None:
                remaining -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield i, item
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def _bad_request(e: InvalidRequestError, prompt_param: str | None) -> BadRequest:
    """The engine's refusal as a 400; the prompt is "messages" for chat."""
    param = prompt_param if e.param == "prompt" else e.param
    return BadRequest(e.message, param=param, code=e.code)


def _usage(prompt_lens: list[int], latest: dict[int, RequestOutput]) -> UsageInfo:
    p = sum(prompt_lens)
    c = sum(len(co.token_ids) for out in latest.values() for co in out.outputs)
    return UsageInfo(prompt_tokens=p, completion_tokens=c, total_tokens=p + c)


def _reasons(latest: dict[int, RequestOutput]) -> set[str]:
    return {c.finish_reason or "abort" for out in latest.values() for c in out.outputs}


class _StreamTally:
    """What a stream of delta outputs has produced so far: token counts and finish reasons per choice."""

    def __init__(self):
        self.tokens: dict = {}  # choice key -> completion tokens so far
        self.reasons: dict = {}  # choice key -> finish reason
        self.prompts: set[int] = set()  # prompts (of a batch) that produced output

    def add(self, i: int, key, c: CompletionOutput) -> None:
        self.prompts.add(i)
        self.tokens[key] = self.tokens.get(key, 0) + len(c.token_ids)
        if c.finish_reason is not None:
            self.reasons[key] = c.finish_reason

    def usage(self, prompt_lens: list[int], seen_only: bool = False) -> UsageInfo:
        p = sum(prompt_lens[i] for i in self.prompts) if seen_only else sum(prompt_lens)
        c = sum(self.tokens.values())
        return UsageInfo(prompt_tokens=p, completion_tokens=c, total_tokens=p + c)

    def finish_reasons(self) -> set[str]:
        return {self.reasons.get(k, "abort") for k in self.tokens}


class _ParsedStream:
    """One streamed chat choice under a reasoning parser and / or tool calls: turns each new piece
    of text into reasoning, answer and tool-call deltas (None when there is nothing new). The
    parsers keep their own state and read each piece about once (no re-parse of the whole text)."""

    def __init__(self, reasoning: ReasoningParser | None, tools: ToolCallStream | None):
        self.reasoning = ReasoningStream(reasoning) if reasoning is not None else None
        self.tools = tools

    @property
    def num_calls(self) -> int:
        return self.tools.num_calls if self.tools is not None else 0

    def update(self, new: str, finished: bool) -> DeltaMessage | None:
        r_delta, answer = self.reasoning.feed(new, finished) if self.reasoning is not None else ("", new)
        calls = []
        if self.tools is None:
            c_delta = answer
        else:
            c_delta, tool_deltas = self.tools.feed(answer, finished)
            for index, cid, name, frag in tool_deltas:
                if cid is not None:
                    calls.append(
                        DeltaToolCall(
                            index=index,
                            id=cid,
                            type="function",
                            function=DeltaFunctionCall(name=name, arguments=""),
                        )
                    )
                else:
                    calls.append(DeltaToolCall(index=index, function=DeltaFunctionCall(arguments=frag)))
        if not (r_delta or c_delta or calls):
            return None
        return DeltaMessage(
            reasoning_content=r_delta or None, content=c_delta or None, tool_calls=calls or None
        )


class OpenAIServing:
    """Everything the handlers need, created once the engine is running."""

    def __init__(
        self,
        llm: AsyncLLM,
        config: ServerConfig,
        metrics: ServerMetrics,
        served_model_name: str,
        model_path: str | None,
    ):
        self.llm = llm
        self.config = config
        self.metrics = metrics
        self.tokenizer = llm.tokenizer
        self.served_model_name = served_model_name
        self.model_path = model_path
        self.max_model_len = llm.max_model_len
        self.limits = llm.limits  # what runtime/validation.validate checks requests against
        self.max_logprobs = self.limits.max_logprobs
        # The model's vocabulary bounds token ids (a preset may borrow a smaller tokenizer).
        self.vocab_size = self.limits.vocab_size
        max_chars = getattr(self.tokenizer, "max_chars_per_token", None)
        self.intake = Intake(
            self.max_model_len, max_chars() if callable(max_chars) else None, self.vocab_size
        )
        self.draining = False
        self.cut = False
        """Set once shutdown cut the requests still running at the drain timeout: no new generation starts."""
        self._in_flight: dict[
            str, tuple[list[str], bool]
        ] = {}  # request id -> (engine request ids, streaming)
        self.created = int(time.time())
        self.tool_parser = get_parser(config.tool_call_parser) if config.tool_call_parser else None
        self.reasoning = ReasoningParser(config.reasoning_parser) if config.reasoning_parser else None
        self._grammar_compiler = None
        # The model's sampling defaults (generation_config.json; none with --generation-config vllm).
        self.generation_defaults: dict = dict(llm.generation_defaults)

    @property
    def num_in_flight(self) -> int:
        """This app's requests that are generating (the engine may be shared by several apps)."""
        return len(self._in_flight)

    def cut_in_flight(self) -> tuple[int, int]:
        """Ends every generating request (shutdown past its drain timeout): streams get a final error
        event and [DONE], the others a 503 body. Returns (streams, others) cut."""
        self.cut = True
        streams = others = 0
        for engine_ids, streaming in list(self._in_flight.values()):
            for eid in engine_ids:
                self.llm.fail_request(
                    eid,
                    RequestCut(
                        "The server shut down before this request finished "
                        "(shutdown timeout reached). Retry on another replica."
                    ),
                )
            streams, others = (streams + 1, others) if streaming else (streams, others + 1)
        return streams, others

    # ------------------------------------------------------------ helpers

    async def _parse(self, request: web.Request, model: type[BaseModel]):
        return await self.intake.parse(request, model)

    def _check_model(self, name: str | None) -> None:
        # vLLM accepts an absent model; OpenAI clients always send one.
        if name is not None and name != self.served_model_name:
            raise NotFound(f"The model `{name}` does not exist.", param="model", code="model_not_found")

    def _admit(self, num_seqs: int) -> None:
        if self.cut:
            raise RequestCut("The server is shutting down.")
        if not self.llm.is_alive:
            raise Overloaded(
                "The engine is not running.",
                code="engine_dead",
                headers={"Retry-After": str(self.config.retry_after_seconds)},
            )
        # Only what cannot get a batch slot waits: a burst that fits the batch is admitted whole.
        if self.llm.num_unschedulable(num_seqs) > self.config.max_waiting_requests:
            raise Overloaded(
                "The server is overloaded: too many requests are waiting. Retry later.",
                code="overloaded",
                headers={"Retry-After": str(self.config.retry_after_seconds)},
            )

    def _need_tokenizer(self, what: str) -> Tokenizer:
        if self.tokenizer is None:
            raise BadRequest(
                f"this model has no tokenizer: {what} needs one; send prompt token ids instead",
                code="no_tokenizer",
            )
        return self.tokenizer

    async def _encode(self, text: str, add_special_tokens: bool, param: str = "prompt") -> list[int]:
        tok = self._need_tokenizer("a text prompt")
        try:
            if len(text) > _INLINE_TOKENIZE_CHARS:
                return await asyncio.to_thread(tok.encode, text, add_special_tokens=add_special_tokens)
            return tok.encode(text, add_special_tokens=add_special_tokens)
        except (
            TypeError,
            ValueError,
        ) as e:  # text the tokenizer cannot take (intake refuses what we know of)
            logger.info("tokenizer refused the %s: %s", param, e)
            raise BadRequest(
                f"Invalid value for '{param}': the tokenizer cannot encode this text", param=param
            ) from None

    def _check_ids(self, ids: list[int], param: str) -> None:
        if any(t < 0 or t >= self.vocab_size for t in ids):
            raise BadRequest(f"token ids must be in [0, {self.vocab_size})", param=param)

    def _check_sampling(self, req, logprobs: int | None) -> None:
        """The HTTP-side limits; everything else is runtime/validation.validate's."""
        if req.n > self.config.max_n:
            raise BadRequest(f"n must be at most {self.config.max_n}", param="n")
        if logprobs is not None and logprobs > self.max_logprobs:
            raise BadRequest(f"at most {self.max_logprobs} logprobs may be requested", param="logprobs")

    def _validate(self, ids: list[int], params: SamplingParams, prompt_param: str) -> None:
        """The engine's own check, run here so that a bad request gets its 400 before it is admitted."""
        try:
            validate(ids, params, self.limits)
        except InvalidRequestError as e:
            raise _bad_request(e, prompt_param) from None

    def _sampling_params(self, req, max_tokens):
        try:
            return req.to_sampling_params(max_tokens, self.generation_defaults)
        except ValueError as e:
            raise to_bad_request(e, fields=SamplingParams.model_fields) from None

    def _constraint(self, req):
        try:
            return req.structured_constraint()
        except _FieldError as e:
            raise to_bad_request(e) from None

    def _make_compiler(self):
        """The engine's own GrammarCompiler when it runs in this process (one cache for both:
        the engine finds the grammar compiled); with the engine core in its own process, a
        ConstraintChecker: the parse-only check here gives the 400 before admission, and the
        grammar is compiled once, in the core (off its loop; the request waits for it there)."""
        engine = self.llm.engine
        if hasattr(engine, "structured"):
            return engine.structured
        if self.tokenizer is None:
            raise ValueError("structured outputs need a tokenizer; this model has none")
        from ..structured.grammar import ConstraintChecker

        cfg = engine.config
        return ConstraintChecker(
            cache_size=cfg.grammar_cache_size,
            max_threads=cfg.grammar_compile_threads,
            compile_timeout=cfg.grammar_compile_timeout,
            max_spec_bytes=cfg.max_grammar_bytes,
        )

    async def _compiler(self):
        if self._grammar_compiler is None:  # first use builds the grammar vocabulary: off the loop
            try:
                self._grammar_compiler = await asyncio.to_thread(self._make_compiler)
            except (ValueError, AttributeError) as e:
                raise BadRequest(f"structured outputs are not available: {e}") from None
        return self._grammar_compiler

    async def _check_grammar(self, so, field: str | None) -> None:
        """Compile the request's grammar (off the engine thread; cached by schema) within the
        time limit, so a bad or too slow constraint is a 400 before the engine sees the request."""
        compiler = await self._compiler()
        try:
            fut = compiler.submit(so)
            # shield: a timed-out compile still finishes (and is cached) in its worker
            await asyncio.wait_for(asyncio.shield(asyncio.wrap_future(fut)), compiler.compile_timeout)
        except asyncio.TimeoutError:
            raise _bad_request(
                InvalidRequestError(
                    f"{field}: the constraint did not compile within {compiler.compile_timeout:g}s; simplify it",
                    param=field,
                    code="grammar_compile_timeout",
                ),
                field,
            ) from None
        except GrammarError as e:  # the request's field, not xgrammar's name for the constraint kind
            raise to_bad_request(InvalidRequestError(f"{field}: {e}", param=field)) from None

    async def _constrained_params(self, params, so, field: str | None):
        if so is None:
            return params
        await self._check_grammar(so, field)
        return params.clone(structured_outputs=so)

    def _log_done(self, rid: str, usage: UsageInfo, finish_reasons: set[str], start: float) -> None:
        if self.config.disable_log_requests:
            return
        reasons = sorted(finish_reasons)
        logger.info(
            "request %s done in %.3fs: prompt_tokens=%d completion_tokens=%d finish=%s",
            rid,
            time.time() - start,
            usage.prompt_tokens,
            usage.completion_tokens,
            ",".join(reasons),
        )

    def _token_str(self, tid: int, lp) -> str:
        if lp is not None and getattr(lp, "decoded_token", None) is not None:
            return lp.decoded_token
        if self.tokenizer is None:
            return f"token_id:{tid}"  # vLLM's spelling for tokens it cannot show as text
        return self.tokenizer.decode([tid], skip_special_tokens=False)

    def _start(
        self, prompts_ids: list[list[int]], params, request_id: str, streaming: bool
    ) -> AsyncGenerator[tuple[int, RequestOutput], None]:
        # Streams get only what is new per step; a JSON response only the finished output.
        kind = OutputKind.DELTA if streaming else OutputKind.FINAL
        arrival = time.time()
        engine_ids = [f"{request_id}-{i}" for i in range(len(prompts_ids))]
        gens = [
            self.llm.generate({"prompt_token_ids": ids}, params, eid, arrival_time=arrival, output_kind=kind)
            for eid, ids in zip(engine_ids, prompts_ids)
        ]
        return self._tracked(request_id, engine_ids, streaming, merge(gens))

    async def _tracked(
        self,
        request_id: str,
        engine_ids: list[str],
        streaming: bool,
        stream: AsyncGenerator[tuple[int, RequestOutput], None],
    ) -> AsyncGenerator[tuple[int, RequestOutput], None]:
        """The merged stream, listed in _in_flight while it runs (shutdown cuts what is listed)."""
        self._in_flight[request_id] = (engine_ids, streaming)
        try:
            async with contextlib.aclosing(stream) as s:
                async for item in s:
                    yield item
        finally:
            self._in_flight.pop(request_id, None)

    @staticmethod
    async def _first(stream) -> tuple[int, RequestOutput]:
        """The first output, so that invalid input is still answered with 400 before any byte is sent."""
        try:
            return await stream.__anext__()
        except InvalidRequestError as e:
            raise _bad_request(e, "prompt") from None
        except ValueError as e:  # other engine refusals (engine-side errors may carry a param)
            raise to_bad_request(e, fields=_ENGINE_PARAMS) from None
        except EngineDeadError as e:
            raise Overloaded(str(e), code="engine_dead") from None

    # ------------------------------------------------------------ logprobs

    def _completion_logprobs(
        self,
        token_ids: list[int],
        logprobs: list,
        k: int,
        offset: int,
        prompt_ids: list[int] | None = None,
        prompt_logprobs=None,
    ) -> CompletionLogprobs:
        res = CompletionLogprobs()
        pos = offset
        pairs = []
        if prompt_ids is not None:
            pairs += list(zip(prompt_ids, prompt_logprobs or [None] * len(prompt_ids)))
        pairs += list(zip(token_ids, logprobs))
        for tid, d in pairs:
            lp = d.get(tid) if d else None
            tok = self._token_str(tid, lp)
            res.tokens.append(tok)
            res.text_offset.append(pos)
            pos += len(tok)
            res.token_logprobs.append(None if lp is None else lp.logprob)
            if d is None:
                res.top_logprobs.append(None)
            else:
                ranked = sorted(d.items(), key=lambda kv: -kv[1].logprob)
                top = {}
                for t, x in ranked[: max(k, 0)]:
                    top[self._token_str(t, x)] = x.logprob
                if lp is not None:
                    top.setdefault(tok, lp.logprob)
                res.top_logprobs.append(top)
        return res

    def _chat_logprobs(self, token_ids: list[int], logprobs: list, k: int) -> ChatChoiceLogprobs:
        content = []
        for tid, d in zip(token_ids, logprobs):
            lp = d.get(tid) if d else None
            tok = self._token_str(tid, lp)
            ranked = sorted(d.items(), key=lambda kv: -kv[1].logprob) if d else []
            top = []
            for t, x in ranked[:k]:
                s = self._token_str(t, x)
                top.append(TopLogprob(token=s, logprob=x.logprob, bytes=list(s.encode("utf-8"))))
            content.append(
                ChatTokenLogprob(
                    token=tok,
                    logprob=lp.logprob if lp is not None else float("-inf"),
                    bytes=list(tok.encode("utf-8")),
                    top_logprobs=top,
                )
            )
        return ChatChoiceLogprobs(content=content)

    # ------------------------------------------------------------ completions

    async def completions(self, request: web.Request) -> web.StreamResponse:
        req: CompletionRequest = await self._parse(request, CompletionRequest)
        self._check_model(req.model)
        self._check_sampling(req, req.logprobs)
        texts: list[str | None] = []
        ids_list: list[list[int]] = []
        for p in req.prompts():
            if isinstance(p, str):
                ids = await self._encode(p, add_special_tokens=True, param="prompt")
                texts.append(p)
            else:
                ids = list(p)
                texts.append(None)
            ids_list.append(ids)
        so, so_field = self._constraint(req)
        params = self._sampling_params(req, req.max_tokens)
        for ids in ids_list:
            self._validate(ids, params, "prompt")
        params = await self._constrained_params(params, so, so_field)
        self._admit(len(ids_list) * req.n)
        rid = random_id("cmpl")
        start = time.time()
        created = int(start)
        stream = self._start(ids_list, params, rid, req.stream)
        async with contextlib.aclosing(stream):
            first = await self._first(stream)
            if req.stream:
                return await self._stream_completions(
                    request, req, stream, first, rid, start, texts, ids_list
                )
            latest: dict[int, RequestOutput] = {first[0]: first[1]}
            async for i, out in stream:
                latest[i] = out
        choices = []
        for i in range(len(ids_list)):
            out = latest[i]
            for c in out.outputs:
                choices.append(self._completion_choice(req, i, c, texts[i], ids_list[i], out))
        choices.sort(key=lambda ch: ch.index)
        resp = CompletionResponse(
            id=rid,
            created=created,
            model=self.served_model_name,
            choices=choices,
            usage=(usage := _usage([len(x) for x in ids_list], latest)),
        )
        self._log_done(rid, usage, _reasons(latest), start)
        return web.Response(
            body=resp.model_dump_json().encode(),
            content_type="application/json",
            headers={"X-Request-Id": rid},
        )

    def _prompt_text(self, text: str | None, ids: list[int]) -> str:
        if text is not None:
            return text
        return "" if self.tokenizer is None else self.tokenizer.decode(ids, skip_special_tokens=False)

    def _completion_choice(
        self, req, i: int, c: CompletionOutput, text: str | None, ids: list[int], out: RequestOutput
    ) -> CompletionChoice:
        body = c.text
        logprobs = None
        if req.echo:
            body = self._prompt_text(text, ids) + body
        if req.logprobs is not None and c.logprobs is not None:
            logprobs = self._completion_logprobs(
                c.token_ids,
                c.logprobs,
                req.logprobs,
                0,
                prompt_ids=ids if req.echo else None,
                prompt_logprobs=out.prompt_logprobs if req.echo else None,
            )
        return CompletionChoice(
            index=i * req.n + c.index,
            text=body,
            logprobs=logprobs,
            finish_reason=c.finish_reason,
            stop_reason=c.stop_reason,
        )

    async def _stream_completions(
        self, request, req: CompletionRequest, stream, first, rid, start: float, texts, ids_list
    ) -> web.StreamResponse:
        created = int(start)
        resp = await sse.open_stream(request, {"X-Request-Id": rid})
        tally = _StreamTally()
        done: set[tuple[int, int]] = set()
        offsets: dict[tuple[int, int], int] = {}
        prompt_lens = [len(x) for x in ids_list]
        dump_kw = {} if req.include_usage else {"exclude": {"usage"}}

        async def emit(i: int, out: RequestOutput):  # out holds only what is new (OutputKind.DELTA)
            for c in out.outputs:
                key = (i, c.index)
                if key in done:
                    continue
                prefix = ""
                if key not in tally.tokens and req.echo:
                    prefix = self._prompt_text(texts[i], ids_list[i])
                tally.add(i, key, c)
                finished = c.finish_reason is not None
                # Like vLLM, a step that produced tokens is a chunk even when the detokenizer holds its text back.
                if not (c.text or finished or prefix or c.token_ids):
                    continue
                logprobs = None
                if req.logprobs is not None and c.logprobs is not None:
                    logprobs = self._completion_logprobs(
                        c.token_ids, c.logprobs, req.logprobs, offsets.get(key, 0)
                    )
                    if logprobs.text_offset:
                        offsets[key] = logprobs.text_offset[-1] + len(logprobs.tokens[-1])
                if finished:
                    done.add(key)
                chunk = CompletionChunk(
                    id=rid,
                    created=created,
                    model=self.served_model_name,
                    choices=[
                        CompletionChoice(
                            index=i * req.n + c.index,
                            text=prefix + c.text,
                            logprobs=logprobs,
                            finish_reason=c.finish_reason,
                            stop_reason=c.stop_reason,
                        )
                    ],
                )
                if req.stream_options and req.stream_options.continuous_usage_stats:
                    chunk.usage = tally.usage(prompt_lens, seen_only=True)
                await resp.write(sse.event(chunk, **dump_kw))

        return await self._pump(
            resp,
            stream,
            first,
            emit,
            lambda: (
                CompletionChunk(
                    id=rid,
                    created=created,
                    model=self.served_model_name,
                    choices=[],
                    usage=tally.usage(prompt_lens),
                )
                if req.include_usage
                else None
            ),
            lambda: self._log_done(rid, tally.usage(prompt_lens), tally.finish_reasons(), start),
        )

    async def _pump(self, resp, stream, first, emit, usage_chunk, on_done) -> web.StreamResponse:
        """Writes every output as SSE, then the usage chunk and [DONE]; errors after the headers become events."""
        try:
            await emit(*first)
            async for i, out in stream:
                await emit(i, out)
            final = usage_chunk()
            if final is not None:
                await resp.write(sse.event(final))
            await resp.write(sse.DONE)
            on_done()
        except (ConnectionResetError, ConnectionError):
            return resp  # client went away; closing the stream aborts the requests
        except ValueError as e:
            await self._stream_error(resp, str(e), "invalid_request_error")
        except APIError as e:  # RequestCut: shutdown past its drain timeout
            await self._stream_error(resp, e.message, e.type, e.code)
        except EngineDeadError as e:
            await self._stream_error(resp, str(e), "server_overloaded")
        except Exception:
            logger.exception("error while streaming")
            await self._stream_error(resp, "Internal server error", "internal_server_error")
        with contextlib.suppress(ConnectionError):
            await resp.write_eof()
        return resp

    @staticmethod
    async def _stream_error(resp, message: str, type_: str, code: str | None = None) -> None:
        with contextlib.suppress(ConnectionError):
            await resp.write(sse.event(json.dumps(error_body(message, type_, code=code))))
            await resp.write(sse.DONE)

    # ------------------------------------------------------------ chat

    async def _render_chat(
        self, messages: list[dict], req, tools=None, text_out: list | None = None
    ) -> list[int]:
        """The prompt ids of `messages` rendered with the chat template, the request's template controls
        (add_generation_prompt, continue_final_message, chat_template_kwargs, ...) and its `tools`; the
        rendered text is appended to `text_out` when given."""
        try:
            template_args = chat_template_args(req)
        except TemplateControlError as e:
            raise BadRequest(str(e), param=e.param) from None
        if tools:
            template_args["tools"] = tools  # OpenAI's tool objects: what HF templates iterate over
        tokenizer = self._need_tokenizer("chat")
        if tokenizer.chat_template is None:
            raise BadRequest(
                "this model has no chat template: start the server with --chat-template FILE_OR_TEXT, "
                "or send a plain prompt to /v1/completions",
                param="messages",
                code="no_chat_template",
            )
        render = functools.partial(tokenizer.apply_chat_template, messages, tokenize=False, **template_args)
        try:
            chars = sum(len(c) for m in messages if isinstance(c := m.get("content"), str))
            if len(messages) > _INLINE_CHAT_MESSAGES or chars > _INLINE_TOKENIZE_CHARS:
                text = await asyncio.to_thread(render)  # a long render would stall every stream
            else:
                text = render()
        except Exception as e:  # a template error is the request's fault (roles the template refuses, ...)
            raise BadRequest(f"chat template failed: {e}", param="messages") from None
        if text_out is not None:
            text_out.append(text)
        # The template already writes any BOS the model needs.
        return await self._encode(text, add_special_tokens=False, param="messages")

    def _tool_mode(self, req: ChatCompletionRequest):
        """None (plain answer), "auto" (parse calls from the text), "required", or ("named", name)."""
        choice = req.effective_tool_choice
        if (isinstance(choice, NamedToolChoice) or choice == "required") and not req.tools:
            raise BadRequest("tool_choice 'required' or a named function needs tools", param="tool_choice")
        if isinstance(choice, NamedToolChoice) and choice.function.name not in {
            t.function.name for t in req.tools or ()
        }:
            raise BadRequest(
                f"tool_choice names {choice.function.name!r}, which is not among the tools",
                param="tool_choice",
            )
        if not req.tools or choice == "none":
            return None
        if isinstance(choice, NamedToolChoice):
            return ("named", choice.function.name)
        if choice == "required":
            return "required"
        if not (self.config.enable_auto_tool_choice and self.tool_parser is not None):
            raise BadRequest(
                '"auto" tool choice needs the server started with --enable-auto-tool-choice and '
                "--tool-call-parser",
                param="tool_choice",
            )
        return "auto"

    def _chat_message(
        self, mode, text: str, finish_reason: str | None
    ) -> tuple[ChatResponseMessage, str | None]:
        reasoning, answer = self.reasoning.split(text) if self.reasoning is not None else (None, text)
        msg = ChatResponseMessage(content=answer, reasoning_content=reasoning)
        if mode is None:
            return msg, finish_reason
        if isinstance(mode, tuple):  # named: the whole answer is the arguments (OpenAI finishes with "stop")
            msg.content = None
            msg.tool_calls = [
                ToolCallOut(id=call_id(), function=FunctionCallOut(name=mode[1], arguments=answer))
            ]
            return msg, finish_reason
        parser = RequiredParser() if mode == "required" else self.tool_parser
        assert parser is not None  # "auto" only with a tool parser (_tool_mode)
        content, calls = parser.parse(answer)
        if calls:
            msg.content = None if mode == "required" else content
            msg.tool_calls = [
                ToolCallOut(id=call_id(), function=FunctionCallOut(name=n, arguments=a)) for n, a in calls
            ]
            if finish_reason == "stop":
                finish_reason = "tool_calls"
        return msg, finish_reason

    async def chat_completions(self, request: web.Request) -> web.StreamResponse:
        req: ChatCompletionRequest = await self._parse(request, ChatCompletionRequest)
        self._check_model(req.model)
        k = (req.top_logprobs or 0) if req.logprobs else None
        self._check_sampling(req, k)
        mode = self._tool_mode(req)
        so, so_field = self._constraint(req)
        if mode == "required" or isinstance(mode, tuple):
            if so is not None:
                raise BadRequest(
                    f"{so_field} cannot be combined with tool_choice {req.tool_choice!r}", param=so_field
                )
            so, so_field = (
                forced_constraint(req.tools or [], req.tool_choice, req.parallel_tool_calls),
                "tools",
            )
        prompt_text: list[str] = []
        ids = await self._render_chat(req.chat_messages(), req, req.template_tools(), prompt_text)
        max_tokens = req.requested_max_tokens()
        if max_tokens is None and "max_tokens" in self.generation_defaults and len(ids) < self.max_model_len:
            # The model's cap, within the context (a prompt too long is validate's 400 below).
            max_tokens = min(self.generation_defaults["max_tokens"], self.max_model_len - len(ids))
        if (
            so is not None
            and self.reasoning is not None
            and not self.reasoning.reasoning_ended_in_prompt(prompt_text[0])
        ):
            # the constraint starts once the model closed its reasoning block
            tok = self._need_tokenizer("a reasoning parser")
            end_ids = tuple(tok.encode("</think>", add_special_tokens=False))
            so = so.model_copy(update={"start_after_token_ids": end_ids})
        params = self._sampling_params(req, max_tokens)
        if (
            mode == "auto"
            and self.tool_parser is not None
            and self.tool_parser.name in ("mistral", "llama3_json")
        ):
            params = params.clone(skip_special_tokens=False)  # their call markers are special tokens
        self._validate(ids, params, "messages")
        params = await self._constrained_params(params, so, so_field)
        self._admit(req.n)
        rid = random_id("chatcmpl")
        start = time.time()
        created = int(start)
        stream = self._start([ids], params, rid, req.stream)
        async with contextlib.aclosing(stream):
            first = await self._first(stream)
            if req.stream:
                return await self._stream_chat(request, req, stream, first, rid, start, ids, mode)
            out = first[1]
            async for _, last in stream:
                out = last  # outputs are cumulative: the last one is the whole reply
        choices = []
        for c in out.outputs:
            logprobs = self._chat_logprobs(c.token_ids, c.logprobs or [], k) if k is not None else None
            message, finish = self._chat_message(mode, c.text, c.finish_reason)
            choices.append(
                ChatChoice(
                    index=c.index,
                    message=message,
                    logprobs=logprobs,
                    finish_reason=finish,
                    stop_reason=c.stop_reason,
                )
            )
        resp = ChatCompletionResponse(
            id=rid,
            created=created,
            model=self.served_model_name,
            choices=choices,
            usage=(usage := _usage([len(ids)], {0: out})),
        )
        self._log_done(rid, usage, _reasons({0: out}), start)
        return web.Response(
            body=resp.model_dump_json().encode(),
            content_type="application/json",
            headers={"X-Request-Id": rid},
        )

    async def _stream_chat(
        self, request, req: ChatCompletionRequest, stream, first, rid, start: float, ids, mode=None
    ) -> web.StreamResponse:
        created = int(start)
        resp = await sse.open_stream(request, {"X-Request-Id": rid})
        k = (req.top_logprobs or 0) if req.logprobs else None
        tally = _StreamTally()
        done: set[int] = set()
        parsed = None
        if mode is not None or self.reasoning is not None:
            parsed = {j: _ParsedStream(self.reasoning, self._stream_tools(mode)) for j in range(req.n)}
        dump_kw = {} if req.include_usage else {"exclude": {"usage"}}

        def chunk(choice: ChatStreamChoice) -> bytes:
            ch = ChatCompletionChunk(id=rid, created=created, model=self.served_model_name, choices=[choice])
            if req.stream_options and req.stream_options.continuous_usage_stats and tally.tokens:
                ch.usage = tally.usage([len(ids)])
            return sse.event(ch, **dump_kw)

        async def emit(_: int, out: RequestOutput):  # out holds only what is new (OutputKind.DELTA)
            for c in out.outputs:
                j = c.index
                if j in done:
                    continue
                opening = j not in tally.tokens
                tally.add(0, j, c)
                if opening:  # OpenAI opens each choice with the role and empty content
                    await resp.write(
                        chunk(ChatStreamChoice(index=j, delta=DeltaMessage(role="assistant", content="")))
                    )
                finished = c.finish_reason is not None
                if not (c.text or finished or (c.token_ids and k is not None)):
                    continue
                logprobs = self._chat_logprobs(c.token_ids, c.logprobs or [], k) if k is not None else None
                finish_reason = c.finish_reason
                if parsed is None:
                    if c.text or logprobs is not None:
                        await resp.write(
                            chunk(
                                ChatStreamChoice(
                                    index=j, delta=DeltaMessage(content=c.text), logprobs=logprobs
                                )
                            )
                        )
                else:  # reasoning and / or tool calls: deltas of the parsed views of the text so far
                    d = parsed[j].update(c.text, finished)
                    if d is not None or logprobs is not None:
                        await resp.write(
                            chunk(
                                ChatStreamChoice(
                                    index=j, delta=d or DeltaMessage(content=""), logprobs=logprobs
                                )
                            )
                        )
                    if (
                        finished
                        and parsed[j].num_calls
                        and finish_reason == "stop"
                        and not isinstance(mode, tuple)
                    ):
                        finish_reason = "tool_calls"
                if finished:
                    done.add(j)
                    await resp.write(
                        chunk(
                            ChatStreamChoice(
                                index=j,
                                delta=DeltaMessage(),
                                finish_reason=finish_reason,
                                stop_reason=c.stop_reason,
                            )
                        )
                    )

        return await self._pump(
            resp,
            stream,
            first,
            emit,
            lambda: (
                ChatCompletionChunk(
                    id=rid,
                    created=created,
                    model=self.served_model_name,
                    choices=[],
                    usage=tally.usage([len(ids)]),
                )
                if req.include_usage
                else None
            ),
            lambda: self._log_done(rid, tally.usage([len(ids)]), tally.finish_reasons(), start),
        )

    def _stream_tools(self, mode) -> ToolCallStream | None:
        if mode is None:
            return None
        if isinstance(mode, tuple):
            return ToolCallStream(RequiredParser(), forced_name=mode[1])
        parser = RequiredParser() if mode == "required" else self.tool_parser
        assert parser is not None  # "auto" only with a tool parser (_tool_mode)
        return ToolCallStream(parser)

    # ------------------------------------------------------------ the rest

    def _model_card(self) -> ModelCard:
        return ModelCard(
            id=self.served_model_name,
            created=self.created,
            root=self.model_path or self.served_model_name,
            max_model_len=self.max_model_len,
        )

    async def list_models(self, request: web.Request) -> web.Response:
        return web.Response(
            body=ModelList(data=[self._model_card()]).model_dump_json().encode(),
            content_type="application/json",
        )

    async def get_model(self, request: web.Request) -> web.Response:
        self._check_model(request.match_info["model"])
        return web.Response(
            body=self._model_card().model_dump_json().encode(), content_type="application/json"
        )

    async def tokenize(self, request: web.Request) -> web.Response:
        req: TokenizeRequest = await self._parse(request, TokenizeRequest)
        self._check_model(req.model)
        if req.messages is not None:
            msgs = [{"role": m.template_role, "content": m.text()} for m in req.messages]
            ids = await self._render_chat(msgs, req)
        else:
            assert req.prompt is not None  # TokenizeRequest holds exactly one of prompt or messages
            ids = await self._encode(req.prompt, add_special_tokens=req.add_special_tokens)
        return web.json_response(
            {"count": len(ids), "max_model_len": self.max_model_len, "tokens": ids, "token_strs": None}
        )

    async def detokenize(self, request: web.Request) -> web.Response:
        req: DetokenizeRequest = await self._parse(request, DetokenizeRequest)
        self._check_model(req.model)
        self._check_ids(req.tokens, "tokens") if req.tokens else None
        decode = functools.partial(
            self._need_tokenizer("detokenize").decode, req.tokens, skip_special_tokens=False
        )
        text = await asyncio.to_thread(decode) if len(req.tokens) > _INLINE_TOKENIZE_CHARS else decode()
        return web.json_response({"prompt": text})

    async def health(self, request: web.Request) -> web.Response:
        if self.draining:
            return web.json_response(error_body("Server is shutting down", "service_unavailable"), status=503)
        if not self.llm.is_alive:
            return web.json_response(
                error_body("Engine loop is not running", "service_unavailable"), status=503
            )
        return web.Response(status=200)

    async def metrics_endpoint(self, request: web.Request) -> web.Response:
        return web.Response(body=self.metrics.render(), headers={"Content-Type": CONTENT_TYPE})
