"""Every manifest llmep ships or renders passes the pod-security and RBAC policy of
tests/policy.py: the chart with its default values and each values file under charts/llmep/ci/,
and the operator's children of every example in examples/ and every valid fixture. The policy is
then shown to bite on those same real manifests: breaking any one rule in a rendered object
makes exactly that rule fail (a mutation check, so a policy that silently passes everything is
caught)."""

from __future__ import annotations

import copy
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml

from llmep_operator.api import parse_endpoint
from llmep_operator.render import build_children
from llmep_operator.settings import OperatorSettings
from tests.conftest import VALID_FIXTURES
from tests.helm import CHART_VALUES_FILES, template
from tests.policy import check, pod_specs

REPO = Path(__file__).resolve().parents[2]
EXAMPLES = sorted((REPO / "examples").glob("*.yaml"))
ENDPOINT_FILES = [*EXAMPLES, *VALID_FIXTURES]
UID = "0c5a1e6e-8f7e-4c1b-9d35-3f1a2b3c4d5e"


def _children(path: Path) -> list[dict]:
    docs = [d for d in yaml.safe_load_all(path.read_text()) if d and d.get("kind") == "LLMEndpoint"]
    assert docs, f"{path} holds no LLMEndpoint"
    return [c for d in docs for c in build_children(parse_endpoint(d), OperatorSettings(), UID)]


@pytest.fixture(scope="module")
def everything() -> dict[str, list[dict]]:
    rendered = {"chart:default": template()}
    rendered |= {f"chart:{p.name}": template(p) for p in CHART_VALUES_FILES}
    rendered |= {f"operator:{p.relative_to(REPO)}": _children(p) for p in ENDPOINT_FILES}
    return rendered


def test_every_rendered_manifest_passes_the_policy(everything):
    pods = sum(1 for objs in everything.values() for o in objs for _ in pod_specs(o))
    rbac = sum(1 for objs in everything.values() for o in objs if o["kind"] in {"Role", "ClusterRole"})
    print(f"\npolicy: {len(everything)} renderings, {pods} pod templates, {rbac} (Cluster)Roles checked")
    assert len(everything) == 1 + len(CHART_VALUES_FILES) + len(ENDPOINT_FILES)
    assert pods >= 2 * len(everything) and rbac >= 2
    violations = {name: [str(v) for v in check(objs)] for name, objs in everything.items()}
    assert {name: v for name, v in violations.items() if v} == {}


Mutation = Callable[[dict, dict], object]
POD_MUTATIONS: dict[str, Mutation] = {
    "runAsNonRoot must be true": lambda c, p: c.update(runAsNonRoot=False),
    "runAsUser must not be 0": lambda c, p: c.update(runAsUser=0),
    "readOnlyRootFilesystem must be true": lambda c, p: c.update(readOnlyRootFilesystem=False),
    "allowPrivilegeEscalation must be false": lambda c, p: c.update(allowPrivilegeEscalation=True),
    "privileged must not be true": lambda c, p: c.update(privileged=True),
    "capabilities must drop ALL": lambda c, p: c.update(capabilities={"drop": ["NET_RAW"]}),
    "seccompProfile must be RuntimeDefault, is 'Unconfined'": lambda c, p: c.update(
        seccompProfile={"type": "Unconfined"}
    ),
    "hostNetwork must not be true": lambda c, p: p.update(hostNetwork=True),
    "hostPID must not be true": lambda c, p: p.update(hostPID=True),
    "hostPath volumes are not allowed": lambda c, p: p.setdefault("volumes", []).append(
        {"name": "h", "hostPath": {"path": "/"}}
    ),
}


@pytest.mark.parametrize("rule", sorted(POD_MUTATIONS))
def test_breaking_one_pod_rule_in_any_rendered_pod_fails_exactly_that_rule(everything, rule):
    broken_count = 0
    for name, objs in everything.items():
        for index, obj in enumerate(objs):
            for where, _ in pod_specs(obj):
                broken = copy.deepcopy(obj)
                pod = dict(pod_specs(broken))[where]
                POD_MUTATIONS[rule](pod["containers"][0].setdefault("securityContext", {}), pod)
                found = {v.rule for v in check([broken])}
                assert found == {rule}, f"{name} object {index} at {where}: {found}"
                broken_count += 1
    assert broken_count >= 2 * len(everything)


@pytest.mark.parametrize(
    ("mutate", "rule"),
    [
        (lambda r: r.update(verbs=["*"]), "no wildcard in verbs"),
        (lambda r: r.update(resources=["*"]), "no wildcard in resources"),
        (lambda r: r.update(apiGroups=["*"]), "no wildcard in apiGroups"),
    ],
)
def test_breaking_an_rbac_rule_in_the_charts_roles_fails(everything, mutate, rule):
    roles = [o for objs in everything.values() for o in objs if o["kind"] in {"Role", "ClusterRole"}]
    for role in roles:
        broken = copy.deepcopy(role)
        mutate(broken["rules"][0])
        assert rule in {v.rule for v in check([broken])}, role["metadata"]["name"]


def test_a_chart_cluster_role_that_reads_secrets_fails(everything):
    cluster_roles = [o for objs in everything.values() for o in objs if o["kind"] == "ClusterRole"]
    assert cluster_roles
    for role in cluster_roles:
        broken = copy.deepcopy(role)
        broken["rules"].append({"apiGroups": [""], "resources": ["secrets"], "verbs": ["list", "watch"]})
        assert {v.rule for v in check([broken])} == {"a ClusterRole must not ['list', 'watch'] secrets"}
