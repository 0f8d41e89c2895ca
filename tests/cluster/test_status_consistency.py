"""Status on a real API server with every writer racing: the update handler (spec churn), the
child-event handlers (pods changing) and the drift loop (every half second) all write status at
once. A test watch records every version of the endpoint: observedGeneration never goes down,
replica counts and Ready never step back to an older observation, and the last version is the
latest truth. An invalid spec clears status.url, so the gateway answers 404 instead of holding."""

from __future__ import annotations

import contextlib
import threading

import pytest
import urllib3
from kubernetes import watch

from llmep_operator.api import GROUP, PLURAL, VERSION
from tests.cluster import test_operator
from tests.cluster.conftest import wait_until
from tests.cluster.test_operator import _condition, _endpoint, _get

pytestmark = pytest.mark.cluster
# The operator as the chart's ServiceAccount, with the operator tests' drift period.
operator = test_operator.operator

WORKERS = 6


def _worker_pod(name: str, endpoint: str) -> dict:
    """A worker pod of the endpoint that no scheduler or kubelet touches: its readiness is the
    test's to set, so the truth the operator observes moves only forward, when the test says."""
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "labels": {"llmep.io/endpoint": endpoint, "ray.io/node-type": "worker"}},
        "spec": {
            "schedulerName": "nobody",
            "containers": [{"name": "worker", "image": "registry.invalid/worker:none"}],
        },
    }


class StatusRecorder:
    """Every version of one LLMEndpoint, from a watch started at a known resourceVersion."""

    def __init__(self, cluster, namespace: str, name: str, resource_version: str) -> None:
        self.versions: list[dict] = []
        self._watch = watch.Watch()
        self._thread = threading.Thread(
            target=self._run, args=(cluster, namespace, name, resource_version), daemon=True
        )
        self._thread.start()

    def _run(self, cluster, namespace: str, name: str, resource_version: str) -> None:
        stream = self._watch.stream(
            cluster.custom.list_namespaced_custom_object,
            GROUP,
            VERSION,
            namespace,
            PLURAL,
            field_selector=f"metadata.name={name}",
            resource_version=resource_version,
            timeout_seconds=600,
        )
        with contextlib.suppress(urllib3.exceptions.ProtocolError):  # stop() cuts the stream
            for event in stream:
                self.versions.append(event["object"])

    def stop(self) -> None:
        self._watch.stop()


def _ready_counts(version: dict) -> tuple[int, int]:
    replicas = (version.get("status") or {}).get("replicas") or {}
    return replicas.get("desired", 0), replicas.get("ready", 0)


def _wait_for_status(cluster, namespace: str, name: str, generation: int, counts: tuple[int, int]) -> None:
    def caught_up() -> bool:
        obj = _get(cluster, namespace, name)
        return obj["status"].get("observedGeneration") == generation and _ready_counts(obj) == counts

    wait_until(
        caught_up,
        timeout=60,
        message=lambda: f"status at generation {generation} with replicas {counts}: "
        f"{_get(cluster, namespace, name).get('status')}",
    )


def test_concurrent_status_writers_never_go_back_to_an_older_observation(
    cluster, namespace, operator, monkeypatch
):
    monkeypatch.setenv("LLMEP_DRIFT_CHECK_SECONDS", "0.5")  # the drift loop writes all along
    name = "churn"
    # minReplicas 0: KubeRay starts no worker of its own; the workers counted are the test's.
    spec = {"autoscaling": {"minReplicas": 0, "maxReplicas": 8, "scaleDownDelaySeconds": 100}}
    with operator() as runner:
        cluster.custom.create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, _endpoint(name, **spec))
        first = wait_until(
            lambda: (obj := _get(cluster, namespace, name)).get("status", {}).get("observedGeneration") == 1 and obj,
            timeout=60,
            message="the first status",
        )
        recorder = StatusRecorder(cluster, namespace, name, first["metadata"]["resourceVersion"])
        try:
            for i in range(WORKERS):
                cluster.core.create_namespaced_pod(namespace, _worker_pod(f"worker-{i}", name))
            for i in range(WORKERS):
                # At once: a new generation (the update handler reconciles and writes) and one
                # more ready worker (the pod events refresh); the drift loop writes all along.
                spec["autoscaling"]["scaleDownDelaySeconds"] = 101 + i
                changed = cluster.custom.patch_namespaced_custom_object(
                    GROUP, VERSION, namespace, PLURAL, name, {"spec": {"autoscaling": spec["autoscaling"]}}
                )
                cluster.core.patch_namespaced_pod_status(
                    f"worker-{i}", namespace, {"status": {"conditions": [{"type": "Ready", "status": "True"}]}}
                )
                generation = changed["metadata"]["generation"]
                _wait_for_status(cluster, namespace, name, generation, (WORKERS, i + 1))
            # The recorder has seen the settled version too before it stops.
            settled_version = _get(cluster, namespace, name)["metadata"]["resourceVersion"]
            wait_until(
                lambda: any(v["metadata"]["resourceVersion"] == settled_version for v in recorder.versions),
                timeout=30,
                message="the watch to deliver the settled version",
            )
        finally:
            recorder.stop()
        with contextlib.suppress(Exception):
            cluster.custom.delete_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name)

    statuses = [v.get("status") or {} for v in recorder.versions]
    history = [
        (s.get("observedGeneration"), _ready_counts(v), (_condition(v, "Ready") or {}).get("reason"))
        for v, s in zip(recorder.versions, statuses, strict=True)
    ]
    assert len(set(history)) > WORKERS, f"too little churn to prove anything: {history}"
    for before, after in zip(history, history[1:], strict=False):
        assert after[0] >= before[0], f"observedGeneration went back: {before} -> {after}\n{history}"
        assert after[1][0] >= before[1][0] and after[1][1] >= before[1][1], (
            f"replica counts went back to an older observation: {before} -> {after}\n{history}"
        )
        assert not (before[2] == "LoadingModel" and after[2] == "Deploying"), (
            f"Ready went back from all workers up to an older observation: {before} -> {after}\n{history}"
        )
    assert history[-1] == (generation, (WORKERS, WORKERS), "LoadingModel")
    assert "Traceback" not in runner.output


def test_an_invalid_spec_clears_the_url(cluster, namespace, operator):
    name = "goes-bad"
    with operator():
        cluster.custom.create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, _endpoint(name))
        url = wait_until(
            lambda: _get(cluster, namespace, name).get("status", {}).get("url"),
            timeout=60,
            message="status.url of the valid endpoint",
        )
        assert url == f"http://{name}-serve.{namespace}.svc:8000/v1"
        cluster.custom.patch_namespaced_custom_object(
            GROUP, VERSION, namespace, PLURAL, name, {"spec": {"resources": {"profile": "no-such-profile"}}}
        )
        invalid = wait_until(
            lambda: (obj := _get(cluster, namespace, name))
            and (_condition(obj, "Ready") or {}).get("reason") == "InvalidSpec"
            and obj,
            timeout=60,
            message="Ready=False InvalidSpec after the profile became unknown",
        )
        # No url: the gateway drops the route and answers 404, instead of holding requests for it.
        assert "url" not in invalid["status"], invalid["status"]
        assert "rayService" not in invalid["status"], invalid["status"]
        assert invalid["status"]["observedGeneration"] == invalid["metadata"]["generation"]
