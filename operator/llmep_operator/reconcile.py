"""One idempotent reconcile, the pass every change of an endpoint asks for; no kopf in here.

Flow: parse, plan and render (pure) -> compare each child with what the watches show (`Seen`)
and apply, by server-side apply, only those missing or different -> observe the RayService and
pods -> write status when it changed -> post an Event when Ready flipped. When no child changed
since it was last applied or checked, the pass renders nothing and only looks at status.

With cache.prefetch the fill Job comes first: the RayService is applied only once it has
succeeded, and never after it failed; while it runs, status shows the progress its pod logs.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass
from typing import Any

from kubernetes.client.exceptions import ApiException

from llmep_operator import fill, naming
from llmep_operator.api import API_VERSION, KIND, model_ids_of, parse_endpoint
from llmep_operator.errors import InvalidSpec, NotYet
from llmep_operator.kube import Kube
from llmep_operator.observed import Look, Seen, covers
from llmep_operator.render import make_plan
from llmep_operator.render.rayservice import children_for
from llmep_operator.settings import OperatorSettings
from llmep_operator.status import Fill, FillState, Observation, build_status, ready_transition, status_patch
from llmep_operator.worker_bounds import bounds_patch, cluster_names, wanted_bounds

log = logging.getLogger(__name__)
# Status writes tried when other writers keep changing the endpoint in between (409 each time).
STATUS_WRITE_ATTEMPTS = 5
# Children the operator watches, so a drift check can compare them from memory. A
# NetworkPolicy is not watched (the operator may not list them): it is applied again once per
# drift period.
WATCHED_KINDS = frozenset({"RayService", "Service", "PersistentVolumeClaim", "Job"})
JOB_API_VERSION = "batch/v1"

EndpointKey = tuple[str, str]  # (namespace, name)


@dataclass
class Desired:
    """What one generation of an endpoint asks for: its status facts and children, or why not."""

    observation: Observation
    children: list[dict[str, Any]] | None  # None: the spec cannot be served


def desired(body: dict[str, Any], settings: OperatorSettings) -> Desired:
    """Parse, plan and render; an invalid spec becomes an observation, not an exception, so status is written."""
    meta = body["metadata"]
    generation = meta.get("generation", 0)
    try:
        endpoint = parse_endpoint(body)
        plan = make_plan(endpoint, settings)
        children = children_for(plan, settings, owner_uid=meta.get("uid"))
    except InvalidSpec as error:
        return Desired(Observation(generation, model_ids_of(body), None, 0, invalid=str(error)), None)
    url = naming.service_url(plan.name, plan.namespace, settings.cluster_domain, settings.serve_port)
    observation = Observation(
        generation=generation,
        models=endpoint.model_ids,
        url=url,
        min_replicas=endpoint.spec.autoscaling.min_replicas,
        workers_per_replica=plan.workers_per_replica,
    )
    return Desired(observation, children)


@dataclass
class Checked:
    """The children of one generation of an endpoint as last applied or found equal to its spec:
    while the watched ones keep these resourceVersions nobody has changed them, and the spec need
    not be rendered again (rendering is most of a pass's cost)."""

    uid: str | None
    observation: Observation  # the generation's status facts (cluster fields unset)
    versions: dict[str, str]  # kind -> resourceVersion, watched kinds
    applied_at: dict[str, float]  # kind -> monotonic time, unwatched kinds
    fill_job: str | None = None  # the cache-fill Job's name, with cache.prefetch

    def is_for(self, body: dict[str, Any]) -> bool:
        """Whether `body` is the endpoint and generation this was checked for."""
        meta = body["metadata"]
        return (meta.get("uid"), meta.get("generation", 0)) == (self.uid, self.observation.generation)

    def still_holds(self, body: dict[str, Any], seen: Seen, now: float, period: float) -> bool:
        if not self.is_for(body):
            return False
        live = {kind: _version(child) for kind, child in seen.children.items()}
        if self.fill_job:
            live["Job"] = _version(seen.job(self.fill_job))
        due = any(now - at >= period for at in self.applied_at.values())
        return not due and all(live.get(kind) == version for kind, version in self.versions.items())


def _version(obj: dict[str, Any] | None) -> str | None:
    return ((obj or {}).get("metadata") or {}).get("resourceVersion")


class Reconciler:
    """Applies children and writes status for LLMEndpoints, reading the cluster through `look`.

    It remembers, per endpoint, the last status it wrote (the watch may not have delivered it
    yet), the children it checked (`Checked`) and the worker bounds it last gave the RayClusters."""

    def __init__(self, kube: Kube, settings: OperatorSettings, look: Look) -> None:
        self.kube = kube
        self.settings = settings
        self.look = look
        self._written: dict[EndpointKey, tuple[str | None, dict[str, Any]]] = {}  # (uid, status)
        self._checked: dict[EndpointKey, Checked] = {}
        self._bounds_synced: dict[EndpointKey, tuple[tuple[str, ...], dict[str, tuple[int, int]]]] = {}

    def forget(self, namespace: str, name: str) -> None:
        """The endpoint is gone: drop what was remembered for it."""
        for memory in (self._written, self._checked, self._bounds_synced):
            memory.pop((namespace, name), None)

    def is_current(self, body: dict[str, Any]) -> bool:
        """Whether this generation of the endpoint was already applied (or found invalid) here."""
        meta = body["metadata"]
        checked = self._checked.get((meta["namespace"], meta["name"]))
        return checked is not None and checked.is_for(body)

    def reconcile(self, body: dict[str, Any]) -> dict[str, Any] | None:
        """One pass: apply the children that are missing or differ from the spec, then bring the
        status to what the cluster shows; when no child changed since it was last applied or
        checked, only status is looked at.

        Raises InvalidSpec (after writing status and an Event) when the spec cannot be served,
        and NotYet when KubeRay is missing."""
        meta = body["metadata"]
        key = (meta["namespace"], meta["name"])
        checked = self._checked.get(key)
        seen = self.look(*key)
        if checked and checked.still_holds(body, seen, time.monotonic(), self.settings.drift_check_seconds):
            job = seen.job(checked.fill_job) if checked.fill_job else None
            obs = dataclasses.replace(
                checked.observation,
                rayservice=seen.rayservice,
                pods=seen.pods,
                fill=self._observe_fill(key[0], checked.fill_job, job, seen.pods),
            )
            if seen.rayservice:
                self._sync_worker_bounds(key, seen.rayservice)
            return self._write_status(body, obs)
        return self._apply_drifted(body, seen)

    def _apply_drifted(self, body: dict[str, Any], seen: Seen) -> dict[str, Any] | None:
        meta = body["metadata"]
        key = (meta["namespace"], meta["name"])
        wanted = desired(body, self.settings)
        obs = wanted.observation
        checked = Checked(meta.get("uid"), dataclasses.replace(obs), {}, {})
        if wanted.children is None:
            # Nothing is applied for a spec that cannot work: no half-built endpoint.
            self._checked[key] = checked
            self._write_status(body, obs)
            raise InvalidSpec(obs.invalid or "invalid spec")
        rayservice = seen.rayservice
        job: dict[str, Any] | None = None
        try:
            self._delete_other_fill_jobs(key[0], seen, wanted.children)
            for child in wanted.children:
                kind = child["kind"]
                if kind == "Job":
                    checked.fill_job = child["metadata"]["name"]
                    job = self._fill_job(child, seen)
                    checked.versions[kind] = _version(job) or ""
                    continue
                if kind == "RayService" and checked.fill_job and fill.job_state(job) is not FillState.COMPLETE:
                    continue  # the replicas would read an empty cache: applied once the fill succeeded
                live = seen.child(kind)
                if not (kind in WATCHED_KINDS and covers(live, child)):
                    live = self._apply(child)
                    if kind not in WATCHED_KINDS:
                        checked.applied_at[kind] = time.monotonic()
                if kind in WATCHED_KINDS:
                    checked.versions[kind] = _version(live) or ""
                if kind == "RayService":
                    rayservice = live
        except ApiException:
            # Refused (a quota, a policy): status still says what the cluster shows, e.g. a
            # RayService that is gone and cannot be created again; the caller retries.
            obs.rayservice, obs.pods = seen.rayservice, seen.pods
            self._write_status(body, obs)
            raise
        self._checked[key] = checked
        if rayservice:
            self._sync_worker_bounds(key, rayservice)
        obs.rayservice, obs.pods = rayservice, seen.pods
        obs.fill = self._observe_fill(key[0], checked.fill_job, job, seen.pods)
        return self._write_status(body, obs)

    def _fill_job(self, wanted: dict[str, Any], seen: Seen) -> dict[str, Any] | None:
        """The cache-fill Job as it is after this pass: created when missing. A Job's template is
        immutable, so one that no longer matches the spec (another image or Secret) and has not
        succeeded is deleted, and made again by the pass its deletion brings; None meanwhile."""
        live = seen.job(wanted["metadata"]["name"])
        if live is None:
            return self._apply(wanted)
        if covers(live, wanted) or fill.job_state(live) is FillState.COMPLETE:
            return live
        meta = wanted["metadata"]
        log.info("replacing the fill Job %s/%s: the spec changed its template", meta["namespace"], meta["name"])
        self.kube.delete(JOB_API_VERSION, "Job", meta["namespace"], meta["name"])
        return None

    def _delete_other_fill_jobs(self, namespace: str, seen: Seen, children: list[dict[str, Any]]) -> None:
        """Fill Jobs of an earlier source (or of a spec without prefetch) are the operator's to remove."""
        wanted = {c["metadata"]["name"] for c in children if c["kind"] == "Job"}
        for job in seen.fill_jobs():
            name = job["metadata"]["name"]
            if name not in wanted and not job["metadata"].get("deletionTimestamp"):
                log.info("deleting the fill Job %s/%s: the spec no longer asks for it", namespace, name)
                self.kube.delete(JOB_API_VERSION, "Job", namespace, name)

    def _observe_fill(
        self, namespace: str, name: str | None, job: dict[str, Any] | None, pods: list[dict[str, Any]]
    ) -> Fill | None:
        """The fill's state; while it runs, the progress its pod last logged (the one read a pass makes)."""
        if name is None:
            return None
        own = fill.fill_pods(name, pods)
        running = fill.running_pod(own) if fill.job_state(job) is FillState.RUNNING else None
        tail = None
        if running:
            try:
                tail = self.kube.pod_log_tail(namespace, running, lines=2)
            except ApiException as error:  # progress is a courtesy: status still says it downloads
                log.warning("no log of fill pod %s/%s: %s %s", namespace, running, error.status, error.reason)
        return fill.observe(job, own, tail)

    def _apply(self, child: dict[str, Any]) -> dict[str, Any]:
        try:
            return self.kube.apply(child)
        except ApiException as error:
            if error.status == 404 and child["kind"] == "RayService":
                missing = f"the RayService CRD ({naming.RAY_API_VERSION}) is not installed: install KubeRay first"
                raise NotYet(missing) from None
            raise

    def _sync_worker_bounds(self, key: EndpointKey, rayservice: dict[str, Any]) -> None:
        """Give the running RayClusters the RayService's worker bounds (KubeRay leaves them as they were)."""
        wanted = wanted_bounds(rayservice)
        names = tuple(cluster_names(rayservice))
        if not names or self._bounds_synced.get(key) == (names, wanted):
            return
        namespace = key[0]
        for name in names:
            cluster = self.kube.get(naming.RAY_API_VERSION, "RayCluster", namespace, name)
            ops = bounds_patch(cluster, wanted) if cluster else []
            if ops:
                log.info("setting worker bounds of RayCluster %s/%s: %s", namespace, name, ops)
                self.kube.json_patch(naming.RAY_API_VERSION, "RayCluster", namespace, name, ops)
        self._bounds_synced[key] = (names, wanted)

    def _observe_again(self, fresh: dict[str, Any], obs: Observation) -> Observation | None:
        """`obs` looked at again after `fresh` was read; None when `fresh` is a newer generation,
        whose children are its own reconcile's to apply and report: observedGeneration names only
        what was applied."""
        meta = fresh["metadata"]
        if meta.get("generation", 0) != obs.generation:
            return None
        seen = self.look(meta["namespace"], meta["name"])
        return dataclasses.replace(obs, rayservice=seen.rayservice, pods=seen.pods)

    def _last_status(self, body: dict[str, Any]) -> dict[str, Any]:
        """The newest status known for `body`'s generation: the one this process last wrote, which
        the watch may not have delivered yet, else the stored one."""
        meta = body["metadata"]
        stored: dict[str, Any] = body.get("status") or {}
        uid, written = self._written.get((meta["namespace"], meta["name"]), (None, None))
        newer = written is not None and written.get("observedGeneration", -1) >= stored.get("observedGeneration", -1)
        # An endpoint deleted and created again under the same name starts afresh.
        return written if newer and uid == meta.get("uid") and written is not None else stored

    def _current(self, namespace: str, name: str) -> dict[str, Any] | None:
        """The endpoint as stored now; None once it is gone or going."""
        body = self.kube.get(API_VERSION, KIND, namespace, name)
        return None if body is None or body["metadata"].get("deletionTimestamp") else body

    def _write_status(self, body: dict[str, Any], obs: Observation | None) -> dict[str, Any] | None:
        """Write the status `obs` gives, over the very version of the endpoint it was observed after.

        Passes over one endpoint never overlap here, but another writer (a former leader still
        finishing) may. Each write patches only the resourceVersion of the body it observed after;
        a 409 means another write got in between, so it reads the endpoint and looks again. Writes
        thus land in the order of their observations: neither observedGeneration nor Ready goes
        back. Returns the status written (or found equal), None when there was nothing to report."""
        attempt = 1
        while obs is not None:
            meta = body["metadata"]
            key = (meta["namespace"], meta["name"])
            old = self._last_status(body)
            new = build_status(obs, old)
            if not status_patch(old, new):
                return new
            stored = body.get("status") or {}
            try:
                self.kube.patch_status(*key, status_patch(stored, new), meta["resourceVersion"])
            except ApiException as error:
                if error.status != 409 or attempt == STATUS_WRITE_ATTEMPTS:
                    raise
                attempt += 1
                self._written.pop(key, None)  # the stored status is the one to build on now
                fresh = self._current(*key)
                if fresh is None:
                    return None
                body, obs = fresh, self._observe_again(fresh, obs)
                continue
            self._written[key] = (meta.get("uid"), new)
            transition = ready_transition(old, new)
            if transition:
                self.kube.post_event(body, *transition)
            return new
        return None
