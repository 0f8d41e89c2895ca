"""The shapes of the core/v1 pieces the plan hands to the pod templates, as the API spells them."""

from __future__ import annotations

from typing import NotRequired, TypedDict


class PersistentVolumeClaimSource(TypedDict):
    claimName: str
    readOnly: NotRequired[bool]


class PvcVolume(TypedDict):
    name: str
    persistentVolumeClaim: PersistentVolumeClaimSource


class VolumeMount(TypedDict):
    name: str
    mountPath: str
    readOnly: NotRequired[bool]


class SecretKeySelector(TypedDict):
    name: str
    key: str


class EnvVarSource(TypedDict):
    secretKeyRef: SecretKeySelector


class EnvVar(TypedDict):
    name: str
    value: NotRequired[str]
    valueFrom: NotRequired[EnvVarSource]


class SecretEnvSource(TypedDict):
    name: str


class EnvFromSource(TypedDict):
    secretRef: SecretEnvSource
