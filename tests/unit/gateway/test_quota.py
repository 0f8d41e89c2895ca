"""quota.py's accounting on its own, with clocks the tests move: reservations, settling and
releasing, the split between replicas, Retry-After, and the key fields that set the limits."""

from __future__ import annotations

import base64
import logging
import math

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from llmep_serving.gateway.auth import ApiKey, make_key, parse_keys
from llmep_serving.gateway.k8s import keys_from_secrets
from llmep_serving.gateway.quota import DAY, KeyQuota, QuotaExceeded, QuotaLimiter, Reservation, duration

pytestmark = pytest.mark.unit

NOON = 20_000 * DAY + DAY / 2  # a UTC noon, so a day's budget renews 43,200 s later


class Clocks:
    def __init__(self) -> None:
        self.now = 1000.0
        self.wall = NOON

    def advance(self, seconds: float) -> None:
        self.now += seconds
        self.wall += seconds


def limiter(replicas: int = 1) -> tuple[QuotaLimiter, Clocks]:
    clocks = Clocks()
    return QuotaLimiter(replicas, clock=lambda: clocks.now, wall=lambda: clocks.wall), clocks


class QuotaMachine(RuleBasedStateMachine):
    """Random reservations, settlements, releases (a client leaving, a backend failing) and time.

    With the clock stopped, a key's token bucket and daily budget hold exactly their capacity less
    the open reservations and the usage settled; with it moving, nothing goes negative or above
    its capacity. A second settle or release changes nothing.
    """

    @initialize(
        rpm=st.none() | st.integers(1, 50),
        tpm=st.none() | st.integers(1, 5000),
        daily=st.none() | st.integers(1, 20_000),
        replicas=st.integers(1, 4),
        moving=st.booleans(),
    )
    def start(self, rpm: int | None, tpm: int | None, daily: int | None, replicas: int, moving: bool) -> None:
        self.key = ApiKey(name="k", rpm=rpm, tpm=tpm, tokens_per_day=daily)
        self.limits, self.clocks = limiter(replicas)
        self.replicas = replicas
        self.moving = moving
        self.open: list[Reservation] = []
        self.charged: list[tuple[Reservation, int]] = []  # closed reservations and what each was charged

    def quota(self) -> KeyQuota | None:
        self.limits.headers(self.key)  # refills to now
        return self.limits._quotas.get("k")

    @rule(tokens=st.integers(0, 3000))
    def reserve(self, tokens: int) -> None:
        try:
            reservation = self.limits.reserve(self.key, "m", tokens)
        except QuotaExceeded as refused:
            assert refused.status == 429 and refused.retry_after is not None and refused.retry_after >= 1
            assert refused.code == ("insufficient_quota" if refused.limit == "daily_tokens" else "rate_limit_exceeded")
            if self.moving:
                # A client that waits Retry-After is not refused by the same limit again.
                self.clocks.advance(refused.retry_after)
                try:
                    self.open.append(self.limits.reserve(self.key, "m", tokens))
                except QuotaExceeded as again:
                    assert again.limit != refused.limit
            return
        self.open.append(reservation)

    @precondition(lambda self: self.open)
    @rule(data=st.data(), used=st.none() | st.integers(0, 4000))
    def settle(self, data: st.DataObject, used: int | None) -> None:
        reservation = self.open.pop(data.draw(st.integers(0, len(self.open) - 1)))
        reservation.settle(used)
        self.charged.append((reservation, reservation.tokens if used is None else used))
        self.closing_again_changes_nothing(reservation)

    @precondition(lambda self: self.open)
    @rule(data=st.data())
    def release(self, data: st.DataObject) -> None:
        reservation = self.open.pop(data.draw(st.integers(0, len(self.open) - 1)))
        reservation.release()
        self.charged.append((reservation, 0))
        self.closing_again_changes_nothing(reservation)

    def closing_again_changes_nothing(self, reservation: Reservation) -> None:
        before = self.snapshot()
        reservation.settle(123)
        reservation.release()
        with reservation:
            pass
        assert self.snapshot() == before

    def snapshot(self) -> tuple[float | None, float | None]:
        quota = self.limits._quotas.get("k")
        if quota is None:
            return None, None
        return (
            quota.tokens.level if quota.tokens is not None else None,
            quota.daily.used if quota.daily is not None else None,
        )

    @precondition(lambda self: self.moving)
    @rule(seconds=st.floats(0, 90_000))
    def wait(self, seconds: float) -> None:
        self.clocks.advance(seconds)

    @invariant()
    def remaining_is_never_negative_nor_above_the_limit(self) -> None:
        if not hasattr(self, "key"):
            return
        headers = self.limits.headers(self.key)
        for kind, limit in (("requests", self.key.rpm), ("tokens", self.key.tpm)):
            if limit is None:
                assert f"x-ratelimit-limit-{kind}" not in headers
                continue
            assert headers[f"x-ratelimit-limit-{kind}"] == str(limit)
            assert 0 <= int(headers[f"x-ratelimit-remaining-{kind}"]) <= limit

    @invariant()
    def tokens_charged_are_exactly_the_settled_usage(self) -> None:
        if not hasattr(self, "key"):
            return
        quota = self.quota()
        if quota is None:
            assert not self.key.limited
            return
        for bucket in (quota.requests, quota.tokens):
            if bucket is not None:
                assert bucket.level <= bucket.capacity
        today = quota.daily.day if quota.daily is not None else None
        if quota.daily is not None:
            # Same-day reservations only: one from before 00:00 UTC counted on a day that is over.
            held = sum(r.tokens for r in self.open if r.day == today)
            settled = sum(charge for r, charge in self.charged if r.day == today)
            assert quota.daily.used == pytest.approx(held + settled)
        if quota.tokens is not None and not self.moving:
            held = sum(r.tokens for r in self.open)
            settled = sum(charge for _, charge in self.charged)
            assert quota.tokens.level == pytest.approx(quota.tokens.capacity - held - settled)


