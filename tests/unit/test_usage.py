"""`llmep usage` as a user runs it (the real command in a subprocess) against stand-in gateways: HTTP
servers on 127.0.0.1 answering /metrics with what the gateway's own GatewayMetrics renders
(prometheus_client's CounterMetricFamily and generate_latest), changed between the two scrapes of
a window; and against the stand-in API server for the in-cluster path (Ready gateway pods read
through the pod proxy)."""

from __future__ import annotations

import contextlib
import http.server
import json
import os
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import unquote

import pytest

from llmep_serving.gateway.metrics import GatewayMetrics
from llmep_serving.usage import parse_counts, window, window_report
from tests.unit.stand_in_api import stand_in_api
from tests.unit.test_keys import kubeconfig_for

pytestmark = pytest.mark.unit

Labelled = dict[tuple[str, str, str], int]


def exposition(requests: Labelled, tokens: Labelled | None = None, rate_limited: Labelled | None = None) -> bytes:
    """/metrics exactly as the gateway renders it (its own GatewayMetrics), after counting these:
    (key, model, code | type | limit) -> how many."""
    metrics = GatewayMetrics()
    metrics.model("tiny").prompt_tokens = 5  # the gateway's other families are there too
    for (key, model, code), count in requests.items():
        for _ in range(count):
            metrics.key_request(key, model, int(code))
    for (key, model, kind), count in (tokens or {}).items():
        metrics.key_usage(
            key, model, prompt=count if kind == "prompt" else 0, completion=count if kind != "prompt" else 0
        )
    for (key, model, limit), count in (rate_limited or {}).items():
        for _ in range(count):
            metrics.key_rate_limited(key, model, limit)
    return metrics.render()


@contextlib.contextmanager
def gateway_serving(*bodies: bytes) -> Iterator[str]:
    """A /metrics URL answering the n-th scrape with bodies[n] (the last one from then on)."""
    scrapes: list[str] = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            body = bodies[min(len(scrapes), len(bodies) - 1)]
            scrapes.append(self.path)
            self.send_response(200 if self.path == "/metrics" else 404)
            self.send_header("Content-Type", "text/plain; version=0.0.4; charset=utf-8")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/metrics"
    finally:
        server.shutdown()
        server.server_close()
    assert scrapes, "the gateway was never scraped"


def llmep(*args: str, kubeconfig: Path | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "COLUMNS": "200", "KUBECONFIG": str(kubeconfig or "/nonexistent")}
    return subprocess.run(
        [sys.executable, "-m", "llmep_serving.cli", "usage", *args], capture_output=True, text=True, env=env, timeout=60
    )


def rows(table: str) -> dict[tuple[str, str], list[str]]:
    """(key, model) -> the other cells of each body row of a rich table."""
    cells = [[c.strip() for c in line.split("│")[1:-1]] for line in table.splitlines() if line.startswith("│")]
    return {(c[0], c[1]): c[2:] for c in cells}


A = exposition(
    {("app-a", "tiny", "200"): 10, ("app-a", "tiny", "429"): 2, ("app-b", "qwen", "200"): 1},
    {("app-a", "tiny", "prompt"): 1200, ("app-a", "tiny", "completion"): 300, ("app-b", "qwen", "prompt"): 7},
    {("app-a", "tiny", "requests"): 2},
)
B = exposition(
    {("app-a", "tiny", "200"): 5},
    {("app-a", "tiny", "prompt"): 800, ("app-a", "tiny", "completion"): 200},
    {("app-a", "tiny", "tokens"): 1},
)


def test_totals_are_summed_over_every_url_and_titled_as_totals_since_start():
    unresolved = exposition({("app-b", "", "400"): 1})  # answered before the model was known
    with gateway_serving(A) as one, gateway_serving(B) as two, gateway_serving(unresolved) as three:
        result = llmep("--url", one, "--url", two, "--url", three)
    assert result.returncode == 0, result.stderr
    assert "Totals per key and model since each gateway started (3 gateways)" in result.stdout
    assert rows(result.stdout) == {
        ("app-a", "tiny"): ["17", "2,000", "500", "3 (requests 2, tokens 1)"],
        ("app-b", "(none)"): ["1", "0", "0", "0"],
        ("app-b", "qwen"): ["1", "7", "0", "0"],
    }
    assert "note:" not in result.stdout


