"""Per-key limits: requests and tokens per minute (token buckets) and tokens per UTC day.

A request takes one request and RESERVES its tokens (a prompt estimate plus its max_tokens)
before it is forwarded; the reservation is SETTLED from the answer's usage, or released
(its tokens given back) when the request ends without an answer. Settling or releasing
twice does nothing, so every exit path may do it.

With ``replicas`` gateways, each keeps limit / replicas of every bucket and refills it at
limit / replicas per minute, as real numbers: no share is rounded, so the replicas together
never hold more than the key's limit, and none holds zero. A request costing more than a
replica's share (rpm below replicas, a reservation over tpm / replicas) is let through when
that replica's bucket is full and leaves it in debt, which the refill repays first.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import NoReturn

from . import errors
from .auth import ApiKey
from .errors import GatewayError

MINUTE = 60.0
DAY = 86400
BYTES_PER_TOKEN = 4  # OpenAI's rule of thumb for a prompt estimate, over the whole body
ROUNDING = 1e-6  # of a request or token: far below one, far above float error on a day's refill


def prompt_estimate(body_bytes: int) -> int:
    return -(-body_bytes // BYTES_PER_TOKEN)


def duration(seconds: float) -> str:
    """OpenAI's (Go's) duration format for x-ratelimit-reset-*: "20ms", "1.5s", "6m0s"."""
    ms = max(0, math.ceil(seconds * 1000))
    if ms < 1000:
        return f"{ms}ms"
    minutes, ms = divmod(ms, 60_000)
    hours, minutes = divmod(minutes, 60)
    secs = f"{ms / 1000:.3f}".rstrip("0").rstrip(".") + "s"
    if hours:
        return f"{hours}h{minutes}m{secs}"
    if minutes:
        return f"{minutes}m{secs}"
    return secs


class QuotaExceeded(GatewayError):
    """A 429 from a key's limits; ``limit`` names it for metrics: requests, tokens or daily_tokens."""

    def __init__(self, exc: GatewayError, limit: str) -> None:
        super().__init__(exc.status, exc.code, exc.message, type_=exc.type, retry_after=exc.retry_after)
        self.limit = limit


class Bucket:
    """Up to ``capacity`` units, refilled continuously at ``rate`` per second; may run into debt."""

    __slots__ = ("capacity", "level", "rate", "stamp")

    def __init__(self, capacity: float, rate: float, now: float) -> None:
        self.capacity = capacity
        self.rate = rate
        self.level = capacity
        self.stamp = now

    def refill(self, now: float) -> None:
        if now > self.stamp:
            self.level = min(self.capacity, self.level + (now - self.stamp) * self.rate)
            self.stamp = now

    def wait(self, cost: float) -> float:
        """Seconds until the bucket holds ``cost``, or is full when ``cost`` is more than it holds."""
        short = min(cost, self.capacity) - self.level
        # A shortfall from float rounding alone (a client that waited exactly Retry-After) is none.
        return 0.0 if short <= ROUNDING else short / self.rate

    def reset_in(self) -> float:
        return (self.capacity - self.level) / self.rate

    def give(self, amount: float) -> None:
        self.level = min(self.capacity, self.level + amount)


