"""Restricted pod security for every pod template the operator renders."""

from __future__ import annotations

from typing import Any

from llmep_operator.settings import ScratchSpace

RAY_UID = 1000  # the `ray` user of the official Ray images


def pod_security_context() -> dict[str, Any]:
    return {
        "runAsNonRoot": True,
        "runAsUser": RAY_UID,
        "runAsGroup": RAY_UID,
        "fsGroup": RAY_UID,
        "seccompProfile": {"type": "RuntimeDefault"},
    }


def container_security_context() -> dict[str, Any]:
    return {
        "runAsNonRoot": True,
        "allowPrivilegeEscalation": False,
        "readOnlyRootFilesystem": True,
        "capabilities": {"drop": ["ALL"]},
        "seccompProfile": {"type": "RuntimeDefault"},
    }


# Ray and vLLM write to /tmp, ~/.cache and /dev/shm; with a read-only root those are emptyDirs.
SCRATCH_MOUNTS = [
    {"name": "tmp", "mountPath": "/tmp"},  # noqa: S108 - an emptyDir, not the host's /tmp
    {"name": "home-cache", "mountPath": "/home/ray/.cache"},
    {"name": "dshm", "mountPath": "/dev/shm"},  # noqa: S108 - a memory emptyDir for NCCL
]


def scratch_volumes(scratch: ScratchSpace, memory: str) -> list[dict[str, Any]]:
    """The emptyDirs behind SCRATCH_MOUNTS, each bounded: the disk ones by the operator's scratch
    settings (one endpoint cannot fill a node's disk), /dev/shm by the pod's memory."""
    return [
        {"name": "tmp", "emptyDir": {"sizeLimit": scratch.tmp_size_limit}},
        {"name": "home-cache", "emptyDir": {"sizeLimit": scratch.cache_size_limit}},
        {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": memory}},
    ]
