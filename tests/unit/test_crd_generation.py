"""The generated CRD is structural, documented field by field, and `--check` catches drift."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import yaml

from llmep_operator.api import crdgen
from tests.conftest import REPO_ROOT

pytestmark = pytest.mark.unit


def _walk(node, path="spec"):
    yield path, node
    for name, prop in node.get("properties", {}).items():
        yield from _walk(prop, f"{path}.{name}")
    if isinstance(node.get("items"), dict):
        yield from _walk(node["items"], f"{path}[]")


@pytest.fixture(scope="module")
def crd():
    return yaml.safe_load((REPO_ROOT / crdgen.CRD_PATH).read_text())


def _root(crd):
    return crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]


def test_every_spec_and_status_field_has_a_description(crd):
    root = _root(crd)
    missing = [
        path
        for top in ("spec", "status")
        for path, node in _walk(root["properties"][top], top)
        if not path.endswith("[]") and not node.get("description")
    ]
    assert missing == []


def test_schema_is_structural(crd):
    text = yaml.safe_dump(crd)
    assert "$ref" not in text and "anyOf" not in text and "allOf" not in text
    for path, node in _walk(_root(crd)):
        assert "type" in node or node.get("x-kubernetes-preserve-unknown-fields"), path
        assert not ("properties" in node and "additionalProperties" in node), path


def test_names_columns_and_subresources(crd):
    spec = crd["spec"]
    assert crd["metadata"]["name"] == "llmendpoints.llmep.io"
    assert spec["names"]["shortNames"] == ["llmep"]
    version = spec["versions"][0]
    assert version["subresources"] == {"status": {}}
    columns = [c["name"] for c in version["additionalPrinterColumns"]]
    for wanted in ("Model", "Profile", "Ready", "Replicas", "URL", "Age"):
        assert wanted in columns


def test_optional_fields_are_nullable(crd):
    model = _root(crd)["properties"]["spec"]["properties"]["model"]["properties"]
    assert model["servedName"]["nullable"] is True
    assert "nullable" not in model["source"]


def test_chart_copy_is_gated_by_crds_enabled():
    text = (REPO_ROOT / crdgen.CHART_CRD_PATH).read_text()
    assert text.startswith("{{- if .Values.crds.enabled }}\n")
    assert text.rstrip().endswith("{{- end }}")
    inner = text[len(crdgen.CHART_OPEN) : -len(crdgen.CHART_CLOSE)]
    assert inner.replace(crdgen.CHART_KEEP, "", 1) == (REPO_ROOT / crdgen.CRD_PATH).read_text()


def test_check_passes_on_this_checkout():
    assert crdgen.check(REPO_ROOT) == []


def test_check_fails_when_a_model_field_changes_without_regenerating(tmp_path):
    for path, text in crdgen.outputs(tmp_path).items():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    # A new field on a model, as a developer would add it, but the files were not regenerated.
    script = textwrap.dedent(
        f"""
        import sys
        from pydantic import Field, create_model
        from llmep_operator.api import crdgen, models
        models.LLMEndpointSpec = create_model(
            "LLMEndpointSpec", __base__=models.LLMEndpointSpec,
            priority_class=(str, Field(default="", description="new field")),
        )
        sys.exit(crdgen.main(["--check", "--root", {str(tmp_path)!r}]))
        """
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "priorityClass" in result.stderr
    assert "make crds" in result.stderr
    unchanged = subprocess.run(
        [sys.executable, "-m", "llmep_operator.api.crdgen", "--check", "--root", str(tmp_path)],
        capture_output=True,
        text=True,
    )
    assert unchanged.returncode == 0, unchanged.stderr


def test_make_check_crds_fails_on_a_hand_edited_crd(tmp_path):
    (tmp_path / "crds").mkdir()
    for path, text in crdgen.outputs(tmp_path).items():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text.replace("Fewest replicas.", "Fewest replicas, edited by hand."))
    result = subprocess.run(
        ["make", "--no-print-directory", "-C", str(REPO_ROOT), "check-crds", f"CRD_ROOT={tmp_path}"],
        capture_output=True,
        text=True,
    )
    assert result.returncode != 0
    assert "Fewest replicas, edited by hand." in result.stderr


def test_api_reference_is_generated_from_the_crd():
    from llmep_operator.api import docgen

    text = (REPO_ROOT / docgen.DOC_PATH).read_text()
    assert text == docgen.render(), "docs/api.md is stale: run `make docs`"
    assert "`spec.autoscaling.targetQueueDepth`" in text
    assert "autoscaling.minReplicas must be <= autoscaling.maxReplicas" in text
