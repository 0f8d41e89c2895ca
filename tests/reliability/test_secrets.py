"""Secrets never leak: an API key through the gateway (a subprocess at DEBUG, in cluster mode as
a least-privilege ServiceAccount) and an HF token through the operator (tokenSecretRef) appear in
no log line and no rendered object; the token reaches the RayService only as a secretKeyRef. And
deleting a key's Secret revokes the key within a stated bound, measured.

The backend the endpoint's status points at is a small OpenAI-shaped aiohttp server
(fake_openai_backend.py) standing in for the Ray Serve Service, which the rig does not run; the
real serving path is covered in tests/serving. All traffic is on 127.0.0.1.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import secrets
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from kubernetes import client as k8s

from tests.cluster.conftest import wait_until
from tests.cluster.operator_identity import operator_identity
from tests.cluster.test_gateway_watch import gateway_identity, set_status
from tests.reliability.stack import free_port, start_backend, start_gateway

pytestmark = pytest.mark.timeout(300)

REPO = Path(__file__).resolve().parents[2]
HANDLERS = str(REPO / "operator" / "llmep_operator" / "handlers.py")
CRD = REPO / "crds" / "llmendpoints.llmep.io.yaml"
GROUP, VERSION, PLURAL = "llmep.io", "v1alpha1", "llmendpoints"
REVOCATION_BOUND_S = 10.0


def _secret(name: str, data: dict[str, str], labels: dict[str, str] | None = None) -> k8s.V1Secret:
    return k8s.V1Secret(
        metadata=k8s.V1ObjectMeta(name=name, labels=labels),
        data={k: base64.b64encode(v.encode()).decode() for k, v in data.items()},
    )


def _request(url: str, key: str, body: dict | None = None) -> tuple[int, str]:
    req = urllib.request.Request(  # noqa: S310 - loopback only
        url,
        data=json.dumps(body).encode() if body is not None else None,
        headers={"Authorization": f"Bearer {key}", "Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:  # noqa: S310
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def _leaks(text: str, *needles: str) -> list[str]:
    return [n[:6] + "..." for n in needles if n in text]


def test_no_key_or_token_in_any_log_or_object_and_a_deleted_key_is_revoked_in_time(
    cluster, namespace, kopf_runner_as, tmp_path, caplog, capfd
):
    cluster.apply_crd(CRD)
    api_key = f"sk-llmep-{secrets.token_hex(16)}"
    hf_token = f"hf_{secrets.token_hex(16)}"
    digest = hashlib.sha256(api_key.encode()).hexdigest()

    # -- the operator, with an HF token Secret -------------------------------------------------
    cluster.core.create_namespaced_secret(namespace, _secret("hf-token", {"token": hf_token}))
    account, rbac = operator_identity(cluster.bin_dir, f"sec-{secrets.token_hex(3)}", namespace,
                                      f"watchNamespaces={{{namespace}}}")  # fmt: skip
    cluster.apply(rbac)
    endpoint = {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "LLMEndpoint",
        "metadata": {"name": "gated"},
        "spec": {"model": {"source": "hf://meta-llama/Llama-3.1-8B-Instruct", "servedName": "gated",
                           "tokenSecretRef": {"name": "hf-token", "key": "token"}}},
    }  # fmt: skip
    try:
        with kopf_runner_as(account, namespace, paths=(HANDLERS,), watch_namespaces=(namespace,)) as runner:
            cluster.apply(endpoint, namespace)
            wait_until(lambda: cluster.kubectl("get", "rayservice", "gated", "-n", namespace, "--ignore-not-found",
                                               "-o", "name"), timeout=60, message="RayService gated")  # fmt: skip
            wait_until(lambda: cluster.kubectl("get", "pods", "-n", namespace, "-l", "llmep.io/endpoint=gated",
                                               "-o", "name"), timeout=60, message="pods of gated")  # fmt: skip
        rendered = cluster.kubectl("get", "rayservice,raycluster,pods,services", "-n", namespace, "-o", "yaml")
        refs = [
            e["valueFrom"]["secretKeyRef"]
            for doc in [json.loads(cluster.kubectl("get", "rayservice", "gated", "-n", namespace, "-o", "json"))]
            for group in [doc["spec"]["rayClusterConfig"]["headGroupSpec"],
                          *doc["spec"]["rayClusterConfig"]["workerGroupSpecs"]]
            for c in group["template"]["spec"]["containers"]
            for e in c.get("env", [])
            if "secretKeyRef" in (e.get("valueFrom") or {})
        ]  # fmt: skip
    finally:
        for obj in rbac:
            if obj["kind"].startswith("Cluster"):
                with contextlib.suppress(Exception):
                    cluster.kubectl("delete", obj["kind"].lower(), obj["metadata"]["name"], "--ignore-not-found")
    assert runner.exception is None
    assert {"name": "hf-token", "key": "token"} in refs, refs

    # -- the gateway, in cluster mode as its ServiceAccount, at DEBUG --------------------------
    kubeconfig = gateway_identity(cluster, namespace, tmp_path)
    backend_port, port = free_port(), free_port()
    backend = start_backend(backend_port, "cluster", tmp_path)
    open_endpoint = {**endpoint, "metadata": {"name": "open"}, "spec": {"model": {"source": "hf://Qwen/Qwen2.5-0.5B"}}}
    cluster.custom.create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, open_endpoint)
    set_status(cluster, namespace, "open", f"http://127.0.0.1:{backend_port}/v1", ready=True)
    cluster.core.create_namespaced_secret(
        namespace, _secret("team-a-key", {"key": api_key, "models": "open"}, {"llmep.io/api-key": "true"})
    )
    # The backend stands in for the endpoint's Serve Service: the gateway's URL template names it.
    gateway = start_gateway(
        port, tmp_path, "--kubeconfig", str(kubeconfig), "--namespace", namespace,
        "--watch-namespaces", namespace, "--log-level", "DEBUG", "--no-wake-backend",
        "--backend-url-template", f"http://127.0.0.1:{backend_port}/v1",
    )  # fmt: skip
    base = f"http://127.0.0.1:{port}/v1"
    chat = {"model": "open", "messages": [{"role": "user", "content": api_key}]}  # a key pasted into a prompt
    try:
        status, _ = wait_until(lambda: (r := _request(f"{base}/chat/completions", api_key, chat))[0] == 200 and r,
                               timeout=30, message="the key to be accepted")  # fmt: skip
        assert _request(f"{base}/chat/completions", api_key, {**chat, "stream": True})[0] == 200
        assert _request(f"{base}/chat/completions", api_key, {**chat, "model": "gated"})[0] == 404  # not allowed
        assert _request(f"{base}/models", api_key + "x")[0] == 401
        assert _request(f"{base}/chat/completions", "sk-" + api_key[::-1], chat)[0] == 401

        status, models = _request(f"{base}/models", api_key)
        assert status == 200 and sorted(m["id"] for m in json.loads(models)["data"]) == ["chat-default", "open"]

        cluster.core.delete_namespaced_secret("team-a-key", namespace)
        deleted, accepted_after = time.monotonic(), 0
        while (code := _request(f"{base}/models", api_key)[0]) != 401 and time.monotonic() - deleted < 30:
            accepted_after += 1
            time.sleep(0.01)
        delay = time.monotonic() - deleted
    finally:
        gateway.terminate(20)
        backend.terminate(10)

    logs = {
        "gateway (DEBUG)": gateway.output(),
        "operator runner output": runner.output,
        "pytest-captured logging (kopf, kubernetes client)": caplog.text,
        "stdout/stderr": "".join(capfd.readouterr()),
        "rendered RayService, RayCluster, pods, Services": rendered,
    }
    print(f"\nsecrets: {sum(len(v) for v in logs.values())} characters of logs and objects searched "
          f"({ {k: len(v) for k, v in logs.items()} }); key revoked {delay * 1000:.0f} ms after its Secret "
          f"was deleted ({accepted_after} requests still accepted in between) "
          f"(bound {REVOCATION_BOUND_S:.0f}s)")  # fmt: skip
    leaks = {k: found for k, v in logs.items() if (found := _leaks(v, api_key, hf_token, digest))}
    assert leaks == {}
    assert len(logs["gateway (DEBUG)"]) > 200 and len(logs["operator runner output"]) > 1000  # there were logs
    assert code == 401 and delay < REVOCATION_BOUND_S