TestQuotaAccounting = QuotaMachine.TestCase
TestQuotaAccounting.settings = settings(
    max_examples=150, stateful_step_count=30, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)


@given(limit=st.integers(1, 10_000), replicas=st.integers(1, 16))
def test_replicas_split_a_limit_exactly_and_never_to_zero(limit: int, replicas: int) -> None:
    key = ApiKey(name="k", rpm=limit, tpm=limit)
    shares = []
    for _ in range(replicas):
        limits, _clocks = limiter(replicas)
        limits.headers(key)
        quota = limits._quotas["k"]
        shares.append(quota.requests.capacity)
        assert quota.requests.capacity > 0 and quota.tokens.capacity > 0
    assert math.isclose(sum(shares), limit)


def test_a_full_burst_is_the_share_and_retry_after_is_when_the_bucket_has_room() -> None:
    limits, clocks = limiter(replicas=2)
    key = ApiKey(name="k", rpm=60)  # 30 per replica, one more every 2 s

    admitted = 0
    with pytest.raises(QuotaExceeded) as refused:
        while True:
            limits.reserve(key, "m", 0)
            admitted += 1

    assert admitted == 30
    assert refused.value.limit == "requests" and refused.value.type == "requests"
    assert refused.value.retry_after == 2
    assert refused.value.headers["x-ratelimit-remaining-requests"] == "0"
    assert refused.value.headers["x-ratelimit-reset-requests"] == "1m0s"
    clocks.advance(2)
    limits.reserve(key, "m", 0)


def test_a_request_larger_than_a_share_waits_for_a_full_bucket_then_runs_into_debt() -> None:
    limits, clocks = limiter(replicas=2)
    key = ApiKey(name="k", tpm=600)  # 300 per replica, 5 tokens a second

    limits.reserve(key, "m", 450).settle(450)
    with pytest.raises(QuotaExceeded) as refused:
        limits.reserve(key, "m", 450)

    # 150 tokens of debt, and the bucket must be full again: 450 tokens at 5 a second.
    assert refused.value.retry_after == 90
    clocks.advance(90)
    limits.reserve(key, "m", 450)


