#!/usr/bin/env python
"""Gateway benchmark: direct to a minimal OpenAI-shaped backend vs through the gateway
(and LiteLLM's proxy as a peer, when it is installed), measured in interleaved rounds within
one run. Prints a table with ratios against the direct baseline. Never a test.

CPU layout on a 2-core machine: the gateway (or LiteLLM) is pinned to CPU 0; the backend,
the load generator and this script share CPU 1. Traffic stays on 127.0.0.1.

    python bench/gateway.py [--quick] [--litellm PATH_TO_LITELLM_BIN]
"""

from __future__ import annotations

import argparse
import asyncio
import http.client
import json
import os
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchlib import free_port, percentile

KEY = "sk-bench-0123456789"
BODY = json.dumps({"model": "bench", "messages": [{"role": "user", "content": "Say hello in one word."}]}).encode()
ANSWER = json.dumps(
    {
        "id": "chatcmpl-bench",
        "object": "chat.completion",
        "created": 1,
        "model": "bench",
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": "Hello"},
                "finish_reason": "stop",
            }
        ],
        "usage": {"prompt_tokens": 12, "completion_tokens": 1, "total_tokens": 13},
    }
).encode()
GATEWAY_CPU, LOAD_CPU = 0, 1


# -- the backend ---------------------------------------------------------------------------


def run_backend(port: int) -> None:
    import uvloop
    from aiohttp import web

    async def handle(request: web.BaseRequest) -> web.StreamResponse:
        try:
            body = json.loads(await request.read())
        except ValueError:  # LiteLLM's own probes send no JSON
            return web.Response(status=400)
        if not isinstance(body, dict) or not body.get("stream"):
            return web.Response(body=ANSWER, content_type="application/json")
        events = int(body.get("bench_events", 5))
        interval = float(body.get("bench_interval_ms", 0)) / 1000
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        for seq in range(events):
            if seq and interval:
                await asyncio.sleep(interval)
            chunk = {
                "id": "chatcmpl-bench",
                "object": "chat.completion.chunk",
                "created": 1,
                "model": "bench",
                "seq": seq,
                "choices": [{"index": 0, "delta": {"content": "x"}, "finish_reason": None}],
            }
            await resp.write(b"data: " + json.dumps(chunk).encode() + b"\n\n")
        await resp.write(b"data: [DONE]\n\n")
        await resp.write_eof()
        return resp

    async def serve() -> None:
        runner = web.ServerRunner(web.Server(handle, access_log=None))
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", port, backlog=2048).start()
        await asyncio.Event().wait()

    uvloop.run(serve())


def run_bare(port: int, backend_port: int) -> None:
    """The practical floor: an aiohttp+uvloop passthrough with no auth, routing or metrics."""
    import aiohttp
    import uvloop
    from aiohttp import web

    async def serve() -> None:
        session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0), auto_decompress=False)
        url = f"http://127.0.0.1:{backend_port}/v1/chat/completions"

        async def handle(request: web.BaseRequest) -> web.StreamResponse:
            body = await request.read()
            async with session.post(url, data=body, headers=JSON) as resp:
                data = await resp.read()
            return web.Response(body=data, status=resp.status, headers=JSON)

        runner = web.ServerRunner(web.Server(handle, access_log=None))
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", port, backlog=2048).start()
        tune_gc()  # the same collector tuning as the gateway, so the floor is a fair one
        await asyncio.Event().wait()

    from llmep_serving.gateway.server import tune_gc

    uvloop.run(serve())


JSON = {"Content-Type": "application/json"}


# -- processes -----------------------------------------------------------------------------


REALTIME = False  # --realtime: SCHED_FIFO, so other work on a shared machine cannot preempt


def pinned(cpu: int):
    def pin() -> None:
        os.sched_setaffinity(0, {cpu})
        if REALTIME:
            os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(10))

    return pin


def wait_port(port: int, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.2)
    raise RuntimeError(f"port {port} did not open")


def wait_ready(port: int, path: str, headers: dict[str, str], timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
            conn.request("POST", path, BODY, {"Content-Type": "application/json", **headers})
            if conn.getresponse().status == 200:
                return
        except OSError:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"{port}{path} never answered 200")


class Target:
    def __init__(self, name: str, port: int, path: str, headers: dict[str, str], pid: int) -> None:
        self.name, self.port, self.path, self.headers = name, port, path, headers
        self.pid = pid  # the process answering on port: its CPU time is charged per request
        self.latency: list[float] = []
        self.ttft: list[float] = []


# -- measurements --------------------------------------------------------------------------


