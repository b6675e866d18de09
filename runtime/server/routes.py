"""Route handlers: OpenAI completions / chat completions, models, tokenize, health, metrics.

A request reads in one direction: JSON body -> protocol model (validated) ->
prompt token ids + SamplingParams -> AsyncLLM.generate -> cumulative
RequestOutputs -> JSON response or SSE deltas. The server tokenizes prompts
itself (so it can check lengths and count usage before the engine sees them)
and hands the engine token ids only.
"""
from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from typing import AsyncIterator, Optional

from aiohttp import web
from pydantic import BaseModel, ValidationError

from ..async_engine import AsyncLLM, EngineDeadError
from ..outputs import CompletionOutput, RequestOutput
from . import sse
from .config import ServerConfig
from .errors import BadRequest, NotFound, Overloaded, error_body, from_validation_error
from .metrics import CONTENT_TYPE, ServerMetrics
from .protocol import (ChatChoice, ChatChoiceLogprobs, ChatCompletionChunk, ChatCompletionRequest,
                       ChatCompletionResponse, ChatResponseMessage, ChatStreamChoice, ChatTokenLogprob,
                       CompletionChoice, CompletionChunk, CompletionLogprobs, CompletionRequest,
                       CompletionResponse, DeltaMessage, DetokenizeRequest, ModelCard, ModelList,
                       TemplateControlError, TokenizeRequest, TopLogprob, UsageInfo, chat_template_args,
                       random_id)

logger = logging.getLogger("fleetserve.server")

# Prompts longer than this (characters) are tokenized off the event loop.
_INLINE_TOKENIZE_CHARS = 4096


async def merge(gens: list[AsyncIterator[RequestOutput]]) -> AsyncIterator[tuple[int, RequestOutput]]:
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


def _usage(prompt_lens: list[int], latest: dict[int, RequestOutput]) -> UsageInfo:
    p = sum(prompt_lens)
    c = sum(len(co.token_ids) for out in latest.values() for co in out.outputs)
    return UsageInfo(prompt_tokens=p, completion_tokens=c, total_tokens=p + c)


