"""Counts of requests in progress, each taken for the length of a ``with`` block.

A count taken with ``with`` is given back however the block ends (an answer, an error, the
client leaving, the shutdown cutting it), so no gauge or limit is ever left counting a request
that is gone. Plain ``__enter__``/``__exit__`` rather than ``contextlib``: several run per request.
"""

from __future__ import annotations


class Gauge:
    """One number of things in progress: ``with gauge:`` counts one for the block."""

    __slots__ = ("value",)

    def __init__(self) -> None:
        self.value = 0

    def __enter__(self) -> None:
        self.value += 1

    def __exit__(self, *exc: object) -> None:
        self.value -= 1


class KeyedGauge:
    """Numbers of things in progress per key: ``with gauges.one(key):`` counts one for the block.

    A key whose count returns to zero is dropped: keys come from API keys and routes, which change.
    """

    __slots__ = ("_values",)

    def __init__(self) -> None:
        self._values: dict[str, int] = {}

    def __getitem__(self, key: str) -> int:
        return self._values.get(key, 0)

    def one(self, key: str) -> _Counted:
        return _Counted(self._values, key)


class _Counted:
    __slots__ = ("key", "values")

    def __init__(self, values: dict[str, int], key: str) -> None:
        self.values = values
        self.key = key

    def __enter__(self) -> None:
        self.values[self.key] = self.values.get(self.key, 0) + 1

    def __exit__(self, *exc: object) -> None:
        remaining = self.values[self.key] - 1
        if remaining:
            self.values[self.key] = remaining
        else:
            del self.values[self.key]
