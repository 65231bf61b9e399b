"""A map from string keys to fixed-layout tuples: the hot ones in memory, the rest in RocksDB."""

from __future__ import annotations

import os
import shutil
import struct
import uuid
from collections import OrderedDict
from pathlib import Path
from typing import Any, Generic, TypeVar, cast

from rocksdict import Cache, Rdict

from streams.runtime.store import rocksdb_options

V = TypeVar("V", bound=tuple[Any, ...])  # the values' tuple type, as ``fmt`` packs it

_BLOCK_CACHE_BYTES = 16 << 20


class SpillMap(Generic[V]):
    """``key → tuple`` (packed with ``struct`` format ``fmt``), at most ``capacity`` decoded in
    memory: the least recently used ones are written to a local RocksDB when evicted and read
    back on their next use. Memory stays bounded however many keys there are; a key costs
    its bytes on disk instead.

    The store is scratch: made fresh under ``root`` for this instance and deleted by
    ``close`` (its owner rebuilds the map at start, as the router does from its log). Stores
    left by a process that died are removed when the next one opens under the same root.

    >>> import tempfile
    >>> m: SpillMap[tuple[int, float]] = SpillMap(Path(tempfile.mkdtemp()), "<qd", capacity=1)
    >>> m["a"] = (1, 2.5); m["b"] = (2, 3.5)  # "a" goes to disk
    >>> m.get("a"), m.get("c")
    ((1, 2.5), None)
    >>> m.close()
    """

    def __init__(self, root: Path, fmt: str, capacity: int) -> None:
        if capacity < 1:
            raise ValueError(f"a spill map needs room for one key in memory, got {capacity}")
        self.capacity = capacity
        self._struct = struct.Struct(fmt)
        root.mkdir(parents=True, exist_ok=True)
        _remove_stale(root)
        self.path = root / f"{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self._db = Rdict(str(self.path), options=rocksdb_options(Cache(_BLOCK_CACHE_BYTES)))
        self._hot: OrderedDict[str, V] = OrderedDict()
        self.spilled = 0  # evictions written to disk (for stats)

    def get(self, key: str, default: V | None = None) -> V | None:
        value = self._hot.get(key)
        if value is not None:
            self._hot.move_to_end(key)
            return value
        raw = self._db.get(key.encode())
        if raw is None:
            return default
        value = cast(V, self._struct.unpack(raw))
        self._keep(key, value)
        return value

    def __getitem__(self, key: str) -> V:
        value = self.get(key)
        if value is None:
            raise KeyError(key)
        return value

    def __contains__(self, key: object) -> bool:
        return isinstance(key, str) and self.get(key) is not None

    def __setitem__(self, key: str, value: V) -> None:
        self._keep(key, value)

    def _keep(self, key: str, value: V) -> None:
        self._hot[key] = value
        self._hot.move_to_end(key)
        while len(self._hot) > self.capacity:
            # Written whether or not it changed since it was read: one put, and no dirty set.
            old, evicted = self._hot.popitem(last=False)
            self._db[old.encode()] = self._struct.pack(*evicted)
            self.spilled += 1

    def close(self) -> None:
        self._hot.clear()
        self._db.close()
        Rdict.destroy(str(self.path))


def _remove_stale(root: Path) -> None:
    """Delete the stores of processes that are gone (named ``<pid>-<id>``)."""
    for entry in root.iterdir():
        pid = entry.name.split("-", 1)[0]
        if not pid.isdigit() or int(pid) == os.getpid():
            continue
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            shutil.rmtree(entry, ignore_errors=True)
        except PermissionError:
            continue  # alive, another user's
