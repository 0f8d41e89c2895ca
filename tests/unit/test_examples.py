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


def test_the_example_keys_load_with_their_limits_as_secrets_and_as_a_local_file():
    """examples/keys: what `kubectl apply` stores (stringData becomes base64 data) and the
    local-mode file are read by the gateway's own parsers into the same keys."""
    import base64

    from llmep_serving.gateway.auth import KEY_LABEL, key_from_secret, parse_keys

    folder = REPO_ROOT / "examples" / "keys"
    from_secrets = {}
    for path in sorted(folder.glob("*.yaml")):
        doc = yaml.safe_load(path.read_text())
        if isinstance(doc, dict) and doc.get("kind") == "Secret":
            assert doc["metadata"]["labels"] == {KEY_LABEL: "true"}  # what the gateway selects keys by
            data = {k: base64.b64encode(str(v).encode()).decode() for k, v in doc["stringData"].items()}
            from_secrets[doc["metadata"]["name"]] = key_from_secret(doc["metadata"]["name"], data)
    from_file = {k.name: k for k in parse_keys(yaml.safe_load((folder / "local-keys.yaml").read_text()))}

    assert from_secrets == from_file
    chat, batch = from_file["chat-app"], from_file["nightly-batch"]
    assert (chat.rpm, chat.tpm, chat.tokens_per_day, chat.priority) == (120, 200_000, 5_000_000, "high")
    assert (batch.rpm, batch.tpm, batch.tokens_per_day, batch.priority) == (None, None, 1_000_000, "low")
    assert chat.models == frozenset({"qwen-7b", "llama-8b"}) and batch.models == frozenset({"qwen-7b"})
