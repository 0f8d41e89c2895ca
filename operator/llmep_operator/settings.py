"""Operator settings: one validated object, loaded once at startup, rendered by the chart.

Sources, highest first: environment variables (LLMEP_*, nested with __), then the YAML file
named by LLMEP_CONFIG (the chart mounts one), then the defaults below.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict, YamlConfigSettingsSource

DEFAULT_RAY_IMAGE = "rayproject/ray-llm:2.60.0-py311-cu128"
DEFAULT_CPU_RAY_IMAGE = "ghcr.io/llmep/llmep-serving-cpu:0.1.0"
RAY_VERSION = "2.60.0"


class Toleration(BaseModel):
    model_config = ConfigDict(extra="forbid")

    key: str = Field(description="Taint key to tolerate.")
    operator: Literal["Exists", "Equal"] = Field(default="Exists", description="Exists or Equal.")
    value: str | None = Field(default=None, description="Taint value, with operator Equal.")
    effect: Literal["NoSchedule", "PreferNoSchedule", "NoExecute"] | None = Field(
        default=None, description="Taint effect; empty tolerates every effect."
    )


class ResourceProfile(BaseModel):
    """Where and how big one model replica's workers are."""

    model_config = ConfigDict(extra="forbid")

    gpus_per_node: int = Field(ge=0, description="Accelerators one node of this kind holds; 0 for a CPU-only profile.")
    gpu_resource: str = Field(default="nvidia.com/gpu", description="Extended resource name of the accelerator.")
    node_selector: dict[str, str] = Field(default_factory=dict, description="Labels a worker node must carry.")
    tolerations: list[Toleration] = Field(default_factory=list, description="Taints worker pods tolerate.")
    cpu_per_gpu: str = Field(
        default="8", description="CPU requested per GPU in a worker pod (per worker for CPU profiles)."
    )
    memory_per_gpu: str = Field(
        default="64Gi", description="Memory requested per GPU in a worker pod (per worker for CPU profiles)."
    )
    accelerator_type: str | None = Field(
        default=None, description="Ray accelerator_type (e.g. H100, L4), so replicas land on that GPU."
    )
    image: str | None = Field(default=None, description="Serving image for this profile; default: settings.image.")
    engine_defaults: dict[str, Any] = Field(
        default_factory=dict, description="vLLM engine kwargs applied unless the endpoint sets them."
    )
    env: dict[str, str] = Field(default_factory=dict, description="Environment for engine processes.")
    ray_num_cpus: int | None = Field(
        default=None,
        ge=1,
        description=(
            "Logical CPUs each worker offers Ray (rayStartParams num-cpus); default: KubeRay derives"
            " them from the CPU limit. A CPU replica holds about 2 (its actor and the engine bundle)"
            " and the OpenAI ingress 1 more, so set it where workers request a fraction of a core."
        ),
    )
    stream_batching_interval_ms: int | None = Field(
        default=None,
        ge=0,
        description="Ray Serve LLM stream batching interval; 0 sends each token as it is made.",
    )

    @property
    def is_cpu(self) -> bool:
        return self.gpus_per_node == 0


_TAINT = [Toleration(key="nvidia.com/gpu", operator="Exists", effect="NoSchedule")]
_PRODUCT = "nvidia.com/gpu.product"


