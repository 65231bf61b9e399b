"""Exactly once on the runtime alone, as Kafka Streams tests it: a counting application
(tests/streams/runtime/counter.py) killed with SIGKILL mid-stream (inside a transaction whose
outputs reached the broker, or at any moment), restarted, and a read_committed verifier that
finds every input counted once and, per key, exactly the outputs of a run without the crash."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from confluent_kafka import Consumer, KafkaError, KafkaException, Message, TopicPartition
from confluent_kafka.admin import NewTopic
from rocksdict import Cache, Rdict

from streams.peek import partition_counts
from streams.runtime.clients import (
    Connection,
    KafkaConnection,
    admin,
    committed_reader,
    idempotent_producer,
    transactional_producer,
)
from streams.runtime.exceptions import RowTooLargeError
from streams.runtime.kafka import partition_for
from streams.runtime.loop import (
    LoopConfig,
    LoopStats,
    Output,
    Record,
    TransactionalLoop,
)
from streams.runtime.store import _OFFSET_KEY, Table, rocksdb_options
from streams.runtime.transactions import SWEEP_KEY, Transactions
from streams.settings import Settings
from streams.topics import changelog_topic, largest_record
from tests.streams.runtime.counter import Counter, OneTable, topics

pytestmark = pytest.mark.kafka

ROOT = Path(__file__).resolve().parents[3]
PARTITIONS = 4
KEYS = 30

Inputs = dict[bytes, list[int]]  # key → offsets of its records (one partition per key)


@pytest.fixture
def conn(broker: Settings) -> Connection:
    return Connection(broker.bootstrap_servers)


@contextmanager
def _pipeline(conn: Connection) -> Iterator[str]:
    """A fresh topic prefix with the counter's topics, deleted afterwards."""
    prefix = f"rt{uuid.uuid4().hex[:8]}-"
    client = admin(conn)
    source, sink, changelog = topics(prefix)
    new = [
        NewTopic(source, PARTITIONS, 1),
        NewTopic(sink, PARTITIONS, 1),
        NewTopic(changelog, PARTITIONS, 1, config={"cleanup.policy": "compact"}),
    ]
    for future in client.create_topics(new, operation_timeout=30).values():
        future.result()
    try:
        yield prefix
    finally:
        for future in client.delete_topics([t.topic for t in new]).values():
            future.result()


def _produce(conn: Connection, topic: str, start: int, n: int, inputs: Inputs) -> None:
    producer = idempotent_producer(conn)

    def delivered(err: KafkaError | None, msg: Message) -> None:
        assert err is None, err
        inputs.setdefault(msg.key() or b"", []).append(msg.offset() or 0)

    for i in range(start, start + n):
        producer.produce(topic, key=f"k{i % KEYS:02d}".encode(), value=b"", on_delivery=delivered)
    assert producer.flush(30) == 0


def _read(
    conn: KafkaConnection, topic: str, committed: bool = True, partitions: int = PARTITIONS
) -> list[tuple[bytes, bytes | None]]:
    """(key, value) of every record, per partition in offset order (read to the end)."""
    isolation = "read_committed" if committed else "read_uncommitted"
    reader = committed_reader(
        conn, f"verify-{uuid.uuid4().hex[:8]}", **{"isolation.level": isolation}
    )
    reader.assign([TopicPartition(topic, p, 0) for p in range(partitions)])
    out: list[tuple[bytes, bytes | None]] = []
    ended: set[int] = set()
    deadline = time.monotonic() + 60
    try:
        while len(ended) < partitions and time.monotonic() < deadline:
            msg = reader.poll(0.5)
            if msg is None:
                continue
            err = msg.error()
            if err is not None:
                assert err.code() == KafkaError._PARTITION_EOF, err
                ended.add(msg.partition() or 0)
                continue
            out.append((msg.key() or b"", msg.value()))
    finally:
        reader.close()
    assert len(ended) == partitions, f"{topic} not read to its end"
    return out


def _start(
    conn: Connection, prefix: str, n: int, tmp: Path, state: str, overlap: bool = False
) -> subprocess.Popen[bytes]:
    log = (tmp / f"counter-{n}.log").open("ab")
    cmd = [
        *(sys.executable, "-m", "tests.streams.runtime.counter"),
        *("--bootstrap", conn.bootstrap_servers, "--prefix", prefix, "--id", str(n)),
        *("--state", str(tmp / state), "--hold", str(tmp / f"hold-{n}"), "--idle", "10"),
        *(["--overlap"] if overlap else []),
    ]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)


