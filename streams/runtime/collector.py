"""Python's cycle collector on a schedule fit for a process that holds large caches.

CPython frees an object when its last reference goes; the cycle collector only finds groups
of objects that refer to each other and nothing else refers to. By default it also runs a
*full* collection, which visits every tracked object, whenever the objects that survived
into the oldest generation grew by a quarter. A worker holds about a million tracked objects
(decoded table rows, co-occurrence audiences, served lists) and replaces rows all the time,
so those full collections came every few seconds: measured in a soak worker (1 M users,
100k items), 16 % of its CPU, each full pass 0.3–0.6 s.

``CycleCollector`` keeps the young collections (rarer: every ``YOUNG`` allocations, not 700)
and takes the full one out of the allocation path: it runs from the worker's idle duties
every ``full_every_s`` seconds. Rows and messages are freed by reference counting whatever
the schedule; what waits longer is only cyclic garbage that reached the oldest generation,
which the hot path hardly makes — and the next scheduled pass frees it, so memory stays
bounded. The objects alive at start-up (modules, the checkpoint) are frozen out of every
pass. Time spent is counted per generation, for /metrics.
"""

from __future__ import annotations

import gc
import time
from collections.abc import Iterator
from typing import Any

from prometheus_client.metrics_core import CounterMetricFamily, Metric
from prometheus_client.registry import Collector

#: Young collections every this many net allocations (CPython's default: 700). Objects that
#: die before it (most of a batch's) are never visited: at 10,000 the young and middle passes
#: still took 4 % of a soak worker's CPU.
YOUNG = 50_000
#: Middle-generation collections every this many young ones (CPython's default: 10).
MIDDLE = 10
#: An automatic full collection only after this many middle ones: never, in practice; the
#: scheduled pass does it.
NEVER = 1 << 30


class CycleCollector(Collector):
    """Installs the schedule (process-wide) and counts what the collector costs (also as
    Prometheus counters under ``namespace``, when registered)."""

    def __init__(self, full_every_s: float, namespace: str = "jodie") -> None:
        self.full_every_s = full_every_s
        self.ns = namespace
        self.seconds = [0.0, 0.0, 0.0]  # CPU seconds spent per generation
        self.collections = [0, 0, 0]
        self._began = 0.0
        self._last_full = time.monotonic()
        self._previous = gc.get_threshold()
        # gc.get_freeze_count() walks the whole frozen list (about 25 ms per 260,000 objects
        # measured, holding the GIL): counted once, when freezing, not at every report.
        self.frozen = 0
        gc.callbacks.append(self._timed)
        gc.set_threshold(YOUNG, MIDDLE, NEVER)

    def freeze(self) -> None:
        """Exclude every object alive now from all later passes (call once set up)."""
        gc.collect()
        gc.freeze()
        self.frozen = gc.get_freeze_count()

    def poll(self) -> None:
        """The full pass when it is due (from the caller's idle duties)."""
        if time.monotonic() - self._last_full >= self.full_every_s:
            gc.collect()
            self._last_full = time.monotonic()

    def close(self) -> None:
        """Give the process its former schedule back."""
        if self._timed in gc.callbacks:
            gc.callbacks.remove(self._timed)
        gc.set_threshold(*self._previous)

    def summary(self) -> dict[str, Any]:
        return {
            "seconds": [round(s, 3) for s in self.seconds],
            "collections": list(self.collections),
            "frozen": self.frozen,
        }

    def collect(self) -> Iterator[Metric]:
        seconds = CounterMetricFamily(
            f"{self.ns}_gc_seconds",
            "CPU seconds in Python's cycle collector, by generation (2: the full passes).",
            labels=["generation"],
        )
        passes = CounterMetricFamily(
            f"{self.ns}_gc_collections", "Cycle collections, by generation.", labels=["generation"]
        )
        for generation in range(3):
            seconds.add_metric([str(generation)], self.seconds[generation])
            passes.add_metric([str(generation)], self.collections[generation])
        yield seconds
        yield passes

    def _timed(self, phase: str, info: dict[str, int]) -> None:
        # Thread CPU time: collections run on the thread that allocated, and other threads'
        # work meanwhile must not count.
        if phase == "start":
            self._began = time.thread_time()
        else:
            generation = info["generation"]
            self.seconds[generation] += time.thread_time() - self._began
            self.collections[generation] += 1
