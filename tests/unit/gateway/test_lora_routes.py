"""LoRA adapters through the gateway as an OpenAI SDK user sees them: every id of an adapter
reaches its base model's replicas as "<served name>:<adapter>", /v1/models lists it with its
parent, key scopes name adapters on their own, and name ownership treats them like models.

The backends are the small in-process OpenAI-shaped servers of conftest.py, which record the
body each request reached them with; the real Ray Serve + vLLM path is covered in tests/serving.
Cluster-shaped tests route stored LLMEndpoint bodies the way the gateway's watch does
(endpoint_to_backend, then build_table with the gateway's settings).
"""

from __future__ import annotations

import asyncio
from typing import Any

import httpx
import openai
import pytest

from llmep_serving.gateway.k8s import endpoint_to_backend
from llmep_serving.gateway.routing import build_table
from tests.unit.gateway.conftest import FakeBackend, RunningGateway, until

pytestmark = [pytest.mark.unit, pytest.mark.asyncio]

MESSAGES = [{"role": "user", "content": "hi"}]
ADAPTER_IDS = ("sql", "tiny:sql", "team-a/sql", "team-a/tiny:sql")
BASE_IDS = ("tiny", "team-a/tiny")


def client(base_url: str, key: str = "unused") -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=base_url, api_key=key, max_retries=0)


def llm_endpoint(
    name: str,
    namespace: str = "team-a",
    *,
    adapters: tuple[str, ...] = (),
    created: str = "2026-01-01T00:00:00Z",
) -> dict[str, Any]:
    """A ready LLMEndpoint as the API server stores it, its adapters in spec.lora."""
    spec: dict[str, Any] = {"model": {"source": "hf://x/y"}}
    if adapters:
        spec["lora"] = {"source": "s3://adapters/tiny", "adapters": [{"name": a} for a in adapters]}
    return {
        "apiVersion": "llmep.io/v1alpha1",
        "kind": "LLMEndpoint",
        "metadata": {"name": name, "namespace": namespace, "creationTimestamp": created},
        "spec": spec,
        "status": {
            "url": f"http://{name}-serve.{namespace}.svc:8000/v1",
            "models": [name],
            "conditions": [{"type": "Ready", "status": "True", "reason": "Serving"}],
            "replicas": {"desired": 1, "ready": 1},
        },
    }


def route_endpoints(gw: RunningGateway, *served: tuple[dict[str, Any], FakeBackend]) -> None:
    """Route as the gateway's LLMEndpoint watch does, each endpoint's Serve Service being its fake backend."""
    backends = [endpoint_to_backend(obj, backend.url) for obj, backend in served]
    gw.server.routes.replace(
        build_table([b for b in backends if b is not None], gw.server.settings.plain_name_namespaces)
    )


async def reply_from(c: openai.AsyncOpenAI, model: str) -> str | None:
    reply = await c.chat.completions.create(model=model, messages=MESSAGES)
    return reply.choices[0].message.content


async def test_an_adapter_is_reached_by_its_name_and_as_base_colon_adapter(backend_factory, gateway_factory):
    tiny = await backend_factory("tiny-replica")
    other = await backend_factory("other-replica")
    gw = await gateway_factory(
        [
            {"models": ["tiny"], "url": tiny.url, "adapters": ["sql", "chat"]},
            {"models": ["other"], "url": other.url},
        ]
    )
    c = client(gw.url)

    answers = [await reply_from(c, model) for model in ("sql", "tiny:sql", "chat", "tiny")]

    assert answers == ["from tiny-replica"] * 4
    # Ray Serve LLM knows an adapter only as "<base>:<adapter>"; the base keeps its own id.
    assert [r["model"] for r in tiny.requests] == ["tiny:sql", "tiny:sql", "tiny:chat", "tiny"]
    assert all(r["messages"] == MESSAGES for r in tiny.requests)
    assert other.requests == []


