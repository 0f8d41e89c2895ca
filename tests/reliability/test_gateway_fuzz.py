"""Fuzzing the gateway's request handling with hypothesis: 10,000+ generated bodies and headers.

Whatever a client sends, the gateway answers: never a 5xx of its own, never a crash or a
logged exception, and every error it produces is OpenAI's envelope. The backend behind it is a
small in-process OpenAI-shaped aiohttp server: it stands in for vLLM for speed (the real
Ray Serve + vLLM path is covered in tests/serving). Requests go over one keep-alive
connection, reopened only when the gateway closes it on purpose (413, 408).
"""

from __future__ import annotations

import asyncio
import http.client
import json
import logging
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from aiohttp import web
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from llmep_serving.gateway import GatewayServer, GatewaySettings

pytestmark = pytest.mark.reliability

KEY = "sk-fuzz-0123456789"
CAP = 16 * 1024
PATHS = ["/v1/chat/completions", "/v1/completions", "/v1/embeddings", "/v1/responses", "/v1/x/y"]


class _Errors(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


async def _backend(request: web.Request) -> web.StreamResponse:
    try:
        body = await request.json()
    except ValueError:
        return web.json_response(
            {
                "error": {
                    "message": "bad",
                    "type": "invalid_request_error",
                    "param": None,
                    "code": None,
                }
            },
            status=400,
        )
    if body.get("stream") is True:
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        await resp.write(b'data: {"choices": []}\n\ndata: [DONE]\n\n')
        return resp
    return web.json_response(
        {
            "object": "chat.completion",
            "choices": [],
            "usage": {"prompt_tokens": 1, "completion_tokens": 1},
        }
    )


class _Stack:
    """Backend and gateway on their own event loop in a thread, so hypothesis stays sync."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.loop = asyncio.new_event_loop()
        self.ready = threading.Event()
        self.port = 0
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.run_until_complete(self._start())
        self.ready.set()
        self.loop.run_forever()

    async def _start(self) -> None:
        app = web.Application()
        app.router.add_post("/v1/{tail:.*}", _backend)
        self.backend = web.AppRunner(app)
        await self.backend.setup()
        await web.TCPSite(self.backend, "127.0.0.1", 0).start()
        backend_port = self.backend.addresses[0][1]
        routes = self.tmp / "routes.json"
        routes.write_text(
            json.dumps(
                [
                    {"models": ["m", "alias"], "url": f"http://127.0.0.1:{backend_port}/v1"},
                    {
                        "models": ["cold"],
                        "url": f"http://127.0.0.1:{backend_port}/v1",
                        "ready": False,
                    },
                ]
            )
        )
        keys = self.tmp / "keys.json"
        keys.write_text(json.dumps([{"name": "fuzz", "key": KEY, "models": "m"}]))
        self.gateway = GatewayServer(
            GatewaySettings(
                host="127.0.0.1",
                port=0,
                routes_file=routes,
                keys_file=keys,
                max_body_bytes=CAP,
                hold_deadline=0,
                wake_backend=False,
                body_timeout=5,
            )
        )
        await self.gateway.start()
        self.port = self.gateway.port

    def stop(self) -> None:
        async def stop() -> None:
            await self.gateway.stop()
            await self.backend.cleanup()

        asyncio.run_coroutine_threadsafe(stop(), self.loop).result(30)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[_Stack]:
    s = _Stack(tmp_path_factory.mktemp("fuzz"))
    s.thread.start()
    assert s.ready.wait(30)
    yield s
    s.stop()


@pytest.fixture(scope="module")
def logged_errors() -> Iterator[_Errors]:
    handler = _Errors()
    logger = logging.getLogger("llmep_serving.gateway")
    logger.addHandler(handler)
    yield handler
    logger.removeHandler(handler)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | st.text(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=6,
)
models = st.sampled_from(["m", "alias", "cold", "nope", "", "M", "m\x00"]) | json_values
request_objects = st.fixed_dictionaries(
    {},
    optional={
        "model": models,
        "stream": st.booleans() | json_values,
        "messages": json_values,
        "max_tokens": st.integers(min_value=-(10**30), max_value=10**30),
        "extra": json_values,
    },
)


def _deep(depth: int, opener: bytes, closer: bytes) -> bytes:
    return opener * depth + closer * depth


bodies = st.one_of(
    request_objects.map(lambda o: json.dumps(o).encode()),
    st.tuples(request_objects.map(lambda o: json.dumps(o).encode()), st.integers(0, 200)).map(
        lambda t: t[0][: t[1]]  # truncated JSON
    ),
    st.tuples(
        request_objects.map(lambda o: json.dumps(o).encode()),
        st.binary(min_size=1, max_size=4),
        st.integers(0, 100),
    ).map(
        lambda t: t[0][: t[2]] + b"\xff\xfe" + t[1] + t[0][t[2] :]  # invalid UTF-8
    ),
    st.integers(1, 3000).map(lambda d: b'{"model": "m", "x": ' + _deep(d, b"[", b"]") + b"}"),
    st.integers(1, 3000).map(lambda d: _deep(d, b'{"a":', b"}").replace(b"}", b"1}", 1)),
    st.integers(300, 6000).map(lambda n: b'{"model": "m", "n": ' + b"9" * n + b"}"),
    st.sampled_from(
        [
            b'{"model": "m", "n": 1e999}',
            b'{"model": "m", "n": -1e999}',
            b'{"model": "m", "n": NaN}',
            b"null",
            b"[]",
            b'"m"',
            b"",
            b"{}",
        ]
    ),
    st.binary(max_size=300),
    st.integers(CAP - 10, CAP + 100).map(lambda n: b'{"model": "m", "p": "' + b"x" * n + b'"}'),
)
header_values = st.binary(max_size=40).map(
    lambda b: b.replace(b"\r", b"").replace(b"\n", b"").strip()
)
authorization = (
    st.sampled_from(
        [f"Bearer {KEY}".encode(), b"Bearer sk-wrong", b"", b"Bearer", f"bearer {KEY}".encode()]
    )
    | header_values
)
content_types = (
    st.sampled_from([b"application/json", b"text/plain", b"", b"application/json; charset=latin-1"])
    | header_values
)


def _assert_answer(status: int, headers: http.client.HTTPMessage, body: bytes) -> None:
    assert status < 500, (status, body[:300])
    if status >= 400:
        assert headers.get("Content-Type", "").startswith("application/json"), (status, body)
        error = json.loads(body)["error"]
        assert set(error) == {"message", "type", "param", "code"}
        assert isinstance(error["message"], str) and "Traceback" not in error["message"]


class _Client:
    def __init__(self, port: int) -> None:
        self.port = port
        self.conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        self.sent = 0

    def send(self, path: str, body: bytes, headers: dict[str, bytes], chunked: bool) -> None:
        try:
            self._send(path, body, headers, chunked)
        except BaseException:
            self._reconnect()  # leave a clean connection for the next example
            raise

    def _reconnect(self) -> None:
        self.conn.close()
        self.conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)

    def _send(self, path: str, body: bytes, headers: dict[str, bytes], chunked: bool) -> None:
        conn = self.conn
        conn.putrequest("POST", path, skip_accept_encoding=True)
        for name, value in headers.items():
            conn.putheader(name, value)
        if chunked:
            conn.putheader("Transfer-Encoding", "chunked")
            parts = [body[i : i + 1000] for i in range(0, len(body), 1000)]
            payload = b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in parts) + b"0\r\n\r\n"
        else:
            conn.putheader("Content-Length", str(len(body)))
            payload = body
        try:
            conn.endheaders(payload)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the gateway answered and closed before reading it all (malformed head, 413)
        resp = conn.getresponse()
        data = resp.read()
        self.sent += 1
        _assert_answer(resp.status, resp.headers, data)
        if resp.will_close:
            self._reconnect()


@pytest.fixture(scope="module")
def fuzz_client(stack: _Stack) -> Iterator[_Client]:
    c = _Client(stack.port)
    yield c
    c.conn.close()


@settings(
    max_examples=10_000,
    deadline=None,
    database=None,
    suppress_health_check=[
        HealthCheck.too_slow,
        HealthCheck.function_scoped_fixture,
        HealthCheck.data_too_large,
    ],
)
@given(
    path=st.sampled_from(PATHS),
    body=bodies,
    auth=authorization,
    content_type=content_types,
    extra=header_values,
    chunked=st.booleans(),
)
def test_no_request_makes_the_gateway_fail(
    fuzz_client, logged_errors, path, body, auth, content_type, extra, chunked
):
    headers = {"Content-Type": content_type, "X-Request-Id": extra}
    if auth:
        headers["Authorization"] = auth
    fuzz_client.send(path, body, headers, chunked)

    assert not logged_errors.records, [r.getMessage() for r in logged_errors.records]


def test_gateway_is_healthy_after_the_fuzzing(stack, fuzz_client, logged_errors):
    conn = http.client.HTTPConnection("127.0.0.1", stack.port, timeout=10)
    conn.request("GET", "/healthz")
    healthy = conn.getresponse()
    conn.request(
        "POST",
        "/v1/chat/completions",
        json.dumps({"model": "m", "messages": []}),
        {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"},
    )
    healthy.read()
    answered = conn.getresponse()

    assert fuzz_client.sent >= 10_000
    assert healthy.status == 200
    assert answered.status == 200 and json.loads(answered.read())["usage"]
    assert not logged_errors.records