def latency_round(t: Target, n: int) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", t.port)
    headers = {"Content-Type": "application/json", **t.headers}
    for i in range(n + 20):
        start = time.perf_counter()
        conn.request("POST", t.path, BODY, headers)
        resp = conn.getresponse()
        resp.read()
        elapsed = time.perf_counter() - start
        if resp.status != 200:
            raise RuntimeError(f"{t.name}: status {resp.status}")
        if i >= 20:  # warm-up
            t.latency.append(elapsed)
    conn.close()


def ttft_round(t: Target, n: int) -> None:
    body = json.loads(BODY)
    body.update(stream=True, bench_events=3)
    raw = json.dumps(body).encode()
    headers = {"Content-Type": "application/json", **t.headers}
    conn = http.client.HTTPConnection("127.0.0.1", t.port)
    for i in range(n + 10):
        start = time.perf_counter()
        conn.request("POST", t.path, raw, headers)
        resp = conn.getresponse()
        first = resp.read1(65536)
        elapsed = time.perf_counter() - start
        resp.read()
        if resp.status != 200 or not first:
            raise RuntimeError(f"{t.name}: stream status {resp.status}")
        if i >= 10:
            t.ttft.append(elapsed)
    conn.close()


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def wrk(t: Target, seconds: int, connections: int = 32) -> dict[str, float]:
    lua = tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False)
    lines = ['wrk.method = "POST"', f"wrk.body = [[{BODY.decode()}]]"]
    for name, value in {"Content-Type": "application/json", **t.headers}.items():
        lines.append(f'wrk.headers["{name}"] = "{value}"')
    lua.write("\n".join(lines) + "\n")
    lua.close()
    cpu_before = cpu_seconds(t.pid)
    out = subprocess.run(
        [
            "wrk",
            "-t1",
            f"-c{connections}",
            f"-d{seconds}s",
            "--latency",
            "-s",
            lua.name,
            f"http://127.0.0.1:{t.port}{t.path}",
        ],
        capture_output=True,
        text=True,
        preexec_fn=pinned(LOAD_CPU),
        check=True,
    ).stdout
    cpu = cpu_seconds(t.pid) - cpu_before
    os.unlink(lua.name)

    def ms(label: str) -> float:
        m = re.search(rf"^\s+{label}\s+([\d.]+)(us|ms|s)\s*$", out, re.M)
        if m is None:
            return float("nan")
        return float(m.group(1)) * {"us": 1e-3, "ms": 1.0, "s": 1e3}[m.group(2)]

    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))
    requests = int(re.search(r"(\d+) requests in", out).group(1))
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    sock = re.search(r"Socket errors: (.*)", out)
    errors = int(non2xx.group(1)) if non2xx else 0
    if sock:
        errors += sum(int(x) for x in re.findall(r"\d+", sock.group(1)))
    return {
        "rps": rps,
        "p50": ms("50%"),
        "p99": ms("99%"),
        "errors": errors,
        "cpu_us": cpu / max(requests, 1) * 1e6,
    }


async def concurrent_streams(t: Target, streams: int, events: int, interval_ms: int) -> dict:
    import aiohttp

    body = json.loads(BODY)
    body.update(stream=True, bench_events=events, bench_interval_ms=interval_ms)
    raw = json.dumps(body).encode()
    totals = {"lost": 0, "merged": 0, "coalesced_reads": 0, "failed": 0}
    headers = {"Content-Type": "application/json", **t.headers}

    async def one(session: aiohttp.ClientSession) -> None:
        buf = b""
        seqs: list[int] = []
        try:
            async with session.post(f"http://127.0.0.1:{t.port}{t.path}", data=raw, headers=headers) as resp:
                async for chunk in resp.content.iter_any():
                    if chunk.count(b"\n\n") > 1:
                        totals["coalesced_reads"] += 1
                    buf += chunk
                    *complete, buf = buf.split(b"\n\n")
                    for event in complete:
                        lines = event.split(b"\n")
                        if len(lines) != 1 or not lines[0].startswith(b"data: "):
                            totals["merged"] += 1
                            continue
                        payload = lines[0][6:]
                        if payload == b"[DONE]":
                            continue
                        seqs.append(json.loads(payload)["seq"])
        except (aiohttp.ClientError, ValueError):
            totals["failed"] += 1
        totals["lost"] += events - len(set(seqs))
        if seqs != sorted(seqs):
            totals["merged"] += 1

    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector) as session:
        started = time.perf_counter()
        await asyncio.gather(*(one(session) for _ in range(streams)))
        totals["seconds"] = time.perf_counter() - started
    return totals


