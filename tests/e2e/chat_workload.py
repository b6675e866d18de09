"""The multi-turn chat workload of issue 14's prefix-cache acceptance point, stdlib only.

One script for both tiers that measure it: tests/e2e/test_router.py runs it in a client pod against a
plain Service or the router; tests/server/test_router_real_runtime.py runs it as a subprocess against
three real runtime replicas on loopback. Before and after, it reads the prefix-cache counters of every
replica, so what it prints is the aggregated hit rate of exactly this workload:
(sum of vllm:prefix_cache_hits_total deltas) / (sum of vllm:prefix_cache_queries_total deltas).

usage: chat_workload.py URLS MODEL METRIC_URLS CONVERSATIONS TURNS WORKERS TAG [OPENING_WORDS [API_KEY]]
- URLS: comma-separated API base URLs; each request picks one at random (one URL: a Service or the
  router; several: client-side random spreading, which is what kube-proxy does per connection).
- WORKERS threads each run whole conversations, one turn after the other (a user reading the answer
  and replying); conversation i uses system prompt i % 3.

The shape, and why (a workload choice, written down):
- A few short shared system prompts (3, about one KV block each), and conversation-specific history
  that dominates: the opening user message carries OPENING_WORDS words of its own (a pasted text to
  discuss, as in real chats), each later turn a short follow-up. The system prompts end up cached on
  every replica whichever way requests are spread, so they add the same hits to both sides; what
  prefix affinity changes is whether a conversation's own history is found.
- With random spreading over 3 replicas, turn t finds its history on the chosen replica only when an
  earlier turn of the conversation went there: 1/3 of the time at turn 2; at turn 3 one third of the
  time all of it, 2/9 of the time turn 1's part. Through the router every later turn finds it all.
  Before sampling noise that bounds the ratio of the two hit rates at 3x for 2-turn chats, about 2.4x
  for 3 turns and 2.1x for 4 (and lower the more shared prefix there is): more turns make random
  spreading look better, not the router worse. The acceptance workload is therefore 2 turns with a
  long opening; its noise comes from the plain phase (how many of the conversations' second turns
  happen to land on their first turn's replica: binomial(n, 1/3)), so it uses enough conversations to
  keep that small.
"""

import json
import random
import sys
import threading
import urllib.request

WORDS = (
    "river stone lamp orbit cedar violet signal harbor quartz meadow falcon copper lantern pixel "
    "tundra saffron glacier ember marble nectar canyon willow beacon thistle cobalt prairie"
).split()


def main(argv):
    urls, model, metric_urls, n_conv, turns, workers, tag = argv[:7]
    opening_words = int(argv[7]) if len(argv) > 7 else 70
    api_key = argv[8] if len(argv) > 8 else ""
    urls, metric_urls = urls.split(","), metric_urls.split(",")
    n_conv, turns, workers = int(n_conv), int(turns), int(workers)
    systems = [f"[{tag}] You are assistant {k}. Be brief." for k in range(3)]
    headers = {"Content-Type": "application/json"}
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    spread = random.Random(f"spread-{tag}")

    def counters():
        hits = queries = 0.0
        for m in metric_urls:
            for line in urllib.request.urlopen(m, timeout=30).read().decode().splitlines():
                if line.startswith("vllm:prefix_cache_hits_total"):
                    hits += float(line.split()[-1])
                elif line.startswith("vllm:prefix_cache_queries_total"):
                    queries += float(line.split()[-1])
        return hits, queries

    lock = threading.Lock()
    out = {"requests": 0, "prompt_tokens": 0, "errors": 0, "error_kinds": {}, "backends_per_conversation": []}

    def conversation(i):
        rng = random.Random(f"{tag}-{i}")
        msgs = [{"role": "system", "content": systems[i % len(systems)]}]
        backends = set()
        for t in range(turns):
            # The conversation's own words come first: nothing but the system prompt (and the chat
            # template around it) is shared between conversations.
            if t == 0:
                text = " ".join(rng.choice(WORDS) for _ in range(opening_words))
                content = f"{text.capitalize()}. What is this text about? ({i})"
            else:
                follow = " ".join(rng.choice(WORDS) for _ in range(8))
                content = f"And what about {follow}? ({i}.{t})"
            msgs.append({"role": "user", "content": content})
            body = json.dumps({"model": model, "messages": msgs, "max_tokens": 8, "temperature": 0.0})
            with lock:
                base = spread.choice(urls)
            req = urllib.request.Request(base + "/v1/chat/completions", body.encode(), headers)
            try:
                with urllib.request.urlopen(req, timeout=600) as r:
                    reply = json.loads(r.read())
                    backends.add(r.headers.get("X-Fleetserve-Backend") or base)
                answer = reply["choices"][0]["message"]["content"]
                with lock:
                    out["requests"] += 1
                    out["prompt_tokens"] += reply["usage"]["prompt_tokens"]
            except Exception as e:
                with lock:
                    out["errors"] += 1
                    out["error_kinds"][type(e).__name__] = out["error_kinds"].get(type(e).__name__, 0) + 1
                answer = ""
            msgs.append({"role": "assistant", "content": answer})
        with lock:
            out["backends_per_conversation"].append(len(backends))

    h0, q0 = counters()
    todo = list(range(n_conv))

    def worker():
        while True:
            with lock:
                if not todo:
                    return
                i = todo.pop(0)
            conversation(i)

    threads = [threading.Thread(target=worker) for _ in range(workers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    h1, q1 = counters()
    out.update(hits=h1 - h0, queries=q1 - q0, hit_rate=(h1 - h0) / max(q1 - q0, 1.0))
    print(json.dumps(out), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