def test_window_shows_what_each_gateway_added_and_a_restarted_one_counted_from_zero():
    steady_after = exposition(
        {("app-a", "tiny", "200"): 14, ("app-a", "tiny", "429"): 2, ("app-b", "qwen", "200"): 1},
        {("app-a", "tiny", "prompt"): 1700, ("app-a", "tiny", "completion"): 420, ("app-b", "qwen", "prompt"): 7},
        {("app-a", "tiny", "requests"): 2, ("app-a", "tiny", "daily_tokens"): 3},
    )
    # The second gateway restarted during the window: its counters start again from zero.
    restarted_after = exposition({("app-a", "tiny", "200"): 2}, {("app-a", "tiny", "prompt"): 90})
    with gateway_serving(A, steady_after) as steady, gateway_serving(B, restarted_after) as restarted:
        result = llmep("--url", steady, "--url", restarted, "--window", "1s", "--output", "json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["window"] == "1s"
    assert report["gateways"] == [steady, restarted]
    # app-b did nothing in the window: no row.
    assert report["usage"] == [
        {
            "key": "app-a",
            "model": "tiny",
            "requests": 4 + 2,
            "requests_by_code": {"200": 6},
            "prompt_tokens": 500 + 90,
            "completion_tokens": 120,
            "rate_limited": 3,
            "rate_limited_by_limit": {"daily_tokens": 3},
        }
    ]
    assert report["notes"] == [
        f"{restarted} restarted during the window (a counter went down): counted from its restart"
    ]
    assert "scraped 2 gateway(s); scraping again in 1s" in result.stderr


def test_window_table_footnotes_the_restart():
    with gateway_serving(A, B) as restarted:
        result = llmep("--url", restarted, "--window", "1s")
    assert result.returncode == 0, result.stderr
    assert "Usage per key and model over the last 1s (1 gateway)" in result.stdout
    assert rows(result.stdout) == {("app-a", "tiny"): ["5", "800", "200", "1 (tokens 1)"]}
    assert result.stdout.rstrip().endswith(
        f"note: {restarted} restarted during the window (a counter went down): counted from its restart"
    )


def test_a_quiet_window_and_a_gateway_without_key_metrics_say_so_and_exit_0():
    with gateway_serving(A) as quiet:
        result = llmep("--url", quiet, "--window", "1s")
    assert (result.returncode, result.stdout) == (0, f"No requests with a key in the last 1s at {quiet}.\n")

    with gateway_serving(exposition({})) as fresh:
        result = llmep("--url", fresh)
        as_json = llmep("--url", fresh, "-o", "json")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"No per-key metrics yet at {fresh}: a gateway counts a key once it has answered")
    assert as_json.returncode == 0
    assert json.loads(as_json.stdout) == {"window": None, "gateways": [fresh], "usage": [], "notes": []}
    assert as_json.stderr.startswith("No per-key metrics yet")

    with gateway_serving(exposition({})) as fresh:
        result = llmep("--url", fresh, "--window", "1s")
    assert result.returncode == 0 and result.stdout.startswith(f"No per-key metrics yet at {fresh}: ")


def test_a_window_notes_gateways_that_came_or_went_between_the_scrapes():
    before = {"pod gw/gw-1": parse_counts(A.decode()), "pod gw/gw-2": parse_counts(B.decode())}
    after = {"pod gw/gw-1": parse_counts(A.decode()), "pod gw/gw-3": parse_counts(B.decode())}
    report = window_report(before, after, window("5m"))
    assert [(row.key, row.model, row.requests) for row in report.rows] == [("app-a", "tiny", 5)]  # all of gw-3's
    assert report.notes == [
        "pod gw/gw-3 was not Ready at the first scrape: all it has counted is included",
        "pod gw/gw-2 was gone at the second scrape: what it counted is left out",
    ]


def test_an_unreachable_gateway_is_named_with_what_to_check_and_exits_1():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        closed = f"http://127.0.0.1:{sock.getsockname()[1]}/metrics"  # bound, never listening: refused
        with gateway_serving(A) as up:
            result = llmep("--url", up, "--url", closed)
    assert result.returncode == 1
    assert result.stdout == ""
    assert result.stderr.startswith(
        f"llmep usage: cannot read {closed}: <urlopen error [Errno 111] Connection refused>."
    )
    assert "Check that a gateway listens there and that it is its metrics port" in result.stderr


