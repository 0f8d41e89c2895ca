"""A gateway restart under load, and replicas that crash or refuse connections, with real processes.

Two gateway processes (A and B, as two pods behind a Service) serve one model from two replicas
(tests/reliability/fake_openai_backend.py, each its own process recording every request it
receives). Clients follow readiness as kube-proxy follows a Service's endpoints: a poller GETs
each gateway's /readyz every POLL_S and clients send each request to a gateway that answered 200
most recently. A is sent SIGTERM mid-load and replaced by A2 on another port (a new pod).

What a user checks:

- no client that follows readiness is refused or sees a connection error; every request is
  answered 200 with its whole body (a completion naming its prompt, or every chunk then
  ``data: [DONE]``), and each prompt reached the replicas exactly once; A served traffic before
  the SIGTERM and none started on it once its listener was to close;
- a stream on A longer than drain_seconds + shutdown_grace_seconds keeps flowing through both and
  is cut only after them, ending with an OpenAI error envelope in a ``data:`` line, then
  ``data: [DONE]``;
- a replica that crashes after reading a request (before any header) costs that request a 502 in
  OpenAI's envelope and the request reaches the replicas exactly once (never replayed);
- with one replica's port closed, every request is answered by the other one and each refused
  connect is counted in ``llmep_gateway_backend_retries_total`` and logged.

All traffic is on 127.0.0.1; every wait has a deadline and every process is ended in ``finally``.
"""

from __future__ import annotations

import json
import re
import signal
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import openai
import pytest

from tests.cluster.conftest import wait_until
from tests.reliability.stack import Proc, free_port, start_backend, start_gateway

pytestmark = [pytest.mark.reliability, pytest.mark.timeout(180)]

DRAIN_S = 1.5
GRACE_S = 3.0
POLL_S = 0.2  # readiness poll interval (kube-proxy following endpoints); with --drain-seconds 0 clients are refused
CLIENTS = 8
PER_GATEWAY = 30  # answers from a gateway before the next step: load that flows, not a time
STREAM_CHUNKS = 12  # fake_openai_backend.STREAM_CHUNKS
SLOW_DELAY = 0.05  # fake_openai_backend.SLOW_DELAY
TIMER_SLACK_S = 0.1  # asyncio timers may fire up to a clock tick early
POLL_S = 0.05  # the test measures drain timings to a tenth of a second


def start_replica(port: int, name: str, logs: Path) -> tuple[Proc, Path]:
    """A fake_openai_backend.py process; its received requests go to the returned file."""
    received = logs / f"received-{name}.jsonl"
    received.touch()
    return start_backend(port, name, logs, received), received


def received(*files: Path) -> list[dict]:
    entries = []
    for path in files:
        text = path.read_text()
        entries += [json.loads(line) for line in text[: text.rfind("\n") + 1].splitlines()]
    return entries


def gateway_args(routes: Path) -> tuple[str, ...]:
    return (
        "--routes-file", str(routes),
        "--anonymous",
        "--max-concurrency-per-key", "0",
        "--drain-seconds", str(DRAIN_S),
        "--shutdown-grace-seconds", str(GRACE_S),
    )  # fmt: skip


def stop_all(procs: list[Proc]) -> None:
    for p in procs:
        if p.proc.poll() is None:
            p.proc.send_signal(signal.SIGTERM)
    for p in procs:
        p.terminate(timeout=DRAIN_S + GRACE_S + 10)


def sse_events(text: str) -> list[str]:
    return [e for e in text.split("\n\n") if e and not e.startswith(":")]


def check_stream(text: str, prompt: str) -> str:
    """The replica that answered a complete stream: every chunk in order, then [DONE]."""
    events = sse_events(text)
    if not text.endswith("\n\n") or not events or events[-1] != "data: [DONE]":
        raise AssertionError(f"stream for {prompt} does not end with [DONE]: {text[-200:]!r}")
    contents = [json.loads(e.removeprefix("data: "))["choices"][0]["delta"]["content"] for e in events[:-1]]
    backend = contents[0][:-2] if contents else "?"
    if contents != [f"{backend}{i} " for i in range(STREAM_CHUNKS)]:
        raise AssertionError(f"stream for {prompt} is incomplete: {contents!r}")
    return backend


