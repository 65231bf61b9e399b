"""Helpers over confluent-kafka clients: transient retries, watermarks, batches, partitioning."""

from __future__ import annotations

import time
from collections.abc import Callable
from functools import lru_cache, partial
from typing import TypeVar

from confluent_kafka import Consumer, KafkaError, KafkaException, Message, TopicPartition

from streams.runtime.exceptions import RestoreError

# Answers that clear by themselves right after a broker starts or a topic is created
# (KRaft names a leader or coordinator a moment before it serves), though librdkafka does
# not flag all of them as retriable.
TRANSIENT = {
    KafkaError.NOT_LEADER_FOR_PARTITION,
    KafkaError.LEADER_NOT_AVAILABLE,
    KafkaError.UNKNOWN_TOPIC_OR_PART,
    KafkaError.NOT_COORDINATOR,
    KafkaError.COORDINATOR_NOT_AVAILABLE,
    KafkaError.COORDINATOR_LOAD_IN_PROGRESS,
    # librdkafka's own "not in my metadata (yet)": a partition whose leader just moved.
    KafkaError._UNKNOWN_PARTITION,
    # A request outstanding on a connection librdkafka tore down (its broker killed and
    # replaced): asked again, it goes to the broker that leads now.
    KafkaError._DESTROY_BROKER,
}

T = TypeVar("T")


def retry_transient(call: Callable[[], T], timeout_s: float = 30.0) -> T:
    """``call()``, retried (bounded by ``timeout_s``) while Kafka answers a transient error."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            return call()
        except KafkaException as exc:
            error = exc.args[0] if exc.args else None
            transient = isinstance(error, KafkaError) and (
                error.retriable() or error.code() in TRANSIENT
            )
            if not transient or time.monotonic() > deadline:
                raise
            time.sleep(0.2)


def watermarks(
    consumer: Consumer, tp: TopicPartition, timeout_s: float = 10.0, retry_s: float = 30.0
) -> tuple[int, int]:
    """Low and high offsets of a partition, asked of the broker (a just-created partition may
    answer NOT_LEADER for a moment, a partition whose leader died is unknown until another is
    elected: hence the retries, for ``retry_s``)."""
    ask = partial(consumer.get_watermark_offsets, tp, timeout=timeout_s)
    low, high = retry_transient(ask, retry_s)
    return int(low), int(high)


def committed_at(
    reader: Consumer, tp: TopicPartition, offset: int, timeout_s: float = 120.0
) -> bool:
    """Whether the record at ``offset`` of ``tp`` is committed (``RestoreError`` while still
    undecided after ``timeout_s``). ``reader``: a read_committed consumer with partition EOFs
    on. It gets that very record only if its transaction committed, and reads past it without
    getting it only if it aborted; while an open transaction holds the partition's stable end
    before it, that is not known yet, and the reader waits."""
    reader.assign([TopicPartition(tp.topic, tp.partition, offset)])
    deadline = time.monotonic() + timeout_s
    try:
        while time.monotonic() < deadline:
            msg = reader.poll(1.0)
            if msg is None:
                continue
            err = msg.error()
            if err is not None:
                if err.code() != KafkaError._PARTITION_EOF:
                    raise KafkaException(err)
                if (msg.offset() or 0) > offset:
                    return False  # passed without being returned: aborted
                continue  # the stable end is not past it yet
            return msg.offset() == offset
    finally:
        reader.unassign()
    raise RestoreError(
        f"{tp.topic}[{tp.partition}]@{offset}: still in an open transaction after {timeout_s} s"
    )


def murmur2(data: bytes) -> int:
    """Kafka's murmur2 hash (the Java client's ``Utils.murmur2``; librdkafka's
    ``murmur2_random``), as an unsigned 32-bit integer."""
    m, r = 0x5BD1E995, 24
    length = len(data)
    h = (0x9747B28C ^ length) & 0xFFFFFFFF
    whole = length - length % 4
    for i in range(0, whole, 4):
        k = int.from_bytes(data[i : i + 4], "little")
        k = (k * m) & 0xFFFFFFFF
        k ^= k >> r
        k = (k * m) & 0xFFFFFFFF
        h = ((h * m) & 0xFFFFFFFF) ^ k
    tail = length % 4
    if tail == 3:
        h ^= data[whole + 2] << 16
    if tail >= 2:
        h ^= data[whole + 1] << 8
    if tail >= 1:
        h ^= data[whole]
        h = (h * m) & 0xFFFFFFFF
    h ^= h >> 13
    h = (h * m) & 0xFFFFFFFF
    h ^= h >> 15
    return h


@lru_cache(maxsize=1 << 17)
def partition_for(key: bytes, partitions: int) -> int:
    """The partition the Java partitioner (and ``murmur2_random``) gives a non-empty key.
    Cached: a worker asks again for the same users and items (each hash is a Python loop)."""
    return (murmur2(key) & 0x7FFFFFFF) % partitions


def take(consumer: Consumer, most: int, timeout_s: float) -> list[Message]:
    """Up to ``most`` messages: waits at most ``timeout_s`` for the first, then takes only
    what is already fetched. (``consume(n, timeout)`` alone waits the whole timeout whenever
    fewer than n messages are there, which adds that timeout to every hop's latency.)"""
    first = consumer.poll(timeout_s)
    if first is None:
        return []
    return [first, *consumer.consume(num_messages=most - 1, timeout=0)] if most > 1 else [first]
