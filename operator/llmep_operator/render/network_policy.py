"""A NetworkPolicy per endpoint: the Ray pods take traffic only as llmep needs it.

Ray's ports (GCS, object store, dashboard and its job API, which runs code) answer only the
endpoint's own pods; the Serve port answers the gateway, KubeRay (its proxy health checks) and
the namespaces the spec names; the dashboard answers KubeRay too (it deploys the serve config).
"""

from __future__ import annotations

from typing import Any

from llmep_operator import naming
from llmep_operator.render.plan import ServingPlan
from llmep_operator.settings import OperatorSettings

DASHBOARD_PORT = 8265
DASHBOARD_AGENT_PORT = 52365
METRICS_PORT = 8080
NAMESPACE_NAME_LABEL = "kubernetes.io/metadata.name"


def _namespace(name: str) -> dict[str, Any]:
    return {"matchLabels": {NAMESPACE_NAME_LABEL: name}} if name else {}


def _tcp(*ports: int) -> list[dict[str, Any]]:
    return [{"port": port, "protocol": "TCP"} for port in ports]


def network_policy_for(
    plan: ServingPlan, settings: OperatorSettings, metadata: dict[str, Any]
) -> dict[str, Any] | None:
    config = settings.network_policy
    if not config.enabled:
        return None
    own_pods = {"matchLabels": {naming.ENDPOINT_LABEL: plan.name}}
    ingress: list[dict[str, Any]] = [
        {"from": [{"podSelector": own_pods}]},  # head <-> workers: every Ray port
        {
            "from": [
                {
                    "namespaceSelector": _namespace(config.gateway_namespace),
                    "podSelector": {"matchLabels": dict(config.gateway_pod_labels)},
                }
            ],
            "ports": _tcp(settings.serve_port),
        },
        {
            "from": [
                {
                    "namespaceSelector": _namespace(config.kuberay_namespace),
                    "podSelector": {"matchLabels": dict(config.kuberay_pod_labels)},
                }
            ],
            "ports": _tcp(settings.serve_port, DASHBOARD_PORT, DASHBOARD_AGENT_PORT),
        },
    ]
    allowed = plan.endpoint.spec.access.allowed_namespaces
    if allowed:
        ingress.append(
            {"from": [{"namespaceSelector": _namespace(ns)} for ns in allowed], "ports": _tcp(settings.serve_port)}
        )
    if config.metrics_from_anywhere:
        ingress.append({"from": [{"namespaceSelector": {}}], "ports": _tcp(METRICS_PORT)})
    return {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": metadata,
        "spec": {"podSelector": own_pods, "policyTypes": ["Ingress"], "ingress": ingress},
    }
