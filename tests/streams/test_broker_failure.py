"""Broker failures under a running pipeline: a broker killed with SIGKILL mid-stream, restarted.

Each test starts its own local Kafka on ports of its own (the suite's broker is never
touched): a single node on 19492, or a three-node cluster on 19392/19402/19412 (replication
3, min.insync.replicas 2). The router and one worker run as processes, as an operator runs
them; events arrive paced while a broker is killed. Afterwards a read_committed consumer must
find exactly one recommendation per event, and the workers' states must equal the sequential
replay. The measured recovery time (the restarted broker answering metadata → the first
recommendation committed after the kill, as a read_committed consumer receives it) is
printed; benchmarks/broker_failure.py measures it at length.
"""

from __future__ import annotations

import itertools
import logging
import os
import shutil
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from confluent_kafka import KafkaError, TopicPartition
from confluent_kafka.admin import AdminClient, NewTopic

from deploy.exceptions import BrokerStartError
from deploy.kafka import broker, cluster
from operators.dataset import bundled_wikipedia
from operators.protocol.sequencer import SequencedEvent
from schemas import INTERACTION
from schemas.codec import INBOX_MESSAGE, Codec
from streams.codecs import TOPIC_SCHEMAS, make_codec
from streams.produce import produce_file
from streams.router import read_log
from streams.runtime.clients import (
    admin,
    committed_reader,
    idempotent_producer,
    transactional_producer,
)
from streams.runtime.kafka import watermarks
from streams.runtime.transactions import Sweep, Transactions
from streams.settings import Settings
from streams.topics import scratch_topics
from tests.streams.harness import (
    HISTORY,
    assert_equal_to_reference,
    make_checkpoint,
    reference,
    start_worker,
    stop,
    wait_for,
)

pytestmark = pytest.mark.kafka

SINGLE_PORT = 19492
CLUSTER_PORT = 19392
EVENTS = 600
RATE = 150.0  # events/s: the stream lasts 4 s, the kill lands in it


@pytest.fixture(autouse=True)
def refused_connections_unlogged() -> Iterator[None]:
    """librdkafka's "Connection refused" while a broker is down, hundreds of lines a test, is
    what these tests cause on purpose: kept out of a failure's report, where it crowded out
    the processes' and brokers' own logs."""

    def keep(record: logging.LogRecord) -> bool:
        return "Connection refused" not in record.getMessage()

    loggers = [logging.getLogger(name) for name in ("jodie.kafka", "jodie.kafka.login")]
    for logger in loggers:
        logger.addFilter(keep)
    try:
        yield
    finally:
        for logger in loggers:
            logger.removeFilter(keep)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_checkpoint(tmp_path_factory.mktemp("ckpt") / "v1")


@contextmanager
def local_kafka(port: int, nodes: int, tmp: Path) -> Iterator[list[broker.BrokerConfig]]:
    """A local Kafka of ``nodes`` nodes from ``port`` on, the environment pointing at it
    (for this process and those it starts); stopped and purged afterwards, its logs kept in
    ``tmp`` (pytest keeps the last runs' directories: a failure's full broker logs)."""
    env = {
        "JODIE_BROKER_PORT": str(port),
        "JODIE_CONTROLLER_PORT": str(port + 1),
        "JODIE_BROKER_NODES": str(nodes),
        "JODIE_BROKER_HEAP": "384m",
    }
    saved = {k: os.environ.get(k) for k in [*env, "JODIE_BOOTSTRAP"]}
    os.environ.update(env)
    os.environ.pop("JODIE_BOOTSTRAP", None)
    cfgs = cluster.node_configs(broker.BrokerConfig.from_settings(Settings()), nodes)
    try:
        cluster.down(cfgs, purge=True)  # what an interrupted run left
        cluster.up(cfgs)
        # Every node formatted with the one cluster id (formatting runs in parallel threads;
        # a node with an id of its own is refused by the quorum and exits).
        assert len({_formatted_id(n) for n in cfgs}) == 1
        yield cfgs
    finally:
        cluster.down(cfgs)
        for n in cfgs:
            if n.logs_dir.exists():
                shutil.copytree(n.logs_dir, tmp / f"broker-{n.port}-logs", dirs_exist_ok=True)
        cluster.down(cfgs, purge=True)
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def _formatted_id(node: broker.BrokerConfig) -> str:
    lines = (node.data_dir / "meta.properties").read_text().splitlines()
    return next(line.split("=", 1)[1] for line in lines if line.startswith("cluster.id="))


