"""Graceful shutdown: the requests in flight, waited for up to a grace period, then cut.

Cut requests end in the envelope (503 gateway_shutting_down), or, where a stream has started,
with an SSE error event and ``data: [DONE]``, so no client sees a bare closed connection.
"""

from __future__ import annotations

import asyncio


class InFlight:
    """The handler tasks of requests being forwarded or held: ``with in_flight:`` counts the
    current task's request for the block, however it ends."""

    def __init__(self) -> None:
        self.cutting = False  # set when the grace period is over: handlers end their requests
        self._tasks: set[asyncio.Task[object]] = set()
        self._idle: asyncio.Event | None = None

    def __len__(self) -> int:
        return len(self._tasks)

    def __enter__(self) -> None:
        self._tasks.add(_current_task())

    def __exit__(self, *exc: object) -> None:
        self._tasks.discard(_current_task())
        if not self._tasks and self._idle is not None:
            self._idle.set()

    async def wait(self, timeout: float) -> bool:
        """True once every request has finished; False when ``timeout`` passed first."""
        if not self._tasks:
            return True
        self._idle = asyncio.Event()
        try:
            async with asyncio.timeout(timeout):
                await self._idle.wait()
        except TimeoutError:
            return False
        return True

    def cut(self) -> int:
        """Cancel every request still in flight; each ends itself in the envelope or SSE."""
        self.cutting = True
        for task in self._tasks:
            task.cancel()
        return len(self._tasks)


def _current_task() -> asyncio.Task[object]:
    task = asyncio.current_task()
    assert task is not None
    return task
