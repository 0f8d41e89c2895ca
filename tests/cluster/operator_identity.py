"""The operator's identity as the chart declares it: its ServiceAccount and RBAC, rendered with
`helm template` and applied, so the cluster tier exercises exactly the chart's permissions."""

from __future__ import annotations

import subprocess
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "charts" / "llmep"
RBAC_KINDS = {"ServiceAccount", "Role", "RoleBinding", "ClusterRole", "ClusterRoleBinding"}


def helm_path(bin_dir: Path | None) -> str:
    candidate = (bin_dir / "helm") if bin_dir else None
    if candidate and candidate.exists():
        return str(candidate)
    raise AssertionError("helm not found in the rig's bin folder: run `make setup`")


def render_chart(bin_dir: Path | None, release: str, namespace: str, *set_args: str) -> list[dict]:
    args = [helm_path(bin_dir), "template", release, str(CHART), "--namespace", namespace]
    for item in set_args:
        args += ["--set", item]
    out = subprocess.run(args, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, f"helm template failed: {out.stderr}"
    return [doc for doc in yaml.safe_load_all(out.stdout) if doc]


def operator_identity(bin_dir: Path | None, release: str, namespace: str, *set_args: str) -> tuple[str, list[dict]]:
    """(ServiceAccount name, RBAC objects) of the chart's operator."""
    docs = render_chart(bin_dir, release, namespace, *set_args)
    objects = [
        d
        for d in docs
        if d["kind"] in RBAC_KINDS
        and (d["metadata"].get("labels") or {}).get("app.kubernetes.io/component") == "operator"
    ]
    accounts = [d["metadata"]["name"] for d in objects if d["kind"] == "ServiceAccount"]
    assert len(accounts) == 1, f"expected one operator ServiceAccount in the chart, got {accounts}"
    for obj in objects:
        if obj["kind"] in {"ServiceAccount", "Role", "RoleBinding"}:
            obj["metadata"].setdefault("namespace", namespace)
    return accounts[0], objects
