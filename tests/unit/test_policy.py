"""Every manifest llmep ships (the chart, all values files) or renders (the operator's children
of every valid fixture) passes the pod-security and RBAC policy in tests/policy.py, and the
policy does report what breaks it."""

from __future__ import annotations

import copy

import pytest

from llmep_operator.api import parse_endpoint
from llmep_operator.render import build_children
from llmep_operator.settings import OperatorSettings
from tests.conftest import VALID_FIXTURES, load_fixture
from tests.helm import CHART_VALUES_FILES, template
from tests.policy import check, pod_specs

VALUES = [None, *CHART_VALUES_FILES]
IDS = ["default", *(p.stem for p in CHART_VALUES_FILES)]


def operator_children(path) -> list[dict]:
    endpoint = parse_endpoint(load_fixture(path))
    return build_children(endpoint, OperatorSettings(), "0c5a1e6e-8f7e-4c1b-9d35-3f1a2b3c4d5e")


@pytest.mark.parametrize("values_file", VALUES, ids=IDS)
def test_chart_manifests_pass_the_policy(values_file):
    objects = template(values_file)
    assert sum(1 for o in objects for _ in pod_specs(o)) == 2  # operator and gateway

    assert [str(v) for v in check(objects)] == []


@pytest.mark.parametrize("path", VALID_FIXTURES, ids=[p.stem for p in VALID_FIXTURES])
def test_operator_rendered_children_pass_the_policy(path):
    children = operator_children(path)
    rayservice = next(c for c in children if c["kind"] == "RayService")
    assert len(list(pod_specs(rayservice))) >= 2  # head and at least one worker group

    assert [str(v) for v in check(children)] == []


@pytest.fixture
def gateway_deployment() -> dict:
    return next(o for o in template() if o["kind"] == "Deployment" and o["metadata"]["name"] == "llmep-gateway")


def rules_of(deployment: dict) -> set[str]:
    return {v.rule for v in check([deployment])}


def test_policy_reports_a_container_without_run_as_non_root(gateway_deployment):
    broken = copy.deepcopy(gateway_deployment)
    pod = broken["spec"]["template"]["spec"]
    del pod["securityContext"]["runAsNonRoot"]
    del pod["containers"][0]["securityContext"]["runAsNonRoot"]

    assert rules_of(broken) == {"runAsNonRoot must be true"}


@pytest.mark.parametrize(
    ("mutate", "rule"),
    [
        (lambda sc, pod: sc.update(readOnlyRootFilesystem=False), "readOnlyRootFilesystem must be true"),
        (lambda sc, pod: sc.pop("allowPrivilegeEscalation"), "allowPrivilegeEscalation must be false"),
        (lambda sc, pod: sc.update(privileged=True), "privileged must not be true"),
        (lambda sc, pod: sc.update(capabilities={"drop": ["NET_RAW"]}), "capabilities must drop ALL"),
        (lambda sc, pod: sc.update(runAsUser=0), "runAsUser must not be 0"),
        (
            lambda sc, pod: (sc.pop("seccompProfile"), pod["securityContext"].pop("seccompProfile")),
            "seccompProfile must be RuntimeDefault, is None",
        ),
        (lambda sc, pod: pod.update(hostNetwork=True), "hostNetwork must not be true"),
        (
            lambda sc, pod: pod["volumes"].append({"name": "h", "hostPath": {"path": "/"}}),
            "hostPath volumes are not allowed",
        ),
    ],
)
def test_policy_reports_each_broken_pod_rule(gateway_deployment, mutate, rule):
    broken = copy.deepcopy(gateway_deployment)
    pod = broken["spec"]["template"]["spec"]
    mutate(pod["containers"][0]["securityContext"], pod)

    assert rules_of(broken) == {rule}


def test_policy_reports_a_broken_operator_worker_group():
    children = operator_children(VALID_FIXTURES[0])
    rayservice = copy.deepcopy(next(c for c in children if c["kind"] == "RayService"))
    worker = rayservice["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]["template"]["spec"]
    worker["containers"][0]["securityContext"]["capabilities"] = {"add": ["SYS_ADMIN"]}

    violations = check([rayservice])
    assert {v.rule for v in violations} == {
        "capabilities must drop ALL",
        "capabilities must add nothing, adds ['SYS_ADMIN']",
    }
    assert all(v.where.startswith("spec.rayClusterConfig.workerGroupSpecs[0]") for v in violations)


def role(kind: str, rules: list[dict]) -> dict:
    return {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": kind, "metadata": {"name": "r"}, "rules": rules}


def test_policy_reports_a_cluster_role_that_lists_secrets():
    violations = check([role("ClusterRole", [{"apiGroups": [""], "resources": ["secrets"], "verbs": ["list"]}])])
    assert [v.rule for v in violations] == ["a ClusterRole must not ['list'] secrets"]


def test_policy_allows_secrets_in_a_namespaced_role_only():
    rules = [{"apiGroups": [""], "resources": ["secrets"], "verbs": ["get", "list", "watch"]}]
    assert check([role("Role", rules)]) == []
    assert check([role("ClusterRole", rules)]) != []


@pytest.mark.parametrize("field", ["verbs", "resources", "apiGroups"])
def test_policy_reports_wildcards(field):
    rule = {"apiGroups": ["apps"], "resources": ["deployments"], "verbs": ["get"]}
    rule[field] = ["*"]
    violations = check([role("Role", [rule])])
    assert [v.rule for v in violations] == [f"no wildcard in {field}"]


def test_policy_reports_a_binding_to_cluster_admin():
    binding = {
        "kind": "ClusterRoleBinding",
        "metadata": {"name": "b"},
        "roleRef": {"kind": "ClusterRole", "name": "cluster-admin"},
    }
    assert [v.rule for v in check([binding])] == ["no binding to cluster-admin"]
