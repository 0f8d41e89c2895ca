"""What an endpoint's pass costs in API calls: nothing when nothing changed, one apply for a
deleted or edited child, one status write when a pod became ready.

The API server is a stand-in on loopback that answers server-side applies and status patches as
kube-apiserver does and counts them; the watches' memory (`look`) is a dict the test fills as
the watches would, which is how the handlers feed the Reconciler from kopf's indexes. The rig's
cluster tier shows the same chain with the real API server (tests/cluster/test_operator.py,
test_operator_reasons.py); here the number of calls is what is asserted."""

from __future__ import annotations

import copy
import itertools
import json
from collections.abc import Iterator

import pytest
from kubernetes import client

from llmep_operator.kube import BoundedApiClient, Kube
from llmep_operator.observed import Seen, slim_child, slim_pod
from llmep_operator.reconcile import Reconciler
from llmep_operator.settings import ApiTimeouts, OperatorSettings
from tests.unit.stand_in_api import stand_in_api

pytestmark = pytest.mark.unit
BODY = {
    "apiVersion": "llmep.io/v1alpha1",
    "kind": "LLMEndpoint",
    "metadata": {"name": "qwen", "namespace": "team-a", "generation": 1, "resourceVersion": "7", "uid": "u-1"},
    "spec": {"model": {"source": "hf://Qwen/Qwen2.5-0.5B-Instruct"}, "resources": {"profile": "cpu"}},
}


class Cluster:
    """The stand-in's stored children and the requests it was sent."""

    def __init__(self) -> None:
        self.requests: list[tuple[str, str]] = []
        self.stored: dict[str, dict] = {}  # kind -> object as the API server keeps it
        self.watched: dict[str, dict] = {}  # kind -> object as the watches show it
        self.pods: list[dict] = []
        self._versions = itertools.count(100)

    def answer(self, method: str, path: str, sent: bytes) -> tuple[int, str, bytes]:
        self.requests.append((method, path.split("?")[0]))
        obj = json.loads(sent or b"{}")
        if method == "PATCH" and "/status" not in path:  # a server-side apply
            obj["metadata"].update(uid=f"uid-{obj['kind']}", resourceVersion=str(next(self._versions)))
            obj.setdefault("status", {})
            self.stored[obj["kind"]] = obj
        return 200, "application/json", json.dumps(obj).encode()

    def deliver(self) -> None:
        """The watches catch up with what is stored."""
        self.watched = copy.deepcopy(self.stored)

    def look(self, namespace: str, name: str) -> Seen:
        children = {kind: slim_child(obj) for kind, obj in self.watched.items()}
        return Seen(children=children, pods=[slim_pod(p) for p in self.pods])

    def calls(self) -> list[tuple[str, str]]:
        made, self.requests = self.requests, []
        return made


@pytest.fixture
def cluster() -> Iterator[tuple[Cluster, Reconciler]]:
    cluster = Cluster()
    with stand_in_api(cluster.answer) as url:
        configuration = client.Configuration()
        configuration.host = url
        kube = Kube("llmep-operator", BoundedApiClient(configuration, ApiTimeouts()))
        yield cluster, Reconciler(kube, OperatorSettings(), cluster.look)


RAYSERVICE = "/apis/ray.io/v1/namespaces/team-a/rayservices/qwen"
SERVICE = "/api/v1/namespaces/team-a/services/qwen-serve"
STATUS = "/apis/llmep.io/v1alpha1/namespaces/team-a/llmendpoints/qwen/status"
EVENTS = "/api/v1/namespaces/team-a/events"


def _body() -> dict:
    return copy.deepcopy(BODY)


def reconciled(cluster: tuple[Cluster, Reconciler]) -> tuple[Cluster, Reconciler]:
    """The endpoint reconciled once, the watches caught up, and the calls so far set aside."""
    stand_in, reconciler = cluster
    reconciler.reconcile(_body())
    stand_in.deliver()
    stand_in.calls()
    return stand_in, reconciler


def test_a_pass_over_unchanged_children_makes_no_api_call(cluster):
    stand_in, reconciler = cluster
    reconciler.reconcile(_body())
    assert stand_in.calls() == [("PATCH", RAYSERVICE), ("PATCH", SERVICE), ("PATCH", STATUS), ("POST", EVENTS)]
    stand_in.deliver()
    for _ in range(3):  # child events, the drift timer
        reconciler.reconcile(_body())
    assert stand_in.calls() == []


def test_a_deleted_child_is_applied_again_and_nothing_else(cluster):
    stand_in, reconciler = reconciled(cluster)
    del stand_in.watched["Service"]  # its DELETED event
    reconciler.reconcile(_body())
    assert stand_in.calls() == [("PATCH", SERVICE)]


def test_a_hand_edit_of_an_owned_field_is_put_back(cluster):
    stand_in, reconciler = reconciled(cluster)
    edited = stand_in.watched["Service"]
    edited["spec"]["type"] = "NodePort"
    edited["metadata"]["resourceVersion"] = "555"
    reconciler.reconcile(_body())
    assert stand_in.calls() == [("PATCH", SERVICE)]


def test_a_change_the_operator_does_not_own_is_left_alone_without_an_apply(cluster):
    """KubeRay writes the RayService's status: a new resourceVersion, nothing to put back."""
    stand_in, reconciler = reconciled(cluster)
    rayservice = stand_in.watched["RayService"]
    rayservice["metadata"]["resourceVersion"] = "556"
    rayservice["metadata"]["annotations"] = {"someone.else/note": "x"}
    reconciler.reconcile(_body())
    reconciler.reconcile(_body())
    assert stand_in.calls() == []


def test_status_and_its_event_are_written_once_when_a_pod_becomes_ready(cluster):
    stand_in, reconciler = reconciled(cluster)
    stand_in.pods = [
        {
            "metadata": {"name": "qwen-workers-1", "labels": {"ray.io/node-type": "worker"}},
            "status": {"conditions": [{"type": "Ready", "status": "True"}]},
        }
    ]
    written = reconciler.reconcile(_body())
    reconciler.reconcile(_body())  # the watch has not shown the write yet: still no second one
    assert stand_in.calls() == [("PATCH", STATUS), ("POST", EVENTS)]
    ready = next(c for c in written["conditions"] if c["type"] == "Ready")
    assert (ready["status"], ready["reason"]) == ("False", "LoadingModel")
