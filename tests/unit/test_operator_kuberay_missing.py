"""Without KubeRay's RayService CRD the operator says so, and retries: a reconcile ends in NotYet
("install KubeRay first"), the endpoint's pass logs that message and is tried again in 30 s, and
no status is written.

The API server here is a real HTTP server on loopback that answers as kube-apiserver v1.37.2 (the
rig's) does for a resource it does not serve: `404 page not found` in text/plain, captured from
the rig for PATCH /apis/<group>/v1/namespaces/default/<plural>/x. The rig itself always installs
KubeRay's CRDs, and deleting them there would take KubeRay down for every other test, so the
fault is produced here. Every other path is answered as a successful server-side apply would be.
"""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest
from kubernetes import client

from llmep_operator import handlers
from llmep_operator.errors import NotYet
from llmep_operator.kube import BoundedApiClient, Kube
from llmep_operator.reconcile import Reconciler
from llmep_operator.settings import ApiTimeouts, OperatorSettings
from tests.unit.stand_in_api import nothing_seen, stand_in_api

pytestmark = pytest.mark.unit
MESSAGE = "the RayService CRD (ray.io/v1) is not installed: install KubeRay first"
BODY = {
    "apiVersion": "llmep.io/v1alpha1",
    "kind": "LLMEndpoint",
    "metadata": {"name": "qwen", "namespace": "team-a", "generation": 1, "resourceVersion": "7", "uid": "u-1"},
    "spec": {"model": {"source": "hf://Qwen/Qwen2.5-7B-Instruct"}},
}


@pytest.fixture
def api_without_kuberay() -> Iterator[tuple[str, list[tuple[str, str]]]]:
    requests: list[tuple[str, str]] = []

    def answer(method: str, path: str, sent: bytes) -> tuple[int, str, bytes]:
        requests.append((method, path))
        if path.startswith("/apis/ray.io/"):
            return 404, "text/plain; charset=utf-8", b"404 page not found\n"
        if method == "PATCH":  # a server-side apply: the object as stored
            obj = json.loads(sent or b"{}")
            obj.setdefault("metadata", {}).update(uid="child-uid", resourceVersion="1")
            return 200, "application/json", json.dumps(obj).encode()
        return 200, "application/json", b'{"kind": "List", "items": []}'

    with stand_in_api(answer) as url:
        yield url, requests


def _reconciler(url: str) -> Reconciler:
    configuration = client.Configuration()
    configuration.host = url
    kube = Kube("llmep-operator", BoundedApiClient(configuration, ApiTimeouts()))
    return Reconciler(kube, OperatorSettings(), nothing_seen)


def test_reconcile_says_install_kuberay_first_and_writes_no_status(api_without_kuberay):
    url, requests = api_without_kuberay
    with pytest.raises(NotYet) as raised:
        _reconciler(url).reconcile(json.loads(json.dumps(BODY)))
    assert str(raised.value) == MESSAGE
    assert raised.value.delay == 30
    assert ("PATCH", "/apis/ray.io/v1/namespaces/team-a/rayservices/qwen?fieldManager=llmep-operator&force=true") in [
        (method, path) for method, path in requests
    ], requests
    assert not [path for _, path in requests if "/status" in path], "no status is written without KubeRay"


def test_the_pass_logs_it_and_tries_again_in_30_seconds(api_without_kuberay, caplog):
    """The operator keeps going; the endpoint's pass is tried again in 30 s."""
    url, _ = api_without_kuberay
    caplog.set_level("INFO", logger=handlers.log.name)
    assert handlers._pass(_reconciler(url), json.loads(json.dumps(BODY))) == 30
    said = [r.getMessage() for r in caplog.records if r.name == handlers.log.name]
    assert said == [f"team-a/qwen waits: {MESSAGE}; trying again in 30s"]
