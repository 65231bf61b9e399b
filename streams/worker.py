"""The streaming worker: user and item sides over changelog-backed tables, exactly once.

Topics (keyed, JODIE_PARTITIONS partitions each; table partition p pairs with inbox partition p):

- ``user-inbox`` (key user): events for the user's owner (from the router) and items'
  pre-states (from item owners); the user side keeps each user's ``Inbox`` in ``user-state``;
- ``item-inbox`` (key item): the mirror image, ``item-state``;
- ``recommendations`` (key user) after every user update; ``item-vectors`` (key item) after every
  item update, read back by every worker into its candidate index.

Any number of workers share the inbox partitions through one consumer group. Each worker runs
a consume → process → produce loop with one transactional producer: a batch's outputs (partner
pre-states to any partition, recommendations, item vectors), its table changes (to the
changelogs) and its input offsets (``send_offsets_to_transaction`` with the group's metadata,
so a worker that lost its partitions is fenced) commit in one Kafka transaction or not at all.
read_committed consumers therefore see every output once, whichever worker crashes when.

We do not use Faust's ``exactly_once`` here: faust-streaming 0.15 keeps one transactional
producer per *destination* partition, so a worker's sends to other partitions (every message of
the exchange) commit apart from the input offsets — two workers fail with "No transaction
producer found" and a killed worker re-emits recommendations. One producer per worker, with
the consumer group's metadata (KIP-447), is what Kafka supports today.

The checkpoint is the baseline: an entity without a table row starts from its checkpoint
state (or the model's initial state if the checkpoint never saw it), so a worker needs no bulk
load before serving.

Model versions (``--model NAME``, streams.switch): every event comes stamped with the epoch
that serves it. A worker serves each epoch with that version's weights, from its states at
the epoch's start (the checkpoint caught up over the log, prepared in the background as soon
as the promotion shows on ``models``), on table rows keyed by epoch; recommendations name the
version. Events of the previous epoch still in flight finish with the previous weights.
"""

from __future__ import annotations

import contextlib
import heapq
import json
import logging
import signal
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import numpy as np
import torch
from confluent_kafka import Consumer, KafkaError, KafkaException, Message, Producer, TopicPartition

from operators.evaluation.metrics import RollingRanks
from operators.model.checkpoint import Checkpoint, load_checkpoint
from operators.protocol.exchange import Applied, ApplyMany, Inbox, PartnerState, SendPreState, drive
from operators.protocol.sides import (
    CheckpointStates,
    EntityState,
    ItemOutput,
    StreamModel,
    UserOutput,
)
from operators.retrieval.index import CooccurrenceCandidates, TieredIndex
from schemas import Codec
from schemas.codec import ENTITY_RECORD, INBOX_MESSAGE, RECOMMENDATION, SEQUENCED_INTERACTION
from schemas.exceptions import JodieError
from streams.app.epochs import (
    UNSTAMPED,
    Epoch,
    epoch_of,
    label,
    parse_label,
    row_key,
    split_row_key,
)
from streams.codecs import make_codec
from streams.models import Registry
from streams.records import (
    inbox_from_record,
    inbox_to_record,
    partner_message,
    partner_state,
    pending,
)
from streams.runtime import clients
from streams.runtime.kafka import partition_for, take
from streams.runtime.store import Table
from streams.settings import Settings
from streams.switch import Preparation, ServingWatch
from streams.topics import app_id, changelog_topic

_log = logging.getLogger("jodie.worker")

Box = Inbox[EntityState, EntityState]


class ModelMismatchError(JodieError):
    """A table row was computed by another model version than the one served."""


def model_version(ckpt: Checkpoint) -> str:
    meta = ckpt.meta
    version = meta.get("version")
    if isinstance(version, str) and version:
        return version
    return f"sha-{meta['sha256']['model.safetensors'][:12]}"


