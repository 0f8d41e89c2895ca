"""kopf wiring, and nothing else: each handler delegates to a kopf-free function.

Run with `kopf run -m llmep_operator.handlers` (or `llmep operator`).
"""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any, cast

import kopf
import urllib3
from kubernetes.client.exceptions import ApiException

from llmep_operator import naming
from llmep_operator.api import API_VERSION, GROUP, KIND, PLURAL, VERSION
from llmep_operator.errors import InvalidSpec, NotYet
from llmep_operator.kube import Kube
from llmep_operator.reconcile import reconcile, refresh_status
from llmep_operator.settings import OperatorSettings

SETTINGS = OperatorSettings()
_kube: Kube | None = None
# The endpoints kopf's watch has seen, latest body each: the drift loop's worklist. A kopf timer
# would do the same but forces a finalizer, which blocks deletion whenever the operator is down.
_known: dict[tuple[str | None, str], dict[str, Any]] = {}
log = logging.getLogger(__name__)
# Answers that mean the API server is away, restarting or overloaded, or that other status
# writers kept winning (409): retried soon. Every other answer is retried slowly, as any
# controller requeues: a restarting API server also answers 401/403 until its token and RBAC
# caches sync and 422 while its own loopback (Service IP allocation) is not up; for good, they
# mean a missing permission or an object the API refuses, which the server's message names.
_TRANSIENT_STATUS = {409, 429, 500, 502, 503, 504}
ApiError = (ApiException, urllib3.exceptions.HTTPError)


def _api_failure(error: ApiException | urllib3.exceptions.HTTPError) -> tuple[str, float]:
    """A one-line reason (never a traceback) and the seconds to wait before trying again."""
    if isinstance(error, urllib3.exceptions.HTTPError):  # refused, reset, timed out
        return f"API server unreachable: {type(error).__name__}", 5.0
    if error.status in _TRANSIENT_STATUS:
        return f"API server answered {error.status} {error.reason}", 5.0
    return f"API server answered {error.status} {error.reason}: {_server_message(error)}", 30.0


def _server_message(error: ApiException) -> str:
    """The Status message the API server gave (it names the field, verb or resource)."""
    try:
        return str(json.loads(error.body or "{}").get("message") or error.reason)
    except (ValueError, AttributeError):
        return str(error.reason)


def kube() -> Kube:
    global _kube
    if _kube is None:
        from llmep_operator.kube import BoundedApiClient, load_config

        _kube = Kube(SETTINGS.field_manager, BoundedApiClient(load_config(), SETTINGS.api_timeouts))
    return _kube


@kopf.on.startup()
def configure(settings: kopf.OperatorSettings, **_: Any) -> None:
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=naming.KOPF_PREFIX)
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
        prefix=naming.KOPF_PREFIX, key="last-handled-configuration"
    )
    settings.posting.level = logging.WARNING
    timeouts = SETTINGS.api_timeouts
    # Every request and watch of kopf's own is bounded too: a watch on a connection that went
    # silent ends (no bookmark within the inactivity bound, or its whole duration passed) and
    # resumes from its last resourceVersion.
    settings.networking.connect_timeout = timeouts.connect_seconds
    settings.networking.request_timeout = timeouts.request_seconds
    settings.watching.connect_timeout = timeouts.connect_seconds
    settings.watching.server_timeout = timeouts.watch_seconds
    settings.watching.client_timeout = timeouts.watch_seconds + timeouts.request_seconds
    settings.watching.inactivity_timeout = timeouts.watch_inactivity_seconds
    settings.execution.max_workers = 16


def _reconcile(body: kopf.Body) -> None:
    try:
        reconcile(dict(body), kube(), SETTINGS)
    except InvalidSpec as error:
        raise kopf.PermanentError(str(error)) from None
    except NotYet as error:
        raise kopf.TemporaryError(str(error), delay=error.delay) from None
    except ApiError as error:
        reason, delay = _api_failure(error)
        raise kopf.TemporaryError(reason, delay=delay) from None


