"""Forwarding a request to its backend and answering the client with what came back."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import aiohttp
from aiohttp import web

from . import errors
from .backend_client import BACKEND_HEADERS, BackendClient
from .backend_errors import clean_error_body
from .metrics import GatewayMetrics, ModelMetrics, usage_from
from .quota import Reservation
from .relay import StreamRelay, end_stream, settle
from .request_body import Payload
from .routing import Route
from .settings import GatewaySettings

FORWARDED_HEADERS = ("Accept", "X-Request-Id", "traceparent", "tracestate")


class Proxy:
    """Sends a request through the backend client and turns the backend's answer into the
    client's: a plain answer read whole (capped), a stream relayed as it comes."""

    def __init__(
        self,
        settings: GatewaySettings,
        metrics: GatewayMetrics,
        backends: BackendClient,
        relay: StreamRelay,
    ) -> None:
        self.settings = settings
        self.metrics = metrics
        self.backends = backends
        self.relay = relay

    async def forward(
        self,
        request: web.BaseRequest,
        route: Route,
        payload: Payload,
        mm: ModelMetrics,
        started: float,
        sse: web.StreamResponse | None,
        reservation: Reservation,
        strip_usage: bool,
    ) -> web.StreamResponse:
        """``sse`` is the response already started for a held stream, if any. The reservation is
        settled from a good answer's usage; an error answer leaves it to be released."""
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
        with mm.forwarding:
            resp = await self.backends.send(route, request.raw_path, payload, headers)
            payload.release()  # the backend has the body: its bytes go back to the budget
            try:
                content_type = resp.headers.get("Content-Type", errors.JSON_CONTENT_TYPE)
                if content_type.startswith("text/event-stream"):
                    return await self.relay.relay(request, resp, route, mm, started, sse, reservation, strip_usage)
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
                settle(reservation, usage_from(data), mm, self.metrics)
            else:
                self.metrics.error(route.model, f"backend_{status}")
                data = clean_error_body(data, status)
            if sse is not None:
                await end_stream(sse, _as_sse(data, status))
                mm.duration.observe(asyncio.get_running_loop().time() - started)
                return sse
            mm.duration.observe(asyncio.get_running_loop().time() - started)
            return web.Response(body=data, status=status, headers={"Content-Type": content_type})


def _as_sse(data: bytes, status: int) -> bytes:
    """A backend's JSON answer to a held stream whose 200 was already sent."""
    if status >= 400:
        try:
            parsed: Any = json.loads(data)
        except ValueError:
            parsed = None
        if isinstance(parsed, dict) and isinstance(parsed.get("error"), dict):
            return b"data: " + json.dumps({"error": parsed["error"]}).encode() + b"\n\ndata: [DONE]\n\n"
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
