"""Scale from zero as a client sees it: held requests, keep-alives, deadlines, wake-ups.

The backends are small in-process OpenAI-shaped aiohttp servers (see conftest.py): they stand
in for an endpoint scaled to zero, which a real backend cannot be made to be on cue, and keep
these tests fast. The real Ray Serve + vLLM path is covered in tests/serving.
"""

from __future__ import annotations

import asyncio

import httpx
import openai
import pytest

from tests.unit.gateway.conftest import until

pytestmark = [pytest.mark.unit, pytest.mark.asyncio]


def client(base_url: str) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=base_url, api_key="unused", max_retries=0)


def held(gw) -> float:
    return gw.server.metrics.model("m").held


async def test_held_request_is_forwarded_once_the_model_turns_ready(backend_factory, gateway_factory):
    backend = await backend_factory("b")
    gw = await gateway_factory([{"models": ["m"], "url": backend.url, "ready": False}])
    request = asyncio.create_task(client(gw.url).chat.completions.create(model="m", messages=[]))
    await until(lambda: held(gw) == 1)
    assert not request.done()

    await gw.set_routes([{"models": ["m"], "url": backend.url, "ready": True}])
    reply = await asyncio.wait_for(request, 5)

    assert reply.choices[0].message.content == "from b"
    assert held(gw) == 0
    # The gateway nudged the scaled-to-zero backend with one tiny completion.
    wake = [r for r, p in zip(backend.requests, backend.paths, strict=True) if p == "/v1/completions"]
    assert wake == [{"model": "m", "prompt": "wake", "max_tokens": 1}]


async def test_held_past_the_deadline_is_503_with_retry_after(backend_factory, gateway_factory):
    gw = await gateway_factory(
        [{"models": ["m"], "url": "http://127.0.0.1:9/v1", "ready": False}],
        hold_deadline=0.3,
        retry_after_seconds=7,
    )

    with pytest.raises(openai.InternalServerError) as err:
        await client(gw.url).chat.completions.create(model="m", messages=[])

    assert err.value.status_code == 503
    assert err.value.code == "model_not_ready"
    assert err.value.response.headers["retry-after"] == "7"


async def test_held_queue_full_is_503(backend_factory, gateway_factory):
    gw = await gateway_factory(
        [{"models": ["m"], "url": "http://127.0.0.1:9/v1", "ready": False}],
        hold_queue_size=1,
        hold_deadline=2,
    )
    first = asyncio.create_task(client(gw.url).chat.completions.create(model="m", messages=[]))
    await until(lambda: held(gw) == 1)

    with pytest.raises(openai.InternalServerError) as err:
        await client(gw.url).chat.completions.create(model="m", messages=[])
    first.cancel()

    assert err.value.status_code == 503
    assert err.value.code == "model_queue_full"
    assert "retry-after" in err.value.response.headers


async def test_held_stream_gets_keepalive_comments_then_the_answer(backend_factory, gateway_factory):
    backend = await backend_factory("b", chunks=2)
    gw = await gateway_factory([{"models": ["m"], "url": backend.url, "ready": False}], hold_keepalive_interval=0.1)

    lines = []
    async with httpx.AsyncClient() as h:
        async with h.stream("POST", f"{gw.url}/chat/completions", json={"model": "m", "stream": True}) as reply:
            async for line in reply.aiter_lines():
                if line:
                    lines.append(line)
                if line == ": keep-alive" and lines.count(line) == 3:  # three keep-alives seen: now ready
                    await gw.set_routes([{"models": ["m"], "url": backend.url, "ready": True}])

    keepalives = [line for line in lines if line == ": keep-alive"]
    data = [line for line in lines if line.startswith("data: ")]
    assert reply.status_code == 200
    assert reply.headers["content-type"].startswith("text/event-stream")
    assert len(keepalives) >= 3
    assert lines.index(data[0]) > lines.index(keepalives[-1])
    assert data[-1] == "data: [DONE]"
    assert len(data) == 4  # two chunks, the usage chunk, [DONE]


async def test_held_stream_past_the_deadline_ends_with_an_sse_error(backend_factory, gateway_factory):
    gw = await gateway_factory(
        [{"models": ["m"], "url": "http://127.0.0.1:9/v1", "ready": False}],
        hold_keepalive_interval=0.1,
        hold_deadline=0.35,
    )

    stream = await client(gw.url).chat.completions.create(model="m", messages=[], stream=True)
    with pytest.raises(openai.APIError) as err:
        _ = [chunk async for chunk in stream]

    assert "has no ready replica yet" in err.value.message


