"""Fixtures of the e2e tier: a kind cluster from kind-config.yaml, with a node image, images and
binaries all built on this machine (no registry), created through pytest-kind-ng's KindCluster.

The tier runs wherever a Docker engine can be had (hack/docker-engine installs and starts one as
root on Debian). Only where none can be had at all does every test skip, with one loud line.
Set LLMEP_KEEP_KIND=1 to keep the cluster after the run (and reuse it on the next one).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from pytest_kind import KindCluster

from tests.e2e.kind import (
    CLUSTER_NAME,
    DOCKER_UNAVAILABLE,
    KEEP_ENV,
    KIND_CONFIG,
    Images,
    kind_binary,
    kubectl_binary,
    kuberay_manifests,
    node_address,
    run_step,
)
from tests.helm import CHART, helm

HERE = Path(__file__).parent
EXAMPLES = HERE.parents[1] / "examples"
APP_NAMESPACE = "default"
LLMEP_NAMESPACE = "llmep-system"
KUBERAY_NAMESPACE = "kuberay-system"
_docker_problem: str | None = None


def _ensure_docker() -> str | None:
    """None when Docker works (started here if needed); the reason when none can be had."""
    proc = run_step(str(HERE.parents[1] / "hack" / "docker-engine"), timeout=600)
    if proc.returncode == DOCKER_UNAVAILABLE:
        return "hack/docker-engine found no way to run Docker on this machine (see its message above)"
    if proc.returncode != 0:
        pytest.fail(f"hack/docker-engine failed (exit {proc.returncode}); see its log above", pytrace=False)
    return None


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    global _docker_problem
    ours = [item for item in items if Path(str(item.fspath)).resolve().is_relative_to(HERE)]
    if not ours:
        return
    _docker_problem = _ensure_docker()
    if _docker_problem:
        print(f"\n!!! e2e tier SKIPPED: {_docker_problem} !!!\n", file=sys.stderr, flush=True)
        for item in ours:
            item.add_marker(pytest.mark.skip(reason=f"no Docker engine: {_docker_problem}"))


@pytest.fixture(scope="session")
def images() -> Images:
    """The images and node image, built (or found up to date) by the project's own scripts."""
    hack = HERE.parents[1] / "hack"
    for step, timeout in (("local-cluster", 3600), ("images", 3600), ("kind-node-image", 3600)):
        cmd = [str(hack / step), "build"] if step == "local-cluster" else [str(hack / step)]
        proc = run_step(*cmd, timeout=timeout)
        if proc.returncode != 0:
            pytest.fail(f"{' '.join(cmd)} failed (exit {proc.returncode}); see its output above", pytrace=False)
    return Images.pinned()


@pytest.fixture(scope="session")
def kind_cluster(images: Images) -> Iterator[KindCluster]:
    keep = os.environ.get(KEEP_ENV) == "1"
    cluster = KindCluster(CLUSTER_NAME, image=images.node, kind_path=kind_binary(), kubectl_path=kubectl_binary())
    listed = subprocess.run([str(kind_binary()), "get", "clusters"], capture_output=True, text=True, check=True)
    if CLUSTER_NAME in listed.stdout.split() and not keep:
        cluster.delete()  # a leftover of an interrupted run: never test on stale state
    cluster.create(config_file=KIND_CONFIG)
    try:
        for image in images.workloads():
            run = subprocess.run(
                [str(kind_binary()), "load", "docker-image", "--name", CLUSTER_NAME, image],
                capture_output=True,
                text=True,
                timeout=1800,
            )
            assert run.returncode == 0, f"kind load docker-image {image} failed: {run.stderr[-2000:]}"
        yield cluster
    finally:
        if keep:
            print(f"\n[e2e] kept kind cluster {CLUSTER_NAME} ({KEEP_ENV}=1): KUBECONFIG={cluster.kubeconfig_path}")
        else:
            cluster.delete()


@pytest.fixture(scope="session")
def kuberay(kind_cluster: KindCluster) -> str:
    """KubeRay's operator from its own manifests, with the image built here; returns its namespace."""
    manifest = kuberay_manifests(KUBERAY_NAMESPACE)
    namespace = f"apiVersion: v1\nkind: Namespace\nmetadata: {{name: {KUBERAY_NAMESPACE}}}\n"
    kind_cluster.kubectl("apply", "-f", "-", input=namespace)
    kind_cluster.kubectl("apply", "--server-side", "-f", "-", input=manifest)
    kind_cluster.kubectl("rollout", "status", "deployment/kuberay-operator", "-n", KUBERAY_NAMESPACE, "--timeout=300s")
    return KUBERAY_NAMESPACE


@pytest.fixture(scope="session")
def llmep_release(kind_cluster: KindCluster, kuberay: str) -> str:
    """`helm upgrade --install` of charts/llmep with the kind values and the images built here
    (upgrade: a cluster kept with LLMEP_KEEP_KIND=1 gets this checkout's chart)."""
    helm(
        "upgrade",
        "--install",
        "llmep",
        str(CHART),
        "--namespace",
        LLMEP_NAMESPACE,
        "--create-namespace",
        "-f",
        str(CHART / "ci" / "values-kind.yaml"),
        "--wait",
        "--timeout",
        "600s",
        kubeconfig=Path(kind_cluster.kubeconfig_path),
        timeout=700,
    )
    return LLMEP_NAMESPACE


@pytest.fixture(scope="session")
def model_volume(kind_cluster: KindCluster) -> str:
    """The tiny model copied onto a PVC, as examples/storage/tiny-model-volume.yaml tells a user to."""
    from llmep_serving.tinymodel import ensure_tiny_model

    model_dir = ensure_tiny_model()
    kind_cluster.kubectl("apply", "-n", APP_NAMESPACE, "-f", str(EXAMPLES / "storage" / "tiny-model-volume.yaml"))
    kind_cluster.kubectl(
        "wait", "-n", APP_NAMESPACE, "--for=condition=Ready", "pod/llmep-model-loader", "--timeout=300s"
    )
    kind_cluster.kubectl("cp", "-n", APP_NAMESPACE, str(model_dir), "llmep-model-loader:/models/tiny-llama")
    listed = kind_cluster.kubectl("exec", "-n", APP_NAMESPACE, "llmep-model-loader", "--", "ls", "/models/tiny-llama")
    assert "config.json" in listed.split(), listed
    kind_cluster.kubectl("delete", "-n", APP_NAMESPACE, "pod/llmep-model-loader", "--wait=true")
    return "llmep-models"


@pytest.fixture(scope="session")
def tiny_endpoint(kind_cluster: KindCluster, llmep_release: str, model_volume: str) -> str:
    """examples/tiny-cpu.yaml applied with kubectl; returns the endpoint's name."""
    kind_cluster.kubectl("apply", "-n", APP_NAMESPACE, "-f", str(EXAMPLES / "tiny-cpu.yaml"))
    return "tiny"


@pytest.fixture(scope="module")
def gateway_url(kind_cluster: KindCluster, llmep_release: str) -> str:
    """The gateway's Service as a host reaches it: its NodePort on the kind node's address
    (charts/llmep/ci/values-kind.yaml), so no port-forward is tied to one gateway pod."""
    service = json.loads(kind_cluster.kubectl("get", "service", "llmep-gateway", "-n", llmep_release, "-o", "json"))
    return f"http://{node_address(kind_cluster)}:{service['spec']['ports'][0]['nodePort']}/v1"
