"""What the operator's watches show, kept in memory: the parts of each object it reads.

The handlers keep kopf indexes of LLMEndpoints and of their labelled children and pods; the
reconciler reads them through `Seen` instead of asking the API server on every event. No kopf
in here.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

# The object metadata the reconciler reads; managedFields, often the largest part, is dropped.
_KEPT_METADATA = (
    "name",
    "namespace",
    "uid",
    "generation",
    "resourceVersion",
    "labels",
    "annotations",
    "ownerReferences",
    "deletionTimestamp",
)


def _metadata(body: Mapping[str, Any]) -> dict[str, Any]:
    meta = body.get("metadata") or {}
    return {key: meta[key] for key in _KEPT_METADATA if key in meta}


def slim(body: Mapping[str, Any]) -> dict[str, Any]:
    """An LLMEndpoint or a child as kept in memory: everything but managedFields."""
    kept = {key: value for key, value in body.items() if key != "metadata"}
    kept["metadata"] = _metadata(body)
    return kept


def slim_pod(body: Mapping[str, Any]) -> dict[str, Any]:
    """A pod as status needs it: its name, labels, deletion and conditions (not its spec)."""
    meta = body.get("metadata") or {}
    kept_meta = {key: meta[key] for key in ("name", "labels", "deletionTimestamp") if key in meta}
    conditions = (body.get("status") or {}).get("conditions") or []
    return {"metadata": kept_meta, "status": {"conditions": conditions}}


@dataclass(frozen=True)
class Seen:
    """One endpoint's children and pods as the watches last showed them."""

    children: Mapping[str, dict[str, Any]] = field(default_factory=dict)  # by kind
    pods: list[dict[str, Any]] = field(default_factory=list)

    @property
    def rayservice(self) -> dict[str, Any] | None:
        return self.children.get("RayService")


# (namespace, endpoint name) -> what the watches show for it.
Look = Callable[[str, str], Seen]


def nothing_seen(namespace: str, name: str) -> Seen:
    """For a reconcile that has no watches behind it (a one-off run, a test): nothing is known."""
    return Seen()


def covers(live: Any, wanted: Any) -> bool:
    """Whether `live` holds every field of `wanted` with the same value.

    Fields the API server adds (defaults, status, its own metadata) are ignored; a list must
    have the same length with each item covered, as server-side apply replaces atomic lists and
    merges keyed ones item by item."""
    if isinstance(wanted, Mapping):
        return isinstance(live, Mapping) and all(
            value is None or (key in live and covers(live[key], value)) for key, value in wanted.items()
        )
    if isinstance(wanted, list):
        return (
            isinstance(live, list)
            and len(live) == len(wanted)
            and all(covers(item, want) for item, want in zip(live, wanted, strict=True))
        )
    return bool(live == wanted)