def _kill(
    proc: subprocess.Popen[bytes],
    conn: Connection,
    sink: str,
    after: int,
    tmp: Path,
    n: int,
    in_transaction: bool = True,
) -> int:
    """SIGKILL once ``after`` outputs are committed: ``in_transaction``, while a transaction
    holds more (sent to the broker, not committed), else at whatever moment that is; returns
    the outputs committed then."""
    hold = tmp / f"hold-{n}"
    deadline = time.monotonic() + 120
    while len(_read(conn, sink)) < after:
        assert proc.poll() is None and time.monotonic() < deadline, _log(tmp, n)
        time.sleep(0.3)
    if in_transaction:
        hold.with_suffix(".ask").touch()
        while not hold.exists():
            assert proc.poll() is None and time.monotonic() < deadline, _log(tmp, n)
            time.sleep(0.01)
        time.sleep(1.5)  # the held transaction's outputs reach the broker
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=10)
    hold.with_suffix(".ask").unlink(missing_ok=True)
    hold.unlink(missing_ok=True)
    return len(_read(conn, sink))


def _log(tmp: Path, n: int) -> str:
    return (tmp / f"counter-{n}.log").read_text()[-3000:]


def _finish(procs: list[subprocess.Popen[bytes]], tmp: Path) -> None:
    """Each instance stops by itself once idle; a hang is a failure."""
    for n, proc in enumerate(procs):
        try:
            assert proc.wait(timeout=180) == 0, _log(tmp, n)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(timeout=10)


def _verify(conn: Connection, prefix: str, inputs: Inputs, killed: bool = True) -> None:
    """Committed outputs are exactly a crash-free run's: per key the counts 1..n, each next
    to the offset of the input it counted; the table holds n."""
    _source, sink, changelog = topics(prefix)
    total = sum(len(offsets) for offsets in inputs.values())
    outputs = _read(conn, sink)
    assert len(outputs) == total
    by_key: dict[bytes, list[bytes | None]] = {}
    for key, value in outputs:
        by_key.setdefault(key, []).append(value)
    for key, offsets in inputs.items():
        want = [f"{count}:{offset}".encode() for count, offset in enumerate(offsets, 1)]
        assert by_key.pop(key) == want, key
    assert not by_key
    table = dict(_read(conn, changelog))
    assert table == {key: str(len(offsets)).encode() for key, offsets in inputs.items()}
    if killed:
        # The kills left aborted outputs behind: the verifier saw past them, not around them.
        assert len(_read(conn, sink, committed=False)) > total


@pytest.mark.parametrize("overlap", [False, True], ids=["serial", "overlap"])
def test_a_counter_killed_twice_counts_each_input_once(
    conn: Connection, tmp_path: Path, overlap: bool
) -> None:
    """Killed inside a transaction (with ``overlap``: while the next batch is processed, the
    last one committed and its rows not yet in the local store), restarted on its local
    store; killed again at any moment, restarted on an empty store (the changelog rebuilds
    it); inputs keep arriving meanwhile."""
    inputs: Inputs = {}
    with _pipeline(conn) as prefix:
        source, sink, _changelog = topics(prefix)
        _produce(conn, source, 0, 1000, inputs)
        proc = _start(conn, prefix, 0, tmp_path, "state", overlap)
        try:
            first = _kill(proc, conn, sink, 300, tmp_path, 0)
            _produce(conn, source, 1000, 500, inputs)
            proc = _start(conn, prefix, 0, tmp_path, "state", overlap)
            second = _kill(proc, conn, sink, first + 400, tmp_path, 0, in_transaction=False)
            assert 0 < first < second < 1500  # both kills landed mid-stream
            proc = _start(conn, prefix, 0, tmp_path, "state-fresh", overlap)
            _finish([proc], tmp_path)
        finally:
            if proc.poll() is None:
                proc.kill()
        # With overlap the first kill leaves no transaction open, the second may not.
        _verify(conn, prefix, inputs, killed=not overlap)


@pytest.mark.parametrize("overlap", [False, True], ids=["serial", "overlap"])
def test_two_counters_one_killed_rebalance_and_count_each_input_once(
    conn: Connection, tmp_path: Path, overlap: bool
) -> None:
    """The survivor takes the dead one's partitions (restoring their table from the
    changelog), then gives some back when it returns (with ``overlap``, each rebalance
    meets a batch committing)."""
    inputs: Inputs = {}
    with _pipeline(conn) as prefix:
        source, sink, _changelog = topics(prefix)
        procs = [_start(conn, prefix, n, tmp_path, f"state-{n}", overlap) for n in (0, 1)]
        try:
            deadline = time.monotonic() + 60
            while not all(
                "assigned [(" in (tmp_path / f"counter-{n}.log").read_text() for n in (0, 1)
            ):
                assert time.monotonic() < deadline, [_log(tmp_path, n) for n in (0, 1)]
                time.sleep(0.3)
            _produce(conn, source, 0, 1500, inputs)
            killed = _kill(procs[1], conn, sink, 300, tmp_path, 1)
            assert 0 < killed < 1500
            procs[1] = _start(conn, prefix, 1, tmp_path, "state-1", overlap)
            _finish(procs, tmp_path)
        finally:
            for proc in procs:
                if proc.poll() is None:
                    proc.kill()
        _verify(conn, prefix, inputs, killed=not overlap)


