"""Which failed sends may go to another replica: only those that cannot have reached the engine.

vLLM sends a non-streaming answer's headers only once it has generated it, so a connection that
breaks before the headers may have carried a whole generation, and a replica that crashed on a
request would crash the next one too: such a request is answered 502, never replayed. A failed
connect, or a connection that broke before one byte of the body left for the kernel, is safe.
"""

from __future__ import annotations

import aiohttp

CONNECT_FAILED = "connect_failed"
NOT_WRITTEN = "not_written"


def unsent_reason(exc: BaseException, upload: aiohttp.UploadTracker) -> str | None:
    """Why the request provably never reached the backend, or None when it may have."""
    if isinstance(exc, (aiohttp.ClientConnectorError, aiohttp.ConnectionTimeoutError)):
        return CONNECT_FAILED
    if isinstance(exc, aiohttp.ClientConnectionError) and upload.bytes_written == 0:
        return NOT_WRITTEN
    return None


class Unsent(Exception):
    """A send that failed before the request reached the backend; another attempt is safe."""

    def __init__(self, reason: str, exc: BaseException) -> None:
        super().__init__(f"{reason}: {type(exc).__name__}")
        self.reason = reason
        self.timeout = isinstance(exc, TimeoutError)
