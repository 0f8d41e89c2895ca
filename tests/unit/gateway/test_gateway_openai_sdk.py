"""What an OpenAI SDK user sees through the gateway: routing, discovery, streaming, auth.

The backends are small in-process OpenAI-shaped aiohttp servers (see conftest.py): they stand
in for faults a real backend cannot be made to produce and keep these tests fast. The real
Ray Serve + vLLM path is covered in tests/serving.
"""

from __future__ import annotations

import asyncio

import httpx
import openai
import pytest

from tests.unit.gateway.conftest import until

pytestmark = [pytest.mark.unit, pytest.mark.asyncio]

GOOD_KEY = "sk-good-0123456789"
SCOPED_KEY = "sk-scoped-0123456789"


def client(base_url: str, key: str = "unused", **kwargs) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=base_url, api_key=key, max_retries=0, **kwargs)


async def two_backends(backend_factory, gateway_factory, **settings):
    a = await backend_factory("backend-a")
    b = await backend_factory("backend-b")
    gw = await gateway_factory(
        [
            {"models": ["qwen-7b", "chat-default"], "url": a.url, "ready": True},
            {"models": ["llama-8b"], "url": b.url, "ready": True},
        ],
        **settings,
    )
    return a, b, gw


async def test_routes_by_served_name_and_alias_to_the_right_backend(
    backend_factory, gateway_factory
):
    a, b, gw = await two_backends(backend_factory, gateway_factory)
    c = client(gw.url)
    msgs = [{"role": "user", "content": "hi"}]

    by_name = await c.chat.completions.create(model="qwen-7b", messages=msgs)
    by_alias = await c.chat.completions.create(model="chat-default", messages=msgs)
    other = await c.chat.completions.create(model="llama-8b", messages=msgs)

    assert by_name.choices[0].message.content == "from backend-a"
    assert by_alias.choices[0].message.content == "from backend-a"
    assert other.choices[0].message.content == "from backend-b"
    # The backend knows only its served name: an alias is rewritten to it, nothing else changes.
    assert [r["model"] for r in a.requests] == ["qwen-7b", "qwen-7b"]
    assert a.requests[1]["messages"] == msgs
    assert a.paths == ["/v1/chat/completions", "/v1/chat/completions"]
    assert "authorization" not in {k.lower() for k in a.headers[0]}


async def test_completions_and_embeddings_are_routed_too(backend_factory, gateway_factory):
    a, b, gw = await two_backends(backend_factory, gateway_factory)
    c = client(gw.url)

    emb = await c.embeddings.create(model="llama-8b", input="hello")
    await c.completions.create(model="qwen-7b", prompt="hi", max_tokens=1)

    assert emb.data[0].embedding == [0.1, 0.2]
    assert b.paths == ["/v1/embeddings"]
    assert a.paths == ["/v1/completions"]


async def test_unknown_model_is_404_model_not_found(backend_factory, gateway_factory):
    _, _, gw = await two_backends(backend_factory, gateway_factory)

    with pytest.raises(openai.NotFoundError) as err:
        await client(gw.url).chat.completions.create(
            model="gpt-4", messages=[{"role": "user", "content": "hi"}]
        )

    assert err.value.code == "model_not_found"
    assert err.value.body["param"] == "model"


async def test_models_lists_every_name_from_every_backend(backend_factory, gateway_factory):
    _, _, gw = await two_backends(backend_factory, gateway_factory)
    c = client(gw.url)

    models = [m async for m in c.models.list()]
    one = await c.models.retrieve("chat-default")

    assert sorted(m.id for m in models) == ["chat-default", "llama-8b", "qwen-7b"]
    assert all(m.object == "model" and m.owned_by == "llmep" for m in models)
    assert one.id == "chat-default"
    with pytest.raises(openai.NotFoundError):
        await c.models.retrieve("gpt-4")


