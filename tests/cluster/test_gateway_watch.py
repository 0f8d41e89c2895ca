"""The gateway against a real API server: routes from LLMEndpoint status, keys from Secrets,
both followed live, with the gateway authenticated as a ServiceAccount that has only a Role
in its namespace (get/list/watch llmendpoints, list/watch secrets): missing RBAC fails here.

The backend the routes point at is a small in-process OpenAI-shaped aiohttp server on
127.0.0.1; it stands in for the Ray Serve Service, which this tier does not run (the real
serving path is covered in tests/serving), so the gateway's backend_url_template names it
instead of `<name>-serve.<namespace>.svc`. No operator runs here, so the test writes the
LLMEndpoint's status itself, as the operator would.
"""

from __future__ import annotations

import asyncio
import base64

import httpx
import openai
import pytest
from aiohttp import web
from kubernetes import client as k8s

from llmep_operator.api import GROUP, PLURAL, VERSION
from llmep_serving.gateway import GatewayServer, GatewaySettings
from tests.cluster.backend import start_openai_backend
from tests.cluster.conftest import eventually
from tests.cluster.endpoints import set_endpoint_status
from tests.cluster.gateway_identity import gateway_identity
from tests.conftest import FIXTURES, load_fixture

pytestmark = [pytest.mark.cluster, pytest.mark.asyncio]
KEY = "sk-cluster-0123456789"


async def start_backend() -> tuple[web.AppRunner, str]:
    """A backend that answers "from the cluster"."""
    return await start_openai_backend(lambda model: "from the cluster")


def set_status(cluster, namespace: str, name: str, url: str, ready: bool) -> None:
    """Serving (or ScaledToZero) at `url`, under its name and the alias chat-default."""
    set_endpoint_status(cluster, namespace, name, url=url, ready=ready, models=[name, "chat-default"])


def b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


async def test_gateway_follows_endpoints_and_key_secrets_live(cluster, namespace, crd, tmp_path):
    kubeconfig = gateway_identity(cluster, namespace, tmp_path)
    backend, url = await start_backend()
    endpoint = load_fixture(FIXTURES / "valid" / "minimal.yaml")
    endpoint["metadata"] = {"name": "qwen-small"}
    cluster.custom.create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, endpoint)
    set_status(cluster, namespace, "qwen-small", url, ready=True)
    cluster.core.create_namespaced_secret(
        namespace,
        k8s.V1Secret(
            metadata=k8s.V1ObjectMeta(name="team-a-key", labels={"llmep.io/api-key": "true"}),
            data={"key": base64.b64encode(KEY.encode()).decode()},
        ),
    )
    server = GatewayServer(
        GatewaySettings(
            host="127.0.0.1",
            port=0,
            kubeconfig=kubeconfig,
            namespace=namespace,
            watch_namespaces=[namespace],
            hold_deadline=30,
            wake_backend=False,
            backend_url_template=url,
            replicas=2,
        )
    )
    await server.start()
    gw = f"http://127.0.0.1:{server.port}/v1"
    c = openai.AsyncOpenAI(base_url=gw, api_key=KEY, max_retries=0)
    try:

        async def routed():
            reply = await c.chat.completions.create(model="chat-default", messages=[])
            assert reply.choices[0].message.content == "from the cluster"
            return [m.id async for m in c.models.list()]

        assert sorted(await eventually(routed)) == ["chat-default", "qwen-small"]
        # One ready replica taking 4 × targetQueueDepth (default 8) at once, split over 2 gateways.
        assert server.routes.table.lookup("qwen-small").max_inflight == 16
        async with httpx.AsyncClient() as h:
            assert (await h.get(f"http://127.0.0.1:{server.port}/readyz")).status_code == 200
        with pytest.raises(openai.AuthenticationError):
            await openai.AsyncOpenAI(base_url=gw, api_key="sk-wrong", max_retries=0).models.list()

        # Scaled to zero: a request is held, and answered once the endpoint is Ready again.
        set_status(cluster, namespace, "qwen-small", url, ready=False)
        await eventually(_held_route(server))
        held = asyncio.create_task(c.chat.completions.create(model="qwen-small", messages=[]))
        await eventually(_holding(server, 1))
        assert not held.done()
        set_status(cluster, namespace, "qwen-small", url, ready=True)
        reply = await asyncio.wait_for(held, 30)
        assert reply.choices[0].message.content == "from the cluster"

        # Deleting the key's Secret revokes it.
        cluster.core.delete_namespaced_secret("team-a-key", namespace)

        async def revoked():
            try:
                await c.models.list()
            except openai.AuthenticationError:
                return True
            raise AssertionError("the deleted key is still accepted")

        await eventually(revoked)
    finally:
        await server.stop()
        await backend.cleanup()


