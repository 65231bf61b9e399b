"""What every worker reads besides its inboxes: all item vectors and the whole log."""

from __future__ import annotations

import heapq
import logging
import uuid

import numpy as np
from confluent_kafka import TopicPartition

from operators.retrieval.cooccurrence import CooccurrenceCandidates
from schemas.codec import SEQUENCED_INTERACTION
from streams.app.epochs import UNSTAMPED, Epoch, parse_label
from streams.app.processor import EPOCH_HEADER, SEQ_HEADER, STATS_HEADERS, Headers, Processor
from streams.app.serving import Serving
from streams.codecs import make_codec
from streams.runtime import clients
from streams.settings import Settings

_log = logging.getLogger("jodie.worker")
Stats = tuple[float, float, float]  # an item's event count, decayed count, time
Vector = tuple[int, str, np.ndarray, Stats]  # seq, item, [i(t), ī], its stats


class Feeds:
    """What every worker reads besides its inboxes: all item vectors and the whole log.

    - ``item-vectors`` (compacted): keeps each epoch's candidate index current with every
      item's latest [i(t), ī] computed with that epoch's weights, whoever owns the item, and
      hands each vector with its seq to the epoch's live evaluation (vectors of an epoch not
      served here yet are kept until it is);
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
        # vectors of epochs not served here yet
        self.waiting: dict[Epoch, list[Vector]] = {}

    def poll(self, applied_seq: int) -> None:
        messages = self.consumer.consume(num_messages=5000, timeout=0)
        fresh: dict[Epoch, list[Vector]] = {}
        for msg in messages:
            key, value = msg.key(), msg.value()
            if msg.error() is not None or value is None:
                continue
            if msg.topic() == self.vectors_topic and key is not None:
                epoch, seq, stats = _headers(msg.headers())
                vector = np.frombuffer(value, dtype="<f4")
                fresh.setdefault(epoch, []).append((seq, key.decode(), vector, stats))
            elif msg.topic() == self.log_topic:
                record = self.log_codec.decode(value)
                event = record["interaction"]
                heapq.heappush(
                    self._later, (int(record["seq"]), event["user_id"], event["item_id"])
                )
        for epoch, vectors in fresh.items():
            serving = self.processor.servings.get(epoch)
            if serving is None:
                self.waiting.setdefault(epoch, []).extend(vectors)
            else:
                _deliver(serving, vectors)
        cooc = self.cooccurrence
        while cooc is not None and self._later and self._later[0][0] <= applied_seq:
            _seq, user, item = heapq.heappop(self._later)
            cooc.observe(user, item)

    def adopt(self, serving: Serving) -> None:
        """Vectors of ``serving``'s epoch read before it was served here go to its index."""
        vectors = self.waiting.pop(serving.epoch, None)
        if vectors:
            _deliver(serving, vectors)

    def close(self) -> None:
        self.consumer.close()


def _deliver(serving: Serving, vectors: list[Vector]) -> None:
    """Item vectors as read to the index (the last per item wins: an item's vectors share a
    partition, so they come in order) and, each with its seq, to the live evaluation
    (vectors without a seq, from before it was recorded, only to the index)."""
    latest: dict[str, tuple[np.ndarray, Stats]] = {}
    for seq, item, vector, stats in vectors:
        latest[item] = (vector, stats)
        if seq >= 0:
            serving.live.item_vector(seq, item, vector, stats)
    serving.upsert(
        list(latest), np.stack([v for v, _ in latest.values()]), [s for _, s in latest.values()]
    )


def _headers(headers: Headers | dict[str, str | bytes | None] | None) -> tuple[Epoch, int, Stats]:
    """The epoch, the seq (-1: none) and the item's (count, decayed count, time) an
    item-vectors record names (count 0 and time NaN when it carries none)."""
    pairs = list(headers.items()) if isinstance(headers, dict) else headers or []
    epoch, seq = UNSTAMPED, -1
    stats = {name: float("nan") for name in STATS_HEADERS}
    for name, value in pairs:
        if name == EPOCH_HEADER and isinstance(value, bytes):
            epoch = parse_label(value.decode())
        elif name == SEQ_HEADER and isinstance(value, bytes):
            seq = int(value)
        elif name in stats and isinstance(value, bytes):
            stats[name] = float(value)
    count, trend, time = (stats[name] for name in STATS_HEADERS)
    return epoch, seq, (0.0 if count != count else count, 0.0 if trend != trend else trend, time)
