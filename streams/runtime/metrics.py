"""Prometheus metrics of one instance: the process, the transactional loop, its latencies.

Each instance keeps its own ``CollectorRegistry``, never the library's global one, so that
several instances (workers in a test, say) can live in one process. Beside the library's
process collectors (RSS, CPU), ``HeapCollector`` says where the heap is, for telling a leak
from a cache that fills: the blocks Python's allocator holds (every object and buffer it
allocated and did not free) and, on glibc, the bytes ``malloc`` has handed out and not had
back (numpy arrays, RocksDB, faiss, librdkafka). RSS alone does not separate them.

Counters the loop already keeps (``LoopStats``) are read at each scrape by a collector instead
of being mirrored on the hot path; only latencies are recorded as they happen.
"""

from __future__ import annotations

import bisect
import ctypes
import ctypes.util
import itertools
import math
import sys
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from typing import Any, ClassVar

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Histogram,
    PlatformCollector,
    ProcessCollector,
    generate_latest,
)
from prometheus_client.metrics_core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

from streams.runtime.loop import LoopStats, Record

#: Seconds from a batch's records being taken to its commit.
BATCH_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
#: Seconds from a record being produced to its batch's commit: milliseconds when the
#: instance keeps up, minutes when it lags.
AGE_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)


class _MallInfo2(ctypes.Structure):
    # glibc's struct mallinfo2 (2.33+), every field a size_t.
    _fields_ = [
        (name, ctypes.c_size_t)
        for name in (
            "arena",
            "ordblks",
            "smblks",
            "hblks",
            "hblkhd",
            "usmblks",
            "fsmblks",
            "uordblks",
            "fordblks",
            "keepcost",
        )
    ]


def _mallinfo2() -> Any:
    """glibc's ``mallinfo2`` (None on another C library or an older glibc)."""
    name = ctypes.util.find_library("c")
    try:
        fn = ctypes.CDLL(name).mallinfo2 if name else None
    except (OSError, AttributeError):
        return None
    if fn is not None:
        fn.restype = _MallInfo2
        fn.argtypes = []
    return fn


_MALLINFO2 = _mallinfo2()


def malloc_bytes() -> tuple[int, int] | None:
    """(in use, free) bytes of malloc, from one ``mallinfo2`` call (it locks and walks every
    arena): in use, what it has handed out and not had back, in its arenas and as mappings of
    their own; free, what it has had back but keeps from the system (RSS once touched). None
    where glibc's ``mallinfo2`` is missing."""
    if _MALLINFO2 is None:
        return None
    info = _MALLINFO2()
    return int(info.uordblks + info.hblkhd), int(info.fordblks)


class HeapCollector(Collector):
    """Where the process's heap is: Python's allocated blocks, malloc's bytes in use and free."""

    HELP: ClassVar[dict[str, str]] = {
        "python_blocks": "Memory blocks Python's allocator holds (objects and buffers not freed).",
        "malloc_in_use_bytes": "Bytes glibc malloc has handed out and not had back.",
        "malloc_free_bytes": "Bytes free inside glibc malloc's arenas, kept from the system.",
    }

    def __init__(self, namespace: str = "jodie") -> None:
        self.ns = namespace

    def summary(self) -> dict[str, int | None]:
        """The same figures for a JSON page."""
        malloc = malloc_bytes()
        return {
            "python_blocks": sys.getallocatedblocks(),
            "malloc_in_use_bytes": None if malloc is None else malloc[0],
            "malloc_free_bytes": None if malloc is None else malloc[1],
        }

    def collect(self) -> Iterator[Metric]:
        for key, value in self.summary().items():
            if value is not None:  # malloc's figures where glibc's mallinfo2 is missing
                yield GaugeMetricFamily(f"{self.ns}_{key}", self.HELP[key], value=value)


