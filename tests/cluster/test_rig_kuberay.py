"""KubeRay turns a RayService into a RayCluster whose pods land where their templates say.

The rig's pods are simulated (kwok): no Ray process runs, so KubeRay never reaches the Ray
dashboard and the RayService does not become Ready. What is checked here is what the
operator's output drives: KubeRay accepts the RayService, creates the RayCluster, its head
and GPU worker pods, and the scheduler puts the workers on the GPU nodes the template asks for.
"""

from __future__ import annotations

import pytest
from kubernetes import client as k8s

pytestmark = pytest.mark.cluster

H100_NODES = {"gpu-h100-0", "gpu-h100-1"}
RAY_IMAGE = "rayproject/ray-llm:2.60.0-py311-cu128"

SERVE_CONFIG = """\
applications:
  - name: llm
    route_prefix: /
    import_path: ray.serve.llm:build_openai_app
    args:
      llm_configs:
        - model_loading_config:
            model_id: qwen-0.5b
            model_source: Qwen/Qwen2.5-0.5B-Instruct
          accelerator_type: H100
          deployment_config:
            autoscaling_config: {min_replicas: 1, max_replicas: 2}
"""


def ray_service(name: str, gpu_workers: int) -> dict:
    """Shaped like KubeRay's config/samples/ray-service.*.yaml with a GPU worker group."""
    return {
        "apiVersion": "ray.io/v1", "kind": "RayService",
        "metadata": {"name": name},
        "spec": {
            "serveConfigV2": SERVE_CONFIG,
            "rayClusterConfig": {
                "rayVersion": "2.60.0",
                "enableInTreeAutoscaling": True,
                "headGroupSpec": {
                    "rayStartParams": {"num-cpus": "0"},
                    "template": {"spec": {"containers": [{
                        "name": "ray-head", "image": RAY_IMAGE,
                        "resources": {"requests": {"cpu": "2", "memory": "8Gi"},
                                      "limits": {"cpu": "2", "memory": "8Gi"}},
                        "ports": [{"containerPort": 6379, "name": "gcs-server"},
                                  {"containerPort": 8265, "name": "dashboard"},
                                  {"containerPort": 10001, "name": "client"},
                                  {"containerPort": 8000, "name": "serve"}],
                    }]}},
                },
                "workerGroupSpecs": [{
                    "groupName": "gpu-h100",
                    "replicas": gpu_workers, "minReplicas": gpu_workers, "maxReplicas": 4,
                    "rayStartParams": {},
                    "template": {"spec": {
                        "containers": [{
                            "name": "ray-worker", "image": RAY_IMAGE,
                            "resources": {
                                "requests": {"cpu": "8", "memory": "64Gi",
                                             "nvidia.com/gpu": "1"},
                                "limits": {"cpu": "8", "memory": "64Gi", "nvidia.com/gpu": "1"},
                            },
                        }],
                        "nodeSelector": {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"},
                        "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists",
                                         "effect": "NoSchedule"}],
                    }},
                }],
            },
        },
    }


def test_rayservice_creates_a_raycluster_with_head_and_gpu_workers_on_h100_nodes(
        cluster, namespace):
    cluster.apply(ray_service("llm", gpu_workers=2), namespace)

    def owned_raycluster() -> dict | None:
        items = cluster.custom.list_namespaced_custom_object(
            "ray.io", "v1", namespace, "rayclusters")["items"]
        return next((rc for rc in items
                     if any(o["kind"] == "RayService" and o["name"] == "llm"
                            for o in rc["metadata"].get("ownerReferences", []))), None)

    raycluster = cluster.wait_until(
        owned_raycluster, timeout=120,
        message="KubeRay to create a RayCluster owned by RayService llm")
    rc_name = raycluster["metadata"]["name"]

    def pods(node_type: str) -> list[k8s.V1Pod]:
        return cluster.core.list_namespaced_pod(
            namespace, label_selector=f"ray.io/cluster={rc_name},ray.io/node-type={node_type}"
        ).items

    def running(node_type: str, count: int):
        def check() -> list[k8s.V1Pod] | None:
            found = [p for p in pods(node_type) if p.status.phase == "Running"]
            return found if len(found) == count else None
        return check

    def describe() -> str:
        return "; ".join(f"{p.metadata.name} {p.status.phase} on {p.spec.node_name}"
                         for p in pods("head") + pods("worker"))

    head = cluster.wait_until(running("head", 1), timeout=120,
                              message=lambda: f"the Ray head pod to run ({describe()})")[0]
    workers = cluster.wait_until(running("worker", 2), timeout=120,
                                 message=lambda: f"2 Ray GPU worker pods to run ({describe()})")

    # The head asks for no GPU and tolerates no taint: only the CPU node fits it.
    assert head.spec.node_name == "cpu-0"
    for worker in workers:
        assert worker.spec.node_name in H100_NODES, describe()
        limits = worker.spec.containers[0].resources.limits
        assert limits["nvidia.com/gpu"] == "1"
        assert worker.metadata.labels["ray.io/group"] == "gpu-h100"

    # KubeRay's head Service (headless by default) selects exactly the head pod.
    services = cluster.core.list_namespaced_service(namespace).items
    selecting_head = [s for s in services if s.spec.selector and all(
        head.metadata.labels.get(k) == v for k, v in s.spec.selector.items())]
    assert selecting_head, [s.metadata.name for s in services]
    for svc in selecting_head:
        assert not any(all(w.metadata.labels.get(k) == v for k, v in svc.spec.selector.items())
                       for w in workers), svc.metadata.name


def test_deleting_the_rayservice_removes_its_raycluster_and_pods(cluster, namespace):
    cluster.apply(ray_service("short-lived", gpu_workers=1), namespace)
    cluster.wait_until(
        lambda: cluster.core.list_namespaced_pod(
            namespace, label_selector="ray.io/node-type=worker").items,
        timeout=120, message="KubeRay to create a worker pod")

    cluster.custom.delete_namespaced_custom_object(
        "ray.io", "v1", namespace, "rayservices", "short-lived")

    cluster.wait_until(
        lambda: not cluster.custom.list_namespaced_custom_object(
            "ray.io", "v1", namespace, "rayclusters")["items"],
        timeout=120, message="the RayCluster of the deleted RayService to go away")
    cluster.wait_until(
        lambda: not cluster.core.list_namespaced_pod(
            namespace, label_selector="ray.io/is-ray-node=yes").items,
        timeout=120, message="the Ray pods of the deleted RayService to go away")
