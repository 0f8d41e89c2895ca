"""Restricted pod security for every pod template the operator renders."""

from __future__ import annotations

from typing import Any

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


def writable_volumes() -> dict[str, list[dict[str, Any]]]:
    """Ray and vLLM write to /tmp, ~/.cache and /dev/shm; with a read-only root those are emptyDirs."""
    return {
        "volumes": [
            {"name": "tmp", "emptyDir": {}},
            {"name": "home-cache", "emptyDir": {}},
            {"name": "dshm", "emptyDir": {"medium": "Memory"}},
        ],
        "mounts": [
            {"name": "tmp", "mountPath": "/tmp"},  # noqa: S108 - an emptyDir, not the host's /tmp
            {"name": "home-cache", "mountPath": "/home/ray/.cache"},
            {"name": "dshm", "mountPath": "/dev/shm"},  # noqa: S108 - a memory emptyDir for NCCL
        ],
    }