def test_input_lost_unprocessed_stops_the_instance_instead_of_skipping_it(
    conn: Connection, tmp_path: Path
) -> None:
    """An instance away longer than its input's retention (simulated with delete_records):
    it must not resume past records it never processed, nor, once its group's committed
    offsets expired (simulated by deleting the group), re-count what is retained on top of its
    table. Both times it stops with InputGapError, having committed nothing."""
    inputs: Inputs = {}
    with _pipeline(conn) as prefix:
        source, sink, _changelog = topics(prefix)
        _produce(conn, source, 0, 200, inputs)
        _finish([_start(conn, prefix, 0, tmp_path, "state")], tmp_path)
        assert len(_read(conn, sink)) == 200
        _produce(conn, source, 200, 100, inputs)  # while it is away
        client = admin(conn)
        reader = committed_reader(conn, f"ends-{uuid.uuid4().hex[:8]}")
        ends = [
            TopicPartition(source, p, reader.get_watermark_offsets(TopicPartition(source, p))[1])
            for p in range(PARTITIONS)
        ]
        reader.close()
        for future in client.delete_records(ends).values():
            future.result()

        for n, (cause, expected) in enumerate(
            [("retention", "records were deleted"), ("expired offsets", "offsets expired")], 1
        ):
            if cause == "expired offsets":
                client.delete_consumer_groups([f"{prefix}counter"])[f"{prefix}counter"].result()
            proc = _start(conn, prefix, n, tmp_path, "state")
            try:
                assert proc.wait(timeout=120) != 0, _log(tmp_path, n)
            finally:
                if proc.poll() is None:
                    proc.kill()
            assert "InputGapError" in _log(tmp_path, n) and expected in _log(tmp_path, n), cause
        assert len(_read(conn, sink)) == 200  # nothing more was counted


def test_a_store_holding_rows_of_a_batch_the_broker_aborted_is_rebuilt(
    conn: Connection, tmp_path: Path
) -> None:
    """A batch whose commit returned, so that its rows went to the store, yet whose changelog
    records were aborted afterwards (a broker that skipped its commit markers, then an abort
    of the same producer id took them: streams.runtime.transactions). Restored from the
    store's offset on, the store would keep those rows and the counts would go on from them.
    The instance finds the store's last record aborted, rebuilds the store from the committed
    changelog and counts every input once."""
    inputs: Inputs = {}
    with _pipeline(conn) as prefix:
        source, _sink, changelog = topics(prefix)
        _produce(conn, source, 0, 120, inputs)
        _finish([_start(conn, prefix, 0, tmp_path, "state")], tmp_path)
        key = b"k07"
        p = partition_for(key, PARTITIONS)
        ghost = transactional_producer(conn, f"{prefix}ghost")
        ghost.init_transactions(30)
        ghost.begin_transaction()
        reached: list[int] = []
        ghost.produce(
            changelog,
            key=key,
            value=b"1000",
            partition=p,
            on_delivery=lambda err, msg: reached.append(-1 if err else msg.offset() or 0),
        )
        assert ghost.flush(30) == 0 and reached[0] >= 0
        ghost.abort_transaction(30)
        store = Rdict(
            str(tmp_path / "state" / f"counts-{p}"), options=rocksdb_options(Cache(1 << 20))
        )
        try:  # as Table.persist writes a committed batch
            store[key] = b"1000"
            store[_OFFSET_KEY] = str(reached[0]).encode()
        finally:
            store.close()
        _produce(conn, source, 120, 60, inputs)
        _finish([_start(conn, prefix, 1, tmp_path, "state")], tmp_path)
        _verify(conn, prefix, inputs, killed=False)
        assert f"counts[{p}]: local store ahead of the committed changelog" in _log(tmp_path, 1)


def test_each_new_producer_first_aborts_a_record_on_every_partition_it_writes(
    conn: Connection, tmp_path: Path
) -> None:
    """The sweep (streams.runtime.transactions): before its first transaction, a producer
    writes one record to each partition of the instance's outputs and changelogs and aborts
    them, so that records an earlier producer of its id left open end there. No
    read_committed reader sees them (``_verify`` reads exactly the counts)."""
    inputs: Inputs = {}
    with _pipeline(conn) as prefix:
        source, sink, changelog = topics(prefix)
        _produce(conn, source, 0, 40, inputs)
        _finish([_start(conn, prefix, 0, tmp_path, "state")], tmp_path)
        for topic in (sink, changelog):
            every = _read(conn, topic, committed=False)
            assert [key for key, _value in every].count(SWEEP_KEY) == PARTITIONS, topic
        _verify(conn, prefix, inputs, killed=False)


