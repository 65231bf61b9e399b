"""The table's bounded rows over RocksDB: eviction, pinned rows, re-reads equal what was written.

No broker: a partition's local store is opened directly, as ``Table.assign`` does once the
changelog is read; these tests only use the rows' path (get, touch, changed, persist).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from streams.runtime.store import Table, TableMemory, _Partition
from streams.settings import Settings


def table(root: Path, cache_rows: int, partitions: int = 2) -> Table[dict[str, Any]]:
    t: Table[dict[str, Any]] = Table(
        Settings(),
        "rows",
        "rows-changelog",
        root,
        decode=lambda _key, raw: json.loads(raw),
        encode=lambda _key, row: json.dumps(row).encode(),
        initial=lambda key: {"key": key.decode(), "n": 0},
        cache_rows=cache_rows,
    )
    for p in range(partitions):
        t.partitions[p] = _Partition(root / f"rows-{p}", t._blocks)  # as ``assign`` opens it
    return t


def commit(t: Table[dict[str, Any]]) -> None:
    """What the loop does after the batch's transaction committed."""
    t.persist(t.changed(), {})


def bump(t: Table[dict[str, Any]], p: int, key: bytes) -> None:
    row = t.get(p, key)
    t.touch(p, key)
    row["n"] += 1


def test_rows_are_evicted_beyond_the_bound(tmp_path: Path) -> None:
    t = table(tmp_path, cache_rows=10)
    for k in range(100):
        t.get(k % 2, f"u{k}".encode())
    assert len(t.rows) == 10 and t.rows.evictions == 90
    t.close()


def test_rows_changed_in_the_open_batch_stay_until_persisted(tmp_path: Path) -> None:
    t = table(tmp_path, cache_rows=4)
    keys = [f"u{k}".encode() for k in range(20)]
    for k in keys:  # one batch touching five times the bound
        bump(t, 0, k)
    assert len(t.rows) == 20  # all pinned: nothing changed may be lost before the commit
    changed = t.changed()
    assert sorted(k for _p, k, _v in changed) == sorted(keys)
    t.persist(changed, {})
    assert len(t.rows) == 4
    t.close()


def test_an_evicted_row_reads_back_as_committed(tmp_path: Path) -> None:
    t = table(tmp_path, cache_rows=3)
    for _ in range(3):  # three batches, each changing every row once
        for k in range(10):
            bump(t, k % 2, f"u{k}".encode())
        commit(t)
    for k in range(10):  # most were evicted and come back from RocksDB
        assert t.get(k % 2, f"u{k}".encode()) == {"key": f"u{k}", "n": 3}
    assert t.get(0, b"never") == {"key": "never", "n": 0}
    # The same rows with an unbounded cache: equal, row by row.
    reference = table(tmp_path / "ref", cache_rows=1_000)
    for _ in range(3):
        for k in range(10):
            bump(reference, k % 2, f"u{k}".encode())
        commit(reference)
    for k in range(10):
        key = f"u{k}".encode()
        assert t.get(k % 2, key) == reference.get(k % 2, key)
    t.close()
    reference.close()


def test_the_next_batch_changes_rows_while_the_last_one_commits(tmp_path: Path) -> None:
    """Overlap (streams.runtime.loop): batch two is processed between batch one's
    ``changed`` and its ``persist``. Each batch's changelog carries its own rows, RocksDB
    gets batch one's values, and no changed row is evicted before it is persisted."""
    t = table(tmp_path, cache_rows=2)
    for k in (b"a", b"b"):
        bump(t, 0, k)
    first = t.changed()  # batch one: its transaction commits from here
    bump(t, 0, b"b")  # batch two, meanwhile: b again, and c
    bump(t, 0, b"c")
    for k in range(10):  # reads that push the cache over its bound
        t.get(1, f"r{k}".encode())
    assert {(0, b"a"), (0, b"b"), (0, b"c")} <= set(t.rows)
    t.persist(first, {})
    assert sorted((k, json.loads(v or b"")["n"]) for _p, k, v in first) == [(b"a", 1), (b"b", 1)]
    assert t.committed(0, b"b") == {"key": "b", "n": 1}
    second = t.changed()
    assert sorted((k, json.loads(v or b"")["n"]) for _p, k, v in second) == [(b"b", 2), (b"c", 1)]
    t.persist(second, {})
    assert t.committed(0, b"b") == {"key": "b", "n": 2} and t.get(0, b"a")["n"] == 1
    t.close()


def test_an_aborted_batch_is_forgotten(tmp_path: Path) -> None:
    t = table(tmp_path, cache_rows=2)
    bump(t, 0, b"a")
    commit(t)
    bump(t, 0, b"a")  # never committed
    t.forget()
    assert t.get(0, b"a")["n"] == 1 and not t.rows.pinned
    t.close()


