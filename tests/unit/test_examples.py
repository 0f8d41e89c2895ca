"""Every example in examples/ is a valid LLMEndpoint that the operator can render."""

from __future__ import annotations

import pytest
import yaml

from llmep_operator.api import parse_endpoint
from llmep_operator.render import build_children
from llmep_operator.settings import OperatorSettings
from tests.conftest import REPO_ROOT

pytestmark = pytest.mark.unit
EXAMPLES = sorted((REPO_ROOT / "examples").glob("*.yaml"))


def test_there_are_examples_for_the_common_shapes():
    names = {p.stem for p in EXAMPLES}
    assert {
        "llama-3.1-8b-l4",
        "llama-3.3-70b-h100-tp4",
        "deepseek-v3-multinode",
        "mistral-7b-scale-to-zero",
        "qwen2.5-7b-aliases",
        "tiny-cpu",
    } <= names


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.stem)
def test_example_parses_and_renders(path):
    for doc in yaml.safe_load_all(path.read_text()):
        if doc and doc.get("kind") == "LLMEndpoint":
            doc["metadata"]["namespace"] = "default"
            endpoint = parse_endpoint(doc)
            kinds = [c["kind"] for c in build_children(endpoint, OperatorSettings(), owner_uid="u")]
            assert "RayService" in kinds and "Service" in kinds
