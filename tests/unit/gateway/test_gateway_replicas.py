"""A route with several replica URLs: round-robin, and a replica that refuses or drops the
connection before answering is skipped for the next one, so no request is lost to it.

The backends are small in-process OpenAI-shaped aiohttp servers (see conftest.py); the real
Ray Serve + vLLM path is covered in tests/serving.
"""

from __future__ import annotations

import asyncio
import socket

import aiohttp
import pytest

from llmep_serving.gateway.routing import build_table, parse_routes

CHAT = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}


def _closed_port_url() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}/v1"  # nothing listens there once closed


def test_a_routes_entry_may_list_several_urls_for_one_model():
    table = build_table(parse_routes([{"models": ["m", "alias"], "url": ["http://a/v1/", "http://b/v1"]}]))
    route = table.lookup("alias")
    assert route is not None
    assert route.base == "http://a/v1" and route.bases == ("http://a/v1", "http://b/v1")
    with pytest.raises(ValueError):
        parse_routes([{"models": ["m"], "url": []}])
    with pytest.raises(ValueError):
        parse_routes([{"models": ["m"], "url": ["http://a/v1", 3]}])


@pytest.mark.asyncio
async def test_requests_alternate_between_replicas(backend_factory, gateway_factory):
    a, b = await backend_factory("a"), await backend_factory("b")
    gw = await gateway_factory([{"models": ["m"], "url": [a.url, b.url]}])
    async with aiohttp.ClientSession() as session:
        for _ in range(10):
            async with session.post(f"{gw.url}/chat/completions", json=CHAT) as resp:
                assert resp.status == 200
    assert (len(a.requests), len(b.requests)) == (5, 5)


@pytest.mark.asyncio
async def test_a_refusing_replica_is_skipped_and_no_request_fails(backend_factory, gateway_factory):
    alive = await backend_factory("alive")
    gw = await gateway_factory([{"models": ["m"], "url": [_closed_port_url(), alive.url]}])
    async with aiohttp.ClientSession() as session:
        for stream in (False, True) * 5:
            async with session.post(f"{gw.url}/chat/completions", json={**CHAT, "stream": stream}) as resp:
                assert resp.status == 200
                body = await resp.text()
                assert "from alive" in body or "[DONE]" in body
    assert len(alive.requests) == 10


@pytest.mark.asyncio
async def test_a_replica_that_went_away_after_being_pooled_is_skipped(backend_factory, gateway_factory):
    a, b = await backend_factory("a"), await backend_factory("b")
    gw = await gateway_factory([{"models": ["m"], "url": [a.url, b.url]}])
    async with aiohttp.ClientSession() as session:
        for _ in range(2):  # one pooled connection to each replica
            async with session.post(f"{gw.url}/chat/completions", json=CHAT) as resp:
                assert resp.status == 200
        assert a.runner is not None
        await a.runner.cleanup()  # replica a dies: its listener and connections close
        for _ in range(6):
            async with session.post(f"{gw.url}/chat/completions", json=CHAT) as resp:
                assert resp.status == 200, await resp.text()
                assert (await resp.json())["choices"][0]["message"]["content"] == "from b"
    assert len(b.requests) == 7


@pytest.mark.asyncio
async def test_with_every_replica_down_the_answer_is_502_backend_unavailable(gateway_factory):
    gw = await gateway_factory([{"models": ["m"], "url": [_closed_port_url(), _closed_port_url()]}])
    async with aiohttp.ClientSession() as session:
        async with session.post(f"{gw.url}/chat/completions", json=CHAT) as resp:
            assert resp.status == 502
            assert (await resp.json())["error"]["code"] == "backend_unavailable"


@pytest.mark.asyncio
async def test_draining_gateway_fails_readiness_and_still_answers(backend_factory, gateway_factory):
    """After SIGTERM the pod leaves the Service (readiness fails) while it still serves what arrives."""
    backend = await backend_factory("b")
    gw = await gateway_factory([{"models": ["m"], "url": backend.url}], drain_seconds=30)
    async with aiohttp.ClientSession() as session:
        async with session.get(f"{gw.root}/readyz") as resp:
            assert resp.status == 200
        # The task marks the gateway at its first step, before the request below is sent.
        drain = asyncio.create_task(gw.server.drain())
        try:
            async with session.get(f"{gw.root}/readyz") as resp:
                assert (resp.status, await resp.json()) == (503, {"status": "draining"})
            async with session.post(f"{gw.url}/chat/completions", json=CHAT) as resp:
                assert resp.status == 200
            assert not drain.done()
        finally:
            drain.cancel()


@pytest.mark.asyncio
async def test_a_request_whose_replica_crashed_on_it_is_not_sent_to_another(backend_factory, gateway_factory):
    """vLLM answers a non-streaming request only once it has generated it: a replica that drops
    the connection after reading the request may have run it, so it is never replayed."""
    a, b = await backend_factory("a", crash=True), await backend_factory("b", crash=True)
    gw = await gateway_factory([{"models": ["m"], "url": [a.url, b.url]}])
    async with aiohttp.ClientSession() as session:
        async with session.post(f"{gw.url}/chat/completions", json=CHAT) as resp:
            body = await resp.json()
        async with session.get(f"{gw.root}/metrics") as metrics:
            exposition = await metrics.text()

    assert resp.status == 502
    assert body["error"]["code"] == "backend_unavailable"
    assert len(a.requests) + len(b.requests) == 1
    assert "llmep_gateway_backend_retries_total{" not in exposition


@pytest.mark.asyncio
async def test_a_refused_connect_is_retried_once_on_the_next_replica_and_counted(backend_factory, gateway_factory):
    alive = await backend_factory("alive")
    gw = await gateway_factory([{"models": ["m"], "url": [_closed_port_url(), alive.url]}])
    async with aiohttp.ClientSession() as session:
        async with session.post(f"{gw.url}/chat/completions", json=CHAT) as resp:
            body = await resp.json()
        async with session.get(f"{gw.root}/metrics") as metrics:
            exposition = await metrics.text()

    assert resp.status == 200 and body["choices"][0]["message"]["content"] == "from alive"
    assert len(alive.requests) == 1
    assert 'llmep_gateway_backend_retries_total{model="m",reason="connect_failed"} 1.0' in exposition
