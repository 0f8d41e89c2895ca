"""`make demo` end to end: hack/demo builds nothing new, runs the whole chain on its own kind
cluster, prints a readable answer obtained through the gateway with the base_url and the key,
and `hack/demo down` removes the cluster and the port-forward it started."""

from __future__ import annotations

import os
import re
import secrets
import socket
import subprocess
import time
from pathlib import Path

import pytest

from tests.e2e.kind import kind_binary

pytestmark = pytest.mark.timeout(3600)
REPO = Path(__file__).resolve().parents[2]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_demo_prints_a_readable_answer_through_the_gateway_and_cleans_up(images):
    env = {k: v for k, v in os.environ.items() if k != "KUBECONFIG"}
    env["LLMEP_DEMO_CLUSTER"] = f"llmep-demo-{secrets.token_hex(2)}"
    env["LLMEP_DEMO_PORT"] = str(_free_port())
    t0 = time.monotonic()
    try:
        run = subprocess.run([str(REPO / "hack" / "demo")], env=env, capture_output=True, text=True, timeout=3000)
        output = run.stdout + run.stderr
        print(f"\n[e2e] hack/demo took {time.monotonic() - t0:.0f}s")
        assert run.returncode == 0, output[-6000:]
        answer = re.search(r"^answer: '(.*)'$", output, re.M)
        assert answer, output[-3000:]
        print(f"[e2e] demo answer: {answer.group(1)!r}")
        words = re.findall(r"[A-Za-z]+", answer.group(1))
        assert len(words) >= 3, answer.group(1)  # words, not random bytes
        assert re.search(r"^usage: \d+ prompt \+ \d+ completion tokens$", output, re.M)
        assert "models: ['tiny', 'chat-default']" in output
        assert re.search(rf"base_url\s+http://127\.0\.0\.1:{env['LLMEP_DEMO_PORT']}/v1", output)
        assert re.search(r"api_key\s+sk-llmep-", output)
        # The operator in its pod wrote Ready=True for the endpoint applied with kubectl.
        assert re.search(r"^tiny\s+pvc://llmep-models/tiny-llama\s+cpu\s+True", output, re.M), output[-3000:]
        # Every line the demo prints fits a 100-column terminal.
        assert max(len(line) for line in run.stdout.splitlines()) <= 100
    finally:
        down = subprocess.run(
            [str(REPO / "hack" / "demo"), "down"], env=env, capture_output=True, text=True, timeout=300
        )
    assert down.returncode == 0, down.stdout + down.stderr
    clusters = subprocess.run([str(kind_binary()), "get", "clusters"], capture_output=True, text=True).stdout
    assert env["LLMEP_DEMO_CLUSTER"] not in clusters.split()
    leftovers = subprocess.run(
        ["pgrep", "-f", f"port-forward service/llmep-gateway {env['LLMEP_DEMO_PORT']}:80"],
        capture_output=True,
        text=True,
    )
    assert leftovers.stdout.strip() == "", "the demo's port-forward still runs after hack/demo down"
