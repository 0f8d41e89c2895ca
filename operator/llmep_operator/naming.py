"""Label keys, annotation keys and child names: the one place they are derived."""

from __future__ import annotations

from llmep_operator.api.models import GROUP
from llmep_operator.errors import InvalidSpec

ENDPOINT_LABEL = f"{GROUP}/endpoint"
MANAGED_BY_LABEL = "app.kubernetes.io/managed-by"
MANAGED_BY = "llmep-operator"
COMPONENT_LABEL = "app.kubernetes.io/component"
# KubeRay's RayService and RayCluster.
RAY_GROUP, RAY_VERSION = "ray.io", "v1"
RAY_API_VERSION = f"{RAY_GROUP}/{RAY_VERSION}"
SERVE_LABEL = "ray.io/serve"  # KubeRay marks pods whose Serve proxy is healthy
WORKER_GROUP = "workers"
APP_NAME = "llm"


class NameTooLong(InvalidSpec):
    """A child's name would pass Kubernetes' 63-character limit: the endpoint's name is too long."""


def _checked(name: str) -> str:
    if len(name) > 63:
        raise NameTooLong(f"child name {name!r} is longer than 63 characters")
    return name


def rayservice_name(endpoint: str) -> str:
    return _checked(endpoint)


def serve_service_name(endpoint: str) -> str:
    return _checked(f"{endpoint}-serve")


def cache_pvc_name(endpoint: str) -> str:
    return _checked(f"{endpoint}-weights")


def longest_child_name(endpoint: str) -> str:
    """KubeRay names the RayCluster `<rayservice>-xxxxx` and its head Service `<cluster>-head-svc`."""
    return f"{endpoint}-xxxxx-head-svc"


def labels(endpoint: str) -> dict[str, str]:
    return {ENDPOINT_LABEL: endpoint, MANAGED_BY_LABEL: MANAGED_BY}


def service_url(endpoint: str, namespace: str, domain: str, port: int) -> str:
    return f"http://{serve_service_name(endpoint)}.{namespace}.{domain}:{port}/v1"


def network_policy_name(endpoint: str) -> str:
    return _checked(f"{endpoint}-ray")