def test_the_daily_budget_renews_at_midnight_utc() -> None:
    limits, clocks = limiter()
    key = ApiKey(name="k", tokens_per_day=100)

    limits.reserve(key, "m", 60).settle(90)
    with pytest.raises(QuotaExceeded) as refused:
        limits.reserve(key, "m", 20)

    assert refused.value.code == "insufficient_quota" and refused.value.type == "insufficient_quota"
    assert refused.value.retry_after == DAY / 2  # from noon to 00:00 UTC
    clocks.advance(DAY / 2)
    limits.reserve(key, "m", 20)


def test_a_key_without_limits_gets_no_headers_and_is_never_refused() -> None:
    limits, _ = limiter()
    key = ApiKey(name="k")
    for _ in range(1000):
        limits.reserve(key, "m", 10**9).settle(10**9)
    assert limits.headers(key) == {}


@pytest.mark.parametrize(
    ("seconds", "text"),
    [(0, "0ms"), (0.02, "20ms"), (0.9991, "1s"), (1.5, "1.5s"), (360, "6m0s"), (61.25, "1m1.25s"), (3725, "1h2m5s")],
)
def test_reset_times_use_openais_duration_format(seconds: float, text: str) -> None:
    assert duration(seconds) == text


# -- key fields ---------------------------------------------------------------------------


def test_limit_fields_are_read_from_a_keys_file_entry_and_a_secret() -> None:
    entry = parse_keys(
        [{"name": "batch", "key": "sk-1", "rpm": 60, "tpm": "1000", "tokens_per_day": 5, "priority": "low"}]
    )
    secret = keys_from_secrets(
        [
            {
                "metadata": {"name": "batch"},
                "data": {
                    name: base64.b64encode(value.encode()).decode()
                    for name, value in {
                        "key": "sk-1",
                        "rpm": "60",
                        "tpm": "1000",
                        "tokens_per_day": "5",
                        "priority": "low",
                    }.items()
                },
            }
        ]
    )

    for key in (entry[0], secret[0]):
        assert (key.rpm, key.tpm, key.tokens_per_day, key.priority) == (60, 1000, 5, "low")
    assert make_key("plain", {"key": "sk-2"}).priority == "normal"
    assert not make_key("plain", {"key": "sk-2"}).limited


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("rpm", "0", "key 'batch': 'rpm' must be a whole number >= 1 (got '0'); leave it out for no limit"),
        ("tpm", -5, "key 'batch': 'tpm' must be a whole number >= 1 (got -5)"),
        ("tokens_per_day", "1.5", "key 'batch': 'tokens_per_day' must be a whole number >= 1 (got '1.5')"),
        ("rpm", True, "key 'batch': 'rpm' must be a whole number >= 1 (got True)"),
        ("priority", "urgent", "key 'batch': 'priority' must be one of high, normal, low (got 'urgent')"),
    ],
)
def test_a_bad_limit_field_is_refused_naming_the_key_the_field_and_the_fix(
    field: str, value: object, message: str
) -> None:
    with pytest.raises(ValueError) as err:
        make_key("batch", {"key": "sk-1", field: value})
    assert str(err.value).startswith(message)


def test_a_bad_key_secret_is_skipped_and_the_others_still_load(caplog: pytest.LogCaptureFixture) -> None:
    def secret(name: str, **data: str) -> dict[str, object]:
        return {"metadata": {"name": name}, "data": {k: base64.b64encode(v.encode()).decode() for k, v in data.items()}}

    with caplog.at_level(logging.WARNING):
        keys = keys_from_secrets([secret("batch", key="sk-1", rpm="0"), secret("ok", key="sk-2", rpm="10")])

    assert [(k.name, k.rpm) for k in keys] == [("ok", 10)]
    assert "ignoring API key Secret batch: key 'batch': 'rpm' must be a whole number >= 1 (got '0')" in caplog.text
