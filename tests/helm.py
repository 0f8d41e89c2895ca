"""Find and run helm for the tests: the rig's pinned build first, then $LLMEP_HELM, then PATH.

The rig's binaries live where `hack/local-cluster build` puts them (the same lookup as
tests/cluster/conftest.py): ${LLMEP_CACHE:-${XDG_CACHE_HOME:-~/.cache}/llmep}/rig/bin.
A missing helm is a failure, never a skip: CI always has it (`make setup` builds it).
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.policy import load_all

REPO_ROOT = Path(__file__).resolve().parents[1]
CHART = REPO_ROOT / "charts" / "llmep"
CHART_VALUES_FILES = sorted((CHART / "ci").glob("*.yaml"))


def rig_bin_dir() -> Path:
    base = os.environ.get("LLMEP_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "llmep"
    )
    return Path(base) / "rig" / "bin"


def helm_binary() -> str:
    explicit = os.environ.get("LLMEP_HELM")
    if explicit:
        if not Path(explicit).is_file():
            pytest.fail(f"LLMEP_HELM={explicit} is not a file", pytrace=False)
        return explicit
    pinned = rig_bin_dir() / "helm"
    if pinned.is_file():
        return str(pinned)
    found = shutil.which("helm")
    if found:
        return found
    pytest.fail(
        f"helm not found (looked at $LLMEP_HELM, {pinned} and PATH): run `make setup` "
        "(or `hack/local-cluster build helm`) to build the pinned helm",
        pytrace=False,
    )


def helm(
    *args: str, kubeconfig: Path | None = None, check: bool = True, timeout: float = 300
) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ)
    if kubeconfig is not None:
        env["KUBECONFIG"] = str(kubeconfig)
    # Keep helm's own cache and config out of the home directory and the work tree.
    for var, sub in (("HELM_CACHE_HOME", "cache"), ("HELM_CONFIG_HOME", "config"), ("HELM_DATA_HOME", "data")):
        env.setdefault(var, str(rig_bin_dir().parent / "helm-home" / sub))
    proc = subprocess.run([helm_binary(), *args], capture_output=True, text=True, env=env, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(
            f"helm {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
        )
    return proc


def versions() -> dict[str, str]:
    """The pins of hack/versions.env (KEY=VALUE lines)."""
    pins = {}
    for line in (REPO_ROOT / "hack" / "versions.env").read_text().splitlines():
        key, sep, value = line.partition("=")
        if sep and not key.strip().startswith("#"):
            pins[key.strip()] = value.strip().strip('"')
    return pins


def kube_version() -> str:
    """The rig's Kubernetes version (hack/versions.env), for commands that render offline.

    `helm template` and `helm lint` otherwise assume the Kubernetes version compiled into helm,
    which a build without helm's chartutil version ldflags reports as v1.20.0.
    """
    version = versions().get("KUBERNETES_VERSION")
    if not version:
        raise AssertionError("hack/versions.env has no KUBERNETES_VERSION")
    return version


def value_args(values_file: Path | None = None, sets: dict[str, str] | None = None) -> list[str]:
    args = ["-f", str(values_file)] if values_file else []
    for key, value in (sets or {}).items():
        args += ["--set", f"{key}={value}"]
    return args


def template(
    values_file: Path | None = None,
    *,
    namespace: str = "llmep-system",
    release: str = "llmep",
    sets: dict[str, str] | None = None,
    chart: Path = CHART,
) -> list[dict]:
    """`helm template` of the chart, parsed into objects."""
    out = helm(
        "template",
        release,
        str(chart),
        "--namespace",
        namespace,
        "--kube-version",
        kube_version(),
        *value_args(values_file, sets),
    ).stdout
    return load_all(out)
