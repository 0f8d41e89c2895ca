"""Backend error answers in OpenAI's envelope, in the engine's own words.

Two shapes reach the gateway, neither in OpenAI's vocabulary:

- vLLM's own app (the direct serving path) answers `{"error": {"message", "type":
  "BadRequestError", "param", "code": 400}}`: an exception class as `type`, the HTTP status as
  `code`.
- Ray Serve LLM's OpenAI ingress (the proxy path) wraps the engine's message as "Message: <engine
  message> (Request ID: ...), Internal exception: ... (Request ID: ...), original exception:
  ...", with its own class as `type`.

OpenAI SDKs read `type` and `code` to decide what went wrong, and clients show `message` to their
users, so the gateway keeps the engine's message and `param`, gives `type` OpenAI's vocabulary
and `code` a string or null. A body already in that vocabulary, or not an error envelope at all,
passes through untouched.
"""

from __future__ import annotations

import json
import re

from .errors import INVALID_REQUEST, RATE_LIMIT, SERVER_ERROR, envelope

_RAY_WRAPPED = re.compile(r"Message: (?P<message>.*?), Internal exception: ", re.DOTALL)
_REQUEST_ID = re.compile(r"\s*\(Request ID: [^)]*\)")
# The `type` values OpenAI's API sends (and its SDKs document).
OPENAI_TYPES = frozenset(
    {INVALID_REQUEST, SERVER_ERROR, RATE_LIMIT, "authentication_error", "permission_error", "not_found_error"}
    | {"api_error"}
)


def openai_type(status: int) -> str:
    if status == 429:
        return RATE_LIMIT
    return SERVER_ERROR if status >= 500 else INVALID_REQUEST


def engine_message(message: str) -> str | None:
    """The engine's own message inside Ray's wrapping; None when `message` is not wrapped."""
    match = _RAY_WRAPPED.match(message)
    return _REQUEST_ID.sub("", match["message"]).strip() if match else None


def clean_error_body(data: bytes, status: int) -> bytes:
    try:
        parsed = json.loads(data)
    except ValueError:
        return data
    error = parsed.get("error") if isinstance(parsed, dict) else None
    if not isinstance(error, dict) or not isinstance(error.get("message"), str):
        return data
    unwrapped = engine_message(error["message"])
    code, param, kind = error.get("code"), error.get("param"), error.get("type")
    if unwrapped is None and kind in OPENAI_TYPES and (code is None or isinstance(code, str)):
        return data
    return envelope(
        unwrapped or error["message"],
        openai_type(status),
        code if isinstance(code, str) else None,
        param if isinstance(param, str) else None,
    )
