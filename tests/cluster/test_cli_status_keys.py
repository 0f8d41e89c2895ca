"""`llmep status` and `llmep keys` against the rig's API server, run as a user runs them: the real
command in a subprocess, with a kubeconfig.

- `llmep status --exit-code` exits 3 while any endpoint is not Ready (0 without the flag), and
  shows each endpoint's reason and message; the status is written by the test, as the operator
  would, since no operator runs here;
- `llmep keys create` writes a key's limits (--rpm, --tpm, --max-tokens-per-day, --priority) into
  its Secret as the fields the gateway reads, `list` shows them, and a bad limit exits 2 with
  nothing written;
- `llmep keys create|list|revoke` end to end with a gateway running in cluster mode in this
  process (as tests/cluster/test_gateway_watch.py runs it), authenticated as a ServiceAccount with
  the gateway's least-privilege Role: the key printed once works, its scope holds, `list` never
  shows it, and `revoke` makes the gateway refuse it.
- a key created with `--rpm 2` gets two answers from that gateway and then a 429, and `llmep
  usage` against the gateway's /metrics counts them (two 200s, one 429, one refused by `requests`).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import re
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from functools import partial
from pathlib import Path

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

pytestmark = pytest.mark.cluster


def llmep(kubeconfig: Path, *args: str) -> subprocess.CompletedProcess:
    # A wide terminal, so rich folds no message across lines of its table.
    env = {**os.environ, "KUBECONFIG": str(kubeconfig), "COLUMNS": "300"}
    return subprocess.run(
        [sys.executable, "-m", "llmep_serving.cli", *args], capture_output=True, text=True, env=env, timeout=120
    )


def create_endpoint(cluster, namespace: str, name: str) -> dict:
    body = {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "LLMEndpoint",
        "metadata": {"name": name},
        "spec": {"model": {"source": "hf://Qwen/Qwen2.5-7B-Instruct"}},
    }
    return cluster.custom.create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, body)


def set_status(cluster, namespace: str, name: str, url: str, ready: bool, reason: str, message: str) -> None:
    """The status the operator writes, observing the endpoint's current generation."""
    set_endpoint_status(
        cluster, namespace, name, url=url, ready=ready, reason=reason, message=message, generation="current"
    )


# ---- llmep status ----------------------------------------------------------------------------


def test_status_exit_code_follows_readiness(cluster, namespace, crd):
    kc = cluster.kubeconfig
    empty = llmep(kc, "status", "-n", namespace, "--exit-code")
    assert empty.returncode == 0, empty.stderr
    assert f"No LLMEndpoints in namespace {namespace}." in empty.stdout

    create_endpoint(cluster, namespace, "alpha")
    set_status(cluster, namespace, "alpha", "http://alpha-serve/v1", True, "Serving", "1 replica(s) serving")
    ready = llmep(kc, "status", "-n", namespace, "--exit-code")
    assert ready.returncode == 0, ready.stdout + ready.stderr
    assert f"{namespace}/alpha" in ready.stdout and "True (Serving)" in ready.stdout
    assert "1 replica(s) serving" in ready.stdout and "1/1" in ready.stdout

    create_endpoint(cluster, namespace, "beta")
    waiting = "pod beta-workers-abc cannot be scheduled: 0/3 nodes are available"
    set_status(cluster, namespace, "beta", "http://beta-serve/v1", False, "WaitingForGPUNode", waiting)
    one_down = llmep(kc, "status", "-n", namespace, "--exit-code")
    assert one_down.returncode == 3, one_down.stdout + one_down.stderr
    assert "False (WaitingForGPUNode)" in one_down.stdout and waiting in one_down.stdout
    assert "True (Serving)" in one_down.stdout  # alpha is still listed as it is
    without_flag = llmep(kc, "status", "-n", namespace)
    assert without_flag.returncode == 0
    assert without_flag.stdout == one_down.stdout

    # Ready again: 0 again.
    set_status(cluster, namespace, "beta", "http://beta-serve/v1", True, "Serving", "1 replica(s) serving")
    assert llmep(kc, "status", "-n", namespace, "--exit-code").returncode == 0

    # An endpoint the operator has not reconciled yet is not Ready.
    create_endpoint(cluster, namespace, "gamma")
    fresh = llmep(kc, "status", "-n", namespace, "--exit-code")
    assert fresh.returncode == 3, fresh.stdout
    assert "Unknown (not reconciled yet)" in fresh.stdout
    assert "(the operator has not processed the latest change yet)" in fresh.stdout

    everywhere = llmep(kc, "status", "-A", "--exit-code")
    assert everywhere.returncode == 3
    assert all(f"{namespace}/{n}" in everywhere.stdout for n in ("alpha", "beta", "gamma"))