def default_profiles() -> dict[str, ResourceProfile]:
    return {
        "nvidia-h100": ResourceProfile(
            gpus_per_node=8,
            node_selector={_PRODUCT: "NVIDIA-H100-80GB-HBM3"},
            tolerations=_TAINT,
            cpu_per_gpu="8",
            memory_per_gpu="64Gi",
            accelerator_type="H100",
        ),
        "nvidia-a100-80gb": ResourceProfile(
            gpus_per_node=8,
            node_selector={_PRODUCT: "NVIDIA-A100-SXM4-80GB"},
            tolerations=_TAINT,
            accelerator_type="A100-80G",
        ),
        "nvidia-l4": ResourceProfile(
            gpus_per_node=1,
            node_selector={_PRODUCT: "NVIDIA-L4"},
            tolerations=_TAINT,
            cpu_per_gpu="4",
            memory_per_gpu="16Gi",
            accelerator_type="L4",
        ),
        "gke-l4": ResourceProfile(
            gpus_per_node=1,
            node_selector={"cloud.google.com/gke-accelerator": "nvidia-l4"},
            tolerations=_TAINT,
            cpu_per_gpu="4",
            memory_per_gpu="16Gi",
            accelerator_type="L4",
        ),
        # vLLM's CPU build: what it needs lives here, not in a fork of the builders.
        "cpu": ResourceProfile(
            gpus_per_node=0,
            cpu_per_gpu="2",
            memory_per_gpu="8Gi",
            image=DEFAULT_CPU_RAY_IMAGE,
            # enforce_eager skips torch.compile warm-up (about 50 s per engine on 2 cores).
            engine_defaults={"dtype": "float32", "distributed_executor_backend": "mp", "enforce_eager": True},
            # The sampler's torch.compile needs a C++ compiler at run time, which the serving-cpu
            # image does not carry ("InvalidCxxCompiler" on the first sampled request).
            env={"VLLM_CPU_KVCACHE_SPACE": "1", "TORCH_COMPILE_DISABLE": "1"},
            stream_batching_interval_ms=0,
        ),
    }


class OperatorPolicy(BaseModel):
    """What the creator of an LLMEndpoint may choose, as the cluster admin allows it."""

    model_config = ConfigDict(extra="forbid")

    allowed_images: list[str] = Field(
        default_factory=list,
        description=(
            "Images (shell-style patterns, e.g. registry.example.com/ray-llm:*) an endpoint's"
            " spec.image may name. Empty: only the images these settings name (image, head_image,"
            " the profiles' images)."
        ),
    )
    refused_engine_args: list[str] = Field(
        default_factory=lambda: [
            "trust_remote_code",
            "worker_cls",
            "worker_extension_cls",
            "allowed_local_media_path",
            "hf_token",
        ],
        description=(
            "spec.engine.extraArgs keys refused: they run code from the model repository or"
            " load classes by name (trust_remote_code, worker_cls, worker_extension_cls), read"
            " the pod's files (allowed_local_media_path) or carry a credential. Remove one to allow it."
        ),
    )
    refused_env: list[str] = Field(
        default_factory=lambda: [
            *("LD_*", "PYTHON*", "VLLM_PLUGINS", "RAY_*"),
            *("HF_ENDPOINT", "HF_TOKEN", "HUGGING_FACE_*"),
        ],
        description=(
            "spec.engine.env names refused (shell-style patterns): they load code into the engine"
            " (LD_*, PYTHON*, VLLM_PLUGINS), change Ray itself (RAY_*), or send the model token"
            " elsewhere (HF_ENDPOINT). Remove one to allow it."
        ),
    )


# A Kubernetes storage quantity as the API server accepts it for sizeLimit and requests.
STORAGE_QUANTITY = r"^[0-9]+(Ki|Mi|Gi|Ti|Pi|k|M|G|T|P)?$"


class ScratchSpace(BaseModel):
    """The Ray pods' writable scratch volumes (emptyDirs on the node's disk), bounded so that no
    endpoint can fill a node's disk and get its neighbours evicted."""

    model_config = ConfigDict(extra="forbid")

    tmp_size_limit: str = Field(
        default="8Gi",
        pattern=STORAGE_QUANTITY, description="sizeLimit of /tmp: Ray's session folder (logs, spilled objects)."
    )
    cache_size_limit: str = Field(
        default="200Gi",
        pattern=STORAGE_QUANTITY,
        description=(
            "sizeLimit of ~/.cache: weights downloaded from the Hub land here when the endpoint has no"
            " spec.cache volume, so it must hold the largest such model."
        ),
    )
    ephemeral_storage_request: str = Field(
        default="2Gi",
        pattern=STORAGE_QUANTITY,
        description="ephemeral-storage request of each Ray container, so the scheduler counts the scratch space.",
    )


