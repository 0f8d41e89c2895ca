"""Parse manifests into the API models, with errors that name the field and the fix."""

from __future__ import annotations

from typing import Any

from pydantic import ValidationError

from llmep_operator.api.models import LLMEndpoint, LLMEndpointSpec
from llmep_operator.errors import InvalidSpec


class SpecError(InvalidSpec):
    """An LLMEndpoint that cannot be served as written; `problems` are 'field: message' lines."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__("; ".join(problems))


def _field_path(loc: tuple[Any, ...]) -> str:
    path = ""
    for part in loc:
        if isinstance(part, int):
            path += f"[{part}]"
        else:
            path += f".{part}" if path else str(part)
    return path


def format_errors(error: ValidationError, prefix: str = "") -> list[str]:
    lines = []
    for item in error.errors(include_url=False):
        # pydantic prefixes messages raised in validators with "Value error, ".
        message = item["msg"].removeprefix("Value error, ")
        loc = _field_path(item["loc"])
        where = ".".join(p for p in (prefix, loc) if p)
        lines.append(f"{where}: {message}" if where else message)
    return lines


def parse_endpoint(manifest: dict[str, Any]) -> LLMEndpoint:
    """A whole LLMEndpoint object (apiVersion, kind, metadata, spec)."""
    try:
        return LLMEndpoint.model_validate(manifest)
    except ValidationError as error:
        raise SpecError(format_errors(error)) from None


def parse_spec(spec: dict[str, Any]) -> LLMEndpointSpec:
    """Only the spec, as kopf hands it to handlers."""
    try:
        return LLMEndpointSpec.model_validate(spec)
    except ValidationError as error:
        raise SpecError(format_errors(error, prefix="spec")) from None
