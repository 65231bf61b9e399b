"""The transactional consume → process → produce loop: exactly once, whatever the application.

One instance is one consumer-group member with one transactional producer. Each batch it
takes is handed to the application, and the application's outputs, the changelog records of
the table rows it changed and the batch's input offsets (``send_offsets_to_transaction``
with the group's metadata, KIP-447, so a member that lost its partitions in a rebalance is
fenced) commit in one Kafka transaction or not at all. Table rows reach RocksDB only after
the commit (streams.runtime.store); a partition gained in a rebalance has its table restored
from the changelog before any of its records is processed. A read_committed consumer of the
outputs therefore sees each input's effects once, whichever instance crashes when.

A broker that dies and comes back (or a partition leader or coordinator that moves) ends a
transaction without ending the instance (streams.runtime.transactions): calls that may be
made again are, with backoff; an abortable transaction is aborted and its batch read again
from its first offsets; a producer that librdkafka declares unusable is replaced by a new one
with the same transactional id, and the instance rewinds to what is committed — the tables
restored from their changelogs, the positions from the group's committed offsets — exactly
as a restarted instance would. Each step is bounded by ``LoopConfig.recovery_timeout_s``.
An application that ignores repeats also completes its last few batches and reads them again
then (``LoopConfig.reread_batches``): a broker can complete a commit without all of its
markers, leaving some of the batch's records committed (its offsets, or its changelog records)
and the others aborted (streams.runtime.transactions). What of those batches a read_committed
reader does not find is sent again, so that each stands whole, and their inputs, read again,
are repeats. A rebalance before they were read again assigns those partitions where the
reading again starts, not at their committed offsets.

An instance away longer than its inputs' retention would resume past records it never
processed, and one whose group's committed offsets expired would re-apply retained records on
top of its restored tables: either way the tables would silently diverge. On every assignment
the loop compares the committed offsets with the partitions' first offsets (and, where none
is committed, the table's changelog with emptiness) and stops with ``InputGapError`` instead.

A batch's commit (its offsets sent, the coordinator's answer) is a wait, not work: with
``LoopConfig.overlap`` the next batch is taken and processed meanwhile, its outputs kept until
that commit returned (one transaction per producer at a time). Its rows pin apart from the
committing batch's (streams.runtime.cache), and should the commit fail, both batches are
undone and read again. The application's idle duties (``poll``) and the rebalance callbacks
wait for the commit in flight first: they see only committed state, as without overlap.

The application (``Application``) knows nothing of Kafka beyond topic names: it reads
``Record``s and returns ``Output``s, and keeps its state in the ``Table``s it declares, each
co-partitioned with one input topic (table partition p goes with input partition p).
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
import uuid
from abc import ABC, abstractmethod
from collections import Counter as CounterOf
from collections import deque
from collections.abc import Iterable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Generic, NamedTuple, TypeVar

from confluent_kafka import (
    OFFSET_BEGINNING,
    TIMESTAMP_NOT_AVAILABLE,
    Consumer,
    ConsumerGroupTopicPartitions,
    KafkaError,
    KafkaException,
    Message,
    Producer,
    TopicPartition,
)

from streams.runtime import clients
from streams.runtime.exceptions import (
    InputGapError,
    RestoreError,
    RowTooLargeError,
    TransactionError,
)
from streams.runtime.kafka import committed_at, retry_transient, take, watermarks
from streams.runtime.store import Table
from streams.runtime.transactions import Sweep, Transactions, error_of

Headers = list[tuple[str, str | bytes | None]]
#: What an application sends: (topic, key, value, headers); the key picks the partition.
Output = tuple[str, bytes | None, bytes | None, Headers | None]
B = TypeVar("B")  # an application's batch, as its ``prepare`` makes it


class Record(NamedTuple):
    """One input message."""

    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    #: When the record was produced (or appended), ms since the epoch; -1: not known.
    timestamp_ms: int = -1


class Changes:
    """The table rows one transaction writes to their changelogs, and the offsets they reach
    there as their delivery reports come in. Each transaction has its own: a report that
    arrives late, from a producer given up on (streams.runtime.transactions), lands in the
    transaction it belongs to, not in the next one."""

    def __init__(self, rows: list[tuple[Table[Any], list[tuple[int, bytes, bytes | None]]]]):
        self.rows = rows
        self._reached: dict[tuple[str, int], int] = {}
        self._first: dict[tuple[str, int], int] = {}
        sizes = [len(value) for _table, changed in rows for _p, _k, value in changed if value]
        #: The rows' encoded bytes, and the largest row's (what its changelog must take).
        self.bytes = sum(sizes)
        self.largest = max(sizes, default=0)

    @property
    def count(self) -> int:
        return sum(len(rows) for _table, rows in self.rows)

    def reached(self, err: KafkaError | None, msg: Message) -> None:
        """The delivery report of one changelog record."""
        if err is not None:
            return  # the transaction's commit fails, and with it the batch
        key = (msg.topic() or "", msg.partition() or 0)
        offset = msg.offset() or 0
        if offset > self._reached.get(key, -1):
            self._reached[key] = offset
        if offset < self._first.get(key, offset + 1):
            self._first[key] = offset

    def offsets(self, changelog: str) -> dict[int, int]:
        """Partition → the last offset this transaction's rows reached in ``changelog``."""
        return {p: o for (topic, p), o in self._reached.items() if topic == changelog}

    def span(self, changelog: str, partition: int) -> tuple[int, int] | None:
        """The first and last offsets this transaction's rows reached in a changelog
        partition (None: no delivery report says where)."""
        key = (changelog, partition)
        if key not in self._reached:
            return None
        return self._first[key], self._reached[key]


class _Written(NamedTuple):
    """What one transaction sent, kept for ``LoopConfig.reread_batches`` batches: should the
    broker have left it committed on some partitions and aborted on others, what is missing
    is sent again (``TransactionalLoop._complete_window``)."""

    outputs: list[Output]
    changed: Changes
    sent_ms: int  # wall clock before its first message: their timestamps are no earlier
    firsts: dict[tuple[str, int], int]  # its first offset in each input partition it read


