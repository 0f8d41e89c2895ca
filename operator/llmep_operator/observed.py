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
# Read from memory without parsing: which version a child is, whether an endpoint is going.
_PLAIN_METADATA = ("resourceVersion", "deletionTimestamp")


def _kept(body: Mapping[str, Any], fields: Mapping[str, Any]) -> dict[str, Any]:
    """`fields` of `body` and its metadata (less managedFields) as compact JSON text, beside the
    few metadata fields read without parsing. One string per object holds a fraction of the
    memory of the parsed dicts and does not pin the heap's small-object pages."""
    meta = body.get("metadata") or {}
    kept_meta = {key: meta[key] for key in _KEPT_METADATA if key in meta}
    return {
        "metadata": {key: meta[key] for key in _PLAIN_METADATA if key in meta},
        "bodyJSON": json.dumps({**fields, "metadata": kept_meta}, separators=(",", ":")),
    }


def slim(body: Mapping[str, Any]) -> dict[str, Any]:
    """An LLMEndpoint as kept in memory (parsed again by `whole` when a pass reads it)."""
    return _kept(body, {key: value for key, value in body.items() if key != "metadata"})


def slim_child(body: Mapping[str, Any]) -> dict[str, Any]:
    """A child as kept in memory: what drift checks and status read."""
    fields = {key: body.get(key) for key in ("apiVersion", "kind")}
    return _kept(body, {**fields, "spec": body.get("spec") or {}, "status": body.get("status") or {}})


def whole(kept: Mapping[str, Any]) -> dict[str, Any]:
    """An object kept by `slim` or `slim_child`, as the API server returned it (less managedFields)."""
    body: dict[str, Any] = json.loads(kept["bodyJSON"])
    return body


def slim_pod(body: Mapping[str, Any]) -> dict[str, Any]:
    """A pod as status needs it: its name, labels, deletion, phase (a started Ray worker is loading
    the model), conditions and its containers' states (why one waits, or the message it ended
    with: a fill pod's failure), not its spec."""
    meta = body.get("metadata") or {}
    kept_meta = {key: meta[key] for key in ("name", "labels", "deletionTimestamp") if key in meta}
    status = body.get("status") or {}
    kept_status: dict[str, Any] = {"conditions": status.get("conditions") or []}
    if status.get("phase"):
        kept_status["phase"] = status["phase"]
    if status.get("containerStatuses"):
        kept_status["containerStatuses"] = [
            {"name": c.get("name"), "state": c.get("state") or {}} for c in status["containerStatuses"]
        ]
    return {"metadata": kept_meta, "status": kept_status}


@dataclass(frozen=True)
class Seen:
    """One endpoint's children and pods as the watches last showed them."""

    children: Mapping[str, dict[str, Any]] = field(default_factory=dict)  # by kind, as `slim_child` keeps them
    pods: list[dict[str, Any]] = field(default_factory=list)
    # The cache-fill Jobs, as `slim_child` keeps them: the current one, and any of an earlier source.
    jobs: list[dict[str, Any]] = field(default_factory=list)

    def child(self, kind: str) -> dict[str, Any] | None:
        """The child of `kind` as the API server returned it (less managedFields), or None."""
        kept = self.children.get(kind)
        return None if kept is None else whole(kept)

    @property
    def rayservice(self) -> dict[str, Any] | None:
        return self.child("RayService")

    def fill_jobs(self) -> list[dict[str, Any]]:
        return [whole(kept) for kept in self.jobs]

    def job(self, name: str) -> dict[str, Any] | None:
        return next((job for job in self.fill_jobs() if job["metadata"].get("name") == name), None)


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
