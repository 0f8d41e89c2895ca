"""LLMEndpoint helpers for tests in which no operator runs: the test writes status itself."""

from __future__ import annotations

from typing import Any, Literal

from llmep_operator.api import GROUP, PLURAL, VERSION


def set_endpoint_status(
    cluster: Any,
    namespace: str,
    name: str,
    *,
    url: str,
    ready: bool,
    reason: str | None = None,
    message: str = "",
    models: list[str] | None = None,
    generation: int | Literal["current"] | None = None,
) -> None:
    """Patch the endpoint's status subresource as the operator would write it.

    One Ready condition (`reason` defaults to Serving, or ScaledToZero when not ready), one
    desired replica (ready when `ready`), `models` (default: the endpoint's name) and `url`.
    `generation` is written as observedGeneration: a number, or "current" for the endpoint's
    metadata.generation now; None leaves observedGeneration out.
    """
    if generation == "current":
        generation = cluster.custom.get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name)["metadata"][
            "generation"
        ]
    status: dict[str, Any] = {} if generation is None else {"observedGeneration": generation}
    status.update(
        {
            "url": url,
            "models": [name] if models is None else models,
            "replicas": {"desired": 1, "ready": 1 if ready else 0},
            "conditions": [
                {
                    "type": "Ready",
                    "status": "True" if ready else "False",
                    "reason": ("Serving" if ready else "ScaledToZero") if reason is None else reason,
                    "message": message,
                    "lastTransitionTime": "2026-01-01T00:00:00Z",
                }
            ],
        }
    )
    cluster.custom.patch_namespaced_custom_object_status(GROUP, VERSION, namespace, PLURAL, name, {"status": status})
