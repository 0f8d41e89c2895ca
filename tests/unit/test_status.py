"""Status tells a user what is happening, from what the cluster shows."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from llmep_operator.status import Observation, build_status, judge, ready_transition, status_patch

pytestmark = pytest.mark.unit

T0 = datetime(2026, 1, 1, tzinfo=UTC)
T1 = datetime(2026, 1, 2, tzinfo=UTC)


def _pod(name, node_type="worker", ready=False, unschedulable=None):
    conditions = [{"type": "Ready", "status": "True" if ready else "False"}]
    if unschedulable:
        conditions.append(
            {"type": "PodScheduled", "status": "False", "reason": "Unschedulable", "message": unschedulable}
        )
    return {"metadata": {"name": name, "labels": {"ray.io/node-type": node_type}}, "status": {"conditions": conditions}}


def _rayservice(ready=False, app_status=None, message=""):
    status = {"conditions": [{"type": "Ready", "status": "True" if ready else "False"}]}
    if app_status:
        status["activeServiceStatus"] = {"applicationStatuses": {"llm": {"status": app_status, "message": message}}}
    return {"metadata": {"name": "qwen"}, "status": status}


def _obs(**kw):
    base = dict(generation=3, models=["qwen", "chat"], url="http://qwen-serve.a.svc:8000/v1", min_replicas=1)
    base.update(kw)
    return Observation(**base)


def _cond(status, kind):
    return next(c for c in status["conditions"] if c["type"] == kind)


def test_unschedulable_gpu_worker_is_waiting_for_gpu_node_with_the_schedulers_words():
    message = "0/4 nodes are available: 4 Insufficient nvidia.com/gpu."
    status = build_status(
        _obs(rayservice=_rayservice(), pods=[_pod("head", "head", True), _pod("w1", unschedulable=message)]), None, T0
    )
    ready = _cond(status, "Ready")
    assert (ready["status"], ready["reason"]) == ("False", "WaitingForGPUNode")
    assert message in ready["message"] and "w1" in ready["message"]
    assert _cond(status, "Progressing")["status"] == "True"
    assert _cond(status, "Degraded")["status"] == "False"


def test_kuberay_ready_is_serving_with_replica_counts():
    pods = [_pod("head", "head", True), _pod("w1", ready=True), _pod("w2", ready=False)]
    status = build_status(_obs(rayservice=_rayservice(ready=True, app_status="RUNNING"), pods=pods), None, T0)
    assert (_cond(status, "Ready")["status"], _cond(status, "Ready")["reason"]) == ("True", "Serving")
    assert status["replicas"] == {"desired": 2, "ready": 1}
    assert status["url"] == "http://qwen-serve.a.svc:8000/v1"
    assert status["models"] == ["qwen", "chat"]
    assert status["observedGeneration"] == 3


def test_multi_node_replicas_count_whole_replicas():
    pods = [_pod(f"w{i}", ready=i < 3) for i in range(4)]
    status = build_status(_obs(rayservice=_rayservice(ready=True), pods=pods, workers_per_replica=2), None, T0)
    assert status["replicas"] == {"desired": 2, "ready": 1}


def test_scaled_to_zero_is_ready_with_its_own_reason():
    verdict = judge(
        _obs(
            rayservice=_rayservice(ready=True, app_status="RUNNING"), pods=[_pod("head", "head", True)], min_replicas=0
        )
    )
    assert verdict.ready and verdict.reason.value == "ScaledToZero"


def test_kuberay_ready_before_any_replica_is_loading_not_ready():
    """KubeRay marks the head ready once its HTTP ingress (HAProxy on the direct path) answers,
    before a model replica can: with minReplicas >= 1 that is not Ready yet."""
    pods = [_pod("head", "head", True), _pod("w1", ready=False)]
    status = build_status(_obs(rayservice=_rayservice(ready=True, app_status="DEPLOYING"), pods=pods), None, T0)
    ready = _cond(status, "Ready")
    assert (ready["status"], ready["reason"]) == ("False", "LoadingModel")
    assert _cond(status, "Progressing")["status"] == "True"
    assert status["replicas"] == {"desired": 1, "ready": 0}


def test_failed_application_is_degraded_with_serves_message():
    status = build_status(
        _obs(rayservice=_rayservice(app_status="DEPLOY_FAILED", message="CUDA out of memory")), None, T0
    )
    degraded = _cond(status, "Degraded")
    assert (degraded["status"], degraded["reason"]) == ("True", "BackendFailed")
    assert "CUDA out of memory" in degraded["message"]


def test_workers_up_but_app_not_running_is_loading_model():
    verdict = judge(_obs(rayservice=_rayservice(app_status="DEPLOYING"), pods=[_pod("w1", ready=True)]))
    assert (verdict.ready, verdict.reason.value) == (False, "LoadingModel")


def test_workers_started_but_not_ready_are_loading_model_with_the_pending_apps_message():
    """A Ray worker is Ready only once a Serve replica runs on it, so 'started' is the signal
    that the model loads; a first deploy's app status is under pendingServiceStatus."""
    worker = _pod("w1", ready=False)
    worker["status"]["phase"] = "Running"
    rayservice = _rayservice()
    rayservice["status"]["pendingServiceStatus"] = {
        "applicationStatuses": {"llm": {"status": "DEPLOYING", "message": "Deploying app 'llm'."}}
    }
    verdict = judge(_obs(rayservice=rayservice, pods=[_pod("head", "head", True), worker]))
    assert (verdict.ready, verdict.reason.value, verdict.message) == (False, "LoadingModel", "Deploying app 'llm'.")
    worker["status"]["phase"] = "Pending"  # its image is still being pulled
    verdict = judge(_obs(rayservice=rayservice, pods=[_pod("head", "head", True), worker]))
    assert (verdict.reason.value, verdict.message) == ("Deploying", "Deploying app 'llm'.")


