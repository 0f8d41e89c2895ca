"""The real API server admits every valid fixture and refuses every invalid one, with a message
that names the field (schema and CEL rules), and applies the schema's defaults."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from kubernetes.client.rest import ApiException

from llmep_operator.api import GROUP, PLURAL, VERSION
from tests.conftest import INVALID_FIXTURES, VALID_FIXTURES, expected_rejection, load_fixture

pytestmark = pytest.mark.cluster
REPO = Path(__file__).resolve().parents[2]


def _create(cluster, namespace, body):
    body["metadata"].pop("namespace", None)
    # Strict field validation, as kubectl asks for it, so unknown fields are errors.
    return cluster.custom.create_namespaced_custom_object(
        GROUP, VERSION, namespace, PLURAL, body, field_validation="Strict"
    )


@pytest.mark.parametrize("path", VALID_FIXTURES, ids=lambda p: p.stem)
def test_valid_fixture_is_admitted_with_defaults(cluster, namespace, crd, path):
    created = _create(cluster, namespace, load_fixture(path))
    spec = created["spec"]
    assert spec["engine"]["tensorParallelSize"] >= 1
    assert spec["autoscaling"]["targetQueueDepth"] >= 1
    assert spec["resources"]["profile"]


@pytest.mark.parametrize("path", INVALID_FIXTURES, ids=lambda p: p.stem)
def test_invalid_fixture_is_refused_naming_the_field(cluster, namespace, crd, path):
    field = expected_rejection(path)
    with pytest.raises(ApiException) as refused:
        _create(cluster, namespace, load_fixture(path))
    assert refused.value.status in (400, 422), refused.value.body
    # The whole path, as the API server names it: a leaf such as "name" is in every Status body.
    assert field in json.loads(refused.value.body)["message"], refused.value.body


def test_storage_class_is_immutable(cluster, namespace, crd):
    body = load_fixture(REPO / "tests" / "fixtures" / "valid" / "qwen-7b-h100.yaml")
    created = _create(cluster, namespace, body)
    created["spec"]["cache"]["storageClassName"] = "other"
    with pytest.raises(ApiException) as refused:
        cluster.custom.replace_namespaced_custom_object(
            GROUP, VERSION, namespace, PLURAL, created["metadata"]["name"], created
        )
    assert "storageClassName is immutable" in refused.value.body


def test_kubectl_explain_reads_the_descriptions(cluster, crd):
    text = cluster.kubectl("explain", "llmendpoint.spec.autoscaling.targetQueueDepth")
    assert "target_ongoing_requests" in text
