"""What the operator's watches show, kept in memory: the parts of each object it reads.

The handlers keep kopf indexes of LLMEndpoints and of their labelled children and pods; the
reconciler reads them through `Seen` instead of asking the API server on every event. No kopf
in here.
"""

from __future__ import annotations

import json
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
    """An LLMEndpoint as kept in memory: everything but managedFields."""
    kept = {key: value for key, value in body.items() if key != "metadata"}
    kept["metadata"] = _metadata(body)
    return kept


def slim_child(body: Mapping[str, Any]) -> dict[str, Any]:
    """A child as kept in memory: its spec as compact JSON text (a fifth of the memory of the
    parsed dicts; it is parsed only when a drift check compares it), without managedFields."""
    return {
        "apiVersion": body.get("apiVersion"),
        "kind": body.get("kind"),
        "metadata": _metadata(body),
        "status": body.get("status") or {},
        "specJSON": json.dumps(body.get("spec") or {}, separators=(",", ":")),
    }


def slim_pod(body: Mapping[str, Any]) -> dict[str, Any]:
    """A pod as status needs it: its name, labels, deletion and conditions (not its spec)."""
    meta = body.get("metadata") or {}
    kept_meta = {key: meta[key] for key in ("name", "labels", "deletionTimestamp") if key in meta}
    conditions = (body.get("status") or {}).get("conditions") or []
    return {"metadata": kept_meta, "status": {"conditions": conditions}}


@dataclass(frozen=True)
class Seen:
    """One endpoint's children and pods as the watches last showed them."""

    children: Mapping[str, dict[str, Any]] = field(default_factory=dict)  # by kind, as `slim_child` keeps them
    pods: list[dict[str, Any]] = field(default_factory=list)

    def child(self, kind: str) -> dict[str, Any] | None:
        """The child of `kind` as the API server returned it (less managedFields), or None."""
        kept = self.children.get(kind)
        if kept is None:
            return None
        whole = {key: value for key, value in kept.items() if key != "specJSON"}
        whole["spec"] = json.loads(kept["specJSON"])
        return whole

    @property
    def rayservice(self) -> dict[str, Any] | None:
        return self.child("RayService")


# (namespace, endpoint name) -> what the watches show for it.
Look = Callable[[str, str], Seen]


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
