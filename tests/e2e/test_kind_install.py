"""The whole product on kind with real images: KubeRay from its chart, llmep from this chart
with the `cpu` profile, one LLMEndpoint on vLLM's CPU build, and the official OpenAI SDK
answered through the gateway's one base_url.

Needs Docker (the images are built here and loaded into kind) and network access to PyPI,
Docker Hub, KubeRay's chart repository and Hugging Face. Not run in CI here.
"""

from __future__ import annotations

import base64
import hashlib
import json
import subprocess
import time
from pathlib import Path

import pytest

from tests.helm import CHART, helm

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(3600)]

REPO = Path(__file__).resolve().parents[2]
NAMESPACE = "llmep-system"
APP_NAMESPACE = "default"
LLMEP_IMAGE = "ghcr.io/llmep/llmep:0.1.0"
SERVING_IMAGE = "ghcr.io/llmep/llmep-serving-cpu:0.1.0"
KUBERAY_CHARTS = "https://ray-project.github.io/kuberay-helm/"
API_KEY = "sk-e2e-" + hashlib.sha256(b"llmep-e2e").hexdigest()[:24]
MODEL = "qwen-cpu"


def kuberay_version() -> str:
    for line in (REPO / "hack" / "versions.env").read_text().splitlines():
        if line.startswith("KUBERAY_VERSION="):
            return line.split("=", 1)[1].strip().lstrip("v")
    raise AssertionError("hack/versions.env has no KUBERAY_VERSION")


def docker_build(dockerfile: str, tag: str) -> None:
    subprocess.run(["docker", "build", "-f", str(REPO / dockerfile), "-t", tag, str(REPO)], check=True, timeout=3000)


@pytest.fixture(scope="module")
def llmep_installed(kind_cluster) -> object:
    kubeconfig = Path(kind_cluster.kubeconfig_path)
    for dockerfile, tag in (("images/llmep/Dockerfile", LLMEP_IMAGE), ("images/serving-cpu/Dockerfile", SERVING_IMAGE)):
        docker_build(dockerfile, tag)
        kind_cluster.load_docker_image(tag)
    helm(
        "install",
        "kuberay-operator",
        "kuberay-operator",
        "--repo",
        KUBERAY_CHARTS,
        "--version",
        kuberay_version(),
        "--namespace",
        "kuberay-system",
        "--create-namespace",
        "--wait",
        "--timeout",
        "300s",
        kubeconfig=kubeconfig,
        timeout=600,
    )
    helm(
        "install",
        "llmep",
        str(CHART),
        "--namespace",
        NAMESPACE,
        "--create-namespace",
        "-f",
        str(CHART / "ci" / "values-kind.yaml"),
        "--wait",
        "--timeout",
        "300s",
        kubeconfig=kubeconfig,
        timeout=600,
    )
    secret = {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {"name": "e2e-key", "namespace": NAMESPACE, "labels": {"llmep.io/api-key": "true"}},
        "data": {"sha256": base64.b64encode(hashlib.sha256(API_KEY.encode()).hexdigest().encode()).decode()},
    }
    endpoint = {
        "apiVersion": "llmep.io/v1alpha1",
        "kind": "LLMEndpoint",
        "metadata": {"name": MODEL, "namespace": APP_NAMESPACE},
        "spec": {
            "model": {"source": "hf://Qwen/Qwen2.5-0.5B-Instruct", "servedName": MODEL},
            "engine": {"maxModelLen": 512},
            "resources": {"profile": "cpu"},
            "autoscaling": {"minReplicas": 1, "maxReplicas": 1},
        },
    }
    manifest = json.dumps({"apiVersion": "v1", "kind": "List", "items": [secret, endpoint]})
    kind_cluster.kubectl("apply", "-f", "-", input=manifest)
    return kind_cluster


def wait_ready(kind_cluster, timeout: float = 1800) -> dict:
    deadline = time.monotonic() + timeout
    status: dict = {}
    while time.monotonic() < deadline:
        obj = json.loads(kind_cluster.kubectl("get", "llmendpoint", MODEL, "-n", APP_NAMESPACE, "-o", "json"))
        status = obj.get("status") or {}
        ready = next((c for c in status.get("conditions", []) if c["type"] == "Ready"), {})
        if ready.get("status") == "True":
            return status
        time.sleep(10)
    raise AssertionError(f"LLMEndpoint {MODEL} not Ready after {timeout:.0f}s: {status}")


def test_gateway_answers_the_openai_sdk_for_an_endpoint_on_vllm_cpu(llmep_installed):
    from openai import AuthenticationError, OpenAI

    status = wait_ready(llmep_installed)
    assert status["url"] == f"http://{MODEL}-serve.{APP_NAMESPACE}.svc:8000/v1"
    with llmep_installed.port_forward("service/llmep-gateway", 80, "-n", NAMESPACE) as port:
        client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key=API_KEY, timeout=300)
        assert MODEL in [m.id for m in client.models.list()]
        reply = client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "Say hello."}], max_tokens=8
        )
        assert reply.choices[0].message.content
        stream = client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "Count to three."}], max_tokens=8, stream=True
        )
        assert sum(1 for chunk in stream if chunk.choices) >= 1
        wrong = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="sk-wrong")
        with pytest.raises(AuthenticationError):
            wrong.models.list()