def test_status_without_permission_to_list_exits_1_with_the_servers_answer(cluster, namespace, crd, tmp_path):
    cluster.core.create_namespaced_service_account(
        namespace, k8s.V1ServiceAccount(metadata=k8s.V1ObjectMeta(name="nobody"))
    )
    kc = cluster.kubeconfig_for_token(cluster.token_for("nobody", namespace), tmp_path / "kubeconfig", "nobody")
    result = llmep(kc, "status", "-n", namespace, "--exit-code")
    assert result.returncode == 1
    assert result.stderr == "llmep status: cannot list LLMEndpoints: 403 Forbidden\n"
    assert result.stdout == ""


# ---- llmep keys: limits ----------------------------------------------------------------------


def test_keys_create_writes_limits_list_shows_them_and_a_bad_limit_writes_nothing(cluster, namespace):
    kc = cluster.kubeconfig
    bad = llmep(kc, "keys", "create", "app-b", "-n", namespace, "--rpm", "60", "--tpm", "0")
    assert bad.returncode == 2
    assert "llmep keys create: error: argument --tpm: '0' is not a whole number of at least 1" in bad.stderr
    assert cluster.core.list_namespaced_secret(namespace, label_selector="llmep.io/api-key").items == []

    limits = ["--rpm", "60", "--tpm", "20000", "--max-tokens-per-day", "1000000", "--priority", "high"]
    created = llmep(kc, "keys", "create", "app-b", "-n", namespace, *limits)
    assert created.returncode == 0, created.stderr
    secret = cluster.core.read_namespaced_secret("app-b", namespace)
    data = {field: base64.b64decode(value).decode() for field, value in secret.data.items()}
    assert data.pop("sha256") and data == {"rpm": "60", "tpm": "20000", "tokens_per_day": "1000000", "priority": "high"}

    assert llmep(kc, "keys", "create", "app-c", "-n", namespace, "--models", "alpha").returncode == 0
    listed = llmep(kc, "keys", "list", "-n", namespace)
    assert listed.returncode == 0, listed.stderr
    assert re.search(r"│ app-b +│ \(all\) +│ 60 +│ 20000 +│ 1000000 +│ high +│", listed.stdout), listed.stdout
    assert re.search(r"│ app-c +│ alpha +│ - +│ - +│ - +│ - +│", listed.stdout), listed.stdout


# ---- llmep keys, with a gateway --------------------------------------------------------------


async def start_backend() -> tuple[web.AppRunner, str]:
    """A backend that answers "hello from {model}"."""
    return await start_openai_backend(lambda model: f"hello from {model}")


# The gateway may not listen yet when the first key is tried: connection errors are retried too.
RETRY_ON = (openai.APIStatusError, openai.APIConnectionError, AssertionError)


@contextlib.asynccontextmanager
async def gateway_for(cluster, namespace: str, tmp_path: Path) -> AsyncIterator[str]:
    """A gateway in cluster mode in this process, as the gateway's ServiceAccount, in front of
    endpoints alpha and beta (Ready, answered by the backend); yields its base URL (/metrics is
    on the same port)."""
    backend, url = await start_backend()
    for name in ("alpha", "beta"):
        create_endpoint(cluster, namespace, name)
        set_status(cluster, namespace, name, url, True, "Serving", "1 replica(s) serving")
    server = GatewayServer(
        GatewaySettings(
            host="127.0.0.1",
            port=0,
            kubeconfig=gateway_identity(cluster, namespace, tmp_path),
            namespace=namespace,
            watch_namespaces=[namespace],
            wake_backend=False,
            hold_deadline=0,
            backend_url_template=url,
        )
    )
    await server.start()
    try:
        yield f"http://127.0.0.1:{server.port}/v1"
    finally:
        await server.stop()
        await backend.cleanup()


async def ask_gateway(gw: str, key: str, model: str) -> str:
    c = openai.AsyncOpenAI(base_url=gw, api_key=key, max_retries=0)
    reply = await c.chat.completions.create(model=model, messages=[{"role": "user", "content": "hi"}])
    return reply.choices[0].message.content


