"""The operator on a real API server, KubeRay and scheduler, running as the chart's
ServiceAccount with only the chart's RBAC: children, GPU placement, status, drift, deletion,
restarts."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from kubernetes.client.rest import ApiException

from llmep_operator.api import GROUP, PLURAL, VERSION
from tests.cluster.conftest import wait_until

pytestmark = pytest.mark.cluster

REPO = Path(__file__).resolve().parents[2]
H100_NODES = {"gpu-h100-0", "gpu-h100-1"}


@pytest.fixture
def operator(chart_operator):
    """The operator as the chart's ServiceAccount; a function that (re)starts it."""
    # A short drift period so that a hand edit is corrected within the test's patience.
    return chart_operator(drift_check_seconds=3)


def _endpoint(name: str, **spec) -> dict:
    body = {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "LLMEndpoint",
        "metadata": {"name": name},
        "spec": {"model": {"source": "hf://Qwen/Qwen2.5-7B-Instruct", "aliases": ["chat"]}},
    }
    body["spec"].update(spec)
    return body


def _get(cluster, namespace, name):
    return cluster.custom.get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name)


def _condition(obj, kind):
    return next((c for c in (obj.get("status") or {}).get("conditions", []) if c["type"] == kind), None)


def _rayservice(cluster, namespace, name):
    return cluster.custom.get_namespaced_custom_object("ray.io", "v1", namespace, "rayservices", name)


def _pods(cluster, namespace, name, node_type=None):
    selector = f"llmep.io/endpoint={name}" + (f",ray.io/node-type={node_type}" if node_type else "")
    return cluster.core.list_namespaced_pod(namespace, label_selector=selector).items


def test_endpoint_becomes_rayservice_with_gpu_workers_on_the_profiles_nodes(cluster, namespace, operator):
    with operator():
        cluster.apply(
            _endpoint("qwen", resources={"profile": "nvidia-h100:1"}, autoscaling={"minReplicas": 2, "maxReplicas": 3}),
            namespace,
        )
        rs = wait_until(lambda: _rayservice(cluster, namespace, "qwen"), timeout=60, message="RayService qwen")
        assert rs["metadata"]["ownerReferences"][0]["kind"] == "LLMEndpoint"
        svc = cluster.core.read_namespaced_service("qwen-serve", namespace)
        assert svc.spec.ports[0].port == 8000
        workers = wait_until(
            lambda: (
                [p for p in _pods(cluster, namespace, "qwen", "worker") if p.spec.node_name]
                if len(_pods(cluster, namespace, "qwen", "worker")) >= 2
                else None
            ),
            timeout=120,
            message=lambda: (
                "2 scheduled GPU workers; pods: "
                + str([(p.metadata.name, p.spec.node_name) for p in _pods(cluster, namespace, "qwen")])
            ),
        )
        assert {p.spec.node_name for p in workers} <= H100_NODES
        head = wait_until(
            lambda: [p for p in _pods(cluster, namespace, "qwen", "head") if p.spec.node_name],
            timeout=120,
            message="head pod scheduled",
        )
        assert head[0].spec.node_name not in H100_NODES | {"gpu-l4-0"}
        obj = wait_until(
            lambda: (
                _get(cluster, namespace, "qwen")
                if (_get(cluster, namespace, "qwen").get("status") or {}).get("observedGeneration")
                else None
            ),
            timeout=60,
            message="status.observedGeneration",
        )
        assert obj["status"]["url"] == f"http://qwen-serve.{namespace}.svc:8000/v1"
        # No finalizer: deleting an endpoint (or its namespace) never waits for the operator.
        assert not obj["metadata"].get("finalizers")
        assert obj["status"]["models"] == ["qwen", "chat"]
        assert _condition(obj, "Ready")["status"] == "False"  # no real Ray head answers on fake nodes
        table = cluster.kubectl("get", "llmep", "-n", namespace)
        header = table.splitlines()[0]
        for column in ("MODEL", "PROFILE", "READY", "REPLICAS", "URL", "AGE"):
            assert column in header
        assert "hf://Qwen/Qwen2.5-7B-Instruct" in table and "nvidia-h100:1" in table


