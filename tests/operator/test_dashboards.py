"""The Grafana dashboard and the Prometheus objects shipped with the chart.

Every query of charts/fleetserve/dashboards/fleetserve-runtime.json is checked against what the runtime
really exports (the sample names and labels of a live runtime/server/metrics.py registry), rate() only over
counters and histogram buckets, and its grouping labels against those the chart's ServiceMonitor/PodMonitor
produce. The monitors are rendered with the real helm binary and checked against the labels and named port
the operator puts on runtime pods and Services (operator/render.py).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml

from fleetserve.operator import render

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "charts" / "fleetserve"
DASHBOARD = CHART / "dashboards" / "fleetserve-runtime.json"
TARGET_LABELS = {"namespace", "pod", "inferenceservice"}  # added by the monitors (see monitoring.yaml)
METRIC = re.compile(r"vllm:[A-Za-z0-9_:]+")


def _exported() -> tuple[set[str], set[str], dict[str, str]]:
    """(sample names, label names, family type by sample name) of the runtime's /metrics."""
    from fleetserve.runtime.engine import EngineStats
    from fleetserve.runtime.server.metrics import ServerMetrics

    stats = EngineStats(1, 2, 0.5, 3, 4, 5, 6, 7)
    m = ServerMetrics("m", lambda: stats, lambda: 2, 4096)
    names, labels, kinds = set(), set(), {}
    for fam in m.registry.collect():
        for s in fam.samples:
            names.add(s.name)
            labels |= set(s.labels)
            kinds[s.name] = fam.type
    return names, labels, kinds


def _queries(dash: dict) -> list[str]:
    out = [t["expr"] for p in dash["panels"] for t in p["targets"]]
    out += [v["query"]["query"] for v in dash["templating"]["list"] if v["type"] == "query"]
    return out


def test_dashboard_queries_use_exported_metric_names_and_labels():
    dash = json.loads(DASHBOARD.read_text())
    names, labels, kinds = _exported()
    allowed_labels = labels | TARGET_LABELS
    queries = _queries(dash)
    assert len(queries) >= 15
    for q in queries:
        assert q.count("(") == q.count(")") and q.count("{") == q.count("}"), q
        used = METRIC.findall(q)
        assert used, q
        for name in used:
            assert name in names, f"{name} is not exported by the runtime: {q}"
        for m in re.finditer(r"\b(?:rate|increase)\((vllm:[A-Za-z0-9_:]+)", q):
            assert kinds[m.group(1)] == "counter" or m.group(1).endswith("_bucket"), q
        if "histogram_quantile" in q:
            assert re.search(r"_bucket\{", q) and "le" in re.search(r"by \(([^)]*)\)", q).group(1), q
        grouped = {ln.strip() for g in re.findall(r"by \(([^)]*)\)", q) for ln in g.split(",")}
        selected = set(re.findall(r"(\w+)=~?\"", q))
        label_values = re.findall(r"label_values\(.*,\s*(\w+)\)", q)
        for label in grouped | selected | set(label_values):
            assert label in allowed_labels | {"le"}, f"label {label} is neither exported nor added: {q}"


def test_dashboard_covers_the_serving_signals():
    dash = json.loads(DASHBOARD.read_text())
    exprs = " ".join(_queries(dash))
    for metric in (
        "vllm:time_to_first_token_seconds_bucket",
        "vllm:time_per_output_token_seconds_bucket",
        "vllm:inter_token_latency_seconds_bucket",
        "vllm:e2e_request_latency_seconds_bucket",
        "vllm:num_requests_waiting",
        "vllm:num_requests_running",
        "vllm:kv_cache_usage_perc",
        "vllm:generation_tokens_total",
        "vllm:prefix_cache_hits_total",
        "vllm:num_preemptions_total",
    ):
        assert metric in exprs, metric
    for q in ("0.5", "0.9", "0.99"):
        assert (
            f"histogram_quantile({q}, sum by (le, inferenceservice) (rate(vllm:time_to_first_token" in exprs
        )
    assert "by (inferenceservice, pod)" in exprs
    assert {v["name"] for v in dash["templating"]["list"]} == {
        "datasource",
        "namespace",
        "inferenceservice",
        "pod",
    }
    assert all(p["datasource"]["uid"] == "${datasource}" for p in dash["panels"])
    assert len({p["id"] for p in dash["panels"]}) == len(dash["panels"])


def _template(helm, *args):
    out = helm("template", "fs", str(CHART), "--namespace", "fleetserve-system", *args)
    return [d for d in yaml.safe_load_all(out) if d]


def test_monitors_and_dashboard_are_off_by_default(helm):
    kinds = {d["kind"] for d in _template(helm)}
    assert not kinds & {"ServiceMonitor", "PodMonitor"}
    assert not [d for d in _template(helm) if d["kind"] == "ConfigMap"]


@pytest.mark.parametrize("watch", [[], ["--set", "watchNamespaces={team-a,team-b}"]], ids=["all", "listed"])
def test_monitors_select_the_runtime_pods_the_operator_renders(helm, watch):
    on = [
        "--set",
        "metrics.serviceMonitor.enabled=true",
        "--set",
        "metrics.podMonitor.enabled=true",
        "--set",
        "metrics.serviceMonitor.labels.release=kps",
        "--set",
        "grafanaDashboard.enabled=true",
        *watch,
    ]
    helm("lint", "--strict", str(CHART), *on)
    docs = {d["kind"]: d for d in _template(helm, *on)}
    from fleetserve.operator.settings import OperatorSettings
    from fleetserve.operator.spec import parse_spec

    spec = parse_spec({"model": {"uri": "embedded"}})
    deploy = render.render_deployment("svc", "team-a", spec, OperatorSettings())
    service = render.render_service("svc", "team-a", spec)
    pod_meta = deploy["spec"]["template"]["metadata"]
    isvc_meta = "__meta_kubernetes_%s_label_" + re.sub(r"[^A-Za-z0-9_]", "_", render.ISVC_LABEL)
    for kind, obj, labels, endpoints, role in (
        ("ServiceMonitor", service, service["metadata"]["labels"], "endpoints", "service"),
        ("PodMonitor", deploy, pod_meta["labels"], "podMetricsEndpoints", "pod"),
    ):
        mon = docs[kind]
        assert mon["apiVersion"] == "monitoring.coreos.com/v1"
        assert mon["spec"]["selector"]["matchLabels"].items() <= labels.items()
        ns = mon["spec"]["namespaceSelector"]
        assert ns == ({"matchNames": ["team-a", "team-b"]} if watch else {"any": True})
        ep = mon["spec"][endpoints][0]
        ports = (
            obj["spec"]["ports"]
            if kind == "ServiceMonitor"
            else obj["spec"]["template"]["spec"]["containers"][0]["ports"]
        )
        assert ep["port"] in {p["name"] for p in ports} and ep["path"] == "/metrics"
        relabel = ep["relabelings"][0]
        assert relabel == {"sourceLabels": [isvc_meta % role], "targetLabel": "inferenceservice"}
    assert docs["ServiceMonitor"]["metadata"]["labels"]["release"] == "kps"
    # The annotation-based path: the runtime pods say where to scrape.
    ann = pod_meta["annotations"]
    port = deploy["spec"]["template"]["spec"]["containers"][0]["ports"][0]["containerPort"]
    assert (ann["prometheus.io/scrape"], ann["prometheus.io/port"], ann["prometheus.io/path"]) == (
        "true",
        str(port),
        "/metrics",
    )
    cm = docs["ConfigMap"]
    assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert json.loads(cm["data"]["fleetserve-runtime.json"]) == json.loads(DASHBOARD.read_text())
