"""`fleetserve bench serve` workloads and metrics against the embedded model server (real HTTP):
random length ranges, ShareGPT files, shared prefixes, goodput, warm-ups, burstiness, vLLM's keys."""

from __future__ import annotations

import json
import random
import statistics
import urllib.request

import pytest

from .conftest import API_KEY, metric_values


def _bench(base_url, tmp_path, *extra) -> dict:
    from fleetserve.runtime import cli

    out = tmp_path / "bench.json"
    rc = cli.main(
        [
            "bench",
            "serve",
            "--base-url",
            base_url,
            "--api-key",
            API_KEY,
            "--ignore-eos",
            "--result-file",
            str(out),
            *extra,
        ]
    )
    assert rc == 0
    return json.loads(out.read_text())


def _count(base_url, text: str) -> int:
    req = urllib.request.Request(
        base_url + "/tokenize",
        data=json.dumps({"prompt": text}).encode(),
        headers={"Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json"},
    )
    with urllib.request.urlopen(req, timeout=30) as r:
        return json.loads(r.read())["count"]


def test_random_ranges_goodput_warmups_percentiles_and_keys(base_url, tmp_path):
    key = "vllm:request_success_total{finished_reason=length}"
    before = metric_values(base_url).get(key, 0)
    r = _bench(
        base_url,
        tmp_path,
        "--num-prompts",
        "8",
        "--input-len",
        "16",
        "--output-len",
        "4",
        "--random-range-ratio",
        "0.5",
        "--num-warmups",
        "2",
        "--request-rate",
        "50",
        "--burstiness",
        "0.5",
        "--goodput",
        "ttft:600000",
        "tpot:600000",
        "--metric-percentiles",
        "50,90,99",
    )
    assert r["completed"] == 8 and r["num_prompts"] == 8 and r["num_warmups"] == 2
    assert metric_values(base_url)[key] == before + 10  # the warm-ups ran too, unmeasured
    assert all(8 <= n <= 24 for n in r["input_lens"]) and len(set(r["input_lens"])) > 1
    assert all(2 <= n <= 6 for n in r["output_lens"]) and len(set(r["output_lens"])) > 1
    assert r["total_output_tokens"] == sum(r["output_lens"])
    # Every SLO generous: all requests count.
    assert r["request_goodput"] == pytest.approx(r["request_throughput"])
    for name in ("ttft", "tpot", "itl", "e2el"):
        assert r[f"p50_{name}_ms"] <= r[f"p90_{name}_ms"] <= r[f"p99_{name}_ms"]
    for k in (
        "date",
        "backend",
        "model_id",
        "tokenizer_id",
        "duration",
        "request_goodput",
        "itls",
        "generated_texts",
        "max_output_tokens_per_s",
        "max_concurrent_requests",
        "burstiness",
        "std_ttft_ms",
        "mean_tpot_ms",
        "median_e2el_ms",
    ):
        assert k in r, k
    assert 1 <= r["max_concurrent_requests"] <= 8 and r["max_output_tokens_per_s"] > 0
    assert len(r["itls"]) == 8 and all(len(x) == n - 1 for x, n in zip(r["itls"], r["output_lens"]))
    assert all(isinstance(t, str) for t in r["generated_texts"]) and any(r["generated_texts"])
    # An impossible SLO: no request meets it.
    r = _bench(
        base_url,
        tmp_path,
        "--num-prompts",
        "3",
        "--input-len",
        "8",
        "--output-len",
        "3",
        "--goodput",
        "ttft:0.001",
    )
    assert r["completed"] == 3 and r["request_goodput"] == 0.0


