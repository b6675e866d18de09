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
- goodput (--goodput ttft:MS tpot:MS e2el:MS): requests per second that met every given SLO.
Token counts come from the server's usage chunk (chunks are counted if it sends none).
Arrivals are Poisson at --request-rate (inf sends all at once); --burstiness != 1 draws
gamma-distributed gaps of the same mean (< 1 burstier, > 1 more regular); at most
--max-concurrency in flight; --num-warmups requests run (unmeasured) first.

Workloads (--dataset-name):
- random (default): prompts of random common words, --input-len tokens and --output-len
  output tokens, each drawn from [len * (1 - r), len * (1 + r)] with --random-range-ratio r;
- sharegpt: a ShareGPT-format JSON file (--dataset-path; a list of {"conversations":
  [{"from": "human", "value": ...}, {"from": "gpt", "value": ...}, ...]}): the first turn is the
  prompt, the second turn's token count is the output length (--sharegpt-output-len overrides it);
  pairs with prompt or output under 4 tokens, a prompt over 1024 or a total over 2048 are skipped;
- prefix-repetition: --num-prefixes shared prefixes of --prefix-len tokens (system prompts), each
  request one of them plus its own random suffix of --input-len tokens.
Only aiohttp is needed, no tokenizer: a server with /tokenize (fleetserve, vLLM) gets prompts
trimmed to exact token lengths and counts ShareGPT outputs; a server without a tokenizer gets
token ids (random and prefix workloads only). Result keys follow vLLM's benchmark_serving.
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
from datetime import datetime, timezone
from typing import Any

_WORDS = (
    "the of and to in is was for on that with as by at from his her it an were are which this be or "
    "had not but have one their they you all new more has after who first would been two time other "
    "about also its most some into than only over such many can these then them may any where both "
    "between each while when used three could well year part made city people did work state three "
    "world house long under water school high small large great place right point light music"
).split()


@dataclass
class SampleRequest:
    prompt: str | list[int]
    prompt_len: int  # tokens (exact when the server could count them)
    output_len: int  # max_tokens of the request


@dataclass
class RequestResult:
    ok: bool = False
    error: str = ""
    prompt_tokens: int = 0
    output_tokens: int = 0
    ttft: float = 0.0
    e2e: float = 0.0
    itl: list[float] = field(default_factory=list)
    start: float = 0.0  # seconds since the benchmark started
    text: str = ""


def add_cli_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--base-url", default="http://127.0.0.1:8000", help="Server root URL (without /v1).")
    p.add_argument(
        "--model", default=None, help="Model name to request; default: the first of GET /v1/models."
    )
    p.add_argument(
        "--endpoint-type",
        choices=["completions", "chat"],
        default="completions",
        help="POST /v1/completions or /v1/chat/completions.",
    )
    p.add_argument("--num-prompts", type=int, default=100, help="Number of requests to send.")
    p.add_argument(
        "--input-len", type=int, default=128, help="Prompt length in tokens (approximate without /tokenize)."
    )
    p.add_argument("--output-len", type=int, default=128, help="max_tokens of each request.")
    p.add_argument(
        "--request-rate",
        type=float,
        default=float("inf"),
        help="Requests per second, Poisson arrivals; inf sends all at once.",
    )
    p.add_argument("--max-concurrency", type=int, default=None, help="At most this many requests in flight.")
    p.add_argument(
        "--ignore-eos",
        action="store_true",
        help="Send ignore_eos (a vLLM extra) so every request generates exactly --output-len tokens.",
    )
    p.add_argument("--temperature", type=float, default=0.0, help="Sampling temperature of the requests.")
    p.add_argument("--seed", type=int, default=0, help="Seed of prompts and arrival times.")
    p.add_argument(
        "--api-key", default=None, help="Bearer token; default $FLEETSERVE_API_KEY or $OPENAI_API_KEY."
    )
    p.add_argument("--timeout", type=float, default=6 * 3600, help="Seconds allowed per request.")
    p.add_argument("--result-file", default=None, help="Write the results as JSON to this file.")
    p.add_argument(
        "--dataset-name",
        choices=["random", "sharegpt", "prefix-repetition"],
        default="random",
        help="Workload: random prompts, a ShareGPT file, or shared prefixes plus random suffixes.",
    )
    p.add_argument(
        "--dataset-path", default=None, help="ShareGPT-format JSON file (--dataset-name sharegpt)."
    )
    p.add_argument(
        "--sharegpt-output-len",
        type=int,
        default=None,
        help="Output length of every ShareGPT request instead of its reply's token count.",
    )
    p.add_argument(
        "--random-range-ratio",
        type=float,
        default=0.0,
        help="Random lengths: input and output lengths uniform in [len*(1-r), len*(1+r)].",
    )
    p.add_argument(
        "--num-prefixes", type=int, default=4, help="prefix-repetition: number of distinct prefixes."
    )
    p.add_argument("--prefix-len", type=int, default=256, help="prefix-repetition: tokens per shared prefix.")
    p.add_argument(
        "--burstiness",
        type=float,
        default=1.0,
        help="Gamma shape of the arrival gaps (1 = Poisson; smaller is burstier).",
    )
    p.add_argument(
        "--num-warmups", type=int, default=0, help="Requests sent (and not measured) before the run."
    )
    p.add_argument(
        "--goodput",
        nargs="+",
        default=None,
        metavar="KEY:MS",
        help="SLOs for goodput, e.g. ttft:200 tpot:50 (keys ttft, tpot, e2el; milliseconds).",
    )
    p.add_argument(
        "--metric-percentiles",
        default="99",
        help="Comma-separated percentiles reported for every latency metric (e.g. 50,90,99).",
    )


