"""Prometheus metrics per model, and per API key (by its name, never the key or its digest).

The hot path only bumps plain numbers on per-model objects (one event loop mutates them, so no
locks); a custom collector turns them into metric families when /metrics is scraped. That
keeps metrics to well under a microsecond per request, where prometheus-client's locked
children cost several.
"""

from __future__ import annotations

import re
from bisect import bisect_left
from collections.abc import Iterator

from prometheus_client import CollectorRegistry
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.utils import floatToGoString

from .gauges import Gauge
from .routing import RoutingTable

CONTENT_TYPE = CONTENT_TYPE_LATEST

# LLM requests range from a few ms (embeddings) to minutes (long generations).
DURATION_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
# Most admissions wait nothing (the first bucket); a saturated model's queue waits up to fair_queue_timeout.
QUEUE_WAIT_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)

_PROMPT = re.compile(rb'"prompt_tokens"\s*:\s*(\d{1,12})')
_COMPLETION = re.compile(rb'"completion_tokens"\s*:\s*(\d{1,12})')


def usage_from(data: bytes) -> tuple[int, int] | None:
    """(prompt, completion) tokens from the last ``usage`` object in ``data``, if any.

    A regex over the tail after the last ``"usage"`` key, so a body is never parsed twice.
    """
    at = data.rfind(b'"usage"')
    if at < 0:
        return None
    prompt = _PROMPT.search(data, at)
    if prompt is None:
        return None
    completion = _COMPLETION.search(data, at)
    return int(prompt.group(1)), int(completion.group(1)) if completion else 0


class Histogram:
    __slots__ = ("bounds", "counts", "sum")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)  # the last slot is +Inf
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect_left(self.bounds, value)] += 1
        self.sum += value

    def cumulative(self) -> list[tuple[str, float]]:
        buckets: list[tuple[str, float]] = []
        total = 0
        for bound, count in zip((*map(floatToGoString, self.bounds), "+Inf"), self.counts, strict=True):
            total += count
            buckets.append((bound, total))
        return buckets


class ModelMetrics:
    """The numbers kept for one model (its served name).

    ``with numbers.forwarding:`` and ``with numbers.holding:`` count a request while it is
    forwarded (its answer relayed included) or held; ``in_flight`` and ``held`` read the counts.
    """

    __slots__ = ("forwarding", "holding", "duration", "ttft", "prompt_tokens", "completion_tokens")

    def __init__(self) -> None:
        self.forwarding = Gauge()
        self.holding = Gauge()
        self.duration = Histogram(DURATION_BUCKETS)
        self.ttft = Histogram(TTFT_BUCKETS)
        self.prompt_tokens = 0
        self.completion_tokens = 0

    @property
    def in_flight(self) -> int:
        return self.forwarding.value

    @property
    def held(self) -> int:
        return self.holding.value


class GatewayMetrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        self.models: dict[str, ModelMetrics] = {}
        self.errors: dict[tuple[str, str], int] = {}
        self.retries: dict[tuple[str, str], int] = {}
        # Keyed by (key name, model, code | type | limit): key names come from Secrets, so bounded.
        self.key_requests: dict[tuple[str, str, str], int] = {}
        self.key_tokens: dict[tuple[str, str, str], int] = {}
        self.key_limited: dict[tuple[str, str, str], int] = {}
        # Keyed by (key name, model): the fair queue's waiters now, and how long admitted ones waited.
        self.key_queue_depth: dict[tuple[str, str], int] = {}
        self.key_queue_waits: dict[tuple[str, str], Histogram] = {}
        self.routes_ready = 0
        self.routes_not_ready = 0
        self.registry.register(self)

    def model(self, model: str) -> ModelMetrics:
        numbers = self.models.get(model)
        if numbers is None:
            numbers = self.models[model] = ModelMetrics()
        return numbers

    def error(self, model: str, code: str) -> None:
        key = (model, code)
        self.errors[key] = self.errors.get(key, 0) + 1

    def retry(self, model: str, reason: str) -> None:
        key = (model, reason)
        self.retries[key] = self.retries.get(key, 0) + 1

    def key_request(self, key: str, model: str, code: int) -> None:
        labels = (key, model, str(code))
        self.key_requests[labels] = self.key_requests.get(labels, 0) + 1

    def key_usage(self, key: str, model: str, prompt: int, completion: int) -> None:
        for kind, count in (("prompt", prompt), ("completion", completion)):
            labels = (key, model, kind)
            self.key_tokens[labels] = self.key_tokens.get(labels, 0) + count

    def key_rate_limited(self, key: str, model: str, limit: str) -> None:
        labels = (key, model, limit)
        self.key_limited[labels] = self.key_limited.get(labels, 0) + 1

    def key_queued(self, key: str, model: str, delta: int) -> None:
        labels = (key, model)
        self.key_queue_depth[labels] = self.key_queue_depth.get(labels, 0) + delta

    def key_queue_wait(self, key: str, model: str, seconds: float) -> None:
        labels = (key, model)
        waits = self.key_queue_waits.get(labels)
        if waits is None:
            waits = self.key_queue_waits[labels] = Histogram(QUEUE_WAIT_BUCKETS)
        waits.observe(seconds)

    def on_table(self, table: RoutingTable) -> None:
        self.routes_ready = sum(1 for route in table.by_name.values() if route.ready)
        self.routes_not_ready = len(table.by_name) - self.routes_ready

    def render(self) -> bytes:
        return generate_latest(self.registry)

    def collect(self) -> Iterator[Metric]:
        models = list(self.models.items())
        in_flight = GaugeMetricFamily(
            "llmep_gateway_requests_in_flight",
            "Requests being forwarded to a backend, per model.",
            labels=["model"],
        )
        held = GaugeMetricFamily(
            "llmep_gateway_requests_held",
            "Requests waiting for a model with no ready replica, per model.",
            labels=["model"],
        )
        duration = HistogramMetricFamily(
            "llmep_gateway_request_duration_seconds",
            "Time from request arrival to the last byte of the answer, per model.",
            labels=["model"],
        )
        ttft = HistogramMetricFamily(
            "llmep_gateway_time_to_first_token_seconds",
            "Time from request arrival to the first streamed chunk, per model.",
            labels=["model"],
        )
        prompt = CounterMetricFamily(
            "llmep_gateway_prompt_tokens",
            "Prompt tokens reported in answers' usage objects, per model.",
            labels=["model"],
        )
        completion = CounterMetricFamily(
            "llmep_gateway_completion_tokens",
            "Completion tokens reported in answers' usage objects, per model.",
            labels=["model"],
        )
        for name, m in models:
            in_flight.add_metric([name], m.in_flight)
            held.add_metric([name], m.held)
            duration.add_metric([name], m.duration.cumulative(), m.duration.sum)
            ttft.add_metric([name], m.ttft.cumulative(), m.ttft.sum)
            prompt.add_metric([name], m.prompt_tokens)
            completion.add_metric([name], m.completion_tokens)
        errors = CounterMetricFamily(
            "llmep_gateway_errors",
            "Error answers by model ('' before a model is resolved) and code: the gateway's "
            "error code, or backend_<status> for a backend's own error status.",
            labels=["model", "code"],
        )
        for (model, code), count in list(self.errors.items()):
            errors.add_metric([model, code], count)
        retries = CounterMetricFamily(
            "llmep_gateway_backend_retries",
            "Requests sent again (to the next replica, or on a fresh connection) because the "
            "first send provably never reached the backend: reason connect_failed or not_written.",
            labels=["model", "reason"],
        )
        for (model, reason), count in list(self.retries.items()):
            retries.add_metric([model, reason], count)
        per_key = (
            CounterMetricFamily(
                "llmep_gateway_key_requests",
                "Requests forwarded for an API key, by key name, model ('' before it is resolved) "
                "and code: the HTTP status answered, 499 when the client left first.",
                labels=["key", "model", "code"],
            ),
            CounterMetricFamily(
                "llmep_gateway_key_tokens",
                "Tokens in the usage of an API key's answers, by key name, model and type "
                "(prompt, completion).",
                labels=["key", "model", "type"],
            ),
            CounterMetricFamily(
                "llmep_gateway_key_rate_limited",
                "Requests refused with 429 by an API key's limits, by key name, model and limit "
                "(requests, tokens, daily_tokens).",
                labels=["key", "model", "limit"],
            ),
        )
        for family, counts in zip(per_key, (self.key_requests, self.key_tokens, self.key_limited), strict=True):
            for labels, count in list(counts.items()):
                family.add_metric(list(labels), count)
        depth = GaugeMetricFamily(
            "llmep_gateway_key_queue_depth",
            "Requests of an API key waiting in a saturated model's fair queue, by key name and model.",
            labels=["key", "model"],
        )
        for (key, model), count in list(self.key_queue_depth.items()):
            depth.add_metric([key, model], count)
        waits = HistogramMetricFamily(
            "llmep_gateway_key_queue_wait_seconds",
            "Time an API key's requests waited in a model's fair queue before being forwarded "
            "(0 when the model had room), by key name and model.",
            labels=["key", "model"],
        )
        for (key, model), histogram in list(self.key_queue_waits.items()):
            waits.add_metric([key, model], histogram.cumulative(), histogram.sum)
        routes = GaugeMetricFamily(
            "llmep_gateway_models",
            "Model names in the routing table, by readiness.",
            labels=["ready"],
        )
        routes.add_metric(["true"], self.routes_ready)
        routes.add_metric(["false"], self.routes_not_ready)
        yield from (in_flight, held, duration, ttft, prompt, completion, errors, retries)
        yield from (*per_key, depth, waits, routes)
