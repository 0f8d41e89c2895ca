"""API keys: SHA-256 digests only, looked up by the digest of the presented bearer token.

Plain keys are hashed when loaded and dropped; neither keys nor digests are ever logged.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import logging
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Literal, get_args

from .routing import Route

log = logging.getLogger(__name__)

KEY_LABEL = "llmep.io/api-key"

Priority = Literal["high", "normal", "low"]
PRIORITIES: dict[str, Priority] = {name: name for name in get_args(Priority)}
# Every field a key Secret or keys-file entry may carry.
KEY_FIELDS = ("key", "sha256", "models", "rpm", "tpm", "tokens_per_day", "priority")
_WHOLE_NUMBER = re.compile(r"[0-9]+")


@dataclass(frozen=True)
class ApiKey:
    name: str  # Secret or file entry name: safe to log and to use for per-key limits
    digest: bytes = b""
    models: frozenset[str] | None = None  # None: every model
    rpm: int | None = None  # requests per minute; None: unlimited
    tpm: int | None = None  # tokens per minute
    tokens_per_day: int | None = None  # tokens per UTC day
    priority: Priority = "normal"  # the fair queue lets high in first, then normal, then low

    @property
    def limited(self) -> bool:
        return self.rpm is not None or self.tpm is not None or self.tokens_per_day is not None

    def allows(self, route: Route) -> bool:
        """Scopes name models as `name` (the endpoint that owns the plain name), `namespace/name`
        or `namespace/*` (every endpoint of that namespace, adapters included). ``route`` is the
        resolved route, so every id of a model is allowed alike; a LoRA adapter is a route of its
        own, so a scope naming the base model does not grant its adapters, nor the reverse."""
        if self.models is None:
            return True
        if route.namespace is not None and f"{route.namespace}/*" in self.models:
            return True
        return not self.models.isdisjoint(route.names)

    def __repr__(self) -> str:  # keep digests out of logs and tracebacks
        return f"ApiKey(name={self.name!r})"


ANONYMOUS = ApiKey(name="anonymous")


def digest_of(key: str | bytes) -> bytes:
    raw = key.encode("utf-8", "surrogatepass") if isinstance(key, str) else key
    return hashlib.sha256(raw).digest()


def _parse_models(value: object, where: str) -> frozenset[str] | None:
    if value is None:
        return None
    if isinstance(value, str):
        names = [part.strip() for part in value.split(",")]
    elif isinstance(value, list) and all(isinstance(v, str) for v in value):
        names = [v.strip() for v in value]
    else:
        raise ValueError(f"{where}: 'models' must be a comma-separated string or a list")
    names = [n for n in names if n]
    return frozenset(names) if names else None


def _parse_digest(value: str, where: str) -> bytes:
    try:
        digest = bytes.fromhex(value.strip())
    except ValueError:
        raise ValueError(f"{where}: 'sha256' is not a hex digest") from None
    if len(digest) != 32:
        raise ValueError(f"{where}: 'sha256' must be 64 hex characters")
    return digest


def _parse_limit(value: object, field: str, where: str) -> int | None:
    if value is None:
        return None
    # Secrets hold strings and YAML may quote numbers; bool is an int to Python but not here.
    if isinstance(value, int) and not isinstance(value, bool):
        number = value
    elif isinstance(value, str) and _WHOLE_NUMBER.fullmatch(value.strip()):
        number = int(value.strip())
    else:
        number = 0
    if number < 1:
        raise ValueError(f"{where}: {field!r} must be a whole number >= 1 (got {value!r}); leave it out for no limit")
    return number


def _parse_priority(value: object, where: str) -> Priority:
    if value is None:
        return "normal"
    priority = PRIORITIES.get(value.strip()) if isinstance(value, str) else None
    if priority is not None:
        return priority
    raise ValueError(f"{where}: 'priority' must be one of {', '.join(PRIORITIES)} (got {value!r})")


def make_key(name: str, fields: Mapping[str, object]) -> ApiKey:
    """Build a key from {key | sha256, models, rpm, tpm, tokens_per_day, priority}; the plain key
    goes no further than here."""
    where = f"key {name!r}"
    plain, hexdigest = fields.get("key"), fields.get("sha256")
    if (plain is None) == (hexdigest is None):
        raise ValueError(f"{where}: exactly one of 'key' and 'sha256' is required")
    if plain is not None:
        if not isinstance(plain, str) or not plain.strip():
            raise ValueError(f"{where}: 'key' must be a non-empty string")
        digest = digest_of(plain.strip())
    else:
        if not isinstance(hexdigest, str):
            raise ValueError(f"{where}: 'sha256' must be a string")
        digest = _parse_digest(hexdigest, where)
    return ApiKey(
        name=name,
        digest=digest,
        models=_parse_models(fields.get("models"), where),
        rpm=_parse_limit(fields.get("rpm"), "rpm", where),
        tpm=_parse_limit(fields.get("tpm"), "tpm", where),
        tokens_per_day=_parse_limit(fields.get("tokens_per_day"), "tokens_per_day", where),
        priority=_parse_priority(fields.get("priority"), where),
    )


def key_from_secret(name: str, data: Mapping[str, str] | None) -> ApiKey:
    """A Secret's ``data`` (base64 values, as the API returns them) to a key."""
    decoded: dict[str, object] = {}
    for field_name in KEY_FIELDS:
        value = (data or {}).get(field_name)
        if value is None:
            continue
        try:
            decoded[field_name] = base64.b64decode(value, validate=True).decode()
        except (binascii.Error, UnicodeDecodeError):
            raise ValueError(f"key {name!r}: data '{field_name}' is not base64 UTF-8") from None
    return make_key(name, decoded)


def parse_keys(data: object) -> list[ApiKey]:
    """Local-mode keys file: a list of {name, key | sha256, models, rpm, tpm, tokens_per_day, priority}."""
    if not isinstance(data, list):
        raise ValueError("keys file must hold a list of {name, key | sha256, models, ...} entries")
    keys = []
    for index, entry in enumerate(data):
        if not isinstance(entry, dict):
            raise ValueError(f"keys entry {index} is not a mapping")
        name = entry.get("name", f"key-{index}")
        keys.append(make_key(str(name), entry))
    return keys


class KeyStore:
    """Digest → key; replaced whole by the key source."""

    def __init__(self, keys: Iterable[ApiKey] | None = None) -> None:
        self._by_digest: dict[bytes, ApiKey] = {}
        self.loaded = False  # until the key source has delivered once
        if keys is not None:
            self.replace(keys)

    def replace(self, keys: Iterable[ApiKey]) -> None:
        by_digest: dict[bytes, ApiKey] = {}
        for key in keys:
            if key.digest in by_digest:
                log.warning("API keys %s and %s are the same key", by_digest[key.digest].name, key.name)
                continue
            by_digest[key.digest] = key
        self._by_digest = by_digest
        self.loaded = True

    def __len__(self) -> int:
        return len(self._by_digest)

    def authenticate(self, authorization: str | None) -> ApiKey | None:
        if not authorization or authorization[:7].lower() != "bearer ":
            return None
        token = authorization[7:].strip()
        if not token:
            return None
        digest = digest_of(token)
        key = self._by_digest.get(digest)
        if key is None or not hmac.compare_digest(key.digest, digest):
            return None
        return key
