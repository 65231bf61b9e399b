"""Changelog-backed RocksDB tables: one local store per owned partition.

A table partition p lives in a local RocksDB (rocksdict, raw bytes) and in the compacted
changelog topic, partition p. The changelog is the truth; the local store is a cache of it
that never runs ahead:

- rows change in memory while a batch is processed; their records go to the changelog inside
  the batch's Kafka transaction;
- only after the transaction committed are they written to RocksDB, in one atomic write batch
  together with the changelog offset they reached;
- when the instance gains the partition (start-up or a rebalance), it reads the changelog from
  that offset to its end (read_committed) into RocksDB before processing anything — after
  checking that the record of the store's last row is committed, and rebuilding the store
  from the changelog when it is not (``Table._committed_row``: a rare broker failure leaves a
  returned commit incomplete; compaction that removed that record costs a rebuild too).

So an instance killed at any moment, or a partition moving to another instance, resumes from
exactly the committed state; an aborted transaction's rows are never in any store.

Decoded rows are kept in a size-bounded LRU per table (``cache_rows``, streams.runtime.cache):
a row changed in the open batch is pinned until its batch is persisted (sealed, while its
transaction commits and the next batch is processed), and any other row is
a copy of what RocksDB holds, so an evicted row read again on its next use is the committed
row — memory stays bounded however many keys the table has, and nothing changes in what it
computes.

Rows are removed as they are changed: ``delete`` queues a key, the next transaction carries
its tombstone to the changelog (so a restore, and compaction, drop it too) and RocksDB deletes
it once that transaction committed. ``scan`` reads the committed rows a few at a time, for
an application that collects rows it no longer needs without stopping its processing.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any, Generic, TypeVar

from confluent_kafka import Consumer, KafkaError, KafkaException, TopicPartition
from prometheus_client.metrics_core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from rocksdict import BlockBasedOptions, Cache, Options, Rdict, WriteBatch

from streams.runtime.cache import RowCache
from streams.runtime.clients import KafkaConnection, committed_reader
from streams.runtime.exceptions import RestoreError
from streams.runtime.kafka import committed_at, watermarks

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
        # (partition, key) of rows to delete in the next transaction; kept when a batch is
        # aborted (deleting a row nobody uses again is the same in any later transaction).
        self._deleted: set[tuple[int, bytes]] = set()

    def _path(self, partition: int) -> Path:
        return self.root / f"{self.name}-{partition}"

    def memory(self) -> dict[str, int]:
        """Bytes RocksDB holds in memory for this table, by kind (from its own counters):
        ``memtables`` (writes not yet flushed, all partitions), ``table_readers`` (the index
        and filter blocks of open files) and ``block_cache`` (the cache the partitions share)."""
        with self._owned:
            dbs = [part.db for part in self.partitions.values()]
            memtables = sum(db.property_int_value("rocksdb.size-all-mem-tables") or 0 for db in dbs)
            readers = sum(
                db.property_int_value("rocksdb.estimate-table-readers-mem") or 0 for db in dbs
            )
        return {
            "memtables": memtables,
            "table_readers": readers,
            "block_cache": int(self._blocks.get_usage()),
        }

    # -- ownership ----------------------------------------------------------------------------
    def assign(self, partition: int) -> int:
        """Take ``partition``: bring its store up to the changelog's end; returns records read."""
        if partition in self.partitions:
            return 0
        path = self._path(partition)
        part = _Partition(path, self._blocks)
        high = self._end(partition)
        # A store ahead of its changelog: a topic since deleted and re-created, or a last
        # batch whose commit the broker never completed (see ``_committed_row``).
        ahead = part.offset >= high or not self._committed_row(part, partition)
        if ahead:
            _log.warning(
                "%s[%d]: local store ahead of the committed changelog; rebuilding",
                self.name,
                partition,
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
        # Deletions queued for it stay: a restore after a broker failure takes the partition
        # back at once, and they are still due; ``changed`` drops those of partitions gone.

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
            # A restore ends at the partition's end, which the broker reports only once a
            # fetch comes back empty: at its default 500 ms wait, each partition after a
            # broker failure (whose changelog tail is a transaction marker) cost a second.
            self._reader = committed_reader(
                self.conn,
                group_id=f"jodie-restore-{uuid.uuid4().hex[:8]}",
                **{"fetch.wait.max.ms": 10},
            )
        return self._reader

    def _end(self, partition: int) -> int:
        reader = self._reader_client()
        return watermarks(reader, TopicPartition(self.changelog, partition))[1]

    def _committed_row(self, part: _Partition, partition: int, timeout_s: float = 120.0) -> bool:
        """Whether the changelog record of the store's last row is committed.

        The store takes a batch's rows once its commit returned, and a returned commit is
        normally final. One broker path breaks that: a single node killed right after it
        decided a commit, and restarted before its controller fenced the dead incarnation,
        briefly leads no partition once it is fenced, and its transaction coordinator takes
        leaderless partitions for deleted ones and completes the commit without writing its
        markers there (kafka.coordinator.transaction.TransactionMarkerChannelManager). The
        producer's next abort then aborts those records: the store holds rows whose records,
        and whose batch's outputs, nobody will ever read (``committed_at`` tells which).
        """
        if part.offset < 0:
            return True
        tp = TopicPartition(self.changelog, partition)
        try:
            return committed_at(self._reader_client(), tp, part.offset, timeout_s)
        except KafkaException as exc:
            raise RestoreError(f"{self.changelog}[{partition}]: {exc.args[0]}") from exc

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

    def changed(self) -> list[tuple[int, bytes, bytes | None]]:
        """(partition, key, encoded row) of every row changed in the open batch, and
        (partition, key, None) of every row deleted (of the partitions held)."""
        rows: list[tuple[int, bytes, bytes | None]] = [
            (p, key, self.encode(key, self.rows[(p, key)]))
            for p, key in self.rows.pinned
            if (p, key) in self.rows  # touched but never read: nothing changed
        ]
        gone = [pk for pk in self._deleted if pk[0] not in self.partitions or pk in self.rows]
        self._deleted.difference_update(gone)
        # The next batch may be processed while this one commits: its rows pin apart.
        self.rows.seal()
        return rows + [(p, key, None) for p, key in self._deleted]

    def delete(self, partition: int, key: bytes) -> None:
        """Remove a row in the next transaction: a tombstone to the changelog, then out of
        RocksDB. For rows nothing reads or changes any more (a row used again before the
        commit is kept, and its deletion dropped)."""
        self.rows.drop(lambda pk: pk == (partition, key))
        self._deleted.add((partition, key))

    def deleting(self) -> int:
        """Rows queued for deletion, not yet committed."""
        return len(self._deleted)

    def scan(self, partition: int, after: bytes | None, limit: int) -> list[tuple[bytes, bytes]]:
        """Up to ``limit`` committed (key, raw row) of a held partition in key order, from the
        first key after ``after`` (None: from the start); fewer at the end."""
        part = self.partitions[partition]
        out: list[tuple[bytes, bytes]] = []
        it = part.db.iter()
        if after is None:
            it.seek_to_first()
        else:
            it.seek(after)
            if it.valid() and it.key() == after:
                it.next()
        while it.valid() and len(out) < limit:
            key = it.key()
            if key != _OFFSET_KEY:
                out.append((key, it.value()))
            it.next()
        return out

    def persist(
        self, records: list[tuple[int, bytes, bytes | None]], offsets: dict[int, int]
    ) -> None:
        """After the batch's transaction committed: write its rows (delete those it
        tombstoned) and changelog offsets; the rows may then be evicted (RocksDB has them)."""
        by_partition: dict[int, WriteBatch] = {}
        for p, key, value in records:
            batch = by_partition.get(p)
            if batch is None:
                batch = by_partition[p] = WriteBatch(raw_mode=True)
            if value is None:
                batch.delete(key)
                self._deleted.discard((p, key))
            else:
                batch.put(key, value)
        for p, batch in by_partition.items():
            part = self.partitions.get(p)
            if part is None:
                continue
            if p in offsets:
                batch.put(_OFFSET_KEY, str(offsets[p]).encode())
            part.db.write(batch)
        self.rows.release()


class TableMemory(Collector):
    """RocksDB's memory of some tables (``Table.memory``), as one gauge family labelled by
    table and kind: part of the process's malloc bytes that no Python counter sees."""

    def __init__(self, tables: Iterable[Table[Any]], namespace: str = "jodie") -> None:
        self.tables = list(tables)
        self.ns = namespace

    def summary(self) -> dict[str, dict[str, int]]:
        return {table.name: table.memory() for table in self.tables}

    def collect(self) -> Iterator[Metric]:
        family = GaugeMetricFamily(
            f"{self.ns}_rocksdb_memory_bytes",
            "Bytes RocksDB holds in memory, by table and kind (memtables, table_readers: "
            "index and filter blocks, block_cache).",
            labels=["table", "kind"],
        )
        for name, kinds in self.summary().items():
            for kind, value in kinds.items():
                family.add_metric([name, kind], value)
        yield family