class Follower(threading.Thread):
    """A read_committed consumer of `recommendations`: (received, created) wall-clock
    seconds of each."""

    def __init__(self, settings: Settings) -> None:
        super().__init__(daemon=True)
        self.settings = settings
        self.seen: list[tuple[float, float]] = []
        self.done = threading.Event()

    def run(self) -> None:
        topic = self.settings.topic("recommendations")
        codec = Codec(TOPIC_SCHEMAS["recommendations"])
        consumer = committed_reader(self.settings, f"follow-{uuid.uuid4().hex[:8]}")
        consumer.subscribe([topic])
        try:
            while not self.done.is_set():
                msg = consumer.poll(0.2)
                if msg is not None and msg.error() is None:
                    codec.decode(msg.value() or b"")
                    self.seen.append((time.time(), msg.timestamp()[1] / 1000.0))
        finally:
            consumer.close()


def _ready(
    tmp: Path,
    procs: list[subprocess.Popen[bytes]],
    nodes: list[broker.BrokerConfig],
    timeout_s: float = 120,
) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        assert all(p.poll() is None for p in procs), _logs(tmp, nodes)
        router = (tmp / "router.log").read_text()
        assigned = [x for x in (tmp / "worker-0.log").read_text().splitlines() if "assigned [" in x]
        if "router ready" in router and assigned and "assigned []" not in assigned[-1]:
            return
        time.sleep(0.3)
    raise AssertionError(_logs(tmp, nodes))


def _missing(log: list[SequencedEvent], counts: Counter[str], recs: list[dict]) -> str:
    """Which events lack a recommendation, with what links them: an event whose user's or
    item's previous event is missing too suggests a chain stuck waiting for a pre-state, and
    isolated ones a lost transaction."""
    gone = [e for e in log if e.event.event_id not in counts]
    missing = {e.seq for e in gone}
    lines = [
        f"--- {len(gone)} events without a recommendation (of {len(log)}; the latest event "
        f"with one: seq {max((e.seq for e in log if e.event.event_id in counts), default=-1)}):"
    ]
    for e in gone[:40]:
        chained = [
            side
            for side, prev in (("user", e.prev_user_seq), ("item", e.prev_item_seq))
            if prev in missing
        ]
        lines.append(
            f"seq {e.seq} user {e.event.user_id} (prev {e.prev_user_seq}) item "
            f"{e.event.item_id} (prev {e.prev_item_seq}) t {e.event.timestamp}"
            + (f"; after a missing {' and '.join(chained)} event" if chained else "")
        )
    duplicated = [event for event, n in counts.items() if n > 1]
    lines.append(f"recommendations read: {len(recs)}, events recommended twice: {len(duplicated)}")
    return "\n".join(lines)


def _inbox_trace(settings: Settings, missing: list[SequencedEvent]) -> str:
    """Where the inbox messages of the first ``missing`` events are: each inbox read whole,
    once read_committed and once read_uncommitted, with each partition's end and where the
    committed reading stopped (its last stable offset). A message committed but never
    recommended points at the worker; one written but not committed, at a transaction the
    broker left open or aborted."""
    wanted = {e.seq for e in missing[:20]}
    if not wanted:
        return ""
    codec = Codec(INBOX_MESSAGE)
    lines = ["--- the inbox messages of those events (topic[partition]@offset):"]
    found: dict[tuple[str, str, int], list[str]] = {}
    for side in ("user-inbox", "item-inbox"):
        topic = settings.topic(side)
        for level in ("read_committed", "read_uncommitted"):
            consumer = committed_reader(
                settings, f"trace-{uuid.uuid4().hex[:8]}", **{"isolation.level": level}
            )
            try:
                meta = consumer.list_topics(topic, timeout=10).topics[topic]
                parts = sorted(meta.partitions)
                ends = {p: watermarks(consumer, TopicPartition(topic, p))[1] for p in parts}
                consumer.assign([TopicPartition(topic, p, 0) for p in parts])
                pending, stopped = set(parts), dict.fromkeys(parts, -1)
                deadline = time.monotonic() + 20
                while pending and time.monotonic() < deadline:
                    msg = consumer.poll(0.5)
                    if msg is None:
                        continue
                    p = msg.partition() or 0
                    err = msg.error()
                    if err is not None:
                        if err.code() == KafkaError._PARTITION_EOF:
                            pending.discard(p)
                            stopped[p] = msg.offset() or 0
                        continue
                    try:
                        event = codec.decode(msg.value() or b"")["event"]
                    except Exception:  # a sweep's record, or bytes this trace does not read
                        continue
                    if event is not None and int(event["seq"]) in wanted:
                        where = f"{topic}[{p}]@{msg.offset()}"
                        found.setdefault((side, level, int(event["seq"])), []).append(where)
                if level == "read_committed":
                    lines.append(
                        f"{side}: end / last stable offset by partition: "
                        + ", ".join(f"{p}: {ends[p]}/{stopped[p]}" for p in parts)
                        + (f"; not at its end: {sorted(pending)}" if pending else "")
                    )
            finally:
                consumer.close()
    for seq in sorted(wanted):
        cells = []
        for side in ("user-inbox", "item-inbox"):
            committed = found.get((side, "read_committed", seq))
            written = found.get((side, "read_uncommitted", seq))
            state = (
                "committed" if committed else ("written, not committed" if written else "absent")
            )
            cells.append(f"{side} {state} {committed or written or ''}")
        lines.append(f"seq {seq}: " + "; ".join(cells))
    return "\n".join(lines)