class Application(ABC, Generic[B]):
    """What the loop runs. ``prepare`` and the hooks run outside any transaction; ``process``
    inside one, so it must neither block for long nor produce itself."""

    @property
    @abstractmethod
    def inputs(self) -> Sequence[str]:
        """The topics to consume."""

    @property
    def outputs(self) -> Sequence[str]:
        """Every topic ``process`` and ``flush`` may send to (a new producer sweeps them:
        streams.runtime.transactions)."""
        return ()

    @property
    def tables(self) -> Mapping[str, Table[Any]]:
        """Input topic → the table co-partitioned with it (topics without a table omitted)."""
        return {}

    @abstractmethod
    def prepare(self, records: list[Record]) -> B:
        """Turn a batch's records into what ``process`` takes; may wait (nothing is open)."""

    @abstractmethod
    def process(self, batch: B) -> Iterable[Output]:
        """Apply a batch to the tables' rows (``get``, then ``touch`` what changed); the
        messages to send, committed with the rows and the input offsets. With
        ``LoopConfig.overlap`` the previous batch may still be committing: whatever this
        keeps for ``committed`` goes in the batch, not in the application."""

    def start(self, partitions: Mapping[str, int]) -> None:
        """The clients are up; ``partitions``: how many each input topic has."""

    def poll(self) -> None:
        """Before the loop takes a batch (idle duties), with every batch processed so far
        committed: each turn, or with ``LoopConfig.overlap`` and a batch committing, at most
        every ``LoopConfig.poll_interval_s`` (it waits for that commit first)."""

    def flush(self) -> Iterable[Output]:
        """When a turn brought no input: outputs the application derived from what it read
        elsewhere (``poll``), committed in a transaction of their own. No input stands behind
        them, so a crash before that commit loses them rather than repeating them."""
        return ()

    def finish(self) -> Iterable[Output]:
        """The loop was stopped (not failed), with every batch committed: last outputs, like
        ``flush``'s, committed in a transaction of their own before the clients close."""
        return ()

    def on_assign(self, partitions: list[tuple[str, int]]) -> None:
        """After the tables of newly assigned (topic, partition)s were restored."""

    def on_revoke(self, partitions: list[tuple[str, int]]) -> None:
        """After the tables of revoked or lost partitions were closed."""

    def order(self, record: Record) -> int | None:
        """Where ``record`` stands in the order the application would rather read its inputs
        in (``LoopConfig.lookahead``); None: nowhere in particular (never held back)."""
        return None

    def committed(self, batch: B, records: list[Record], seconds: float) -> None:
        """A batch's transaction committed: the batch (as ``prepare`` made it), its records,
        and the seconds from taking them to the commit (for latency metrics)."""

    def report(self, interval_s: float) -> None:
        """Every ``LoopConfig.report_interval_s`` (the loop's stats were just refreshed)."""

    def close(self) -> None:
        """The loop stopped; the clients and tables close after this."""


@dataclass(frozen=True)
class LoopConfig:
    """How one instance takes part: its group, its transactional id, its batches."""

    name: str  # in the log lines: "<name> assigned [...]"
    group_id: str
    #: One per instance, stable across restarts: a restarted instance fences its
    #: predecessor and aborts what that one left open, at once.
    transactional_id: str
    client_id: str | None = None
    batch: int = 2000  # most records per transaction
    #: Most records in the first batch behind a backlog (None: ``batch``). Each batch taken
    #: behind the backlog doubles the next one's cap, up to ``batch``; a batch without one
    #: starts the ramp again. A large batch costs less per record but holds its outputs
    #: until all of it is processed: the ramp sends the first ones out while the backlog is
    #: young, and reaches the large batches within a few commits.
    first_batch: int | None = None
    poll_timeout_s: float = 0.1  # longest an idle instance waits before its other duties
    session_timeout_ms: int = 6000
    #: How long a dead instance's open transaction can hold back read_committed readers.
    transaction_timeout_ms: int = 10000
    report_interval_s: float = 5.0
    #: Longest one recovery step may take (a transactional call and its retries, a new
    #: producer getting ready) after a broker failure, before the instance gives up.
    recovery_timeout_s: float = 120.0
    #: Stop when a partition has no committed offset but its table holds state (the group's
    #: offsets expired): right for an application that would count its input twice. One that
    #: ignores repeats, and whose rows may change without input from their own partition,
    #: turns it off.
    expired_offsets_are_gaps: bool = True
    #: After a producer is replaced, complete this many last committed batches (and the
    #: failed one) where the broker left them committed in part, then read their inputs
    #: again, from their first offsets, however far the group's committed offsets are. For an
    #: application that ignores repeats: it heals a batch whose commit the broker completed
    #: without all of its markers (streams.runtime.transactions), so that some of its records
    #: (outputs, changelog records, offsets) stand committed and the others end aborted. The
    #: loop keeps the outputs of that many batches to send them again
    #: (``TransactionalLoop._complete_window``). An application that would count a repeat
    #: twice leaves it at 0.
    reread_batches: int = 0
    #: A consumer behind a backlog hands out one partition's run of records after another,
    #: in no useful order across partitions. With a lookahead, a batch taken behind a backlog
    #: (a full take, or at least a batch still to read) is processed in the application's
    #: ``order`` instead: of the records taken and those held from before (up to
    #: ``lookahead``), the batch's worth earliest in that order are processed, and the rest
    #: wait for the next batch. A record after a held one in its partition may be processed
    #: before it, and the partition's committed offset stays at the held one: only an
    #: application that ignores repeats may set it (a restart reads such a record again).
    #: Without a backlog every held record is processed: no latency where there is none.
    lookahead: int = 0
    #: Take and process the next batch while the last one commits (see above): the commit's
    #: round trips to the broker stop costing the instance its time.
    overlap: bool = False
    #: With ``overlap``, the longest the application's ``poll`` waits while batches keep
    #: coming (each call first waits for the commit in flight, a turn without overlap).
    poll_interval_s: float = 0.5
    consumer: Mapping[str, Any] = field(default_factory=dict)  # extra consumer properties
    producer: Mapping[str, Any] = field(default_factory=dict)  # extra producer properties