def _holding(server: GatewayServer, requests: int):
    async def check():
        assert server.metrics.model("qwen-small").held == requests

    return check


def _held_route(server: GatewayServer):
    async def check():
        route = server.routes.table.lookup("qwen-small")
        assert route is not None and not route.ready

    return check


async def test_a_forged_status_url_does_not_redirect_traffic(cluster, namespace, crd, tmp_path):
    """Attack: whoever may write an endpoint's status subresource points status.url at a server
    of their own, to read the prompts (and the keys) sent to that model. The gateway computes
    the backend from the endpoint's name and namespace, so the traffic stays where it was."""
    kubeconfig = gateway_identity(cluster, namespace, tmp_path)
    real, real_url = await start_backend()
    collector_hits: list[dict] = []

    async def collect(request: web.Request) -> web.Response:
        collector_hits.append(await request.json())
        return web.json_response({"error": {"message": "collected", "type": "x", "param": None, "code": None}})

    collector_app = web.Application()
    collector_app.router.add_post("/v1/{tail:.*}", collect)
    collector = web.AppRunner(collector_app)
    await collector.setup()
    await web.TCPSite(collector, "127.0.0.1", 0).start()
    collector_url = f"http://127.0.0.1:{collector.addresses[0][1]}/v1"

    endpoint = load_fixture(FIXTURES / "valid" / "minimal.yaml")
    endpoint["metadata"] = {"name": "qwen-small"}
    cluster.custom.create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, endpoint)
    set_status(cluster, namespace, "qwen-small", collector_url, ready=True)  # the forged status
    server = GatewayServer(
        GatewaySettings(
            host="127.0.0.1",
            port=0,
            kubeconfig=kubeconfig,
            namespace=namespace,
            watch_namespaces=[namespace],
            anonymous=True,
            wake_backend=False,
            backend_url_template=real_url,
        )
    )
    await server.start()
    c = openai.AsyncOpenAI(base_url=f"http://127.0.0.1:{server.port}/v1", api_key="unused", max_retries=0)
    try:

        async def answered():
            prompt = [{"role": "user", "content": "s3cret"}]
            reply = await c.chat.completions.create(model="qwen-small", messages=prompt)
            return reply.choices[0].message.content

        assert await eventually(answered) == "from the cluster"
        assert collector_hits == []
    finally:
        await server.stop()
        await real.cleanup()
        await collector.cleanup()


