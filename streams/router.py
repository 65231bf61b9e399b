"""The router: client events → validated, deduplicated, canonical order in interactions.log.

One router per pipeline reads every partition of `interactions`, decodes and validates each
event, merges the partitions into the canonical order (operators.protocol.sequencer) and writes:

- `interactions.log`: the sequenced event (Avro SequencedInteraction), keyed by event id;
- `interactions.dlq`: the original key and bytes of every rejected event, the reason in headers
  (a re-sent event id included, as ``duplicate``: every message read is either in the log or
  in the DLQ);
- `interactions.positions`: per `interactions` partition, the next offset to read, in the same
  transaction as what those offsets produced.

Bad input is data: the bounds an event must keep come from the settings (``limits_of``), and
with ``--model`` the feature count is the served version's, read from its checkpoint (digest
checked, as workers do) rather than fixed by whichever event comes first.

Exactly once: each batch of output and the input offsets it consumed are committed in one
Kafka transaction (the offsets as records of `interactions.positions`, not as the consumer
group's offsets: see ``read_positions``), and the sequencer's state is rebuilt from
interactions.log on start
(streamed, one fetch at a time: the router never holds the log), so a
router killed at any moment and restarted writes every event once (as read_committed
consumers see it) with the same sequence numbers. A second router with the same
transactional id fences the first: there is one active router per pipeline by construction.

A broker failure does not stop it: transactional calls that may be repeated are, with
backoff (a coordinator still loading its log after a restart answers "load in progress" for
seconds); a transaction that cannot commit makes the router start over in-process exactly as
a restarted one would — new clients, whose ``init_transactions`` settles the old transaction,
the sequencer rebuilt from the log, the committed input positions — for as long as
``JODIE_RECOVERY_TIMEOUT_S`` passes with a commit. Starting over, it also sends the inbox
messages of the log's latest events again (``Router._resend``): the log writes each event
once, the inboxes at least once, and the workers ignore what they already had.
"""

from __future__ import annotations

import gc
import heapq
import itertools
import logging
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from confluent_kafka import (
    OFFSET_BEGINNING,
    Consumer,
    KafkaError,
    KafkaException,
    Producer,
    TopicPartition,
)

from operators.model.exceptions import CheckpointError
from operators.protocol.sequencer import (
    DrainResult,
    Interaction,
    Last,
    Rejected,
    SequencedEvent,
    Sequencer,
)
from operators.protocol.sides import EventData, pack_features
from schemas import INTERACTION, SEQUENCED_INTERACTION, DecodeError, SchemaError, wire
from schemas.codec import INBOX_MESSAGE, Codec
from streams.app.epochs import UNSTAMPED, Epoch, epoch_of
from streams.bounds import limits_of, model_features
from streams.codecs import make_codec
from streams.exceptions import ReadError, RegistryError
from streams.peek import read_all
from streams.records import inbox_event
from streams.runtime.clients import committed_reader, transactional_producer
from streams.runtime.exceptions import TransactionError
from streams.runtime.kafka import retry_transient, take, watermarks
from streams.runtime.spill import SpillMap
from streams.runtime.transactions import Sweep, Transactions
from streams.settings import Settings
from streams.switch import ServingWatch
from streams.topics import app_id, router_group

_log = logging.getLogger("jodie.router")

# The router's producer refuses a record over its message.max.bytes (librdkafka: 1,000,000
# bytes by default, key and headers included), and the broker takes up to its own limit
# (1,048,588 by default) from other clients: a whole copy of such a message could not be
# sent to the DLQ, and the router would stop at it again at every restart.
DLQ_COPY_BYTES = 900_000
DLQ_KEY_BYTES = 1_000  # of a cut copy's key: keys are ids, and ids are short when valid
# A decoding error may quote the whole offending field (a megabyte of invalid UTF-8).
DLQ_DETAIL_CHARS = 1_000


def dlq_copy(
    key: bytes | None, value: bytes
) -> tuple[bytes | None, bytes, list[tuple[str, bytes]]]:
    """What the DLQ keeps of a rejected message: its key and value, cut to DLQ_COPY_BYTES in
    all with a ``truncated`` header of their original sizes when they are larger (the
    ``source`` header still says where the whole message is).

    >>> dlq_copy(b"k", b"v")
    (b'k', b'v', [])
    >>> k, v, h = dlq_copy(b"k" * 2_000, b"v" * 1_000_000)
    >>> len(k), len(k) + len(v), h
    (1000, 900000, [('truncated', b'key 2000 value 1000000')])
    """
    key_size, value_size = len(key or b""), len(value)
    if key_size + value_size <= DLQ_COPY_BYTES:
        return key, value, []
    cut_key = key[:DLQ_KEY_BYTES] if key is not None else None
    cut_value = value[: DLQ_COPY_BYTES - len(cut_key or b"")]
    return cut_key, cut_value, [("truncated", f"key {key_size} value {value_size}".encode())]


