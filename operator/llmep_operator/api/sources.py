"""What a model source (`spec.model.source`) names: its scheme, and whether the weights are local.

Parsed here once for the renderer and local mode; `ModelSpec` validates the whole URI first.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass


class SourceScheme(enum.StrEnum):
    HF = "hf"
    PVC = "pvc"
    S3 = "s3"
    GS = "gs"
    FILE = "file"

    @property
    def is_local(self) -> bool:
        """The engine opens the weights from a path in its own container (file:// in the image,
        pvc:// mounted), so nothing there needs the hub."""
        return self in (SourceScheme.FILE, SourceScheme.PVC)

    @property
    def is_bucket(self) -> bool:
        return self in (SourceScheme.S3, SourceScheme.GS)


@dataclass(frozen=True)
class SourceURI:
    scheme: SourceScheme
    path: str  # after "://": ORG/MODEL, CLAIM/PATH, BUCKET/PATH, or /ABSOLUTE/PATH for file://


def parse_source(source: str) -> SourceURI:
    """The scheme and path of a validated source; ValueError for a scheme there is none of."""
    scheme, _, path = source.partition("://")
    return SourceURI(scheme=SourceScheme(scheme), path=path)
