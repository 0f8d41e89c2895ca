"""Relaying a backend's SSE stream to the client: whole events only, a bound on a client that
stops reading, an error event rather than a bare close when the stream cannot finish, and the
key's tokens settled from the stream's usage."""

from __future__ import annotations

import asyncio
import json
import logging
import re

import aiohttp
from aiohttp import web

from . import errors
from .drain import InFlight
from .metrics import GatewayMetrics, ModelMetrics, usage_from
from .quota import Reservation
from .routing import Route
from .settings import GatewaySettings

log = logging.getLogger(__name__)

SSE_HEADERS = {
    "Content-Type": "text/event-stream",
    "Cache-Control": "no-cache",
    "X-Accel-Buffering": "no",  # tell any proxy in front not to buffer the stream
}
MAX_PENDING_EVENT = 1 << 20  # an SSE event larger than this is forwarded even if incomplete
_EVENT_END = re.compile(rb"\r\n\r\n|\n\n")


def complete_events_end(data: bytes) -> int:
    """Length of the prefix of ``data`` that ends on an SSE event boundary."""
    lf = data.rfind(b"\n\n")
    crlf = data.rfind(b"\r\n\r\n")
    return max(lf + 2 if lf >= 0 else 0, crlf + 4 if crlf >= 0 else 0)


def settle(
    reservation: Reservation, usage: tuple[int, int] | None, mm: ModelMetrics, metrics: GatewayMetrics
) -> None:
    """An answer's usage counted for its model and its key, and the key's reservation settled
    with it; an answer without usage keeps what was reserved."""
    if usage is None:
        reservation.settle(None)
        return
    mm.prompt_tokens += usage[0]
    mm.completion_tokens += usage[1]
    metrics.key_usage(reservation.key, reservation.model, usage[0], usage[1])
    reservation.settle(usage[0] + usage[1])


def _usage_event(event: bytes) -> tuple[int, int] | None:
    """(prompt, completion) of the chunk that stream_options.include_usage adds: no choices, a usage."""
    line = event.strip()
    if not line.startswith(b"data:"):
        return None
    try:
        chunk = json.loads(line[5:])
    except ValueError:
        return None
    if not isinstance(chunk, dict) or chunk.get("choices") != [] or not isinstance(chunk.get("usage"), dict):
        return None
    prompt, completion = chunk["usage"].get("prompt_tokens"), chunk["usage"].get("completion_tokens", 0)
    if not isinstance(prompt, int) or not isinstance(completion, int):
        return None
    return prompt, completion


def without_usage_event(data: bytes) -> tuple[bytes, tuple[int, int] | None]:
    """Whole SSE events less the usage chunk the gateway asked for on the client's behalf, and that
    chunk's usage. Only events that mention "usage" are parsed: in practice the stream's last."""
    kept = []
    usage = None
    start = 0
    for end in _EVENT_END.finditer(data):
        event = data[start : end.end()]
        start = end.end()
        found = _usage_event(event) if b'"usage"' in event else None
        if found is None:
            kept.append(event)
        else:
            usage = found
    kept.append(data[start:])
    return b"".join(kept), usage


async def end_stream(out: web.StreamResponse, tail: bytes) -> None:
    try:
        if tail:
            await out.write(tail)
        await out.write_eof()
    except (ConnectionError, aiohttp.ClientConnectionError):
        pass  # the client already left; nothing more to tell it


class StreamRelay:
    """Copies backend streams to clients, recording time to first token, usage and duration."""

    def __init__(self, settings: GatewaySettings, metrics: GatewayMetrics, in_flight: InFlight) -> None:
        self.settings = settings
        self.metrics = metrics
        self.in_flight = in_flight

    async def relay(
        self,
        request: web.BaseRequest,
        resp: aiohttp.ClientResponse,
        route: Route,
        mm: ModelMetrics,
        started: float,
        out: web.StreamResponse | None,
        reservation: Reservation,
        strip_usage: bool,
    ) -> web.StreamResponse:
        """``strip_usage``: the gateway asked for the usage chunk, which the client did not."""
        loop = asyncio.get_running_loop()
        if out is None:
            # Rate-limit headers go out with the head, before the first event.
            out = web.StreamResponse(status=resp.status, headers={**SSE_HEADERS, **reservation.headers})
            await out.prepare(request)
        content = resp.content
        write_timeout = self.settings.stream_write_timeout
        pending = b""
        first = True
        usage = None
        failed = False
        delivered = False  # the client has the stream's final "data: [DONE]"
        finished = False
        try:
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
                    if b'"usage"' in data:
                        if strip_usage:
                            data, found = without_usage_event(data)
                            usage = found or usage
                            if not data:
                                continue
                        else:
                            usage = usage_from(data) or usage
                    if first:
                        first = False
                        mm.ttft.observe(loop.time() - started)
                    try:
                        async with asyncio.timeout(write_timeout):
                            await out.write(data)
                    except TimeoutError:
                        # The client stopped reading: cancel the generation and free the key's slot.
                        log.info(
                            "client of a %s stream read nothing for %.0fs; dropping it", route.model, write_timeout
                        )
                        self.metrics.error(route.model, "stream_write_timeout")
                        resp.close()
                        if request.transport is not None:
                            request.transport.abort()
                        return out
                    except (ConnectionError, aiohttp.ClientConnectionError):
                        resp.close()  # the client left: drop the backend connection so it stops work
                        return out
                    delivered = delivered or b"data: [DONE]" in data
                if failed:
                    self.metrics.error(route.model, "backend_stream_interrupted")
                    await end_stream(
                        out,
                        errors.sse_error_event(
                            f"The backend serving '{route.model}' failed mid-stream.",
                            "backend_stream_interrupted",
                        ),
                    )
                else:
                    await end_stream(out, pending)
                    finished = True
            except asyncio.CancelledError:
                resp.close()
                if self.in_flight.cutting:
                    gone = errors.shutting_down()
                    self.metrics.error(route.model, gone.code)
                    await end_stream(out, errors.sse_error_event(gone.message, gone.code, gone.type))
                    return out
                if not delivered:
                    raise  # the client left mid-stream
                # Clients such as the openai SDK close the connection once they read [DONE], which
                # can cancel this handler before the backend's own end arrives: the answer is whole.
                finished = True
                task = asyncio.current_task()
                if task is not None:
                    task.uncancel()
        finally:
            # Charged whenever the usage is known, even if the client left after its usage chunk.
            if usage is not None or finished:
                settle(reservation, usage, mm, self.metrics)
        mm.duration.observe(loop.time() - started)
        return out
