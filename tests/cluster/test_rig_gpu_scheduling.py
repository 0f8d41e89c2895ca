"""The rig schedules GPU workloads the way a GPU cluster does.

Simulated nodes (hack/local-cluster): cpu-0; gpu-h100-0/1 with 8 `nvidia.com/gpu` each and
gpu-l4-0 with 1, all GPU nodes tainted `nvidia.com/gpu=present:NoSchedule`. Needs a cluster
with nodes like these (the rig, or a real cluster with the same labels and taints).
"""

from __future__ import annotations

import pytest
from kubernetes import client as k8s

pytestmark = pytest.mark.cluster

H100 = "NVIDIA-H100-80GB-HBM3"
H100_NODES = {"gpu-h100-0", "gpu-h100-1"}
GPU_TOLERATION = {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}


def deployment(name: str, *, gpus: int | None, product: str | None = None,
               tolerate_gpu_taint: bool = False, replicas: int = 1) -> dict:
    resources = {"requests": {"cpu": "100m", "memory": "128Mi"}, "limits": {}}
    if gpus is not None:
        resources["limits"]["nvidia.com/gpu"] = str(gpus)
    pod_spec: dict = {"containers": [{"name": "app", "image": "registry.invalid/app:1",
                                      "resources": resources}]}
    if product:
        pod_spec["nodeSelector"] = {"nvidia.com/gpu.product": product}
    if tolerate_gpu_taint:
        pod_spec["tolerations"] = [GPU_TOLERATION]
    return {
        "apiVersion": "apps/v1", "kind": "Deployment",
        "metadata": {"name": name},
        "spec": {
            "replicas": replicas,
            "selector": {"matchLabels": {"app": name}},
            "template": {"metadata": {"labels": {"app": name}}, "spec": pod_spec},
        },
    }


def pods_of(cluster, namespace: str, app: str) -> list[k8s.V1Pod]:
    return cluster.core.list_namespaced_pod(namespace, label_selector=f"app={app}").items


def only_pod(cluster, namespace: str, app: str) -> k8s.V1Pod:
    pods = cluster.wait_until(lambda: pods_of(cluster, namespace, app), timeout=60,
                              message=f"the Deployment {app} to create a pod")
    assert len(pods) == 1, [p.metadata.name for p in pods]
    return pods[0]


def assert_stays_unscheduled(cluster, namespace: str, app: str, expected: str) -> None:
    name = only_pod(cluster, namespace, app).metadata.name

    def verdict() -> tuple[str, str] | None:
        """The scheduler's first word on the pod: a FailedScheduling message or a node."""
        pod = cluster.core.read_namespaced_pod(name, namespace)
        if pod.spec.node_name:
            return "scheduled", pod.spec.node_name
        failed = [e for e in cluster.events_for(namespace, "Pod", name)
                  if e.reason == "FailedScheduling"]
        return ("failed", failed[0].message) if failed else None

    outcome, detail = cluster.wait_until(
        verdict, timeout=60, message=f"the scheduler to decide on pod {name}")
    assert outcome == "failed", f"pod {name} was scheduled onto {detail}"
    assert expected in detail, detail
    pod = cluster.core.read_namespaced_pod(name, namespace)
    assert pod.spec.node_name is None
    assert pod.status.phase == "Pending"
    dep = cluster.apps.read_namespaced_deployment(app, namespace)
    assert not dep.status.available_replicas


def test_gpu_pod_with_toleration_and_h100_selector_runs_on_an_h100_node(cluster, namespace):
    cluster.apply(deployment("h100-app", gpus=1, product=H100, tolerate_gpu_taint=True),
                  namespace)

    cluster.wait_until(
        lambda: cluster.apps.read_namespaced_deployment("h100-app", namespace)
        .status.available_replicas == 1,
        timeout=90, message="Deployment h100-app to have 1 available replica")

    pod = only_pod(cluster, namespace, "h100-app")
    assert pod.spec.node_name in H100_NODES
    assert pod.status.phase == "Running"
    ready = {c.type: c.status for c in pod.status.conditions}
    assert ready.get("Ready") == "True"
    node = cluster.core.read_node(pod.spec.node_name)
    assert node.metadata.labels["nvidia.com/gpu.product"] == H100
    assert node.status.allocatable["nvidia.com/gpu"] == "8"


def test_gpu_pod_without_toleration_stays_pending_on_the_gpu_taint(cluster, namespace):
    cluster.apply(deployment("no-toleration", gpus=1, product=H100), namespace)

    assert_stays_unscheduled(cluster, namespace, "no-toleration", "untolerated taint")


def test_pod_asking_for_more_gpus_than_a_node_has_stays_pending(cluster, namespace):
    cluster.apply(deployment("sixteen-gpus", gpus=16, product=H100, tolerate_gpu_taint=True),
                  namespace)

    assert_stays_unscheduled(cluster, namespace, "sixteen-gpus", "Insufficient nvidia.com/gpu")


def test_gpu_capacity_is_accounted_across_pods(cluster, namespace):
    # 3 pods of 8 GPUs, 2 H100 nodes of 8: exactly two run, one per node, the third waits.
    cluster.apply(deployment("eight-gpus", gpus=8, product=H100, tolerate_gpu_taint=True,
                             replicas=3), namespace)

    def two_running_one_failed() -> list[k8s.V1Pod] | None:
        pods = pods_of(cluster, namespace, "eight-gpus")
        running = [p for p in pods if p.status.phase == "Running"]
        return pods if len(pods) == 3 and len(running) == 2 else None

    pods = cluster.wait_until(two_running_one_failed, timeout=90,
                              message="2 of 3 eight-GPU pods to run")
    placed = sorted(p.spec.node_name for p in pods if p.spec.node_name)
    assert placed == sorted(H100_NODES)
    pending = next(p for p in pods if not p.spec.node_name)
    event = cluster.wait_for_event(namespace, "Pod", pending.metadata.name, "FailedScheduling")
    assert "Insufficient nvidia.com/gpu" in event.message


def test_pod_without_gpu_request_lands_on_the_cpu_node(cluster, namespace):
    cluster.apply(deployment("cpu-app", gpus=None), namespace)

    cluster.wait_until(
        lambda: cluster.apps.read_namespaced_deployment("cpu-app", namespace)
        .status.available_replicas == 1,
        timeout=90, message="Deployment cpu-app to have 1 available replica")
    assert only_pod(cluster, namespace, "cpu-app").spec.node_name == "cpu-0"
