"""Disruption under load: 8 clients (half streaming) through the gateway to two replicas of one
model while one replica is killed mid-stream, the gateway is restarted, and the operator is
restarted with endpoints on the rig.

The two replicas are small OpenAI-shaped aiohttp servers (tests/reliability/fake_openai_backend.py),
each its own process so it can be SIGKILLed: they stand in for vLLM replicas, because killing and
restarting real engines on 2 cores is not feasible within the suite's time; the real vLLM path
is covered in tests/serving. The gateway is a subprocess with a routes file listing both
replicas for the model. Clients retry only connection errors to the gateway (refused, or a
keep-alive connection closed before any answer), with backoff, as the OpenAI SDK does; a 5xx
from the gateway is a failure. All traffic is on 127.0.0.1; the load stops by itself.

What a user checks: no non-streaming request fails, except those already sent to the replica
when it was killed (502, never replayed onto the other: they may have reached the engine; at
most one per client); every stream is well formed, ending with
`data: [DONE]` after valid chunks or with a `data: {"error": ...}` event then `[DONE]`; during
the operator restart, the RayServices' worker replicas and worker pods never drop and no child
is duplicated.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import secrets
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import pytest

from tests.cluster.conftest import wait_until
from tests.cluster.operator_identity import operator_identity
from tests.reliability.stack import free_port, start_backend, start_gateway

pytestmark = pytest.mark.timeout(300)

REPO = Path(__file__).resolve().parents[2]
HANDLERS = str(REPO / "operator" / "llmep_operator" / "handlers.py")
CRD = REPO / "crds" / "llmendpoints.llmep.io.yaml"
GROUP, VERSION, PLURAL = "llmep.io", "v1alpha1", "llmendpoints"
CLIENTS = 8
# Requests answered in each phase before the next disruption: load that flows, not a time.
PHASE_REQUESTS = 200
RETRYABLE = (aiohttp.ClientConnectorError, aiohttp.ServerDisconnectedError, aiohttp.ClientOSError)


@dataclass
class Tally:
    sent: int = 0
    ok: int = 0
    failed: list[str] = field(default_factory=list)
    retried: int = 0  # client retries after a connection error to the gateway
    streams: int = 0
    interrupted: int = 0  # streams ended by the gateway's SSE error event
    malformed: list[str] = field(default_factory=list)
    killed_at: float | None = None  # when replica a was SIGKILLed
    # Non-streaming requests already sent to replica a when it was killed: the gateway answers
    # them 502 and never replays them (they may have reached the engine, docs/gateway.md).
    cut_by_kill: list[str] = field(default_factory=list)


def parse_stream(text: str) -> str:
    """'complete' or 'interrupted' for a well-formed chat stream; raise ValueError otherwise."""
    if not text.endswith("\n\n"):
        raise ValueError(f"stream does not end with a blank line: {text[-200:]!r}")
    events = [e for e in text[:-2].split("\n\n") if not e.startswith(":")]  # ': keep-alive' comments
    if not events or events[-1] != "data: [DONE]":
        raise ValueError(f"stream does not end with [DONE]: {events[-2:]!r}")
    payloads = []
    for event in events[:-1]:
        if not event.startswith("data: ") or "\n" in event:
            raise ValueError(f"not one data line: {event[:200]!r}")
        payloads.append(json.loads(event[6:]))
    *chunks, last = payloads or [None]
    if isinstance(last, dict) and "error" in last:
        error = last["error"]
        assert {"message", "type", "code"} <= error.keys(), error
        kind = "interrupted"
    else:
        chunks.append(last)
        kind = "complete"
    for chunk in chunks:
        if chunk is None or chunk.get("object") != "chat.completion.chunk":
            raise ValueError(f"not a chat.completion.chunk: {chunk!r}")
    if kind == "complete" and not chunks:
        raise ValueError("a complete stream without chunks")
    return kind


async def one_request(session: aiohttp.ClientSession, url: str, stream: bool, tally: Tally) -> None:
    body = {"model": "chat", "stream": stream, "messages": [{"role": "user", "content": "hi"}]}
    tally.sent += 1
    began = time.monotonic()
    delay = 0.05
    for _ in range(60):
        answered = False
        try:
            async with session.post(url, json=body) as resp:
                answered = True
                text = await resp.text()
                if resp.status != 200:
                    in_flight_at_kill = tally.killed_at is not None and began <= tally.killed_at
                    if resp.status == 502 and '"backend_unavailable"' in text and in_flight_at_kill:
                        tally.cut_by_kill.append(text[:200])
                    else:
                        tally.failed.append(f"{resp.status} {text[:200]}")
                    return
                if stream:
                    tally.streams += 1
                    try:
                        if parse_stream(text) == "interrupted":
                            tally.interrupted += 1
                    except (ValueError, AssertionError) as exc:
                        tally.malformed.append(str(exc))
                        return
                elif json.loads(text)["object"] != "chat.completion":
                    tally.failed.append(f"not a completion: {text[:200]}")
                    return
                tally.ok += 1
                return
        except aiohttp.ClientError as exc:
            # Retried only when no answer began, as the OpenAI SDK does for connection errors.
            if answered or not isinstance(exc, RETRYABLE):
                tally.malformed.append(f"{type(exc).__name__} after the answer began: {exc}")
                return
            tally.retried += 1
            await asyncio.sleep(delay)
            delay = min(delay * 2, 1.0)
    tally.failed.append("gave up after 60 connection errors")


async def client(index: int, url: str, stop: asyncio.Event, tally: Tally) -> None:
    # A fresh connector per client; keep-alive connections to the gateway are reused.
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as session:
        n = 0
        while not stop.is_set():
            await one_request(session, url, stream=(index + n) % 2 == 0, tally=tally)
            n += 1


# -- the operator phase, on the rig ------------------------------------------------------


def _endpoint(name: str, min_replicas: int) -> dict:
    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "LLMEndpoint",
        "metadata": {"name": name},
        "spec": {
            "model": {"source": "hf://Qwen/Qwen2.5-7B-Instruct"},
            "resources": {"profile": "nvidia-h100:1"},
            "autoscaling": {"minReplicas": min_replicas, "maxReplicas": 4},
        },
    }


class ReplicaWatch:
    """Samples the worker replicas of each RayService and RayCluster and the worker pods."""

    def __init__(self, cluster, namespace: str) -> None:
        self.cluster, self.namespace = cluster, namespace
        self.samples: list[dict[str, int]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def snapshot(self) -> dict[str, int]:
        custom, ns = self.cluster.custom, self.namespace
        counts: dict[str, int] = {}
        for kind in ("rayservices", "rayclusters"):
            for obj in custom.list_namespaced_custom_object("ray.io", "v1", ns, kind)["items"]:
                spec = obj["spec"]["rayClusterConfig"] if kind == "rayservices" else obj["spec"]
                replicas = sum(g.get("replicas", 0) for g in spec.get("workerGroupSpecs", []))
                counts[f"{kind}/{obj['metadata']['name']}"] = replicas
        pods = self.cluster.core.list_namespaced_pod(ns, label_selector="ray.io/node-type=worker").items
        counts["worker pods"] = sum(1 for p in pods if p.metadata.deletion_timestamp is None)
        return counts

    def _run(self) -> None:
        while not self._stop.is_set():
            self.samples.append(self.snapshot())
            self._stop.wait(0.25)

    def __enter__(self) -> ReplicaWatch:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(10)


def _hand_edit_and_wait_for_drift_correction(cluster, namespace: str, names: tuple[str, ...]) -> None:
    managed_by = "app.kubernetes.io/managed-by"
    for name in names:
        cluster.kubectl("label", "service", f"{name}-serve", "-n", namespace, "--overwrite", f"{managed_by}=hand")

    def corrected() -> bool:
        services = [cluster.core.read_namespaced_service(f"{n}-serve", namespace) for n in names]
        return all(s.metadata.labels.get(managed_by) == "llmep-operator" for s in services)

    wait_until(corrected, timeout=30, interval=0.2, message="the drift loop to restore the hand-edited Service labels")


def operator_restart_phase(cluster, namespace: str, kopf_runner_as, report: dict) -> None:
    cluster.apply_crd(CRD)
    release = f"op-{secrets.token_hex(3)}"
    account, rbac = operator_identity(cluster.bin_dir, release, namespace, f"watchNamespaces={{{namespace}}}")
    cluster.apply(rbac)
    outputs: list[str] = []

    @contextlib.contextmanager
    def operator():
        with kopf_runner_as(account, namespace, paths=(HANDLERS,), watch_namespaces=(namespace,)) as runner:
            yield runner
        outputs.append(runner.output)
        assert runner.exception is None, runner.exception

    def children(kind: str) -> list[str]:
        return sorted(cluster.kubectl("get", kind, "-n", namespace, "-o", "name").split())

    try:
        with operator():
            for name, replicas in (("alpha", 2), ("beta", 1)):
                cluster.apply(_endpoint(name, replicas), namespace)
            wait_until(
                lambda: (
                    len(cluster.core.list_namespaced_pod(namespace, label_selector="ray.io/node-type=worker").items)
                    >= 3
                ),
                timeout=120,
                message="3 worker pods (alpha 2, beta 1)",
            )
            # What KubeRay's autoscaler does under load: scale alpha's RayCluster up to 3 workers.
            rc = wait_until(
                lambda: next(
                    (
                        c
                        for c in cluster.custom.list_namespaced_custom_object("ray.io", "v1", namespace, "rayclusters")[
                            "items"
                        ]
                        if c["metadata"]["ownerReferences"][0]["name"] == "alpha"
                    ),
                    None,
                ),
                timeout=60,
                message="alpha's RayCluster",
            )
            cluster.kubectl(
                "patch", "raycluster", rc["metadata"]["name"], "-n", namespace, "--type=json",
                "-p", '[{"op":"replace","path":"/spec/workerGroupSpecs/0/replicas","value":3}]',
            )  # fmt: skip
            watch = ReplicaWatch(cluster, namespace)
            wait_until(lambda: watch.snapshot()["worker pods"] >= 4, timeout=120, message="4 worker pods")
            before = watch.snapshot()
            uids = {n: cluster.custom.get_namespaced_custom_object("ray.io", "v1", namespace, "rayservices", n)[
                "metadata"]["uid"] for n in ("alpha", "beta")}  # fmt: skip
        with watch:
            # The operator is down while the watch samples the replicas a few times.
            down_from = len(watch.samples)
            wait_until(
                lambda: len(watch.samples) >= down_from + 8, timeout=30, message="samples with the operator down"
            )
            with operator():
                # Resume, with the children in place.
                wait_until(
                    lambda: all(
                        (o := cluster.custom.get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, n))
                        .get("status", {})
                        .get("observedGeneration")
                        == o["metadata"]["generation"]
                        for n in ("alpha", "beta")
                    ),
                    timeout=60,
                    message="observedGeneration == generation after the restart",
                )
                # Two drift re-applies with the children in place: each restores a hand-edited label.
                for _ in range(2):
                    _hand_edit_and_wait_for_drift_correction(cluster, namespace, ("alpha", "beta"))
        after = watch.snapshot()
        report.update(before=before, after=after, samples=len(watch.samples))
        minimum = {k: min(s.get(k, 0) for s in watch.samples) for k in before}
        report["minimum"] = minimum
        assert minimum == before, f"replicas dropped during the operator restart: before {before}, min {minimum}"
        assert after == before
        assert children("rayservice") == ["rayservice.ray.io/alpha", "rayservice.ray.io/beta"]
        assert len(children("raycluster")) == 2, children("raycluster")
        managed = cluster.kubectl(
            "get", "service", "-n", namespace, "-l", "app.kubernetes.io/managed-by=llmep-operator", "-o", "name"
        ).split()
        assert sorted(managed) == ["service/alpha-serve", "service/beta-serve"]
        for n, uid in uids.items():
            rs = cluster.custom.get_namespaced_custom_object("ray.io", "v1", namespace, "rayservices", n)
            assert rs["metadata"]["uid"] == uid, f"RayService {n} was recreated"
        for out in outputs:
            assert "Traceback" not in out, out[-4000:]
    finally:
        for obj in rbac:
            if obj["kind"].startswith("Cluster"):
                with contextlib.suppress(Exception):
                    cluster.kubectl("delete", obj["kind"].lower(), obj["metadata"]["name"], "--ignore-not-found")


# -- the test ----------------------------------------------------------------------------


@pytest.mark.asyncio
async def test_no_request_is_lost_under_replica_kill_gateway_restart_and_operator_restart(
    tmp_path, cluster, namespace, kopf_runner_as, monkeypatch
):
    monkeypatch.setenv("LLMEP_DRIFT_CHECK_SECONDS", "3")
    ports = {"a": free_port(), "b": free_port(), "gateway": free_port()}
    backends = {n: start_backend(ports[n], n, tmp_path) for n in ("a", "b")}
    routes = tmp_path / "routes.json"
    urls = [f"http://127.0.0.1:{ports[n]}/v1" for n in ("a", "b")]
    routes.write_text(json.dumps([{"models": ["chat"], "url": urls}]))
    gw_args = ("--routes-file", str(routes), "--anonymous", "--max-concurrency-per-key", "0")
    gateways = [start_gateway(ports["gateway"], tmp_path, *gw_args, name="gateway-1")]
    url = f"http://127.0.0.1:{ports['gateway']}/v1/chat/completions"
    tally, stop, timeline = Tally(), asyncio.Event(), {}
    report: dict = {}
    started = time.monotonic()

    def mark(what: str) -> None:
        timeline[what] = round(time.monotonic() - started, 1)

    clients = [asyncio.create_task(client(i, url, stop, tally)) for i in range(CLIENTS)]

    async def answered(more: int, what: str) -> None:
        """Wait until `more` further requests were answered: the load flows `what`."""
        target = tally.ok + more
        try:
            async with asyncio.timeout(60):
                while tally.ok < target:
                    await asyncio.sleep(0.05)
        except TimeoutError:
            message = f"{tally.ok} of {target} requests answered {what}; failed {tally.failed[-3:]}"
            raise AssertionError(message) from None

    try:
        await answered(PHASE_REQUESTS, "before the kill")
        mark("kill replica a")
        tally.killed_at = time.monotonic()
        backends["a"].kill()  # SIGKILL: its listener and every open stream close at once
        await answered(PHASE_REQUESTS, "by replica b alone")
        backends["a"] = await asyncio.to_thread(start_backend, ports["a"], "a2", tmp_path)
        mark("replica a back")
        await answered(PHASE_REQUESTS, "with replica a back")
        mark("gateway SIGTERM")
        rc = await asyncio.to_thread(gateways[-1].terminate)
        assert rc == 0, gateways[-1].output()[-3000:]
        gateways.append(await asyncio.to_thread(start_gateway, ports["gateway"], tmp_path, *gw_args, name="gateway-2"))
        mark("gateway back")
        await answered(PHASE_REQUESTS, "through the restarted gateway")
        mark("operator phase")
        await asyncio.to_thread(operator_restart_phase, cluster, namespace, kopf_runner_as, report)
        mark("operator phase done")
        await answered(PHASE_REQUESTS, "after the operator phase")
    finally:
        stop.set()
        await asyncio.wait_for(asyncio.gather(*clients, return_exceptions=True), 90)
        mark("load stopped")
        for p in [*gateways, *backends.values()]:
            p.terminate(10)
    skipped = sum(g.output().count("not reached (") for g in gateways)
    print(
        f"\ndisruption: {time.monotonic() - started:.0f}s of load, {CLIENTS} clients; timeline {timeline}\n"
        f"  requests sent {tally.sent}, ok {tally.ok}, failed {len(tally.failed)}, "
        f"in flight on the killed replica (502, not replayed) {len(tally.cut_by_kill)}, "
        f"client retries of gateway connection errors {tally.retried}, "
        f"gateway retries on the other replica {skipped}\n"
        f"  streams {tally.streams}, interrupted (SSE error event) {tally.interrupted}, "
        f"malformed {len(tally.malformed)}\n"
        f"  operator restart: workers before {report.get('before')}, minimum seen {report.get('minimum')} "
        f"over {report.get('samples')} samples, after {report.get('after')}"
    )
    assert tally.failed == [], tally.failed[:10]
    assert tally.malformed == [], tally.malformed[:10]
    assert len(tally.cut_by_kill) <= CLIENTS, tally.cut_by_kill  # at most one in flight per client
    assert tally.sent == tally.ok + len(tally.failed) + len(tally.malformed) + len(tally.cut_by_kill)
    assert tally.interrupted >= 1, "the replica kill interrupted no stream: the fault did not happen mid-stream"
    assert tally.retried >= 1, "the gateway restart cost no client a connection error: it did not happen"
    assert skipped >= 1, "no request was retried on the other replica"
