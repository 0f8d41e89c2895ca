"""Errors the reconciler tells apart: the spec cannot work (permanent) or not yet (retry).

Every "this spec cannot be served" is an InvalidSpec: the API's SpecError (a field is wrong),
naming's NameTooLong (a child's name would be too long) and the plan's own refusals (policy,
profiles, GPU splits). API errors are told apart in handlers (`_api_failure`)."""

from __future__ import annotations


class InvalidSpec(ValueError):
    """The spec cannot be served as written, or not with this cluster's settings."""


class NotYet(RuntimeError):
    """A dependency is missing for now (e.g. KubeRay's CRDs); try again after `delay` seconds."""

    def __init__(self, message: str, delay: float = 30.0):
        super().__init__(message)
        self.delay = delay