def test_invalid_spec_sets_all_three_conditions_and_no_url():
    status = build_status(_obs(invalid="spec.resources.profile 'x' is not a profile"), None, T0)
    assert _cond(status, "Ready")["reason"] == "InvalidSpec"
    assert _cond(status, "Degraded")["status"] == "True"
    assert "url" not in status


def test_last_transition_time_moves_only_when_status_flips():
    obs = _obs(rayservice=_rayservice(), pods=[_pod("w1")])
    first = build_status(obs, None, T0)
    same = build_status(obs, first, T1)
    assert same == first  # nothing changed: nothing to write
    serving = build_status(_obs(rayservice=_rayservice(ready=True), pods=[_pod("w1", ready=True)]), first, T1)
    assert _cond(serving, "Ready")["lastTransitionTime"] == "2026-01-02T00:00:00Z"
    assert _cond(serving, "Degraded")["lastTransitionTime"] == "2026-01-01T00:00:00Z"


def test_events_only_on_ready_transitions():
    waiting = build_status(_obs(rayservice=_rayservice(), pods=[_pod("w", unschedulable="no gpu")]), None, T0)
    assert ready_transition(None, waiting)[:2] == ("Warning", "WaitingForGPUNode")
    assert ready_transition(waiting, waiting) is None
    serving = build_status(_obs(rayservice=_rayservice(ready=True), pods=[_pod("w", ready=True)]), waiting, T1)
    assert ready_transition(waiting, serving)[:2] == ("Normal", "Serving")


def test_a_spec_turned_invalid_patches_the_url_away():
    """A merge patch keeps every key it does not name: the stale url must be sent as null, or the
    gateway keeps holding requests for an endpoint that can no longer serve (instead of a 404)."""
    serving = build_status(_obs(rayservice=_rayservice(ready=True), pods=[_pod("w1", ready=True)]), None, T0)
    invalid = build_status(_obs(invalid="spec.resources.profile 'x' is not a profile"), serving, T1)
    patch = status_patch({**serving, "kopf": {"progress": {}}}, invalid)
    assert patch["url"] is None and patch["rayService"] is None
    assert "kopf" not in patch  # kopf's own bookkeeping is not ours to remove
    stored = _merge_patch(serving, patch)
    assert "url" not in stored and _cond(stored, "Ready")["reason"] == "InvalidSpec"


def test_an_unchanged_status_needs_no_patch():
    obs = _obs(rayservice=_rayservice(ready=True), pods=[_pod("w1", ready=True)])
    first = build_status(obs, None, T0)
    assert status_patch(first, build_status(obs, first, T1)) == {}


def _merge_patch(target: dict, patch: dict) -> dict:
    """RFC 7386 merge patch, as the API server applies it to status."""
    merged = dict(target)
    for key, value in patch.items():
        if value is None:
            merged.pop(key, None)
        elif isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merge_patch(merged[key], value)
        else:
            merged[key] = value
    return merged