@dataclass
class LoopStats:
    started: float = field(default_factory=time.time)
    records: int = 0  # input records consumed
    transactions: int = 0  # committed
    aborted: int = 0
    replaced: int = 0  # producers replaced after a fatal error (a broker failure)
    #: Records sent again to complete batches a broker failure left committed in part
    #: (``TransactionalLoop._complete_window``).
    completed: int = 0
    restored: int = 0  # changelog records read into the tables
    #: Changelog records written by committed transactions (a row changed several times in a
    #: batch is written once): the tables' share of the work, which the input order sways.
    changelog: int = 0
    changelog_bytes: int = 0  # their encoded rows' bytes
    #: The largest row a committed transaction wrote: what the changelogs must take (a JODIE
    #: row grows with the events waiting in it; deploy/topics.toml, ``max_message_bytes``).
    largest_row: int = 0
    held: int = 0  # input records held back for a later batch (``LoopConfig.lookahead``)
    lag: int = 0  # records behind the ends of the assigned partitions (-1: unknown)
    #: Seconds of committed batches: in the application (``prepare`` and ``process``), in
    #: handing their outputs and changed rows to the producer, and waiting for the commit
    #: (the offsets sent, every message acknowledged, the coordinator's answer). The last is
    #: a hop's latency that is not its work; without ``LoopConfig.overlap`` the instance
    #: neither reads nor computes meanwhile. ``wait_s``: of ``commit_s``, the time it did
    #: wait (all of it without overlap).
    app_s: float = 0.0
    send_s: float = 0.0
    commit_s: float = 0.0
    wait_s: float = 0.0


@dataclass
class _Pending(Generic[B]):
    """A batch whose transaction commits in the background (``LoopConfig.overlap``)."""

    batch: B
    records: list[Record]
    firsts: dict[tuple[str, int], int]  # where to read again should the commit fail
    positions: dict[tuple[str, int], int]  # the offsets it commits
    changed: Changes
    written: _Written  # what it sent (its outputs, and ``changed``)
    producer: Producer  # whose delivery reports the rows' changelog offsets come with
    began: float  # when its records were taken (monotonic)
    commit: Future[float]  # when the commit returned (monotonic)


