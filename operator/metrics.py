"""Scrapes runtime pods' Prometheus /metrics and aggregates them per InferenceService.

Owns the reading of the runtime's metrics contract (vLLM names, label
`model_name`): the gauges vllm:num_requests_waiting / vllm:num_requests_running /
vllm:kv_cache_usage_perc and the counters vllm:prompt_tokens_total /
vllm:generation_tokens_total, from which token rates are derived between two
scrapes of the same pod. The previous scrape per pod lives in a `RateTracker`
kept in the operator's per-object memo, never in the cluster.
"""

from __future__ import annotations

import asyncio
import math
import re
import time
from collections.abc import Iterable
from dataclasses import dataclass, field

import aiohttp

WAITING = "vllm:num_requests_waiting"
RUNNING = "vllm:num_requests_running"
KV_USAGE = "vllm:kv_cache_usage_perc"
PROMPT_TOKENS = "vllm:prompt_tokens_total"
GENERATION_TOKENS = "vllm:generation_tokens_total"

_LINE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})?\s+(\S+)")


def parse_prometheus(text: str) -> dict[str, float]:
    """Sums each metric over its label sets (one pod serves one model); comments and unknown lines skipped."""
    out: dict[str, float] = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        m = _LINE.match(line)
        if not m:
            continue
        try:
            value = float(m.group(3))
        except ValueError:
            continue
        if math.isnan(value):
            continue
        out[m.group(1)] = out.get(m.group(1), 0.0) + value
    return out


@dataclass(frozen=True)
class PodSample:
    pod: str
    time: float
    waiting: float
    running: float
    kv_usage: float | None
    prompt_tokens: float | None
    generation_tokens: float | None


@dataclass(frozen=True)
class Aggregate:
    """Sums (and a mean for KV usage) over the ready pods that answered."""

    pods: int
    waiting: float
    running: float
    kv_usage: float | None
    prompt_tps: float | None
    generation_tps: float | None


@dataclass
class RateTracker:
    """Last counter sample per pod, to turn counters into per-second rates."""

    last: dict[str, PodSample] = field(default_factory=dict)

    def rates(self, sample: PodSample) -> tuple[float | None, float | None]:
        prev = self.last.get(sample.pod)
        self.last[sample.pod] = sample
        if prev is None or sample.time <= prev.time:
            return None, None
        dt = sample.time - prev.time

        def rate(now: float | None, before: float | None) -> float | None:
            if now is None or before is None or now < before:  # counter reset: pod restarted
                return None
            return (now - before) / dt

        return rate(sample.prompt_tokens, prev.prompt_tokens), rate(
            sample.generation_tokens, prev.generation_tokens
        )

    def forget_except(self, pods: Iterable[str]) -> None:
        keep = set(pods)
        self.last = {k: v for k, v in self.last.items() if k in keep}


def sample_from_text(pod: str, text: str, now: float | None = None) -> PodSample:
    m = parse_prometheus(text)
    return PodSample(
        pod=pod,
        time=time.monotonic() if now is None else now,
        waiting=m.get(WAITING, 0.0),
        running=m.get(RUNNING, 0.0),
        kv_usage=m.get(KV_USAGE),
        prompt_tokens=m.get(PROMPT_TOKENS),
        generation_tokens=m.get(GENERATION_TOKENS),
    )


async def scrape(session: aiohttp.ClientSession, pod: str, url: str, timeout: float) -> PodSample | None:
    """One pod's sample, or None when it does not answer in time (it is then left out of the sums)."""
    try:
        async with session.get(url, timeout=aiohttp.ClientTimeout(total=timeout)) as resp:
            if resp.status != 200:
                return None
            return sample_from_text(pod, await resp.text())
    except (aiohttp.ClientError, asyncio.TimeoutError, OSError):
        return None


async def scrape_all(targets: dict[str, str], tracker: RateTracker, timeout: float) -> Aggregate | None:
    """Scrapes every target {pod: url} concurrently; None when no pod answered."""
    if not targets:
        tracker.forget_except(())
        return None
    async with aiohttp.ClientSession() as session:
        samples = await asyncio.gather(*(scrape(session, pod, url, timeout) for pod, url in targets.items()))
    tracker.forget_except(targets)
    answered = [s for s in samples if s is not None]
    if not answered:
        return None
    prompt, gen, kv = [], [], []
    for s in answered:
        p, g = tracker.rates(s)
        prompt += [p] if p is not None else []
        gen += [g] if g is not None else []
        kv += [s.kv_usage] if s.kv_usage is not None else []
    return Aggregate(
        pods=len(answered),
        waiting=sum(s.waiting for s in answered),
        running=sum(s.running for s in answered),
        kv_usage=sum(kv) / len(kv) if kv else None,
        prompt_tps=sum(prompt) if prompt else None,
        generation_tps=sum(gen) if gen else None,
    )
