"""Backend error answers in OpenAI's envelope, in the engine's own words.

Ray Serve LLM wraps an engine's error as "Message: <engine message> (Request ID: ...), Internal
exception: ... (Request ID: ...), original exception: ...", with its exception class as `type`
and the HTTP status as `code`. Clients show that text to their users, so the gateway keeps the
engine's message and gives `type` OpenAI's vocabulary. Any other body passes through untouched.
"""

from __future__ import annotations

import json
import re

from .errors import INVALID_REQUEST, RATE_LIMIT, SERVER_ERROR, envelope

_RAY_WRAPPED = re.compile(r"Message: (?P<message>.*?), Internal exception: ", re.DOTALL)
_REQUEST_ID = re.compile(r"\s*\(Request ID: [^)]*\)")


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
    message = engine_message(error["message"])
    if message is None:
        return data
    code, param = error.get("code"), error.get("param")
    return envelope(
        message,
        openai_type(status),
        code if isinstance(code, str) else None,
        param if isinstance(param, str) else None,
    )
