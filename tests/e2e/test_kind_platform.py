"""Real containers on kind, everything built on this machine: the cluster boots from our node
image, the chart's operator and gateway and KubeRay's operator run as real containers from our
images, and an LLMEndpoint makes KubeRay start a Ray head and worker from the serving image."""

from __future__ import annotations

import json
import re

import pytest
from pytest_kind import KindCluster

from tests.e2e.kind import Images, wait_for

pytestmark = [pytest.mark.timeout(5400)]

APP_NAMESPACE = "default"


def get_json(cluster: KindCluster, *args: str) -> dict:
    return json.loads(cluster.kubectl("get", *args, "-o", "json"))


def not_running(pods: list[dict]) -> list[str]:
    """`namespace/name: phase, not-ready containers` for every pod that is not Running and Ready."""
    problems = []
    for pod in pods:
        statuses = pod["status"].get("containerStatuses") or []
        unready = [s["name"] for s in statuses if not s.get("ready")]
        if pod["status"].get("phase") != "Running" or unready or not statuses:
            name = f"{pod['metadata']['namespace']}/{pod['metadata']['name']}"
            problems.append(f"{name}: {pod['status'].get('phase')}, not ready: {unready}")
    return problems


def test_kind_cluster_boots_from_the_node_image_built_here(kind_cluster: KindCluster, images: Images):
    nodes = get_json(kind_cluster, "nodes")["items"]
    assert nodes, "kind cluster has no nodes"
    for node in nodes:
        ready = next(c for c in node["status"]["conditions"] if c["type"] == "Ready")
        assert ready["status"] == "True", f"node {node['metadata']['name']} not Ready: {ready}"
        assert node["status"]["nodeInfo"]["kubeletVersion"] == images.node.rsplit(":", 1)[1]
        assert node["status"]["nodeInfo"]["containerRuntimeVersion"].startswith("containerd://2.")

    def kube_system_problems():
        pods = get_json(kind_cluster, "pods", "-n", "kube-system")["items"]
        return pods and not not_running(pods) and pods

    pods = wait_for("every kube-system pod Running and Ready", kube_system_problems, timeout=300)
    names = " ".join(p["metadata"]["name"] for p in pods)
    for component in ("etcd", "kube-apiserver", "kube-controller-manager", "kube-scheduler", "coredns", "kube-proxy"):
        assert component in names, f"no {component} pod in kube-system: {names}"


def test_chart_and_kuberay_run_as_real_containers_from_our_images(
    kind_cluster: KindCluster, images: Images, kuberay: str, llmep_release: str
):
    for namespace, image in ((llmep_release, images.llmep), (kuberay, images.kuberay)):
        pods = get_json(kind_cluster, "pods", "-n", namespace)["items"]
        assert pods, f"no pods in {namespace}"
        assert not not_running(pods), not_running(pods)
        for pod in pods:
            for status in pod["status"]["containerStatuses"]:
                assert status["image"].endswith(image.split("/", 1)[1]), (pod["metadata"]["name"], status["image"])

    components = {
        p["metadata"]["labels"].get("app.kubernetes.io/component"): p["metadata"]["name"]
        for p in get_json(kind_cluster, "pods", "-n", llmep_release)["items"]
    }
    assert {"operator", "gateway"} <= set(components), components
    for component in ("operator", "gateway"):
        # The image's numeric non-root user, as the chart's runAsNonRoot demands.
        uid = kind_cluster.kubectl("exec", "-n", llmep_release, components[component], "--", "id", "-u").strip()
        assert uid == "10001", f"{component} runs as uid {uid}"
    # The gateway's readiness probe answered (Ready above); /readyz answers through the Service too.
    assert "ready" in kind_cluster.kubectl(
        "get", "--raw", f"/api/v1/namespaces/{llmep_release}/services/http:llmep-gateway:80/proxy/readyz"
    )


def test_an_endpoint_makes_kuberay_start_ray_head_and_worker_from_the_serving_image(
    kind_cluster: KindCluster, images: Images, tiny_endpoint: str
):
    name = tiny_endpoint

    def rayservice():
        found = json.loads(kind_cluster.kubectl("get", "rayservices", "-n", APP_NAMESPACE, "-o", "json"))["items"]
        return [rs for rs in found if rs["metadata"].get("labels", {}).get("llmep.io/endpoint") == name]

    (rs,) = wait_for(f"the operator to create the RayService of {name}", rayservice, timeout=180)
    owner = rs["metadata"]["ownerReferences"][0]
    assert (owner["kind"], owner["name"]) == ("LLMEndpoint", name)

    def ray_pods():
        pods = get_json(kind_cluster, "pods", "-n", APP_NAMESPACE, "-l", f"llmep.io/endpoint={name}")["items"]
        kinds = {p["metadata"]["labels"].get("ray.io/node-type") for p in pods if p["status"].get("phase") == "Running"}
        return pods if {"head", "worker"} <= kinds else None

    pods = wait_for("a Running Ray head and worker pod", ray_pods, timeout=1200, interval=5)
    for pod in pods:
        ray = next(c for c in pod["spec"]["containers"] if c["name"] == "ray-head" or c["name"] == "ray-worker")
        assert ray["image"] == images.serving, (pod["metadata"]["name"], ray["image"])
    head = next(p["metadata"]["name"] for p in pods if p["metadata"]["labels"]["ray.io/node-type"] == "head")

    def worker_joined():
        out = kind_cluster.kubectl("exec", "-n", APP_NAMESPACE, head, "-c", "ray-head", "--", "ray", "status")
        # "Active:" and "Idle:" list node groups as " <count> <group>"; the head is one of them.
        listed = re.search(r"^Active:\n(.*?)^Pending:", out, re.M | re.S)
        counts = re.findall(r"^ (\d+) (\S+)$", listed.group(1), re.M) if listed else []
        return out if sum(int(n) for n, group in counts if group != "headgroup") >= 1 else None

    status = wait_for("`ray status` in the head to list the worker as active", worker_joined, timeout=600, interval=5)
    print(status)
