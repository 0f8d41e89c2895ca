"""Carry the worker group's minReplicas/maxReplicas from the RayService to its running RayClusters.

KubeRay hashes a RayService's cluster spec without the worker groups' replica bounds, so a
change of `autoscaling.minReplicas`/`maxReplicas` alone neither upgrades nor updates the running
RayCluster: the Ray autoscaler would keep the old bounds (and never scale to zero). The operator
patches the bounds on the active and pending RayClusters itself.
"""

from __future__ import annotations

from typing import Any

Bounds = tuple[int, int]


def wanted_bounds(rayservice: dict[str, Any]) -> dict[str, Bounds]:
    """groupName -> (minReplicas, maxReplicas) as the RayService asks for them."""
    groups = ((rayservice.get("spec") or {}).get("rayClusterConfig") or {}).get("workerGroupSpecs") or []
    return {g["groupName"]: (g.get("minReplicas", 0), g.get("maxReplicas", 0)) for g in groups}


def cluster_names(rayservice: dict[str, Any]) -> list[str]:
    """The RayClusters KubeRay runs for this RayService: the active one and, mid-upgrade, the pending one."""
    status = rayservice.get("status") or {}
    names = [(status.get(key) or {}).get("rayClusterName") for key in ("activeServiceStatus", "pendingServiceStatus")]
    return [name for name in names if name]


def bounds_patch(cluster: dict[str, Any], wanted: dict[str, Bounds]) -> list[dict[str, Any]]:
    """A JSON patch that sets the wanted bounds (replicas clamped into them); [] when nothing differs.

    Each change is guarded by a `test` of the group's name, so a reordered list fails the patch
    instead of changing the wrong group."""
    ops: list[dict[str, Any]] = []
    for index, group in enumerate((cluster.get("spec") or {}).get("workerGroupSpecs") or []):
        name = group.get("groupName")
        if name not in wanted:
            continue
        low, high = wanted[name]
        replicas = group.get("replicas", low)
        changes = {
            "minReplicas": (group.get("minReplicas"), low),
            "maxReplicas": (group.get("maxReplicas"), high),
            "replicas": (replicas, min(max(replicas, low), high)),
        }
        changed = [(field, new) for field, (old, new) in changes.items() if old != new]
        if not changed:
            continue
        base = f"/spec/workerGroupSpecs/{index}"
        ops.append({"op": "test", "path": f"{base}/groupName", "value": name})
        ops.extend({"op": "add", "path": f"{base}/{field}", "value": new} for field, new in changed)
    return ops
