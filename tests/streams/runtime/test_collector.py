"""The worker's cycle-collector schedule: young passes as usual, the full one only when the
caller's poll finds it due, cyclic garbage freed by it, the cost counted."""

from __future__ import annotations

import gc
import weakref
from collections.abc import Iterator

import pytest

from streams.runtime.collector import NEVER, YOUNG, CycleCollector


class _Node:
    def __init__(self) -> None:
        self.other: _Node | None = None


def _cycle() -> weakref.ref[_Node]:
    """A two-object cycle nothing else refers to (only the cycle collector frees it)."""
    a, b = _Node(), _Node()
    a.other, b.other = b, a
    return weakref.ref(a)


@pytest.fixture
def collector() -> Iterator[CycleCollector]:
    before = gc.get_threshold()
    c = CycleCollector(full_every_s=3600.0, namespace="t")
    try:
        yield c
    finally:
        c.close()
        assert gc.get_threshold() == before


def test_the_schedule_leaves_full_passes_to_poll(collector: CycleCollector) -> None:
    assert gc.get_threshold() == (YOUNG, 10, NEVER)
    gc.collect(2)
    gc.collect(2)  # out of the garbage a test run leaves behind: only this one's cycle below
    alive = _cycle()
    for _ in range(3):
        collector.poll()  # not due for an hour
    assert alive() is not None and collector.collections[2] == 2
    collector.full_every_s = 0.0
    collector.poll()
    assert alive() is None  # freed by the scheduled full pass
    assert collector.collections[2] == 3
    assert collector.seconds[2] > 0.0


def test_each_pass_is_counted_by_generation(collector: CycleCollector) -> None:
    gc.collect(0)
    gc.collect(1)
    assert min(collector.collections[:2]) >= 1
    summary = collector.summary()
    assert summary["collections"] == collector.collections
    assert len(summary["seconds"]) == 3
    families = {f.name: f for f in collector.collect()}
    seconds = {s.labels["generation"]: s.value for s in families["t_gc_seconds"].samples}
    assert set(seconds) == {"0", "1", "2"}
    passes = {s.labels["generation"]: s.value for s in families["t_gc_collections"].samples}
    assert passes["1"] >= 1


def test_close_gives_the_former_schedule_back() -> None:
    before = gc.get_threshold()
    c = CycleCollector(full_every_s=1.0)
    c.close()
    assert gc.get_threshold() == before
    gc.collect(0)
    assert c.collections[0] == 0  # no longer counting


def test_the_frozen_count_is_taken_when_freezing(collector: CycleCollector) -> None:
    assert collector.summary()["frozen"] == 0
    try:
        collector.freeze()
        frozen = gc.get_freeze_count()
        # Reports read the count kept at the freeze, not a walk of the frozen list.
        assert frozen > 0 and collector.summary()["frozen"] == frozen
    finally:
        gc.unfreeze()
