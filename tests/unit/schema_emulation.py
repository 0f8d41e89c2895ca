"""What the API server does with a CRD schema, emulated for unit tests: defaulting, strict
field validation (as kubectl requests it), OpenAPI constraints and CEL rules (via cel-python).
The real API server runs the same fixtures in tests/cluster."""

from __future__ import annotations

import copy
from typing import Any

import celpy
import jsonschema


def to_json_schema(node: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in node.items():
        if key == "properties":
            out["properties"] = {k: to_json_schema(v) for k, v in value.items()}
        elif key in ("items", "additionalProperties") and isinstance(value, dict):
            out[key] = to_json_schema(value)
        elif key.startswith("x-kubernetes-") or key in ("nullable", "default", "description"):
            continue
        else:
            out[key] = value
    for exclusive, bound in (("exclusiveMinimum", "minimum"), ("exclusiveMaximum", "maximum")):
        if out.get(exclusive) is True:  # OpenAPI v3.0's boolean form -> JSON Schema's number form
            out[exclusive] = out.pop(bound)
    if node.get("nullable") and "type" in out:
        out["type"] = [out["type"], "null"]
    if "properties" in node and not node.get("x-kubernetes-preserve-unknown-fields"):
        out["additionalProperties"] = False
    if node.get("x-kubernetes-list-type") == "set":
        out["uniqueItems"] = True
    return out


def apply_defaults(node: dict[str, Any], value: Any) -> Any:
    if isinstance(value, dict) and "properties" in node:
        for name, prop in node["properties"].items():
            if name not in value and "default" in prop:
                value[name] = copy.deepcopy(prop["default"])
            if name in value:
                value[name] = apply_defaults(prop, value[name])
    elif isinstance(value, list) and "items" in node:
        return [apply_defaults(node["items"], v) for v in value]
    return value


# Kubernetes enables CEL's strings extension; cel-python lacks it, so the functions the rules
# use are provided here with the extension's semantics.
K8S_STRING_FUNCTIONS = {
    "indexOf": lambda text, sub: celpy.celtypes.IntType(str(text).find(str(sub))),
    "substring": lambda text, start, end=None: celpy.celtypes.StringType(
        str(text)[int(start) : None if end is None else int(end)]
    ),
}


def cel_violations(node: dict[str, Any], value: Any, path: str = "") -> list[str]:
    problems = []
    env = celpy.Environment()
    for rule in node.get("x-kubernetes-validations", []):
        if "oldSelf" in rule["rule"]:
            continue  # transition rules only apply to updates
        program = env.program(env.compile(rule["rule"]), functions=K8S_STRING_FUNCTIONS)
        if not program.evaluate({"self": celpy.json_to_cel(value)}):
            problems.append(f"{path}{rule.get('fieldPath', '')}: {rule['message']}")
    if isinstance(value, dict):
        for name, prop in node.get("properties", {}).items():
            if name in value and value[name] is not None:
                problems += cel_violations(prop, value[name], f"{path}.{name}" if path else name)
    return problems


def _field_path(parts: Any) -> str:
    """A field path as the API server writes it: spec.lora.adapters[0].name."""
    path = ""
    for part in parts:
        path += f"[{part}]" if isinstance(part, int) else (f".{part}" if path else str(part))
    return path


def admission_errors(openapi_schema: dict[str, Any], obj: dict[str, Any]) -> list[str]:
    """Every reason the API server would refuse `obj`; empty when it would admit it."""
    obj = apply_defaults(openapi_schema, copy.deepcopy(obj))
    validator = jsonschema.Draft7Validator(to_json_schema(openapi_schema))
    problems = [_field_path(error.absolute_path) + ": " + error.message for error in validator.iter_errors(obj)]
    if problems:
        return problems
    return cel_violations(openapi_schema, obj)
