"""The global budget of request-body bytes in flight: memory bounded by a setting, not by clients.

A request claims its body's size from ``Content-Length`` before a byte is read (a chunked body
claims each chunk as it arrives) and gives it back once the body has been forwarded, or when
the request ends. A body that can never fit is 413; one that does not fit beside the others
is 429 with Retry-After.
"""

from __future__ import annotations

from . import errors


class BodyBudget:
    """Bytes of request bodies held at once, all clients together."""

    def __init__(self, capacity: int, retry_after: int) -> None:
        self.capacity = capacity
        self.retry_after = retry_after
        self.used = 0

    def claim(self, size: int = 0) -> BodyClaim:
        claim = BodyClaim(self)
        claim.grow(size)
        return claim


class BodyClaim:
    """One request's share of the budget; ``release`` is idempotent, and a ``with`` block
    releases it at its end."""

    __slots__ = ("budget", "size")

    def __init__(self, budget: BodyBudget) -> None:
        self.budget = budget
        self.size = 0

    def grow(self, more: int) -> None:
        budget = self.budget
        total = self.size + more
        if total > budget.capacity:
            raise errors.body_over_budget(total, budget.capacity)
        if budget.used + more > budget.capacity:
            raise errors.body_budget_full(budget.capacity, budget.retry_after)
        budget.used += more
        self.size = total

    def __enter__(self) -> BodyClaim:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    def release(self) -> None:
        self.budget.used -= self.size
        self.size = 0
