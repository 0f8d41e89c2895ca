"""The gateway's least-privilege identity for tests that run it against the API server: a
ServiceAccount whose Role reads LLMEndpoints and lists/watches Secrets in its namespace, and a
kubeconfig with its TokenRequest token."""

from __future__ import annotations

from pathlib import Path

from kubernetes import client as k8s

from llmep_operator.api import GROUP, PLURAL

NAME = "llmep-gateway"


def _role_binding(account_namespace: str) -> k8s.V1RoleBinding:
    return k8s.V1RoleBinding(
        metadata=k8s.V1ObjectMeta(name=NAME),
        role_ref=k8s.V1RoleRef(api_group="rbac.authorization.k8s.io", kind="Role", name=NAME),
        subjects=[k8s.RbacV1Subject(kind="ServiceAccount", name=NAME, namespace=account_namespace)],
    )


def gateway_identity(cluster, namespace: str, tmp_path: Path, endpoint_namespaces: tuple[str, ...] = ()) -> Path:
    """A ServiceAccount with the gateway's least-privilege Role; returns its kubeconfig.
    In each of `endpoint_namespaces` it may also read LLMEndpoints (as the chart grants)."""
    read_endpoints = k8s.V1PolicyRule(api_groups=[GROUP], resources=[PLURAL], verbs=["get", "list", "watch"])
    for ns in endpoint_namespaces:
        cluster.rbac.create_namespaced_role(
            ns, k8s.V1Role(metadata=k8s.V1ObjectMeta(name=NAME), rules=[read_endpoints])
        )
        cluster.rbac.create_namespaced_role_binding(ns, _role_binding(namespace))
    cluster.core.create_namespaced_service_account(
        namespace, k8s.V1ServiceAccount(metadata=k8s.V1ObjectMeta(name=NAME))
    )
    rules = [read_endpoints, k8s.V1PolicyRule(api_groups=[""], resources=["secrets"], verbs=["list", "watch"])]
    cluster.rbac.create_namespaced_role(namespace, k8s.V1Role(metadata=k8s.V1ObjectMeta(name=NAME), rules=rules))
    cluster.rbac.create_namespaced_role_binding(namespace, _role_binding(namespace))
    token = cluster.token_for(NAME, namespace)
    return cluster.kubeconfig_for_token(token, tmp_path / "gateway-kubeconfig", NAME)
