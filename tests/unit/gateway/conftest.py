"""Fixtures: small OpenAI-shaped backends and gateways, all on 127.0.0.1 in the test's loop.

The backends stand in for vLLM where a real one cannot be made to fail on cue (closing a
stream half-way, answering slowly) and for speed; the real Ray Serve + vLLM path through the
gateway is covered in tests/serving.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest_asyncio
import yaml
from aiohttp import web

from llmep_serving.gateway import GatewayServer, GatewaySettings


@dataclass
class FakeBackend:
    """An OpenAI-shaped server that says which backend answered and records what it got."""

    name: str
    chunks: int = 3
    chunk_delay: float = 0.0
    break_after: int | None = None  # close the connection after this many stream chunks
    delay: float = 0.0  # before answering a non-streaming request
    error: tuple[int, dict[str, Any]] | None = None  # answer every request with (status, body)
    crash: bool = False  # drop the connection after reading a request, before any answer
    pad: int = 0  # bytes of padding in each stream chunk, to fill socket buffers quickly
    answer_bytes: int = 0  # pad a non-streaming answer's content to this many bytes
    disconnects: int = 0  # streams whose client went away before the end
    gate: asyncio.Event | None = None  # non-streaming answers wait until the test sets it
    chunk_gate: asyncio.Semaphore | None = None  # each stream chunk after the first waits for a release
    chunks_sent: int = 0  # stream chunks written so far, over all streams
    eof_gate: asyncio.Event | None = None  # a stream's end, after its [DONE], waits until the test sets it
    requests: list[dict[str, Any]] = field(default_factory=list)
    paths: list[str] = field(default_factory=list)
    headers: list[dict[str, str]] = field(default_factory=list)
    url: str = ""
    runner: web.AppRunner | None = None

    async def handle(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        self.requests.append(body)
        self.paths.append(request.path_qs)
        self.headers.append(dict(request.headers))
        model = body.get("model")
        if self.crash:
            assert request.transport is not None
            request.transport.abort()  # the replica dies mid-generation, before its headers
            return web.Response()
        if self.error is not None:
            return web.json_response(self.error[1], status=self.error[0])
        if request.path.endswith("/embeddings"):
            return web.json_response(
                {
                    "object": "list",
                    "data": [{"object": "embedding", "index": 0, "embedding": [0.1, 0.2]}],
                    "model": model,
                    "usage": {"prompt_tokens": 2, "total_tokens": 2},
                }
            )
        if body.get("stream"):
            return await self._stream(request, model)
        if self.delay:
            await asyncio.sleep(self.delay)
        if self.gate is not None:
            await self.gate.wait()
        return web.json_response(
            {
                "id": "chatcmpl-1",
                "object": "chat.completion",
                "created": 1,
                "model": model,
                "choices": [
                    {
                        "index": 0,
                        "message": {"role": "assistant", "content": f"from {self.name}".ljust(self.answer_bytes)},
                        "finish_reason": "stop",
                    }
                ],
                "usage": {"prompt_tokens": 7, "completion_tokens": 3, "total_tokens": 10},
            }
        )

    async def _stream(self, request: web.Request, model: str) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        for i in range(self.chunks):
            if self.break_after is not None and i == self.break_after:
                assert request.transport is not None
                request.transport.abort()  # the backend dies half-way through the stream
                return resp
            if i and self.chunk_delay:
                await asyncio.sleep(self.chunk_delay)
            if i and self.chunk_gate is not None:
                await self.chunk_gate.acquire()
            chunk = {
                "id": "chatcmpl-1",
                "object": "chat.completion.chunk",
                "created": 1,
                "model": model,
                "choices": [{"index": 0, "delta": {"content": f"{i} " + " " * self.pad}, "finish_reason": None}],
            }
            try:
                await resp.write(b"data: " + json.dumps(chunk).encode() + b"\n\n")
            except ConnectionError:
                self.disconnects += 1  # the gateway dropped the stream: vLLM would abort the sequence
                return resp
            self.chunks_sent += 1
        final = {
            "id": "chatcmpl-1",
            "object": "chat.completion.chunk",
            "created": 1,
            "model": model,
            "choices": [],
            "usage": {"prompt_tokens": 5, "completion_tokens": self.chunks, "total_tokens": 9},
        }
        await resp.write(b"data: " + json.dumps(final).encode() + b"\n\ndata: [DONE]\n\n")
        if self.eof_gate is not None:
            await self.eof_gate.wait()
        await resp.write_eof()
        return resp

    async def start(self) -> None:
        app = web.Application()
        app.router.add_post("/v1/{tail:.*}", self.handle)
        self.runner = web.AppRunner(app, shutdown_timeout=0.5)  # a test may leave a slow answer behind
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        port = self.runner.addresses[0][1]
        self.url = f"http://127.0.0.1:{port}/v1"


@dataclass
class RunningGateway:
    server: GatewayServer
    routes_file: Path
    keys_file: Path | None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.port}/v1"

    @property
    def root(self) -> str:
        return f"http://127.0.0.1:{self.server.port}"

    async def set_routes(self, routes: list[dict[str, Any]]) -> None:
        """Rewrite the routes file and wait until the gateway has loaded it."""
        changed = self.server.routes.changed
        write_yaml(self.routes_file, routes)
        await asyncio.wait_for(changed.wait(), 5)

    async def set_keys(self, keys: list[dict[str, Any]]) -> None:
        """Rewrite the keys file and wait until the gateway has loaded it.

        Loaded: it holds as many keys as the file and knows each plain ``key`` by its name.
        """
        assert self.keys_file is not None
        write_yaml(self.keys_file, keys)
        store = self.server.keys

        def loaded() -> bool:
            if len(store) != len(keys):
                return False
            for entry in keys:
                if "key" in entry:
                    found = store.authenticate(f"Bearer {entry['key']}")
                    if found is None or found.name != entry["name"]:
                        return False
            return True

        await until(loaded)


async def until(predicate: Callable[[], object], timeout: float = 5.0) -> None:
    """Poll `predicate` every 10 ms until it is true; TimeoutError after `timeout` seconds."""
    async with asyncio.timeout(timeout):
        while not predicate():
            await asyncio.sleep(0.01)


def write_yaml(path: Path, data: Any) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(yaml.safe_dump(data))
    tmp.replace(path)  # atomic, like a ConfigMap update


GatewayFactory = Callable[..., Awaitable[RunningGateway]]


@pytest_asyncio.fixture
async def backend_factory() -> AsyncIterator[Callable[..., Awaitable[FakeBackend]]]:
    started: list[FakeBackend] = []

    async def make(name: str, **kwargs: Any) -> FakeBackend:
        backend = FakeBackend(name=name, **kwargs)
        await backend.start()
        started.append(backend)
        return backend

    yield make
    for backend in started:
        assert backend.runner is not None
        await backend.runner.cleanup()


@pytest_asyncio.fixture
async def gateway_factory(tmp_path: Path) -> AsyncIterator[GatewayFactory]:
    started: list[GatewayServer] = []

    async def make(
        routes: list[dict[str, Any]],
        keys: list[dict[str, Any]] | None = None,
        **settings: Any,
    ) -> RunningGateway:
        routes_file = tmp_path / f"routes-{len(started)}.yaml"
        write_yaml(routes_file, routes)
        keys_file = None
        if keys is not None:
            keys_file = tmp_path / f"keys-{len(started)}.yaml"
            write_yaml(keys_file, keys)
        defaults: dict[str, Any] = {
            "host": "127.0.0.1",
            "port": 0,
            "routes_file": routes_file,
            "keys_file": keys_file,
            "file_poll_interval": 0.02,
            "anonymous": keys is None,
            # A test that leaves a request open must not hold its teardown for the default 30 s.
            "shutdown_grace_seconds": 1,
        }
        server = GatewayServer(GatewaySettings(**{**defaults, **settings}))
        await server.start()
        started.append(server)
        return RunningGateway(server=server, routes_file=routes_file, keys_file=keys_file)

    yield make
    for server in started:
        await server.stop()