def stream_once(http: httpx.Client, port: int, prompt: str) -> str:
    body = {"model": "chat", "stream": True, "messages": [{"role": "user", "content": prompt}]}
    with http.stream("POST", f"http://127.0.0.1:{port}/v1/chat/completions", json=body) as resp:
        text = resp.read().decode()
        if resp.status_code != 200:
            raise AssertionError(f"stream for {prompt}: {resp.status_code} {text[:200]}")
    return check_stream(text, prompt)


def complete_once(sdk: openai.OpenAI, prompt: str) -> str:
    answer = sdk.chat.completions.create(model="chat", messages=[{"role": "user", "content": prompt}])
    content = answer.choices[0].message.content or ""
    backend, _, echoed = content.partition(": ")
    if answer.object != "chat.completion" or echoed != prompt:
        raise AssertionError(f"completion for {prompt} is not its answer: {content!r}")
    return backend


def sdk_for(port: int) -> openai.OpenAI:
    # max_retries=0: every connection error and 5xx is seen here, none hidden by the SDK's retries.
    return openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0, timeout=30)


class Endpoints:
    """The Service's ready endpoints, as kube-proxy sees them: /readyz polled every POLL_S."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.ports: dict[str, int] = {}
        self.ready: dict[str, bool] = {}
        self.changes: list[tuple[float, str, bool]] = []

    def add(self, name: str, port: int) -> None:
        with self.lock:
            self.ports[name] = port
            self.ready[name] = False

    def pick(self, n: int) -> tuple[str, int] | None:
        with self.lock:
            ready = sorted(name for name, ok in self.ready.items() if ok)
            if not ready:
                return None
            name = ready[n % len(ready)]
            return name, self.ports[name]

    def is_ready(self, name: str) -> bool:
        with self.lock:
            return self.ready[name]

    def poll(self, stop: threading.Event) -> None:
        while not stop.is_set():
            with self.lock:
                ports = dict(self.ports)
            for name, port in ports.items():
                try:
                    with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=1) as resp:  # noqa: S310
                        ok = resp.status == 200
                except (OSError, urllib.error.URLError):
                    ok = False
                with self.lock:
                    if self.ready[name] != ok:
                        self.changes.append((time.monotonic(), name, ok))
                    self.ready[name] = ok
            stop.wait(POLL_S)


@dataclass
class Answer:
    gateway: str
    prompt: str
    stream: bool
    started: float
    ended: float
    error: str | None = None
    connection_error: bool = False


@dataclass
class Load:
    lock: threading.Lock = field(default_factory=threading.Lock)
    answers: list[Answer] = field(default_factory=list)
    in_flight: dict[int, Answer] = field(default_factory=dict)  # client index -> its open request
    no_endpoint: int = 0

    def streaming_on(self, gateway: str) -> bool:
        """A client's stream began on the gateway in the last 0.2 s (each lasts >= 0.6 s)."""
        since = time.monotonic() - 0.2
        with self.lock:
            return any(a.gateway == gateway and a.stream and a.started > since for a in self.in_flight.values())

    def ok(self, gateway: str) -> int:
        with self.lock:
            return sum(1 for a in self.answers if a.gateway == gateway and a.error is None)


def client(index: int, endpoints: Endpoints, stop: threading.Event, load: Load) -> None:
    streaming = index % 2 == 1
    sdks: dict[int, openai.OpenAI] = {}
    with httpx.Client(timeout=30) as http:
        n = 0
        while not stop.is_set():
            picked = endpoints.pick(index + n)
            if picked is None:
                with load.lock:
                    load.no_endpoint += 1
                stop.wait(0.05)
                continue
            name, port = picked
            prompt = f"client{index}-{n}-{uuid.uuid4().hex[:8]}"
            answer = Answer(name, prompt, streaming, time.monotonic(), 0.0)
            with load.lock:
                load.in_flight[index] = answer
            try:
                if streaming:
                    stream_once(http, port, prompt)
                else:
                    if port not in sdks:
                        sdks[port] = sdk_for(port)
                    complete_once(sdks[port], prompt)
            except (openai.APIConnectionError, httpx.TransportError) as exc:
                answer.error, answer.connection_error = f"{type(exc).__name__}: {exc}", True
            except (openai.APIError, AssertionError, ValueError, KeyError) as exc:
                answer.error = f"{type(exc).__name__}: {exc}"
            answer.ended = time.monotonic()
            with load.lock:
                load.answers.append(answer)
                del load.in_flight[index]
            n += 1
    for sdk in sdks.values():
        sdk.close()


