"""The routing table: model names, aliases and LoRA adapters to backend base URLs, swapped whole
on change."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Collection, Iterable
from dataclasses import dataclass, field

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Backend:
    """One serving endpoint as a source reports it (an LLMEndpoint, or an entry of a file)."""

    models: tuple[str, ...]  # served name first, then aliases
    url: str | None  # OpenAI base URL ending in /v1; None while the endpoint has none yet
    ready: bool
    namespace: str | None = None
    name: str | None = None
    created: float = 0.0  # epoch seconds; orders name collisions, oldest wins
    extra_urls: tuple[str, ...] = ()  # further replicas of the same model (local mode)
    adapters: tuple[str, ...] = ()  # LoRA adapter names, which Ray Serve LLM knows as "<served>:<adapter>"
    progress: str = ""  # what the endpoint is doing while not ready (its Ready condition), for held streams
    max_inflight: int | None = None  # requests in flight from this gateway at most; None: the setting


@dataclass(frozen=True)
class Route:
    """What a model name resolves to."""

    model: str  # the id the backend knows (served name, or "<served>:<adapter>"): also the metrics label
    base: str | None  # base URL without a trailing slash
    ready: bool
    owned_by: str
    created: int
    names: frozenset[str] = field(default_factory=frozenset)  # every id that routes here
    namespace: str | None = None  # the LLMEndpoint's namespace; None in local mode
    key: str = ""  # identity of the backend, stable across table rebuilds
    bases: tuple[str, ...] = ()  # every replica's base URL, ``base`` first; chosen round-robin
    parent: str | None = None  # a LoRA adapter's base model (its served name); None for a base model
    progress: str = ""  # Backend.progress
    max_inflight: int | None = None  # Backend.max_inflight


@dataclass(frozen=True)
class RoutingTable:
    by_name: dict[str, Route]
    listed: tuple[tuple[str, Route], ...]  # (id, route) pairs for /v1/models, in order

    def lookup(self, name: str) -> Route | None:
        return self.by_name.get(name)


EMPTY_TABLE = RoutingTable(by_name={}, listed=())


def _claims_plain_names(backend: Backend, plain_name_namespaces: Collection[str]) -> bool:
    return backend.namespace is None or "*" in plain_name_namespaces or backend.namespace in plain_name_namespaces


@dataclass(frozen=True, eq=False)
class _Target:
    """What a route leads to: a backend's base model (``adapter`` None) or one of its adapters."""

    backend: Backend
    adapter: str | None
    ids: tuple[str, ...]  # its plain ids, the one it is listed under first


def _targets(backend: Backend) -> list[_Target]:
    served = backend.models[0]
    models = tuple(dict.fromkeys(backend.models))
    targets = [_Target(backend, None, models)]
    for adapter in dict.fromkeys(backend.adapters):
        # Admission refuses an adapter named like its endpoint's model; it never shadows one here.
        if adapter not in models:
            targets.append(_Target(backend, adapter, (adapter, f"{served}:{adapter}")))
    return targets


def build_table(backends: Iterable[Backend], plain_name_namespaces: Collection[str] = ("*",)) -> RoutingTable:
    """Resolve names to routes deterministically.

    ``namespace/name`` always resolves to that namespace's endpoint serving ``name`` (the oldest,
    if several). A plain name resolves only where endpoints of exactly one namespace claim it,
    and only namespaces in ``plain_name_namespaces`` ("*": all) may claim plain names: a name
    claimed from two namespaces is ambiguous and resolves to nothing, so no endpoint can take
    over another namespace's name, whatever their ages. Local-mode backends (no namespace)
    always claim their names.

    A LoRA adapter ``a`` of an endpoint serving ``s`` is a route of its own, to the same replicas,
    under the ids ``a`` and ``s:a`` (and ``namespace/a``, ``namespace/s:a``), claimed by the same
    rules as model names; requests reach the backend as ``s:a``.
    """
    ordered = sorted(
        (b for b in backends if b.models),
        key=lambda b: (b.created, b.namespace or "", b.name or "", b.url or ""),
    )
    targets = [target for backend in ordered for target in _targets(backend)]
    claimants: dict[str, list[_Target]] = {}
    for target in targets:
        if _claims_plain_names(target.backend, plain_name_namespaces):
            for name in target.ids:
                claimants.setdefault(name, []).append(target)
    owner: dict[str, _Target] = {}
    for name, claiming in claimants.items():
        namespaces = sorted({t.backend.namespace or "" for t in claiming})
        if len(namespaces) > 1:
            log.warning("model name %r is claimed from namespaces %s: ask for it as namespace/name", name, namespaces)
        else:
            owner[name] = claiming[0]
    by_name: dict[str, Route] = {}
    listed: list[tuple[str, Route]] = []
    for target in targets:
        backend = target.backend
        served = backend.models[0]
        owned = tuple(m for m in target.ids if owner.get(m) is target)
        qualified = {m: f"{backend.namespace}/{m}" for m in target.ids} if backend.namespace else {}
        route = Route(
            model=served if target.adapter is None else f"{served}:{target.adapter}",
            base=backend.url.rstrip("/") if backend.url else None,
            ready=backend.ready and bool(backend.url),
            owned_by=backend.namespace or "llmep",
            created=int(backend.created),
            names=frozenset(owned) | frozenset(qualified.values()),
            namespace=backend.namespace,
            # Adapters share their base's key: one hold queue, wake-up and rotation per backend.
            key=f"{backend.namespace or ''}/{backend.name or served}",
            bases=tuple(u.rstrip("/") for u in (backend.url, *backend.extra_urls)) if backend.url else (),
            parent=None if target.adapter is None else served,
            progress=backend.progress,
            max_inflight=backend.max_inflight,
        )
        for name in owned:
            by_name[name] = route
        for qualified_name in qualified.values():
            by_name.setdefault(qualified_name, route)
        # Each id as its plain name where this target owns it, else as the qualified id where
        # that is the one way to reach it.
        reachable = [
            name if name in owned else qualified[name]
            for name in target.ids
            if name in owned or (name in qualified and by_name[qualified[name]] is route)
        ]
        # A base model is listed under each of its names, an adapter once.
        listed.extend((name, route) for name in (reachable if target.adapter is None else reachable[:1]))
    return RoutingTable(by_name=by_name, listed=tuple(listed))


