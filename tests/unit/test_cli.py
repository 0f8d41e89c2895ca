"""`llmep version` and `llmep crd` do what a user expects."""

from __future__ import annotations

import subprocess
import sys

import pytest
import yaml

pytestmark = pytest.mark.unit


def _llmep(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "llmep_serving.cli", *args], capture_output=True, text=True)


def test_version_prints_the_package_version():
    result = _llmep("version")
    assert result.returncode == 0
    assert result.stdout.startswith("llmep 0.")


def test_crd_prints_an_applyable_crd():
    result = _llmep("crd")
    assert result.returncode == 0
    crd = yaml.safe_load(result.stdout)
    assert crd["kind"] == "CustomResourceDefinition"
    assert crd["spec"]["names"]["kind"] == "LLMEndpoint"


def test_no_command_is_a_usage_error():
    result = _llmep()
    assert result.returncode == 2
    assert "COMMAND" in result.stderr
