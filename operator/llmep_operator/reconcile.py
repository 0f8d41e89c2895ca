"""One idempotent reconcile for create, update, resume and the drift timer; no kopf in here.

Flow: parse and plan (pure) -> apply every child with server-side apply -> observe the
RayService and pods -> write status when it changed -> post an Event when Ready flipped.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from kubernetes.client.exceptions import ApiException

from llmep_operator import naming
from llmep_operator.api import GROUP, KIND, VERSION, SpecError, parse_endpoint
from llmep_operator.errors import InvalidSpec, NotYet
from llmep_operator.kube import Kube
from llmep_operator.render import make_plan
from llmep_operator.render.rayservice import children_for
from llmep_operator.settings import OperatorSettings
from llmep_operator.status import Observation, build_status, ready_transition, status_patch
from llmep_operator.worker_bounds import bounds_patch, cluster_names, wanted_bounds

log = logging.getLogger(__name__)
# Status writes tried when other writers keep changing the endpoint in between (409 each time).
STATUS_WRITE_ATTEMPTS = 5


def _observation(body: dict[str, Any], settings: OperatorSettings) -> tuple[Observation, list[dict[str, Any]] | None]:
    """Parse and plan; an invalid spec becomes an observation, not an exception, so status is written."""
    meta = body["metadata"]
    generation = meta.get("generation", 0)
    try:
        endpoint = parse_endpoint(body)
        plan = make_plan(endpoint, settings)
        children = children_for(plan, settings, owner_uid=meta.get("uid"))
    except (SpecError, InvalidSpec, naming.NameTooLong) as error:
        models = [(body.get("spec", {}).get("model", {}) or {}).get("servedName") or meta["name"]]
        return Observation(generation, models, None, 0, invalid=str(error)), None
    url = naming.service_url(plan.name, plan.namespace, settings.cluster_domain, settings.serve_port)
    obs = Observation(
        generation=generation,
        models=endpoint.model_ids,
        url=url,
        min_replicas=endpoint.spec.autoscaling.min_replicas,
        workers_per_replica=plan.workers_per_replica,
    )
    return obs, children


def _observe_cluster(
    kube: Kube, obs: Observation, namespace: str, name: str, rayservice: dict[str, Any] | None = None
) -> None:
    rayservice_name = naming.rayservice_name(name)
    obs.rayservice = rayservice or kube.get(naming.RAY_API_VERSION, "RayService", namespace, rayservice_name)
    obs.pods = kube.pods_of(namespace, name)


def _sync_worker_bounds(kube: Kube, rayservice: dict[str, Any]) -> None:
    """Give the running RayClusters the RayService's worker bounds (KubeRay leaves them as they were)."""
    namespace = rayservice["metadata"]["namespace"]
    wanted = wanted_bounds(rayservice)
    for name in cluster_names(rayservice):
        cluster = kube.get(naming.RAY_API_VERSION, "RayCluster", namespace, name)
        ops = bounds_patch(cluster, wanted) if cluster else []
        if ops:
            log.info("setting worker bounds of RayCluster %s/%s: %s", namespace, name, ops)
            kube.json_patch(naming.RAY_API_VERSION, "RayCluster", namespace, name, ops)


def _current(kube: Kube, namespace: str, name: str) -> dict[str, Any] | None:
    """The endpoint as stored now; None once it is gone or going."""
    body = kube.get(f"{GROUP}/{VERSION}", KIND, namespace, name)
    return None if body is None or body["metadata"].get("deletionTimestamp") else body


def _observe(
    kube: Kube,
    settings: OperatorSettings,
    body: dict[str, Any],
    applied_generation: int | None,
    rayservice: dict[str, Any] | None = None,
) -> Observation | None:
    """What the cluster shows for `body`, looked at after `body` was read; None when this writer
    has nothing to report for body's generation.

    `applied_generation` is the generation whose children this writer applied; a refresh (None)
    reports on the generation the status already names. A newer generation's children are its
    reconcile's to report: observedGeneration names only what was applied. An invalid spec is
    reported for the generation that has it."""
    meta = body["metadata"]
    obs, children = _observation(body, settings)
    if children is None:
        return obs
    reported = applied_generation
    if reported is None:
        reported = (body.get("status") or {}).get("observedGeneration")
    if reported != obs.generation:
        return None
    _observe_cluster(kube, obs, meta["namespace"], meta["name"], rayservice)
    return obs


def _write_status(
    kube: Kube,
    body: dict[str, Any],
    obs: Observation | None,
    observe_again: Callable[[dict[str, Any]], Observation | None],
) -> dict[str, Any] | None:
    """Write the status `obs` gives, over the very version of the endpoint it was observed after.

    Handlers, child events and the drift loop all write status. Each reads the endpoint before
    it looks at the cluster and patches only that resourceVersion; a 409 means another write got
    in between, so it reads and looks again. Writes thus land in the order of their observations:
    neither observedGeneration nor Ready goes back. Returns the status written (or found equal),
    None when there was nothing to report."""
    attempt = 1
    while obs is not None:
        meta = body["metadata"]
        old = body.get("status") or {}
        new = build_status(obs, old)
        patch = status_patch(old, new)
        if not patch:
            return new
        try:
            kube.patch_status(meta["namespace"], meta["name"], patch, meta["resourceVersion"])
        except ApiException as error:
            if error.status != 409 or attempt == STATUS_WRITE_ATTEMPTS:
                raise
            attempt += 1
            fresh = _current(kube, meta["namespace"], meta["name"])
            if fresh is None:
                return None
            body, obs = fresh, observe_again(fresh)
            continue
        transition = ready_transition(old, new)
        if transition:
            kube.post_event(body, *transition)
        return new
    return None


def reconcile(body: dict[str, Any], kube: Kube, settings: OperatorSettings) -> dict[str, Any] | None:
    """Bring the children to the spec and the status to what the cluster shows.

    Raises InvalidSpec (after writing status and an Event) when the spec cannot be served,
    and NotYet when KubeRay is missing.
    """
    meta = body["metadata"]
    obs, children = _observation(body, settings)
    generation = obs.generation

    def observe_again(fresh: dict[str, Any]) -> Observation | None:
        return _observe(kube, settings, fresh, generation)

    if children is None:
        # Nothing is applied for a spec that cannot work: no half-built endpoint.
        _write_status(kube, body, obs, observe_again)
        raise InvalidSpec(obs.invalid or "invalid spec")
    applied_rayservice = None
    for child in children:
        try:
            result = kube.apply(child)
        except ApiException as error:
            if error.status == 404 and child["kind"] == "RayService":
                missing = f"the RayService CRD ({naming.RAY_API_VERSION}) is not installed: install KubeRay first"
                raise NotYet(missing) from None
            raise
        if child["kind"] == "RayService":
            applied_rayservice = result
    if applied_rayservice:
        _sync_worker_bounds(kube, applied_rayservice)
    _observe_cluster(kube, obs, meta["namespace"], meta["name"], applied_rayservice)
    return _write_status(kube, body, obs, observe_again)


def refresh_status(kube: Kube, settings: OperatorSettings, namespace: str, name: str) -> dict[str, Any] | None:
    """Recompute status after a child changed, without applying anything."""
    body = _current(kube, namespace, name)
    if body is None:
        return None

    def observe_again(fresh: dict[str, Any]) -> Observation | None:
        return _observe(kube, settings, fresh, None)

    return _write_status(kube, body, observe_again(body), observe_again)
