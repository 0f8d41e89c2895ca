"""Status from what the cluster shows: pure functions from observations to conditions.

No `phase` state machine: each cycle derives Ready, Progressing and Degraded afresh from the
RayService, the cache-fill Job and the endpoint's pods, and keeps `lastTransitionTime` only when
a status flips.
"""

from __future__ import annotations

import dataclasses
import enum
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from llmep_operator import naming
from llmep_operator.api import ConditionType, Reason
from llmep_operator.api.conditions import condition, is_true

READY, PROGRESSING, DEGRADED = ConditionType.READY.value, ConditionType.PROGRESSING.value, ConditionType.DEGRADED.value
APP_FAILED = {"DEPLOY_FAILED", "UNHEALTHY"}
WARNING_REASONS = {Reason.INVALID_SPEC, Reason.WAITING_FOR_GPU_NODE, Reason.BACKEND_FAILED}
# While weights download only the fill pod's log moves, which no watch sees: look this often.
FILL_POLL_SECONDS = 5.0


class FillState(enum.Enum):
    RUNNING = "running"
    COMPLETE = "complete"
    FAILED = "failed"


@dataclass(frozen=True)
class Fill:
    """The cache-fill Job (cache.prefetch) as seen: its state, and the progress it reports or why
    it waits (running) or why it failed."""

    state: FillState
    detail: str


@dataclass
class Observation:
    """What one reconcile cycle saw for an endpoint."""

    generation: int
    models: list[str]
    url: str | None
    min_replicas: int
    workers_per_replica: int = 1
    invalid: str | None = None
    rayservice: dict[str, Any] | None = None
    pods: list[dict[str, Any]] = field(default_factory=list)
    fill: Fill | None = None  # None without cache.prefetch


@dataclass(frozen=True, kw_only=True)
class Verdict:
    """Ready with its reason and message, and what Progressing and Degraded say beside it."""

    ready: bool
    reason: Reason
    message: str
    progressing: bool = False
    progressing_reason: Reason = Reason.AS_EXPECTED
    degraded: bool = False
    degraded_reason: Reason = Reason.AS_EXPECTED
    degraded_message: str = ""
    progressing_message: str = ""  # when Progressing says something other than Ready's message


def _on_the_way(reason: Reason, message: str) -> Verdict:
    """Not ready yet, and progressing for the same reason."""
    return Verdict(ready=False, reason=reason, message=message, progressing=True, progressing_reason=reason)


def _failed(reason: Reason, message: str, *, ready: bool = False) -> Verdict:
    """Degraded (and not progressing) for `reason`; Ready as the cluster shows it."""
    return Verdict(
        ready=ready,
        reason=reason,
        message=message,
        progressing_reason=reason,
        degraded=True,
        degraded_reason=reason,
        degraded_message=message,
    )


def _is_worker(pod: dict[str, Any]) -> bool:
    return (pod.get("metadata", {}).get("labels") or {}).get("ray.io/node-type") == "worker"


def is_fill_pod(pod: dict[str, Any]) -> bool:
    return (pod.get("metadata", {}).get("labels") or {}).get(naming.COMPONENT_LABEL) == naming.FILL_COMPONENT


def _pod_ready(pod: dict[str, Any]) -> bool:
    return is_true(pod.get("status"), "Ready")


def _pod_running(pod: dict[str, Any]) -> bool:
    """Its containers have started (a Ray worker is Ready only once a Serve replica runs on it)."""
    return _pod_ready(pod) or (pod.get("status") or {}).get("phase") == "Running"


def unschedulable_reason(pods: list[dict[str, Any]]) -> str | None:
    """The scheduler's own words for the first pod it could not place."""
    for pod in pods:
        cond = condition(pod.get("status"), "PodScheduled")
        if cond.get("status") == "False" and cond.get("reason") == "Unschedulable":
            name = pod.get("metadata", {}).get("name", "a pod")
            return f"pod {name} cannot be scheduled: {cond.get('message', 'no node fits')}"
    return None