class Metrics:
    """One instance's registry, with the process's collectors (RSS, CPU, open files, the
    heap) in it."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        ProcessCollector(registry=self.registry)
        PlatformCollector(registry=self.registry)
        self.heap = HeapCollector()
        self.registry.register(self.heap)

    def register(self, collector: Collector) -> None:
        self.registry.register(collector)

    def exposition(self) -> tuple[bytes, str]:
        """The registry in the Prometheus text format (an HTTP route's handler)."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST


def ages_s(stamps_ms: Iterable[int]) -> list[float]:
    """Seconds from each Kafka timestamp (ms) to now. Clocks of other hosts may run ahead of
    ours: a negative age is a zero one."""
    now_ms = time.time() * 1000.0
    return [max(now_ms - stamp, 0.0) / 1000.0 for stamp in stamps_ms]


class BatchHistogram(Collector):
    """A histogram fed many values at a time.

    ``prometheus_client.Histogram.observe`` costs about 10 µs a value (a lock and a Python
    loop over the buckets each time): 19 ms for a batch of 2,000 records, measured on two
    cores, against 3 ms binned by ``bisect`` under one lock here. The library only renders
    the result.
    """

    def __init__(self, name: str, documentation: str, buckets: Sequence[float]) -> None:
        self.name, self.documentation = name, documentation
        self.bounds = sorted(float(b) for b in buckets if math.isfinite(b))
        self._counts = [0] * (len(self.bounds) + 1)  # the last: above every bound
        self._sum = 0.0
        self._lock = threading.Lock()

    def observe(self, values: Iterable[float]) -> None:
        bounds, counts = self.bounds, [0] * len(self._counts)
        total = 0.0
        for v in values:
            # Prometheus buckets are "less than or equal": bisect_left puts v == bound in it.
            counts[bisect.bisect_left(bounds, v)] += 1
            total += v
        with self._lock:
            self._counts = [a + b for a, b in zip(self._counts, counts, strict=True)]
            self._sum += total

    def collect(self) -> Iterator[Metric]:
        """As a collector of its own (``registry.register``)."""
        yield self.family()

    def family(self) -> HistogramMetricFamily:
        with self._lock:
            cumulative, total = list(itertools.accumulate(self._counts)), self._sum
        buckets = [
            (floatToGoString(b), float(c))
            for b, c in zip(self.bounds, cumulative[:-1], strict=True)
        ]
        buckets.append(("+Inf", float(cumulative[-1])))
        return HistogramMetricFamily(
            self.name, self.documentation, buckets=buckets, sum_value=total
        )


class LoopMetrics(Collector):
    """The transactional loop's counters and lag, and the latency of its batches and inputs.

    ``observe`` is the application's ``committed`` hook: the loop calls it after each commit.
    """

    def __init__(self, stats: LoopStats, registry: CollectorRegistry, namespace: str) -> None:
        self.stats = stats
        self.ns = namespace
        self.batch = Histogram(
            "batch_seconds",
            "Seconds from taking a batch of input records to committing its transaction.",
            namespace=namespace,
            buckets=BATCH_BUCKETS,
            registry=registry,
        )
        self.input_age = BatchHistogram(
            f"{namespace}_input_age_seconds",
            "Seconds from each input record's production (its Kafka timestamp) to the commit "
            "of the batch that applied it: the latency of the hop into this instance.",
            AGE_BUCKETS,
        )
        registry.register(self)

    def observe(self, records: Sequence[Record], seconds: float) -> None:
        self.batch.observe(seconds)
        self.input_age.observe(ages_s(r.timestamp_ms for r in records if r.timestamp_ms >= 0))

    def collect(self) -> Iterator[Metric]:
        s, ns = self.stats, self.ns
        for name, doc, value in (
            ("input_records", "Input records consumed.", s.records),
            ("transactions", "Transactions committed.", s.transactions),
            ("transactions_aborted", "Transactions aborted (their batch re-read).", s.aborted),
            ("producers_replaced", "Producers replaced after a fatal error.", s.replaced),
            ("restored_records", "Changelog records read into the tables.", s.restored),
            (
                "changelog_records",
                "Changelog records written by committed transactions.",
                s.changelog,
            ),
            (
                "changelog_bytes",
                "Bytes of the rows written to changelogs by committed transactions.",
                s.changelog_bytes,
            ),
            (
                "input_records_held",
                "Input records held back for a later batch behind a backlog, each time held.",
                s.held,
            ),
        ):
            yield CounterMetricFamily(f"{ns}_{name}", doc, value=value)
        phases = CounterMetricFamily(
            f"{ns}_batch_phase_seconds",
            "Seconds of committed batches by phase: app (the application's prepare and "
            "process), send (outputs and changed rows handed to the producer), commit (the "
            "offsets sent and the wait for every acknowledgement and the coordinator), wait "
            "(of commit, the time the loop waited: all of it unless the next batch is "
            "processed meanwhile, JODIE_WORKER_OVERLAP).",
            labels=["phase"],
        )
        for phase, seconds in (
            ("app", s.app_s),
            ("send", s.send_s),
            ("commit", s.commit_s),
            ("wait", s.wait_s),
        ):
            phases.add_metric([phase], seconds)
        yield phases
        yield GaugeMetricFamily(
            f"{ns}_largest_row_bytes",
            "The largest row a committed transaction wrote to a changelog (the changelogs "
            "take up to their declared max_message_bytes, deploy/topics.toml).",
            value=s.largest_row,
        )
        yield GaugeMetricFamily(
            f"{ns}_input_lag_records",
            "Input records behind the ends of the assigned partitions (NaN: unknown).",
            value=float(s.lag) if s.lag >= 0 else math.nan,
        )
        yield self.input_age.family()
