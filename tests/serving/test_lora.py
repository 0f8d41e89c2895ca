"""LoRA adapters from an object store, served by Ray Serve LLM and vLLM's CPU build.

The tiny model's generated adapter (``ensure_tiny_lora``) is uploaded to the tests' S3 store
(SeaweedFS on loopback) under ``s3://BUCKET/adapters/<name>/``; the tiny endpoint, with
``spec.lora.source`` that folder, is rendered by the operator's code, and its Ray processes get the
store's address and keys as AWS environment (boto3, which Ray Serve LLM reads S3 with, honours
``AWS_ENDPOINT_URL``). Both serving paths run: direct (HAProxy to vLLM's own HTTP app, as
shipped) and proxy (Serve's proxy and OpenAI ingress). A request for ``<served>:<adapter>``
makes the replica download the adapter and load it into the engine.
"""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import openai
import pytest

from llmep_operator.settings import OperatorSettings
from llmep_serving.local import LocalServe
from llmep_serving.tinymodel import LORA_RANK, ensure_tiny_lora, tiny_ray_app
from tests.objectstore import ObjectStore
from tests.serving.conftest import ENGINE_ENV, SERVED_NAME, free_loopback_port, local_gateway

pytestmark = pytest.mark.timeout(900)
# Each serving path gets a Ray of its own (its switches are Ray processes' environment): these
# tests run before the tier's shared `served` app starts (conftest).
OWN_RAY = True

BUCKET = "lora"
ADAPTER = "demo"
MAX_ADAPTERS = 2
PROMPT = "Ray Serve scales"


@pytest.fixture(scope="module")
def adapter_source(object_store: ObjectStore) -> str:
    object_store.create_bucket(BUCKET)
    object_store.upload_folder(ensure_tiny_lora(), BUCKET, f"adapters/{ADAPTER}")
    return f"s3://{BUCKET}/adapters/"


@pytest.fixture(scope="module", params=["direct", "proxy"])
def lora_served(request, tiny_model_dir, object_store: ObjectStore, adapter_source: str) -> Iterator[LocalServe]:
    """The tiny model with LoRA on one serving path, one replica."""
    import ray

    if ray.is_initialized():
        # LocalServe would deploy into that Ray, whose processes lack this path's environment.
        pytest.fail("Ray already runs in this process: the LoRA tests need their own", pytrace=False)
    rendered = tiny_ray_app(
        tiny_model_dir,
        OperatorSettings(serving_path=request.param),
        name=SERVED_NAME,
        namespace="serving-tests",
        lora={
            "source": adapter_source,
            "adapters": [{"name": ADAPTER}],
            "maxAdaptersPerReplica": MAX_ADAPTERS,
            "maxRank": LORA_RANK,
        },
    )
    env = {**ENGINE_ENV, **rendered.env, "AWS_ENDPOINT_URL": object_store.endpoint_url, **ObjectStore.CLIENT_ENV}
    with LocalServe(
        rendered.application,
        port=free_loopback_port(),
        # One replica: its actor and its engine's bundle; the router or ingress takes none.
        num_cpus=3,
        env=env,
        ready_timeout_s=420,
    ) as local:
        yield local


@pytest.fixture(scope="module")
def lora_client(lora_served: LocalServe) -> openai.OpenAI:
    return openai.OpenAI(base_url=lora_served.base_url, api_key="unused", max_retries=0, timeout=120)


def complete(client: openai.OpenAI, model: str) -> str:
    out = client.completions.create(model=model, prompt=PROMPT, max_tokens=16, temperature=0, seed=0)
    assert out.model == model
    return out.choices[0].text


def test_adapter_changes_the_answer(lora_served: LocalServe, lora_client: openai.OpenAI) -> None:
    adapter_model = f"{SERVED_NAME}:{ADAPTER}"
    listed = [m.id for m in lora_client.models.list().data]
    if lora_served.env.get("RAY_SERVE_LLM_ENABLE_DIRECT_STREAMING") == "1":
        # vLLM's own /v1/models: the adapters the engine has loaded, none yet.
        assert listed == [SERVED_NAME]
    else:
        # Serve's OpenAI ingress lists every folder under the dynamic loading path.
        assert listed == [SERVED_NAME, adapter_model]

    base = complete(lora_client, SERVED_NAME)
    adapted = complete(lora_client, adapter_model)
    assert adapted != base, f"the adapter changed nothing: {base!r}"
    # Greedy either way: the same answers again, so the difference is the adapter's.
    assert complete(lora_client, adapter_model) == adapted
    assert complete(lora_client, SERVED_NAME) == base
    chat = lora_client.chat.completions.create(
        model=adapter_model, messages=[{"role": "user", "content": "What is Ray Serve?"}], max_tokens=16
    )
    assert chat.model == adapter_model and chat.choices[0].message.content

    assert [m.id for m in lora_client.models.list().data] == [SERVED_NAME, adapter_model]


def test_unknown_adapter_is_not_found(lora_client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError):
        complete(lora_client, f"{SERVED_NAME}:missing")


ADAPTER_KEY, ALL_KEY = "sk-test-adapter-only", "sk-test-every-model"


@pytest.fixture(scope="module")
def gateway(lora_served: LocalServe, tmp_path_factory) -> Iterator[str]:
    """`llmep gateway` in local mode in front of the LoRA app, as a user runs it: the routes file
    names the adapter, one key may call only the adapter, another every model."""
    routes = [{"models": [SERVED_NAME], "adapters": [ADAPTER], "url": lora_served.base_url, "ready": True}]
    keys = [{"name": "adapter-only", "key": ADAPTER_KEY, "models": [ADAPTER]}, {"name": "all", "key": ALL_KEY}]
    with local_gateway(tmp_path_factory.mktemp("gateway"), routes, keys) as root:
        yield f"{root}/v1"


def test_through_the_gateway_the_adapter_is_listed_called_and_scoped(gateway: str, lora_client: openai.OpenAI) -> None:
    every = openai.OpenAI(base_url=gateway, api_key=ALL_KEY, max_retries=0, timeout=120)
    cards = httpx.get(f"{gateway}/models", headers={"Authorization": f"Bearer {ALL_KEY}"}, timeout=10).json()["data"]
    assert {c["id"]: c.get("parent") for c in cards} == {SERVED_NAME: None, ADAPTER: SERVED_NAME}

    # The bare adapter name answers as the engine's own '<base>:<adapter>' does.
    adapted = complete(lora_client, f"{SERVED_NAME}:{ADAPTER}")
    out = every.completions.create(model=ADAPTER, prompt=PROMPT, max_tokens=16, temperature=0, seed=0)
    assert out.choices[0].text == adapted
    assert complete(every, SERVED_NAME) == complete(lora_client, SERVED_NAME)

    scoped = openai.OpenAI(base_url=gateway, api_key=ADAPTER_KEY, max_retries=0, timeout=120)
    reply = scoped.completions.create(model=ADAPTER, prompt=PROMPT, max_tokens=16, temperature=0, seed=0)
    assert reply.choices[0].text == adapted
    with pytest.raises(openai.NotFoundError) as refused:
        scoped.completions.create(model=SERVED_NAME, prompt=PROMPT, max_tokens=4)
    assert refused.value.code == "model_not_found"
    assert [m.id for m in scoped.models.list().data] == [ADAPTER]