async def test_name_hijack_and_key_scopes_across_namespaces(cluster, namespace, crd, tmp_path):
    """Attacks from another namespace, against the real API server and the gateway's own RBAC:

    - a name with '/' that would take over `team-a/<name>` is refused at admission;
    - an endpoint in a second namespace with the same plain name, created first, does not receive
      the first namespace's traffic: the plain name answers neither, the qualified names each;
    - a key scoped to `<ns>/*` reaches that namespace only.
    """
    other = f"{namespace}-b"
    cluster.core.create_namespace(k8s.V1Namespace(metadata=k8s.V1ObjectMeta(name=other)))
    kubeconfig = gateway_identity(cluster, namespace, tmp_path, endpoint_namespaces=(other,))

    async def answer(request: web.Request) -> web.Response:
        body = await request.json()
        content = f"{request.match_info['ns']}/{request.match_info['name']}"
        message = {"role": "assistant", "content": content}
        choice = {"index": 0, "finish_reason": "stop", "message": message}
        reply = {"id": "x", "object": "chat.completion", "created": 1, "model": body["model"], "choices": [choice]}
        return web.json_response(reply)

    app = web.Application()
    app.router.add_post("/{ns}/{name}/v1/chat/completions", answer)
    backend = web.AppRunner(app)
    await backend.setup()
    await web.TCPSite(backend, "127.0.0.1", 0).start()
    template = f"http://127.0.0.1:{backend.addresses[0][1]}/{{namespace}}/{{name}}/v1"

    squat = load_fixture(FIXTURES / "valid" / "minimal.yaml")
    squat["metadata"] = {"name": "squat"}
    squat["spec"]["model"]["servedName"] = f"{namespace}/llama"
    with pytest.raises(k8s.ApiException) as refused:
        cluster.custom.create_namespaced_custom_object(GROUP, VERSION, other, PLURAL, squat)
    assert refused.value.status == 422 and "spec.model.servedName" in refused.value.body, refused.value.body
    assert "must not contain '/'" in refused.value.body

    for ns in (other, namespace):  # the squatter's endpoint is the older one
        endpoint = load_fixture(FIXTURES / "valid" / "minimal.yaml")
        endpoint["metadata"] = {"name": "llama"}
        cluster.custom.create_namespaced_custom_object(GROUP, VERSION, ns, PLURAL, endpoint)
        set_status(cluster, ns, "llama", "http://unused/v1", ready=True)
    keys = {"all-of-b": f"{other}/*", "plain": "llama"}
    for name, scope in keys.items():
        cluster.core.create_namespaced_secret(
            namespace,
            k8s.V1Secret(
                metadata=k8s.V1ObjectMeta(name=name, labels={"llmep.io/api-key": "true"}),
                data={"key": b64(f"sk-{name}"), "models": b64(scope)},
            ),
        )
    cluster.core.create_namespaced_secret(
        namespace,
        k8s.V1Secret(
            metadata=k8s.V1ObjectMeta(name="admin", labels={"llmep.io/api-key": "true"}),
            data={"key": b64("sk-admin")},
        ),
    )
    server = GatewayServer(
        GatewaySettings(
            host="127.0.0.1",
            port=0,
            kubeconfig=kubeconfig,
            namespace=namespace,
            watch_namespaces=[namespace, other],
            wake_backend=False,
            hold_deadline=0,
            backend_url_template=template,
        )
    )
    await server.start()
    gw = f"http://127.0.0.1:{server.port}/v1"

    async def ask(key: str, model: str) -> str:
        c = openai.AsyncOpenAI(base_url=gw, api_key=key, max_retries=0)
        try:
            reply = await c.chat.completions.create(model=model, messages=[{"role": "user", "content": "secret"}])
        except openai.NotFoundError:
            return "404"
        return reply.choices[0].message.content

    try:

        async def both_routed():
            assert await ask("sk-admin", f"{other}/llama") == f"{other}/llama"
            return True

        await eventually(both_routed)
        assert await ask("sk-admin", f"{namespace}/llama") == f"{namespace}/llama"
        assert await ask("sk-admin", "llama") == "404"  # claimed from two namespaces: nobody's
        assert await ask("sk-all-of-b", f"{other}/llama") == f"{other}/llama"
        assert await ask("sk-all-of-b", f"{namespace}/llama") == "404"
        assert await ask("sk-plain", f"{other}/llama") == "404"  # a plain scope never reaches a non-owner
    finally:
        await server.stop()
        await backend.cleanup()
        cluster.core.delete_namespace(other)
