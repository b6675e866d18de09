"""Load-test any OpenAI-compatible server: TTFT, TPOT, ITL, E2E latency and throughput, as JSON.

`fleetserve bench serve --base-url http://127.0.0.1:8000 --num-prompts 200 --input-len 512 --output-len 128
--request-rate 8 --max-concurrency 64 --result-file out.json`

Every request streams (stream_options.include_usage) so that the time of each
chunk is seen. Metrics follow vLLM's serving benchmark:
- TTFT: request sent -> first chunk with tokens (chat: with content);
- ITL: every gap between consecutive such chunks;
- TPOT: (E2E - TTFT) / (output tokens - 1), per request;
- E2E: request sent -> stream ended;
- throughput: completed requests, output tokens and all tokens per second of wall time.
Token counts come from the server's usage chunk (chunks are counted if it sends none).
Arrivals are Poisson at --request-rate (inf sends all at once), at most
--max-concurrency in flight. Only aiohttp is needed, no tokenizer: prompts are
random common words; a server with /tokenize (fleetserve, vLLM) gets prompts
trimmed to exactly --input-len tokens.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import random
import statistics
import sys
import time
from dataclasses import dataclass, field
from typing import Optional

_WORDS = ("the of and to in is was for on that with as by at from his her it an were are which this be or "
          "had not but have one their they you all new more has after who first would been two time other "
          "about also its most some into than only over such many can these then them may any where both "
          "between each while when used three could well year part made city people did work state three "
          "world house long under water school high small large great place right point light music").split()


@dataclass
class RequestResult:
    ok: bool = False
    error: str = ""
    prompt_tokens: int = 0
    output_tokens: int = 0
    ttft: float = 0.0
    e2e: float = 0.0
    itl: list[float] = field(default_factory=list)


def add_cli_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--base-url", default="http://127.0.0.1:8000", help="Server root URL (without /v1).")
    p.add_argument("--model", default=None, help="Model name to request; default: the first of GET /v1/models.")
    p.add_argument("--endpoint-type", choices=["completions", "chat"], default="completions",
                   help="POST /v1/completions or /v1/chat/completions.")
    p.add_argument("--num-prompts", type=int, default=100, help="Number of requests to send.")
    p.add_argument("--input-len", type=int, default=128, help="Prompt length in tokens (approximate without /tokenize).")
    p.add_argument("--output-len", type=int, default=128, help="max_tokens of each request.")
    p.add_argument("--request-rate", type=float, default=float("inf"),
                   help="Requests per second, Poisson arrivals; inf sends all at once.")
    p.add_argument("--max-concurrency", type=int, default=None, help="At most this many requests in flight.")
    p.add_argument("--ignore-eos", action="store_true",
                   help="Send ignore_eos (a vLLM extra) so every request generates exactly --output-len tokens.")
    p.add_argument("--temperature", type=float, default=0.0, help="Sampling temperature of the requests.")
    p.add_argument("--seed", type=int, default=0, help="Seed of prompts and arrival times.")
    p.add_argument("--api-key", default=None, help="Bearer token; default $FLEETSERVE_API_KEY or $OPENAI_API_KEY.")
    p.add_argument("--timeout", type=float, default=6 * 3600, help="Seconds allowed per request.")
    p.add_argument("--result-file", default=None, help="Write the results as JSON to this file.")


def _headers(api_key: Optional[str]) -> dict:
    return {"Authorization": f"Bearer {api_key}"} if api_key else {}


async def _fetch_model(session, base: str, headers: dict) -> str:
    async with session.get(f"{base}/v1/models", headers=headers) as r:
        r.raise_for_status()
        return (await r.json())["data"][0]["id"]


async def _make_prompts(session, base: str, headers: dict, model: str, n: int, input_len: int,
                        rng: random.Random) -> list:
    prompts = [" ".join(rng.choice(_WORDS) for _ in range(max(1, input_len))) for _ in range(n)]
    # Exact lengths where the server can count tokens for us; any other server gets the approximation.
    try:
        async with session.post(f"{base}/tokenize", json={"model": model, "prompt": "hello"}, headers=headers) as r:
            if r.status != 200:
                body = await r.text()
                if "no_tokenizer" in body:  # e.g. dummy-weight presets: send token ids of the exact length
                    return [[rng.randrange(100, 30000) for _ in range(input_len)] for _ in range(n)]
                return prompts
    except Exception:
        return prompts
    sem = asyncio.Semaphore(16)

    async def fit(p: str) -> str:
        words = p.split(" ")
        async with sem:
            for _ in range(6):
                async with session.post(f"{base}/tokenize", json={"model": model, "prompt": " ".join(words)},
                                        headers=headers) as r:
                    count = (await r.json())["count"]
                if count == input_len:
                    break
                if count > input_len:
                    words = words[: max(1, len(words) - (count - input_len))]
                else:
                    words += [rng.choice(_WORDS) for _ in range(input_len - count)]
        return " ".join(words)

    return list(await asyncio.gather(*(fit(p) for p in prompts)))


async def _one(session, url: str, payload: dict, headers: dict, timeout: float) -> RequestResult:
    import aiohttp

    res = RequestResult()
    chunks = 0
    start = time.perf_counter()
    last = None
    try:
        async with session.post(url, json=payload, headers=headers,
                                timeout=aiohttp.ClientTimeout(total=timeout)) as r:
            if r.status != 200:
                res.error = f"HTTP {r.status}: {(await r.text())[:200]}"
                return res
            async for raw in r.content:
                line = raw.strip()
                if not line.startswith(b"data:"):
                    continue
                data = line[5:].strip()
                if data == b"[DONE]":
                    break
                obj = json.loads(data)
                if "error" in obj:
                    res.error = str(obj["error"].get("message", obj["error"]))
                    return res
                if obj.get("usage"):
                    res.prompt_tokens = obj["usage"].get("prompt_tokens", 0)
                    res.output_tokens = obj["usage"].get("completion_tokens", 0)
                for ch in obj.get("choices") or []:
                    text = ch.get("text")
                    # A completions chunk is a step that produced tokens, even with its text held back
                    # (vLLM's benchmark counts them the same way); a chat chunk counts when it has content.
                    arrived = text is not None or bool((ch.get("delta") or {}).get("content"))
                    if arrived:
                        now = time.perf_counter()
                        if last is None:
                            res.ttft = now - start
                        else:
                            res.itl.append(now - last)
                        last = now
                        chunks += 1
    except Exception as e:  # a benchmark reports failures, it does not stop on them
        res.error = f"{type(e).__name__}: {e}"
        return res
    res.e2e = time.perf_counter() - start
    if not res.output_tokens:
        res.output_tokens = chunks
    res.ok = last is not None
    if not res.ok:
        res.error = "no output"
    return res


def _stats(name: str, values_s: list[float]) -> dict:
    ms = [v * 1000.0 for v in values_s]
    if not ms:
        return {f"mean_{name}_ms": 0.0, f"median_{name}_ms": 0.0, f"std_{name}_ms": 0.0, f"p99_{name}_ms": 0.0}
    ordered = sorted(ms)
    p99 = ordered[min(len(ordered) - 1, max(0, math.ceil(0.99 * len(ordered)) - 1))]
    return {f"mean_{name}_ms": statistics.fmean(ms), f"median_{name}_ms": statistics.median(ms),
            f"std_{name}_ms": statistics.pstdev(ms), f"p99_{name}_ms": p99}


def summarize(results: list[RequestResult], duration: float) -> dict:
    done = [r for r in results if r.ok]
    total_in = sum(r.prompt_tokens for r in done)
    total_out = sum(r.output_tokens for r in done)
    tpots = [(r.e2e - r.ttft) / (r.output_tokens - 1) for r in done if r.output_tokens > 1]
    out = {
        "duration": duration,
        "completed": len(done),
        "failed": len(results) - len(done),
        "total_input_tokens": total_in,
        "total_output_tokens": total_out,
        "request_throughput": len(done) / duration if duration > 0 else 0.0,
        "output_throughput": total_out / duration if duration > 0 else 0.0,
        "total_token_throughput": (total_in + total_out) / duration if duration > 0 else 0.0,
    }
    out.update(_stats("ttft", [r.ttft for r in done]))
    out.update(_stats("tpot", tpots))
    out.update(_stats("itl", [x for r in done for x in r.itl]))
    out.update(_stats("e2el", [r.e2e for r in done]))
    out.update({
        "input_lens": [r.prompt_tokens for r in results],
        "output_lens": [r.output_tokens for r in results],
        "ttfts": [r.ttft for r in results],
        "e2els": [r.e2e for r in results],
        "errors": [r.error for r in results],
    })
    return out


async def benchmark(args: argparse.Namespace) -> dict:
    import aiohttp

    base = args.base_url.rstrip("/")
    api_key = args.api_key or os.environ.get("FLEETSERVE_API_KEY") or os.environ.get("OPENAI_API_KEY")
    headers = _headers(api_key)
    rng = random.Random(args.seed)
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=None)) as session:
        model = args.model or await _fetch_model(session, base, headers)
        prompts = await _make_prompts(session, base, headers, model, args.num_prompts, args.input_len, rng)
        if args.endpoint_type == "chat":
            url = f"{base}/v1/chat/completions"
            bodies = [{"messages": [{"role": "user", "content": p}]} for p in prompts]
        else:
            url = f"{base}/v1/completions"
            bodies = [{"prompt": p} for p in prompts]
        for b in bodies:
            b.update(model=model, max_tokens=args.output_len, temperature=args.temperature, stream=True,
                     stream_options={"include_usage": True})
            if args.ignore_eos:
                b["ignore_eos"] = True
        sem = asyncio.Semaphore(args.max_concurrency) if args.max_concurrency else None

        async def limited(body):
            if sem is None:
                return await _one(session, url, body, headers, args.timeout)
            async with sem:
                return await _one(session, url, body, headers, args.timeout)

        start = time.perf_counter()
        tasks = []
        for body in bodies:
            tasks.append(asyncio.ensure_future(limited(body)))
            if math.isfinite(args.request_rate) and args.request_rate > 0:
                await asyncio.sleep(rng.expovariate(args.request_rate))
        results = await asyncio.gather(*tasks)
        duration = time.perf_counter() - start
    summary = summarize(list(results), duration)
    summary.update(model=model, base_url=base, endpoint_type=args.endpoint_type, num_prompts=args.num_prompts,
                   input_len=args.input_len, output_len=args.output_len,
                   request_rate=args.request_rate if math.isfinite(args.request_rate) else "inf",
                   max_concurrency=args.max_concurrency)
    return summary


def print_summary(s: dict, file=sys.stdout) -> None:
    rows = [("Successful requests", s["completed"]), ("Failed requests", s["failed"]),
            ("Benchmark duration (s)", f"{s['duration']:.2f}"),
            ("Total input tokens", s["total_input_tokens"]), ("Total generated tokens", s["total_output_tokens"]),
            ("Request throughput (req/s)", f"{s['request_throughput']:.2f}"),
            ("Output token throughput (tok/s)", f"{s['output_throughput']:.2f}"),
            ("Total token throughput (tok/s)", f"{s['total_token_throughput']:.2f}")]
    for name, label in (("ttft", "TTFT"), ("tpot", "TPOT"), ("itl", "ITL"), ("e2el", "E2E latency")):
        for stat in ("mean", "median", "p99"):
            rows.append((f"{stat.capitalize()} {label} (ms)", f"{s[f'{stat}_{name}_ms']:.2f}"))
    print("=" * 50, file=file)
    for k, v in rows:
        print(f"{k:<40}{v:>10}", file=file)
    print("=" * 50, file=file)


def run(args: argparse.Namespace) -> int:
    summary = asyncio.run(benchmark(args))
    print_summary(summary)
    if args.result_file:
        with open(args.result_file, "w") as f:
            json.dump(summary, f, indent=2)
    errors = [e for e in summary["errors"] if e]
    if errors:
        print(f"{len(errors)} requests failed; first error: {errors[0]}", file=sys.stderr)
    return 0 if summary["completed"] else 1


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="fleetserve bench serve", description=__doc__.splitlines()[0])
    add_cli_args(p)
    return run(p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
