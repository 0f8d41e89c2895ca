"""A connection to the API server that goes silent (dropped without FIN or RST by a node, NAT or
load balancer) cannot freeze the operator: every call and watch has a client-side bound.

The silent server is a real listening socket that never answers: the kernel completes the TCP
handshake and then nothing comes back, which is what a dropped connection looks like."""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Iterator
from datetime import datetime

import kopf
import pytest
import urllib3
from kubernetes import client
from kubernetes.leaderelection.leaderelectionrecord import LeaderElectionRecord

from llmep_operator import handlers
from llmep_operator.kube import BoundedApiClient, Kube
from llmep_operator.reconcile import Reconciler
from llmep_operator.runner import RENEW_DEADLINE_SECONDS, _lease_lock
from llmep_operator.settings import ApiTimeouts, OperatorSettings
from tests.unit.stand_in_api import nothing_seen, stand_in_api

pytestmark = pytest.mark.unit
NOW = str(datetime.now())


@pytest.fixture
def silent_server() -> Iterator[str]:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(16)
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"


INDEXES = ("endpoint_index", "rayservice_index", "service_index", "pvc_index", "job_index", "pod_index")


def _kubeconfig(folder) -> str:
    """A kubeconfig naming a server nobody is asked anything of: startup only reads it."""
    path = folder / "kubeconfig"
    path.write_text(
        "apiVersion: v1\nkind: Config\ncurrent-context: c\n"
        "clusters: [{name: c, cluster: {server: 'http://127.0.0.1:9'}}]\n"
        "contexts: [{name: c, context: {cluster: c, user: u}}]\nusers: [{name: u, user: {token: t}}]\n"
    )
    return str(path)


def _configuration(host: str) -> client.Configuration:
    configuration = client.Configuration()
    configuration.host = host
    return configuration


def test_every_kube_call_gives_up_on_a_silent_api_server_within_its_bound(silent_server):
    timeouts = ApiTimeouts(connect_seconds=1, request_seconds=0.5)
    kube = Kube("llmep-operator", BoundedApiClient(_configuration(silent_server), timeouts))
    endpoint = {"metadata": {"name": "qwen", "namespace": "team-a"}, "status": {}}
    calls = {
        "get": lambda: kube.get("llmep.io/v1alpha1", "LLMEndpoint", "team-a", "qwen"),
        "pods": lambda: kube.pods_of("team-a", "qwen"),
        "status": lambda: kube.patch_status("team-a", "qwen", {"url": None}, "1"),
        "apply": lambda: kube.apply({"apiVersion": "v1", "kind": "Service", "metadata": endpoint["metadata"]}),
    }
    for name, call in calls.items():
        started = time.monotonic()
        with pytest.raises(urllib3.exceptions.ReadTimeoutError) as raised:
            call()
        assert time.monotonic() - started < 3, f"{name} waited past its bound"
        # The endpoint's pass is tried again, with a one-line reason and no traceback.
        assert handlers._api_failure(raised.value) == ("API server unreachable: ReadTimeoutError", 5.0)


def test_an_event_on_a_silent_api_server_is_given_up_not_waited_for(silent_server):
    kube = Kube("llmep-operator", BoundedApiClient(_configuration(silent_server), ApiTimeouts(request_seconds=0.5)))
    started = time.monotonic()
    with pytest.raises(urllib3.exceptions.ReadTimeoutError):
        kube.post_event({"metadata": {"name": "qwen", "namespace": "team-a"}}, "Normal", "Serving", "up")
    assert time.monotonic() - started < 3


def test_the_leader_lease_fails_a_renewal_on_a_silent_api_server_instead_of_hanging(silent_server):
    """A hung renewal would keep the leader reconciling after its Lease expired elsewhere; an
    exception would end the election thread. Either way two replicas would reconcile."""
    lock = _lease_lock("llmep-operator", "llmep-system", "me", _configuration(silent_server))
    started = time.monotonic()
    found, error = lock.get("llmep-operator", "llmep-system")
    assert not found and "unreachable" in error.reason
    assert lock.create("llmep-operator", "llmep-system", LeaderElectionRecord("me", "15", NOW, NOW)) is False
    assert time.monotonic() - started < 2 * RENEW_DEADLINE_SECONDS


def test_kopf_watches_and_requests_are_bounded_by_the_settings(monkeypatch, tmp_path):
    """The operator's settings are read at startup (here from its environment) into kopf's."""
    monkeypatch.setenv("LLMEP_API_TIMEOUTS__CONNECT_SECONDS", "3")
    monkeypatch.setenv("LLMEP_API_TIMEOUTS__REQUEST_SECONDS", "20")
    monkeypatch.setenv("LLMEP_API_TIMEOUTS__WATCH_SECONDS", "120")
    monkeypatch.setenv("KUBECONFIG", _kubeconfig(tmp_path))
    settings, memo = kopf.OperatorSettings(), kopf.Memo()
    handlers.configure(settings=settings, memo=memo, **{name: {} for name in INDEXES})
    assert memo.operator_settings.api_timeouts.request_seconds == 20
    assert settings.networking.connect_timeout == 3
    assert settings.networking.request_timeout == 20
    assert settings.watching.connect_timeout == 3
    assert settings.watching.server_timeout == 120
    # The client gives up on a watch shortly after the server would have ended it.
    assert settings.watching.client_timeout == 140
    assert settings.watching.inactivity_timeout == 70


# What kube-apiserver answers when it refuses: until its RBAC caches sync after a restart (and for
# good when a permission is missing) 403; while its own loopback is not up yet, 422 for a Service
# whose cluster IP it cannot allocate (seen on the rig right after a restart).
REFUSALS = {
    403: (
        "Forbidden",
        'rayservices.ray.io "qwen" is forbidden: User "system:serviceaccount:llmep-system:llmep-operator" '
        'cannot patch resource "rayservices"',
    ),
    422: (
        "Unprocessable Entity",
        'Service "qwen-serve" is invalid: spec.clusterIPs: Invalid value: [""]: failed to allocate IP',
    ),
}


@pytest.fixture(params=sorted(REFUSALS))
def refusing_server(request) -> Iterator[tuple[int, str]]:
    code = request.param
    reason, message = REFUSALS[code]

    status = {"kind": "Status", "status": "Failure", "message": message, "reason": reason, "code": code}
    body = json.dumps(status).encode()
    with stand_in_api(lambda method, path, sent: (code, "application/json", body)) as url:
        yield url, f"API server answered {code} {reason}: {message}"


def test_a_refusal_is_retried_slowly_with_the_servers_message_and_no_traceback(refusing_server, caplog):
    url, expected = refusing_server
    kube = Kube("llmep-operator", BoundedApiClient(_configuration(url), ApiTimeouts()))
    reconciler = Reconciler(kube, OperatorSettings(), nothing_seen)
    body = {
        "apiVersion": "llmep.io/v1alpha1", "kind": "LLMEndpoint",
        "metadata": {"name": "qwen", "namespace": "team-a", "generation": 1, "resourceVersion": "1", "uid": "u"},
        "spec": {"model": {"source": "hf://Qwen/Qwen2.5-7B-Instruct"}},
    }  # fmt: skip
    caplog.set_level("INFO", logger=handlers.log.name)
    assert handlers._pass(reconciler, body) == 30
    said = [r.getMessage() for r in caplog.records if r.name == handlers.log.name]
    assert said == [f"team-a/qwen not reconciled: {expected}; trying again in 30s"]
    assert not [r for r in caplog.records if r.exc_info], "no traceback"