async def test_stream_chunks_arrive_separately_as_the_backend_sends_them(
    backend_factory, gateway_factory
):
    # The backend sends each chunk only once the client holds the one before: a gateway that
    # buffered or merged chunks would never deliver it, and the read runs into the deadline.
    backend = await backend_factory("stepped", chunks=4, chunk_gate=asyncio.Semaphore(0))
    gw = await gateway_factory([{"models": ["m"], "url": backend.url, "ready": True}])

    stream = await client(gw.url).chat.completions.create(
        model="m", messages=[{"role": "user", "content": "hi"}], stream=True
    )
    texts, sent_when_read = [], []
    async with asyncio.timeout(10):
        async for chunk in stream:
            if chunk.choices:
                texts.append(chunk.choices[0].delta.content)
                sent_when_read.append(backend.chunks_sent)
                backend.chunk_gate.release()

    assert texts == ["0 ", "1 ", "2 ", "3 "]
    # Each chunk reached the client while the backend was still holding the next one.
    assert sent_when_read == [1, 2, 3, 4]


async def test_backend_dying_mid_stream_ends_the_stream_with_an_error_event(
    backend_factory, gateway_factory
):
    backend = await backend_factory("dies", chunks=5, break_after=2)
    gw = await gateway_factory([{"models": ["m"], "url": backend.url, "ready": True}])

    stream = await client(gw.url).chat.completions.create(
        model="m", messages=[{"role": "user", "content": "hi"}], stream=True
    )
    texts = []
    with pytest.raises(openai.APIError) as err:
        async for chunk in stream:
            texts.append(chunk.choices[0].delta.content)

    assert texts == ["0 ", "1 "]
    assert "failed mid-stream" in err.value.message
    # On the wire: a well-formed error event, then [DONE].
    async with httpx.AsyncClient() as h:
        raw = await h.post(
            f"{gw.url}/chat/completions",
            json={"model": "m", "messages": [], "stream": True},
        )
    assert raw.text.endswith(
        'data: {"error": {"message": "The backend serving \'m\' failed mid-stream.", '
        '"type": "server_error", "param": null, "code": "backend_stream_interrupted"}}'
        "\n\ndata: [DONE]\n\n"
    )


async def test_unreachable_backend_is_502_in_the_envelope(backend_factory, gateway_factory):
    gw = await gateway_factory([{"models": ["m"], "url": "http://127.0.0.1:9/v1", "ready": True}])

    with pytest.raises(openai.InternalServerError) as err:
        await client(gw.url).chat.completions.create(model="m", messages=[])

    assert err.value.status_code == 502
    assert err.value.code == "backend_unavailable"


ENGINE_SAYS = (
    "This model's maximum context length is 256 tokens. However, you requested 300 tokens "
    "(44 in the messages, 256 in the completion). Please reduce the length of the messages or completion."
)
# The shape of ray.llm's get_response_for_error (tests/contract checks it against Ray's own code).
RAY_WRAPPED = {
    "error": {
        "message": f"Message: {ENGINE_SAYS} (Request ID: m-7f3a), Internal exception: "
        f"ray.llm._internal.serve.core.configs.openai_api_models.OpenAIHTTPException: {ENGINE_SAYS} "
        f"(Request ID: m-7f3a), original exception: {ENGINE_SAYS}",
        "type": "OpenAIHTTPException",
        "param": None,
        "code": 400,
    }
}


async def test_engine_errors_reach_the_client_in_the_engines_words(backend_factory, gateway_factory):
    backend = await backend_factory("ray", error=(400, RAY_WRAPPED))
    gw = await gateway_factory([{"models": ["m"], "url": backend.url, "ready": True}])

    with pytest.raises(openai.BadRequestError) as err:
        await client(gw.url).chat.completions.create(model="m", messages=[], max_tokens=256)

    assert err.value.body == {"message": ENGINE_SAYS, "type": "invalid_request_error", "param": None, "code": None}


