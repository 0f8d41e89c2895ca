"""Status reasons and self-healing of the operator on the rig (real API server, controller-manager,
KubeRay, kwok), the operator running as the chart's ServiceAccount:

- `Deploying`: the RayService exists, the Ray cluster does not serve yet and no worker is up;
- `Reconciling`: the RayService is gone and the operator cannot create it again (here a
  ResourceQuota of the namespace refuses it, as a real quota would);
- a name at the limit is served; one past it is refused at admission naming metadata.name and 40;
- a deleted child (the `<name>-serve` Service, the RayService) is re-created from its DELETED
  event, well before the drift check (set to 600 s here, so only the event path can do it).
"""

from __future__ import annotations

import time

import pytest
from kubernetes import client as k8s
from kubernetes.client.rest import ApiException

from llmep_operator.api import GROUP, PLURAL, VERSION
from tests.cluster.conftest import wait_until

pytestmark = pytest.mark.cluster

DRIFT_CHECK_SECONDS = 600
# A re-created child must be back well before the drift check could have done it.
RECREATE_WITHIN_SECONDS = 10


@pytest.fixture
def operator(chart_operator):
    """The operator as the chart's ServiceAccount, with a drift check too slow to matter."""
    return chart_operator(drift_check_seconds=DRIFT_CHECK_SECONDS)


def _endpoint(name: str, **spec) -> dict:
    body = {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "LLMEndpoint",
        "metadata": {"name": name},
        # minReplicas 0: no GPU worker is asked for, so nothing moves the endpoint past Deploying.
        "spec": {
            "model": {"source": "hf://Qwen/Qwen2.5-7B-Instruct"},
            "autoscaling": {"minReplicas": 0, "maxReplicas": 1},
        },
    }
    body["spec"].update(spec)
    return body


def _get(cluster, namespace, name):
    return cluster.custom.get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name)


def _conditions(obj) -> dict[str, dict]:
    return {c["type"]: c for c in (obj.get("status") or {}).get("conditions", [])}


def _summary(obj) -> dict[str, tuple[str, str, str]]:
    return {t: (c["status"], c["reason"], c["message"]) for t, c in _conditions(obj).items()}


def _wait_for_reason(cluster, namespace, name, reason, timeout=90.0) -> dict:
    def reached():
        obj = _get(cluster, namespace, name)
        ready = _conditions(obj).get("Ready")
        return obj if ready and ready["reason"] == reason else None

    return wait_until(
        reached,
        timeout=timeout,
        message=lambda: f"Ready reason {reason} on {name}; conditions: {_summary(_get(cluster, namespace, name))}",
    )


def _rayservice(cluster, namespace, name):
    return cluster.custom.get_namespaced_custom_object("ray.io", "v1", namespace, "rayservices", name)


def _pods(cluster, namespace, name):
    return cluster.core.list_namespaced_pod(namespace, label_selector=f"llmep.io/endpoint={name}").items


def test_deploying_while_the_ray_cluster_does_not_serve_yet(cluster, namespace, operator):
    with operator():
        cluster.apply(_endpoint("deploy"), namespace)
        obj = _wait_for_reason(cluster, namespace, "deploy", "Deploying")
        # The head pod comes up on a simulated node; nothing there answers as Ray Serve, so the
        # endpoint stays Deploying (it is never LoadingModel: minReplicas 0 asks for no worker).
        wait_until(lambda: _pods(cluster, namespace, "deploy"), timeout=120, message="the head pod of deploy")
        obj = _get(cluster, namespace, "deploy")
        summary = _summary(obj)
        message = "waiting for the Ray cluster to start"
        assert summary["Ready"] == ("False", "Deploying", message), summary
        assert summary["Progressing"] == ("True", "Deploying", message)
        assert summary["Degraded"] == ("False", "AsExpected", "")
        assert obj["status"]["observedGeneration"] == obj["metadata"]["generation"]
        assert obj["status"]["rayService"] == "deploy"
        event = cluster.wait_for_event(namespace, "LLMEndpoint", "deploy", "Deploying")
        assert event.type == "Normal"
        table = cluster.kubectl("get", "llmep", "deploy", "-n", namespace)
        assert "Deploying" in table, table


