"""A standby whose leader election ends without it leading exits instead of waiting forever.

The election thread of the kubernetes client ends only on an error of its own, which no real
API server answer produces on cue (it retries every answer), so the election's run() is replaced
here by one that raises: a stand-in for that fault. The rig tests
(tests/cluster/test_operator_runner.py) cover the election itself with real replicas."""

from __future__ import annotations

import time

import pytest
from kubernetes import client
from kubernetes.leaderelection import leaderelection

from llmep_operator.runner import RETRY_PERIOD_SECONDS, _elect_leader

pytestmark = pytest.mark.unit


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")  # the fault itself
def test_a_standby_whose_election_thread_died_exits_1_within_a_retry_period(monkeypatch, caplog):
    def broken_run(self: leaderelection.LeaderElection) -> None:
        raise RuntimeError("the client's election loop failed")

    monkeypatch.setattr(leaderelection.LeaderElection, "run", broken_run)
    configuration = client.Configuration()
    configuration.host = "http://127.0.0.1:9"
    started = time.monotonic()
    with pytest.raises(SystemExit) as exited:
        _elect_leader("llmep-operator", "llmep-system", "standby-1", configuration)
    assert exited.value.code == 1
    assert time.monotonic() - started < 2 * RETRY_PERIOD_SECONDS + 1
    assert "the leader election of llmep-system/llmep-operator ended without this replica leading; exiting" in (
        caplog.messages
    )
