"""Fair sharing as clients see it through the gateway: a saturated model's queue lets high-priority
keys ahead of a low-priority flood, shares it evenly between equal keys, is bounded in size and
wait, holds a stream's slot until it ends, and forgets a client that leaves while queued.

The backend is the in-process fake of conftest.py; ``gate`` holds its answers until the test has
queued what it needs, so the order the backend sees requests in is the order the queue let them in.
"""

from __future__ import annotations

import asyncio
import json

import httpx
import pytest

from tests.unit.gateway.conftest import until

pytestmark = [pytest.mark.unit, pytest.mark.asyncio]

KEYS = [
    {"name": "low", "key": "sk-low", "priority": "low"},
    {"name": "high", "key": "sk-high", "priority": "high"},
    {"name": "a", "key": "sk-a"},
    {"name": "b", "key": "sk-b"},
]


def depth(gw, key: str) -> int:
    return gw.server.metrics.key_queue_depth.get((key, "m"), 0)


async def chat(http: httpx.AsyncClient, gw, key: str, tag: str, **body: object) -> httpx.Response:
    payload = {"model": "m", "messages": [], "user": tag, **body}
    return await http.post(f"{gw.url}/chat/completions", json=payload, headers={"Authorization": f"Bearer sk-{key}"})


async def test_a_high_priority_key_is_served_ahead_of_a_queued_low_priority_flood(backend_factory, gateway_factory):
    backend = await backend_factory("b", gate=asyncio.Event())
    # Capacity from the routes file, over the setting (which is off).
    gw = await gateway_factory([{"models": ["m"], "url": backend.url, "max_inflight": 1}], KEYS)
    async with httpx.AsyncClient(timeout=10) as http:
        flood = [asyncio.create_task(chat(http, gw, "low", f"low-{i}")) for i in range(6)]
        await until(lambda: len(backend.requests) == 1 and depth(gw, "low") == 5)
        urgent = [asyncio.create_task(chat(http, gw, "high", f"high-{i}")) for i in range(2)]
        await until(lambda: depth(gw, "high") == 2)
        assert len(backend.requests) == 1  # still one at a time
        backend.gate.set()
        answers = await asyncio.gather(*flood, *urgent)

    assert [a.status_code for a in answers] == [200] * 8
    order = [r["user"] for r in backend.requests]
    assert order[:3] == [order[0], "high-0", "high-1"]
    assert order[0].startswith("low-")
    assert sorted(order[3:]) == sorted(f"low-{i}" for i in range(6) if f"low-{i}" != order[0])
    waits = gw.server.metrics.key_queue_waits
    assert sum(waits[("high", "m")].counts) == 2 and sum(waits[("low", "m")].counts) == 6
    rendered = gw.server.metrics.render().decode()
    assert 'llmep_gateway_key_queue_wait_seconds_count{key="high",model="m"} 2.0' in rendered
    assert 'llmep_gateway_key_queue_depth{key="low",model="m"} 0.0' in rendered


async def test_equal_keys_get_equal_shares_whatever_their_offered_load(backend_factory, gateway_factory):
    backend = await backend_factory("b", delay=0.01)
    gw = await gateway_factory([{"models": ["m"], "url": backend.url}], KEYS, max_inflight_per_model=1)
    done = {"a": 0, "b": 0}

    async def client(http: httpx.AsyncClient, key: str) -> None:
        while True:
            reply = await chat(http, gw, key, key)
            assert reply.status_code == 200
            done[key] += 1

    # "a" keeps eight requests outstanding, "b" two: both always have one waiting.
    async with httpx.AsyncClient(timeout=10, limits=httpx.Limits(max_connections=20)) as http:
        clients = [asyncio.create_task(client(http, "a")) for _ in range(8)]
        clients += [asyncio.create_task(client(http, "b")) for _ in range(2)]
        await until(lambda: done["a"] + done["b"] >= 5)  # saturated from here
        start = dict(done)
        await until(lambda: done["a"] + done["b"] - sum(start.values()) >= 80, timeout=20)
        for task in clients:
            task.cancel()
        await asyncio.gather(*clients, return_exceptions=True)

    a, b = done["a"] - start["a"], done["b"] - start["b"]
    assert abs(a - b) / (a + b) <= 0.1, (a, b)


