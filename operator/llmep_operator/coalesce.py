"""Work per key that coalesces: a burst of requests for one key runs the work once or twice,
never once per request, and never twice at the same time. No kopf in here."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Hashable
from typing import Generic, TypeVar

Key = TypeVar("Key", bound=Hashable)
log = logging.getLogger(__name__)


class Coalescer(Generic[Key]):
    """`request(key)` runs `work(key)` after `settle` seconds; requests that arrive meanwhile join
    that run, and requests that arrive while it runs make one more run after it (the work then
    sees every change they announced). At most `limit` keys run at once."""

    def __init__(self, work: Callable[[Key], Awaitable[None]], *, limit: int = 8, settle: float = 0.0) -> None:
        self._work = work
        self._settle = settle
        self._slots = asyncio.Semaphore(limit)
        self._queued: set[Key] = set()  # waiting for a run that has not started yet
        self._running: set[Key] = set()
        self._tasks: set[asyncio.Task[None]] = set()

    def request(self, key: Key) -> None:
        if key in self._queued:
            return  # the run that is waiting will see this change too
        self._queued.add(key)
        if key in self._running:
            return  # the running task loops once more
        task = asyncio.get_running_loop().create_task(self._run(key))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _run(self, key: Key) -> None:
        self._running.add(key)
        try:
            await asyncio.sleep(self._settle)
            while key in self._queued:
                async with self._slots:
                    self._queued.discard(key)
                    try:
                        await self._work(key)
                    except Exception:  # one key's failure must not stop the others' work
                        log.exception("coalesced work for %s failed", key)
        finally:
            self._running.discard(key)

    @property
    def pending(self) -> int:
        return len(self._queued) + len(self._running)

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
