"""kopf wiring, and nothing else: each handler delegates to a kopf-free function.

Run with `kopf run -m llmep_operator.handlers` (or `llmep operator`).

What the operator watches (its LLMEndpoints, their labelled children, cache-fill Jobs and pods)
is kept in kopf indexes, so an event costs no API call. Every change (a new endpoint or spec generation, a child
or pod event, the drift timer) asks for one pass over its endpoint; passes coalesce per endpoint
and retry on their own (and come again every few seconds while weights download, whose progress
only the fill pod's log shows), so the operator needs none of kopf's change-tracking annotations.
Settings, the API client and the reconciler are made at startup and live in kopf's memo.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import logging
from typing import Any

import kopf
import urllib3
from kubernetes.client.exceptions import ApiException

from llmep_operator import naming
from llmep_operator.api import GROUP, PLURAL, VERSION
from llmep_operator.coalesce import Coalescer
from llmep_operator.errors import InvalidSpec, NotYet
from llmep_operator.kube import BoundedApiClient, Kube, load_config
from llmep_operator.observed import Seen, slim, slim_child, slim_pod, whole
from llmep_operator.reconcile import EndpointKey, Reconciler
from llmep_operator.settings import OperatorSettings
from llmep_operator.status import look_again_in

log = logging.getLogger(__name__)
# Answers that mean the API server is away, restarting or overloaded, or that other status
# writers kept winning (409): retried soon. Every other answer is retried slowly, as any
# controller requeues: a restarting API server also answers 401/403 until its token and RBAC
# caches sync and 422 while its own loopback (Service IP allocation) is not up; for good, they
# mean a missing permission or an object the API refuses, which the server's message names.
_TRANSIENT_STATUS = {409, 429, 500, 502, 503, 504}
ApiError = (ApiException, urllib3.exceptions.HTTPError)
# Events for one endpoint that arrive within this many seconds are handled as one (a child
# applied, its sibling's event not yet in), and a burst of pod events costs one pass.
SETTLE_SECONDS = 0.5
# Endpoint passes that run at once, each on a thread of its own: a pass mostly waits on the API
# server, so this bounds the requests in flight more than the CPU.
CONCURRENT_PASSES = 8
LABELLED = {naming.ENDPOINT_LABEL: kopf.PRESENT}


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


# ---- what the watches show, in memory ---------------------------------------------------------
# Coroutines, so kopf runs them in its event loop rather than handing every event to a thread.


@kopf.index(GROUP, VERSION, PLURAL)
async def endpoint_index(
    namespace: str | None, name: str, body: kopf.Body, **_: Any
) -> dict[EndpointKey, dict[str, Any]]:
    return {(namespace or "", name): slim(body)}


def _child_key(namespace: str | None, labels: kopf.Labels) -> EndpointKey:
    return (namespace or "", labels[naming.ENDPOINT_LABEL])


@kopf.index(naming.RAY_GROUP, naming.RAY_VERSION, "rayservices", labels=LABELLED)
async def rayservice_index(
    namespace: str | None, labels: kopf.Labels, body: kopf.Body, **_: Any
) -> dict[EndpointKey, Any]:
    return {_child_key(namespace, labels): slim_child(body)}


@kopf.index("", "v1", "services", labels=LABELLED)
async def service_index(
    namespace: str | None, labels: kopf.Labels, body: kopf.Body, **_: Any
) -> dict[EndpointKey, Any]:
    return {_child_key(namespace, labels): slim_child(body)}


@kopf.index("", "v1", "persistentvolumeclaims", labels=LABELLED)
async def pvc_index(namespace: str | None, labels: kopf.Labels, body: kopf.Body, **_: Any) -> dict[EndpointKey, Any]:
    return {_child_key(namespace, labels): slim_child(body)}


# Several per endpoint for a while: the fill Job of a new source beside the one it replaces.
@kopf.index("batch", "v1", "jobs", labels=LABELLED)
async def job_index(namespace: str | None, labels: kopf.Labels, body: kopf.Body, **_: Any) -> dict[EndpointKey, Any]:
    return {_child_key(namespace, labels): slim_child(body)}


@kopf.index("", "v1", "pods", labels=LABELLED)
async def pod_index(namespace: str | None, labels: kopf.Labels, body: kopf.Body, **_: Any) -> dict[EndpointKey, Any]:
    return {_child_key(namespace, labels): slim_pod(body)}


def _values(index: kopf.Index[EndpointKey, Any], key: EndpointKey) -> list[Any]:
    try:
        return list(index[key])  # one C-level copy: safe while the event loop updates the index
    except KeyError:
        return []


# ---- startup: settings, clients, the reconciler, the passes and the drift timer ---------------


@kopf.on.startup()
def configure(settings: kopf.OperatorSettings, memo: kopf.Memo, **indexes: Any) -> None:
    operator_settings = OperatorSettings()
    timeouts = operator_settings.api_timeouts
    # Every request and watch of kopf's own is bounded too: a watch on a connection that went
    # silent ends (no bookmark within the inactivity bound, or its whole duration passed) and
    # resumes from its last resourceVersion.
    settings.networking.connect_timeout = timeouts.connect_seconds
    settings.networking.request_timeout = timeouts.request_seconds
    settings.watching.connect_timeout = timeouts.connect_seconds
    settings.watching.server_timeout = timeouts.watch_seconds
    settings.watching.client_timeout = timeouts.watch_seconds + timeouts.request_seconds
    settings.watching.inactivity_timeout = timeouts.watch_inactivity_seconds
    settings.posting.enabled = False  # the operator posts its own Events (Ready transitions)

    # kopf passes every index by its function's name.
    children: dict[str, kopf.Index[EndpointKey, Any]] = {
        "RayService": indexes["rayservice_index"],
        "Service": indexes["service_index"],
        "PersistentVolumeClaim": indexes["pvc_index"],
    }
    pods: kopf.Index[EndpointKey, Any] = indexes["pod_index"]
    jobs: kopf.Index[EndpointKey, Any] = indexes["job_index"]

    def look(namespace: str, name: str) -> Seen:
        key = (namespace, name)
        found = {kind: values[0] for kind, index in children.items() if (values := _values(index, key))}
        return Seen(children=found, pods=_values(pods, key), jobs=_values(jobs, key))

    configuration = load_config()
    configuration.connection_pool_maxsize = CONCURRENT_PASSES  # one connection per pass thread
    kube = Kube(operator_settings.field_manager, BoundedApiClient(configuration, timeouts))
    memo.operator_settings = operator_settings
    memo.reconciler = Reconciler(kube, operator_settings, look)
    memo.endpoints = indexes["endpoint_index"]


@kopf.on.startup()
async def start_passes(memo: kopf.Memo, **_: Any) -> None:
    reconciler: Reconciler = memo.reconciler
    threads = concurrent.futures.ThreadPoolExecutor(CONCURRENT_PASSES, thread_name_prefix="pass")
    loop = asyncio.get_running_loop()

    async def one_pass(key: EndpointKey) -> None:
        bodies = _values(memo.endpoints, key)
        if not bodies or bodies[0]["metadata"].get("deletionTimestamp"):
            return
        retry_in = await loop.run_in_executor(threads, _pass, reconciler, whole(bodies[0]))
        if retry_in is not None:
            passes.request_later(key, retry_in)

    passes = Coalescer(one_pass, limit=CONCURRENT_PASSES)
    memo.passes, memo.threads = passes, threads
    memo.drift_loop = asyncio.create_task(_check_drift_forever(memo))


@kopf.on.cleanup()
async def stop_passes(memo: kopf.Memo, **_: Any) -> None:
    task = memo.get("drift_loop")
    if task:
        task.cancel()
    passes = memo.get("passes")
    if passes:
        await passes.close()
    threads = memo.get("threads")
    if threads:
        threads.shutdown(wait=False, cancel_futures=True)


async def _check_drift_forever(memo: kopf.Memo) -> None:
    """Level-based: every period, every known endpoint's children are compared with its spec
    (from memory) and whatever is missing or differs is applied again."""
    while True:
        await asyncio.sleep(memo.operator_settings.drift_check_seconds)
        for key in list(memo.endpoints):
            memo.passes.request(key)


def _pass(reconciler: Reconciler, body: dict[str, Any]) -> float | None:
    """One pass over an endpoint; the seconds after which to pass again (it failed, or weights
    are downloading), else None.

    A spec that cannot be served is not retried: its status and Event say why, and the next
    change of the spec is a new pass."""
    meta = body["metadata"]
    where = f"{meta['namespace']}/{meta['name']}"
    try:
        return look_again_in(reconciler.reconcile(body))
    except InvalidSpec as error:
        log.info("%s cannot be served: %s", where, error)
    except NotYet as error:
        log.warning("%s waits: %s; trying again in %.0fs", where, error, error.delay)
        return error.delay
    except ApiError as error:  # nothing is half-applied by server-side apply: try it all again
        reason, delay = _api_failure(error)
        log.warning("%s not reconciled: %s; trying again in %.0fs", where, reason, delay)
        return delay
    return None


# ---- events: one coalesced pass per endpoint --------------------------------------------------


@kopf.on.event(GROUP, VERSION, PLURAL)
async def endpoint_changed(
    event: kopf.RawEvent, body: kopf.Body, namespace: str | None, name: str, memo: kopf.Memo, **_: Any
) -> None:
    """A new endpoint or a new generation of its spec gets a pass at once; the operator's own
    status writes (same generation) get none."""
    key = (namespace or "", name)
    if event.get("type") == "DELETED":
        memo.reconciler.forget(*key)
    elif not body.get("metadata", {}).get("deletionTimestamp") and not memo.reconciler.is_current(dict(body)):
        memo.passes.request(key)


@kopf.on.event(naming.RAY_GROUP, naming.RAY_VERSION, "rayservices", labels=LABELLED)
@kopf.on.event("", "v1", "services", labels=LABELLED)
@kopf.on.event("", "v1", "persistentvolumeclaims", labels=LABELLED)
@kopf.on.event("batch", "v1", "jobs", labels=LABELLED)
@kopf.on.event("", "v1", "pods", labels=LABELLED)
async def child_changed(namespace: str | None, labels: kopf.Labels, memo: kopf.Memo, **_: Any) -> None:
    """A child changed or went (it is applied again), or a pod did (status follows)."""
    memo.passes.request(_child_key(namespace, labels), settle=SETTLE_SECONDS)
