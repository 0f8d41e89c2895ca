"""The LLMEndpoint API: pydantic models that are the single source of the CRD.

Field names are snake_case in Python and camelCase on the wire (aliases), as Kubernetes users
expect. Every field carries a description: it becomes `kubectl explain` text. Rules that the API
server can enforce on its own are also written as CEL (`x-kubernetes-validations`), so a bad
manifest is refused at admission with the same message pydantic gives.
"""

from __future__ import annotations

import enum
import re
from collections.abc import Mapping
from datetime import datetime
from typing import Annotated, Any, Final, Literal, cast

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from pydantic.alias_generators import to_camel
from pydantic.config import JsonDict

from llmep_operator.api.sources import SourceScheme

GROUP = "llmep.io"
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"
KIND: Final = "LLMEndpoint"
PLURAL = "llmendpoints"
SINGULAR = "llmendpoint"
SHORT_NAMES = ["llmep"]

# Longest child name is "<name>-xxxxx-head-svc" (KubeRay's RayCluster suffix plus its Service
# suffix); 40 keeps that and every label value within 63 characters.
MAX_NAME_LENGTH = 40
NAME_PATTERN = r"^[a-z]([-a-z0-9]*[a-z0-9])?$"
ONGOING_PER_TARGET_DEPTH = 4  # maxOngoingRequests by default: headroom over Serve's autoscaling target

SOURCE_SCHEMES = tuple(scheme.value for scheme in SourceScheme)
SOURCE_PATTERN = r"^(hf|pvc|s3|gs)://[^\s/]+(/[^\s]*)?$|^file:///[^\s]*$"
SERVED_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._:/-]*$"
# '/' stays in the pattern so the refusal below, not a regex, is what a user reads.
NO_SLASH_MESSAGE = (
    "must not contain '/': the gateway reaches every endpoint as '<namespace>/<name>', so a '/' "
    "in a name could take another namespace's; use a name such as Llama-3.1-8B-Instruct"
)
PROFILE_PATTERN = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(:[1-9][0-9]*)?$"
QUANTITY_PATTERN = r"^[0-9]+(\.[0-9]+)?(Ki|Mi|Gi|Ti|Pi|K|M|G|T|P)?$"
SECRET_KEY_PATTERN = r"^[-._a-zA-Z0-9]+$"  # noqa: S105 - a pattern, not a secret
SECRET_NAME_PATTERN = r"^[a-z0-9]([-.a-z0-9]*[a-z0-9])?$"  # noqa: S105 - a pattern, not a secret
# The object stores Ray Serve LLM loads LoRA adapters from on their first request.
LORA_SOURCE_SCHEMES = ("s3", "gs", "abfss", "azure")
LORA_SOURCE_PATTERN = r"^(s3|gs|abfss|azure)://[^\s/]+(/[^\s]*)?$"
# No ':' (it separates base and adapter in '<servedName>:<adapter>') and no '/' (namespaces).
ADAPTER_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]*$"
# The ranks vLLM's max_lora_rank accepts.
LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
# The sources `llmep fetch` copies into the cache volume (cache.prefetch).
PREFETCH_SOURCES = ("hf://", "s3://")
PREFETCH_NEEDS_CACHE = (
    "cache.prefetch needs cache.enabled: true (the weights are copied into the cache volume): "
    "set spec.cache.enabled: true or drop spec.cache.prefetch"
)
PREFETCH_NEEDS_REMOTE_SOURCE = (
    "cache.prefetch needs an hf:// or s3:// spec.model.source (pvc:// and file:// weights are "
    "already local; gs:// is not fetched): drop spec.cache.prefetch or use an hf:// or s3:// source"
)
# Credentials that engine.env would write into the RayService in plain text.
CREDENTIAL_ENV = (
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "AZURE_STORAGE_KEY",
    "AZURE_STORAGE_SAS_TOKEN",
    "AZURE_STORAGE_CONNECTION_STRING",
    "AZURE_CLIENT_SECRET",
    "GOOGLE_APPLICATION_CREDENTIALS_JSON",
    "HF_TOKEN",
    "HUGGING_FACE_HUB_TOKEN",
)


def _cel(rule: str, message: str, field_path: str | None = None) -> JsonDict:
    entry: JsonDict = {"rule": rule, "message": message}
    if field_path:
        entry["fieldPath"] = field_path
    return entry


class ApiModel(BaseModel):
    """Base: camelCase on the wire, unknown fields refused, values checked on assignment."""

    model_config = ConfigDict(
        alias_generator=to_camel,
        populate_by_name=True,
        extra="forbid",
        validate_assignment=True,
    )