def test_a_stray_pending_offset_commit_does_not_stop_the_instance(
    conn: Connection, tmp_path: Path
) -> None:
    """A transactional offset commit left pending in the instance's group (after a broker
    restart, by a producer abandoned while librdkafka's send_offsets_to_transaction hung):
    the group's stable offsets cannot be read while it is pending, and a worker once waited
    for them until it gave up. Here a transaction of another producer holds a commit of
    offset 0 for every partition, open for longer than any of the instance's transactions
    may be. The instance resumes from the last stable offsets instead, counts only the new
    inputs, and the commit it rewinds to never takes effect (aborted at the end)."""
    inputs: Inputs = {}
    with _pipeline(conn) as prefix:
        source, _sink, _changelog = topics(prefix)
        _produce(conn, source, 0, 200, inputs)
        _finish([_start(conn, prefix, 0, tmp_path, "state")], tmp_path)
        stray = transactional_producer(
            conn, f"{prefix}stray", **{"transaction.timeout.ms": 300_000}
        )
        stray.init_transactions(30)
        stray.begin_transaction()
        group = committed_reader(conn, f"{prefix}counter")
        rewind = [TopicPartition(source, p, 0) for p in range(PARTITIONS)]
        stray.send_offsets_to_transaction(rewind, group.consumer_group_metadata(), 30)
        group.close()
        try:
            _produce(conn, source, 200, 100, inputs)
            _finish([_start(conn, prefix, 1, tmp_path, "state")], tmp_path)
            log = (tmp_path / "counter-1.log").read_text()
            assert "stayed unstable" in log and "stray offset commit is settled" in log, log
        finally:
            stray.abort_transaction(30)
        _verify(conn, prefix, inputs, killed=False)


def test_the_last_stable_offsets_are_read_for_partitions_that_carry_positions(
    conn: Connection, tmp_path: Path
) -> None:
    """The fallback above reads the group's offsets for the partitions a consumer holds, and
    after a producer is replaced those come from ``consumer.assignment()`` with the positions
    the consumer moved to (the admin request refuses such partitions as they are: a worker
    stopped on that in CI)."""
    inputs: Inputs = {}
    with _pipeline(conn) as prefix:
        source, _sink, _changelog = topics(prefix)
        _produce(conn, source, 0, 40, inputs)
        _finish([_start(conn, prefix, 0, tmp_path, "state")], tmp_path)
        config = LoopConfig(
            name="probe", group_id=f"{prefix}counter", transactional_id=f"{prefix}probe"
        )
        loop = TransactionalLoop(conn, config, Counter(conn, prefix, tmp_path / "probe", 0, 1))
        held = [TopicPartition(source, p, 3) for p in range(PARTITIONS)]
        got = {tp.partition: tp.offset for tp in loop._stable_offsets(held)}
        reader = committed_reader(conn, f"ends-{uuid.uuid4().hex[:8]}")
        try:
            ends = {c.partition: c.high for c in partition_counts(reader, source)}
        finally:
            reader.close()
        assert got == ends and sum(ends.values()) == 40


class _Latest(Counter):
    """Ignores repeats, as the JODIE worker does: its table keeps, per key, one past the
    highest input offset applied; each new input sends its offset under its key, a repeat
    sends nothing."""

    def __init__(self, conn: Connection, prefix: str, state: Path) -> None:
        super().__init__(conn, prefix, state, delay_s=0.0, idle_s=3600.0)
        self.repeats = 0

    def process(self, batch: list[Record]) -> Iterator[Output]:
        for record in batch:
            assert record.key is not None
            if record.offset < self.counts.get(record.partition, record.key):
                self.repeats += 1
                continue
            self.counts.put(record.partition, record.key, record.offset + 1)
            yield self.output, record.key, str(record.offset).encode(), None


def _answered(outputs: list[tuple[bytes, bytes | None]]) -> dict[bytes, list[int]]:
    """The input offsets ``_Latest`` answered, by key, in the order of its outputs."""
    by_key: dict[bytes, list[int]] = {}
    for key, value in outputs:
        by_key.setdefault(key, []).append(int(value or b"-1"))
    return by_key


def _run_latest(
    conn: Connection, prefix: str, state: Path, overlap: bool, inputs: Inputs
) -> tuple[TransactionalLoop[list[Record]], _Latest]:
    """``_Latest`` with ``reread_batches`` on 200 new inputs, in batches of 25, until each
    has an output (or two minutes passed, or a second went by with nothing more)."""
    source, sink, _changelog = topics(prefix)
    _produce(conn, source, 0, 200, inputs)
    app = _Latest(conn, prefix, state)
    config = LoopConfig(
        name="latest",
        group_id=f"{prefix}latest",
        transactional_id=f"{prefix}latest",
        batch=25,
        reread_batches=2,
        overlap=overlap,
    )
    loop = TransactionalLoop(conn, config, app)
    runner = threading.Thread(target=loop.run, kwargs={"max_seconds": 120}, daemon=True)
    runner.start()
    deadline = time.monotonic() + 120
    try:
        while len(_read(conn, sink)) < 200 and time.monotonic() < deadline:
            time.sleep(0.5)
        time.sleep(1.0)  # nothing more comes
    finally:
        loop.stop()
        runner.join(timeout=30)
    return loop, app


