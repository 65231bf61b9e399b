"""Time series the dashboard charts: per-second buckets of named values, a bounded window."""

from __future__ import annotations

import math
from typing import Any


class Series:
    """Per-second buckets (by the time each value belongs to) of named sums or gauges; only
    the latest ``window_s`` seconds are kept.

    >>> s = Series(window_s=3)
    >>> s.add(100.2, log=1); s.add(100.7, log=2); s.add(102.0, log=1, dlq=1)
    >>> s.frame(["log", "dlq"])
    {'t': [100, 101, 102], 'log': [3.0, 0.0, 1.0], 'dlq': [0.0, 0.0, 1.0]}
    >>> s.add(104.5, log=5)  # seconds 100 and 101 fall out of the window
    >>> s.frame(["log"])
    {'t': [102, 103, 104], 'log': [1.0, 0.0, 5.0]}
    """

    def __init__(self, window_s: int = 600) -> None:
        self.window_s = window_s
        self._buckets: dict[int, dict[str, float]] = {}
        self.latest: int | None = None

    def add(self, t: float, **values: float) -> None:
        """Add ``values`` to the second of ``t`` (epoch seconds); a time older than the window
        is dropped (a reader catching up on a topic's history)."""
        bucket = self._bucket(t)
        if bucket is not None:
            for name, value in values.items():
                bucket[name] = bucket.get(name, 0.0) + value

    def set(self, t: float, **values: float) -> None:
        """Gauges: the latest value in the second of ``t`` wins."""
        bucket = self._bucket(t)
        if bucket is not None:
            bucket.update(values)

    def _bucket(self, t: float) -> dict[str, float] | None:
        if not math.isfinite(t):
            return None
        second = int(t)
        if self.latest is None or second > self.latest:
            self.latest = second
            cut = second - self.window_s
            for old in [s for s in self._buckets if s <= cut]:
                del self._buckets[old]
        if second <= self.latest - self.window_s:
            return None
        return self._buckets.setdefault(second, {})

    def frame(
        self, names: list[str], fill: float | None = 0.0, until: float | None = None
    ) -> dict[str, list[Any]]:
        """Every second from the oldest kept bucket to the latest, each name's value (``fill``
        where a second has none: 0 for counts, None for gauges). ``until``: end there instead
        (the last complete second), when the latest lies within the window before it — a
        quiet stream then shows as quiet — or a second or two after it (a second still
        filling would look like a drop)."""
        if not self._buckets or self.latest is None:
            return {"t": [], **{n: [] for n in names}}
        end = self.latest
        if until is not None and -2 <= int(until) - self.latest < self.window_s:
            end = int(until)
        seconds = list(range(max(min(self._buckets), end - self.window_s + 1), end + 1))
        out: dict[str, list[Any]] = {"t": seconds}
        for name in names:
            out[name] = [self._buckets.get(s, {}).get(name, fill) for s in seconds]
        return out

    def buckets(self) -> list[tuple[int, dict[str, float]]]:
        """The kept buckets, oldest first."""
        return sorted(self._buckets.items())
