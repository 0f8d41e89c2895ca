"""`hack/demo down` stops the gateway port-forward the demo started, even when its pid file is
gone and even when it does not stop on SIGTERM, and leaves other demos' port-forwards alone.

Stand-ins, because this tier has no kind cluster: the port-forward is a process with the demo's
command line and kubeconfig in its environment (a real `kubectl port-forward` needs the kind
cluster's gateway pod), and `kind` records its arguments. tests/e2e/test_demo.py runs the real
ones."""

from __future__ import annotations

import os
import stat
import subprocess
from pathlib import Path

import pytest

pytestmark = pytest.mark.reliability

REPO = Path(__file__).resolve().parents[2]


def _port_forward(kubeconfig: Path, port: int) -> subprocess.Popen:
    """A process that looks like the demo's port-forward and ignores SIGTERM."""
    argv0 = f"kubectl -n llmep-system port-forward service/llmep-gateway {port}:80"
    return subprocess.Popen(
        ["bash", "-c", f'trap "" TERM; exec -a "{argv0}" sleep 600'],
        env={**os.environ, "KUBECONFIG": str(kubeconfig)},
    )


def test_demo_down_stops_its_port_forward_and_deletes_its_cluster(tmp_path):
    cache = tmp_path / "cache"
    state = cache / "demo" / "llmep-test"
    state.mkdir(parents=True)
    rig_bin = cache / "rig" / "bin"
    rig_bin.mkdir(parents=True)
    kind_calls = tmp_path / "kind-calls"
    kind = rig_bin / "kind"
    kind.write_text('#!/bin/sh\necho "$*" >>"$KIND_CALLS"\n')
    kind.chmod(kind.stat().st_mode | stat.S_IEXEC)
    ours = _port_forward(state / "kubeconfig", 18080)  # no pid file: as after an interrupted run
    others = _port_forward(cache / "demo" / "another" / "kubeconfig", 18081)
    try:
        env = {**os.environ, "LLMEP_CACHE": str(cache), "LLMEP_DEMO_CLUSTER": "llmep-test"}
        env["KIND_CALLS"] = str(kind_calls)
        down = subprocess.run(
            [str(REPO / "hack" / "demo"), "down"], env=env, capture_output=True, text=True, timeout=60
        )
        assert down.returncode == 0, down.stdout + down.stderr
        # Gone when `down` returns (SIGKILL after SIGTERM was ignored), not some time later.
        assert ours.poll() is not None, "the demo's port-forward still runs after hack/demo down"
        assert others.poll() is None, "hack/demo down stopped another demo's port-forward"
        assert kind_calls.read_text().split("\n")[0] == "delete cluster --name llmep-test"
        assert not state.exists()
    finally:
        for process in (ours, others):
            process.kill()
            process.wait()