@pytest.mark.parametrize("rebalanced", [False, True], ids=["kept", "rebalanced"])
@pytest.mark.parametrize("overlap", [False, True], ids=["serial", "overlap"])
def test_a_batch_whose_offsets_committed_without_its_outputs_is_read_again(
    conn: Connection,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    overlap: bool,
    rebalanced: bool,
) -> None:
    """What a broker that completes a commit without all of its markers can leave (a single
    node restarted at the wrong moment, streams.runtime.transactions): the batch's offsets
    committed, its outputs and changelog records aborted, and the producer replaced. Made
    here at will on the third batch: its transaction aborted, its offsets committed by
    another transaction with the member's group metadata, and the commit call failing as a
    fatal error. An application that ignores repeats, run with ``reread_batches``, reads that
    batch again after the new producer starts, and every input has exactly one output. With
    ``overlap`` the failure surfaces once the next batch was processed in memory: that one is
    dropped and read again too. ``rebalanced``: the member's partitions are revoked and
    assigned again right after the resume, before anything is read again (a group session
    that timed out while the broker was away ends so; seen in a full run, five events lost):
    the assignment starts them where the resume meant to read again, not at the committed
    offsets."""
    inputs: Inputs = {}
    failed: list[int] = []
    resume = TransactionalLoop._resume_once
    rebalances: list[list[TopicPartition]] = []

    def resume_then_rebalance(
        self: TransactionalLoop[list[Record]], consumer: Consumer, back: dict[Any, int]
    ) -> None:
        resume(self, consumer, back)
        # What librdkafka does in a rebalance: the revoke callback, the assign callback (which
        # may give the positions), and otherwise the committed offsets.
        parts = [TopicPartition(tp.topic, tp.partition) for tp in consumer.assignment()]
        self._on_revoke(consumer, parts)
        consumer.unassign()
        self._on_assign(consumer, parts)
        if not consumer.assignment():
            consumer.assign(parts)
        rebalances.append(parts)

    if rebalanced:
        monkeypatch.setattr(TransactionalLoop, "_resume_once", resume_then_rebalance)

    class HalfCommitting(Transactions):
        commits = 0
        sent: tuple[list[TopicPartition], object] | None = None

        def send_offsets(self, offsets: list[TopicPartition], group: object) -> None:
            self.sent = (offsets, group)
            super().send_offsets(offsets, group)

        def commit(self) -> None:
            self.commits += 1
            if self.commits != 3 or self.sent is None:
                super().commit()
                return
            self.producer.abort_transaction(30)
            ghost = transactional_producer(conn, f"{prefix}ghost")
            ghost.init_transactions(30)
            ghost.begin_transaction()
            ghost.send_offsets_to_transaction(*self.sent, 30)
            ghost.commit_transaction(30)
            failed.extend(tp.offset for tp in self.sent[0])
            reason = "the broker went away after deciding the commit"
            raise KafkaException(KafkaError(KafkaError._TIMED_OUT, reason, fatal=True))

    monkeypatch.setattr("streams.runtime.loop.Transactions", HalfCommitting)
    with _pipeline(conn) as prefix:
        loop, app = _run_latest(conn, prefix, tmp_path / "state", overlap, inputs)
        assert failed, "the third commit never came"
        outputs = _read(conn, topics(prefix)[1])
        assert _answered(outputs) == inputs, (
            f"{len(outputs)} outputs of 200 inputs: one lost, or twice"
        )
        assert loop.stats.replaced == 1 and app.repeats > 0, (loop.stats, app.repeats)
        assert len(rebalances) == int(rebalanced) and all(rebalances), rebalances