def test_a_revoked_partition_leaves_the_cache(tmp_path: Path) -> None:
    t = table(tmp_path, cache_rows=10)
    t.get(0, b"a")
    t.get(1, b"b")
    t.revoke(0)
    assert list(t.rows) == [(1, b"b")]
    t.close()


def test_readers_beside_the_processing_see_committed_rows_only(tmp_path: Path) -> None:
    t = table(tmp_path, cache_rows=100)
    bump(t, 0, b"u")
    commit(t)
    bump(t, 0, b"u")  # the open batch: n = 2 in memory, not committed
    assert t.get(0, b"u") == {"key": "u", "n": 2}
    assert t.committed(0, b"u") == {"key": "u", "n": 1}
    assert t.committed(0, b"never") == {"key": "never", "n": 0}
    commit(t)
    assert t.committed(0, b"u") == {"key": "u", "n": 2}
    t.revoke(1)
    assert t.committed(1, b"u") is None  # a partition not held here
    t.close()


def test_a_deleted_row_goes_as_a_tombstone_then_leaves_rocksdb(tmp_path: Path) -> None:
    t = table(tmp_path, cache_rows=100)
    for k in (b"a", b"b", b"c"):
        bump(t, 0, k)
    commit(t)
    t.delete(0, b"b")
    assert (0, b"b") not in t.rows and t.deleting() == 1
    t.forget()  # an aborted batch: the deletion is still due
    changed = t.changed()
    assert changed == [(0, b"b", None)]
    assert [k for k, _v in t.scan(0, None, 10)] == [b"a", b"b", b"c"]  # not yet committed
    t.persist(changed, {})
    assert [k for k, _v in t.scan(0, None, 10)] == [b"a", b"c"] and t.deleting() == 0
    assert t.get(0, b"b") == {"key": "b", "n": 0}  # read again: as never stored
    t.close()


def test_a_deletion_yields_to_a_row_used_again_or_a_partition_gone(tmp_path: Path) -> None:
    t = table(tmp_path, cache_rows=100)
    bump(t, 0, b"a")
    bump(t, 1, b"b")
    commit(t)
    t.delete(0, b"a")
    t.delete(1, b"b")
    bump(t, 0, b"a")  # changed again before the commit: kept
    t.revoke(1)
    assert [(p, k, v is None) for p, k, v in t.changed()] == [(0, b"a", False)]
    assert t.deleting() == 0
    t.close()


def test_scan_reads_committed_rows_in_chunks_in_key_order(tmp_path: Path) -> None:
    t = table(tmp_path, cache_rows=100)
    keys = [f"u{k:02d}".encode() for k in range(25)]
    for k in reversed(keys):
        bump(t, 0, k)
    bump(t, 0, keys[0])
    t.persist(t.changed(), {0: 7})
    assert t.partitions[0].offset == 7  # the changelog offset the store keeps is not a row
    seen: list[bytes] = []
    after = None
    while chunk := t.scan(0, after, 10):
        assert len(chunk) <= 10
        seen += [k for k, _v in chunk]
        after = chunk[-1][0]
    assert seen == keys
    assert json.loads(t.scan(0, keys[3], 1)[0][1]) == {"key": "u04", "n": 1}
    t.close()


def test_rocksdb_memory_is_counted_by_kind(tmp_path: Path) -> None:
    """What RocksDB holds in memory is visible: writes in the memtables until flushed, then
    blocks read back in the cache the partitions share."""
    t = table(tmp_path, cache_rows=10)
    empty = t.memory()
    for k in range(2_000):
        bump(t, k % 2, f"u{k}".encode())
    commit(t)
    written = t.memory()
    assert written["memtables"] > empty["memtables"]
    for part in t.partitions.values():
        part.db.flush()
    flushed = t.memory()
    assert flushed["memtables"] < written["memtables"]
    assert flushed["table_readers"] > 0  # the flushed files' index and filter blocks
    for k in range(0, 2_000, 50):  # evicted long ago: read back from the files
        assert t.get(k % 2, f"u{k}".encode())["n"] == 1
    assert t.memory()["block_cache"] > flushed["block_cache"]
    families = list(TableMemory([t], namespace="t").collect())
    samples = {tuple(sorted(s.labels.items())): s.value for s in families[0].samples}
    assert families[0].name == "t_rocksdb_memory_bytes"
    assert samples[(("kind", "block_cache"), ("table", "rows"))] == t.memory()["block_cache"]
    assert {labels[0][1] for labels in samples} == {"memtables", "table_readers", "block_cache"}
    t.close()