async def test_a_full_queue_is_429_model_busy_with_retry_after(backend_factory, gateway_factory):
    backend = await backend_factory("b", gate=asyncio.Event())
    gw = await gateway_factory(
        [{"models": ["m"], "url": backend.url}],
        KEYS,
        max_inflight_per_model=1,
        fair_queue_size=1,
        retry_after_seconds=4,
    )
    async with httpx.AsyncClient(timeout=10) as http:
        first = asyncio.create_task(chat(http, gw, "a", "first"))
        await until(lambda: len(backend.requests) == 1)
        second = asyncio.create_task(chat(http, gw, "b", "second"))
        await until(lambda: depth(gw, "b") == 1)
        refused = await chat(http, gw, "a", "third")
        backend.gate.set()
        served = await asyncio.gather(first, second)

    assert refused.status_code == 429
    assert refused.headers["retry-after"] == "4"
    assert refused.json()["error"]["code"] == "model_busy"
    assert refused.json()["error"]["type"] == "rate_limit_error"
    assert [r.status_code for r in served] == [200, 200]
    assert gw.server.metrics.key_requests[("a", "m", "429")] == 1


async def test_a_wait_past_fair_queue_timeout_is_503_with_retry_after(backend_factory, gateway_factory):
    backend = await backend_factory("b", gate=asyncio.Event())
    gw = await gateway_factory(
        [{"models": ["m"], "url": backend.url}],
        KEYS,
        max_inflight_per_model=1,
        fair_queue_timeout=0.2,
        retry_after_seconds=6,
    )
    async with httpx.AsyncClient(timeout=10) as http:
        first = asyncio.create_task(chat(http, gw, "a", "first"))
        await until(lambda: len(backend.requests) == 1)
        timed_out = await chat(http, gw, "b", "second")
        backend.gate.set()
        assert (await first).status_code == 200

    assert timed_out.status_code == 503
    assert timed_out.headers["retry-after"] == "6"
    error = timed_out.json()["error"]
    assert (error["code"], error["type"]) == ("model_queue_timeout", "server_error")
    assert "fair_queue_timeout" in error["message"]
    assert len(backend.requests) == 1 and depth(gw, "b") == 0


async def test_a_client_that_leaves_while_queued_frees_its_place(backend_factory, gateway_factory):
    backend = await backend_factory("b", gate=asyncio.Event())
    gw = await gateway_factory(
        [{"models": ["m"], "url": backend.url}], KEYS, max_inflight_per_model=1, fair_queue_size=1
    )
    async with httpx.AsyncClient(timeout=10) as http:
        first = asyncio.create_task(chat(http, gw, "a", "first"))
        await until(lambda: len(backend.requests) == 1)
        async with httpx.AsyncClient(timeout=10) as leaving:
            gone = asyncio.create_task(chat(leaving, gw, "b", "gone"))
            await until(lambda: depth(gw, "b") == 1)
            gone.cancel()
        await until(lambda: depth(gw, "b") == 0)
        # Its place is free: the next request queues rather than being refused.
        last = asyncio.create_task(chat(http, gw, "b", "last"))
        await until(lambda: depth(gw, "b") == 1)
        backend.gate.set()
        answers = await asyncio.gather(first, last)

    assert [a.status_code for a in answers] == [200, 200]
    assert [r["user"] for r in backend.requests] == ["first", "last"]
    assert gw.server.metrics.key_requests[("b", "m", "499")] == 1


async def test_a_stream_holds_its_slot_until_it_ends(backend_factory, gateway_factory):
    backend = await backend_factory("b", chunks=3, chunk_gate=asyncio.Semaphore(0))
    gw = await gateway_factory([{"models": ["m"], "url": backend.url}], KEYS, max_inflight_per_model=1)
    body = {"model": "m", "messages": [], "stream": True, "user": "stream"}
    async with httpx.AsyncClient(timeout=10) as http:
        async with http.stream(
            "POST", f"{gw.url}/chat/completions", json=body, headers={"Authorization": "Bearer sk-a"}
        ) as stream:
            lines = stream.aiter_lines()
            first_event = await anext(lines)
            plain = asyncio.create_task(chat(http, gw, "b", "plain"))
            await until(lambda: depth(gw, "b") == 1)
            assert len(backend.requests) == 1  # the stream is still being relayed
            for _ in range(2):
                backend.chunk_gate.release()
            rest = [line async for line in lines if line]
        answer = await plain

    assert json.loads(first_event[6:])["choices"][0]["delta"]["content"].startswith("0")
    assert rest[-1] == "data: [DONE]"
    assert answer.status_code == 200
    assert [r["user"] for r in backend.requests] == ["stream", "plain"]