def _logs(tmp: Path, nodes: list[broker.BrokerConfig]) -> str:
    """What a failure needs from each process's log: its warnings and errors (the recovery's
    steps: a transaction aborted, a producer replaced, a store rebuilt), then its last 15
    other lines, apart from librdkafka's repeated connection failures and the periodic status
    lines, then its last status line; and each broker's warnings and errors (its logs are
    purged with it when the test ends)."""
    parts = []
    for name in ("router.log", "worker-0.log"):
        lines = (tmp / name).read_text(errors="replace").splitlines()
        status = [x for x in lines if "{" in x and "INFO jodie.worker" in x]
        told = [x[:300] for x in lines if "Connect to ipv4" not in x and x not in status]
        warned = [x for x in told if " INFO " not in x]
        rest = [x for x in told if " INFO " in x]
        parts.append("\n".join([f"--- {name}", *warned[-60:], *rest[-15:], *status[-1:]]))
    for node in nodes:
        parts.append(f"--- broker {node.port}\n{broker.exit_reason(node.logs_dir, lines=25)}")
        # The transaction coordinator's skipped markers (logged at INFO): which producer's
        # commit was completed without them, and on which partitions.
        log = node.logs_dir / "server.log"
        lines = log.read_text(errors="replace").splitlines() if log.exists() else []
        skipped = [x[:600] for x in lines if "likely deleted already" in x]
        if skipped:
            parts.append(f"--- broker {node.port}: markers skipped\n" + "\n".join(skipped[-10:]))
    return "\n".join(parts)


