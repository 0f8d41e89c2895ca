"""Limits and error answers as a client sees them: 400, 404, 405, 413, 429, timeouts, metrics.

The backends are small in-process OpenAI-shaped aiohttp servers (see conftest.py): they stand
in for faults a real backend cannot be made to produce and keep these tests fast. The real
Ray Serve + vLLM path is covered in tests/serving.
"""

from __future__ import annotations

import asyncio
import time

import httpx
import openai
import pytest

pytestmark = [pytest.mark.unit, pytest.mark.asyncio]


def client(base_url: str, key: str = "unused") -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=base_url, api_key=key, max_retries=0)


async def one_backend(backend_factory, gateway_factory, **settings):
    backend = await backend_factory("b", **settings.pop("backend", {}))
    gw = await gateway_factory([{"models": ["m"], "url": backend.url, "ready": True}], **settings)
    return backend, gw


def assert_envelope(reply: httpx.Response, status: int, code: str, param: str | None = None):
    assert reply.status_code == status
    assert reply.headers["content-type"].startswith("application/json")
    error = reply.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["code"] == code
    assert error["param"] == param
    assert "Traceback" not in error["message"]


async def raw_exchange(port: int, data: bytes, *, read_timeout: float = 5) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(data)
    await writer.drain()
    try:
        return await asyncio.wait_for(reader.read(65536), read_timeout)
    finally:
        writer.close()


async def test_body_over_the_cap_by_content_length_is_413(backend_factory, gateway_factory):
    backend, gw = await one_backend(backend_factory, gateway_factory, max_body_bytes=1000)

    with pytest.raises(openai.APIStatusError) as err:
        await client(gw.url).chat.completions.create(
            model="m", messages=[{"role": "user", "content": "x" * 2000}]
        )

    assert err.value.status_code == 413
    assert err.value.code == "request_too_large"
    assert backend.requests == []


async def test_chunked_body_over_the_cap_is_413_without_reading_it_all(
    backend_factory, gateway_factory
):
    backend, gw = await one_backend(backend_factory, gateway_factory, max_body_bytes=1000)
    chunk = b'{"model": "m", "pad": "' + b"x" * 600
    body = b"".join(b"%x\r\n%s\r\n" % (len(c), c) for c in (chunk, b"y" * 600, b'"}'))

    reply = await raw_exchange(
        gw.server.port,
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: gw\r\nAuthorization: Bearer k\r\n"
        b"Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
        + body
        + b"0\r\n\r\n",
    )

    assert reply.startswith(b"HTTP/1.1 413 ")
    assert b'"code": "request_too_large"' in reply
    assert backend.requests == []


async def test_invalid_json_is_400_in_the_envelope(backend_factory, gateway_factory):
    _, gw = await one_backend(backend_factory, gateway_factory)
    async with httpx.AsyncClient() as h:
        truncated = await h.post(f"{gw.url}/chat/completions", content=b'{"model": "m", ')
        not_object = await h.post(f"{gw.url}/chat/completions", content=b'["m"]')
        bad_utf8 = await h.post(f"{gw.url}/chat/completions", content=b'{"model": "\xff"}')
        empty = await h.post(f"{gw.url}/chat/completions", content=b"")

    assert_envelope(truncated, 400, "invalid_json")
    assert_envelope(not_object, 400, "invalid_json")
    assert_envelope(bad_utf8, 400, "invalid_json")
    assert_envelope(empty, 400, "invalid_json")


async def test_missing_or_mistyped_model_is_400_naming_the_param(backend_factory, gateway_factory):
    _, gw = await one_backend(backend_factory, gateway_factory)
    async with httpx.AsyncClient() as h:
        missing = await h.post(f"{gw.url}/chat/completions", json={"messages": []})
        number = await h.post(f"{gw.url}/chat/completions", json={"model": 7})
        stream = await h.post(f"{gw.url}/chat/completions", json={"model": "m", "stream": "yes"})

    assert_envelope(missing, 400, "missing_model", "model")
    assert_envelope(number, 400, "invalid_type", "model")
    assert_envelope(stream, 400, "invalid_type", "stream")


async def test_unknown_paths_and_methods_answer_in_the_envelope(backend_factory, gateway_factory):
    _, gw = await one_backend(backend_factory, gateway_factory)
    async with httpx.AsyncClient() as h:
        unknown = await h.get(f"{gw.root}/admin")
        v1_get = await h.get(f"{gw.url}/chat/completions")
        delete = await h.delete(f"{gw.url}/models")
        traversal = await h.post(f"{gw.root}/v1/%2e%2e/metrics", json={"model": "m"})

    assert_envelope(unknown, 404, "not_found")
    assert_envelope(v1_get, 404, "not_found")
    assert_envelope(delete, 405, "method_not_allowed")
    assert_envelope(traversal, 404, "not_found")


async def test_absolute_form_request_target_is_not_forwarded(backend_factory, gateway_factory):
    backend, gw = await one_backend(backend_factory, gateway_factory)

    reply = await raw_exchange(
        gw.server.port,
        b"POST http://elsewhere/v1/chat/completions HTTP/1.1\r\nHost: gw\r\n"
        b'Content-Type: application/json\r\nContent-Length: 13\r\n\r\n{"model":"m"}',
    )

    assert reply.startswith(b"HTTP/1.1 404 ")
    assert backend.requests == []


