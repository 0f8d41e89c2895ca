"""Gateway settings: one pydantic-settings object, read from flags or LLMEP_GATEWAY_* env."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

# Where the operator puts an endpoint's Serve Service (operator settings cluster_domain, serve_port).
DEFAULT_BACKEND_URL_TEMPLATE = "http://{name}-serve.{namespace}.svc:8000/v1"


class GatewaySettings(BaseSettings):
    """Everything the gateway can be told; the Helm chart renders these as env vars."""

    model_config = SettingsConfigDict(env_prefix="LLMEP_GATEWAY_", extra="forbid")

    host: str = Field("0.0.0.0", description="Address to listen on (tests bind 127.0.0.1).")  # noqa: S104
    port: int = Field(8080, ge=0, le=65535, description="Port of the OpenAI API; 0 picks one.")
    metrics_port: int | None = Field(
        None,
        ge=0,
        le=65535,
        description="Serve /metrics on this port only; unset serves it on the API port.",
    )
    routes_file: Path | None = Field(
        None,
        description="Local mode: YAML/JSON list of {models, url, ready, adapters, max_inflight}; "
        "reloaded on change. "
        "Unset: routes come from LLMEndpoint objects in the cluster.",
    )
    keys_file: Path | None = Field(
        None,
        description="Local mode: YAML/JSON list of {name, key | sha256, models, rpm, tpm, "
        "tokens_per_day, priority}; reloaded on change. Unset in cluster mode: keys come from "
        "Secrets labelled llmep.io/api-key.",
    )
    file_poll_interval: float = Field(
        0.5, gt=0, description="Seconds between checks of routes_file and keys_file."
    )
    anonymous: bool = Field(
        False, description="Accept requests without an API key (local use only)."
    )
    namespace: str | None = Field(
        None,
        description="The gateway's own namespace, where key Secrets are watched. Default: "
        "POD_NAMESPACE or the service account's namespace.",
    )
    watch_namespaces: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="Namespaces whose LLMEndpoints are routed (comma-separated); '*' is all; "
        "empty is the gateway's own namespace.",
    )
    plain_name_namespaces: Annotated[list[str], NoDecode] = Field(
        default_factory=lambda: ["*"],
        description="Namespaces whose LLMEndpoints answer to plain model names (comma-separated); "
        "'*' is all. Every endpoint answers to namespace/name. A plain name claimed from two "
        "namespaces is ambiguous and answers 404 until one of them drops it.",
    )
    kubeconfig: Path | None = Field(
        None, description="Kubeconfig for running outside a cluster; default: in-cluster."
    )
    backend_url_template: str = Field(
        DEFAULT_BACKEND_URL_TEMPLATE,
        description="Cluster mode: the base_url of an LLMEndpoint's Serve Service, from its name and "
        "namespace. The gateway computes it and never takes status.url as written, so whoever can "
        "write an endpoint's status cannot send its traffic elsewhere. The chart derives it from "
        "the operator's cluster_domain and serve_port.",
    )
    max_body_bytes: int = Field(
        8 * 1024 * 1024, gt=0, description="Largest request body accepted; larger is 413."
    )
    header_timeout: float = Field(
        10.0, gt=0, description="Seconds a client has to send a complete request head."
    )
    idle_timeout: float = Field(
        75.0, gt=0, description="Seconds an idle keep-alive connection is kept open."
    )
    body_timeout: float = Field(
        30.0, gt=0, description="Seconds a client has to send the whole request body."
    )
    max_inflight_body_bytes: int = Field(
        256 * 1024 * 1024,
        gt=0,
        description="Bytes of request bodies the gateway holds at once, all clients together "
        "(being read, held for a model scaling from zero, or being forwarded), so its memory is "
        "bounded by this rather than by its clients. Taken from Content-Length before a body is "
        "read: a body larger than this is 413; one that does not fit beside the others is 429 "
        "with Retry-After.",
    )
    max_response_bytes: int = Field(
        64 * 1024 * 1024,
        gt=0,
        description="Largest non-streaming backend answer read; a larger one is 502 "
        "backend_response_too_large. Streams are relayed as they arrive and have no cap.",
    )
    offload_parse_bytes: int = Field(
        256 * 1024,
        ge=0,
        description="Bodies at least this large are parsed (for model and stream) in a worker "
        "process, so a large JSON body never stalls the event loop and the streams it relays.",
    )
    backend_connect_timeout: float = Field(
        5.0, gt=0, description="Seconds to open a connection to a backend."
    )
    backend_read_timeout: float = Field(
        600.0, gt=0, description="Seconds to wait for the next bytes from a backend."
    )
    backend_pool_idle_seconds: float = Field(
        4.0,
        gt=0,
        description=(
            "Idle pooled backend connections are dropped after this, before the backends drop them"
            " (Ray Serve's HTTP and HAProxy close idle keep-alive connections after 5 s): a POST"
            " written onto a connection the backend is closing cannot be replayed safely."
        ),
    )
    hold_deadline: float = Field(
        300.0,
        ge=0,
        description="Seconds a request for a model with no ready replica is held before 503.",
    )
    hold_queue_size: int = Field(
        256, ge=0, description="Requests held per model at most; beyond that 503."
    )
    drain_seconds: float = Field(
        5.0,
        ge=0,
        description="After SIGTERM: seconds /readyz answers 503 while requests are still served, "
        "so Services stop sending new connections before the listener closes.",
    )
    shutdown_grace_seconds: float = Field(
        30.0,
        ge=0,
        description="After drain_seconds the listener closes and in-flight and held requests "
        "have this long to finish; streams still open then end with an SSE error event and "
        "[DONE]. The chart's terminationGracePeriodSeconds covers preStop + drain_seconds + this.",
    )
    stream_write_timeout: float = Field(
        30.0,
        gt=0,
        description="Seconds a write to a streaming client may wait for the client to read; past "
        "it the stream is dropped, its backend request cancelled and the key's slot freed.",
    )
    kube_request_timeout: float = Field(
        10.0,
        gt=0,
        description="Cluster mode: seconds to connect to the API server and between bytes of a "
        "list or watch answer; a silently dropped connection fails within this.",
    )
    kube_watch_seconds: int = Field(
        30,
        ge=1,
        description="Cluster mode: seconds the API server keeps one watch open; each watch that "
        "ends normally counts as a successful sync.",
    )
    kube_retry_max_delay: float = Field(
        30.0,
        gt=0,
        description="Cluster mode: longest wait between failed list/watch attempts (backoff from "
        "0.5 s, doubling, with jitter).",
    )
    kube_sync_max_age: float = Field(
        60.0,
        gt=0,
        description="Cluster mode: /readyz fails once the last successful list or watch of any "
        "source (routes, keys) is older than this, so a gateway with frozen routes and keys "
        "leaves the Service. Must exceed kube_watch_seconds + kube_request_timeout.",
    )
    hold_keepalive_interval: float = Field(
        5.0, gt=0, description="Seconds between SSE keep-alive comments to held streams."
    )
    wake_backend: bool = Field(
        True,
        description="While requests are held, send the backend one tiny completion so a "
        "scale-to-zero Ray Serve deployment starts a replica.",
    )
    max_concurrency_per_key: int = Field(
        256, ge=0, description="In-flight requests per API key; beyond that 429. 0: unlimited."
    )
    max_inflight_per_model: int = Field(
        0,
        ge=0,
        description="Requests this gateway has in flight to one model (being forwarded, answer being "
        "relayed) at most; further requests wait in its fair queue and are let in by key priority, "
        "then round-robin across keys. A local routes file entry's max_inflight, or in cluster mode "
        "an endpoint's own capacity (endpoint_capacity), overrides it. 0: no queue.",
    )
    endpoint_capacity: bool = Field(
        True,
        description="Cluster mode: an LLMEndpoint's fair-queue capacity is what its ready replicas take "
        "at once (status.replicas.ready x spec.autoscaling.maxOngoingRequests), split evenly over "
        "`replicas` gateway replicas, so a saturated endpoint queues here, by key priority, rather "
        "than in Ray Serve. false: max_inflight_per_model applies to every endpoint.",
    )
    fair_high_priority_reserve: float = Field(
        0.125,
        ge=0,
        lt=1,
        description="Share of a model's fair-queue capacity (rounded up, always leaving one slot) held "
        "back from normal and low keys while a high-priority key has asked for that model within the "
        "last minute, so its requests find a free slot rather than wait for a running one to end. "
        "0: none.",
    )
    fair_queue_size: int = Field(
        256, ge=0, description="Requests waiting in one model's fair queue at most; beyond that 429 model_busy."
    )
    fair_queue_timeout: float = Field(
        60.0,
        gt=0,
        description="Seconds a request waits in a model's fair queue before 503 model_queue_timeout.",
    )
    replicas: int = Field(
        1,
        ge=1,
        description="Gateway replicas behind the Service (the chart sets gateway.replicas): each "
        "enforces 1/replicas of every key's rpm, tpm and tokens_per_day, so together they never "
        "exceed a key's limits.",
    )
    quota_default_max_tokens: int = Field(
        256,
        ge=0,
        description="Completion tokens reserved against a key's tpm and tokens_per_day for a request "
        "without max_tokens or max_completion_tokens (settled from the answer's usage).",
    )
    retry_after_seconds: int = Field(
        5,
        ge=1,
        description="Retry-After sent with 429 and 503 answers; a key's rpm, tpm and tokens_per_day "
        "429s say when the key has room instead.",
    )
    log_level: str = Field("INFO", description="Python logging level.")

    @field_validator("backend_url_template")
    @classmethod
    def _template_names_the_endpoint(cls, value: str) -> str:
        try:
            value.format(name="n", namespace="ns")
        except (KeyError, IndexError, ValueError) as error:
            raise ValueError(
                f"backend_url_template may use only {{name}} and {{namespace}}: {value!r} ({error!r})"
            ) from None
        if not value.startswith(("http://", "https://")):
            raise ValueError(f"backend_url_template must be an http:// or https:// URL, got {value!r}")
        return value

    @model_validator(mode="after")
    def _sync_age_outlasts_a_quiet_watch(self) -> GatewaySettings:
        # A healthy watch with no events syncs once per kube_watch_seconds (+ the request timeout).
        if self.kube_sync_max_age <= self.kube_watch_seconds + self.kube_request_timeout:
            raise ValueError(
                f"kube_sync_max_age ({self.kube_sync_max_age}) must exceed kube_watch_seconds + "
                f"kube_request_timeout ({self.kube_watch_seconds + self.kube_request_timeout}), "
                "or readiness fails while the watches are healthy"
            )
        return self

    @field_validator("watch_namespaces", "plain_name_namespaces", mode="before")
    @classmethod
    def _split_namespaces(cls, value: object) -> object:
        if isinstance(value, str):
            return [part.strip() for part in value.split(",") if part.strip()]
        return value