async def test_every_id_of_a_cluster_adapter_reaches_its_base_as_base_colon_adapter(backend_factory, gateway_factory):
    tiny = await backend_factory("tiny-replica")
    gw = await gateway_factory([])
    route_endpoints(gw, (llm_endpoint("tiny", adapters=("sql",)), tiny))
    c = client(gw.url)

    answers = [await reply_from(c, model) for model in (*ADAPTER_IDS, *BASE_IDS)]

    assert answers == ["from tiny-replica"] * 6
    assert [r["model"] for r in tiny.requests] == ["tiny:sql"] * 4 + ["tiny"] * 2


async def test_models_lists_each_adapter_once_with_its_parent(backend_factory, gateway_factory):
    tiny = await backend_factory("tiny-replica")
    gw = await gateway_factory([{"models": ["tiny", "tiny-alias"], "url": tiny.url, "adapters": ["sql"]}])
    c = client(gw.url)

    listed = {m.id: m.to_dict() for m in (await c.models.list()).data}
    one = (await c.models.retrieve("tiny:sql")).to_dict()

    assert sorted(listed) == ["sql", "tiny", "tiny-alias"]
    assert listed["sql"]["parent"] == "tiny" and listed["sql"]["object"] == "model"
    assert "parent" not in listed["tiny"] and "parent" not in listed["tiny-alias"]
    assert one["id"] == "tiny:sql" and one["parent"] == "tiny"


async def test_an_unknown_adapter_of_a_known_base_is_404_model_not_found(backend_factory, gateway_factory):
    tiny = await backend_factory("tiny-replica")
    gw = await gateway_factory([{"models": ["tiny"], "url": tiny.url, "adapters": ["sql"]}])

    with pytest.raises(openai.NotFoundError) as err:
        await client(gw.url).chat.completions.create(model="tiny:nope", messages=MESSAGES)

    assert err.value.code == "model_not_found"
    assert err.value.body == {
        "message": "The model 'tiny:nope' does not exist or you do not have access to it.",
        "type": "invalid_request_error",
        "param": "model",
        "code": "model_not_found",
    }
    assert tiny.requests == []


@pytest.mark.parametrize(
    ("scope", "reaches", "lists"),
    [
        # Any id of the adapter names the same route, so each scope grants all of them alike.
        ("sql", set(ADAPTER_IDS), ["sql"]),
        ("tiny:sql", set(ADAPTER_IDS), ["sql"]),
        ("team-a/sql", set(ADAPTER_IDS), ["sql"]),
        # The base model's scope does not grant its adapters.
        ("tiny", set(BASE_IDS), ["tiny"]),
        ("team-a/*", {*ADAPTER_IDS, *BASE_IDS}, ["sql", "tiny"]),
    ],
)
async def test_a_key_scope_names_an_adapter_or_its_base_not_both(
    backend_factory, gateway_factory, scope, reaches, lists
):
    tiny = await backend_factory("tiny-replica")
    gw = await gateway_factory([], keys=[{"name": "scoped", "key": "sk-scoped-0123456789", "models": scope}])
    route_endpoints(gw, (llm_endpoint("tiny", adapters=("sql",)), tiny))
    c = client(gw.url, key="sk-scoped-0123456789")

    reached, refused = set(), []
    for model in (*ADAPTER_IDS, *BASE_IDS):
        try:
            await reply_from(c, model)
            reached.add(model)
        except openai.NotFoundError as err:
            refused.append(err.code)
    listed = sorted(m.id for m in (await c.models.list()).data)

    assert reached == reaches
    # Out of scope answers exactly like a model that does not exist.
    assert refused == ["model_not_found"] * (6 - len(reaches))
    assert listed == lists


async def test_an_adapter_needs_a_known_key_like_any_model(backend_factory, gateway_factory):
    tiny = await backend_factory("tiny-replica")
    gw = await gateway_factory(
        [{"models": ["tiny"], "url": tiny.url, "adapters": ["sql"]}],
        keys=[{"name": "scoped", "key": "sk-scoped-0123456789", "models": "sql"}],
    )

    with pytest.raises(openai.AuthenticationError) as err:
        await reply_from(client(gw.url, key="sk-wrong"), "sql")

    assert err.value.code == "invalid_api_key"
    assert tiny.requests == []