@dataclass
class Serving:
    """What one worker process serves: weights, baseline states, the candidate index."""

    settings: Settings
    checkpoint: Checkpoint
    version: str
    stream: StreamModel
    baseline: CheckpointStates
    index: TieredIndex
    candidates: int
    cooccurrence: CooccurrenceCandidates | None = None
    epoch: Epoch = UNSTAMPED

    @classmethod
    def load(cls, settings: Settings, checkpoint_dir: Path, version: str | None = None) -> Serving:
        ckpt = load_checkpoint(checkpoint_dir)
        cooccurrence = CooccurrenceCandidates() if settings.cooccurrence else None
        return cls.of(settings, ckpt, version or model_version(ckpt), cooccurrence)

    @classmethod
    def of(
        cls,
        settings: Settings,
        ckpt: Checkpoint,
        version: str,
        cooccurrence: CooccurrenceCandidates | None,
        epoch: Epoch = UNSTAMPED,
    ) -> Serving:
        """Serve ``ckpt``'s weights from its states; the co-occurrence model is shared by
        every epoch a worker serves (it is made of the log, not of weights)."""
        torch.set_num_threads(1)  # one event at a time: threads only add synchronisation
        cfg = ckpt.config
        dim = cfg.embedding_dim + cfg.item_static_dim
        baseline = CheckpointStates(ckpt)
        index = TieredIndex(dim)
        ids, vectors = baseline.item_vectors()
        if ids:
            index.upsert(ids, vectors)
        return cls(
            settings=settings,
            checkpoint=ckpt,
            version=version,
            stream=StreamModel(ckpt.model, settings.horizon_s),
            baseline=baseline,
            index=index,
            candidates=settings.candidates,
            cooccurrence=cooccurrence,
            epoch=epoch,
        )

    def live_ranks(self, outs: list[UserOutput]) -> list[int]:
        """The paper's rank of each event's item against the query made before the event.

        An item never seen ranks after every known item, as in `jodie evaluate`."""
        ranks = [len(self.index) + 1] * len(outs)
        known = [k for k, o in enumerate(outs) if o.true_vector is not None]
        if known:  # an empty index ranks every known item first
            got = self.index.ranks(
                np.stack([outs[k].query for k in known]),
                [outs[k].event.item_id for k in known],
                np.stack([outs[k].true_vector for k in known]),  # type: ignore[misc]
            )
            for k, r in zip(known, got.tolist(), strict=True):
                ranks[k] = int(r)
        return ranks

    def recommendations(self, outs: list[UserOutput], ranks: list[int]) -> list[dict[str, Any]]:
        """Top candidates for each predicted item, re-ranked by exact distance: nearest
        neighbours ∪ the user's history ∪ items whose audiences resemble those of the user's
        recent items (co-occurrence, MinHash LSH)."""
        if not outs:
            return []
        preds = np.stack([o.predicted for o in outs])
        extra = [
            [
                *out.history,
                *(
                    self.cooccurrence.candidates(out.history[:3], limit=2 * self.candidates)
                    if self.cooccurrence is not None
                    else []
                ),
            ]
            for out in outs
        ]
        ranked = self.index.recommend(preds, self.candidates, extra)
        records = []
        for out, pred, (ids, dist), rank in zip(outs, preds, ranked, ranks, strict=True):
            records.append(
                {
                    "user_id": out.event.user_id,
                    "event_id": out.event.event_id,
                    "timestamp": out.event.timestamp,
                    "model_version": self.version,
                    "projected_user": out.projected.tolist(),
                    "predicted_item": pred.tolist(),
                    "candidates": [
                        {"item_id": i, "score": -float(d)}
                        for i, d in zip(ids, dist.tolist(), strict=True)
                    ],
                    "state_change_probability": out.state_change_probability,
                    "rank": rank,
                }
            )
        return records


@dataclass
class WorkerStats:
    """Counters the worker logs and serves on /metrics."""

    started: float = field(default_factory=time.time)
    user_events: int = 0
    item_events: int = 0
    messages: int = 0
    transactions: int = 0
    restored: int = 0
    lag: int = 0
    ranks: RollingRanks = field(default_factory=RollingRanks)
    rate: float = 0.0  # user events/s over the last report interval
    unstamped: int = 0  # inbox messages of events routed before any version was promoted
    epochs: list[dict[str, Any]] = field(default_factory=list)  # each epoch served, prepared

    def snapshot(self, serving: Serving | None) -> dict[str, Any]:
        return {
            "model_version": serving.version if serving is not None else None,
            "epochs": self.epochs,
            "unstamped_skipped": self.unstamped,
            "uptime_s": round(time.time() - self.started, 1),
            "user_events": self.user_events,
            "item_events": self.item_events,
            "messages": self.messages,
            "transactions": self.transactions,
            "restored_records": self.restored,
            "events_per_s": round(self.rate, 1),
            "lag": self.lag,
            "items_indexed": len(serving.index) if serving is not None else 0,
            "online": self.ranks.summary(),
        }