def test_sharegpt_file(base_url, tmp_path):
    convs = [
        {
            "conversations": [
                {"from": "human", "value": "Tell me about the sea and the ships on it, please."},
                {"from": "gpt", "value": "The sea is wide and the ships sail far away from home."},
            ]
        },
        {"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "hello there friend"}]},
        {
            "conversations": [
                {"from": "human", "value": "What is the capital city of France, and why?"},
                {"from": "gpt", "value": "Paris is the capital of France since a very long time."},
                {"from": "human", "value": "thanks"},
            ]
        },
        {"conversations": [{"from": "human", "value": "only one turn here, which cannot be used"}]},
        {
            "conversations": [
                {"from": "human", "value": "Write a short line about the morning sun rising."},
                {"from": "gpt", "value": "Morning sun climbs slowly over the quiet hills."},
            ]
        },
    ]
    path = tmp_path / "sharegpt.json"
    path.write_text(json.dumps(convs))
    r = _bench(
        base_url,
        tmp_path,
        "--dataset-name",
        "sharegpt",
        "--dataset-path",
        str(path),
        "--num-prompts",
        "3",
        "--request-rate",
        "inf",
    )
    assert (
        r["completed"] == 3 and r["dataset_name"] == "sharegpt"
    )  # "hi" (< 4 tokens) and the 1-turn one skipped
    usable = [
        c["conversations"]
        for c in convs
        if len(c["conversations"]) >= 2 and c["conversations"][0]["value"] != "hi"
    ]
    want = sorted((_count(base_url, c[0]["value"]), _count(base_url, c[1]["value"])) for c in usable)
    assert sorted(zip(r["input_lens"], r["output_lens"])) == want  # output length = the reply's token count
    r = _bench(
        base_url,
        tmp_path,
        "--dataset-name",
        "sharegpt",
        "--dataset-path",
        str(path),
        "--num-prompts",
        "2",
        "--sharegpt-output-len",
        "5",
    )
    assert r["output_lens"] == [5, 5]


def test_prefix_repetition_hits_the_prefix_cache(base_url, tmp_path):
    before = metric_values(base_url).get("vllm:prefix_cache_hits_total", 0)
    r = _bench(
        base_url,
        tmp_path,
        "--dataset-name",
        "prefix-repetition",
        "--num-prefixes",
        "2",
        "--prefix-len",
        "48",
        "--num-prompts",
        "6",
        "--input-len",
        "8",
        "--output-len",
        "2",
        "--max-concurrency",
        "1",
    )
    assert r["completed"] == 6 and r["input_lens"] == [56] * 6
    hits = metric_values(base_url)["vllm:prefix_cache_hits_total"] - before
    assert hits >= 4 * 32  # 4 requests repeat a prefix: at least its 2 full blocks of 16 tokens each


def test_arrival_gaps_mean_and_burstiness():
    from fleetserve.runtime.bench.serve import arrival_gaps

    rng = random.Random(0)
    poisson = arrival_gaps(20000, 10.0, 1.0, rng)
    bursty = arrival_gaps(20000, 10.0, 0.2, rng)
    regular = arrival_gaps(20000, 10.0, 5.0, rng)
    for gaps in (poisson, bursty, regular):
        assert statistics.fmean(gaps) == pytest.approx(0.1, rel=0.05)
    cv = [statistics.pstdev(g) / statistics.fmean(g) for g in (bursty, poisson, regular)]
    assert cv[0] > 1.5 and cv[1] == pytest.approx(1.0, abs=0.05) and cv[2] < 0.6
    assert arrival_gaps(3, float("inf"), 1.0, rng) == [0.0] * 3


def test_goodput_parsing_and_percentiles():
    from fleetserve.runtime.bench.serve import RequestResult, _percentile, parse_goodput, summarize

    assert parse_goodput(["ttft:200", "tpot:50"]) == {"ttft": 0.2, "tpot": 0.05}
    with pytest.raises(SystemExit):
        parse_goodput(["latency:5"])
    with pytest.raises(SystemExit):
        parse_goodput(["ttft:fast"])
    assert _percentile([1.0, 2.0, 3.0, 4.0], 50) == 2.5 and _percentile([5.0], 99) == 5.0
    rs = [
        RequestResult(ok=True, prompt_tokens=4, output_tokens=11, ttft=t, e2e=t + 1.0, itl=[0.1] * 10)
        for t in (0.1, 0.3)
    ]
    s = summarize(rs, 2.0, slos={"ttft": 0.2, "tpot": 0.2})
    assert s["request_goodput"] == 0.5 and s["mean_tpot_ms"] == pytest.approx(100.0)