def test_profile_no_node_satisfies_reports_waiting_for_gpu_node_with_schedulers_reason(cluster, namespace, operator):
    with operator():
        cluster.apply(_endpoint("nowhere", resources={"profile": "nvidia-a100-80gb"}), namespace)

        def waiting():
            ready = _condition(_get(cluster, namespace, "nowhere"), "Ready")
            return ready if ready and ready["reason"] == "WaitingForGPUNode" else None

        ready = wait_until(
            waiting,
            timeout=120,
            message=lambda: f"WaitingForGPUNode; status: {_get(cluster, namespace, 'nowhere').get('status')}",
        )
        assert ready["status"] == "False"
        assert "node" in ready["message"] and ("selector" in ready["message"] or "affinity" in ready["message"])
        cluster.wait_for_event(namespace, "LLMEndpoint", "nowhere", "WaitingForGPUNode")


def test_engine_change_updates_rayservice_in_place_and_hand_edits_are_corrected(cluster, namespace, operator):
    with operator():
        cluster.apply(_endpoint("edit", engine={"maxModelLen": 4096}), namespace)
        first = wait_until(lambda: _rayservice(cluster, namespace, "edit"), timeout=60, message="RayService edit")
        assert "max_model_len: 4096" in first["spec"]["serveConfigV2"]
        cluster.apply(_endpoint("edit", engine={"maxModelLen": 8192}), namespace)
        second = wait_until(
            lambda: (
                (rs := _rayservice(cluster, namespace, "edit"))
                and "max_model_len: 8192" in rs["spec"]["serveConfigV2"]
                and rs
            ),
            timeout=60,
            message="serveConfigV2 to carry max_model_len 8192",
        )
        assert second["metadata"]["uid"] == first["metadata"]["uid"]
        # A hand edit under another field manager; the operator's apply takes its field back.
        cluster.kubectl(
            "patch",
            "rayservice",
            "edit",
            "-n",
            namespace,
            "--type=json",
            "-p",
            '[{"op":"replace","path":"/spec/rayClusterConfig/workerGroupSpecs/0/maxReplicas","value":99}]',
        )
        wait_until(
            lambda: (
                _rayservice(cluster, namespace, "edit")["spec"]["rayClusterConfig"]["workerGroupSpecs"][0][
                    "maxReplicas"
                ]
                == 1
            ),
            timeout=60,
            message="the hand-edited maxReplicas to be corrected back to 1",
        )


def _ray_cluster(cluster, namespace, endpoint):
    """The RayCluster KubeRay runs for the endpoint (the pending one until Serve answers)."""
    status = _rayservice(cluster, namespace, endpoint).get("status") or {}
    for key in ("activeServiceStatus", "pendingServiceStatus"):
        name = (status.get(key) or {}).get("rayClusterName")
        if name:
            return cluster.custom.get_namespaced_custom_object("ray.io", "v1", namespace, "rayclusters", name)
    return None


def test_autoscaling_bounds_reach_the_running_raycluster(cluster, namespace, operator):
    """KubeRay leaves a running RayCluster's worker bounds alone; the operator carries them over."""
    with operator():
        cluster.apply(_endpoint("bounds", autoscaling={"minReplicas": 1, "maxReplicas": 2}), namespace)
        first = wait_until(lambda: _ray_cluster(cluster, namespace, "bounds"), timeout=120, message="a RayCluster")
        group = first["spec"]["workerGroupSpecs"][0]
        assert (group["minReplicas"], group["maxReplicas"]) == (1, 2)
        cluster.apply(_endpoint("bounds", autoscaling={"minReplicas": 0, "maxReplicas": 3}), namespace)

        def bounds():
            current = _ray_cluster(cluster, namespace, "bounds")
            group = current["spec"]["workerGroupSpecs"][0]
            return (group["minReplicas"], group["maxReplicas"], current["metadata"]["uid"])

        low, high, uid = wait_until(
            lambda: (b := bounds())[:2] == (0, 3) and b,
            timeout=60,
            message=lambda: f"worker bounds (0, 3) on the RayCluster; now {bounds()[:2]}",
        )
        assert uid == first["metadata"]["uid"], "the bounds change must not replace the RayCluster"


