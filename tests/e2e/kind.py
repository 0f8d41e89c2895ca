"""What the e2e tier needs from this machine: Docker, the images built here, kind's node image,
the kind and kubectl binaries of the rig's build, and KubeRay's manifests from its Go module.

Everything is made by the project's own scripts (hack/docker-engine, hack/images,
hack/kind-node-image, hack/local-cluster build), each idempotent, so the tier can call them and
`make test-e2e` works on a machine where only `make setup` ran.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import tomllib
from dataclasses import dataclass
from pathlib import Path

from pytest_kind import KindCluster

from tests.helm import REPO_ROOT, kube_version, rig_bin_dir, versions

KIND_CONFIG = REPO_ROOT / "kind-config.yaml"
CLUSTER_NAME = "llmep-e2e"
# Set to 1 to keep the kind cluster after the run (and to reuse a kept one) for debugging.
KEEP_ENV = "LLMEP_KEEP_KIND"
DOCKER_UNAVAILABLE = 3  # hack/docker-engine's exit status when no Docker can be had at all
LLMEP = Path(sys.executable).parent / "llmep"


def project_version() -> str:
    return tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]["version"]


@dataclass(frozen=True)
class Images:
    llmep: str
    serving: str
    kuberay: str
    seaweedfs: str  # test-only: the S3 store of tests/e2e/test_weights_s3.py
    node: str

    @classmethod
    def pinned(cls) -> Images:
        version, pins = project_version(), versions()
        return cls(
            llmep=f"ghcr.io/llmep/llmep:{version}",
            serving=f"ghcr.io/llmep/llmep-serving-cpu:{version}",
            kuberay=f"quay.io/kuberay/operator:{pins['KUBERAY_VERSION']}",
            seaweedfs=f"llmep/seaweedfs:{pins['SEAWEEDFS_VERSION']}",
            node=f"llmep/kind-node:{kube_version()}",
        )

    def workloads(self) -> list[str]:
        return [self.llmep, self.serving, self.kuberay, self.seaweedfs]


def run_step(*cmd: str, timeout: float) -> subprocess.CompletedProcess[str]:
    """Run one of the project's setup scripts, its progress lines passed through to the terminal."""
    print(f"\n[e2e] $ {' '.join(cmd)}", file=sys.stderr, flush=True)
    return subprocess.run(cmd, cwd=REPO_ROOT, timeout=timeout, text=True, stdout=sys.stderr)


def kind_binary() -> Path:
    return rig_bin_dir() / "kind"


def kubectl_binary() -> Path:
    return rig_bin_dir() / "kubectl"


def kuberay_manifests(namespace: str) -> str:
    """KubeRay's own operator manifests in `namespace` (hack/kuberay-manifests)."""
    return subprocess.run(
        [str(REPO_ROOT / "hack" / "kuberay-manifests"), namespace],
        capture_output=True,
        text=True,
        check=True,
        timeout=300,
        env={**os.environ, "KUBECTL": str(kubectl_binary())},
    ).stdout


def wait_for(what: str, check, timeout: float, interval: float = 2.0):
    """Poll `check()` until it returns something truthy; fail with the last value seen."""
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = check()
        if last:
            return last
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}; last seen: {last!r}")


def llmep_cli(cluster: KindCluster, *args: str, columns: int = 200) -> subprocess.CompletedProcess[str]:
    """The `llmep` CLI of this venv against the kind cluster (tables `columns` wide)."""
    env = {**os.environ, "KUBECONFIG": str(cluster.kubeconfig_path), "COLUMNS": str(columns)}
    return subprocess.run([str(LLMEP), *args], capture_output=True, text=True, env=env, timeout=120)


def ready_condition(cluster: KindCluster, name: str, namespace: str = "default") -> dict:
    """The endpoint's Ready condition as `kubectl get` shows it ({} before the operator wrote one)."""
    obj = json.loads(cluster.kubectl("get", "llmendpoint", name, "-n", namespace, "-o", "json"))
    return next((c for c in obj.get("status", {}).get("conditions", []) if c["type"] == "Ready"), {})


def node_address(cluster: KindCluster) -> str:
    """The kind node's InternalIP: where the host reaches the cluster's NodePorts."""
    node = json.loads(cluster.kubectl("get", "nodes", "-o", "json"))["items"][0]
    return next(a["address"] for a in node["status"]["addresses"] if a["type"] == "InternalIP")