@pytest.mark.parametrize("overlap", [False, True], ids=["serial", "overlap"])
def test_a_batch_whose_rows_committed_without_its_outputs_is_completed(
    conn: Connection, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, overlap: bool
) -> None:
    """The other half of a commit completed without all of its markers (a single node
    restarted at the wrong moment; seen in a full run, two events without a recommendation):
    the batch's changelog records committed, its outputs and offsets aborted (the next
    producer's sweep ends them), its commit call returned, and the next batch's commit
    fails for good. Read again, that batch is all repeats (its rows stand committed), so
    nothing would ever send its outputs. Made here at will on the third batch: its changelog
    records sent and committed by another producer, its own transaction aborted while the
    call returns, the fourth commit failing as a fatal error. After the new producer starts,
    the loop completes the last ``reread_batches`` batches (and the failed one) where part
    of them stands: what of the third is not committed, its outputs, is sent again (of the
    fourth nothing stands: it is read again and applied), and every input has exactly one
    output."""
    inputs: Inputs = {}
    completed: list[int] = []
    send_changes = TransactionalLoop._send_changes
    sent = [0]

    def rows_apart(self: TransactionalLoop[list[Record]], producer: Any, tables: list[Any]) -> Any:
        sent[0] += 1
        if sent[0] != 3:
            return send_changes(self, producer, tables)
        ghost = transactional_producer(conn, f"{prefix}ghost")
        ghost.init_transactions(30)
        ghost.begin_transaction()
        changes = send_changes(self, ghost, tables)
        ghost.commit_transaction(30)  # serves the delivery reports: the rows' real offsets
        return changes

    class OutputsAborted(Transactions):
        commits = 0

        def commit(self) -> None:
            self.commits += 1
            if self.commits == 3:
                self.producer.abort_transaction(30)
                return  # "returned": the loop takes the batch for committed
            if self.commits == 4:
                reason = "the broker went away after deciding the commit"
                raise KafkaException(KafkaError(KafkaError._TIMED_OUT, reason, fatal=True))
            super().commit()

    complete = TransactionalLoop._complete_window

    def counted(self: TransactionalLoop[list[Record]], *args: Any) -> int:
        n = complete(self, *args)
        completed.append(n)
        return n

    monkeypatch.setattr(TransactionalLoop, "_send_changes", rows_apart)
    monkeypatch.setattr(TransactionalLoop, "_complete_window", counted)
    monkeypatch.setattr("streams.runtime.loop.Transactions", OutputsAborted)
    with _pipeline(conn) as prefix:
        loop, app = _run_latest(conn, prefix, tmp_path / "state", overlap, inputs)
        assert sent[0] >= 4, "the fourth batch never came"
        outputs = _read(conn, topics(prefix)[1])
        assert _answered(outputs) == inputs, (
            f"{len(outputs)} outputs of 200 inputs: one lost, or twice"
        )
        assert loop.stats.replaced == 1 and app.repeats > 0, (loop.stats, app.repeats)
        # The third batch's outputs (up to one per input: none for a repeat) sent again.
        assert completed and 0 < completed[0] <= 25, completed


class _Ordered(_Latest):
    """``_Latest`` whose inputs carry their place in the order it wants them in, as a JODIE
    inbox message carries its event's seq: the number in the value; a value marked ``*`` has
    none (as a pre-state). Each input has a key of its own, so a record processed before an
    earlier one of its partition is no repeat. Notes, per committed batch, the numbers it
    processed and those the loop held back then."""

    def __init__(self, conn: Connection, prefix: str, state: Path) -> None:
        super().__init__(conn, prefix, state)
        self.loop: TransactionalLoop[list[Record]] | None = None
        self.batches: list[tuple[list[int], list[int]]] = []
        self.stop_after: int | None = None  # batches
        self.held_at_stop: list[Record] = []

    def order(self, record: Record) -> int | None:
        value = record.value or b""
        return None if value.endswith(b"*") else int(value)

    def committed(self, batch: list[Record], records: list[Record], seconds: float) -> None:
        assert self.loop is not None
        held = [r for _order, r in self.loop._held]
        numbers = [int((r.value or b"").rstrip(b"*")) for r in records]
        self.batches.append((numbers, [int(r.value or b"") for r in held]))
        if self.stop_after is not None and len(self.batches) == self.stop_after:
            self.held_at_stop = held
            self.loop.stop()


def _produce_runs(conn: Connection, topic: str, per_partition: int, inputs: Inputs) -> None:
    """Partition p gets the numbers p, p + 4, p + 8, ... (every seventh without an order):
    all of partition 0's first, then 1's, and so on, in record batches of 25 (a fetch
    returns whole batches), so that a consumer can read short runs of each partition."""
    producer = idempotent_producer(conn, **{"linger.ms": 0})

    def delivered(err: KafkaError | None, msg: Message) -> None:
        assert err is None, err
        inputs.setdefault(msg.key() or b"", []).append(msg.offset() or 0)

    for p in range(PARTITIONS):
        for i in range(per_partition):
            n = i * PARTITIONS + p
            value = f"{n}{'*' if n % 7 == 3 else ''}".encode()
            producer.produce(
                topic, key=f"r{n}".encode(), value=value, partition=p, on_delivery=delivered
            )
            producer.poll(0)
            if i % 25 == 24:
                assert producer.flush(30) == 0
    assert producer.flush(30) == 0


def _run_ordered(
    conn: Connection,
    prefix: str,
    state: Path,
    lookahead: int,
    stop_after: int | None = None,
    batch: int = 20,
    first_batch: int | None = None,
) -> _Ordered:
    """Runs ``_Ordered`` on the backlog until it has answered every input, or stopped."""
    _source, sink, _changelog = topics(prefix)
    app = _Ordered(conn, prefix, state)
    app.stop_after = stop_after
    config = LoopConfig(
        name="ordered",
        group_id=f"{prefix}ordered",
        transactional_id=f"{prefix}ordered",
        batch=batch,
        first_batch=first_batch,
        lookahead=lookahead,
        # Short runs of each partition, as the JODIE worker reads (a few record batches).
        consumer={"max.partition.fetch.bytes": 512},
    )
    loop = TransactionalLoop(conn, config, app)
    app.loop = loop
    runner = threading.Thread(target=loop.run, kwargs={"max_seconds": 120}, daemon=True)
    runner.start()
    deadline = time.monotonic() + 120
    try:
        while runner.is_alive() and time.monotonic() < deadline:
            if stop_after is None and len(_read(conn, sink)) >= 4 * 100:
                break
            time.sleep(0.3)
    finally:
        loop.stop()
        runner.join(timeout=30)
    return app