Headers = list[tuple[str, str | bytes | None]]
Output = tuple[str, bytes, bytes, Headers | None]  # topic, key, value, headers
Local = Callable[[str, bytes], "Box | None"]  # (side, row key) → the row, if owned here
Message_ = tuple[str, Epoch, Box, dict[str, Any]]  # side, epoch, its row, the decoded message
#: Header of item-vectors records: the epoch whose weights computed the vector.
EPOCH_HEADER = "jodie-epoch"


class Processor:
    """The worker's logic without Kafka: inbox messages in, outputs and table changes out.

    ``process`` applies a batch of messages to their table rows and returns the messages to
    send; the caller owns rows and transactions. Unit-testable with in-memory tables. Each
    message belongs to an epoch (streams.app.epochs) and is handled by that epoch's ``Serving``
    only, on rows keyed by that epoch.
    """

    def __init__(self, settings: Settings, serving: Serving | None, stats: WorkerStats) -> None:
        self.stats = stats
        self.user_inbox = settings.topic("user-inbox")
        self.item_inbox = settings.topic("item-inbox")
        self.recommendations = settings.topic("recommendations")
        self.item_vectors = settings.topic("item-vectors")
        self.inbox_codec = Codec(INBOX_MESSAGE)
        self.record_codec = Codec(ENTITY_RECORD)
        self.rec_codec = Codec(RECOMMENDATION)
        self.applied_seq = -1  # the latest log position of a user event applied here
        self.servings: dict[Epoch, Serving] = {}
        self._many: dict[Epoch, tuple[ApplyMany[EntityState, EntityState], ...]] = {}
        if serving is not None:
            self.add(serving)

    def add(self, serving: Serving) -> None:
        """Serve ``serving.epoch`` from now on (its rows start from ``serving.baseline``)."""
        self.servings[serving.epoch] = serving
        self._many[serving.epoch] = (
            serving.stream.user_apply_many(serving.baseline.item),
            serving.stream.item_apply_many(),
        )

    @property
    def serving(self) -> Serving | None:
        """The latest epoch's serving (what /metrics reports)."""
        return self.servings[max(self.servings, key=lambda e: e[1])] if self.servings else None

    # Row codecs for the tables.
    def decoder(self, side: str) -> Callable[[bytes, bytes], Box]:
        def decode(key: bytes, raw: bytes) -> Box:
            record = self.record_codec.decode(raw)
            _entity, epoch = split_row_key(key)
            serving = self.servings.get(epoch)
            if serving is None or record["model_version"] != serving.version:
                # New weights on states computed by other weights would be neither model.
                raise ModelMismatchError(
                    f"{side} row {key!r} was computed by model {record['model_version']}; this "
                    f"worker serves {sorted(s.version for s in self.servings.values())} for "
                    f"its epoch. Serve a new version by promoting it (jodie models promote)."
                )
            return inbox_from_record(record, side)

        return decode

    def encode(self, key: bytes, box: Box) -> bytes:
        version = self.servings[split_row_key(key)[1]].version
        return self.record_codec.encode(inbox_to_record(box, version))

    def initial(self, side: str) -> Callable[[bytes], Box]:
        def start(key: bytes) -> Box:
            entity, epoch = split_row_key(key)
            base, name = self.servings[epoch].baseline, entity.decode()
            if side == "user":
                return Inbox(state=base.user(name), applied_seq=base.user_seq(name))
            return Inbox(state=base.item(name), applied_seq=base.item_seq(name))

        return start

    def process(self, messages: list[Message_], local: Local | None = None) -> list[Output]:
        """Apply a batch of (side, epoch, the row it is for, decoded message); the messages
        to send.

        Messages are offered to their rows first; then every row advances as far as it can,
        ready events of distinct entities applied together (operators.protocol.exchange.drive), so
        the model runs in batches while each entity still applies its events in order.
        ``local(side, row key)`` gives the row of an entity this worker owns (else None): a
        pre-state for it is handed over in memory and applied in the same transaction instead
        of a round trip through Kafka — the committed effect is the same.
        """
        by_epoch: dict[Epoch, list[tuple[str, Box, dict[str, Any]]]] = {}
        for side, epoch, box, message in messages:
            by_epoch.setdefault(epoch, []).append((side, box, message))
        sent: list[Output] = []
        for epoch, batch in sorted(by_epoch.items(), key=lambda kv: kv[0][1]):
            sent += self._process(self.servings[epoch], batch, local)
        return sent

    def _process(
        self,
        serving: Serving,
        messages: list[tuple[str, Box, dict[str, Any]]],
        local: Local | None,
    ) -> list[Output]:
        epoch = serving.epoch
        stamp = {"model_version": epoch[0], "model_since": epoch[1]}
        headers: Headers | None = (
            None if epoch == UNSTAMPED else [(EPOCH_HEADER, label(epoch).encode())]
        )
        touched: dict[str, list[Box]] = {"user": [], "item": []}
        for side, box, message in messages:
            if message["event"] is not None:
                box.offer_event(pending(message["event"], side))
            else:
                partner = message["partner"]
                box.offer_partner(PartnerState(int(partner["seq"]), partner_state(partner)))
            touched[side].append(box)
        sent: list[Output] = []
        vectors: dict[str, np.ndarray] = {}
        user_outs: list[UserOutput] = []
        user_many, item_many = self._many[epoch]
        many = {"user": user_many, "item": item_many}
        inbox = {"user": self.user_inbox, "item": self.item_inbox}
        while touched["user"] or touched["item"]:
            for side, other in (("item", "user"), ("user", "item")):
                boxes, touched[side] = touched[side], []
                for out in drive(boxes, many[side]) if boxes else []:
                    if isinstance(out, SendPreState):
                        key = row_key(out.partner.encode(), epoch)
                        row = local(other, key) if local is not None else None
                        if row is None:
                            body = {"event": None, "partner": partner_message(out.seq, out.state)}
                            value = self.inbox_codec.encode({**body, **stamp})
                            sent.append((inbox[other], out.partner.encode(), value, None))
                        elif row.offer_partner(PartnerState(out.seq, out.state)):
                            touched[other].append(row)
                    elif isinstance(out, Applied) and side == "item":
                        item_out: ItemOutput = out.output
                        vectors[item_out.event.item_id] = item_out.vector
                        self.stats.item_events += 1
                        sent.append(
                            (
                                self.item_vectors,
                                item_out.event.item_id.encode(),
                                item_out.vector.astype("<f4").tobytes(),
                                headers,
                            )
                        )
                    elif isinstance(out, Applied):
                        user_outs.append(out.output)
                        self.applied_seq = max(self.applied_seq, out.seq)
                if side == "item" and vectors:
                    # This worker's index sees its own items at once (before its users' next
                    # ranks); the others' come from item-vectors.
                    serving.index.upsert(list(vectors), np.stack(list(vectors.values())))
                    vectors.clear()
        ranks = serving.live_ranks(user_outs)
        for record, rank in zip(serving.recommendations(user_outs, ranks), ranks, strict=True):
            self.stats.ranks.add(rank)
            sent.append(
                (
                    self.recommendations,
                    record["user_id"].encode(),
                    self.rec_codec.encode(record),
                    None,
                )
            )
        self.stats.user_events += len(user_outs)
        return sent