def replica_counts(obs: Observation) -> tuple[int, int]:
    """(desired, ready) model replicas, from the worker pods that carry them."""
    workers = [p for p in obs.pods if _is_worker(p) and not p.get("metadata", {}).get("deletionTimestamp")]
    per = max(obs.workers_per_replica, 1)
    ready = sum(1 for p in workers if _pod_ready(p))
    return len(workers) // per, ready // per


def _app_status(rayservice: dict[str, Any]) -> tuple[str, str]:
    """The Serve application's status and message: the serving cluster's, else (a first deploy,
    which KubeRay reports as pending until it serves) the pending cluster's."""
    status = rayservice.get("status") or {}
    apps = [
        (status.get(side) or {}).get("applicationStatuses") or {}
        for side in ("activeServiceStatus", "pendingServiceStatus")
    ]
    app: dict[str, Any] = next((found for found in (a.get(naming.APP_NAME) for a in apps) if found), {})
    message = app.get("message", "")
    for name, deployment in (app.get("serveDeploymentStatuses") or {}).items():
        if deployment.get("message") and not message:
            message = f"{name}: {deployment['message']}"
    return app.get("status", ""), message


def _serving(rayservice: dict[str, Any] | None) -> bool:
    status = (rayservice or {}).get("status") or {}
    return is_true(status, "Ready") or status.get("serviceStatus") == "Running"


def judge(obs: Observation) -> Verdict:
    if obs.invalid:
        return _failed(Reason.INVALID_SPEC, obs.invalid)
    fill = obs.fill
    if fill is not None and fill.state is FillState.FAILED:
        # Nothing is applied after a failed fill; what already runs (an earlier source) goes on.
        return _failed(
            Reason.BACKEND_FAILED, f"filling the cache failed: {fill.detail}", ready=_serving(obs.rayservice)
        )
    if fill is not None and fill.state is FillState.RUNNING:
        downloading = f"downloading weights into the cache: {fill.detail}"
        if obs.rayservice is None:
            return _on_the_way(Reason.DOWNLOADING_WEIGHTS, downloading)
        # A new source fills while the RayService of the earlier one keeps serving.
        return dataclasses.replace(
            _judge_cluster(obs),
            progressing=True,
            progressing_reason=Reason.DOWNLOADING_WEIGHTS,
            progressing_message=downloading,
        )
    return _judge_cluster(obs)


def _judge_cluster(obs: Observation) -> Verdict:
    """What the RayService and the Ray pods show."""
    if obs.rayservice is None:
        return _on_the_way(Reason.RECONCILING, "creating the RayService")

    _, ready_replicas = replica_counts(obs)
    pending = unschedulable_reason([p for p in obs.pods if not is_fill_pod(p)])
    app_status, app_message = _app_status(obs.rayservice)
    serving = _serving(obs.rayservice)

    if app_status in APP_FAILED:
        message = f"Ray Serve application is {app_status}: {app_message}".rstrip(": ")
        return _failed(Reason.BACKEND_FAILED, message, ready=serving)
    if serving and ready_replicas == 0 and obs.min_replicas > 0:
        # KubeRay marks the head ready as soon as its HTTP ingress answers, before any model
        # replica can: Ready waits for a replica, unless the endpoint may scale to zero.
        message = app_message or "the Ray cluster answers; no model replica is ready yet"
        return _on_the_way(Reason.LOADING_MODEL, message)
    if serving:
        scaled_to_zero = ready_replicas == 0 and obs.min_replicas == 0
        reason = Reason.SCALED_TO_ZERO if scaled_to_zero else Reason.SERVING
        message = (
            "no replica is running; the next request starts one"
            if scaled_to_zero
            else f"{ready_replicas} replica(s) serving"
        )
        if pending:  # scaling up, but a new GPU worker has nowhere to go
            waiting = Reason.WAITING_FOR_GPU_NODE
            return Verdict(ready=True, reason=reason, message=message, progressing=True, progressing_reason=waiting)
        return Verdict(ready=True, reason=reason, message=message)
    if pending:
        return _on_the_way(Reason.WAITING_FOR_GPU_NODE, pending)
    workers = [p for p in obs.pods if _is_worker(p)]
    if workers and all(_pod_running(p) for p in workers):
        return _on_the_way(Reason.LOADING_MODEL, app_message or "workers are up; Ray Serve is loading the model")
    message = app_message or (
        f"Ray Serve application is {app_status}" if app_status else "waiting for the Ray cluster to start"
    )
    return _on_the_way(Reason.DEPLOYING, message)


