"""/metrics parses with prometheus-client's parser and carries vLLM's names, types and labels."""

from __future__ import annotations

import urllib.request

from prometheus_client.parser import text_string_to_metric_families

from .conftest import metric_values, wait_for_idle

EXPECTED = {
    "vllm:num_requests_running": "gauge",
    "vllm:num_requests_waiting": "gauge",
    "vllm:kv_cache_usage_perc": "gauge",
    "vllm:prompt_tokens": "counter",
    "vllm:generation_tokens": "counter",
    "vllm:request_success": "counter",
    "vllm:num_preemptions": "counter",
    "vllm:prefix_cache_queries": "counter",
    "vllm:prefix_cache_hits": "counter",
    "vllm:time_to_first_token_seconds": "histogram",
    "vllm:inter_token_latency_seconds": "histogram",
    "vllm:e2e_request_latency_seconds": "histogram",
    "vllm:request_queue_time_seconds": "histogram",
    # beyond the required list: older / extra vLLM names dashboards use
    "vllm:gpu_cache_usage_perc": "gauge",
    "vllm:time_per_output_token_seconds": "histogram",
    "vllm:request_prompt_tokens": "histogram",
    "vllm:request_generation_tokens": "histogram",
    "vllm:request_prefill_time_seconds": "histogram",
    "vllm:request_decode_time_seconds": "histogram",
    "vllm:request_inference_time_seconds": "histogram",
}
# The sample names dashboards and KEDA queries use.
SAMPLES = [
    "vllm:num_requests_running",
    "vllm:num_requests_waiting",
    "vllm:kv_cache_usage_perc",
    "vllm:prompt_tokens_total",
    "vllm:generation_tokens_total",
    "vllm:request_success_total",
    "vllm:num_preemptions_total",
    "vllm:prefix_cache_queries_total",
    "vllm:prefix_cache_hits_total",
    "vllm:time_to_first_token_seconds_bucket",
    "vllm:inter_token_latency_seconds_bucket",
    "vllm:e2e_request_latency_seconds_bucket",
    "vllm:request_queue_time_seconds_bucket",
]


def _scrape(base_url):
    with urllib.request.urlopen(base_url + "/metrics", timeout=30) as r:
        assert r.headers["Content-Type"].startswith("text/plain")
        return r.read().decode()


def test_metrics_names_types_labels(base_url, model_name):
    families = {f.name: f for f in text_string_to_metric_families(_scrape(base_url))}
    for name, typ in EXPECTED.items():
        assert name in families, name
        assert families[name].type == typ, (name, families[name].type)
        for s in families[name].samples:
            assert s.labels.get("model_name") == model_name
    sample_names = {s.name for f in families.values() for s in f.samples}
    for name in SAMPLES:
        assert name in sample_names, name
    reasons = {s.labels["finished_reason"] for s in families["vllm:request_success"].samples}
    assert {"stop", "length", "abort"} <= reasons


def test_metrics_move_with_a_request(server, base_url, client, model_name):
    wait_for_idle(server)
    before = metric_values(base_url)
    prompt = "Metrics are counted in tokens, and this prompt has enough of them to fill whole KV blocks. " * 3
    r = client.completions.create(
        model=model_name, prompt=prompt, max_tokens=5, temperature=0, extra_body={"ignore_eos": True}
    )
    wait_for_idle(server)
    after = metric_values(base_url)

    def delta(name):
        return after.get(name, 0.0) - before.get(name, 0.0)

    assert delta("vllm:prompt_tokens_total") == r.usage.prompt_tokens
    assert delta("vllm:generation_tokens_total") == r.usage.completion_tokens == 5
    assert delta("vllm:request_success_total{finished_reason=length}") == 1
    assert delta("vllm:time_to_first_token_seconds_count") == 1
    assert delta("vllm:e2e_request_latency_seconds_count") == 1
    assert delta("vllm:request_queue_time_seconds_count") == 1
    assert delta("vllm:inter_token_latency_seconds_count") >= 1
    assert delta("vllm:request_prompt_tokens_sum") == r.usage.prompt_tokens
    assert delta("vllm:request_generation_tokens_sum") == 5
    for name in ("prefill", "decode", "inference"):
        assert delta(f"vllm:request_{name}_time_seconds_count") == 1
    assert delta("vllm:prefix_cache_queries_total") >= r.usage.prompt_tokens - 1
    assert after["vllm:num_requests_running"] == 0 and after["vllm:num_requests_waiting"] == 0
    assert after["vllm:kv_cache_usage_perc"] == 0
    # The same prompt again hits the prefix cache.
    client.completions.create(model=model_name, prompt=prompt, max_tokens=1, temperature=0)
    wait_for_idle(server)
    assert metric_values(base_url)["vllm:prefix_cache_hits_total"] > after["vllm:prefix_cache_hits_total"]
