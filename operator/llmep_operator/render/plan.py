"""The serving plan: what one LLMEndpoint needs from the cluster, derived once, checked once."""

from __future__ import annotations

from dataclasses import dataclass

from llmep_operator import naming
from llmep_operator.api import LLMEndpoint, SourceScheme, parse_source
from llmep_operator.errors import InvalidSpec
from llmep_operator.render.core_v1 import EnvFromSource, EnvVar, EnvVarSource, PvcVolume, VolumeMount
from llmep_operator.render.policy import check_policy
from llmep_operator.render.serving_path import ray_process_env
from llmep_operator.settings import OperatorSettings, ResourceProfile

MODEL_MOUNT_ROOT = "/mnt/models"
CACHE_MOUNT = "/home/ray/.cache/huggingface"
CACHE_VOLUME = "weights-cache"
# Prefetched weights, one folder per source and revision under it (`naming.weights_digest`).
WEIGHTS_ROOT = f"{CACHE_MOUNT}/llmep-weights"
HF_TOKEN_ENV = "HF_TOKEN"  # noqa: S105 - a variable name


@dataclass(frozen=True)
class ModelSource:
    """Where the engine finds the weights, and what the pods mount so that it can."""

    scheme: SourceScheme
    # A hub id (hf), a path inside the container (file, pvc, cached) or the bucket's whole URI (s3, gs).
    location: str
    volumes: tuple[PvcVolume, ...] = ()
    volume_mounts: tuple[VolumeMount, ...] = ()
    # The fill Job copied the weights of `scheme`'s source into `location` on the cache volume.
    cached: bool = False

    @property
    def is_local(self) -> bool:
        """The engine opens the weights from a path in its container: nothing needs the hub."""
        return self.cached or self.scheme.is_local

    @property
    def is_bucket(self) -> bool:
        return not self.cached and self.scheme.is_bucket


@dataclass(frozen=True)
class CacheFill:
    """cache.prefetch: a Job copies `source` (at `revision`) into `folder` on the cache volume
    with `llmep fetch`, and the RayService is applied once it has."""

    job_name: str
    source: str
    revision: str | None
    folder: str


@dataclass(frozen=True)
class ServingPlan:
    endpoint: LLMEndpoint
    profile_name: str
    profile: ResourceProfile
    image: str
    gpus_per_replica: int
    gpus_per_worker: int
    workers_per_replica: int
    model_source: ModelSource
    fill: CacheFill | None
    # The pods' own: the model's and the weights cache's.
    volumes: tuple[PvcVolume, ...]
    volume_mounts: tuple[VolumeMount, ...]
    env: tuple[EnvVar, ...]
    # Only on the workers: the replicas load the model there (the head runs none, num-cpus 0).
    secret_env: tuple[EnvVar, ...]
    # Also only on the workers: the object-store credentials Secret, whole, as environment.
    secret_env_from: tuple[EnvFromSource, ...]
    ray_env: dict[str, str]

    @property
    def name(self) -> str:
        return self.endpoint.metadata.name

    @property
    def namespace(self) -> str:
        return self.endpoint.metadata.namespace or "default"

    @property
    def min_workers(self) -> int:
        return self.endpoint.spec.autoscaling.min_replicas * self.workers_per_replica

    @property
    def max_workers(self) -> int:
        return self.endpoint.spec.autoscaling.max_replicas * self.workers_per_replica


def _split_gpus(name: str, profile: ResourceProfile, gpus: int) -> tuple[int, int]:
    """GPUs per worker pod and worker pods per replica."""
    if profile.is_cpu:
        return 0, 1
    if gpus <= profile.gpus_per_node:
        return gpus, 1
    if gpus % profile.gpus_per_node:
        raise InvalidSpec(
            f"engine.tensorParallelSize × engine.pipelineParallelSize = {gpus} GPUs per replica does "
            f"not split into whole nodes of profile {name!r} ({profile.gpus_per_node} GPUs each): "
            f"use a multiple of {profile.gpus_per_node}"
        )
    return profile.gpus_per_node, gpus // profile.gpus_per_node


def _cache_fill(endpoint: LLMEndpoint) -> CacheFill | None:
    model = endpoint.spec.model
    if not endpoint.spec.cache.prefetch:
        return None
    digest = naming.weights_digest(model.source, model.revision)
    return CacheFill(
        job_name=naming.fill_job_name(endpoint.metadata.name, digest),
        source=model.source,
        revision=model.revision,
        folder=f"{WEIGHTS_ROOT}/{digest}",
    )


