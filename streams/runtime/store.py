"""Changelog-backed RocksDB tables: one local store per owned partition.

A table partition p lives in a local RocksDB (rocksdict, raw bytes) and in the compacted
changelog topic, partition p. The changelog is the truth; the local store is a cache of it
that never runs ahead:

- rows change in memory while a batch is processed; their records go to the changelog inside
  the batch's Kafka transaction;
- only after the transaction committed are they written to RocksDB, in one atomic write batch
  together with the changelog offset they reached;
- when the instance gains the partition (start-up or a rebalance), it reads the changelog from
  that offset to its end (read_committed) into RocksDB before processing anything.

So an instance killed at any moment, or a partition moving to another instance, resumes from
exactly the committed state; an aborted transaction's rows are never in any store.

Decoded rows are kept in a size-bounded LRU per table (``cache_rows``, streams.runtime.cache):
a row changed in the open batch is pinned until its batch is persisted, and any other row is
a copy of what RocksDB holds, so an evicted row read again on its next use is the committed
row — memory stays bounded however many keys the table has, and nothing changes in what it
computes.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Generic, TypeVar

from confluent_kafka import Consumer, KafkaError, TopicPartition
from rocksdict import BlockBasedOptions, Cache, Options, Rdict, WriteBatch

from streams.runtime.cache import RowCache
from streams.runtime.clients import KafkaConnection, committed_reader
from streams.runtime.exceptions import RestoreError
from streams.runtime.kafka import watermarks

_log = logging.getLogger("jodie.tables")

# Where a store keeps its changelog offset. UTF-8 never holds the byte 0xff, so UTF-8 row
# keys cannot collide with it; the bytes stay as they are because existing stores hold them.
_OFFSET_KEY = b"\xff\xfejodie:changelog-offset"

R = TypeVar("R")  # a decoded row

# RocksDB's own memory, bounded: its defaults (64 MiB memtables, two of them, per store, and a
# block cache per store) would let a worker's eight partition stores hold about 1 GiB of
# memtables alone. Rows are a few KiB and written once per batch; small memtables only mean
# more, smaller flushes. One block cache per table serves all its partitions.
_WRITE_BUFFER_BYTES = 8 << 20
_WRITE_BUFFERS = 2
_BLOCK_CACHE_BYTES = 32 << 20


def rocksdb_options(cache: Cache) -> Options:
    """Raw-bytes RocksDB options with bounded memtables and the given block cache."""
    options = Options(raw_mode=True)
    options.set_write_buffer_size(_WRITE_BUFFER_BYTES)
    options.set_max_write_buffer_number(_WRITE_BUFFERS)
    table = BlockBasedOptions()
    table.set_block_cache(cache)
    options.set_block_based_table_factory(table)
    return options


class _Partition:
    def __init__(self, path: Path, cache: Cache | None = None) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.db = Rdict(str(path), options=rocksdb_options(cache or Cache(_BLOCK_CACHE_BYTES)))

    @property
    def offset(self) -> int:
        """Changelog offset of the last record this store holds (-1: none)."""
        raw = self.db.get(_OFFSET_KEY)
        return -1 if raw is None else int(raw)


class Table(Generic[R]):
    """A table: the partitions this instance owns, rows decoded on first use.

    ``decode``/``encode`` convert rows to the changelog's bytes; ``initial(key)`` gives the row
    of a key the table has never stored. At most ``cache_rows`` decoded rows stay in memory
    (over all partitions), plus those changed in the open batch.
    """

    def __init__(
        self,
        conn: KafkaConnection,
        name: str,
        changelog: str,
        root: Path,
        decode: Callable[[bytes, bytes], R],
        encode: Callable[[bytes, R], bytes],
        initial: Callable[[bytes], R],
        cache_rows: int = 100_000,
    ) -> None:
        self.conn = conn
        self.name = name
        self.changelog = changelog
        self.root = root
        self.decode = decode
        self.encode = encode
        self.initial = initial
        self.partitions: dict[int, _Partition] = {}
        # Taken to change ``partitions`` and by ``committed``: a reader on another thread
        # never uses a store being closed.
        self._owned = threading.Lock()
        # (partition, key) → decoded row; the rows changed in the open batch are pinned.
        self.rows: RowCache[tuple[int, bytes], R] = RowCache(cache_rows)
        self._blocks = Cache(_BLOCK_CACHE_BYTES)  # RocksDB's, shared by the partitions
        self._reader: Consumer | None = None

    def _path(self, partition: int) -> Path:
        return self.root / f"{self.name}-{partition}"

    # -- ownership ----------------------------------------------------------------------------
    def assign(self, partition: int) -> int:
        """Take ``partition``: bring its store up to the changelog's end; returns records read."""
        if partition in self.partitions:
            return 0
        path = self._path(partition)
        part = _Partition(path, self._blocks)
        high = self._end(partition)
        if part.offset >= high:
            # A store ahead of its changelog belongs to a topic since deleted and re-created.
            _log.warning(
                "%s[%d]: local store ahead of the changelog; rebuilding", self.name, partition
            )
            part.db.close()
            Rdict.destroy(str(path))
            part = _Partition(path, self._blocks)
        read = self._restore(part, partition, high)
        with self._owned:
            self.partitions[partition] = part
        return read

    def holds_state(self, partition: int) -> bool:
        """Whether the assigned ``partition`` holds committed rows (its store has applied a
        changelog record; records of aborted or open transactions are never applied)."""
        part = self.partitions.get(partition)
        return part is not None and part.offset >= 0

    def revoke(self, partition: int) -> None:
        with self._owned:
            part = self.partitions.pop(partition, None)
            if part is not None:
                part.db.close()
        if part is not None:
            self.rows.drop(lambda pk: pk[0] == partition)

    def close(self) -> None:
        for p in list(self.partitions):
            self.revoke(p)
        if self._reader is not None:
            self._reader.close()
            self._reader = None

    def reset_reader(self) -> None:
        """Drop the restore reader: after a broker failure its metadata can stay stale
        ("Unknown partition") however long it is retried; a new one asks afresh."""
        if self._reader is not None:
            self._reader.close()
            self._reader = None

    def _reader_client(self) -> Consumer:
        if self._reader is None:
            self._reader = committed_reader(
                self.conn, group_id=f"jodie-restore-{uuid.uuid4().hex[:8]}"
            )
        return self._reader

    def _end(self, partition: int) -> int:
        reader = self._reader_client()
        return watermarks(reader, TopicPartition(self.changelog, partition))[1]

    def _restore(
        self, part: _Partition, partition: int, high: int, timeout_s: float = 120.0
    ) -> int:
        reader = self._reader_client()
        start = part.offset + 1
        if start >= high:
            return 0
        reader.assign([TopicPartition(self.changelog, partition, start)])
        read = 0
        batch = WriteBatch(raw_mode=True)
        last = part.offset
        deadline = time.monotonic() + timeout_s
        try:
            while True:
                if time.monotonic() > deadline:
                    raise RestoreError(
                        f"{self.changelog}[{partition}]: not at its end after {timeout_s} s"
                    )
                msg = reader.poll(1.0)
                if msg is None:
                    continue
                err = msg.error()
                if err is not None:
                    if err.code() == KafkaError._PARTITION_EOF:
                        break  # the last stable offset: every committed record is in
                    raise RestoreError(f"{self.changelog}[{partition}]: {err}")
                key, value = msg.key(), msg.value()
                if key is not None:
                    if value is None:
                        batch.delete(key)
                    else:
                        batch.put(key, value)
                last = msg.offset() or 0
                read += 1
        finally:
            reader.unassign()
        batch.put(_OFFSET_KEY, str(last).encode())
        part.db.write(batch)
        _log.info("%s[%d]: restored %d records up to offset %d", self.name, partition, read, last)
        return read

    # -- rows ---------------------------------------------------------------------------------
    def get(self, partition: int, key: bytes) -> R:
        row = self.rows.get((partition, key))
        if row is None:
            # Not cached (never used, or evicted): RocksDB holds its committed state, because
            # a changed row stays pinned in the cache until ``persist`` wrote it there.
            raw = self.partitions[partition].db.get(key)
            row = self.initial(key) if raw is None else self.decode(key, raw)
            self.rows.put((partition, key), row)
        return row

    def committed(self, partition: int, key: bytes) -> R | None:
        """The row as last committed, decoded afresh (``initial`` if never stored); None when
        this instance does not hold ``partition``. For readers on other threads than the
        processing one (interactive queries): RocksDB holds exactly the committed rows, and
        reading it never meets a row in the middle of a batch or evicts one being worked on."""
        with self._owned:
            part = self.partitions.get(partition)
            raw = None if part is None else part.db.get(key)
        if part is None:
            return None
        return self.initial(key) if raw is None else self.decode(key, raw)

    def forget(self) -> None:
        """Drop every row in memory (after an aborted batch): they reload from RocksDB."""
        self.rows.clear()

    def touch(self, partition: int, key: bytes) -> None:
        """Mark a row changed in the open batch (rows are mutated in place); it stays in
        memory until the batch is persisted."""
        self.rows.pin((partition, key))

    def put(self, partition: int, key: bytes, row: R) -> None:
        """Replace a row in the open batch (for rows that are values, not mutable objects)."""
        self.rows.pin((partition, key))
        self.rows.put((partition, key), row)

    def changed(self) -> list[tuple[int, bytes, bytes]]:
        """(partition, key, encoded row) of every row changed in the open batch."""
        return [
            (p, key, self.encode(key, self.rows[(p, key)]))
            for p, key in self.rows.pinned
            if (p, key) in self.rows  # touched but never read: nothing changed
        ]

    def persist(self, records: list[tuple[int, bytes, bytes]], offsets: dict[int, int]) -> None:
        """After the batch's transaction committed: write its rows and changelog offsets; the
        rows may then be evicted (RocksDB has them)."""
        by_partition: dict[int, WriteBatch] = {}
        for p, key, value in records:
            batch = by_partition.get(p)
            if batch is None:
                batch = by_partition[p] = WriteBatch(raw_mode=True)
            batch.put(key, value)
        for p, batch in by_partition.items():
            part = self.partitions.get(p)
            if part is None:
                continue
            if p in offsets:
                batch.put(_OFFSET_KEY, str(offsets[p]).encode())
            part.db.write(batch)
        self.rows.unpin_all()
