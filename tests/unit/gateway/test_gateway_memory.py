"""Bounded memory as a client sees it: the body-byte budget (413, 429 with Retry-After), bodies
given back once forwarded, capped non-streaming answers, large bodies parsed off the loop.

The backends are small in-process OpenAI-shaped aiohttp servers (see conftest.py); the memory
figures of the real gateway process are in tests/reliability/test_gateway_limits.py.
"""

from __future__ import annotations

import asyncio

import httpx
import openai
import pytest

from tests.unit.gateway.conftest import until

pytestmark = [pytest.mark.unit, pytest.mark.asyncio]

PAD = "x" * 600  # a body of about 700 bytes


def client(base_url: str) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=base_url, api_key="unused", max_retries=0)


async def test_a_body_larger_than_the_whole_budget_is_413_naming_the_setting(backend_factory, gateway_factory):
    backend = await backend_factory("b")
    gw = await gateway_factory([{"models": ["m"], "url": backend.url}], max_inflight_body_bytes=500)

    with pytest.raises(openai.APIStatusError) as err:
        await client(gw.url).chat.completions.create(model="m", messages=[{"role": "user", "content": PAD}])

    assert err.value.status_code == 413
    assert err.value.body == {
        "message": f"Request body of {len(err.value.response.request.content)} bytes is larger than the "
        "gateway's budget for request bodies in flight, 500 bytes (max_inflight_body_bytes).",
        "type": "invalid_request_error",
        "param": None,
        "code": "request_too_large",
    }
    assert backend.requests == []


async def test_bodies_beyond_the_budget_are_429_with_retry_after_until_one_is_forwarded(
    backend_factory, gateway_factory
):
    backend = await backend_factory("b")
    routes = [{"models": ["m"], "url": backend.url, "ready": False}]
    gw = await gateway_factory(routes, max_inflight_body_bytes=1000, retry_after_seconds=3)
    messages = [{"role": "user", "content": PAD}]
    held = asyncio.create_task(client(gw.url).chat.completions.create(model="m", messages=messages))
    await until(lambda: gw.server.metrics.model("m").held == 1)  # its ~700 bytes are claimed

    async with httpx.AsyncClient() as h:
        refused = await h.post(f"{gw.url}/chat/completions", json={"model": "m", "messages": messages})
        small = await h.post(f"{gw.url}/chat/completions", json={"model": "nope"})
    await gw.set_routes([{"models": ["m"], "url": backend.url, "ready": True}])
    first = await asyncio.wait_for(held, 5)
    after = await client(gw.url).chat.completions.create(model="m", messages=messages)

    assert refused.status_code == 429
    assert refused.headers["retry-after"] == "3"
    assert refused.json() == {
        "error": {
            "message": "The gateway is holding its limit of request body bytes (1000 bytes, "
            "max_inflight_body_bytes); retry later.",
            "type": "rate_limit_error",
            "param": None,
            "code": "too_many_request_bytes",
        }
    }
    assert small.status_code == 404  # a body that fits beside the held one is read
    assert first.choices[0].message.content == after.choices[0].message.content == "from b"


async def test_a_streams_body_goes_back_to_the_budget_once_forwarded(backend_factory, gateway_factory):
    backend = await backend_factory("b", chunks=40, chunk_delay=0.05)
    gw = await gateway_factory([{"models": ["m"], "url": backend.url}], max_inflight_body_bytes=1000)
    messages = [{"role": "user", "content": PAD}]
    stream = await client(gw.url).chat.completions.create(model="m", messages=messages, stream=True)
    first = await anext(aiter(stream))  # the stream is open: its body reached the backend

    second = await client(gw.url).chat.completions.create(model="m", messages=messages)
    await stream.close()

    assert first.choices[0].delta.content == "0 "
    assert second.choices[0].message.content == "from b"


async def test_a_non_streaming_answer_over_the_cap_is_502_naming_the_setting(backend_factory, gateway_factory):
    backend = await backend_factory("big", answer_bytes=5000)
    gw = await gateway_factory([{"models": ["m"], "url": backend.url}], max_response_bytes=4096)

    with pytest.raises(openai.InternalServerError) as err:
        await client(gw.url).chat.completions.create(model="m", messages=[])

    assert err.value.status_code == 502
    assert err.value.body == {
        "message": "The backend serving 'm' answered with more than 4096 bytes (max_response_bytes).",
        "type": "server_error",
        "param": None,
        "code": "backend_response_too_large",
    }


async def test_bodies_parsed_in_the_worker_process_route_rewrite_and_fail_alike(backend_factory, gateway_factory):
    """offload_parse_bytes=0 sends every body to the parser process: same answers as in place."""
    backend = await backend_factory("b")
    gw = await gateway_factory([{"models": ["m", "alias"], "url": backend.url}], offload_parse_bytes=0)
    c = client(gw.url)

    by_alias = await c.chat.completions.create(model="alias", messages=[{"role": "user", "content": PAD}])
    async with httpx.AsyncClient() as h:
        bad = await h.post(f"{gw.url}/chat/completions", content=b'{"model": "m", ')
        typed = await h.post(f"{gw.url}/chat/completions", json={"model": "m", "stream": "yes"})

    assert by_alias.choices[0].message.content == "from b"
    assert backend.requests[0] == {"model": "m", "messages": [{"role": "user", "content": PAD}]}
    assert bad.status_code == 400
    assert bad.json()["error"] == {
        "message": "We could not parse the JSON body of your request (JSONDecodeError). "
        "The body must be a JSON object.",
        "type": "invalid_request_error",
        "param": None,
        "code": "invalid_json",
    }
    assert typed.json()["error"] == {
        "message": "Invalid type for 'stream': expected a boolean.",
        "type": "invalid_request_error",
        "param": "stream",
        "code": "invalid_type",
    }
