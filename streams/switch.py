"""Switching model versions in a running pipeline: epochs, the serving record, catching up.

An *epoch* is a model version serving from a log position on: ``(version, since)``. The
router stamps every event with the epoch that serves it (interactions.log and both inbox
messages carry ``model_version`` and ``model_since``), so every worker handles an event with
the same weights, whoever owns which side, and a restarted worker or a new owner of a
partition cannot disagree. ``("", -1)`` is the unstamped stream of a router run without a
model name: workers given a checkpoint serve it.

A version starts serving at S with its states at S: its checkpoint's states at O, replayed
over the log's events in [O, S) with its weights (``operators.protocol.catchup``). A worker prepares
this in the background as soon as it sees the promotion on the ``models`` topic, while the
events before S are still served by the previous epoch; the router starts the new epoch
``JODIE_SWITCH_DELAY_S`` after it saw the promotion, leaving the workers that time to be
ready. Table rows are keyed by epoch, so states computed by different weights never meet.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from confluent_kafka import KafkaError, TopicPartition

from operators.model.checkpoint import Checkpoint, load_checkpoint
from operators.model.exceptions import CheckpointError
from operators.protocol.catchup import CatchUp, LogEvent
from schemas import MODEL_ANNOUNCEMENT, SEQUENCED_INTERACTION
from streams.app.epochs import UNSTAMPED, Epoch, epoch_of
from streams.codecs import make_codec
from streams.models import Registry, verified
from streams.runtime.clients import committed_reader
from streams.runtime.kafka import take, watermarks
from streams.settings import Settings

_log = logging.getLogger("jodie.switch")

#: Events of the log's backlog read before they are applied (bounds the catch-up's memory).
BACKLOG_RUN = 100_000


class ServingWatch:
    """Follows the serving record of one model on the compacted ``models`` topic."""

    def __init__(self, settings: Settings, name: str) -> None:
        self.name = name
        self.topic = settings.topic("models")
        self.codec = make_codec(settings, MODEL_ANNOUNCEMENT, self.topic)
        self.consumer = committed_reader(
            settings, group_id=f"jodie-watch-{uuid.uuid4().hex[:8]}", **{"fetch.wait.max.ms": 50}
        )
        meta = self.consumer.list_topics(self.topic, timeout=30).topics[self.topic]
        self.consumer.assign([TopicPartition(self.topic, p, 0) for p in meta.partitions])
        self.current: dict[str, Any] | None = None

    def poll(self, timeout_s: float = 0.0) -> dict[str, Any] | None:
        """The serving record if it changed since the last call (None otherwise)."""
        changed = None
        for msg in take(self.consumer, 1000, timeout_s):
            value = msg.value()
            if msg.error() is not None or value is None:
                continue
            if (msg.key() or b"").decode() != self.name:
                continue
            record = self.codec.decode(value)
            if record["name"] != self.name:
                # Another model's record under this key: its signature would hold, but it
                # is not a version of this model.
                _log.warning("%s: ignoring a serving record of %r", self.name, record["name"])
                continue
            if self.current is None or record["version"] != self.current["version"]:
                changed = record
            self.current = record
        return changed

    def settle(self, timeout_s: float = 10.0) -> dict[str, Any] | None:
        """Read what the topic holds now; the serving record (None if none was promoted)."""
        ends = {
            p: watermarks(self.consumer, TopicPartition(self.topic, p))[1]
            for p in (tp.partition for tp in self.consumer.assignment())
        }
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            self.poll(0.2)
            positions = self.consumer.position(self.consumer.assignment())
            if all(tp.offset >= ends[tp.partition] or ends[tp.partition] == 0 for tp in positions):
                break
        return self.current

    def close(self) -> None:
        self.consumer.close()


@dataclass
class Preparation:
    """A version's states being brought to its epoch's start, in a thread of its own."""

    settings: Settings
    announcement: dict[str, Any]
    target: int | None = None  # the epoch's first seq, when known
    stop: threading.Event = field(default_factory=threading.Event)
    done: threading.Event = field(default_factory=threading.Event)
    since: int | None = None  # the epoch it reached
    result: Checkpoint | None = None
    error: BaseException | None = None
    began: float = field(default_factory=time.time)
    finished: float | None = None
    replayed: int = 0

    @property
    def version(self) -> str:
        return str(self.announcement["version"])

    def start(self) -> Preparation:
        threading.Thread(target=self._run, name=f"catch-up-{self.version}", daemon=True).start()
        return self

    def _run(self) -> None:
        try:
            self.result, self.since, self.replayed = catch_up(
                self.settings, self.announcement, self.target, self.stop
            )
        except BaseException as exc:  # reported to whoever waits for it
            self.error = exc
        finally:
            self.finished = time.time()
            self.done.set()

    def wait(self) -> Checkpoint:
        self.done.wait()
        if self.error is not None:
            raise self.error
        assert self.result is not None
        return self.result


def catch_up(
    settings: Settings,
    announcement: dict[str, Any],
    target: int | None = None,
    stop: threading.Event | None = None,
    idle_timeout_s: float | None = None,
) -> tuple[Checkpoint, int, int]:
    """An announced version's checkpoint advanced to the start of its epoch.

    With ``target`` (the epoch's first seq, known from a stamped event) the log is replayed
    up to it. Without, the epoch is the version's next one: the epoch in force at the end of
    the log if it is already this version's, else the first epoch of this version that
    starts after it — the log is followed until the router starts it. Returns (checkpoint at
    the epoch start, its seq, events replayed).
    """
    version = str(announcement["version"])
    ckpt = load_checkpoint(verified(announcement, settings))  # refused unless trusted
    cu = CatchUp(ckpt)
    if target is not None and target < cu.start:
        raise CheckpointError(
            f"{version}: its states are at log position {cu.start}, after the start of its "
            f"epoch at {target}; it cannot serve from there"
        )
    topic = settings.topic("interactions.log")
    codec = make_codec(settings, SEQUENCED_INTERACTION, topic)
    # The epoch's first event is what ends the catch-up while the stream waits for it: fetch
    # it as soon as it is committed rather than after the default 500 ms fetch wait.
    consumer = committed_reader(
        settings, group_id=f"jodie-catchup-{uuid.uuid4().hex[:8]}", **{"fetch.wait.max.ms": 10}
    )
    try:
        meta = consumer.list_topics(topic, timeout=30).topics[topic]
        ends = {p: watermarks(consumer, TopicPartition(topic, p))[1] for p in meta.partitions}
        # The events at or after O start at the offsets the training replay recorded; a
        # checkpoint without them (trained from a file) reads the log from its start.
        starts = {int(r["partition"]): int(r["offset"]) for r in announcement["log_offsets"]}
        first = {p: min(starts.get(p, 0), ends[p]) for p in meta.partitions}
        consumer.assign([TopicPartition(topic, p, first[p]) for p in meta.partitions])
        behind = {p for p, end in ends.items() if end > first[p]}  # short of `ends`
        last: tuple[int, Epoch] = (-1, UNSTAMPED)  # the latest event in the log at the start
        epoch_starts: list[int] = []  # first seqs of this version's epochs, as read
        quiet_since = time.monotonic()
        while True:
            if stop is not None and stop.is_set():
                raise CheckpointError(f"{version}: catching up was stopped")
            for msg in take(consumer, 10_000, 0.2):
                err = msg.error()
                p = msg.partition() or 0
                if err is not None:
                    if err.code() == KafkaError._PARTITION_EOF:
                        behind.discard(p)
                        continue
                    raise CheckpointError(f"reading {topic}: {err}")
                if (msg.offset() or 0) >= ends[p] - 1:
                    behind.discard(p)
                value = msg.value()
                if value is None:
                    continue
                record = codec.decode(value)
                seq, epoch = int(record["seq"]), epoch_of(record)
                if (msg.offset() or 0) < ends[p] and seq > last[0]:
                    last = (seq, epoch)
                if epoch == (version, seq):
                    epoch_starts.append(seq)
                e = record["interaction"]
                cu.offer(
                    LogEvent(seq, e["user_id"], e["item_id"], e["timestamp"], tuple(e["features"]))
                )
                quiet_since = time.monotonic()
            if idle_timeout_s is not None and time.monotonic() - quiet_since > idle_timeout_s:
                raise CheckpointError(
                    f"{version}: the log stopped at seq {cu.next_seq} before its epoch started"
                )
            if behind and cu.queued < BACKLOG_RUN:
                # Still reading the backlog: apply it in long runs (t-batches) rather than in
                # the pieces each fetch brings (which go one event at a time, ~5x slower).
                continue
            goal = target
            if goal is None and not behind:
                # The whole log as it was at the start has been read: which epoch is next.
                if last[1][0] == version:
                    goal = last[1][1]
                else:
                    goal = min((s for s in epoch_starts if s > last[1][1]), default=None)
                if goal is not None and goal < cu.start:
                    raise CheckpointError(
                        f"{version}: its states are at log position {cu.start}, after the "
                        f"start of its epoch at {goal}; it cannot serve from there"
                    )
            # Never step over a possible start of this version's epoch before knowing the goal
            # (once the log at the start is read, only one after its latest epoch can be it).
            limit = goal
            if limit is None:
                floor = last[1][1] if not behind else -1
                limit = min(
                    (s for s in epoch_starts if s >= cu.next_seq and s > floor), default=1 << 62
                )
            if cu.advance(limit) == goal:
                return cu.checkpoint(), goal, cu.applied
    finally:
        consumer.close()


def latest_epoch(settings: Settings) -> Epoch:
    """The epoch of the last event in interactions.log (UNSTAMPED for an empty log); a log
    that stops arriving short of its end is a ``ReadError``, not a guess from part of it."""
    from streams.peek import read_all

    topic = settings.topic("interactions.log")
    codec = make_codec(settings, SEQUENCED_INTERACTION, topic)
    last: tuple[int, Epoch] = (-1, UNSTAMPED)
    for _k, value, _p, _o in read_all(settings, topic, complete=True):
        record = codec.decode(value)
        if int(record["seq"]) > last[0]:
            last = (int(record["seq"]), epoch_of(record))
    return last[1]


def epoch_checkpoint(settings: Settings, name: str, epoch: Epoch) -> Checkpoint:
    """The states a stamped epoch started from (what its workers serve untouched entities)."""
    announcement = Registry(settings, name).show(epoch[0])
    ckpt, _since, _n = catch_up(settings, announcement, epoch[1], idle_timeout_s=30.0)
    return ckpt
