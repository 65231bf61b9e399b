"""What every worker reads besides its inboxes: all item vectors and the log's recent tail."""

from __future__ import annotations

import heapq
import logging
import math
import uuid

import numpy as np
from confluent_kafka import TopicPartition

from operators.retrieval.cooccurrence import CooccurrenceCandidates
from schemas import wire
from schemas.codec import SEQUENCED_INTERACTION
from streams.app.epochs import UNSTAMPED, Epoch, parse_label
from streams.app.processor import EPOCH_HEADER, SEQ_HEADER, STATS_HEADERS, Headers, Processor
from streams.app.serving import Serving
from streams.codecs import make_codec
from streams.runtime import clients
from streams.runtime.kafka import watermarks
from streams.settings import Settings

_log = logging.getLogger("jodie.worker")
Stats = tuple[float, float, float]  # an item's event count, decayed count, time
Vector = tuple[int, str, np.ndarray, Stats]  # seq, item, [i(t), ī], its stats


class Feeds:
    """What every worker reads besides its inboxes: all item vectors and the log's recent tail.

    - ``item-vectors`` (compacted), from its start: keeps each epoch's candidate index current
      with every item's latest [i(t), ī] computed with that epoch's weights, whoever owns the
      item, and hands each vector with its seq to the epoch's live evaluation (vectors of an
      epoch not served here yet are kept until it is, if it starts after the newest epoch
      served here; those of earlier epochs are dropped, streams.retirement). The index holds
      every item, so it is rebuilt whole at each start; compaction keeps about one record per
      item to read.
    - ``interactions.log``: who touched what, for the co-occurrence candidates only (nothing else
      reads the log here: a new version's catch-up reads it itself, streams.switch). The
      co-occurrence model remembers the last few distinct users of each recently active item, so
      what it knows is made of the log's recent past. Its candidates serve only the approximate
      index tiers, so the log is left unread until an index served here nears them (four fifths of
      ``JODIE_INDEX_EXACT_BELOW`` items; at once when that is 0). Then the worker reads only the
      last ``JODIE_FEED_WARMUP`` events (that many over the partitions, from each one's end; the
      router writes each partition in seq order), never the log from offset 0, and then follows it.
      No position is stored: a committed one would skip what the in-memory model lost with the
      process, and the tail rebuilds it in bounded time whatever the log's length. An event is
      observed only once this worker has applied a user event at least as late in the log (``seq``),
      so a worker replaying history never recommends from the future; events read ahead of that wait
      in memory, at most ``JODIE_FEED_AHEAD`` of them: past it (by one poll's messages at most) the
      log is left until the worker catches up (a worker that owns no user partition stops reading
      the log, and resumes where it stopped if it gets one), so a slow worker never holds the log's
      growth.
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
        # None: the log's schema is not the one schemas.wire reads (changed without it).
        self._log_header = (
            self.log_codec.header if wire.same_as_sequenced_codec(self.log_codec) else None
        )
        self.ahead = settings.feed_ahead
        self.consumer = clients.consumer(
            settings,
            f"jodie-feeds-{uuid.uuid4().hex[:8]}",
            {
                "isolation.level": "read_committed",
                "enable.auto.commit": False,
                "auto.offset.reset": "earliest",
                "fetch.wait.max.ms": 100,  # as the worker's own consumer (streams.runtime.loop)
                "logger": _log,
            },
        )
        self.warmup = settings.feed_warmup
        # The co-occurrence candidates serve only the approximate index tiers: the log is read
        # from the time an index nears the tier (four fifths of its threshold), so the model
        # is warm when the tier begins. Below that, reading and observing every event took
        # 11 % of a worker's loop under cProfile, for candidates nobody asks for.
        self.warm_at = settings.index_exact_below * 4 // 5
        meta = self.consumer.list_topics(self.vectors_topic, timeout=10).topics[self.vectors_topic]
        self.consumer.assign([TopicPartition(self.vectors_topic, p, 0) for p in meta.partitions])
        self._log_partitions: list[TopicPartition] = []
        # Next log offset to read per partition, to take the log up again where it stopped.
        self._next: dict[int, int] = {}
        self._paused = False
        self._later: list[tuple[int, str, str]] = []  # (seq, user, item), a heap
        # vectors of epochs not served here yet
        self.waiting: dict[Epoch, list[Vector]] = {}

    @property
    def reading_log(self) -> bool:
        """Whether the log feed has started (it never stops once it has)."""
        return bool(self._log_partitions)

    def _start_log(self) -> None:
        """Read the log from its last ``warmup`` events on (that many over the partitions,
        from each one's end), once co-occurrence candidates may be asked for soon."""
        if self.cooccurrence is None or self._log_partitions:
            return
        servings = self.processor.servings.values()
        if self.warm_at > 0 and not any(
            s.index.approximate or len(s.index) >= self.warm_at for s in servings
        ):
            return
        meta = self.consumer.list_topics(self.log_topic, timeout=10).topics[self.log_topic]
        tail = math.ceil(self.warmup / max(1, len(meta.partitions)))
        for p in meta.partitions:
            low, high = watermarks(self.consumer, TopicPartition(self.log_topic, p))
            self._log_partitions.append(TopicPartition(self.log_topic, p, max(low, high - tail)))
        self.consumer.incremental_assign(self._log_partitions)
        self._next = {tp.partition: tp.offset for tp in self._log_partitions}
        _log.info("reading %s's tail for the co-occurrence candidates", self.log_topic)

    def held(self) -> int:
        """Log events read but not yet observed (waiting for this worker's applied seq)."""
        return len(self._later)

    def poll(self, applied_seq: int) -> None:
        self._start_log()
        messages = self.consumer.consume(num_messages=5000, timeout=0)
        fresh: dict[Epoch, list[Vector]] = {}
        mine = self.processor.origin
        for msg in messages:
            key, value = msg.key(), msg.value()
            if msg.error() is not None or value is None:
                continue
            if msg.topic() == self.vectors_topic and key is not None:
                headers = msg.headers()
                if isinstance(headers, list) and headers and headers[-1] == mine:
                    # Written by this process, which gave the vector to its index and its
                    # live evaluation as it wrote it: reading it back would change nothing.
                    continue
                epoch, seq, stats = _headers(headers)
                vector = np.frombuffer(value, dtype="<f4")
                fresh.setdefault(epoch, []).append((seq, key.decode(), vector, stats))
            elif msg.topic() == self.log_topic:
                self._next[msg.partition() or 0] = (msg.offset() or 0) + 1
                heapq.heappush(self._later, self._log_ids(value))
        servings = self.processor.servings
        newest = max((e[1] for e in servings), default=None)
        for epoch, vectors in fresh.items():
            serving = servings.get(epoch)
            if serving is not None:
                _deliver(serving, vectors)
            elif newest is None or epoch[1] > newest:
                self.waiting.setdefault(epoch, []).extend(vectors)
            # else: an epoch before the newest served here, and not served: retired, or
            # finished elsewhere (an earlier run's). Kept, it would only grow.
        for epoch in [e for e in self.waiting if newest is not None and e[1] < newest]:
            del self.waiting[epoch]
        cooc = self.cooccurrence
        while cooc is not None and self._later and self._later[0][0] <= applied_seq:
            _seq, user, item = heapq.heappop(self._later)
            cooc.observe(user, item)
        self._throttle()

    def _log_ids(self, value: bytes) -> tuple[int, str, str]:
        """(seq, user, item) of a log record: read directly where ``schemas.wire`` reads it
        as the codec does (one per routed event, so fastavro's per-record cost counted)."""
        header = self._log_header
        if header is not None and value[: len(header)] == header:
            ids = wire.read_sequenced_ids(value, len(header))
            if ids is not None:
                return ids
        record = self.log_codec.decode(value)
        event = record["interaction"]
        return int(record["seq"]), event["user_id"], event["item_id"]

    def _throttle(self) -> None:
        """Stop reading the log while too many of its events wait for this worker's applied
        seq; take it up again once half of them were observed (hysteresis: no stop and start
        at every poll). The bound is exceeded by at most one poll's messages (5,000)."""
        held = len(self._later)
        if not self._paused and held >= self.ahead:
            # Unassigned rather than paused: a pause drops what the client had fetched but not
            # handed over, and a resume does not always fetch it again. The log is assigned
            # again from the offsets after the last records read, so nothing is skipped.
            self.consumer.incremental_unassign(self._log_partitions)
            self._paused = True
        elif self._paused and held <= self.ahead // 2:
            self.consumer.incremental_assign(
                [TopicPartition(self.log_topic, p, o) for p, o in self._next.items()]
            )
            self._paused = False

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
    (vectors without a seq, from before it was recorded, only to the index).

    A vector whose item the index already holds after as many events (its count) or more is
    left out: the owner of the item put that one, or a later one, in its index when it
    applied the event (this process's own records never get here: ``poll`` leaves them
    aside), so a vector read late — a previous run's, or one behind the owner's newer state —
    cannot set an item back to an older state. Vectors without a count (written before
    counts were kept) always go in."""
    latest: dict[str, tuple[np.ndarray, Stats]] = {}
    for seq, item, vector, stats in vectors:
        latest[item] = (vector, stats)
        if seq >= 0:
            serving.live.item_vector(seq, item, vector, stats)
    index = serving.index
    newer = {
        item: (vector, stats)
        for item, (vector, stats) in latest.items()
        if not (stats[0] > 0 and (held := index.get(item)) is not None and held[1][0] >= stats[0])
    }
    if newer:
        serving.upsert(
            list(newer), np.stack([v for v, _ in newer.values()]), [s for _, s in newer.values()]
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
