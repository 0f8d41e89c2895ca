"""Fixtures of the e2e tier: a kind cluster (kind-config.yaml) with real images, for machines
with Docker. Not run in CI here: this project's machines have no Docker engine, so every test
of the tier skips, saying why.

`kind_cluster` overrides pytest-kind's fixture of the same name so the cluster is created
from the repository's kind-config.yaml (pytest-kind's own creates a one-node cluster).
kind and kubectl are pytest-kind's downloads at KIND_VERSION / KUBECTL_VERSION (pinned below
unless set in the environment), or --kind-bin / --kind-kubectl-bin.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
KIND_CONFIG = REPO / "kind-config.yaml"
# kind v0.33.0 ships kindest/node:v1.37.0, the node image kind-config.yaml names.
os.environ.setdefault("KIND_VERSION", "v0.33.0")
os.environ.setdefault("KUBECTL_VERSION", "v1.37.2")


def docker_unavailable() -> str | None:
    """Why Docker cannot be used here, or None when `docker info` succeeds."""
    docker = shutil.which("docker")
    if docker is None:
        return "no docker command on PATH"
    try:
        proc = subprocess.run([docker, "info"], capture_output=True, text=True, timeout=30)
    except subprocess.TimeoutExpired:
        return "`docker info` did not answer within 30s"
    if proc.returncode != 0:
        lines = (proc.stderr or proc.stdout).strip().splitlines()
        return f"`docker info` failed: {lines[-1] if lines else proc.returncode}"
    return None


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    reason = docker_unavailable()
    if reason is None:
        return
    skip = pytest.mark.skip(
        reason=f"e2e tier needs a Docker engine for kind ({reason}); it is not run in CI here, see docs/install.md"
    )
    for item in items:
        if Path(str(item.fspath)).resolve().is_relative_to(Path(__file__).parent):
            item.add_marker(skip)


@pytest.fixture(scope="session")
def kind_cluster(request: pytest.FixtureRequest) -> Iterator[object]:
    try:
        from pytest_kind import KindCluster
    except ImportError:
        pytest.skip("pytest-kind-ng is not installed: pip install -e '.[e2e]'")
    option = request.config.getoption
    kind_bin, kubectl_bin = option("kind_bin", None), option("kind_kubectl_bin", None)
    cluster = KindCluster(
        option("cluster_name", None) or "llmep-e2e",
        kind_path=Path(kind_bin) if kind_bin else None,
        kubectl_path=Path(kubectl_bin) if kubectl_bin else None,
    )
    cluster.create(config_file=KIND_CONFIG)
    try:
        yield cluster
    finally:
        if not option("keep_cluster", False):
            cluster.delete()
