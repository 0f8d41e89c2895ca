"""The HTTP server (aiohttp's low-level server on uvloop), its sources, and the entry points."""

from __future__ import annotations

import asyncio
import gc
import logging
import signal
from collections.abc import Sequence
from typing import Any

import uvloop
from aiohttp import web
from aiohttp.web_protocol import RequestHandler

from . import errors
from .app import Gateway, error_response, metrics_response
from .auth import KeyStore, parse_keys
from .files import FileSource
from .k8s import KubeSource, own_namespace
from .metrics import GatewayMetrics
from .routing import RouteStore, build_table, parse_routes
from .settings import GatewaySettings

log = logging.getLogger(__name__)

MAX_HEADER_LINE = 8190
CUT_GRACE_S = 5.0  # for cut requests to write their last error event and finish


class _Protocol(RequestHandler):
    """aiohttp's connection handler plus a deadline for receiving a complete request head.

    aiohttp's keep-alive timer closes idle connections; this closes a client that trickles
    a request head (slowloris) once ``header_timeout`` has passed since it connected or
    since the first byte of a new request.
    """

    header_timeout = 10.0
    _head_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self._arm_head_timer()

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self._messages:  # a complete head was parsed
            self._cancel_head_timer()
        elif data and self._head_timer is None and self._idle():
            self._arm_head_timer()

    def connection_lost(self, exc: BaseException | None) -> None:
        self._cancel_head_timer()
        super().connection_lost(exc)

    def handle_error(
        self,
        request: web.BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        """Malformed HTTP gets the OpenAI envelope too, and its text is never logged.

        aiohttp's own answer is plain text quoting the bad line, which may hold a key.
        """
        if status >= 500:
            log.error("unhandled error in the HTTP layer: %s", type(exc).__name__)
            error = errors.internal_error()
        else:
            log.debug("malformed request: %s", type(exc).__name__)
            error = errors.GatewayError(
                status if status in (400, 413, 414, 431) else 400,
                "malformed_request",
                "The request is not valid HTTP/1.1.",
                close=True,
            )
        if request.writer.output_size > 0:
            raise ConnectionError("response already started")
        return error_response(error)

    def _idle(self) -> bool:
        # Waiting for the next request rather than running a handler (which reads the body).
        return self._waiter is not None and not self._waiter.done()

    def _arm_head_timer(self) -> None:
        self._head_timer = self._loop.call_later(self.header_timeout, self._head_timed_out)

    def _cancel_head_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_timed_out(self) -> None:
        self._head_timer = None
        if not self._messages and (self._waiter is None or not self._waiter.done()):
            if self._task_handler is None or self._idle():
                self.force_close()


class _Server(web.Server):
    def __init__(self, *args: Any, header_timeout: float, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.header_timeout = header_timeout

    def __call__(self) -> RequestHandler:
        protocol = _Protocol(self, loop=self._loop, **self._kwargs)
        protocol.header_timeout = self.header_timeout
        return protocol


class GatewayServer:
    """A running gateway: ``await start()``, then ``port``; ``await stop()`` to end it."""

    def __init__(self, settings: GatewaySettings) -> None:
        self.settings = settings
        self.routes = RouteStore()
        self.keys = KeyStore()
        self.metrics = GatewayMetrics()
        self.routes.add_listener(self.metrics.on_table)
        self.gateway = Gateway(
            settings,
            self.routes,
            self.keys,
            self.metrics,
            serve_metrics=settings.metrics_port is None,
        )
        self.port = 0
        self.metrics_port: int | None = None
        self._runners: list[web.BaseRunner] = []
        self._tasks: list[asyncio.Task[None]] = []
        self._kube: KubeSource | None = None

    async def start(self) -> None:
        s = self.settings
        await self.gateway.start()
        self._start_sources()
        server = _Server(
            self.gateway.handle,
            header_timeout=s.header_timeout,
            # A client that leaves cancels its handler, which drops the backend request.
            handler_cancellation=True,
            access_log=None,
            keepalive_timeout=s.idle_timeout,
            max_line_size=MAX_HEADER_LINE,
            max_field_size=MAX_HEADER_LINE,
        )
        self.port = await self._serve(server, s.port)
        if s.metrics_port is not None:

            async def metrics_only(request: web.BaseRequest) -> web.StreamResponse:
                if request.path == "/metrics":
                    return metrics_response(self.metrics)
                return web.Response(status=404)

            self.metrics_port = await self._serve(
                web.Server(metrics_only, access_log=None), s.metrics_port
            )
        log.info("gateway listening on %s:%d", s.host, self.port)

    async def _serve(self, server: web.Server, port: int) -> int:
        runner = web.ServerRunner(server, shutdown_timeout=CUT_GRACE_S)
        await runner.setup()
        self._runners.append(runner)
        site = web.TCPSite(runner, self.settings.host, port, backlog=1024)
        await site.start()
        return int(runner.addresses[0][1])

    def _start_sources(self) -> None:
        s = self.settings

        def set_backends(backends: list[Any]) -> None:
            self.routes.replace(build_table(backends, s.plain_name_namespaces))

        if s.keys_file is not None:
            keys = FileSource(s.keys_file, parse_keys, self.keys.replace, "API keys")
            keys.load()
            self._tasks.append(asyncio.create_task(keys.run(s.file_poll_interval)))
        elif s.routes_file is not None:
            self.keys.loaded = True  # local mode without a keys file: no keys, by design
        if s.routes_file is not None:
            routes = FileSource(s.routes_file, parse_routes, set_backends, "routes")
            routes.load()
            self._tasks.append(asyncio.create_task(routes.run(s.file_poll_interval)))
        else:
            self._kube = KubeSource(
                kubeconfig=s.kubeconfig,
                namespace=own_namespace(s.namespace),
                watch_namespaces=s.watch_namespaces,
                on_backends=set_backends,
                on_keys=self.keys.replace if s.keys_file is None else None,
                url_template=s.backend_url_template,
                capacity_share_of=s.replicas if s.endpoint_capacity else None,
                request_timeout=s.kube_request_timeout,
                watch_seconds=s.kube_watch_seconds,
                retry_max_delay=s.kube_retry_max_delay,
            )
            self._kube.start(asyncio.get_running_loop())
            kube = self._kube
            self.gateway.stale = lambda: kube.stale(s.kube_sync_max_age)

    async def drain(self) -> None:
        """Fail readiness but keep serving for drain_seconds: the endpoint leaves every
        Service (and kube-proxy's rules) before the listener closes, so no client is refused."""
        self.gateway.draining = True
        log.info("draining for %.1fs before stopping", self.settings.drain_seconds)
        await asyncio.sleep(self.settings.drain_seconds)

    async def stop(self) -> None:
        """Close the listeners, let requests in flight (held ones too) finish for
        shutdown_grace_seconds, then cut the rest: each ends in the envelope or an SSE error."""
        for runner in self._runners:
            for site in list(runner.sites):
                await site.stop()
        in_flight = self.gateway.in_flight
        if not await in_flight.wait(self.settings.shutdown_grace_seconds):
            log.warning("cutting %d requests still in flight after the grace period", in_flight.cut())
            await in_flight.wait(CUT_GRACE_S)
        if self._kube is not None:
            self._kube.stop()
        for task in self._tasks:
            task.cancel()
        for runner in self._runners:
            await runner.cleanup()
        await self.gateway.close()


def tune_gc() -> None:
    """Keep the collector off the hot path: everything loaded at startup is frozen out of
    collection, and young collections run rarely (the request path makes few cycles).
    Measured with bench/gateway.py: about a fifth less CPU per proxied request."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(50_000, 50, 100)


async def serve(settings: GatewaySettings) -> None:
    """Run until SIGTERM or SIGINT, then drain, finish in-flight requests and stop."""
    server = GatewayServer(settings)
    await server.start()
    tune_gc()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    try:
        await stop.wait()
        await server.drain()
    finally:
        await server.stop()


def run_gateway(settings: GatewaySettings) -> None:
    logging.basicConfig(
        level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    uvloop.run(serve(settings))


def main(argv: Sequence[str] | None = None) -> None:
    """``llmep gateway [--port N] [--routes-file F] ...``: flags mirror the settings' fields."""
    settings = GatewaySettings(
        _cli_parse_args=list(argv) if argv is not None else True,
        _cli_prog_name="llmep gateway",
        _cli_kebab_case=True,
        _cli_implicit_flags=True,
    )
    run_gateway(settings)
