"""RBAC is enforced, so an operator run under its ServiceAccount fails on missing rights.

Also proves `kopf_runner_as`: an operator started with it acts with the ServiceAccount's
token and nothing more.
"""

from __future__ import annotations

import logging
import threading

import kopf
import pytest
from kubernetes import client as k8s
from kubernetes.client.rest import ApiException

pytestmark = pytest.mark.cluster


def status_of(call) -> int:
    try:
        call()
    except ApiException as e:
        return e.status
    return 200


def make_service_account(cluster, namespace: str, name: str) -> None:
    cluster.core.create_namespaced_service_account(
        namespace, k8s.V1ServiceAccount(metadata=k8s.V1ObjectMeta(name=name)))


def grant(cluster, namespace: str, service_account: str, rules: list[dict]) -> None:
    name = f"{service_account}-rights"
    cluster.rbac.create_namespaced_role(namespace, {
        "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role",
        "metadata": {"name": name}, "rules": rules})
    cluster.rbac.create_namespaced_role_binding(namespace, {
        "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding",
        "metadata": {"name": name},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": name},
        "subjects": [{"kind": "ServiceAccount", "name": service_account,
                      "namespace": namespace}]})


def test_token_request_identity_is_the_service_account(cluster, namespace):
    make_service_account(cluster, namespace, "probe")
    api = cluster.client_as("probe", namespace)

    review = k8s.AuthenticationV1Api(api).create_self_subject_review(
        k8s.V1SelfSubjectReview())

    assert review.status.user_info.username == f"system:serviceaccount:{namespace}:probe"


def test_service_account_without_rights_is_denied_until_a_role_grants_them(cluster, namespace):
    make_service_account(cluster, namespace, "app")
    core_as_app = k8s.CoreV1Api(cluster.client_as("app", namespace))

    def list_pods() -> object:
        return core_as_app.list_namespaced_pod(namespace)

    def create_configmap(name: str):
        return lambda: core_as_app.create_namespaced_config_map(
            namespace, k8s.V1ConfigMap(metadata=k8s.V1ObjectMeta(name=name)))

    assert status_of(list_pods) == 403
    assert status_of(create_configmap("before")) == 403

    grant(cluster, namespace, "app", [
        {"apiGroups": [""], "resources": ["pods"], "verbs": ["get", "list"]},
        {"apiGroups": [""], "resources": ["configmaps"], "verbs": ["create"]},
    ])

    # The authorizer's RBAC cache follows the API by a watch: allow it a moment.
    cluster.wait_until(lambda: status_of(list_pods) == 200, timeout=30,
                       message="the RoleBinding to let the ServiceAccount list pods")
    assert status_of(create_configmap("after")) == 200
    assert cluster.core.read_namespaced_config_map("after", namespace).metadata.name == "after"
    # Granted in its namespace only, and only those verbs.
    assert status_of(lambda: core_as_app.list_namespaced_pod("kube-system")) == 403
    assert status_of(lambda: core_as_app.delete_namespaced_config_map("after", namespace)) == 403


# A throwaway operator for the kopf_runner_as test, in a registry of its own so that its
# handlers never run in other tests' operators.
probe_registry = kopf.OperatorRegistry()
# kopf puts its default login handlers in the default registry only.
kopf.on.login(registry=probe_registry)(kopf.login_via_client)
probe_seen: set[str] = set()
probe_lock = threading.Lock()


@kopf.on.create("configmaps", labels={"llmep-rig-probe": "yes"}, registry=probe_registry)
def _probe_handler(name: str, patch: kopf.Patch, **_: object) -> None:
    with probe_lock:
        probe_seen.add(name)
    patch.setdefault("data", {})["handled"] = "yes"


def test_kopf_runner_as_acts_with_the_service_accounts_rights_only(
        cluster, namespace, kopf_runner_as):
    make_service_account(cluster, namespace, "operator")
    # May watch and patch ConfigMap "allowed", but not "denied"; may post events.
    grant(cluster, namespace, "operator", [
        {"apiGroups": [""], "resources": ["configmaps"], "verbs": ["get", "list", "watch"]},
        {"apiGroups": [""], "resources": ["configmaps"], "verbs": ["patch"],
         "resourceNames": ["allowed"]},
        {"apiGroups": ["", "events.k8s.io"], "resources": ["events"],
         "verbs": ["create", "patch"]},
    ])
    # What kopf itself reads cluster-wide (CRDs, namespaces); without it kopf retries for
    # about a minute before falling back to the namespaces it was given.
    discovery = f"{namespace}-kopf"
    cluster.rbac.create_cluster_role({
        "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRole",
        "metadata": {"name": discovery},
        "rules": [{"apiGroups": ["apiextensions.k8s.io"],
                   "resources": ["customresourcedefinitions"], "verbs": ["list", "watch"]},
                  {"apiGroups": [""], "resources": ["namespaces"], "verbs": ["list", "watch"]}]})
    cluster.rbac.create_cluster_role_binding({
        "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRoleBinding",
        "metadata": {"name": discovery},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole",
                    "name": discovery},
        "subjects": [{"kind": "ServiceAccount", "name": "operator", "namespace": namespace}]})
    labels = {"llmep-rig-probe": "yes"}

    logs = KopfLogs()
    logging.getLogger("kopf").addHandler(logs)
    try:
        with kopf_runner_as("operator", namespace, registry=probe_registry):
            for name in ("allowed", "denied"):
                cluster.core.create_namespaced_config_map(namespace, k8s.V1ConfigMap(
                    metadata=k8s.V1ObjectMeta(name=name, labels=labels)))
            cluster.wait_until(
                lambda: (cluster.core.read_namespaced_config_map("allowed", namespace).data
                         or {}).get("handled") == "yes",
                timeout=60, message="the operator to patch ConfigMap allowed")
            # The handler ran for "denied" too, so the operator saw it; its patch was refused.
            cluster.wait_until(lambda: "denied" in probe_seen, timeout=60,
                               message="the operator's handler to run for ConfigMap denied")
            cluster.wait_until(lambda: logs.mentions("denied", "403"), timeout=60,
                               message=lambda: f"a 403 for denied in the operator's log: "
                                               f"{logs.text()[-2000:]}")
    finally:
        logging.getLogger("kopf").removeHandler(logs)
        cluster.rbac.delete_cluster_role_binding(discovery)
        cluster.rbac.delete_cluster_role(discovery)
    denied = cluster.core.read_namespaced_config_map("denied", namespace)
    assert "handled" not in (denied.data or {})


class KopfLogs(logging.Handler):
    """Collects kopf's log records while the operator runs in this process."""

    def __init__(self) -> None:
        super().__init__(level=logging.DEBUG)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        text = record.getMessage()
        if record.exc_info:
            text += " " + logging.Formatter().formatException(record.exc_info)
        with probe_lock:
            self.lines.append(text)

    def text(self) -> str:
        with probe_lock:
            return "\n".join(self.lines)

    def mentions(self, *words: str) -> bool:
        with probe_lock:
            return any(all(w in line for w in words) for line in self.lines)
