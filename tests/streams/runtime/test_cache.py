"""The bounded row cache: LRU eviction, pinned rows kept, the bound exceeded only by pins."""

from __future__ import annotations

import pytest

from streams.runtime.cache import RowCache


def test_least_recently_used_rows_go_first() -> None:
    c: RowCache[str, int] = RowCache(capacity=3)
    for k in "abc":
        c.put(k, ord(k))
    assert c.get("a") == ord("a")  # a is now the most recent
    c.put("d", 4)
    assert sorted(c) == ["a", "c", "d"] and c.evictions == 1
    assert c.get("b") is None


def test_pinned_rows_survive_any_number_of_puts() -> None:
    c: RowCache[int, int] = RowCache(capacity=2)
    c.put(0, 0)
    c.pin(0)
    for k in range(1, 100):
        c.put(k, k)
    assert 0 in c and len(c) == 2
    c.seal()
    c.release()
    c.put(100, 100)
    assert 0 not in c and len(c) == 2


def test_over_the_bound_only_by_pinned_rows() -> None:
    c: RowCache[int, int] = RowCache(capacity=2)
    for k in range(5):
        c.pin(k)
        c.put(k, k)
    assert sorted(c) == [0, 1, 2, 3, 4]  # a batch larger than the bound keeps all its rows
    c.put(9, 9)  # the row just put is kept for its caller, even with nothing else to drop
    assert 9 in c
    c.seal()
    c.release()
    assert len(c) == 2


def test_sealed_rows_stay_while_the_next_batch_pins_its_own() -> None:
    c: RowCache[int, int] = RowCache(capacity=2)
    for k in (0, 1):
        c.pin(k)
        c.put(k, k)
    c.seal()  # batch one handed to its transaction
    assert c.pinned == set() and c.sealed == {0, 1}
    c.pin(1)  # batch two changes row 1 again, and row 2
    c.pin(2)
    c.put(2, 2)
    for k in range(10, 20):  # rows only read: evicted, never a sealed or pinned one
        c.put(k, k)
    assert {0, 1, 2} <= set(c)
    c.release()  # batch one reached RocksDB: row 0 may go, rows 1 and 2 are batch two's
    assert c.pinned == {1, 2} and 0 not in c and {1, 2} <= set(c)
    c.seal()
    c.release()
    assert len(c) == 2


def test_drop_forgets_rows_and_pins() -> None:
    c: RowCache[tuple[int, str], int] = RowCache(capacity=10)
    for p in (0, 1):
        c.pin((p, "k"))
        c.put((p, "k"), p)
    c.seal()
    c.pin((0, "j"))
    c.drop(lambda pk: pk[0] == 0)
    assert list(c) == [(1, "k")] and c.sealed == {(1, "k")} and not c.pinned


def test_a_cache_needs_room() -> None:
    with pytest.raises(ValueError):
        RowCache(capacity=0)