def kill_mid_stream(
    nodes: list[broker.BrokerConfig], checkpoint: Path, tmp: Path, pick: str, grace: float
) -> float:
    """Router (``--grace``) + 1 worker; ``EVENTS`` events at ``RATE``; the broker ``pick``ed
    killed half a second into the last three quarters of the stream (the first quarter has its
    recommendations by then), restarted a second later; returns the
    recovery time after checking every event has exactly one recommendation and the states
    equal the replay."""
    with scratch_topics("bf") as kafka:
        follower = Follower(kafka)
        follower.start()
        router = subprocess.Popen(
            [sys.executable, "-m", "streams", "router", "--grace", str(grace)],
            stdout=(tmp / "router.log").open("ab"),
            stderr=subprocess.STDOUT,
        )
        procs = [router, start_worker(kafka, checkpoint, 0, tmp)]
        try:
            _ready(tmp, procs, nodes)
            topic = kafka.topic("interactions")
            codec = make_codec(kafka, INTERACTION, topic)
            first = EVENTS // 4
            go = threading.Event()

            def feed() -> None:
                # The first quarter, then (once it has its recommendations) the rest, paced,
                # across the kill: on a machine slow enough for the pipeline to finish the
                # whole stream before a quarter was seen, the kill once came after it.
                producer, path = idempotent_producer(kafka), bundled_wikipedia()
                produce_file(path, producer, codec, topic, start=HISTORY, limit=first, rate=RATE)
                go.wait(timeout=300)
                after = HISTORY + first
                produce_file(
                    path, producer, codec, topic, start=after, limit=EVENTS - first, rate=RATE
                )

            feeder = threading.Thread(target=feed, daemon=True)
            feeder.start()
            deadline = time.monotonic() + 120
            while len(follower.seen) < first:
                assert time.monotonic() < deadline, _logs(tmp, nodes)
                time.sleep(0.1)
            go.set()
            time.sleep(0.5)  # the rest streaming: the kill lands with events in flight
            victim = nodes[0]
            if pick == "coordinator":
                victim = cluster.pick_victim(nodes, kafka, f"{kafka.topic_prefix}jodie-workers")
            killed_at = time.time()
            cluster.kill(victim)
            before = len(follower.seen)
            time.sleep(1.0)
            try:
                cluster.up(nodes)  # as `jodie broker up` does: returns once it answers
            except BrokerStartError as exc:
                raise AssertionError(f"{exc}\n{_logs(tmp, nodes)}") from exc
            answering = time.time()
            recs = wait_for(kafka, EVENTS, timeout_s=240)
            feeder.join(timeout=30)
            time.sleep(2.0)
            follower.done.set()
            follower.join(timeout=10)
            alive = [p.poll() is None for p in procs]
            assert all(broker.status(n).ready for n in nodes)
        finally:
            for proc in procs:
                stop(proc)
        assert before < EVENTS, "the kill landed after the stream"
        assert all(alive), _logs(tmp, nodes)  # nobody gave up
        # The router numbered each event once: a restart that restored its sequencer from
        # part of the log once gave seqs already taken to new events.
        log = read_log(kafka)
        assert [e.seq for e in log] == list(range(EVENTS)), _logs(tmp, nodes)
        counts = Counter(r["event_id"] for r in recs)
        assert len(recs) == EVENTS and len(counts) == EVENTS, (
            _missing(log, counts, recs)
            + "\n"
            + _inbox_trace(kafka, [e for e in log if e.event.event_id not in counts])
            + "\n"
            + _logs(tmp, nodes)
        )
        assert counts.most_common(1)[0][1] == 1
        replay = reference(checkpoint, range(HISTORY, HISTORY + EVENTS))
        assert_equal_to_reference(kafka, checkpoint, replay)
    new = [received for received, created in follower.seen if created > killed_at]
    assert new, _logs(tmp, nodes)
    recovery = min(new) - answering
    received = sorted(r for r, _c in follower.seen if r > killed_at)
    gap = max((b - a for a, b in itertools.pairwise([killed_at, *received])), default=0.0)
    print(
        f"\n{len(nodes)} node(s): recovery {recovery:.1f} s after the broker answered again "
        f"(negative: no wait); longest gap after the kill {gap:.1f} s"
    )
    return recovery


def test_the_single_broker_killed_and_restarted_mid_stream(
    checkpoint: Path, tmp_path: Path
) -> None:
    """The pipeline resumes by itself, within a bounded time, nothing lost or duplicated."""
    with local_kafka(SINGLE_PORT, 1, tmp_path) as nodes:
        recovery = kill_mid_stream(nodes, checkpoint, tmp_path, "the only one", grace=0.2)
    assert recovery < 90  # measured 10-25 s on two busy cores


def test_one_of_three_nodes_killed_and_restarted_mid_stream(
    checkpoint: Path, tmp_path: Path
) -> None:
    """The node that coordinates the workers' group is killed: leaderships, the group and the
    transactions it coordinated move to the other two, which keep a quorum and two in-sync
    replicas of everything; it then rejoins.

    The partitions it led take no writes until their new leaders are elected (the node is
    fenced after 3 s), while the others go on: a router whose grace is shorter than that
    takes them for idle and rejects their delayed events as time_backwards (measured: 3 of
    600 with 0.2 s). On a cluster the router's grace must outlast a failover."""
    with local_kafka(CLUSTER_PORT, 3, tmp_path) as nodes:
        for node in nodes:
            assert broker.status(node).ready
        recovery = kill_mid_stream(nodes, checkpoint, tmp_path, "coordinator", grace=8.0)
    assert recovery < 90


def _txn_partition(transactional_id: str, partitions: int = 8) -> int:
    """The transaction log partition whose leader coordinates ``transactional_id``: Java's
    String.hashCode, made non-negative as Kafka's ``Utils.abs`` does, modulo the partitions
    (transaction.state.log.num.partitions, 8 in deploy/kafka/cluster.properties)."""
    h = 0
    for ch in transactional_id:
        h = (31 * h + ord(ch)) & 0xFFFFFFFF
    signed = h - (1 << 32) if h >= 1 << 31 else h
    return 0 if signed == -(1 << 31) else abs(signed) % partitions