def _model_source(endpoint: LLMEndpoint, fill: CacheFill | None) -> ModelSource:
    uri = parse_source(endpoint.spec.model.source)
    if fill is not None:
        return ModelSource(scheme=uri.scheme, location=fill.folder, cached=True)
    if uri.scheme is SourceScheme.PVC:
        claim, _, path = uri.path.partition("/")
        mount = f"{MODEL_MOUNT_ROOT}/{claim}"
        return ModelSource(
            scheme=uri.scheme,
            location=f"{mount}/{path}".rstrip("/"),
            volumes=({"name": "model-weights", "persistentVolumeClaim": {"claimName": claim, "readOnly": True}},),
            volume_mounts=({"name": "model-weights", "mountPath": mount, "readOnly": True},),
        )
    if uri.scheme.is_bucket:
        return ModelSource(scheme=uri.scheme, location=endpoint.spec.model.source)
    return ModelSource(scheme=uri.scheme, location=uri.path)  # hf://ORG/MODEL, file:///abs/path -> /abs/path


def _secret_env(endpoint: LLMEndpoint) -> tuple[EnvVar, ...]:
    ref = endpoint.spec.model.token_secret_ref
    if ref is None:
        return ()
    # The token reaches processes through the pod's environment; it is never inlined.
    value_from: EnvVarSource = {"secretKeyRef": {"name": ref.name, "key": ref.key}}
    return (
        {"name": HF_TOKEN_ENV, "valueFrom": value_from},
        {"name": "HUGGING_FACE_HUB_TOKEN", "valueFrom": value_from},
    )


def _secret_env_from(endpoint: LLMEndpoint) -> tuple[EnvFromSource, ...]:
    ref = endpoint.spec.storage_secret_ref
    # Object-store clients (boto3 and others) read their credentials from the environment.
    return () if ref is None else ({"secretRef": {"name": ref.name}},)


def cache_volume(endpoint_name: str) -> PvcVolume:
    return {"name": CACHE_VOLUME, "persistentVolumeClaim": {"claimName": naming.cache_pvc_name(endpoint_name)}}


def make_plan(endpoint: LLMEndpoint, settings: OperatorSettings) -> ServingPlan:
    check_policy(endpoint, settings)
    resources = endpoint.spec.resources
    profile = settings.profile(resources.profile_name)
    if profile is None:
        known = ", ".join(sorted({*settings.profiles, "default"}))
        raise InvalidSpec(
            f"spec.resources.profile {resources.profile_name!r} is not a profile of this operator; "
            f"known profiles: {known}"
        )
    profile_name = settings.default_profile if resources.profile_name == "default" else resources.profile_name
    gpus = endpoint.spec.engine.gpus_per_replica
    if profile.is_cpu and gpus > 1:
        raise InvalidSpec(
            f"profile {profile_name!r} has no GPUs, so engine.tensorParallelSize and "
            "engine.pipelineParallelSize must be 1"
        )
    gpus_per_worker, workers = _split_gpus(profile_name, profile, gpus)
    fill = _cache_fill(endpoint)
    source = _model_source(endpoint, fill)
    volumes = list(source.volumes)
    mounts = list(source.volume_mounts)
    env: list[EnvVar] = []
    if endpoint.spec.cache.enabled:
        volumes.append(cache_volume(endpoint.metadata.name))
        mounts.append({"name": CACHE_VOLUME, "mountPath": CACHE_MOUNT})
        env.append({"name": "HF_HOME", "value": CACHE_MOUNT})
    image = endpoint.spec.image or profile.image or settings.image
    return ServingPlan(
        endpoint=endpoint,
        profile_name=profile_name,
        profile=profile,
        image=image,
        gpus_per_replica=gpus,
        gpus_per_worker=gpus_per_worker,
        workers_per_replica=workers,
        model_source=source,
        fill=fill,
        volumes=tuple(volumes),
        volume_mounts=tuple(mounts),
        env=tuple(env),
        secret_env=_secret_env(endpoint),
        secret_env_from=_secret_env_from(endpoint),
        ray_env=ray_process_env(endpoint, settings),
    )


def quantity_times(quantity: str, factor: int) -> str:
    """'8' × 2 = '16', '64Gi' × 2 = '128Gi' (only the integer forms profiles use)."""
    digits = quantity.rstrip("KMGTPEikmgtpe")
    unit = quantity[len(digits) :]
    if not digits.isdigit():
        raise InvalidSpec(f"resource quantity {quantity!r} in a profile must be an integer with an optional unit")
    return f"{int(digits) * max(factor, 1)}{unit}"
