"""cache.prefetch in a pass, against the stand-in API server: the fill Job comes first and the
RayService only once it has succeeded; while it runs, status carries the progress its pod logged
(one log read a pass, nothing else); after it failed, nothing more is applied and status says
why; a new source is a new Job, and the Job of the old one is deleted."""

from __future__ import annotations

import copy
import json
from collections.abc import Iterator

import pytest
from kubernetes import client

from llmep_operator.kube import BoundedApiClient, Kube
from llmep_operator.observed import Seen, slim_child, slim_pod
from llmep_operator.reconcile import Reconciler
from llmep_operator.settings import ApiTimeouts, OperatorSettings
from llmep_operator.status import look_again_in
from tests.unit.stand_in_api import stand_in_api
from tests.unit.test_reconciler_passes import RAYSERVICE, SERVICE, STATUS, Cluster

pytestmark = pytest.mark.unit
BODY = {
    "apiVersion": "llmep.io/v1alpha1",
    "kind": "LLMEndpoint",
    "metadata": {"name": "qwen", "namespace": "team-a", "generation": 1, "resourceVersion": "7", "uid": "u-1"},
    "spec": {
        "model": {"source": "s3://models/qwen"},
        "storageSecretRef": {"name": "s3-credentials"},
        "cache": {"enabled": True, "prefetch": True},
        "resources": {"profile": "cpu"},
    },
}
PVC = "/api/v1/namespaces/team-a/persistentvolumeclaims/qwen-weights"
JOBS = "/apis/batch/v1/namespaces/team-a/jobs/"
PROGRESS = {"phase": "downloading", "message": "12.3 of 140.0 GiB, 310 MiB/s, about 7 min"}
FAILED = "bucket 'models' does not exist (s3://models/qwen): check spec.model.source"


class FillCluster(Cluster):
    """The stand-in of test_reconciler_passes, with Jobs kept by name (an old and a new one may
    both exist), DELETE, and a fill pod's log."""

    def __init__(self) -> None:
        super().__init__()
        self.jobs: dict[str, dict] = {}
        self.watched_jobs: dict[str, dict] = {}
        self.log = ""

    def answer(self, method: str, path: str, sent: bytes) -> tuple[int, str, bytes]:
        if path.split("?")[0].endswith("/log"):
            self.requests.append((method, path.split("?")[0]))
            return 200, "text/plain", self.log.encode()
        if method == "DELETE":
            self.requests.append((method, path))
            self.jobs.pop(path.rsplit("/", 1)[-1], None)
            return 200, "application/json", b'{"kind": "Status", "status": "Success"}'
        answered = super().answer(method, path, sent)
        job = self.stored.pop("Job", None)
        if job:
            self.jobs[job["metadata"]["name"]] = job
        return answered

    def deliver(self) -> None:
        super().deliver()
        self.watched_jobs = copy.deepcopy(self.jobs)

    def look(self, namespace: str, name: str) -> Seen:
        seen = super().look(namespace, name)
        return Seen(seen.children, seen.pods, [slim_child(job) for job in self.watched_jobs.values()])

    def fill_ends(self, condition: str, container_state: dict) -> None:
        """The Job controller's and the kubelet's doing, stored and shown by the watches."""
        (job,) = self.jobs.values()
        job["status"] = {"conditions": [{"type": condition, "status": "True"}]}
        job["metadata"]["resourceVersion"] = "900"
        self.pods = [fill_pod(job["metadata"]["name"], container_state)]
        self.deliver()


def fill_pod(job_name: str, state: dict) -> dict:
    labels = {
        "llmep.io/endpoint": "qwen",
        "app.kubernetes.io/component": "weights-fill",
        "batch.kubernetes.io/job-name": job_name,
    }
    return slim_pod(
        {
            "metadata": {"name": f"{job_name}-x7k2p", "labels": labels},
            "status": {"containerStatuses": [{"name": "fill", "state": state}]},
        }
    )


@pytest.fixture
def cluster() -> Iterator[tuple[FillCluster, Reconciler]]:
    cluster = FillCluster()
    with stand_in_api(cluster.answer) as url:
        configuration = client.Configuration()
        configuration.host = url
        kube = Kube("llmep-operator", BoundedApiClient(configuration, ApiTimeouts()))
        yield cluster, Reconciler(kube, OperatorSettings(), cluster.look)


def _body(**spec) -> dict:
    body = copy.deepcopy(BODY)
    body["spec"].update(spec)
    return body


def _ready(status: dict) -> tuple[str, str, str]:
    ready = next(c for c in status["conditions"] if c["type"] == "Ready")
    return ready["status"], ready["reason"], ready["message"]


