"""Errors the reconciler tells apart: the spec cannot work (permanent) or not yet (retry)."""

from __future__ import annotations


class InvalidSpec(ValueError):
    """The spec passed admission but cannot be served with this cluster's settings."""


class NotYet(RuntimeError):
    """A dependency is missing for now (e.g. KubeRay's CRDs); try again after `delay` seconds."""

    def __init__(self, message: str, delay: float = 30.0):
        super().__init__(message)
        self.delay = delay
