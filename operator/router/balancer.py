"""Which replica gets a request: prefix affinity on a consistent-hash ring, bounded by load.

Owns the replica set as the router sees it (address, outstanding requests through this
router, the last scraped queue and KV usage) and the choice rule. Pure: no I/O, no clock;
discovery.py feeds membership, proxy.py counts requests and feeds scraped metrics.

The rule, per request:
1. The affinity key hashes the prompt's leading blocks: for chat, each message is hashed
   and chained up to and including the first user message (the system prompts plus the
   conversation's opening, the same on every turn of one conversation); for completions, the
   first `affinity_blocks` blocks of `affinity_block_chars` characters. Requests sharing that
   prefix land on the replica whose prefix cache already holds it.
2. The key's point on the ring (each replica has `virtual_nodes` points) names replicas in a
   stable order; the first that is neither saturated nor at capacity takes it. Capacity is the
   bounded-load rule of consistent hashing (Mirrokni, Thorup, Zadimoghaddam 2018):
   outstanding < ceil(load_factor * (total outstanding + 1) / replicas), so a hot prefix
   spills to its next replicas instead of queueing on one. A replica is only at capacity when it
   also carries at least `load_slack` more outstanding requests than the least loaded one: at low
   concurrency the relative rule alone would move a conversation whenever two others happen to
   hash to its replica (3 in flight over 3 replicas: capacity 2), and a moved conversation
   recomputes its whole history elsewhere, while one more sequence in a continuous batch costs
   little (a replica that really queues is caught by the saturation rule). Taking the first
   replica of the order is an `affinity_hit`, a later one a `load_fallback`.
3. Every replica saturated or full: the least outstanding replica (preferring unsaturated
   ones), also a `load_fallback`. Requests without a prompt (no key) always go to the least
   outstanding replica: `least_loaded`.
"""

from __future__ import annotations

import bisect
import hashlib
import json
import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

AFFINITY_HIT = "affinity_hit"
LOAD_FALLBACK = "load_fallback"
LEAST_LOADED = "least_loaded"


def _h(data: bytes) -> int:
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "big")


def _chain(prev: int, data: bytes) -> int:
    return _h(prev.to_bytes(8, "big") + data)


def affinity_key(path: str, body: Any, block_chars: int = 128, blocks: int = 4) -> int | None:
    """The prefix hash of an OpenAI request body (parsed JSON), or None when it has no prompt."""
    if not isinstance(body, dict):
        return None
    model = str(body.get("model", "")).encode()
    messages = body.get("messages")
    if path.endswith("/chat/completions") and isinstance(messages, list) and messages:
        key = _h(b"chat\0" + model)
        for message in messages:
            if not isinstance(message, dict):
                return None
            part = json.dumps(
                [message.get("role"), message.get("content")], sort_keys=True, ensure_ascii=False
            )
            key = _chain(key, part.encode())
            if message.get("role") == "user":
                break
        return key
    prompt = body.get("prompt")
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]  # a batch: the first prompt decides (the runtime serves the batch on one replica)
    if isinstance(prompt, str) and prompt:
        key = _h(b"text\0" + model)
        for i in range(min(blocks, math.ceil(len(prompt) / block_chars))):
            key = _chain(key, prompt[i * block_chars : (i + 1) * block_chars].encode())
        return key
    if isinstance(prompt, list) and prompt and all(isinstance(t, int) for t in prompt):
        # Token ids: blocks of 16 tokens, about as long as `block_chars` characters of text would be.
        key = _h(b"ids\0" + model)
        for i in range(min(blocks, math.ceil(len(prompt) / 16))):
            key = _chain(key, json.dumps(prompt[i * 16 : (i + 1) * 16]).encode())
        return key
    return None


@dataclass
class Backend:
    """A ready replica: where it is, and what the router knows of its load."""

    address: str
    """host:port of the runtime's API."""
    name: str = ""
    """The pod's name when the endpoint names it (for logs); else the address."""
    outstanding: int = 0
    """Requests this router has in flight on it."""
    waiting: float = 0.0
    """Last scraped vllm:num_requests_waiting."""
    kv_usage: float = 0.0
    """Last scraped vllm:kv_cache_usage_perc."""

    @property
    def url(self) -> str:
        return f"http://{self.address}"


class Balancer:
    """The replica set and the choice rule (see the module docstring)."""

    def __init__(
        self,
        load_factor: float = 1.25,
        virtual_nodes: int = 100,
        max_waiting: float = 8,
        max_kv_usage: float = 0.95,
        load_slack: int = 4,
    ) -> None:
        self.load_factor = load_factor
        self.load_slack = load_slack
        self.virtual_nodes = virtual_nodes
        self.max_waiting = max_waiting
        self.max_kv_usage = max_kv_usage
        self.backends: dict[str, Backend] = {}
        self._ring: list[tuple[int, str]] = []
        self._points: list[int] = []

    # --- membership ---------------------------------------------------------------------------
    def set_backends(self, members: Iterable[tuple[str, str]]) -> bool:
        """Replaces the ready set with {(address, name)}; keeps counters of replicas that stay.
        Returns whether the membership changed."""
        wanted = dict(members)
        if set(wanted) == set(self.backends):
            for address, name in wanted.items():
                self.backends[address].name = name or address
            return False
        self.backends = {a: self.backends.get(a) or Backend(a, n or a) for a, n in wanted.items()}
        ring = [(_h(f"{a}#{i}".encode()), a) for a in self.backends for i in range(self.virtual_nodes)]
        ring.sort()
        self._ring, self._points = ring, [p for p, _ in ring]
        return True

    def saturated(self, b: Backend) -> bool:
        return b.waiting >= self.max_waiting or b.kv_usage >= self.max_kv_usage

    def update_metrics(self, address: str, waiting: float, kv_usage: float | None) -> None:
        b = self.backends.get(address)
        if b is not None:
            b.waiting, b.kv_usage = waiting, kv_usage or 0.0

    # --- choice -------------------------------------------------------------------------------
    def ring_order(self, key: int) -> list[str]:
        """Replicas in the order the key's ring walk meets them (each once)."""
        seen: list[str] = []
        n = len(self._ring)
        start = bisect.bisect_left(self._points, key)
        for i in range(n):
            address = self._ring[(start + i) % n][1]
            if address not in seen:
                seen.append(address)
                if len(seen) == len(self.backends):
                    break
        return seen

    def capacity(self, n: int) -> int:
        total = sum(b.outstanding for b in self.backends.values())
        return math.ceil(self.load_factor * (total + 1) / max(n, 1))

    def choose(self, key: int | None, exclude: Iterable[str] = ()) -> tuple[Backend | None, str]:
        """The replica for a request with this affinity key, skipping `exclude` (already tried)."""
        excluded = set(exclude)
        candidates = [b for a, b in self.backends.items() if a not in excluded]
        if not candidates:
            return None, ""
        if key is not None:
            cap = self.capacity(len(self.backends))
            floor = min(b.outstanding for b in self.backends.values())
            order = [a for a in self.ring_order(key) if a not in excluded]
            for i, address in enumerate(order):
                b = self.backends[address]
                full = b.outstanding >= cap and b.outstanding - floor >= self.load_slack
                if not full and not self.saturated(b):
                    return b, AFFINITY_HIT if i == 0 else LOAD_FALLBACK
        fresh = [b for b in candidates if not self.saturated(b)] or candidates
        best = min(fresh, key=lambda b: (b.outstanding, b.waiting, b.address))
        return best, LEAST_LOADED if key is None else LOAD_FALLBACK
