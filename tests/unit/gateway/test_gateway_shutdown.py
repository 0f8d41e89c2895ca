"""Stopping and stalled clients as a client sees them: after SIGTERM the gateway keeps serving
for drain_seconds, lets requests finish for shutdown_grace_seconds, then ends what is left in
the envelope or with an SSE error event and [DONE]; a stream whose client stopped reading is
dropped after stream_write_timeout, its backend request cancelled and the key's slot freed.

The backends are small in-process OpenAI-shaped aiohttp servers (see conftest.py): they stand
in for generations that last as long as the test needs.
"""

from __future__ import annotations

import asyncio
import json

import httpx
import openai
import pytest

from tests.unit.gateway.conftest import until

pytestmark = [pytest.mark.unit, pytest.mark.asyncio]

CUT_EVENT = (
    'data: {"error": {"message": "The gateway is shutting down and its grace period for this request '
    'is over; retry.", "type": "server_error", "param": null, "code": "gateway_shutting_down"}}\n\n'
    "data: [DONE]\n\n"
)


async def test_requests_finish_within_the_grace_period_and_the_rest_are_cut_cleanly(
    backend_factory, gateway_factory
):
    quick = await backend_factory("quick", delay=0.3)
    slow = await backend_factory("slow", delay=5, chunks=100, chunk_delay=0.05)
    gw = await gateway_factory(
        [
            {"models": ["quick"], "url": quick.url},
            {"models": ["slow"], "url": slow.url},
            {"models": ["cold"], "url": slow.url, "ready": False},
        ],
        drain_seconds=0.2,
        shutdown_grace_seconds=1.0,
        wake_backend=False,
    )
    loop = asyncio.get_running_loop()
    async with httpx.AsyncClient(timeout=20) as h:

        async def post(model: str, stream: bool = False) -> httpx.Response:
            return await h.post(f"{gw.url}/chat/completions", json={"model": model, "stream": stream})

        stream_task = asyncio.create_task(post("slow", stream=True))
        slow_task = asyncio.create_task(post("slow"))
        held_task = asyncio.create_task(post("cold"))
        await until(lambda: len(slow.requests) == 2 and gw.server.metrics.model("cold").held == 1, timeout=10)
        stopping_at = loop.time()
        stopper = asyncio.create_task(gw.server.drain())
        quick_reply = await post("quick")  # arrives while draining: still served
        await stopper
        await gw.server.stop()
        stopped_after = loop.time() - stopping_at
        streamed, cut, held = await stream_task, await slow_task, await held_task

    assert quick_reply.status_code == 200
    assert quick_reply.headers["connection"] == "close"  # keep-alive clients move to another replica
    assert streamed.status_code == 200
    assert streamed.text.startswith('data: {"id": "chatcmpl-1"')
    assert streamed.text.endswith(CUT_EVENT)
    for reply in (cut, held):
        assert reply.status_code == 503
        assert reply.json()["error"]["code"] == "gateway_shutting_down"
    assert stopped_after >= 0.2 + 1.0  # nothing was cut before drain_seconds + shutdown_grace_seconds
    await until(lambda: slow.disconnects == 1, timeout=10)  # the cut stream's backend request was cancelled


async def test_a_request_that_finishes_within_the_grace_period_is_answered_whole(
    backend_factory, gateway_factory
):
    backend = await backend_factory("b", delay=0.5)
    gw = await gateway_factory([{"models": ["m"], "url": backend.url}], drain_seconds=0, shutdown_grace_seconds=5)
    client = openai.AsyncOpenAI(base_url=gw.url, api_key="unused", max_retries=0)
    request = asyncio.create_task(client.chat.completions.create(model="m", messages=[]))
    await until(lambda: len(backend.requests) == 1, timeout=10)

    await gw.server.stop()

    assert (await request).choices[0].message.content == "from b"


async def test_a_stream_whose_client_stopped_reading_is_dropped_and_its_slot_freed(
    backend_factory, gateway_factory
):
    backend = await backend_factory("b", chunks=100_000, pad=16_384)
    gw = await gateway_factory(
        [{"models": ["m"], "url": backend.url}],
        keys=[{"name": "a", "key": "sk-a"}],
        max_concurrency_per_key=1,
        stream_write_timeout=0.5,
    )
    body = json.dumps({"model": "m", "stream": True}).encode()
    reader, writer = await asyncio.open_connection("127.0.0.1", gw.server.port)
    writer.write(
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: gw\r\nAuthorization: Bearer sk-a\r\n"
        b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)
    )
    await writer.drain()
    assert (await reader.readline()).startswith(b"HTTP/1.1 200")  # then it never reads again

    await until(lambda: backend.disconnects == 1, timeout=10)
    client = openai.AsyncOpenAI(base_url=gw.url, api_key="sk-a", max_retries=0)
    after = await client.chat.completions.create(model="m", messages=[])
    async with httpx.AsyncClient() as h:
        metrics = (await h.get(f"{gw.root}/metrics")).text
    writer.close()

    assert after.choices[0].message.content == "from b"  # the key's one slot is free again
    assert 'llmep_gateway_errors_total{code="stream_write_timeout",model="m"} 1.0' in metrics