def _inversions(batches: list[list[int]]) -> int:
    """Pairs processed in the wrong order: a later batch's record before an earlier batch's
    (a batch is applied as a whole)."""
    seen: list[int] = []
    out = 0
    for keys in batches:
        out += sum(1 for b in keys for a in seen if b < a)
        seen += keys
    return out


def test_a_backlog_is_processed_in_the_applications_order(conn: Connection, tmp_path: Path) -> None:
    """A consumer behind a backlog hands out a run of one partition after another. With a
    lookahead the loop processes each batch's earliest records in the application's order
    and holds the latest back: every batch is earlier than what waits, a tenth as many pairs
    are processed out of order as without (from the second batch on), and each input is
    answered once."""
    found: dict[int, int] = {}
    for lookahead in (0, 100):
        inputs: Inputs = {}
        with _pipeline(conn) as prefix:
            source, sink, _changelog = topics(prefix)
            _produce_runs(conn, source, 100, inputs)
            app = _run_ordered(conn, prefix, tmp_path / f"state-{lookahead}", lookahead)
            outputs = _read(conn, sink)
        assert _answered(outputs) == inputs, (
            f"{len(outputs)} outputs of 400 inputs: one lost, or twice"
        )
        processed = [k for keys, _held in app.batches for k in keys]
        assert sorted(processed) == list(range(400))
        # From the second batch: the first is taken before the loop knows of a backlog.
        found[lookahead] = _inversions(
            [[n for n in numbers if n % 7 != 3] for numbers, _held in app.batches[1:]]
        )
        if lookahead:
            held_any = [(keys, held) for keys, held in app.batches if held]
            assert held_any, "nothing was ever held back"
            for numbers, held in held_any:
                ordered = [n for n in numbers if n % 7 != 3]
                assert not ordered or max(ordered) < min(held), (numbers, held)
    assert found[100] * 10 < found[0], found


def test_held_records_are_not_committed(conn: Connection, tmp_path: Path) -> None:
    """An instance stopped while it holds records back has committed no offset past the
    first held record of any partition: a new instance (its store rebuilt from the
    changelog) answers every input, none twice."""
    inputs: Inputs = {}
    with _pipeline(conn) as prefix:
        source, sink, _changelog = topics(prefix)
        _produce_runs(conn, source, 100, inputs)
        first = _run_ordered(conn, prefix, tmp_path / "state-1", 60, stop_after=4)
        assert first.held_at_stop, "nothing was held when the instance stopped"
        reader = committed_reader(conn, f"{prefix}ordered")
        try:
            committed = reader.committed(
                [TopicPartition(source, p) for p in range(PARTITIONS)], timeout=30
            )
        finally:
            reader.close()
        held_from: dict[int, int] = {}
        for r in first.held_at_stop:
            held_from.setdefault(r.partition, r.offset)
        for tp in committed:
            if tp.partition in held_from:
                assert tp.offset <= held_from[tp.partition], (tp, held_from)
        second = _run_ordered(conn, prefix, tmp_path / "state-2", 60)
        outputs = _read(conn, sink)
    assert _answered(outputs) == inputs, f"{len(outputs)} outputs of 400 inputs: one lost, or twice"
    assert second.batches, "the second instance processed nothing"


def test_batches_behind_a_backlog_grow_from_the_first_batch_to_the_cap(
    conn: Connection, tmp_path: Path
) -> None:
    """Behind a backlog the first batch holds at most ``first_batch`` records and each full
    one doubles the next one's cap up to ``batch`` (a short one starts again from
    ``first_batch``): no batch is larger than that rule allows, the cap is reached, and each
    input is answered once."""
    inputs: Inputs = {}
    with _pipeline(conn) as prefix:
        source, sink, _changelog = topics(prefix)
        _produce_runs(conn, source, 100, inputs)
        app = _run_ordered(conn, prefix, tmp_path / "state", 0, batch=64, first_batch=8)
        outputs = _read(conn, sink)
    assert _answered(outputs) == inputs, f"{len(outputs)} outputs of 400 inputs: one lost, or twice"
    sizes = [len(numbers) for numbers, _held in app.batches]
    cap = 8
    for n, size in enumerate(sizes):
        assert size <= cap, (n, sizes)
        cap = min(2 * cap, 64) if size == cap else 8
    assert sizes[0] <= 8 and max(sizes) > 32, sizes


