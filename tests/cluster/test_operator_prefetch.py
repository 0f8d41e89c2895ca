"""cache.prefetch on the rig (real API server, Job and PV controllers, kwok), the operator running
as the chart's ServiceAccount:

- the fill Job comes first, running `llmep fetch`'s program into the cache volume, and no RayService
  exists while it has not succeeded; status says DownloadingWeights meanwhile;
- once the cache claim can bind (a PersistentVolume appears), kwok runs the fill pod to
  completion, the Job controller marks the Job Complete, and the RayService follows;
- a fill whose pod ended with a termination message, and whose Job is then marked Failed (the
  Job controller would take three tries and their back-off), makes the endpoint BackendFailed
  with that message, and no RayService is created.
"""

from __future__ import annotations

import contextlib
from datetime import UTC, datetime

import pytest
from kubernetes import client as k8s
from kubernetes.client.rest import ApiException

from llmep_operator.api import GROUP, PLURAL, VERSION
from llmep_operator.render.fill_job import FETCH_PROGRAM
from tests.cluster.conftest import wait_until

pytestmark = pytest.mark.cluster

SOURCE = "s3://models/qwen"
WEIGHTS_ROOT = "/home/ray/.cache/huggingface/llmep-weights/"
FAILED = "bucket 'models' does not exist (s3://models/qwen): check spec.model.source"


@pytest.fixture
def operator(chart_operator):
    return chart_operator(drift_check_seconds=600)


@pytest.fixture
def batch(cluster) -> k8s.BatchV1Api:
    return k8s.BatchV1Api(cluster.api)


def _endpoint(name: str, storage_class: str) -> dict:
    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "LLMEndpoint",
        "metadata": {"name": name},
        "spec": {
            "model": {"source": SOURCE},
            "storageSecretRef": {"name": "s3-credentials"},
            # A class no provisioner serves: the claim binds only to the volume a test makes.
            "cache": {"enabled": True, "prefetch": True, "size": "1Gi", "storageClassName": storage_class},
            "autoscaling": {"minReplicas": 0, "maxReplicas": 1},
        },
    }


def _get(cluster, namespace: str, name: str) -> dict:
    return cluster.custom.get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name)


def _ready(obj: dict) -> tuple[str, str, str]:
    ready = next((c for c in (obj.get("status") or {}).get("conditions", []) if c["type"] == "Ready"), {})
    return ready.get("status", ""), ready.get("reason", ""), ready.get("message", "")


def _wait_for_reason(cluster, namespace: str, name: str, reason: str, timeout: float = 90.0) -> dict:
    return wait_until(
        lambda: (obj := _get(cluster, namespace, name)) and _ready(obj)[1] == reason and obj,
        timeout=timeout,
        message=lambda: f"Ready reason {reason} on {name}; Ready is {_ready(_get(cluster, namespace, name))}",
    )


def _rayservice_exists(cluster, namespace: str, name: str) -> bool:
    try:
        cluster.custom.get_namespaced_custom_object("ray.io", "v1", namespace, "rayservices", name)
    except ApiException as error:
        if error.status == 404:
            return False
        raise
    return True


def _fill_job(batch, namespace: str, name: str) -> k8s.V1Job:
    selector = f"llmep.io/endpoint={name},app.kubernetes.io/component=weights-fill"
    return wait_until(
        lambda: next(iter(batch.list_namespaced_job(namespace, label_selector=selector).items), None),
        timeout=60,
        message=f"the fill Job of {name}",
    )


@contextlib.contextmanager
def _volume(cluster, name: str, storage_class: str):
    """A PersistentVolume of the class, so the cache claim can bind (nothing is mounted: kwok)."""
    volume = k8s.V1PersistentVolume(
        metadata=k8s.V1ObjectMeta(name=name),
        spec=k8s.V1PersistentVolumeSpec(
            capacity={"storage": "2Gi"},
            access_modes=["ReadWriteMany"],
            storage_class_name=storage_class,
            host_path=k8s.V1HostPathVolumeSource(path="/nonexistent"),
        ),
    )
    cluster.core.create_persistent_volume(volume)
    try:
        yield
    finally:
        with contextlib.suppress(ApiException):
            cluster.core.delete_persistent_volume(name)