class EndpointNetworkPolicy(BaseModel):
    """A NetworkPolicy per endpoint: its Ray pods reachable only as llmep needs them."""

    model_config = ConfigDict(extra="forbid")

    enabled: bool = Field(
        default=False,
        description=(
            "Render a NetworkPolicy per endpoint: Ray's ports only between the endpoint's own pods,"
            " the Serve port from the gateway, KubeRay and the namespaces in spec.access, the"
            " dashboard from KubeRay. Needs a CNI that enforces NetworkPolicy. The chart sets it"
            " with networkPolicy.enabled."
        ),
    )
    gateway_namespace: str = Field(default="llmep-system", description="Namespace of the gateway pods.")
    gateway_pod_labels: dict[str, str] = Field(
        default_factory=lambda: {"app.kubernetes.io/component": "gateway"},
        description="Labels that select the gateway pods.",
    )
    kuberay_namespace: str = Field(
        default="", description="Namespace of the KubeRay operator; empty: any namespace."
    )
    kuberay_pod_labels: dict[str, str] = Field(
        default_factory=lambda: {"app.kubernetes.io/component": "kuberay-operator"},
        description="Labels that select the KubeRay operator pods.",
    )
    metrics_from_anywhere: bool = Field(
        default=True,
        description="Let any pod in the cluster scrape Ray's metrics port (8080), e.g. Prometheus.",
    )


class ApiTimeouts(BaseModel):
    """Client-side bounds on every call to the API server, so that a connection dropped without a
    FIN or RST (a node, NAT or load balancer that forgets it) cannot freeze the operator."""

    model_config = ConfigDict(extra="forbid")

    connect_seconds: float = Field(default=5.0, gt=0, description="Connecting to the API server, TLS included.")
    request_seconds: float = Field(
        default=30.0,
        gt=0,
        description=(
            "One API call (get, apply, status, event, the leader Lease): the longest wait for its"
            " answer before it fails and is retried."
        ),
    )
    watch_seconds: int = Field(
        default=300,
        ge=10,
        description=(
            "How long the API server keeps one watch request open (timeoutSeconds); the operator gives"
            " up on it request_seconds later, and reconnects from the last resourceVersion."
        ),
    )
    watch_inactivity_seconds: float = Field(
        default=70.0,
        gt=0,
        description=(
            "A watch that brings no event for this long is restarted: the API server sends a bookmark"
            " every minute, so silence means the connection is gone."
        ),
    )