class SecretKeyRef(ApiModel):
    """A key in a Secret in the LLMEndpoint's namespace."""

    name: str = Field(
        min_length=1,
        max_length=253,
        pattern=SECRET_NAME_PATTERN,
        description="Name of the Secret, in the same namespace as the LLMEndpoint.",
    )
    key: str = Field(
        default="token",
        min_length=1,
        max_length=253,
        pattern=SECRET_KEY_PATTERN,
        description="Key inside the Secret whose value is used. Default: token.",
    )


class ModelSpec(ApiModel):
    """Which model to serve and under which names."""

    source: str = Field(
        min_length=6,
        max_length=1024,
        pattern=SOURCE_PATTERN,
        description=(
            "Where the weights come from: hf://ORG/MODEL (Hugging Face hub), "
            "pvc://CLAIM/PATH (a PersistentVolumeClaim in this namespace), s3://BUCKET/PATH, "
            "gs://BUCKET/PATH, or file:///ABSOLUTE/PATH (a path inside the serving image)."
        ),
    )
    revision: str | None = Field(
        default=None,
        max_length=128,
        pattern=r"^[A-Za-z0-9._/-]+$",
        description="Hugging Face revision (branch, tag or commit) for hf:// sources.",
    )
    served_name: str | None = Field(
        default=None,
        max_length=128,
        pattern=SERVED_NAME_PATTERN,
        description=(
            "Model id clients put in the request's `model` field and see in /v1/models; no '/'. "
            "Through the gateway it is also reachable as '<namespace>/<servedName>'. "
            "Default: the LLMEndpoint's metadata.name."
        ),
        json_schema_extra={"x-kubernetes-validations": [_cel("!self.contains('/')", f"servedName {NO_SLASH_MESSAGE}")]},
    )
    aliases: list[Annotated[str, Field(max_length=128, pattern=SERVED_NAME_PATTERN)]] = Field(
        default_factory=list,
        max_length=16,
        description=(
            "Extra model ids that route to this endpoint through the gateway, "
            "for example a stable name like chat-default; no '/'."
        ),
        json_schema_extra={
            "x-kubernetes-list-type": "set",
            "x-kubernetes-validations": [_cel("self.all(a, !a.contains('/'))", f"aliases {NO_SLASH_MESSAGE}")],
        },
    )
    token_secret_ref: SecretKeyRef | None = Field(
        default=None,
        description=(
            "Secret holding a Hugging Face (or object-store) token for gated models. "
            "It reaches the engine as an environment variable and is never written into "
            "the RayService."
        ),
    )

    @field_validator("source")
    @classmethod
    def _known_scheme(cls, value: str) -> str:
        scheme = value.split("://", 1)[0] if "://" in value else ""
        if scheme not in SOURCE_SCHEMES:
            raise ValueError(
                f"unsupported model source {value!r}: use one of "
                + ", ".join(f"{s}://" for s in SOURCE_SCHEMES)
                + " (for example hf://Qwen/Qwen2.5-7B-Instruct)"
            )
        if scheme == "file" and not value.startswith("file:///"):
            raise ValueError(f"file:// sources need an absolute path, e.g. file:///models/x; got {value!r}")
        if not re.fullmatch(SOURCE_PATTERN, value):
            raise ValueError(f"malformed model source {value!r}: expected {scheme}://BUCKET_OR_ORG/PATH without spaces")
        return value

    @field_validator("served_name")
    @classmethod
    def _served_name_has_no_slash(cls, value: str | None) -> str | None:
        if value is not None and "/" in value:
            raise ValueError(f"servedName {NO_SLASH_MESSAGE}")
        return value

    @field_validator("aliases")
    @classmethod
    def _unique_aliases(cls, value: list[str]) -> list[str]:
        if any("/" in alias for alias in value):
            raise ValueError(f"aliases {NO_SLASH_MESSAGE}")
        if len(set(value)) != len(value):
            raise ValueError("aliases must be unique")
        return value

    @model_validator(mode="after")
    def _alias_differs_from_name(self) -> ModelSpec:
        if self.served_name is not None and self.served_name in self.aliases:
            raise ValueError("aliases must not repeat servedName")
        return self


DType = Literal["auto", "float16", "bfloat16", "float32"]


TYPED_ENGINE_ARGS = (
    "max_model_len",
    "tensor_parallel_size",
    "pipeline_parallel_size",
    "dtype",
    "gpu_memory_utilization",
)