@pytest.mark.parametrize("rival", ["adapter", "model"])
async def test_an_adapter_name_claimed_from_two_namespaces_is_ambiguous(backend_factory, gateway_factory, rival):
    tiny = await backend_factory("team-a-tiny")
    other = await backend_factory("team-b-llama")
    gw = await gateway_factory([])
    team_b = llm_endpoint("llama", "team-b", adapters=("sql",)) if rival == "adapter" else llm_endpoint("sql", "team-b")
    route_endpoints(gw, (llm_endpoint("tiny", adapters=("sql",)), tiny), (team_b, other))
    c = client(gw.url)

    with pytest.raises(openai.NotFoundError) as err:
        await reply_from(c, "sql")
    from_a = await reply_from(c, "team-a/sql")
    from_b = await reply_from(c, "team-b/sql")
    listed = {m.id: m.to_dict().get("parent") for m in (await c.models.list()).data}

    assert err.value.code == "model_not_found"
    assert (from_a, from_b) == ("from team-a-tiny", "from team-b-llama")
    assert [r["model"] for r in tiny.requests] == ["tiny:sql"]
    if rival == "adapter":
        assert [r["model"] for r in other.requests] == ["llama:sql"]
        assert listed == {"tiny": None, "team-a/sql": "tiny", "llama": None, "team-b/sql": "llama"}
    else:
        assert [r["model"] for r in other.requests] == ["sql"]
        assert listed == {"tiny": None, "team-a/sql": "tiny", "team-b/sql": None}


async def test_an_adapter_is_held_while_its_base_is_not_ready_and_wakes_the_base(backend_factory, gateway_factory):
    tiny = await backend_factory("tiny-replica")
    gw = await gateway_factory([{"models": ["tiny"], "url": tiny.url, "ready": False, "adapters": ["sql"]}])
    held = asyncio.create_task(client(gw.url).chat.completions.create(model="sql", messages=MESSAGES))
    await until(lambda: gw.server.metrics.model("tiny:sql").held == 1 and tiny.paths == ["/v1/completions"])
    assert not held.done()

    await gw.set_routes([{"models": ["tiny"], "url": tiny.url, "ready": True, "adapters": ["sql"]}])
    reply = await asyncio.wait_for(held, 5)

    assert reply.choices[0].message.content == "from tiny-replica"
    # The wake-up starts a replica of the base model; the held request then goes as the adapter.
    assert list(zip(tiny.paths, [r["model"] for r in tiny.requests], strict=True)) == [
        ("/v1/completions", "tiny"),
        ("/v1/chat/completions", "tiny:sql"),
    ]


async def test_adapter_requests_use_the_bases_replicas_and_skip_a_dead_one(backend_factory, gateway_factory):
    alive = await backend_factory("alive")
    dead = "http://127.0.0.1:9/v1"  # nothing listens on the discard port
    gw = await gateway_factory([{"models": ["tiny"], "url": [dead, alive.url], "adapters": ["sql"]}])
    c = client(gw.url)

    answers = [await reply_from(c, "sql") for _ in range(4)]

    assert answers == ["from alive"] * 4
    assert [r["model"] for r in alive.requests] == ["tiny:sql"] * 4


async def test_metrics_label_an_adapter_by_base_colon_adapter_never_by_what_the_client_sent(
    backend_factory, gateway_factory
):
    tiny = await backend_factory("tiny-replica")
    gw = await gateway_factory([{"models": ["tiny"], "url": tiny.url, "adapters": ["sql"]}])
    c = client(gw.url)
    for model in ("sql", "tiny:sql", "tiny"):
        await reply_from(c, model)
    with pytest.raises(openai.NotFoundError):
        await reply_from(c, "tiny:nope")

    async with httpx.AsyncClient() as h:
        metrics = (await h.get(f"{gw.root}/metrics")).text

    assert 'llmep_gateway_request_duration_seconds_count{model="tiny:sql"} 2.0' in metrics
    assert 'llmep_gateway_request_duration_seconds_count{model="tiny"} 1.0' in metrics
    assert 'model="sql"' not in metrics and "nope" not in metrics
