"""Read back what is in a topic: per-partition message counts and decoded samples."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from confluent_kafka import Consumer, KafkaError, Message, TopicPartition

from schemas.codec import Codec
from streams.exceptions import ReadError
from streams.runtime.clients import committed_reader
from streams.runtime.kafka import take, watermarks
from streams.settings import Settings


@dataclass(frozen=True)
class PartitionCount:
    partition: int
    low: int
    high: int

    @property
    def messages(self) -> int:
        """Offsets in the log; with transactions this includes commit markers."""
        return self.high - self.low


def partition_counts(
    consumer: Consumer, topic: str, timeout_s: float = 10.0
) -> list[PartitionCount]:
    metadata = consumer.list_topics(topic, timeout=timeout_s).topics[topic]
    if metadata.error is not None:
        raise RuntimeError(f"topic {topic}: {metadata.error}")
    counts = []
    for p in sorted(metadata.partitions):
        low, high = watermarks(consumer, TopicPartition(topic, p), timeout_s)
        counts.append(PartitionCount(p, low, high))
    return counts


class Bounded:
    """Reads every partition of ``topic`` from its start to the end it had when reading began.

    read_committed, so aborted transactions are never seen, and an end-of-partition event
    comes at the last stable offset: a transaction still open when reading began is not
    waited for. Later writes (a live topic) are not chased. ``pending`` holds the
    partitions not yet at that end; a caller may drop one from it to stop reading that
    partition early.
    """

    def __init__(self, consumer: Consumer, topic: str) -> None:
        self.consumer = consumer
        self.topic = topic
        self.counts = partition_counts(consumer, topic)
        self.ends = {c.partition: c.high for c in self.counts}
        self.pending = {c.partition for c in self.counts if c.high > c.low}
        consumer.assign([TopicPartition(topic, c.partition, c.low) for c in self.counts])

    def take(self, most: int, timeout_s: float) -> list[Message] | None:
        """The next messages within the bound, in partition order; None when nothing came
        for ``timeout_s``. End-of-partition events are consumed here."""
        messages = take(self.consumer, most, timeout_s)
        if not messages:
            return None
        kept = []
        for msg in messages:
            err = msg.error()
            p = msg.partition() or 0
            if err is not None:
                if err.code() == KafkaError._PARTITION_EOF:
                    self.pending.discard(p)
                    continue
                raise ReadError(f"reading {self.topic}: {err}")
            offset = msg.offset() or 0
            if offset >= self.ends[p] - 1:
                self.pending.discard(p)
                if offset >= self.ends[p]:
                    continue
            kept.append(msg)
        return kept


def read_all(
    settings: Settings,
    topic: str,
    limit: int | None = None,
    idle_timeout_s: float = 5.0,
    complete: bool = False,
) -> Iterator[tuple[bytes | None, bytes, int, int]]:
    """Yield (key, value, partition, offset) from the start of every partition to its end.

    Stops when every partition reached the end it had when reading began (read_committed,
    so aborted transactions are never seen), after ``limit`` messages, or after
    ``idle_timeout_s`` without any message — never waits forever. ``complete``: stopping
    for the idle timeout before the end (a broker slow to answer) is a ``ReadError``, for
    readers that rebuild state from the whole topic.
    """
    for msg in _messages(settings, topic, limit, idle_timeout_s, complete):
        value = msg.value()
        if value is not None:
            yield msg.key(), value, msg.partition() or 0, msg.offset() or 0


def read_with_headers(
    settings: Settings, topic: str, idle_timeout_s: float = 5.0
) -> Iterator[tuple[bytes | None, bytes, dict[str, bytes]]]:
    """Yield (key, value, headers) of every message, as ``read_all`` reads them (for the DLQ,
    whose headers say why each message is there). A missing value reads as empty."""
    for msg in _messages(settings, topic, None, idle_timeout_s):
        raw = msg.headers() or []
        pairs = raw.items() if isinstance(raw, dict) else raw
        headers = {
            name: (value.encode() if isinstance(value, str) else value or b"")
            for name, value in pairs
        }
        yield msg.key(), msg.value() or b"", headers


def _messages(
    settings: Settings,
    topic: str,
    limit: int | None,
    idle_timeout_s: float,
    complete: bool = False,
) -> Iterator[Message]:
    consumer = committed_reader(settings, group_id=f"jodie-inspect-{uuid.uuid4().hex[:8]}")
    try:
        bounded = Bounded(consumer, topic)
        seen = 0
        while bounded.pending and (limit is None or seen < limit):
            messages = bounded.take(1 if limit is not None else 1000, idle_timeout_s)
            if messages is None:
                if complete:
                    raise ReadError(
                        f"reading {topic}: partitions {sorted(bounded.pending)} not at their "
                        f"end after {idle_timeout_s} s without a message"
                    )
                break
            for msg in messages:
                seen += 1
                yield msg
    finally:
        consumer.close()


def decode_all(
    settings: Settings, topic: str, codec: Codec, limit: int | None = None
) -> Iterator[dict[str, Any]]:
    for _key, value, _p, _o in read_all(settings, topic, limit=limit):
        yield codec.decode(value)