class OperatorSettings(BaseSettings):
    """Everything the operator needs to know besides the LLMEndpoints themselves."""

    model_config = SettingsConfigDict(env_prefix="LLMEP_", env_nested_delimiter="__", extra="forbid")

    profiles: dict[str, ResourceProfile] = Field(
        default_factory=default_profiles, description="Named resource profiles."
    )
    default_profile: str = Field(default="nvidia-l4", description="Profile used when an endpoint says `default`.")
    image: str = Field(default=DEFAULT_RAY_IMAGE, description="Default image for the Ray head and GPU workers.")
    head_image: str | None = Field(default=None, description="Image for the Ray head; default: the workers' image.")
    ray_version: str = Field(default=RAY_VERSION, description="Ray version inside the images (KubeRay's rayVersion).")
    head_cpu: str = Field(default="2", description="CPU of the Ray head pod.")
    head_memory: str = Field(default="8Gi", description="Memory of the Ray head pod.")
    autoscaler_cpu: str = Field(default="500m", description="CPU of the Ray autoscaler sidecar in the head pod.")
    autoscaler_memory: str = Field(
        default="512Mi", description="Memory of the Ray autoscaler sidecar in the head pod."
    )
    fill_cpu: str = Field(
        default="1",
        description=(
            "CPU request of the cache-fill Job's pod (cache.prefetch; it has no CPU limit, so a copy"
            " still uses idle cores). Lower it on a small node (kind, a laptop)."
        ),
    )
    cpu_limits: bool = Field(
        default=True,
        description=(
            "CPU limits equal to the requests on Ray pods (Guaranteed QoS with the memory limits)."
            " Off: CPU requests only, so pods on a small node (kind, a laptop) may use every idle core."
        ),
    )
    head_node_selector: dict[str, str] = Field(default_factory=dict, description="Labels for the Ray head's node.")
    namespaces: list[str] = Field(
        default_factory=list, description="Namespaces to watch; empty watches the whole cluster."
    )
    gateway_service: str = Field(default="llmep-gateway", description="Service name of the gateway.")
    field_manager: str = Field(default="llmep-operator", description="Server-side apply field manager.")
    drift_check_seconds: float = Field(default=60.0, gt=0, description="How often children are re-applied.")
    api_timeouts: ApiTimeouts = Field(
        default_factory=ApiTimeouts, description="Client-side timeouts of API calls and watches."
    )
    autoscaler_idle_timeout_seconds: int = Field(
        default=300, ge=0, description="How long an idle GPU worker pod is kept before KubeRay removes it."
    )
    cluster_domain: str = Field(
        default="svc", description="Suffix of in-cluster service URLs (svc or svc.cluster.local)."
    )
    serve_port: int = Field(default=8000, description="Ray Serve's HTTP port.")
    network_policy: EndpointNetworkPolicy = Field(
        default_factory=EndpointNetworkPolicy, description="A NetworkPolicy per endpoint (off by default)."
    )
    policy: OperatorPolicy = Field(
        default_factory=OperatorPolicy, description="What endpoint specs may choose (images, engine args, env)."
    )
    scratch: ScratchSpace = Field(
        default_factory=ScratchSpace, description="Size limits of the Ray pods' scratch volumes."
    )
    serving_path: Literal["direct", "proxy"] = Field(
        default="direct",
        description=(
            "How requests reach vLLM inside the Ray cluster. direct: HAProxy on each Ray node sends"
            " every request straight to the replica serving vLLM's own HTTP app (Ray Serve's HAProxy"
            " ingress and direct streaming; Ray >= 2.60 images only). proxy: Serve's Python proxy and"
            " OpenAI ingress replica relay every token (slower; for older Ray images)."
        ),
    )
    haproxy_threads: int = Field(
        default=1,
        ge=1,
        le=64,
        description=(
            "HAProxy threads per Ray node on the direct path (RAY_SERVE_HAPROXY_NBTHREAD; Ray's own"
            " default is 4). One thread relays thousands of requests a second, far beyond what a"
            " node's engines answer, and leaves the cores to them."
        ),
    )

    @model_validator(mode="after")
    def _default_profile_exists(self) -> OperatorSettings:
        if self.default_profile not in self.profiles:
            raise ValueError(
                f"default_profile {self.default_profile!r} is not one of the profiles: "
                + ", ".join(sorted(self.profiles))
            )
        return self

    @property
    def configured_images(self) -> set[str]:
        """Every serving image these settings name: the default for spec.image's allowlist."""
        images = {self.image, *(p.image for p in self.profiles.values() if p.image)}
        return images | ({self.head_image} if self.head_image else set())

    def profile(self, name: str) -> ResourceProfile | None:
        return self.profiles.get(self.default_profile if name == "default" else name)

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        config_file = os.environ.get("LLMEP_CONFIG")
        if config_file:
            if not Path(config_file).is_file():
                raise FileNotFoundError(f"LLMEP_CONFIG names {config_file}, which is not a file")
            sources.append(YamlConfigSettingsSource(settings_cls, yaml_file=config_file))
        return tuple(sources)