def test_unknown_profile_is_invalid_spec_with_event_and_nothing_built(cluster, namespace, operator):
    with operator() as runner:
        cluster.apply(_endpoint("bad", resources={"profile": "tpu-v5"}), namespace)
        ready = wait_until(
            lambda: _condition(_get(cluster, namespace, "bad"), "Ready"), timeout=60, message="Ready condition"
        )
        assert (ready["status"], ready["reason"]) == ("False", "InvalidSpec")
        assert "tpu-v5" in ready["message"] and "nvidia-h100" in ready["message"]
        cluster.wait_for_event(namespace, "LLMEndpoint", "bad", "InvalidSpec")
        with pytest.raises(ApiException) as missing:
            _rayservice(cluster, namespace, "bad")
        assert missing.value.status == 404
    assert "tpu-v5" in runner.output


def test_deleting_the_endpoint_removes_every_child(cluster, namespace, operator):
    with operator():
        cluster.apply(_endpoint("gone", cache={"enabled": True}), namespace)
        wait_until(lambda: _pods(cluster, namespace, "gone"), timeout=120, message="pods of endpoint gone")
        cluster.custom.delete_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, "gone")

        def all_gone():
            left = cluster.kubectl(
                "get",
                "rayservice,raycluster,service,pvc,pod",
                "-n",
                namespace,
                "-l",
                "llmep.io/endpoint=gone",
                "-o",
                "name",
            )
            rs = cluster.kubectl("get", "rayservice,raycluster", "-n", namespace, "-o", "name")
            return not left.strip() and not rs.strip()

        wait_until(
            all_gone,
            timeout=120,
            message=lambda: (
                "children of gone to be collected: " + cluster.kubectl("get", "all,pvc", "-n", namespace, "-o", "name")
            ),
        )


def test_operator_restart_mid_reconcile_leaves_no_duplicates_or_orphans(cluster, namespace, operator):
    names = [f"ep{i}" for i in range(6)]
    with operator():
        for name in names:
            cluster.apply(_endpoint(name), namespace)
        # Stop while some are still being handled.
        wait_until(
            lambda: len(cluster.kubectl("get", "rayservice", "-n", namespace, "-o", "name").split()) >= 1,
            timeout=60,
            message="a first RayService",
        )
    with operator():
        wait_until(
            lambda: len(cluster.kubectl("get", "rayservice", "-n", namespace, "-o", "name").split()) == len(names),
            timeout=120,
            message="one RayService per endpoint",
        )
        wait_until(
            lambda: all((_get(cluster, namespace, n).get("status") or {}).get("observedGeneration") for n in names),
            timeout=120,
            message="status on every endpoint",
        )
    services = cluster.kubectl(
        "get", "service", "-n", namespace, "-l", "app.kubernetes.io/managed-by=llmep-operator", "-o", "name"
    ).split()
    assert sorted(services) == sorted(f"service/{n}-serve" for n in names)
    rayservices = cluster.kubectl("get", "rayservice", "-n", namespace, "-o", "name").split()
    assert sorted(rayservices) == sorted(f"rayservice.ray.io/{n}" for n in names)
    clusters = wait_until(
        lambda: (
            (items := yaml.safe_load(cluster.kubectl("get", "raycluster", "-n", namespace, "-o", "yaml"))["items"])
            and len(items) >= len(names)
            and items
        ),
        timeout=120,
        message="KubeRay to create one RayCluster per RayService",
    )
    owners = sorted(c["metadata"]["ownerReferences"][0]["name"] for c in clusters)
    assert owners == sorted(names), "one RayCluster per RayService, each owned"


def test_examples_are_admitted_by_the_api_server(cluster, namespace, crd):
    examples = sorted((REPO / "examples").glob("*.yaml"))
    endpoints = [d for p in examples for d in yaml.safe_load_all(p.read_text()) if d and d.get("kind") == "LLMEndpoint"]
    assert len(endpoints) >= 5
    for body in endpoints:
        body["metadata"].pop("namespace", None)
        created = cluster.custom.create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, body, dry_run="All")
        assert created["spec"]["autoscaling"]["maxReplicas"] >= created["spec"]["autoscaling"]["minReplicas"]