def _headers(api_key: str | None) -> dict:
    return {"Authorization": f"Bearer {api_key}"} if api_key else {}


async def _fetch_model(session, base: str, headers: dict) -> str:
    async with session.get(f"{base}/v1/models", headers=headers) as r:
        r.raise_for_status()
        return (await r.json())["data"][0]["id"]


def _lengths(n: int, mean: int, ratio: float, rng: random.Random) -> list[int]:
    if ratio <= 0:
        return [max(1, mean)] * n
    lo, hi = max(1, int(mean * (1 - ratio))), max(1, int(mean * (1 + ratio)))
    return [rng.randint(lo, hi) for _ in range(n)]


def _words(n: int, rng: random.Random) -> str:
    return " ".join(rng.choice(_WORDS) for _ in range(max(1, n)))


class _Counter:
    """Token counts through the server's /tokenize, if it has one (None: approximate / token ids)."""

    def __init__(self, session, base: str, headers: dict, model: str):
        self.session, self.base, self.headers, self.model = session, base, headers, model
        self.sem = asyncio.Semaphore(16)
        self.mode = "unknown"  # "tokenize" | "ids" (server has no tokenizer) | "none" (no /tokenize)

    async def probe(self) -> str:
        try:
            async with self.session.post(
                f"{self.base}/tokenize", json={"model": self.model, "prompt": "hello"}, headers=self.headers
            ) as r:
                body = await r.text()
                if r.status == 200:
                    self.mode = "tokenize"
                elif "no_tokenizer" in body:  # e.g. dummy-weight presets: send token ids of the exact length
                    self.mode = "ids"
                else:
                    self.mode = "none"
        except Exception:
            self.mode = "none"
        return self.mode

    async def count(self, text: str, add_special_tokens: bool = True) -> int:
        async with self.sem:
            async with self.session.post(
                f"{self.base}/tokenize",
                headers=self.headers,
                json={"model": self.model, "prompt": text, "add_special_tokens": add_special_tokens},
            ) as r:
                return (await r.json())["count"]

    async def fit(self, words: list[str], target: int, rng: random.Random) -> str:
        """Words trimmed / extended until the prompt is `target` tokens (a few tries)."""
        for _ in range(6):
            count = await self.count(" ".join(words))
            if count == target:
                break
            if count > target:
                words = words[: max(1, len(words) - (count - target))]
            else:
                words += [rng.choice(_WORDS) for _ in range(target - count)]
        return " ".join(words)


async def _random_requests(counter: _Counter, args, rng: random.Random) -> list[SampleRequest]:
    n = args.num_prompts + args.num_warmups
    ins = _lengths(n, args.input_len, args.random_range_ratio, rng)
    outs = _lengths(n, args.output_len, args.random_range_ratio, rng)
    if counter.mode == "ids":
        return [SampleRequest([rng.randrange(100, 30000) for _ in range(i)], i, o) for i, o in zip(ins, outs)]
    texts = [_words(i, rng) for i in ins]
    if counter.mode == "tokenize":
        texts = list(await asyncio.gather(*(counter.fit(t.split(" "), i, rng) for t, i in zip(texts, ins))))
    return [SampleRequest(t, i, o) for t, i, o in zip(texts, ins, outs)]