@dataclass
class RouterStats:
    sequenced: int = 0
    rejected: int = 0
    rejected_by_reason: dict[str, int] = field(default_factory=dict)
    duplicates: int = 0  # of the rejected, those re-sending an event id already sequenced
    transactions: int = 0
    restarts: int = 0  # times it started over in-process after a broker failure
    resent: int = 0  # events whose inbox messages it sent again after starting over
    switches: list[dict[str, Any]] = field(default_factory=list)
    refused: list[str] = field(default_factory=list)  # promoted versions that could not start
    # When the first and the latest transaction committed (time.monotonic), and the events
    # the first one carried: what a throughput measurement needs.
    first_commit_at: float | None = None
    last_commit_at: float | None = None
    first_batch: int = 0


def to_log_record(e: SequencedEvent) -> dict[str, Any]:
    ev = e.event
    return {
        "seq": e.seq,
        "prev_user_seq": e.prev_user_seq,
        "prev_item_seq": e.prev_item_seq,
        "prev_user_time": e.prev_user_time,
        "prev_item_time": e.prev_item_time,
        "interaction": {
            "event_id": ev.event_id,
            "user_id": ev.user_id,
            "item_id": ev.item_id,
            "timestamp": ev.timestamp,
            "features": list(ev.features),
            "state_label": ev.state_label,
        },
    }


def event_data_of(ev: Interaction) -> EventData:
    return EventData(ev.event_id, ev.user_id, ev.item_id, ev.timestamp, pack_features(ev.features))


def from_log_record(record: dict[str, Any]) -> SequencedEvent:
    return SequencedEvent(
        seq=int(record["seq"]),
        prev_user_seq=int(record["prev_user_seq"]),
        prev_item_seq=int(record["prev_item_seq"]),
        prev_user_time=record["prev_user_time"],
        prev_item_time=record["prev_item_time"],
        event=Interaction.from_record(record["interaction"]),
    )


def read_log(settings: Settings, codec: Codec | None = None) -> list[SequencedEvent]:
    """Every committed event of interactions.log, in canonical (sequence) order (all in
    memory: for tests and tools; the router restores by streaming, ``restore_sequencer``)."""
    return _read_log(settings, codec)[0]


def restore_sequencer(
    settings: Settings,
    sequencer: Sequencer,
    codec: Codec | None = None,
    idle_timeout_s: float = 5.0,
    tail: list[tuple[SequencedEvent, Epoch]] | None = None,
    keep: int = 0,
) -> tuple[int, Epoch]:
    """Rebuild ``sequencer``'s state from interactions.log, one record at a time; returns the
    events read and the epoch the last one was stamped with. With ``tail``, it gets the
    ``keep`` events of the highest seqs with their epochs, in seq order.

    All of the log or ``ReadError``: a log that stops arriving for ``idle_timeout_s`` short
    of its end (a broker that just restarted answers fetches late) must not pass for the
    whole of it. A sequencer restored from part of the log would give seqs already taken to
    new events and start chains anew for entities it missed, whose later events then wait
    for a predecessor that never comes. The router starts over on the error.

    Memory besides the sequencer's own state (its per-entity maps and its window of recent
    ids) is one fetch of records: the log is never held whole, whatever its length.
    """
    topic = settings.topic("interactions.log")
    codec = codec or make_codec(settings, SEQUENCED_INTERACTION, topic)
    last: tuple[int, Epoch] = (-1, UNSTAMPED)
    count = 0

    highest: list[tuple[int, SequencedEvent, Epoch]] = []  # a heap of the ``keep`` latest

    def events() -> Iterator[SequencedEvent]:
        nonlocal last, count
        for _k, value, _p, _o in read_all(
            settings, topic, idle_timeout_s=idle_timeout_s, complete=True
        ):
            record = codec.decode(value)
            event = from_log_record(record)
            count += 1
            if event.seq > last[0]:
                last = (event.seq, epoch_of(record))
            if keep > 0:
                entry = (event.seq, event, epoch_of(record))
                if len(highest) < keep:
                    heapq.heappush(highest, entry)
                elif event.seq > highest[0][0]:
                    heapq.heapreplace(highest, entry)
            yield event

    sequencer.restore(events())
    if tail is not None:
        tail.extend((event, epoch) for _seq, event, epoch in sorted(highest, key=lambda x: x[0]))
    return count, last[1]


