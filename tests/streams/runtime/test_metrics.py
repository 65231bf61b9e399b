"""Prometheus metrics of an instance: per-instance registries, the loop's counters as read at
scrape, and the vectorised histogram agreeing with the library's own."""

from __future__ import annotations

import gc
import math
import time

from prometheus_client import CollectorRegistry, Histogram, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from streams.runtime.loop import LoopStats, Record
from streams.runtime.metrics import BatchHistogram, LoopMetrics, Metrics


def _samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """(sample name, sorted labels) → value, of a text exposition."""
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def test_the_batch_histogram_bins_as_the_library_does() -> None:
    bounds = (0.1, 0.5, 1.0, 5.0)
    values = [0.0, 0.1, 0.10001, 0.5, 0.7, 1.0, 4.9, 5.0, 5.1, 100.0]
    ours = BatchHistogram("ages_seconds", "ages", bounds)
    ours.observe(values[:4])
    ours.observe(values[4:])
    registry = CollectorRegistry()
    theirs = Histogram("ages_seconds", "ages", buckets=bounds, registry=registry)
    for v in values:
        theirs.observe(float(v))

    class One:
        def collect(self):  # type: ignore[no-untyped-def]
            yield ours.family()

    mine = CollectorRegistry()
    mine.register(One())  # type: ignore[arg-type]
    want = {
        k: v
        for k, v in _samples(generate_latest(registry).decode()).items()
        if "created" not in k[0]
    }
    got = _samples(generate_latest(mine).decode())
    assert got == want
    assert got[("ages_seconds_bucket", (("le", "0.1"),))] == 2.0  # "less than or equal"
    assert got[("ages_seconds_count", ())] == len(values)
    # Registered as a collector of its own, it renders the same.
    alone = CollectorRegistry()
    alone.register(ours)
    assert _samples(generate_latest(alone).decode()) == got


def test_loop_metrics_read_the_counters_at_each_scrape() -> None:
    metrics = Metrics()
    stats = LoopStats()
    loop = LoopMetrics(stats, metrics.registry, "app")
    stats.records, stats.transactions, stats.aborted, stats.lag = 7, 3, 1, 12
    stats.app_s, stats.send_s, stats.commit_s, stats.wait_s = 0.5, 0.125, 0.25, 0.0625
    got = _samples(metrics.exposition()[0].decode())
    assert got[("app_batch_phase_seconds_total", (("phase", "app"),))] == 0.5
    assert got[("app_batch_phase_seconds_total", (("phase", "send"),))] == 0.125
    assert got[("app_batch_phase_seconds_total", (("phase", "commit"),))] == 0.25
    assert got[("app_batch_phase_seconds_total", (("phase", "wait"),))] == 0.0625
    assert got[("app_input_records_total", ())] == 7
    assert got[("app_transactions_total", ())] == 3
    assert got[("app_transactions_aborted_total", ())] == 1
    assert got[("app_input_lag_records", ())] == 12
    assert got[("process_resident_memory_bytes", ())] > 0

    now_ms = int(time.time() * 1000)
    records = [
        Record("in", 0, 0, b"k", b"v", now_ms - 2_000_000),  # 2,000 s old: past every bucket
        Record("in", 0, 1, b"k", b"v", now_ms + 3_600_000),  # a clock ahead: age 0, not < 0
        Record("in", 0, 2, b"k", b"v"),  # no timestamp: not counted
    ]
    loop.observe(records, 0.3)
    stats.records, stats.lag = 10, -1
    got = _samples(metrics.exposition()[0].decode())
    assert got[("app_input_records_total", ())] == 10
    assert math.isnan(got[("app_input_lag_records", ())])  # unknown, not zero
    assert got[("app_batch_seconds_count", ())] == 1
    assert got[("app_batch_seconds_sum", ())] == 0.3
    assert got[("app_input_age_seconds_count", ())] == 2
    assert got[("app_input_age_seconds_bucket", (("le", "0.01"),))] == 1
    assert got[("app_input_age_seconds_bucket", (("le", "300.0"),))] == 1
    assert got[("app_input_age_seconds_bucket", (("le", "+Inf"),))] == 2
    assert got[("app_input_age_seconds_sum", ())] >= 2000.0


def test_instances_in_one_process_keep_apart() -> None:
    first, second = Metrics(), Metrics()
    a, b = LoopStats(), LoopStats()
    LoopMetrics(a, first.registry, "app")
    LoopMetrics(b, second.registry, "app")  # the same names: no clash across registries
    a.records, b.records = 1, 2
    assert _samples(first.exposition()[0].decode())[("app_input_records_total", ())] == 1
    assert _samples(second.exposition()[0].decode())[("app_input_records_total", ())] == 2
    assert first.exposition()[1].startswith("text/plain")


class _Node:
    pass


def _heap(metrics: Metrics) -> tuple[int, int]:
    page = metrics.heap.summary()
    blocks, in_use = page["python_blocks"], page["malloc_in_use_bytes"]
    assert blocks is not None and in_use is not None  # glibc, as on the machines we run
    return blocks, in_use


def test_the_heap_gauges_follow_what_is_allocated() -> None:
    """Every instance's registry says where its heap is: small objects in Python's blocks,
    large buffers in malloc's bytes."""
    metrics = Metrics()
    # Measured alone: cyclic garbage that earlier tests left (loops bound to their
    # consumers' callbacks, with their tables) would otherwise be freed by the collection
    # the allocations below set off, in the middle of the measurement.
    gc.collect()
    gc.disable()
    try:
        blocks, in_use = _heap(metrics)
        objects = [_Node() for _ in range(100_000)]  # small objects: Python's own allocator
        buffer = bytearray(64 << 20)  # large: straight from malloc
        more_blocks, more_in_use = _heap(metrics)
        assert more_blocks - blocks >= 100_000
        assert more_in_use - in_use >= 64 << 20
        got = _samples(metrics.exposition()[0].decode())
        assert got[("jodie_python_blocks", ())] >= more_blocks
        assert got[("jodie_malloc_in_use_bytes", ())] >= 64 << 20
        assert got[("jodie_malloc_free_bytes", ())] >= 0
        del objects, buffer
        fewer_blocks, less_in_use = _heap(metrics)
        assert fewer_blocks < more_blocks - 90_000
        assert less_in_use < more_in_use - (60 << 20)
    finally:
        gc.enable()