def test_the_job_comes_first_progress_moves_in_status_and_the_rayservice_follows_its_success(cluster):
    stand_in, reconciler = cluster
    written = reconciler.reconcile(_body())
    calls = stand_in.calls()
    (job_name,) = stand_in.jobs
    assert [c for c in calls if c[0] == "PATCH" and c[1] != STATUS] == [
        ("PATCH", PVC),
        ("PATCH", JOBS + job_name),
        ("PATCH", SERVICE),  # the Service may come at once: it selects no pod yet
    ]
    assert _ready(written)[:2] == ("False", "DownloadingWeights")
    assert look_again_in(written) == 5.0  # only the log moves now: the pass comes again

    stand_in.deliver()
    stand_in.pods = [fill_pod(job_name, {"running": {"startedAt": "2026-01-01T00:00:00Z"}})]
    stand_in.log = json.dumps({**PROGRESS, "message": "1.0 of 140.0 GiB"}) + "\n" + json.dumps(PROGRESS) + "\n"
    written = reconciler.reconcile(_body())
    assert stand_in.calls() == [("GET", f"/api/v1/namespaces/team-a/pods/{job_name}-x7k2p/log"), ("PATCH", STATUS)]
    assert _ready(written) == (
        "False",
        "DownloadingWeights",
        "downloading weights into the cache: 12.3 of 140.0 GiB, 310 MiB/s, about 7 min",
    )

    stand_in.fill_ends("Complete", {"terminated": {"exitCode": 0, "reason": "Completed"}})
    written = reconciler.reconcile(_body())
    assert ("PATCH", RAYSERVICE) in stand_in.calls()
    assert _ready(written)[1] != "DownloadingWeights" and look_again_in(written) is None


def test_a_failed_fill_applies_nothing_more_and_says_why(cluster):
    stand_in, reconciler = cluster
    reconciler.reconcile(_body())
    stand_in.deliver()
    stand_in.fill_ends("Failed", {"terminated": {"exitCode": 1, "reason": "Error", "message": FAILED}})
    written = reconciler.reconcile(_body())
    assert ("PATCH", RAYSERVICE) not in stand_in.calls()
    assert "RayService" not in stand_in.stored
    assert _ready(written) == ("False", "BackendFailed", f"filling the cache failed: {FAILED}")
    degraded = next(c for c in written["conditions"] if c["type"] == "Degraded")
    assert (degraded["status"], degraded["message"]) == ("True", f"filling the cache failed: {FAILED}")
    assert look_again_in(written) is None
    reconciler.reconcile(_body())  # the drift timer, a pod event: still nothing
    assert stand_in.calls() == []


def test_a_new_source_is_a_new_job_and_the_old_one_is_deleted(cluster):
    stand_in, reconciler = cluster
    reconciler.reconcile(_body())
    stand_in.deliver()
    (old,) = stand_in.jobs
    stand_in.calls()
    newer = _body(model={"source": "s3://models/qwen-v2"})
    newer["metadata"]["generation"] = 2
    reconciler.reconcile(newer)
    calls = stand_in.calls()
    (new,) = stand_in.jobs
    assert new != old
    assert ("DELETE", JOBS + old) in calls and ("PATCH", JOBS + new) in calls
    assert ("PATCH", RAYSERVICE) not in calls


def test_turning_prefetch_off_deletes_the_job_and_applies_the_rayservice(cluster):
    stand_in, reconciler = cluster
    reconciler.reconcile(_body())
    stand_in.deliver()
    (old,) = stand_in.jobs
    stand_in.calls()
    plain = _body(cache={"enabled": True})
    plain["metadata"]["generation"] = 2
    reconciler.reconcile(plain)
    calls = stand_in.calls()
    assert ("DELETE", JOBS + old) in calls and ("PATCH", RAYSERVICE) in calls


def test_a_spec_that_changes_an_unfinished_jobs_template_replaces_the_job(cluster):
    """A Job's template is immutable: naming another Secret (the fix for a missing one) makes the
    operator delete the waiting Job and create it again once it is gone."""
    stand_in, reconciler = cluster
    reconciler.reconcile(_body())
    stand_in.deliver()
    (name,) = stand_in.jobs
    stand_in.calls()
    fixed = _body(storageSecretRef={"name": "other-credentials"})
    fixed["metadata"]["generation"] = 2
    reconciler.reconcile(fixed)
    assert ("DELETE", JOBS + name) in stand_in.calls()
    stand_in.deliver()  # its DELETED event
    reconciler.reconcile(fixed)
    assert ("PATCH", JOBS + name) in stand_in.calls()
    env_from = stand_in.jobs[name]["spec"]["template"]["spec"]["containers"][0]["envFrom"]
    assert env_from == [{"secretRef": {"name": "other-credentials"}}]


def test_a_finished_fill_is_left_alone_when_its_template_changes(cluster):
    stand_in, reconciler = cluster
    reconciler.reconcile(_body())
    stand_in.deliver()
    stand_in.fill_ends("Complete", {"terminated": {"exitCode": 0, "reason": "Completed"}})
    reconciler.reconcile(_body())
    stand_in.deliver()
    stand_in.calls()
    changed = _body(storageSecretRef={"name": "other-credentials"})
    changed["metadata"]["generation"] = 2
    reconciler.reconcile(changed)
    assert [c for c in stand_in.calls() if c[1].startswith(JOBS)] == []