async def test_per_key_concurrency_over_the_limit_is_429_with_retry_after(
    backend_factory, gateway_factory
):
    gate = asyncio.Event()
    backend, gw = await one_backend(
        backend_factory,
        gateway_factory,
        backend={"gate": gate},
        max_concurrency_per_key=1,
        retry_after_seconds=2,
        keys=[{"name": "a", "key": "sk-a"}, {"name": "b", "key": "sk-b"}],
    )
    first = asyncio.create_task(
        client(gw.url, "sk-a").chat.completions.create(model="m", messages=[])
    )
    async with asyncio.timeout(10):  # the first request holds key a's one slot once it is at the backend
        while not backend.requests:
            await asyncio.sleep(0.01)

    with pytest.raises(openai.RateLimitError) as err:
        await client(gw.url, "sk-a").chat.completions.create(model="m", messages=[])
    other_key = asyncio.create_task(client(gw.url, "sk-b").chat.completions.create(model="m", messages=[]))
    async with asyncio.timeout(10):  # key b has its own slot: its request reaches the backend too
        while len(backend.requests) < 2:
            await asyncio.sleep(0.01)
    gate.set()
    done, other_key = await first, await other_key
    after = await client(gw.url, "sk-a").chat.completions.create(model="m", messages=[])

    assert err.value.response.headers["retry-after"] == "2"
    assert err.value.code == "rate_limit_exceeded"
    assert other_key.choices and done.choices and after.choices


async def test_slowloris_is_closed_by_the_header_timeout(backend_factory, gateway_factory):
    _, gw = await one_backend(backend_factory, gateway_factory, header_timeout=0.3)
    reader, writer = await asyncio.open_connection("127.0.0.1", gw.server.port)
    started = time.monotonic()
    closed_after = None
    head = b"POST /v1/chat/completions HTTP/1.1\r\nHost: gw\r\n" + b"X-Drip: a\r\n" * 40
    for byte in head:  # one byte every 20 ms, never finishing the head
        try:
            writer.write(bytes([byte]))
            await writer.drain()
        except ConnectionError:
            closed_after = time.monotonic() - started
            break
        if reader.at_eof() or (await _eof_within(reader, 0.02)):
            closed_after = time.monotonic() - started
            break
    writer.close()

    assert closed_after is not None, "the gateway kept a trickling connection open"
    assert 0.25 < closed_after < 1.5


async def _eof_within(reader: asyncio.StreamReader, seconds: float) -> bool:
    try:
        return await asyncio.wait_for(reader.read(1), seconds) == b""
    except TimeoutError:
        return False


async def test_idle_keepalive_connection_is_closed(backend_factory, gateway_factory):
    _, gw = await one_backend(backend_factory, gateway_factory, idle_timeout=0.3)
    reader, writer = await asyncio.open_connection("127.0.0.1", gw.server.port)
    writer.write(b"GET /healthz HTTP/1.1\r\nHost: gw\r\n\r\n")
    first = await reader.readuntil(b'{"status":"ok"}')

    rest = await asyncio.wait_for(reader.read(), 2)  # returns once the gateway closes

    writer.close()
    assert first.startswith(b"HTTP/1.1 200")
    assert rest == b""


async def test_health_readiness_and_metrics(backend_factory, gateway_factory):
    backend, gw = await one_backend(backend_factory, gateway_factory, backend={"chunks": 2})
    c = client(gw.url)
    await c.chat.completions.create(model="m", messages=[])
    stream = await c.chat.completions.create(model="m", messages=[], stream=True)
    _ = [chunk async for chunk in stream]
    with pytest.raises(openai.NotFoundError):
        await c.chat.completions.create(model="nope", messages=[])

    async with httpx.AsyncClient() as h:
        health = await h.get(f"{gw.root}/healthz")
        ready = await h.get(f"{gw.root}/readyz")
        metrics = (await h.get(f"{gw.root}/metrics")).text

    assert health.status_code == 200 and ready.status_code == 200
    assert 'llmep_gateway_prompt_tokens_total{model="m"} 12.0' in metrics  # 7 + 5
    assert 'llmep_gateway_completion_tokens_total{model="m"} 5.0' in metrics  # 3 + 2
    assert 'llmep_gateway_time_to_first_token_seconds_count{model="m"} 1.0' in metrics
    assert 'llmep_gateway_request_duration_seconds_count{model="m"} 2.0' in metrics
    assert 'llmep_gateway_requests_in_flight{model="m"} 0.0' in metrics
    assert 'llmep_gateway_errors_total{code="model_not_found",model=""} 1.0' in metrics
    # A name a client made up never becomes a label.
    assert 'model="nope"' not in metrics


async def test_metrics_on_a_separate_port(backend_factory, gateway_factory):
    _, gw = await one_backend(backend_factory, gateway_factory, metrics_port=0)
    async with httpx.AsyncClient() as h:
        on_api = await h.get(f"{gw.root}/metrics")
        separate = await h.get(f"http://127.0.0.1:{gw.server.metrics_port}/metrics")

    assert on_api.status_code == 404
    assert "llmep_gateway_requests_in_flight" in separate.text