def read_positions(settings: Settings) -> dict[int, int]:
    """The router's committed position in each partition of `interactions` (the next offset
    to read), from `interactions.positions`; partitions it never committed are absent.

    The positions travel as records in the router's transactions rather than as the consumer
    group's offsets (``send_offsets_to_transaction``): after a broker restart librdkafka's
    ``send_offsets_to_transaction`` could block past its timeout on a group coordinator that
    had gone (issues #5456 and #5511), and the producer abandoned with it could later leave
    its transactional offset commit pending for good, so that the group's stable offsets
    could no longer be read (the router stopped after the recovery timeout). A record
    in the transaction is written as every other output is; reading it back needs only the
    partition's committed records. The group's offsets are still committed, outside the
    transactions, for monitoring (lag); the router never reads them back but for a
    pipeline that has no positions yet (one upgraded from before this topic).

    All of it or ``ReadError``, as for the log: a position read from part of the topic could
    be an older one, and the events after it would be routed again.
    """
    positions: dict[int, int] = {}
    topic = settings.topic("interactions.positions")
    for key, value, _p, _o in read_all(settings, topic, complete=True):
        if key is not None:
            positions[int(key)] = int(value)
    return positions


def _read_log(settings: Settings, codec: Codec | None = None) -> tuple[list[SequencedEvent], Epoch]:
    """The log's events in sequence order and the epoch its last event was stamped with."""
    topic = settings.topic("interactions.log")
    codec = codec or make_codec(settings, SEQUENCED_INTERACTION, topic)
    events, last = [], (-1, UNSTAMPED)
    # All of it or an error: a sequencer restored from part of the log would number anew
    # events that already have seqs.
    for _k, value, _p, _o in read_all(settings, topic, complete=True):
        record = codec.decode(value)
        events.append(from_log_record(record))
        if events[-1].seq > last[0]:
            last = (events[-1].seq, epoch_of(record))
    events.sort(key=lambda e: e.seq)
    return events, last[1]