async def test_vllms_own_error_envelope_gets_openais_vocabulary(backend_factory, gateway_factory):
    """vLLM's app (the direct path) names an exception class as `type` and the status as `code`."""
    own = {"error": {"message": "n must be at most 8", "type": "BadRequestError", "param": "n", "code": 400}}
    backend = await backend_factory("vllm", error=(400, own))
    gw = await gateway_factory([{"models": ["m"], "url": backend.url, "ready": True}])

    with pytest.raises(openai.BadRequestError) as err:
        await client(gw.url).chat.completions.create(model="m", messages=[], n=9)

    cleaned = {"message": "n must be at most 8", "type": "invalid_request_error", "param": "n", "code": None}
    assert err.value.body == cleaned


async def test_errors_already_in_openais_vocabulary_pass_through_untouched(backend_factory, gateway_factory):
    own = {
        "error": {
            "message": "This model's maximum context length is 256 tokens.",
            "type": "invalid_request_error",
            "param": "messages",
            "code": "context_length_exceeded",
        }
    }
    backend = await backend_factory("openai-like", error=(400, own))
    gw = await gateway_factory([{"models": ["m"], "url": backend.url, "ready": True}])

    with pytest.raises(openai.BadRequestError) as err:
        await client(gw.url).chat.completions.create(model="m", messages=[])

    assert err.value.body == own["error"]


async def test_routing_table_changes_apply_without_restart(backend_factory, gateway_factory):
    a = await backend_factory("backend-a")
    b = await backend_factory("backend-b")
    gw = await gateway_factory([{"models": ["m"], "url": a.url, "ready": True}])
    c = client(gw.url)
    msgs = [{"role": "user", "content": "hi"}]
    before = await c.chat.completions.create(model="m", messages=msgs)

    await gw.set_routes(
        [
            {"models": ["m"], "url": b.url, "ready": True},
            {"models": ["new"], "url": a.url, "ready": True},
        ]
    )
    after = await c.chat.completions.create(model="m", messages=msgs)
    added = await c.chat.completions.create(model="new", messages=msgs)

    assert before.choices[0].message.content == "from backend-a"
    assert after.choices[0].message.content == "from backend-b"
    assert added.choices[0].message.content == "from backend-a"


async def test_an_invalid_routes_file_keeps_the_last_good_table(
    backend_factory, gateway_factory, caplog
):
    a = await backend_factory("backend-a")
    gw = await gateway_factory([{"models": ["m"], "url": a.url, "ready": True}])
    bad = gw.routes_file.with_suffix(".bad")
    bad.write_text("- models: [unclosed\n")
    bad.replace(gw.routes_file)  # atomic, like a ConfigMap update

    rejected = f"routes file {gw.routes_file} is invalid, keeping the last good one"
    await until(lambda: any(rejected in r.getMessage() for r in caplog.records))
    reply = await client(gw.url).chat.completions.create(model="m", messages=[])

    assert reply.choices[0].message.content == "from backend-a"
    [logged] = [r for r in caplog.records if rejected in r.getMessage()]
    assert logged.levelname == "ERROR"
    assert "not valid YAML or JSON at line" in logged.getMessage()


# -- auth ------------------------------------------------------------------------------


async def keyed_gateway(backend_factory, gateway_factory, **settings):
    return await two_backends(
        backend_factory,
        gateway_factory,
        keys=[
            {"name": "team-a", "key": GOOD_KEY},
            {"name": "team-b", "key": SCOPED_KEY, "models": "qwen-7b"},
        ],
        **settings,
    )


async def test_request_without_a_key_is_401(backend_factory, gateway_factory):
    _, _, gw = await keyed_gateway(backend_factory, gateway_factory)
    async with httpx.AsyncClient() as h:
        reply = await h.post(f"{gw.url}/chat/completions", json={"model": "qwen-7b"})

    assert reply.status_code == 401
    assert reply.headers["content-type"].startswith("application/json")
    assert reply.json()["error"]["code"] == "invalid_api_key"