async def _prefix_requests(counter: _Counter, args, rng: random.Random) -> list[SampleRequest]:
    n = args.num_prompts + args.num_warmups
    ins = _lengths(n, args.input_len, args.random_range_ratio, rng)
    outs = _lengths(n, args.output_len, args.random_range_ratio, rng)
    k = max(1, args.num_prefixes)
    if counter.mode == "ids":
        prefix_ids = [[rng.randrange(100, 30000) for _ in range(args.prefix_len)] for _ in range(k)]
        return [
            SampleRequest(
                prefix_ids[j % k] + [rng.randrange(100, 30000) for _ in range(i)], args.prefix_len + i, o
            )
            for j, (i, o) in enumerate(zip(ins, outs))
        ]
    prefixes = [_words(args.prefix_len, rng) for _ in range(k)]
    if counter.mode == "tokenize":
        prefixes = list(
            await asyncio.gather(*(counter.fit(p.split(" "), args.prefix_len, rng) for p in prefixes))
        )
    reqs = []
    for j, (i, o) in enumerate(zip(ins, outs)):
        # Prefix and suffix join at a space, so the prefix's tokens stay the same in every request.
        reqs.append(SampleRequest(prefixes[j % k] + " " + _words(i, rng), args.prefix_len + i, o))
    return reqs


async def _sharegpt_requests(counter: _Counter, args, rng: random.Random) -> list[SampleRequest]:
    if not args.dataset_path:
        raise SystemExit("--dataset-name sharegpt needs --dataset-path FILE")
    if counter.mode == "ids":
        raise SystemExit("the server has no tokenizer: a ShareGPT workload needs one (text prompts)")
    with open(args.dataset_path) as f:
        data = json.load(f)
    pairs = []
    for item in data:
        conv = item.get("conversations") or item.get("conversation") or []
        if len(conv) >= 2 and conv[0].get("value") and conv[1].get("value"):
            pairs.append((conv[0]["value"], conv[1]["value"]))
    rng.shuffle(pairs)
    n = args.num_prompts + args.num_warmups
    reqs: list[SampleRequest] = []
    for start in range(0, len(pairs), 64):
        if len(reqs) >= n:
            break
        batch = pairs[start : start + 64]
        if counter.mode == "tokenize":
            counts = await asyncio.gather(*(counter.count(t) for pair in batch for t in pair))
        else:  # no /tokenize: about 1.3 tokens per word
            counts = [max(1, int(len(t.split()) * 1.3)) for pair in batch for t in pair]
        for (prompt, _reply), p_len, r_len in zip(batch, counts[0::2], counts[1::2]):
            out_len = args.sharegpt_output_len or r_len
            if p_len < 4 or out_len < 4 or p_len > 1024 or p_len + out_len > 2048:
                continue  # vLLM's filter: too short to measure, or too long for common contexts
            reqs.append(SampleRequest(prompt, p_len, out_len))
            if len(reqs) >= n:
                break
    if len(reqs) < n:
        print(f"ShareGPT file has only {len(reqs)} usable conversations (asked for {n})", file=sys.stderr)
    return reqs


async def _make_requests(session, base: str, headers: dict, model: str, args, rng: random.Random) -> tuple:
    counter = _Counter(session, base, headers, model)
    await counter.probe()
    make = {"random": _random_requests, "sharegpt": _sharegpt_requests, "prefix-repetition": _prefix_requests}
    return await make[args.dataset_name](counter, args, rng), counter.mode


async def _one(session, url: str, payload: dict, headers: dict, timeout: float) -> RequestResult:
    import aiohttp

    res = RequestResult()
    chunks = 0
    start = time.perf_counter()
    res.start = start
    last = None
    try:
        async with session.post(
            url, json=payload, headers=headers, timeout=aiohttp.ClientTimeout(total=timeout)
        ) as r:
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
                    res.text += text if text is not None else ((ch.get("delta") or {}).get("content") or "")
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


def _percentile(ordered: list[float], p: float) -> float:
    """Linear interpolation between closest ranks (numpy's default, as vLLM reports)."""
    if not ordered:
        return 0.0
    k = (len(ordered) - 1) * p / 100.0
    lo = math.floor(k)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)


def _stats(name: str, values_s: list[float], percentiles: tuple[float, ...] = (99,)) -> dict:
    ms = sorted(v * 1000.0 for v in values_s)
    out = {
        f"mean_{name}_ms": statistics.fmean(ms) if ms else 0.0,
        f"median_{name}_ms": statistics.median(ms) if ms else 0.0,
        f"std_{name}_ms": statistics.pstdev(ms) if ms else 0.0,
    }
    for p in percentiles:
        out[f"p{p:g}_{name}_ms"] = _percentile(ms, p)
    return out


