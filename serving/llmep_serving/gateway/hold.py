"""Holding requests for a model with no ready replica until it has one, and waking it.

A held request waits for the routing table to mark its model ready, up to hold_deadline; a held
stream gets its 200 and keep-alive comments while it waits. Meanwhile a wake-up request goes to
the backend every WAKE_INTERVAL, which makes Ray Serve start a replica from zero.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from dataclasses import dataclass

from aiohttp import web

from . import errors
from .auth import ApiKey
from .backend_client import BackendClient
from .drain import InFlight
from .errors import GatewayError
from .gauges import KeyedGauge
from .metrics import ModelMetrics
from .relay import SSE_HEADERS
from .routing import Route, RouteStore
from .settings import GatewaySettings

KEEPALIVE_COMMENT = b": keep-alive\n\n"


def keepalive_comment(route: Route) -> bytes:
    """An SSE comment for a held stream: what the endpoint is doing (its weights' download, the
    model loading) when its status says, else a bare keep-alive. Clients ignore comments."""
    if not route.progress:
        return KEEPALIVE_COMMENT
    return f": keep-alive; {route.progress}\n\n".encode()


WAKE_INTERVAL = 5.0  # seconds between wake-up requests to one backend


@dataclass(frozen=True, slots=True)
class Ready:
    """A hold that ended well: the route now ready, and the SSE response started meanwhile."""

    route: Route
    sse: web.StreamResponse | None


class HeldStreamError(GatewayError):
    """A GatewayError raised after the SSE response for a held stream was started."""

    def __init__(self, exc: GatewayError, sse: web.StreamResponse) -> None:
        super().__init__(
            exc.status,
            exc.code,
            exc.message,
            type_=exc.type,
            param=exc.param,
            retry_after=exc.retry_after,
        )
        self.sse = sse


class HoldQueue:
    """The requests held per route, at most hold_queue_size each, and the wake-ups sent for them."""

    def __init__(
        self,
        settings: GatewaySettings,
        routes: RouteStore,
        in_flight: InFlight,
        backends: BackendClient,
    ) -> None:
        self.settings = settings
        self.routes = routes
        self.in_flight = in_flight
        self.backends = backends
        self._held = KeyedGauge()  # route key -> requests held for it
        self._waking: set[str] = set()
        self._last_wake: dict[str, float] = {}
        self._tasks: set[asyncio.Task[None]] = set()

    def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()

    async def hold(
        self,
        request: web.BaseRequest,
        route: Route,
        model: str,
        key: ApiKey,
        stream: bool,
        mm: ModelMetrics,
        headers: Mapping[str, str] | None = None,
    ) -> Ready:
        """Wait until ``model`` resolves to a ready route that ``key`` may use; a held stream's
        200 goes out with ``headers`` (the key's x-ratelimit-*) besides the SSE ones."""
        s = self.settings
        if self._held[route.key] >= s.hold_queue_size:
            raise errors.queue_full(route.model, s.retry_after_seconds)
        with self._held.one(route.key), mm.holding:
            loop = asyncio.get_running_loop()
            deadline = loop.time() + s.hold_deadline
            sse: web.StreamResponse | None = None
            try:
                while True:
                    self._wake(route)
                    remaining = deadline - loop.time()
                    if remaining <= 0:
                        exc = errors.model_not_ready(route.model, s.retry_after_seconds)
                        if sse is None:
                            raise exc
                        raise HeldStreamError(exc, sse)
                    changed = self.routes.changed
                    wait = min(remaining, s.hold_keepalive_interval) if stream else remaining
                    try:
                        await asyncio.wait_for(changed.wait(), wait)
                    except TimeoutError:
                        if stream and loop.time() < deadline:
                            if sse is None:
                                sse = web.StreamResponse(status=200, headers={**SSE_HEADERS, **(headers or {})})
                                await sse.prepare(request)
                            await sse.write(keepalive_comment(route))
                    current = self.routes.table.lookup(model)
                    if current is None or not key.allows(current):
                        exc = errors.model_not_found(model)
                        if sse is None:
                            raise exc
                        raise HeldStreamError(exc, sse)
                    if current.ready:
                        return Ready(current, sse)
                    route = current
            except asyncio.CancelledError:
                if not self.in_flight.cutting:
                    raise
                exc = errors.shutting_down()
                if sse is None:
                    raise exc from None
                raise HeldStreamError(exc, sse) from None

    def _wake(self, route: Route) -> None:
        if not self.settings.wake_backend or route.base is None or route.key in self._waking:
            return
        now = asyncio.get_running_loop().time()
        if now - self._last_wake.get(route.key, -WAKE_INTERVAL) < WAKE_INTERVAL:
            return
        self._waking.add(route.key)
        self._last_wake[route.key] = now
        task = asyncio.create_task(self._wake_once(route))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _wake_once(self, route: Route) -> None:
        try:
            await self.backends.wake(route)
        finally:
            self._waking.discard(route.key)