def _byte_rows(settings: Settings, state: Path) -> Table[bytes]:
    """The item-state table, its rows raw bytes (``_Growing``'s, and a store restored from
    its changelog)."""
    return Table(
        settings,
        "item-state",
        changelog_topic(settings, "item-state"),
        state,
        decode=lambda _key, raw: raw,
        encode=lambda _key, row: row,
        initial=lambda _key: b"",
    )


class _Growing(OneTable[bytes]):
    """Rows that grow with their inputs, as a JODIE row grows with the events waiting in it:
    each input (its value a number of bytes) appends that many random bytes, which no
    compression shrinks, to its key's row, and answers with the row's length. On the
    pipeline's own declared topics: the item inbox, the recommendations, the item-state
    changelog."""

    def __init__(self, settings: Settings, state: Path) -> None:
        rows = _byte_rows(settings, state)
        super().__init__(settings.topic("item-inbox"), settings.topic("recommendations"), rows)
        self.random = random.Random(7)

    def process(self, batch: list[Record]) -> Iterator[Output]:
        for record in batch:
            assert record.key is not None
            row = self.table.get(record.partition, record.key)
            row += self.random.randbytes(int(record.value or b"0"))
            self.table.put(record.partition, record.key, row)
            yield self.output, record.key, str(len(row)).encode(), None


def _grow(
    settings: Settings, state: Path, sizes: list[int], producer: Mapping[str, Any]
) -> tuple[list[bytes], BaseException | None, LoopStats]:
    """Runs ``_Growing`` (one input per batch) on inputs of ``sizes`` bytes for one key until
    each is answered, it fails, or 90 s pass; its committed answers, what it raised, and its
    loop's counters."""
    source, sink = settings.topic("item-inbox"), settings.topic("recommendations")
    n = settings.partitions
    sender = idempotent_producer(settings)
    for size in sizes:
        sender.produce(source, key=b"grows", value=str(size).encode(), partition=0)
    assert sender.flush(30) == 0
    app = _Growing(settings, state)
    config = LoopConfig(
        name="growing",
        group_id=f"{settings.topic_prefix}growing",
        transactional_id=f"{settings.topic_prefix}growing",
        batch=1,
        producer=producer,
    )
    loop = TransactionalLoop(settings, config, app)
    failed: list[BaseException] = []

    def run() -> None:
        try:
            loop.run(max_seconds=90)
        except BaseException as exc:  # what the test asserts on
            failed.append(exc)

    runner = threading.Thread(target=run, daemon=True)
    runner.start()
    deadline = time.monotonic() + 90
    answers: list[bytes] = []
    try:
        while runner.is_alive() and time.monotonic() < deadline:
            answers = [v or b"" for k, v in _read(settings, sink, partitions=n) if k == b"grows"]
            if len(answers) == len(sizes):
                break
            time.sleep(0.5)
    finally:
        loop.stop()
        runner.join(timeout=30)
    assert not runner.is_alive(), "the loop did not stop"
    answers = [v or b"" for k, v in _read(settings, sink, partitions=n) if k == b"grows"]
    return answers, (failed[0] if failed else None), loop.stats


def test_rows_larger_than_a_default_message_commit_and_restore(
    kafka: Settings, tmp_path: Path
) -> None:
    """A row of 2.1 MB, twice the brokers' default record limit, written in three batches
    through the changelog declared in deploy/topics.toml by a producer set as the workers
    set theirs (``largest_record``): every batch commits, and a store restored from the
    changelog holds the row as it was written."""
    changelog = changelog_topic(kafka, "item-state")
    largest = largest_record(kafka, [changelog])
    assert largest is not None
    limit = {"message.max.bytes": largest}
    answers, failed, stats = _grow(kafka, tmp_path / "state", [700_000] * 3, limit)
    assert failed is None, failed
    assert answers == [b"700000", b"1400000", b"2100000"]
    assert (stats.changelog, stats.changelog_bytes, stats.largest_row) == (3, 4_200_000, 2_100_000)
    restored = _byte_rows(kafka, tmp_path / "restored")
    try:
        restored.assign(0)
        row = restored.committed(0, b"grows")
    finally:
        restored.close()
    assert row is not None and len(row) == 2_100_000
    expected = random.Random(7)
    assert row == b"".join(expected.randbytes(700_000) for _ in range(3))


def test_a_row_larger_than_its_changelog_takes_stops_the_instance(
    kafka: Settings, tmp_path: Path
) -> None:
    """A row the producer refuses as too large would fail its batch again at every attempt,
    the batch read again for ever: the loop stops at once instead, naming the row. (Here the
    producer keeps librdkafka's default limit, 1,000,000 bytes, and the row reaches 1.4 MB in
    its second batch; the first commits.)"""
    answers, failed, _stats = _grow(kafka, tmp_path / "state", [700_000, 700_000], {})
    assert isinstance(failed, RowTooLargeError), failed
    assert "b'grows' of table item-state" in str(failed) and "1,400,000 bytes" in str(failed)
    assert answers == [b"700000"]
