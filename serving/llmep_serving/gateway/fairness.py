"""Fair sharing of a saturated model: at most its capacity of requests in flight, the rest
waiting in a bounded queue and let in by the key's priority class (high, then normal, then low,
strictly) and round-robin across keys within a class, so a key with 100 waiting and a key with 1
waiting alternate.

One queue per backend (a model and its LoRA adapters run on the same replicas); each gateway
replica queues on its own. A slot is taken with ``async with`` and given back however the block
ends; a waiter that is cancelled (its client left, the shutdown cut it) or times out leaves the
queue and never holds a slot.

While a ``high`` key has asked for a model within the last minute, a share of the model's slots
(fair_high_priority_reserve) is held back from the other classes, so an interactive request
finds a free slot instead of waiting for a running sequence to end: the gateway cannot preempt one.
"""

from __future__ import annotations

import asyncio
import math
from collections import OrderedDict, deque
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager, nullcontext
from typing import get_args

from aiohttp import web

from . import errors
from .auth import ApiKey, Priority
from .metrics import GatewayMetrics
from .routing import Route
from .settings import GatewaySettings

PRIORITY_ORDER: tuple[Priority, ...] = get_args(Priority)  # high, normal, low: the order served
HIGH: Priority = PRIORITY_ORDER[0]
HIGH_ACTIVE_S = 60.0  # a high-priority key keeps its reserve this long after its last request

QUEUED, ADMITTED, GONE = "queued", "admitted", "gone"
NO_QUEUE: AbstractAsyncContextManager[None] = nullcontext()  # a model without a capacity forwards at once


class Waiter:
    """One request waiting for a slot. ``admit`` is called when a slot is handed to it and says
    whether it still wants it: False when it was cancelled and has not withdrawn yet."""

    __slots__ = ("admit", "key", "priority", "state")

    def __init__(self, key: str, priority: Priority, admit: Callable[[], bool]) -> None:
        self.key = key
        self.priority = priority
        self.admit = admit
        self.state = QUEUED


class FairQueue:
    """One backend's slots and waiters; no I/O, so its order can be checked on its own.

    Each class keeps its keys in round-robin order: the key served goes to the back of its class
    while it has more waiting, and a key that starts waiting joins at the back.
    """

    __slots__ = ("_classes", "capacity", "in_use", "reserved", "size", "waiting")

    def __init__(self, capacity: int, size: int) -> None:
        self.capacity = capacity
        self.size = size  # waiters at most
        self.in_use = 0
        self.waiting = 0
        self.reserved = 0  # slots only high-priority requests may take now
        self._classes: dict[Priority, OrderedDict[str, deque[Waiter]]] = {p: OrderedDict() for p in PRIORITY_ORDER}

    @property
    def idle(self) -> bool:
        return not self.in_use and not self.waiting

    def limit(self, priority: Priority) -> int:
        """Slots a request of ``priority`` may be let into."""
        return self.capacity if priority == HIGH else self.capacity - self.reserved

    def try_take(self, priority: Priority = "normal") -> bool:
        """Take a slot at once; never past a waiter of the same or a higher class, so arriving
        requests cannot overtake the queue (a lower class waits behind them anyway)."""
        if self.in_use >= self.limit(priority):
            return False
        rank = PRIORITY_ORDER.index(priority)
        if any(self._classes[p] for p in PRIORITY_ORDER[: rank + 1]):
            return False
        self.in_use += 1
        return True

    def enqueue(self, key: str, priority: Priority, admit: Callable[[], bool]) -> Waiter | None:
        """Queue a waiter at the back of its key's line; None when the queue is full."""
        if self.waiting >= self.size:
            return None
        waiter = Waiter(key, priority, admit)
        keys = self._classes[priority]
        line = keys.get(key)
        if line is None:
            line = keys[key] = deque()
        line.append(waiter)
        self.waiting += 1
        return waiter

    def withdraw(self, waiter: Waiter) -> None:
        """Take a waiter out of the queue; one already admitted or gone is left as it is."""
        if waiter.state != QUEUED:
            return
        waiter.state = GONE
        keys = self._classes[waiter.priority]
        line = keys[waiter.key]
        line.remove(waiter)
        if not line:
            del keys[waiter.key]
        self.waiting -= 1

    def release(self) -> None:
        """A slot comes back: handed to the next waiter, or freed."""
        self.in_use -= 1
        self._grant()

    def resize(self, capacity: int, reserved: int | None = None) -> None:
        """The capacity or the reserve changed; more room lets waiters in now."""
        self.capacity = capacity
        if reserved is not None:
            self.reserved = reserved
        self._grant()

    def _grant(self) -> None:
        while self.waiting:
            priority = next(p for p in PRIORITY_ORDER if self._classes[p])
            if self.in_use >= self.limit(priority):
                return
            waiter = self._next()
            if waiter.admit():
                waiter.state = ADMITTED
                self.in_use += 1
            else:
                waiter.state = GONE

    def _next(self) -> Waiter:
        for priority in PRIORITY_ORDER:
            keys = self._classes[priority]
            if keys:
                key, line = next(iter(keys.items()))
                waiter = line.popleft()
                if line:
                    keys.move_to_end(key)
                else:
                    del keys[key]
                self.waiting -= 1
                return waiter
        raise AssertionError("no waiter while waiting > 0")


