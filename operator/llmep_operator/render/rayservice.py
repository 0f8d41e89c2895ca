"""The KubeRay RayService: a CPU head, a GPU worker group from the resource profile, the Ray
autoscaler on, and the serveConfigV2 from serve_config."""

from __future__ import annotations

from typing import Any

from llmep_operator import naming
from llmep_operator.api import LLMEndpoint
from llmep_operator.render.fill_job import fill_job
from llmep_operator.render.network_policy import network_policy_for
from llmep_operator.render.plan import ServingPlan, make_plan, quantity_times
from llmep_operator.render.security import (
    SCRATCH_MOUNTS,
    container_security_context,
    pod_security_context,
    scratch_volumes,
)
from llmep_operator.render.serve_config import render_serve_config, serve_config_for
from llmep_operator.settings import OperatorSettings


def owner_reference(endpoint: LLMEndpoint, uid: str) -> dict[str, Any]:
    return {
        "apiVersion": endpoint.api_version,
        "kind": endpoint.kind,
        "name": endpoint.metadata.name,
        "uid": uid,
        "controller": True,
        "blockOwnerDeletion": True,
    }


def _metadata(plan: ServingPlan, name: str, owner_uid: str | None) -> dict[str, Any]:
    meta: dict[str, Any] = {"name": name, "namespace": plan.namespace, "labels": naming.labels(plan.name)}
    if owner_uid:
        meta["ownerReferences"] = [owner_reference(plan.endpoint, owner_uid)]
    return meta


def _container(
    plan: ServingPlan,
    name: str,
    image: str,
    resources: dict[str, Any],
    ports: list[dict[str, Any]] | None = None,
    *,
    secrets: bool,
) -> dict[str, Any]:
    mounts = [*SCRATCH_MOUNTS, *plan.volume_mounts]
    container: dict[str, Any] = {
        "name": name,
        "image": image,
        "resources": resources,
        "securityContext": container_security_context(),
        "volumeMounts": mounts,
    }
    env = [
        *plan.env,
        *(plan.secret_env if secrets else []),
        *({"name": name, "value": value} for name, value in plan.ray_env.items()),
    ]
    if env:
        container["env"] = env
    if secrets and plan.secret_env_from:
        container["envFrom"] = list(plan.secret_env_from)
    if ports:
        container["ports"] = ports
    return container


def _pod_template(
    plan: ServingPlan,
    settings: OperatorSettings,
    container: dict[str, Any],
    node_selector: dict[str, Any],
    tolerations: list[dict[str, Any]],
    *,
    api_token: bool,
) -> dict[str, Any]:
    memory = container["resources"]["requests"]["memory"]
    spec: dict[str, Any] = {
        "securityContext": pod_security_context(),
        "containers": [container],
        "volumes": [*scratch_volumes(settings.scratch, memory), *plan.volumes],
    }
    if not api_token:
        spec["automountServiceAccountToken"] = False
    if node_selector:
        spec["nodeSelector"] = dict(node_selector)
    if tolerations:
        spec["tolerations"] = tolerations
    return {"metadata": {"labels": naming.labels(plan.name)}, "spec": spec}


def _requests_and_limits(resources: dict[str, str], cpu_limits: bool) -> dict[str, Any]:
    limits = dict(resources) if cpu_limits else {k: v for k, v in resources.items() if k != "cpu"}
    return {"requests": dict(resources), "limits": limits}


def _ray_container_resources(resources: dict[str, str], settings: OperatorSettings) -> dict[str, Any]:
    """A Ray container's requests and limits, plus the scratch space its emptyDirs may use."""
    scheduled = _requests_and_limits(resources, settings.cpu_limits)
    scheduled["requests"]["ephemeral-storage"] = settings.scratch.ephemeral_storage_request
    return scheduled


def _head_group(plan: ServingPlan, settings: OperatorSettings) -> dict[str, Any]:
    resources = {"cpu": settings.head_cpu, "memory": settings.head_memory}
    ports = [
        {"name": "gcs-server", "containerPort": 6379},
        {"name": "dashboard", "containerPort": 8265},
        {"name": "client", "containerPort": 10001},
        {"name": "serve", "containerPort": settings.serve_port},
    ]
    image = settings.head_image or plan.image
    resources = _ray_container_resources(resources, settings)
    container = _container(plan, "ray-head", image, resources, ports, secrets=False)
    return {
        # The head schedules no replicas: GPU work goes to workers, which the autoscaler adds.
        "rayStartParams": {"dashboard-host": "0.0.0.0", "num-cpus": "0"},  # noqa: S104 - inside the pod
        # The head keeps a token: its autoscaler sidecar scales workers through KubeRay's own
        # ServiceAccount for this cluster (never the namespace's default one).
        "template": _pod_template(plan, settings, container, settings.head_node_selector, [], api_token=True),
    }


def _worker_resources(plan: ServingPlan, settings: OperatorSettings) -> dict[str, Any]:
    profile = plan.profile
    units = max(plan.gpus_per_worker, 1)
    resources = {
        "cpu": quantity_times(profile.cpu_per_gpu, units),
        "memory": quantity_times(profile.memory_per_gpu, units),
    }
    if plan.gpus_per_worker:
        resources[profile.gpu_resource] = str(plan.gpus_per_worker)
    return _ray_container_resources(resources, settings)