async def test_sdk_stream_through_a_hold_sees_only_the_chunks(backend_factory, gateway_factory):
    backend = await backend_factory("b", chunks=3)
    gw = await gateway_factory([{"models": ["m"], "url": backend.url, "ready": False}], hold_keepalive_interval=0.05)

    # create() returns with the 200, which a held stream gets with its first keep-alive.
    stream = await client(gw.url).chat.completions.create(model="m", messages=[], stream=True)
    await gw.set_routes([{"models": ["m"], "url": backend.url, "ready": True}])
    texts = [c.choices[0].delta.content async for c in stream if c.choices]

    assert texts == ["0 ", "1 ", "2 "]


async def test_model_removed_while_held_is_404(backend_factory, gateway_factory):
    backend = await backend_factory("b")
    gw = await gateway_factory(
        [
            {"models": ["m"], "url": backend.url, "ready": False},
            {"models": ["other"], "url": backend.url, "ready": True},
        ]
    )
    request = asyncio.create_task(client(gw.url).chat.completions.create(model="m", messages=[]))
    await until(lambda: held(gw) == 1)

    await gw.set_routes([{"models": ["other"], "url": backend.url, "ready": True}])

    with pytest.raises(openai.NotFoundError):
        await asyncio.wait_for(request, 5)


async def test_held_stream_comments_carry_the_endpoints_progress(backend_factory, gateway_factory):
    """While the weights download, a held stream's keep-alives say how far along they are (from
    the endpoint's Ready condition, as the gateway's LLMEndpoint watch reads it)."""
    from llmep_serving.gateway.k8s import endpoint_to_backend
    from llmep_serving.gateway.routing import build_table

    backend = await backend_factory("b", chunks=1)
    gw = await gateway_factory([], hold_keepalive_interval=0.1)

    def publish(ready: bool, message: str) -> None:
        reason = "Serving" if ready else "DownloadingWeights"
        endpoint = {
            "metadata": {"name": "m", "namespace": "team-a", "creationTimestamp": "2026-01-01T00:00:00Z"},
            "spec": {"model": {"source": "s3://models/m"}},
            "status": {
                "url": "http://m-serve.team-a.svc:8000/v1",
                "models": ["m"],
                "conditions": [{"type": "Ready", "status": str(ready), "reason": reason, "message": message}],
            },
        }
        gw.server.routes.replace(build_table([endpoint_to_backend(endpoint, backend.url)]))

    publish(False, "downloading weights into the cache:\n1.2 of 14.0 GiB, 310 MiB/s, about 1 min")
    comments = []
    async with httpx.AsyncClient() as h:
        async with h.stream("POST", f"{gw.url}/chat/completions", json={"model": "m", "stream": True}) as reply:
            async for line in reply.aiter_lines():
                if line.startswith(":"):
                    comments.append(line)
                    if len(comments) == 2:
                        publish(False, "downloading weights into the cache: 9.8 of 14.0 GiB, 305 MiB/s, about 15 s")
                    if len(comments) == 4:
                        publish(True, "")

    assert comments[0] == (
        ": keep-alive; DownloadingWeights: downloading weights into the cache: 1.2 of 14.0 GiB, 310 MiB/s, about 1 min"
    )
    assert comments[-1].endswith("9.8 of 14.0 GiB, 305 MiB/s, about 15 s")
    assert reply.status_code == 200


async def test_a_held_stream_of_a_limited_key_carries_its_rate_limit_headers(backend_factory, gateway_factory):
    """The 200 of a held stream goes out before the model is ready: the key's x-ratelimit-*
    headers must be on it then, as on any stream's first bytes."""
    backend = await backend_factory("b", chunks=1)
    gw = await gateway_factory(
        [{"models": ["m"], "url": backend.url, "ready": False}],
        keys=[{"name": "app", "key": "sk-app", "rpm": 60}],
        hold_keepalive_interval=0.05,
    )
    request = {"model": "m", "stream": True}
    async with httpx.AsyncClient(headers={"Authorization": "Bearer sk-app"}) as h:
        async with h.stream("POST", f"{gw.url}/chat/completions", json=request) as reply:
            async for line in reply.aiter_lines():
                if line == ": keep-alive":
                    await gw.set_routes([{"models": ["m"], "url": backend.url, "ready": True}])
    assert reply.status_code == 200
    limits = (reply.headers["x-ratelimit-limit-requests"], reply.headers["x-ratelimit-remaining-requests"])
    assert limits == ("60", "59")
    assert reply.headers["x-ratelimit-reset-requests"].endswith("s")