@kopf.on.resume(GROUP, VERSION, PLURAL)
@kopf.on.create(GROUP, VERSION, PLURAL)
@kopf.on.update(GROUP, VERSION, PLURAL, field="spec")
def apply_endpoint(body: kopf.Body, **_: Any) -> None:
    _reconcile(body)


@kopf.on.event(GROUP, VERSION, PLURAL)
def track_endpoint(event: kopf.RawEvent, body: kopf.Body, namespace: str | None, name: str, **_: Any) -> None:
    if event.get("type") == "DELETED" or body.get("metadata", {}).get("deletionTimestamp"):
        _known.pop((namespace, name), None)
    else:
        _known[(namespace, name)] = dict(body)


@kopf.on.startup()
async def start_drift_loop(memo: kopf.Memo, **_: Any) -> None:
    memo.drift_loop = asyncio.create_task(_correct_drift_forever())


@kopf.on.cleanup()
async def stop_drift_loop(memo: kopf.Memo, **_: Any) -> None:
    task = memo.get("drift_loop")
    if task:
        task.cancel()


async def _correct_drift_forever() -> None:
    """Level-based: every period, re-apply every known endpoint's children and refresh status."""
    while True:
        await asyncio.sleep(SETTINGS.drift_check_seconds)
        for key, body in list(_known.items()):
            if key in _known:
                await asyncio.to_thread(_correct_drift, body)


def _correct_drift(body: dict[str, Any]) -> None:
    meta = body["metadata"]
    try:
        reconcile(body, kube(), SETTINGS)
    except (InvalidSpec, NotYet) as error:
        log.debug("drift check of %s/%s: %s", meta["namespace"], meta["name"], error)
    except ApiError as error:  # the next period tries again; nothing is half-applied by SSA
        log.warning("drift check of %s/%s failed: %s", meta["namespace"], meta["name"], _api_failure(error)[0])


@kopf.on.event(naming.RAY_GROUP, naming.RAY_VERSION, "rayservices", labels={naming.ENDPOINT_LABEL: kopf.PRESENT})
@kopf.on.event("", "v1", "services", labels={naming.ENDPOINT_LABEL: kopf.PRESENT})
def child_changed(event: kopf.RawEvent, labels: kopf.Labels, namespace: str | None, **_: Any) -> None:
    namespace = cast(str, namespace)  # namespaced kinds: kopf always passes the namespace
    try:
        if event.get("type") == "DELETED":
            # A deleted child is re-created now rather than at the next drift check.
            _resync(namespace, labels[naming.ENDPOINT_LABEL])
            return
        refresh_status(kube(), SETTINGS, namespace, labels[naming.ENDPOINT_LABEL])
    except ApiError as error:
        _skip(error, namespace, labels[naming.ENDPOINT_LABEL])


@kopf.on.event("", "v1", "pods", labels={naming.ENDPOINT_LABEL: kopf.PRESENT})
def pod_changed(labels: kopf.Labels, namespace: str | None, **_: Any) -> None:
    namespace = cast(str, namespace)  # namespaced kinds: kopf always passes the namespace
    try:
        refresh_status(kube(), SETTINGS, namespace, labels[naming.ENDPOINT_LABEL])
    except ApiError as error:
        _skip(error, namespace, labels[naming.ENDPOINT_LABEL])


def _skip(error: ApiException | urllib3.exceptions.HTTPError, namespace: str, name: str) -> None:
    """Events are not retried; the drift loop catches up once the API server is back."""
    if isinstance(error, ApiException) and error.status == 404:  # the endpoint went in between
        log.debug("status of %s/%s not refreshed: the endpoint is gone", namespace, name)
        return
    log.warning("status of %s/%s not refreshed: %s", namespace, name, _api_failure(error)[0])


def _resync(namespace: str, name: str) -> None:
    body = kube().get(API_VERSION, KIND, namespace, name)
    if body and not body["metadata"].get("deletionTimestamp"):
        try:
            reconcile(body, kube(), SETTINGS)
        except (InvalidSpec, NotYet) as error:
            log.info("not re-creating children of %s/%s: %s", namespace, name, error)
