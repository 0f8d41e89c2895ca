"""The cache-fill Job (cache.prefetch): `llmep fetch` copies the weights into the cache volume
before the RayService exists, so replicas read them from there. The Job runs the program's text
(`weights_fetch.py`, the standard library plus boto3 or huggingface_hub) with the serving
image's python, which has both: no serving image needs llmep installed."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from llmep_operator import naming, weights_fetch
from llmep_operator.render.plan import CACHE_MOUNT, CACHE_VOLUME, CacheFill, ServingPlan, cache_volume
from llmep_operator.render.security import container_security_context, pod_security_context
from llmep_operator.settings import OperatorSettings

# A copy moves bytes; it needs no more memory than this, whatever the model's size.
FILL_MEMORY = "2Gi"
# Tries of the fill pod: a transient store or network error gets two more.
FILL_BACKOFF_LIMIT = 2
FILL_CONTAINER = "fill"
FETCH_PROGRAM = Path(weights_fetch.__file__).read_text()


def fill_job(
    plan: ServingPlan, fill: CacheFill, settings: OperatorSettings, metadata: dict[str, Any]
) -> dict[str, Any]:
    """The Job named in `metadata` (the children's labels and owner), filling `fill.folder`."""
    labels = {**metadata["labels"], naming.COMPONENT_LABEL: naming.FILL_COMPONENT}
    command = ["python", "-c", FETCH_PROGRAM, fill.source, fill.folder]
    if fill.revision:
        command += ["--revision", fill.revision]
    env = [
        *plan.env,
        # Only fetch's JSON lines in the log: the operator reads the last one into status.
        {"name": "HF_HUB_DISABLE_PROGRESS_BARS", "value": "1"},
        *plan.secret_env,
    ]
    container: dict[str, Any] = {
        "name": FILL_CONTAINER,
        "image": plan.image,
        "command": command,
        "env": env,
        "resources": {
            "requests": {"cpu": settings.fill_cpu, "memory": FILL_MEMORY},
            "limits": {"memory": FILL_MEMORY},
        },
        "securityContext": container_security_context(),
        # fetch writes why it failed there; a crash without a message leaves its last log lines.
        "terminationMessagePolicy": "FallbackToLogsOnError",
        "volumeMounts": [
            {"name": CACHE_VOLUME, "mountPath": CACHE_MOUNT},
            {"name": "tmp", "mountPath": "/tmp"},  # noqa: S108 - an emptyDir, not the host's /tmp
        ],
    }
    if plan.secret_env_from:
        container["envFrom"] = list(plan.secret_env_from)
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {**metadata, "labels": labels},
        "spec": {
            "backoffLimit": FILL_BACKOFF_LIMIT,
            "template": {
                "metadata": {"labels": labels},
                "spec": {
                    "restartPolicy": "Never",
                    "automountServiceAccountToken": False,
                    "securityContext": pod_security_context(),
                    "containers": [container],
                    "volumes": [
                        cache_volume(plan.name),
                        {"name": "tmp", "emptyDir": {"sizeLimit": settings.scratch.tmp_size_limit}},
                    ],
                },
            },
        },
    }
