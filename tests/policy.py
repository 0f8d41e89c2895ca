"""Security policy for every manifest llmep ships or renders: pod security and RBAC.

`check(objects)` returns a list of `Violation`s; an empty list means the manifests pass.
Used by the unit tier on the chart's output and the operator's children, and reusable by any
tier that has manifests in hand (the reliability tier reads them back from a cluster).

Pod rules, per container of every pod template (Deployments, StatefulSets, DaemonSets, Jobs,
CronJobs, Pods, KubeRay RayService/RayCluster head and worker groups):
  runAsNonRoot true and no runAsUser 0 (the container's setting, else the pod's),
  readOnlyRootFilesystem true, allowPrivilegeEscalation false, not privileged,
  capabilities drop ALL and add nothing, seccomp RuntimeDefault or Localhost;
  per pod: no hostNetwork, hostPID, hostIPC, no hostPath volumes.
RBAC rules: no "*" in verbs, resources or apiGroups of a Role or ClusterRole; no ClusterRole
that lets anyone get, list or watch Secrets; no binding to cluster-admin.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import yaml

WORKLOAD_KINDS = {"Deployment", "StatefulSet", "DaemonSet", "ReplicaSet", "Job"}
SECRET_READ_VERBS = {"get", "list", "watch"}


@dataclass(frozen=True)
class Violation:
    kind: str
    name: str
    where: str
    rule: str

    def __str__(self) -> str:
        return f"{self.kind}/{self.name} {self.where}: {self.rule}"


def load_all(text: str) -> list[dict[str, Any]]:
    """Every non-empty YAML document of a multi-document stream, Lists flattened."""
    objects: list[dict[str, Any]] = []
    for doc in yaml.safe_load_all(text):
        if not doc:
            continue
        if doc.get("kind", "").endswith("List") and isinstance(doc.get("items"), list):
            objects.extend(d for d in doc["items"] if d)
        else:
            objects.append(doc)
    return objects


def pod_specs(obj: dict[str, Any]) -> Iterator[tuple[str, dict[str, Any]]]:
    """(where, pod spec) for each pod template an object carries."""
    kind, spec = obj.get("kind"), obj.get("spec") or {}
    if kind == "Pod":
        yield "spec", spec
    elif kind in WORKLOAD_KINDS:
        yield "spec.template.spec", (spec.get("template") or {}).get("spec") or {}
    elif kind == "CronJob":
        job = (spec.get("jobTemplate") or {}).get("spec") or {}
        yield "spec.jobTemplate.spec.template.spec", (job.get("template") or {}).get("spec") or {}
    elif kind in {"RayService", "RayCluster"}:
        if kind == "RayService":
            cluster, prefix = spec.get("rayClusterConfig") or {}, "spec.rayClusterConfig"
        else:
            cluster, prefix = spec, "spec"
        groups = [("headGroupSpec", cluster.get("headGroupSpec") or {})]
        groups += [(f"workerGroupSpecs[{i}]", g) for i, g in enumerate(cluster.get("workerGroupSpecs") or [])]
        for where, group in groups:
            yield f"{prefix}.{where}.template.spec", (group.get("template") or {}).get("spec") or {}


def _containers(pod: dict[str, Any]) -> Iterator[tuple[str, dict[str, Any]]]:
    for field in ("initContainers", "containers", "ephemeralContainers"):
        for c in pod.get(field) or []:
            yield f"{field}[{c.get('name', '?')}]", c


def check_pod(pod: dict[str, Any]) -> list[tuple[str, str]]:
    """(where, rule) for each pod-security rule the pod spec breaks."""
    found: list[tuple[str, str]] = []
    for flag in ("hostNetwork", "hostPID", "hostIPC"):
        if pod.get(flag):
            found.append((flag, f"{flag} must not be true"))
    for vol in pod.get("volumes") or []:
        if "hostPath" in vol:
            found.append((f"volumes[{vol.get('name', '?')}]", "hostPath volumes are not allowed"))
    psc = pod.get("securityContext") or {}
    containers = list(_containers(pod))
    if not containers:
        found.append(("containers", "pod template has no containers"))
    for where, c in containers:
        sc = c.get("securityContext") or {}
        # A container's setting wins over the pod's.
        effective = {**psc, **sc}.get
        if effective("runAsNonRoot") is not True:
            found.append((where, "runAsNonRoot must be true"))
        if effective("runAsUser") == 0:
            found.append((where, "runAsUser must not be 0"))
        if sc.get("readOnlyRootFilesystem") is not True:
            found.append((where, "readOnlyRootFilesystem must be true"))
        if sc.get("allowPrivilegeEscalation") is not False:
            found.append((where, "allowPrivilegeEscalation must be false"))
        if sc.get("privileged"):
            found.append((where, "privileged must not be true"))
        caps = sc.get("capabilities") or {}
        if "ALL" not in (caps.get("drop") or []):
            found.append((where, "capabilities must drop ALL"))
        if caps.get("add"):
            found.append((where, f"capabilities must add nothing, adds {caps['add']}"))
        seccomp = (effective("seccompProfile") or {}).get("type")
        if seccomp not in ("RuntimeDefault", "Localhost"):
            found.append((where, f"seccompProfile must be RuntimeDefault, is {seccomp!r}"))
    return found


def check_rbac(obj: dict[str, Any]) -> list[tuple[str, str]]:
    found: list[tuple[str, str]] = []
    kind = obj.get("kind")
    if kind in {"Role", "ClusterRole"}:
        for i, rule in enumerate(obj.get("rules") or []):
            where = f"rules[{i}]"
            for field in ("verbs", "resources", "apiGroups", "nonResourceURLs"):
                if "*" in (rule.get(field) or []):
                    found.append((where, f"no wildcard in {field}"))
            core = "" in (rule.get("apiGroups") or [])
            secrets = "secrets" in (rule.get("resources") or [])
            reads = SECRET_READ_VERBS & set(rule.get("verbs") or [])
            if kind == "ClusterRole" and core and secrets and reads:
                found.append((where, f"a ClusterRole must not {sorted(reads)} secrets"))
    if kind in {"RoleBinding", "ClusterRoleBinding"}:
        if (obj.get("roleRef") or {}).get("name") == "cluster-admin":
            found.append(("roleRef", "no binding to cluster-admin"))
    return found


def check(objects: Iterable[dict[str, Any]]) -> list[Violation]:
    violations: list[Violation] = []
    for obj in objects:
        kind = obj.get("kind", "?")
        name = (obj.get("metadata") or {}).get("name", "?")
        for pod_where, pod in pod_specs(obj):
            for where, rule in check_pod(pod):
                violations.append(Violation(kind, name, f"{pod_where}.{where}", rule))
        for where, rule in check_rbac(obj):
            violations.append(Violation(kind, name, where, rule))
    return violations