class DailyBudget:
    """Tokens per UTC day: a bucket filled whole at 00:00 UTC instead of continuously."""

    __slots__ = ("capacity", "day", "used")

    def __init__(self, capacity: float) -> None:
        self.capacity = capacity
        self.day = -1
        self.used = 0.0

    def roll(self, wall: float) -> None:
        day = int(wall // DAY)  # POSIX days start at 00:00 UTC
        if day != self.day:
            self.day = day
            self.used = 0.0

    def admits(self, cost: float) -> bool:
        return self.capacity - self.used >= min(cost, self.capacity)

    def reset_in(self, wall: float) -> float:
        return (self.day + 1) * DAY - wall


class KeyQuota:
    """One key's buckets on this replica, rebuilt when the key's limits change."""

    __slots__ = ("daily", "limits", "requests", "tokens")

    def __init__(self, key: ApiKey, replicas: int, now: float) -> None:
        self.limits = (key.rpm, key.tpm, key.tokens_per_day)
        self.requests = None if key.rpm is None else Bucket(key.rpm / replicas, key.rpm / replicas / MINUTE, now)
        self.tokens = None if key.tpm is None else Bucket(key.tpm / replicas, key.tpm / replicas / MINUTE, now)
        self.daily = None if key.tokens_per_day is None else DailyBudget(key.tokens_per_day / replicas)


class Reservation:
    """One request's tokens, held from admission until ``settle`` or ``release``; the first of
    the two counts, any later call does nothing. ``with`` releases it at the block's end."""

    __slots__ = ("day", "headers", "key", "model", "open", "quota", "tokens")

    def __init__(self, key: str, model: str, quota: KeyQuota | None, tokens: int, day: int) -> None:
        self.key = key
        self.model = model
        self.quota = quota
        self.tokens = tokens
        self.day = day
        self.open = True
        self.headers: dict[str, str] = {}  # the key's x-ratelimit-* headers once this was taken

    def settle(self, used: int | None) -> None:
        """Charge the tokens the answer's usage reports (None: it reported none, keep the reservation)."""
        self._close(self.tokens if used is None else used)

    def release(self) -> None:
        """The request ended without an answer to charge: its tokens go back."""
        self._close(0)

    def _close(self, charged: int) -> None:
        if not self.open:
            return
        self.open = False
        quota = self.quota
        if quota is None:
            return
        if quota.tokens is not None:
            quota.tokens.give(self.tokens - charged)  # negative when the answer used more
        # A reservation from before 00:00 UTC was counted on a day that is over.
        if quota.daily is not None and quota.daily.day == self.day:
            quota.daily.used = max(0.0, quota.daily.used + charged - self.tokens)

    def __enter__(self) -> Reservation:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


class QuotaLimiter:
    """Every key's limits on this replica, one of ``replicas`` that split them evenly."""

    def __init__(
        self,
        replicas: int,
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
    ) -> None:
        self.replicas = replicas
        self.clock = clock
        self.wall = wall
        self._quotas: dict[str, KeyQuota] = {}  # by key name: a bounded set, from Secrets or a file

    def _quota(self, key: ApiKey) -> KeyQuota | None:
        if not key.limited:
            return None
        quota = self._quotas.get(key.name)
        now = self.clock()
        if quota is None or quota.limits != (key.rpm, key.tpm, key.tokens_per_day):
            quota = self._quotas[key.name] = KeyQuota(key, self.replicas, now)
        for bucket in (quota.requests, quota.tokens):
            if bucket is not None:
                bucket.refill(now)
        if quota.daily is not None:
            quota.daily.roll(self.wall())
        return quota

    def reserve(self, key: ApiKey, model: str, tokens: int) -> Reservation:
        """Take one request and reserve ``tokens``, or raise QuotaExceeded (429) taking nothing."""
        quota = self._quota(key)
        if quota is None:
            return Reservation(key.name, model, None, tokens, 0)
        daily, requests, bucket = quota.daily, quota.requests, quota.tokens
        if daily is not None and key.tokens_per_day is not None and not daily.admits(tokens):
            retry = _seconds(daily.reset_in(self.wall()))
            self._refuse(key, errors.daily_quota_used(key.tokens_per_day, retry), "daily_tokens")
        if requests is not None and key.rpm is not None and requests.wait(1) > 0:
            retry = _seconds(requests.wait(1))
            self._refuse(key, errors.over_rate_limit("requests", key.rpm, retry), "requests")
        if bucket is not None and key.tpm is not None and bucket.wait(tokens) > 0:
            retry = _seconds(bucket.wait(tokens))
            self._refuse(key, errors.over_rate_limit("tokens", key.tpm, retry), "tokens")
        if requests is not None:
            requests.level -= 1
        if bucket is not None:
            bucket.level -= tokens
        if daily is not None:
            daily.used += tokens
        reservation = Reservation(key.name, model, quota, tokens, daily.day if daily is not None else 0)
        reservation.headers = self.headers(key)
        return reservation

    def _refuse(self, key: ApiKey, exc: GatewayError, limit: str) -> NoReturn:
        refused = QuotaExceeded(exc, limit)
        refused.headers = self.headers(key)
        raise refused

    def headers(self, key: ApiKey) -> dict[str, str]:
        """OpenAI's x-ratelimit-* headers for the limits the key has (none for an unlimited key).
        Limits are the key's; remaining is this replica's times replicas, what is left of the
        key's limit when its traffic is spread evenly, and never negative."""
        quota = self._quota(key)
        if quota is None:
            return {}
        headers: dict[str, str] = {}
        for kind, limit, bucket in (("requests", key.rpm, quota.requests), ("tokens", key.tpm, quota.tokens)):
            if bucket is not None:
                headers[f"x-ratelimit-limit-{kind}"] = str(limit)
                headers[f"x-ratelimit-remaining-{kind}"] = str(max(0, math.floor(bucket.level)) * self.replicas)
                headers[f"x-ratelimit-reset-{kind}"] = duration(bucket.reset_in())
        return headers


def _seconds(wait: float) -> int:
    """Retry-After: whole seconds, rounded up, at least 1."""
    return max(1, math.ceil(wait))