def _leader(client: AdminClient, topic: str, partition: int) -> int:
    meta = client.list_topics(topic, timeout=10).topics[topic]
    return meta.partitions[partition].leader if partition in meta.partitions else -1


def _committed_end(settings: Settings, tp: TopicPartition) -> tuple[int, int]:
    """(records a read_committed reader gets from the start, where it reaches the end)."""
    reader = committed_reader(settings, f"end-{uuid.uuid4().hex[:8]}")
    reader.assign([TopicPartition(tp.topic, tp.partition, 0)])
    got, deadline = 0, time.monotonic() + 30
    try:
        while time.monotonic() < deadline:
            msg = reader.poll(0.5)
            if msg is None:
                continue
            err = msg.error()
            if err is None:
                got += 1
            elif err.code() == KafkaError._PARTITION_EOF:
                return got, msg.offset() or 0
    finally:
        reader.close()
    raise AssertionError(f"{tp.topic}[{tp.partition}]: no end in 30 s")


def _log_end(settings: Settings, tp: TopicPartition) -> int:
    """The partition's log end (a read_committed reader is told its last stable offset)."""
    reader = committed_reader(
        settings, f"end-{uuid.uuid4().hex[:8]}", **{"isolation.level": "read_uncommitted"}
    )
    try:
        return watermarks(reader, tp)[1]
    finally:
        reader.close()


def test_records_of_a_commit_the_broker_left_without_markers_end_in_the_next_sweep(
    tmp_path: Path,
) -> None:
    """The broker behaviour the sweep exists for (streams.runtime.transactions), made at will
    on three nodes: a partition with its only replica on a node that is killed has no leader,
    and a commit decided then completes without writing that partition's marker (the
    coordinator takes a leaderless partition for a deleted one). The commit returns success,
    yet when the node is back its records are open for good: every read_committed reader
    stops before them. (A single node restarted before its old incarnation is fenced goes
    through the same leaderless moment, which lost a batch of recommendations.) A new
    producer of the same transactional id, sweeping the partition, ends them aborted."""
    with local_kafka(CLUSTER_PORT, 3, tmp_path) as nodes:
        settings = Settings()
        client = admin(settings)
        txn_id = f"sweep-{uuid.uuid4().hex[:8]}"
        coordinator = _leader(client, "__transaction_state", _txn_partition(txn_id))
        victim = next(
            n for n in nodes if isinstance(n, cluster.NodeConfig) and n.node_id != coordinator
        )
        assert isinstance(victim, cluster.NodeConfig)
        topic = f"hang-{uuid.uuid4().hex[:8]}"
        new = NewTopic(
            topic,
            num_partitions=1,
            replica_assignment=[[victim.node_id]],
            config={"min.insync.replicas": "1"},
        )
        client.create_topics([new], operation_timeout=30)[topic].result()
        tp = TopicPartition(topic, 0)

        producer = transactional_producer(settings, txn_id)
        producer.init_transactions(30)
        producer.begin_transaction()
        for n in range(3):
            producer.produce(topic, key=b"k", value=str(n).encode(), partition=0)
        assert producer.flush(30) == 0
        cluster.kill(victim)
        deadline = time.monotonic() + 60
        while _leader(client, topic, 0) != -1:
            assert time.monotonic() < deadline, "the partition kept a leader"
            time.sleep(0.2)
        producer.commit_transaction(30)  # returns: the coordinator skipped the marker
        cluster.up(nodes)
        while _leader(client, topic, 0) != victim.node_id:
            assert time.monotonic() < deadline + 60, "the partition got no leader back"
            time.sleep(0.2)
        assert _committed_end(settings, tp) == (0, 0)  # three records, open for good
        assert _log_end(settings, tp) == 3

        tx = Transactions(
            lambda: transactional_producer(settings, txn_id),
            "sweeper",
            logging.getLogger("jodie.test"),
            sweep=Sweep([tp]),
        )
        tx.start()
        assert tx.swept == 1
        # The abort returns once decided; its marker follows (the sweep's record and it: 5).
        while _log_end(settings, tp) < 5:
            assert time.monotonic() < deadline + 120, "no abort marker"
            time.sleep(0.2)
        assert _committed_end(settings, tp) == (0, 5)  # aborted: the end moved past them