class Router:
    """The router process; ``run`` loops until stopped or idle for ``until_idle_s``."""

    def __init__(
        self,
        settings: Settings,
        n_features: int | None = None,
        grace_s: float = 0.5,
        batch: int = 2000,
        model: str | None = None,
    ) -> None:
        """``model``: the registry name whose promoted version serves; every event is stamped
        with its epoch (streams.switch). None: events go unstamped."""
        self.settings = settings
        self.model = model
        self.epoch: Epoch = UNSTAMPED
        # A promotion not yet in force: (its record, when its epoch may start).
        self._pending: tuple[dict[str, Any], float] | None = None
        self._watch: ServingWatch | None = None
        self.grace_s = grace_s
        self.batch = batch
        self.source = settings.topic("interactions")
        self.log_topic = settings.topic("interactions.log")
        self.dlq_topic = settings.topic("interactions.dlq")
        self.positions_topic = settings.topic("interactions.positions")
        # The positions last written to interactions.positions: each transaction writes only
        # the partitions that moved.
        self._written: dict[int, int] = {}
        # The group's offsets (for monitoring only): the last committed, when, and the
        # positions not yet reported.
        self._reported_at = 0.0
        self._unreported: dict[int, int] | None = None
        self.user_inbox = settings.topic("user-inbox")
        self.item_inbox = settings.topic("item-inbox")
        self.inbox_codec = Codec(INBOX_MESSAGE)
        self.in_codec = make_codec(settings, INTERACTION, self.source)
        self.out_codec = make_codec(settings, SEQUENCED_INTERACTION, self.log_topic)
        # The records read and written without fastavro (schemas.wire), unless the schemas
        # are no longer the ones that module was written for.
        self._in_header = self.in_codec.header
        self._wire: tuple[wire.SequencedWriter, wire.InboxWriter] | None = None
        if wire.same_as_codecs(self.in_codec, self.out_codec, self.inbox_codec):
            self._wire = (
                wire.SequencedWriter(self.out_codec.header),
                wire.InboxWriter(self.inbox_codec.header),
            )
        else:
            _log.warning("router: schemas differ from schemas.wire's; encoding with fastavro")
        self.n_features = n_features
        self.limits = limits_of(settings)
        self._sequencer: Sequencer | None = None
        # Feature count of each promoted version seen, None where its checkpoint was refused.
        self._features: dict[str, int | None] = {}
        self.stats = RouterStats()
        # Set when starting over after a failure: the inbox messages of the log's latest
        # events go out again (``_resend``).
        self._resend_tail = False
        self._behind_since: dict[int, float] = {}
        self._maps: list[SpillMap[Last]] = []

    def _clients(self) -> tuple[Consumer, Transactions]:
        prefix = self.settings.topic_prefix
        consumer = committed_reader(
            self.settings,
            group_id=router_group(self.settings),
            logger=_log,
            **{"client.id": f"jodie-router-{uuid.uuid4().hex[:6]}"},
        )

        def producer() -> Producer:
            return transactional_producer(
                self.settings,
                f"{prefix}jodie-router",
                logger=_log,
                # A backlog drains in batches of tens of thousands of events, three messages
                # each: room for them (librdkafka's default is 100,000 messages).
                **{"linger.ms": 5, "queue.buffering.max.messages": 1_000_000},
            )

        # Every partition the router writes, swept by each new producer before its first
        # transaction (streams.runtime.transactions: records the broker left open).
        written = [
            TopicPartition(topic, p)
            for topic in (
                self.log_topic,
                self.user_inbox,
                self.item_inbox,
                self.positions_topic,
                self.dlq_topic,
            )
            for p in range(len(consumer.list_topics(topic, timeout=30).topics[topic].partitions))
        ]
        return consumer, Transactions(
            producer, "router", _log, self.settings.recovery_timeout_s, sweep=Sweep(written)
        )

    def run(
        self,
        until_idle_s: float | None = None,
        max_seconds: float | None = None,
        on_ready: Callable[[], None] | None = None,
    ) -> RouterStats:
        began = time.monotonic()
        failing_since: float | None = None
        backoff = 0.5
        while True:
            committed = self.stats.transactions
            spent = time.monotonic() - began
            left = None if max_seconds is None else max(0.0, max_seconds - spent)
            try:
                self._run_once(until_idle_s, left, on_ready)
                return self.stats
            except (KafkaException, ReadError) as exc:
                # A broker failed under a transaction (or a call outlived its retries): start
                # over as a restarted router would. Stop only once starting over has kept
                # failing, without a single commit, for the recovery timeout.
                now = time.monotonic()
                if failing_since is None or self.stats.transactions != committed:
                    failing_since, backoff = now, 0.5
                elif now - failing_since > self.settings.recovery_timeout_s:
                    raise TransactionError(f"router: no commit since the failure: {exc}") from exc
                _log.warning("router: %s; starting over from interactions.log", exc)
                self.stats.restarts += 1
                self._resend_tail = True
                on_ready = None
                time.sleep(backoff)
                backoff = min(2 * backoff, 5.0)

    def _run_once(
        self,
        until_idle_s: float | None,
        max_seconds: float | None,
        on_ready: Callable[[], None] | None,
    ) -> None:
        consumer, tx = self._clients()
        # Fences any older router with the same transactional id and aborts its open
        # transaction, so what it wrote but did not commit is never seen.
        tx.start()
        # End offsets are asked on a connection of their own: on the main consumer's they
        # queue behind a fetch waiting for data (measured ~430 ms each).
        self._probe = committed_reader(
            self.settings, group_id=f"jodie-router-probe-{uuid.uuid4().hex[:8]}"
        )
        self._pending = None
        self._behind_since = {}
        try:
            self._loop(consumer, tx, until_idle_s, max_seconds, on_ready)
        finally:
            consumer.close()
            self._probe.close()
            for spill in self._maps:
                spill.close()
            self._maps = []
            if self._watch is not None:
                self._watch.close()
                self._watch = None

    def _loop(
        self,
        consumer: Consumer,
        tx: Transactions,
        until_idle_s: float | None,
        max_seconds: float | None,
        on_ready: Callable[[], None] | None,
    ) -> None:
        metadata = consumer.list_topics(self.source, timeout=30).topics[self.source]
        partitions = sorted(metadata.partitions)
        # The wall clock bounds only the first event of an empty log (sequencer: watermark).
        # Each user's and item's latest event, the hot ones in memory and the others in a
        # scratch RocksDB rebuilt with the rest of the state from the log at every start: the
        # router's memory does not grow with the number of entities it has seen.
        root = self.settings.state_dir / app_id(self.settings) / "router"
        cap = self.settings.router_entities
        self._maps = [SpillMap[Last](root, "<qdq", cap) for _ in ("users", "items")]
        sequencer = Sequencer(
            partitions,
            self.n_features,
            self.limits,
            clock=time.time,
            dedup_window=self.settings.dedup_window,
            last_user=self._maps[0],
            last_item=self._maps[1],
        )
        self._sequencer = sequencer
        tail: list[tuple[SequencedEvent, Epoch]] = []
        keep = 2 * self.batch if self._resend_tail else 0
        logged, self.epoch = restore_sequencer(
            self.settings, sequencer, self.out_codec, tail=tail, keep=keep
        )
        if tail:
            self._resend(tx, tail)
        self._resend_tail = False
        # What exists now (the modules, torch among them, and the restored state) lives as
        # long as the process: out of the cyclic collector's scans, whose full passes over
        # it otherwise cost about a quarter of the router's time while a backlog is buffered.
        gc.freeze()
        if self.model is not None:
            self._watch = ServingWatch(self.settings, self.model)
            serving = self._watch.settle()
            if serving is not None:
                # Its length applies from now: it serves at once on a fresh log, and within
                # the switch delay otherwise (events waiting for it are checked against it).
                self._enforce_features(serving)
                # A fresh log starts in the promoted version at once; otherwise the workers
                # get the switch delay to prepare, as for any promotion.
                self._promoted(serving, at_once=logged == 0)
        positions = read_positions(self.settings)
        self._written = dict(positions)
        if not positions:
            # No position written yet: a new pipeline (the group has none either), or one
            # whose router committed its offsets to the group before interactions.positions.
            committed = retry_transient(
                lambda: consumer.committed(
                    [TopicPartition(self.source, p) for p in partitions], timeout=30
                )
            )
            positions = {tp.partition: tp.offset for tp in committed if tp.offset >= 0}
            positions = self._within_ends(consumer, positions)
        next_offsets: dict[int, int] = {}
        assignment = []
        for p in partitions:
            start = positions.get(p, OFFSET_BEGINNING)
            next_offsets[p] = positions.get(p, 0)
            assignment.append(TopicPartition(self.source, p, start))
        consumer.assign(assignment)
        if on_ready is not None:
            on_ready()
        began = last_progress = time.monotonic()
        last_message = dict.fromkeys(partitions, began)
        at_end = dict.fromkeys(partitions, False)
        # Key and bytes of every message not yet handled, for the DLQ's copy of the original.
        raw: dict[tuple[int, int], tuple[bytes | None, bytes]] = {}
        # Sequenced (and rejected) events not yet committed: held while the commit interval
        # since the last transaction runs (see ``_due_in``).
        held = DrainResult()
        while True:
            now = time.monotonic()
            if max_seconds is not None and now - began > max_seconds:
                return
            # Events held for the commit interval wait at most until it ends.
            wait = 0.1 if held.empty else max(0.0, self._due_in(now))
            messages = take(consumer, self.batch, wait)
            if self._watch is not None:
                changed = self._watch.poll()
                if changed is not None:
                    self._promoted(changed)
            now = time.monotonic()
            for msg in messages:
                err = msg.error()
                p = msg.partition() or 0
                if err is not None:
                    if err.code() == KafkaError._PARTITION_EOF:
                        at_end[p] = True
                        continue
                    if err.fatal():
                        raise RuntimeError(f"router consumer: {err}")
                    # The broker is away or a partition moves: librdkafka reconnects itself.
                    _log.warning("router: consumer: %s", err)
                    continue
                at_end[p] = False
                last_message[p] = now
                self._behind_since.pop(p, None)
                offset = msg.offset() or 0
                next_offsets[p] = offset + 1
                value = msg.value() or b""
                raw[(p, offset)] = (msg.key(), value)
                self._offer(sequencer, p, offset, value)
            idle = {p for p in partitions if at_end[p] and now - last_message[p] >= self.grace_s}
            if idle and sequencer.buffered():
                idle = {p for p in idle if self._drained(p, next_offsets[p], now)}
            drained = sequencer.drain(idle)
            held.sequenced += drained.sequenced
            held.rejected += drained.rejected
            offsets = sequencer.committable(next_offsets)
            if not held.empty and (self._due_in(now) <= 0.0 or len(held.sequenced) >= self.batch):
                result, held = held, DrainResult()
                self._commit(tx, consumer, result.sequenced, result.rejected, offsets, raw)
                for key in [k for k in raw if k[1] < offsets.get(k[0], 0)]:
                    del raw[key]
                self.stats.sequenced += len(result.sequenced)
                self.stats.rejected += len(result.rejected)
                if result.rejected:
                    reasons = Counter(r.reason for r in result.rejected)
                    for reason, n in reasons.items():
                        by_reason = self.stats.rejected_by_reason
                        by_reason[reason] = by_reason.get(reason, 0) + n
                    _log.warning(
                        "router: %d rejected to %s (%s); %s in all",
                        len(result.rejected),
                        self.dlq_topic,
                        ", ".join(f"{r} {n}" for r, n in sorted(reasons.items())),
                        self.stats.rejected,
                    )
                self.stats.duplicates += result.duplicates
                last_progress = now
            elif messages or not drained.empty:
                last_progress = now
            self._report(consumer)
            if (
                until_idle_s is not None
                and sequencer.buffered() == 0
                and held.empty
                and all(at_end.values())
                and now - last_progress > until_idle_s
            ):
                return

    def _promoted(self, record: dict[str, Any], at_once: bool = False) -> None:
        """A version was promoted: its epoch starts after the switch delay (or never, if
        another promotion comes first)."""
        if record["version"] == self.epoch[0]:
            self._pending = None  # promoted back before the switch: nothing changes
            return
        delay = 0.0 if at_once else self.settings.switch_delay_s
        self._pending = (record, time.monotonic() + delay)
        _log.info("router: %s promoted; its epoch starts in %.1f s", record["version"], delay)

    def _within_ends(self, consumer: Consumer, offsets: dict[int, int]) -> dict[int, int]:
        """The group's offsets that can belong to the topic as it is: one past a partition's
        end was committed for an earlier topic of the same name (deleted and created again
        while the group kept its offsets), and starting there would route nothing until
        that many events came again. Those partitions start from their beginning."""
        kept = {}
        for p, offset in offsets.items():
            _low, high = watermarks(consumer, TopicPartition(self.source, p))
            if offset > high:
                _log.warning(
                    "router: the group's offset %d of %s[%d] is past its end %d, left from an "
                    "earlier topic of that name; reading it from its beginning",
                    offset,
                    self.source,
                    p,
                    high,
                )
                continue
            kept[p] = offset
        return kept

    def _due_in(self, now: float) -> float:
        """Seconds until the next transaction may commit (0 or less: now).

        Each transaction costs the broker about the same whatever it holds (its markers, one
        per partition written, and the coordinator's records), so committing every batch as
        it comes makes the transaction rate follow how the clients batch their sends rather
        than the load: at 2,000 events/s from a client lingering 20 ms, the router committed
        about 40 times a second, and those transactions were a large part of the broker's
        CPU on cores it shares with the workers. ``router_commit_interval_s`` bounds the rate;
        a batch of ``batch`` events commits at once all the same."""
        last = self.stats.last_commit_at
        interval = self.settings.router_commit_interval_s
        return 0.0 if last is None or interval <= 0 else last + interval - now

    def _stamp(self, first_seq: int) -> Epoch:
        """The epoch for a batch starting at ``first_seq``: a due promotion starts here."""
        if self._pending is not None and time.monotonic() >= self._pending[1]:
            record, self._pending = self._pending[0], None
            if int(record.get("log_seq", -1)) > first_seq:
                # Its states include events after this one: it cannot take over here (a log
                # recreated under it). Keep the current epoch, loudly.
                _log.error(
                    "router: %s holds states up to seq %d, past the next event %d; not switching",
                    record["version"],
                    record["log_seq"],
                    first_seq,
                )
                self.stats.refused.append(str(record["version"]))
                return self.epoch
            self.epoch = (str(record["version"]), first_seq)
            self._enforce_features(record)
            self.stats.switches.append({"version": self.epoch[0], "since": first_seq})
            _log.info("router: epoch %s starts at seq %d", self.epoch[0], first_seq)
        return self.epoch

    def _enforce_features(self, record: dict[str, Any]) -> None:
        """Make the sequencer require the feature count of ``record``'s version.

        A checkpoint that cannot be read or fails its digest is left to the workers to refuse
        (they will not serve it); the router keeps the length it had rather than stop.
        """
        version = str(record["version"])
        if version not in self._features:
            try:
                self._features[version] = model_features(record, self.settings)
            except (CheckpointError, RegistryError, OSError) as err:
                _log.error("router: cannot read the feature count of %s: %s", version, err)
                self._features[version] = None
        n = self._features[version]
        if n is None or self._sequencer is None:
            return
        if self.n_features is not None and self.n_features != n:
            _log.warning(
                "router: --features %d ignored; %s %s takes %d",
                self.n_features,
                self.model,
                version,
                n,
            )
        self._sequencer.n_features = n

    def _drained(self, partition: int, position: int, now: float) -> bool:
        """Whether the broker holds nothing past ``position`` for ``partition``.

        Quiet by our own clock is not enough: a router busy committing for longer than the
        grace period would take a partition whose next events are already written (but not
        yet fetched) for idle, and those events would then be rejected as time_backwards.
        A partition whose end stays ahead of us for 20 grace periods without a message
        (e.g. an aborted transaction's marker at the end) counts as idle all the same.
        """
        _low, high = watermarks(self._probe, TopicPartition(self.source, partition))
        if position >= high:
            self._behind_since.pop(partition, None)
            return True
        since = self._behind_since.setdefault(partition, now)
        return now - since >= 20 * self.grace_s

    def _offer(self, sequencer: Sequencer, partition: int, offset: int, value: bytes) -> None:
        if self._wire is not None and value.startswith(self._in_header):
            read = wire.read_interaction_core(value, len(self._in_header))
            if read is not None:
                sequencer.offer(partition, Interaction(*read[0], core=read[1]), offset)
                return
        # Another writer schema, or bytes the fast reader does not take: the Codec decodes
        # them (resolving the schema) or names what is wrong.
        try:
            record = self.in_codec.decode(value)
            event = Interaction.from_record(record)
        except SchemaError as exc:
            sequencer.offer_rejected(Rejected("unknown_schema", str(exc), None, partition, offset))
            return
        except (DecodeError, KeyError, TypeError, ValueError) as exc:
            sequencer.offer_rejected(Rejected("malformed", str(exc), None, partition, offset))
            return
        sequencer.offer(partition, event, offset)

    def _resend(self, tx: Transactions, tail: list[tuple[SequencedEvent, Epoch]]) -> None:
        """The inbox messages of ``tail`` (the log's latest events) once more, in a
        transaction of their own.

        A broker can complete a commit without all of its markers, and the new producer's
        sweep then aborts the records left open (streams.runtime.transactions): a batch's log
        records can stand committed while its inbox messages end aborted. The restored
        sequencer takes those events for routed, and their users' and items' later events
        would wait for them in the workers for good. Sent again, a message the workers
        already had is a repeat they ignore (each row's applied seq); one that was lost
        arrives. Two batches' worth cover the transaction in flight at the failure."""
        producer = tx.producer
        producer.begin_transaction()
        for epoch, run in itertools.groupby(tail, key=lambda pair: pair[1]):
            events = [event for event, _epoch in run]
            if self._wire is not None:
                self._produce_fast(producer, events, wire.stamp_bytes(*epoch), log=False)
            else:
                stamp = {"model_version": epoch[0], "model_since": epoch[1]}
                self._produce(producer, events, stamp, log=False)
        tx.commit()
        self.stats.resent += len(tail)
        _log.warning(
            "router: started over: sent the inbox messages of the log's latest %d events "
            "again (seqs %d to %d); the workers ignore those they had",
            len(tail),
            tail[0][0].seq,
            tail[-1][0].seq,
        )

    def _commit(
        self,
        tx: Transactions,
        consumer: Consumer,
        sequenced: list[SequencedEvent],
        rejected: list[Rejected],
        offsets: dict[int, int],
        originals: dict[tuple[int, int], tuple[bytes | None, bytes]],
    ) -> None:
        producer = tx.producer
        producer.begin_transaction()
        version, since = self._stamp(sequenced[0].seq) if sequenced else self.epoch
        if self._wire is not None:
            self._produce_fast(producer, sequenced, wire.stamp_bytes(version, since))
        else:
            self._produce(producer, sequenced, {"model_version": version, "model_since": since})
        for r in rejected:
            key, value, cut = dlq_copy(*originals[(r.partition, r.offset)])
            detail = r.detail[:DLQ_DETAIL_CHARS] + ("…" if len(r.detail) > DLQ_DETAIL_CHARS else "")
            producer.produce(
                self.dlq_topic,
                key=key,
                value=value,
                headers=[
                    ("reason", r.reason.encode()),
                    ("detail", detail.encode()),
                    ("source", f"{self.source}/{r.partition}/{r.offset}".encode()),
                    *cut,
                ],
            )
        moved = {p: o for p, o in offsets.items() if self._written.get(p) != o}
        for p, o in moved.items():
            producer.produce(self.positions_topic, key=str(p).encode(), value=str(o).encode())
        tx.commit()
        self._written.update(moved)
        self._report(consumer, offsets)
        self.stats.transactions += 1
        self.stats.last_commit_at = time.monotonic()
        if self.stats.first_commit_at is None:
            self.stats.first_commit_at = self.stats.last_commit_at
            self.stats.first_batch = len(sequenced)

    def _report(self, consumer: Consumer, offsets: dict[int, int] | None = None) -> None:
        """Commit the latest committed ``offsets`` to the consumer group as well, at most
        once a second and without waiting (called after each transaction and on every pass
        of the loop, so an idle router reports its last ones within a second): what lag
        monitors (`jodie dashboard`, the deployment benchmark) read. Never read back as
        positions (see ``read_positions``), so a failed or late one costs nothing but a
        stale lag figure."""
        if offsets is not None:
            self._unreported = offsets
        now = time.monotonic()
        if self._unreported is None or now - self._reported_at < 1.0:
            return
        self._reported_at = now
        tps = [TopicPartition(self.source, p, o) for p, o in self._unreported.items()]
        self._unreported = None
        try:
            consumer.commit(offsets=tps, asynchronous=True)
        except KafkaException as exc:
            _log.debug("router: group offsets not committed: %s", exc)

    def _produce(
        self,
        producer: Producer,
        sequenced: list[SequencedEvent],
        stamp: dict[str, Any],
        log: bool = True,
    ) -> None:
        """The log record (unless not ``log``) and both inbox messages of each event, encoded
        with the codecs."""
        for e in sequenced:
            ev = e.event
            if log:
                _send(
                    producer,
                    self.log_topic,
                    ev.event_id.encode(),
                    self.out_codec.encode({**to_log_record(e), **stamp}),
                )
            # Each side's owner gets the event with the link to its entity's previous event.
            data = event_data_of(ev)
            for topic, entity, prev, partner_prev in (
                (self.user_inbox, ev.user_id, e.prev_user_seq, e.prev_item_seq),
                (self.item_inbox, ev.item_id, e.prev_item_seq, e.prev_user_seq),
            ):
                body = {
                    "event": inbox_event(e.seq, prev, partner_prev, data),
                    "partner": None,
                    **stamp,
                }
                _send(producer, topic, entity.encode(), self.inbox_codec.encode(body))

    def _produce_fast(
        self, producer: Producer, sequenced: list[SequencedEvent], stamp: bytes, log: bool = True
    ) -> None:
        """What ``_produce`` sends, written by schemas.wire: the fields the three records
        share are encoded once per event, the epoch once per batch."""
        assert self._wire is not None
        writer, inbox = self._wire
        log_topic, user_inbox, item_inbox = self.log_topic, self.user_inbox, self.item_inbox
        core_of, long_of = wire.interaction_core, wire.long_bytes
        for seq, prev_user, prev_item, user_time, item_time, ev in sequenced:
            event_id, user_id, item_id, timestamp, features, label, core = ev
            if core is None:
                core = core_of(event_id, user_id, item_id, timestamp, features)
            s, u, i = long_of(seq), long_of(prev_user), long_of(prev_item)
            if log:
                record = writer.record(s, u, i, user_time, item_time, core, label, stamp)
                _send(producer, log_topic, event_id.encode(), record)
            # Each side's owner gets the event with the link to its entity's previous event.
            _send(producer, user_inbox, user_id.encode(), inbox.event(s, u, i, core, stamp))
            _send(producer, item_inbox, item_id.encode(), inbox.event(s, i, u, core, stamp))


def _send(producer: Producer, topic: str, key: bytes, value: bytes) -> None:
    """``produce``, waiting for room when the client's queue is full (a large batch)."""
    while True:
        try:
            producer.produce(topic, value, key)
            return
        except BufferError:
            producer.poll(0.05)