def test_reconciling_while_the_rayservice_cannot_be_created_again(cluster, namespace, operator):
    with operator() as runner:
        cluster.apply(_endpoint("recon"), namespace)
        _wait_for_reason(cluster, namespace, "recon", "Deploying")
        wait_until(lambda: _pods(cluster, namespace, "recon"), timeout=120, message="the head pod of recon")
        # A quota of no RayServices: the one that exists stays, a new one is refused.
        quota = k8s.V1ResourceQuota(
            metadata=k8s.V1ObjectMeta(name="no-rayservices"),
            spec=k8s.V1ResourceQuotaSpec(hard={"count/rayservices.ray.io": "0"}),
        )
        cluster.core.create_namespaced_resource_quota(namespace, quota)
        wait_until(
            lambda: (cluster.core.read_namespaced_resource_quota("no-rayservices", namespace).status.hard or {}),
            timeout=60,
            message="the quota controller to fill in the quota's status",
        )
        cluster.custom.delete_namespaced_custom_object("ray.io", "v1", namespace, "rayservices", "recon")

        # Its RayCluster and pods go; their events refresh the status, which finds no RayService.
        obj = _wait_for_reason(cluster, namespace, "recon", "Reconciling", timeout=120)
        summary = _summary(obj)
        assert summary["Ready"] == ("False", "Reconciling", "creating the RayService"), summary
        assert summary["Progressing"] == ("True", "Reconciling", "creating the RayService")
        assert summary["Degraded"] == ("False", "AsExpected", "")
        assert cluster.wait_for_event(namespace, "LLMEndpoint", "recon", "Reconciling").type == "Normal"
        with pytest.raises(ApiException) as missing:
            _rayservice(cluster, namespace, "recon")
        assert missing.value.status == 404

        # The quota lifted and the spec changed, the RayService is back and so is Deploying.
        cluster.core.delete_namespaced_resource_quota("no-rayservices", namespace)
        cluster.apply(_endpoint("recon", engine={"maxModelLen": 4096}), namespace)
        wait_until(lambda: _rayservice(cluster, namespace, "recon"), timeout=60, message="RayService recon again")
        _wait_for_reason(cluster, namespace, "recon", "Deploying")
    # What stopped it is in the operator's log, in the API server's words (the output is
    # complete once the operator stopped).
    assert "exceeded quota: no-rayservices" in runner.output, runner.output[-3000:]


def test_a_name_past_the_limit_is_refused_naming_metadata_name_and_40(cluster, namespace, crd):
    with pytest.raises(ApiException) as refused:
        cluster.custom.create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, _endpoint("a" * 41))
    assert refused.value.status == 422, refused.value.body
    assert "metadata.name must be at most 40 characters so every child name fits in 63" in refused.value.body


def test_a_name_at_the_limit_gets_every_child_including_kuberays(cluster, namespace, operator):
    name = "e" * 40
    with operator():
        cluster.apply(_endpoint(name), namespace)
        _wait_for_reason(cluster, namespace, name, "Deploying")
        assert cluster.core.read_namespaced_service(f"{name}-serve", namespace)
        # KubeRay names the RayCluster `<name>-xxxxx` and its head Service `<cluster>-head-svc`.
        head = wait_until(
            lambda: [
                s
                for s in cluster.core.list_namespaced_service(namespace).items
                if s.metadata.name.startswith(f"{name}-") and s.metadata.name.endswith("-head-svc")
            ],
            timeout=120,
            message=lambda: "KubeRay's head Service; services: "
            + str([s.metadata.name for s in cluster.core.list_namespaced_service(namespace).items]),
        )
        assert len(head[0].metadata.name) <= 63


def _recreated(read, old_uid: str):
    def check():
        try:
            obj = read()
        except ApiException as error:
            if error.status == 404:
                return None
            raise
        uid = obj["metadata"]["uid"] if isinstance(obj, dict) else obj.metadata.uid
        return uid if uid != old_uid else None

    return check


@pytest.mark.parametrize("child", ["Service", "RayService"])
def test_a_deleted_child_is_recreated_from_its_event_not_the_drift_check(cluster, namespace, operator, child):
    name = "heal"
    if child == "Service":

        def read():
            return cluster.core.read_namespaced_service(f"{name}-serve", namespace)

        def delete():
            cluster.core.delete_namespaced_service(f"{name}-serve", namespace)
    else:

        def read():
            return _rayservice(cluster, namespace, name)

        def delete():
            cluster.custom.delete_namespaced_custom_object("ray.io", "v1", namespace, "rayservices", name)

    with operator():
        cluster.apply(_endpoint(name), namespace)
        _wait_for_reason(cluster, namespace, name, "Deploying")
        first = read()
        old_uid = first["metadata"]["uid"] if isinstance(first, dict) else first.metadata.uid
        started = time.monotonic()
        delete()
        new_uid = wait_until(
            _recreated(read, old_uid),
            timeout=RECREATE_WITHIN_SECONDS,
            interval=0.1,
            message=f"the deleted {child} to be re-created (drift check: every {DRIFT_CHECK_SECONDS}s)",
        )
        elapsed = time.monotonic() - started
        assert new_uid != old_uid
        assert elapsed < RECREATE_WITHIN_SECONDS
        again = read()
        labels = again["metadata"]["labels"] if isinstance(again, dict) else again.metadata.labels
        owners = again["metadata"]["ownerReferences"] if isinstance(again, dict) else again.metadata.owner_references
        assert labels["llmep.io/endpoint"] == name
        owner = owners[0]
        assert (owner["kind"] if isinstance(owner, dict) else owner.kind) == "LLMEndpoint"
    # After the runner: while it runs, kopf's CliRunner holds this process's stdout.
    print(f"{child} re-created {elapsed:.2f}s after its deletion (drift check every {DRIFT_CHECK_SECONDS}s)")