class _Feeds:
    """What every worker reads besides its inboxes: all item vectors and the whole log.

    - ``item-vectors`` (compacted): keeps each epoch's candidate index current with every
      item's latest [i(t), ī] computed with that epoch's weights, whoever owns the item
      (vectors of an epoch not served here yet are kept until it is);
    - ``interactions.log``: who touched what, for the co-occurrence candidates. An event is
      observed only once this worker has applied a user event at least as late in the log
      (``seq``), so a worker replaying history never recommends from the future.
    """

    def __init__(
        self,
        settings: Settings,
        processor: Processor,
        cooccurrence: CooccurrenceCandidates | None,
    ) -> None:
        self.processor = processor
        self.cooccurrence = cooccurrence
        self.vectors_topic = settings.topic("item-vectors")
        self.log_topic = settings.topic("interactions.log")
        self.log_codec = make_codec(settings, SEQUENCED_INTERACTION, self.log_topic)
        self.consumer = clients.consumer(
            settings,
            f"jodie-feeds-{uuid.uuid4().hex[:8]}",
            {
                "isolation.level": "read_committed",
                "enable.auto.commit": False,
                "auto.offset.reset": "earliest",
                "fetch.wait.max.ms": 10,
                "logger": _log,
            },
        )
        topics = [self.vectors_topic]
        if cooccurrence is not None:
            topics.append(self.log_topic)
        assignment = []
        for topic in topics:
            meta = self.consumer.list_topics(topic, timeout=10).topics[topic]
            assignment += [TopicPartition(topic, p, 0) for p in meta.partitions]
        self.consumer.assign(assignment)
        self._later: list[tuple[int, str, str]] = []  # (seq, user, item), a heap
        self.waiting: dict[Epoch, dict[str, np.ndarray]] = {}  # vectors of epochs not served

    def poll(self, applied_seq: int) -> None:
        messages = self.consumer.consume(num_messages=5000, timeout=0)
        latest: dict[Epoch, dict[str, np.ndarray]] = {}
        for msg in messages:
            key, value = msg.key(), msg.value()
            if msg.error() is not None or value is None:
                continue
            if msg.topic() == self.vectors_topic and key is not None:
                epoch = _epoch_header(msg.headers())
                vectors = latest.setdefault(epoch, {})
                vectors[key.decode()] = np.frombuffer(value, dtype="<f4")  # last one wins
            elif msg.topic() == self.log_topic:
                record = self.log_codec.decode(value)
                event = record["interaction"]
                heapq.heappush(
                    self._later, (int(record["seq"]), event["user_id"], event["item_id"])
                )
        for epoch, vectors in latest.items():
            serving = self.processor.servings.get(epoch)
            if serving is None:
                self.waiting.setdefault(epoch, {}).update(vectors)
            else:
                serving.index.upsert(list(vectors), np.stack(list(vectors.values())))
        cooc = self.cooccurrence
        while cooc is not None and self._later and self._later[0][0] <= applied_seq:
            _seq, user, item = heapq.heappop(self._later)
            cooc.observe(user, item)

    def adopt(self, serving: Serving) -> None:
        """Vectors of ``serving``'s epoch read before it was served here go to its index."""
        vectors = self.waiting.pop(serving.epoch, None)
        if vectors:
            serving.index.upsert(list(vectors), np.stack(list(vectors.values())))

    def close(self) -> None:
        self.consumer.close()