class LongStream:
    """One slow stream on a gateway; each SSE event with the time it arrived."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.prompt = f"slow-stream-{uuid.uuid4().hex[:8]}"
        self.status: int | None = None
        self.events: list[tuple[float, str]] = []
        self.tail = ""
        self.error: str | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        body = {"model": "chat", "stream": True, "messages": [{"role": "user", "content": self.prompt}]}
        buffer = ""
        try:
            with (
                httpx.Client(timeout=30) as http,
                http.stream("POST", f"http://127.0.0.1:{self.port}/v1/chat/completions", json=body) as resp,
            ):
                self.status = resp.status_code
                for text in resp.iter_text():
                    now = time.monotonic()
                    buffer += text
                    *complete, buffer = buffer.split("\n\n")
                    self.events += [(now, e) for e in complete if e and not e.startswith(":")]
        except httpx.HTTPError as exc:
            self.error = f"{type(exc).__name__}: {exc}"
        self.tail = buffer


def test_gateway_restart_under_load(tmp_path: Path) -> None:
    procs: list[Proc] = []
    stop = threading.Event()
    threads: list[threading.Thread] = []
    endpoints, load = Endpoints(), Load()
    try:
        ports = {name: free_port() for name in ("r1", "r2", "A", "B", "A2")}
        replicas = []
        for name in ("r1", "r2"):
            proc, path = start_replica(ports[name], name, tmp_path)
            procs.append(proc)
            replicas.append(path)
        routes = tmp_path / "routes.json"
        urls = [f"http://127.0.0.1:{ports[name]}/v1" for name in ("r1", "r2")]
        routes.write_text(json.dumps([{"models": ["chat"], "url": urls}]))
        gateway_a = start_gateway(ports["A"], tmp_path, *gateway_args(routes), name="gateway-A")
        procs.append(gateway_a)
        procs.append(start_gateway(ports["B"], tmp_path, *gateway_args(routes), name="gateway-B"))
        endpoints.add("A", ports["A"])
        endpoints.add("B", ports["B"])
        threads.append(threading.Thread(target=endpoints.poll, args=(stop,), daemon=True))
        threads[-1].start()
        wait_until(
            lambda: endpoints.is_ready("A") and endpoints.is_ready("B"),
            timeout=10,
            interval=POLL_S,
            message="A and B ready",
        )
        began = time.monotonic()
        for index in range(CLIENTS):
            threads.append(threading.Thread(target=client, args=(index, endpoints, stop, load), daemon=True))
            threads[-1].start()
        wait_until(
            lambda: load.ok("A") >= PER_GATEWAY and load.ok("B") >= PER_GATEWAY,
            timeout=60,
            interval=POLL_S,
            message=f"{PER_GATEWAY} answers from each of A and B",
        )

        long_stream = LongStream(ports["A"])
        long_stream.thread.start()
        wait_until(
            lambda: len(long_stream.events) >= 5, timeout=10, interval=POLL_S, message="the long stream flowing on A"
        )
        wait_until(
            lambda: load.streaming_on("A"), timeout=10, interval=POLL_S, message="a client's stream in flight on A"
        )

        sigterm_at = time.monotonic()
        gateway_a.proc.send_signal(signal.SIGTERM)
        wait_until(
            lambda: not endpoints.is_ready("A"),
            timeout=DRAIN_S,
            interval=POLL_S,
            message="A out of the endpoints while draining",
        )
        unready_at = time.monotonic()
        # The replacement pod: a new gateway on another port, in the endpoints once ready.
        procs.append(start_gateway(ports["A2"], tmp_path, *gateway_args(routes), name="gateway-A2"))
        endpoints.add("A2", ports["A2"])
        wait_until(
            lambda: load.ok("A2") >= PER_GATEWAY, timeout=60, interval=POLL_S, message=f"{PER_GATEWAY} answers from A2"
        )
        a_exit = gateway_a.proc.wait(DRAIN_S + GRACE_S + 15)
        exited_at = time.monotonic()
        long_stream.thread.join(15)
        stop.set()
        for thread in threads:
            thread.join(40)
        load_s = time.monotonic() - began
    finally:
        stop.set()
        for thread in threads:
            thread.join(40)
        stop_all(procs)

    answers = load.answers
    per_gateway = Counter(a.gateway for a in answers if a.error is None)
    a_answers = [a for a in answers if a.gateway == "A"]
    a_before = sum(1 for a in a_answers if a.started < sigterm_at)
    a_after = [a for a in a_answers if a.started >= sigterm_at]
    a_open = [a for a in a_answers if a.started < sigterm_at < a.ended]
    connection_errors = [a for a in answers if a.connection_error]
    failed = [a for a in answers if a.error is not None]
    streams = sum(1 for a in answers if a.stream)
    events = long_stream.events
    cut_at = next((t for t, e in events if e.startswith('data: {"error"')), None)
    after_sigterm = sum(1 for t, e in events if t > sigterm_at and '"chat.completion.chunk"' in e)
    chunks_before_cut = [t for t, e in events if '"chat.completion.chunk"' in e]
    print(
        f"\n{len(answers)} requests in {load_s:.1f}s ({streams} streams), per gateway {dict(per_gateway)}; "
        f"A: {a_before} started before SIGTERM, {len(a_after)} after it "
        f"(last {max((a.started for a in a_answers), default=sigterm_at) - sigterm_at:+.2f}s), "
        f"{len(a_open)} in flight at SIGTERM ({sum(a.stream for a in a_open)} streams, all completed); "
        f"A out of the endpoints {unready_at - sigterm_at:.2f}s after SIGTERM, exited ({a_exit}) "
        f"{exited_at - sigterm_at:.2f}s after it; failures {len(failed)}, connection errors "
        f"{len(connection_errors)}, picks with no ready gateway {load.no_endpoint}\n"
        f"long stream: {len(chunks_before_cut)} chunks, {after_sigterm} after SIGTERM, cut "
        f"{(cut_at - sigterm_at) if cut_at else float('nan'):.2f}s after SIGTERM "
        f"(drain {DRAIN_S}s + grace {GRACE_S}s = {DRAIN_S + GRACE_S}s); last events "
        f"{[e[:120] for _, e in events[-2:]]}"
    )

    assert not connection_errors, [a.error for a in connection_errors[:5]]
    assert not failed, [f"{a.gateway} {a.error}" for a in failed[:5]]
    assert load.no_endpoint == 0
    # Each prompt reached the replicas exactly once; nothing was lost or sent twice.
    counts = Counter(entry["prompt"] for entry in received(*replicas))
    assert {a.prompt for a in answers} <= counts.keys()
    assert max(counts.values()) == 1, [p for p, c in counts.items() if c > 1][:5]
    # A served before its SIGTERM, and no request started on it once its listener was to close.
    assert a_before >= PER_GATEWAY
    assert any(a.stream for a in a_open)  # and it completed (no failures above)
    assert all(a.started < sigterm_at + DRAIN_S for a in a_answers)
    assert all(a.ended <= exited_at for a in a_answers)
    assert a_exit == 0
    assert "cutting 1 requests still in flight" in gateway_a.output()

    # The long stream flowed through drain and grace and was cut only then, with an error event.
    assert long_stream.error is None and long_stream.status == 200, long_stream.error
    assert long_stream.tail == ""
    assert cut_at is not None, events[-3:]
    assert DRAIN_S + GRACE_S - TIMER_SLACK_S <= cut_at - sigterm_at <= DRAIN_S + GRACE_S + 3.0
    assert after_sigterm >= 0.5 * (DRAIN_S + GRACE_S) / SLOW_DELAY
    assert cut_at - chunks_before_cut[-1] < 1.0
    error = json.loads(events[-2][1].removeprefix("data: "))["error"]
    assert error["code"] == "gateway_shutting_down" and {"message", "type", "param", "code"} <= error.keys()
    assert events[-1][1] == "data: [DONE]"


def metric(port: int, name: str, **labels: str) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:  # noqa: S310
        text = resp.read().decode()
    want = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    for line in text.splitlines():
        m = re.fullmatch(rf"{name}\{{(.*)\}} (\S+)", line)
        if m and ",".join(sorted(m.group(1).split(","))) == want:
            return float(m.group(2))
    return 0.0


def test_a_replica_crashing_mid_generation_is_not_sent_the_request_twice(tmp_path: Path) -> None:
    procs: list[Proc] = []
    try:
        ports = {name: free_port() for name in ("r1", "r2", "gw")}
        replicas: dict[str, tuple[Proc, Path]] = {}
        for name in ("r1", "r2"):
            replicas[name] = start_replica(ports[name], name, tmp_path)
            procs.append(replicas[name][0])
        routes = tmp_path / "routes.json"
        urls = [f"http://127.0.0.1:{ports[name]}/v1" for name in ("r1", "r2")]
        routes.write_text(json.dumps([{"models": ["chat"], "url": urls}]))
        gateway = start_gateway(ports["gw"], tmp_path, *gateway_args(routes), name="gateway")
        procs.append(gateway)
        with sdk_for(ports["gw"]) as sdk:
            served = {complete_once(sdk, f"warm-{i}") for i in range(4)}
            assert served == {"r1", "r2"}  # both replicas serve, round-robin

            prompt = f"crash-{uuid.uuid4().hex}"
            began = time.monotonic()
            with pytest.raises(openai.APIStatusError) as raised:
                sdk.chat.completions.create(model="chat", messages=[{"role": "user", "content": prompt}])
            took = time.monotonic() - began
            crashed = wait_until(
                lambda: next((n for n, (p, _) in replicas.items() if p.proc.poll() is not None), None),
                timeout=10,
                interval=POLL_S,
                message="a replica exited",
            )
            entries = received(*(path for _, path in replicas.values()))
            times = sum(1 for e in entries if e["prompt"] == prompt)
            # The survivor goes on serving; the crashed replica's port now refuses connections.
            after = [complete_once(sdk, f"after-{i}") for i in range(6)]
    finally:
        stop_all(procs)

    body = raised.value.response.json()
    print(
        f"\ncrash: replica {crashed} exited ({replicas[crashed][0].proc.returncode}); the client got "
        f"{raised.value.status_code} {body['error']['code']} in {took:.2f}s; the prompt was received "
        f"{times} time(s) across both replicas; next 6 answered by {Counter(after)}"
    )
    assert raised.value.status_code == 502
    assert body["error"]["code"] == "backend_unavailable"
    assert {"message", "type", "param", "code"} <= body["error"].keys()
    assert replicas[crashed][0].proc.returncode == 3
    assert times == 1
    assert set(after) == {"r1", "r2"} - {crashed}


def test_a_refused_connect_is_retried_once_on_the_other_replica(tmp_path: Path) -> None:
    procs: list[Proc] = []
    requests = 20
    try:
        live, closed, gw = free_port(), free_port(), free_port()
        proc, path = start_replica(live, "live", tmp_path)
        procs.append(proc)
        routes = tmp_path / "routes.json"
        # The closed replica first: round-robin sends every other request to it first.
        urls = [f"http://127.0.0.1:{closed}/v1", f"http://127.0.0.1:{live}/v1"]
        routes.write_text(json.dumps([{"models": ["chat"], "url": urls}]))
        gateway = start_gateway(gw, tmp_path, *gateway_args(routes), name="gateway")
        procs.append(gateway)
        prompts = [f"refused-{i}-{uuid.uuid4().hex[:8]}" for i in range(requests)]
        answered_by = []
        with sdk_for(gw) as sdk, httpx.Client(timeout=30) as http:
            for i, prompt in enumerate(prompts):
                if i % 2:
                    answered_by.append(stream_once(http, gw, prompt))
                else:
                    answered_by.append(complete_once(sdk, prompt))
        retries = metric(gw, "llmep_gateway_backend_retries_total", model="chat", reason="connect_failed")
        logged = gateway.output().count("not reached (connect_failed")
        counts = Counter(entry["prompt"] for entry in received(path))
    finally:
        stop_all(procs)

    print(
        f"\nrefused connects: {requests} requests answered by {Counter(answered_by)}; "
        f"llmep_gateway_backend_retries_total{{reason=connect_failed}} {retries:.0f}, "
        f"{logged} 'not reached' log lines"
    )
    assert answered_by == ["live"] * requests
    assert counts == Counter(prompts)  # each reached the live replica exactly once
    assert retries == requests / 2
    assert logged == requests / 2
