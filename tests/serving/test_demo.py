"""`make demo` end to end: hack/demo on its own rig prints a real model answer obtained through
the gateway, then `hack/demo down` stops everything it started."""

from __future__ import annotations

import os
import re
import secrets
import socket
import subprocess
from pathlib import Path

import pytest

pytestmark = pytest.mark.serving
REPO = Path(__file__).resolve().parents[2]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.timeout(1800)
def test_demo_prints_an_answer_through_the_gateway_and_stops_cleanly():
    env = {k: v for k, v in os.environ.items() if k not in ("KUBECONFIG", "LLMEP_RIG_NAME")}
    env["LLMEP_RIG_NAME"] = f"demo-{secrets.token_hex(3)}"
    env["LLMEP_DEMO_PORT"] = str(_free_port())
    try:
        run = subprocess.run([str(REPO / "hack" / "demo")], env=env, capture_output=True, text=True, timeout=1500)
        output = run.stdout + run.stderr
        assert run.returncode == 0, output[-6000:]
        answer = re.search(r"^answer: '(.*)'$", output, re.M)
        assert answer and answer.group(1).strip(), output[-3000:]
        assert re.search(r"^usage: \d+ prompt \+ \d+ completion tokens$", output, re.M)
        assert "models: ['tiny', 'chat-default']" in output
        assert f"http://127.0.0.1:{env['LLMEP_DEMO_PORT']}/v1" in output
        assert re.search(r"api_key\s+sk-llmep-", output)
        # The endpoint was reconciled by the operator on the rig, workers placed on nodes.
        assert re.search(r"^tiny\s+pvc://llmep-models/tiny-llama\s+cpu\s+False", output, re.M), output[-3000:]
    finally:
        down = subprocess.run(
            [str(REPO / "hack" / "demo"), "down"], env=env, capture_output=True, text=True, timeout=300
        )
    assert down.returncode == 0, down.stdout + down.stderr
    leftovers = subprocess.run(["pgrep", "-f", f"ready-file .*{env['LLMEP_RIG_NAME']}"], capture_output=True, text=True)
    assert leftovers.stdout.strip() == "", "llmep serve still running after hack/demo down"