def parse_routes(data: object) -> list[Backend]:
    """Local-mode file content: a list of {models: [...], url: ..., ready: bool, adapters: [...],
    max_inflight: N}.

    ``url`` may be a list: replicas of the same model, used round-robin. ``adapters`` (optional)
    names the LoRA adapters those replicas serve. ``max_inflight`` (optional) is the model's
    capacity for the fair queue, over the max_inflight_per_model setting.
    """
    if not isinstance(data, list):
        raise ValueError("routes file must hold a list of {models, url, ready} entries")
    backends = []
    now = time.time()
    for index, entry in enumerate(data):
        if not isinstance(entry, dict):
            raise ValueError(f"routes entry {index} is not a mapping")
        models = entry.get("models")
        if isinstance(models, str):
            models = [models]
        if not isinstance(models, list) or not models or not all(isinstance(m, str) and m for m in models):
            raise ValueError(f"routes entry {index}: 'models' must be a non-empty list of names")
        url = entry.get("url")
        urls = url if isinstance(url, list) else [url] if url is not None else []
        if not all(isinstance(u, str) and u for u in urls) or (isinstance(url, list) and not url):
            raise ValueError(f"routes entry {index}: 'url' must be a URL or a non-empty list of URLs")
        ready = entry.get("ready", True)
        if not isinstance(ready, bool):
            raise ValueError(f"routes entry {index}: 'ready' must be true or false")
        backends.append(
            Backend(
                models=tuple(models),
                url=urls[0] if urls else None,
                ready=ready,
                created=now + index * 1e-6,
                extra_urls=tuple(urls[1:]),
                adapters=_parse_adapters(entry.get("adapters", []), models, index),
                max_inflight=_parse_max_inflight(entry.get("max_inflight"), index),
            )
        )
    return backends


def _parse_max_inflight(value: object, index: int) -> int | None:
    if value is None:
        return None
    # bool is an int to Python, not a capacity.
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise ValueError(f"routes entry {index}: 'max_inflight' must be a whole number >= 0 (0: no queue)")
    return value


def _parse_adapters(adapters: object, models: list[str], index: int) -> tuple[str, ...]:
    # ':' joins base and adapter in the id the backend knows, '/' qualifies names by namespace.
    if not isinstance(adapters, list) or not all(
        isinstance(a, str) and a and ":" not in a and "/" not in a for a in adapters
    ):
        raise ValueError(f"routes entry {index}: 'adapters' must be a list of names without ':' or '/'")
    clash = [a for a in adapters if a in models]
    if clash:
        raise ValueError(f"routes entry {index}: adapter {clash[0]!r} is also one of the entry's models")
    return tuple(adapters)


class RouteStore:
    """Holds the current table; waiters learn of every replacement through ``changed``."""

    def __init__(self) -> None:
        self.table = EMPTY_TABLE
        self.changed = asyncio.Event()
        self.loaded = False
        self._listeners: list[Callable[[RoutingTable], None]] = []

    def add_listener(self, listener: Callable[[RoutingTable], None]) -> None:
        self._listeners.append(listener)

    def replace(self, table: RoutingTable) -> None:
        self.table = table
        self.loaded = True
        fired, self.changed = self.changed, asyncio.Event()
        fired.set()
        for listener in self._listeners:
            listener(table)
