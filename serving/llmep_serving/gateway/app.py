"""Request handling: auth, limits, routing, holding, and the passthrough to backends."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Callable
from typing import Any

import aiohttp
from aiohttp import web
from yarl import URL

from . import errors
from .auth import ANONYMOUS, ApiKey, KeyStore
from .backend_errors import clean_error_body
from .budget import BodyBudget
from .drain import InFlight
from .errors import GatewayError
from .metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from .metrics import GatewayMetrics, ModelMetrics, usage_from
from .request_body import BodyParser, Payload, read_body
from .retry import Unsent, unsent_reason
from .routing import Route, RouteStore
from .settings import GatewaySettings

log = logging.getLogger(__name__)

JSON_HEADERS = {"Content-Type": errors.JSON_CONTENT_TYPE}
SSE_HEADERS = {
    "Content-Type": "text/event-stream",
    "Cache-Control": "no-cache",
    "X-Accel-Buffering": "no",  # tell any proxy in front not to buffer the stream
}
# Set explicitly rather than skipped, which costs aiohttp more per request.
BACKEND_HEADERS = {"Accept-Encoding": "identity", "User-Agent": "llmep-gateway"}
FORWARDED_HEADERS = ("Accept", "X-Request-Id", "traceparent", "tracestate")
KEEPALIVE_COMMENT = b": keep-alive\n\n"
WAKE_INTERVAL = 5.0  # seconds between wake-up requests to one backend
MAX_PENDING_EVENT = 1 << 20  # an SSE event larger than this is forwarded even if incomplete
_URL_CACHE_SIZE = 4096


def complete_events_end(data: bytes) -> int:
    """Length of the prefix of ``data`` that ends on an SSE event boundary."""
    lf = data.rfind(b"\n\n")
    crlf = data.rfind(b"\r\n\r\n")
    return max(lf + 2 if lf >= 0 else 0, crlf + 4 if crlf >= 0 else 0)


def error_response(exc: GatewayError) -> web.Response:
    headers = dict(JSON_HEADERS)
    if exc.retry_after is not None:
        headers["Retry-After"] = str(exc.retry_after)
    response = web.Response(body=exc.body(), status=exc.status, headers=headers)
    if exc.close:
        response.force_close()
    return response


class Gateway:
    """One gateway: its routing table, keys, metrics and the pooled backend session."""

    def __init__(
        self,
        settings: GatewaySettings,
        routes: RouteStore,
        keys: KeyStore,
        metrics: GatewayMetrics,
        *,
        serve_metrics: bool = True,
    ) -> None:
        self.settings = settings
        self.routes = routes
        self.keys = keys
        self.metrics = metrics
        self.serve_metrics = serve_metrics
        self.draining = False  # set on SIGTERM: /readyz fails while requests are still served
        self.stale: Callable[[], str | None] = lambda: None  # why routes/keys are out of date
        self.budget = BodyBudget(settings.max_inflight_body_bytes, settings.retry_after_seconds)
        self.parser = BodyParser(settings.offload_parse_bytes)
        self.in_flight = InFlight()
        self.session: aiohttp.ClientSession | None = None
        self._fresh: aiohttp.ClientSession | None = None  # for retries: never a pooled connection
        self._per_key: dict[str, int] = {}
        self._held: dict[str, int] = {}
        self._waking: set[str] = set()
        self._last_wake: dict[str, float] = {}
        self._tasks: set[asyncio.Task[None]] = set()
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
        self._fresh = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=0, force_close=True), **options
        )

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        self.parser.close()
        if self.session is not None:
            await self.session.close()
        if self._fresh is not None:
            await self._fresh.close()

    # -- dispatch ---------------------------------------------------------------------

    async def handle(self, request: web.BaseRequest) -> web.StreamResponse:
        response = await self._dispatch(request)
        if self.draining:
            response.force_close()  # keep-alive clients reconnect, to a replica that stays
        return response

    async def _dispatch(self, request: web.BaseRequest) -> web.StreamResponse:
        try:
            path = request.path
            if path.startswith("/v1/"):
                if request.method == "POST":
                    return await self._forward(request)
                if request.method == "GET":
                    if path == "/v1/models":
                        return self._list_models(request)
                    if path.startswith("/v1/models/"):
                        return self._get_model(request, path[len("/v1/models/") :])
                    raise errors.not_found(path)
                raise errors.method_not_allowed(request.method, path)
            if path == "/healthz":
                return web.Response(body=b'{"status":"ok"}', headers=JSON_HEADERS)
            if path == "/readyz":
                if self.draining:
                    return web.Response(
                        body=b'{"status":"draining"}', status=503, headers=JSON_HEADERS
                    )
                stale = self.stale()
                if stale is not None:
                    body = json.dumps({"status": stale}).encode()
                    return web.Response(body=body, status=503, headers=JSON_HEADERS)
                if self.routes.loaded and self.keys.loaded:
                    return web.Response(body=b'{"status":"ready"}', headers=JSON_HEADERS)
                return web.Response(
                    body=b'{"status":"waiting for the routing table"}',
                    status=503,
                    headers=JSON_HEADERS,
                )
            if path == "/metrics" and self.serve_metrics:
                return metrics_response(self.metrics)
            raise errors.not_found(path)
        except GatewayError as exc:
            self.metrics.error(exc.model, exc.code)
            return error_response(exc)
        except asyncio.CancelledError:
            raise
        except Exception:  # noqa: BLE001 - the catch-all that turns any bug into a 500 envelope
            # The request body and headers are deliberately not logged: they carry keys.
            log.exception("unhandled error for %s %s", request.method, request.path[:200])
            self.metrics.error("", "internal_error")
            return error_response(errors.internal_error())

    def _authenticate(self, request: web.BaseRequest) -> ApiKey:
        authorization = request.headers.get("Authorization")
        key = self.keys.authenticate(authorization)
        if key is not None:
            return key
        # Anonymous mode serves requests without a key; a key the gateway does not know is
        # refused as soon as it knows any (a typo or a revoked key is a 401, never full access).
        if self.settings.anonymous and not (authorization and len(self.keys)):
            return ANONYMOUS
        raise errors.invalid_api_key()

    # -- model discovery --------------------------------------------------------------

    def _list_models(self, request: web.BaseRequest) -> web.Response:
        key = self._authenticate(request)
        data = [
            {"id": name, "object": "model", "created": route.created, "owned_by": route.owned_by}
            for name, route in self.routes.table.listed
            if key.allows(route)
        ]
        body = json.dumps({"object": "list", "data": data}).encode()
        return web.Response(body=body, headers=JSON_HEADERS)

    def _get_model(self, request: web.BaseRequest, model: str) -> web.Response:
        key = self._authenticate(request)
        route = self.routes.table.lookup(model)
        if route is None or not key.allows(route):
            raise errors.model_not_found(model)
        card = {
            "id": model,
            "object": "model",
            "created": route.created,
            "owned_by": route.owned_by,
        }
        return web.Response(body=json.dumps(card).encode(), headers=JSON_HEADERS)

    # -- forwarding -------------------------------------------------------------------

    async def _forward(self, request: web.BaseRequest) -> web.StreamResponse:
        started = asyncio.get_running_loop().time()
        key = self._authenticate(request)
        limit = self.settings.max_concurrency_per_key
        active = self._per_key.get(key.name, 0)
        if limit and active >= limit:
            raise errors.too_many_requests(limit, self.settings.retry_after_seconds)
        cap = self.settings.max_body_bytes
        length = request.content_length
        if length is not None and length > cap:
            raise errors.request_too_large(cap)
        # Claimed before a byte is read, so memory is bounded by the budget, not by clients.
        claim = self.budget.claim(length or 0)
        self._per_key[key.name] = active + 1
        task = self.in_flight.enter()
        sse: web.StreamResponse | None = None
        label = ""
        try:
            body = await read_body(request, claim, cap, self.settings.body_timeout)
            model, stream = await self.parser.fields(body)
            route = self.routes.table.lookup(model)
            if route is None or not key.allows(route):
                raise errors.model_not_found(model)
            label = route.model
            if model != route.model:
                # Only requests by alias (or namespace/name) pay for re-serialising the body.
                body = await self.parser.rewrite(body, route.model)
            payload = Payload(body, claim)
            del body  # from here the payload holds the only reference, dropped once sent
            mm = self.metrics.model(label)
            if not route.ready:
                route, sse = await self._hold(request, route, model, key, stream, mm)
            return await self._proxy(request, route, payload, mm, started, sse)
        except (GatewayError, asyncio.CancelledError) as exc:
            if isinstance(exc, asyncio.CancelledError):
                if not self.in_flight.cutting:
                    raise  # the client left
                exc = errors.shutting_down()
            exc.model = label
            if isinstance(exc, _StreamError):
                sse = exc.sse
            if sse is None:
                raise exc from None
            # The stream's 200 is already sent: end it with an error event instead.
            self.metrics.error(label, exc.code)
            await _end_stream(sse, errors.sse_error_event(exc.message, exc.code, exc.type))
            return sse
        finally:
            claim.release()
            self.in_flight.leave(task)
            remaining = self._per_key[key.name] - 1
            if remaining:
                self._per_key[key.name] = remaining
            else:
                del self._per_key[key.name]

    def _url(self, base: str, raw_path: str) -> URL:
        cache_key = (base, raw_path)
        url = self._urls.get(cache_key)
        if url is None:
            # Only origin-form /v1/... targets; no dot segments or empty ones reach a backend.
            if (
                not raw_path.startswith("/v1/")
                or ".." in raw_path
                or "//" in raw_path
                or "%2e" in raw_path.lower()
            ):
                raise errors.not_found(raw_path)
            url = URL(base + raw_path[3:], encoded=True)
            if len(self._urls) >= _URL_CACHE_SIZE:
                self._urls.clear()
            self._urls[cache_key] = url
        return url

    async def _send(
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

    async def _send_once_more(
        self, route: Route, request: web.BaseRequest, payload: Payload, headers: dict[str, str]
    ) -> aiohttp.ClientResponse:
        """Send to the next replica; where the first send never reached its backend, once more
        (to the replica after it, or on a fresh connection when there is one replica)."""
        assert self.session is not None and self._fresh is not None
        replicas = self._replicas(route)
        url = self._url(replicas[0], request.raw_path)
        try:
            return await self._send(self.session, url, payload.data, headers, route.model)
        except Unsent as exc:
            self.metrics.retry(route.model, exc.reason)
            log.warning("backend for %s not reached (%s); sending once more", route.model, exc)
        base = replicas[1 % len(replicas)]
        try:
            return await self._send(self._fresh, self._url(base, request.raw_path), payload.data, headers, route.model)
        except Unsent as exc:
            log.warning("backend for %s not reached again (%s)", route.model, exc)
            if exc.timeout:
                raise errors.backend_timeout(route.model) from None
            raise errors.backend_unavailable(route.model) from None

    def _replicas(self, route: Route) -> tuple[str, ...]:
        """The route's base URLs, starting at the next one round-robin."""
        bases = route.bases or ((route.base,) if route.base else ())
        if len(bases) < 2:
            return bases
        start = self._next_replica.get(route.key, 0) % len(bases)
        self._next_replica[route.key] = start + 1
        return bases[start:] + bases[:start]

    async def _proxy(
        self,
        request: web.BaseRequest,
        route: Route,
        payload: Payload,
        mm: ModelMetrics,
        started: float,
        sse: web.StreamResponse | None,
    ) -> web.StreamResponse:
        assert route.base is not None
        in_headers = request.headers
        headers = {
            **BACKEND_HEADERS,
            "Content-Type": in_headers.get("Content-Type", errors.JSON_CONTENT_TYPE),
        }
        for name in FORWARDED_HEADERS:
            value = in_headers.get(name)
            if value is not None:
                headers[name] = value
        mm.in_flight += 1
        try:
            resp = await self._send_once_more(route, request, payload, headers)
            payload.release()  # the backend has the body: its bytes go back to the budget
            try:
                content_type = resp.headers.get("Content-Type", errors.JSON_CONTENT_TYPE)
                if content_type.startswith("text/event-stream"):
                    return await self._relay_stream(request, resp, route, mm, started, sse)
                try:
                    data = await _read_capped(resp, self.settings.max_response_bytes, route.model)
                except TimeoutError:
                    raise errors.backend_timeout(route.model) from None
                except aiohttp.ClientError:
                    raise errors.backend_unavailable(route.model) from None
            finally:
                resp.release()
            status = resp.status
            if status < 400:
                usage = usage_from(data)
                if usage is not None:
                    mm.prompt_tokens += usage[0]
                    mm.completion_tokens += usage[1]
            else:
                self.metrics.error(route.model, f"backend_{status}")
                data = clean_error_body(data, status)
            if sse is not None:
                await _end_stream(sse, _as_sse(data, status))
                mm.duration.observe(asyncio.get_running_loop().time() - started)
                return sse
            mm.duration.observe(asyncio.get_running_loop().time() - started)
            return web.Response(body=data, status=status, headers={"Content-Type": content_type})
        finally:
            mm.in_flight -= 1

    async def _relay_stream(
        self,
        request: web.BaseRequest,
        resp: aiohttp.ClientResponse,
        route: Route,
        mm: ModelMetrics,
        started: float,
        out: web.StreamResponse | None,
    ) -> web.StreamResponse:
        loop = asyncio.get_running_loop()
        if out is None:
            out = web.StreamResponse(status=resp.status, headers=SSE_HEADERS)
            await out.prepare(request)
        content = resp.content
        write_timeout = self.settings.stream_write_timeout
        pending = b""
        first = True
        usage = None
        failed = False
        try:
            while True:
                try:
                    chunk = await content.readany()
                except (aiohttp.ClientError, TimeoutError) as exc:
                    log.warning("stream from %s broke: %s", route.model, type(exc).__name__)
                    failed = True
                    break
                if not chunk:
                    break
                data = pending + chunk if pending else chunk
                # Forward whole events only, so a failure never leaves half an event behind.
                end = complete_events_end(data)
                if end == len(data):
                    pending = b""
                elif len(data) > MAX_PENDING_EVENT:
                    pending = b""
                else:
                    pending, data = data[end:], data[:end]
                    if not data:
                        continue
                if first:
                    first = False
                    mm.ttft.observe(loop.time() - started)
                if b'"usage"' in data:
                    usage = usage_from(data) or usage
                try:
                    async with asyncio.timeout(write_timeout):
                        await out.write(data)
                except TimeoutError:
                    # The client stopped reading: cancel the generation and free the key's slot.
                    log.info("client of a %s stream read nothing for %.0fs; dropping it", route.model, write_timeout)
                    self.metrics.error(route.model, "stream_write_timeout")
                    resp.close()
                    if request.transport is not None:
                        request.transport.abort()
                    return out
                except (ConnectionError, aiohttp.ClientConnectionError):
                    resp.close()  # the client left: drop the backend connection so it stops work
                    return out
        except asyncio.CancelledError:
            if not self.in_flight.cutting:
                raise
            resp.close()
            gone = errors.shutting_down()
            self.metrics.error(route.model, gone.code)
            await _end_stream(out, errors.sse_error_event(gone.message, gone.code, gone.type))
            return out
        if failed:
            self.metrics.error(route.model, "backend_stream_interrupted")
            await _end_stream(
                out,
                errors.sse_error_event(
                    f"The backend serving '{route.model}' failed mid-stream.",
                    "backend_stream_interrupted",
                ),
            )
        else:
            await _end_stream(out, pending)
        if usage is not None:
            mm.prompt_tokens += usage[0]
            mm.completion_tokens += usage[1]
        mm.duration.observe(loop.time() - started)
        return out

    # -- scale from zero ----------------------------------------------------------------

    async def _hold(
        self,
        request: web.BaseRequest,
        route: Route,
        model: str,
        key: ApiKey,
        stream: bool,
        mm: ModelMetrics,
    ) -> tuple[Route, web.StreamResponse | None]:
        s = self.settings
        hold_key = route.key
        held = self._held.get(hold_key, 0)
        if held >= s.hold_queue_size:
            raise errors.queue_full(route.model, s.retry_after_seconds)
        self._held[hold_key] = held + 1
        mm.held += 1
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
                    raise _StreamError(exc, sse)
                changed = self.routes.changed
                wait = min(remaining, s.hold_keepalive_interval) if stream else remaining
                try:
                    await asyncio.wait_for(changed.wait(), wait)
                except TimeoutError:
                    if stream and loop.time() < deadline:
                        if sse is None:
                            sse = web.StreamResponse(status=200, headers=SSE_HEADERS)
                            await sse.prepare(request)
                        await sse.write(KEEPALIVE_COMMENT)
                current = self.routes.table.lookup(model)
                if current is None or not key.allows(current):
                    exc = errors.model_not_found(model)
                    if sse is None:
                        raise exc
                    raise _StreamError(exc, sse)
                if current.ready:
                    return current, sse
                route = current
        except asyncio.CancelledError:
            if not self.in_flight.cutting:
                raise
            exc = errors.shutting_down()
            if sse is None:
                raise exc from None
            raise _StreamError(exc, sse) from None
        finally:
            remaining_held = self._held[hold_key] - 1
            if remaining_held:
                self._held[hold_key] = remaining_held
            else:
                del self._held[hold_key]
            mm.held -= 1

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
        """One tiny completion: Ray Serve queues it and starts a replica for it."""
        assert self.session is not None and route.base is not None
        try:
            async with self.session.post(
                f"{route.base}/completions",
                json={"model": route.model, "prompt": "wake", "max_tokens": 1},
                timeout=aiohttp.ClientTimeout(
                    total=self.settings.hold_deadline + 1,
                    sock_connect=self.settings.backend_connect_timeout,
                ),
            ) as resp:
                await resp.read()
                log.info("woke %s: backend answered %d", route.model, resp.status)
        except (aiohttp.ClientError, TimeoutError) as exc:
            log.info("wake-up request to %s failed: %s", route.model, type(exc).__name__)
        finally:
            self._waking.discard(route.key)