def test_an_answer_that_is_not_metrics_exits_1():
    with gateway_serving(b"<html>not metrics</html>\n") as page:
        result = llmep("--url", page)
    assert result.returncode == 1
    assert result.stderr.startswith(f"llmep usage: {page} did not answer Prometheus metrics (")


@pytest.mark.parametrize(
    ("flags", "error"),
    [
        (["--window", "5x"], "argument --window: '5x' is not a duration: give a whole number of seconds, minutes"),
        (["--window", "0s"], "argument --window: '0s' is not a duration"),
        (["--window", "1.5m"], "argument --window: '1.5m' is not a duration"),
        (["--url", "127.0.0.1:9090"], "argument --url: '127.0.0.1:9090' is not a URL: give the gateway's metrics URL"),
        (["--output", "yaml"], "argument --output/-o: invalid choice: 'yaml'"),
    ],
)
def test_bad_flags_exit_2_naming_the_flag(flags, error):
    result = llmep(*flags)
    assert result.returncode == 2
    assert error in result.stderr


def pod(name: str, ready: bool) -> dict:
    return {
        "metadata": {"name": name, "namespace": "gw"},
        "spec": {
            "containers": [
                {
                    "name": "gateway",
                    "ports": [{"name": "http", "containerPort": 8080}, {"name": "metrics", "containerPort": 9090}],
                }
            ]
        },
        "status": {"conditions": [{"type": "Ready", "status": "True" if ready else "False"}]},
    }


def test_in_a_cluster_every_ready_gateway_pod_is_read_through_the_pod_proxy(tmp_path):
    requests: list[str] = []
    pods = {
        "kind": "PodList",
        "apiVersion": "v1",
        "metadata": {},
        "items": [pod("gw-1", True), pod("gw-2", True), pod("gw-3", False)],
    }

    def answer(method: str, path: str, body: bytes) -> tuple[int, str, bytes]:
        requests.append(f"{method} {path}")
        if path.startswith("/api/v1/namespaces/gw/pods?"):
            return 200, "application/json", json.dumps(pods).encode()
        if path == "/api/v1/namespaces/gw/pods/gw-1%3A9090/proxy/metrics":
            return 200, "text/plain", A
        if path == "/api/v1/namespaces/gw/pods/gw-2%3A9090/proxy/metrics":
            return 200, "text/plain", B
        return 403, "application/json", b'{"kind": "Status", "code": 403, "reason": "Forbidden"}'

    with stand_in_api(answer) as url:
        result = llmep("-n", "gw", kubeconfig=kubeconfig_for(url, tmp_path))
    assert result.returncode == 0, result.stderr
    selector = "app.kubernetes.io/name=llmep,app.kubernetes.io/component=gateway"
    assert unquote(requests[0]) == f"GET /api/v1/namespaces/gw/pods?labelSelector={selector}"
    assert requests[1:] == [
        "GET /api/v1/namespaces/gw/pods/gw-1%3A9090/proxy/metrics",
        "GET /api/v1/namespaces/gw/pods/gw-2%3A9090/proxy/metrics",
    ]
    assert rows(result.stdout)[("app-a", "tiny")] == ["17", "2,000", "500", "3 (requests 2, tokens 1)"]

    pods["items"] = [pod("gw-4", True)]
    with stand_in_api(answer) as url:
        refused = llmep("-n", "gw", kubeconfig=kubeconfig_for(url, tmp_path))
    assert refused.returncode == 1
    assert refused.stderr == (
        "llmep usage: cannot read pod gw/gw-4 port 9090 through the API server: 403 Forbidden. Check that the pod"
        " still runs and that you may get pods/proxy (kubectl auth can-i get pods/proxy -n gw)\n"
    )

    pods["items"] = [pod("gw-3", False)]
    with stand_in_api(answer) as url:
        none_ready = llmep("-n", "gw", kubeconfig=kubeconfig_for(url, tmp_path))
    assert none_ready.returncode == 1
    assert none_ready.stderr.startswith("llmep usage: no Ready gateway pod in namespace gw (labels ")