class EngineSpec(ApiModel):
    """vLLM engine settings; common ones typed, the rest passed through extraArgs."""

    model_config = ConfigDict(
        json_schema_extra={
            "x-kubernetes-validations": [
                _cel(
                    "!has(self.extraArgs) || !("
                    + " || ".join(f"has(self.extraArgs.{a})" for a in TYPED_ENGINE_ARGS)
                    + ")",
                    "engine.extraArgs must not set "
                    + ", ".join(TYPED_ENGINE_ARGS)
                    + ": use the typed fields (maxModelLen, tensorParallelSize, pipelineParallelSize, "
                    "dtype, gpuMemoryUtilization)",
                    ".extraArgs",
                )
            ]
        }
    )

    max_model_len: int | None = Field(
        default=None,
        ge=16,
        le=10_485_760,
        description="Longest context (prompt + output tokens) the engine accepts. Default: the model's own.",
    )
    tensor_parallel_size: int = Field(
        default=1,
        ge=1,
        le=64,
        description="GPUs a layer is split across (vLLM tensor_parallel_size).",
    )
    pipeline_parallel_size: int = Field(
        default=1,
        ge=1,
        le=64,
        description=(
            "Pipeline stages (vLLM pipeline_parallel_size). tensorParallelSize × "
            "pipelineParallelSize GPUs serve one replica; more than one node holds spans "
            "several GPU workers."
        ),
    )
    dtype: DType = Field(
        default="auto",
        description="Weight and activation dtype: auto, float16, bfloat16 or float32.",
    )
    gpu_memory_utilization: float | None = Field(
        default=None,
        gt=0,
        le=1,
        description="Fraction of each GPU's memory vLLM may use (0-1]. Default: vLLM's (0.9).",
    )
    extra_args: dict[str, Any] = Field(
        default_factory=dict,
        description=(
            "Further vLLM engine arguments, snake_case as in vLLM's EngineArgs "
            "(for example enable_prefix_caching: true). Passed through unchanged."
        ),
        # Free-form, but the typed engine settings are declared so a CEL rule can refuse them.
        json_schema_extra={
            "x-kubernetes-preserve-unknown-fields": True,
            "properties": {
                "max_model_len": {"type": "integer", "description": "Refused: use engine.maxModelLen."},
                "tensor_parallel_size": {"type": "integer", "description": "Refused: use engine.tensorParallelSize."},
                "pipeline_parallel_size": {
                    "type": "integer",
                    "description": "Refused: use engine.pipelineParallelSize.",
                },
                "dtype": {"type": "string", "description": "Refused: use engine.dtype."},
                "gpu_memory_utilization": {
                    "type": "number",
                    "description": "Refused: use engine.gpuMemoryUtilization.",
                },
            },
        },
    )
    env: dict[str, str] = Field(
        default_factory=dict,
        description=(
            "Extra environment variables for the engine processes (for example VLLM_* settings). "
            "Not for credentials: they would be written into the RayService in plain text; name "
            "a Secret in storageSecretRef or model.tokenSecretRef instead."
        ),
        json_schema_extra={
            "x-kubernetes-validations": [
                _cel(
                    "!(" + " || ".join(f"'{name}' in self" for name in CREDENTIAL_ENV) + ")",
                    "engine.env must not hold credentials ("
                    + ", ".join(CREDENTIAL_ENV)
                    + "): put them in a Secret and name it in spec.storageSecretRef (object stores) "
                    "or spec.model.tokenSecretRef (Hugging Face)",
                )
            ]
        },
    )

    @field_validator("extra_args")
    @classmethod
    def _extra_args_not_typed(cls, value: dict[str, Any]) -> dict[str, Any]:
        clash = sorted(set(TYPED_ENGINE_ARGS) & set(value))
        if clash:
            raise ValueError(
                f"{', '.join(clash)} must be set through the typed engine field(s) "
                "(maxModelLen, tensorParallelSize, pipelineParallelSize, dtype, "
                "gpuMemoryUtilization), not extraArgs"
            )
        return value

    @field_validator("env")
    @classmethod
    def _env_holds_no_credentials(cls, value: dict[str, str]) -> dict[str, str]:
        found = sorted(set(CREDENTIAL_ENV) & set(value))
        if found:
            raise ValueError(
                f"engine.env.{found[0]} would write a credential into the RayService in plain text: "
                "put it in a Secret and name it in spec.storageSecretRef (object stores) or "
                "spec.model.tokenSecretRef (Hugging Face)"
            )
        return value

    @property
    def gpus_per_replica(self) -> int:
        return self.tensor_parallel_size * self.pipeline_parallel_size


