"""Unit tests of the operator's pure parts: autoscaler windows, status reasons, apply diffs,
Prometheus parsing, and the download step's cache-hit skip."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from fleetserve.operator import autoscaler, render
from fleetserve.operator.apply import is_subset, merge, removals
from fleetserve.operator.memo import OperatorMemo
from fleetserve.operator.metrics import RateTracker, parse_prometheus, sample_from_text
from fleetserve.operator.settings import OperatorSettings
from fleetserve.operator.spec import Autoscaling, parse_spec
from fleetserve.operator.status import Observation, compute, merge_conditions, pod_view

# --- autoscaler ----------------------------------------------------------------------------------------


def cfg(**kw) -> Autoscaling:
    base = dict(
        minReplicas=1,
        maxReplicas=10,
        targetQueueDepth=4,
        scaleUpStabilizationSeconds=0,
        scaleDownStabilizationSeconds=0,
        cooldownSeconds=0,
    )
    return Autoscaling(**{**base, **kw})


@pytest.mark.parametrize("load,expected", [(0, 1), (1, 1), (4, 1), (5, 2), (16, 4), (17, 5), (1000, 10)])
def test_recommend_is_ceil_of_load_over_target_clamped(load, expected):
    assert autoscaler.recommend(load, cfg()) == expected


def test_recommend_scale_to_zero_only_when_allowed():
    assert autoscaler.recommend(0, cfg(minReplicas=0, scaleToZero=True)) == 0
    assert autoscaler.recommend(3, cfg(minReplicas=0, scaleToZero=True)) == 1


def test_scale_up_waits_for_the_up_window_and_takes_its_minimum():
    c, h = cfg(scaleUpStabilizationSeconds=30), autoscaler.History()
    assert autoscaler.decide(0, 1, 20, 0, c, h).desired == 1  # 5 wanted, window not yet observed
    assert autoscaler.decide(10, 1, 8, 0, c, h).desired == 1  # 2 wanted
    d = autoscaler.decide(30, 1, 40, 0, c, h)  # 10 wanted; window min over [0, 30] is 2
    assert d.recommended == 10 and d.desired == 2


def test_scale_down_takes_the_highest_recommendation_of_the_window():
    c, h = cfg(scaleDownStabilizationSeconds=60), autoscaler.History()
    assert autoscaler.decide(0, 8, 12, 0, c, h).desired == 8  # 3 wanted: window not observed yet
    assert autoscaler.decide(30, 8, 20, 0, c, h).desired == 8  # 5 wanted
    d = autoscaler.decide(60, 8, 0, 0, c, h)  # 1 wanted; max over the window is 5
    assert d.desired == 5
    assert autoscaler.decide(125, 5, 0, 0, c, h).desired == 1  # the lull lasted a whole window


def test_cooldown_blocks_changes_after_a_scale():
    c, h = cfg(cooldownSeconds=60), autoscaler.History()
    d = autoscaler.decide(0, 1, 40, 0, c, h)
    assert d.desired == 10 and d.changes
    autoscaler.record_change(h, 0)
    assert autoscaler.decide(30, 10, 0, 0, c, h).desired == 10
    assert autoscaler.decide(61, 10, 0, 0, c, h).desired == 1


def test_bounds_are_enforced_even_without_metrics():
    c, h = cfg(maxReplicas=3), autoscaler.History()
    assert autoscaler.decide(0, 7, 0, 0, c, h, load_known=False).desired == 3
    assert autoscaler.decide(0, 2, 0, 0, c, h, load_known=False).desired == 2


# --- status --------------------------------------------------------------------------------------------


def _pod(name="p", ready=True, init=None, containers=None, conditions=None, ip="10.0.0.1", template=None):
    annotations = {render.TEMPLATE_HASH: template} if template else {}
    return pod_view(
        {
            "metadata": {"name": name, "annotations": annotations},
            "spec": {"containers": [{"name": "runtime", "ports": [{"name": "http", "containerPort": 8000}]}]},
            "status": {
                "podIP": ip,
                "phase": "Running",
                "conditions": (conditions or [])
                + [{"type": "Ready", "status": "True" if ready else "False"}],
                "initContainerStatuses": init or [],
                "containerStatuses": containers or [],
            },
        }
    )


def _obs(pods, spec=None, target=1, deployment=None, cached=False, error=None, **previous):
    spec = parse_spec(spec or {"model": {"uri": "hf://o/m"}}) if error is None else None
    return Observation(
        spec=spec,
        spec_error=error,
        target_replicas=target,
        deployment=deployment,
        pods=tuple(pods),
        metrics=None,
        model_cached_before=cached,
        **previous,
    )


def _cond(status, type_):
    return next(c for c in status["conditions"] if c["type"] == type_)


def test_metrics_url_from_the_pods_own_port_and_address():
    assert _pod().metrics_url == "http://10.0.0.1:8000/metrics"
    assert _pod(ip="fd00::5").metrics_url == "http://[fd00::5]:8000/metrics"


def test_download_states_drive_model_cached_and_phase():
    running = _pod(ready=False, init=[{"name": "model-download", "state": {"running": {}}}])
    st = compute(_obs([running]))
    assert _cond(st, "ModelCached")["reason"] == "Downloading" and st["phase"] == "Downloading"
    done = _pod(ready=False, init=[{"name": "model-download", "state": {"terminated": {"exitCode": 0}}}])
    st = compute(_obs([done]))
    assert _cond(st, "ModelCached")["status"] == "True" and st["phase"] == "Loading"
    failed = _pod(
        ready=False,
        init=[
            {
                "name": "model-download",
                "restartCount": 3,
                "state": {"waiting": {"reason": "CrashLoopBackOff"}},
                "lastState": {"terminated": {"exitCode": 1, "message": "401 gated repo"}},
            }
        ],
    )
    st = compute(_obs([failed]))
    assert (
        _cond(st, "Degraded")["reason"] == "ModelDownloadFailed"
        and "401 gated repo" in _cond(st, "Degraded")["message"]
    )
    assert st["phase"] == "Degraded"


@pytest.mark.parametrize(
    "containers,reason",
    [
        (
            [{"name": "runtime", "state": {"waiting": {"reason": "CrashLoopBackOff"}}, "restartCount": 5}],
            "CrashLoopBackOff",
        ),
        (
            [{"name": "runtime", "state": {"waiting": {"reason": "ErrImagePull", "message": "not found"}}}],
            "ImagePullError",
        ),
        (
            [
                {
                    "name": "runtime",
                    "state": {
                        "waiting": {
                            "reason": "CreateContainerConfigError",
                            "message": 'secret "hf" not found',
                        }
                    },
                }
            ],
            "ContainerConfigError",
        ),
    ],
)
def test_container_failures_are_degraded(containers, reason):
    st = compute(_obs([_pod(ready=False, containers=containers)], spec={}))
    assert _cond(st, "Degraded")["reason"] == reason
    assert _cond(st, "Ready")["status"] == "False"


def test_unschedulable_without_gpu_vs_other_reasons():
    gpu = _pod(
        ready=False,
        ip=None,
        conditions=[
            {
                "type": "PodScheduled",
                "status": "False",
                "reason": "Unschedulable",
                "message": "0/1 nodes are available: 1 Insufficient nvidia.com/gpu.",
            }
        ],
    )
    assert _cond(compute(_obs([gpu], spec={})), "Degraded")["reason"] == "InsufficientGPU"
    mem = _pod(
        ready=False,
        ip=None,
        conditions=[
            {
                "type": "PodScheduled",
                "status": "False",
                "reason": "Unschedulable",
                "message": "0/1 nodes are available: 1 Insufficient memory.",
            }
        ],
    )
    assert _cond(compute(_obs([mem], spec={})), "Degraded")["reason"] == "Unschedulable"


def test_stuck_rollout_and_scaled_to_zero():
    dep = {
        "status": {
            "conditions": [
                {
                    "type": "Progressing",
                    "status": "False",
                    "reason": "ProgressDeadlineExceeded",
                    "message": "ReplicaSet has timed out progressing.",
                }
            ]
        }
    }
    st = compute(_obs([], spec={}, deployment=dep))
    assert _cond(st, "Degraded")["reason"] == "ProgressDeadlineExceeded"
    assert _cond(st, "Progressing")["status"] == "False"
    st = compute(_obs([], spec={}, target=0, deployment={"status": {}}))
    assert st["phase"] == "ScaledToZero" and _cond(st, "Ready")["reason"] == "ScaledToZero"


def test_deployment_template_carries_a_digest_of_itself():
    spec = parse_spec({})
    a = render.render_deployment("m", "ns", spec, OperatorSettings())
    digest = a["spec"]["template"]["metadata"]["annotations"][render.TEMPLATE_HASH]
    assert len(digest) == 16
    assert render.render_deployment("m", "ns", spec, OperatorSettings()) == a  # deterministic
    scaled = render.render_deployment("m", "ns", parse_spec({"replicas": 3}), OperatorSettings())
    assert scaled["spec"]["template"] == a["spec"]["template"]  # scaling is not a rollout
    other = render.render_deployment("m", "ns", parse_spec({"engine": {"maxNumSeqs": 7}}), OperatorSettings())
    assert other["spec"]["template"]["metadata"]["annotations"][render.TEMPLATE_HASH] != digest


def _dep(template="h1", replicas=2):
    return {
        "spec": {
            "replicas": replicas,
            "template": {"metadata": {"annotations": {render.TEMPLATE_HASH: template}}},
        },
        "status": {"replicas": replicas},
    }


def test_lost_replica_is_degraded_until_its_replacement_is_ready():
    """Killed/evicted/unready outside a rollout: Degraded (ReplicaLost), still Ready while one serves."""
    steady = compute(
        _obs(
            [_pod("a", template="h1"), _pod("b", template="h1")],
            spec={},
            target=2,
            deployment=_dep(),
            previous_ready={"a": "h1", "b": "h1"},
        )
    )
    assert steady["phase"] == "Ready" and _cond(steady, "Degraded")["status"] == "False"

    # b killed: gone from the pods, its replacement c starting
    st = compute(
        _obs(
            [_pod("a", template="h1"), _pod("c", ready=False, template="h1")],
            spec={},
            target=2,
            deployment=_dep(),
            previous_ready={"a": "h1", "b": "h1"},
        )
    )
    deg = _cond(st, "Degraded")
    assert st["phase"] == "Degraded" and deg["reason"] == "ReplicaLost" and "b" in deg["message"]
    assert "1/2 replicas ready" in deg["message"]
    assert _cond(st, "Ready")["status"] == "True" and _cond(st, "Available")["status"] == "False"

    # the next observation: nothing newly lost, but still short -> stays Degraded
    st = compute(
        _obs(
            [_pod("a", template="h1"), _pod("c", ready=False, template="h1")],
            spec={},
            target=2,
            deployment=_dep(),
            previous_ready={"a": "h1"},
            previous_degraded_reason="ReplicaLost",
        )
    )
    assert st["phase"] == "Degraded" and _cond(st, "Degraded")["reason"] == "ReplicaLost"

    # replacement ready -> Ready again
    st = compute(
        _obs(
            [_pod("a", template="h1"), _pod("c", template="h1")],
            spec={},
            target=2,
            deployment=_dep(),
            previous_ready={"a": "h1"},
            previous_degraded_reason="ReplicaLost",
        )
    )
    assert st["phase"] == "Ready" and _cond(st, "Degraded")["status"] == "False"

    # the only replica lost: Degraded with Ready=False (not merely Loading)
    st = compute(
        _obs(
            [_pod("c", ready=False, template="h1")],
            spec={},
            target=1,
            deployment=_dep(replicas=1),
            previous_ready={"a": "h1"},
        )
    )
    assert st["phase"] == "Degraded" and _cond(st, "Ready")["status"] == "False"
    # a readiness failure counts too (the pod is there but stopped serving)
    st = compute(
        _obs(
            [_pod("a", ready=False, template="h1")],
            spec={},
            target=1,
            deployment=_dep(replicas=1),
            previous_ready={"a": "h1"},
        )
    )
    assert _cond(st, "Degraded")["reason"] == "ReplicaLost"


def test_rollouts_and_scale_downs_are_not_lost_replicas():
    # rollout (maxUnavailable 1): an old-template pod went away on purpose, the new one is loading
    st = compute(
        _obs(
            [_pod("a", template="h1"), _pod("n", ready=False, template="h2")],
            spec={},
            target=2,
            deployment=_dep("h2"),
            previous_ready={"a": "h1", "b": "h1"},
        )
    )
    assert _cond(st, "Degraded")["status"] == "False" and st["phase"] == "Ready"
    # Recreate: all old pods gone before the new ones exist
    st = compute(_obs([], spec={}, target=1, deployment=_dep("h2", 1), previous_ready={"a": "h1"}))
    assert _cond(st, "Degraded")["status"] == "False" and st["phase"] == "Pending"
    # a rollout that starts while degraded clears ReplicaLost (Progressing tells the rollout)
    st = compute(
        _obs(
            [_pod("a", template="h1"), _pod("n", ready=False, template="h2")],
            spec={},
            target=2,
            deployment=_dep("h2"),
            previous_ready={"a": "h1"},
            previous_degraded_reason="ReplicaLost",
        )
    )
    assert _cond(st, "Degraded")["status"] == "False"
    # scale-down 2 -> 1: one ready pod left is the target
    st = compute(
        _obs(
            [_pod("a", template="h1")],
            spec={},
            target=1,
            deployment=_dep(replicas=1),
            previous_ready={"a": "h1", "b": "h1"},
        )
    )
    assert st["phase"] == "Ready"
    # scale-up: short of the new target, nothing lost
    st = compute(
        _obs(
            [_pod("a", template="h1"), _pod("c", ready=False, template="h1")],
            spec={},
            target=2,
            deployment=_dep(),
            previous_ready={"a": "h1"},
        )
    )
    assert st["phase"] == "Ready"
    # a Deployment from before the digest existed: no claim either way
    st = compute(
        _obs([], spec={}, target=1, deployment={"spec": {}, "status": {}}, previous_ready={"a": None})
    )
    assert _cond(st, "Degraded")["status"] == "False"


def test_invalid_spec_is_failed():
    st = compute(_obs([], error="spec.autoscaling: bad"))
    assert st["phase"] == "Failed" and _cond(st, "Ready")["reason"] == "InvalidSpec"


def test_condition_transition_time_kept_while_status_unchanged():
    old = [{"type": "Ready", "status": "True", "lastTransitionTime": "T0"}]
    same = merge_conditions(
        old, [{"type": "Ready", "status": "True", "reason": "Serving", "message": ""}], 2, now="T1"
    )
    flipped = merge_conditions(
        old, [{"type": "Ready", "status": "False", "reason": "x", "message": ""}], 2, now="T1"
    )
    assert same[0]["lastTransitionTime"] == "T0" and flipped[0]["lastTransitionTime"] == "T1"
    assert same[0]["observedGeneration"] == 2


# --- apply ---------------------------------------------------------------------------------------------


def test_removals_null_dropped_keys_and_lists_are_replaced():
    old = {"spec": {"nodeSelector": {"a": "1", "b": "2"}, "tolerations": [{"key": "x"}], "keep": 1}}
    new = {"spec": {"nodeSelector": {"a": "1"}, "keep": 1}}
    assert removals(old, new) == {"spec": {"nodeSelector": {"b": None}, "tolerations": None}}
    assert merge(new, removals(old, new))["spec"]["nodeSelector"] == {"a": "1", "b": None}


def test_is_subset_ignores_server_defaults_and_quantity_spelling():
    want = {
        "spec": {"replicas": 1, "resources": {"cpu": "1000m", "memory": "1024Mi"}, "ports": [{"port": 80}]}
    }
    have = {
        "spec": {
            "replicas": 1,
            "resources": {"cpu": "1", "memory": "1Gi"},
            "ports": [{"port": 80, "protocol": "TCP"}],
            "dnsPolicy": "ClusterFirst",
        }
    }
    assert is_subset(want, have)
    assert not is_subset({"spec": {"replicas": 2}}, have)
    assert not is_subset({"spec": {"ports": [{"port": 80}, {"port": 81}]}}, have)


# --- metrics -------------------------------------------------------------------------------------------

PROM = """# HELP vllm:num_requests_waiting Number of requests waiting.
# TYPE vllm:num_requests_waiting gauge
vllm:num_requests_waiting{model_name="m"} 3.0
vllm:num_requests_running{model_name="m"} 2
vllm:kv_cache_usage_perc{model_name="m"} 0.25
vllm:generation_tokens_total{model_name="m"} 100
vllm:e2e_request_latency_seconds_bucket{le="+Inf",model_name="m"} 7
process_cpu_seconds_total 1.5e+01
"""


def test_parse_prometheus_and_rates():
    m = parse_prometheus(PROM)
    assert m["vllm:num_requests_waiting"] == 3 and m["vllm:kv_cache_usage_perc"] == 0.25
    assert m["process_cpu_seconds_total"] == 15
    tracker = RateTracker()
    assert tracker.rates(sample_from_text("p", PROM, now=0.0)) == (None, None)
    later = PROM.replace(
        'generation_tokens_total{model_name="m"} 100', 'generation_tokens_total{model_name="m"} 300'
    )
    assert tracker.rates(sample_from_text("p", later, now=2.0)) == (None, 100.0)
    restarted = PROM.replace("} 100", "} 5")
    assert tracker.rates(sample_from_text("p", restarted, now=3.0))[1] is None  # counter reset


# --- render: the download step -------------------------------------------------------------------------


def _run_download(tmp_path, dest):
    fake = tmp_path / "fakehub"
    (fake / "huggingface_hub").mkdir(parents=True, exist_ok=True)
    (fake / "huggingface_hub" / "__init__.py").write_text(
        "import os\n"
        "def snapshot_download(repo_id, revision, local_dir, allow_patterns=None):\n"
        "    open(os.environ['CALLS'], 'a').write(f'{repo_id}@{revision} {allow_patterns}\\n')\n"
        "    open(os.path.join(local_dir, 'config.json'), 'w').write('{}')\n"
    )
    calls = tmp_path / "calls.txt"
    spec = parse_spec({"model": {"uri": "hf://org/model@rev1"}})
    pod = render.render_deployment("x", "ns", spec, OperatorSettings())["spec"]["template"]["spec"]
    init = pod["initContainers"][0]
    cmd = [sys.executable if c == "python" else c for c in init["command"]]
    cmd[cmd.index("/models/hf/org/model/rev1")] = str(dest)
    env = {**os.environ, "PYTHONPATH": str(fake), "CALLS": str(calls)}
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=60, check=True).stdout
    return out, calls.read_text().splitlines() if calls.exists() else []


def test_download_runs_once_then_the_marker_skips_it(tmp_path):
    dest = tmp_path / "cache" / "hf" / "org" / "model" / "rev1"
    out, calls = _run_download(tmp_path, dest)
    assert calls == ["org/model@rev1 None"] and "download complete" in out
    assert (dest / render.MARKER_FILE).exists() and (dest / "config.json").exists()
    out, calls = _run_download(tmp_path, dest)
    assert calls == ["org/model@rev1 None"]  # not called again
    assert "model cache hit" in out


def test_model_paths_and_flags():
    s = parse_spec(
        {"model": {"uri": "hf://org/m-GGUF", "ggufFile": "m.Q4.gguf"}, "engine": {"maxNumSeqs": 4}}
    )
    args = render.serve_args("svc", s)
    assert args[0] == "/models/hf/org/m-GGUF/main/m.Q4.gguf"
    assert args[args.index("--served-model-name") + 1] == "svc" and "--enable-prefix-caching" in args
    assert render.model_path(parse_spec({"model": {"uri": "pvc://weights/a/b"}})) == "/mnt/model-source/a/b"
    assert render.model_path(parse_spec({})) is None
    cpu = render.render_deployment("x", "ns", parse_spec({}), OperatorSettings())
    assert "initContainers" not in cpu["spec"]["template"]["spec"]
    assert cpu["spec"]["strategy"]["rollingUpdate"] == {"maxSurge": 1, "maxUnavailable": 0}
    env = cpu["spec"]["template"]["spec"]["containers"][0]["env"]
    assert {"name": "HF_HUB_OFFLINE", "value": "1"} in env


# --- entry point and settings -----------------------------------------------------------------------------


def test_python_m_entry_point_runs_kopf_with_the_environment(monkeypatch):
    import kopf

    from fleetserve.operator import __main__ as entry
    from fleetserve.operator import main

    calls = {}
    monkeypatch.setattr(kopf, "run", lambda **kw: calls.update(kw))
    monkeypatch.setattr(kopf, "configure", lambda **kw: calls.update(configure=kw))
    monkeypatch.setattr(main, "SETTINGS", OperatorSettings.from_env({"FLEETSERVE_NAMESPACES": "a, b"}))
    monkeypatch.setenv("FLEETSERVE_LOG_LEVEL", "debug")
    entry.run()
    assert calls["namespaces"] == ("a", "b") and calls["clusterwide"] is False and calls["standalone"] is True
    assert calls["liveness_endpoint"].endswith(":8080/healthz") and calls["configure"]["debug"] is True
    assert isinstance(calls["memo"], OperatorMemo)
    # With a peering (the chart's replicaCount > 1): kopf peering, mandatory, and a random priority per process,
    # since kopf pauses *every* operator when two share one.
    priorities = set()
    for _ in range(2):
        calls.clear()
        monkeypatch.setattr(main, "SETTINGS", OperatorSettings.from_env({"FLEETSERVE_PEERING": "fs"}))
        entry.run()
        assert calls["standalone"] is False and calls["peering_name"] == "fs" and calls["clusterwide"] is True
        priorities.add(calls["priority"])
    assert len(priorities) == 2


def test_memo_copies_share_operator_state_but_not_per_object_state():
    """kopf gives every InferenceService copy.copy(root memo)."""
    import copy

    root = OperatorMemo(api=object(), pdb_api="policy/v1")
    a, b = copy.copy(root), copy.copy(root)
    assert a.api is root.api and a.settings is root.settings and a.pdb_api == "policy/v1"
    assert a.apply_lock is not b.apply_lock and a.rates is not b.rates and a.history is not b.history
    a.ready_pods["p"] = "h"
    a.apply_error = "409 Conflict"
    assert b.ready_pods == {} and b.apply_error is None and root.ready_pods == {}


def test_settings_from_env():
    s = OperatorSettings.from_env(
        {
            "FLEETSERVE_RUNTIME_IMAGE": "r/rt:1",
            "FLEETSERVE_METRICS_INTERVAL": "2.5",
            "FLEETSERVE_CLUSTER_DOMAIN": "corp.local",
        }
    )
    assert s.runtime_image == "r/rt:1" and s.metrics_interval == 2.5 and s.namespaces == ()
    assert render.service_url("a", "b", s) == "http://a.b.svc.corp.local"


def test_hf_endpoint_reaches_the_download_step_only():
    spec = parse_spec({"model": {"uri": "hf://org/m@v1"}})
    s = OperatorSettings.from_env({"FLEETSERVE_HF_ENDPOINT": "http://hub-mirror.internal"})
    pod = render.render_deployment("x", "ns", spec, s)["spec"]["template"]["spec"]
    init_env = {e["name"]: e.get("value") for e in pod["initContainers"][0]["env"]}
    assert init_env["HF_ENDPOINT"] == "http://hub-mirror.internal"
    assert "HF_ENDPOINT" not in {e["name"] for e in pod["containers"][0]["env"]}
    default = render.render_deployment("x", "ns", spec, OperatorSettings())["spec"]["template"]["spec"]
    assert "HF_ENDPOINT" not in {e["name"] for e in default["initContainers"][0]["env"]}


# --- status is built through the model the CRD status schema is generated from -------------------------


def test_status_model_and_crd_status_schema_have_the_same_fields():
    from fleetserve.operator import crd
    from fleetserve.operator.spec import Condition, InferenceServiceStatus

    root = crd.build_crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    status = root["properties"]["status"]
    assert set(status["properties"]) == set(InferenceServiceStatus.model_fields)
    assert set(status["properties"]["conditions"]["items"]["properties"]) == set(Condition.model_fields)
    assert set(status["properties"]["phase"]["enum"]) >= {"Pending", "Ready", "Degraded", "Failed"}


def test_status_fields_refuse_what_the_schema_would_prune():
    from fleetserve.operator.status import status_fields

    assert status_fields({"phase": "Ready", "queueDepth": 3}) == {"phase": "Ready", "queueDepth": 3}
    with pytest.raises(ValueError, match="queue_depth"):
        status_fields({"queue_depth": 3})
    with pytest.raises(ValueError):
        status_fields({"phase": "Serving"})
    with pytest.raises(ValueError):
        status_fields({"conditions": [{"type": "Ready", "status": "yes"}]})


_LOAD_ERROR = (
    "fleetserve serve failed to start: ModelLoadError: model '/models/nope' not found: not a directory, "
    "a .gguf file or a preset (llama-3.1-8b, llama-3.2-1b), nor a Hub name (org/name)"
)


def test_runtime_startup_error_reaches_the_status_conditions():
    """The runtime's termination message (its start-up error) is the Degraded and Ready condition message,
    whether the container is in CrashLoopBackOff (message in lastState) or just exited (message in state)."""
    looping = _pod(
        ready=False,
        containers=[
            {
                "name": "runtime",
                "restartCount": 2,
                "state": {"waiting": {"reason": "CrashLoopBackOff"}},
                "lastState": {"terminated": {"exitCode": 1, "reason": "Error", "message": _LOAD_ERROR}},
            }
        ],
    )
    exited = _pod(
        ready=False,
        containers=[
            {
                "name": "runtime",
                "restartCount": 0,
                "state": {"terminated": {"exitCode": 1, "reason": "Error", "message": _LOAD_ERROR}},
            }
        ],
    )
    for pod, reason in ((looping, "CrashLoopBackOff"), (exited, "RuntimeFailed")):
        st = compute(_obs([pod], spec={"model": {"uri": "file:///models/nope"}}))
        degraded = _cond(st, "Degraded")
        assert degraded["status"] == "True" and degraded["reason"] == reason
        assert "model '/models/nope' not found" in degraded["message"], degraded
        assert "model '/models/nope' not found" in _cond(st, "Ready")["message"]
        assert st["phase"] == "Degraded"
    # A log tail (FallbackToLogsOnError) keeps its end, where the error is; a clean exit says nothing.
    tail = "x" * 5000 + " ValueError: the real error"
    long = _pod(
        ready=False,
        containers=[
            {
                "name": "runtime",
                "state": {"waiting": {"reason": "CrashLoopBackOff"}},
                "lastState": {"terminated": {"exitCode": 1, "message": tail}},
            }
        ],
    )
    msg = _cond(compute(_obs([long], spec={})), "Degraded")["message"]
    assert msg.endswith("ValueError: the real error") and len(msg) < 800
    ok = _pod(
        ready=False,
        containers=[
            {
                "name": "runtime",
                "state": {"running": {}},
                "lastState": {"terminated": {"exitCode": 0, "message": "bye"}},
            }
        ],
    )
    assert _cond(compute(_obs([ok], spec={})), "Degraded")["status"] == "False"


def test_runtime_container_reports_errors_through_its_termination_message():
    spec = parse_spec({"model": {"uri": "file:///models/nope"}})
    c = render.render_deployment("svc", "ns", spec, OperatorSettings())["spec"]["template"]["spec"][
        "containers"
    ][0]
    assert c["terminationMessagePolicy"] == "FallbackToLogsOnError"
    assert c.get("terminationMessagePath", "/dev/termination-log") == "/dev/termination-log"
