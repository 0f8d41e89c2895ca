"""Request bodies: read under the byte budget, ``model``, ``stream`` and what the answer may cost
found without stalling the event loop, ``model`` rewritten for aliases, usage asked for.

json.loads holds the GIL for its whole run (about 100 ms for 8 MiB of small messages), so a
thread would stall the loop just the same: bodies from ``offload_parse_bytes`` up are parsed
in one worker process, started on first use.
"""

from __future__ import annotations

import asyncio
import json
import logging
import multiprocessing
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from typing import TypeVar, TypeVarTuple

from aiohttp import web

from . import errors
from .budget import BodyClaim

log = logging.getLogger(__name__)
_T = TypeVar("_T")
_Ts = TypeVarTuple("_Ts")


@dataclass(frozen=True, slots=True)
class RequestFields:
    """What the gateway reads from a request body."""

    model: str
    stream: bool = False
    max_tokens: int | None = None  # max_completion_tokens, else max_tokens, as vLLM reads them
    include_usage: bool = False  # stream_options.include_usage: the client wants the usage chunk


def _max_tokens(data: dict[str, object]) -> int | None:
    for name in ("max_completion_tokens", "max_tokens"):
        value = data.get(name)
        # A mistyped value is the backend's to refuse (400); the default is reserved meanwhile.
        if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
            return value
    return None


def parse_request(body: bytes) -> RequestFields:
    """The fields the gateway needs from a JSON body; the body itself is forwarded unchanged."""
    try:
        data = json.loads(body)
    except RecursionError:
        raise errors.invalid_json("nested too deeply") from None
    except ValueError as exc:  # includes invalid UTF-8 and over-long integers
        raise errors.invalid_json(type(exc).__name__) from None
    if not isinstance(data, dict):
        raise errors.invalid_json("not an object")
    model = data.get("model")
    if model is None or model == "":
        raise errors.missing_model()
    if not isinstance(model, str):
        raise errors.invalid_type("model", "a string")
    stream = data.get("stream")
    if stream is None:
        stream = False
    elif not isinstance(stream, bool):
        raise errors.invalid_type("stream", "a boolean")
    options = data.get("stream_options")
    return RequestFields(
        model=model,
        stream=stream,
        max_tokens=_max_tokens(data),
        include_usage=isinstance(options, dict) and options.get("include_usage") is True,
    )


def rewritten(body: bytes, model: str, ask_usage: bool = False) -> bytes:
    """The body with ``model`` replaced (an alias becomes the served name the backend knows) and,
    with ``ask_usage``, a stream's usage asked for, so a key's tokens can be settled."""
    data = json.loads(body)
    data["model"] = model
    if ask_usage:
        options = data.get("stream_options")
        if options is None:
            data["stream_options"] = {"include_usage": True}
        elif isinstance(options, dict):
            options["include_usage"] = True
        # Anything else is the backend's to refuse, as the client sent it.
    return json.dumps(data, ensure_ascii=False, separators=(",", ":")).encode()


async def read_body(
    request: web.BaseRequest, claim: BodyClaim, cap: int, timeout: float
) -> bytes:
    """The whole body; a chunked one grows ``claim`` as it arrives (Content-Length was claimed)."""
    length = request.content_length
    if length == 0:
        return b""
    content = request.content
    try:
        if length is not None and content.total_bytes >= length:
            return await content.readexactly(length)  # already buffered: skip the timer
        async with asyncio.timeout(timeout):
            if length is not None:
                return await content.readexactly(length)
            chunks = []
            size = 0
            while chunk := await content.readany():
                size += len(chunk)
                if size > cap:
                    raise errors.request_too_large(cap)
                claim.grow(len(chunk))
                chunks.append(chunk)
            return b"".join(chunks)
    except TimeoutError:
        raise errors.body_timeout() from None
    except asyncio.IncompleteReadError:
        raise errors.invalid_json("the body ended early") from None


class Payload:
    """A body on its way to a backend and its share of the budget, both dropped once sent."""

    __slots__ = ("claim", "data")

    def __init__(self, data: bytes, claim: BodyClaim) -> None:
        self.data = data
        self.claim = claim

    def release(self) -> None:
        self.data = b""
        self.claim.release()


class BodyParser:
    """Parses small bodies in place and large ones in a worker process."""

    def __init__(self, offload_bytes: int) -> None:
        self.offload_bytes = offload_bytes
        self._pool: ProcessPoolExecutor | None = None

    async def fields(self, body: bytes) -> RequestFields:
        if len(body) < self.offload_bytes:
            return parse_request(body)
        return await self._offload(parse_request, body)

    async def rewrite(self, body: bytes, model: str, ask_usage: bool) -> bytes:
        if len(body) < self.offload_bytes:
            return rewritten(body, model, ask_usage)
        return await self._offload(rewritten, body, model, ask_usage)

    async def _offload(self, fn: Callable[[*_Ts], _T], *args: *_Ts) -> _T:
        if self._pool is None:
            # spawn, not fork: the gateway runs threads (the API watches) that fork would copy mid-lock.
            self._pool = ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn"))
        try:
            return await asyncio.get_running_loop().run_in_executor(self._pool, fn, *args)
        except BrokenProcessPool:
            log.warning("the body parser process died; starting another")
            self._pool = None
            return fn(*args)

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = None