class ResourcesSpec(ApiModel):
    """Where replicas run: a named resource profile from the operator's settings."""

    profile: str = Field(
        default="default",
        max_length=63,
        pattern=PROFILE_PATTERN,
        description=(
            "Resource profile NAME or NAME:COUNT, as configured in the operator's settings "
            "(for example nvidia-h100:1). A profile gives the GPU product (node selector), "
            "tolerations, CPU and memory. COUNT, if given, must equal the GPUs one replica "
            "needs: tensorParallelSize × pipelineParallelSize."
        ),
    )

    @property
    def profile_name(self) -> str:
        return self.profile.split(":", 1)[0]

    @property
    def profile_count(self) -> int | None:
        _, _, count = self.profile.partition(":")
        return int(count) if count else None


class AutoscalingSpec(ApiModel):
    """Replica bounds and the queue depth that Ray Serve scales on."""

    min_replicas: int = Field(
        default=1,
        ge=0,
        le=1000,
        description="Fewest replicas. 0 scales to zero when idle (the gateway holds requests while one starts).",
    )
    max_replicas: int = Field(
        default=1,
        ge=1,
        le=1000,
        description="Most replicas. Must be at least minReplicas.",
    )
    target_queue_depth: int = Field(
        default=8,
        ge=1,
        le=10_000,
        description=(
            "Ongoing requests per replica that Ray Serve aims for (target_ongoing_requests): "
            "more in flight adds replicas, fewer removes them."
        ),
    )
    max_ongoing_requests: int | None = Field(
        default=None,
        ge=1,
        le=100_000,
        description=(
            "Requests one replica takes at once before new ones wait in Serve's queue "
            "(max_ongoing_requests). Default: 4 × targetQueueDepth. Must be at least targetQueueDepth."
        ),
    )
    scale_up_delay_seconds: int = Field(
        default=3,
        ge=0,
        le=3600,
        description="How long demand must stay above target before replicas are added.",
    )
    scale_down_delay_seconds: int = Field(
        default=300,
        ge=0,
        le=86_400,
        description="How long demand must stay below target before replicas are removed.",
    )

    metrics_interval_seconds: int = Field(
        default=1,
        ge=1,
        le=60,
        description=(
            "How often replicas report their queue depth to Ray Serve's autoscaler "
            "(metrics_interval_s). Serve's own default, 10, delays every decision by up to that much."
        ),
    )
    look_back_seconds: int = Field(
        default=5,
        ge=1,
        le=600,
        description=(
            "Window over which the reported queue depth is averaged (look_back_period_s): shorter "
            "reacts sooner, longer ignores brief spikes. Must be at least metricsIntervalSeconds."
        ),
    )

    @model_validator(mode="after")
    def _bounds(self) -> AutoscalingSpec:
        if self.min_replicas > self.max_replicas:
            raise ValueError(f"minReplicas ({self.min_replicas}) must be <= maxReplicas ({self.max_replicas})")
        if self.max_ongoing_requests is not None and self.max_ongoing_requests < self.target_queue_depth:
            raise ValueError(
                f"maxOngoingRequests ({self.max_ongoing_requests}) must be >= targetQueueDepth "
                f"({self.target_queue_depth})"
            )
        if self.look_back_seconds < self.metrics_interval_seconds:
            raise ValueError(
                f"lookBackSeconds ({self.look_back_seconds}) must be >= metricsIntervalSeconds "
                f"({self.metrics_interval_seconds}): the window must hold at least one report"
            )
        return self

    @property
    def effective_max_ongoing_requests(self) -> int:
        return self.max_ongoing_requests or ONGOING_PER_TARGET_DEPTH * self.target_queue_depth


class RoutingPolicy(enum.StrEnum):
    LEAST_LOADED = "LeastLoaded"
    PREFIX_CACHE_AFFINITY = "PrefixCacheAffinity"


class RoutingSpec(ApiModel):
    """How Ray Serve picks the replica for each request."""

    policy: RoutingPolicy = Field(
        default=RoutingPolicy.LEAST_LOADED,
        description=(
            "LeastLoaded: the less busy of two replicas picked at random (Serve's default). "
            "PrefixCacheAffinity: requests whose prompts share a prefix go to the replica that "
            "already holds it in vLLM's prefix cache, unless that replica is much busier than the "
            "others (Ray Serve LLM's PrefixCacheAffinityRouter). Worth it for chats and agents "
            "that resend a long history or system prompt, with more than one replica."
        ),
    )


