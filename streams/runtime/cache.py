"""A size-bounded LRU of decoded rows whose pinned entries are never evicted."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

K = TypeVar("K")
V = TypeVar("V")


class RowCache(Generic[K, V]):
    """Least-recently-used rows, at most ``capacity`` of them unless more are pinned.

    A table pins the rows changed in its open batch: they exist only here until the batch's
    transaction commits and they reach RocksDB, so evicting one would lose the change. Unpinned
    rows are copies of committed state and can be dropped at any time (the table reads them
    again from RocksDB). When every row over the bound is pinned the cache holds them all:
    the bound is exceeded by at most the rows of one batch.

    A batch whose transaction is committing while the next one is processed has its pins
    ``seal``-ed: they stay out of reach of eviction until ``release`` (its rows reached
    RocksDB), while ``pinned`` starts afresh for the next batch. The bound is then exceeded by
    at most the rows of two batches.

    >>> c: RowCache[str, int] = RowCache(capacity=2)
    >>> c.put("a", 1); c.pin("a"); c.put("b", 2); c.put("c", 3)
    >>> sorted(c)  # "b" was the least recently used unpinned row
    ['a', 'c']
    >>> c.seal(); c.release(); c.put("d", 4); sorted(c)  # "a", in use while "c" came, was newer
    ['a', 'd']
    >>> c.pin("d"); c.seal(); c.put("e", 5); c.put("f", 6); sorted(c)  # "d" sealed, kept
    ['d', 'f']
    >>> c.release(); c.put("g", 7); sorted(c)  # "d", kept while "f" came, was newer
    ['d', 'g']
    """

    def __init__(self, capacity: int) -> None:
        if capacity < 1:
            raise ValueError(f"a row cache needs room for at least one row, got {capacity}")
        self.capacity = capacity
        self.evictions = 0  # rows dropped for room since the cache was made (for metrics)
        self._rows: OrderedDict[K, V] = OrderedDict()
        self.pinned: set[K] = set()
        self.sealed: set[K] = set()  # pins of the batch committing (see above)

    def __len__(self) -> int:
        return len(self._rows)

    def __contains__(self, key: object) -> bool:
        return key in self._rows

    def __iter__(self) -> Iterator[K]:
        return iter(self._rows)

    def get(self, key: K) -> V | None:
        """The row, now the most recently used; None when not cached."""
        row = self._rows.get(key)
        if row is not None:
            self._rows.move_to_end(key)
        return row

    def __getitem__(self, key: K) -> V:
        return self._rows[key]

    def put(self, key: K, row: V) -> None:
        """Insert or replace a row (most recently used), evicting unpinned ones over the bound."""
        self._rows[key] = row
        self._rows.move_to_end(key)
        self._trim(keep=key)

    def pin(self, key: K) -> None:
        """Keep ``key`` whatever the bound until its batch is sealed and released (it may be
        cached later)."""
        self.pinned.add(key)

    def seal(self) -> None:
        """The open batch's rows were handed to its transaction: keep them until ``release``,
        and pin the next batch's rows apart."""
        self.sealed |= self.pinned
        self.pinned = set()

    def release(self) -> None:
        """The sealed batch's rows reached RocksDB: they may be evicted (unless pinned again
        by the batch processed meanwhile)."""
        self.sealed.clear()
        self._trim()

    def drop(self, which: Callable[[K], bool]) -> None:
        """Forget the rows (and pins) whose key ``which`` selects (a revoked partition's)."""
        for key in [k for k in self._rows if which(k)]:
            del self._rows[key]
        self.pinned = {k for k in self.pinned if not which(k)}
        self.sealed = {k for k in self.sealed if not which(k)}

    def clear(self) -> None:
        self._rows.clear()
        self.pinned.clear()
        self.sealed.clear()

    def _trim(self, keep: K | None = None) -> None:
        # Pinned rows met at the old end move to the new end (they are in use, so recent):
        # at most one pass over them, and the loop stops when only pinned rows are left.
        # ``keep``, the row just put, is never dropped: its caller is about to use it.
        moves = len(self.pinned) + len(self.sealed)
        while len(self._rows) > self.capacity:
            key = next(iter(self._rows))
            if key == keep:
                return
            if key in self.pinned or key in self.sealed:
                if moves == 0:
                    return
                moves -= 1
                self._rows.move_to_end(key)
                continue
            del self._rows[key]
            self.evictions += 1