async def test_wrong_key_is_401_on_completions_and_models(backend_factory, gateway_factory):
    a, _, gw = await keyed_gateway(backend_factory, gateway_factory)
    c = client(gw.url, key="sk-wrong")

    with pytest.raises(openai.AuthenticationError) as err:
        await c.chat.completions.create(model="qwen-7b", messages=[])
    with pytest.raises(openai.AuthenticationError):
        await c.models.list()

    assert err.value.code == "invalid_api_key"
    assert a.requests == []


async def test_good_key_reaches_every_model(backend_factory, gateway_factory):
    _, _, gw = await keyed_gateway(backend_factory, gateway_factory)
    c = client(gw.url, key=GOOD_KEY)

    reply = await c.chat.completions.create(model="llama-8b", messages=[])
    models = [m.id async for m in c.models.list()]

    assert reply.choices[0].message.content == "from backend-b"
    assert sorted(models) == ["chat-default", "llama-8b", "qwen-7b"]


async def test_scoped_key_sees_and_uses_only_its_models(backend_factory, gateway_factory):
    _, b, gw = await keyed_gateway(backend_factory, gateway_factory)
    c = client(gw.url, key=SCOPED_KEY)

    allowed = await c.chat.completions.create(model="qwen-7b", messages=[])
    via_alias = await c.chat.completions.create(model="chat-default", messages=[])
    with pytest.raises(openai.NotFoundError) as err:
        await c.chat.completions.create(model="llama-8b", messages=[])
    with pytest.raises(openai.NotFoundError):
        await c.models.retrieve("llama-8b")
    models = [m.id async for m in c.models.list()]

    assert allowed.choices[0].message.content == "from backend-a"
    assert via_alias.choices[0].message.content == "from backend-a"
    # Out of scope looks exactly like a model that does not exist.
    assert err.value.code == "model_not_found"
    assert err.value.body["message"] == (
        "The model 'llama-8b' does not exist or you do not have access to it."
    )
    assert sorted(models) == ["chat-default", "qwen-7b"]
    assert b.requests == []


async def test_key_by_sha256_digest(backend_factory, gateway_factory):
    import hashlib

    digest = hashlib.sha256(GOOD_KEY.encode()).hexdigest()
    _, _, gw = await two_backends(
        backend_factory, gateway_factory, keys=[{"name": "hashed", "sha256": digest}]
    )

    reply = await client(gw.url, key=GOOD_KEY).chat.completions.create(model="qwen-7b", messages=[])

    assert reply.choices[0].message.content == "from backend-a"


async def test_anonymous_mode_needs_no_key(backend_factory, gateway_factory):
    _, _, gw = await two_backends(backend_factory, gateway_factory, anonymous=True)
    async with httpx.AsyncClient() as h:
        reply = await h.post(
            f"{gw.url}/chat/completions", json={"model": "qwen-7b", "messages": []}
        )

    assert reply.status_code == 200
    assert reply.json()["choices"][0]["message"]["content"] == "from backend-a"


async def test_anonymous_mode_refuses_a_key_it_does_not_know(backend_factory, gateway_factory):
    """Anonymous requests carry no key; a wrong or revoked key is a 401, never a way in."""
    _, _, gw = await keyed_gateway(backend_factory, gateway_factory, anonymous=True)

    with pytest.raises(openai.AuthenticationError):
        await client(gw.url, key="sk-wrong").models.list()
    async with httpx.AsyncClient() as h:
        no_key = await h.get(f"{gw.url}/models")
    assert no_key.status_code == 200
    assert (await client(gw.url, key=GOOD_KEY).models.list()).data


async def test_keys_file_changes_apply_without_restart(backend_factory, gateway_factory):
    _, _, gw = await keyed_gateway(backend_factory, gateway_factory)
    c = client(gw.url, key="sk-new-key")
    with pytest.raises(openai.AuthenticationError):
        await c.models.list()

    await gw.set_keys([{"name": "new", "key": "sk-new-key"}])

    assert len([m async for m in c.models.list()]) == 3
    with pytest.raises(openai.AuthenticationError):
        await client(gw.url, key=GOOD_KEY).models.list()