def test_the_rayservice_follows_the_fill_jobs_success(cluster, namespace, operator, batch):
    storage_class = f"fill-{namespace}"
    with operator():
        cluster.apply(_endpoint("prefetched", storage_class), namespace)
        job = _fill_job(batch, namespace, "prefetched")
        (container,) = job.spec.template.spec.containers
        # llmep fetch's program, run by the serving image's python (no llmep needed there).
        assert container.command[:4] == ["python", "-c", FETCH_PROGRAM, SOURCE]
        assert container.command[4].startswith(WEIGHTS_ROOT) and len(container.command) == 5
        assert container.env_from[0].secret_ref.name == "s3-credentials"

        # The claim cannot bind, so the fill pod waits: the endpoint says so, and no RayService exists.
        obj = _wait_for_reason(cluster, namespace, "prefetched", "DownloadingWeights")
        status, _, message = _ready(obj)
        assert status == "False" and message.startswith("downloading weights into the cache: "), message
        assert not _rayservice_exists(cluster, namespace, "prefetched")
        assert cluster.core.read_namespaced_service("prefetched-serve", namespace)  # applied at once

        with _volume(cluster, f"{namespace}-cache", storage_class):
            wait_until(
                lambda: _rayservice_exists(cluster, namespace, "prefetched"),
                timeout=120,
                message=lambda: (
                    "the RayService once the fill Job completed; Job conditions: "
                    f"{batch.read_namespaced_job(job.metadata.name, namespace).status.conditions}"
                ),
            )
            conditions = batch.read_namespaced_job(job.metadata.name, namespace).status.conditions or []
            assert any(c.type == "Complete" and c.status == "True" for c in conditions)
            _wait_for_reason(cluster, namespace, "prefetched", "Deploying")


def test_a_failed_fill_is_backend_failed_with_the_pods_message_and_no_rayservice(cluster, namespace, operator, batch):
    with operator():
        cluster.apply(_endpoint("unfilled", f"fill-{namespace}"), namespace)
        job = _fill_job(batch, namespace, "unfilled")
        pod = wait_until(
            lambda: next(
                iter(cluster.core.list_namespaced_pod(namespace, label_selector=f"job-name={job.metadata.name}").items),
                None,
            ),
            timeout=60,
            message="the fill pod",
        )
        now = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        # What the kubelet writes when `llmep fetch` exits 1 after writing /dev/termination-log.
        terminated = {"exitCode": 1, "reason": "Error", "message": FAILED, "startedAt": now, "finishedAt": now}
        cluster.core.patch_namespaced_pod_status(
            pod.metadata.name,
            namespace,
            {
                "status": {
                    "phase": "Failed",
                    "containerStatuses": [
                        {
                            "name": "fill",
                            "image": job.spec.template.spec.containers[0].image,
                            "imageID": "",
                            "ready": False,
                            "restartCount": 0,
                            "state": {"terminated": terminated},
                        }
                    ],
                }
            },
        )
        failed = {
            "status": "True",
            "reason": "BackoffLimitExceeded",
            "message": "Job has reached the specified backoff limit",
        }
        stamps = {"lastTransitionTime": now, "lastProbeTime": now}
        conditions = [{"type": kind, **failed, **stamps} for kind in ("FailureTarget", "Failed")]
        # Accepted once the Job controller has counted the failed pod (no active pod left).
        wait_until(
            lambda: batch.patch_namespaced_job_status(
                job.metadata.name, namespace, {"status": {"active": 0, "conditions": conditions}}
            ),
            timeout=30,
            message="the fill Job marked Failed",
        )

        obj = _wait_for_reason(cluster, namespace, "unfilled", "BackendFailed")
        assert _ready(obj) == ("False", "BackendFailed", f"filling the cache failed: {FAILED}")
        degraded = next(c for c in obj["status"]["conditions"] if c["type"] == "Degraded")
        assert (degraded["status"], degraded["message"]) == ("True", f"filling the cache failed: {FAILED}")
        assert not _rayservice_exists(cluster, namespace, "unfilled")
        table = cluster.kubectl("get", "llmep", "unfilled", "-n", namespace)
        assert "BackendFailed" in table, table