class _StreamError(GatewayError):
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


def _as_sse(data: bytes, status: int) -> bytes:
    """A backend's JSON answer to a held stream whose 200 was already sent."""
    if status >= 400:
        try:
            parsed: Any = json.loads(data)
        except ValueError:
            parsed = None
        if isinstance(parsed, dict) and isinstance(parsed.get("error"), dict):
            return (
                b"data: "
                + json.dumps({"error": parsed["error"]}).encode()
                + b"\n\ndata: [DONE]\n\n"
            )
        return errors.sse_error_event(f"The backend answered {status}.", f"backend_{status}")
    return b"data: " + data.replace(b"\n", b"") + b"\n\ndata: [DONE]\n\n"


async def _read_capped(resp: aiohttp.ClientResponse, cap: int, model: str) -> bytes:
    """A non-streaming answer, refused past ``cap`` bytes rather than buffered whole."""
    length = resp.content_length
    if length is not None:
        if length > cap:
            raise errors.backend_response_too_large(model, cap)
        return await resp.read()
    chunks = []
    size = 0
    async for chunk in resp.content.iter_any():
        size += len(chunk)
        if size > cap:
            raise errors.backend_response_too_large(model, cap)
        chunks.append(chunk)
    return b"".join(chunks)


async def _end_stream(out: web.StreamResponse, tail: bytes) -> None:
    try:
        if tail:
            await out.write(tail)
        await out.write_eof()
    except (ConnectionError, aiohttp.ClientConnectionError):
        pass  # the client already left; nothing more to tell it


def metrics_response(metrics: GatewayMetrics) -> web.Response:
    return web.Response(body=metrics.render(), headers={"Content-Type": METRICS_CONTENT_TYPE})