class TransactionalLoop(Generic[B]):
    """Runs an ``Application`` until ``stop()`` (or ``max_seconds``)."""

    def __init__(
        self,
        conn: clients.KafkaConnection,
        config: LoopConfig,
        app: Application[B],
        log: logging.Logger | None = None,
    ) -> None:
        self.conn = conn
        self.config = config
        self.app = app
        self.log = log or logging.getLogger("jodie.loop")
        self.stats = LoopStats()
        self._stop = threading.Event()
        self._gap: InputGapError | None = None  # found in a rebalance callback, raised after
        # Offsets read past a stray pending commit (see ``_committed``), to commit again in a
        # transaction of this instance's producer before the next batch.
        self._unsettled: list[TopicPartition] = []
        # What the last committed batches read and sent (``LoopConfig.reread_batches``), and
        # what the transaction in hand sent (until it is pending or done).
        self._written: deque[_Written] = deque(maxlen=config.reread_batches)
        self._sending: _Written | None = None
        # Partitions being read again after a resume: (from, the committed offset then), until
        # a batch commits past it. A rebalance in between would otherwise start them at the
        # committed offset and skip what the resume meant to read again.
        self._rereading: dict[tuple[str, int], tuple[int, int]] = {}
        # Records taken but held back for the next batch (``LoopConfig.lookahead``), each
        # with its ``order`` (asked once per record), in the order they were taken.
        self._held: list[tuple[int, Record]] = []
        # The cap of the next batch (``LoopConfig.first_batch``).
        self._cap = self._first_cap()
        # The batch committing in the background, and the failure of the last one waited for
        # in a rebalance callback (undone once the consumer call that ran it returned).
        self._pending: _Pending[B] | None = None
        self._failed: tuple[KafkaException, dict[tuple[str, int], int], _Written] | None = None
        self._committer: ThreadPoolExecutor | None = None

    def stop(self) -> None:
        self._stop.set()

    def _first_cap(self) -> int:
        c = self.config
        return c.batch if c.first_batch is None else max(1, min(c.first_batch, c.batch))

    def _tables(self) -> list[Table[Any]]:
        return list({id(t): t for t in self.app.tables.values()}.values())

    def _clients(self) -> tuple[Consumer, Transactions]:
        c = self.config
        consumer = clients.consumer(
            self.conn,
            c.group_id,
            {
                **({"client.id": c.client_id} if c.client_id else {}),
                "isolation.level": "read_committed",
                "enable.auto.commit": False,
                "auto.offset.reset": "earliest",
                # Range assignment hands partition p of every input to one member when the
                # members subscribe alike: co-partitioned rows then meet in one process.
                # Not needed for correctness, kept for locality.
                "partition.assignment.strategy": "range",
                "session.timeout.ms": c.session_timeout_ms,
                "heartbeat.interval.ms": max(500, c.session_timeout_ms // 6),
                # The broker answers a waiting fetch as soon as records (or a commit marker)
                # arrive, so this bounds only how often an idle consumer asks again: at 10 ms
                # the idle asking cost the broker CPU that the busy pipeline missed (p99 at
                # 500 events/s 91 ms against 78-81 ms at 100, alternated runs).
                "fetch.wait.max.ms": 100,
                "logger": self.log,
                **c.consumer,
            },
        )

        def producer() -> Producer:
            return clients.transactional_producer(
                self.conn,
                c.transactional_id,
                logger=self.log,
                **{
                    "transaction.timeout.ms": c.transaction_timeout_ms,
                    "linger.ms": 2,
                    "queue.buffering.max.messages": 1_000_000,
                    **c.producer,
                },
            )

        return consumer, Transactions(producer, c.name, self.log, c.recovery_timeout_s)

    def _on_assign(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        self._wait()  # what the restore and the application see is committed state
        began = time.monotonic()
        tables = self.app.tables
        fresh: set[tuple[str, int]] = set()  # partitions without a committed offset
        committed: list[TopicPartition] = []
        if self._gap is None:
            committed = self._committed(consumer, partitions)
            self._gap = self._input_gap(consumer, committed, fresh)
        if self._gap is not None:
            return  # nothing restored or processed: the loop stops with the error
        for tp in partitions:
            table = tables.get(tp.topic)
            if table is not None:
                self.stats.restored += table.assign(tp.partition)
                if (tp.topic, tp.partition) in fresh and table.holds_state(tp.partition):
                    # Committed state without committed input offsets. (A changelog holding
                    # only records of aborted or open transactions leaves the store empty:
                    # that is a first batch in flight, not a gap.)
                    self._gap = InputGapError(
                        f"{tp.topic}[{tp.partition}]: no committed offset, yet "
                        f"{table.changelog}[{tp.partition}] holds state: the group's offsets "
                        f"expired (offsets.retention.minutes) while it was away. {_GAP_ADVICE}"
                    )
                    return
        starts, again = self._starts(self._unsettled or committed)
        if self._unsettled or again:
            # librdkafka would fetch the committed offsets itself, as stable ones, and wait
            # for the stray commit without end: the positions are given instead (and so
            # are those of partitions being read again, which start before them).
            consumer.assign(starts)
        if again:
            self.log.warning(
                "%s: still reading the last batches again after the rebalance "
                "(topic, partition, from, committed): %s",
                self.config.name,
                sorted(again),
            )
        self.log.info(
            "%s assigned %s (restored in %.2f s)",
            self.config.name,
            sorted((tp.topic, tp.partition) for tp in partitions),
            time.monotonic() - began,
        )
        self.app.on_assign([(tp.topic, tp.partition) for tp in partitions])

    def _starts(
        self, committed: list[TopicPartition]
    ) -> tuple[list[TopicPartition], list[tuple[str, int, int, int]]]:
        """Where each partition's reading starts: its committed offset, or where a resume
        meant to read it again from, if that is before; and those (topic, partition, from,
        committed). A partition read again no further than its committed offset is done."""
        starts, again = [], []
        for tp in committed:
            at = (tp.topic, tp.partition)
            first, then = self._rereading.get(at, (-1, -1))
            if 0 <= first < tp.offset:
                self._rereading[at] = (first, max(then, tp.offset))
                starts.append(TopicPartition(tp.topic, tp.partition, first))
                again.append((tp.topic, tp.partition, first, tp.offset))
            else:
                self._rereading.pop(at, None)
                starts.append(_start_at(tp))
        return starts, again

    def _input_gap(
        self, consumer: Consumer, committed: list[TopicPartition], fresh: set[tuple[str, int]]
    ) -> InputGapError | None:
        """What of the input of partitions with these ``committed`` offsets was lost
        unprocessed, if anything (see above); adds to ``fresh`` the partitions without a
        committed offset (checked once restored)."""
        tables = self.app.tables
        for tp in committed:
            # As long as a resume may take: a worker assigned partitions while a cluster node
            # is down (its leaderships not yet moved) once stopped here after 30 s.
            low, _high = watermarks(
                consumer,
                TopicPartition(tp.topic, tp.partition),
                retry_s=self.config.recovery_timeout_s,
            )
            if tp.offset >= 0 and tp.offset < low:
                return InputGapError(
                    f"{tp.topic}[{tp.partition}]: committed offset {tp.offset} but the first "
                    f"record left is at {low}: {low - tp.offset} records were deleted "
                    f"(retention) before this group processed them. {_GAP_ADVICE}"
                )
            if (
                tp.offset < 0
                and tables.get(tp.topic) is not None
                and self.config.expired_offsets_are_gaps
            ):
                fresh.add((tp.topic, tp.partition))
        return None

    def _on_revoke(self, _consumer: Consumer, partitions: list[TopicPartition]) -> None:
        # Called inside poll/consume, never with a transaction open: nothing to flush. A batch
        # still committing is waited for, so that its rows reach the stores being closed.
        self._wait()
        tables = self.app.tables
        gone = {(tp.topic, tp.partition) for tp in partitions}
        # Never committed: the partitions' next owner reads them from the committed offsets.
        self._held = [(k, r) for k, r in self._held if (r.topic, r.partition) not in gone]
        for tp in partitions:
            table = tables.get(tp.topic)
            if table is not None:
                table.revoke(tp.partition)
        self.app.on_revoke([(tp.topic, tp.partition) for tp in partitions])

    def run(self, max_seconds: float | None = None) -> LoopStats:
        consumer, tx = self._clients()
        inputs = list(self.app.inputs)
        partitions = {}
        written = [*self.app.outputs, *(table.changelog for table in self._tables())]
        for topic in dict.fromkeys([*inputs, *written]):
            meta = consumer.list_topics(topic, timeout=30).topics[topic]
            partitions[topic] = len(meta.partitions)
        tx.sweep = Sweep(
            [TopicPartition(t, p) for t in dict.fromkeys(written) for p in range(partitions[t])],
            # Any offsets do: the sweep aborts them (its point is the group's partition).
            lambda: ([TopicPartition(inputs[0], 0, 0)], consumer.consumer_group_metadata()),
        )
        tx.start()
        self.app.start({topic: partitions[topic] for topic in inputs})
        consumer.subscribe(
            inputs, on_assign=self._on_assign, on_revoke=self._on_revoke, on_lost=self._on_revoke
        )
        began = last_report = last_poll = time.monotonic()
        c = self.config
        if c.overlap:
            self._committer = ThreadPoolExecutor(1, thread_name_prefix=f"{c.name}: commit")
        try:
            while not self._stop.is_set():
                if max_seconds is not None and time.monotonic() - began > max_seconds:
                    break
                if self._pending is None or time.monotonic() - last_poll >= c.poll_interval_s:
                    if not self._drain(consumer, tx):
                        continue
                    self.app.poll()
                    last_poll = time.monotonic()
                # With a lookahead, enough to process a batch and hold the lookahead's.
                cap = self._cap
                most = cap + max(0, c.lookahead - len(self._held))
                messages = take(consumer, most, c.poll_timeout_s)
                if self._failed is not None:
                    # A rebalance callback waited for a commit that failed: the records just
                    # taken come after its batch, and are read again with it.
                    self._recover(consumer, tx, _firsts(self._records(messages)))
                    continue
                if self._gap is not None:
                    raise self._gap
                if self._unsettled:
                    if not self._drain(consumer, tx):
                        continue
                    self._settle(consumer, tx)
                if messages or self._held:
                    # Behind a backlog: a full take, or a short one (what was prefetched
                    # then) with at least another batch still to read. (A short take with
                    # nothing held is processed whole either way: no lag asked for it.)
                    backlog = len(messages) >= cap or (bool(self._held) and _lag(consumer) >= cap)
                    # The next cap: doubled while the backlog lasts, the first again after it.
                    self._cap = min(2 * cap, c.batch) if backlog else self._first_cap()
                    self._batch(consumer, tx, messages, backlog, cap)
                else:
                    self._cap = self._first_cap()
                    if self._drain(consumer, tx):
                        self._flush(consumer, tx)
                now = time.monotonic()
                if now - last_report >= c.report_interval_s:
                    self.stats.lag = _lag(consumer)
                    self.app.report(now - last_report)
                    last_report = now
            if self._drain(consumer, tx):
                self._flush(consumer, tx, self.app.finish())
        finally:
            self._close_pending()
            self.app.close()
            consumer.close()
            for table in self._tables():
                table.close()
        return self.stats

    def _close_pending(self) -> None:
        """On the way out: let the batch committing finish (its rows reach the stores); a
        failure is left to the next start, which resumes from what is committed."""
        try:
            self._wait()
        except Exception as exc:  # stopping either way: the cause is logged
            self.log.warning("%s: the last commit failed on the way out: %s", self.config.name, exc)
        self._failed = None
        if self._committer is not None:
            self._committer.shutdown(wait=True)
            self._committer = None

    def _batch(
        self,
        consumer: Consumer,
        tx: Transactions,
        messages: list[Message],
        backlog: bool,
        cap: int,
    ) -> None:
        fresh = self._records(messages)
        held, self._held = self._held, []
        records = [*(r for _k, r in held), *fresh]
        firsts = _firsts(records)  # held records first: each partition's are in offset order
        if backlog and self.config.lookahead > 0:
            c = self.config
            keys = [*(k for k, _r in held), *(self.app.order(r) for r in fresh)]
            records, self._held = self._in_order(records, keys, c.lookahead, cap)
            self.stats.held += len(self._held)
        try:
            self._transaction(consumer, tx, records, firsts)
        except KafkaException as exc:
            self._held = []  # read again: ``firsts`` covers them
            self._rewind(consumer, tx, exc, firsts, self._sending)
        except RowTooLargeError:
            # Stopping: nothing of the batch may stand, nor keep its outputs' partitions
            # behind an open transaction until the coordinator's timeout.
            with contextlib.suppress(KafkaException):
                tx.abort()
            raise
        finally:
            self._sending = None

    def _records(self, messages: list[Message]) -> list[Record]:
        records: list[Record] = []
        for msg in messages:
            err = msg.error()
            if err is not None:
                if err.fatal():
                    raise TransactionError(f"{self.config.name}: consumer: {err}")
                # The broker is away or a partition moves: librdkafka reconnects by itself.
                if err.code() != KafkaError._PARTITION_EOF:
                    self.log.warning("%s: consumer: %s", self.config.name, err)
                continue
            kind, stamp = msg.timestamp()
            records.append(
                Record(
                    msg.topic() or "",
                    msg.partition() or 0,
                    msg.offset() or 0,
                    msg.key(),
                    msg.value(),
                    stamp if kind != TIMESTAMP_NOT_AVAILABLE else -1,
                )
            )
        return records

    @staticmethod
    def _in_order(
        records: list[Record], keys: list[int | None], hold: int, batch: int
    ) -> tuple[list[Record], list[tuple[int, Record]]]:
        """(to process now, to hold with their keys): a batch's worth of the records earliest
        by ``keys`` (their ``order``), and more where that would hold more than ``hold``
        (records without an order are never held); each partition's in offset order."""
        ranked = sorted(k for k in keys if k is not None)
        now_n = max(min(batch, len(ranked)), len(ranked) - hold)
        if now_n >= len(ranked):
            return records, []
        bound = ranked[now_n - 1]  # the latest key processed now
        now: list[Record] = []
        later: list[tuple[int, Record]] = []
        for r, k in zip(records, keys, strict=True):
            if k is not None and k > bound:
                later.append((k, r))
            else:
                now.append(r)
        return now, later

    def _rewind(
        self,
        consumer: Consumer,
        tx: Transactions,
        exc: KafkaException,
        firsts: dict[tuple[str, int], int],
        written: _Written | None = None,
    ) -> None:
        """The batch's transaction failed: undo it, and read again from what is committed.
        ``written``: what it sent, if it got that far."""
        how = tx.recover(exc)
        # Rows were changed in memory by the failed batch: forget them (RocksDB holds only
        # committed rows).
        for table in self._tables():
            table.forget()
        if how == "aborted":
            self.stats.aborted += 1
            self.log.warning("%s: re-reading the batch", self.config.name)
            for (topic, p), offset in firsts.items():
                # A partition no longer ours: its new owner starts from the committed offset.
                with contextlib.suppress(KafkaException):
                    consumer.seek(TopicPartition(topic, p, offset))
            return
        self.stats.replaced += 1
        self._held = []  # the positions go back to what is committed, before them
        self._resume_from_commits(consumer, tx, firsts, written)

    def _committed(
        self, consumer: Consumer, partitions: list[TopicPartition]
    ) -> list[TopicPartition]:
        """The group's committed offsets of ``partitions``.

        Stable offsets (a read_committed consumer asks with RequireStable, KIP-447): a
        transactional offset commit still pending is waited for, since the transaction that
        holds it may yet commit. A commit pending for longer than any transaction may stay
        open is a stray one: seen after a broker restart, when librdkafka's
        ``send_offsets_to_transaction`` hung (issue #5511), the producer was abandoned
        (streams.runtime.transactions) and its TxnOffsetCommit reached the group after the
        new producer had settled the transaction. Nothing completes it but a later
        transaction marker of the same producer id, which a worker stuck here never writes:
        asked for stable offsets, the group answered "unstable" until the recovery timeout
        and the worker stopped. So past that wait the last stable offsets are read without
        it (an admin request without RequireStable) and committed again by this instance's
        producer before the next batch (``_settle``), whose marker settles the stray commit
        after overwriting its offsets with these. (A new producer's sweep aborts a pending
        commit of its own id when its offsets reach the group, streams.runtime.transactions:
        this wait remains for one that did not, and for another id's.)
        """
        ask = lambda: consumer.committed(partitions, timeout=10)  # noqa: E731
        # Longer than a transaction may stay open, plus the coordinator's check for timed-out
        # transactions (transaction.abort.timed.out.transaction.cleanup.interval.ms, 10 s).
        wait_s = 2 * self.config.transaction_timeout_ms / 1000.0 + 10.0
        deadline = time.monotonic() + min(wait_s, self.config.recovery_timeout_s)
        while True:
            try:
                return retry_transient(ask, self.config.recovery_timeout_s)
            except KafkaException as exc:
                error = exc.args[0] if exc.args else None
                if not isinstance(error, KafkaError) or error.code() != KafkaError._TIMED_OUT:
                    raise
                if time.monotonic() > deadline:
                    break
        offsets = self._stable_offsets(partitions)
        self.log.warning(
            "%s: the group's offsets stayed unstable for %.0f s (a transactional commit "
            "pending from an abandoned producer); resuming from the last stable ones and "
            "committing them again",
            self.config.name,
            wait_s,
        )
        self._unsettled = offsets
        return offsets

    def _stable_offsets(self, partitions: list[TopicPartition]) -> list[TopicPartition]:
        """The group's last stable offsets of ``partitions``, pending commits not waited for
        (-1001 where none is committed)."""
        client = clients.admin(self.conn, {"log_level": 0})
        # Without their positions: the request refuses a partition that carries an offset,
        # as those of consumer.assignment() do once the consumer has moved.
        asked = [TopicPartition(tp.topic, tp.partition) for tp in partitions]
        request = [ConsumerGroupTopicPartitions(self.config.group_id, asked)]
        futures = client.list_consumer_group_offsets(
            request, require_stable=False, request_timeout=10
        )
        answer = futures[self.config.group_id].result()
        return list(answer.topic_partitions or [])

    def _settle(self, consumer: Consumer, tx: Transactions) -> None:
        """Commit ``_unsettled`` again (unchanged) in a transaction of its own; a partition
        without a committed offset gets its first offset, where it would start anyway."""
        offsets = []
        for tp in self._unsettled:
            if tp.offset >= 0:
                offsets.append(TopicPartition(tp.topic, tp.partition, tp.offset))
            else:
                low, _high = watermarks(consumer, TopicPartition(tp.topic, tp.partition))
                offsets.append(TopicPartition(tp.topic, tp.partition, low))
        try:
            tx.producer.begin_transaction()
            tx.send_offsets(offsets, consumer.consumer_group_metadata())
            tx.commit()
        except KafkaException as exc:
            self._rewind(consumer, tx, exc, {})
            return
        self._unsettled = []
        self.log.warning("%s: the stray offset commit is settled", self.config.name)

    def _resume_from_commits(
        self,
        consumer: Consumer,
        tx: Transactions,
        failed: Mapping[tuple[str, int], int] | None = None,
        written: _Written | None = None,
    ) -> None:
        """After a new producer settled the old one's last transaction (committed or aborted,
        we cannot tell which): the tables catch up with their changelogs and the positions
        move to the group's committed offsets, as on a restart — or, with
        ``reread_batches``, back to the first offsets of the last committed batches and of
        the ``failed`` one, once those batches and that one (``written``: what it sent) are
        completed (``_complete_window``). Retried while the cluster settles (a partition
        without a leader yet), for at most the recovery timeout."""
        back: dict[tuple[str, int], int] = {}
        window: list[_Written] = []
        if self.config.reread_batches > 0:
            # A resume before the last one's reading again was done goes back as far.
            rereading = {at: first for at, (first, _then) in self._rereading.items()}
            for firsts in [*(w.firsts for w in self._written), failed or {}, rereading]:
                for tp, offset in firsts.items():
                    back[tp] = min(offset, back.get(tp, offset))
            window = [*self._written, *([written] if written is not None else [])]
        deadline = time.monotonic() + self.config.recovery_timeout_s
        while True:
            try:
                if window:
                    self._complete_window(consumer, tx, window)
                    window = []  # a retry of the resume does not ask again
                self._resume_once(consumer, back)
                return
            except (KafkaException, RestoreError) as exc:
                if time.monotonic() > deadline:
                    raise TransactionError(f"{self.config.name}: cannot resume: {exc}") from exc
                self.log.warning("%s: resuming: %s; retrying", self.config.name, exc)
                for table in self._tables():
                    table.reset_reader()
                time.sleep(1.0)

    def _complete_window(self, consumer: Consumer, tx: Transactions, window: list[_Written]) -> int:
        """Send again what the batches of ``window`` that stand committed in part sent and is
        not committed; returns how many records. Called once a new producer swept (nothing of
        the old one is open).

        A broker that completes a commit without writing all of its markers (see
        ``Table._committed_row``) leaves the batch's records open on those partitions; the
        same producer's later commits commit them where they write, and a new producer's
        sweep aborts the rest. The batch then stands committed in part: its changelog records
        and rows, say, without its outputs. Read again, it is all repeats for an application
        that ignores them, and what was aborted would never be sent. Such a batch was
        computed in order from committed state, and part of it stands, so it is made to stand
        whole: its outputs a read_committed reader does not find (read back from the window's
        first send time, matched by topic, key and value) are sent again, and each row whose
        latest record among the standing batches is not committed is written again with that
        value. Read again, it is then all repeats, as after any commit that returned. A batch
        of which nothing stands (the failed one, as a rule) is left undone: read again, it is
        applied again, here or by the partitions' new owner. So is a window whose inputs are
        no longer all this instance's: their new owner reads what it did not commit."""
        reader = clients.committed_reader(
            self.conn,
            group_id=f"{self.config.group_id}-complete-{uuid.uuid4().hex[:8]}",
            **{"fetch.wait.max.ms": 10},
        )
        try:
            present = self._committed_outputs(reader, window)
            parts = self._changelog_parts(reader, window)
        finally:
            reader.close()
        missing: list[list[Output]] = [[] for _w in window]
        found = [False] * len(window)
        for i, w in enumerate(window):
            for out in w.outputs:
                ident = (out[0], out[1], out[2])
                if present[ident] > 0:
                    present[ident] -= 1
                    found[i] = True
                else:
                    missing[i].append(out)
        oks: list[list[bool]] = [[] for _w in window]  # its changelog partitions' verdicts
        for (i, _changelog, _p), ok in parts.items():
            oks[i].append(ok)
        standing = [found[i] or any(oks[i]) for i in range(len(window))]
        split = [standing[i] and (bool(missing[i]) or not all(oks[i])) for i in range(len(window))]
        if not any(split):
            self.log.info(
                "%s: the last %d batches stand whole or not at all", self.config.name, len(window)
            )
            return 0
        owned = {(tp.topic, tp.partition) for tp in consumer.assignment()}
        if any(split[i] and not w.firsts.keys() <= owned for i, w in enumerate(window)):
            self.log.warning(
                "%s: a batch stood committed in part, but some of its inputs are no longer "
                "this instance's: not completed",
                self.config.name,
            )
            return 0
        # Each row's latest value among the standing batches, where that record is aborted.
        latest: dict[tuple[str, int, bytes], tuple[int, bytes | None]] = {}
        for i, w in enumerate(window):
            if standing[i]:
                for table, rows in w.changed.rows:
                    for p, row, state in rows:
                        latest[(table.changelog, p, row)] = (i, state)
        rows_again = [
            (changelog, p, row, state)
            for (changelog, p, row), (i, state) in latest.items()
            if not parts[(i, changelog, p)]
        ]
        outputs_again = [out for i in range(len(window)) if split[i] for out in missing[i]]
        try:
            producer = tx.producer
            producer.begin_transaction()
            for topic, key, value, headers in outputs_again:
                producer.produce(topic, key=key, value=value, headers=headers)
            for changelog, p, row, state in rows_again:
                producer.produce(changelog, key=row, value=state, partition=p)
            tx.commit()
        except KafkaException as exc:
            # Aborted (or the producer replaced): the retry reads back what stands again.
            if tx.recover(exc) == "replaced":
                self.stats.replaced += 1
            raise
        sent = len(outputs_again) + len(rows_again)
        self.stats.completed += sent
        self.log.warning(
            "%s: %d of the last %d batches stood committed in part; sent again: %d output(s), "
            "%d row(s)",
            self.config.name,
            sum(split),
            len(window),
            len(outputs_again),
            len(rows_again),
        )
        return sent

    def _committed_outputs(
        self, reader: Consumer, window: list[_Written], timeout_s: float = 60.0
    ) -> CounterOf[tuple[str, bytes | None, bytes | None]]:
        """(topic, key, value) of every committed record in the topics ``window`` wrote to,
        from its first send time to the ends those partitions have now."""
        topics = sorted({out[0] for w in window for out in w.outputs})
        found: CounterOf[tuple[str, bytes | None, bytes | None]] = CounterOf()
        if not topics:
            return found
        since = min(w.sent_ms for w in window) - 1000  # clocks: the same host, ms rounding
        asked = []
        for topic in topics:
            meta = reader.list_topics(topic, timeout=10).topics[topic]
            asked += [TopicPartition(topic, p, since) for p in meta.partitions]
        starts = reader.offsets_for_times(asked, timeout=10)
        ends = {(tp.topic, tp.partition): watermarks(reader, tp)[1] for tp in starts}
        todo = [tp for tp in starts if 0 <= tp.offset < ends[(tp.topic, tp.partition)]]
        if not todo:
            return found
        pending = {(tp.topic, tp.partition) for tp in todo}
        reader.assign(todo)
        deadline = time.monotonic() + timeout_s
        try:
            while pending:
                if time.monotonic() > deadline:
                    raise RestoreError(f"outputs not read back in {timeout_s} s: {pending}")
                msg = reader.poll(1.0)
                if msg is None:
                    continue
                at = (msg.topic() or "", msg.partition() or 0)
                err = msg.error()
                if err is not None:
                    if err.code() != KafkaError._PARTITION_EOF:
                        raise KafkaException(err)
                    if (msg.offset() or 0) >= ends[at]:
                        pending.discard(at)  # else an open transaction holds the end back
                    continue
                found[(at[0], msg.key(), msg.value())] += 1
        finally:
            reader.unassign()
        return found

    def _changelog_parts(
        self, reader: Consumer, window: list[_Written], timeout_s: float = 60.0
    ) -> dict[tuple[int, str, int], bool]:
        """(batch, changelog, partition) → whether that batch's records there are committed
        (its first and last are asked; records whose delivery reports never came count as
        not committed)."""
        verdict: dict[tuple[int, str, int], bool] = {}
        for i, w in enumerate(window):
            for table, rows in w.changed.rows:
                for p in sorted({p for p, _key, _value in rows}):
                    span = w.changed.span(table.changelog, p)
                    ok = span is not None
                    for offset in sorted(set(span or ())):
                        tp = TopicPartition(table.changelog, p)
                        ok = committed_at(reader, tp, offset, timeout_s) and ok
                    verdict[(i, table.changelog, p)] = ok
        return verdict

    def _resume_once(self, consumer: Consumer, back: Mapping[tuple[str, int], int]) -> None:
        assignment = consumer.assignment()
        tables = self.app.tables
        for each in self._tables():
            # The restore reader from before the failure answers its first requests on a
            # restarted broker slowly (0.6 s a partition, measured); a new one asks afresh.
            each.reset_reader()
        for tp in assignment:
            table = tables.get(tp.topic)
            if table is not None:
                table.revoke(tp.partition)
                self.stats.restored += table.assign(tp.partition)
        committed = self._committed(consumer, assignment)
        self._rereading = {}
        for tp in committed:
            first = back.get((tp.topic, tp.partition))
            if first is not None:
                self._rereading[(tp.topic, tp.partition)] = (first, tp.offset)
        starts, again = self._starts(committed)
        for start in starts:
            with contextlib.suppress(KafkaException):  # revoked meanwhile: not ours to move
                consumer.seek(start)
        self.log.warning(
            "%s: resumed from the committed offsets %s",
            self.config.name,
            sorted((tp.topic, tp.partition, tp.offset) for tp in committed),
        )
        if again:
            self.log.warning(
                "%s: reading the last batches again (topic, partition, from, committed): %s",
                self.config.name,
                sorted(again),
            )

    def _flush(
        self, consumer: Consumer, tx: Transactions, last: Iterable[Output] | None = None
    ) -> None:
        """Commit the application's idle outputs, or ``last``: its ``finish``'s."""
        outputs = list(self.app.flush() if last is None else last)
        tables = self._tables()
        if not outputs and not any(table.deleting() for table in tables):
            return
        try:
            tx.producer.begin_transaction()
            for topic, key, value, headers in outputs:
                tx.producer.produce(topic, key=key, value=value, headers=headers)
            # Rows the application deleted while idle (no batch changes rows here).
            changed = self._send_changes(tx.producer, tables)
            tx.commit()
        except KafkaException as exc:
            # No input stands behind these outputs: they are dropped, never repeated.
            self.log.warning("%s: idle outputs dropped (%s)", self.config.name, exc)
            if tx.recover(exc) == "replaced":
                self.stats.replaced += 1
                for table in self._tables():
                    table.forget()
                self._resume_from_commits(consumer, tx, {})
            else:
                self.stats.aborted += 1
            return
        self._count(changed)
        self._persist(tx.producer, changed)

    def _count(self, committed: Changes) -> None:
        """A transaction committed, with these rows."""
        stats = self.stats
        stats.transactions += 1
        stats.changelog += committed.count
        stats.changelog_bytes += committed.bytes
        stats.largest_row = max(stats.largest_row, committed.largest)

    def _send_changes(self, producer: Producer, tables: list[Table[Any]]) -> Changes:
        """Produce the tables' changed rows (a deleted row's tombstone: no value) to their
        changelogs in the open transaction. The offsets they reach arrive with their delivery
        reports, which the commit serves (librdkafka delivers every queued message before it
        commits): waiting for them here would put that wait ahead of sending the offsets,
        one round trip more per batch."""
        changes = Changes([(table, table.changed()) for table in tables])
        for table, rows in changes.rows:
            for p, key, value in rows:
                try:
                    producer.produce(
                        table.changelog,
                        key=key,
                        value=value,
                        partition=p,
                        on_delivery=changes.reached,
                    )
                except KafkaException as exc:
                    error = error_of(exc)
                    if error is None or error.code() != KafkaError.MSG_SIZE_TOO_LARGE:
                        raise
                    raise RowTooLargeError(
                        f"{self.config.name}: row {key[:200]!r} of table {table.name} "
                        f"(partition {p}) encodes to {len(value or b''):,} bytes, more than "
                        f"its changelog {table.changelog} takes; stopping, since its batch "
                        f"would fail again at every attempt"
                    ) from exc
        return changes

    @staticmethod
    def _persist(producer: Producer, changes: Changes) -> None:
        """After the commit: the rows into RocksDB, with the changelog offsets they reached."""
        producer.poll(0)  # a delivery report the commit left queued, if any
        for table, rows in changes.rows:
            table.persist(rows, changes.offsets(table.changelog))

    def _transaction(
        self,
        consumer: Consumer,
        tx: Transactions,
        records: list[Record],
        firsts: dict[tuple[str, int], int],
    ) -> None:
        """One batch in one transaction; ``firsts``: its first offset in each partition (held
        records' included: where to read again should it fail)."""
        if not records:
            return
        began = time.monotonic()
        positions: dict[tuple[str, int], int] = {}
        for r in records:
            positions[(r.topic, r.partition)] = r.offset + 1
        for _k, r in reversed(self._held):  # a partition's committed offset stops at its first
            positions[(r.topic, r.partition)] = r.offset  # held record, processed or not after
        self.stats.records += len(records)
        # The application may wait here (e.g. for state it prepares): before the transaction
        # opens, so the wait never counts against the transaction timeout.
        batch = self.app.prepare(records)
        if self._committer is not None:
            outputs = list(self.app.process(batch))
            processed = time.monotonic()
            # One transaction at a time: the last batch's commit returns before this opens.
            if not self._drain(consumer, tx, firsts):
                return  # it failed: both batches are undone and read again
            producer = tx.producer
            producer.begin_transaction()
        else:
            producer = tx.producer
            producer.begin_transaction()
            outputs = list(self.app.process(batch))
            processed = time.monotonic()
        opened = time.monotonic()
        sent_ms = int(time.time() * 1000)
        for topic, key, value, headers in outputs:
            producer.produce(topic, key=key, value=value, headers=headers)
        changed = self._send_changes(producer, self._tables())
        sent = time.monotonic()
        written = self._sending = _Written(outputs, changed, sent_ms, firsts)
        self.stats.app_s += processed - began
        self.stats.send_s += sent - opened
        offsets = [TopicPartition(t, p, o) for (t, p), o in positions.items()]
        group = consumer.consumer_group_metadata()
        commit: Future[float] = Future()
        if self._committer is not None:
            commit = self._committer.submit(self._commit, tx, offsets, group)
        else:
            before = self.stats.commit_s
            commit.set_result(self._commit(tx, offsets, group))  # a failure: ``_batch`` rewinds
            self.stats.wait_s += self.stats.commit_s - before  # all of it was waited for
        self._pending = _Pending(
            batch, records, firsts, positions, changed, written, producer, began, commit
        )
        self._sending = None  # a failure of the commit comes with ``_pending``
        if self._committer is None:
            self._wait()  # committed already: persist it now

    def _commit(self, tx: Transactions, offsets: list[TopicPartition], group: object) -> float:
        """The open transaction's offsets and commit; when it returned (monotonic)."""
        began = time.monotonic()
        tx.send_offsets(offsets, group)
        tx.commit()
        done = time.monotonic()
        self.stats.commit_s += done - began
        return done

    def _wait(self) -> None:
        """Wait for the batch committing, then persist it; a failure is kept in ``_failed``."""
        pending, self._pending = self._pending, None
        if pending is None:
            return
        waited = time.monotonic()
        try:
            done = pending.commit.result()
        except KafkaException as exc:
            self._failed = (exc, pending.firsts, pending.written)
            return
        finally:
            self.stats.wait_s += time.monotonic() - waited
        self._count(pending.changed)
        if self.config.reread_batches > 0:
            self._written.append(pending.written)
        for at, (_first, then) in list(self._rereading.items()):
            if pending.positions.get(at, -1) >= then:
                del self._rereading[at]  # read again up to where it had been committed
        self._persist(pending.producer, pending.changed)
        self.app.committed(pending.batch, pending.records, done - pending.began)

    def _drain(
        self,
        consumer: Consumer,
        tx: Transactions,
        since: Mapping[tuple[str, int], int] | None = None,
    ) -> bool:
        """Wait for the batch committing (``_wait``); False when its commit failed, and it
        and what was taken since (``since``: first offsets) were undone, to be read again."""
        self._wait()
        if self._failed is None:
            return True
        self._recover(consumer, tx, since or {})
        return False

    def _recover(
        self, consumer: Consumer, tx: Transactions, since: Mapping[tuple[str, int], int]
    ) -> None:
        """Undo the batch whose commit failed (``_failed``) and everything after it."""
        assert self._failed is not None
        exc, firsts, written = self._failed
        self._failed = None
        back = dict(firsts)
        for tp, offset in since.items():
            back[tp] = min(offset, back.get(tp, offset))
        if since:
            self.log.warning(
                "%s: a batch's commit failed (%s) after the next was taken: both read again",
                self.config.name,
                exc,
            )
        self._held = []  # taken after the failed batch's first offsets: read again
        self._rewind(consumer, tx, exc, back, written)


_GAP_ADVICE = (
    "Resuming would make the tables diverge silently, so this instance stops: rebuild the "
    "state from the source of truth, or keep the inputs longer than any outage"
)


def _firsts(records: Iterable[Record]) -> dict[tuple[str, int], int]:
    """(topic, partition) → the offset of its first record in ``records``."""
    firsts: dict[tuple[str, int], int] = {}
    for r in records:
        firsts.setdefault((r.topic, r.partition), r.offset)
    return firsts


def _start_at(committed: TopicPartition) -> TopicPartition:
    """Where a partition's reading starts: its committed offset, or its beginning if none."""
    offset = committed.offset if committed.offset >= 0 else OFFSET_BEGINNING
    return TopicPartition(committed.topic, committed.partition, offset)


def _lag(consumer: Consumer) -> int:
    lag = 0
    try:
        for tp in consumer.position(consumer.assignment()):
            _low, high = consumer.get_watermark_offsets(tp, cached=True)
            if tp.offset >= 0 and high >= 0:
                lag += max(0, high - tp.offset)
    except KafkaException:
        return -1
    return lag
