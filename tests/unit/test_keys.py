"""`llmep keys create` writes a key's limits into its Secret, refuses bad limits before talking to
the API server, and `llmep keys list` shows them: the real command in a subprocess, against the
stand-in API server (tests/cluster/test_cli_status_keys.py runs the same against the rig's)."""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from llmep_serving.gateway.auth import make_key
from tests.unit.stand_in_api import stand_in_api

pytestmark = pytest.mark.unit


def llmep(kubeconfig: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "KUBECONFIG": str(kubeconfig), "COLUMNS": "200"}
    return subprocess.run(
        [sys.executable, "-m", "llmep_serving.cli", *args], capture_output=True, text=True, env=env, timeout=60
    )


def kubeconfig_for(url: str, folder: Path) -> Path:
    path = folder / "kubeconfig"
    path.write_text(
        "apiVersion: v1\nkind: Config\ncurrent-context: c\n"
        f"clusters: [{{name: c, cluster: {{server: '{url}'}}}}]\n"
        "contexts: [{name: c, context: {cluster: c, user: u}}]\nusers: [{name: u, user: {token: t}}]\n"
    )
    return path


def test_create_writes_the_limits_into_the_secret_data(tmp_path):
    requests: list[tuple[str, str, dict]] = []

    def answer(method: str, path: str, body: bytes) -> tuple[int, str, bytes]:
        requests.append((method, path, json.loads(body)))
        return 201, "application/json", body

    with stand_in_api(answer) as url:
        args = ["--rpm", "60", "--tpm", "20000", "--max-tokens-per-day", "1000000", "--priority", "high"]
        created = llmep(kubeconfig_for(url, tmp_path), "keys", "create", "app-a", "-n", "keys", *args)
    assert created.returncode == 0, created.stderr
    [(method, path, secret)] = requests
    assert (method, path) == ("POST", "/api/v1/namespaces/keys/secrets")
    data = secret["stringData"]
    assert set(data) == {"sha256", "rpm", "tpm", "tokens_per_day", "priority"}
    assert (data["rpm"], data["tpm"], data["tokens_per_day"], data["priority"]) == ("60", "20000", "1000000", "high")
    # The gateway reads the Secret as written.
    key = make_key("app-a", data)
    assert (key.rpm, key.tpm, key.tokens_per_day, key.priority) == (60, 20000, 1000000, "high")
    assert "limits: 60 requests per minute, 20000 tokens per minute, 1000000 tokens per day, priority high." in (
        created.stderr
    )


@pytest.mark.parametrize(
    ("flags", "error"),
    [
        (
            ["--rpm", "0"],
            "argument --rpm: '0' is not a whole number of at least 1: give the requests per minute, e.g. --rpm 60,"
            " or leave --rpm out for no limit",
        ),
        (["--tpm", "1.5"], "argument --tpm: '1.5' is not a whole number of at least 1"),
        (["--tpm", "-3"], "argument --tpm: '-3' is not a whole number of at least 1"),
        (["--max-tokens-per-day", "lots"], "argument --max-tokens-per-day: 'lots' is not a whole number of at least 1"),
        (["--priority", "urgent"], "argument --priority: invalid choice: 'urgent' (choose from"),
    ],
)
def test_create_refuses_bad_limits_with_exit_2_and_writes_nothing(tmp_path, flags, error):
    requests: list[str] = []

    def answer(method: str, path: str, body: bytes) -> tuple[int, str, bytes]:
        requests.append(f"{method} {path}")
        return 201, "application/json", body

    with stand_in_api(answer) as url:
        refused = llmep(kubeconfig_for(url, tmp_path), "keys", "create", "app-a", "--rpm", "10", *flags)
    assert refused.returncode == 2
    assert error in refused.stderr
    assert refused.stdout == ""
    assert requests == []


def test_list_shows_each_keys_limits_and_a_dash_where_none_is_set(tmp_path):
    def b64(text: str) -> str:
        return base64.b64encode(text.encode()).decode()

    def secret(name: str, **data: str) -> dict:
        meta = {"name": name, "namespace": "keys", "creationTimestamp": "2026-12-03T08:00:00Z"}
        return {"metadata": meta, "data": {k: b64(v) for k, v in data.items()}}

    listing = {
        "kind": "SecretList",
        "apiVersion": "v1",
        "metadata": {},
        "items": [
            secret(
                "limited",
                sha256="ab" * 32,
                models="alpha",
                rpm="60",
                tpm="20000",
                tokens_per_day="1000000",
                priority="low",
            ),
            secret("open", sha256="cd" * 32),
        ],
    }

    requests: list[str] = []

    def answer(method: str, path: str, body: bytes) -> tuple[int, str, bytes]:
        requests.append(f"{method} {path}")
        return 200, "application/json", json.dumps(listing).encode()

    with stand_in_api(answer) as url:
        listed = llmep(kubeconfig_for(url, tmp_path), "keys", "list", "-n", "keys")
    assert requests == ["GET /api/v1/namespaces/keys/secrets?labelSelector=llmep.io/api-key"]
    assert listed.returncode == 0, listed.stderr
    rows = {
        line.split("│")[1].strip(): [c.strip() for c in line.split("│")[2:-1]]
        for line in listed.stdout.splitlines()
        if line.count("│") == 8
    }
    assert rows["limited"][:5] == ["alpha", "60", "20000", "1000000", "low"]
    assert rows["open"][:5] == ["(all)", "-", "-", "-", "-"]
    header = next(line for line in listed.stdout.splitlines() if "name" in line)
    assert header.split() == "┃ name ┃ models ┃ requests/min ┃ tokens/min ┃ tokens/day ┃ priority ┃ created ┃".split()
    assert "ab" * 32 not in listed.stdout
