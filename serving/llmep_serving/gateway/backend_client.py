"""Sending requests to backends: pooled connections, replicas in turn, and one safe retry."""

from __future__ import annotations

import logging
from typing import Any

import aiohttp
from yarl import URL

from . import errors
from .metrics import GatewayMetrics
from .request_body import Payload
from .retry import Unsent, unsent_reason
from .routing import Route
from .settings import GatewaySettings

log = logging.getLogger(__name__)

# Set explicitly rather than skipped, which costs aiohttp more per request.
BACKEND_HEADERS = {"Accept-Encoding": "identity", "User-Agent": "llmep-gateway"}
_URL_CACHE_SIZE = 4096


class BackendClient:
    """The pooled session to every backend, and a session of fresh connections for the retry."""

    def __init__(self, settings: GatewaySettings, metrics: GatewayMetrics) -> None:
        self.settings = settings
        self.metrics = metrics
        self.session: aiohttp.ClientSession | None = None
        self._fresh: aiohttp.ClientSession | None = None  # for retries: never a pooled connection
        self._urls: dict[tuple[str, str], URL] = {}
        self._next_replica: dict[str, int] = {}  # route key -> next replica, round-robin

    async def start(self) -> None:
        s = self.settings
        options: dict[str, Any] = {
            "cookie_jar": aiohttp.DummyCookieJar(),
            # Bytes pass through as the backend sent them (BACKEND_HEADERS asks for identity).
            "auto_decompress": False,
            "timeout": aiohttp.ClientTimeout(
                total=None, sock_connect=s.backend_connect_timeout, sock_read=s.backend_read_timeout
            ),
        }
        # Idle pooled connections are dropped before backends drop them, so reuse never meets a
        # connection the backend is closing (a request sent on one is not replayed).
        self.session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=0, keepalive_timeout=s.backend_pool_idle_seconds), **options
        )
        self._fresh = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0, force_close=True), **options)

    async def close(self) -> None:
        if self.session is not None:
            await self.session.close()
        if self._fresh is not None:
            await self._fresh.close()

    async def send(
        self, route: Route, raw_path: str, payload: Payload, headers: dict[str, str]
    ) -> aiohttp.ClientResponse:
        """Send to the next replica; where the first send never reached its backend, once more
        (to the replica after it, or on a fresh connection when there is one replica)."""
        assert self.session is not None and self._fresh is not None
        replicas = self._replicas(route)
        url = self._url(replicas[0], raw_path)
        try:
            return await self._post(self.session, url, payload.data, headers, route.model)
        except Unsent as exc:
            self.metrics.retry(route.model, exc.reason)
            log.warning("backend for %s not reached (%s); sending once more", route.model, exc)
        base = replicas[1 % len(replicas)]
        try:
            return await self._post(self._fresh, self._url(base, raw_path), payload.data, headers, route.model)
        except Unsent as exc:
            log.warning("backend for %s not reached again (%s)", route.model, exc)
            if exc.timeout:
                raise errors.backend_timeout(route.model) from None
            raise errors.backend_unavailable(route.model) from None

    async def wake(self, route: Route) -> None:
        """One tiny completion: Ray Serve queues it and starts a replica for it. An adapter's route
        wakes its base model, so a wake-up never waits on loading an adapter."""
        assert self.session is not None and route.base is not None
        try:
            async with self.session.post(
                f"{route.base}/completions",
                json={"model": route.parent or route.model, "prompt": "wake", "max_tokens": 1},
                timeout=aiohttp.ClientTimeout(
                    total=self.settings.hold_deadline + 1,
                    sock_connect=self.settings.backend_connect_timeout,
                ),
            ) as resp:
                await resp.read()
                log.info("woke %s: backend answered %d", route.model, resp.status)
        except (aiohttp.ClientError, TimeoutError) as exc:
            log.info("wake-up request to %s failed: %s", route.model, type(exc).__name__)

    async def _post(
        self, session: aiohttp.ClientSession, url: URL, body: bytes, headers: dict[str, str], model: str
    ) -> aiohttp.ClientResponse:
        """POST to one backend; a failure that provably never reached it raises Unsent."""
        upload = aiohttp.UploadTracker()
        try:
            return await session.post(url, data=body, headers=headers, upload_tracker=upload)
        except (aiohttp.ClientError, TimeoutError) as exc:
            reason = unsent_reason(exc, upload)
            if reason is not None:
                raise Unsent(reason, exc) from None
            log.warning("backend for %s failed after the request was sent: %s", model, type(exc).__name__)
            if isinstance(exc, TimeoutError):
                raise errors.backend_timeout(model) from None
            raise errors.backend_unavailable(model) from None

    def _url(self, base: str, raw_path: str) -> URL:
        cache_key = (base, raw_path)
        url = self._urls.get(cache_key)
        if url is None:
            # Only origin-form /v1/... targets; no dot segments or empty ones reach a backend.
            if not raw_path.startswith("/v1/") or ".." in raw_path or "//" in raw_path or "%2e" in raw_path.lower():
                raise errors.not_found(raw_path)
            url = URL(base + raw_path[3:], encoded=True)
            if len(self._urls) >= _URL_CACHE_SIZE:
                self._urls.clear()
            self._urls[cache_key] = url
        return url

    def _replicas(self, route: Route) -> tuple[str, ...]:
        """The route's base URLs, starting at the next one round-robin."""
        bases = route.bases or ((route.base,) if route.base else ())
        if len(bases) < 2:
            return bases
        start = self._next_replica.get(route.key, 0) % len(bases)
        self._next_replica[route.key] = start + 1
        return bases[start:] + bases[:start]