async def test_a_routes_file_entry_with_max_inflight_0_has_no_queue(backend_factory, gateway_factory):
    backend = await backend_factory("b", gate=asyncio.Event())
    gw = await gateway_factory(
        [{"models": ["m"], "url": backend.url, "max_inflight": 0}], KEYS, max_inflight_per_model=1
    )
    async with httpx.AsyncClient(timeout=10) as http:
        both = [asyncio.create_task(chat(http, gw, "a", tag)) for tag in ("one", "two")]
        await until(lambda: len(backend.requests) == 2)  # both reach the backend at once
        backend.gate.set()
        answers = await asyncio.gather(*both)

    assert [a.status_code for a in answers] == [200, 200]
    assert not gw.server.metrics.key_queue_waits


async def test_a_held_stream_waiting_for_a_slot_keeps_getting_keep_alives(backend_factory, gateway_factory):
    """A stream held while its model started already has its 200: while it then waits in the fair
    queue it gets SSE comments, so no proxy in between drops it as idle."""
    backend = await backend_factory("b", chunks=2, gate=asyncio.Event())
    ready = {"models": ["m"], "url": backend.url, "max_inflight": 1}
    gw = await gateway_factory([ready], KEYS, hold_keepalive_interval=0.05, wake_backend=False)
    body = {"model": "m", "messages": [], "stream": True, "user": "stream"}
    comments = []
    async with httpx.AsyncClient(timeout=10) as http:
        busy = asyncio.create_task(chat(http, gw, "a", "busy"))  # holds the one slot until the gate opens
        await until(lambda: len(backend.requests) == 1)
        await gw.set_routes([{**ready, "ready": False}])
        async with http.stream(
            "POST", f"{gw.url}/chat/completions", json=body, headers={"Authorization": "Bearer sk-b"}
        ) as stream:
            events = []
            async for line in stream.aiter_lines():
                if line.startswith(":"):
                    comments.append(line)
                    if comments == [": keep-alive"]:
                        await gw.set_routes([ready])  # ready now, but its one slot is taken
                    if len(comments) == 4:
                        backend.gate.set()
                elif line:
                    events.append(line)
        answer = await busy

    assert comments[0] == ": keep-alive"
    assert comments[-1] == ": keep-alive; waiting for a free slot of m"
    assert depth(gw, "b") == 0
    assert [r["user"] for r in backend.requests] == ["busy", "stream"]
    assert answer.status_code == 200 and events[-1] == "data: [DONE]" and len(events) == 4


async def test_a_high_priority_request_finds_a_held_slot_while_a_low_flood_waits(backend_factory, gateway_factory):
    backend = await backend_factory("b", gate=asyncio.Event())
    gw = await gateway_factory(
        [{"models": ["m"], "url": backend.url, "max_inflight": 4}], KEYS, fair_high_priority_reserve=0.25
    )
    async with httpx.AsyncClient(timeout=10) as http:
        first = asyncio.create_task(chat(http, gw, "high", "high-0"))  # a high key is active from now
        await until(lambda: len(backend.requests) == 1)
        flood = [asyncio.create_task(chat(http, gw, "low", f"low-{i}")) for i in range(6)]
        await until(lambda: len(backend.requests) == 3 and depth(gw, "low") == 4)  # 4 - 1 held back
        urgent = asyncio.create_task(chat(http, gw, "high", "high-1"))
        await until(lambda: len(backend.requests) == 4)
        assert backend.requests[-1]["user"] == "high-1" and depth(gw, "low") == 4  # in at once, past the flood
        backend.gate.set()
        answers = await asyncio.gather(first, urgent, *flood)

    assert [a.status_code for a in answers] == [200] * 8
    assert gw.server.metrics.key_queue_waits[("high", "m")].counts[0] == 2  # neither waited
