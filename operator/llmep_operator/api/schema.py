"""Turn the pydantic models into a Kubernetes structural OpenAPI v3 schema.

Kubernetes wants every type inline (no $ref), `nullable` instead of `anyOf: [X, null]`, no
`additionalProperties: false` next to `properties`, and open maps marked with
`x-kubernetes-preserve-unknown-fields`. Defaults for nested objects are `{}` so the API server
fills in their own field defaults, which the CEL rules then rely on.
"""

from __future__ import annotations

import copy
from typing import Any

from pydantic import BaseModel

# Keys pydantic emits that have no place in a CRD schema.
_DROPPED_KEYS = {"title", "$defs", "examples"}


class SchemaError(ValueError):
    """The pydantic model uses a construct the CRD schema cannot express."""


def structural_schema(model: type[BaseModel]) -> dict[str, Any]:
    """The structural schema of `model`, as it goes under `openAPIV3Schema`."""
    raw = model.model_json_schema(by_alias=True, mode="validation")
    defs = raw.get("$defs", {})
    schema = _convert(raw, defs, path=model.__name__)
    _add_object_defaults(model, schema)
    return schema


def _resolve(node: dict[str, Any], defs: dict[str, Any]) -> dict[str, Any]:
    ref = node["$ref"]
    name = ref.rsplit("/", 1)[-1]
    if name not in defs:
        raise SchemaError(f"unresolved reference {ref}")
    merged: dict[str, Any] = copy.deepcopy(defs[name])
    # Field-level keys (description, default) override the referenced class's own.
    merged.update({k: v for k, v in node.items() if k != "$ref"})
    return merged


def _convert(node: dict[str, Any], defs: dict[str, Any], path: str) -> dict[str, Any]:
    if "$ref" in node:
        node = _resolve(node, defs)
    if "allOf" in node and len(node["allOf"]) == 1:
        inner = node["allOf"][0]
        node = {**_resolve(inner, defs), **{k: v for k, v in node.items() if k != "allOf"}}

    out: dict[str, Any] = {}
    nullable = False
    if "anyOf" in node:
        variants = [v for v in node["anyOf"] if v.get("type") != "null"]
        nullable = len(variants) != len(node["anyOf"])
        if len(variants) != 1:
            raise SchemaError(f"{path}: unions of several types cannot be expressed in a CRD")
        base = _convert(variants[0], defs, path)
        out.update(base)

    for key, value in node.items():
        if key in _DROPPED_KEYS or key == "anyOf":
            continue
        if key == "properties":
            out["properties"] = {name: _convert(prop, defs, f"{path}.{name}") for name, prop in value.items()}
        elif key == "items":
            out["items"] = _convert(value, defs, f"{path}[]")
        elif key == "additionalProperties":
            if node.get("x-kubernetes-preserve-unknown-fields"):
                continue  # already free-form; properties, if any, are the declared exceptions
            if value is True or value == {}:
                # A map of free-form values: CEL sees map keys (an object with preserved
                # unknown fields would hide them from rules).
                out["additionalProperties"] = {"x-kubernetes-preserve-unknown-fields": True}
            elif isinstance(value, dict):
                out["additionalProperties"] = _convert(value, defs, f"{path}{{}}")
            # False: the API server prunes unknown fields and kubectl reports them.
        elif key == "default":
            if value is not None:
                out["default"] = value
        elif key == "const":
            out["enum"] = [value]
        elif key in ("exclusiveMinimum", "exclusiveMaximum"):
            # OpenAPI v3.0 (what CRDs use) spells these as a boolean next to minimum/maximum.
            out["minimum" if key == "exclusiveMinimum" else "maximum"] = value
            out[key] = True
        else:
            out[key] = value

    if out.get("type") == "object" and "properties" not in out and "additionalProperties" not in out:
        out["x-kubernetes-preserve-unknown-fields"] = True
    if nullable:
        out["nullable"] = True
    if "type" not in out and not out.get("x-kubernetes-preserve-unknown-fields"):
        raise SchemaError(f"{path}: no type could be derived")
    return out


def _add_object_defaults(model: type[BaseModel], schema: dict[str, Any]) -> None:
    """Give nested objects built by default_factory a `default: {}` (pydantic omits it)."""
    properties = schema.get("properties", {})
    for name, field in model.model_fields.items():
        alias = field.alias or name
        prop = properties.get(alias)
        if prop is None:
            continue
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            if field.default_factory is not None and "default" not in prop:
                prop["default"] = {}
            _add_object_defaults(annotation, prop)
        else:
            for arg in getattr(annotation, "__args__", ()):
                if isinstance(arg, type) and issubclass(arg, BaseModel):
                    target = prop.get("items", prop)
                    _add_object_defaults(arg, target)
