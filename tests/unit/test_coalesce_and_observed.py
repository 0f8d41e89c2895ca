"""The operator's per-endpoint passes coalesce, and its drift check compares from memory.

`Coalescer` is what the handlers hand every child, pod and drift-timer event to; `covers` is
how a drift check decides, without an API call, that a child as the watch shows it still holds
everything the operator rendered."""

from __future__ import annotations

import asyncio

import pytest

from llmep_operator.coalesce import Coalescer
from llmep_operator.observed import Seen, covers, slim, slim_child, slim_pod, whole
from tests.unit.gateway.conftest import until

pytestmark = pytest.mark.unit


def test_a_burst_of_requests_for_one_key_runs_the_work_once_after_it_settles():
    runs: list[str] = []

    async def work(key: str) -> None:
        runs.append(key)

    async def main() -> None:
        passes = Coalescer(work)
        for _ in range(50):
            passes.request("team-a/qwen", settle=0.05)
        passes.request("team-b/llama")
        await until(lambda: not passes.pending)

    asyncio.run(main())
    assert sorted(runs) == ["team-a/qwen", "team-b/llama"]


def test_requests_during_a_run_make_exactly_one_more_run_and_never_two_at_once():
    runs, overlapping = [], []
    started, release = asyncio.Event(), asyncio.Event()
    active: set[str] = set()

    async def work(key: str) -> None:
        if key in active:
            overlapping.append(key)
        active.add(key)
        runs.append(key)
        started.set()
        await release.wait()
        active.discard(key)

    async def main() -> None:
        passes = Coalescer(work)
        passes.request("k")
        await started.wait()
        for _ in range(10):  # changes announced while the first run is under way
            passes.request("k")
        release.set()
        await until(lambda: not passes.pending)

    asyncio.run(main())
    assert runs == ["k", "k"]
    assert overlapping == []


def test_a_retry_comes_after_its_delay_and_the_earliest_of_two_wins():
    runs: list[tuple[str, float]] = []

    async def work(key: str) -> None:
        runs.append((key, asyncio.get_running_loop().time()))

    async def main() -> float:
        passes = Coalescer(work)
        start = asyncio.get_running_loop().time()
        passes.request_later("k", 0.3)
        passes.request_later("k", 0.1)
        passes.request_later("k", 0.5)
        # Timers fire in deadline order: once this one has run, a kept 0.3 or 0.5 s timer would have too.
        passes.request_later("after-all", 0.6)
        await until(lambda: any(key == "after-all" for key, _ in runs))
        return start

    start = asyncio.run(main())
    k_runs = [at - start for key, at in runs if key == "k"]
    assert len(k_runs) == 1
    assert 0.1 <= k_runs[0] < 0.3


def test_a_failing_key_does_not_stop_the_others_and_at_most_limit_run_at_once():
    done: list[int] = []
    peak = 0
    running = 0

    async def main() -> None:
        release = asyncio.Event()  # runs hold their slot until the test has seen them pile up

        async def work(key: int) -> None:
            nonlocal peak, running
            running += 1
            peak = max(peak, running)
            await release.wait()
            running -= 1
            if key == 3:
                raise RuntimeError("boom")
            done.append(key)

        passes = Coalescer(work, limit=2)
        for key in range(8):
            passes.request(key)
        await until(lambda: running >= 2)  # every task has had its turn; only two got a slot
        release.set()
        await until(lambda: not passes.pending)

    asyncio.run(main())
    assert sorted(done) == [0, 1, 2, 4, 5, 6, 7]
    assert peak == 2


SERVICE = {
    "apiVersion": "v1",
    "kind": "Service",
    "metadata": {"name": "qwen-serve", "namespace": "a", "labels": {"llmep.io/endpoint": "qwen"}},
    "spec": {"type": "ClusterIP", "ports": [{"name": "http", "port": 8000, "targetPort": 8000}]},
}


def test_a_child_with_server_defaults_and_status_is_covered():
    live = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {**SERVICE["metadata"], "uid": "u", "resourceVersion": "9"},
        "spec": {
            "type": "ClusterIP",
            "clusterIP": "10.0.0.7",
            "ports": [{"name": "http", "port": 8000, "targetPort": 8000, "protocol": "TCP"}],
        },
        "status": {"loadBalancer": {}},
    }
    assert covers(live, SERVICE)


@pytest.mark.parametrize(
    "edit",
    [
        lambda o: o["spec"].update(type="NodePort"),  # a field the operator owns changed
        lambda o: o["spec"]["ports"].append({"name": "x", "port": 1}),  # a list grew
        lambda o: o["metadata"]["labels"].pop("llmep.io/endpoint"),  # a label went
        lambda o: o.pop("spec"),
    ],
    ids=["changed-value", "longer-list", "missing-label", "missing-spec"],
)
def test_a_child_someone_changed_is_not_covered(edit):
    live = {**SERVICE, "metadata": {**SERVICE["metadata"], "labels": dict(SERVICE["metadata"]["labels"])}}
    live["spec"] = {**SERVICE["spec"], "ports": [dict(p) for p in SERVICE["spec"]["ports"]]}
    edit(live)
    assert not covers(live, SERVICE)


def test_a_missing_child_is_not_covered():
    assert not covers(None, SERVICE)


def test_memory_keeps_what_the_reconciler_reads_and_drops_managed_fields():
    body = {
        "metadata": {"name": "p", "uid": "u", "managedFields": [{"manager": "kubelet"}], "labels": {"a": "b"}},
        "spec": {"containers": [{"name": "ray"}]},
        "status": {"conditions": [{"type": "Ready", "status": "True"}], "podIP": "10.0.0.1", "phase": "Running"},
    }
    kept = slim(body)
    assert isinstance(kept["bodyJSON"], str)
    assert whole(kept) == {
        "metadata": {"name": "p", "uid": "u", "labels": {"a": "b"}},
        "spec": {"containers": [{"name": "ray"}]},
        "status": body["status"],
    }
    assert slim_pod(body) == {
        "metadata": {"name": "p", "labels": {"a": "b"}},
        "status": {"conditions": [{"type": "Ready", "status": "True"}], "phase": "Running"},
    }


def test_a_child_kept_as_text_comes_back_whole_and_still_covers_what_was_rendered():
    live = {**SERVICE, "metadata": {**SERVICE["metadata"], "managedFields": [{"manager": "x"}], "resourceVersion": "3"}}
    kept = slim_child(live)
    assert isinstance(kept["bodyJSON"], str) and "managedFields" not in kept["metadata"]
    whole = Seen(children={"Service": kept}).child("Service")
    assert whole["spec"] == SERVICE["spec"] and whole["metadata"]["resourceVersion"] == "3"
    assert covers(whole, SERVICE)
    assert Seen().child("Service") is None