@pytest.mark.asyncio
async def test_keys_create_list_revoke_end_to_end_through_the_gateway(cluster, namespace, crd, tmp_path):
    kc = cluster.kubeconfig

    async def run(*args: str) -> subprocess.CompletedProcess:
        return await asyncio.to_thread(llmep, kc, *args)

    async with gateway_for(cluster, namespace, tmp_path) as gw:
        ask = partial(ask_gateway, gw)
        created = await run("keys", "create", "app-a", "-n", namespace, "--models", "alpha")
        assert created.returncode == 0, created.stderr
        key = created.stdout.strip()
        assert created.stdout == f"{key}\n" and key.startswith("sk-llmep-") and len(key) > 40
        assert f"created key 'app-a' in namespace {namespace} for models alpha." in created.stderr
        assert key not in created.stderr

        async def answered():
            assert await ask(key, "alpha") == "hello from alpha"
            return True

        await eventually(answered, retry_on=RETRY_ON, what="the new key to be accepted for alpha")
        with pytest.raises(openai.NotFoundError):  # outside its scope: as if the model did not exist
            await ask(key, "beta")

        # The Secret holds only the hash; `list` shows names and scopes, never a key or hash.
        secret = cluster.core.read_namespaced_secret("app-a", namespace)
        assert set(secret.data) == {"sha256", "models"}
        listed = await run("keys", "list", "-n", namespace)
        assert listed.returncode == 0, listed.stderr
        assert "app-a" in listed.stdout and "alpha" in listed.stdout
        assert key not in listed.stdout and "sha256" not in listed.stdout

        again = await run("keys", "create", "app-a", "-n", namespace)
        assert again.returncode == 1
        assert again.stderr == (
            "llmep keys create: 409 Conflict (a key with that name exists: revoke it first or pick another name)\n"
        )
        assert again.stdout == ""

        revoked_at = time.monotonic()
        revoked = await run("keys", "revoke", "app-a", "-n", namespace)
        assert revoked.returncode == 0, revoked.stderr
        assert revoked.stderr == "revoked key 'app-a'; the gateway refuses it within seconds.\n"

        async def refused():
            try:
                await ask(key, "alpha")
            except openai.AuthenticationError:
                return time.monotonic() - revoked_at
            raise AssertionError("the revoked key is still accepted")

        seconds = await eventually(refused, timeout=10, retry_on=RETRY_ON, what="the gateway to refuse the revoked key")
        listed = await run("keys", "list", "-n", namespace)
        assert "app-a" not in listed.stdout

        # revoke touches only llmep keys, and says why it did nothing.
        cluster.core.create_namespaced_secret(
            namespace, k8s.V1Secret(metadata=k8s.V1ObjectMeta(name="db-password"), string_data={"p": "x"})
        )
        other = await run("keys", "revoke", "db-password", "-n", namespace)
        assert other.returncode == 1
        assert other.stderr == (
            "llmep keys revoke: Secret db-password is not an llmep API key (no llmep.io/api-key label)\n"
        )
        assert cluster.core.read_namespaced_secret("db-password", namespace)
        missing = await run("keys", "revoke", "app-a", "-n", namespace)
        assert (missing.returncode, missing.stderr) == (1, "llmep keys revoke: 404 Not Found\n")
    print(f"the gateway refused the revoked key {seconds:.2f}s after `llmep keys revoke` started")


@pytest.mark.asyncio
async def test_a_key_created_with_rpm_is_held_to_it_by_the_gateway_and_llmep_usage_counts_the_refusal(
    cluster, namespace, crd, tmp_path
):
    kc = cluster.kubeconfig

    async def run(*args: str) -> subprocess.CompletedProcess:
        return await asyncio.to_thread(llmep, kc, *args)

    async with gateway_for(cluster, namespace, tmp_path) as gw:
        ask = partial(ask_gateway, gw)
        # An unlimited key first, so alpha is routed before the limited key's first request.
        probe = (await run("keys", "create", "probe", "-n", namespace)).stdout.strip()
        await eventually(lambda: ask(probe, "alpha"), retry_on=RETRY_ON, what="the probe key to be accepted")

        created = await run("keys", "create", "app-r", "-n", namespace, "--models", "alpha", "--rpm", "2")
        assert created.returncode == 0, created.stderr
        assert "limits: 2 requests per minute." in created.stderr
        key = created.stdout.strip()
        # Until the gateway has loaded the key it answers 401, which takes nothing from its limits.
        await eventually(lambda: ask(key, "alpha"), retry_on=RETRY_ON, what="the limited key to be accepted")
        assert await ask(key, "alpha") == "hello from alpha"
        with pytest.raises(openai.RateLimitError):
            await ask(key, "alpha")

        usage = await run("usage", "--url", gw.removesuffix("/v1") + "/metrics", "-o", "json")
    assert usage.returncode == 0, usage.stderr
    rows = {(row["key"], row["model"]): row for row in json.loads(usage.stdout)["usage"]}
    limited = rows[("app-r", "alpha")]
    assert (limited["requests_by_code"], limited["rate_limited_by_limit"]) == ({"200": 2, "429": 1}, {"requests": 1})
    assert rows[("probe", "alpha")]["rate_limited"] == 0
