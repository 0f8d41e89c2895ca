"""`llmep operator --leader-elect` as separate processes on the rig, each with only the chart's
RBAC (its ServiceAccount's token as the whole kubeconfig): of two replicas exactly one holds the
Lease and reconciles while the other waits and answers its liveness probe; the standby takes over
when the leader is killed; a leader whose Lease is taken exits non-zero."""

from __future__ import annotations

import contextlib
import datetime
import secrets
import socket
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from kubernetes import client as k8s

from llmep_operator.api import GROUP, VERSION
from llmep_operator.naming import ENDPOINT_LABEL, RAY_GROUP, RAY_VERSION
from llmep_operator.runner import LEASE_DURATION_SECONDS, RENEW_DEADLINE_SECONDS, RETRY_PERIOD_SECONDS
from tests.cluster.conftest import Cluster, wait_until
from tests.cluster.operator_identity import operator_identity
from tests.reliability.stack import Proc, free_port, spawn, wait_http

pytestmark = pytest.mark.cluster

LEASE = "runner-test-leader"
# Slack for a loaded 2-core machine: API calls, process start-up and kopf's first watch.
SLACK_SECONDS = 8


@dataclass
class Replica:
    """One `llmep operator --leader-elect` process."""

    process: Proc
    liveness: str

    @property
    def identity(self) -> str:
        """What it writes into the Lease as holderIdentity (runner.py: hostname and pid)."""
        return f"{socket.gethostname()}-{self.process.pid}"

    def log(self) -> str:
        return self.process.output()


def _tails(*replicas: Replica) -> str:
    return "".join(f"\n--- {r.identity} (exit {r.process.proc.poll()}):\n{r.log()[-3000:]}" for r in replicas)


def _lease(cluster: Cluster, namespace: str) -> k8s.V1Lease:
    return k8s.CoordinationV1Api(cluster.api).read_namespaced_lease(LEASE, namespace)


def _leader_and_standby(cluster: Cluster, namespace: str, a: Replica, b: Replica) -> tuple[Replica, Replica]:
    by_identity = {a.identity: a, b.identity: b}
    holder = wait_until(
        lambda: (h := _lease(cluster, namespace).spec.holder_identity) in by_identity and h,
        timeout=60,
        message=lambda: f"the Lease {namespace}/{LEASE} held by one of {list(by_identity)}{_tails(a, b)}",
    )
    leader = by_identity[holder]
    standby = b if leader is a else a
    wait_until(
        lambda: f"became leader as {leader.identity}" in leader.log(),
        timeout=30,
        message=lambda: f"the Lease's holder to start reconciling{_tails(leader)}",
    )
    # The election library logs this each time it finds the Lease held by another live candidate.
    wait_until(
        lambda: f"lease held by {leader.identity}" in standby.log(),
        timeout=30,
        message=lambda: f"the standby to see the Lease held by the leader{_tails(standby)}",
    )
    return leader, standby


def _endpoint(name: str) -> dict:
    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "LLMEndpoint",
        "metadata": {"name": name},
        "spec": {"model": {"source": "hf://Qwen/Qwen2.5-7B-Instruct"}},
    }


def _wait_for_children(cluster: Cluster, namespace: str, name: str, *replicas: Replica) -> None:
    selector = f"{ENDPOINT_LABEL}={name}"

    def children() -> tuple[list[str], list[str]]:
        services = cluster.core.list_namespaced_service(namespace, label_selector=selector).items
        rayservices = cluster.custom.list_namespaced_custom_object(
            RAY_GROUP, RAY_VERSION, namespace, "rayservices", label_selector=selector
        )["items"]
        return [s.metadata.name for s in services], [r["metadata"]["name"] for r in rayservices]

    wait_until(
        lambda: all(children()),
        timeout=90,
        message=lambda: f"a Service and a RayService labelled {selector}; seen: {children()}{_tails(*replicas)}",
    )


def _answers_200(url: str) -> bool:
    with urllib.request.urlopen(url, timeout=5) as response:  # noqa: S310 - loopback only
        return bool(response.status == 200)


@pytest.fixture
def start_replica(cluster: Cluster, namespace: str, crd: None, tmp_path: Path) -> Iterator[Callable[[], Replica]]:
    """Starts `llmep operator --leader-elect` watching `namespace`, as the chart's ServiceAccount
    with only the chart's RBAC (which names the Lease); every replica is stopped afterwards."""
    release = f"op-{secrets.token_hex(3)}"
    account, rbac = operator_identity(
        cluster.bin_dir,
        release,
        namespace,
        f"watchNamespaces={{{namespace}}}",
        f"operator.leaderElection.leaseName={LEASE}",
    )
    cluster.apply(rbac)
    token = cluster.token_for(account, namespace)
    kubeconfig = cluster.kubeconfig_for_token(token, tmp_path / "kubeconfig", account)
    started: list[Replica] = []

    def start() -> Replica:
        liveness = f"http://127.0.0.1:{free_port()}/healthz"
        argv = [sys.executable, "-m", "llmep_serving.cli", "operator", "--namespace", namespace]
        argv += ["--leader-elect", "--lease-name", LEASE, "--lease-namespace", namespace, "--liveness", liveness]
        env = {"KUBECONFIG": str(kubeconfig), "PYTHONUNBUFFERED": "1"}
        replica = Replica(spawn(argv, tmp_path / f"replica-{len(started)}.log", env), liveness)
        started.append(replica)
        return replica

    try:
        yield start
    finally:
        for replica in started:
            replica.process.terminate(timeout=20)
        for obj in rbac:
            if obj["kind"].startswith("Cluster"):
                with contextlib.suppress(AssertionError):
                    cluster.kubectl("delete", obj["kind"].lower(), obj["metadata"]["name"], "--ignore-not-found")
    for replica in started:
        assert "Traceback" not in replica.log(), _tails(replica)


