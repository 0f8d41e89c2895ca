"""Label keys, annotation keys and child names: the one place they are derived."""

from __future__ import annotations

import hashlib

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
FILL_COMPONENT = "weights-fill"  # the cache-fill Job and its pod
# The Job controller names a Job's pods `<job>-xxxxx`.
POD_SUFFIX = "-xxxxx"


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


def weights_digest(source: str, revision: str | None) -> str:
    """8 hex digits that tell one model's weights from another's: the fill Job's name and its
    folder on the cache volume carry them, so a changed source is a new Job (a Job's template
    is immutable) filling a folder of its own."""
    return hashlib.sha256(f"{source}@{revision or ''}".encode()).hexdigest()[:8]


def fill_job_name(endpoint: str, digest: str) -> str:
    name = f"{endpoint}-fill-{digest}"
    _checked(name + POD_SUFFIX)  # its pods' names, and the job-name label they carry
    return name


def longest_child_name(endpoint: str) -> str:
    """KubeRay names the RayCluster `<rayservice>-xxxxx` and its head Service `<cluster>-head-svc`."""
    return f"{endpoint}-xxxxx-head-svc"


def labels(endpoint: str) -> dict[str, str]:
    return {ENDPOINT_LABEL: endpoint, MANAGED_BY_LABEL: MANAGED_BY}


def service_url(endpoint: str, namespace: str, domain: str, port: int) -> str:
    return f"http://{serve_service_name(endpoint)}.{namespace}.{domain}:{port}/v1"


def network_policy_name(endpoint: str) -> str:
    return _checked(f"{endpoint}-ray")