# -- main ----------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--role", choices=["bench", "backend", "bare"], default="bench")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--backend-port", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="fewer, shorter rounds")
    parser.add_argument(
        "--realtime",
        action="store_true",
        help="run every process of the bench as SCHED_FIFO (root): on a shared machine, "
        "other work then cannot preempt it, so the numbers show the code, not the neighbours",
    )
    parser.add_argument(
        "--litellm",
        default=os.environ.get(
            "LITELLM_BIN",
            "/tmp/litellm-venv/bin/litellm",  # noqa: S108 - a venv path, not a temp file
        ),
        help="LiteLLM proxy executable (pip install 'litellm[proxy]' in its own venv)",
    )
    args = parser.parse_args()
    global REALTIME
    REALTIME = args.realtime
    if args.role == "backend":
        run_backend(args.port)
        return
    if args.role == "bare":
        run_bare(args.port, args.backend_port)
        return

    rounds = 3 if args.quick else 6
    per_round = 200 if args.quick else 500
    wrk_seconds = 2 if args.quick else 3
    procs: list[subprocess.Popen] = []
    tmp = Path(tempfile.mkdtemp(prefix="llmep-bench-"))
    notes: list[str] = []
    try:
        pinned(LOAD_CPU)()
        backend_port, gateway_port = free_port(), free_port()
        procs.append(
            subprocess.Popen(
                [sys.executable, __file__, "--role", "backend", "--port", str(backend_port)],
                preexec_fn=pinned(LOAD_CPU),
            )
        )
        wait_port(backend_port, procs[-1])
        (tmp / "routes.yaml").write_text(
            json.dumps([{"models": ["bench"], "url": f"http://127.0.0.1:{backend_port}/v1"}])
        )
        (tmp / "keys.yaml").write_text(json.dumps([{"name": "bench", "key": KEY}]))
        env = {**os.environ, "LLMEP_GATEWAY_LOG_LEVEL": "WARNING"}
        procs.append(
            subprocess.Popen(
                [
                    sys.executable,
                    "-c",
                    "from llmep_serving.gateway import main; main()",
                    "--host",
                    "127.0.0.1",
                    "--port",
                    str(gateway_port),
                    "--routes-file",
                    str(tmp / "routes.yaml"),
                    "--keys-file",
                    str(tmp / "keys.yaml"),
                    "--max-concurrency-per-key",
                    "4096",
                ],
                preexec_fn=pinned(GATEWAY_CPU),
                env=env,
            )
        )
        wait_port(gateway_port, procs[-1])
        bare_port = free_port()
        procs.append(
            subprocess.Popen(
                [
                    sys.executable,
                    __file__,
                    "--role",
                    "bare",
                    "--port",
                    str(bare_port),
                    "--backend-port",
                    str(backend_port),
                ],
                preexec_fn=pinned(GATEWAY_CPU),
            )
        )
        wait_port(bare_port, procs[-1])
        auth = {"Authorization": f"Bearer {KEY}"}
        targets = [
            Target("direct", backend_port, "/v1/chat/completions", {}, procs[0].pid),
            Target("llmep gateway", gateway_port, "/v1/chat/completions", auth, procs[1].pid),
            Target("bare passthrough", bare_port, "/v1/chat/completions", {}, procs[2].pid),
        ]
        wait_ready(gateway_port, "/v1/chat/completions", auth)

        litellm = start_litellm(args.litellm, backend_port, tmp, notes)
        if litellm is not None:
            proc, port = litellm
            procs.append(proc)
            targets.append(Target("litellm proxy", port, "/v1/chat/completions", auth, proc.pid))

        print(f"# load average before: {os.getloadavg()[0]:.2f}; realtime: {REALTIME}", flush=True)
        print(
            f"# {rounds} interleaved rounds; gateway pinned to CPU {GATEWAY_CPU}; backend + load on CPU {LOAD_CPU}",
            flush=True,
        )
        throughput: dict[str, list[dict[str, float]]] = {t.name: [] for t in targets}
        for r in range(rounds):
            order = targets[r % len(targets) :] + targets[: r % len(targets)]
            for t in order:
                latency_round(t, per_round)
                ttft_round(t, per_round // 4)
            for t in order:
                if shutil.which("wrk"):
                    throughput[t.name].append(wrk(t, wrk_seconds))
        if not shutil.which("wrk"):
            notes.append("wrk not installed (apt-get install -y wrk): throughput not measured")

        stream_results = {}
        for t in targets[:2]:
            stream_results[t.name] = asyncio.run(concurrent_streams(t, 500, 20, 100))

        report(targets, throughput, stream_results, notes)
        print(
            f"# load average after: {os.getloadavg()[0]:.2f} (2 cores; above ~2 means other "
            "work competed for the CPUs and every number is pessimistic)"
        )
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
        shutil.rmtree(tmp, ignore_errors=True)


def start_litellm(binary: str, backend_port: int, tmp: Path, notes: list[str]):
    if not Path(binary).exists():
        notes.append(
            f"LiteLLM not measured: {binary} not found "
            "(python -m venv /tmp/litellm-venv && /tmp/litellm-venv/bin/pip install "
            "'litellm[proxy]')"
        )
        return None
    port = free_port()
    (tmp / "litellm.yaml").write_text(
        json.dumps(
            {
                "model_list": [
                    {
                        "model_name": "bench",
                        "litellm_params": {
                            "model": "openai/bench",
                            "api_base": f"http://127.0.0.1:{backend_port}/v1",
                            "api_key": "unused",
                        },
                    }
                ],
                "general_settings": {"master_key": KEY},
                "litellm_settings": {"telemetry": False, "drop_params": True},
            }
        )
    )
    # Keep LiteLLM off the network: local cost map, no telemetry.
    env = {
        **os.environ,
        "LITELLM_LOCAL_MODEL_COST_MAP": "True",
        "LITELLM_TELEMETRY": "False",
        "LITELLM_LOG": "ERROR",
    }
    log = open(tmp / "litellm.log", "wb")  # noqa: SIM115 - lives as long as the process
    proc = subprocess.Popen(
        [
            binary,
            "--config",
            str(tmp / "litellm.yaml"),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--num_workers",
            "1",
        ],
        preexec_fn=pinned(GATEWAY_CPU),
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        wait_port(port, proc, timeout=180)
        wait_ready(port, "/v1/chat/completions", {"Authorization": f"Bearer {KEY}"})
    except RuntimeError as exc:
        proc.kill()
        tail = (tmp / "litellm.log").read_text(errors="replace")[-400:]
        notes.append(f"LiteLLM not measured: {exc}: {tail}")
        return None
    return proc, port


def report(targets, throughput, streams, notes) -> None:
    direct = targets[0]
    d50, d99 = percentile(direct.latency, 50) * 1e3, percentile(direct.latency, 99) * 1e3
    t50 = percentile(direct.ttft, 50) * 1e3
    print()
    print("latency, concurrency 1, non-streaming (ms)")
    print(f"{'target':<16}{'p50':>9}{'p99':>9}{'added p50':>11}{'added p99':>11}{'x direct':>10}")
    for t in targets:
        p50, p99 = percentile(t.latency, 50) * 1e3, percentile(t.latency, 99) * 1e3
        print(f"{t.name:<16}{p50:>9.3f}{p99:>9.3f}{p50 - d50:>+11.3f}{p99 - d99:>+11.3f}{p50 / d50:>10.2f}")
    print()
    print("time to first token, concurrency 1, streaming (ms)")
    print(f"{'target':<16}{'p50':>9}{'p99':>9}{'added p50':>11}")
    for t in targets:
        p50, p99 = percentile(t.ttft, 50) * 1e3, percentile(t.ttft, 99) * 1e3
        print(f"{t.name:<16}{p50:>9.3f}{p99:>9.3f}{p50 - t50:>+11.3f}")
    if any(throughput.values()):
        print()
        print("throughput, 32 connections, wrk, non-streaming (proxy on one core)")
        print("  cpu us/req: CPU time of the answering process per request (direct: the backend)")
        print("  1-core req/s: 1e6 / cpu us/req, what one uncontended core would sustain")
        print(
            f"{'target':<16}{'req/s':>10}{'p50 ms':>9}{'p99 ms':>9}{'added p99':>11}"
            f"{'errors':>8}{'x direct':>10}{'cpu us/req':>12}{'1-core req/s':>14}"
        )
        base = throughput[direct.name]
        b_rps = statistics.mean(x["rps"] for x in base)
        b_p99 = statistics.mean(x["p99"] for x in base)
        for t in targets:
            runs = throughput[t.name]
            rps = statistics.mean(x["rps"] for x in runs)
            p50 = statistics.mean(x["p50"] for x in runs)
            p99 = statistics.mean(x["p99"] for x in runs)
            errors = sum(int(x["errors"]) for x in runs)
            cpu_us = statistics.mean(x["cpu_us"] for x in runs)
            print(
                f"{t.name:<16}{rps:>10.0f}{p50:>9.3f}{p99:>9.3f}{p99 - b_p99:>+11.3f}"
                f"{errors:>8}{rps / b_rps:>10.2f}{cpu_us:>12.0f}{1e6 / cpu_us:>14.0f}"
            )
    print()
    print("500 concurrent streams x 20 events, 100 ms apart")
    print(f"{'target':<16}{'seconds':>9}{'lost':>6}{'merged':>8}{'failed':>8}{'coalesced reads':>17}")
    for name, r in streams.items():
        print(f"{name:<16}{r['seconds']:>9.2f}{r['lost']:>6}{r['merged']:>8}{r['failed']:>8}{r['coalesced_reads']:>17}")
    for note in notes:
        print(f"note: {note}")


if __name__ == "__main__":
    main()
