"""Per-key limits through the real gateway: 429s with Retry-After, x-ratelimit-* headers, tokens
reserved then settled from usage (streams included), the replica split under concurrent load,
the SDK's retry, and the per-key counters.

The backends are the shared in-process fakes (conftest.py); a gated backend holds requests so
their reservations stay open while the test counts what was admitted.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time

import httpx
import openai
import pytest

from llmep_serving.gateway.quota import DAY, prompt_estimate
from tests.unit.gateway.conftest import until, write_yaml

pytestmark = [pytest.mark.unit, pytest.mark.asyncio]

CHAT = [{"role": "user", "content": "hi"}]
USAGE = (7, 3)  # what the fake backend reports for every non-streaming answer


def body(max_tokens: int | None = None, **fields: object) -> bytes:
    data: dict[str, object] = {"model": "m", "messages": CHAT, **fields}
    if max_tokens is not None:
        data["max_tokens"] = max_tokens
    return json.dumps(data).encode()


def reserved(content: bytes, max_tokens: int) -> int:
    return prompt_estimate(len(content)) + max_tokens


async def post(url: str, key: str, content: bytes) -> httpx.Response:
    async with httpx.AsyncClient(timeout=30) as h:
        return await h.post(f"{url}/chat/completions", content=content, headers={"Authorization": f"Bearer {key}"})


async def gateway(backend_factory, gateway_factory, keys, *, gate=None, **settings):
    backend = await backend_factory("b")
    routes = [{"models": ["m"], "url": backend.url, "ready": True}]
    gated = None
    if gate is not None:
        gated = await backend_factory("g", gate=gate)
        routes.append({"models": ["g"], "url": gated.url, "ready": True})
    gw = await gateway_factory(routes, keys=keys, **settings)
    return backend, gated, gw


def remaining(gw, key: str, kind: str) -> int:
    api_key = gw.server.keys.authenticate(f"Bearer {key}")
    return int(gw.server.gateway.quota.headers(api_key)[f"x-ratelimit-remaining-{kind}"])


def duration_seconds(text: str) -> float:
    if text.endswith("ms"):
        return float(text[:-2]) / 1000
    minutes, _, seconds = text[:-1].rpartition("m")
    return float(minutes or 0) * 60 + float(seconds)


async def test_headers_count_down_then_429_with_retry_after_and_the_counters_agree(backend_factory, gateway_factory):
    _, _, gw = await gateway(backend_factory, gateway_factory, [{"name": "a", "key": "sk-a", "rpm": 3, "tpm": 100_000}])

    replies = [await post(gw.url, "sk-a", body(max_tokens=50)) for _ in range(4)]

    assert [r.status_code for r in replies] == [200, 200, 200, 429]
    assert [r.headers["x-ratelimit-remaining-requests"] for r in replies] == ["2", "1", "0", "0"]
    assert {r.headers["x-ratelimit-limit-requests"] for r in replies} == {"3"}
    assert {r.headers["x-ratelimit-limit-tokens"] for r in replies} == {"100000"}
    # One request comes back every 20 s: the bucket is full again within 20 s of each.
    resets = [duration_seconds(r.headers["x-ratelimit-reset-requests"]) for r in replies]
    assert 0 < resets[0] <= 20 and 20 < resets[1] <= 40 and 40 < resets[2] <= 60
    tokens_left = [int(r.headers["x-ratelimit-remaining-tokens"]) for r in replies]
    assert all(0 <= t < 100_000 for t in tokens_left[:3])
    refused = replies[3]
    error = refused.json()["error"]
    assert (error["code"], error["type"]) == ("rate_limit_exceeded", "requests")
    assert 1 <= int(refused.headers["retry-after"]) <= 20
    assert f"try again in {refused.headers['retry-after']}s" in error["message"]
    metrics = gw.server.metrics
    assert metrics.key_requests == {("a", "m", "200"): 3, ("a", "m", "429"): 1}
    assert metrics.key_limited == {("a", "m", "requests"): 1}
    assert metrics.key_tokens == {("a", "m", "prompt"): 3 * USAGE[0], ("a", "m", "completion"): 3 * USAGE[1]}
    scrape = gw.server.metrics.render().decode()
    assert 'llmep_gateway_key_requests_total{code="429",key="a",model="m"} 1.0' in scrape
    assert 'llmep_gateway_key_tokens_total{key="a",model="m",type="prompt"} 21.0' in scrape
    assert 'llmep_gateway_key_rate_limited_total{key="a",limit="requests",model="m"} 1.0' in scrape
    assert "sk-a" not in scrape


async def test_tokens_are_reserved_while_in_flight_and_settled_from_usage(backend_factory, gateway_factory):
    gate = asyncio.Event()
    _, gated, gw = await gateway(
        backend_factory, gateway_factory, [{"name": "a", "key": "sk-a", "tpm": 1000}], gate=gate
    )
    big = body(max_tokens=900, model="g")
    first = asyncio.create_task(post(gw.url, "sk-a", big))
    await until(lambda: gated.requests)

    # The first request's 900 + prompt tokens are held while it runs (the bucket refills 16.7
    # tokens a second meanwhile): a second does not fit.
    assert remaining(gw, "sk-a", "tokens") <= 1000 - reserved(big, 900) + 20
    refused = await post(gw.url, "sk-a", big)
    gate.set()
    answered = await first
    again = await post(gw.url, "sk-a", big)

    assert refused.status_code == 429
    assert (refused.json()["error"]["code"], refused.json()["error"]["type"]) == ("rate_limit_exceeded", "tokens")
    assert int(refused.headers["retry-after"]) >= 40  # about 830 tokens short, at 16.7 a second
    assert answered.status_code == 200
    # Settled from usage: the first was charged its 10 tokens, so the same request fits again.
    assert again.status_code == 200
    assert gw.server.metrics.key_limited == {("a", "g", "tokens"): 1}


async def test_a_failed_or_abandoned_request_gives_its_tokens_back(backend_factory, gateway_factory):
    failing = await backend_factory("f", error=(500, {"error": {"message": "boom", "type": "server_error"}}))
    slow = await backend_factory("s", chunks=5, chunk_gate=asyncio.Semaphore(0))
    gw = await gateway_factory(
        [
            {"models": ["f"], "url": failing.url, "ready": True},
            {"models": ["s"], "url": slow.url, "ready": True},
        ],
        keys=[{"name": "a", "key": "sk-a", "tpm": 6000, "tokens_per_day": 100_000}],
    )

    failed = await post(gw.url, "sk-a", body(max_tokens=500, model="f"))
    # Released before the answer went out: the error reports the bucket whole again (6000 per
    # minute refills 100 a second, so only the bucket's own cap keeps this exact).
    assert failed.status_code == 500
    assert failed.headers["x-ratelimit-remaining-tokens"] == "6000"

    async with httpx.AsyncClient(timeout=30) as h:
        async with h.stream(
            "POST",
            f"{gw.url}/chat/completions",
            content=body(max_tokens=500, model="s", stream=True),
            headers={"Authorization": "Bearer sk-a"},
        ) as stream:
            assert stream.headers["x-ratelimit-remaining-tokens"] != "6000"  # reserved, before any byte
            await stream.aiter_bytes().__anext__()
    # The client left mid-stream: the backend is dropped and the reservation given back.
    await until(lambda: remaining(gw, "sk-a", "tokens") == 6000)
    quota = gw.server.gateway.quota._quotas["a"]
    assert quota.daily is not None and quota.daily.used == 0
    assert gw.server.metrics.key_requests[("a", "f", "500")] == 1


async def test_a_stream_asks_for_usage_settles_it_and_strips_the_chunk_the_client_did_not_ask_for(
    backend_factory, gateway_factory
):
    backend, _, gw = await gateway(
        backend_factory, gateway_factory, [{"name": "a", "key": "sk-a", "tpm": 6000, "tokens_per_day": 1000}]
    )
    c = openai.AsyncOpenAI(base_url=gw.url, api_key="sk-a", max_retries=0)

    plain = await c.chat.completions.create(model="m", messages=CHAT, stream=True, max_tokens=20)
    plain_chunks = [chunk async for chunk in plain]
    asked = await c.chat.completions.create(
        model="m", messages=CHAT, stream=True, max_tokens=20, stream_options={"include_usage": True}
    )
    asked_chunks = [chunk async for chunk in asked]

    assert backend.requests[0]["stream_options"] == {"include_usage": True}
    assert [chunk.usage for chunk in plain_chunks] == [None, None, None]
    assert [chunk.choices[0].delta.content.strip() for chunk in plain_chunks] == ["0", "1", "2"]
    assert asked_chunks[-1].usage is not None and asked_chunks[-1].usage.prompt_tokens == 5
    # Both settled from the stream's usage (5 prompt + 3 completion each).
    assert gw.server.metrics.key_tokens == {("a", "m", "prompt"): 10, ("a", "m", "completion"): 6}
    assert gw.server.gateway.quota._quotas["a"].daily.used == 16
    async with httpx.AsyncClient(timeout=30) as h:
        async with h.stream(
            "POST", f"{gw.url}/chat/completions", content=body(stream=True), headers={"Authorization": "Bearer sk-a"}
        ) as stream:
            assert stream.headers["content-type"] == "text/event-stream"
            assert stream.headers["x-ratelimit-limit-tokens"] == "6000"
            raw = b"".join([part async for part in stream.aiter_bytes()])
    assert b'"usage"' not in raw and raw.endswith(b"data: [DONE]\n\n")


@pytest.mark.parametrize(
    "include_usage", [False, True], ids=["usage-asked-by-the-gateway", "usage-asked-by-the-client"]
)
async def test_a_stream_whose_client_closes_after_done_is_charged_and_counted_as_answered(
    backend_factory, gateway_factory, include_usage
):
    # The openai SDK closes its connection once it reads [DONE]; the backend's own end (held here
    # until the client is gone) may come later, and the answer must still be charged in full.
    backend = await backend_factory("b", eof_gate=asyncio.Event())
    gw = await gateway_factory(
        [{"models": ["m"], "url": backend.url, "ready": True}],
        keys=[{"name": "a", "key": "sk-a", "tpm": 6000, "tokens_per_day": 1000}],
    )
    fields: dict[str, object] = {"stream": True, "max_tokens": 20}
    if include_usage:
        fields["stream_options"] = {"include_usage": True}
    lines = []
    async with httpx.AsyncClient(timeout=30) as h:
        async with h.stream(
            "POST", f"{gw.url}/chat/completions", content=body(**fields), headers={"Authorization": "Bearer sk-a"}
        ) as stream:
            async for line in stream.aiter_lines():
                lines.append(line)
                if line == "data: [DONE]":
                    break
    assert lines[-1] == "data: [DONE]" and not backend.eof_gate.is_set()

    await until(lambda: gw.server.metrics.key_requests.get(("a", "m", "200")) == 1)
    assert gw.server.metrics.key_tokens == {("a", "m", "prompt"): 5, ("a", "m", "completion"): 3}
    assert gw.server.gateway.quota._quotas["a"].daily.used == 8
    assert ("a", "m", "499") not in gw.server.metrics.key_requests
    backend.eof_gate.set()


async def test_the_daily_budget_answers_insufficient_quota_until_midnight_utc(backend_factory, gateway_factory):
    _, _, gw = await gateway(backend_factory, gateway_factory, [{"name": "a", "key": "sk-a", "tokens_per_day": 50}])
    small = body(max_tokens=5)
    cost = reserved(small, 5)
    assert cost <= 50  # each fits alone; the fake backend's usage charges 10 each

    replies = [await post(gw.url, "sk-a", small) for _ in range(5)]
    until_midnight = DAY - time.time() % DAY

    statuses = [r.status_code for r in replies]
    admitted = statuses.count(200)
    assert statuses == [200] * admitted + [429] * (5 - admitted)
    assert 10 * (admitted - 1) + cost <= 50 < 10 * admitted + cost
    error = replies[-1].json()["error"]
    assert (error["code"], error["type"]) == ("insufficient_quota", "insufficient_quota")
    assert abs(int(replies[-1].headers["retry-after"]) - until_midnight) <= 5
    assert "x-ratelimit-limit-requests" not in replies[-1].headers  # the key has no rpm
    assert gw.server.metrics.key_limited == {("a", "m", "daily_tokens"): 5 - admitted}


async def test_the_sdk_retries_after_the_retry_after_it_is_given(backend_factory, gateway_factory, caplog):
    gate = asyncio.Event()
    # 3600 tokens a minute: 60 a second, so a request of under 60 tokens waits under 1 s.
    _, gated, gw = await gateway(
        backend_factory, gateway_factory, [{"name": "a", "key": "sk-a", "tpm": 3600}], gate=gate
    )
    # Reserves exactly the whole bucket (a placeholder of as many digits sizes the body first).
    filler = body(model="g", max_tokens=3600 - prompt_estimate(len(body(model="g", max_tokens=1000))))
    holding = asyncio.create_task(post(gw.url, "sk-a", filler))
    await until(lambda: gated.requests)
    sdk = openai.AsyncOpenAI(base_url=gw.url, api_key="sk-a")  # the default 2 retries

    with caplog.at_level(logging.INFO, logger="openai"):
        started = time.monotonic()
        # About 55 tokens: just under a second's refill, so the test has most of a second to send it.
        answer = await sdk.chat.completions.create(model="m", messages=CHAT, max_tokens=35)
        waited = time.monotonic() - started
    gate.set()
    await holding

    assert answer.choices[0].message.content == "from b"
    assert gw.server.metrics.key_limited == {("a", "m", "tokens"): 1}
    assert "Retrying request in 1.000000 seconds" in caplog.text
    assert 1.0 <= waited < 3.0


async def test_concurrent_keys_are_each_held_to_their_own_limits(backend_factory, gateway_factory):
    gate = asyncio.Event()
    keys = [
        {"name": "five", "key": "sk-5", "rpm": 5},
        {"name": "eight", "key": "sk-8", "rpm": 8},
        {"name": "tokens", "key": "sk-t", "tpm": 1000},
        {"name": "free", "key": "sk-f"},
    ]
    _, gated, gw = await gateway(backend_factory, gateway_factory, keys, gate=gate)
    per_token_request = body(model="g", max_tokens=100)
    cost = reserved(per_token_request, 100)

    started = time.monotonic()
    load = {
        "sk-5": [asyncio.create_task(post(gw.url, "sk-5", body())) for _ in range(12)],
        "sk-8": [asyncio.create_task(post(gw.url, "sk-8", body())) for _ in range(12)],
        "sk-f": [asyncio.create_task(post(gw.url, "sk-f", body())) for _ in range(12)],
        "sk-t": [asyncio.create_task(post(gw.url, "sk-t", per_token_request)) for _ in range(12)],
    }
    # Token requests hold their reservations at the gated backend until every one is answered or held.
    await until(lambda: sum(t.done() for t in load["sk-t"]) + len(gated.requests) == 12, timeout=20)
    held = len(gated.requests)
    elapsed = time.monotonic() - started
    gate.set()
    statuses = {key: [(await t).status_code for t in tasks] for key, tasks in load.items()}

    def within(admitted: int, limit: int, cost_each: int = 1) -> bool:
        # At most the bucket plus what it refilled meanwhile; at least the bucket.
        return limit // cost_each <= admitted <= (limit + limit / 60 * elapsed) // cost_each

    assert set(statuses["sk-5"]) <= {200, 429} and within(statuses["sk-5"].count(200), 5)
    assert set(statuses["sk-8"]) <= {200, 429} and within(statuses["sk-8"].count(200), 8)
    assert statuses["sk-f"] == [200] * 12
    assert statuses["sk-t"].count(200) == held and within(held, 1000, cost)


async def test_two_replicas_split_each_limit_and_together_never_exceed_it(backend_factory, gateway_factory):
    gate = asyncio.Event()
    keys = [
        {"name": "even", "key": "sk-e", "rpm": 10},
        {"name": "uneven", "key": "sk-u", "rpm": 10},
        {"name": "tokens", "key": "sk-t", "tpm": 1000},
    ]
    backend, gated, one = await gateway(backend_factory, gateway_factory, keys, gate=gate, replicas=2)
    two = await gateway_factory(
        [
            {"models": ["m"], "url": backend.url, "ready": True},
            {"models": ["g"], "url": gated.url, "ready": True},
        ],
        keys=keys,
        replicas=2,
    )
    per_token_request = body(model="g", max_tokens=100)
    cost = reserved(per_token_request, 100)

    started = time.monotonic()
    even = [asyncio.create_task(post(gw.url, "sk-e", body())) for gw in (one, two) for _ in range(8)]
    uneven = [asyncio.create_task(post(one.url, "sk-u", body())) for _ in range(12)]
    tokens = [asyncio.create_task(post(gw.url, "sk-t", per_token_request)) for gw in (one, two) for _ in range(8)]
    await until(lambda: sum(t.done() for t in tokens) + len(gated.requests) == 16, timeout=20)
    held = len(gated.requests)
    elapsed = time.monotonic() - started
    gate.set()
    even_ok = [(await t).status_code for t in even].count(200)
    uneven_ok = [(await t).status_code for t in uneven].count(200)
    await asyncio.gather(*tokens)
    refill = 10 / 60 * elapsed

    assert 10 <= even_ok <= 10 + refill  # 5 on each replica: the whole limit, never more
    # All on one replica: only its half. The bound: refused with up to (replicas-1)/replicas unused.
    assert 5 <= uneven_ok <= 5 + refill / 2
    assert 2 * (500 // cost) <= held <= (1000 + 1000 / 60 * elapsed) // cost
    reply = await post(two.url, "sk-e", body())
    assert reply.headers["x-ratelimit-limit-requests"] == "10"  # the key's limit, not the share


async def test_a_key_without_limits_gets_no_ratelimit_headers(backend_factory, gateway_factory):
    _, _, gw = await gateway(backend_factory, gateway_factory, [{"name": "free", "key": "sk-f"}])

    reply = await post(gw.url, "sk-f", body())

    assert reply.status_code == 200
    assert not [h for h in reply.headers if h.lower().startswith("x-ratelimit")]
    assert gw.server.metrics.key_requests == {("free", "m", "200"): 1}
    assert gw.server.metrics.key_tokens == {("free", "m", "prompt"): 7, ("free", "m", "completion"): 3}


async def test_a_keys_file_with_a_bad_limit_is_refused_and_the_last_good_keys_stay(
    backend_factory, gateway_factory, caplog
):
    _, _, gw = await gateway(backend_factory, gateway_factory, [{"name": "a", "key": "sk-a", "rpm": 5}])

    with caplog.at_level(logging.ERROR):
        write_yaml(gw.keys_file, [{"name": "a", "key": "sk-a", "rpm": 0}])
        await until(lambda: "must be a whole number" in caplog.text)
    reply = await post(gw.url, "sk-a", body())

    assert "key 'a': 'rpm' must be a whole number >= 1 (got 0); leave it out for no limit" in caplog.text
    assert reply.status_code == 200 and reply.headers["x-ratelimit-limit-requests"] == "5"
