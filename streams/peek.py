"""Read back what is in a topic: per-partition message counts and decoded samples."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from confluent_kafka import Consumer, KafkaError, TopicPartition

from schemas.codec import Codec
from streams.kafka import committed_reader, watermarks
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


def read_all(
    settings: Settings, topic: str, limit: int | None = None, idle_timeout_s: float = 5.0
) -> Iterator[tuple[bytes | None, bytes, int, int]]:
    """Yield (key, value, partition, offset) from the start of every partition to its end.

    Stops when every partition reached the end it had when reading began (read_committed,
    so aborted transactions are never seen), after ``limit`` messages, or after
    ``idle_timeout_s`` without any message — never waits forever.
    """
    consumer = committed_reader(settings, group_id=f"jodie-inspect-{uuid.uuid4().hex[:8]}")
    try:
        counts = partition_counts(consumer, topic)
        ends = {c.partition: c.high for c in counts}
        pending = {c.partition for c in counts if c.high > c.low}
        consumer.assign([TopicPartition(topic, c.partition, c.low) for c in counts])
        seen = 0
        while pending and (limit is None or seen < limit):
            msg = consumer.poll(idle_timeout_s)
            if msg is None:
                break
            err = msg.error()
            p = msg.partition() or 0
            if err is not None:
                if err.code() == KafkaError._PARTITION_EOF:
                    pending.discard(p)
                    continue
                raise RuntimeError(f"reading {topic}: {err}")
            offset = msg.offset() or 0
            if offset >= ends[p] - 1:
                # The end seen at the start: later writes (a live topic) are not chased.
                pending.discard(p)
                if offset >= ends[p]:
                    continue
            seen += 1
            value = msg.value()
            if value is None:
                continue
            yield msg.key(), value, p, offset
    finally:
        consumer.close()


def decode_all(
    settings: Settings, topic: str, codec: Codec, limit: int | None = None
) -> Iterator[dict[str, Any]]:
    for _key, value, _p, _o in read_all(settings, topic, limit=limit):
        yield codec.decode(value)