def _epoch_header(headers: Headers | dict[str, str | bytes | None] | None) -> Epoch:
    pairs = list(headers.items()) if isinstance(headers, dict) else headers or []
    for name, value in pairs:
        if name == EPOCH_HEADER and isinstance(value, bytes):
            return parse_label(value.decode())
    return UNSTAMPED


class Worker:
    """One worker process: consumer group member, transactional producer, tables."""

    def __init__(
        self,
        settings: Settings,
        worker_id: int,
        checkpoint_dir: Path | None = None,
        version: str | None = None,
        model: str | None = None,
    ) -> None:
        """Serve one checkpoint (``checkpoint_dir``: the unstamped stream of a router run
        without a model) or the promoted versions of registry model ``model``, each from
        the start of its epoch."""
        if (checkpoint_dir is None) == (model is None):
            raise ValueError("give exactly one of checkpoint_dir and model")
        self.settings = settings
        self.worker_id = worker_id
        self.model = model
        self.cooccurrence = CooccurrenceCandidates() if settings.cooccurrence else None
        serving = None
        if checkpoint_dir is not None:
            ckpt = load_checkpoint(checkpoint_dir)
            serving = Serving.of(settings, ckpt, version or model_version(ckpt), self.cooccurrence)
        self.stats = WorkerStats()
        self.processor = Processor(settings, serving, self.stats)
        self.preparations: list[Preparation] = []
        self._watch: ServingWatch | None = None
        self._feeds: _Feeds | None = None
        root = settings.state_dir / app_id(settings) / f"worker-{worker_id}"
        self.tables: dict[str, Table[Box]] = {
            side: Table(
                settings,
                f"{side}-state",
                changelog_topic(settings, f"{side}-state"),
                root,
                self.processor.decoder(side),
                self.processor.encode,
                self.processor.initial(side),
            )
            for side in ("user", "item")
        }
        self.sides = {
            self.processor.user_inbox: "user",
            self.processor.item_inbox: "item",
        }
        self._stop = threading.Event()
        self._partitions: dict[str, int] = {}
        self._changelog_offsets: dict[tuple[str, int], int] = {}

    def stop(self) -> None:
        self._stop.set()

    # -- Kafka clients --------------------------------------------------------------------------
    def _clients(self) -> tuple[Consumer, Producer]:
        s = self.settings
        consumer = clients.consumer(
            s,
            f"{app_id(s)}-workers",
            {
                "client.id": f"jodie-worker-{self.worker_id}",
                "isolation.level": "read_committed",
                "enable.auto.commit": False,
                "auto.offset.reset": "earliest",
                # Range assignment hands both inboxes' partition p to one member when the
                # members subscribe alike; not required for correctness, kept for locality.
                "partition.assignment.strategy": "range",
                "session.timeout.ms": s.worker_session_timeout_ms,
                "heartbeat.interval.ms": max(500, s.worker_session_timeout_ms // 6),
                "fetch.wait.max.ms": 10,
                "logger": _log,
            },
        )
        producer = clients.transactional_producer(
            s,
            # One id per worker number: a restarted worker fences its predecessor and
            # aborts what it left open, at once.
            f"{app_id(s)}-worker-{self.worker_id}",
            logger=_log,
            **{
                # A worker that died without successor still blocks read_committed readers of
                # the partitions it wrote until its transaction times out: keep that short.
                "transaction.timeout.ms": s.worker_transaction_timeout_ms,
                "linger.ms": 2,
                "queue.buffering.max.messages": 1_000_000,
            },
        )
        return consumer, producer

    def _on_assign(self, _consumer: Consumer, partitions: list[TopicPartition]) -> None:
        began = time.monotonic()
        for tp in partitions:
            side = self.sides[tp.topic]
            self.stats.restored += self.tables[side].assign(tp.partition)
        _log.info(
            "worker %d assigned %s (restored in %.2f s)",
            self.worker_id,
            sorted((tp.topic, tp.partition) for tp in partitions),
            time.monotonic() - began,
        )

    def _on_revoke(self, _consumer: Consumer, partitions: list[TopicPartition]) -> None:
        # Called inside poll/consume, never with a transaction open: nothing to flush.
        for tp in partitions:
            self.tables[self.sides[tp.topic]].revoke(tp.partition)

    def _delivered(self, err: KafkaError | None, msg: Message) -> None:
        if err is not None:
            return  # the transaction's commit fails and the worker stops
        key = (msg.topic() or "", msg.partition() or 0)
        offset = msg.offset() or 0
        if offset > self._changelog_offsets.get(key, -1):
            self._changelog_offsets[key] = offset

    # -- the loop -----------------------------------------------------------------------------
    def run(self, max_seconds: float | None = None) -> WorkerStats:
        consumer, producer = self._clients()
        for topic, side in self.sides.items():
            meta = consumer.list_topics(topic, timeout=30).topics[topic]
            self._partitions[side] = len(meta.partitions)
        producer.init_transactions(60)
        feed = self._feeds = _Feeds(self.settings, self.processor, self.cooccurrence)
        if self.model is not None:
            self._watch = ServingWatch(self.settings, self.model)
        consumer.subscribe(
            list(self.sides),
            on_assign=self._on_assign,
            on_revoke=self._on_revoke,
            on_lost=self._on_revoke,
        )
        began = last_report = time.monotonic()
        reported_events = 0
        try:
            while not self._stop.is_set():
                if max_seconds is not None and time.monotonic() - began > max_seconds:
                    break
                self._follow_models()
                feed.poll(self.processor.applied_seq)
                messages = take(
                    consumer, self.settings.worker_batch, self.settings.commit_interval_s
                )
                if messages:
                    self._process(consumer, producer, messages)
                now = time.monotonic()
                if now - last_report >= 5.0:
                    self.stats.rate = (self.stats.user_events - reported_events) / (
                        now - last_report
                    )
                    reported_events = self.stats.user_events
                    last_report = now
                    self.stats.lag = self._lag(consumer)
                    _log.info(
                        "worker %d %s",
                        self.worker_id,
                        json.dumps(self.stats.snapshot(self.processor.serving)),
                    )
        finally:
            _log.info(
                "worker %d stopped %s",
                self.worker_id,
                json.dumps(self.stats.snapshot(self.processor.serving)),
            )
            feed.close()
            if self._watch is not None:
                self._watch.close()
            for prep in self.preparations:
                prep.stop.set()
            consumer.close()
            for table in self.tables.values():
                table.close()
        return self.stats

    def _process(self, consumer: Consumer, producer: Producer, messages: list[Message]) -> None:
        firsts: dict[tuple[str, int], int] = {}
        for msg in messages:
            if msg.error() is None:
                firsts.setdefault((msg.topic() or "", msg.partition() or 0), msg.offset() or 0)
        try:
            self._transaction(consumer, producer, messages)
        except KafkaException as exc:
            error = exc.args[0] if exc.args else None
            if not (isinstance(error, KafkaError) and error.txn_requires_abort()):
                raise  # fatal (e.g. fenced by a newer worker with our id): stop
            _log.warning(
                "worker %d: transaction aborted (%s); re-reading the batch", self.worker_id, error
            )
            producer.abort_transaction(60)
            # Rows were changed in memory by the aborted batch: forget them (RocksDB holds only
            # committed rows) and read the batch again.
            for table in self.tables.values():
                table.forget()
            for (topic, p), offset in firsts.items():
                # A partition no longer ours: its new owner starts from the committed offset.
                with contextlib.suppress(KafkaException):
                    consumer.seek(TopicPartition(topic, p, offset))

    def _transaction(self, consumer: Consumer, producer: Producer, messages: list[Message]) -> None:
        positions: dict[tuple[str, int], int] = {}
        decoded: list[tuple[str, int, bytes, Epoch, dict[str, Any]]] = []
        for msg in messages:
            err = msg.error()
            if err is not None:
                if err.code() == KafkaError._PARTITION_EOF:
                    continue
                raise KafkaException(err)
            topic, p = msg.topic() or "", msg.partition() or 0
            key, value = msg.key(), msg.value()
            positions[(topic, p)] = (msg.offset() or 0) + 1
            if key is None or value is None:
                continue  # only the router and workers write the inboxes: never happens
            message = self.processor.inbox_codec.decode(value)
            epoch = epoch_of(message)
            if self._serves(epoch):
                decoded.append((self.sides[topic], p, key, epoch, message))
        # Preparing an epoch may wait for its catch-up: done above, before the transaction
        # opens, so the wait never counts against the transaction timeout.
        producer.begin_transaction()
        batch: list[Message_] = []
        for side, p, key, epoch, message in decoded:
            table, rkey = self.tables[side], row_key(key, epoch)
            batch.append((side, epoch, table.get(p, rkey), message))
            table.touch(p, rkey)
        for out_topic, out_key, out_value, headers in self.processor.process(batch, self._local):
            producer.produce(out_topic, key=out_key, value=out_value, headers=headers)
        self.stats.messages += len(batch)
        changed = {side: table.changed() for side, table in self.tables.items()}
        self._changelog_offsets.clear()
        for side, records in changed.items():
            topic = self.tables[side].changelog
            for p, key, value in records:
                producer.produce(
                    topic, key=key, value=value, partition=p, on_delivery=self._delivered
                )
        producer.flush(60)  # serves the delivery reports: the changelog offsets reached
        offsets = [TopicPartition(t, p, o) for (t, p), o in positions.items()]
        producer.send_offsets_to_transaction(offsets, consumer.consumer_group_metadata(), 60)
        producer.commit_transaction(60)
        self.stats.transactions += 1
        for side, records in changed.items():
            topic = self.tables[side].changelog
            reached = {p: o for (t, p), o in self._changelog_offsets.items() if t == topic}
            self.tables[side].persist(records, reached)

    # -- model versions -----------------------------------------------------------------------
    def _serves(self, epoch: Epoch) -> bool:
        """Whether to handle a message of ``epoch``, preparing the epoch first if needed."""
        if epoch in self.processor.servings:
            return True
        if self.model is None:
            raise ModelMismatchError(
                f"an event is stamped for model {label(epoch)}, but this worker serves the "
                "checkpoint it was given: run the workers with --model when the router has one"
            )
        if epoch == UNSTAMPED:
            # Routed before any version was promoted (or by a router without --model): no
            # version is meant to serve it.
            if self.stats.unstamped % 10_000 == 0:
                _log.warning(
                    "worker %d: skipping events routed without a model version (%d so far); "
                    "promote a version and run the router with --model %s",
                    self.worker_id,
                    self.stats.unstamped + 1,
                    self.model,
                )
            self.stats.unstamped += 1
            return False
        self._prepare(epoch)
        return True

    def _follow_models(self) -> None:
        """On a promotion, start catching the new version up while the current one serves."""
        if self._watch is None:
            return
        record = self._watch.poll()
        if record is None:
            return
        version = record["version"]
        for prep in [
            p
            for p in self.preparations
            if p.target is None and p.version != version and not p.done.is_set()
        ]:
            # Promoted over before its epoch started: it may never start; a stamped event
            # of it would prepare it again (with its start known).
            prep.stop.set()
            self.preparations.remove(prep)
        if any(p.version == version and p.target is None for p in self.preparations):
            return
        current = self.processor.serving
        if current is not None and current.version == version:
            return
        _log.info("worker %d: %s promoted; catching it up", self.worker_id, version)
        self.preparations.append(Preparation(self.settings, record).start())

    def _prepare(self, epoch: Epoch) -> None:
        """Serve ``epoch`` from its states at its start: a catch-up already under way (the
        promotion was seen in time: usually done by now) or one started here and waited for."""
        version, since = epoch
        began = time.time()
        prep = next(
            (
                p
                for p in self.preparations
                if p.version == version
                and (p.target == since or (p.target is None and p.since in (None, since)))
            ),
            None,
        )
        if prep is not None and prep.target is None:
            prep.done.wait()
            if prep.error is not None or prep.since != since:
                self.preparations.remove(prep)
                prep = None
        if prep is None:
            assert self.model is not None
            announcement = Registry(self.settings, self.model).show(version)
            prep = Preparation(self.settings, announcement, target=since).start()
            self.preparations.append(prep)
        ckpt = prep.wait()
        self.preparations.remove(prep)
        serving = Serving.of(self.settings, ckpt, version, self.cooccurrence, epoch)
        if self._feeds is not None:
            self._feeds.adopt(serving)
        self.processor.add(serving)
        info = {
            "version": version,
            "since": since,
            "replayed": prep.replayed,
            "catch_up_s": round((prep.finished or began) - prep.began, 3),
            "waited_s": round(time.time() - began, 3),
            "serving_from": time.time(),
        }
        self.stats.epochs.append(info)
        _log.info("worker %d: serving %s %s", self.worker_id, label(epoch), json.dumps(info))

    def _local(self, side: str, key: bytes) -> Box | None:
        """The row of an entity whose partition this worker owns now (marked changed)."""
        table = self.tables[side]
        entity, _epoch = split_row_key(key)
        p = partition_for(entity, self._partitions[side])
        if p not in table.partitions:
            return None
        table.touch(p, key)
        return table.get(p, key)

    def _lag(self, consumer: Consumer) -> int:
        lag = 0
        try:
            for tp in consumer.position(consumer.assignment()):
                _low, high = consumer.get_watermark_offsets(tp, cached=True)
                if tp.offset >= 0 and high >= 0:
                    lag += max(0, high - tp.offset)
        except KafkaException:
            return -1
        return lag


def _serve_metrics(worker: Worker, port: int) -> ThreadingHTTPServer | None:
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            if self.path.rstrip("/") != "/metrics":
                self.send_error(404)
                return
            body = json.dumps(worker.stats.snapshot(worker.processor.serving)).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:
            return

    try:
        server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
    except OSError as exc:
        _log.warning("metrics page not served on 127.0.0.1:%d: %s", port, exc)
        return None
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def run_worker(
    settings: Settings,
    worker_id: int,
    checkpoint_dir: Path | None,
    loglevel: str = "warn",
    version: str | None = None,
    model: str | None = None,
) -> None:
    """Run one worker until it is stopped (SIGTERM / Ctrl-C); /metrics on web_port + id."""
    logging.basicConfig(
        level=getattr(logging, loglevel.upper(), logging.WARNING),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    worker = Worker(settings, worker_id, checkpoint_dir, version, model)
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: worker.stop())
    server = _serve_metrics(worker, settings.web_port + worker_id)
    try:
        worker.run()
    finally:
        if server is not None:
            server.shutdown()
