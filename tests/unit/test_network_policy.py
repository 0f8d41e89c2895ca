"""The NetworkPolicy rendered per endpoint (operator setting network_policy): Ray's ports only
between the endpoint's own pods; the Serve port from the gateway, KubeRay and the namespaces the
spec allows; the dashboard (whose job API runs code) from KubeRay only."""

from __future__ import annotations

import pytest

from llmep_operator import naming
from llmep_operator.api import parse_endpoint
from llmep_operator.render import build_children
from llmep_operator.settings import OperatorSettings
from tests.conftest import FIXTURES, load_fixture

pytestmark = pytest.mark.unit

GATEWAY_LABELS = {"app.kubernetes.io/component": "gateway", "app.kubernetes.io/instance": "llmep"}
NETWORK_POLICY = {
    "enabled": True,
    "gateway_namespace": "llmep-system",
    "gateway_pod_labels": GATEWAY_LABELS,
    "kuberay_namespace": "kuberay-system",
}
ON = OperatorSettings(network_policy=NETWORK_POLICY)


def _endpoint(**spec_overrides):
    manifest = load_fixture(FIXTURES / "valid" / "minimal.yaml")
    manifest["metadata"]["namespace"] = "team-a"
    manifest["spec"].update(spec_overrides)
    return parse_endpoint(manifest)


def _policy(children: list[dict]) -> dict:
    (policy,) = [c for c in children if c["kind"] == "NetworkPolicy"]
    return policy


def _who_reaches(policy: dict, port: int) -> list[dict]:
    """The peers allowed on `port` (rules without ports allow every port)."""
    peers = []
    for rule in policy["spec"]["ingress"]:
        ports = [p["port"] for p in rule.get("ports", [])]
        if not ports or port in ports:
            peers.extend(rule["from"])
    return peers


def test_off_by_default():
    assert not [c for c in build_children(_endpoint(), OperatorSettings()) if c["kind"] == "NetworkPolicy"]


def test_policy_comes_first_and_selects_only_this_endpoints_pods():
    children = build_children(_endpoint(), ON, owner_uid="uid-1")
    assert children[0]["kind"] == "NetworkPolicy"  # applied before any pod can exist
    policy = _policy(children)
    endpoint_name = policy["metadata"]["labels"][naming.ENDPOINT_LABEL]
    assert policy["metadata"]["name"] == naming.network_policy_name(endpoint_name)
    assert policy["metadata"]["ownerReferences"][0]["uid"] == "uid-1"
    assert policy["spec"]["podSelector"] == {"matchLabels": {naming.ENDPOINT_LABEL: endpoint_name}}
    assert policy["spec"]["policyTypes"] == ["Ingress"]


@pytest.mark.parametrize("port", [6379, 8265, 10001, 52365])
def test_ray_ports_answer_only_the_endpoints_pods_and_the_dashboard_kuberay(port):
    policy = _policy(build_children(_endpoint(), ON))
    own = {"podSelector": policy["spec"]["podSelector"]}
    kuberay = {
        "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "kuberay-system"}},
        "podSelector": {"matchLabels": {"app.kubernetes.io/component": "kuberay-operator"}},
    }
    expected = [own, kuberay] if port in (8265, 52365) else [own]
    assert _who_reaches(policy, port) == expected


def test_serve_port_answers_the_gateway_kuberay_and_the_allowed_namespaces_only():
    policy = _policy(build_children(_endpoint(access={"allowedNamespaces": ["batch-jobs"]}), ON))
    peers = _who_reaches(policy, 8000)
    gateway = {
        "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "llmep-system"}},
        "podSelector": {"matchLabels": GATEWAY_LABELS},
    }
    assert gateway in peers
    assert {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "batch-jobs"}}} in peers
    # Nothing else: no rule opens the Serve port to every namespace.
    assert {"namespaceSelector": {}} not in peers
    assert len(peers) == 4  # own pods, gateway, KubeRay, batch-jobs


def test_metrics_port_is_open_for_scraping_unless_turned_off():
    assert {"namespaceSelector": {}} in _who_reaches(_policy(build_children(_endpoint(), ON)), 8080)
    closed = OperatorSettings(network_policy={**NETWORK_POLICY, "metrics_from_anywhere": False})
    assert {"namespaceSelector": {}} not in _who_reaches(_policy(build_children(_endpoint(), closed)), 8080)


def test_bad_allowed_namespace_is_refused_naming_the_field():
    with pytest.raises(Exception, match="spec.access.allowedNamespaces"):
        _endpoint(access={"allowedNamespaces": ["Not_A_Namespace"]})
