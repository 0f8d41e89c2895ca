"""The routing table: model names and aliases to backend base URLs, swapped whole on change."""

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


@dataclass(frozen=True)
class Route:
    """What a model name resolves to."""

    model: str  # the served name: metrics label and the id the backend knows
    base: str | None  # base URL without a trailing slash
    ready: bool
    owned_by: str
    created: int
    names: frozenset[str] = field(default_factory=frozenset)  # every id that routes here
    namespace: str | None = None  # the LLMEndpoint's namespace; None in local mode
    key: str = ""  # identity of the backend, stable across table rebuilds
    bases: tuple[str, ...] = ()  # every replica's base URL, ``base`` first; chosen round-robin


@dataclass(frozen=True)
class RoutingTable:
    by_name: dict[str, Route]
    listed: tuple[tuple[str, Route], ...]  # (id, route) pairs for /v1/models, in order

    def lookup(self, name: str) -> Route | None:
        return self.by_name.get(name)


EMPTY_TABLE = RoutingTable(by_name={}, listed=())


def _claims_plain_names(backend: Backend, plain_name_namespaces: Collection[str]) -> bool:
    return backend.namespace is None or "*" in plain_name_namespaces or backend.namespace in plain_name_namespaces


def build_table(backends: Iterable[Backend], plain_name_namespaces: Collection[str] = ("*",)) -> RoutingTable:
    """Resolve names to routes deterministically.

    ``namespace/name`` always resolves to that namespace's endpoint serving ``name`` (the oldest,
    if several). A plain name resolves only where endpoints of exactly one namespace claim it,
    and only namespaces in ``plain_name_namespaces`` ("*": all) may claim plain names: a name
    claimed from two namespaces is ambiguous and resolves to nothing, so no endpoint can take
    over another namespace's name, whatever their ages. Local-mode backends (no namespace)
    always claim their names.
    """
    ordered = sorted(
        (b for b in backends if b.models),
        key=lambda b: (b.created, b.namespace or "", b.name or "", b.url or ""),
    )
    claimants: dict[str, list[Backend]] = {}
    for backend in ordered:
        if _claims_plain_names(backend, plain_name_namespaces):
            for name in dict.fromkeys(backend.models):
                claimants.setdefault(name, []).append(backend)
    owner: dict[str, Backend] = {}
    for name, claiming in claimants.items():
        namespaces = sorted({b.namespace or "" for b in claiming})
        if len(namespaces) > 1:
            log.warning("model name %r is claimed from namespaces %s: ask for it as namespace/name", name, namespaces)
        else:
            owner[name] = claiming[0]
    by_name: dict[str, Route] = {}
    listed: list[tuple[str, Route]] = []
    for backend in ordered:
        served = backend.models[0]
        owned = tuple(m for m in dict.fromkeys(backend.models) if owner.get(m) is backend)
        qualified = (
            tuple(f"{backend.namespace}/{m}" for m in backend.models) if backend.namespace else ()
        )
        route = Route(
            model=served,
            base=backend.url.rstrip("/") if backend.url else None,
            ready=backend.ready and bool(backend.url),
            owned_by=backend.namespace or "llmep",
            created=int(backend.created),
            names=frozenset(owned) | frozenset(qualified),
            namespace=backend.namespace,
            key=f"{backend.namespace or ''}/{backend.name or served}",
            bases=tuple(u.rstrip("/") for u in (backend.url, *backend.extra_urls)) if backend.url else (),
        )
        for name in owned:
            by_name[name] = route
            listed.append((name, route))
        for name, qualified_name in zip(backend.models, qualified, strict=False):
            by_name.setdefault(qualified_name, route)
            # List the qualified id only where it is the one way to reach this backend.
            if by_name[qualified_name] is route and name not in owned:
                listed.append((qualified_name, route))
    return RoutingTable(by_name=by_name, listed=tuple(listed))


def parse_routes(data: object) -> list[Backend]:
    """Local-mode file content: a list of {models: [...], url: ..., ready: bool}.

    ``url`` may be a list: replicas of the same model, used round-robin.
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
        if (
            not isinstance(models, list)
            or not models
            or not all(isinstance(m, str) and m for m in models)
        ):
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
            )
        )
    return backends


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