def _merge_condition(
    old: list[dict[str, Any]], kind: str, status: bool, reason: Reason, message: str, generation: int, now: str
) -> dict[str, Any]:
    value = "True" if status else "False"
    previous = next((c for c in old if c.get("type") == kind), None)
    changed = previous is None or previous.get("status") != value
    return {
        "type": kind,
        "status": value,
        "reason": reason.value,
        "message": message[:32_000],
        "lastTransitionTime": now if changed or previous is None else previous.get("lastTransitionTime", now),
        "observedGeneration": generation,
    }


def build_status(obs: Observation, old_status: dict[str, Any] | None, now: datetime | None = None) -> dict[str, Any]:
    """The whole new status; equal to the old one when nothing changed."""
    old_status = old_status or {}
    old_conditions = old_status.get("conditions") or []
    stamp = (now or datetime.now(UTC)).strftime("%Y-%m-%dT%H:%M:%SZ")
    verdict = judge(obs)
    desired, ready = replica_counts(obs)
    conditions = [
        _merge_condition(old_conditions, READY, verdict.ready, verdict.reason, verdict.message, obs.generation, stamp),
        _merge_condition(
            old_conditions,
            PROGRESSING,
            verdict.progressing,
            verdict.progressing_reason,
            (verdict.progressing_message or verdict.message) if verdict.progressing else "",
            obs.generation,
            stamp,
        ),
        _merge_condition(
            old_conditions,
            DEGRADED,
            verdict.degraded,
            verdict.degraded_reason,
            verdict.degraded_message,
            obs.generation,
            stamp,
        ),
    ]
    status: dict[str, Any] = {
        "observedGeneration": obs.generation,
        "conditions": conditions,
        "models": obs.models,
        "replicas": {"desired": desired, "ready": ready},
    }
    if obs.url and not obs.invalid:
        status["url"] = obs.url
        status["rayService"] = obs.rayservice["metadata"]["name"] if obs.rayservice else None
    return {k: v for k, v in status.items() if v is not None}


def status_patch(old_status: dict[str, Any] | None, new_status: dict[str, Any]) -> dict[str, Any]:
    """The merge patch from the stored status to `new_status`; {} when they are equal.

    A key the new status no longer has (`url` once the spec is invalid) is sent as null, the only
    way a merge patch removes it; kopf's own `kopf` key is left alone."""
    old_status = old_status or {}
    patch = {k: v for k, v in new_status.items() if old_status.get(k) != v}
    patch.update({k: None for k in old_status if k not in new_status and k != "kopf"})
    return patch


def look_again_in(status: dict[str, Any] | None) -> float | None:
    """Seconds after which to look at the endpoint again though nothing it watches changed: while
    weights download, so the progress in status moves; else None."""
    progressing = condition(status, PROGRESSING)
    downloading = (progressing.get("status"), progressing.get("reason")) == ("True", Reason.DOWNLOADING_WEIGHTS)
    return FILL_POLL_SECONDS if downloading else None


def ready_transition(old_status: dict[str, Any] | None, new_status: dict[str, Any]) -> tuple[str, str, str] | None:
    """(event type, reason, message) when Ready's status or reason changed, else None."""

    old, new = condition(old_status, READY), condition(new_status, READY)
    if (old.get("status"), old.get("reason")) == (new.get("status"), new.get("reason")):
        return None
    reason = Reason(new["reason"])
    return ("Warning" if reason in WARNING_REASONS else "Normal", reason.value, new.get("message", ""))
