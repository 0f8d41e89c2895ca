"""Reading `status.conditions` of any Kubernetes object (an LLMEndpoint, a pod, a RayService):
the one reader for the operator, the CLI and the gateway. Tolerant of missing or malformed
fields, since the gateway and the CLI read objects that anyone with write access may have made."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from llmep_operator.api.models import ConditionStatus


def condition(status: Mapping[str, Any] | None, kind: str) -> dict[str, Any]:
    """The condition of type `kind` in a status block, or {} when there is none."""
    conditions = (status or {}).get("conditions")
    if isinstance(conditions, list):
        for cond in conditions:
            if isinstance(cond, dict) and cond.get("type") == kind:
                return cond
    return {}


def is_true(status: Mapping[str, Any] | None, kind: str) -> bool:
    return condition(status, kind).get("status") == ConditionStatus.TRUE
