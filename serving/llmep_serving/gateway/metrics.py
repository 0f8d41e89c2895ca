"""Prometheus metrics per model, with label children cached so the hot path skips lookups."""

from __future__ import annotations

import re

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest

from .routing import RoutingTable

CONTENT_TYPE = CONTENT_TYPE_LATEST

# LLM requests range from a few ms (embeddings) to minutes (long generations).
DURATION_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)

_PROMPT = re.compile(rb'"prompt_tokens"\s*:\s*(\d{1,12})')
_COMPLETION = re.compile(rb'"completion_tokens"\s*:\s*(\d{1,12})')


def usage_from(data: bytes) -> tuple[int, int] | None:
    """(prompt, completion) tokens from the last ``usage`` object in ``data``, if any.

    A regex over the tail after the last ``"usage"`` key, so a body is never parsed twice.
    """
    at = data.rfind(b'"usage"')
    if at < 0:
        return None
    tail = data[at:]
    prompt = _PROMPT.search(tail)
    if prompt is None:
        return None
    completion = _COMPLETION.search(tail)
    return int(prompt.group(1)), int(completion.group(1)) if completion else 0


class ModelMetrics:
    """Label children for one model."""

    __slots__ = ("in_flight", "held", "duration", "ttft", "prompt_tokens", "completion_tokens")

    def __init__(self, m: GatewayMetrics, model: str) -> None:
        self.in_flight = m.in_flight.labels(model)
        self.held = m.held.labels(model)
        self.duration = m.duration.labels(model)
        self.ttft = m.ttft.labels(model)
        self.prompt_tokens = m.prompt_tokens.labels(model)
        self.completion_tokens = m.completion_tokens.labels(model)


class GatewayMetrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.in_flight = Gauge(
            "llmep_gateway_requests_in_flight",
            "Requests being forwarded to a backend, per model.",
            ["model"],
            registry=r,
        )
        self.held = Gauge(
            "llmep_gateway_requests_held",
            "Requests waiting for a model with no ready replica, per model.",
            ["model"],
            registry=r,
        )
        self.duration = Histogram(
            "llmep_gateway_request_duration_seconds",
            "Time from request arrival to the last byte of the answer, per model.",
            ["model"],
            buckets=DURATION_BUCKETS,
            registry=r,
        )
        self.ttft = Histogram(
            "llmep_gateway_time_to_first_token_seconds",
            "Time from request arrival to the first streamed chunk, per model.",
            ["model"],
            buckets=TTFT_BUCKETS,
            registry=r,
        )
        self.prompt_tokens = Counter(
            "llmep_gateway_prompt_tokens",
            "Prompt tokens reported in answers' usage objects, per model.",
            ["model"],
            registry=r,
        )
        self.completion_tokens = Counter(
            "llmep_gateway_completion_tokens",
            "Completion tokens reported in answers' usage objects, per model.",
            ["model"],
            registry=r,
        )
        self.errors = Counter(
            "llmep_gateway_errors",
            "Error answers by model ('' before a model is resolved) and code: the gateway's "
            "error code, or backend_<status> for a backend's own error status.",
            ["model", "code"],
            registry=r,
        )
        self.routes = Gauge(
            "llmep_gateway_models",
            "Model names in the routing table, by readiness.",
            ["ready"],
            registry=r,
        )
        self._models: dict[str, ModelMetrics] = {}

    def model(self, model: str) -> ModelMetrics:
        children = self._models.get(model)
        if children is None:
            children = self._models[model] = ModelMetrics(self, model)
        return children

    def error(self, model: str, code: str) -> None:
        self.errors.labels(model, code).inc()

    def on_table(self, table: RoutingTable) -> None:
        ready = sum(1 for route in table.by_name.values() if route.ready)
        self.routes.labels("true").set(ready)
        self.routes.labels("false").set(len(table.by_name) - ready)

    def render(self) -> bytes:
        return generate_latest(self.registry)