class FairSharing:
    """Every backend's queue on this gateway replica; a queue exists while it has requests."""

    def __init__(self, settings: GatewaySettings, metrics: GatewayMetrics) -> None:
        self.settings = settings
        self.metrics = metrics
        self._queues: dict[str, FairQueue] = {}  # by route key: a model and its adapters share one
        self._high_seen: dict[str, float] = {}  # by route key: when a high-priority key last asked

    def capacity(self, route: Route) -> int:
        """Requests the route's backend may have in flight from this gateway; 0: no queue."""
        return self.settings.max_inflight_per_model if route.max_inflight is None else route.max_inflight

    def slot(
        self, route: Route, key: ApiKey, sse: web.StreamResponse | None = None
    ) -> AbstractAsyncContextManager[None]:
        """A slot of the route's backend for the request, or nothing to wait for when it has no
        capacity set. ``sse``: a held stream's response, already started, kept alive while it waits."""
        capacity = self.capacity(route)
        return Slot(self, route, key, capacity, sse) if capacity else NO_QUEUE

    def queue(self, route: Route, capacity: int, priority: Priority, now: float) -> FairQueue:
        """The route's queue, its capacity and high-priority reserve brought up to date."""
        if priority == HIGH:
            self._high_seen[route.key] = now
        reserved = 0
        if now - self._high_seen.get(route.key, -math.inf) < HIGH_ACTIVE_S:
            reserved = min(capacity - 1, math.ceil(capacity * self.settings.fair_high_priority_reserve))
        queue = self._queues.get(route.key)
        if queue is None:
            queue = self._queues[route.key] = FairQueue(capacity, self.settings.fair_queue_size)
            queue.reserved = reserved
        elif queue.capacity != capacity or queue.reserved != reserved:
            queue.resize(capacity, reserved)
        return queue

    def forget_if_idle(self, route: Route, queue: FairQueue) -> None:
        if queue.idle and self._queues.get(route.key) is queue:
            del self._queues[route.key]
            seen = self._high_seen.get(route.key)
            if seen is not None and asyncio.get_running_loop().time() - seen >= HIGH_ACTIVE_S:
                del self._high_seen[route.key]  # removed endpoints leave nothing behind


class Slot:
    """``async with slot:`` waits for one of the backend's slots and gives it back at the end.

    Raises 429 model_busy when the queue already holds fair_queue_size waiters, and 503
    model_queue_timeout after fair_queue_timeout seconds of waiting.
    """

    __slots__ = ("capacity", "key", "queue", "route", "sharing", "sse")

    def __init__(
        self, sharing: FairSharing, route: Route, key: ApiKey, capacity: int, sse: web.StreamResponse | None
    ) -> None:
        self.sharing = sharing
        self.route = route
        self.key = key
        self.capacity = capacity
        self.sse = sse
        self.queue: FairQueue | None = None

    async def __aenter__(self) -> None:
        sharing, route, key = self.sharing, self.route, self.key
        s = sharing.settings
        loop = asyncio.get_running_loop()
        queue = sharing.queue(route, self.capacity, key.priority, loop.time())
        if queue.try_take(key.priority):
            self.queue = queue
            sharing.metrics.key_queue_wait(key.name, route.model, 0.0)
            return
        future: asyncio.Future[None] = loop.create_future()

        def admit() -> bool:
            if future.done():
                return False  # cancelled, not yet withdrawn
            future.set_result(None)
            return True

        waiter = queue.enqueue(key.name, key.priority, admit)
        if waiter is None:
            raise errors.model_busy(route.model, s.retry_after_seconds)
        started = loop.time()
        sharing.metrics.key_queued(key.name, route.model, 1)
        beat = None if self.sse is None else asyncio.create_task(self._keep_alive(self.sse, s.hold_keepalive_interval))
        try:
            async with asyncio.timeout(s.fair_queue_timeout):
                await future
        except TimeoutError:
            if waiter.state != ADMITTED:  # else the slot came as the wait ran out: keep it
                queue.withdraw(waiter)
                sharing.forget_if_idle(route, queue)
                raise errors.model_queue_timeout(route.model, s.fair_queue_timeout, s.retry_after_seconds) from None
        except asyncio.CancelledError:
            if waiter.state == ADMITTED:
                queue.release()  # handed a slot just as it was cancelled: pass it on
            else:
                queue.withdraw(waiter)
            sharing.forget_if_idle(route, queue)
            raise
        finally:
            sharing.metrics.key_queued(key.name, route.model, -1)
            if beat is not None:
                beat.cancel()
        self.queue = queue
        sharing.metrics.key_queue_wait(key.name, route.model, loop.time() - started)

    async def _keep_alive(self, sse: web.StreamResponse, interval: float) -> None:
        """SSE comments to a held stream while it waits, so no proxy drops it as idle."""
        comment = f": keep-alive; waiting for a free slot of {self.route.model}\n\n".encode()
        while True:
            await asyncio.sleep(interval)
            try:
                await sse.write(comment)
            except ConnectionError:
                return  # the client left; its request is cancelled and withdrawn

    async def __aexit__(self, *exc: object) -> None:
        queue = self.queue
        assert queue is not None
        self.queue = None
        queue.release()
        self.sharing.forget_if_idle(self.route, queue)