class AccessSpec(ApiModel):
    """Who may reach this endpoint without going through the gateway."""

    allowed_namespaces: list[Annotated[str, Field(max_length=63, pattern=r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")]] = Field(
        default_factory=list,
        max_length=32,
        description=(
            "Namespaces whose pods may call the Serve port (8000) directly, bypassing the "
            "gateway's keys and limits. Enforced where the operator renders NetworkPolicies "
            "(operator setting network_policy.enabled); the gateway and KubeRay always may."
        ),
        json_schema_extra={"x-kubernetes-list-type": "set"},
    )


class CacheSpec(ApiModel):
    """A shared volume that keeps downloaded weights across replicas and restarts."""

    enabled: bool = Field(default=False, description="Keep weights on a shared volume (a PVC the operator creates).")
    storage_class_name: str | None = Field(
        default=None,
        max_length=253,
        description=(
            "StorageClass of the cache volume; it should support ReadWriteMany so every "
            "replica shares one copy. Default: the cluster's default class. Immutable."
        ),
        json_schema_extra={
            "x-kubernetes-validations": [
                _cel(
                    "self == oldSelf",
                    "cache.storageClassName is immutable; delete the cache PVC and the endpoint to change it",
                )
            ]
        },
    )
    size: str = Field(
        default="100Gi",
        pattern=QUANTITY_PATTERN,
        description="Size of the cache volume, a Kubernetes quantity such as 100Gi.",
    )
    prefetch: bool = Field(
        default=False,
        description=(
            "Fill the cache volume before the first replica starts, with a Job running `llmep fetch`, "
            "and have the replicas read the weights from it: cold starts and scale-ups from zero read "
            "the volume, not the hub or the bucket. Needs cache.enabled; for hf:// and s3:// sources."
        ),
    )


class SecretRef(ApiModel):
    """A whole Secret in the LLMEndpoint's namespace."""

    name: str = Field(
        min_length=1,
        max_length=253,
        pattern=SECRET_NAME_PATTERN,
        description="Name of the Secret, in the same namespace as the LLMEndpoint.",
    )


class LoraAdapter(ApiModel):
    """One LoRA adapter of the base model."""

    name: str = Field(
        min_length=1,
        max_length=64,
        pattern=ADAPTER_NAME_PATTERN,
        description=(
            "The adapter's model id: clients send it (or '<servedName>:<name>') as `model`, and "
            "its weights are the folder of this name under lora.source. Letters, digits, '.', "
            "'_' and '-'."
        ),
    )


class LoraSpec(ApiModel):
    """LoRA adapters served on the base model's replicas, loaded on their first request."""

    source: str = Field(
        min_length=6,
        max_length=1024,
        pattern=LORA_SOURCE_PATTERN,
        description=(
            "Object-store folder with one subfolder per adapter (its adapter_config.json and "
            "weights), named after the adapter: s3://BUCKET/PATH, gs://BUCKET/PATH, "
            "abfss://CONTAINER@ACCOUNT.dfs.core.windows.net/PATH or azure://CONTAINER/PATH. "
            "Credentials come from spec.storageSecretRef."
        ),
        json_schema_extra={
            "x-kubernetes-validations": [
                _cel(
                    "self.matches('^(s3|gs|abfss|azure)://')",
                    "lora.source must be an object-store folder (s3://, gs://, abfss:// or azure://): "
                    "Ray Serve LLM loads adapters only from object storage; for example s3://my-bucket/adapters",
                )
            ]
        },
    )
    adapters: list[LoraAdapter] = Field(
        min_length=1,
        max_length=128,
        description=(
            "The adapters clients may call, listed in /v1/models with the base model as parent. "
            "Adding or removing one changes no replica: a replica loads an adapter on its first request."
        ),
        json_schema_extra={"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["name"]},
    )
    max_adapters_per_replica: int = Field(
        default=4,
        ge=1,
        le=64,
        description=(
            "Adapters one replica keeps loaded at once (least recently used is evicted); each "
            "takes GPU memory for a batch slot (vLLM max_loras)."
        ),
    )
    max_rank: int = Field(
        default=16,
        description=(
            f"Highest adapter rank the engine accepts (vLLM max_lora_rank): one of {', '.join(map(str, LORA_RANKS))}."
        ),
        json_schema_extra={"enum": list(LORA_RANKS)},
    )

    # Before the pattern, so a user reads which schemes work rather than a regex.
    @field_validator("source", mode="before")
    @classmethod
    def _object_store_source(cls, value: Any) -> Any:
        if not isinstance(value, str):
            return value
        scheme = value.split("://", 1)[0] if "://" in value else ""
        if scheme not in LORA_SOURCE_SCHEMES:
            raise ValueError(
                f"lora.source {value!r} must be an object-store folder: "
                + ", ".join(f"{s}://" for s in LORA_SOURCE_SCHEMES)
                + " (Ray Serve LLM loads adapters only from object storage); for example s3://my-bucket/adapters"
            )
        return value

    @field_validator("max_rank")
    @classmethod
    def _known_rank(cls, value: int) -> int:
        if value not in LORA_RANKS:
            raise ValueError(
                f"lora.maxRank {value} is not a rank vLLM supports: use one of {', '.join(map(str, LORA_RANKS))}"
            )
        return value

    @field_validator("adapters")
    @classmethod
    def _unique_adapter_names(cls, value: list[LoraAdapter]) -> list[LoraAdapter]:
        names = [adapter.name for adapter in value]
        repeated = sorted({name for name in names if names.count(name) > 1})
        if repeated:
            raise ValueError(f"lora.adapters names must be unique; repeated: {', '.join(repeated)}")
        return value

    @property
    def adapter_names(self) -> list[str]:
        return [adapter.name for adapter in self.adapters]


class LLMEndpointSpec(ApiModel):
    """Desired state of an LLMEndpoint: one model served behind an OpenAI-compatible API."""

    model: ModelSpec = Field(description="The model to serve and the names it answers to.")
    engine: EngineSpec = Field(default_factory=EngineSpec, description="vLLM engine settings.")
    resources: ResourcesSpec = Field(
        default_factory=ResourcesSpec,
        description="Resource profile that decides the GPU nodes replicas run on.",
    )
    autoscaling: AutoscalingSpec = Field(
        default_factory=AutoscalingSpec,
        description="Replica bounds and queue-depth target for Ray Serve's autoscaler.",
    )
    cache: CacheSpec = Field(default_factory=CacheSpec, description="Weight cache volume.")
    routing: RoutingSpec = Field(default_factory=RoutingSpec, description="How requests are spread over the replicas.")
    access: AccessSpec = Field(
        default_factory=AccessSpec, description="Direct access to the Serve port, besides the gateway."
    )
    lora: LoraSpec | None = Field(
        default=None,
        description="LoRA adapters (fine-tunes of this model) served by the same replicas.",
    )
    storage_secret_ref: SecretRef | None = Field(
        default=None,
        description=(
            "Secret whose keys become environment variables of the processes that load the model "
            "and its adapters: the object-store credentials for s3://, gs://, abfss:// and azure:// "
            "sources (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_ENDPOINT_URL, AWS_REGION for S3 "
            "and S3-compatible stores; GOOGLE_APPLICATION_CREDENTIALS' file is not supported, use "
            "workload identity; AZURE_STORAGE_ACCOUNT and AZURE_STORAGE_KEY). Never written into the RayService."
        ),
    )
    image: str | None = Field(
        default=None,
        max_length=512,
        pattern=r"^[^\s]+$",
        description=(
            "Serving image for the Ray head and workers. Default: the profile's image from the operator settings."
        ),
    )

    @model_validator(mode="after")
    def _adapter_names_are_not_model_ids(self) -> LLMEndpointSpec:
        if self.lora is None:
            return self
        taken = {*self.model.aliases, *([self.model.served_name] if self.model.served_name else [])}
        clash = sorted(taken & set(self.lora.adapter_names))
        if clash:
            raise ValueError(
                f"lora.adapters name {clash[0]!r} is also this endpoint's model.servedName or an alias: "
                "give the adapter its own name"
            )
        return self

    @model_validator(mode="after")
    def _prefetch_has_a_cache_and_a_remote_source(self) -> LLMEndpointSpec:
        if not self.cache.prefetch:
            return self
        if not self.cache.enabled:
            raise ValueError(PREFETCH_NEEDS_CACHE)
        if not self.model.source.startswith(PREFETCH_SOURCES):
            raise ValueError(f"{PREFETCH_NEEDS_REMOTE_SOURCE}; got {self.model.source!r}")
        return self

    @model_validator(mode="after")
    def _profile_count_matches_parallelism(self) -> LLMEndpointSpec:
        count = self.resources.profile_count
        needed = self.engine.gpus_per_replica
        if count is not None and count != needed:
            raise ValueError(
                f"resources.profile asks for {count} GPU(s) per replica but "
                f"engine.tensorParallelSize × engine.pipelineParallelSize = {needed}; "
                f"use {self.resources.profile_name}:{needed} or drop the ':{count}'"
            )
        return self


# CEL twins of the cross-field checks above, attached to the spec in the generated CRD.
SPEC_CEL_RULES = [
    _cel(
        "!has(self.cache) || !has(self.cache.prefetch) || !self.cache.prefetch || "
        "(has(self.cache.enabled) && self.cache.enabled)",
        PREFETCH_NEEDS_CACHE,
        ".cache.prefetch",
    ),
    _cel(
        "!has(self.cache) || !has(self.cache.prefetch) || !self.cache.prefetch || "
        + " || ".join(f"self.model.source.startsWith('{prefix}')" for prefix in PREFETCH_SOURCES),
        PREFETCH_NEEDS_REMOTE_SOURCE,
        ".cache.prefetch",
    ),
    _cel(
        "self.autoscaling.minReplicas <= self.autoscaling.maxReplicas",
        "autoscaling.minReplicas must be <= autoscaling.maxReplicas",
        ".autoscaling.minReplicas",
    ),
    _cel(
        "!has(self.autoscaling.maxOngoingRequests) || "
        "self.autoscaling.maxOngoingRequests >= self.autoscaling.targetQueueDepth",
        "autoscaling.maxOngoingRequests must be >= autoscaling.targetQueueDepth",
        ".autoscaling.maxOngoingRequests",
    ),
    _cel(
        "self.autoscaling.lookBackSeconds >= self.autoscaling.metricsIntervalSeconds",
        "autoscaling.lookBackSeconds must be >= autoscaling.metricsIntervalSeconds",
        ".autoscaling.lookBackSeconds",
    ),
    _cel(
        "!self.resources.profile.contains(':') || "
        "int(self.resources.profile.substring(self.resources.profile.indexOf(':') + 1)) == "
        "self.engine.tensorParallelSize * self.engine.pipelineParallelSize",
        "resources.profile NAME:COUNT must have COUNT = engine.tensorParallelSize × "
        "engine.pipelineParallelSize (or drop ':COUNT')",
        ".resources.profile",
    ),
    _cel(
        "!has(self.model.servedName) || !has(self.model.aliases) || !(self.model.servedName in self.model.aliases)",
        "model.aliases must not repeat model.servedName",
        ".model.aliases",
    ),
    _cel(
        "!has(self.lora) || self.lora.adapters.all(a, "
        "(!has(self.model.servedName) || a.name != self.model.servedName) && "
        "(!has(self.model.aliases) || !(a.name in self.model.aliases)))",
        "lora.adapters name is also this endpoint's model.servedName or an alias: give the adapter its own name",
        ".lora.adapters",
    ),
]

ROOT_CEL_RULES = [
    _cel(
        f"self.metadata.name.size() <= {MAX_NAME_LENGTH}",
        f"metadata.name must be at most {MAX_NAME_LENGTH} characters so every child name fits in 63",
    ),
    _cel(
        f"self.metadata.name.matches('{NAME_PATTERN}')",
        "metadata.name must start with a letter and hold only lowercase letters, digits and '-' "
        "(it names Services, which require a DNS-1035 label)",
    ),
]


class ConditionType(enum.StrEnum):
    READY = "Ready"
    PROGRESSING = "Progressing"
    DEGRADED = "Degraded"


class ConditionStatus(enum.StrEnum):
    TRUE = "True"
    FALSE = "False"
    UNKNOWN = "Unknown"


class Reason(enum.StrEnum):
    """Why a condition has its status; one vocabulary for every condition."""

    RECONCILING = "Reconciling"
    INVALID_SPEC = "InvalidSpec"
    WAITING_FOR_GPU_NODE = "WaitingForGPUNode"
    DEPLOYING = "Deploying"
    DOWNLOADING_WEIGHTS = "DownloadingWeights"
    LOADING_MODEL = "LoadingModel"
    SERVING = "Serving"
    SCALED_TO_ZERO = "ScaledToZero"
    BACKEND_FAILED = "BackendFailed"
    AS_EXPECTED = "AsExpected"


class Condition(ApiModel):
    """One aspect of the endpoint's state, in the shape of metav1.Condition."""

    type: ConditionType = Field(description="Ready, Progressing or Degraded.")
    status: ConditionStatus = Field(description="True, False or Unknown.")
    reason: Reason = Field(description="Machine-readable reason, CamelCase.")
    message: str = Field(default="", max_length=32_768, description="Human-readable detail.")
    last_transition_time: datetime | None = Field(
        default=None, description="When status last changed (not when the message changed)."
    )
    observed_generation: int | None = Field(
        default=None, ge=0, description="metadata.generation the condition was computed for."
    )


class ReplicaStatus(ApiModel):
    """Replica counts of the model server."""

    desired: int = Field(default=0, ge=0, description="Replicas Ray Serve wants now.")
    ready: int = Field(default=0, ge=0, description="Replicas serving requests.")


class LLMEndpointStatus(ApiModel):
    """Observed state, written by the operator."""

    observed_generation: int | None = Field(
        default=None, ge=0, description="metadata.generation that this status reflects."
    )
    conditions: list[Condition] = Field(
        default_factory=list,
        description="Ready, Progressing and Degraded, each with a reason and message.",
        json_schema_extra={"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["type"]},
    )
    url: str | None = Field(default=None, description="OpenAI base_url of this endpoint inside the cluster (…/v1).")
    models: list[str] = Field(
        default_factory=list, description="Model ids this endpoint answers to: servedName then aliases."
    )
    replicas: ReplicaStatus = Field(default_factory=ReplicaStatus, description="Replica counts.")
    ray_service: str | None = Field(default=None, description="Name of the RayService serving this endpoint.")


def adapter_names_of(body: Mapping[str, Any]) -> list[str]:
    """The LoRA adapter names a stored LLMEndpoint lists (spec.lora.adapters[].name), read from its
    raw body; malformed entries are skipped."""
    lora = ((body.get("spec") or {}).get("lora")) or {}
    adapters = lora.get("adapters") if isinstance(lora, Mapping) else None
    if not isinstance(adapters, list):
        return []
    names = (a.get("name") for a in adapters if isinstance(a, Mapping))
    return [n for n in names if isinstance(n, str) and n]


def capacity_of(body: Mapping[str, Any]) -> int | None:
    """Requests a stored LLMEndpoint's ready replicas take at once (status.replicas.ready ×
    spec.autoscaling.maxOngoingRequests, whose default is ONGOING_PER_TARGET_DEPTH × targetQueueDepth,
    as rendered), read from its raw
    body; None while the status counts no ready replica or the fields are malformed."""
    replicas = (body.get("status") or {}).get("replicas")
    ready = _positive_count(replicas.get("ready")) if isinstance(replicas, Mapping) else None
    if ready is None:
        return None
    autoscaling = (body.get("spec") or {}).get("autoscaling") or {}
    if not isinstance(autoscaling, Mapping):
        return None
    configured = autoscaling.get("maxOngoingRequests")
    if configured is None:
        depth = _positive_count(
            autoscaling.get("targetQueueDepth", AutoscalingSpec.model_fields["target_queue_depth"].default)
        )
        per_replica = None if depth is None else ONGOING_PER_TARGET_DEPTH * depth
    else:
        per_replica = _positive_count(configured)
    return None if per_replica is None else ready * per_replica


def _positive_count(value: object) -> int | None:
    """``value`` when it is a whole number above 0 (a JSON true is not one), else None."""
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None


def model_ids_of(body: Mapping[str, Any]) -> list[str]:
    """The model ids a stored LLMEndpoint answers to (servedName, else metadata.name, then
    aliases), read from its raw body: also for one that does not parse, whose status says why."""
    model = ((body.get("spec") or {}).get("model")) or {}
    served = model.get("servedName") or (body.get("metadata") or {}).get("name")
    aliases = model.get("aliases")
    ids = [served, *aliases] if isinstance(aliases, list) else [served]
    return [i for i in ids if isinstance(i, str) and i]


class ObjectMeta(BaseModel):
    """The parts of metadata the API reads; the rest is kept as is."""

    model_config = ConfigDict(extra="allow", populate_by_name=True)

    name: str = Field(min_length=1, max_length=MAX_NAME_LENGTH, pattern=NAME_PATTERN)
    namespace: str | None = None


class LLMEndpoint(ApiModel):
    """A whole LLMEndpoint object as kubectl sees it."""

    api_version: Literal["llmep.io/v1alpha1"] = Field(default=cast(Literal["llmep.io/v1alpha1"], f"{GROUP}/{VERSION}"))
    kind: Literal["LLMEndpoint"] = Field(default=KIND)
    metadata: ObjectMeta
    spec: LLMEndpointSpec
    status: LLMEndpointStatus | None = None

    @property
    def served_name(self) -> str:
        return self.spec.model.served_name or self.metadata.name

    @property
    def model_ids(self) -> list[str]:
        return [self.served_name, *self.spec.model.aliases]

    @model_validator(mode="after")
    def _aliases_differ_from_default_name(self) -> LLMEndpoint:
        if self.spec.model.served_name is None and self.metadata.name in self.spec.model.aliases:
            raise ValueError("spec.model.aliases must not repeat the served name (metadata.name)")
        return self
