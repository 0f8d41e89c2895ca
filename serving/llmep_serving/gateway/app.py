"""Request dispatch: health, readiness, model discovery and the forwarding path, which ties
authentication, limits and body reading to holding (hold.py), a saturated model's fair queue
(fairness.py) and the proxy (proxy.py)."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Callable

from aiohttp import web

from . import errors
from .auth import ANONYMOUS, ApiKey, KeyStore
from .backend_client import BackendClient
from .budget import BodyBudget
from .drain import InFlight
from .errors import GatewayError
from .fairness import FairSharing
from .gauges import KeyedGauge
from .hold import HeldStreamError, HoldQueue
from .metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from .metrics import GatewayMetrics
from .proxy import Proxy
from .quota import QuotaExceeded, QuotaLimiter, prompt_estimate
from .relay import StreamRelay, complete_events_end, end_stream
from .request_body import BodyParser, Payload, read_body
from .routing import Route, RouteStore
from .settings import GatewaySettings

# complete_events_end moved to relay.py; tests still import it from here.
__all__ = ["Gateway", "complete_events_end", "error_response", "metrics_response"]

log = logging.getLogger(__name__)

JSON_HEADERS = {"Content-Type": errors.JSON_CONTENT_TYPE}
USAGE_PATHS = ("/chat/completions", "/completions")  # the APIs whose streams take stream_options
CLIENT_CLOSED = 499  # nginx's status for a request whose client left before its answer


class KeyCall:
    """What a key's request is counted under in the per-key metrics."""

    __slots__ = ("model", "status")

    def __init__(self) -> None:
        self.model = ""  # the served name, once resolved
        self.status = CLIENT_CLOSED


def error_response(exc: GatewayError) -> web.Response:
    headers = {**JSON_HEADERS, **exc.headers}
    if exc.retry_after is not None:
        headers["Retry-After"] = str(exc.retry_after)
    response = web.Response(body=exc.body(), status=exc.status, headers=headers)
    if exc.close:
        response.force_close()
    return response


def model_card(model_id: str, route: Route) -> dict[str, object]:
    """OpenAI's model object; a LoRA adapter's also names its base model, as vLLM lists adapters."""
    card: dict[str, object] = {"id": model_id, "object": "model", "created": route.created, "owned_by": route.owned_by}
    if route.parent is not None:
        card["parent"] = route.parent
    return card


def metrics_response(metrics: GatewayMetrics) -> web.Response:
    return web.Response(body=metrics.render(), headers={"Content-Type": METRICS_CONTENT_TYPE})


class Gateway:
    """One gateway: its routing table, keys, metrics, and the parts a request passes through."""

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
        self.backends = BackendClient(settings, metrics)
        self.holds = HoldQueue(settings, routes, self.in_flight, self.backends)
        self.proxy = Proxy(settings, metrics, self.backends, StreamRelay(settings, metrics, self.in_flight))
        self.quota = QuotaLimiter(settings.replicas)
        self.fair = FairSharing(settings, metrics)
        self._per_key = KeyedGauge()  # API key name -> its requests in progress

    async def start(self) -> None:
        await self.backends.start()

    async def close(self) -> None:
        self.holds.close()
        self.parser.close()
        await self.backends.close()

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
                    return web.Response(body=b'{"status":"draining"}', status=503, headers=JSON_HEADERS)
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
        data = [model_card(name, route) for name, route in self.routes.table.listed if key.allows(route)]
        body = json.dumps({"object": "list", "data": data}).encode()
        return web.Response(body=body, headers=JSON_HEADERS)

    def _get_model(self, request: web.BaseRequest, model: str) -> web.Response:
        key = self._authenticate(request)
        route = self.routes.table.lookup(model)
        if route is None or not key.allows(route):
            raise errors.model_not_found(model)
        return web.Response(body=json.dumps(model_card(model, route)).encode(), headers=JSON_HEADERS)

    # -- forwarding -------------------------------------------------------------------

    async def _forward(self, request: web.BaseRequest) -> web.StreamResponse:
        key = self._authenticate(request)
        call = KeyCall()
        try:
            response = await self._forward_for(request, key, call)
            call.status = response.status
        except GatewayError as exc:
            call.status = exc.status
            if isinstance(exc, QuotaExceeded):
                self.metrics.key_rate_limited(key.name, exc.model, exc.limit)
            elif key.limited:
                exc.headers = self.quota.headers(key)  # what the request left of the key's limits
            raise
        finally:
            self.metrics.key_request(key.name, call.model, call.status)
        if key.limited and not response.prepared:
            # A stream sent its headers at its start; a plain answer reports the limits once settled.
            response.headers.update(self.quota.headers(key))
        return response

    async def _forward_for(self, request: web.BaseRequest, key: ApiKey, call: KeyCall) -> web.StreamResponse:
        started = asyncio.get_running_loop().time()
        limit = self.settings.max_concurrency_per_key
        if limit and self._per_key[key.name] >= limit:
            raise errors.too_many_requests(limit, self.settings.retry_after_seconds)
        cap = self.settings.max_body_bytes
        length = request.content_length
        if length is not None and length > cap:
            raise errors.request_too_large(cap)
        # Claimed before a byte is read, so memory is bounded by the budget, not by clients.
        with self.budget.claim(length or 0) as claim, self._per_key.one(key.name), self.in_flight:
            sse: web.StreamResponse | None = None
            label = ""
            try:
                body = await read_body(request, claim, cap, self.settings.body_timeout)
                fields = await self.parser.fields(body)
                model = fields.model
                route = self.routes.table.lookup(model)
                if route is None or not key.allows(route):
                    raise errors.model_not_found(model)
                label = call.model = route.model
                max_tokens = self.settings.quota_default_max_tokens if fields.max_tokens is None else fields.max_tokens
                reservation = self.quota.reserve(key, label, prompt_estimate(len(body)) + max_tokens)
                # A stream settles a key's tokens from its usage chunk, asked for where the client did not.
                ask_usage = (
                    fields.stream
                    and not fields.include_usage
                    and (key.tpm is not None or key.tokens_per_day is not None)
                    and request.path.endswith(USAGE_PATHS)
                )
                with reservation:
                    if model != route.model or ask_usage:
                        # Only requests by alias, bare adapter name (or namespace/name), or streams
                        # whose usage is asked for pay for re-serialising the body: the backend
                        # knows "served" and "served:adapter".
                        body = await self.parser.rewrite(body, route.model, ask_usage)
                    payload = Payload(body, claim)
                    del body  # from here the payload holds the only reference, dropped once sent
                    mm = self.metrics.model(label)
                    if not route.ready:
                        ready = await self.holds.hold(
                            request, route, model, key, fields.stream, mm, reservation.headers
                        )
                        route, sse = ready.route, ready.sse
                    # The slot is held until the answer is relayed whole, a stream's until it ends.
                    async with self.fair.slot(route, key, sse):
                        return await self.proxy.forward(
                            request, route, payload, mm, started, sse, reservation, ask_usage
                        )
            except (GatewayError, asyncio.CancelledError) as exc:
                if isinstance(exc, asyncio.CancelledError):
                    if not self.in_flight.cutting:
                        raise  # the client left
                    exc = errors.shutting_down()
                exc.model = label
                if isinstance(exc, HeldStreamError):
                    sse = exc.sse
                if sse is None:
                    raise exc from None
                # The stream's 200 is already sent: end it with an error event instead.
                self.metrics.error(label, exc.code)
                await end_stream(sse, errors.sse_error_event(exc.message, exc.code, exc.type))
                return sse