def _worker_group(plan: ServingPlan, settings: OperatorSettings) -> dict[str, Any]:
    profile = plan.profile
    container = _container(plan, "ray-worker", plan.image, _worker_resources(plan, settings), secrets=True)
    tolerations = [t.model_dump(exclude_none=True) for t in profile.tolerations]
    return {
        "groupName": naming.WORKER_GROUP,
        "replicas": plan.min_workers,
        "minReplicas": plan.min_workers,
        "maxReplicas": plan.max_workers,
        "numOfHosts": 1,
        "rayStartParams": {"num-cpus": str(profile.ray_num_cpus)} if profile.ray_num_cpus else {},
        # Workers run the engines and the model's code: no Kubernetes credentials at all.
        "template": _pod_template(plan, settings, container, profile.node_selector, tolerations, api_token=False),
    }


def build_rayservice(endpoint: LLMEndpoint, settings: OperatorSettings, owner_uid: str | None = None) -> dict[str, Any]:
    return _rayservice(make_plan(endpoint, settings), settings, owner_uid)


def _rayservice(plan: ServingPlan, settings: OperatorSettings, owner_uid: str | None) -> dict[str, Any]:
    serve_config = serve_config_for(plan, settings)
    return {
        "apiVersion": naming.RAY_API_VERSION,
        "kind": "RayService",
        "metadata": _metadata(plan, naming.rayservice_name(plan.name), owner_uid),
        "spec": {
            "serveConfigV2": render_serve_config(serve_config),
            "rayClusterConfig": {
                "rayVersion": settings.ray_version,
                "enableInTreeAutoscaling": True,
                "autoscalerOptions": {
                    "upscalingMode": "Default",
                    "idleTimeoutSeconds": settings.autoscaler_idle_timeout_seconds,
                    "securityContext": container_security_context(),
                    "resources": _requests_and_limits(
                        {"cpu": settings.autoscaler_cpu, "memory": settings.autoscaler_memory}, settings.cpu_limits
                    ),
                },
                "headGroupSpec": _head_group(plan, settings),
                "workerGroupSpecs": [_worker_group(plan, settings)],
            },
        },
    }


def build_serve_service(
    endpoint: LLMEndpoint, settings: OperatorSettings, owner_uid: str | None = None
) -> dict[str, Any]:
    """`<name>-serve`: Serve's HTTP proxies of this endpoint, across RayCluster upgrades."""
    return _serve_service(make_plan(endpoint, settings), settings, owner_uid)


def _serve_service(plan: ServingPlan, settings: OperatorSettings, owner_uid: str | None) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": _metadata(plan, naming.serve_service_name(plan.name), owner_uid),
        "spec": {
            "type": "ClusterIP",
            "selector": {naming.ENDPOINT_LABEL: plan.name, naming.SERVE_LABEL: "true"},
            "ports": [
                {"name": "http", "port": settings.serve_port, "targetPort": settings.serve_port, "protocol": "TCP"}
            ],
        },
    }


def build_cache_pvc(
    endpoint: LLMEndpoint, settings: OperatorSettings, owner_uid: str | None = None
) -> dict[str, Any] | None:
    return _cache_pvc(make_plan(endpoint, settings), owner_uid)


def _cache_pvc(plan: ServingPlan, owner_uid: str | None) -> dict[str, Any] | None:
    cache = plan.endpoint.spec.cache
    if not cache.enabled:
        return None
    spec: dict[str, Any] = {
        "accessModes": ["ReadWriteMany"],
        "resources": {"requests": {"storage": cache.size}},
    }
    if cache.storage_class_name:
        spec["storageClassName"] = cache.storage_class_name
    return {
        "apiVersion": "v1",
        "kind": "PersistentVolumeClaim",
        "metadata": _metadata(plan, naming.cache_pvc_name(plan.name), owner_uid),
        "spec": spec,
    }


def build_children(
    endpoint: LLMEndpoint, settings: OperatorSettings, owner_uid: str | None = None
) -> list[dict[str, Any]]:
    """Every object the operator applies for one endpoint, in apply order."""
    return children_for(make_plan(endpoint, settings), settings, owner_uid)


def children_for(plan: ServingPlan, settings: OperatorSettings, owner_uid: str | None = None) -> list[dict[str, Any]]:
    """build_children for a plan already made (the reconciler has one): the plan is made once."""
    pvc = _cache_pvc(plan, owner_uid)
    policy = network_policy_for(plan, settings, _metadata(plan, naming.network_policy_name(plan.name), owner_uid))
    fill = plan.fill and fill_job(plan, plan.fill, settings, _metadata(plan, plan.fill.job_name, owner_uid))
    return [
        *([policy] if policy else []),  # before the pods exist, so they are never reachable unguarded
        *([pvc] if pvc else []),
        *([fill] if fill else []),  # the reconciler applies the RayService once it has succeeded
        _rayservice(plan, settings, owner_uid),
        _serve_service(plan, settings, owner_uid),
    ]
