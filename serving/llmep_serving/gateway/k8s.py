"""Cluster mode: routes from LLMEndpoint objects and keys from labelled Secrets.

Translation from API objects (plain dicts) is pure; the list-and-watch loops run the
blocking kubernetes client in threads and hand snapshots to the event loop.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import random
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from datetime import datetime
from pathlib import Path
from typing import Any

from llmep_operator.api import GROUP, PLURAL, VERSION, ConditionType, adapter_names_of, capacity_of, model_ids_of
from llmep_operator.api.conditions import condition, is_true

from .auth import KEY_LABEL, ApiKey, key_from_secret
from .routing import Backend
from .settings import DEFAULT_BACKEND_URL_TEMPLATE

log = logging.getLogger(__name__)

SERVICE_ACCOUNT_NAMESPACE = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace")
FIRST_RETRY_DELAY_S = 0.5


def _created(meta: Mapping[str, Any]) -> float:
    stamp = meta.get("creationTimestamp")
    if not isinstance(stamp, str):
        return 0.0
    try:
        return datetime.fromisoformat(stamp.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return 0.0


def is_ready(status: Mapping[str, Any]) -> bool:
    """Ready condition True and, where the status counts replicas, at least one ready."""
    ready = is_true(status, ConditionType.READY)
    replicas = status.get("replicas")
    if isinstance(replicas, dict) and isinstance(replicas.get("ready"), int):
        ready = ready and replicas["ready"] > 0
    return ready


def _progress(status: Mapping[str, Any]) -> str:
    """'DownloadingWeights: downloading weights into the cache: 12.3 of 140.0 GiB, ...' while not Ready."""
    ready = condition(status, ConditionType.READY)
    if ready.get("status") == "True" or not ready.get("reason"):
        return ""
    message = " ".join(str(ready.get("message") or "").split())  # one line: it goes into an SSE comment
    return f"{ready['reason']}: {message}"[:300] if message else str(ready["reason"])


def endpoint_to_backend(
    obj: Mapping[str, Any], url_template: str = DEFAULT_BACKEND_URL_TEMPLATE, share_of: int | None = None
) -> Backend | None:
    """One LLMEndpoint to a backend, or None when it names no model at all.

    Names come from ``status.models``; before the operator has written them, from the spec
    (served name, else metadata.name, then aliases), so requests for an endpoint that is
    still coming up are held rather than answered 404. The URL is computed from the
    endpoint's name and namespace, never read from ``status.url``: a forged status must not
    send the endpoint's traffic (prompts, keys' requests) to another address. It is used only
    once the operator has published one, which says the Serve Service exists. LoRA adapters
    come from ``spec.lora.adapters`` and are ready whenever the endpoint is: a replica loads an
    adapter on its first request. With ``share_of`` (the number of gateway replicas), the backend's
    fair-queue capacity is this gateway's share of what the endpoint's ready replicas take at once.
    """
    meta = obj.get("metadata") or {}
    status = obj.get("status") or {}
    models = status.get("models")
    if not (isinstance(models, list) and models):
        models = model_ids_of(obj)
    names = tuple(dict.fromkeys(m for m in models if isinstance(m, str) and m))
    if not names:
        return None
    name, namespace = meta.get("name"), meta.get("namespace")
    published = isinstance(status.get("url"), str) and status["url"]
    url = url_template.format(name=name, namespace=namespace) if published and name and namespace else None
    return Backend(
        progress=_progress(status),
        models=names,
        url=url,
        ready=is_ready(status),
        namespace=namespace,
        name=name,
        created=_created(meta),
        adapters=tuple(adapter_names_of(obj)),
        max_inflight=_share(capacity_of(obj), share_of),
    )


def _share(capacity: int | None, gateways: int | None) -> int | None:
    """One gateway replica's part of an endpoint's capacity, rounded up so a small one still admits."""
    if capacity is None or gateways is None:
        return None
    return -(-capacity // gateways)


def backends_from_endpoints(
    objects: Iterable[Mapping[str, Any]],
    url_template: str = DEFAULT_BACKEND_URL_TEMPLATE,
    share_of: int | None = None,
) -> list[Backend]:
    return [b for b in (endpoint_to_backend(o, url_template, share_of) for o in objects) if b is not None]


def keys_from_secrets(objects: Iterable[Mapping[str, Any]]) -> list[ApiKey]:
    keys = []
    for obj in objects:
        name = (obj.get("metadata") or {}).get("name", "?")
        try:
            keys.append(key_from_secret(name, obj.get("data")))
        except ValueError as exc:
            log.warning("ignoring API key Secret %s: %s", name, exc)
    return keys


def own_namespace(configured: str | None) -> str:
    if configured:
        return configured
    if os.environ.get("POD_NAMESPACE"):
        return os.environ["POD_NAMESPACE"]
    try:
        return SERVICE_ACCOUNT_NAMESPACE.read_text().strip()
    except OSError:
        return "default"


class KubeSource:
    """List-and-watch loops for LLMEndpoints (per namespace, or all) and key Secrets."""

    def __init__(
        self,
        *,
        kubeconfig: Path | None,
        namespace: str,
        watch_namespaces: list[str],
        on_backends: Callable[[list[Backend]], None],
        on_keys: Callable[[list[ApiKey]], None] | None,
        url_template: str = DEFAULT_BACKEND_URL_TEMPLATE,
        capacity_share_of: int | None = None,
        request_timeout: float = 10.0,
        watch_seconds: int = 30,
        retry_max_delay: float = 30.0,
    ) -> None:
        self.kubeconfig = kubeconfig
        self.request_timeout = request_timeout
        self.watch_seconds = watch_seconds
        self.retry_max_delay = retry_max_delay
        # Per list/watch loop: monotonic time of its last successful list, event or watch end.
        self._synced: dict[str, float | None] = {}
        self.url_template = url_template
        self.capacity_share_of = capacity_share_of  # gateway replicas splitting each endpoint's capacity
        self.namespace = namespace
        self.watch_namespaces = watch_namespaces or [namespace]
        self.on_backends = on_backends
        self.on_keys = on_keys
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._by_namespace: dict[str, list[dict[str, Any]]] = {}
        self._loop: asyncio.AbstractEventLoop | None = None

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        from kubernetes import client, config

        self._loop = loop
        if self.kubeconfig is not None:
            api_client = config.new_client_from_config(config_file=str(self.kubeconfig))
        else:
            config.load_incluster_config()
            api_client = client.ApiClient()
        custom = client.CustomObjectsApi(api_client)
        core = client.CoreV1Api(api_client)
        targets: list[tuple[str, Callable[..., Any], dict[str, Any]]]
        if "*" in self.watch_namespaces:
            targets = [("*", custom.list_cluster_custom_object, {})]
        else:
            targets = [(ns, custom.list_namespaced_custom_object, {"namespace": ns}) for ns in self.watch_namespaces]
        for ns, list_fn, kwargs in targets:
            self._spawn(
                f"watch-llmendpoints-{ns}",
                list_fn,
                {"group": GROUP, "version": VERSION, "plural": PLURAL, **kwargs},
                functools.partial(self._endpoints_changed, ns),
                api_client,
            )
        if self.on_keys is not None:
            on_keys = self.on_keys
            self._spawn(
                "watch-api-keys",
                core.list_namespaced_secret,
                {"namespace": self.namespace, "label_selector": KEY_LABEL},
                lambda objs: on_keys(keys_from_secrets(objs)),
                api_client,
            )

    def stop(self) -> None:
        self._stop.set()

    def stale(self, max_age: float) -> str | None:
        """Why routes or keys may be out of date (a loop not synced within ``max_age``), or None."""
        now = time.monotonic()
        for name, synced in list(self._synced.items()):
            if synced is None:
                return f"{name}: not listed yet"
            if now - synced > max_age:
                return f"{name}: no successful list or watch for {now - synced:.0f}s"
        return None

    def _endpoints_changed(self, ns: str, objects: list[dict[str, Any]]) -> None:
        self._by_namespace[ns] = objects
        self.on_backends(
            backends_from_endpoints(
                (o for objs in self._by_namespace.values() for o in objs), self.url_template, self.capacity_share_of
            )
        )

    def _spawn(
        self,
        name: str,
        list_fn: Callable[..., Any],
        kwargs: dict[str, Any],
        publish: Callable[[list[dict[str, Any]]], None],
        api_client: Any,
    ) -> None:
        self._synced[name] = None
        thread = threading.Thread(
            target=self._list_watch,
            args=(name, list_fn, kwargs, publish, api_client),
            name=name,
            daemon=True,
        )
        self._threads.append(thread)
        thread.start()

    def _publish(self, publish: Callable[[list[dict[str, Any]]], None], objects: dict[str, Any]) -> None:
        assert self._loop is not None
        if self._stop.is_set():
            return
        try:
            self._loop.call_soon_threadsafe(publish, list(objects.values()))
        except RuntimeError:  # the event loop is closed: the gateway has stopped
            self._stop.set()

    def _list_watch(
        self,
        name: str,
        list_fn: Callable[..., Any],
        kwargs: dict[str, Any],
        publish: Callable[[list[dict[str, Any]]], None],
        api_client: Any,
    ) -> None:
        from kubernetes import watch
        from kubernetes.client.exceptions import ApiException
        from urllib3.exceptions import HTTPError

        # (connect, read): a silently dropped connection fails within the read timeout; a watch
        # sends at least its end within watch_seconds, so the read timeout outlasts it.
        list_timeout = (self.request_timeout, self.request_timeout)
        watch_timeout = (self.request_timeout, self.watch_seconds + self.request_timeout)
        delay = FIRST_RETRY_DELAY_S
        while not self._stop.is_set():
            try:
                listing = api_client.sanitize_for_serialization(list_fn(**kwargs, _request_timeout=list_timeout))
                objects = {_key(o): o for o in listing.get("items") or []}
                self._publish(publish, objects)
                self._synced[name] = time.monotonic()
                delay = FIRST_RETRY_DELAY_S
                version = listing["metadata"]["resourceVersion"]
                while not self._stop.is_set():
                    stream = watch.Watch().stream(
                        list_fn,
                        resource_version=version,
                        timeout_seconds=self.watch_seconds,
                        allow_watch_bookmarks=True,
                        _request_timeout=watch_timeout,
                        **kwargs,
                    )
                    for event in stream:
                        if self._stop.is_set():
                            return
                        obj = event["raw_object"]
                        if event["type"] == "ERROR":
                            raise ApiException(status=obj.get("code", 500), reason=obj.get("reason"))
                        version = obj["metadata"]["resourceVersion"]
                        self._synced[name] = time.monotonic()
                        if event["type"] == "BOOKMARK":
                            continue
                        if event["type"] == "DELETED":
                            objects.pop(_key(obj), None)
                        else:
                            objects[_key(obj)] = obj
                        self._publish(publish, objects)
                    self._synced[name] = time.monotonic()  # the server ended the watch: in sync
            except ApiException as exc:
                if exc.status == 410:  # Gone: our version expired, so list again at once
                    continue
                log.warning("watch %s failed (%s); retrying in %.1fs", name, exc.status, delay)
                delay = self._back_off(delay)
            except (HTTPError, OSError, ValueError, KeyError) as exc:
                log.warning("watch %s failed (%s); retrying in %.1fs", name, type(exc).__name__, delay)
                delay = self._back_off(delay)

    def _back_off(self, delay: float) -> float:
        """Wait ``delay`` with jitter (or until stopped); the next delay, doubled up to the cap."""
        self._stop.wait(delay * random.uniform(0.5, 1.0))  # noqa: S311 - jitter, not cryptography
        return min(delay * 2, self.retry_max_delay)


def _key(obj: Mapping[str, Any]) -> str:
    meta = obj.get("metadata") or {}
    return f"{meta.get('namespace', '')}/{meta.get('name', '')}"
