"""The serving path inside an endpoint's Ray cluster, as environment for every Ray process.

Ray Serve reads these switches once, when it is imported, in every Ray process (head, workers
and the task that builds the application), so they are container environment, never the
application's runtime_env. `llmep serve` exports the same variables before it starts Ray.
"""

from __future__ import annotations

from llmep_operator.api import LLMEndpoint, RoutingPolicy
from llmep_operator.settings import OperatorSettings

# Requests go HAProxy -> the replica that serves vLLM's own HTTP app: no Python proxy, no
# OpenAI ingress replica and no Ray object per token (Ray Serve 2.60).
DIRECT_PATH_ENV = {
    "RAY_SERVE_ENABLE_HA_PROXY": "1",
    "RAY_SERVE_LLM_ENABLE_DIRECT_STREAMING": "1",
    # The replica's handler runs on its own event loop: one thread hand-off fewer per chunk.
    "RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD": "0",
}
HAPROXY_THREADS_ENV = "RAY_SERVE_HAPROXY_NBTHREAD"
# Body-aware routers (prefix affinity) need the prompt, and LoRA routing the adapter named in
# `model`: HAProxy then hands the body to the router (Ray refuses LoRA on the direct path without).
FORWARD_BODY_ENV = "RAY_SERVE_INGRESS_REQUEST_ROUTER_FORWARD_BODY"


def is_direct(settings: OperatorSettings) -> bool:
    return settings.serving_path == "direct"


def ray_process_env(endpoint: LLMEndpoint, settings: OperatorSettings) -> dict[str, str]:
    """Environment every Ray process of this endpoint needs for the configured serving path."""
    if not is_direct(settings):
        return {}
    env = {**DIRECT_PATH_ENV, HAPROXY_THREADS_ENV: str(settings.haproxy_threads)}
    if endpoint.spec.routing.policy != RoutingPolicy.LEAST_LOADED or endpoint.spec.lora is not None:
        env[FORWARD_BODY_ENV] = "1"
    return env
