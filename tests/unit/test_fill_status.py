"""What a user reads in status while cache.prefetch's Job fills the cache: the progress `llmep
fetch` logs, why the fill pod cannot start, why the fill failed; and that Ray's status and
replica counts never mistake the fill pod for a Ray pod."""

from __future__ import annotations

import json

import pytest

from llmep_operator.fill import observe, progress
from llmep_operator.status import Fill, FillState, Observation, build_status, look_again_in, replica_counts

pytestmark = pytest.mark.unit
JOB = "qwen-fill-1a1188c7"
FILL_LABELS = {
    "llmep.io/endpoint": "qwen",
    "app.kubernetes.io/component": "weights-fill",
    "batch.kubernetes.io/job-name": JOB,
}
LINE = {
    "phase": "downloading",
    "bytes": 13207024435,
    "total": 150323855360,
    "bytesPerSecond": 325058560,
    "etaSeconds": 421,
    "message": "12.3 of 140.0 GiB, 310 MiB/s, about 7 min",
}
FAILED = "bucket 'x' does not exist (s3://x/m): check spec.model.source"


def _job(condition: str | None = None, message: str = "") -> dict:
    conditions = [{"type": condition, "status": "True", "message": message}] if condition else []
    return {"metadata": {"name": JOB}, "status": {"conditions": conditions}}


def _fill_pod(name: str = f"{JOB}-abcde", state: dict | None = None, conditions: list | None = None) -> dict:
    status: dict = {"conditions": conditions or []}
    if state is not None:
        status["containerStatuses"] = [{"name": "fill", "state": state}]
    return {"metadata": {"name": name, "labels": dict(FILL_LABELS)}, "status": status}


def _cond(status: dict, kind: str) -> dict:
    return next(c for c in status["conditions"] if c["type"] == kind)


def _status(fill: Fill, rayservice: dict | None = None, pods: list | None = None) -> dict:
    obs = Observation(
        generation=2,
        models=["qwen"],
        url="http://u/v1",
        min_replicas=1,
        rayservice=rayservice,
        fill=fill,
        pods=pods or [],
    )
    return build_status(obs, None)


def test_progress_is_the_message_of_the_last_complete_json_line():
    older = {**LINE, "message": "1.0 of 140.0 GiB"}
    tail = json.dumps(older) + "\n" + json.dumps(LINE) + "\n"
    assert progress(tail) == LINE["message"]
    # A line cut short, or one some library printed, is passed over.
    assert progress(json.dumps(LINE) + '\n{"phase": "downl') == LINE["message"]
    assert progress(json.dumps(LINE) + "\nWARNING: something else\n") == LINE["message"]
    assert progress("no json here\n") is None


def test_a_running_fill_says_downloading_weights_with_its_progress_and_asks_for_another_look():
    pod = _fill_pod(state={"running": {"startedAt": "2026-01-01T00:00:00Z"}})
    fill = observe(_job(), [pod], json.dumps(LINE) + "\n")
    status = _status(fill)
    ready = _cond(status, "Ready")
    assert (ready["status"], ready["reason"]) == ("False", "DownloadingWeights")
    assert ready["message"] == "downloading weights into the cache: 12.3 of 140.0 GiB, 310 MiB/s, about 7 min"
    assert _cond(status, "Progressing")["status"] == "True"
    assert _cond(status, "Degraded")["status"] == "False"
    assert look_again_in(status) == 5.0


def test_a_fill_pod_that_cannot_start_says_why():
    waiting = {"waiting": {"reason": "CreateContainerConfigError", "message": 'secret "s3-credentials" not found'}}
    fill = observe(_job(), [_fill_pod(state=waiting)], None)
    assert fill.state is FillState.RUNNING
    assert 'CreateContainerConfigError: secret "s3-credentials" not found' in fill.detail
    unscheduled = [{"type": "PodScheduled", "status": "False", "reason": "Unschedulable", "message": "unbound PVC"}]
    fill = observe(_job(), [_fill_pod(conditions=unscheduled)], None)
    assert "cannot be scheduled: unbound PVC" in fill.detail


def test_a_fill_pod_that_copied_before_its_job_is_complete_says_so_not_starting():
    ended = {"terminated": {"exitCode": 0, "reason": "Completed"}}
    fill = observe(_job(), [_fill_pod(state=ended)], None)
    assert (fill.state, fill.detail) == (FillState.RUNNING, "copied; the fill Job is completing")


def test_a_failed_fill_is_backend_failed_with_the_pods_termination_message_and_no_more_looks():
    ended = {"terminated": {"exitCode": 1, "reason": "Error", "message": FAILED}}
    fill = observe(_job("Failed", "Job has reached the specified backoff limit"), [_fill_pod(state=ended)], None)
    status = _status(fill)
    ready, degraded = _cond(status, "Ready"), _cond(status, "Degraded")
    assert (ready["status"], ready["reason"]) == ("False", "BackendFailed")
    assert (degraded["status"], degraded["reason"]) == ("True", "BackendFailed")
    assert degraded["message"] == f"filling the cache failed: {FAILED}"
    assert look_again_in(status) is None


def test_a_failed_fill_without_a_message_says_how_it_ended_or_what_the_job_says():
    killed = {"terminated": {"exitCode": 137, "reason": "OOMKilled", "message": json.dumps(LINE)}}
    fill = observe(_job("Failed", "BackoffLimitExceeded"), [_fill_pod(state=killed)], None)
    assert fill.detail == "the fill pod ended with OOMKilled (exit code 137)"
    fill = observe(_job("Failed", "Job was active longer than specified deadline"), [], None)
    assert fill.detail == "Job was active longer than specified deadline"


def test_a_complete_fill_hands_over_to_the_ray_status():
    status = _status(observe(_job("Complete"), [], None))
    assert _cond(status, "Ready")["reason"] == "Reconciling"  # the RayService comes next
    assert look_again_in(status) is None


def test_a_refill_beside_a_serving_rayservice_keeps_ready_and_shows_progress_in_progressing():
    """A new source fills while the RayService of the earlier one serves: no outage in status."""
    rayservice = {"metadata": {"name": "qwen"}, "status": {"conditions": [{"type": "Ready", "status": "True"}]}}
    worker = {
        "metadata": {"name": "w1", "labels": {"ray.io/node-type": "worker"}},
        "status": {"conditions": [{"type": "Ready", "status": "True"}]},
    }
    status = _status(Fill(FillState.RUNNING, "1.0 of 2.0 GiB"), rayservice, [worker])
    assert _cond(status, "Ready")["status"] == "True"
    progressing = _cond(status, "Progressing")
    assert (progressing["status"], progressing["reason"]) == ("True", "DownloadingWeights")
    assert progressing["message"] == "downloading weights into the cache: 1.0 of 2.0 GiB"


def test_the_fill_pod_is_no_replica_and_no_gpu_worker_waiting():
    unscheduled = [{"type": "PodScheduled", "status": "False", "reason": "Unschedulable", "message": "no RWX"}]
    obs = Observation(
        generation=1,
        models=["qwen"],
        url="u",
        min_replicas=1,
        rayservice={"metadata": {"name": "qwen"}, "status": {}},
        pods=[_fill_pod(conditions=unscheduled), _fill_pod("done", state={"running": {}})],
        fill=Fill(FillState.COMPLETE, "done"),
    )
    assert replica_counts(obs) == (0, 0)
    assert _cond(build_status(obs, None), "Ready")["reason"] == "Deploying"
