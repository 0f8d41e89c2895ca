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
    """`request(key)` runs `work(key)` soon (after `settle` seconds when asked to, so that what
    comes in meanwhile joins the run); requests that arrive while it runs make one more run after
    it, which then sees every change they announced. At most `limit` keys run at once."""

    def __init__(self, work: Callable[[Key], Awaitable[None]], *, limit: int = 8) -> None:
        self._work = work
        self._slots = asyncio.Semaphore(limit)
        self._queued: set[Key] = set()  # waiting for a run that has not started yet
        self._running: set[Key] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self._timers: dict[Key, asyncio.TimerHandle] = {}

    def request(self, key: Key, *, settle: float = 0.0) -> None:
        if key in self._queued:
            return  # the run that is waiting will see this change too
        self._queued.add(key)
        if key in self._running:
            return  # the running task loops once more
        task = asyncio.get_running_loop().create_task(self._run(key, settle))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def request_later(self, key: Key, delay: float) -> None:
        """A retry: request `key` after `delay` seconds (one timer per key, the earliest wins)."""
        loop = asyncio.get_running_loop()
        timer = self._timers.get(key)
        if timer is not None and timer.when() <= loop.time() + delay:
            return
        if timer is not None:
            timer.cancel()
        self._timers[key] = loop.call_later(delay, self._retry, key)

    def _retry(self, key: Key) -> None:
        self._timers.pop(key, None)
        self.request(key)

    async def _run(self, key: Key, settle: float) -> None:
        self._running.add(key)
        try:
            if settle:
                await asyncio.sleep(settle)
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
        for timer in self._timers.values():
            timer.cancel()
        self._timers.clear()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
