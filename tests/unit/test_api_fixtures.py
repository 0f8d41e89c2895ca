"""The API models accept the valid fixtures and refuse each invalid one on the named field,
and the generated CRD schema admits exactly the same set."""

from __future__ import annotations

import pytest

from llmep_operator.api import SpecError, parse_endpoint
from llmep_operator.api.crdgen import build_crd
from tests.conftest import INVALID_FIXTURES, VALID_FIXTURES, expected_rejection, load_fixture
from tests.unit.schema_emulation import admission_errors

pytestmark = pytest.mark.unit

OPENAPI = build_crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]


def _names_field(problems: list[str], field: str) -> bool:
    """A problem line is about `field` when its location is the field (or inside it), or when
    its location is an enclosing object and the message names the field (cross-field rules)."""
    leaf = field.rsplit(".", 1)[-1]
    for line in problems:
        location = line.split(":", 1)[0].strip().lstrip(".")
        if location == field or location.startswith((field + ".", field + "[")):
            return True
        if field.startswith(location) and leaf in line:
            return True
    return False


def test_fixture_sets_are_not_empty():
    assert len(VALID_FIXTURES) >= 5
    assert len(INVALID_FIXTURES) >= 12


@pytest.mark.parametrize("path", VALID_FIXTURES, ids=lambda p: p.stem)
def test_valid_fixture_parses(path):
    endpoint = parse_endpoint(load_fixture(path))
    assert endpoint.model_ids[0] == (endpoint.spec.model.served_name or endpoint.metadata.name)


@pytest.mark.parametrize("path", INVALID_FIXTURES, ids=lambda p: p.stem)
def test_invalid_fixture_is_refused_naming_the_field(path):
    field = expected_rejection(path)
    with pytest.raises(SpecError) as caught:
        parse_endpoint(load_fixture(path))
    assert _names_field(caught.value.problems, field), (field, caught.value.problems)


@pytest.mark.parametrize("path", VALID_FIXTURES, ids=lambda p: p.stem)
def test_crd_schema_admits_valid_fixture(path):
    assert admission_errors(OPENAPI, load_fixture(path)) == []


@pytest.mark.parametrize("path", INVALID_FIXTURES, ids=lambda p: p.stem)
def test_crd_schema_refuses_invalid_fixture_naming_the_field(path):
    field = expected_rejection(path)
    problems = admission_errors(OPENAPI, load_fixture(path))
    assert problems, f"the CRD schema admits {path.name}, which the models refuse"
    assert _names_field(problems, field), (field, problems)