class OpenAIServing:
    """Everything the handlers need, created once the engine is running."""

    def __init__(self, llm: AsyncLLM, config: ServerConfig, metrics: ServerMetrics, served_model_name: str,
                 model_path: Optional[str]):
        self.llm = llm
        self.config = config
        self.metrics = metrics
        self.tokenizer = llm.tokenizer
        self.served_model_name = served_model_name
        self.model_path = model_path
        self.max_model_len = llm.max_model_len
        engine_config = getattr(llm.engine, "config", None)
        self.max_logprobs = getattr(engine_config, "max_logprobs", 20)
        # The model's vocabulary bounds token ids (a preset may borrow a smaller tokenizer).
        self.vocab_size = getattr(llm.engine, "vocab_size", None) or getattr(self.tokenizer, "vocab_size", None)
        self.draining = False
        self.created = int(time.time())
        # The model's sampling defaults (generation_config.json; none with --generation-config vllm).
        self.generation_defaults: dict = dict(getattr(llm.engine, "generation_defaults", None) or {})

    # ------------------------------------------------------------ helpers

    async def _parse(self, request: web.Request, model: type[BaseModel]):
        try:
            body = await request.json()
        except web.HTTPException:
            raise  # 413 from aiohttp's client_max_size
        except Exception:
            raise BadRequest("request body is not valid JSON") from None
        if not isinstance(body, dict):
            raise BadRequest("request body must be a JSON object")
        try:
            return model.model_validate(body)
        except ValidationError as e:
            raise from_validation_error(e) from None

    def _check_model(self, name: Optional[str]) -> None:
        # vLLM accepts an absent model; OpenAI clients always send one.
        if name is not None and name != self.served_model_name:
            raise NotFound(f"The model `{name}` does not exist.", param="model", code="model_not_found")

    def _admit(self, num_requests: int) -> None:
        if not self.llm.is_alive:
            raise Overloaded("The engine is not running.", code="engine_dead",
                             headers={"Retry-After": str(self.config.retry_after_seconds)})
        if self.llm.num_waiting + num_requests > self.config.max_waiting_requests:
            raise Overloaded("The server is overloaded: too many requests are waiting. Retry later.",
                             code="overloaded", headers={"Retry-After": str(self.config.retry_after_seconds)})

    def _need_tokenizer(self, what: str):
        if self.tokenizer is None:
            raise BadRequest(f"this model has no tokenizer: {what} needs one; send prompt token ids instead",
                             code="no_tokenizer")
        return self.tokenizer

    async def _encode(self, text: str, add_special_tokens: bool) -> list[int]:
        self._need_tokenizer("a text prompt")
        if len(text) > _INLINE_TOKENIZE_CHARS:
            return await asyncio.to_thread(self.tokenizer.encode, text, add_special_tokens=add_special_tokens)
        return self.tokenizer.encode(text, add_special_tokens=add_special_tokens)

    def _check_ids(self, ids: list[int], param: str) -> None:
        if not ids:
            raise BadRequest("prompt must not be empty", param=param)
        if self.vocab_size is not None and any(t < 0 or t >= self.vocab_size for t in ids):
            raise BadRequest(f"token ids must be in [0, {self.vocab_size})", param=param)

    def _check_length(self, prompt_len: int, max_tokens: Optional[int], what: str) -> None:
        limit = self.max_model_len
        if prompt_len >= limit:
            raise BadRequest(f"This model's maximum context length is {limit} tokens. However, your request has "
                             f"{prompt_len} input tokens. Please reduce the length of the {what}.",
                             param=what, code="context_length_exceeded")
        if max_tokens is not None and prompt_len + max_tokens > limit:
            raise BadRequest(f"This model's maximum context length is {limit} tokens. However, you requested "
                             f"{prompt_len + max_tokens} tokens ({prompt_len} in the {what}, {max_tokens} in the "
                             f"completion). Please reduce the length of the {what} or completion.",
                             param="max_tokens", code="context_length_exceeded")

    def _check_sampling(self, req, logprobs: Optional[int]) -> None:
        if req.n > self.config.max_n:
            raise BadRequest(f"n must be at most {self.config.max_n}", param="n")
        if logprobs is not None and logprobs > self.max_logprobs:
            raise BadRequest(f"at most {self.max_logprobs} logprobs may be requested", param="logprobs")
        if req.logit_bias and self.vocab_size is not None:
            if any(not 0 <= int(k) < self.vocab_size for k in req.logit_bias):
                raise BadRequest(f"logit_bias token ids must be in [0, {self.vocab_size})", param="logit_bias")

    def _sampling_params(self, req, max_tokens):
        try:
            return req.to_sampling_params(max_tokens, self.generation_defaults)
        except ValueError as e:
            raise BadRequest(str(e)) from None

    def _log_done(self, rid: str, usage: UsageInfo, latest: dict[int, RequestOutput], start: float) -> None:
        if self.config.disable_log_requests:
            return
        reasons = sorted({c.finish_reason or "abort" for out in latest.values() for c in out.outputs})
        logger.info("request %s done in %.3fs: prompt_tokens=%d completion_tokens=%d finish=%s", rid,
                    time.time() - start, usage.prompt_tokens, usage.completion_tokens, ",".join(reasons))

    def _token_str(self, tid: int, lp) -> str:
        if lp is not None and getattr(lp, "decoded_token", None) is not None:
            return lp.decoded_token
        if self.tokenizer is None:
            return f"token_id:{tid}"  # vLLM's spelling for tokens it cannot show as text
        return self.tokenizer.decode([tid], skip_special_tokens=False)

    def _start(self, prompts_ids: list[list[int]], params, request_id: str) -> AsyncIterator:
        arrival = time.time()
        gens = [self.llm.generate({"prompt_token_ids": ids}, params, f"{request_id}-{i}", arrival_time=arrival)
                for i, ids in enumerate(prompts_ids)]
        return merge(gens)

    @staticmethod
    async def _first(stream) -> tuple[int, RequestOutput]:
        """The first output, so that invalid input is still answered with 400 before any byte is sent."""
        try:
            return await stream.__anext__()
        except ValueError as e:
            raise BadRequest(str(e)) from None
        except EngineDeadError as e:
            raise Overloaded(str(e), code="engine_dead") from None

    # ------------------------------------------------------------ logprobs

    def _completion_logprobs(self, token_ids: list[int], logprobs: list, k: int, offset: int,
                             prompt_ids: Optional[list[int]] = None, prompt_logprobs=None) -> CompletionLogprobs:
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
            content.append(ChatTokenLogprob(token=tok, logprob=lp.logprob if lp is not None else float("-inf"),
                                            bytes=list(tok.encode("utf-8")), top_logprobs=top))
        return ChatChoiceLogprobs(content=content)

    # ------------------------------------------------------------ completions

    async def completions(self, request: web.Request) -> web.StreamResponse:
        req: CompletionRequest = await self._parse(request, CompletionRequest)
        self._check_model(req.model)
        self._check_sampling(req, req.logprobs)
        try:
            prompts = req.prompts()
        except ValueError as e:
            raise BadRequest(str(e), param="prompt") from None
        texts, ids_list = [], []
        for p in prompts:
            if isinstance(p, str):
                ids = await self._encode(p, add_special_tokens=True)
                texts.append(p)
            else:
                ids = list(p)
                self._check_ids(ids, "prompt")
                texts.append(None)
            if not ids:
                raise BadRequest("prompt must not be empty", param="prompt")
            self._check_length(len(ids), req.max_tokens, "prompt")
            ids_list.append(ids)
        params = self._sampling_params(req, req.max_tokens)
        self._admit(len(ids_list))
        rid = random_id("cmpl")
        start = time.time()
        created = int(start)
        stream = self._start(ids_list, params, rid)
        async with contextlib.aclosing(stream):
            first = await self._first(stream)
            if req.stream:
                return await self._stream_completions(request, req, stream, first, rid, start, texts, ids_list)
            latest: dict[int, RequestOutput] = {first[0]: first[1]}
            async for i, out in stream:
                latest[i] = out
        choices = []
        for i in range(len(ids_list)):
            out = latest[i]
            for c in out.outputs:
                choices.append(self._completion_choice(req, i, c, texts[i], ids_list[i], out))
        choices.sort(key=lambda ch: ch.index)
        resp = CompletionResponse(id=rid, created=created, model=self.served_model_name, choices=choices,
                                  usage=_usage([len(x) for x in ids_list], latest))
        self._log_done(rid, resp.usage, latest, start)
        return web.Response(body=resp.model_dump_json().encode(), content_type="application/json",
                            headers={"X-Request-Id": rid})

    def _prompt_text(self, text: Optional[str], ids: list[int]) -> str:
        if text is not None:
            return text
        return "" if self.tokenizer is None else self.tokenizer.decode(ids, skip_special_tokens=False)

    def _completion_choice(self, req, i: int, c: CompletionOutput, text: Optional[str], ids: list[int],
                           out: RequestOutput) -> CompletionChoice:
        body = c.text
        logprobs = None
        if req.echo:
            body = self._prompt_text(text, ids) + body
        if req.logprobs is not None and c.logprobs is not None:
            logprobs = self._completion_logprobs(
                c.token_ids, c.logprobs, req.logprobs, 0,
                prompt_ids=ids if req.echo else None, prompt_logprobs=out.prompt_logprobs if req.echo else None)
        return CompletionChoice(index=i * req.n + c.index, text=body, logprobs=logprobs,
                                finish_reason=c.finish_reason, stop_reason=c.stop_reason)

    async def _stream_completions(self, request, req: CompletionRequest, stream, first, rid, start: float,
                                  texts, ids_list) -> web.StreamResponse:
        created = int(start)
        resp = await sse.open_stream(request, {"X-Request-Id": rid})
        sent_text: dict[tuple[int, int], int] = {}
        sent_tok: dict[tuple[int, int], int] = {}
        done: set[tuple[int, int]] = set()
        offsets: dict[tuple[int, int], int] = {}
        latest: dict[int, RequestOutput] = {}
        prompt_lens = [len(x) for x in ids_list]
        dump_kw = {} if req.include_usage else {"exclude": {"usage"}}

        async def emit(i: int, out: RequestOutput):
            latest[i] = out
            for c in out.outputs:
                key = (i, c.index)
                if key in done:
                    continue
                n_text, n_tok = sent_text.get(key, 0), sent_tok.get(key, 0)
                delta = c.text[n_text:]
                new_ids = c.token_ids[n_tok:]
                finished = c.finish_reason is not None
                prefix = ""
                if key not in sent_text and req.echo:
                    prefix = self._prompt_text(texts[i], ids_list[i])
                # Like vLLM, a step that produced tokens is a chunk even when the detokenizer holds its text back.
                if not (delta or finished or prefix or new_ids):
                    continue
                logprobs = None
                if req.logprobs is not None and c.logprobs is not None:
                    logprobs = self._completion_logprobs(new_ids, c.logprobs[n_tok:], req.logprobs,
                                                         offsets.get(key, 0))
                    if logprobs.text_offset:
                        offsets[key] = logprobs.text_offset[-1] + len(logprobs.tokens[-1])
                sent_text[key], sent_tok[key] = len(c.text), len(c.token_ids)
                if finished:
                    done.add(key)
                chunk = CompletionChunk(id=rid, created=created, model=self.served_model_name, choices=[
                    CompletionChoice(index=i * req.n + c.index, text=prefix + delta, logprobs=logprobs,
                                     finish_reason=c.finish_reason, stop_reason=c.stop_reason)])
                if req.stream_options and req.stream_options.continuous_usage_stats:
                    chunk.usage = _usage([prompt_lens[k] for k in latest], latest)
                await resp.write(sse.event(chunk, **dump_kw))

        return await self._pump(resp, stream, first, emit, lambda: CompletionChunk(
            id=rid, created=created, model=self.served_model_name, choices=[],
            usage=_usage(prompt_lens, latest)) if req.include_usage else None,
            lambda: self._log_done(rid, _usage(prompt_lens, latest), latest, start))

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
        except EngineDeadError as e:
            await self._stream_error(resp, str(e), "server_overloaded")
        except Exception:
            logger.exception("error while streaming")
            await self._stream_error(resp, "Internal server error", "internal_server_error")
        with contextlib.suppress(ConnectionError):
            await resp.write_eof()
        return resp

    @staticmethod
    async def _stream_error(resp, message: str, type_: str) -> None:
        with contextlib.suppress(ConnectionError):
            await resp.write(sse.event(json.dumps(error_body(message, type_))))
            await resp.write(sse.DONE)

    # ------------------------------------------------------------ chat

    async def _render_chat(self, messages: list[dict], req) -> list[int]:
        try:
            template_args = chat_template_args(req)
        except TemplateControlError as e:
            raise BadRequest(str(e), param=e.param) from None
        tokenizer = self._need_tokenizer("chat")
        if tokenizer.chat_template is None:
            raise BadRequest("this model has no chat template: start the server with --chat-template FILE_OR_TEXT, "
                             "or send a plain prompt to /v1/completions", param="messages", code="no_chat_template")
        try:
            text = tokenizer.apply_chat_template(messages, tokenize=False, **template_args)
        except Exception as e:  # a template error is the request's fault (roles the template refuses, ...)
            raise BadRequest(f"chat template failed: {e}", param="messages") from None
        # The template already writes any BOS the model needs.
        return await self._encode(text, add_special_tokens=False)

    async def chat_completions(self, request: web.Request) -> web.StreamResponse:
        req: ChatCompletionRequest = await self._parse(request, ChatCompletionRequest)
        self._check_model(req.model)
        k = (req.top_logprobs or 0) if req.logprobs else None
        self._check_sampling(req, k)
        ids = await self._render_chat(req.chat_messages(), req)
        max_tokens = req.requested_max_tokens()
        self._check_length(len(ids), max_tokens, "messages")
        if max_tokens is None and "max_tokens" in self.generation_defaults:  # the model's cap, within the context
            max_tokens = min(self.generation_defaults["max_tokens"], self.max_model_len - len(ids))
        params = self._sampling_params(req, max_tokens)
        self._admit(1)
        rid = random_id("chatcmpl")
        start = time.time()
        created = int(start)
        stream = self._start([ids], params, rid)
        async with contextlib.aclosing(stream):
            first = await self._first(stream)
            if req.stream:
                return await self._stream_chat(request, req, stream, first, rid, start, ids)
            out = first[1]
            async for _, out in stream:
                pass
        choices = []
        for c in out.outputs:
            logprobs = self._chat_logprobs(c.token_ids, c.logprobs or [], k) if k is not None else None
            choices.append(ChatChoice(index=c.index, message=ChatResponseMessage(content=c.text), logprobs=logprobs,
                                      finish_reason=c.finish_reason, stop_reason=c.stop_reason))
        resp = ChatCompletionResponse(id=rid, created=created, model=self.served_model_name, choices=choices,
                                      usage=_usage([len(ids)], {0: out}))
        self._log_done(rid, resp.usage, {0: out}, start)
        return web.Response(body=resp.model_dump_json().encode(), content_type="application/json",
                            headers={"X-Request-Id": rid})

    async def _stream_chat(self, request, req: ChatCompletionRequest, stream, first, rid, start: float,
                           ids) -> web.StreamResponse:
        created = int(start)
        resp = await sse.open_stream(request, {"X-Request-Id": rid})
        k = (req.top_logprobs or 0) if req.logprobs else None
        sent_text: dict[int, int] = {}
        sent_tok: dict[int, int] = {}
        done: set[int] = set()
        latest: dict[int, RequestOutput] = {}
        dump_kw = {} if req.include_usage else {"exclude": {"usage"}}

        def chunk(choice: ChatStreamChoice) -> bytes:
            ch = ChatCompletionChunk(id=rid, created=created, model=self.served_model_name, choices=[choice])
            if req.stream_options and req.stream_options.continuous_usage_stats and latest:
                ch.usage = _usage([len(ids)], latest)
            return sse.event(ch, **dump_kw)

        async def emit(_: int, out: RequestOutput):
            latest[0] = out
            for c in out.outputs:
                j = c.index
                if j in done:
                    continue
                if j not in sent_text:  # OpenAI opens each choice with the role and empty content
                    sent_text[j] = sent_tok[j] = 0
                    await resp.write(chunk(ChatStreamChoice(index=j, delta=DeltaMessage(role="assistant", content=""))))
                delta = c.text[sent_text[j]:]
                new_ids = c.token_ids[sent_tok[j]:]
                finished = c.finish_reason is not None
                if not (delta or finished or (new_ids and k is not None)):
                    continue
                logprobs = self._chat_logprobs(new_ids, (c.logprobs or [])[sent_tok[j]:], k) if k is not None else None
                sent_text[j], sent_tok[j] = len(c.text), len(c.token_ids)
                if delta or logprobs is not None:
                    await resp.write(chunk(ChatStreamChoice(index=j, delta=DeltaMessage(content=delta),
                                                            logprobs=logprobs)))
                if finished:
                    done.add(j)
                    await resp.write(chunk(ChatStreamChoice(index=j, delta=DeltaMessage(),
                                                            finish_reason=c.finish_reason,
                                                            stop_reason=c.stop_reason)))

        return await self._pump(resp, stream, first, emit, lambda: ChatCompletionChunk(
            id=rid, created=created, model=self.served_model_name, choices=[],
            usage=_usage([len(ids)], latest)) if req.include_usage else None,
            lambda: self._log_done(rid, _usage([len(ids)], latest), latest, start))

    # ------------------------------------------------------------ the rest

    def _model_card(self) -> ModelCard:
        return ModelCard(id=self.served_model_name, created=self.created, root=self.model_path or self.served_model_name,
                         max_model_len=self.max_model_len)

    async def list_models(self, request: web.Request) -> web.Response:
        return web.Response(body=ModelList(data=[self._model_card()]).model_dump_json().encode(),
                            content_type="application/json")

    async def get_model(self, request: web.Request) -> web.Response:
        self._check_model(request.match_info["model"])
        return web.Response(body=self._model_card().model_dump_json().encode(), content_type="application/json")

    async def tokenize(self, request: web.Request) -> web.Response:
        req: TokenizeRequest = await self._parse(request, TokenizeRequest)
        self._check_model(req.model)
        if req.messages is not None:
            msgs = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in req.messages]
            ids = await self._render_chat(msgs, req)
        else:
            ids = await self._encode(req.prompt, add_special_tokens=req.add_special_tokens)
        return web.json_response({"count": len(ids), "max_model_len": self.max_model_len, "tokens": ids,
                                  "token_strs": None})

    async def detokenize(self, request: web.Request) -> web.Response:
        req: DetokenizeRequest = await self._parse(request, DetokenizeRequest)
        self._check_model(req.model)
        self._check_ids(req.tokens, "tokens") if req.tokens else None
        text = self._need_tokenizer("detokenize").decode(req.tokens, skip_special_tokens=False)
        return web.json_response({"prompt": text})

    async def health(self, request: web.Request) -> web.Response:
        if self.draining:
            return web.json_response(error_body("Server is shutting down", "service_unavailable"), status=503)
        if not self.llm.is_alive:
            return web.json_response(error_body("Engine loop is not running", "service_unavailable"), status=503)
        return web.Response(status=200)

    async def metrics_endpoint(self, request: web.Request) -> web.Response:
        return web.Response(body=self.metrics.render(), headers={"Content-Type": CONTENT_TYPE})
