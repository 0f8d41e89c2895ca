"""The cache-fill Job and its pods, read for status: done, failed (and why), or running (and how
far, from the last JSON line `llmep fetch` logged). Pure: the reconciler reads the log's tail."""

from __future__ import annotations

import json
from typing import Any

from llmep_operator.api.conditions import is_true
from llmep_operator.status import Fill, FillState, is_fill_pod, unschedulable_reason

JOB_NAME_LABEL = "batch.kubernetes.io/job-name"  # the Job controller's, on each of its pods
# A container that waits for one of these is on its way; any other reason is worth showing.
STARTING = {"ContainerCreating", "PodInitializing"}


def job_state(job: dict[str, Any] | None) -> FillState:
    status = (job or {}).get("status")
    if is_true(status, "Complete"):
        return FillState.COMPLETE
    if is_true(status, "Failed"):
        return FillState.FAILED
    return FillState.RUNNING


def fill_pods(job_name: str, pods: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [p for p in pods if is_fill_pod(p) and (p["metadata"].get("labels") or {}).get(JOB_NAME_LABEL) == job_name]


def _states(pod: dict[str, Any]) -> list[dict[str, Any]]:
    return [c.get("state") or {} for c in (pod.get("status") or {}).get("containerStatuses") or []]


def running_pod(pods: list[dict[str, Any]]) -> str | None:
    """The name of the fill pod whose container runs now (one at a time: parallelism 1)."""
    for pod in pods:
        if not pod["metadata"].get("deletionTimestamp") and any("running" in s for s in _states(pod)):
            return str(pod["metadata"]["name"])
    return None


def progress(log_tail: str) -> str | None:
    """The message of the last complete JSON progress line in the log's tail."""
    for line in reversed(log_tail.splitlines()):
        try:
            report = json.loads(line)
        except ValueError:
            continue
        message = report.get("message") if isinstance(report, dict) else None
        if isinstance(message, str):
            return message
    return None


def _waiting(pods: list[dict[str, Any]]) -> str:
    """Why no fill pod runs yet, in the scheduler's or the kubelet's words."""
    unscheduled = unschedulable_reason(pods)
    if unscheduled:
        return unscheduled
    for pod in pods:
        for state in _states(pod):
            waiting = state.get("waiting") or {}
            if waiting.get("reason") and waiting["reason"] not in STARTING:
                name = pod["metadata"].get("name", "the fill pod")
                return f"pod {name} cannot start: {waiting['reason']}: {waiting.get('message', '')}".rstrip(": ")
    return "starting the fill pod"


def _failure(job: dict[str, Any] | None, pods: list[dict[str, Any]]) -> str:
    """What the failed fill pod said (its termination message), else how it ended, else the Job's words."""
    ended = [t for pod in pods for s in _states(pod) if (t := s.get("terminated")) and t.get("exitCode")]
    for terminated in ended:
        # A killed pod's message is only its last log lines (FallbackToLogsOnError): progress.
        if (terminated.get("message") or "").strip() and terminated.get("reason") != "OOMKilled":
            return str(terminated["message"]).strip()
    if ended:
        return f"the fill pod ended with {ended[0].get('reason', 'Error')} (exit code {ended[0]['exitCode']})"
    conditions: list[dict[str, Any]] = ((job or {}).get("status") or {}).get("conditions") or []
    failed = next((c for c in conditions if c.get("type") == "Failed"), {})
    return str(failed.get("message") or failed.get("reason") or "the fill Job failed")


def observe(job: dict[str, Any] | None, pods: list[dict[str, Any]], log_tail: str | None) -> Fill:
    """The fill as status reports it. `pods` are the Job's own; `log_tail` the running one's, if read."""
    state = job_state(job)
    if state is FillState.COMPLETE:
        return Fill(state, "done")
    if state is FillState.FAILED:
        return Fill(state, _failure(job, pods))
    if job is None:
        return Fill(state, "creating the fill Job")
    if running_pod(pods) is None:
        if any(t.get("exitCode") == 0 for pod in pods for s in _states(pod) if (t := s.get("terminated"))):
            # The copy ended well; the Job controller has not marked the Job Complete yet.
            return Fill(state, "copied; the fill Job is completing")
        return Fill(state, _waiting(pods))
    return Fill(state, (log_tail and progress(log_tail)) or "started; no progress reported yet")