def test_of_two_replicas_only_the_lease_holder_reconciles_while_the_standby_waits_alive(
    cluster, namespace, start_replica
):
    a, b = start_replica(), start_replica()
    leader, standby = _leader_and_standby(cluster, namespace, a, b)
    wait_http(standby.liveness, timeout=30, proc=standby.process.proc)

    cluster.apply(_endpoint("first"), namespace)
    _wait_for_children(cluster, namespace, "first", leader, standby)

    assert _lease(cluster, namespace).spec.holder_identity == leader.identity
    assert standby.process.proc.poll() is None, _tails(standby)
    assert _answers_200(standby.liveness)
    standby_log = standby.log()
    assert f"waiting to become leader of {namespace}/{LEASE} as {standby.identity}" in standby_log
    assert "became leader" not in standby_log
    # kopf never ran in the standby: no line from any of its loggers.
    assert " kopf." not in standby_log, _tails(standby)
    assert " kopf." in leader.log(), _tails(leader)


def test_standby_takes_the_lease_within_its_duration_after_the_leader_is_killed_and_reconciles(
    cluster, namespace, start_replica
):
    a, b = start_replica(), start_replica()
    leader, standby = _leader_and_standby(cluster, namespace, a, b)
    # Killed while it reconciles, not in the moment between its election and kopf's start.
    cluster.apply(_endpoint("before"), namespace)
    _wait_for_children(cluster, namespace, "before", leader, standby)

    killed = time.monotonic()
    leader.process.kill()
    wait_until(
        lambda: _lease(cluster, namespace).spec.holder_identity == standby.identity,
        timeout=LEASE_DURATION_SECONDS + RETRY_PERIOD_SECONDS + 30,
        interval=0.2,
        message=lambda: f"the standby to take the Lease{_tails(standby)}",
    )
    takeover = time.monotonic() - killed
    print(f"takeover after SIGKILL of the leader: {takeover:.1f}s (lease duration {LEASE_DURATION_SECONDS}s)")
    # The standby waits a full lease duration from the last renewal it saw, which is at most
    # about one renew deadline old: never sooner, and at most one poll later.
    assert LEASE_DURATION_SECONDS - RENEW_DEADLINE_SECONDS <= takeover, takeover
    assert takeover <= LEASE_DURATION_SECONDS + RETRY_PERIOD_SECONDS + SLACK_SECONDS, takeover
    assert leader.process.proc.returncode == -9

    started = time.monotonic()
    cluster.apply(_endpoint("after"), namespace)
    _wait_for_children(cluster, namespace, "after", standby)
    print(f"new leader: endpoint created -> children in {time.monotonic() - started:.1f}s")
    # Its liveness endpoint is kopf's now, on the same URL.
    wait_http(standby.liveness, timeout=30, proc=standby.process.proc)


def test_a_leader_whose_lease_another_holder_takes_exits_nonzero_without_taking_it_back(
    cluster, namespace, start_replica
):
    leader = start_replica()
    wait_until(
        lambda: (
            _lease(cluster, namespace).spec.holder_identity == leader.identity
            and f"became leader as {leader.identity}" in leader.log()
        ),
        timeout=60,
        message=lambda: f"the only replica to become leader{_tails(leader)}",
    )
    # Another holder, as a second operator deployment with the same Lease would write it.
    now = datetime.datetime.now(datetime.UTC)
    far = now + datetime.timedelta(hours=1)
    intruder = {
        "holderIdentity": "intruder",
        "acquireTime": now.strftime("%Y-%m-%dT%H:%M:%S.%fZ"),
        "renewTime": far.strftime("%Y-%m-%dT%H:%M:%S.%fZ"),
    }
    k8s.CoordinationV1Api(cluster.api).patch_namespaced_lease(LEASE, namespace, {"spec": intruder})
    taken = time.monotonic()

    # It retries for one renew deadline after its last renewal, each retry period.
    limit = RENEW_DEADLINE_SECONDS + 2 * RETRY_PERIOD_SECONDS + SLACK_SECONDS
    wait_until(
        lambda: leader.process.proc.poll() is not None,
        timeout=limit + 30,
        interval=0.2,
        message=lambda: f"the leader to exit once its Lease was taken{_tails(leader)}",
    )
    exited = time.monotonic() - taken
    returncode = leader.process.proc.returncode
    print(f"leader exited {exited:.1f}s after its Lease was taken, with status {returncode}")
    assert returncode == 1, _tails(leader)
    assert exited <= limit, exited
    assert "lost the leader lease" in leader.log()
    assert _lease(cluster, namespace).spec.holder_identity == "intruder"
