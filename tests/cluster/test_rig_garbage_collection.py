"""The controller-manager's garbage collector removes children whose owner is gone.

The operator relies on ownerReferences (LLMEndpoint -> RayService, Services, ...) instead of
deleting children itself, so the rig has to collect garbage like a real cluster.
"""

from __future__ import annotations

import pytest
from kubernetes import client as k8s
from kubernetes.client.rest import ApiException

pytestmark = pytest.mark.cluster


def gone(read) -> bool:
    try:
        read()
    except ApiException as e:
        if e.status == 404:
            return True
        raise
    return False


def test_deleting_an_owner_configmap_deletes_the_configmap_it_owns(cluster, namespace):
    owner = cluster.core.create_namespaced_config_map(namespace, k8s.V1ConfigMap(
        metadata=k8s.V1ObjectMeta(name="owner"), data={"role": "owner"}))
    cluster.core.create_namespaced_config_map(namespace, k8s.V1ConfigMap(
        metadata=k8s.V1ObjectMeta(name="child", owner_references=[k8s.V1OwnerReference(
            api_version="v1", kind="ConfigMap", name="owner", uid=owner.metadata.uid)]),
        data={"role": "child"}))
    cluster.core.create_namespaced_config_map(namespace, k8s.V1ConfigMap(
        metadata=k8s.V1ObjectMeta(name="bystander"), data={"role": "unowned"}))

    cluster.core.delete_namespaced_config_map("owner", namespace)

    cluster.wait_until(
        lambda: gone(lambda: cluster.core.read_namespaced_config_map("child", namespace)),
        timeout=60, message="the garbage collector to delete ConfigMap child")
    assert cluster.core.read_namespaced_config_map("bystander", namespace).data == {
        "role": "unowned"}


def test_deleting_a_deployment_deletes_its_replicasets_and_pods(cluster, namespace):
    cluster.apply({
        "apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "web"},
        "spec": {
            "replicas": 2,
            "selector": {"matchLabels": {"app": "web"}},
            "template": {"metadata": {"labels": {"app": "web"}}, "spec": {"containers": [
                {"name": "web", "image": "registry.invalid/web:1",
                 "resources": {"requests": {"cpu": "50m"}}}]}},
        },
    }, namespace)
    cluster.wait_until(
        lambda: cluster.apps.read_namespaced_deployment("web", namespace)
        .status.available_replicas == 2,
        timeout=90, message="Deployment web to have 2 available replicas")
    replica_sets = cluster.apps.list_namespaced_replica_set(namespace, label_selector="app=web")
    assert len(replica_sets.items) == 1
    assert replica_sets.items[0].metadata.owner_references[0].kind == "Deployment"
    pods = cluster.core.list_namespaced_pod(namespace, label_selector="app=web").items
    assert len(pods) == 2
    assert {p.metadata.owner_references[0].name for p in pods} == {
        replica_sets.items[0].metadata.name}

    cluster.apps.delete_namespaced_deployment(
        "web", namespace, body=k8s.V1DeleteOptions(propagation_policy="Background"))

    cluster.wait_until(
        lambda: not cluster.apps.list_namespaced_replica_set(
            namespace, label_selector="app=web").items,
        timeout=60, message="the ReplicaSet of Deployment web to be garbage-collected")
    cluster.wait_until(
        lambda: not cluster.core.list_namespaced_pod(namespace, label_selector="app=web").items,
        timeout=60, message="the pods of Deployment web to be deleted")


def test_foreground_deletion_keeps_the_owner_until_its_children_are_gone(cluster, namespace):
    owner = cluster.core.create_namespaced_config_map(namespace, k8s.V1ConfigMap(
        metadata=k8s.V1ObjectMeta(name="owner")))
    cluster.core.create_namespaced_config_map(namespace, k8s.V1ConfigMap(
        metadata=k8s.V1ObjectMeta(name="child", owner_references=[k8s.V1OwnerReference(
            api_version="v1", kind="ConfigMap", name="owner", uid=owner.metadata.uid,
            block_owner_deletion=True)])))

    cluster.core.delete_namespaced_config_map(
        "owner", namespace, body=k8s.V1DeleteOptions(propagation_policy="Foreground"))

    cluster.wait_until(
        lambda: gone(lambda: cluster.core.read_namespaced_config_map("owner", namespace)),
        timeout=60, message="the owner to be deleted after its child")
    assert gone(lambda: cluster.core.read_namespaced_config_map("child", namespace))