def parse_goodput(items: list[str] | None) -> dict[str, float]:
    """['ttft:200', 'tpot:50'] -> {'ttft': 0.2, 'tpot': 0.05} (seconds)."""
    slos: dict[str, float] = {}
    for item in items or []:
        key, sep, value = item.partition(":")
        if not sep or key not in ("ttft", "tpot", "e2el"):
            raise SystemExit(f"--goodput takes KEY:MS with KEY one of ttft, tpot, e2el; got {item!r}")
        try:
            slos[key] = float(value) / 1000.0
        except ValueError:
            raise SystemExit(f"--goodput {item!r}: {value!r} is not a number of milliseconds") from None
    return slos


def _tpot(r: RequestResult) -> float | None:
    return (r.e2e - r.ttft) / (r.output_tokens - 1) if r.output_tokens > 1 else None


def _meets(r: RequestResult, slos: dict[str, float]) -> bool:
    tpot = _tpot(r) or 0.0
    return all(v <= slos[k] for k, v in (("ttft", r.ttft), ("tpot", tpot), ("e2el", r.e2e)) if k in slos)


def summarize(
    results: list[RequestResult],
    duration: float,
    percentiles: tuple[float, ...] = (99,),
    slos: dict[str, float] | None = None,
    t0: float | None = None,
) -> dict:
    done = [r for r in results if r.ok]
    total_in = sum(r.prompt_tokens for r in done)
    total_out = sum(r.output_tokens for r in done)
    tpots = [t for t in map(_tpot, done) if t is not None]
    out: dict[str, Any] = {
        "duration": duration,
        "completed": len(done),
        "failed": len(results) - len(done),
        "total_input_tokens": total_in,
        "total_output_tokens": total_out,
        "request_throughput": len(done) / duration if duration > 0 else 0.0,
        "request_goodput": (sum(_meets(r, slos) for r in done) / duration if duration > 0 else 0.0)
        if slos
        else None,
        "output_throughput": total_out / duration if duration > 0 else 0.0,
        "total_token_throughput": (total_in + total_out) / duration if duration > 0 else 0.0,
    }
    if slos:
        out["goodput_slos_ms"] = {k: v * 1000.0 for k, v in slos.items()}
    out.update(_stats("ttft", [r.ttft for r in done], percentiles))
    out.update(_stats("tpot", tpots, percentiles))
    out.update(_stats("itl", [x for r in done for x in r.itl], percentiles))
    out.update(_stats("e2el", [r.e2e for r in done], percentiles))
    # Peak output rate over 1 s buckets and peak concurrency, from each request's token arrival times.
    base = t0 if t0 is not None else min((r.start for r in results), default=0.0)
    buckets: dict[int, float] = {}
    events = []
    for r in done:
        t = r.start - base + r.ttft
        times = [t]
        for gap in r.itl:
            t += gap
            times.append(t)
        # Token counts spread over the chunks (a chunk may carry more than one token).
        per = r.output_tokens / max(1, len(times))
        for x in times:
            buckets[int(x)] = buckets.get(int(x), 0) + per
        events += [(r.start - base, 1), (r.start - base + r.e2e, -1)]
    conc = peak = 0
    for _, d in sorted(events):
        conc += d
        peak = max(peak, conc)
    out["max_output_tokens_per_s"] = max(buckets.values(), default=0.0)
    out["max_concurrent_requests"] = peak
    out.update(
        {
            "input_lens": [r.prompt_tokens for r in results],
            "output_lens": [r.output_tokens for r in results],
            "ttfts": [r.ttft for r in results],
            "itls": [r.itl for r in results],
            "e2els": [r.e2e for r in results],
            "generated_texts": [r.text for r in results],
            "errors": [r.error for r in results],
        }
    )
    return out


def arrival_gaps(n: int, rate: float, burstiness: float, rng: random.Random) -> list[float]:
    """Seconds before each request: gamma(shape=burstiness, mean=1/rate); 1 is Poisson, inf rate: none."""
    if not math.isfinite(rate) or rate <= 0:
        return [0.0] * n
    theta = 1.0 / (rate * burstiness)
    return [rng.gammavariate(burstiness, theta) for _ in range(n)]


async def benchmark(args: argparse.Namespace) -> dict:
    import aiohttp

    base = args.base_url.rstrip("/")
    api_key = args.api_key or os.environ.get("FLEETSERVE_API_KEY") or os.environ.get("OPENAI_API_KEY")
    headers = _headers(api_key)
    rng = random.Random(args.seed)
    slos = parse_goodput(args.goodput)
    percentiles = tuple(float(p) for p in str(args.metric_percentiles).split(",") if p.strip())
    if args.burstiness <= 0:
        raise SystemExit("--burstiness must be > 0")
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(
        connector=connector, timeout=aiohttp.ClientTimeout(total=None)
    ) as session:
        model = args.model or await _fetch_model(session, base, headers)
        requests, count_mode = await _make_requests(session, base, headers, model, args, rng)
        if args.endpoint_type == "chat":
            url = f"{base}/v1/chat/completions"
            bodies: list[dict[str, Any]] = [
                {"messages": [{"role": "user", "content": r.prompt}]} for r in requests
            ]
        else:
            url = f"{base}/v1/completions"
            bodies = [{"prompt": r.prompt} for r in requests]
        for b, r in zip(bodies, requests):
            b.update(
                model=model,
                max_tokens=r.output_len,
                temperature=args.temperature,
                stream=True,
                stream_options={"include_usage": True},
            )
            if args.ignore_eos:
                b["ignore_eos"] = True
        warmups, bodies = bodies[: args.num_warmups], bodies[args.num_warmups :]
        sem = asyncio.Semaphore(args.max_concurrency) if args.max_concurrency else None

        async def limited(body):
            if sem is None:
                return await _one(session, url, body, headers, args.timeout)
            async with sem:
                return await _one(session, url, body, headers, args.timeout)

        if warmups:
            warm = await asyncio.gather(*(limited(b) for b in warmups))
            bad = [w.error for w in warm if not w.ok]
            if bad:
                print(f"{len(bad)} of {len(warm)} warm-up requests failed: {bad[0]}", file=sys.stderr)
        gaps = arrival_gaps(len(bodies), args.request_rate, args.burstiness, rng)
        start = time.perf_counter()
        tasks = []
        for body, gap in zip(bodies, gaps):
            tasks.append(asyncio.ensure_future(limited(body)))
            if gap > 0:
                await asyncio.sleep(gap)
        results = await asyncio.gather(*tasks)
        duration = time.perf_counter() - start
    summary = summarize(list(results), duration, percentiles, slos, t0=start)
    summary.update(
        date=datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S"),
        backend="openai-chat" if args.endpoint_type == "chat" else "openai",
        model_id=model,
        model=model,
        tokenizer_id=None,
        base_url=base,
        endpoint_type=args.endpoint_type,
        dataset_name=args.dataset_name,
        dataset_path=args.dataset_path,
        num_prompts=len(bodies),
        num_warmups=len(warmups),
        input_len=args.input_len,
        output_len=args.output_len,
        random_range_ratio=args.random_range_ratio,
        prefix_len=args.prefix_len if args.dataset_name == "prefix-repetition" else None,
        num_prefixes=args.num_prefixes if args.dataset_name == "prefix-repetition" else None,
        prompt_token_counts=count_mode,
        request_rate=args.request_rate if math.isfinite(args.request_rate) else "inf",
        burstiness=args.burstiness,
        max_concurrency=args.max_concurrency,
    )
    return summary


def print_summary(s: dict, file=sys.stdout) -> None:
    rows = [
        ("Successful requests", s["completed"]),
        ("Failed requests", s["failed"]),
        ("Benchmark duration (s)", f"{s['duration']:.2f}"),
        ("Total input tokens", s["total_input_tokens"]),
        ("Total generated tokens", s["total_output_tokens"]),
        ("Request throughput (req/s)", f"{s['request_throughput']:.2f}"),
        ("Output token throughput (tok/s)", f"{s['output_throughput']:.2f}"),
        ("Total token throughput (tok/s)", f"{s['total_token_throughput']:.2f}"),
    ]
    if s.get("request_goodput") is not None:
        rows.append(("Request goodput (req/s)", f"{s['request_goodput']:.2f}"))
    rows += [
        ("Peak output token throughput (tok/s)", f"{s['max_output_tokens_per_s']:.2f}"),
        ("Peak concurrent requests", s["max_concurrent_requests"]),
    ]
    for name, label in (("ttft", "TTFT"), ("tpot", "TPOT"), ("itl", "ITL"), ("e2el", "E2E latency")):
        stats = ["mean", "median"] + [
            k.split("_")[0] for k in s if k.startswith("p") and k.endswith(f"_{name}_ms")
        ]
        for stat in stats:
            label_stat = stat.upper() if stat.startswith("p") else stat.capitalize()
            rows.append((f"{label_stat} {label} (ms)", f"{s[f'{stat}_{name}_ms']:.2f}"))
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


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="fleetserve bench serve", description=__doc__.splitlines()[0])
    add_cli_args(p)
    return run(p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
